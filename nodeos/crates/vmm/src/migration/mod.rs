//! Live migration of a running VM to another node: iterative pre-copy over
//! one authenticated TCP stream, then a short stop-and-copy.
//!
//! # Layout
//! - `wire.rs`: the handshake and the authenticated frames.
//! - `dirty.rs`: which pages changed (KVM's log OR the VMM's own writes).
//! - `pages.rs`: guest memory through its memfd: page reads and writes, holes.
//! - `converge.rs`: the sans-IO decider: another pass, stop and copy, throttle, or abort.
//! - `send.rs`: the source's side; `receive.rs`: the destination's.
//!
//! # Protocol
//! ```text
//! source                                   destination (VM built, vCPUs stopped)
//!   handshake ───────────────────────────▶  (pool key, VM id, version)
//!   Layout ──────────────────────────────▶  same memory, vCPUs, devices, MACs?
//!   Pages/Zero ... PassDone (pass 0: all memory; zero pages as ranges)
//!   Pages/Zero ... PassDone (pass n: pages dirtied during pass n-1)
//!   [pause vCPUs, drain device I/O]
//!   Pages/Zero (last dirty pages)
//!   State ───────────────────────────────▶  restore vCPUs, irqchip, PIT, devices
//!                              ◀─────────── Restored
//!   the nodes commit the hand-over (one compare-and-swap on the VM record);
//!   committed: the destination runs, the source ends;
//!   not committed: the source resumes, the destination ends.
//! ```
//! Either side may send `Abort` with a reason instead of its next frame.
//! The destination checks every address against its guest memory and every
//! length against the frame; a bad frame ends the migration there and the
//! source keeps running.
//!
//! # Threads
//! The sender runs on a thread of its own in the source worker (the control
//! thread keeps serving, so a cancel arrives while a pass runs); the receiver
//! runs on the destination worker's main thread before the VM ever runs.

pub mod converge;
pub mod dirty;
pub mod pages;
pub mod receive;
pub mod send;
pub mod wire;

#[cfg(test)]
mod tests;

pub use converge::Budget;

/// How far a migration got, for progress reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Pre-copy pass (0: the first, all memory).
    pub pass: u32,
    /// Pages dirtied during the last pass (to send in the next).
    pub dirty_pages: u64,
    /// Bytes the last pass moved per second.
    pub rate_bytes_per_sec: u64,
    /// Time the final pass would take now, ms.
    pub expected_downtime_ms: u64,
    /// vCPU throttle in force, percent.
    pub throttle_percent: u8,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
}

/// What a finished send measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub passes: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// From the pause to the destination's `Restored`, ms (the commit and
    /// the destination's start come on top).
    pub paused_ms: u64,
    pub total_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("KVM")]
    Hv(#[from] nodeos_hv::HvError),
    #[error("the VM")]
    Vm(#[from] crate::vm::VmError),
    #[error("the VMs differ: source {source_layout}, destination {destination_layout}")]
    Layout { source_layout: String, destination_layout: String },
    #[error("page {addr:#x} is not guest RAM")]
    Address { addr: u64 },
    #[error("the VM state does not decode")]
    StateDecode(#[source] postcard::Error),
    #[error("the VM state does not encode")]
    StateEncode(#[source] postcard::Error),
    #[error("unexpected {0:?} frame")]
    Unexpected(wire::Kind),
    #[error("guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("the peer aborted: {0}")]
    PeerAborted(String),
    #[error("{0}")]
    NoConvergence(String),
    #[error("cancelled")]
    Cancelled,
}
