//! What a kernel image is, without loading it: every rule that
//! [`super::load_kernel`] and linux-loader apply to a kernel file, checked on
//! the file alone, and what they mean for a VM's memory, initramfs and command
//! line ([`check_fit`]). The node runs this when a kernel is uploaded to the
//! pool and when a VM is created, long before a worker loads the kernel, so a
//! kernel that cannot boot is refused with the reason while nothing is
//! recorded yet.
//!
//! Two rules are stricter than the loader: the ELF must be ELF64
//! (`EI_CLASS` 2) for x86-64 (`e_machine` 62). The loader reads any ELF as
//! ELF64 and loads any machine's code, which could only crash the guest.
//! `tests` checks on synthetic kernels that what the probe accepts, the
//! loader loads, and what the loader refuses, the probe or the fit refuses.

use std::io::{ErrorKind, Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::{LOADED_HIGH, XLF_KERNEL_64};
use nodeos_types::records::{KernelFormat, KernelInfo};

use super::linux::{ELF_INITRD_ADDR_MAX, MIN_PROTOCOL, XLOADFLAGS_PROTOCOL};
use super::paging::IDENTITY_MAPPED_END;
use super::{CMDLINE_AREA, CMDLINE_MAX_LEN, HIMEM_START};
use crate::memory::MMIO32_START;

/// Setup header offsets (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER: usize = 0x202;
const VERSION: usize = 0x206;
const LOADFLAGS: usize = 0x211;
const CODE32_START: usize = 0x214;
const INITRD_ADDR_MAX: usize = 0x22c;
const KERNEL_ALIGNMENT: usize = 0x230;
const XLOADFLAGS: usize = 0x236;
const CMDLINE_SIZE: usize = 0x238;
const PREF_ADDRESS: usize = 0x258;
const INIT_SIZE: usize = 0x260;
/// End of the setup header linux-loader reads (0x1f1 + `size_of::<setup_header>()`).
const HEADER_END: usize = 0x268;

/// ELF-64 object file format: header and program header sizes, types.
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const NHDR_LEN: usize = 12;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// XEN_ELFNOTE_PHYS32_ENTRY: the PVH entry note, named "Xen".
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Why a file is not a kernel the VMM boots. Messages say what is wrong with
/// the file ("it ..."); the caller names the file.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("it cannot be read")]
    Read(#[source] std::io::Error),
    #[error("it is neither an ELF64 image nor a bzImage (no ELF magic, no \"HdrS\" at 0x202)")]
    Format,
    #[error("it ends inside its {0}")]
    Truncated(&'static str),
    #[error(
        "it is a zImage or an old bzImage (boot protocol below 2.00 or loadflags LOADED_HIGH clear); only kernels loaded above 1 MiB boot"
    )]
    NotLoadedHigh,
    #[error("it is a bzImage of boot protocol {}.{:02}; the VMM needs 2.10 or newer", .0 >> 8, .0 & 0xff)]
    Protocol(u16),
    #[error("it is a bzImage without a 64-bit entry point (xloadflags XLF_KERNEL_64 clear)")]
    Not64Bit,
    #[error("it is a bzImage whose code32_start {0:#x} is below 1 MiB")]
    Code32Start(u32),
    #[error("it asks for more memory than an address can hold")]
    Overflow,
    #[error("it is a 32-bit ELF; only ELF64 kernels boot")]
    ElfClass,
    #[error("it is a big-endian ELF")]
    ElfEndian,
    #[error("it is an ELF for machine {0}, not x86-64 ({EM_X86_64})")]
    ElfMachine(u16),
    #[error("it is an ELF whose program headers are {0} bytes each, not {PHDR_LEN}")]
    ElfPhentsize(u16),
    #[error("it is an ELF whose program headers start at {0}, inside its ELF header")]
    ElfPhoff(u64),
    #[error("it is an ELF whose entry point {0:#x} is below 1 MiB")]
    ElfEntry(u64),
    #[error("it has a PVH note whose entry is shorter than 4 bytes")]
    PvhNote,
}

/// Why a kernel cannot boot in a VM of some size, with some initramfs and
/// command line. Sizes in bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    #[error("the kernel needs guest memory up to {needs:#x}, the VM has {low_ram:#x} below 3 GiB")]
    Memory { needs: u64, low_ram: u64 },
    #[error(
        "the kernel needs guest memory up to {needs:#x}, past the first GiB that its 64-bit entry finds mapped"
    )]
    IdentityMap { needs: u64 },
    #[error("the initramfs is {size} bytes; {room} bytes are free between the kernel and its limit")]
    Initrd { size: u64, room: u64 },
    #[error("the command line is {len} bytes; the kernel takes at most {max}")]
    Cmdline { len: usize, max: usize },
}

/// Reads `len` bytes at `offset`; the file ending early is [`KernelError::Truncated`].
fn read_at<R: Read + Seek>(
    r: &mut R,
    offset: u64,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), KernelError> {
    r.seek(SeekFrom::Start(offset)).map_err(KernelError::Read)?;
    r.read_exact(buf).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => KernelError::Truncated(what),
        _ => KernelError::Read(e),
    })
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Reads a kernel's headers (never its payload) and says how it boots and
/// what it needs, or why the VMM cannot boot it.
pub fn probe<R: Read + Seek>(image: &mut R) -> Result<KernelInfo, KernelError> {
    let len = image.seek(SeekFrom::End(0)).map_err(KernelError::Read)?;
    let mut head = vec![0u8; usize::try_from(len.min(HEADER_END as u64)).unwrap_or(HEADER_END)];
    read_at(image, 0, &mut head, "header")?;
    if head.starts_with(b"\x7fELF") {
        probe_elf(image)
    } else if head.get(HEADER..HEADER + 4) == Some(b"HdrS") {
        probe_bzimage(&head, len)
    } else {
        Err(KernelError::Format)
    }
}

/// A bzImage: linux-loader's checks (`BzImage::load`), then the loader's own
/// (`linux::load_bzimage`), in their order.
fn probe_bzimage(head: &[u8], len: u64) -> Result<KernelInfo, KernelError> {
    if head.len() < HEADER_END {
        return Err(KernelError::Truncated("setup header"));
    }
    let version = u16_at(head, VERSION);
    if version < 0x0200 || head[LOADFLAGS] & LOADED_HIGH == 0 {
        return Err(KernelError::NotLoadedHigh);
    }
    let sects = match head[SETUP_SECTS] {
        0 => 4,
        n => u64::from(n),
    };
    let setup_len = (sects + 1) * 512;
    let payload = len.checked_sub(setup_len).ok_or(KernelError::Truncated("setup code"))?;
    let code32_start = u32_at(head, CODE32_START);
    if u64::from(code32_start) < HIMEM_START {
        return Err(KernelError::Code32Start(code32_start));
    }
    if version < MIN_PROTOCOL {
        return Err(KernelError::Protocol(version));
    }
    if version >= XLOADFLAGS_PROTOCOL && u16_at(head, XLOADFLAGS) & XLF_KERNEL_64 == 0 {
        return Err(KernelError::Not64Bit);
    }
    // Where the decompressor runs: the load address rounded up to
    // kernel_alignment, or pref_address if higher; init_size bytes from there.
    let align = u64::from(u32_at(head, KERNEL_ALIGNMENT));
    let aligned = if align.is_power_of_two() { HIMEM_START.next_multiple_of(align) } else { HIMEM_START };
    let runtime_start = aligned.max(u64_at(head, PREF_ADDRESS));
    let loaded_end = HIMEM_START.checked_add(payload).ok_or(KernelError::Overflow)?;
    let kernel_end = runtime_start
        .checked_add(u64::from(u32_at(head, INIT_SIZE)))
        .ok_or(KernelError::Overflow)?
        .max(loaded_end);
    Ok(KernelInfo {
        format: KernelFormat::BzImage { protocol: version },
        kernel_end,
        initrd_limit: u64::from(u32_at(head, INITRD_ADDR_MAX)) + 1,
        cmdline_max: u64::from(u32_at(head, CMDLINE_SIZE)),
    })
}

/// An ELF: linux-loader's checks (`Elf::load`, `parse_elf_note`) and the
/// loader's (`linux::load_elf`), plus ELF64 and x86-64.
fn probe_elf<R: Read + Seek>(image: &mut R) -> Result<KernelInfo, KernelError> {
    let mut ehdr = [0u8; EHDR_LEN];
    read_at(image, 0, &mut ehdr, "ELF header")?;
    if ehdr[5] != ELFDATA2LSB {
        return Err(KernelError::ElfEndian);
    }
    if ehdr[4] != ELFCLASS64 {
        return Err(KernelError::ElfClass);
    }
    let machine = u16_at(&ehdr, 18);
    if machine != EM_X86_64 {
        return Err(KernelError::ElfMachine(machine));
    }
    let (entry, phoff, phentsize, phnum) =
        (u64_at(&ehdr, 24), u64_at(&ehdr, 32), u16_at(&ehdr, 54), u16_at(&ehdr, 56));
    if usize::from(phentsize) != PHDR_LEN {
        return Err(KernelError::ElfPhentsize(phentsize));
    }
    if phoff < EHDR_LEN as u64 {
        return Err(KernelError::ElfPhoff(phoff));
    }
    if entry < HIMEM_START {
        return Err(KernelError::ElfEntry(entry));
    }
    let mut phdrs = vec![0u8; usize::from(phnum) * PHDR_LEN];
    read_at(image, phoff, &mut phdrs, "program headers")?;
    let mut kernel_end = 0u64;
    let mut pvh = false;
    for ph in phdrs.chunks_exact(PHDR_LEN) {
        let (p_type, offset, paddr, filesz, memsz) =
            (u32_at(ph, 0), u64_at(ph, 8), u64_at(ph, 24), u64_at(ph, 32), u64_at(ph, 40));
        if p_type != PT_LOAD || filesz == 0 {
            // As linux-loader: the last note segment decides.
            if p_type == PT_NOTE {
                pvh = has_pvh_note(image, offset, filesz)?;
            }
            continue;
        }
        let end = offset.checked_add(filesz).ok_or(KernelError::Overflow)?;
        let mut last = [0u8; 1];
        read_at(image, end - 1, &mut last, "loadable segments")?;
        // linux-loader counts memsz only, but copies filesz bytes: the larger one must fit.
        let seg_end = paddr.checked_add(memsz.max(filesz)).ok_or(KernelError::Overflow)?;
        kernel_end = kernel_end.max(seg_end);
    }
    Ok(KernelInfo {
        format: KernelFormat::Elf { pvh },
        kernel_end,
        initrd_limit: if pvh { u64::MAX } else { u64::from(ELF_INITRD_ADDR_MAX) + 1 },
        cmdline_max: CMDLINE_MAX_LEN as u64,
    })
}

/// Whether a note segment holds the PVH entry note, walked as linux-loader does.
fn has_pvh_note<R: Read + Seek>(image: &mut R, offset: u64, filesz: u64) -> Result<bool, KernelError> {
    let mut read = 0u64;
    while read < filesz {
        let mut nhdr = [0u8; NHDR_LEN];
        read_at(image, offset + read, &mut nhdr, "notes")?;
        let (namesz, descsz, kind) = (u32_at(&nhdr, 0), u32_at(&nhdr, 4), u32_at(&nhdr, 8));
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && namesz == 4 {
            let mut name = [0u8; 4];
            read_at(image, offset + read + NHDR_LEN as u64, &mut name, "notes")?;
            if &name == b"Xen\0" {
                if descsz < 4 {
                    return Err(KernelError::PvhNote);
                }
                let mut addr = [0u8; 4];
                let desc = offset + read + NHDR_LEN as u64 + 4;
                read_at(image, desc, &mut addr, "notes")?;
                return Ok(true);
            }
        }
        read +=
            NHDR_LEN as u64 + u64::from(namesz).next_multiple_of(4) + u64::from(descsz).next_multiple_of(4);
    }
    Ok(false)
}

/// RAM below the 32-bit MMIO window of a guest of `memory_mib`: where the
/// kernel and the initramfs go.
pub fn low_ram_end(memory_mib: u64) -> u64 {
    memory_mib.saturating_mul(1 << 20).min(MMIO32_START)
}

/// Longest command line the VMM hands this kernel.
pub fn cmdline_max(info: &KernelInfo) -> usize {
    usize::try_from(info.cmdline_max).unwrap_or(usize::MAX).min(CMDLINE_AREA as usize - 1)
}

/// Bytes of initramfs a VM of `memory_mib` has room for with this kernel:
/// the loader puts it at the top of low RAM (or below the kernel's
/// `initrd_addr_max`), page-aligned above the kernel.
pub fn initrd_room(info: &KernelInfo, memory_mib: u64) -> u64 {
    let limit = info.initrd_limit.min(low_ram_end(memory_mib));
    limit.saturating_sub(info.kernel_end.next_multiple_of(4096))
}

/// Whether the kernel boots in a VM of `memory_mib` with an initramfs of
/// `initrd` bytes and a command line of `cmdline_len` bytes, by the loader's rules.
pub fn check_fit(
    info: &KernelInfo,
    memory_mib: u64,
    initrd: Option<u64>,
    cmdline_len: usize,
) -> Result<(), FitError> {
    let low_ram = low_ram_end(memory_mib);
    if info.kernel_end > low_ram {
        return Err(FitError::Memory { needs: info.kernel_end, low_ram });
    }
    let max = cmdline_max(info);
    if cmdline_len > max {
        return Err(FitError::Cmdline { len: cmdline_len, max });
    }
    if let Some(size) = initrd {
        let room = initrd_room(info, memory_mib);
        if size > room {
            return Err(FitError::Initrd { size, room });
        }
    }
    if info.format.linux64() && info.kernel_end > IDENTITY_MAPPED_END {
        return Err(FitError::IdentityMap { needs: info.kernel_end });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::path::Path;

    use super::super::testdata::{BzImageSpec, Segment, elf};
    use super::super::{BootConfig, BootError, load_kernel};
    use super::*;
    use crate::memory;

    fn probe_bytes(b: &[u8]) -> Result<KernelInfo, KernelError> {
        probe(&mut Cursor::new(b))
    }

    #[test]
    fn bzimages_report_what_the_loader_computes() {
        let spec = BzImageSpec::default();
        let info = probe_bytes(&spec.build()).unwrap();
        assert_eq!(info.format, KernelFormat::BzImage { protocol: 0x020f });
        // pref_address 16 MiB + init_size 4 MiB.
        assert_eq!(info.kernel_end, 0x140_0000);
        assert_eq!(info.initrd_limit, 0x8000_0000);
        assert_eq!(info.cmdline_max, 2047);
        assert_eq!(info.format.to_string(), "bzImage, boot protocol 2.15");
    }

    #[test]
    fn elves_report_pvh_and_their_segments() {
        let seg = |paddr, memsz| Segment { paddr, data: vec![0x90; 32], memsz };
        let plain = elf(0x10_0000, &[seg(0x10_0000, 0x1000), seg(0x20_0000, 0x3000)], None);
        let info = probe_bytes(&plain).unwrap();
        assert_eq!(info.format, KernelFormat::Elf { pvh: false });
        assert_eq!((info.kernel_end, info.initrd_limit), (0x20_3000, 0x8000_0000));
        let pvh = elf(0x10_0000, &[seg(0x10_0000, 0x1000)], Some(0x10_0000));
        let info = probe_bytes(&pvh).unwrap();
        assert_eq!(info.format, KernelFormat::Elf { pvh: true });
        assert_eq!(info.initrd_limit, u64::MAX);
    }

    #[test]
    fn bad_kernels_say_what_is_wrong() {
        let msg = |b: &[u8]| probe_bytes(b).unwrap_err().to_string();
        assert!(msg(b"").contains("neither an ELF64 image nor a bzImage"));
        assert!(msg(b"hello, I am not a kernel").contains("neither"));
        let good = BzImageSpec::default().build();
        assert!(msg(&good[..0x210]).contains("ends inside its setup header"));
        assert!(msg(&good[..0x300]).contains("ends inside its setup code"));
        let old = BzImageSpec { version: 0x0209, ..Default::default() }.build();
        assert_eq!(msg(&old), "it is a bzImage of boot protocol 2.09; the VMM needs 2.10 or newer");
        let zimage = BzImageSpec { loadflags: 0, ..Default::default() }.build();
        assert!(msg(&zimage).contains("LOADED_HIGH"));
        let not64 = BzImageSpec { xloadflags: 0, ..Default::default() }.build();
        assert!(msg(&not64).contains("XLF_KERNEL_64"));

        let seg = [Segment { paddr: 0x10_0000, data: vec![0; 16], memsz: 16 }];
        let good = elf(0x10_0000, &seg, None);
        assert!(msg(&elf(0x8000, &seg, None)).contains("below 1 MiB"));
        assert!(msg(&good[..40]).contains("ends inside its ELF header"));
        assert!(msg(&good[..80]).contains("ends inside its program headers"));
        assert!(msg(&good[..good.len() - 1]).contains("ends inside its loadable segments"));
        let mut b = good.clone();
        b[4] = 1;
        assert!(msg(&b).contains("32-bit ELF"));
        let mut b = good.clone();
        b[5] = 2;
        assert!(msg(&b).contains("big-endian"));
        let mut b = good.clone();
        b[18] = 183; // aarch64
        assert!(msg(&b).contains("machine 183"));
        let mut b = good.clone();
        b[54] = 32;
        assert!(msg(&b).contains("program headers are 32 bytes"));
    }

    #[test]
    fn fit_follows_the_memory_the_kernel_and_initrd_take() {
        let info = probe_bytes(&BzImageSpec::default().build()).unwrap();
        // 20 MiB kernel in a 32 MiB guest: 12 MiB for the initramfs.
        assert_eq!(initrd_room(&info, 32), 12 << 20);
        assert_eq!(check_fit(&info, 32, Some(12 << 20), 0), Ok(()));
        assert_eq!(
            check_fit(&info, 32, Some((12 << 20) + 1), 0),
            Err(FitError::Initrd { size: (12 << 20) + 1, room: 12 << 20 })
        );
        assert_eq!(
            check_fit(&info, 16, None, 0),
            Err(FitError::Memory { needs: 0x140_0000, low_ram: 16 << 20 })
        );
        assert_eq!(check_fit(&info, 32, None, 2048), Err(FitError::Cmdline { len: 2048, max: 2047 }));
        // Low RAM ends at 3 GiB however large the guest; initrd_addr_max caps it at 2 GiB.
        assert_eq!(initrd_room(&info, 8192), 0x8000_0000 - 0x140_0000);
    }

    /// Writes `bytes` to a file and loads it into a guest of `mib`, with an
    /// initramfs of `initrd` bytes and a command line of `cmdline` bytes.
    fn load(
        dir: &Path,
        bytes: &[u8],
        mib: u64,
        initrd: Option<u64>,
        cmdline: usize,
    ) -> Result<(), BootError> {
        let kernel = dir.join("kernel");
        std::fs::write(&kernel, bytes).unwrap();
        let initrd = initrd.map(|n| {
            let p = dir.join("initrd");
            std::fs::write(&p, vec![7u8; n as usize]).unwrap();
            p
        });
        let (mem, _file) = memory::create(mib).unwrap();
        let cfg = BootConfig { kernel, initrd, cmdline: "x".repeat(cmdline), vcpus: 1, memory_mib: mib };
        load_kernel(&mem, &cfg).map(|_| ())
    }

    /// The probe and the fit agree with the loader on every kernel below:
    /// accepted by both, or refused by both.
    #[test]
    fn the_probe_agrees_with_the_loader() {
        let dir = tempfile::tempdir().unwrap();
        let seg = |paddr, memsz| Segment { paddr, data: vec![0x90; 64], memsz };
        let bz = BzImageSpec::default();
        let mut kernels: Vec<(&str, Vec<u8>)> = vec![
            ("bzImage", bz.build()),
            ("bzImage 2.10", BzImageSpec { version: 0x020a, xloadflags: 0, ..bz.clone() }.build()),
            ("bzImage 2.09", BzImageSpec { version: 0x0209, ..bz.clone() }.build()),
            ("not 64-bit", BzImageSpec { xloadflags: 0, ..bz.clone() }.build()),
            ("zImage", BzImageSpec { loadflags: 0, ..bz.clone() }.build()),
            ("huge init_size", BzImageSpec { init_size: 0x1000_0000, ..bz.clone() }.build()),
            ("short cmdline", BzImageSpec { cmdline_size: 16, ..bz.clone() }.build()),
            ("low initrd_addr_max", BzImageSpec { initrd_addr_max: 0x17f_ffff, ..bz.clone() }.build()),
            ("elf", elf(0x10_0000, &[seg(0x10_0000, 0x1000)], None)),
            ("pvh", elf(0x10_0000, &[seg(0x10_0000, 0x1000)], Some(0x10_0000))),
            ("elf low entry", elf(0x8000, &[seg(0x10_0000, 0x1000)], None)),
            ("elf high", elf(0x10_0000, &[seg(0x10_0000, 0x1000), seg(0x1f0_0000, 0x20_0000)], None)),
            (
                "pvh high",
                elf(0x10_0000, &[seg(0x10_0000, 0x1000), seg(0x1f0_0000, 0x20_0000)], Some(0x10_0000)),
            ),
            ("empty", vec![]),
            ("junk", vec![0x55; 4096]),
        ];
        let cut = kernels[0].1[..0x300].to_vec();
        kernels.push(("cut setup", cut));
        let cut = kernels[9].1[..80].to_vec();
        kernels.push(("cut elf", cut));
        for (name, bytes) in &kernels {
            for (mib, initrd, cmdline) in [
                (32, None, 0),
                (16, None, 0),
                (32, Some(11 << 20), 16),
                (32, Some(13 << 20), 0),
                (64, None, 17),
                (32, None, 2047),
            ] {
                let by_probe = probe_bytes(bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|info| check_fit(&info, mib, initrd, cmdline).map_err(|e| e.to_string()));
                let by_loader = load(dir.path(), bytes, mib, initrd, cmdline).map_err(|e| e.to_string());
                assert_eq!(
                    by_probe.is_ok(),
                    by_loader.is_ok(),
                    "{name}, {mib} MiB, initrd {initrd:?}, cmdline {cmdline}: probe {by_probe:?}, loader {by_loader:?}"
                );
            }
        }
    }
}
