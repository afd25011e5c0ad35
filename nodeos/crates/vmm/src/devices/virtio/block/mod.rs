//! virtio-blk.
//!
//! # Layout
//! - `device.rs`: [`Block`], the virtio device (features, config space, I/O thread).
//! - `request.rs`: one request: header, data, status; the sector range checks.
//! - `backend.rs`: the [`BlockBackend`] trait and [`FileBackend`].

pub mod backend;
pub mod device;
pub mod request;

pub use backend::{BackendError, BlockBackend, FileBackend, VolumeBackend};
pub use device::{Block, BlockCounters};
