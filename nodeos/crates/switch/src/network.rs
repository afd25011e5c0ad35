//! [`Network`]: one tenant L2 network on one node — its local ports, the
//! other nodes that have ports on it, its MAC table — and where each frame
//! goes. Sans-IO: callers hand in frames and the time, and carry out the
//! [`Output`]s.
//!
//! Rules:
//! - Frames from a local port are learned, then sent to the one port or node
//!   that has the destination, or flooded to every other local port and to
//!   every node with ports on the network (never to nodes without).
//! - Frames from a tunnel are learned against that node and delivered to
//!   local ports only (split horizon: the nodes form a full mesh, so a frame
//!   is never sent back into the fabric).
//! - Malformed frames are dropped and counted on the port they came from.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use nodeos_types::NodeId;

use crate::fdb::{DEFAULT_CAPACITY, DEFAULT_MAX_AGE, Fdb, Forward};
use crate::frame;

/// A port of this node's switch (a VM NIC, a tap, an uplink).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u64);

/// Where a MAC lives, from this node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    Port(PortId),
    Node(NodeId),
}

/// One frame to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// To a local port.
    Port(PortId, Vec<u8>),
    /// Into a VXLAN tunnel to another node.
    Node(NodeId, Vec<u8>),
}

/// Frame counters of one port or tunnel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub rx: u64,
    pub tx: u64,
    /// Malformed frames, or frames for ports that are gone.
    pub dropped: u64,
}

#[derive(Debug)]
pub struct Network {
    pub vni: u32,
    fdb: Fdb<Via>,
    ports: BTreeMap<PortId, Counters>,
    /// Other nodes with ports on this network (from the pool's records).
    nodes: BTreeMap<NodeId, Counters>,
}

impl Network {
    pub fn new(vni: u32) -> Self {
        Network {
            vni,
            fdb: Fdb::new(DEFAULT_MAX_AGE, DEFAULT_CAPACITY),
            ports: BTreeMap::new(),
            nodes: BTreeMap::new(),
        }
    }

    pub fn add_port(&mut self, p: PortId) {
        self.ports.entry(p).or_default();
    }

    pub fn remove_port(&mut self, p: PortId) {
        self.ports.remove(&p);
        self.fdb.forget_port(Via::Port(p));
    }

    /// Sets the nodes that have ports on this network.
    pub fn set_nodes(&mut self, nodes: &BTreeSet<NodeId>) {
        let gone: Vec<NodeId> = self.nodes.keys().filter(|n| !nodes.contains(n)).copied().collect();
        for n in gone {
            self.nodes.remove(&n);
            self.fdb.forget_port(Via::Node(n));
        }
        for n in nodes {
            self.nodes.entry(*n).or_default();
        }
    }

    pub fn port_counters(&self, p: PortId) -> Option<Counters> {
        self.ports.get(&p).copied()
    }

    pub fn node_counters(&self, n: NodeId) -> Option<Counters> {
        self.nodes.get(&n).copied()
    }

    /// A frame a local port sent.
    pub fn from_port(&mut self, from: PortId, f: &[u8], now: Instant) -> Vec<Output> {
        let Some(h) = received(self.ports.get_mut(&from), f) else { return Vec::new() };
        self.fdb.learn(h.src, Via::Port(from), now);
        let out = match self.fdb.forward(h.dst, Via::Port(from), now) {
            Forward::To(Via::Port(p)) if self.ports.contains_key(&p) => vec![Output::Port(p, f.to_vec())],
            Forward::To(Via::Node(n)) if self.nodes.contains_key(&n) => vec![Output::Node(n, f.to_vec())],
            Forward::To(_) | Forward::Flood => {
                let ports = self.ports.keys().filter(|p| **p != from).map(|p| Output::Port(*p, f.to_vec()));
                let nodes = self.nodes.keys().map(|n| Output::Node(*n, f.to_vec()));
                ports.chain(nodes).collect()
            }
            Forward::Drop => Vec::new(),
        };
        self.count_tx(&out);
        out
    }

    /// A frame that arrived in the tunnel from node `from`.
    pub fn from_node(&mut self, from: NodeId, f: &[u8], now: Instant) -> Vec<Output> {
        let Some(h) = received(self.nodes.get_mut(&from), f) else { return Vec::new() };
        self.fdb.learn(h.src, Via::Node(from), now);
        let out = match self.fdb.forward(h.dst, Via::Node(from), now) {
            Forward::To(Via::Port(p)) if self.ports.contains_key(&p) => vec![Output::Port(p, f.to_vec())],
            Forward::To(_) | Forward::Flood => {
                self.ports.keys().map(|p| Output::Port(*p, f.to_vec())).collect()
            }
            Forward::Drop => Vec::new(),
        };
        self.count_tx(&out);
        out
    }

    fn count_tx(&mut self, out: &[Output]) {
        for o in out {
            let c = match o {
                Output::Port(p, _) => self.ports.get_mut(p),
                Output::Node(n, _) => self.nodes.get_mut(n),
            };
            if let Some(c) = c {
                c.tx += 1;
            }
        }
    }
}

/// Counts a frame on the port or tunnel it came in on and parses it; `None`
/// for unknown sources and malformed frames (counted as dropped).
fn received(counters: Option<&mut Counters>, f: &[u8]) -> Option<frame::Header> {
    let c = counters?;
    match frame::parse(f) {
        Ok(h) => {
            c.rx += 1;
            Some(h)
        }
        Err(_) => {
            c.dropped += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: u8, src: u8) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, dst, 2, 0, 0, 0, 0, src, 0x08, 0x00];
        if dst == 0xff {
            f[..6].copy_from_slice(&[0xff; 6]);
        }
        f.resize(60, 0);
        f
    }

    fn targets(out: &[Output]) -> Vec<String> {
        let mut v: Vec<String> = out
            .iter()
            .map(|o| match o {
                Output::Port(p, _) => format!("port {}", p.0),
                Output::Node(n, _) => format!("node {}", n.0),
            })
            .collect();
        v.sort();
        v
    }

    fn net() -> Network {
        let mut n = Network::new(100);
        n.add_port(PortId(1));
        n.add_port(PortId(2));
        n.set_nodes(&BTreeSet::from([NodeId(7), NodeId(8)]));
        n
    }

    #[test]
    fn unknown_destinations_flood_to_local_ports_and_member_nodes_only() {
        let t = Instant::now();
        let mut n = net();
        let out = n.from_port(PortId(1), &frame(0xff, 1), t);
        assert_eq!(targets(&out), ["node 7", "node 8", "port 2"]);
        // Nodes without ports on the network get nothing.
        n.set_nodes(&BTreeSet::from([NodeId(7)]));
        assert_eq!(targets(&n.from_port(PortId(1), &frame(0x33, 1), t)), ["node 7", "port 2"]);
    }

    #[test]
    fn learned_destinations_get_the_frame_alone() {
        let t = Instant::now();
        let mut n = net();
        n.from_node(NodeId(8), &frame(0xff, 0x80), t);
        n.from_port(PortId(2), &frame(0xff, 2), t);
        assert_eq!(targets(&n.from_port(PortId(1), &frame(0x80, 1), t)), ["node 8"]);
        assert_eq!(targets(&n.from_port(PortId(1), &frame(2, 1), t)), ["port 2"]);
        assert!(n.from_port(PortId(2), &frame(2, 2), t).is_empty(), "no hairpin");
    }

    #[test]
    fn tunnel_frames_never_go_back_into_the_fabric() {
        let t = Instant::now();
        let mut n = net();
        let out = n.from_node(NodeId(7), &frame(0xff, 0x70), t);
        assert_eq!(targets(&out), ["port 1", "port 2"]);
        // A frame from node 7 for a MAC learned on node 8 is not relayed.
        n.from_node(NodeId(8), &frame(0xff, 0x80), t);
        assert_eq!(targets(&n.from_node(NodeId(7), &frame(0x80, 0x70), t)), ["port 1", "port 2"]);
        // Frames from nodes that are not members are ignored.
        assert!(n.from_node(NodeId(9), &frame(0xff, 0x90), t).is_empty());
    }

    #[test]
    fn malformed_frames_are_dropped_and_counted() {
        let t = Instant::now();
        let mut n = net();
        assert!(n.from_port(PortId(1), &[0; 10], t).is_empty());
        let mut group_src = frame(1, 3);
        group_src[6] = 0x01;
        assert!(n.from_node(NodeId(7), &group_src, t).is_empty(), "group source address");
        assert_eq!(n.port_counters(PortId(1)).map(|c| c.dropped), Some(1));
        assert_eq!(n.node_counters(NodeId(7)).map(|c| c.dropped), Some(1));
        n.from_port(PortId(1), &frame(0xff, 1), t);
        assert_eq!(n.port_counters(PortId(2)).map(|c| c.tx), Some(1));
    }

    #[test]
    fn removed_ports_and_nodes_are_forgotten() {
        let t = Instant::now();
        let mut n = net();
        n.from_port(PortId(2), &frame(0xff, 2), t);
        n.remove_port(PortId(2));
        assert_eq!(targets(&n.from_port(PortId(1), &frame(2, 1), t)), ["node 7", "node 8"]);
    }
}
