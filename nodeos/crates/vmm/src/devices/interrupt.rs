//! What devices see of interrupt delivery and doorbells; the KVM-backed
//! implementations live in `crate::interrupts`, test fakes in device tests.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("vector {vector} is outside the {count} vectors of this device")]
    Vector { vector: u16, count: u16 },
    #[error("interrupt routing update failed: {0}")]
    Routing(String),
    #[error("cannot signal the interrupt")]
    Signal(#[source] std::io::Error),
}

/// An MSI message as the guest programmed it in an MSI-X table entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
}

/// A device's MSI-X vectors, as seen by the device.
///
/// `configure` is called by the MSI-X table emulation when the guest writes an
/// entry or flips a mask; `trigger` by the device when it has something to say.
/// Triggering a vector that is not configured (or masked) does nothing; the
/// MSI-X layer records it as pending.
pub trait MsiVectors: Send + Sync {
    fn count(&self) -> u16;
    fn configure(&self, vector: u16, msg: Option<MsiMessage>) -> Result<(), InterruptError>;
    fn trigger(&self, vector: u16) -> Result<(), InterruptError>;
}

/// A legacy interrupt line (the serial port's IRQ 4).
pub trait IrqLine: Send + Sync {
    fn trigger(&self) -> Result<(), InterruptError>;
}

/// Doorbells without a vCPU exit: the VMM asks KVM to signal `fd` when the guest
/// writes to `addr` (an MMIO address of a virtio notify region).
pub trait IoEvents: Send + Sync {
    fn register(&self, addr: u64, fd: &EventFd) -> Result<(), InterruptError>;
    fn unregister(&self, addr: u64, fd: &EventFd) -> Result<(), InterruptError>;
}

/// Hands out a fresh set of MSI-X vectors for one device.
pub trait MsiAllocator: Send + Sync {
    fn allocate(&self, count: u16) -> Result<Arc<dyn MsiVectors>, InterruptError>;
}
