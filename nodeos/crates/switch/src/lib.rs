//! The software switch: per-tenant L2 networks that span the pool over VXLAN.
//!
//! # Layout
//! - `frame.rs`: Ethernet frames as they arrive from ports (bounds-checked
//!   parsing, never a panic on a short or malformed frame).
//! - `vxlan.rs`: the RFC 7348 VXLAN header, wire-compatible with Linux.
//! - `fdb.rs`: [`fdb::Fdb`], one network's MAC learning table with aging and
//!   the forwarding decision (known port, or flood).
//! - `network.rs`: [`network::Network`], one tenant network on one node: its
//!   ports, the VTEPs of the nodes with ports on it, and where each frame goes.
//! - `packet.rs`: the IP view of a frame (addresses, protocol, ports).
//! - `arp.rs`: ARP parsing for port security, and answers for the gateway.
//! - `icmp.rs`: echo replies to pings for the gateway.
//! - `dhcp.rs`: [`dhcp::handle`], the stateless DHCPv4 server that hands each
//!   port its one lease (the message format is `nodeos-dhcp`'s).
//! - `acl.rs`: [`acl::PortFilter`], one port's security groups: stateful
//!   filtering with a bounded connection-tracking table.
//! - `switch.rs`: [`switch::SwitchHandle`], the running switch: port and
//!   VXLAN readers, port security, the frame pipeline, counters.
//! - `tap.rs`: host tap devices (tap and uplink ports).
//! - `uplink.rs`: enslaving an uplink tap to a host bridge over rtnetlink.
//!
//! The forwarding logic is sans-IO: it takes frames and the current time and
//! answers where frames go, so it is tested without sockets or taps.

pub mod acl;
pub mod arp;
pub mod dhcp;
pub mod fdb;
pub mod frame;
pub mod icmp;
pub mod network;
pub mod packet;
pub mod switch;
pub mod tap;
pub mod uplink;
pub mod vxlan;
