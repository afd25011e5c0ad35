//! The virtio-blk device: one request queue served by one I/O thread.
//!
//! Features offered: VERSION_1, SEG_MAX, BLK_SIZE (512), FLUSH, and RO for a
//! read-only backend. Configuration space: capacity in 512-byte sectors,
//! size_max (0), seg_max, geometry (0), blk_size.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::backend::BlockBackend;
use super::request::{self, ID_BYTES, S_IOERR, S_OK, S_UNSUPP, SECTOR_SIZE};
use crate::devices::virtio::chain::{pop_head, read_chain};
use crate::devices::virtio::device::{ActivateError, Activation, VirtioDevice, VirtioInterrupt, copy_config};
use crate::devices::virtio::io_thread::{IoThread, Poller, borrow_fd, drain};
use crate::devices::virtio::{TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::memory::GuestMem;

pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request: the queue minus header and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
const CONFIG_LEN: usize = 24;

/// What the device did, for the worker's metrics.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    /// Requests answered IOERR (including bad chains that still had a status byte).
    pub io_errors: AtomicU64,
    pub unsupported: AtomicU64,
    /// Chains rejected by validation.
    pub bad_chains: AtomicU64,
}

/// A virtio-blk device over `backend`.
pub struct Block {
    backend: Arc<dyn BlockBackend>,
    id: [u8; ID_BYTES],
    counters: Arc<BlockCounters>,
    thread: Option<IoThread<Queue>>,
    sizes: [u16; 1],
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("capacity", &self.backend.capacity_bytes())
            .field("read_only", &self.backend.read_only())
            .field("active", &self.thread.is_some())
            .finish()
    }
}

impl Block {
    /// `serial` is what GET_ID returns (at most 20 bytes, zero-padded).
    pub fn new(backend: Arc<dyn BlockBackend>, serial: &str) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Self { backend, id, counters: Arc::default(), thread: None, sizes: [QUEUE_SIZE] }
    }

    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&(self.backend.capacity_bytes() / SECTOR_SIZE).to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        let ro = if self.backend.read_only() { F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        copy_config(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.reset();
        let Activation { mem, queues, notifiers, interrupt, features } = a;
        if queues.len() != 1 || notifiers.len() != 1 {
            return Err(ActivateError::QueueCount { expected: 1, got: queues.len() });
        }
        let (Some(queue), Some(notify)) = (queues.into_iter().next(), notifiers.into_iter().next()) else {
            return Err(ActivateError::QueueCount { expected: 1, got: 0 });
        };
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady { index: 0 });
        }
        // Without FLUSH the driver believes every completed write is on disk.
        let backend: Arc<dyn BlockBackend> = if features & F_FLUSH == 0 && !self.backend.read_only() {
            Arc::new(super::backend::WriteThrough(self.backend.clone()))
        } else {
            self.backend.clone()
        };
        let worker = BlockWorker {
            queue,
            mem,
            backend,
            id: self.id,
            counters: self.counters.clone(),
            interrupt,
            bounce: Vec::new(),
            broken: false,
        };
        let thread = IoThread::spawn("virtio-blk", move |stop| worker.run(&notify, &stop))
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

const TOKEN_NOTIFY: u64 = 0;
const TOKEN_STOP: u64 = 1;

/// The I/O thread's state; owns the queue while the device is active.
struct BlockWorker {
    queue: Queue,
    mem: GuestMem,
    backend: Arc<dyn BlockBackend>,
    id: [u8; ID_BYTES],
    counters: Arc<BlockCounters>,
    interrupt: Arc<VirtioInterrupt>,
    bounce: Vec<u8>,
    /// The guest broke the queue; nothing more is processed until reset.
    broken: bool,
}

impl BlockWorker {
    fn run(mut self, notify: &EventFd, stop: &EventFd) -> Queue {
        let poller = Poller::new().and_then(|p| {
            p.add(borrow_fd(notify), TOKEN_NOTIFY, nix::sys::epoll::EpollFlags::EPOLLIN)?;
            p.add(borrow_fd(stop), TOKEN_STOP, nix::sys::epoll::EpollFlags::EPOLLIN)?;
            Ok(p)
        });
        let mut poller = match poller {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "virtio-blk cannot wait for requests");
                self.interrupt.set_needs_reset();
                return self.queue;
            }
        };
        // Requests the driver queued before the thread started.
        self.process();
        loop {
            let events = match poller.wait() {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "virtio-blk wait failed");
                    self.interrupt.set_needs_reset();
                    return self.queue;
                }
            };
            for (token, _) in events {
                if token == TOKEN_STOP {
                    return self.queue;
                }
                drain(notify);
                self.process();
            }
        }
    }

    fn break_queue(&mut self, why: &dyn std::fmt::Display) {
        tracing::warn!(error = %why, "virtio-blk queue broken by the guest");
        self.broken = true;
        self.interrupt.set_needs_reset();
    }

    /// Serves every request on the avail ring, then interrupts once.
    fn process(&mut self) {
        if self.broken {
            return;
        }
        let mut completed = false;
        loop {
            let head = match pop_head(&mut self.queue, &self.mem) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    self.break_queue(&e);
                    break;
                }
            };
            let table = GuestAddress(self.queue.desc_table());
            let used_len = match read_chain(&self.mem, table, self.queue.size(), head) {
                Ok(chain) => {
                    let c = request::execute(&chain, &self.mem, &*self.backend, &self.id, &mut self.bounce);
                    self.count(c.status, c.bytes);
                    c.used_len
                }
                Err(fault) if fault.error.breaks_queue() => {
                    self.break_queue(&fault.error);
                    break;
                }
                Err(fault) => {
                    tracing::debug!(error = %fault.error, "virtio-blk bad descriptor chain");
                    self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                    match fault.status {
                        Some(at) if self.mem.write_obj(S_IOERR, at).is_ok() => {
                            self.count(Some(S_IOERR), 0);
                            1
                        }
                        _ => 0,
                    }
                }
            };
            if let Err(e) = self.queue.add_used(&self.mem, head, used_len) {
                self.break_queue(&e);
                break;
            }
            completed = true;
        }
        if completed {
            self.interrupt.signal_queue(0);
        }
    }

    fn count(&self, status: Option<u8>, bytes: u64) {
        let c = &self.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(bytes, Ordering::Relaxed);
        match status {
            Some(S_OK) => {}
            Some(S_UNSUPP) => {
                c.unsupported.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {
                c.io_errors.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                c.bad_chains.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::Msix;
    use crate::devices::testing::{F_NEXT, F_WRITE, FakeMsi, GuestQueue, wait_until};
    use crate::devices::virtio::block::backend::FileBackend;
    use crate::devices::virtio::block::request::{T_FLUSH, T_GET_ID, T_IN, T_OUT};
    use crate::memory;
    use std::io::{Read, Seek, SeekFrom, Write};

    const QBASE: u64 = 0x10_0000;
    const HDR: u64 = 0x20_0000;
    const DATA: u64 = 0x30_0000;
    const STATUS: u64 = 0x40_0000;
    const SECTORS: u64 = 64;

    struct Rig {
        mem: GuestMem,
        gq: GuestQueue,
        worker: BlockWorker,
        msi: Arc<FakeMsi>,
        file: tempfile::NamedTempFile,
    }

    fn rig(read_only: bool) -> Rig {
        let (mem, _f) = memory::create(16).unwrap();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let pattern: Vec<u8> = (0..SECTORS * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8).collect();
        file.write_all(&pattern).unwrap();
        let backend = Arc::new(FileBackend::open(file.path(), read_only).unwrap());
        let gq = GuestQueue::new(&mem, 16, QBASE);
        let msi = FakeMsi::new(2);
        let msix = Arc::new(Msix::new(msi.clone()));
        // Route vector 0 so triggers reach the fake.
        msix.write_table(12, &0u32.to_le_bytes());
        msix.set_control(0x8000);
        let interrupt = Arc::new(VirtioInterrupt::new(msix, 1));
        interrupt.set_queue_vector(0, 0);
        let worker = BlockWorker {
            queue: gq.queue(),
            mem: mem.clone(),
            backend,
            id: *b"nodeos-disk-0\0\0\0\0\0\0\0",
            counters: Arc::default(),
            interrupt,
            bounce: Vec::new(),
            broken: false,
        };
        Rig { mem, gq, worker, msi, file }
    }

    fn header(mem: &GuestMem, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(mem: &GuestMem) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    impl Rig {
        /// Submits one chain and processes it; returns (status byte, used len).
        fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> (u8, u32) {
            let head = self.gq.add_chain(&self.mem, bufs);
            self.gq.publish(&self.mem, head);
            let before = self.gq.used_idx(&self.mem);
            self.worker.process();
            assert_eq!(self.gq.used_idx(&self.mem), before.wrapping_add(1), "exactly one completion");
            let (id, len) = self.gq.used_elem(&self.mem, before);
            assert_eq!(id, u32::from(head));
            (status(&self.mem), len)
        }

        fn file_bytes(&mut self) -> Vec<u8> {
            let mut v = Vec::new();
            let f = self.file.as_file_mut();
            f.seek(SeekFrom::Start(0)).unwrap();
            f.read_to_end(&mut v).unwrap();
            v
        }
    }

    #[test]
    fn features_and_config_space() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(1 << 20).unwrap();
        let rw = Block::new(Arc::new(FileBackend::open(tmp.path(), false).unwrap()), "x");
        assert_eq!(rw.features(), VIRTIO_F_VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH);
        let mut cap = [0u8; 8];
        rw.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        let mut w = [0u8; 4];
        rw.read_config(12, &mut w);
        assert_eq!(u32::from_le_bytes(w), SEG_MAX);
        rw.read_config(20, &mut w);
        assert_eq!(u32::from_le_bytes(w), 512);
        rw.read_config(21, &mut w);
        assert_eq!(w, [2, 0, 0, 0], "past the end reads 0");
        rw.read_config(u64::MAX, &mut w);
        assert_eq!(w, [0; 4]);
        let ro = Block::new(Arc::new(FileBackend::open(tmp.path(), true).unwrap()), "x");
        assert_ne!(ro.features() & F_RO, 0);
    }

    #[test]
    fn read_write_flush_get_id_round_trip() {
        let mut r = rig(false);
        // Read sectors 3..5 into a buffer split across two descriptors.
        header(&r.mem, T_IN, 3);
        let (s, len) =
            r.submit(&[(HDR, 16, false), (DATA, 300, true), (DATA + 0x1000, 724, true), (STATUS, 1, true)]);
        assert_eq!((s, len), (S_OK, 1025));
        let mut got = vec![0u8; 1024];
        r.mem.read_slice(&mut got[..300], GuestAddress(DATA)).unwrap();
        r.mem.read_slice(&mut got[300..], GuestAddress(DATA + 0x1000)).unwrap();
        assert!(got[..512].iter().all(|&b| b == 3) && got[512..].iter().all(|&b| b == 4));
        assert!(r.msi.triggers().contains(&0), "used buffer interrupt");

        // Write sector 10, header and data in one descriptor.
        r.mem.write_slice(&[0xabu8; 512], GuestAddress(HDR + 16)).unwrap();
        header(&r.mem, T_OUT, 10);
        assert_eq!(r.submit(&[(HDR, 16 + 512, false), (STATUS, 1, true)]), (S_OK, 1));
        let bytes = r.file_bytes();
        assert!(bytes[10 * 512..11 * 512].iter().all(|&b| b == 0xab));
        assert!(bytes[11 * 512..12 * 512].iter().all(|&b| b == 11));

        header(&r.mem, T_FLUSH, 0);
        assert_eq!(r.submit(&[(HDR, 16, false), (STATUS, 1, true)]), (S_OK, 1));

        header(&r.mem, T_GET_ID, 0);
        assert_eq!(r.submit(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]), (S_OK, 21));
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..13], b"nodeos-disk-0");

        header(&r.mem, 0x99, 0);
        assert_eq!(r.submit(&[(HDR, 16, false), (STATUS, 1, true)]).0, S_UNSUPP);
        let c = &r.worker.counters;
        assert_eq!(c.requests.load(Ordering::Relaxed), 5);
        assert_eq!(c.unsupported.load(Ordering::Relaxed), 1);
        assert_eq!(c.bytes.load(Ordering::Relaxed), 1024 + 512);
    }

    #[test]
    fn read_only_disks_refuse_writes_without_touching_the_file() {
        let mut r = rig(true);
        let before = r.file_bytes();
        r.mem.write_slice(&[0xabu8; 512], GuestAddress(DATA)).unwrap();
        header(&r.mem, T_OUT, 0);
        assert_eq!(r.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]), (S_IOERR, 1));
        assert_eq!(r.file_bytes(), before);
        // Reads and flushes still work.
        header(&r.mem, T_IN, 1);
        assert_eq!(r.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]).0, S_OK);
        header(&r.mem, T_FLUSH, 0);
        assert_eq!(r.submit(&[(HDR, 16, false), (STATUS, 1, true)]).0, S_OK);
    }

    #[test]
    fn out_of_range_and_misaligned_requests_fail() {
        let mut r = rig(false);
        let before = r.file_bytes();
        for (kind, sector, len) in [
            (T_IN, SECTORS, 512),
            (T_IN, SECTORS - 1, 1024),
            (T_OUT, SECTORS - 1, 1024),
            (T_OUT, u64::MAX / 256, 512),
            (T_IN, u64::MAX, 512),
            (T_IN, 0, 100),
            (T_OUT, 0, 513),
        ] {
            header(&r.mem, kind, sector);
            let writable = kind == T_IN;
            assert_eq!(r.submit(&[(HDR, 16, false), (DATA, len, writable), (STATUS, 1, true)]).0, S_IOERR);
        }
        // The last sector itself is fine.
        header(&r.mem, T_IN, SECTORS - 1);
        assert_eq!(r.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]).0, S_OK);
        assert_eq!(r.file_bytes(), before);
        assert_eq!(r.worker.counters.io_errors.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn hostile_chains_fail_the_request_not_the_worker() {
        let mut r = rig(false);
        let before = r.file_bytes();
        // Data outside guest memory: IOERR in the (valid) status byte.
        header(&r.mem, T_IN, 0);
        assert_eq!(
            r.submit(&[(HDR, 16, false), (0xdead_0000_0000, 512, true), (STATUS, 1, true)]),
            (S_IOERR, 1)
        );
        // Address + length wraps around.
        header(&r.mem, T_OUT, 0);
        assert_eq!(r.submit(&[(HDR, 16, false), (u64::MAX - 100, 512, false), (STATUS, 1, true)]).0, S_IOERR);
        // Huge length (beyond a 16 MiB guest).
        header(&r.mem, T_IN, 0);
        assert_eq!(r.submit(&[(HDR, 16, false), (DATA, u32::MAX, true), (STATUS, 1, true)]).0, S_IOERR);
        // Data device-readable after a writable buffer (wrong order).
        header(&r.mem, T_OUT, 0);
        assert_eq!(
            r.submit(&[(HDR, 16, false), (DATA, 512, true), (DATA, 512, false), (STATUS, 1, true)]).0,
            S_IOERR
        );
        // Header device-writable: no readable header.
        header(&r.mem, T_IN, 0);
        assert_eq!(r.submit(&[(HDR, 16, true), (DATA, 512, true), (STATUS, 1, true)]).0, S_IOERR);
        // Header too short.
        header(&r.mem, T_IN, 0);
        assert_eq!(r.submit(&[(HDR, 8, false), (STATUS, 1, true)]).0, S_IOERR);
        // No status descriptor (last is readable): nothing to write, len 0.
        header(&r.mem, T_OUT, 0);
        assert_eq!(r.submit(&[(HDR, 16, false), (DATA, 512, false)]), (0xee, 0));
        // A write with the status descriptor missing must not reach the disk.
        assert_eq!(r.file_bytes(), before);
        let c = &r.worker.counters;
        assert!(c.bad_chains.load(Ordering::Relaxed) >= 4);

        // A descriptor loop: no status, len 0, and the worker continues.
        let head = r.gq.add_chain(&r.mem, &[(HDR, 16, false), (STATUS, 1, true)]);
        r.gq.write_desc(&r.mem, (head + 1) % r.gq.size, STATUS, 1, F_WRITE | F_NEXT, head);
        r.gq.publish(&r.mem, head);
        let used = r.gq.used_idx(&r.mem);
        r.worker.process();
        assert_eq!(r.gq.used_elem(&r.mem, used), (u32::from(head), 0));
        header(&r.mem, T_FLUSH, 0);
        assert_eq!(r.submit(&[(HDR, 16, false), (STATUS, 1, true)]).0, S_OK);
        assert!(!r.worker.broken);
    }

    #[test]
    fn a_broken_avail_ring_needs_reset() {
        let mut r = rig(false);
        // Head index outside the queue.
        r.gq.publish(&r.mem, 200);
        r.worker.process();
        assert!(r.worker.broken);
        assert!(r.worker.interrupt.needs_reset());
        assert_eq!(r.gq.used_idx(&r.mem), 0);

        // Avail index far ahead of what was consumed.
        let mut r = rig(false);
        r.gq.set_avail_idx(&r.mem, 1000);
        r.worker.process();
        assert!(r.worker.interrupt.needs_reset());
        // Further notifications are ignored until reset.
        r.worker.process();
        assert_eq!(r.gq.used_idx(&r.mem), 0);
    }

    #[test]
    fn the_device_thread_serves_requests_and_stops_on_reset() {
        let r = rig(false);
        let Rig { mem, mut gq, worker, msi, file: _file } = r;
        let mut block = Block::new(worker.backend.clone(), "disk");
        let notify = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let activation = Activation {
            mem: mem.clone(),
            queues: vec![gq.queue()],
            notifiers: vec![notify.try_clone().unwrap()],
            interrupt: worker.interrupt.clone(),
            features: VIRTIO_F_VERSION_1,
        };
        block.activate(activation).unwrap();
        header(&mem, T_IN, 7);
        let head = gq.add_chain(&mem, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        gq.publish(&mem, head);
        notify.write(1).unwrap();
        assert!(wait_until(|| gq.used_idx(&mem) == 1));
        assert_eq!(status(&mem), S_OK);
        assert!(msi.wait_for(0, 1));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 511)).unwrap(), 7);
        block.reset();
        assert!(block.thread.is_none());
        // Activating without an enabled queue fails.
        let mut q = gq.queue();
        q.set_ready(false);
        let activation = Activation {
            mem,
            queues: vec![q],
            notifiers: vec![notify.try_clone().unwrap()],
            interrupt: worker.interrupt.clone(),
            features: VIRTIO_F_VERSION_1,
        };
        assert!(matches!(block.activate(activation), Err(ActivateError::QueueNotReady { index: 0 })));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        const MEM_END: u64 = 16 << 20;

        fn addr() -> impl Strategy<Value = u64> {
            prop_oneof![
                4 => HDR..HDR + 0x1000,
                2 => DATA..DATA + 0x2000,
                1 => MEM_END - 0x1000..MEM_END + 0x1000,
                1 => any::<u64>(),
            ]
        }

        fn len() -> impl Strategy<Value = u32> {
            prop_oneof![4 => 0u32..1100, 1 => any::<u32>(), 1 => Just(16u32), 1 => Just(512u32), 1 => Just(1u32)]
        }

        prop_compose! {
            fn descriptor()(addr in addr(), len in len(), flags in 0u16..8, next in 0u16..20) -> (u64, u32, u16, u16) {
                (addr, len, flags, next)
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            /// Random descriptor tables, headers and avail rings: the worker
            /// returns every chain it pops (or marks the queue broken), never
            /// panics, never loops, and never writes outside the disk.
            #[test]
            fn random_descriptor_tables_never_hurt_the_worker(
                descs in proptest::collection::vec(descriptor(), 16),
                heads in proptest::collection::vec(0u16..20, 1..10),
                kind in prop_oneof![Just(T_IN), Just(T_OUT), Just(T_FLUSH), Just(T_GET_ID), any::<u32>()],
                sector in prop_oneof![0u64..80, any::<u64>()],
            ) {
                let mut r = rig(false);
                header(&r.mem, kind, sector);
                for (i, &(a, l, f, n)) in descs.iter().enumerate() {
                    r.gq.write_desc(&r.mem, i as u16, a, l, f, n);
                }
                for &h in &heads {
                    r.gq.publish(&r.mem, h);
                }
                r.worker.process();
                let used = r.gq.used_idx(&r.mem);
                if r.worker.broken {
                    prop_assert!(r.worker.interrupt.needs_reset());
                    prop_assert!(heads.iter().any(|&h| h >= 16));
                } else {
                    prop_assert_eq!(usize::from(used), heads.len());
                    for i in 0..used {
                        let (id, _) = r.gq.used_elem(&r.mem, i);
                        prop_assert_eq!(id, u32::from(heads[usize::from(i)]));
                    }
                }
                prop_assert_eq!(r.file.as_file().metadata().unwrap().len(), SECTORS * SECTOR_SIZE);
                // A second pass finds nothing new.
                r.worker.process();
                prop_assert_eq!(r.gq.used_idx(&r.mem), used);
            }
        }
    }
}
