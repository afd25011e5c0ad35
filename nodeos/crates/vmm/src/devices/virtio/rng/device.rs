//! The virtio-rng device: one request queue served by one I/O thread.
//!
//! Features offered: VERSION_1 only; there is no configuration space.
//!
//! Each chain must be device-writable only; the device fills up to
//! [`MAX_REQUEST`] bytes of it from getrandom(2) and returns it with the count
//! written. Two cases hold a chain instead of answering it, because Linux's
//! `virtio_rng` treats a 0-byte answer to a good request as "no request
//! pending" and would wait forever: the [`TokenBucket`] is empty (the thread
//! waits for the refill), or the host CSPRNG is not yet initialised (it
//! retries after [`EMPTY_RETRY`]). Held chains keep their order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::limit::{RateLimit, TokenBucket};
use crate::devices::virtio::chain::{Chain, pop_head, read_chain};
use crate::devices::virtio::device::{ActivateError, Activation, VirtioDevice, VirtioInterrupt};
use crate::devices::virtio::io_thread::{IoThread, borrow_fd, drain};
use crate::devices::virtio::{TYPE_RNG, VIRTIO_F_VERSION_1};
use crate::memory::GuestMem;

pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one chain gets, whatever its buffers could hold: bounds the
/// work (and the bounce buffer) of a single request. Linux asks for at most
/// `SMP_CACHE_BYTES` (64) to 4 KiB at a time.
pub const MAX_REQUEST: usize = 64 << 10;
/// How long to wait before asking the host again when getrandom(2) had nothing.
pub const EMPTY_RETRY: Duration = Duration::from_millis(100);
/// The longest single epoll wait while a chain is held; the deadline is
/// recomputed on waking, so this only bounds the timeout argument.
const MAX_WAIT_MS: u16 = 60_000;

/// What the device did, for the worker's metrics.
#[derive(Debug, Default)]
pub struct RngCounters {
    /// Chains answered with random bytes.
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    /// Chains answered with 0 bytes: invalid, device-readable, or empty.
    pub bad_requests: AtomicU64,
    /// Times a chain was held because the rate limit was reached.
    pub throttled: AtomicU64,
}

/// Fills a buffer with random bytes and returns how many it wrote (0 when it
/// has none right now).
type Source = Box<dyn FnMut(&mut [u8]) -> usize + Send>;

/// A virtio-rng device drawing from the host kernel's CSPRNG under `limit`.
pub struct Rng {
    limit: RateLimit,
    counters: Arc<RngCounters>,
    thread: Option<IoThread<Queue>>,
    sizes: [u16; 1],
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng").field("limit", &self.limit).field("active", &self.thread.is_some()).finish()
    }
}

impl Rng {
    /// `RateLimit::default()` is 1 MiB/s with a 1 MiB burst.
    pub fn new(limit: RateLimit) -> Self {
        Self { limit, counters: Arc::default(), thread: None, sizes: [QUEUE_SIZE] }
    }

    pub fn counters(&self) -> Arc<RngCounters> {
        self.counters.clone()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.reset();
        let Activation { mem, queues, notifiers, interrupt, .. } = a;
        if queues.len() != 1 || notifiers.len() != 1 {
            return Err(ActivateError::QueueCount { expected: 1, got: queues.len() });
        }
        let (Some(queue), Some(notify)) = (queues.into_iter().next(), notifiers.into_iter().next()) else {
            return Err(ActivateError::QueueCount { expected: 1, got: 0 });
        };
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady { index: 0 });
        }
        // A fresh, full bucket per activation: a reset gives the guest nothing
        // a reboot would not.
        let bucket = TokenBucket::new(self.limit, Instant::now());
        let worker =
            RngWorker::new(queue, mem, interrupt, self.counters.clone(), bucket, Box::new(host_random));
        let thread = IoThread::spawn("virtio-rng", move |stop| worker.run(&notify, &stop))
            .map_err(ActivateError::Thread)?;
        self.thread = Some(thread);
        Ok(())
    }

    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        self.thread.take()?.stop().map(|q| vec![q])
    }

    fn reset(&mut self) {
        // Dropping the I/O thread signals it and joins it.
        self.thread = None;
    }
}

/// getrandom(2) without blocking: the I/O thread must stay responsive to its
/// stop eventfd, so an uninitialised host pool (EAGAIN) reads as 0 bytes. A
/// signal can cut a large read short; fewer bytes are still good bytes.
fn host_random(buf: &mut [u8]) -> usize {
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes to `buf`, which
        // is exclusively borrowed for the call.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
        match usize::try_from(n) {
            Ok(n) => return n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::debug!(error = %e, "getrandom gave no bytes");
                    return 0;
                }
            }
        }
    }
}

const TOKEN_NOTIFY: u64 = 0;
const TOKEN_STOP: u64 = 1;

/// What became of one chain.
enum Outcome {
    /// Return it to the guest with this many bytes written.
    Used(u32),
    /// Keep it and try again after this long.
    Hold(Duration),
}

/// The I/O thread's state; owns the queue while the device is active.
struct RngWorker {
    queue: Queue,
    mem: GuestMem,
    interrupt: Arc<VirtioInterrupt>,
    counters: Arc<RngCounters>,
    bucket: TokenBucket,
    source: Source,
    bounce: Vec<u8>,
    /// A chain taken from the avail ring but not yet answered; it goes before
    /// anything newer.
    held: Option<Chain>,
    /// The host CSPRNG was empty and this was already reported.
    warned_empty: bool,
    /// The guest broke the queue; nothing more is processed until reset.
    broken: bool,
}

impl RngWorker {
    fn new(
        queue: Queue,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
        counters: Arc<RngCounters>,
        bucket: TokenBucket,
        source: Source,
    ) -> Self {
        Self {
            queue,
            mem,
            interrupt,
            counters,
            bucket,
            source,
            bounce: vec![0; MAX_REQUEST],
            held: None,
            warned_empty: false,
            broken: false,
        }
    }

    fn run(mut self, notify: &EventFd, stop: &EventFd) -> Queue {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).and_then(|e| {
            e.add(borrow_fd(notify), EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_NOTIFY))?;
            e.add(borrow_fd(stop), EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_STOP))?;
            Ok(e)
        });
        let epoll = match epoll {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "virtio-rng cannot wait for requests");
                self.interrupt.set_needs_reset();
                return self.into_queue();
            }
        };
        let mut events = [EpollEvent::empty(); 2];
        // Requests the driver queued before the thread started.
        let mut deadline = self.process(Instant::now());
        loop {
            let timeout = deadline.map_or(EpollTimeout::NONE, |d| timeout_until(d, Instant::now()));
            let n = match epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "virtio-rng wait failed");
                    self.interrupt.set_needs_reset();
                    return self.into_queue();
                }
            };
            let ready = &events[..n];
            if ready.iter().any(|e| e.data() == TOKEN_STOP) {
                return self.into_queue();
            }
            if ready.iter().any(|e| e.data() == TOKEN_NOTIFY) {
                drain(notify);
            }
            // A doorbell or the held chain's deadline (or an early wakeup,
            // which just computes a new deadline).
            deadline = self.process(Instant::now());
        }
    }

    /// The queue as a resumed device must see it: a held chain was taken from
    /// the avail ring but never answered, so it goes back (it is always the
    /// last one taken: nothing is taken while one is held).
    fn into_queue(mut self) -> Queue {
        if self.held.take().is_some() {
            self.queue.set_next_avail(self.queue.next_avail().wrapping_sub(1));
        }
        self.queue
    }

    fn break_queue(&mut self, why: &dyn std::fmt::Display) {
        tracing::warn!(error = %why, "virtio-rng queue broken by the guest");
        self.broken = true;
        self.held = None;
        self.interrupt.set_needs_reset();
    }

    /// Serves chains in order until the avail ring is empty or one must be
    /// held, interrupts once if any were returned, and says when to come back
    /// for a held chain (`None`: wait for the doorbell).
    fn process(&mut self, now: Instant) -> Option<Instant> {
        if self.broken {
            return None;
        }
        let mut completed = false;
        let mut deadline = None;
        loop {
            let chain = match self.held.take() {
                Some(c) => c,
                None => {
                    let head = match pop_head(&mut self.queue, &self.mem) {
                        Ok(Some(h)) => h,
                        Ok(None) => break,
                        Err(e) => {
                            self.break_queue(&e);
                            break;
                        }
                    };
                    let table = GuestAddress(self.queue.desc_table());
                    match read_chain(&self.mem, table, self.queue.size(), head) {
                        Ok(c) => c,
                        Err(fault) if fault.error.breaks_queue() => {
                            self.break_queue(&fault.error);
                            break;
                        }
                        Err(fault) => {
                            tracing::debug!(error = %fault.error, "virtio-rng bad descriptor chain");
                            self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                            if !self.complete(head, 0) {
                                break;
                            }
                            completed = true;
                            continue;
                        }
                    }
                }
            };
            match self.serve(&chain, now) {
                Outcome::Used(len) => {
                    if !self.complete(chain.head, len) {
                        break;
                    }
                    completed = true;
                }
                Outcome::Hold(wait) => {
                    self.held = Some(chain);
                    deadline = Some(now + wait);
                    break;
                }
            }
        }
        if completed {
            self.interrupt.signal_queue(0);
        }
        deadline
    }

    /// Puts `head` on the used ring; false when that broke the queue.
    fn complete(&mut self, head: u16, len: u32) -> bool {
        if let Err(e) = self.queue.add_used(&self.mem, head, len) {
            self.break_queue(&e);
            return false;
        }
        true
    }

    fn serve(&mut self, chain: &Chain, now: Instant) -> Outcome {
        if !chain.readable.is_empty() || chain.writable_len == 0 {
            tracing::debug!(
                readable = chain.readable_len,
                writable = chain.writable_len,
                "virtio-rng request without only device-writable buffers"
            );
            self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            return Outcome::Used(0);
        }
        let want = chain.writable_len.min(MAX_REQUEST as u64);
        let granted = match self.bucket.grant(now, want) {
            Ok(n) => n,
            Err(wait) => {
                self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                return Outcome::Hold(wait);
            }
        };
        // granted <= want <= MAX_REQUEST == bounce.len().
        let buf = &mut self.bounce[..granted as usize];
        let got = (self.source)(buf).min(buf.len());
        if got == 0 {
            if !self.warned_empty {
                self.warned_empty = true;
                tracing::warn!("host entropy unavailable; holding virtio-rng requests");
            }
            return Outcome::Hold(EMPTY_RETRY);
        }
        self.bucket.consume(got as u64);
        if let Err(e) = chain.write_at(&self.mem, 0, &buf[..got]) {
            // The segments were checked to be in guest memory; this should not happen.
            tracing::debug!(error = %e, "virtio-rng cannot write the request's buffers");
            self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            return Outcome::Used(0);
        }
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add(got as u64, Ordering::Relaxed);
        // got <= MAX_REQUEST, which fits in u32.
        Outcome::Used(got as u32)
    }
}

/// The epoll timeout that wakes at or just after `deadline` (rounded up to
/// whole milliseconds, so the thread never spins on a sub-millisecond wait).
fn timeout_until(deadline: Instant, now: Instant) -> EpollTimeout {
    let ms = deadline.saturating_duration_since(now).as_nanos().div_ceil(1_000_000);
    EpollTimeout::from(u16::try_from(ms).unwrap_or(MAX_WAIT_MS).min(MAX_WAIT_MS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::Msix;
    use crate::devices::testing::{F_NEXT, F_WRITE, FakeMsi, GuestQueue, wait_until};
    use crate::devices::virtio::device::copy_config;
    use crate::memory;
    use std::sync::atomic::AtomicBool;
    use vm_memory::Bytes;

    const QBASE: u64 = 0x10_0000;
    const BUF: u64 = 0x20_0000;
    const SENTINEL: u8 = 0xa5;

    struct Rig {
        mem: GuestMem,
        gq: GuestQueue,
        worker: RngWorker,
        msi: Arc<FakeMsi>,
        t0: Instant,
    }

    fn interrupt() -> (Arc<FakeMsi>, Arc<VirtioInterrupt>) {
        let msi = FakeMsi::new(2);
        let msix = Arc::new(Msix::new(msi.clone()));
        // Route vector 0 so triggers reach the fake.
        msix.write_table(12, &0u32.to_le_bytes());
        msix.set_control(0x8000);
        let interrupt = Arc::new(VirtioInterrupt::new(msix, 1));
        interrupt.set_queue_vector(0, 0);
        (msi, interrupt)
    }

    fn rig_with(limit: RateLimit, source: Source) -> Rig {
        let (mem, _f) = memory::create(16).unwrap();
        mem.write_slice(&vec![SENTINEL; 1 << 20], GuestAddress(BUF)).unwrap();
        let gq = GuestQueue::new(&mem, 16, QBASE);
        let (msi, interrupt) = interrupt();
        let t0 = Instant::now();
        let bucket = TokenBucket::new(limit, t0);
        let worker = RngWorker::new(gq.queue(), mem.clone(), interrupt, Arc::default(), bucket, source);
        Rig { mem, gq, worker, msi, t0 }
    }

    fn rig() -> Rig {
        rig_with(RateLimit::default(), Box::new(host_random))
    }

    fn bytes_at(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    impl Rig {
        fn post(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.gq.add_chain(&self.mem, bufs);
            self.gq.publish(&self.mem, head);
            head
        }

        /// Posts one chain, processes at `t0 + at`, and expects it back; returns the used length.
        fn submit_at(&mut self, bufs: &[(u64, u32, bool)], at: Duration) -> u32 {
            let head = self.post(bufs);
            let before = self.gq.used_idx(&self.mem);
            self.worker.process(self.t0 + at);
            assert_eq!(self.gq.used_idx(&self.mem), before.wrapping_add(1), "exactly one completion");
            let (id, len) = self.gq.used_elem(&self.mem, before);
            assert_eq!(id, u32::from(head));
            len
        }

        fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> u32 {
            self.submit_at(bufs, Duration::ZERO)
        }
    }

    #[test]
    fn features_and_no_config_space() {
        let rng = Rng::new(RateLimit::default());
        assert_eq!(rng.device_type(), 4);
        assert_eq!(rng.features(), VIRTIO_F_VERSION_1);
        assert_eq!(rng.queue_max_sizes(), &[256]);
        let mut data = [0xffu8; 8];
        rng.read_config(0, &mut data);
        assert_eq!(data, [0; 8]);
        // Same answer as a device with an empty config.
        let mut other = [0xffu8; 8];
        copy_config(&[], 0, &mut other);
        assert_eq!(data, other);
    }

    #[test]
    fn writable_buffers_come_back_full_of_random_bytes() {
        let mut r = rig();
        // One request split over two descriptors.
        assert_eq!(r.submit(&[(BUF, 100, true), (BUF + 0x1000, 412, true)]), 512);
        assert!(r.msi.triggers().contains(&0), "used buffer interrupt");
        let mut first = bytes_at(&r.mem, BUF, 100);
        first.extend(bytes_at(&r.mem, BUF + 0x1000, 412));
        assert!(first.iter().any(|&b| b != 0) && first.iter().any(|&b| b != SENTINEL));
        // Nothing past either buffer was touched.
        assert_eq!(bytes_at(&r.mem, BUF + 100, 1), [SENTINEL]);
        assert_eq!(bytes_at(&r.mem, BUF + 0x1000 + 412, 1), [SENTINEL]);

        // A second read of the same buffers differs.
        assert_eq!(r.submit(&[(BUF, 100, true), (BUF + 0x1000, 412, true)]), 512);
        let mut second = bytes_at(&r.mem, BUF, 100);
        second.extend(bytes_at(&r.mem, BUF + 0x1000, 412));
        assert_ne!(first, second);

        // A batch of chains: all served, one interrupt.
        let triggers = r.msi.triggers().len();
        let heads: Vec<u16> = (0..4).map(|i| r.post(&[(BUF + 0x1_0000 * i, 64, true)])).collect();
        let before = r.gq.used_idx(&r.mem);
        assert_eq!(r.worker.process(r.t0), None);
        for (i, &head) in heads.iter().enumerate() {
            assert_eq!(r.gq.used_elem(&r.mem, before + i as u16), (u32::from(head), 64));
        }
        assert_eq!(r.msi.triggers().len(), triggers + 1);
        let c = &r.worker.counters;
        assert_eq!(c.requests.load(Ordering::Relaxed), 6);
        assert_eq!(c.bytes.load(Ordering::Relaxed), 2 * 512 + 4 * 64);
    }

    #[test]
    fn requests_with_readable_buffers_get_nothing() {
        let mut r = rig();
        assert_eq!(r.submit(&[(BUF, 64, false)]), 0);
        assert_eq!(r.submit(&[(BUF, 64, false), (BUF + 0x1000, 64, true)]), 0);
        assert_eq!(bytes_at(&r.mem, BUF + 0x1000, 64), vec![SENTINEL; 64], "no partial fill");
        // No writable bytes at all.
        assert_eq!(r.submit(&[(BUF, 0, true)]), 0);
        // A buffer outside guest memory, and one that wraps.
        assert_eq!(r.submit(&[(0xdead_0000_0000, 64, true)]), 0);
        assert_eq!(r.submit(&[(u64::MAX - 10, 64, true)]), 0);
        // Readable after writable.
        assert_eq!(r.submit(&[(BUF, 64, true), (BUF + 0x1000, 64, false)]), 0);
        assert_eq!(bytes_at(&r.mem, BUF, 64), vec![SENTINEL; 64]);
        // A descriptor loop.
        let head = r.gq.add_chain(&r.mem, &[(BUF, 64, true)]);
        r.gq.write_desc(&r.mem, head, BUF, 64, F_WRITE | F_NEXT, head);
        r.gq.publish(&r.mem, head);
        let used = r.gq.used_idx(&r.mem);
        r.worker.process(r.t0);
        assert_eq!(r.gq.used_elem(&r.mem, used), (u32::from(head), 0));

        let c = &r.worker.counters;
        assert_eq!(c.bad_requests.load(Ordering::Relaxed), 7);
        assert_eq!(c.bytes.load(Ordering::Relaxed), 0);
        // The device still works.
        assert_eq!(r.submit(&[(BUF, 64, true)]), 64);
        assert!(!r.worker.broken);
    }

    #[test]
    fn a_request_gets_at_most_64_kib() {
        let mut r = rig();
        // Three 40 KiB buffers: 120 KiB offered.
        let seg = 40 << 10;
        let bufs = [(BUF, seg, true), (BUF + 0x2_0000, seg, true), (BUF + 0x4_0000, seg, true)];
        assert_eq!(r.submit(&bufs), MAX_REQUEST as u32);
        // The first 64 KiB are filled: all of the first buffer, 24 KiB of the second.
        let second = bytes_at(&r.mem, BUF + 0x2_0000, seg as usize);
        assert!(second[..24 << 10].iter().any(|&b| b != SENTINEL));
        assert!(second[24 << 10..].iter().all(|&b| b == SENTINEL));
        assert!(bytes_at(&r.mem, BUF + 0x4_0000, seg as usize).iter().all(|&b| b == SENTINEL));
        // One huge descriptor (the whole guest) too.
        assert_eq!(r.submit(&[(0, 16 << 20, true)]), MAX_REQUEST as u32);
    }

    #[test]
    fn short_reads_return_fewer_bytes() {
        let half: Source = Box::new(|buf: &mut [u8]| {
            let n = buf.len() / 2;
            buf[..n].fill(0x42);
            n
        });
        let mut r = rig_with(RateLimit::default(), half);
        assert_eq!(r.submit(&[(BUF, 100, true)]), 50);
        assert_eq!(bytes_at(&r.mem, BUF, 51), [vec![0x42; 50], vec![SENTINEL]].concat());
        // The bucket is charged only for what was served.
        assert_eq!(r.worker.bucket.available(r.t0), (1 << 20) - 50);
    }

    #[test]
    fn an_empty_host_pool_holds_requests_until_it_has_bytes() {
        let ready = Arc::new(AtomicBool::new(false));
        let flag = ready.clone();
        let source: Source =
            Box::new(move |buf: &mut [u8]| if flag.load(Ordering::SeqCst) { host_random(buf) } else { 0 });
        let mut r = rig_with(RateLimit::default(), source);
        let head = r.post(&[(BUF, 32, true)]);
        assert_eq!(r.worker.process(r.t0), Some(r.t0 + EMPTY_RETRY));
        assert_eq!(r.gq.used_idx(&r.mem), 0, "held, not answered with 0 bytes");
        ready.store(true, Ordering::SeqCst);
        assert_eq!(r.worker.process(r.t0 + EMPTY_RETRY), None);
        assert_eq!(r.gq.used_elem(&r.mem, 0), (u32::from(head), 32));
    }

    #[test]
    fn the_rate_limit_holds_requests_until_the_bucket_refills() {
        // 1000 B/s, 1000 B burst, on an injected clock.
        let mut r = rig_with(RateLimit::new(1000, 1000).unwrap(), Box::new(host_random));
        assert_eq!(r.submit(&[(BUF, 600, true)]), 600);
        // 400 left: the next 600-byte request waits 200 ms, with later ones behind it.
        let held = r.post(&[(BUF, 600, true)]);
        let behind = r.post(&[(BUF + 0x1000, 100, true)]);
        let triggers = r.msi.triggers().len();
        assert_eq!(r.worker.process(r.t0), Some(r.t0 + Duration::from_millis(200)));
        assert_eq!(r.gq.used_idx(&r.mem), 1);
        // A doorbell (or an early wakeup) before the refill changes nothing.
        assert_eq!(
            r.worker.process(r.t0 + Duration::from_millis(150)),
            Some(r.t0 + Duration::from_millis(200))
        );
        assert_eq!(r.gq.used_idx(&r.mem), 1);
        assert_eq!(r.msi.triggers().len(), triggers, "no interrupt without a completion");
        // At the deadline the held request completes, in order; the next waits for 100 more bytes.
        assert_eq!(
            r.worker.process(r.t0 + Duration::from_millis(200)),
            Some(r.t0 + Duration::from_millis(300))
        );
        assert_eq!(r.gq.used_idx(&r.mem), 2);
        assert_eq!(r.gq.used_elem(&r.mem, 1), (u32::from(held), 600));
        assert_eq!(r.msi.triggers().len(), triggers + 1);
        assert_eq!(r.worker.process(r.t0 + Duration::from_millis(300)), None);
        assert_eq!(r.gq.used_elem(&r.mem, 2), (u32::from(behind), 100));
        assert!(r.worker.counters.throttled.load(Ordering::Relaxed) >= 3);
        // A request bigger than the burst gets the burst once it has refilled.
        assert_eq!(r.submit_at(&[(BUF, 4000, true)], Duration::from_secs(10)), 1000);
    }

    #[test]
    fn a_broken_avail_ring_needs_reset() {
        // Head index outside the queue.
        let mut r = rig();
        r.gq.publish(&r.mem, 200);
        assert_eq!(r.worker.process(r.t0), None);
        assert!(r.worker.broken);
        assert!(r.worker.interrupt.needs_reset());
        assert_eq!(r.gq.used_idx(&r.mem), 0);

        // Avail index far ahead of what was consumed.
        let mut r = rig();
        r.gq.set_avail_idx(&r.mem, 1000);
        r.worker.process(r.t0);
        assert!(r.worker.interrupt.needs_reset());
        // Further notifications are ignored until reset.
        r.post(&[(BUF, 64, true)]);
        r.worker.process(r.t0);
        assert_eq!(r.gq.used_idx(&r.mem), 0);
    }

    #[test]
    fn the_device_thread_serves_requests_waits_out_the_limit_and_stops_on_reset() {
        let (mem, _f) = memory::create(16).unwrap();
        let mut gq = GuestQueue::new(&mem, 16, QBASE);
        let (msi, interrupt) = interrupt();
        // 4 KiB burst at 1 MiB/s. Two requests queued before activation are
        // seen in one pass, so the second is held for a ~4 ms refill that only
        // the thread's own timeout can deliver (no doorbell is rung).
        let mut rng = Rng::new(RateLimit::new(1 << 20, 4096).unwrap());
        let notify = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let activation = |queue: Queue| Activation {
            mem: mem.clone(),
            queues: vec![queue],
            notifiers: vec![notify.try_clone().unwrap()],
            interrupt: interrupt.clone(),
            features: VIRTIO_F_VERSION_1,
        };
        for i in 0..2 {
            let head = gq.add_chain(&mem, &[(BUF + 0x1_0000 * i, 4096, true)]);
            gq.publish(&mem, head);
        }
        rng.activate(activation(gq.queue())).unwrap();
        assert!(wait_until(|| gq.used_idx(&mem) == 2));
        assert_eq!(gq.used_elem(&mem, 0).1, 4096);
        assert_eq!(gq.used_elem(&mem, 1).1, 4096);
        assert!(msi.wait_for(0, 2), "one interrupt per pass");
        let c = rng.counters();
        assert_eq!(c.bytes.load(Ordering::Relaxed), 8192);
        assert!(c.throttled.load(Ordering::Relaxed) >= 1);
        // A doorbell wakes it for a new request.
        let head = gq.add_chain(&mem, &[(BUF, 16, true)]);
        gq.publish(&mem, head);
        notify.write(1).unwrap();
        assert!(wait_until(|| gq.used_idx(&mem) == 3));
        assert_eq!(gq.used_elem(&mem, 2), (u32::from(head), 16));
        assert!(rng.thread.as_ref().is_some_and(IoThread::is_running));

        rng.reset();
        assert!(rng.thread.is_none());
        rng.reset();
        // Activating without an enabled queue fails.
        let mut q = gq.queue();
        q.set_ready(false);
        assert!(matches!(rng.activate(activation(q)), Err(ActivateError::QueueNotReady { index: 0 })));
        assert!(matches!(
            rng.activate(Activation { queues: vec![], ..activation(gq.queue()) }),
            Err(ActivateError::QueueCount { expected: 1, got: 0 })
        ));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        const MEM_END: u64 = 16 << 20;

        fn addr() -> impl Strategy<Value = u64> {
            prop_oneof![
                4 => BUF..BUF + 0x1000,
                1 => MEM_END - 0x1000..MEM_END + 0x1000,
                1 => any::<u64>(),
            ]
        }

        fn len() -> impl Strategy<Value = u32> {
            prop_oneof![4 => 0u32..1100, 1 => any::<u32>(), 1 => Just(1u32)]
        }

        prop_compose! {
            fn descriptor()(addr in addr(), len in len(), flags in 0u16..8, next in 0u16..20) -> (u64, u32, u16, u16) {
                (addr, len, flags, next)
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            /// Random descriptor tables and avail rings: every chain popped is
            /// returned with at most 64 KiB (or the queue is marked broken),
            /// and the worker never panics or loops.
            #[test]
            fn random_descriptor_tables_never_hurt_the_worker(
                descs in proptest::collection::vec(descriptor(), 16),
                heads in proptest::collection::vec(0u16..20, 1..10),
            ) {
                let mut r = rig();
                for (i, &(a, l, f, n)) in descs.iter().enumerate() {
                    r.gq.write_desc(&r.mem, i as u16, a, l, f, n);
                }
                for &h in &heads {
                    r.gq.publish(&r.mem, h);
                }
                // 10 chains of at most 64 KiB fit in the 1 MiB burst: nothing is held.
                prop_assert_eq!(r.worker.process(r.t0), None);
                let used = r.gq.used_idx(&r.mem);
                if r.worker.broken {
                    prop_assert!(r.worker.interrupt.needs_reset());
                    prop_assert!(heads.iter().any(|&h| h >= 16));
                } else {
                    prop_assert_eq!(usize::from(used), heads.len());
                    for i in 0..used {
                        let (id, len) = r.gq.used_elem(&r.mem, i);
                        prop_assert_eq!(id, u32::from(heads[usize::from(i)]));
                        prop_assert!(len as usize <= MAX_REQUEST);
                    }
                }
                r.worker.process(r.t0);
                prop_assert_eq!(r.gq.used_idx(&r.mem), used);
            }
        }
    }
}
