//! The one error type of the KVM wrapper: each variant names the step that
//! failed; the kernel's errno is the `#[source]`.

use kvm_ioctls::Error as Errno;

#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("cannot open /dev/kvm")]
    Open(#[source] Errno),
    #[error("KVM API version is {found}, this build needs {expected}")]
    ApiVersion { found: i32, expected: i32 },
    #[error("KVM lacks the capability {0} that nodeos needs")]
    MissingCapability(&'static str),
    #[error("cannot read the CPUID leaves KVM supports")]
    SupportedCpuid(#[source] Errno),
    #[error("cannot create a VM")]
    CreateVm(#[source] Errno),
    #[error("cannot set the TSS address to {addr:#x}")]
    SetTssAddress {
        addr: u64,
        #[source]
        source: Errno,
    },
    #[error("cannot set the identity map address to {addr:#x}")]
    SetIdentityMapAddress {
        addr: u64,
        #[source]
        source: Errno,
    },
    #[error("cannot create the in-kernel PIC and IOAPIC")]
    CreateIrqchip(#[source] Errno),
    #[error("cannot create the in-kernel PIT")]
    CreatePit(#[source] Errno),
    #[error("guest memory region at {guest_addr:#x} ({size:#x} bytes) cannot become a KVM slot: {reason}")]
    MemoryRegion { guest_addr: u64, size: u64, reason: &'static str },
    #[error("cannot register memory slot {slot} at {guest_addr:#x} ({size:#x} bytes)")]
    SetMemorySlot {
        slot: u32,
        guest_addr: u64,
        size: u64,
        #[source]
        source: Errno,
    },
    #[error("no memory slot {slot} with dirty logging on")]
    NoDirtyLogSlot { slot: u32 },
    #[error("cannot read the dirty log of memory slot {slot}")]
    DirtyLog {
        slot: u32,
        #[source]
        source: Errno,
    },
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot register an irqfd for GSI {gsi}")]
    RegisterIrqfd {
        gsi: u32,
        #[source]
        source: Errno,
    },
    #[error("cannot unregister the irqfd for GSI {gsi}")]
    UnregisterIrqfd {
        gsi: u32,
        #[source]
        source: Errno,
    },
    #[error("cannot register an ioeventfd at MMIO {addr:#x}")]
    RegisterIoevent {
        addr: u64,
        #[source]
        source: Errno,
    },
    #[error("cannot unregister the ioeventfd at MMIO {addr:#x}")]
    UnregisterIoevent {
        addr: u64,
        #[source]
        source: Errno,
    },
    #[error("cannot set IRQ line {irq} to {level}")]
    SetIrqLine {
        irq: u32,
        level: bool,
        #[source]
        source: Errno,
    },
    #[error("GSI {gsi} is outside the MSI range {first}..{end}")]
    GsiOutOfRange { gsi: u32, first: u32, end: u32 },
    #[error("cannot install the GSI routing table ({entries} entries)")]
    SetGsiRouting {
        entries: usize,
        #[source]
        source: Errno,
    },
    #[error("cannot create vCPU {id}")]
    CreateVcpu {
        id: u32,
        #[source]
        source: Errno,
    },
    #[error("cannot map the kvm_run page of vCPU {id} for kicking")]
    MapKvmRun {
        id: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the vCPU kick signal handler")]
    KickSignal(#[source] Errno),
    #[error("cannot send the kick signal to a vCPU thread")]
    Kick(#[source] Errno),
    #[error("KVM_RUN failed")]
    Run(#[source] Errno),
    /// A vCPU ioctl other than KVM_RUN; `what` names it (`get_regs`, `set_lapic`, ...).
    #[error("vCPU {id}: {what} failed")]
    VcpuIoctl {
        id: u32,
        what: &'static str,
        #[source]
        source: Errno,
    },
    #[error("vCPU {id}: KVM accepted only {done} of {wanted} MSRs (first refused: {first_refused:#x})")]
    MsrsPartial { id: u32, done: usize, wanted: usize, first_refused: u32 },
    #[error("{what}: too many entries ({count})")]
    TooManyEntries { what: &'static str, count: usize },
    /// `chip` is "PIC master", "PIC slave" or "IOAPIC".
    #[error("cannot read the {chip} state")]
    GetIrqchip {
        chip: &'static str,
        #[source]
        source: Errno,
    },
    #[error("cannot restore the {chip} state")]
    SetIrqchip {
        chip: &'static str,
        #[source]
        source: Errno,
    },
    #[error("cannot read the PIT state")]
    GetPit(#[source] Errno),
    #[error("cannot restore the PIT state")]
    SetPit(#[source] Errno),
    #[error("cannot read the KVM clock")]
    GetClock(#[source] Errno),
    #[error("cannot set the KVM clock to {clock_ns} ns")]
    SetClock {
        clock_ns: u64,
        #[source]
        source: Errno,
    },
    /// A saved VM state refused before any of it reached KVM.
    #[error("VM state: {field} is {found:#x}, {allowed}")]
    InvalidVmState { field: &'static str, found: u64, allowed: &'static str },
}
