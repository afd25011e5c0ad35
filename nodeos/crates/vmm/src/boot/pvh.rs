//! The Xen PVH boot structures (xen/include/public/arch-x86/hvm/start_info.h):
//! `hvm_start_info` version 1 with the command line, the initramfs as the only
//! module, and the memory map.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    XEN_HVM_START_MAGIC_VALUE, hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, GuestAddress};

use super::e820::E820Entry;
use super::{
    BootError, CMDLINE_ADDR, InitrdPlacement, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR, PVH_START_INFO_ADDR,
};
use crate::memory::GuestMem;

/// `hvm_start_info.version`: 1 adds `memmap_paddr` and `memmap_entries`.
pub(super) const START_INFO_VERSION: u32 = 1;

/// The start info, module list and memory map, ready to write.
pub(super) fn build(
    e820: &[E820Entry],
    initrd: Option<InitrdPlacement>,
) -> (hvm_start_info, Vec<hvm_modlist_entry>, Vec<hvm_memmap_table_entry>) {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        // E820 and XEN_HVM_MEMMAP_TYPE_* share their numbering (1 = RAM, 2 = reserved).
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind as u32, reserved: 0 })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|i| hvm_modlist_entry { paddr: i.addr.raw_value(), size: i.size, cmdline_paddr: 0, reserved: 0 })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { PVH_MODLIST_ADDR },
        // Always a NUL-terminated string, possibly empty.
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: super::acpi::RSDP_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    (start_info, modules, memmap)
}

pub(super) fn write_start_info(
    mem: &GuestMem,
    e820: &[E820Entry],
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let (start_info, modules, memmap) = build(e820, initrd);
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::BootParams)
}
