//! Test fakes shared by the device tests: interrupt and doorbell recorders and a
//! driver-side split virtqueue written straight into guest memory.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::{InterruptError, IoEvents, MsiAllocator, MsiMessage, MsiVectors};
use crate::memory::GuestMem;

/// Records routing updates and triggers.
#[derive(Debug)]
pub(crate) struct FakeMsi {
    count: u16,
    configured: Mutex<Vec<Option<MsiMessage>>>,
    triggers: Mutex<Vec<u16>>,
}

impl FakeMsi {
    pub(crate) fn new(count: u16) -> Arc<Self> {
        Arc::new(Self {
            count,
            configured: Mutex::new(vec![None; usize::from(count)]),
            triggers: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn configured(&self, v: u16) -> Option<MsiMessage> {
        self.configured.lock().unwrap()[usize::from(v)]
    }

    pub(crate) fn triggers(&self) -> Vec<u16> {
        self.triggers.lock().unwrap().clone()
    }

    /// Waits until `vector` has been triggered at least `n` times.
    pub(crate) fn wait_for(&self, vector: u16, n: usize) -> bool {
        wait_until(|| self.triggers().iter().filter(|&&v| v == vector).count() >= n)
    }
}

impl MsiVectors for FakeMsi {
    fn count(&self) -> u16 {
        self.count
    }
    fn configure(&self, vector: u16, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut c = self.configured.lock().unwrap();
        let slot =
            c.get_mut(usize::from(vector)).ok_or(InterruptError::Vector { vector, count: self.count })?;
        *slot = msg;
        Ok(())
    }
    fn trigger(&self, vector: u16) -> Result<(), InterruptError> {
        self.triggers.lock().unwrap().push(vector);
        Ok(())
    }
}

#[derive(Debug, Default)]
pub(crate) struct FakeAllocator {
    pub(crate) last: Mutex<Option<Arc<FakeMsi>>>,
}

impl FakeAllocator {
    pub(crate) fn msi(&self) -> Arc<FakeMsi> {
        self.last.lock().unwrap().clone().expect("allocate was called")
    }
}

impl MsiAllocator for FakeAllocator {
    fn allocate(&self, count: u16) -> Result<Arc<dyn MsiVectors>, InterruptError> {
        let msi = FakeMsi::new(count);
        *self.last.lock().unwrap() = Some(msi.clone());
        Ok(msi)
    }
}

/// Records doorbell registrations as (address, fd).
#[derive(Debug, Default)]
pub(crate) struct FakeIoEvents {
    pub(crate) registered: Mutex<Vec<(u64, RawFd)>>,
}

impl FakeIoEvents {
    pub(crate) fn addresses(&self) -> Vec<u64> {
        let mut a: Vec<u64> = self.registered.lock().unwrap().iter().map(|r| r.0).collect();
        a.sort_unstable();
        a
    }
}

impl IoEvents for FakeIoEvents {
    fn register(&self, addr: u64, fd: &EventFd) -> Result<(), InterruptError> {
        self.registered.lock().unwrap().push((addr, fd.as_raw_fd()));
        Ok(())
    }
    fn unregister(&self, addr: u64, fd: &EventFd) -> Result<(), InterruptError> {
        let mut r = self.registered.lock().unwrap();
        let before = r.len();
        r.retain(|&(a, f)| !(a == addr && f == fd.as_raw_fd()));
        if r.len() == before {
            return Err(InterruptError::Routing(format!("{addr:#x} was not registered")));
        }
        Ok(())
    }
}

/// Polls `cond` for up to five seconds.
pub(crate) fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}

pub(crate) const F_NEXT: u16 = 1;
pub(crate) const F_WRITE: u16 = 2;
pub(crate) const F_INDIRECT: u16 = 4;

/// The driver's side of a split virtqueue: descriptor table at `base`, avail
/// ring at `base + 0x1000`, used ring at `base + 0x2000` (room for 256 entries).
#[derive(Debug)]
pub(crate) struct GuestQueue {
    pub(crate) size: u16,
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl GuestQueue {
    pub(crate) fn new(mem: &GuestMem, size: u16, base: u64) -> Self {
        assert!(size <= 256);
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        Self { size, desc: base, avail: base + 0x1000, used: base + 0x2000, next_desc: 0, avail_idx: 0 }
    }

    pub(crate) fn write_desc(&self, mem: &GuestMem, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, at).unwrap();
    }

    /// Writes a chain of `(addr, len, device_writable)` buffers into free
    /// descriptors and returns its head (not yet published).
    pub(crate) fn add_chain(&mut self, mem: &GuestMem, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let flags = if writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.write_desc(mem, index, addr, len, flags, (index + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        head
    }

    /// Offers `head` in the avail ring.
    pub(crate) fn publish(&mut self, mem: &GuestMem, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Sets the avail index without adding entries (for hostile tests).
    pub(crate) fn set_avail_idx(&mut self, mem: &GuestMem, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    pub(crate) fn used_idx(&self, mem: &GuestMem) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used ring entry `i`: (descriptor id, length).
    pub(crate) fn used_elem(&self, mem: &GuestMem, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap())
    }

    /// A device-side queue pointing at these rings, ready.
    pub(crate) fn queue(&self) -> Queue {
        let mut q = Queue::new(256).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }
}
