//! The data path of the distributed block layer: extents replicated across
//! the pool's nodes, fenced by generation, checksummed per block. It knows
//! nothing of the pool's metadata: whoever opens a volume hands the client
//! its layout (the control plane, `nodeos-volumes`, reads it from meta), so a
//! VM worker links this crate without the metadata store.
//!
//! # Layout
//! - `device.rs`: [`device::BlockDevice`], what front ends (NBD, virtio-blk,
//!   import) see of a volume, and its contract.
//! - `store/`: [`store::ExtentStore`], a node's local extents (`file.rs` on
//!   the data dir, `mem.rs` in memory for tests), with a conformance suite.
//! - `wire.rs`: the replica protocol (versioned, framed, pool-key handshake).
//! - `replica.rs`: a replica's rules over its store (fencing, newest-wins,
//!   checksums), sans-IO.
//! - `server.rs`: the TCP replica server every node runs.
//! - `transport.rs`: how a client reaches replicas (TCP, or in-process with
//!   fault knobs for tests).
//! - `client.rs`: [`client::VolumeClient`], quorum writes, verified reads,
//!   flush, reconnect and live repair.
//! - `repair.rs`: bring the copies of one extent to the newest block of each.
//! - `nbd.rs`: NBD export (fixed newstyle) of any [`device::BlockDevice`].
//!
//! # Safety model
//! Opening a volume for writing takes a new generation by compare-and-swap in
//! meta (`nodeos-volumes`), and the client records it on a quorum of every
//! extent's replicas before the first write; replicas refuse older
//! generations, so a stale writer can never change data. Every block carries `(generation, sequence)`: copies converge
//! on the newest version of each block, whatever order writes and repairs
//! arrive in.

pub mod client;
pub mod device;
pub mod nbd;
pub mod repair;
pub mod replica;
pub mod server;
pub mod store;
pub mod transport;
pub mod wire;
