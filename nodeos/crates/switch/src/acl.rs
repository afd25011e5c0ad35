//! [`PortFilter`]: the security groups of one port — which IP packets the
//! port may send (egress) and be delivered (ingress) — with connection
//! tracking, so that replies need no rules.
//!
//! Semantics, as in AWS and OpenStack security groups:
//! - A port's rules are the union of its groups' rules, and rules only allow.
//!   With no rules nothing new gets in or out; replies still do.
//! - A rule matches a packet when the direction matches, the protocol does
//!   (`any` is every IP protocol; `icmp` means ICMPv6 for IPv6 packets), the
//!   remote end (the source of ingress, the destination of egress) lies in
//!   its cidr (never across address families) and, when the rule names
//!   ports, the packet is TCP or UDP to one of them.
//! - A packet a rule allows starts a tracked flow, keyed by protocol, local
//!   and remote address, local and remote port (the echo identifier for ICMP
//!   echo). Later packets of the flow pass both ways without rules. Packets a
//!   rule matches are allowed and tracked whatever their TCP flags, so
//!   connections survive a lost entry or a restart of the switch.
//! - ICMP echo replies pass only as replies to a tracked echo request. ICMP
//!   errors (unreachable, packet too big, time exceeded, parameter problem)
//!   pass by rule or, through [`PortFilter::ingress_frame`] and
//!   [`PortFilter::egress_frame`], when the header they quote belongs to a
//!   tracked flow (path MTU discovery needs them). Other ICMP types are
//!   allowed by rule only and not tracked.
//! - ICMPv6 neighbour discovery and MLD always pass (router advertisements
//!   only inward, router solicitations only outward): IPv6 cannot work
//!   without them, and address spoofing is port security's business.
//! - Non-first IPv4 fragments carry no ports: they pass rules that name no
//!   ports, or when a flow of their protocol between the same two addresses
//!   is tracked; the first fragment, which carries the ports, decides for
//!   the datagram. IPv6 packets with extension headers are "other"
//!   protocols (see `packet.rs`), which only `any` rules match.
//!
//! Flows expire after being idle for a time that depends on what was seen
//! (the `*_TIMEOUT` constants); expiry is lazy on lookup, and
//! [`PortFilter::sweep`] reclaims the memory. The table is bounded: when it
//! is full (even after reclaiming expired flows, tried at most once a
//! second) a new flow is not tracked and is counted in
//! [`FilterCounters::table_full`]. Its packet still passes if a rule allows
//! it; its replies then need rules of their own. Live flows are never
//! evicted, so a guest filling its table cannot cut other connections, and
//! cannot grow the node's memory beyond `capacity` flows.
//!
//! [`PortFilter::set_rules`] re-checks every tracked flow against the new
//! rules in the direction it started and drops those no longer allowed:
//! revoking a rule cuts the connections it admitted.
//!
//! Sans-IO: packets and the current time go in, verdicts come out. The
//! switch owns one filter per port and calls it under its state lock. No
//! operation can fail, so this module has no error type.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use nodeos_types::net::{Direction, Protocol, SecurityRule};

use crate::packet::{
    IpPacket, L4, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

/// Most flows one port tracks unless told otherwise.
pub const DEFAULT_CAPACITY: usize = 65536;
/// Idle time of a TCP flow once both ends have sent.
pub const TCP_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(3600);
/// Idle time of a TCP flow only one end has sent on (an unanswered SYN, a
/// scan): short, so a SYN flood ages out of the table quickly.
pub const TCP_UNREPLIED_TIMEOUT: Duration = Duration::from_secs(120);
/// Idle time of a TCP flow after a FIN or RST from either end.
pub const TCP_CLOSING_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle time of a UDP flow once both ends have sent.
pub const UDP_TIMEOUT: Duration = Duration::from_secs(180);
/// Idle time of a UDP flow only one end has sent on.
pub const UDP_UNREPLIED_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle time of an ICMP echo flow.
pub const ICMP_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle time of a flow of any other protocol.
pub const OTHER_TIMEOUT: Duration = Duration::from_secs(600);

/// How often a full table is swept for expired flows on the packet path: a
/// full table of live flows must not cost a scan per packet.
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Echo flows started by the port and by the remote end get different keys,
/// so an echo request never passes as a "reply" to the other side's ping.
const ECHO_FROM_LOCAL: u16 = 0;
const ECHO_FROM_REMOTE: u16 = 1;

/// What happens to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// What one port's filter has seen since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilterCounters {
    pub ingress_allowed: u64,
    pub ingress_denied: u64,
    pub egress_allowed: u64,
    pub egress_denied: u64,
    /// Flows entered into the table.
    pub flows_created: u64,
    /// New flows not tracked because the table was full.
    pub table_full: u64,
}

/// One tracked flow's identity, seen from the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: u8,
    local: IpAddr,
    remote: IpAddr,
    /// The port's TCP/UDP port, or the echo identifier.
    local_port: u16,
    /// The remote TCP/UDP port, or who sent the echo request.
    remote_port: u16,
}

impl FlowKey {
    fn pair(&self) -> HostPair {
        HostPair { proto: self.proto, local: self.local, remote: self.remote }
    }
}

/// The addresses and protocol of flows, for fragments that carry no ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct HostPair {
    proto: u8,
    local: IpAddr,
    remote: IpAddr,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    /// The direction of the packet that started the flow, the one rules are
    /// checked in when they change.
    origin: Direction,
    seen: Instant,
    /// A packet went against `origin`.
    replied: bool,
    /// A FIN or RST was seen.
    closing: bool,
}

impl Flow {
    fn timeout(&self, proto: u8) -> Duration {
        match proto {
            PROTO_TCP if self.closing => TCP_CLOSING_TIMEOUT,
            PROTO_TCP if self.replied => TCP_ESTABLISHED_TIMEOUT,
            PROTO_TCP => TCP_UNREPLIED_TIMEOUT,
            PROTO_UDP if self.replied => UDP_TIMEOUT,
            PROTO_UDP => UDP_UNREPLIED_TIMEOUT,
            // Echo flows are the only tracked ICMP.
            PROTO_ICMP | PROTO_ICMPV6 => ICMP_TIMEOUT,
            _ => OTHER_TIMEOUT,
        }
    }

    fn expired(&self, proto: u8, now: Instant) -> bool {
        now.saturating_duration_since(self.seen) >= self.timeout(proto)
    }

    fn see(&mut self, dir: Direction, tcp_flags: u8, now: Instant) {
        self.replied |= dir != self.origin;
        self.closing |= tcp_flags & (TCP_FIN | TCP_RST) != 0;
        self.seen = self.seen.max(now);
    }
}

/// What a packet is, for the filter.
enum Class {
    /// TCP, UDP, ICMP echo requests and whole packets of other protocols:
    /// tracked, started by rules.
    Flow { key: FlowKey, tcp_flags: u8 },
    /// Passes only as part of a tracked echo flow.
    EchoReply(FlowKey),
    /// ICMPv6 neighbour discovery and MLD: always passes.
    Neighbour,
    /// Passes by rule, or when it quotes a tracked flow.
    IcmpError,
    /// Other ICMP: passes by rule, not tracked.
    Untracked,
    /// A non-first IPv4 fragment: passes by rule or with a tracked flow
    /// between the same addresses (expired but unswept flows count: the
    /// fragment cannot be reassembled without a first one anyway).
    Fragment(HostPair),
}

/// What rules look at: one packet, or the packet that started a flow.
struct Probe {
    dir: Direction,
    proto: u8,
    remote: IpAddr,
    /// TCP/UDP destination port.
    dst_port: Option<u16>,
}

/// The security groups of one port and its connection-tracking table.
pub struct PortFilter {
    rules: Vec<SecurityRule>,
    flows: HashMap<FlowKey, Flow>,
    /// How many tracked flows each host pair has; kept in step with `flows`.
    pairs: HashMap<HostPair, u32>,
    capacity: usize,
    /// When a full table was last swept on the packet path.
    full_sweep: Option<Instant>,
    counters: FilterCounters,
}

impl fmt::Debug for PortFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The table can hold tens of thousands of flows: summarise it.
        f.debug_struct("PortFilter")
            .field("rules", &self.rules)
            .field("flows", &self.flows.len())
            .field("capacity", &self.capacity)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl PortFilter {
    /// A filter tracking at most [`DEFAULT_CAPACITY`] flows.
    pub fn new(rules: Vec<SecurityRule>) -> Self {
        Self::with_capacity(rules, DEFAULT_CAPACITY)
    }

    /// A filter tracking at most `capacity` flows (0 tracks none: only rules
    /// decide).
    pub fn with_capacity(rules: Vec<SecurityRule>, capacity: usize) -> Self {
        PortFilter {
            rules,
            flows: HashMap::new(),
            pairs: HashMap::new(),
            capacity,
            full_sweep: None,
            counters: FilterCounters::default(),
        }
    }

    /// Replaces the rules and drops the tracked flows they no longer allow
    /// in the direction each started (and the expired ones).
    pub fn set_rules(&mut self, rules: Vec<SecurityRule>, now: Instant) {
        self.rules = rules;
        let rules = &self.rules;
        retain_flows(&mut self.flows, &mut self.pairs, |k, f| {
            !f.expired(k.proto, now) && allowed_by(rules, &flow_probe(k, f.origin))
        });
    }

    pub fn rules(&self) -> &[SecurityRule] {
        &self.rules
    }

    /// Decides on a packet the port sends into the network. ICMP errors
    /// pass by rule only; see [`PortFilter::egress_frame`].
    pub fn egress(&mut self, p: &IpPacket, now: Instant) -> Verdict {
        self.filter(Direction::Egress, p, None, now)
    }

    /// Decides on a packet the network delivers to the port. ICMP errors
    /// pass by rule only; see [`PortFilter::ingress_frame`].
    pub fn ingress(&mut self, p: &IpPacket, now: Instant) -> Verdict {
        self.filter(Direction::Ingress, p, None, now)
    }

    /// [`PortFilter::egress`] for `p` parsed from `frame`, also passing ICMP
    /// errors about tracked flows (the quoted header is read from `frame`).
    pub fn egress_frame(&mut self, frame: &[u8], p: &IpPacket, now: Instant) -> Verdict {
        self.filter(Direction::Egress, p, Some(frame), now)
    }

    /// [`PortFilter::ingress`] for `p` parsed from `frame`, also passing ICMP
    /// errors about tracked flows (the quoted header is read from `frame`).
    pub fn ingress_frame(&mut self, frame: &[u8], p: &IpPacket, now: Instant) -> Verdict {
        self.filter(Direction::Ingress, p, Some(frame), now)
    }

    /// Drops expired flows. The switch calls this periodically; lookups
    /// ignore expired flows meanwhile.
    pub fn sweep(&mut self, now: Instant) {
        retain_flows(&mut self.flows, &mut self.pairs, |k, f| !f.expired(k.proto, now));
    }

    /// Flows in the table, including expired ones not yet swept.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    pub fn counters(&self) -> FilterCounters {
        self.counters
    }

    fn filter(&mut self, dir: Direction, p: &IpPacket, frame: Option<&[u8]>, now: Instant) -> Verdict {
        let verdict = self.decide(dir, p, frame, now);
        let c = &mut self.counters;
        let n = match (dir, verdict) {
            (Direction::Ingress, Verdict::Allow) => &mut c.ingress_allowed,
            (Direction::Ingress, Verdict::Deny) => &mut c.ingress_denied,
            (Direction::Egress, Verdict::Allow) => &mut c.egress_allowed,
            (Direction::Egress, Verdict::Deny) => &mut c.egress_denied,
        };
        *n += 1;
        verdict
    }

    fn decide(&mut self, dir: Direction, p: &IpPacket, frame: Option<&[u8]>, now: Instant) -> Verdict {
        let pass = match classify(dir, p) {
            Class::Flow { key, tcp_flags } => return self.flow(dir, p, key, tcp_flags, now),
            Class::EchoReply(key) => self.continues(dir, &key, 0, now),
            Class::Neighbour => true,
            Class::IcmpError => {
                allowed_by(&self.rules, &probe(dir, p))
                    || frame.is_some_and(|f| self.quotes_tracked_flow(dir, p, f, now))
            }
            Class::Untracked => allowed_by(&self.rules, &probe(dir, p)),
            Class::Fragment(pair) => {
                allowed_by(&self.rules, &probe(dir, p)) || self.pairs.contains_key(&pair)
            }
        };
        if pass { Verdict::Allow } else { Verdict::Deny }
    }

    /// A packet of a trackable flow: passes on a live entry, else by rule
    /// (and then starts a flow).
    fn flow(&mut self, dir: Direction, p: &IpPacket, key: FlowKey, tcp_flags: u8, now: Instant) -> Verdict {
        // A fresh SYN on a closing connection opens a new one, possibly the
        // other way round: the rules decide again.
        let syn = key.proto == PROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let stale = match self.flows.get_mut(&key) {
            Some(f) if f.expired(key.proto, now) || (syn && f.closing) => true,
            Some(f) => {
                f.see(dir, tcp_flags, now);
                return Verdict::Allow;
            }
            None => false,
        };
        if stale {
            remove_flow(&mut self.flows, &mut self.pairs, &key);
        }
        if !allowed_by(&self.rules, &probe(dir, p)) {
            return Verdict::Deny;
        }
        self.track(key, dir, tcp_flags, now);
        Verdict::Allow
    }

    /// Whether `key` is a live flow; if so, the packet counts as seen on it.
    fn continues(&mut self, dir: Direction, key: &FlowKey, tcp_flags: u8, now: Instant) -> bool {
        match self.flows.get_mut(key) {
            Some(f) if !f.expired(key.proto, now) => {
                f.see(dir, tcp_flags, now);
                true
            }
            _ => false,
        }
    }

    fn track(&mut self, key: FlowKey, dir: Direction, tcp_flags: u8, now: Instant) {
        if self.flows.len() >= self.capacity {
            let swept_lately =
                self.full_sweep.is_some_and(|t| now.saturating_duration_since(t) < FULL_SWEEP_EVERY);
            if !swept_lately {
                self.full_sweep = Some(now);
                self.sweep(now);
            }
            if self.flows.len() >= self.capacity {
                self.counters.table_full += 1;
                return;
            }
        }
        let closing = tcp_flags & (TCP_FIN | TCP_RST) != 0;
        self.flows.insert(key, Flow { origin: dir, seen: now, replied: false, closing });
        *self.pairs.entry(key.pair()).or_insert(0) += 1;
        self.counters.flows_created += 1;
    }

    /// Whether ICMP error `p` (read from `frame`) quotes a packet of a live
    /// flow, sent by the end the error goes to.
    fn quotes_tracked_flow(&self, dir: Direction, p: &IpPacket, frame: &[u8], now: Instant) -> bool {
        let Some(quoted) = quoted_packet(frame, p) else { return false };
        // The quoted packet went the other way, from the error's receiver.
        let (quoted_dir, addressed) = match dir {
            Direction::Ingress => (Direction::Egress, quoted.src == p.dst),
            Direction::Egress => (Direction::Ingress, quoted.dst == p.src),
        };
        if !addressed {
            return false;
        }
        let key = match classify(quoted_dir, &quoted) {
            Class::Flow { key, .. } | Class::EchoReply(key) => key,
            _ => return false,
        };
        self.flows.get(&key).is_some_and(|f| !f.expired(key.proto, now))
    }
}

fn retain_flows(
    flows: &mut HashMap<FlowKey, Flow>,
    pairs: &mut HashMap<HostPair, u32>,
    mut keep: impl FnMut(&FlowKey, &Flow) -> bool,
) {
    flows.retain(|k, f| {
        let kept = keep(k, f);
        if !kept {
            unpair(pairs, k);
        }
        kept
    });
}

fn remove_flow(flows: &mut HashMap<FlowKey, Flow>, pairs: &mut HashMap<HostPair, u32>, key: &FlowKey) {
    if flows.remove(key).is_some() {
        unpair(pairs, key);
    }
}

fn unpair(pairs: &mut HashMap<HostPair, u32>, key: &FlowKey) {
    let pair = key.pair();
    if let Some(n) = pairs.get_mut(&pair) {
        *n -= 1;
        if *n == 0 {
            pairs.remove(&pair);
        }
    }
}

fn icmp_proto(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { PROTO_ICMP } else { PROTO_ICMPV6 }
}

fn is_echo_request(v4: bool, ty: u8) -> bool {
    ty == if v4 { 8 } else { 128 }
}

fn is_echo_reply(v4: bool, ty: u8) -> bool {
    ty == if v4 { 0 } else { 129 }
}

/// Destination unreachable, packet too big, time exceeded, parameter problem.
fn is_icmp_error(v4: bool, ty: u8) -> bool {
    if v4 { matches!(ty, 3 | 11 | 12) } else { matches!(ty, 1..=4) }
}

/// ICMPv6 MLD (130-132, 143) and neighbour discovery (135, 136) both ways;
/// router advertisements (134) only to the port, solicitations (133) only
/// from it.
fn is_neighbour(dir: Direction, ty: u8) -> bool {
    match ty {
        130..=132 | 135 | 136 | 143 => true,
        133 => dir == Direction::Egress,
        134 => dir == Direction::Ingress,
        _ => false,
    }
}

fn classify(dir: Direction, p: &IpPacket) -> Class {
    let (local, remote) = match dir {
        Direction::Egress => (p.src, p.dst),
        Direction::Ingress => (p.dst, p.src),
    };
    let ports = |src: u16, dst: u16| match dir {
        Direction::Egress => (src, dst),
        Direction::Ingress => (dst, src),
    };
    let v4 = p.src.is_ipv4();
    let icmp = icmp_proto(p.src);
    let key = |proto, (local_port, remote_port)| FlowKey { proto, local, remote, local_port, remote_port };
    match p.l4 {
        L4::Tcp { src_port, dst_port, flags } => {
            Class::Flow { key: key(PROTO_TCP, ports(src_port, dst_port)), tcp_flags: flags }
        }
        L4::Udp { src_port, dst_port } => {
            Class::Flow { key: key(PROTO_UDP, ports(src_port, dst_port)), tcp_flags: 0 }
        }
        L4::Icmp { ty, ident: Some(ident), .. } if is_echo_request(v4, ty) => {
            let from = if dir == Direction::Egress { ECHO_FROM_LOCAL } else { ECHO_FROM_REMOTE };
            Class::Flow { key: key(icmp, (ident, from)), tcp_flags: 0 }
        }
        L4::Icmp { ty, ident: Some(ident), .. } if is_echo_reply(v4, ty) => {
            let from = if dir == Direction::Ingress { ECHO_FROM_LOCAL } else { ECHO_FROM_REMOTE };
            Class::EchoReply(key(icmp, (ident, from)))
        }
        L4::Icmp { ty, .. } if !v4 && is_neighbour(dir, ty) => Class::Neighbour,
        L4::Icmp { ty, .. } if is_icmp_error(v4, ty) => Class::IcmpError,
        L4::Icmp { .. } => Class::Untracked,
        // The parser gives these protocols a transport header unless the
        // packet is a non-first fragment.
        L4::Other { proto } if proto == PROTO_TCP || proto == PROTO_UDP || proto == icmp => {
            Class::Fragment(HostPair { proto, local, remote })
        }
        L4::Other { proto } => Class::Flow { key: key(proto, (0, 0)), tcp_flags: 0 },
    }
}

fn probe(dir: Direction, p: &IpPacket) -> Probe {
    let remote = match dir {
        Direction::Egress => p.dst,
        Direction::Ingress => p.src,
    };
    let dst_port = match p.l4 {
        L4::Tcp { dst_port, .. } | L4::Udp { dst_port, .. } => Some(dst_port),
        L4::Icmp { .. } | L4::Other { .. } => None,
    };
    Probe { dir, proto: p.proto(), remote, dst_port }
}

/// The probe of the packet that started a flow.
fn flow_probe(k: &FlowKey, origin: Direction) -> Probe {
    // Only real TCP and UDP headers start TCP and UDP flows (fragments are
    // not tracked), so these keys hold ports.
    let dst_port = match (k.proto, origin) {
        (PROTO_TCP | PROTO_UDP, Direction::Egress) => Some(k.remote_port),
        (PROTO_TCP | PROTO_UDP, Direction::Ingress) => Some(k.local_port),
        _ => None,
    };
    Probe { dir: origin, proto: k.proto, remote: k.remote, dst_port }
}

fn allowed_by(rules: &[SecurityRule], q: &Probe) -> bool {
    rules.iter().any(|r| matches(r, q))
}

fn matches(r: &SecurityRule, q: &Probe) -> bool {
    let proto = match r.protocol {
        Protocol::Any => true,
        Protocol::Tcp => q.proto == PROTO_TCP,
        Protocol::Udp => q.proto == PROTO_UDP,
        Protocol::Icmp => q.proto == icmp_proto(q.remote),
    };
    // Ports restrict a rule to TCP/UDP packets to those ports, whatever its
    // protocol says: an ill-formed `any` rule with ports fails closed.
    let ports = r.ports.is_none_or(|range| q.dst_port.is_some_and(|port| range.contains(port)));
    r.direction == q.dir && proto && ports && r.cidr.contains(q.remote)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The packet ICMP error `p` quotes: its IP header and the first 8 bytes of
/// its transport header (all RFC 792 and RFC 4443 promise), read from the
/// frame `p` was parsed from. `None` when it is not there or not IP.
fn quoted_packet(frame: &[u8], p: &IpPacket) -> Option<IpPacket> {
    let ip = frame.get(p.ip_offset..)?;
    let version = ip.first()? >> 4;
    // An ICMPv6 packet's parser found no extension headers.
    let icmp_at = match (version, p.src) {
        (4, IpAddr::V4(_)) => usize::from(ip[0] & 0x0f) * 4,
        (6, IpAddr::V6(_)) => 40,
        _ => return None,
    };
    // ICMP header: type, code, checksum, 4 bytes that depend on the type.
    let q = ip.get(icmp_at + 8..)?;
    let (src, dst, proto, transport, icmp): (IpAddr, IpAddr, u8, &[u8], u8) = match q.first()? >> 4 {
        4 => {
            let ihl = usize::from(q[0] & 0x0f) * 4;
            if ihl < 20 || be16(q, 6)? & 0x1fff != 0 {
                return None;
            }
            let src: [u8; 4] = q.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = q.get(16..20)?.try_into().ok()?;
            (Ipv4Addr::from(src).into(), Ipv4Addr::from(dst).into(), *q.get(9)?, q.get(ihl..)?, PROTO_ICMP)
        }
        6 => {
            let src: [u8; 16] = q.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = q.get(24..40)?.try_into().ok()?;
            (Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into(), *q.get(6)?, q.get(40..)?, PROTO_ICMPV6)
        }
        _ => return None,
    };
    let l4 = match proto {
        // The flags lie beyond the 8 quoted bytes; flows are looked up, not
        // changed, so none are needed.
        PROTO_TCP => L4::Tcp { src_port: be16(transport, 0)?, dst_port: be16(transport, 2)?, flags: 0 },
        PROTO_UDP => L4::Udp { src_port: be16(transport, 0)?, dst_port: be16(transport, 2)? },
        inner if inner == icmp => {
            let ty = *transport.first()?;
            let v4 = icmp == PROTO_ICMP;
            let echo = is_echo_request(v4, ty) || is_echo_reply(v4, ty);
            let ident = if echo { Some(be16(transport, 4)?) } else { None };
            L4::Icmp { ty, code: *transport.get(1)?, ident }
        }
        inner => L4::Other { proto: inner },
    };
    Some(IpPacket { src, dst, l4, ip_offset: p.ip_offset + icmp_at + 8 })
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    const SYN: u8 = TCP_SYN;
    const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
    const ACK: u8 = TCP_ACK;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rule(s: &str) -> SecurityRule {
        s.parse().unwrap()
    }

    fn rules(list: &[&str]) -> Vec<SecurityRule> {
        list.iter().map(|s| rule(s)).collect()
    }

    fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> IpPacket {
        IpPacket {
            src: ip(src),
            dst: ip(dst),
            l4: L4::Tcp { src_port: sport, dst_port: dport, flags },
            ip_offset: 14,
        }
    }

    fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> IpPacket {
        IpPacket {
            src: ip(src),
            dst: ip(dst),
            l4: L4::Udp { src_port: sport, dst_port: dport },
            ip_offset: 14,
        }
    }

    fn icmp(src: &str, dst: &str, ty: u8, ident: Option<u16>) -> IpPacket {
        IpPacket { src: ip(src), dst: ip(dst), l4: L4::Icmp { ty, code: 0, ident }, ip_offset: 14 }
    }

    fn other(src: &str, dst: &str, proto: u8) -> IpPacket {
        IpPacket { src: ip(src), dst: ip(dst), l4: L4::Other { proto }, ip_offset: 14 }
    }

    const VM: &str = "10.0.0.5";

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn ingress_is_denied_by_default() {
        let mut f = PortFilter::new(vec![]);
        let now = Instant::now();
        assert_eq!(f.ingress(&tcp("10.0.0.9", 40000, VM, 22, SYN), now), Verdict::Deny);
        assert_eq!(f.ingress(&udp("10.0.0.9", 5000, VM, 53), now), Verdict::Deny);
        assert_eq!(f.ingress(&icmp("10.0.0.9", VM, 8, Some(1)), now), Verdict::Deny);
        assert_eq!(f.egress(&tcp(VM, 40000, "10.0.0.9", 80, SYN), now), Verdict::Deny);
        assert_eq!(f.flows(), 0);
        let c = f.counters();
        assert_eq!((c.ingress_denied, c.egress_denied, c.ingress_allowed), (3, 1, 0));
    }

    #[test]
    fn ingress_rules_check_source_block_and_destination_port() {
        let mut f = PortFilter::new(rules(&["ingress tcp 22 192.168.0.0/16"]));
        let now = Instant::now();
        assert_eq!(f.ingress(&tcp("192.168.4.4", 40000, VM, 22, SYN), now), Verdict::Allow);
        assert_eq!(f.ingress(&tcp("172.16.0.1", 40000, VM, 22, SYN), now), Verdict::Deny);
        assert_eq!(f.ingress(&tcp("192.168.4.4", 40001, VM, 23, SYN), now), Verdict::Deny);
        // The rule's port is the port's own, not the client's.
        assert_eq!(f.ingress(&tcp("192.168.4.4", 22, VM, 40000, SYN), now), Verdict::Deny);
        assert_eq!(f.ingress(&udp("192.168.4.4", 40000, VM, 22), now), Verdict::Deny);
        assert_eq!(f.flows(), 1);
    }

    #[test]
    fn replies_to_allowed_egress_come_in() {
        let mut f = PortFilter::new(rules(&["egress any 0.0.0.0/0"]));
        let now = Instant::now();
        assert_eq!(f.egress(&tcp(VM, 40000, "93.184.216.34", 443, SYN), now), Verdict::Allow);
        assert_eq!(f.ingress(&tcp("93.184.216.34", 443, VM, 40000, SYN_ACK), now), Verdict::Allow);
        assert_eq!(f.egress(&tcp(VM, 40000, "93.184.216.34", 443, ACK), now), Verdict::Allow);
        // Another remote port, or another local port, is not the flow.
        assert_eq!(f.ingress(&tcp("93.184.216.34", 444, VM, 40000, ACK), now), Verdict::Deny);
        assert_eq!(f.ingress(&tcp("93.184.216.34", 443, VM, 40001, ACK), now), Verdict::Deny);
        assert_eq!(f.flows(), 1);
    }

    #[test]
    fn replies_to_allowed_ingress_go_out_without_egress_rules() {
        let mut f = PortFilter::new(rules(&["ingress tcp 22 0.0.0.0/0"]));
        let now = Instant::now();
        assert_eq!(f.ingress(&tcp("198.51.100.7", 50000, VM, 22, SYN), now), Verdict::Allow);
        assert_eq!(f.egress(&tcp(VM, 22, "198.51.100.7", 50000, SYN_ACK), now), Verdict::Allow);
        assert_eq!(f.egress(&tcp(VM, 22, "198.51.100.7", 50001, ACK), now), Verdict::Deny);
        assert_eq!(f.egress(&tcp(VM, 40000, "198.51.100.7", 22, SYN), now), Verdict::Deny);
    }

    #[test]
    fn mid_stream_packets_a_rule_matches_pass_and_are_tracked() {
        let mut f = PortFilter::new(rules(&["egress tcp 0.0.0.0/0"]));
        let now = Instant::now();
        assert_eq!(f.egress(&tcp(VM, 40000, "10.9.9.9", 5432, ACK), now), Verdict::Allow);
        assert_eq!(f.ingress(&tcp("10.9.9.9", 5432, VM, 40000, ACK), now), Verdict::Allow);
    }

    #[test]
    fn echo_replies_pass_only_for_tracked_requests() {
        let mut f = PortFilter::new(rules(&["egress icmp 0.0.0.0/0", "ingress any 10.0.0.0/8"]));
        let now = Instant::now();
        assert_eq!(f.egress(&icmp(VM, "8.8.8.8", 8, Some(7)), now), Verdict::Allow);
        assert_eq!(f.ingress(&icmp("8.8.8.8", VM, 0, Some(7)), now), Verdict::Allow);
        assert_eq!(f.ingress(&icmp("8.8.8.8", VM, 0, Some(8)), now), Verdict::Deny);
        assert_eq!(f.ingress(&icmp("8.8.4.4", VM, 0, Some(7)), now), Verdict::Deny);
        // Unsolicited replies are denied even where rules allow everything.
        assert_eq!(f.ingress(&icmp("10.0.0.9", VM, 0, Some(7)), now), Verdict::Deny);
        // The remote end's request with the same identifier is not a reply.
        assert_eq!(f.ingress(&icmp("8.8.8.8", VM, 8, Some(7)), now), Verdict::Deny);
        // A ping the rules let in is answered without an egress rule for it.
        let mut f = PortFilter::new(rules(&["ingress icmp 10.0.0.0/8"]));
        assert_eq!(f.ingress(&icmp("10.0.0.9", VM, 8, Some(3)), now), Verdict::Allow);
        assert_eq!(f.egress(&icmp(VM, "10.0.0.9", 0, Some(3)), now), Verdict::Allow);
        assert_eq!(f.egress(&icmp(VM, "10.0.0.9", 8, Some(3)), now), Verdict::Deny);
        assert_eq!(f.ingress(&icmp("10.0.0.9", VM, 0, Some(3)), now), Verdict::Deny);
        assert_eq!(f.egress(&icmp(VM, "10.0.0.9", 0, Some(3)), now + secs(31)), Verdict::Deny);
    }

    #[test]
    fn udp_flows_track_replies_and_age_faster_when_unanswered() {
        let mut f = PortFilter::new(rules(&["egress udp 53 0.0.0.0/0"]));
        let t0 = Instant::now();
        assert_eq!(f.egress(&udp(VM, 33000, "9.9.9.9", 53), t0), Verdict::Allow);
        assert_eq!(f.ingress(&udp("9.9.9.9", 53, VM, 33000), t0 + secs(29)), Verdict::Allow);
        // Answered: 180 s idle.
        assert_eq!(f.ingress(&udp("9.9.9.9", 53, VM, 33000), t0 + secs(29 + 179)), Verdict::Allow);
        assert_eq!(f.ingress(&udp("9.9.9.9", 53, VM, 33000), t0 + secs(29 + 179 + 180)), Verdict::Deny);
        // Unanswered: 30 s idle.
        assert_eq!(f.egress(&udp(VM, 33001, "9.9.9.9", 53), t0), Verdict::Allow);
        assert_eq!(f.ingress(&udp("9.9.9.9", 53, VM, 33001), t0 + secs(30)), Verdict::Deny);
        assert_eq!(f.ingress(&udp("9.9.9.9", 53, VM, 33002), t0), Verdict::Deny);
    }

    #[test]
    fn flows_expire_after_their_idle_times() {
        let mut f = PortFilter::new(rules(&["egress any 0.0.0.0/0"]));
        let t0 = Instant::now();
        let out = tcp(VM, 40000, "10.1.1.1", 80, SYN);
        let back = tcp("10.1.1.1", 80, VM, 40000, ACK);
        f.egress(&out, t0);
        assert_eq!(f.ingress(&back, t0 + secs(1)), Verdict::Allow);
        assert_eq!(f.ingress(&back, t0 + secs(1 + 3599)), Verdict::Allow);
        assert_eq!(f.ingress(&back, t0 + secs(1 + 3599 + 3600)), Verdict::Deny);
        // Unanswered TCP lasts two minutes.
        f.egress(&tcp(VM, 40001, "10.1.1.1", 80, SYN), t0);
        assert_eq!(f.ingress(&tcp("10.1.1.1", 80, VM, 40001, SYN_ACK), t0 + secs(120)), Verdict::Deny);
        f.egress(&icmp(VM, "10.1.1.1", 8, Some(1)), t0);
        assert_eq!(f.ingress(&icmp("10.1.1.1", VM, 0, Some(1)), t0 + secs(30)), Verdict::Deny);
        let gre_in = other("10.1.1.1", VM, 47);
        f.egress(&other(VM, "10.1.1.1", 47), t0);
        assert_eq!(f.ingress(&gre_in, t0 + secs(599)), Verdict::Allow);
        assert_eq!(f.ingress(&gre_in, t0 + secs(599 + 600)), Verdict::Deny);
        // Expired flows stay until swept.
        assert!(f.flows() > 0);
        f.sweep(t0 + secs(10_000));
        assert_eq!(f.flows(), 0);
    }

    #[test]
    fn fin_and_rst_shorten_a_connection_to_ten_seconds() {
        let mut f = PortFilter::new(rules(&["egress any 0.0.0.0/0"]));
        let t0 = Instant::now();
        for (port, close) in [(40000, TCP_FIN | TCP_ACK), (40001, TCP_RST)] {
            f.egress(&tcp(VM, port, "10.1.1.1", 80, SYN), t0);
            f.ingress(&tcp("10.1.1.1", 80, VM, port, SYN_ACK), t0);
            assert_eq!(f.ingress(&tcp("10.1.1.1", 80, VM, port, close), t0 + secs(1)), Verdict::Allow);
            let late = tcp("10.1.1.1", 80, VM, port, ACK);
            assert_eq!(f.ingress(&late, t0 + secs(10)), Verdict::Allow);
            assert_eq!(f.ingress(&late, t0 + secs(20)), Verdict::Deny);
        }
    }

    #[test]
    fn a_syn_on_a_closing_connection_is_a_new_connection() {
        let mut f = PortFilter::new(rules(&["egress any 0.0.0.0/0"]));
        let now = Instant::now();
        f.egress(&tcp(VM, 40000, "10.1.1.1", 80, SYN), now);
        f.ingress(&tcp("10.1.1.1", 80, VM, 40000, TCP_FIN | TCP_ACK), now);
        // The remote end reusing the pair to connect in needs an ingress rule.
        assert_eq!(f.ingress(&tcp("10.1.1.1", 80, VM, 40000, SYN), now), Verdict::Deny);
        assert_eq!(f.flows(), 0);
        assert_eq!(f.egress(&tcp(VM, 40000, "10.1.1.1", 80, SYN), now), Verdict::Allow);
        assert_eq!(f.ingress(&tcp("10.1.1.1", 80, VM, 40000, ACK), now + secs(100)), Verdict::Allow);
    }

    #[test]
    fn revoking_a_rule_cuts_its_flows_and_keeps_the_others() {
        let ssh = "ingress tcp 22 0.0.0.0/0";
        let web = "ingress tcp 80 0.0.0.0/0";
        let mut f = PortFilter::new(rules(&[ssh, web, "egress udp 0.0.0.0/0"]));
        let now = Instant::now();
        f.ingress(&tcp("10.2.2.2", 50000, VM, 22, SYN), now);
        f.ingress(&tcp("10.2.2.2", 50001, VM, 80, SYN), now);
        f.egress(&udp(VM, 33000, "10.3.3.3", 53), now);
        assert_eq!(f.flows(), 3);
        f.set_rules(rules(&[web, "egress any 0.0.0.0/0"]), now);
        assert_eq!(f.rules(), &rules(&[web, "egress any 0.0.0.0/0"])[..]);
        assert_eq!(f.flows(), 2);
        assert_eq!(f.ingress(&tcp("10.2.2.2", 50000, VM, 22, ACK), now), Verdict::Deny);
        // The reply now matches the egress rule: it passes, and is a new flow.
        assert_eq!(f.egress(&tcp(VM, 22, "10.2.2.2", 50000, ACK), now), Verdict::Allow);
        assert_eq!(f.egress(&tcp(VM, 80, "10.2.2.2", 50001, ACK), now), Verdict::Allow);
        assert_eq!(f.ingress(&udp("10.3.3.3", 53, VM, 33000), now), Verdict::Allow);
        f.set_rules(vec![], now);
        assert_eq!(f.flows(), 0);
    }

    #[test]
    fn a_full_table_refuses_new_flows_and_counts_them() {
        let mut f = PortFilter::with_capacity(rules(&["egress udp 0.0.0.0/0"]), 4);
        let t0 = Instant::now();
        for port in 1000..1010 {
            assert_eq!(f.egress(&udp(VM, port, "10.4.4.4", 53), t0), Verdict::Allow);
        }
        assert_eq!(f.flows(), 4);
        assert_eq!(f.counters().table_full, 6);
        assert_eq!(f.counters().flows_created, 4);
        // Refused flows get no replies; tracked ones do.
        assert_eq!(f.ingress(&udp("10.4.4.4", 53, VM, 1009), t0), Verdict::Deny);
        assert_eq!(f.ingress(&udp("10.4.4.4", 53, VM, 1000), t0), Verdict::Allow);
        // Expired flows make room again once swept (here by the full table).
        let later = t0 + secs(200);
        assert_eq!(f.egress(&udp(VM, 2000, "10.4.4.4", 53), later), Verdict::Allow);
        assert_eq!(f.flows(), 1);
        assert_eq!(f.ingress(&udp("10.4.4.4", 53, VM, 2000), later), Verdict::Allow);
    }

    #[test]
    fn ipv6_packets_never_match_ipv4_blocks() {
        let mut f = PortFilter::new(rules(&["ingress any 0.0.0.0/0", "egress any 0.0.0.0/0"]));
        let now = Instant::now();
        assert_eq!(f.ingress(&tcp("fd00::9", 40000, "fd00::5", 22, SYN), now), Verdict::Deny);
        assert_eq!(f.egress(&udp("fd00::5", 40000, "fd00::9", 53), now), Verdict::Deny);
        assert_eq!(f.ingress(&icmp("fd00::9", "fd00::5", 128, Some(1)), now), Verdict::Deny);
        let mut f = PortFilter::new(rules(&["ingress icmp ::/0"]));
        assert_eq!(f.ingress(&icmp("fd00::9", "fd00::5", 128, Some(1)), now), Verdict::Allow);
        assert_eq!(f.egress(&icmp("fd00::5", "fd00::9", 129, Some(1)), now), Verdict::Allow);
        assert_eq!(f.ingress(&icmp("10.0.0.9", VM, 8, Some(1)), now), Verdict::Deny);
    }

    #[test]
    fn neighbour_discovery_always_passes() {
        let mut f = PortFilter::new(vec![]);
        let now = Instant::now();
        assert_eq!(f.ingress(&icmp("fe80::1", "ff02::1:ff00:5", 135, None), now), Verdict::Allow);
        assert_eq!(f.egress(&icmp("fe80::5", "fe80::1", 136, None), now), Verdict::Allow);
        assert_eq!(f.ingress(&icmp("fe80::1", "ff02::1", 134, None), now), Verdict::Allow);
        assert_eq!(f.egress(&icmp("fe80::5", "ff02::2", 133, None), now), Verdict::Allow);
        // A guest cannot advertise itself as a router.
        assert_eq!(f.egress(&icmp("fe80::5", "ff02::1", 134, None), now), Verdict::Deny);
        // The same types over IPv4 are nothing special.
        assert_eq!(f.ingress(&icmp("10.0.0.1", VM, 135, None), now), Verdict::Deny);
        assert_eq!(f.flows(), 0);
    }

    #[test]
    fn any_rules_match_other_protocols() {
        let mut f = PortFilter::new(rules(&["ingress any 10.0.0.0/8", "ingress tcp 10.0.0.0/8"]));
        let now = Instant::now();
        assert_eq!(f.ingress(&other("10.7.7.7", VM, 47), now), Verdict::Allow);
        assert_eq!(f.egress(&other(VM, "10.7.7.7", 47), now), Verdict::Allow);
        assert_eq!(f.egress(&other(VM, "10.7.7.8", 47), now), Verdict::Deny);
        assert_eq!(f.ingress(&other("11.7.7.7", VM, 47), now), Verdict::Deny);
        let mut f = PortFilter::new(rules(&["ingress tcp 10.0.0.0/8", "ingress udp 53 10.0.0.0/8"]));
        assert_eq!(f.ingress(&other("10.7.7.7", VM, 47), now), Verdict::Deny);
    }

    #[test]
    fn fragments_pass_with_a_tracked_flow_between_the_same_hosts() {
        let mut f = PortFilter::new(rules(&["egress udp 0.0.0.0/0", "ingress udp 514 10.0.0.0/8"]));
        let now = Instant::now();
        let frag = other("9.9.9.9", VM, PROTO_UDP);
        assert_eq!(f.ingress(&frag, now), Verdict::Deny);
        f.egress(&udp(VM, 33000, "9.9.9.9", 53), now);
        assert_eq!(f.ingress(&frag, now), Verdict::Allow);
        assert_eq!(f.ingress(&other("9.9.9.9", VM, PROTO_TCP), now), Verdict::Deny);
        // A rule naming ports cannot match a packet without them.
        assert_eq!(f.ingress(&other("10.1.1.1", VM, PROTO_UDP), now), Verdict::Deny);
        f.sweep(now + secs(31));
        assert_eq!(f.ingress(&frag, now + secs(31)), Verdict::Deny);
    }

    /// Ethernet + IPv4 + ICMP `ty` from `router` to `to`, quoting an IPv4 +
    /// UDP header from `qsrc:qsport` to `qdst:qdport`.
    fn icmp_error_frame(
        router: [u8; 4],
        to: [u8; 4],
        ty: u8,
        quoted: ([u8; 4], u16, [u8; 4], u16),
    ) -> Vec<u8> {
        let (qsrc, qsport, qdst, qdport) = quoted;
        let mut f = vec![2, 0, 0, 0, 0, 5, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        f.extend_from_slice(&[0x45, 0, 0, 56, 0, 0, 0, 0, 64, PROTO_ICMP, 0, 0]);
        f.extend_from_slice(&router);
        f.extend_from_slice(&to);
        f.extend_from_slice(&[ty, 4, 0, 0, 0, 0, 0x05, 0x78]);
        f.extend_from_slice(&[0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, PROTO_UDP, 0, 0]);
        f.extend_from_slice(&qsrc);
        f.extend_from_slice(&qdst);
        f.extend_from_slice(&qsport.to_be_bytes());
        f.extend_from_slice(&qdport.to_be_bytes());
        f.extend_from_slice(&[0, 40, 0, 0]);
        f
    }

    #[test]
    fn icmp_errors_about_tracked_flows_pass_with_the_frame() {
        let mut f = PortFilter::new(rules(&["egress any 0.0.0.0/0"]));
        let now = Instant::now();
        let (vm, remote, router) = ([10, 0, 0, 5], [9, 9, 9, 9], [172, 16, 0, 1]);
        f.egress(&udp(VM, 33000, "9.9.9.9", 53), now);
        let frame = icmp_error_frame(router, vm, 3, (vm, 33000, remote, 53));
        let p = crate::packet::parse(&frame).unwrap().unwrap();
        assert_eq!(p.l4, L4::Icmp { ty: 3, code: 4, ident: None });
        assert_eq!(f.ingress(&p, now), Verdict::Deny);
        assert_eq!(f.ingress_frame(&frame, &p, now), Verdict::Allow);
        for unrelated in [
            icmp_error_frame(router, vm, 3, (vm, 33001, remote, 53)),
            icmp_error_frame(router, vm, 3, (vm, 33000, [9, 9, 9, 8], 53)),
            // Addressed to the port, quoting another sender's packet.
            icmp_error_frame(router, vm, 3, ([10, 0, 0, 6], 33000, remote, 53)),
            // Not an error type.
            icmp_error_frame(router, vm, 13, (vm, 33000, remote, 53)),
        ] {
            let p = crate::packet::parse(&unrelated).unwrap().unwrap();
            assert_eq!(f.ingress_frame(&unrelated, &p, now), Verdict::Deny);
        }
        assert_eq!(f.ingress_frame(&frame, &p, now + secs(31)), Verdict::Deny);
        // Truncated quotes are refused, not trusted.
        for len in 0..frame.len() {
            let _ = f.ingress_frame(&frame[..len], &p, now);
        }
        // The port may report errors about flows the remote end started.
        let mut f = PortFilter::new(rules(&["ingress udp 0.0.0.0/0"]));
        f.ingress(&udp("9.9.9.9", 40000, VM, 4789), now);
        let frame = icmp_error_frame(vm, remote, 3, (remote, 40000, vm, 4789));
        let p = crate::packet::parse(&frame).unwrap().unwrap();
        assert_eq!(f.egress(&p, now), Verdict::Deny);
        assert_eq!(f.egress_frame(&frame, &p, now), Verdict::Allow);
    }

    fn addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            Just(ip("10.0.0.5")),
            Just(ip("10.0.0.9")),
            Just(ip("10.1.0.1")),
            Just(ip("192.168.1.1")),
            Just(ip("fd00::5")),
            Just(ip("fd00::9")),
            Just(ip("2001:db8::1")),
        ]
    }

    fn l4() -> impl Strategy<Value = L4> {
        let port = prop_oneof![Just(22u16), Just(53), Just(80), Just(40000), 1u16..=65535];
        prop_oneof![
            (port.clone(), port.clone(), any::<u8>()).prop_map(|(src_port, dst_port, flags)| L4::Tcp {
                src_port,
                dst_port,
                flags
            }),
            (port.clone(), port).prop_map(|(src_port, dst_port)| L4::Udp { src_port, dst_port }),
            (prop::sample::select(vec![0u8, 3, 8, 11, 13, 1, 2, 128, 129, 133, 134, 135]), 0u16..3).prop_map(
                |(ty, id)| L4::Icmp { ty, code: 0, ident: matches!(ty, 0 | 8 | 128 | 129).then_some(id) }
            ),
            prop::sample::select(vec![1u8, 6, 17, 47, 58, 44]).prop_map(|proto| L4::Other { proto }),
        ]
    }

    fn packet() -> impl Strategy<Value = IpPacket> {
        // Both ends of a packet are of one family.
        (addr(), addr(), l4())
            .prop_filter("one address family", |(src, dst, _)| src.is_ipv4() == dst.is_ipv4())
            .prop_map(|(src, dst, l4)| IpPacket { src, dst, l4, ip_offset: 14 })
    }

    fn security_rule() -> impl Strategy<Value = SecurityRule> {
        let text = (
            prop::sample::select(vec!["ingress", "egress"]),
            prop::sample::select(vec!["any", "tcp", "udp", "icmp"]),
            prop::sample::select(vec!["", "22", "53", "1-1024"]),
            prop::sample::select(vec!["0.0.0.0/0", "10.0.0.0/8", "10.0.0.9/32", "::/0", "fd00::/64"]),
        );
        text.prop_map(|(d, p, ports, cidr)| {
            let ports = if matches!(p, "tcp" | "udp") { ports } else { "" };
            rule(&format!("{d} {p} {ports} {cidr}"))
        })
    }

    /// Whether some rule allows `p` in `dir`, written from the rule text's
    /// meaning rather than from the filter's code.
    fn oracle(rules: &[SecurityRule], dir: Direction, p: &IpPacket) -> bool {
        let remote = if dir == Direction::Ingress { p.src } else { p.dst };
        rules.iter().any(|r| {
            let proto = match (r.protocol, p.l4) {
                (Protocol::Any, _) => true,
                (Protocol::Tcp, L4::Tcp { .. }) | (Protocol::Udp, L4::Udp { .. }) => true,
                (Protocol::Tcp, L4::Other { proto }) => proto == PROTO_TCP,
                (Protocol::Udp, L4::Other { proto }) => proto == PROTO_UDP,
                (Protocol::Icmp, L4::Icmp { .. }) => true,
                (Protocol::Icmp, L4::Other { proto }) => proto == if remote.is_ipv4() { 1 } else { 58 },
                _ => false,
            };
            let ports = match (r.ports, p.l4) {
                (None, _) => true,
                (Some(range), L4::Tcp { dst_port, .. } | L4::Udp { dst_port, .. }) => {
                    range.contains(dst_port)
                }
                (Some(_), _) => false,
            };
            r.direction == dir && proto && ports && r.cidr.contains(remote)
        })
    }

    fn is_echo_reply_packet(p: &IpPacket) -> bool {
        matches!(p.l4, L4::Icmp { ty, ident: Some(_), .. } if ty == if p.src.is_ipv4() { 0 } else { 129 })
    }

    fn reversed(p: &IpPacket) -> IpPacket {
        let l4 = match p.l4 {
            L4::Tcp { src_port, dst_port, .. } => {
                L4::Tcp { src_port: dst_port, dst_port: src_port, flags: ACK }
            }
            L4::Udp { src_port, dst_port } => L4::Udp { src_port: dst_port, dst_port: src_port },
            l4 => l4,
        };
        IpPacket { src: p.dst, dst: p.src, l4, ip_offset: p.ip_offset }
    }

    fn dir_of(ingress: bool) -> Direction {
        if ingress { Direction::Ingress } else { Direction::Egress }
    }

    proptest! {
        #[test]
        fn without_rules_nothing_unsolicited_gets_in(packets in prop::collection::vec(packet(), 1..60)) {
            let mut f = PortFilter::new(vec![]);
            let now = Instant::now();
            for p in &packets {
                let nd = matches!(p.l4, L4::Icmp { ty, .. } if p.src.is_ipv6() && is_neighbour(Direction::Ingress, ty));
                prop_assert_eq!(f.ingress(p, now) == Verdict::Allow, nd, "{:?}", p);
                prop_assert_eq!(f.flows(), 0);
            }
        }

        #[test]
        fn filters_keep_their_invariants(
            initial in prop::collection::vec(security_rule(), 0..6),
            later in prop::collection::vec(security_rule(), 0..6),
            capacity in 0usize..8,
            steps in prop::collection::vec((any::<bool>(), packet(), 0u64..200, 0u8..20), 1..80),
        ) {
            let mut f = PortFilter::with_capacity(initial, capacity);
            let mut now = Instant::now();
            let (mut ins, mut outs) = (0u64, 0u64);
            for (ingress, p, advance, action) in &steps {
                now += secs(*advance);
                match action {
                    0 => f.set_rules(later.clone(), now),
                    1 => f.sweep(now),
                    2 => {
                        // The rules that started the live flows still allow them.
                        f.sweep(now);
                        let live = f.flows();
                        f.set_rules(f.rules().to_vec(), now);
                        prop_assert_eq!(f.flows(), live);
                    }
                    _ => {}
                }
                let dir = dir_of(*ingress);
                let full_before = f.counters().table_full;
                let verdict = f.filter(dir, p, None, now);
                if *ingress { ins += 1 } else { outs += 1 }
                if oracle(f.rules(), dir, p) && !is_echo_reply_packet(p) {
                    prop_assert_eq!(verdict, Verdict::Allow, "{:?} {:?}", dir, p);
                }
                let tracked = matches!(p.l4, L4::Tcp { .. } | L4::Udp { .. });
                if verdict == Verdict::Allow && tracked && f.counters().table_full == full_before {
                    let back = dir_of(!*ingress);
                    prop_assert_eq!(f.filter(back, &reversed(p), None, now), Verdict::Allow, "{:?}", p);
                    if *ingress { outs += 1 } else { ins += 1 }
                }
                prop_assert!(f.flows() <= capacity);
                let c = f.counters();
                prop_assert_eq!(c.ingress_allowed + c.ingress_denied, ins);
                prop_assert_eq!(c.egress_allowed + c.egress_denied, outs);
                prop_assert!(f.pairs.values().sum::<u32>() as usize == f.flows());
            }
            f.set_rules(vec![], now);
            prop_assert_eq!(f.flows(), 0);
            prop_assert!(f.pairs.is_empty());
        }
    }
}
