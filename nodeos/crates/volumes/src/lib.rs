//! The control plane of the distributed block layer: volumes as records in the
//! pool's metadata, where their copies go, who may write them, and the
//! leader's controller that keeps them whole. The data path (replicas, the
//! volume client, NBD) is `nodeos-block`, which knows nothing of meta.
//!
//! # Layout
//! - `volumes.rs`: [`Volumes`], records and their changes by compare-and-swap:
//!   create, resize, snapshots, clones, delete, layouts, readers.
//! - `placement.rs`: where copies go and how placements change, sans-IO
//!   (place, replace lost copies, grow short extents, spread for balance).
//! - `writer.rs`: [`WriterSlot`], the one way to hold a volume's writer slot
//!   (a fencing generation), given back on release or drop.
//! - `controller.rs`: [`Controller`], the leader's loop: re-replication,
//!   growth, balance, repair, reclaim, scrub.
//! - `health.rs`: copy health and on-demand scrub, for the API.
//! - `exports.rs`: the pool's volumes as NBD exports.
//! - `import.rs`: an image streamed into a volume ([`import::Import`]).
//!
//! # Safety model
//! A writer takes a new generation by compare-and-swap on the volume's record
//! and its client records it on a quorum of every extent's replicas before
//! the first write; replicas refuse older generations. Placement changes are
//! committed before any copy is made or dropped, and a copy is dropped only
//! after the copies that stay are proven complete.

pub mod controller;
pub mod exports;
pub mod health;
pub mod import;
pub mod placement;
pub mod volumes;
pub mod writer;

pub use controller::{Controller, ControllerConfig, PassReport};
pub use volumes::{NewVolume, VolumeError, Volumes};
pub use writer::{Takeover, WriterSlot};
