//! [`Fdb`]: one network's forwarding database — which port each MAC was last
//! seen on — and the forwarding decision for a frame.
//!
//! Learning happens on every frame a port sends (its source MAC); a MAC seen
//! on another port moves there (a VM migrated). Entries age out after
//! `max_age` without traffic. The table is bounded: once full, new MACs are
//! not learned (their frames are flooded) and the refusals are counted, so a
//! guest spraying source addresses cannot grow the node's memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::frame::Mac;

/// How long an entry lives without traffic (Linux bridges default to 300 s).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// Most MACs one network learns.
pub const DEFAULT_CAPACITY: usize = 16384;

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward<P> {
    /// The one port the destination was learned on.
    To(P),
    /// Every port of the network but the one it came from.
    Flood,
    /// Nowhere: the destination is on the port the frame came from.
    Drop,
}

#[derive(Debug, Clone, Copy)]
struct Entry<P> {
    port: P,
    seen: Instant,
}

/// One network's MAC table. `P` names a port (a VM port, a tap, a remote node).
#[derive(Debug)]
pub struct Fdb<P> {
    entries: HashMap<Mac, Entry<P>>,
    max_age: Duration,
    capacity: usize,
    /// MACs not learned because the table was full.
    pub refused: u64,
    /// MACs that moved from one port to another.
    pub moves: u64,
}

impl<P: Copy + Eq + Hash> Fdb<P> {
    pub fn new(max_age: Duration, capacity: usize) -> Self {
        Fdb { entries: HashMap::new(), max_age, capacity, refused: 0, moves: 0 }
    }

    /// Records that `src` was seen on `port` at `now`.
    pub fn learn(&mut self, src: Mac, port: P, now: Instant) {
        if src.is_multicast() {
            return;
        }
        if let Some(e) = self.entries.get_mut(&src) {
            if e.port != port {
                self.moves += 1;
                e.port = port;
            }
            e.seen = now;
            return;
        }
        if self.entries.len() >= self.capacity {
            self.expire(now);
            if self.entries.len() >= self.capacity {
                self.refused += 1;
                return;
            }
        }
        self.entries.insert(src, Entry { port, seen: now });
    }

    /// Where a frame for `dst` that came in on `from` goes.
    pub fn forward(&self, dst: Mac, from: P, now: Instant) -> Forward<P> {
        if dst.is_multicast() {
            return Forward::Flood;
        }
        match self.entries.get(&dst) {
            Some(e) if now.saturating_duration_since(e.seen) <= self.max_age => {
                if e.port == from {
                    Forward::Drop
                } else {
                    Forward::To(e.port)
                }
            }
            _ => Forward::Flood,
        }
    }

    /// Drops entries older than `max_age`.
    pub fn expire(&mut self, now: Instant) {
        let max = self.max_age;
        self.entries.retain(|_, e| now.saturating_duration_since(e.seen) <= max);
    }

    /// Forgets every MAC learned on `port` (the port went away).
    pub fn forget_port(&mut self, port: P) {
        self.entries.retain(|_, e| e.port != port);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn learned_macs_are_forwarded_to_their_port_and_unknown_ones_flooded() {
        let t = Instant::now();
        let mut f = Fdb::new(DEFAULT_MAX_AGE, 8);
        f.learn(mac(1), 1u32, t);
        assert_eq!(f.forward(mac(1), 2, t), Forward::To(1));
        assert_eq!(f.forward(mac(9), 2, t), Forward::Flood);
        assert_eq!(f.forward(Mac::BROADCAST, 1, t), Forward::Flood);
        assert_eq!(f.forward(mac(1), 1, t), Forward::Drop, "no hairpin");
    }

    #[test]
    fn entries_age_out_and_macs_move_with_their_vm() {
        let t = Instant::now();
        let mut f = Fdb::new(Duration::from_secs(10), 8);
        f.learn(mac(1), 1u32, t);
        assert_eq!(f.forward(mac(1), 2, t + Duration::from_secs(11)), Forward::Flood);
        f.learn(mac(1), 3, t + Duration::from_secs(12));
        assert_eq!(f.forward(mac(1), 2, t + Duration::from_secs(12)), Forward::To(3));
        assert_eq!(f.moves, 1);
        f.expire(t + Duration::from_secs(30));
        assert!(f.is_empty());
    }

    #[test]
    fn a_full_table_refuses_new_macs_instead_of_growing() {
        let t = Instant::now();
        let mut f = Fdb::new(DEFAULT_MAX_AGE, 4);
        for n in 0..10 {
            f.learn(mac(n), u32::from(n), t);
        }
        assert_eq!(f.len(), 4);
        assert_eq!(f.refused, 6);
        assert_eq!(f.forward(mac(9), 0, t), Forward::Flood);
        f.forget_port(0);
        f.learn(mac(9), 9, t);
        assert_eq!(f.forward(mac(9), 0, t), Forward::To(9));
        f.learn(Mac::BROADCAST, 1, t);
        assert_eq!(f.forward(Mac::BROADCAST, 1, t), Forward::Flood, "group addresses are never learned");
    }
}
