//! Which guest pages changed: KVM's dirty log (pages the guest wrote) OR-ed
//! with guest memory's own bitmap (pages the VMM wrote: used rings, RX
//! buffers, block reads, which KVM never sees).
//!
//! Both logs clear when read, so a page written after a collect shows up in
//! the next one. The sender collects before it reads the pages it sends: a
//! page written while it is being read is sent again in the next pass.

use std::sync::Arc;

use nodeos_hv::HvError;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMem;

const PAGE: u64 = 4096;

/// Dirty tracking for one VM, on from [`DirtyTracker::start`] to drop.
#[derive(Debug)]
pub struct DirtyTracker {
    kvm: Arc<nodeos_hv::Vm>,
    mem: Arc<GuestMem>,
}

impl DirtyTracker {
    /// Turns KVM's dirty logging on and clears the VMM's bitmap: every page
    /// written from now on is reported.
    pub fn start(kvm: Arc<nodeos_hv::Vm>, mem: Arc<GuestMem>) -> Result<Self, HvError> {
        kvm.set_dirty_logging(true)?;
        for region in mem.iter() {
            (**region).bitmap().reset();
        }
        // Turning logging on starts KVM's log clean; read once anyway so
        // nothing from before this call is reported.
        kvm.dirty_pages()?;
        Ok(Self { kvm, mem })
    }

    /// Guest addresses of every page written since the previous call (or
    /// since start), ascending; clears both logs.
    pub fn collect(&self) -> Result<Vec<u64>, HvError> {
        let logs = self.kvm.dirty_pages()?;
        let mut pages = Vec::new();
        for region in self.mem.iter() {
            let base = region.start_addr().raw_value();
            let vmm = (**region).bitmap().get_and_reset();
            let kvm =
                logs.iter().find(|l| l.slot.guest_addr == base).map(|l| l.bitmap.as_slice()).unwrap_or(&[]);
            let words = vmm.len().max(kvm.len());
            let page_count = region.len() / PAGE;
            for w in 0..words {
                let mut word = vmm.get(w).copied().unwrap_or(0) | kvm.get(w).copied().unwrap_or(0);
                while word != 0 {
                    let bit = u64::from(word.trailing_zeros());
                    word &= word - 1;
                    let index = w as u64 * 64 + bit;
                    if index < page_count {
                        pages.push(base + index * PAGE);
                    }
                }
            }
        }
        Ok(pages)
    }

    /// Every RAM page, ascending: what the first pass sends.
    pub fn all_pages(&self) -> Vec<u64> {
        self.mem
            .iter()
            .flat_map(|r| {
                let base = r.start_addr().raw_value();
                (0..r.len() / PAGE).map(move |i| base + i * PAGE)
            })
            .collect()
    }
}

impl Drop for DirtyTracker {
    fn drop(&mut self) {
        if let Err(e) = self.kvm.set_dirty_logging(false) {
            tracing::warn!(error = %e, "cannot turn dirty logging off");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn vmm_writes_are_reported_once() {
        let Some(hv) = nodeos_hv::testing::hypervisor_or_skip("vmm_writes_are_reported_once") else { return };
        let kvm = Arc::new(hv.create_vm().unwrap());
        let (mem, _file) = crate::memory::create(16).unwrap();
        let mem = Arc::new(mem);
        kvm.add_guest_memory(mem.clone(), false).unwrap();
        mem.write_obj(1u64, GuestAddress(0x5000)).unwrap();
        let t = DirtyTracker::start(kvm.clone(), mem.clone()).unwrap();
        assert!(t.collect().unwrap().is_empty(), "writes before start are not reported");
        mem.write_obj(7u64, GuestAddress(0x3008)).unwrap();
        mem.write_slice(&[1u8; 8192], GuestAddress(0x10_0000)).unwrap();
        assert_eq!(t.collect().unwrap(), vec![0x3000, 0x10_0000, 0x10_1000]);
        assert!(t.collect().unwrap().is_empty(), "collect clears");
        assert_eq!(t.all_pages().len(), 16 * 256);
        drop(t);
        assert!(kvm.memory_slots().iter().all(|s| !s.dirty_log));
    }
}
