//! The first CPU state: registers, segments and control registers for each
//! entry protocol, the FPU, and the MSRs a PC BIOS leaves behind.

use nodeos_hv::MsrEntry;
use nodeos_hv::kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Address, GuestAddress};

use super::gdt::{self, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use super::{BOOT_STACK_TOP, GDT_ADDR, IDT_ADDR, PML4_ADDR};

pub(super) const CR0_PE: u64 = 1 << 0;
pub(super) const CR0_ET: u64 = 1 << 4;
pub(super) const CR0_PG: u64 = 1 << 31;
pub(super) const CR4_PAE: u64 = 1 << 5;
pub(super) const EFER_LME: u64 = 1 << 8;
pub(super) const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always 1; interrupts off.
pub(super) const RFLAGS_BOOT: u64 = 0x2;

/// Linux 64-bit entry: RIP = `entry` (startup_64), RSI = zero page, a boot
/// stack (boot.rst only asks for the zero page in RSI; a stack costs nothing).
pub(super) fn linux64_regs(entry: GuestAddress, zero_page: GuestAddress) -> kvm_regs {
    kvm_regs {
        rip: entry.raw_value(),
        rsi: zero_page.raw_value(),
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rflags: RFLAGS_BOOT,
        ..Default::default()
    }
}

/// PVH entry (Xen's hvm/start_info.h): RIP = the note's entry, EBX = start info.
pub(super) fn pvh_regs(entry: GuestAddress, start_info: GuestAddress) -> kvm_regs {
    kvm_regs {
        rip: entry.raw_value(),
        rbx: start_info.raw_value(),
        rflags: RFLAGS_BOOT,
        ..Default::default()
    }
}

fn load_segments(sregs: &mut kvm_sregs, pvh: bool) {
    let table = gdt::table(pvh);
    let code = gdt::segment(table[usize::from(CODE_SELECTOR / 8)], CODE_SELECTOR / 8);
    let data = gdt::segment(table[usize::from(DATA_SELECTOR / 8)], DATA_SELECTOR / 8);
    let tss = gdt::segment(table[usize::from(TSS_SELECTOR / 8)], TSS_SELECTOR / 8);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

/// Long mode with paging on the identity tables, flat 64-bit code segment.
pub(super) fn linux64_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    load_segments(&mut sregs, false);
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// 32-bit protected mode, paging off, flat 4 GiB code and data segments.
pub(super) fn pvh_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    load_segments(&mut sregs, true);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// x87 control word 0x37f and MXCSR 0x1f80: the FNINIT / power-on defaults.
/// (KVM_SET_FPU ignores MXCSR, whose reset value in KVM is already 0x1f80;
/// it is set here for VMMs' sake of saying what the guest gets.)
pub(super) fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MISC_ENABLE bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled (bit 11), default type write-back (6).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSRs a guest finds after firmware: syscall MSRs cleared, TSC 0, fast
/// strings on, MTRRs on with write-back default (else Linux maps all RAM uncached).
pub(super) fn boot_msrs() -> Vec<MsrEntry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| MsrEntry { index, data })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux64_state() {
        let regs = linux64_regs(GuestAddress(0x10_0200), GuestAddress(0x7000));
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp, regs.rbp, regs.rflags),
            (0x10_0200, 0x7000, 0x8ff0, 0x8ff0, 2)
        );
        let s = linux64_sregs(kvm_sregs::default());
        assert_eq!(s.cr0, 0x8000_0011);
        assert_eq!((s.cr3, s.cr4, s.efer), (0x9000, 0x20, 0x500));
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db, s.cs.present), (0x8, 1, 0, 1));
        assert_eq!((s.ds.selector, s.ss.selector, s.tr.selector), (0x10, 0x10, 0x18));
        assert_eq!((s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit), (0x500, 31, 0x520, 7));
    }

    #[test]
    fn pvh_state() {
        let regs = pvh_regs(GuestAddress(0x10_0000), GuestAddress(0x6000));
        assert_eq!((regs.rip, regs.rbx, regs.rflags), (0x10_0000, 0x6000, 2));
        let s = pvh_sregs(kvm_sregs { cr4: CR4_PAE, efer: EFER_LME, ..Default::default() });
        assert_eq!((s.cr0, s.cr3, s.cr4, s.efer), (CR0_PE | CR0_ET, 0, 0, 0));
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db, s.cs.base, s.cs.limit), (0x8, 0, 1, 0, 0xffff_ffff));
        assert_eq!((s.es.selector, s.es.db, s.es.limit), (0x10, 1, 0xffff_ffff));
    }

    #[test]
    fn fpu_and_msrs() {
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
        let msrs = boot_msrs();
        assert!(msrs.contains(&MsrEntry { index: 0x2ff, data: 0x806 }));
        assert!(msrs.contains(&MsrEntry { index: 0x1a0, data: 1 }));
    }
}
