//! A KVM VM: in-kernel interrupt controllers, memory slots, eventfd plumbing,
//! GSI routing and vCPU creation.
//!
//! # Dirty tracking
//! Two logs together cover every write to guest memory during a live
//! migration: KVM's dirty log ([`Vm::dirty_log`]) sees what vCPUs write, and
//! the vm-memory bitmap `B` of a `GuestMemoryMmap<B>` (an `AtomicBitmap` in
//! the VMM) sees what the VMM writes through vm-memory (used rings, RX
//! buffers, block reads). Neither sees the other's writes.

use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use tracing::debug;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::routing::{FIRST_MSI_GSI, GsiRouting};
use crate::{HostCaps, HvError, Vcpu};

/// KVM's identity-map page (one page, used by VMX for real-mode emulation).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// KVM's private TSS (three pages, right after the identity-map page).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// End of KVM's private pages: the guest must see
/// `KVM_IDENTITY_MAP_ADDR..KVM_PRIVATE_END` as reserved and map nothing there.
pub const KVM_PRIVATE_END: u64 = KVM_TSS_ADDR + 3 * 4096;

const PAGE_SIZE: u64 = 4096;

/// One KVM memory slot backed by guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySlot {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
    pub dirty_log: bool,
}

/// The dirty pages of one slot since the previous read: bit `i` of word `w`
/// is the page at `slot.guest_addr + (w * 64 + i) * 4096`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    pub slot: MemorySlot,
    pub bitmap: Vec<u64>,
}

impl DirtyBitmap {
    /// Guest addresses of the dirty pages, ascending.
    pub fn dirty_pages(&self) -> impl Iterator<Item = u64> + '_ {
        let base = self.slot.guest_addr;
        self.bitmap.iter().enumerate().flat_map(move |(w, word)| {
            (0..64)
                .filter(move |bit| word & (1 << bit) != 0)
                .map(move |bit| base + (w as u64 * 64 + bit) * PAGE_SIZE)
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct SlotRecord {
    slot: MemorySlot,
    host_addr: u64,
}

#[derive(Debug, Default)]
struct Memory {
    slots: Vec<SlotRecord>,
    /// Every guest memory whose regions are (or were being) registered as
    /// slots; never shrinks while the VM lives. Type-erased so that memories
    /// with different dirty bitmaps can be held alike: the `Arc` still owns
    /// the `GuestMemoryMmap<B>`, hence each region's mapping. Nothing ever
    /// downcasts it.
    keep_alive: Vec<Arc<dyn Any + Send + Sync>>,
}

/// The state a [`Vcpu`] keeps alive: the VM fd and the memory its slots point at.
///
/// Field order matters: slots are deleted in `Drop`, then the fd closes, then
/// the memory mappings go.
#[derive(Debug)]
pub(crate) struct VmShared {
    pub(crate) fd: VmFd,
    memory: Mutex<Memory>,
}

impl VmShared {
    fn memory(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_slot(&self, record: &SlotRecord, size: u64, dirty_log: bool) -> Result<(), HvError> {
        let region = kvm_userspace_memory_region {
            slot: record.slot.slot,
            flags: if dirty_log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: record.slot.guest_addr,
            memory_size: size,
            userspace_addr: record.host_addr,
        };
        // SAFETY: `host_addr..host_addr + slot.size` is the mapping of a region
        // of a `GuestMemoryMmap<B>` that `Memory::keep_alive` holds (it was
        // pushed there, type-erased, before the slot was first registered) and
        // that is only dropped after `VmShared::drop` has deleted every slot.
        // A region's mapping is unmapped only when the last `Arc<MmapRegion>`
        // goes, and the held collection owns one, whatever other collections
        // share it. Every `Vcpu` holds an `Arc<VmShared>`, so no vCPU can run
        // after the memory is gone. The bitmap `B` is bookkeeping beside the
        // mapping: KVM writes the mapping directly and never touches `B`.
        // Slots never overlap (checked in `add_guest_memory`). With
        // `size == 0` the call deletes the slot and KVM reads no host memory.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| HvError::SetMemorySlot {
            slot: record.slot.slot,
            guest_addr: record.slot.guest_addr,
            size,
            source,
        })
    }
}

impl Drop for VmShared {
    fn drop(&mut self) {
        let slots = std::mem::take(&mut self.memory().slots);
        for record in &slots {
            if let Err(e) = self.set_slot(record, 0, false) {
                // The fd closes next, which destroys the VM and its slots anyway.
                debug!(error = %e, slot = record.slot.slot, "memory slot not deleted before VM close");
            }
        }
    }
}

/// A VM with its in-kernel PIC, IOAPIC and PIT. Share it as `Arc<Vm>`.
#[derive(Debug)]
pub struct Vm {
    shared: Arc<VmShared>,
    caps: Arc<HostCaps>,
    routing: Mutex<GsiRouting>,
}

impl Vm {
    /// The VM fd, for the save/restore ioctls in `state.rs`.
    pub(crate) fn fd(&self) -> &VmFd {
        &self.shared.fd
    }

    pub(crate) fn new(fd: VmFd, caps: Arc<HostCaps>) -> Result<Self, HvError> {
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(|source| HvError::SetIdentityMapAddress { addr: KVM_IDENTITY_MAP_ADDR, source })?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(|source| HvError::SetTssAddress { addr: KVM_TSS_ADDR, source })?;
        fd.create_irq_chip().map_err(HvError::CreateIrqchip)?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(HvError::CreatePit)?;
        Ok(Self {
            shared: Arc::new(VmShared { fd, memory: Mutex::new(Memory::default()) }),
            caps,
            routing: Mutex::new(GsiRouting::default()),
        })
    }

    /// Registers every region of `mem` as a memory slot (slot numbers continue
    /// after those already registered). The VM keeps `mem` alive for as long
    /// as the VM or any of its vCPUs exists.
    ///
    /// Regions must be page-aligned and must not overlap slots already added.
    ///
    /// `B` is vm-memory's dirty bitmap: `()` tracks nothing; an `AtomicBitmap`
    /// records the VMM's own writes through `mem` for migration. Guest
    /// writes bypass it (KVM writes the mapping directly): they are in
    /// [`Vm::dirty_log`] when `dirty_log` is on.
    pub fn add_guest_memory<B>(
        &self,
        mem: Arc<GuestMemoryMmap<B>>,
        dirty_log: bool,
    ) -> Result<Vec<MemorySlot>, HvError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let mut memory = self.shared.memory();
        let mut planned = Vec::new();
        for region in mem.iter() {
            let guest_addr = region.start_addr().raw_value();
            let size = region.len();
            let host_addr = region.as_ptr() as u64;
            let bad = |reason| HvError::MemoryRegion { guest_addr, size, reason };
            if size == 0 {
                return Err(bad("empty region"));
            }
            if ![guest_addr, size, host_addr].iter().all(|v| v.is_multiple_of(PAGE_SIZE)) {
                return Err(bad("not page-aligned"));
            }
            let end = guest_addr.checked_add(size).ok_or_else(|| bad("wraps around"))?;
            let overlaps = |s: &MemorySlot| guest_addr < s.guest_addr + s.size && s.guest_addr < end;
            if memory
                .slots
                .iter()
                .map(|r| &r.slot)
                .chain(planned.iter().map(|r: &SlotRecord| &r.slot))
                .any(overlaps)
            {
                return Err(bad("overlaps a slot already registered"));
            }
            let slot =
                u32::try_from(memory.slots.len() + planned.len()).map_err(|_| bad("too many slots"))?;
            planned.push(SlotRecord { slot: MemorySlot { slot, guest_addr, size, dirty_log }, host_addr });
        }
        // Keep the memory alive before KVM can point at it.
        memory.keep_alive.push(mem);
        let mut added = Vec::with_capacity(planned.len());
        for record in planned {
            self.shared.set_slot(&record, record.slot.size, dirty_log)?;
            memory.slots.push(record);
            added.push(record.slot);
        }
        Ok(added)
    }

    /// Every slot registered so far.
    pub fn memory_slots(&self) -> Vec<MemorySlot> {
        self.shared.memory().slots.iter().map(|r| r.slot).collect()
    }

    /// Turns dirty logging on or off for every slot (on: for the pre-copy
    /// phase of a live migration; turning it on starts with a clean log).
    pub fn set_dirty_logging(&self, enabled: bool) -> Result<(), HvError> {
        let mut memory = self.shared.memory();
        for record in memory.slots.iter_mut() {
            if record.slot.dirty_log != enabled {
                self.shared.set_slot(record, record.slot.size, enabled)?;
                record.slot.dirty_log = enabled;
            }
        }
        Ok(())
    }

    /// The pages of `slot` that vCPUs wrote since the previous call (or since
    /// logging started), one bit per 4 KiB page.
    ///
    /// KVM clears the log on read (`KVM_GET_DIRTY_LOG` without manual
    /// protect): each call hands out the pages written since the last one,
    /// once. A caller that drops a result (a failed send) must treat those
    /// pages as dirty itself; a write racing the read lands in this result or
    /// the next. Writes the VMM makes through the mapping are not here: see
    /// the bitmap of [`Vm::add_guest_memory`].
    pub fn dirty_log(&self, slot: u32) -> Result<Vec<u64>, HvError> {
        let record = self
            .shared
            .memory()
            .slots
            .iter()
            .find(|r| r.slot.slot == slot && r.slot.dirty_log)
            .copied()
            .ok_or(HvError::NoDirtyLogSlot { slot })?;
        self.shared
            .fd
            .get_dirty_log(slot, record.slot.size as usize)
            .map_err(|source| HvError::DirtyLog { slot, source })
    }

    /// [`Vm::dirty_log`] of every slot with dirty logging on (so it clears
    /// every log it reads).
    pub fn dirty_pages(&self) -> Result<Vec<DirtyBitmap>, HvError> {
        let slots: Vec<MemorySlot> = self.memory_slots().into_iter().filter(|s| s.dirty_log).collect();
        slots.into_iter().map(|slot| Ok(DirtyBitmap { slot, bitmap: self.dirty_log(slot.slot)? })).collect()
    }

    /// Makes every write to `fd` raise `gsi` (edge: assert then deassert).
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HvError> {
        self.shared.fd.register_irqfd(fd, gsi).map_err(|source| HvError::RegisterIrqfd { gsi, source })
    }

    pub fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HvError> {
        self.shared.fd.unregister_irqfd(fd, gsi).map_err(|source| HvError::UnregisterIrqfd { gsi, source })
    }

    /// Makes a guest write of any length to MMIO `addr` signal `fd` inside KVM,
    /// without a vCPU exit.
    pub fn register_ioevent(&self, addr: u64, fd: &EventFd) -> Result<(), HvError> {
        self.shared
            .fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|source| HvError::RegisterIoevent { addr, source })
    }

    pub fn unregister_ioevent(&self, addr: u64, fd: &EventFd) -> Result<(), HvError> {
        self.shared
            .fd
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|source| HvError::UnregisterIoevent { addr, source })
    }

    /// Sets the level of a legacy IRQ line (PIC and IOAPIC pin `irq`).
    pub fn set_irq_line(&self, irq: u32, level: bool) -> Result<(), HvError> {
        self.shared.fd.set_irq_line(irq, level).map_err(|source| HvError::SetIrqLine { irq, level, source })
    }

    /// GSIs usable for MSI routes: `FIRST_MSI_GSI..msi_gsi_end()`.
    pub fn msi_gsi_end(&self) -> u32 {
        self.caps.max_gsi
    }

    /// Routes `gsi` (at least [`FIRST_MSI_GSI`]) to the MSI message
    /// `addr_hi:addr_lo`/`data` and pushes the whole routing table to KVM.
    /// On failure the previous route of `gsi` stays in force.
    pub fn set_msi_route(&self, gsi: u32, addr_lo: u32, addr_hi: u32, data: u32) -> Result<(), HvError> {
        self.check_msi_gsi(gsi)?;
        let mut routing = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        let previous = routing.set_msi(gsi, addr_lo, addr_hi, data);
        self.push_routing(&mut routing, gsi, previous)
    }

    /// Removes the MSI route of `gsi` (if any) and pushes the table.
    pub fn remove_route(&self, gsi: u32) -> Result<(), HvError> {
        self.check_msi_gsi(gsi)?;
        let mut routing = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        let previous = routing.remove(gsi);
        if previous.is_none() {
            return Ok(());
        }
        self.push_routing(&mut routing, gsi, previous)
    }

    fn check_msi_gsi(&self, gsi: u32) -> Result<(), HvError> {
        if (FIRST_MSI_GSI..self.caps.max_gsi).contains(&gsi) {
            Ok(())
        } else {
            Err(HvError::GsiOutOfRange { gsi, first: FIRST_MSI_GSI, end: self.caps.max_gsi })
        }
    }

    fn push_routing(
        &self,
        routing: &mut GsiRouting,
        gsi: u32,
        previous: Option<crate::routing::Route>,
    ) -> Result<(), HvError> {
        let table = routing.to_kvm();
        let result = table.and_then(|table| {
            self.shared
                .fd
                .set_gsi_routing(&table)
                .map_err(|source| HvError::SetGsiRouting { entries: table.as_slice().len(), source })
        });
        if result.is_err() {
            routing.restore(gsi, previous);
        }
        result
    }

    /// Creates vCPU `id` (also its APIC id). Before it first runs it needs its
    /// CPUID ([`Vcpu::set_cpuid`]; KVM refuses CPUID changes after the first
    /// run) and its registers.
    pub fn create_vcpu(&self, id: u32) -> Result<Vcpu, HvError> {
        let fd =
            self.shared.fd.create_vcpu(u64::from(id)).map_err(|source| HvError::CreateVcpu { id, source })?;
        Ok(Vcpu::new(fd, id, self.shared.clone(), self.caps.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VcpuExit;
    use crate::testing::hypervisor_or_skip;
    use crate::vcpu::tests::{real_mode_vcpu, run_to_halt};
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestAddress};

    fn one_mib() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
    }

    #[test]
    fn memory_slots_are_checked_and_numbered() {
        let Some(hv) = hypervisor_or_skip("memory_slots_are_checked_and_numbered") else { return };
        let vm = hv.create_vm().unwrap();
        let slots = vm.add_guest_memory(one_mib(), false).unwrap();
        assert_eq!(slots, vec![MemorySlot { slot: 0, guest_addr: 0, size: 1 << 20, dirty_log: false }]);
        // Overlap is refused before KVM sees it.
        let err = vm.add_guest_memory(one_mib(), false).unwrap_err();
        assert!(
            matches!(err, HvError::MemoryRegion { reason: "overlaps a slot already registered", .. }),
            "{err}"
        );
        // Typed: `add_guest_memory` takes any bitmap, so `from_ranges` alone
        // would not say which.
        let high: Arc<GuestMemoryMmap> =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(1 << 32), 1 << 20)]).unwrap());
        let slots = vm.add_guest_memory(high, true).unwrap();
        assert_eq!(slots[0].slot, 1);
        assert_eq!(vm.memory_slots().len(), 2);
        assert!(matches!(vm.dirty_log(0), Err(HvError::NoDirtyLogSlot { slot: 0 })));
        assert_eq!(vm.dirty_log(1).unwrap().len(), 256 / 64);
    }

    #[test]
    fn dirty_log_sees_a_guest_write() {
        let Some(hv) = hypervisor_or_skip("dirty_log_sees_a_guest_write") else { return };
        let vm = hv.create_vm().unwrap();
        let mem = one_mib();
        vm.add_guest_memory(mem.clone(), true).unwrap();
        // mov byte [0x3000], 0x42 ; hlt
        let vcpu = real_mode_vcpu(&vm, 0, &mem, &[0xc6, 0x06, 0x00, 0x30, 0x42, 0xf4]);
        // Our own writes (the code) do not go through KVM; start from a clean log anyway.
        vm.dirty_pages().unwrap();
        run_to_halt(vcpu);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0x42);
        let dirty = vm.dirty_pages().unwrap();
        assert_eq!(dirty.len(), 1);
        let pages: Vec<u64> = dirty[0].dirty_pages().collect();
        assert!(pages.contains(&0x3000), "dirty pages {pages:x?}");
        assert!(!pages.contains(&0x5000));
        // Reading cleared the log.
        assert!(vm.dirty_log(0).unwrap().iter().all(|w| *w == 0));

        // Off and on again: still works, clean start.
        vm.set_dirty_logging(false).unwrap();
        assert!(vm.dirty_pages().unwrap().is_empty());
        vm.set_dirty_logging(true).unwrap();
        assert_eq!(vm.dirty_pages().unwrap().len(), 1);
    }

    #[test]
    fn atomic_bitmap_sees_vmm_writes_and_kvm_sees_guest_writes() {
        let Some(hv) = hypervisor_or_skip("atomic_bitmap_sees_vmm_writes_and_kvm_sees_guest_writes") else {
            return;
        };
        let vm = hv.create_vm().unwrap();
        let mem: Arc<GuestMemoryMmap<AtomicBitmap>> =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let slots = vm.add_guest_memory(mem.clone(), true).unwrap();
        assert_eq!(slots, vec![MemorySlot { slot: 0, guest_addr: 0, size: 1 << 20, dirty_log: true }]);

        // The VMM writes the code (mov byte [0x3000], 0x42 ; hlt); the guest
        // writes 0x3000.
        mem.write_slice(&[0xc6, 0x06, 0x00, 0x30, 0x42, 0xf4], GuestAddress(0x1000)).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.set_cpuid(1, &crate::CpuidPolicy::default()).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&kvm_bindings::kvm_regs { rip: 0x1000, rflags: 0x2, ..Default::default() }).unwrap();
        run_to_halt(vcpu);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0x42);

        let bitmap = mem.find_region(GuestAddress(0)).unwrap().bitmap();
        assert!(bitmap.dirty_at(0x1000), "the VMM's write is in the bitmap");
        assert!(!bitmap.dirty_at(0x3000), "the guest's write bypasses the bitmap");
        let kvm_log: Vec<u64> = vm.dirty_pages().unwrap()[0].dirty_pages().collect();
        assert!(kvm_log.contains(&0x3000), "the guest's write is in KVM's log: {kvm_log:x?}");
        assert!(!kvm_log.contains(&0x1000), "the VMM's write is not: {kvm_log:x?}");
    }

    #[test]
    fn ioeventfd_swallows_the_mmio_write_until_unregistered() {
        let Some(hv) = hypervisor_or_skip("ioeventfd_swallows_the_mmio_write_until_unregistered") else {
            return;
        };
        let vm = hv.create_vm().unwrap();
        let mem = one_mib();
        vm.add_guest_memory(mem.clone(), false).unwrap();
        // mov ax, 0xffff ; mov es, ax ; mov byte es:[0x10], 7 ; hlt   (writes 0x100000: no RAM there)
        let code = [0xb8, 0xff, 0xff, 0x8e, 0xc0, 0x26, 0xc6, 0x06, 0x10, 0x00, 0x07, 0xf4];
        let vcpu = real_mode_vcpu(&vm, 0, &mem, &code);
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_ioevent(0x10_0000, &fd).unwrap();
        run_to_halt(vcpu);
        assert_eq!(fd.read().unwrap(), 1, "KVM signalled the eventfd");

        vm.unregister_ioevent(0x10_0000, &fd).unwrap();
        assert!(vm.unregister_ioevent(0x10_0000, &fd).is_err(), "already gone");
        let mut vcpu = real_mode_vcpu(&vm, 1, &mem, &code);
        match vcpu.run().unwrap() {
            VcpuExit::MmioWrite(addr, data) => assert_eq!((addr, data), (0x10_0000, &[7u8][..])),
            other => panic!("expected an MMIO write exit, got {other:?}"),
        }
    }

    #[test]
    fn irqfd_routes_and_irq_lines_register() {
        let Some(hv) = hypervisor_or_skip("irqfd_routes_and_irq_lines_register") else { return };
        let vm = hv.create_vm().unwrap();
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_irqfd(&fd, 4).unwrap();
        assert!(vm.register_irqfd(&fd, 4).is_err(), "the same fd twice is refused, so it was registered");
        fd.write(1).unwrap();
        vm.unregister_irqfd(&fd, 4).unwrap();

        let msi = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_irqfd(&msi, 24).unwrap();
        vm.set_msi_route(24, 0xfee0_0000, 0, 0x30).unwrap();
        vm.set_msi_route(25, 0xfee0_0000, 0, 0x31).unwrap();
        msi.write(1).unwrap();
        vm.remove_route(24).unwrap();
        vm.remove_route(24).unwrap();
        vm.unregister_irqfd(&msi, 24).unwrap();
        assert!(matches!(vm.set_msi_route(23, 0, 0, 0), Err(HvError::GsiOutOfRange { gsi: 23, .. })));
        assert!(matches!(vm.set_msi_route(vm.msi_gsi_end(), 0, 0, 0), Err(HvError::GsiOutOfRange { .. })));

        vm.set_irq_line(4, true).unwrap();
        vm.set_irq_line(4, false).unwrap();
    }
}
