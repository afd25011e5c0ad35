//! Pool formation: how identical nodes find each other and become one pool.
//!
//! # Layout
//! - `beacon.rs`: the signed UDP multicast beacon (wire format and socket).
//! - `decide.rs`: the sans-IO bootstrap rule: given what a node has seen, wait,
//!   join an existing pool, or initialise a new one.
//! - `formation.rs`: [`Formation`], the task that probes seeds and beacon senders,
//!   applies the rule, keeps this node's record in meta, and (on the leader)
//!   admits joiners and promotes learners while the pool has fewer than
//!   [`MAX_VOTERS`] voters.
//!
//! # Safety of bootstrap
//! A node initialises raft only when it belongs to no pool, sees no peer that
//! does, sees at least `bootstrap_expect` candidates (itself included), has the
//! lowest id among every node it has heard of, and has seen the same candidate
//! set for [`STABLE_ROUNDS`] rounds. A node that is a member keeps its raft state
//! in its data dir, so restarts never bootstrap again.

pub mod beacon;
pub mod decide;
pub mod formation;

pub use formation::{Formation, FormationConfig};

/// The pool stops promoting learners once it has this many voters.
pub const MAX_VOTERS: usize = 5;
/// Rounds the candidate set must stay unchanged before a bootstrap.
pub const STABLE_ROUNDS: u32 = 3;
