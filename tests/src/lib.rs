//! Harness for black-box pool tests: real `nodeos` processes, each in its own
//! network namespace on a per-test bridge, driven only through the public
//! gRPC API (`nodeos-proto`), with faults injected from outside (kill -9,
//! SIGTERM, restart, link cut and heal).
//!
//! # Layout
//! - `env.rs`: prerequisites (root, iproute2, namespaces) and the loud
//!   `SKIPPED` line, the binary under test, cleanup of crashed runs.
//! - `netns.rs`: [`netns::TestNet`], the bridge and per-node namespaces.
//! - `node.rs`: [`node::NodeProc`], one node process, its data dir and log.
//! - `client.rs`: [`client::Client`] for one node's API, [`client::wait_until`].
//! - `tracker.rs`: [`tracker::Tracker`], observations checked against the
//!   invariants (one leader per term, acknowledged writes stay readable).
//! - `nbd.rs`: [`nbd::NbdClient`], a minimal NBD client for volume exports.
//! - `qemu.rs`: [`qemu::Lab`], QEMU machines booting the node image.
//! - `cluster.rs`: [`cluster::Cluster`], a test's nodes, faults and checks.
//!
//! A test starts with [`env::require`] and ends with [`cluster::Cluster::finish`];
//! whatever it created is removed on drop, on failure and on panic too.

pub mod client;
pub mod cluster;
pub mod env;
pub mod linux_guest;
pub mod nbd;
pub mod netns;
pub mod node;
pub mod qemu;
pub mod tracker;

pub use client::{Client, Violation, wait_until};
pub use cluster::{Cluster, Expect, Writer};
pub use env::{BuiltImage, Env, built_image, require};
pub use node::NodeSpec;
