//! A KVM vCPU: running it, its register and device state, and kicking it out
//! of `KVM_RUN` from another thread.
//!
//! # Run loop contract
//! - Only the owning thread calls [`Vcpu::run`]. IN/MMIO-read exits hand out
//!   a buffer the caller fills before the next `run` (KVM completes the
//!   instruction on re-entry).
//! - [`VcpuExit::Interrupted`] means `KVM_RUN` returned without a guest exit:
//!   a signal arrived or `immediate_exit` was set. The loop checks why (pause,
//!   stop), clears the flag with `set_immediate_exit(false)` and runs again.
//! - To get a running vCPU out: [`VcpuKicker::kick`] sets `immediate_exit`
//!   (so a vCPU about to enter `KVM_RUN` leaves at once) and then signals the
//!   thread with [`kick_signal`] (so one already in the guest exits with
//!   EINTR). Setting the flag before the signal closes the race between the
//!   two. Application processors waiting for SIPI sleep inside `KVM_RUN`; the
//!   same kick wakes them.

use std::ffi::c_void;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_UNINITIALIZED, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu,
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::cpuid::{self, CpuidParams, CpuidPolicy};
use crate::vm::VmShared;
use crate::{HostCaps, HvError};

/// Why [`Vcpu::run`] returned.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// `out` to `port`: the bytes written.
    IoOut(u16, &'a [u8]),
    /// `in` from `port`: fill the buffer before the next `run`.
    IoIn(u16, &'a mut [u8]),
    /// A read from MMIO `addr` that no slot or ioeventfd covers: fill the buffer.
    MmioRead(u64, &'a mut [u8]),
    /// A write to MMIO `addr` that no slot or ioeventfd covers.
    MmioWrite(u64, &'a [u8]),
    /// `KVM_EXIT_HLT`. Not seen in nodeos: with the in-kernel LAPIC (always
    /// created) KVM handles HLT itself and a halted vCPU sleeps inside
    /// `KVM_RUN` until an interrupt; a kick returns it as `Interrupted` with
    /// [`MpState::Halted`].
    Hlt,
    /// Triple fault or similar: the guest is dead or asked for a reset.
    Shutdown,
    /// `KVM_SYSTEM_EVENT`: type (shutdown, reset, crash, ...) and data.
    SystemEvent(u32, &'a [u64]),
    /// `KVM_RUN` returned without a guest exit (signal or `immediate_exit`).
    Interrupted,
    /// The guest opened its interrupt window (only if requested).
    IrqWindowOpen,
    /// The IOAPIC needs an EOI forwarded (split irqchip only).
    IoapicEoi(u8),
    /// KVM could not emulate something; details from [`Vcpu::internal_error`].
    InternalError,
    /// VM entry failed: hardware reason and the host CPU.
    FailEntry(u64, u32),
    /// Any other exit, described for the log.
    Unhandled(String),
}

impl<'a> From<kvm_ioctls::VcpuExit<'a>> for VcpuExit<'a> {
    fn from(exit: kvm_ioctls::VcpuExit<'a>) -> Self {
        use kvm_ioctls::VcpuExit as K;
        match exit {
            K::IoOut(port, data) => Self::IoOut(port, data),
            K::IoIn(port, data) => Self::IoIn(port, data),
            K::MmioRead(addr, data) => Self::MmioRead(addr, data),
            K::MmioWrite(addr, data) => Self::MmioWrite(addr, data),
            K::Hlt => Self::Hlt,
            K::Shutdown => Self::Shutdown,
            K::SystemEvent(kind, data) => Self::SystemEvent(kind, data),
            K::Intr => Self::Interrupted,
            K::IrqWindowOpen => Self::IrqWindowOpen,
            K::IoapicEoi(vector) => Self::IoapicEoi(vector),
            K::InternalError => Self::InternalError,
            K::FailEntry(reason, cpu) => Self::FailEntry(reason, cpu),
            other => Self::Unhandled(format!("{other:?}")),
        }
    }
}

/// `kvm_run.internal` after [`VcpuExit::InternalError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalError {
    /// `KVM_INTERNAL_ERROR_*` (1 = emulation failure).
    pub suberror: u32,
    pub data: Vec<u64>,
}

/// One model-specific register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// The MSRs [`Vcpu::save_state`] saves (those KVM refuses on this host are
/// skipped): the syscall/sysenter set, TSC, MISC_ENABLE, PAT, MTRR default
/// type, TSC adjust/deadline and the KVM paravirtual MSRs (kvmclock, async
/// page faults, steal time, PV EOI). EFER travels in `kvm_sregs`.
pub const SAVED_MSRS: &[u32] = &[
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0xc000_0080, // EFER
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK (FMASK)
    0xc000_0102, // KERNEL_GS_BASE
    0x10,        // IA32_TSC
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0x2ff,       // IA32_MTRR_DEF_TYPE
    0x3b,        // IA32_TSC_ADJUST
    0x6e0,       // IA32_TSC_DEADLINE
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
    0x4b56_4d03, // MSR_KVM_STEAL_TIME
    0x4b56_4d04, // MSR_KVM_PV_EOI_EN
];

/// Offset of the LVT LINT0 register in the LAPIC register page.
pub const APIC_LVT_LINT0: usize = 0x350;
/// Offset of the LVT LINT1 register.
pub const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery mode (bits 10:8) NMI.
pub const APIC_MODE_NMI: u32 = 0b100;
/// LVT delivery mode ExtINT: the interrupt comes from the 8259 PIC.
pub const APIC_MODE_EXTINT: u32 = 0b111;

/// Reads the 32-bit LAPIC register at byte offset `reg`.
pub fn lapic_read(lapic: &kvm_lapic_state, reg: usize) -> u32 {
    let b = |i: usize| lapic.regs[reg + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// Writes the 32-bit LAPIC register at byte offset `reg`.
pub fn lapic_write(lapic: &mut kvm_lapic_state, reg: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[reg + i] = byte as std::os::raw::c_char;
    }
}

/// LINT0 = ExtINT (the PIC's output, through which a guest without IOAPIC
/// setup gets the timer) and LINT1 = NMI, as a PC BIOS leaves them; other
/// LVT bits (mask, trigger) are kept.
pub fn lapic_set_lint_defaults(lapic: &mut kvm_lapic_state) {
    for (reg, mode) in [(APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)] {
        let value = (lapic_read(lapic, reg) & !0x700) | (mode << 8);
        lapic_write(lapic, reg, value);
    }
}

/// A vCPU's multiprocessing state (`KVM_{GET,SET}_MP_STATE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MpState {
    Runnable,
    /// An AP that has not received INIT yet.
    Uninitialized,
    /// INIT received: waiting for a SIPI (where a PC's APs are after reset).
    InitReceived,
    Halted,
    SipiReceived,
    Other(u32),
}

impl MpState {
    fn to_kvm(self) -> kvm_mp_state {
        let mp_state = match self {
            Self::Runnable => KVM_MP_STATE_RUNNABLE,
            Self::Uninitialized => KVM_MP_STATE_UNINITIALIZED,
            Self::InitReceived => KVM_MP_STATE_INIT_RECEIVED,
            Self::Halted => KVM_MP_STATE_HALTED,
            Self::SipiReceived => KVM_MP_STATE_SIPI_RECEIVED,
            Self::Other(n) => n,
        };
        kvm_mp_state { mp_state }
    }

    fn from_kvm(state: kvm_mp_state) -> Self {
        match state.mp_state {
            KVM_MP_STATE_RUNNABLE => Self::Runnable,
            KVM_MP_STATE_UNINITIALIZED => Self::Uninitialized,
            KVM_MP_STATE_INIT_RECEIVED => Self::InitReceived,
            KVM_MP_STATE_HALTED => Self::Halted,
            KVM_MP_STATE_SIPI_RECEIVED => Self::SipiReceived,
            n => Self::Other(n),
        }
    }
}

/// The legacy FPU/SSE state (`kvm_fpu`), in a serializable form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<kvm_fpu> for FpuState {
    fn from(f: kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<FpuState> for kvm_fpu {
    fn from(f: FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything needed to recreate a vCPU elsewhere (snapshot, migration).
///
/// Save with the vCPU stopped (out of `KVM_RUN`, not to run again until the
/// state is used). Restore into a fresh vCPU with the same id, created on a VM
/// whose memory and irqchip state are restored too. The kvm structs
/// serialize as their raw bytes (kvm-bindings `serde` feature): a state is
/// only portable between hosts with the same struct layouts, which KVM's ABI
/// keeps stable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// The 4 KiB legacy `kvm_xsave` region, if KVM has `KVM_CAP_XSAVE`.
    pub xsave: Option<Vec<u32>>,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: Option<kvm_debugregs>,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<MsrEntry>,
    pub vcpu_events: kvm_vcpu_events,
}

impl VcpuState {
    /// A 32-bit LAPIC register at `offset` in the register page.
    fn lapic_reg(&self, offset: usize) -> u32 {
        let b = |i: usize| self.lapic.regs.get(offset + i).map_or(0, |&v| v as u8);
        u32::from_le_bytes([b(0), b(1), b(2), b(3)])
    }

    /// The highest vector set in the 256-bit LAPIC register array at `offset`
    /// (ISR 0x100, TMR 0x180, IRR 0x200), if any.
    fn lapic_highest(&self, offset: usize) -> Option<u32> {
        (0..8u32).rev().find_map(|i| {
            let word = self.lapic_reg(offset + 0x10 * i as usize);
            (word != 0).then(|| i * 32 + 31 - word.leading_zeros())
        })
    }

    fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }

    /// One line on where the vCPU stands and what interrupts it holds, for
    /// a migration's logs.
    pub fn summary(&self) -> String {
        let hex = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:#x}"));
        let ev = &self.vcpu_events;
        format!(
            "vcpu {} mp_state {:?} rip {:#x} if {} cr8 {} | lapic tpr {:#x} isr {} irr {} lvtt {:#x} tmict {:#x} tmcct {:#x} | tsc {:?} deadline {:?} | events irq {}/{:#x} nmi {}/{} exc {}/{} shadow {}",
            self.id,
            MpState::from_kvm(self.mp_state),
            self.regs.rip,
            self.regs.rflags >> 9 & 1,
            self.sregs.cr8,
            self.lapic_reg(0x80),
            hex(self.lapic_highest(0x100)),
            hex(self.lapic_highest(0x200)),
            self.lapic_reg(0x320),
            self.lapic_reg(0x380),
            self.lapic_reg(0x390),
            self.msr(0x10),
            self.msr(0x6e0),
            ev.interrupt.injected,
            ev.interrupt.nr,
            ev.nmi.injected,
            ev.nmi.pending,
            ev.exception.injected,
            ev.exception.nr,
            ev.interrupt.shadow,
        )
    }
}

/// A vCPU, owned by the thread that runs it.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    id: u32,
    caps: Arc<HostCaps>,
    /// Keeps the VM fd and the guest memory alive while this vCPU exists;
    /// declared last so the vCPU fd closes first.
    _vm: Arc<VmShared>,
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd, id: u32, vm: Arc<VmShared>, caps: Arc<HostCaps>) -> Self {
        Self { fd, id, caps, _vm: vm }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    fn ioctl_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HvError {
        let id = self.id;
        move |source| HvError::VcpuIoctl { id, what, source }
    }

    /// Runs the guest until the next exit that needs the VMM.
    pub fn run(&mut self) -> Result<VcpuExit<'_>, HvError> {
        match self.fd.run() {
            Ok(exit) => Ok(exit.into()),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(VcpuExit::Interrupted),
            Err(e) => Err(HvError::Run(e)),
        }
    }

    /// Details of the last [`VcpuExit::InternalError`].
    pub fn internal_error(&mut self) -> InternalError {
        let run = self.fd.get_kvm_run();
        // SAFETY: every field of the `internal` member is a plain integer, so
        // any bytes are a valid value; the caller asks after an
        // `InternalError` exit, when this is the member KVM filled.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        InternalError { suberror: internal.suberror, data: internal.data[..n].to_vec() }
    }

    /// Sets or clears `kvm_run.immediate_exit` (set: the next `run` returns
    /// [`VcpuExit::Interrupted`] without entering the guest).
    pub fn set_immediate_exit(&mut self, exit: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(exit));
    }

    /// A handle other threads use to get this vCPU out of `KVM_RUN`.
    pub fn kicker(&self) -> Result<VcpuKicker, HvError> {
        Ok(VcpuKicker { run: Arc::new(KvmRunMapping::new(&self.fd, self.id)?) })
    }

    pub fn get_regs(&self) -> Result<kvm_regs, HvError> {
        self.fd.get_regs().map_err(self.ioctl_err("get_regs"))
    }

    pub fn set_regs(&self, regs: &kvm_regs) -> Result<(), HvError> {
        self.fd.set_regs(regs).map_err(self.ioctl_err("set_regs"))
    }

    pub fn get_sregs(&self) -> Result<kvm_sregs, HvError> {
        self.fd.get_sregs().map_err(self.ioctl_err("get_sregs"))
    }

    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), HvError> {
        self.fd.set_sregs(sregs).map_err(self.ioctl_err("set_sregs"))
    }

    pub fn get_fpu(&self) -> Result<kvm_fpu, HvError> {
        self.fd.get_fpu().map_err(self.ioctl_err("get_fpu"))
    }

    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), HvError> {
        self.fd.set_fpu(fpu).map_err(self.ioctl_err("set_fpu"))
    }

    /// Reads the MSRs `indices`; an MSR KVM refuses makes this an error.
    pub fn get_msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>, HvError> {
        let entries: Vec<kvm_msr_entry> =
            indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| HvError::TooManyEntries { what: "MSR list", count: indices.len() })?;
        let done = self.fd.get_msrs(&mut msrs).map_err(self.ioctl_err("get_msrs"))?;
        if done < indices.len() {
            return Err(HvError::MsrsPartial {
                id: self.id,
                done,
                wanted: indices.len(),
                first_refused: indices[done],
            });
        }
        Ok(msrs.as_slice().iter().map(|e| MsrEntry { index: e.index, data: e.data }).collect())
    }

    /// Writes MSRs; an MSR KVM refuses makes this an error (those before it are written).
    pub fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<(), HvError> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|m| kvm_msr_entry { index: m.index, data: m.data, ..Default::default() })
            .collect();
        let kvm_msrs = Msrs::from_entries(&entries)
            .map_err(|_| HvError::TooManyEntries { what: "MSR list", count: msrs.len() })?;
        let done = self.fd.set_msrs(&kvm_msrs).map_err(self.ioctl_err("set_msrs"))?;
        if done < msrs.len() {
            return Err(HvError::MsrsPartial {
                id: self.id,
                done,
                wanted: msrs.len(),
                first_refused: msrs[done].index,
            });
        }
        Ok(())
    }

    /// The [`SAVED_MSRS`] this host's KVM can read, with their values.
    fn save_msrs(&self) -> Result<Vec<MsrEntry>, HvError> {
        let mut wanted: Vec<u32> = SAVED_MSRS.to_vec();
        loop {
            match self.get_msrs(&wanted) {
                Ok(msrs) => return Ok(msrs),
                // KVM stops at the first MSR it does not know: drop it and go on.
                Err(HvError::MsrsPartial { done, .. }) => {
                    wanted.remove(done);
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn get_lapic(&self) -> Result<kvm_lapic_state, HvError> {
        self.fd.get_lapic().map_err(self.ioctl_err("get_lapic"))
    }

    pub fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<(), HvError> {
        self.fd.set_lapic(lapic).map_err(self.ioctl_err("set_lapic"))
    }

    /// Programs LINT0 as ExtINT and LINT1 as NMI, as firmware does at boot.
    pub fn set_lapic_lint_defaults(&self) -> Result<(), HvError> {
        let mut lapic = self.get_lapic()?;
        lapic_set_lint_defaults(&mut lapic);
        self.set_lapic(&lapic)
    }

    pub fn get_mp_state(&self) -> Result<MpState, HvError> {
        self.fd.get_mp_state().map(MpState::from_kvm).map_err(self.ioctl_err("get_mp_state"))
    }

    pub fn set_mp_state(&self, state: MpState) -> Result<(), HvError> {
        self.fd.set_mp_state(state.to_kvm()).map_err(self.ioctl_err("set_mp_state"))
    }

    pub fn get_vcpu_events(&self) -> Result<kvm_vcpu_events, HvError> {
        self.fd.get_vcpu_events().map_err(self.ioctl_err("get_vcpu_events"))
    }

    pub fn set_vcpu_events(&self, events: &kvm_vcpu_events) -> Result<(), HvError> {
        self.fd.set_vcpu_events(events).map_err(self.ioctl_err("set_vcpu_events"))
    }

    /// The CPUID this vCPU currently has.
    pub fn get_cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>, HvError> {
        Ok(self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.ioctl_err("get_cpuid2"))?
            .as_slice()
            .to_vec())
    }

    /// Sets the CPUID entries as given. KVM rejects a change after the vCPU first ran.
    pub fn set_cpuid_entries(&self, entries: &[kvm_cpuid_entry2]) -> Result<(), HvError> {
        let cpuid = CpuId::from_entries(entries)
            .map_err(|_| HvError::TooManyEntries { what: "CPUID", count: entries.len() })?;
        self.fd.set_cpuid2(&cpuid).map_err(self.ioctl_err("set_cpuid2"))
    }

    /// Sets the CPUID for this vCPU in a VM of `vcpu_count` vCPUs: KVM's
    /// supported leaves with this vCPU's APIC id and topology, filtered by `policy`.
    pub fn set_cpuid(&self, vcpu_count: u32, policy: &CpuidPolicy) -> Result<(), HvError> {
        let params =
            CpuidParams { apic_id: self.id, vcpu_count, tsc_deadline_timer: self.caps.tsc_deadline_timer };
        self.set_cpuid_entries(&cpuid::build(&self.caps.supported_cpuid, &params, policy))
    }

    /// Sets XCR0, the XSAVE features enabled. Needs `KVM_CAP_XCRS` (a no-op
    /// without it, where KVM keeps XCR0 itself) and the CPUID set first: KVM
    /// refuses bits the CPUID does not offer.
    pub fn set_xcr0(&self, xcr0: u64) -> Result<(), HvError> {
        if !self.caps.xcrs {
            return Ok(());
        }
        let mut xcrs = kvm_xcrs { nr_xcrs: 1, ..Default::default() };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = xcr0;
        self.fd.set_xcrs(&xcrs).map_err(self.ioctl_err("set_xcrs"))
    }

    /// The rate of this vCPU's TSC, kHz (`KVM_GET_TSC_KHZ`).
    pub fn tsc_khz(&self) -> Result<u32, HvError> {
        self.fd.get_tsc_khz().map_err(self.ioctl_err("get_tsc_khz"))
    }

    /// Captures the vCPU's state; the vCPU must not be running.
    pub fn save_state(&self) -> Result<VcpuState, HvError> {
        // MP state first: reading it makes KVM process pending INIT/SIPI into
        // the state that follows.
        let mp_state = self.fd.get_mp_state().map_err(self.ioctl_err("get_mp_state"))?;
        let regs = self.get_regs()?;
        let sregs = self.get_sregs()?;
        let fpu = self.get_fpu()?.into();
        let xsave = if self.caps.xsave {
            Some(self.fd.get_xsave().map_err(self.ioctl_err("get_xsave"))?.region.to_vec())
        } else {
            None
        };
        let xcrs =
            if self.caps.xcrs { Some(self.fd.get_xcrs().map_err(self.ioctl_err("get_xcrs"))?) } else { None };
        let debug_regs = if self.caps.debugregs {
            Some(self.fd.get_debug_regs().map_err(self.ioctl_err("get_debug_regs"))?)
        } else {
            None
        };
        let lapic = self.get_lapic()?;
        let msrs = self.save_msrs()?;
        let vcpu_events = self.get_vcpu_events()?;
        let cpuid = self.get_cpuid()?;
        Ok(VcpuState {
            id: self.id,
            cpuid,
            mp_state,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
        })
    }

    /// Loads a state saved by [`Vcpu::save_state`] into this (fresh, never run) vCPU.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), HvError> {
        // Order as KVM needs it: CPUID before anything that depends on
        // features; sregs before MSRs and xsave; events last.
        self.set_cpuid_entries(&state.cpuid)?;
        self.fd.set_mp_state(state.mp_state).map_err(self.ioctl_err("set_mp_state"))?;
        self.set_regs(&state.regs)?;
        self.set_sregs(&state.sregs)?;
        self.set_fpu(&state.fpu.into())?;
        if let Some(region) = &state.xsave {
            let mut xsave = kvm_xsave::default();
            let n = region.len().min(xsave.region.len());
            xsave.region[..n].copy_from_slice(&region[..n]);
            // SAFETY: KVM reads at most 4096 bytes here (the size of
            // `kvm_xsave`) because nodeos never asks for guest permission to
            // use dynamically enabled XSTATE features
            // (ARCH_REQ_XCOMP_GUEST_PERM), so the guest's XSTATE fits the
            // legacy buffer; `xsave` is a valid, fully initialized struct.
            unsafe { self.fd.set_xsave(&xsave) }.map_err(self.ioctl_err("set_xsave"))?;
        }
        if let Some(xcrs) = &state.xcrs {
            self.fd.set_xcrs(xcrs).map_err(self.ioctl_err("set_xcrs"))?;
        }
        if let Some(debug_regs) = &state.debug_regs {
            self.fd.set_debug_regs(debug_regs).map_err(self.ioctl_err("set_debug_regs"))?;
        }
        self.set_lapic(&state.lapic)?;
        self.set_msrs(&state.msrs)?;
        self.set_vcpu_events(&state.vcpu_events)
    }
}

/// A second mapping of a vCPU's `kvm_run` page, used only to set
/// `immediate_exit` from other threads. It holds its own reference to the
/// vCPU file (the mapping does), so it stays valid after the `Vcpu` drops.
#[derive(Debug)]
struct KvmRunMapping {
    addr: NonNull<c_void>,
    len: usize,
}

// SAFETY: the mapping is shared memory that is only accessed through an
// atomic byte store (`request_exit`); the pointer itself is never handed out.
unsafe impl Send for KvmRunMapping {}
// SAFETY: as above: concurrent `request_exit` calls are atomic stores.
unsafe impl Sync for KvmRunMapping {}

impl KvmRunMapping {
    fn new(fd: &VcpuFd, id: u32) -> Result<Self, HvError> {
        let len = std::mem::size_of::<kvm_run>();
        // SAFETY: a fresh shared mapping of the vCPU fd at offset 0 (the
        // kvm_run page, as KVM documents); we pass no address hint, so it
        // cannot clobber an existing mapping; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(HvError::MapKvmRun { id, source: std::io::Error::last_os_error() });
        }
        let addr = NonNull::new(addr)
            .ok_or_else(|| HvError::MapKvmRun { id, source: std::io::Error::other("mmap returned null") })?;
        Ok(Self { addr, len })
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        let offset = std::mem::offset_of!(kvm_run, immediate_exit);
        // SAFETY: `offset` is inside the `len` bytes mapped read-write for as
        // long as `self` lives; a u8 has no alignment requirement; all other
        // accesses to this byte are the kernel's and the vCPU thread's
        // single-byte stores, so treating it as an atomic is sound.
        unsafe { AtomicU8::from_ptr(self.addr.as_ptr().cast::<u8>().add(offset)) }
    }
}

impl Drop for KvmRunMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing else references.
        unsafe { libc::munmap(self.addr.as_ptr(), self.len) };
    }
}

/// Gets a vCPU out of `KVM_RUN` from another thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct VcpuKicker {
    run: Arc<KvmRunMapping>,
}

impl VcpuKicker {
    /// Sets `immediate_exit`: the vCPU's next `KVM_RUN` returns at once with
    /// [`VcpuExit::Interrupted`]. Does not interrupt a vCPU already in the guest.
    pub fn request_exit(&self) {
        self.run.immediate_exit().store(1, Ordering::SeqCst);
    }

    /// [`VcpuKicker::request_exit`], then sends [`kick_signal`] to `thread`
    /// (the vCPU's thread) so that a vCPU inside the guest exits too.
    pub fn kick<T>(&self, thread: &JoinHandle<T>) -> Result<(), HvError> {
        install_kick_handler()?;
        self.request_exit();
        thread.kill(kick_signal()).map_err(HvError::Kick)
    }
}

/// The signal used to kick vCPU threads (the first real-time signal).
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut c_void) {}

/// Installs the process-wide no-op handler for [`kick_signal`] (its default
/// action would kill the process). Idempotent; [`VcpuKicker::kick`] calls it.
pub fn install_kick_handler() -> Result<(), HvError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(|errno| HvError::KickSignal(kvm_ioctls::Error::new(errno)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::Vm;
    use crate::testing::{RunEnd, hypervisor_or_skip, run_vcpu};
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// Writes `code` at 0x1000 and returns a fresh vCPU in real mode about to run it.
    pub(crate) fn real_mode_vcpu(vm: &Vm, id: u32, mem: &GuestMemoryMmap, code: &[u8]) -> Vcpu {
        mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        let vcpu = vm.create_vcpu(id).unwrap();
        vcpu.set_cpuid(1, &CpuidPolicy::default()).unwrap();
        // vCPUs other than 0 start as APs waiting for INIT/SIPI.
        vcpu.set_mp_state(MpState::Runnable).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let regs = kvm_regs { rip: 0x1000, rflags: 0x2, ..Default::default() };
        vcpu.set_regs(&regs).unwrap();
        vcpu
    }

    /// Runs until the guest halts; any exit to the VMM on the way is a failure.
    pub(crate) fn run_to_halt(vcpu: Vcpu) -> Vcpu {
        let (vcpu, end) = run_vcpu(vcpu, Duration::from_secs(10), |exit| panic!("unexpected exit {exit:?}"));
        assert_eq!(end, RunEnd::Halted);
        vcpu
    }

    fn vm_with_code(hv: &crate::Hypervisor, code: &[u8]) -> (Vm, Vcpu) {
        let vm = hv.create_vm().unwrap();
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        vm.add_guest_memory(mem.clone(), false).unwrap();
        let vcpu = real_mode_vcpu(&vm, 0, &mem, code);
        (vm, vcpu)
    }

    #[test]
    fn real_mode_guest_writes_serial_then_halts() {
        let Some(hv) = hypervisor_or_skip("real_mode_guest_writes_serial_then_halts") else { return };
        // mov dx, 0x3f8 ; mov al, 'A' ; out dx, al ; hlt
        let (_vm, mut vcpu) = vm_with_code(&hv, &[0xba, 0xf8, 0x03, 0xb0, b'A', 0xee, 0xf4]);
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => assert_eq!((port, data), (0x3f8, &b"A"[..])),
            other => panic!("expected IoOut, got {other:?}"),
        }
        // With the in-kernel LAPIC, HLT does not exit: the vCPU sleeps in KVM_RUN.
        let vcpu = run_to_halt(vcpu);
        assert_eq!(vcpu.get_regs().unwrap().rip, 0x1007);
    }

    #[test]
    fn io_in_buffer_reaches_the_guest() {
        let Some(hv) = hypervisor_or_skip("io_in_buffer_reaches_the_guest") else { return };
        // mov dx, 0x3fd ; in al, dx ; out dx, al ; hlt
        let (_vm, mut vcpu) = vm_with_code(&hv, &[0xba, 0xfd, 0x03, 0xec, 0xee, 0xf4]);
        match vcpu.run().unwrap() {
            VcpuExit::IoIn(0x3fd, data) => data[0] = 0x60,
            other => panic!("expected IoIn, got {other:?}"),
        }
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => assert_eq!((port, data), (0x3fd, &[0x60u8][..])),
            other => panic!("expected IoOut, got {other:?}"),
        }
    }

    #[test]
    fn immediate_exit_and_kick_interrupt_run() {
        let Some(hv) = hypervisor_or_skip("immediate_exit_and_kick_interrupt_run") else { return };
        // spin: jmp $
        let (_vm, mut vcpu) = vm_with_code(&hv, &[0xeb, 0xfe]);
        let kicker = vcpu.kicker().unwrap();

        kicker.request_exit();
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::Interrupted));
        vcpu.set_immediate_exit(false);

        let thread = std::thread::spawn(move || {
            loop {
                if let VcpuExit::Interrupted = vcpu.run().expect("run") {
                    vcpu.set_immediate_exit(false);
                    return vcpu.get_regs().expect("regs").rip;
                }
            }
        });
        // Let the guest spin inside KVM_RUN, then kick it out.
        std::thread::sleep(std::time::Duration::from_millis(100));
        kicker.kick(&thread).unwrap();
        let rip = thread.join().unwrap();
        assert_eq!(rip, 0x1000);
    }

    #[test]
    fn lapic_lint_helper_sets_delivery_modes() {
        let mut lapic = kvm_lapic_state::default();
        lapic_write(&mut lapic, APIC_LVT_LINT0, 0x0001_0000); // masked, fixed
        lapic_write(&mut lapic, APIC_LVT_LINT1, 0x0001_0700);
        lapic_set_lint_defaults(&mut lapic);
        assert_eq!(lapic_read(&lapic, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(lapic_read(&lapic, APIC_LVT_LINT1), 0x0001_0400);
    }

    #[test]
    fn lapic_mp_state_and_cpuid_round_trip() {
        let Some(hv) = hypervisor_or_skip("lapic_mp_state_and_cpuid_round_trip") else { return };
        let vm = hv.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let ap = vm.create_vcpu(1).unwrap();
        vcpu.set_lapic_lint_defaults().unwrap();
        let lapic = vcpu.get_lapic().unwrap();
        assert_eq!((lapic_read(&lapic, APIC_LVT_LINT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_read(&lapic, APIC_LVT_LINT1) >> 8) & 7, APIC_MODE_NMI);

        assert_eq!(vcpu.get_mp_state().unwrap(), MpState::Runnable);
        ap.set_mp_state(MpState::InitReceived).unwrap();
        assert_eq!(ap.get_mp_state().unwrap(), MpState::InitReceived);

        ap.set_cpuid(2, &CpuidPolicy::default()).unwrap();
        let cpuid = ap.get_cpuid().unwrap();
        let leaf1 = cpuid.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 1, "APIC id of vCPU 1");
        assert_ne!(leaf1.ecx & crate::LEAF1_ECX_HYPERVISOR, 0);

        // XCR0 with every offered XSAVE feature; KVM then sizes 0xD.0 EBX for it,
        // which must be the size the edited CPUID gave for the whole set.
        let xcr0 = crate::xcr0_offered(&cpuid);
        ap.set_xcr0(xcr0).unwrap();
        if let Some(xcrs) = ap.save_state().unwrap().xcrs {
            assert_eq!(xcrs.xcrs[0].value, xcr0);
        }
        let sized = crate::build_cpuid(
            &hv.caps.supported_cpuid,
            &CpuidParams { apic_id: 1, vcpu_count: 2, tsc_deadline_timer: false },
            &CpuidPolicy::default(),
        );
        let ebx =
            |c: &[kvm_cpuid_entry2]| c.iter().find(|e| e.function == 0xd && e.index == 0).map(|e| e.ebx);
        assert_eq!(ebx(&ap.get_cpuid().unwrap()), ebx(&sized));
        assert!(ap.set_xcr0(xcr0 | 1 << 62).is_err(), "a feature not offered is refused");

        let msrs =
            [MsrEntry { index: 0x174, data: 0x10 }, MsrEntry { index: 0x277, data: 0x0007_0406_0007_0406 }];
        vcpu.set_msrs(&msrs).unwrap();
        assert_eq!(vcpu.get_msrs(&[0x174, 0x277]).unwrap(), msrs);
        let err = vcpu.get_msrs(&[0x174, 0xdead_beef]).unwrap_err();
        assert!(matches!(err, HvError::MsrsPartial { done: 1, first_refused: 0xdead_beef, .. }), "{err}");
    }

    #[test]
    fn state_saved_from_one_vm_restores_into_another() {
        let Some(hv) = hypervisor_or_skip("state_saved_from_one_vm_restores_into_another") else { return };
        // mov dx, 0x3f8 ; mov al, 'A' ; out dx, al ; mov al, 'B' ; out dx, al ; hlt
        let code = [0xba, 0xf8, 0x03, 0xb0, b'A', 0xee, 0xb0, b'B', 0xee, 0xf4];
        let (_vm, mut vcpu) = vm_with_code(&hv, &code);
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::IoOut(0x3f8, b"A")));
        // Complete the OUT before saving, as a pausing VMM would (immediate_exit
        // lets KVM finish the pending I/O without entering the guest).
        vcpu.set_immediate_exit(true);
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::Interrupted));
        vcpu.set_immediate_exit(false);
        let mut state = vcpu.save_state().unwrap();
        assert!(state.msrs.iter().any(|m| m.index == 0x10), "TSC saved");
        let summary = state.summary();
        assert!(
            summary.starts_with("vcpu 0 mp_state Runnable") && summary.contains("isr - irr -"),
            "{summary}"
        );
        // ISR bit 0x31 (word 1 at 0x110, bit 17), IRR bits 0x20 and 0xec.
        let mut lapic = state.lapic;
        lapic.regs[0x110 + 2] = 0x02;
        lapic.regs[0x210] = 0x01;
        lapic.regs[0x270 + 1] = 0x10;
        let saved = std::mem::replace(&mut state.lapic, lapic);
        assert!(state.summary().contains("isr 0x31 irr 0xec"), "{}", state.summary());
        state.lapic = saved;
        let json = serde_json::to_string(&state).unwrap();
        let state: VcpuState = serde_json::from_str(&json).unwrap();

        let (_vm2, mut vcpu2) = vm_with_code(&hv, &code);
        vcpu2.restore_state(&state).unwrap();
        assert_eq!(vcpu2.get_regs().unwrap().rip, state.regs.rip);
        match vcpu2.run().unwrap() {
            VcpuExit::IoOut(port, data) => assert_eq!((port, data), (0x3f8, &b"B"[..])),
            other => panic!("expected the second OUT, got {other:?}"),
        }
        run_to_halt(vcpu2);
    }
}
