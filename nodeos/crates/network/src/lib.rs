//! The pool's networks as records in meta, and the agent that makes each
//! node's switch match them.
//!
//! # Layout
//! - `networks.rs`: [`Networks`]: create, change and delete networks, ports
//!   and security groups; IPAM (one `ipam/<network>/<ip>` key per leased
//!   address, taken in the same transaction as the port). Every change is a
//!   compare-and-swap on the records it reads.
//! - `rules.rs`: the rules those changes follow (names, blocks, VNIs,
//!   addresses, MACs, rule sets) as pure functions of the records read.
//! - `agent.rs`: [`Agent`]: one per node. Watches networks, ports, security
//!   groups and nodes, builds the switch configuration this node should have
//!   (its ports, and per network the VTEPs of the other nodes with ports on
//!   it) and applies it. Level-triggered: every change re-derives the whole
//!   configuration, and a timer re-applies it, so a missed event heals.

pub mod agent;
pub mod networks;
pub mod rules;

pub use agent::Agent;
pub use networks::{NetworkError, Networks};
