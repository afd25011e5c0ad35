//! Pool formation: how identical nodes find each other and become one pool.
//!
//! # Layout
//! - `beacon.rs`: the signed UDP multicast beacon (wire format and socket).
//! - `discovery.rs`: the sans-IO table of what this node knows about others
//!   (answers, greetings, names, beacons, each for a bounded time), whom to
//!   greet, what to answer, and the bootstrap claim.
//! - `decide.rs`: the sans-IO bootstrap rule: given what a node has seen, wait,
//!   join an existing pool (through its leader when known), or initialise a
//!   new one.
//! - `membership.rs`: the sans-IO rules of a member: admitting a joiner or
//!   handing it to the leader, choosing learners to promote, this node's record.
//! - `pace.rs`: round lengths, timeouts, join retries, rate-limited refusal logs.
//! - `formation.rs`: [`Formation`], the task that greets seeds and known nodes,
//!   applies the rule, keeps this node's record in meta, and (on the leader)
//!   admits joiners and promotes learners while the pool has fewer than
//!   [`MAX_VOTERS`] voters. It does the IO; the modules above decide.
//!
//! # Safety of bootstrap
//! A node initialises raft only when it belongs to no pool, no node it has
//! heard of says it does, it sees at least `bootstrap_expect` candidates
//! (itself included) that answered its hello recently, it has the lowest id
//! among every node it has heard of, every node a key holder vouched for has
//! answered it recently, and the candidate set has stayed the same for
//! [`STABLE_ROUNDS`] rounds. Deciding so claims the pool in the same step:
//! from then on the node answers hellos as a member. Two bootstraps therefore
//! never share a voter, provided a bootstrap reaches its voters within a few
//! seconds (see `discovery.rs`). A node that is a member keeps its raft state
//! in its data dir, so restarts never bootstrap again.

pub mod beacon;
pub mod decide;
pub mod discovery;
pub mod formation;
pub mod membership;
pub mod pace;

pub use formation::{Formation, FormationConfig};

/// The pool stops promoting learners once it has this many voters.
pub const MAX_VOTERS: usize = 5;
/// Rounds the candidate set must stay unchanged before a bootstrap.
pub const STABLE_ROUNDS: u32 = 3;
