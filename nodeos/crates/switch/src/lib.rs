//! The software switch: per-tenant L2 networks that span the pool over VXLAN.
//!
//! # Layout
//! - `frame.rs`: Ethernet frames as they arrive from ports (bounds-checked
//!   parsing, never a panic on a short or malformed frame).
//! - `vxlan.rs`: the RFC 7348 VXLAN header, wire-compatible with Linux.
//! - `fdb.rs`: [`fdb::Fdb`], one network's MAC learning table with aging and
//!   the forwarding decision (known port, or flood).
//! - `network.rs`: [`network::Network`], one tenant network on one node: its
//!   ports, the nodes with ports on it, and where each frame goes.
//!
//! The forwarding logic is sans-IO: it takes frames and the current time and
//! answers where frames go, so it is tested without sockets or taps.

pub mod fdb;
pub mod frame;
pub mod packet;
pub mod network;
pub mod vxlan;
