//! The node's VM supervisor.
//!
//! # Layout
//! - `spec.rs`: checks a requested [`VmSpec`](nodeos_types::records::VmSpec) against
//!   the host and the VMM's rules (kernel, initramfs and command line against
//!   its memory, free memory, disks, MACs) before anything is recorded.
//! - `images.rs`: [`images::Images`], guest kernels and initramfs images stored in
//!   the pool (a record and a replicated volume each): upload with format and
//!   hash checks, delete while no VM names them, materialise for a VM's start.
//! - `records.rs`: VM records in meta, and the sans-IO verdicts on them (how a
//!   worker's end is recorded, which VMs lost their worker with the node).
//! - `process.rs`: [`process::Launcher`] (how workers come to life) and
//!   [`process::WorkerProcess`], one worker seen from the node: its control
//!   socket, requests with acks, events, exit.
//! - `seed.rs`: [`seed::Seed`], the cloud-init NoCloud seed disk (a FAT image
//!   labelled `CIDATA`) built for a VM with cloud-init data at every start.
//! - `migration.rs`: live migration between nodes, as the source and as the
//!   destination: placement, the peer calls, the commit (one compare-and-swap
//!   on the VM's record), running the VM that arrived.
//! - `ha.rs`: high availability: the leader's controller restarting `ha restart`
//!   VMs of dead nodes elsewhere (and crashed ones in place), placement, the
//!   flap guard, and how many node failures the HA VMs tolerate.
//! - `maintenance.rs`: maintenance mode: checks (raft majority, volume copies),
//!   the mark, moving every running VM off, moving raft leadership away.
//! - `removal.rs`: `nodeos node remove`: checks that nothing is lost, the
//!   node's VMs re-homed and volume copies rebuilt elsewhere, then out of raft
//!   and its id refused from then on.
//! - `upgrade.rs`: the rolling image upgrade: the leader's controller taking
//!   one node at a time through drain, staging, reboot into the new image,
//!   rejoin and maintenance exit.
//! - `tap.rs`: host tap devices and the frame relay between a NIC socket and a tap.
//! - `supervisor.rs`: [`Compute`], the handle the API calls: create, start, stop,
//!   pause, resume, delete, console; it records every VM in meta and reports a
//!   worker that dies unasked as crashed (never restarting it).
//! - `error.rs`: [`ComputeError`].
//!
//! # Ownership
//! `Compute` owns the live workers of this node. Each VM's operations are
//! serialized by a per-VM lock; a worker's exit is observed by a monitor task
//! that gives back what the worker held (writer slots, relays) and updates the
//! VM record.

pub mod error;
pub mod fencing;
pub mod ha;
pub mod images;
pub mod maintenance;
pub mod migration;
pub mod process;
pub mod records;
pub mod removal;
pub mod seed;
pub mod spec;
pub mod supervisor;
pub mod tap;
pub mod upgrade;

pub use error::ComputeError;
pub use images::{ImageError, Images};
pub use supervisor::{Compute, ComputeConfig, NicNetwork, WorkerTlsIssuer};
