//! vCPU threads: one per vCPU, each running `KVM_RUN` in a loop and handing
//! port and MMIO exits to the buses.
//!
//! Pause parks every thread outside `KVM_RUN` (a kick gets a running vCPU
//! out); resume unparks them; stop ends the loops, joins the threads and hands
//! the vCPUs back, their last exit completed inside KVM so that their saved
//! state is exact (a snapshot or a migration saves them; an aborted
//! migration starts them again with [`VcpuSet::start`]). A vCPU that cannot go
//! on (triple fault, entry failure, emulation failure) ends the VM through the
//! [`EndSignal`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nodeos_hv::{Vcpu, VcpuExit, VcpuKicker};
use tracing::{error, info, warn};

use crate::control::StopReason;
use crate::devices::bus::Bus;

/// KVM_SYSTEM_EVENT types (linux/kvm.h).
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// How the VM ends: the first reason set wins; whoever waits is woken.
#[derive(Debug, Clone, Default)]
pub struct EndSignal {
    inner: Arc<(Mutex<Option<StopReason>>, Condvar)>,
}

impl EndSignal {
    pub fn set(&self, reason: StopReason) {
        let (m, cv) = &*self.inner;
        let mut r = m.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
            cv.notify_all();
        }
    }

    pub fn get(&self) -> Option<StopReason> {
        *self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until a reason is set.
    pub fn wait(&self) -> StopReason {
        let (m, cv) = &*self.inner;
        let mut r = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(reason) = *r {
                return reason;
            }
            r = cv.wait(r).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[derive(Debug, Default)]
struct RunControl {
    paused: Mutex<bool>,
    resumed: Condvar,
    stop: AtomicBool,
    parked: AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot start vCPU thread {0}")]
    Thread(u32, #[source] std::io::Error),
    #[error("cannot prepare to kick vCPU {0}")]
    Kicker(u32, #[source] nodeos_hv::HvError),
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
}

/// The running vCPU threads of one VM.
#[derive(Debug)]
pub struct VcpuSet {
    threads: Vec<(JoinHandle<Vcpu>, VcpuKicker)>,
    ctl: Arc<RunControl>,
}

impl VcpuSet {
    /// Starts one thread per vCPU.
    pub fn start(vcpus: Vec<Vcpu>, pio: Arc<Bus>, mmio: Arc<Bus>, end: EndSignal) -> Result<Self, VcpuError> {
        let ctl = Arc::new(RunControl::default());
        let mut threads = Vec::new();
        for vcpu in vcpus {
            let id = vcpu.id();
            let kicker = vcpu.kicker().map_err(|e| VcpuError::Kicker(id, e))?;
            let (ctl2, pio2, mmio2, end2) = (ctl.clone(), pio.clone(), mmio.clone(), end.clone());
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || run_loop(vcpu, ctl2, pio2, mmio2, end2))
                .map_err(|e| VcpuError::Thread(id, e))?;
            threads.push((handle, kicker));
        }
        Ok(VcpuSet { threads, ctl })
    }

    fn kick_all(&self) {
        for (t, k) in &self.threads {
            if let Err(e) = k.kick(t) {
                warn!(error = %e, "vCPU kick failed");
            }
        }
    }

    /// Parks every vCPU outside the guest; returns once all are parked.
    pub fn pause(&self) -> Result<(), VcpuError> {
        *self.ctl.paused.lock().unwrap_or_else(|p| p.into_inner()) = true;
        let deadline = Instant::now() + Duration::from_secs(5);
        // A kick can land just before a thread enters KVM_RUN; immediate_exit
        // covers that, and repeating the kick covers the rest.
        while self.ctl.parked.load(Ordering::SeqCst) < self.live_threads() {
            if Instant::now() > deadline {
                return Err(VcpuError::PauseTimeout(Duration::from_secs(5)));
            }
            self.kick_all();
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn live_threads(&self) -> usize {
        self.threads.iter().filter(|(t, _)| !t.is_finished()).count()
    }

    pub fn resume(&self) {
        *self.ctl.paused.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.ctl.resumed.notify_all();
    }

    /// Ends every loop, joins the threads and returns the vCPUs in id order
    /// (a thread that does not stop within 5 s is left to process exit and
    /// its vCPU is missing from the result).
    pub fn stop(&mut self) -> Vec<Vcpu> {
        self.ctl.stop.store(true, Ordering::SeqCst);
        self.resume();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.threads.iter().any(|(t, _)| !t.is_finished()) && Instant::now() < deadline {
            self.kick_all();
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut vcpus = Vec::new();
        for (t, _) in self.threads.drain(..) {
            if !t.is_finished() {
                error!("a vCPU thread did not stop; leaving it to process exit");
                continue;
            }
            match t.join() {
                Ok(v) => vcpus.push(v),
                Err(_) => error!("a vCPU thread panicked"),
            }
        }
        vcpus.sort_by_key(Vcpu::id);
        vcpus
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}

/// Completes the vCPU's last exit inside KVM: KVM applies the data of an
/// `IN` or MMIO read, and finishes a string I/O instruction, only on the next
/// `KVM_RUN`, so a state saved before that would be wrong. An immediate-exit
/// `KVM_RUN` does this without running guest code.
fn complete_exit(vcpu: &mut Vcpu) {
    let id = vcpu.id();
    vcpu.set_immediate_exit(true);
    match vcpu.run() {
        Ok(VcpuExit::Interrupted) => {}
        Ok(other) => warn!(vcpu = id, exit = ?other, "unexpected exit while completing the last one"),
        Err(e) => warn!(vcpu = id, error = %e, "cannot complete the vCPU's last exit"),
    }
    vcpu.set_immediate_exit(false);
}

fn run_loop(mut vcpu: Vcpu, ctl: Arc<RunControl>, pio: Arc<Bus>, mmio: Arc<Bus>, end: EndSignal) -> Vcpu {
    let id = vcpu.id();
    loop {
        if ctl.stop.load(Ordering::SeqCst) {
            complete_exit(&mut vcpu);
            return vcpu;
        }
        {
            let mut paused = ctl.paused.lock().unwrap_or_else(|p| p.into_inner());
            if *paused {
                ctl.parked.fetch_add(1, Ordering::SeqCst);
                while *paused && !ctl.stop.load(Ordering::SeqCst) {
                    paused = ctl.resumed.wait(paused).unwrap_or_else(|p| p.into_inner());
                }
                ctl.parked.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
        }
        let reason = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Interrupted) => {
                vcpu.set_immediate_exit(false);
                None
            }
            Ok(VcpuExit::Hlt) => Some(StopReason::GuestShutdown),
            Ok(VcpuExit::Shutdown) => {
                info!(vcpu = id, "guest reset (triple fault or reset request)");
                Some(StopReason::GuestReset)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                SYSTEM_EVENT_SHUTDOWN => StopReason::GuestShutdown,
                SYSTEM_EVENT_RESET => StopReason::GuestReset,
                _ => StopReason::GuestCrash,
            }),
            Ok(VcpuExit::InternalError) => {
                let ie = vcpu.internal_error();
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                error!(vcpu = id, suberror = ie.suberror, data = ?ie.data, rip = format_args!("{rip:#x}"), "KVM could not emulate a guest instruction");
                Some(StopReason::GuestCrash)
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                error!(vcpu = id, reason, cpu, "VM entry failed");
                Some(StopReason::GuestCrash)
            }
            Ok(other) => {
                warn!(vcpu = id, exit = ?other, "unexpected vCPU exit ignored");
                None
            }
            Err(e) => {
                error!(vcpu = id, error = %e, "KVM_RUN failed");
                Some(StopReason::GuestCrash)
            }
        };
        if let Some(r) = reason {
            end.set(r);
            return vcpu;
        }
    }
}
