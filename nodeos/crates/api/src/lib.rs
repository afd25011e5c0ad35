//! The gRPC services every node serves.
//!
//! # Layout
//! - `pool.rs`: `PoolService` (status, nodes, watch), public.
//! - `metadata.rs`: `MetadataService`, the operator's `custom/` key space, public.
//! - `vm.rs`: `VmService`, VMs and their consoles, public.
//! - `volume.rs`: `VolumeService`, block volumes, snapshots, clones and image import, public.
//! - `image.rs`: `ImageService`, guest kernels and initramfs images in the pool, public.
//! - `network.rs`: `NetworkService`, tenant networks, ports, security groups and the
//!   switch counters of each node, public.
//! - `node.rs`: `NodeService`, power-off and reboot of a node under the image's PID 1, public.
//! - `pxe.rs`: `PxeService`, the pool's PXE settings and each node's serving state, public.
//! - `peer.rs`: `PeerService`, node to node, every message authenticated with the pool key.
//! - `proxy.rs`: answering here or handing a request to the node that owns the
//!   answer, at most once ([`proxy::route`]), with one timeout policy ([`proxy::hop_timeout`]).
//! - `error.rs`: the one place where errors become gRPC `Status`es.
//! - `server.rs`: [`serve`], one tonic server with every service, reflection and message limits.
//!
//! The services hold handles ([`nodeos_meta::MetaHandle`], [`nodeos_pool::Formation`],
//! [`nodeos_volumes::Volumes`], [`nodeos_compute::Images`], [`nodeos_network::Networks`],
//! [`nodeos_switch::switch::SwitchHandle`])
//! and never touch storage directly.

pub mod auth;
pub mod error;
pub mod guard;
pub mod image;
pub mod metadata;
pub mod network;
pub mod node;
pub mod peer;
pub mod pool;
pub mod proxy;
pub mod pxe;
pub mod server;
pub mod vm;
pub mod volume;

pub use server::{ApiConfig, serve};
