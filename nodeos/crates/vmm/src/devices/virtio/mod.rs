//! Virtio 1.x devices behind the modern PCI transport.
//!
//! # Layout
//! - `device.rs`: the [`VirtioDevice`] trait, the [`Activation`] a device gets on
//!   DRIVER_OK, and [`VirtioInterrupt`] (used-buffer / config interrupts, ISR,
//!   NEEDS_RESET).
//! - `pci.rs`: [`VirtioPciDevice`], the modern PCI transport (one 64-bit memory BAR).
//! - `chain.rs`: descriptor chain validation and copying; the one place that reads
//!   guest-controlled descriptors.
//! - `io_thread.rs`: [`IoThread`], a device's I/O thread with its stop eventfd, and an
//!   epoll wrapper.
//! - `block/`: virtio-blk over a [`block::BlockBackend`].
//! - `net/`: virtio-net over a [`net::FrameBackend`] (a SOCK_SEQPACKET socket).
//! - `rng/`: virtio-rng, the host CSPRNG behind a [`rng::RateLimit`].
//!
//! # Threads and states
//! A device is inert until the driver sets DRIVER_OK; then it gets its queues and
//! starts one I/O thread that waits on the queue doorbells (eventfds), its
//! backend and a stop eventfd. A reset (device status 0), a new activation or
//! dropping the device stops and joins that thread; nothing else owns the queues.
//! A queue the guest broke (bad ring index, bad head) puts the device in
//! NEEDS_RESET; a bad descriptor chain only fails that request.

pub mod block;
pub mod chain;
pub mod device;
pub mod io_thread;
pub mod net;
pub mod pci;
pub mod rng;

pub use device::{ActivateError, Activation, VirtioDevice, VirtioInterrupt};
pub use io_thread::IoThread;
pub use pci::{VirtioPciDevice, VirtioPciError};

/// The device conforms to virtio 1.x (feature bit 32).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.x section 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Virtio device types.
pub const TYPE_NET: u16 = 1;
pub const TYPE_BLOCK: u16 = 2;
pub const TYPE_RNG: u16 = 4;

/// "No MSI-X vector" in `config_msix_vector` / `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;
