//! Direct boot on x86-64: puts a kernel, its command line, an initramfs and
//! the boot structures into guest memory, and gives the vCPUs their first
//! state. No firmware runs.
//!
//! # Layout
//! - `mod.rs`: [`BootConfig`] → [`load_kernel`] → [`BootSetup`] →
//!   [`setup_vcpu`]; the low-memory map below; [`BootError`].
//! - `linux.rs`: bzImage and ELF vmlinux loading, the zero page (`boot_params`).
//! - `pvh.rs`: ELF kernels with a Xen PVH note: `hvm_start_info`, module list, memory map.
//! - `probe.rs`: what a kernel file is and needs, from its headers alone, by the
//!   loader's rules (for the node, which checks kernels before any worker runs).
//! - `e820.rs`: the guest's memory map (shared by the zero page and PVH).
//! - `gdt.rs`: the boot GDT and its conversion to `kvm_segment`.
//! - `paging.rs`: identity page tables for the Linux 64-bit entry.
//! - `acpi.rs`: the ACPI tables (RSDP, XSDT, FADT, MADT, DSDT in AML).
//! - `mptable.rs`: the Intel MP table (CPUs, IOAPIC, ISA IRQs), for guests booted without ACPI.
//! - `regs.rs`: entry registers, segments, control registers, FPU, MSRs.
//!
//! # Protocols
//! A bzImage, or an ELF without a PVH note, is entered through the Linux
//! 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit BOOT
//! PROTOCOL"): long mode, identity-mapped page tables, RSI = zero page. An
//! ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note (type 18) is entered through
//! PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
//! vCPU 0 starts at the entry; the others wait for INIT/SIPI, as on a PC.
//!
//! # Low memory
//! ```text
//! 0x0500  GDT (4 entries)          0x0520  IDT (empty)
//! 0x6000  PVH hvm_start_info       0x6040  PVH module list
//! 0x7000  zero page (Linux) / PVH memory map
//! 0x8ff0  boot stack top           0x9000  PML4, 0xa000 PDPT, 0xb000 PD
//! 0x20000 command line (up to 64 KiB)
//! 0x9fc00 MP table (EBDA; reserved up to 1 MiB)
//! 0xe0000 ACPI tables, RSDP first
//! 1 MiB   kernel; initramfs at the top of low RAM
//! ```

pub mod acpi;
mod e820;
mod gdt;
mod linux;
mod mptable;
mod paging;
pub mod probe;
mod pvh;
mod regs;
#[cfg(any(test, feature = "testing"))]
pub mod testdata;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use nodeos_hv::{CpuidPolicy, HvError, MpState, Vcpu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::{self, GuestMem, MemoryError};

pub use e820::{E820Entry, E820Kind};

/// Boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Boot IDT: one null entry, the kernel installs its own.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
/// PVH module list (one module: the initramfs).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map (at most 128 entries).
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial RSP/RBP for the Linux 64-bit entry.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Identity page tables.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Room for the command line, terminating NUL included.
pub const CMDLINE_AREA: u64 = 0x1_0000;
/// Start of the EBDA: the MP table lives here; reserved up to 1 MiB.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where kernels load and RAM above the legacy area starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Longest command line for ELF kernels (x86 `COMMAND_LINE_SIZE` 2048, minus the NUL).
pub const CMDLINE_MAX_LEN: usize = 2047;
/// Most vCPUs: APIC ids are 8 bits and the IOAPIC takes the id after the last CPU.
pub const MAX_VCPUS: u8 = 254;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// bzImage, ELF vmlinux, or ELF with a PVH note.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    /// Guest RAM; must match the memory passed to [`load_kernel`].
    pub memory_mib: u64,
}

/// How vCPU 0 enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: RSI = zero page.
    Linux64 { zero_page: GuestAddress },
    /// Xen PVH: EBX = `hvm_start_info`.
    Pvh { start_info: GuestAddress },
}

/// Where the initramfs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: GuestAddress,
    pub size: u64,
}

/// The result of [`load_kernel`]: everything [`setup_vcpu`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSetup {
    pub protocol: BootProtocol,
    /// First instruction of vCPU 0.
    pub entry: GuestAddress,
    /// Where the kernel image was loaded.
    pub kernel_start: GuestAddress,
    /// End (exclusive) of the memory the kernel needs before it reads the
    /// memory map (for a bzImage: up to its runtime address + `init_size`).
    pub kernel_end: GuestAddress,
    pub initrd: Option<InitrdPlacement>,
    pub cmdline_addr: GuestAddress,
    pub e820: Vec<E820Entry>,
    pub vcpus: u8,
    /// Applied to every vCPU's CPUID by [`setup_vcpu`]; change it before then.
    pub cpuid_policy: CpuidPolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("vcpus is {count}, allowed 1..={MAX_VCPUS}")]
    Vcpus { count: u8 },
    #[error("memory_mib is invalid")]
    Memory(#[source] MemoryError),
    #[error("guest memory does not cover the RAM map of {mib} MiB")]
    MemoryMismatch { mib: u64 },
    #[error("cannot open kernel {path}")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is not a regular file")]
    KernelNotAFile { path: PathBuf },
    #[error("cannot read kernel {path}")]
    KernelRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an ELF64 image nor a bzImage (no ELF magic, no \"HdrS\" at 0x202)")]
    KernelFormat { path: PathBuf },
    #[error("cannot load kernel {path}")]
    KernelLoad {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("bzImage boot protocol {version:#06x} is older than 2.10, which this loader needs")]
    KernelProtocol { version: u16 },
    #[error("bzImage has no 64-bit entry point (xloadflags XLF_KERNEL_64 is clear)")]
    KernelNot64Bit,
    #[error(
        "kernel needs guest memory up to {end:#x}, beyond the limit {limit:#x} (end of low RAM or of the boot identity map)"
    )]
    KernelTooLarge { end: u64, limit: u64 },
    #[error("cannot open initrd {path}")]
    InitrdOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} is not a regular file")]
    InitrdNotAFile { path: PathBuf },
    #[error("initrd of {size} bytes does not fit: {available} bytes free between the kernel and its limit")]
    InitrdTooLarge { size: u64, available: u64 },
    #[error("cannot load initrd {path} into guest memory")]
    InitrdLoad {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("command line is {len} bytes, this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write {what} into guest memory")]
    GuestWrite {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot write the boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
    #[error("the ACPI tables would end at {end:#x}, past their area")]
    AcpiTooLarge { end: u64 },
    #[error("setup_vcpu called for vCPU {found} with id {expected}")]
    VcpuId { expected: u8, found: u32 },
    #[error("vCPU {id}: cannot set its {step}")]
    Vcpu {
        id: u8,
        step: &'static str,
        #[source]
        source: HvError,
    },
}

/// The kernel image types this loader recognises by their magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

/// Loads the kernel, command line and initramfs of `config` into `mem` and
/// writes every boot structure (memory map, GDT, page tables, MP table, zero
/// page or PVH start info). `mem` must be the guest's RAM as laid out by
/// [`memory::ram_ranges`] for `config.memory_mib`.
pub fn load_kernel(mem: &GuestMem, config: &BootConfig) -> Result<BootSetup, BootError> {
    if !(1..=MAX_VCPUS).contains(&config.vcpus) {
        return Err(BootError::Vcpus { count: config.vcpus });
    }
    let ranges = memory::ram_ranges(config.memory_mib).map_err(BootError::Memory)?;
    for (addr, len) in &ranges {
        let covered = usize::try_from(*len).is_ok_and(|len| mem.check_range(*addr, len));
        if !covered {
            return Err(BootError::MemoryMismatch { mib: config.memory_mib });
        }
    }
    if config.cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let low_ram_end = ranges[0].1;
    let e820 = e820::build(&ranges);

    let mut file = open_regular(&config.kernel, true)?;
    let format = detect_format(&mut file, &config.kernel)?;
    let mut loaded = match format {
        KernelFormat::BzImage => linux::load_bzimage(mem, &mut file, &config.kernel, low_ram_end)?,
        KernelFormat::Elf => linux::load_elf(mem, &mut file, &config.kernel, low_ram_end)?,
    };
    drop(file);

    let max_len = loaded.cmdline_max.min(CMDLINE_AREA as usize - 1);
    if config.cmdline.len() > max_len {
        return Err(BootError::CmdlineTooLong { len: config.cmdline.len(), max: max_len });
    }
    let mut cmdline = config.cmdline.clone().into_bytes();
    cmdline.push(0);
    write(mem, &cmdline, CMDLINE_ADDR, "the command line")?;

    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(mem, path, loaded.kernel_end, loaded.initrd_limit.min(low_ram_end))?),
        None => None,
    };

    gdt::write_tables(mem, loaded.pvh_entry.is_some())?;
    mptable::write_table(mem, config.vcpus)?;
    acpi::write_tables(mem, config.vcpus, mptable::ioapic_id(config.vcpus))?;
    let protocol = match loaded.pvh_entry {
        Some(_) => {
            pvh::write_start_info(mem, &e820, initrd)?;
            BootProtocol::Pvh { start_info: GuestAddress(PVH_START_INFO_ADDR) }
        }
        None => {
            // boot.rst: the kernel up to init_size, the zero page and the
            // command line must be identity-mapped at the 64-bit entry.
            if loaded.kernel_end > paging::IDENTITY_MAPPED_END {
                let limit = paging::IDENTITY_MAPPED_END;
                return Err(BootError::KernelTooLarge { end: loaded.kernel_end, limit });
            }
            paging::write_tables(mem)?;
            loaded.params.cmdline_len = config.cmdline.len();
            linux::write_zero_page(mem, &loaded.params, &e820, initrd)?;
            BootProtocol::Linux64 { zero_page: GuestAddress(ZERO_PAGE_ADDR) }
        }
    };
    Ok(BootSetup {
        protocol,
        entry: loaded.pvh_entry.unwrap_or(loaded.entry),
        kernel_start: loaded.kernel_start,
        kernel_end: GuestAddress(loaded.kernel_end),
        initrd,
        cmdline_addr: GuestAddress(CMDLINE_ADDR),
        e820,
        vcpus: config.vcpus,
        cpuid_policy: CpuidPolicy::default(),
    })
}

/// Gives vCPU `id` its boot state: CPUID for the VM's vCPU count, boot MSRs,
/// FPU, LAPIC LINT0/LINT1; vCPU 0 also gets the entry registers of
/// `setup.protocol`, the others wait for INIT/SIPI. Call once per vCPU,
/// before its first run.
pub fn setup_vcpu(vcpu: &Vcpu, setup: &BootSetup, id: u8) -> Result<(), BootError> {
    if vcpu.id() != u32::from(id) {
        return Err(BootError::VcpuId { expected: id, found: vcpu.id() });
    }
    let step = |step: &'static str| move |source: HvError| BootError::Vcpu { id, step, source };
    vcpu.set_cpuid(u32::from(setup.vcpus), &setup.cpuid_policy).map_err(step("CPUID"))?;
    // XCR0 starts with every XSAVE feature offered, as firmware leaves it, so that
    // CPUID 0xD.0 EBX (which KVM derives from XCR0) already gives the size of the
    // area the OS will enable. Linux compares the two at boot; where the hypervisor
    // below does not see the guest's XSETBV (nested SVM under QEMU TCG), they
    // would otherwise disagree ("XSAVE consistency problem").
    let cpuid = vcpu.get_cpuid().map_err(step("CPUID"))?;
    vcpu.set_xcr0(nodeos_hv::xcr0_offered(&cpuid)).map_err(step("XCR0"))?;
    vcpu.set_msrs(&regs::boot_msrs()).map_err(step("boot MSRs"))?;
    vcpu.set_fpu(&regs::boot_fpu()).map_err(step("FPU"))?;
    vcpu.set_lapic_lint_defaults().map_err(step("LAPIC LINT0/LINT1"))?;
    if id != 0 {
        return vcpu.set_mp_state(MpState::InitReceived).map_err(step("MP state"));
    }
    let sregs = vcpu.get_sregs().map_err(step("segment registers"))?;
    let (sregs, regs) = match setup.protocol {
        BootProtocol::Linux64 { zero_page } => {
            (regs::linux64_sregs(sregs), regs::linux64_regs(setup.entry, zero_page))
        }
        BootProtocol::Pvh { start_info } => (regs::pvh_sregs(sregs), regs::pvh_regs(setup.entry, start_info)),
    };
    vcpu.set_sregs(&sregs).map_err(step("segment registers"))?;
    vcpu.set_regs(&regs).map_err(step("registers"))?;
    vcpu.set_mp_state(MpState::Runnable).map_err(step("MP state"))
}

fn open_regular(path: &Path, kernel: bool) -> Result<File, BootError> {
    let file = File::open(path).map_err(|source| match kernel {
        true => BootError::KernelOpen { path: path.to_owned(), source },
        false => BootError::InitrdOpen { path: path.to_owned(), source },
    })?;
    let is_file = file.metadata().map(|m| m.is_file()).unwrap_or(false);
    if !is_file {
        return Err(match kernel {
            true => BootError::KernelNotAFile { path: path.to_owned() },
            false => BootError::InitrdNotAFile { path: path.to_owned() },
        });
    }
    Ok(file)
}

/// ELF magic at 0, or the bzImage "HdrS" magic at 0x202 (boot.rst: `header`).
fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let mut head = Vec::with_capacity(0x206);
    file.by_ref()
        .take(0x206)
        .read_to_end(&mut head)
        .map_err(|source| BootError::KernelRead { path: path.to_owned(), source })?;
    if head.starts_with(b"\x7fELF") {
        Ok(KernelFormat::Elf)
    } else if head.get(0x202..0x206) == Some(b"HdrS") {
        Ok(KernelFormat::BzImage)
    } else {
        Err(BootError::KernelFormat { path: path.to_owned() })
    }
}

/// Loads the initramfs page-aligned as high as possible below `limit`, above `kernel_end`.
fn load_initrd(
    mem: &GuestMem,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<InitrdPlacement, BootError> {
    let mut file = open_regular(path, false)?;
    let size =
        file.metadata().map_err(|source| BootError::InitrdOpen { path: path.to_owned(), source })?.len();
    let floor = kernel_end.next_multiple_of(4096);
    let available = limit.saturating_sub(floor);
    if size > available {
        return Err(BootError::InitrdTooLarge { size, available });
    }
    let addr = (limit - size) & !0xfff;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size, available })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| BootError::InitrdLoad { path: path.to_owned(), source })?;
    Ok(InitrdPlacement { addr: GuestAddress(addr), size })
}

fn write(mem: &GuestMem, bytes: &[u8], addr: u64, what: &'static str) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|source| BootError::GuestWrite { what, source })
}

#[cfg(test)]
mod tests;
