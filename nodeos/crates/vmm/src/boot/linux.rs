//! Linux kernels: bzImage and ELF vmlinux loading, and the zero page.
//!
//! Offsets in comments are those of Documentation/arch/x86/boot.rst (the
//! setup header, at 0x1f1 of both the bzImage and the zero page) and
//! zero-page.rst (the rest of `struct boot_params`).

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    CAN_USE_HEAP, E820_MAX_ENTRIES_ZEROPAGE, LOADED_HIGH, XLF_KERNEL_64, boot_e820_entry, boot_params,
    setup_header,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use vm_memory::{Address, GuestAddress};

use super::e820::E820Entry;
use super::{BootError, CMDLINE_ADDR, CMDLINE_MAX_LEN, HIMEM_START, InitrdPlacement, ZERO_PAGE_ADDR};
use crate::memory::GuestMem;

/// `boot_flag` (0x1fe): the 0xAA55 boot sector signature.
pub(super) const BOOT_FLAG: u16 = 0xaa55;
/// `header` (0x202): "HdrS".
pub(super) const HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` (0x210): 0xff, "undefined" boot loader.
pub(super) const LOADER_UNDEFINED: u8 = 0xff;
/// `heap_end_ptr` (0x224): boot.rst's sample configuration (heap end 0xe000 - 0x200).
pub(super) const HEAP_END_PTR: u16 = 0xde00;
/// `vid_mode` (0x1fa): 0xffff, "normal" VGA.
pub(super) const VID_MODE_NORMAL: u16 = 0xffff;
/// The 64-bit entry point is this far into the protected-mode kernel
/// (boot.rst, "64-bit BOOT PROTOCOL": startup_64 at load address + 0x200).
pub(super) const STARTUP_64_OFFSET: u64 = 0x200;
/// Oldest boot protocol accepted: 2.10 (0x20a) has `pref_address` and
/// `init_size`, which placing the initramfs safely needs.
pub(super) const MIN_PROTOCOL: u16 = 0x020a;
/// Protocol 2.12 (0x20c) added `xloadflags`.
pub(super) const XLOADFLAGS_PROTOCOL: u16 = 0x020c;
/// `kernel_alignment` (0x230) for an ELF vmlinux: x86-64's CONFIG_PHYSICAL_ALIGN maximum (16 MiB).
pub(super) const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// `initrd_addr_max` for an ELF vmlinux, as x86-64 kernels declare in their header.
pub(super) const ELF_INITRD_ADDR_MAX: u32 = 0x7fff_ffff;

/// What loading a kernel produced, before the boot structures are written.
#[derive(Debug, Clone)]
pub(super) struct LoadedKernel {
    pub(super) kernel_start: GuestAddress,
    /// The Linux 64-bit entry point.
    pub(super) entry: GuestAddress,
    /// Set when the ELF has a PVH note: boot through PVH instead.
    pub(super) pvh_entry: Option<GuestAddress>,
    /// End (exclusive) of the memory the kernel needs early.
    pub(super) kernel_end: u64,
    /// The initramfs must end at or below this address.
    pub(super) initrd_limit: u64,
    /// Longest command line the kernel accepts (without the NUL).
    pub(super) cmdline_max: usize,
    pub(super) params: ZeroPageParams,
}

/// The setup header the zero page starts from.
#[derive(Debug, Clone)]
pub(super) struct ZeroPageParams {
    pub(super) header: setup_header,
    /// The header was read from a bzImage (else: defaults for an ELF vmlinux).
    pub(super) from_image: bool,
    pub(super) cmdline_len: usize,
}

fn load_error(path: &Path) -> impl FnOnce(linux_loader::loader::Error) -> BootError + '_ {
    move |source| BootError::KernelLoad { path: path.to_owned(), source }
}

/// Loads a bzImage's protected-mode kernel at 1 MiB (boot.rst: the kernel
/// proper starts at `(setup_sects + 1) * 512` in the file).
pub(super) fn load_bzimage(
    mem: &GuestMem,
    file: &mut File,
    path: &Path,
    low_ram_end: u64,
) -> Result<LoadedKernel, BootError> {
    let result = BzImage::load(mem, Some(GuestAddress(HIMEM_START)), file, Some(GuestAddress(HIMEM_START)))
        .map_err(load_error(path))?;
    let header = result.setup_header.ok_or(BootError::KernelFormat { path: path.to_owned() })?;
    let version = header.version;
    if version < MIN_PROTOCOL {
        return Err(BootError::KernelProtocol { version });
    }
    if version >= XLOADFLAGS_PROTOCOL && header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::KernelNot64Bit);
    }
    let load = result.kernel_load.raw_value();
    // The decompressor moves itself to max(load address rounded up to
    // kernel_alignment, pref_address) and needs init_size bytes there before
    // it reads the memory map.
    let align = u64::from(header.kernel_alignment);
    let aligned_load = if align.is_power_of_two() { load.next_multiple_of(align) } else { load };
    let runtime_start = aligned_load.max(header.pref_address);
    let needed = runtime_start
        .checked_add(u64::from(header.init_size))
        .map(|end| end.max(result.kernel_end))
        .ok_or(BootError::KernelTooLarge { end: u64::MAX, limit: low_ram_end })?;
    if needed > low_ram_end {
        return Err(BootError::KernelTooLarge { end: needed, limit: low_ram_end });
    }
    // cmdline_size (0x238, protocol 2.06+): maximum length without the NUL.
    let cmdline_max = header.cmdline_size as usize;
    Ok(LoadedKernel {
        kernel_start: result.kernel_load,
        entry: GuestAddress(load + STARTUP_64_OFFSET),
        pvh_entry: None,
        kernel_end: needed,
        initrd_limit: u64::from(header.initrd_addr_max) + 1,
        cmdline_max,
        params: ZeroPageParams { header, from_image: true, cmdline_len: 0 },
    })
}

/// Loads an ELF kernel at the physical addresses of its segments (at least
/// 1 MiB). With a PVH note the kernel boots through PVH, otherwise through the
/// Linux 64-bit protocol at `e_entry`.
pub(super) fn load_elf(
    mem: &GuestMem,
    file: &mut File,
    path: &Path,
    low_ram_end: u64,
) -> Result<LoadedKernel, BootError> {
    let result: KernelLoaderResult =
        Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(load_error(path))?;
    if result.kernel_end > low_ram_end {
        return Err(BootError::KernelTooLarge { end: result.kernel_end, limit: low_ram_end });
    }
    let pvh_entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Some(addr),
        _ => None,
    };
    Ok(LoadedKernel {
        kernel_start: result.kernel_load,
        entry: result.kernel_load,
        pvh_entry,
        kernel_end: result.kernel_end,
        initrd_limit: if pvh_entry.is_some() { low_ram_end } else { u64::from(ELF_INITRD_ADDR_MAX) + 1 },
        cmdline_max: CMDLINE_MAX_LEN,
        params: ZeroPageParams { header: elf_default_header(), from_image: false, cmdline_len: 0 },
    })
}

/// The setup header a vmlinux does not carry, as boot.rst requires a loader to fill it.
fn elf_default_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG,
        header: HDR_MAGIC,
        kernel_alignment: ELF_KERNEL_ALIGNMENT,
        initrd_addr_max: ELF_INITRD_ADDR_MAX,
        ..Default::default()
    }
}

/// The zero page: the setup header with the loader's fields filled, the
/// command line, the initramfs and the e820 map.
pub(super) fn build_zero_page(
    params: &ZeroPageParams,
    e820: &[E820Entry],
    initrd: Option<InitrdPlacement>,
) -> boot_params {
    let mut bp = boot_params::default();
    let mut hdr = params.header;
    hdr.type_of_loader = LOADER_UNDEFINED; // 0x210
    // 0x211: the kernel is loaded high (1 MiB); the heap end below is valid.
    // KEEP_SEGMENTS only concerns the 32-bit entry, which nodeos never uses.
    hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    hdr.heap_end_ptr = HEAP_END_PTR; // 0x224
    hdr.vid_mode = VID_MODE_NORMAL; // 0x1fa
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32; // 0x228
    if !params.from_image {
        // 0x238 is the kernel's own limit in a bzImage (read-only for the
        // loader); a vmlinux has none, so say how long ours is.
        hdr.cmdline_size = params.cmdline_len as u32;
    }
    if let Some(initrd) = initrd {
        // 0x218 / 0x21c; the high halves (0x0c0 / 0x0c4) stay zero: the
        // initramfs is always below 4 GiB.
        hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        hdr.ramdisk_size = initrd.size as u32;
    }
    bp.hdr = hdr;
    // 0x070 (boot protocol 2.14): where the ACPI tables start, so the kernel need not scan.
    bp.acpi_rsdp_addr = super::acpi::RSDP_ADDR;
    // 0x1e8: e820_entries, 0x2d0: e820_table.
    let n = e820.len().min(E820_MAX_ENTRIES_ZEROPAGE);
    for (slot, entry) in bp.e820_table.iter_mut().zip(e820.iter().take(n)) {
        *slot = boot_e820_entry { addr: entry.addr, size: entry.size, r#type: entry.kind as u32 };
    }
    bp.e820_entries = n as u8;
    bp
}

pub(super) fn write_zero_page(
    mem: &GuestMem,
    params: &ZeroPageParams,
    e820: &[E820Entry],
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let bp = build_zero_page(params, e820, initrd);
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&bp, GuestAddress(ZERO_PAGE_ADDR)), mem)
        .map_err(BootError::BootParams)
}
