//! The source's side: pre-copy passes while the VM runs, then the VM frozen
//! for the last pass and its state.
//!
//! On success the VM is left frozen (vCPUs stopped, device I/O drained) and
//! the destination holds an exact copy: the caller commits the hand-over and
//! ends this VM, or, if the commit fails, calls [`crate::vm::Vm::unfreeze`].
//! On any error the VM is running again as it was before the call.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodeos_types::auth::PoolKey;
use tracing::{info, warn};

use super::converge::{Convergence, Next, PassReport};
use super::dirty::DirtyTracker;
use super::pages::{MemoryFile, PAGE};
use super::wire::{self, Channel, Kind, MAX_PAGES_PER_FRAME, MAX_PAYLOAD};
use super::{Budget, MigrationError, Progress, Summary};
use crate::vm::Vm;

/// How to send.
#[derive(Debug, Clone)]
pub struct SendParams {
    pub vm_id: String,
    pub pool_key: PoolKey,
    pub budget: Budget,
    /// Cap on the stream's rate, bytes per second (`None`: as fast as the link).
    pub bandwidth: Option<u64>,
}

fn lock(vm: &Mutex<Vm>) -> std::sync::MutexGuard<'_, Vm> {
    vm.lock().unwrap_or_else(|p| p.into_inner())
}

/// Paces the stream to a byte rate.
#[derive(Debug)]
struct Pacer {
    start: Instant,
    limit: Option<u64>,
}

impl Pacer {
    fn wait(&self, sent: u64) {
        let Some(limit) = self.limit.filter(|l| *l > 0) else { return };
        let due = Duration::from_secs_f64(sent as f64 / limit as f64);
        let now = self.start.elapsed();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

/// Sends pages in batches; pages that read as zero go as ranges.
struct PageSender<'a, S> {
    chan: &'a mut Channel<S>,
    file: &'a MemoryFile,
    pacer: &'a Pacer,
    cancel: &'a AtomicBool,
    buf: Vec<u8>,
    addrs: Vec<u64>,
    zeros: Vec<(u64, u32)>,
    pages: u64,
    zero_pages: u64,
}

impl<S: Read + Write> PageSender<'_, S> {
    fn page(&mut self, gpa: u64, maybe_data: bool) -> Result<(), MigrationError> {
        let slot = self.addrs.len() * PAGE as usize;
        let zero = !maybe_data || {
            let page = &mut self.buf[slot..slot + PAGE as usize];
            self.file.read_page(gpa, page).map_err(wire::WireError::Io)?;
            page == ZERO_PAGE
        };
        if zero {
            self.zero_pages += 1;
            match self.zeros.last_mut() {
                Some((start, n)) if *start + u64::from(*n) * PAGE == gpa && *n < u32::MAX => *n += 1,
                _ => self.zeros.push((gpa, 1)),
            }
            if self.zeros.len() * 12 >= MAX_PAYLOAD - 12 {
                self.flush_zeros()?;
            }
            return Ok(());
        }
        self.addrs.push(gpa);
        self.pages += 1;
        if self.addrs.len() == MAX_PAGES_PER_FRAME {
            self.flush_pages()?;
        }
        Ok(())
    }

    fn flush_pages(&mut self) -> Result<(), MigrationError> {
        if self.addrs.is_empty() {
            return Ok(());
        }
        if self.cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::Cancelled);
        }
        let header = wire::pages_header(&self.addrs);
        let n = self.addrs.len() * PAGE as usize;
        self.chan.send(Kind::Pages, &[&header, &self.buf[..n]])?;
        self.addrs.clear();
        self.pacer.wait(self.chan.bytes_sent);
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<(), MigrationError> {
        if !self.zeros.is_empty() {
            self.chan.send(Kind::Zero, &[&wire::zero_ranges(&self.zeros)])?;
            self.zeros.clear();
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), MigrationError> {
        self.flush_pages()?;
        self.flush_zeros()
    }
}

static ZERO_PAGE: [u8; PAGE as usize] = [0; PAGE as usize];

/// Takes vCPU time away in 100 ms windows while a migration cannot converge.
struct Throttle {
    percent: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    fn start(vm: Arc<Mutex<Vm>>) -> Self {
        let percent = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (percent.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("mig-throttle".into())
            .spawn(move || {
                const WINDOW: Duration = Duration::from_millis(100);
                while !s.load(Ordering::Relaxed) {
                    let pct = u32::from(p.load(Ordering::Relaxed).min(99));
                    if pct == 0 {
                        std::thread::sleep(WINDOW);
                        continue;
                    }
                    if let Err(e) = lock(&vm).pause() {
                        warn!(error = %e, "throttle cannot pause the vCPUs");
                    }
                    std::thread::sleep(WINDOW * pct / 100);
                    let _ = lock(&vm).resume();
                    std::thread::sleep(WINDOW * (100 - pct) / 100);
                }
            })
            .map_err(|e| warn!(error = %e, "no throttle thread: auto-converge is off"))
            .ok();
        Self { percent, stop, thread }
    }

    fn set(&self, percent: u8) {
        self.percent.store(percent, Ordering::Relaxed);
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Migrates `vm` over `stream` (connected to the destination's node).
pub fn send<S: Read + Write>(
    vm: &Arc<Mutex<Vm>>,
    stream: S,
    params: &SendParams,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary, MigrationError> {
    let started = Instant::now();
    let (kvm, mem, layout) = {
        let v = lock(vm);
        let (kvm, mem) = v.memory();
        (kvm, mem, v.layout().clone())
    };
    let file = MemoryFile::new(&mem).map_err(wire::WireError::Io)?;
    let mut chan = Channel::connect(stream, &params.pool_key, &params.vm_id)?;
    let encoded = postcard::to_allocvec(&layout).map_err(MigrationError::StateEncode)?;
    chan.send(Kind::Layout, &[&encoded])?;
    let pacer = Pacer { start: Instant::now(), limit: params.bandwidth };
    let tracker = DirtyTracker::start(kvm, mem.clone())?;
    let throttle = Throttle::start(vm.clone());
    let mut decide = Convergence::new(params.budget);
    let mut sender = PageSender {
        chan: &mut chan,
        file: &file,
        pacer: &pacer,
        cancel,
        buf: vec![0; MAX_PAGES_PER_FRAME * PAGE as usize],
        addrs: Vec::new(),
        zeros: Vec::new(),
        pages: 0,
        zero_pages: 0,
    };
    let mut report = Progress { memory_bytes: file.len(), ..Progress::default() };

    // Pass 0 sends everything; later passes what the previous one let the guest dirty.
    let mut todo: Vec<(u64, bool)> = file.pages_with_data();
    let mut pass = 0u32;
    let result = loop {
        let t0 = Instant::now();
        let before = sender.chan.bytes_sent;
        let sent_before = sender.pages + sender.zero_pages;
        let step =
            todo.iter().try_for_each(|&(gpa, data)| sender.page(gpa, data)).and_then(|()| sender.finish());
        if let Err(e) = step {
            break Err(e);
        }
        let pass_frame =
            [&pass.to_le_bytes()[..], &(sender.pages + sender.zero_pages).to_le_bytes()].concat();
        if let Err(e) = sender.chan.send(Kind::PassDone, &[&pass_frame]) {
            break Err(e.into());
        }
        let dirty = match tracker.collect() {
            Ok(d) => d,
            Err(e) => break Err(e.into()),
        };
        let pass_report = PassReport {
            pages_sent: sender.pages + sender.zero_pages - sent_before,
            bytes_sent: sender.chan.bytes_sent - before,
            took: t0.elapsed(),
            dirty_pages: dirty.len() as u64,
            elapsed: started.elapsed(),
        };
        let next = decide.after_pass(&pass_report);
        report.pass = pass;
        report.dirty_pages = dirty.len() as u64;
        report.rate_bytes_per_sec = Convergence::rate(&pass_report) as u64;
        report.expected_downtime_ms =
            Convergence::estimate(&pass_report, dirty.len() as u64).as_millis() as u64;
        report.throttle_percent = decide.throttle();
        report.bytes_sent = sender.chan.bytes_sent;
        progress(&report);
        throttle.set(decide.throttle());
        todo = dirty.into_iter().map(|g| (g, true)).collect();
        pass += 1;
        match next {
            Next::Pass => continue,
            Next::StopAndCopy { .. } => break Ok(()),
            Next::Abort(why) => break Err(MigrationError::NoConvergence(why)),
        }
    };
    drop(throttle);
    if let Err(e) = result {
        abort(sender.chan, &e);
        return Err(e);
    }

    // Stop and copy.
    let paused = Instant::now();
    lock(vm).freeze();
    let last = (|| -> Result<(), MigrationError> {
        // The pages the last pre-copy pass left dirty, and those dirtied since.
        let mut last: Vec<u64> = todo.iter().map(|(g, _)| *g).collect();
        last.extend(tracker.collect()?);
        last.sort_unstable();
        last.dedup();
        for gpa in last {
            sender.page(gpa, true)?;
        }
        sender.finish()?;
        let state = lock(vm).save_state()?;
        let encoded = postcard::to_allocvec(&state).map_err(MigrationError::StateEncode)?;
        sender.chan.send(Kind::State, &[&encoded])?;
        sender.chan.flush()?;
        let mut buf = Vec::new();
        match sender.chan.recv(&mut buf)? {
            Kind::Restored => Ok(()),
            Kind::Abort => Err(MigrationError::PeerAborted(String::from_utf8_lossy(&buf).into_owned())),
            other => Err(MigrationError::Unexpected(other)),
        }
    })();
    let paused_ms = paused.elapsed().as_millis() as u64;
    if let Err(e) = last {
        abort(sender.chan, &e);
        if let Err(u) = lock(vm).unfreeze() {
            warn!(error = %u, "cannot resume the VM after a failed migration");
        }
        return Err(e);
    }
    let summary = Summary {
        passes: pass,
        bytes_sent: sender.chan.bytes_sent,
        pages_sent: sender.pages,
        zero_pages: sender.zero_pages,
        paused_ms,
        total_ms: started.elapsed().as_millis() as u64,
    };
    info!(
        passes = summary.passes,
        bytes = summary.bytes_sent,
        paused_ms,
        total_ms = summary.total_ms,
        "migration sent; the destination holds the VM"
    );
    Ok(summary)
}

/// Tells the destination why (best effort: the stream may be what failed).
fn abort<S: Read + Write>(chan: &mut Channel<S>, e: &MigrationError) {
    let why = nodeos_types::error_chain(e);
    let _ = chan.send(Kind::Abort, &[why.as_bytes()]);
    let _ = chan.flush();
}
