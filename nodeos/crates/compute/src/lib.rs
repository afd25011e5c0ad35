//! The node's VM supervisor.
//!
//! # Layout
//! - `spec.rs`: checks a requested [`VmSpec`](nodeos_types::records::VmSpec) against
//!   the host (kernel file, free memory, disks, MACs) before anything is recorded.
//! - `process.rs`: [`process::WorkerProcess`], one `nodeos vm-worker` child: spawn with
//!   its control socket and NIC sockets, requests with acks, events, exit.
//! - `tap.rs`: host tap devices and the frame relay between a NIC socket and a tap.
//! - `compute.rs`: [`Compute`], the handle the API calls: create, start, stop,
//!   pause, resume, delete, console; it records every VM in meta and reports a
//!   worker that dies unasked as crashed (never restarting it).
//!
//! # Ownership
//! `Compute` owns the live workers of this node. Each VM's operations are
//! serialized by a per-VM lock; a worker's exit is observed by a waiter task
//! that updates the VM record.

pub mod compute;
pub mod process;
pub mod spec;
pub mod tap;

pub use compute::{Compute, ComputeError};
