//! A safe wrapper over KVM: the only crate in nodeos with KVM `unsafe`.
//!
//! # Layout
//! - `lib.rs`: [`Hypervisor`] (opens the KVM device, checks the API version and
//!   the capabilities nodeos needs, creates VMs) and [`testing`] (skip-without-KVM
//!   and a threaded run loop for tests here and in the VMM).
//! - `error.rs`: [`HvError`], one variant per failing step.
//! - `vm.rs`: [`Vm`]: in-kernel PIC/IOAPIC/PIT, memory slots (guest memory
//!   of any vm-memory dirty bitmap) and KVM's dirty log, irqfd, ioeventfd,
//!   IRQ lines, MSI routes, vCPU creation.
//! - `state.rs`: [`VmState`], the VM-wide state for snapshot and migration
//!   (PIC pair, IOAPIC, PIT, KVM clock): [`Vm::save_state`],
//!   [`Vm::restore_state`], [`Vm::get_clock`]/[`Vm::set_clock`], and the
//!   order a restore must follow.
//! - `routing.rs`: the GSI routing table (KVM's legacy defaults + MSI routes).
//! - `vcpu.rs`: [`Vcpu`]: `run` and its [`VcpuExit`], register and device
//!   state, [`VcpuState`] for save/restore, [`VcpuKicker`] to interrupt `run`
//!   from another thread.
//! - `cpuid.rs`: the CPUID a vCPU sees and the [`CpuidPolicy`] filter.
//!
//! # Ownership and ordering
//! `Hypervisor::create_vm` creates the irqchip and the PIT before returning, so
//! no vCPU can exist before them (KVM refuses `KVM_CREATE_IRQCHIP` once vCPUs
//! exist). Guest memory registered with [`Vm::add_guest_memory`] is held by an
//! `Arc` inside the VM state that every [`Vcpu`] also holds: the host mapping
//! outlives every KVM slot that points at it and every vCPU that could use it.
//! Saved state goes back VM first, vCPUs next, clock last, all before any
//! vCPU runs (see `state.rs`).
//!
//! # Threads
//! [`Vm`] is `Send + Sync` (share it as `Arc<Vm>`); a [`Vcpu`] is owned by its
//! vCPU thread (`run` takes `&mut self`); a [`VcpuKicker`] is the cloneable
//! handle other threads use to get that thread out of `KVM_RUN` (see the run
//! loop contract in `vcpu.rs`). With the in-kernel LAPIC a guest HLT never
//! exits: the vCPU sleeps in `KVM_RUN` until an interrupt or a kick.

mod cpuid;
mod error;
mod routing;
mod state;
mod vcpu;
mod vm;

use std::sync::Arc;

use kvm_bindings::{KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::{Cap, Kvm};

pub use cpuid::{
    CpuidMask, CpuidParams, CpuidPolicy, CpuidReg, LEAF_XSAVE, LEAF1_ECX_HYPERVISOR, LEAF1_ECX_TSC_DEADLINE,
    LEAF1_EDX_HTT, build as build_cpuid, cpu_model, xcr0_offered,
};
pub use error::HvError;
/// The raw KVM structures that appear in this crate's API (registers, segments, ...).
pub use kvm_bindings;
pub use routing::{FIRST_MSI_GSI, IOAPIC_PINS};
pub use state::{IOAPIC_BASE_ADDRESS, VmState};
pub use vcpu::{
    APIC_LVT_LINT0, APIC_LVT_LINT1, APIC_MODE_EXTINT, APIC_MODE_NMI, FpuState, InternalError, MpState,
    MsrEntry, SAVED_MSRS, Vcpu, VcpuExit, VcpuKicker, VcpuState, install_kick_handler, kick_signal,
    lapic_read, lapic_set_lint_defaults, lapic_write,
};
pub use vm::{DirtyBitmap, KVM_IDENTITY_MAP_ADDR, KVM_PRIVATE_END, KVM_TSS_ADDR, MemorySlot, Vm};

/// What every VM of this host shares: read once when the device is opened.
#[derive(Debug)]
pub(crate) struct HostCaps {
    pub(crate) supported_cpuid: Vec<kvm_cpuid_entry2>,
    pub(crate) tsc_deadline_timer: bool,
    pub(crate) xsave: bool,
    pub(crate) xcrs: bool,
    pub(crate) debugregs: bool,
    /// Number of GSIs the routing table may use (`KVM_CAP_IRQ_ROUTING`).
    pub(crate) max_gsi: u32,
}

/// The capabilities without which nodeos does not run a VM.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::IoeventfdNoLength, "KVM_CAP_IOEVENTFD_NO_LENGTH"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
    (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    // KVM_GET_CLOCK / KVM_SET_CLOCK, for `Vm::save_state` and `restore_state`.
    (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
];

/// An open KVM device whose API version and capabilities have been checked.
#[derive(Debug)]
pub struct Hypervisor {
    kvm: Kvm,
    caps: Arc<HostCaps>,
}

impl Hypervisor {
    /// Opens the KVM device, checks API version 12 and every capability nodeos needs.
    pub fn new() -> Result<Self, HvError> {
        let kvm = Kvm::new().map_err(HvError::Open)?;
        let found = kvm.get_api_version();
        if found != KVM_API_VERSION as i32 {
            return Err(HvError::ApiVersion { found, expected: KVM_API_VERSION as i32 });
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(HvError::MissingCapability(name));
            }
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(HvError::SupportedCpuid)?
            .as_slice()
            .to_vec();
        let max_gsi = u32::try_from(kvm.check_extension_int(Cap::IrqRouting)).unwrap_or(0);
        let caps = HostCaps {
            supported_cpuid,
            tsc_deadline_timer: kvm.check_extension(Cap::TscDeadlineTimer),
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            debugregs: kvm.check_extension(Cap::Debugregs),
            max_gsi,
        };
        Ok(Self { kvm, caps: Arc::new(caps) })
    }

    /// Whether a VM can be run here: the device opens and has everything [`Hypervisor::new`] checks.
    pub fn available() -> bool {
        Self::new().is_ok()
    }

    /// The most vCPUs one VM may have on this host.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// The CPUID leaves KVM can offer a guest, before any per-vCPU edit.
    pub fn supported_cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.caps.supported_cpuid
    }

    /// Creates a VM with the in-kernel PIC, IOAPIC and PIT (with a dummy PC
    /// speaker at port 0x61), and KVM's private TSS and identity-map pages at
    /// [`KVM_TSS_ADDR`] and [`KVM_IDENTITY_MAP_ADDR`] (the guest's e820 must
    /// reserve them).
    pub fn create_vm(&self) -> Result<Vm, HvError> {
        let fd = self.kvm.create_vm().map_err(HvError::CreateVm)?;
        Vm::new(fd, self.caps.clone())
    }
}

/// Support for tests that need the KVM device, in this crate and its users.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use super::{Hypervisor, MpState, Vcpu, VcpuExit};

    /// What the exit handler of [`run_vcpu`] wants next.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Flow {
        Continue,
        Stop,
    }

    /// How [`run_vcpu`] ended.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RunEnd {
        /// The handler returned [`Flow::Stop`].
        Stopped,
        /// The guest executed HLT and nothing can wake it: with the in-kernel
        /// LAPIC, KVM keeps a halted vCPU inside `KVM_RUN`, so this is found by
        /// kicking it and reading its MP state.
        Halted,
        TimedOut,
    }

    /// Runs `vcpu` on a thread of its own, handing every exit except
    /// [`VcpuExit::Interrupted`] to `on_exit`, until the handler stops, the
    /// guest halts, or `timeout` passes. Returns the vCPU for inspection.
    /// Panics if `KVM_RUN` fails.
    pub fn run_vcpu<F>(mut vcpu: Vcpu, timeout: Duration, mut on_exit: F) -> (Vcpu, RunEnd)
    where
        F: for<'a> FnMut(VcpuExit<'a>) -> Flow + Send + 'static,
    {
        let kicker = vcpu.kicker().expect("kvm_run mapping for the kicker");
        let give_up = Arc::new(AtomicBool::new(false));
        let thread_give_up = give_up.clone();
        let thread = std::thread::spawn(move || {
            loop {
                match vcpu.run().expect("KVM_RUN") {
                    VcpuExit::Interrupted => {
                        vcpu.set_immediate_exit(false);
                        if vcpu.get_mp_state().expect("mp state") == MpState::Halted {
                            return (vcpu, RunEnd::Halted);
                        }
                        if thread_give_up.load(Ordering::SeqCst) {
                            return (vcpu, RunEnd::TimedOut);
                        }
                    }
                    exit => {
                        if on_exit(exit) == Flow::Stop {
                            return (vcpu, RunEnd::Stopped);
                        }
                    }
                }
            }
        });
        let deadline = Instant::now() + timeout;
        let mut poll = Duration::from_millis(1);
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                give_up.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(poll);
            poll = (poll * 2).min(Duration::from_millis(50));
            if !thread.is_finished() {
                kicker.kick(&thread).expect("kick the vCPU thread");
            }
        }
        thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// The hypervisor if KVM is usable here; otherwise prints the loud
    /// `SKIPPED: <test>: no /dev/kvm` line to stderr and returns `None`, and
    /// the test should return.
    pub fn hypervisor_or_skip(test: &str) -> Option<Hypervisor> {
        match Hypervisor::new() {
            Ok(hv) => Some(hv),
            Err(e) => {
                nodeos_types::testing::skip(test, &format!("no /dev/kvm ({e})"));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypervisor_opens_and_reports_cpuid() {
        let Some(hv) = testing::hypervisor_or_skip("hypervisor_opens_and_reports_cpuid") else { return };
        assert!(Hypervisor::available());
        assert!(hv.max_vcpus() >= 1);
        assert!(hv.supported_cpuid().iter().any(|e| e.function == 1));
        assert!(hv.caps.max_gsi >= IOAPIC_PINS);
    }
}
