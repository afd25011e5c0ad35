//! Boot-protocol tests: the bytes a kernel finds in guest memory, checked at
//! the offsets of boot.rst / zero-page.rst / start_info.h / the MP spec, and
//! (with KVM) synthetic kernels and the test guest actually entered.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodeos_hv::testing::{Flow, RunEnd, hypervisor_or_skip, run_vcpu};
use nodeos_hv::{MpState, VcpuExit};
use vm_memory::{Address, Bytes, GuestAddress};

use super::testdata::{BzImageSpec, Segment, elf};
use super::*;
use crate::memory;

const MIB: u64 = 1 << 20;

fn guest(mib: u64) -> GuestMem {
    memory::create(mib).unwrap().0
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }

    fn put(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

fn config(kernel: &Path, initrd: Option<PathBuf>, cmdline: &str, mib: u64) -> BootConfig {
    BootConfig { kernel: kernel.to_owned(), initrd, cmdline: cmdline.into(), vcpus: 1, memory_mib: mib }
}

fn u8_at(mem: &GuestMem, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}
fn u16_at(mem: &GuestMem, addr: u64) -> u16 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}
fn u32_at(mem: &GuestMem, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}
fn u64_at(mem: &GuestMem, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}
fn bytes_at(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// A pseudo-random initramfs (xorshift) so misplaced bytes show.
fn initrd_bytes(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The e820 table of the zero page (0x1e8: count, 0x2d0: 20-byte entries).
fn zero_page_e820(mem: &GuestMem) -> Vec<(u64, u64, u32)> {
    let n = u8_at(mem, ZERO_PAGE_ADDR + 0x1e8) as u64;
    (0..n)
        .map(|i| {
            let at = ZERO_PAGE_ADDR + 0x2d0 + 20 * i;
            (u64_at(mem, at), u64_at(mem, at + 8), u32_at(mem, at + 16))
        })
        .collect()
}

fn check_memory_map(map: &[(u64, u64, u32)], mib: u64) {
    for pair in map.windows(2) {
        assert!(pair[0].0 + pair[0].1 <= pair[1].0, "sorted and disjoint: {pair:x?}");
    }
    assert_eq!(map[0], (0, 0x9fc00, 1), "base memory up to the EBDA");
    assert_eq!(map[1], (0x9fc00, 0x100000 - 0x9fc00, 2), "EBDA, VGA and BIOS area reserved");
    assert_eq!(map[2], (0x100000, (mib << 20) - 0x100000, 1), "RAM from 1 MiB");
    assert!(map.contains(&(nodeos_hv::KVM_IDENTITY_MAP_ADDR, 0x4000, 2)), "KVM's pages reserved");
}

#[test]
fn bzimage_zero_page_follows_the_boot_protocol() {
    let files = Files::new();
    let spec = BzImageSpec::default();
    let kernel = files.put("bzImage", &spec.build());
    let initrd = initrd_bytes(3 * MIB as usize + 123);
    let initrd_path = files.put("initrd", &initrd);
    let cmdline = "console=ttyS0 root=/dev/vda rw";
    let mem = guest(64);
    let setup = load_kernel(&mem, &config(&kernel, Some(initrd_path), cmdline, 64)).unwrap();

    assert_eq!(setup.protocol, BootProtocol::Linux64 { zero_page: GuestAddress(ZERO_PAGE_ADDR) });
    assert_eq!(setup.kernel_start, GuestAddress(0x10_0000));
    // boot.rst 64-bit protocol: startup_64 at load address + 0x200.
    assert_eq!(setup.entry, GuestAddress(0x10_0200));
    // The protected-mode kernel starts (setup_sects + 1) * 512 bytes into the file.
    assert_eq!(bytes_at(&mem, 0x10_0000, spec.payload.len()), spec.payload);

    let zp = ZERO_PAGE_ADDR;
    // Fields copied from the image's header.
    assert_eq!(u8_at(&mem, zp + 0x1f1), 4, "setup_sects");
    assert_eq!(u16_at(&mem, zp + 0x1fe), 0xaa55, "boot_flag");
    assert_eq!(&bytes_at(&mem, zp + 0x202, 4), b"HdrS", "header");
    assert_eq!(u16_at(&mem, zp + 0x206), 0x020f, "version");
    assert_eq!(u32_at(&mem, zp + 0x230), 0x20_0000, "kernel_alignment");
    assert_eq!(u16_at(&mem, zp + 0x236), 0x3, "xloadflags");
    assert_eq!(u32_at(&mem, zp + 0x238), 2047, "cmdline_size is the kernel's limit, left as is");
    assert_eq!(u64_at(&mem, zp + 0x258), 0x100_0000, "pref_address");
    assert_eq!(u32_at(&mem, zp + 0x260), 0x40_0000, "init_size");
    assert_eq!(u32_at(&mem, zp + 0x214), 0x10_0000, "code32_start = load address");
    // Fields the loader writes.
    assert_eq!(u8_at(&mem, zp + 0x210), 0xff, "type_of_loader");
    let loadflags = u8_at(&mem, zp + 0x211);
    assert_eq!(loadflags & 0x81, 0x81, "LOADED_HIGH | CAN_USE_HEAP");
    assert_eq!(u16_at(&mem, zp + 0x224), 0xde00, "heap_end_ptr");
    assert_eq!(u16_at(&mem, zp + 0x1fa), 0xffff, "vid_mode");
    assert_eq!(u64_at(&mem, zp + 0x70), super::acpi::RSDP_ADDR, "acpi_rsdp_addr");
    assert_eq!(&bytes_at(&mem, super::acpi::RSDP_ADDR, 8), b"RSD PTR ", "the RSDP is where it says");
    assert_eq!(u32_at(&mem, zp + 0x228), CMDLINE_ADDR as u32, "cmd_line_ptr");
    assert_eq!(u32_at(&mem, zp + 0x0c8), 0, "ext_cmd_line_ptr");
    let mut expected_cmdline = cmdline.as_bytes().to_vec();
    expected_cmdline.push(0);
    assert_eq!(bytes_at(&mem, CMDLINE_ADDR, expected_cmdline.len()), expected_cmdline);

    // Initramfs: 0x218 ramdisk_image, 0x21c ramdisk_size, high halves 0x0c0/0x0c4 zero.
    let placed = setup.initrd.unwrap();
    assert_eq!(u32_at(&mem, zp + 0x218) as u64, placed.addr.raw_value());
    assert_eq!(u32_at(&mem, zp + 0x21c) as u64, initrd.len() as u64);
    assert_eq!((u32_at(&mem, zp + 0x0c0), u32_at(&mem, zp + 0x0c4)), (0, 0));
    let addr = placed.addr.raw_value();
    assert_eq!(addr % 4096, 0, "page-aligned");
    assert!(addr + placed.size <= 64 * MIB, "inside RAM");
    assert!(addr + placed.size > 64 * MIB - 4096, "at the top of low RAM");
    // The decompressor's room: pref_address (16 MiB) + init_size (4 MiB).
    assert_eq!(setup.kernel_end, GuestAddress(0x140_0000));
    assert!(addr >= setup.kernel_end.raw_value(), "initrd clear of the kernel");
    assert_eq!(bytes_at(&mem, addr, initrd.len()), initrd);

    // e820 in the zero page.
    let map = zero_page_e820(&mem);
    assert_eq!(map.len(), 4);
    check_memory_map(&map, 64);
    assert_eq!(setup.e820.len(), 4);
}

#[test]
fn bzimage_boot_structures_are_in_guest_memory() {
    let files = Files::new();
    let kernel = files.put("bzImage", &BzImageSpec::default().build());
    let mem = guest(32);
    let mut cfg = config(&kernel, None, "", 32);
    cfg.vcpus = 4;
    let setup = load_kernel(&mem, &cfg).unwrap();
    assert_eq!(setup.initrd, None);
    assert_eq!((u32_at(&mem, ZERO_PAGE_ADDR + 0x218), u32_at(&mem, ZERO_PAGE_ADDR + 0x21c)), (0, 0));
    assert_eq!(u8_at(&mem, CMDLINE_ADDR), 0, "empty command line is an empty string");
    // Page tables.
    assert_eq!(u64_at(&mem, PML4_ADDR), PDPT_ADDR | 3);
    assert_eq!(u64_at(&mem, PDPT_ADDR), PD_ADDR | 3);
    assert_eq!(u64_at(&mem, PD_ADDR + 8 * 5), (5 << 21) | 0x83);
    // GDT: 64-bit code at 0x08.
    assert_eq!(u64_at(&mem, GDT_ADDR + 8), 0x00af_9b00_0000_ffff);
    // MP table for 4 vCPUs: floating pointer and 4 processor entries.
    assert_eq!(&bytes_at(&mem, EBDA_START, 4), b"_MP_");
    let table = u32_at(&mem, EBDA_START + 4) as u64;
    assert_eq!(&bytes_at(&mem, table, 4), b"PCMP");
    let len = u16_at(&mem, table + 4) as usize;
    assert_eq!(bytes_at(&mem, table, len).iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
    assert_eq!(u8_at(&mem, table + 44), 0, "first entry is a processor");
    assert_eq!(u8_at(&mem, table + 44 + 20 * 3 + 1), 3, "fourth processor has APIC id 3");
    assert_eq!(u8_at(&mem, table + 44 + 20 * 4), 1, "then the bus");
}

#[test]
fn elf_vmlinux_gets_a_default_setup_header() {
    let files = Files::new();
    let image =
        elf(0x100_0000, &[Segment { paddr: 0x100_0000, data: vec![0xf4; 0x3000], memsz: 0x5000 }], None);
    let kernel = files.put("vmlinux", &image);
    let mem = guest(64);
    let cmdline = "console=ttyS0";
    let setup =
        load_kernel(&mem, &config(&kernel, Some(files.put("initrd", &[7; 5000])), cmdline, 64)).unwrap();
    assert_eq!(setup.protocol, BootProtocol::Linux64 { zero_page: GuestAddress(ZERO_PAGE_ADDR) });
    assert_eq!(setup.entry, GuestAddress(0x100_0000), "e_entry");
    assert_eq!(setup.kernel_end, GuestAddress(0x100_5000), "p_paddr + p_memsz");
    let zp = ZERO_PAGE_ADDR;
    assert_eq!(u16_at(&mem, zp + 0x1fe), 0xaa55);
    assert_eq!(&bytes_at(&mem, zp + 0x202, 4), b"HdrS");
    assert_eq!(u8_at(&mem, zp + 0x210), 0xff);
    assert_eq!(u8_at(&mem, zp + 0x211) & 0x81, 0x81);
    assert_eq!(u32_at(&mem, zp + 0x230), 0x100_0000, "kernel_alignment");
    assert_eq!(u32_at(&mem, zp + 0x228), CMDLINE_ADDR as u32);
    assert_eq!(u32_at(&mem, zp + 0x238), cmdline.len() as u32, "cmdline_size: our length");
    let placed = setup.initrd.unwrap();
    assert_eq!(u32_at(&mem, zp + 0x218) as u64, placed.addr.raw_value());
    assert_eq!(u32_at(&mem, zp + 0x21c), 5000);
    assert_eq!(placed.addr.raw_value() % 4096, 0);
    check_memory_map(&zero_page_e820(&mem), 64);
}

#[test]
fn pvh_elf_gets_start_info_modules_and_memory_map() {
    let files = Files::new();
    let image = elf(
        0x10_0000,
        &[Segment { paddr: 0x10_0000, data: vec![0xf4; 0x1000], memsz: 0x2000 }],
        Some(0x10_0010),
    );
    let kernel = files.put("pvh.elf", &image);
    let mem = guest(128);
    let cmdline = "mode=boot";
    let initrd = initrd_bytes(100_000);
    let setup =
        load_kernel(&mem, &config(&kernel, Some(files.put("initrd", &initrd)), cmdline, 128)).unwrap();
    assert_eq!(setup.protocol, BootProtocol::Pvh { start_info: GuestAddress(PVH_START_INFO_ADDR) });
    assert_eq!(setup.entry, GuestAddress(0x10_0010), "the note's entry, not e_entry");

    // struct hvm_start_info (start_info.h): magic 0, version 4, flags 8,
    // nr_modules 12, modlist_paddr 16, cmdline_paddr 24, rsdp_paddr 32,
    // memmap_paddr 40, memmap_entries 48.
    let si = PVH_START_INFO_ADDR;
    assert_eq!(u32_at(&mem, si), 0x336e_c578);
    assert_eq!(u32_at(&mem, si + 4), 1);
    assert_eq!(u32_at(&mem, si + 12), 1, "nr_modules");
    assert_eq!(u64_at(&mem, si + 24), CMDLINE_ADDR);
    assert_eq!(bytes_at(&mem, CMDLINE_ADDR, cmdline.len() + 1), b"mode=boot\0");
    assert_eq!(u64_at(&mem, si + 32), super::acpi::RSDP_ADDR, "rsdp_paddr: the ACPI tables");
    // Module list: paddr 0, size 8, cmdline_paddr 16.
    let modlist = u64_at(&mem, si + 16);
    assert_eq!(modlist, PVH_MODLIST_ADDR);
    let placed = setup.initrd.unwrap();
    assert_eq!(u64_at(&mem, modlist), placed.addr.raw_value());
    assert_eq!(u64_at(&mem, modlist + 8), initrd.len() as u64);
    assert_eq!(bytes_at(&mem, placed.addr.raw_value(), initrd.len()), initrd);
    assert!(placed.addr.raw_value() + placed.size <= 128 * MIB);
    // Memory map: 24-byte entries (addr, size, type, reserved).
    let memmap = u64_at(&mem, si + 40);
    let n = u32_at(&mem, si + 48) as u64;
    assert_eq!((memmap, n), (PVH_MEMMAP_ADDR, 4));
    let map: Vec<(u64, u64, u32)> = (0..n)
        .map(|i| {
            let at = memmap + 24 * i;
            (u64_at(&mem, at), u64_at(&mem, at + 8), u32_at(&mem, at + 16))
        })
        .collect();
    check_memory_map(&map, 128);
    // 32-bit code segment in the GDT.
    assert_eq!(u64_at(&mem, GDT_ADDR + 8), 0x00cf_9b00_0000_ffff);

    // Without an initrd: no modules.
    let mem = guest(128);
    load_kernel(&mem, &config(&kernel, None, "", 128)).unwrap();
    assert_eq!((u32_at(&mem, si + 12), u64_at(&mem, si + 16)), (0, 0));
    assert_eq!(u8_at(&mem, CMDLINE_ADDR), 0);
}

#[test]
fn initrd_respects_initrd_addr_max() {
    let files = Files::new();
    // The kernel says the initrd must end below 32 MiB.
    let spec = BzImageSpec { initrd_addr_max: 0x1ff_ffff, ..Default::default() };
    let kernel = files.put("bzImage", &spec.build());
    let mem = guest(256);
    let setup =
        load_kernel(&mem, &config(&kernel, Some(files.put("initrd", &[1; 10_000])), "", 256)).unwrap();
    let placed = setup.initrd.unwrap();
    assert!(placed.addr.raw_value() + placed.size <= 0x200_0000);
    assert!(placed.addr.raw_value() + placed.size > 0x200_0000 - 4096);
    assert_eq!(placed.addr.raw_value() % 4096, 0);
}

#[test]
fn bad_kernels_are_clear_errors() {
    let files = Files::new();
    let mem = guest(32);
    let load = |path: &Path| load_kernel(&mem, &config(path, None, "", 32)).unwrap_err();

    let err = load(&files.dir.path().join("missing"));
    assert!(matches!(err, BootError::KernelOpen { .. }), "{err}");
    let err = load(files.dir.path());
    assert!(matches!(err, BootError::KernelNotAFile { .. }), "{err}");
    let err = load(&files.put("empty", &[]));
    assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");
    let mut random = initrd_bytes(64 * 1024);
    random[0] = 0;
    let err = load(&files.put("random", &random));
    assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");

    let image = BzImageSpec::default().build();
    // Cut inside the setup header: no "HdrS" at 0x202 any more.
    let err = load(&files.put("cut-header", &image[..0x1f0]));
    assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");
    // Cut inside the setup code: the header says 5 sectors, the file has fewer.
    let err = load(&files.put("cut-setup", &image[..0x300]));
    assert!(matches!(err, BootError::KernelLoad { .. }), "{err}");
    assert!(std::error::Error::source(&err).is_some(), "the loader's error is the source");

    let old = BzImageSpec { version: 0x0209, ..Default::default() }.build();
    assert!(matches!(load(&files.put("old", &old)), BootError::KernelProtocol { version: 0x0209 }));
    let not64 = BzImageSpec { xloadflags: 0, ..Default::default() }.build();
    assert!(matches!(load(&files.put("not64", &not64)), BootError::KernelNot64Bit));
    let not_high = BzImageSpec { loadflags: 0, ..Default::default() }.build();
    assert!(matches!(load(&files.put("zimage", &not_high)), BootError::KernelLoad { .. }));
    let huge = BzImageSpec { init_size: 0x1000_0000, ..Default::default() }.build();
    assert!(matches!(load(&files.put("huge", &huge)), BootError::KernelTooLarge { .. }));

    // ELF: entry below 1 MiB, segment beyond RAM, truncated program headers.
    let low = elf(0x8000, &[Segment { paddr: 0x10_0000, data: vec![0; 16], memsz: 16 }], None);
    assert!(matches!(load(&files.put("low.elf", &low)), BootError::KernelLoad { .. }));
    let beyond = elf(0x10_0000, &[Segment { paddr: 0x4000_0000, data: vec![0; 16], memsz: 16 }], None);
    assert!(matches!(load(&files.put("beyond.elf", &beyond)), BootError::KernelLoad { .. }));
    // Past the 1 GiB the Linux 64-bit entry has identity-mapped (in a 2 GiB guest).
    let high = elf(0x3fff_f000, &[Segment { paddr: 0x3fff_f000, data: vec![0; 16], memsz: 0x2000 }], None);
    let err = load_kernel(&guest(2048), &config(&files.put("high.elf", &high), None, "", 2048)).unwrap_err();
    assert!(matches!(err, BootError::KernelTooLarge { end: 0x4000_1000, limit: 0x4000_0000 }), "{err}");
    let good = elf(0x10_0000, &[Segment { paddr: 0x10_0000, data: vec![0; 16], memsz: 16 }], None);
    assert!(matches!(load(&files.put("cut.elf", &good[..80])), BootError::KernelLoad { .. }));
}

#[test]
fn bad_configs_are_clear_errors() {
    let files = Files::new();
    let kernel = files.put("bzImage", &BzImageSpec { cmdline_size: 16, ..Default::default() }.build());
    let mem = guest(32);

    let err = load_kernel(&mem, &config(&kernel, None, "0123456789abcdefX", 32)).unwrap_err();
    assert!(matches!(err, BootError::CmdlineTooLong { len: 17, max: 16 }), "{err}");
    load_kernel(&mem, &config(&kernel, None, "0123456789abcdef", 32)).unwrap();
    let err = load_kernel(&mem, &config(&kernel, None, "a\0b", 32)).unwrap_err();
    assert!(matches!(err, BootError::CmdlineNul), "{err}");

    let mut cfg = config(&kernel, None, "", 32);
    cfg.vcpus = 0;
    assert!(matches!(load_kernel(&mem, &cfg).unwrap_err(), BootError::Vcpus { count: 0 }));
    cfg.vcpus = 255;
    assert!(matches!(load_kernel(&mem, &cfg).unwrap_err(), BootError::Vcpus { count: 255 }));
    let err = load_kernel(&mem, &config(&kernel, None, "", 64)).unwrap_err();
    assert!(matches!(err, BootError::MemoryMismatch { mib: 64 }), "{err}");
    let err = load_kernel(&mem, &config(&kernel, None, "", 1)).unwrap_err();
    assert!(matches!(err, BootError::Memory(_)), "{err}");

    // 32 MiB guest: the kernel needs up to 20 MiB, so at most 12 MiB for the initrd.
    let big = files.put("big", &vec![0; 13 << 20]);
    let err = load_kernel(&mem, &config(&kernel, Some(big), "", 32)).unwrap_err();
    assert!(
        matches!(err, BootError::InitrdTooLarge { size, available } if size == 13 << 20 && available == 12 << 20),
        "{err}"
    );
    let err = load_kernel(&mem, &config(&kernel, Some(files.dir.path().to_owned()), "", 32)).unwrap_err();
    assert!(matches!(err, BootError::InitrdNotAFile { .. }), "{err}");
    let err = load_kernel(&mem, &config(&kernel, Some(files.dir.path().join("nope")), "", 32)).unwrap_err();
    assert!(matches!(err, BootError::InitrdOpen { .. }), "{err}");
}

/// What a guest printed on COM1 and how its run ended.
struct Run {
    serial: Vec<u8>,
    end: RunEnd,
}

/// Boots `config` on KVM with its vCPUs set up by [`setup_vcpu`] and runs
/// vCPU 0: COM1 output is collected, other port and MMIO reads return all
/// ones, a write to 0xf4 (isa-debug-exit) or 0x604 (ACPI PM1a) ends the run,
/// as does a halt.
fn boot_on_kvm(test: &str, cfg: &BootConfig) -> Option<Run> {
    let hv = hypervisor_or_skip(test)?;
    let vm = hv.create_vm().unwrap();
    let mem = Arc::new(guest(cfg.memory_mib));
    let setup = load_kernel(&mem, cfg).unwrap();
    vm.add_guest_memory(mem, false).unwrap();
    let vcpus: Vec<_> = (0..u32::from(cfg.vcpus)).map(|id| vm.create_vcpu(id).unwrap()).collect();
    for (id, vcpu) in vcpus.iter().enumerate() {
        setup_vcpu(vcpu, &setup, id as u8).unwrap();
    }
    let bsp = vcpus.into_iter().next().unwrap();
    let serial = Arc::new(Mutex::new(Vec::new()));
    let out = serial.clone();
    let (_bsp, end) = run_vcpu(bsp, Duration::from_secs(60), move |exit| match exit {
        VcpuExit::IoOut(0x3f8, data) => {
            out.lock().unwrap().extend_from_slice(data);
            Flow::Continue
        }
        VcpuExit::IoOut(0xf4 | 0x604, _) => Flow::Stop,
        VcpuExit::IoIn(_, data) | VcpuExit::MmioRead(_, data) => {
            data.fill(0xff);
            Flow::Continue
        }
        VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) => Flow::Continue,
        other => panic!("unexpected exit {other:?}"),
    });
    let serial = serial.lock().unwrap().clone();
    Some(Run { serial, end })
}

#[test]
fn linux64_entry_runs_in_long_mode_with_the_zero_page() {
    // At startup_64: report "HdrS" from the zero page (RSI), again through the
    // stack, then cmd_line_ptr; exit through port 0xf4.
    let code = [
        0x8b, 0x86, 0x02, 0x02, 0x00, 0x00, // mov eax, [rsi + 0x202]
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xef, // out dx, eax
        0x50, // push rax
        0x59, // pop rcx
        0x89, 0xc8, // mov eax, ecx
        0xef, // out dx, eax
        0x8b, 0x86, 0x28, 0x02, 0x00, 0x00, // mov eax, [rsi + 0x228]
        0xef, // out dx, eax
        0x66, 0xba, 0xf4, 0x00, // mov dx, 0xf4
        0xee, // out dx, al
        0xf4, // hlt
    ];
    let files = Files::new();
    let kernel = files.put("bzImage", &BzImageSpec::default().with_startup_64(&code).build());
    let mut cfg = config(&kernel, None, "console=ttyS0", 64);
    cfg.vcpus = 2;
    let Some(run) = boot_on_kvm("linux64_entry_runs_in_long_mode_with_the_zero_page", &cfg) else { return };
    assert_eq!(run.end, RunEnd::Stopped);
    let mut expected = b"HdrSHdrS".to_vec();
    expected.extend_from_slice(&(CMDLINE_ADDR as u32).to_le_bytes());
    assert_eq!(run.serial, expected);
}

#[test]
fn pvh_entry_runs_in_protected_mode_with_start_info() {
    // At the PVH entry: report magic, cmdline_paddr and memmap_entries from
    // the start info (EBX); exit through port 0xf4.
    let code = [
        0x8b, 0x03, // mov eax, [ebx]
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xef, // out dx, eax
        0x8b, 0x43, 0x18, // mov eax, [ebx + 0x18]
        0xef, // out dx, eax
        0x8b, 0x43, 0x30, // mov eax, [ebx + 0x30]
        0xef, // out dx, eax
        0x66, 0xba, 0xf4, 0x00, // mov dx, 0xf4
        0xee, // out dx, al
        0xf4, // hlt
    ];
    let mut text = vec![0xf4; 0x100];
    text[0x10..0x10 + code.len()].copy_from_slice(&code);
    let files = Files::new();
    let image = elf(0x10_0000, &[Segment { paddr: 0x10_0000, data: text, memsz: 0x1000 }], Some(0x10_0010));
    let kernel = files.put("pvh.elf", &image);
    let cfg = config(&kernel, None, "x", 32);
    let Some(run) = boot_on_kvm("pvh_entry_runs_in_protected_mode_with_start_info", &cfg) else { return };
    assert_eq!(run.end, RunEnd::Stopped);
    let mut expected = 0x336e_c578u32.to_le_bytes().to_vec();
    expected.extend_from_slice(&(CMDLINE_ADDR as u32).to_le_bytes());
    expected.extend_from_slice(&4u32.to_le_bytes());
    assert_eq!(run.serial, expected);
}

#[test]
fn secondary_vcpus_wait_for_sipi() {
    let Some(hv) = hypervisor_or_skip("secondary_vcpus_wait_for_sipi") else { return };
    let files = Files::new();
    let kernel = files.put("bzImage", &BzImageSpec::default().build());
    let mem = Arc::new(guest(32));
    let mut cfg = config(&kernel, None, "", 32);
    cfg.vcpus = 2;
    let setup = load_kernel(&mem, &cfg).unwrap();
    let vm = hv.create_vm().unwrap();
    vm.add_guest_memory(mem, false).unwrap();
    let bsp = vm.create_vcpu(0).unwrap();
    let ap = vm.create_vcpu(1).unwrap();
    assert!(matches!(setup_vcpu(&ap, &setup, 0), Err(BootError::VcpuId { expected: 0, found: 1 })));
    setup_vcpu(&bsp, &setup, 0).unwrap();
    setup_vcpu(&ap, &setup, 1).unwrap();
    assert_eq!(bsp.get_mp_state().unwrap(), MpState::Runnable);
    assert_eq!(ap.get_mp_state().unwrap(), MpState::InitReceived);
    let regs = bsp.get_regs().unwrap();
    assert_eq!((regs.rip, regs.rsi), (0x10_0200, ZERO_PAGE_ADDR));
    let sregs = bsp.get_sregs().unwrap();
    assert_eq!((sregs.cr3, sregs.efer & 0x500, sregs.cs.l), (PML4_ADDR, 0x500, 1));
    let cpuid = ap.get_cpuid().unwrap();
    let leaf1 = cpuid.iter().find(|e| e.function == 1).unwrap();
    assert_eq!(leaf1.ebx >> 24, 1);
    assert_eq!(bsp.get_msrs(&[0x2ff]).unwrap()[0].data, 0x806, "MTRRs on, write-back");
    assert_eq!(bsp.get_fpu().unwrap().fcw, 0x37f);
    // KVM_GET/SET_FPU skip MXCSR (KVM's reset value is already 0x1f80); the
    // XSAVE area shows it (legacy region, byte 24).
    if let Some(xsave) = bsp.save_state().unwrap().xsave {
        assert_eq!(xsave[6], 0x1f80);
    }
}

#[test]
fn test_guest_boots_via_pvh() {
    let test = "test_guest_boots_via_pvh";
    let elf_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../tests/guest/build/nodeos-test-guest.elf");
    if !elf_path.is_file() {
        nodeos_types::testing::skip(test, "test guest not built (make -C tests/guest)");
        return;
    }
    let cfg = config(&elf_path, None, "mode=boot", 64);
    let Some(run) = boot_on_kvm(test, &cfg) else { return };
    let serial = String::from_utf8_lossy(&run.serial).into_owned();
    assert_ne!(run.end, RunEnd::TimedOut, "guest neither powered off nor halted; serial: {serial}");
    assert!(serial.contains("NODEOS-GUEST: boot ok"), "serial: {serial}");
    assert!(serial.contains("cmdline=\"mode=boot\""), "serial: {serial}");
    assert!(serial.contains("mem_hint=63MiB"), "RAM seen through the memory map; serial: {serial}");
}
