//! virtio-net.
//!
//! # Layout
//! - `device.rs`: [`Net`], the virtio device (features, config space, I/O thread).
//! - `backend.rs`: the [`FrameBackend`] trait and [`SeqpacketBackend`].

pub mod backend;
pub mod device;

pub use backend::{FrameBackend, NetBackendError, SeqpacketBackend};
pub use device::{Net, NetCounters};
