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

use std::net::SocketAddr;

use crate::fdb::{DEFAULT_CAPACITY, DEFAULT_MAX_AGE, Fdb, Forward};
use crate::frame;

pub use nodeos_types::PortId;

/// Where a MAC lives, from this node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    Port(PortId),
    /// A VTEP: another node's switch, or a VTEP outside the pool.
    Vtep(SocketAddr),
}

/// Where a frame goes: the caller sends the frame it handed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// To a local port.
    Port(PortId),
    /// Into the VXLAN tunnel to a VTEP.
    Vtep(SocketAddr),
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
    /// VTEPs of the other nodes with ports on this network (from the
    /// pool's records), and of the network's VTEPs outside the pool.
    vteps: BTreeMap<SocketAddr, Counters>,
}

impl Network {
    pub fn new(vni: u32) -> Self {
        Network {
            vni,
            fdb: Fdb::new(DEFAULT_MAX_AGE, DEFAULT_CAPACITY),
            ports: BTreeMap::new(),
            vteps: BTreeMap::new(),
        }
    }

    pub fn add_port(&mut self, p: PortId) {
        self.ports.entry(p).or_default();
    }

    pub fn remove_port(&mut self, p: PortId) {
        self.ports.remove(&p);
        self.fdb.forget_port(Via::Port(p));
    }

    /// Sets the VTEPs that receive this network's flooded frames and whose
    /// frames it accepts.
    pub fn set_vteps(&mut self, vteps: &BTreeSet<SocketAddr>) {
        let gone: Vec<SocketAddr> = self.vteps.keys().filter(|v| !vteps.contains(v)).copied().collect();
        for v in gone {
            self.vteps.remove(&v);
            self.fdb.forget_port(Via::Vtep(v));
        }
        for v in vteps {
            self.vteps.entry(*v).or_default();
        }
    }

    /// The VTEP a tunnel packet from `src` belongs to: the VTEP at exactly
    /// that address (another node sends from its listening port), else the
    /// one VTEP with that IP (a Linux vxlan device sends from a port it picks
    /// per flow).
    pub fn vtep_for(&self, src: SocketAddr) -> Option<SocketAddr> {
        if self.vteps.contains_key(&src) {
            return Some(src);
        }
        let mut same_ip = self.vteps.keys().filter(|v| v.ip() == src.ip());
        match (same_ip.next(), same_ip.next()) {
            (Some(v), None) => Some(*v),
            _ => None,
        }
    }

    /// Drops MACs not heard from within the table's maximum age.
    pub fn expire(&mut self, now: Instant) {
        self.fdb.expire(now);
    }

    pub fn vteps(&self) -> impl Iterator<Item = (SocketAddr, Counters)> + '_ {
        self.vteps.iter().map(|(v, c)| (*v, *c))
    }

    pub fn ports(&self) -> impl Iterator<Item = PortId> + '_ {
        self.ports.keys().copied()
    }

    /// MACs learned, and how many were refused because the table was full.
    pub fn fdb_stats(&self) -> (usize, u64) {
        (self.fdb.len(), self.fdb.refused)
    }

    pub fn port_counters(&self, p: PortId) -> Option<Counters> {
        self.ports.get(&p).copied()
    }

    pub fn vtep_counters(&self, v: SocketAddr) -> Option<Counters> {
        self.vteps.get(&v).copied()
    }

    /// A frame a local port sent.
    pub fn from_port(&mut self, from: PortId, f: &[u8], now: Instant) -> Vec<Output> {
        let Some(h) = received(self.ports.get_mut(&from), f) else { return Vec::new() };
        self.fdb.learn(h.src, Via::Port(from), now);
        let out = match self.fdb.forward(h.dst, Via::Port(from), now) {
            Forward::To(Via::Port(p)) if self.ports.contains_key(&p) => vec![Output::Port(p)],
            Forward::To(Via::Vtep(v)) if self.vteps.contains_key(&v) => vec![Output::Vtep(v)],
            Forward::To(_) | Forward::Flood => {
                let ports = self.ports.keys().filter(|p| **p != from).map(|p| Output::Port(*p));
                let vteps = self.vteps.keys().map(|v| Output::Vtep(*v));
                ports.chain(vteps).collect()
            }
            Forward::Drop => Vec::new(),
        };
        self.count_tx(&out);
        out
    }

    /// A frame that arrived in the tunnel from VTEP `from` (see [`Network::vtep_for`]).
    pub fn from_vtep(&mut self, from: SocketAddr, f: &[u8], now: Instant) -> Vec<Output> {
        let Some(h) = received(self.vteps.get_mut(&from), f) else { return Vec::new() };
        self.fdb.learn(h.src, Via::Vtep(from), now);
        let out = match self.fdb.forward(h.dst, Via::Vtep(from), now) {
            Forward::To(Via::Port(p)) if self.ports.contains_key(&p) => vec![Output::Port(p)],
            Forward::To(_) | Forward::Flood => self.ports.keys().map(|p| Output::Port(*p)).collect(),
            Forward::Drop => Vec::new(),
        };
        self.count_tx(&out);
        out
    }

    fn count_tx(&mut self, out: &[Output]) {
        for o in out {
            let c = match o {
                Output::Port(p) => self.ports.get_mut(p),
                Output::Vtep(v) => self.vteps.get_mut(v),
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
                Output::Port(p) => format!("port {}", p.0),
                Output::Vtep(v) => format!("node {}", v.port()),
            })
            .collect();
        v.sort();
        v
    }

    fn vtep(n: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], n))
    }

    fn net() -> Network {
        let mut n = Network::new(100);
        n.add_port(PortId(1));
        n.add_port(PortId(2));
        n.set_vteps(&BTreeSet::from([vtep(7), vtep(8)]));
        n
    }

    #[test]
    fn unknown_destinations_flood_to_local_ports_and_member_nodes_only() {
        let t = Instant::now();
        let mut n = net();
        let out = n.from_port(PortId(1), &frame(0xff, 1), t);
        assert_eq!(targets(&out), ["node 7", "node 8", "port 2"]);
        // Nodes without ports on the network get nothing.
        n.set_vteps(&BTreeSet::from([vtep(7)]));
        assert_eq!(targets(&n.from_port(PortId(1), &frame(0x33, 1), t)), ["node 7", "port 2"]);
    }

    #[test]
    fn learned_destinations_get_the_frame_alone() {
        let t = Instant::now();
        let mut n = net();
        n.from_vtep(vtep(8), &frame(0xff, 0x80), t);
        n.from_port(PortId(2), &frame(0xff, 2), t);
        assert_eq!(targets(&n.from_port(PortId(1), &frame(0x80, 1), t)), ["node 8"]);
        assert_eq!(targets(&n.from_port(PortId(1), &frame(2, 1), t)), ["port 2"]);
        assert!(n.from_port(PortId(2), &frame(2, 2), t).is_empty(), "no hairpin");
    }

    #[test]
    fn tunnel_frames_never_go_back_into_the_fabric() {
        let t = Instant::now();
        let mut n = net();
        let out = n.from_vtep(vtep(7), &frame(0xff, 0x70), t);
        assert_eq!(targets(&out), ["port 1", "port 2"]);
        // A frame from node 7 for a MAC learned on node 8 is not relayed.
        n.from_vtep(vtep(8), &frame(0xff, 0x80), t);
        assert_eq!(targets(&n.from_vtep(vtep(7), &frame(0x80, 0x70), t)), ["port 1", "port 2"]);
        // Frames from nodes that are not members are ignored.
        assert!(n.from_vtep(vtep(9), &frame(0xff, 0x90), t).is_empty());
    }

    #[test]
    fn malformed_frames_are_dropped_and_counted() {
        let t = Instant::now();
        let mut n = net();
        assert!(n.from_port(PortId(1), &[0; 10], t).is_empty());
        let mut group_src = frame(1, 3);
        group_src[6] = 0x01;
        assert!(n.from_vtep(vtep(7), &group_src, t).is_empty(), "group source address");
        assert_eq!(n.port_counters(PortId(1)).map(|c| c.dropped), Some(1));
        assert_eq!(n.vtep_counters(vtep(7)).map(|c| c.dropped), Some(1));
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
