//! Network values shared by the switch, the pool's network records and the
//! API: address blocks ([`Cidr`]), MAC addresses ([`MacAddr`]) and
//! security-group rules ([`SecurityRule`]).
//!
//! Every type parses from and prints to the text an operator types
//! (`10.0.0.0/24`, `52:54:00:12:34:56`, `tcp 22 10.0.0.0/8`), and refuses
//! anything else with a message naming what is allowed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a network value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetParseError {
    #[error("{0:?} is not an address block like 10.0.0.0/24 or fd00::/64 with no host bits set")]
    Cidr(String),
    #[error("{0:?} is not a MAC address like 52:54:00:12:34:56")]
    Mac(String),
    #[error("{0:?} is not a protocol: any, tcp, udp or icmp")]
    Protocol(String),
    #[error("{0:?} is not a port range like 22 or 8000-8080 (1..=65535, low-high)")]
    Ports(String),
    #[error("{0:?} is not a direction: ingress or egress")]
    Direction(String),
}

/// A block of IPv4 or IPv6 addresses: an address with no host bits set and
/// a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let c = Cidr { addr, prefix };
        (prefix <= c.max_prefix() && c.network() == addr).then_some(c)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn max_prefix(&self) -> u8 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(self.prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(self.prefix))),
        }
    }

    /// Whether `ip` lies in the block (never across address families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & mask32(self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & mask128(self.prefix) == u128::from(n),
            _ => false,
        }
    }

    /// For IPv4 blocks: the netmask (`255.255.255.0` for a /24).
    pub fn netmask_v4(&self) -> Option<Ipv4Addr> {
        matches!(self.addr, IpAddr::V4(_)).then(|| Ipv4Addr::from(mask32(self.prefix)))
    }

    /// For IPv4 blocks: the host addresses, i.e. every address but the
    /// network and broadcast ones (a /31 and /32 have none to hand out).
    pub fn hosts_v4(&self) -> Option<std::ops::RangeInclusive<u32>> {
        let IpAddr::V4(n) = self.addr else { return None };
        if self.prefix > 30 {
            return None;
        }
        let base = u32::from(n);
        let last = base | !mask32(self.prefix);
        Some(base + 1..=last - 1)
    }
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix.min(128))) }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = NetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetParseError::Cidr(s.chars().take(64).collect());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        Cidr::new(addr, prefix).ok_or_else(bad)
    }
}

impl TryFrom<String> for Cidr {
    type Error = NetParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Group addresses (broadcast and multicast) have the low bit of the first octet set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// A random locally administered unicast address.
    pub fn random() -> Self {
        let mut b: [u8; 6] = rand::random();
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddr(b)
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl FromStr for MacAddr {
    type Err = NetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetParseError::Mac(s.chars().take(64).collect());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = NetParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// Which way a rule looks: traffic arriving at the port, or leaving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

impl FromStr for Direction {
    type Err = NetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ingress" | "in" => Ok(Direction::Ingress),
            "egress" | "out" => Ok(Direction::Egress),
            _ => Err(NetParseError::Direction(s.chars().take(32).collect())),
        }
    }
}

/// The IP protocols a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    /// ICMP for IPv4 rules, ICMPv6 for IPv6 rules.
    Icmp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        })
    }
}

impl FromStr for Protocol {
    type Err = NetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "any" | "all" => Ok(Protocol::Any),
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "icmp" => Ok(Protocol::Icmp),
            _ => Err(NetParseError::Protocol(s.chars().take(32).collect())),
        }
    }
}

/// An inclusive range of TCP/UDP ports, `low <= high`, both in 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange { low: 1, high: 65535 };

    pub fn new(low: u16, high: u16) -> Option<Self> {
        (low >= 1 && low <= high).then_some(PortRange { low, high })
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

impl FromStr for PortRange {
    type Err = NetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetParseError::Ports(s.chars().take(32).collect());
        let (l, h) = s.split_once('-').unwrap_or((s, s));
        let low: u16 = l.parse().map_err(|_| bad())?;
        let high: u16 = h.parse().map_err(|_| bad())?;
        PortRange::new(low, high).ok_or_else(bad)
    }
}

/// One allow rule of a security group: traffic in `direction` of protocol
/// `protocol` whose remote end lies in `cidr` and, for TCP and UDP, whose
/// destination port lies in `ports` (the port's own port for ingress, the
/// remote's for egress).
///
/// Text form: `<direction> <protocol> [<ports>] [<cidr>]`, e.g.
/// `ingress tcp 22 10.0.0.0/8`, `egress any`, `ingress icmp 0.0.0.0/0`.
/// The cidr defaults to every IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SecurityRule {
    pub direction: Direction,
    pub protocol: Protocol,
    /// Destination ports (TCP/UDP only; `None` for other protocols).
    #[serde(default)]
    pub ports: Option<PortRange>,
    /// The remote end's addresses: sources for ingress, destinations for egress.
    pub cidr: Cidr,
}

impl fmt::Display for SecurityRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.direction, self.protocol)?;
        if let Some(p) = self.ports {
            write!(f, " {p}")?;
        }
        write!(f, " {}", self.cidr)
    }
}

/// Why a rule's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleParseError {
    #[error("rule {rule:?}: {source}")]
    Part {
        rule: String,
        #[source]
        source: NetParseError,
    },
    #[error("rule {0:?} must read '<ingress|egress> <any|tcp|udp|icmp> [<port>[-<port>]] [<cidr>]'")]
    Shape(String),
    #[error("rule {0:?}: only tcp and udp rules take ports")]
    PortsWithoutTransport(String),
}

impl FromStr for SecurityRule {
    type Err = RuleParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rule = s.chars().take(128).collect::<String>();
        let part = |source| RuleParseError::Part { rule: rule.clone(), source };
        let words: Vec<&str> = s.split_whitespace().collect();
        if !(2..=4).contains(&words.len()) {
            return Err(RuleParseError::Shape(rule));
        }
        let direction: Direction = words[0].parse().map_err(part)?;
        let protocol: Protocol = words[1].parse().map_err(part)?;
        let mut ports = None;
        let mut cidr = None;
        for w in &words[2..] {
            if w.contains('/') && cidr.is_none() {
                cidr = Some(w.parse().map_err(part)?);
            } else if ports.is_none() && cidr.is_none() {
                ports = Some(w.parse().map_err(part)?);
            } else {
                return Err(RuleParseError::Shape(rule));
            }
        }
        if ports.is_some() && !matches!(protocol, Protocol::Tcp | Protocol::Udp) {
            return Err(RuleParseError::PortsWithoutTransport(rule));
        }
        let cidr = cidr.unwrap_or(Cidr { addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED), prefix: 0 });
        Ok(SecurityRule { direction, protocol, ports, cidr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_strictly_and_contain_their_addresses() {
        let c: Cidr = "10.1.2.0/24".parse().unwrap();
        assert!(c.contains("10.1.2.200".parse().unwrap()));
        assert!(!c.contains("10.1.3.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        assert_eq!(c.netmask_v4(), Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(c.hosts_v4().map(|r| (*r.start(), *r.end())), Some((0x0a01_0201, 0x0a01_02fe)));
        let v6: Cidr = "fd00::/64".parse().unwrap();
        assert!(v6.contains("fd00::5".parse().unwrap()));
        for bad in ["10.1.2.1/24", "10.0.0.0/33", "10.0.0.0", "10.0.0.0/", "x/8", "10.0.0.0/+8", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().to_string(), "0.0.0.0/0");
    }

    #[test]
    fn macs_round_trip() {
        let m: MacAddr = "52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        assert!(m.is_unicast());
        for bad in ["52:54:00:ab:cd", "52:54:00:ab:cd:ef:00", "5254.00ab.cdef", "52:54:00:ab:cd:eg"] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        for _ in 0..100 {
            let r = MacAddr::random();
            assert!(r.is_unicast() && r.0[0] & 2 == 2);
        }
    }

    #[test]
    fn rules_parse_from_operator_text() {
        let r: SecurityRule = "ingress tcp 8000-8080 10.0.0.0/8".parse().unwrap();
        assert_eq!(r.ports, PortRange::new(8000, 8080));
        assert_eq!(r.to_string(), "ingress tcp 8000-8080 10.0.0.0/8");
        let r: SecurityRule = "egress any".parse().unwrap();
        assert_eq!(r.cidr.to_string(), "0.0.0.0/0");
        assert!("ingress icmp 22".parse::<SecurityRule>().is_err());
        assert!("ingress tcp 0".parse::<SecurityRule>().is_err());
        assert!("ingress tcp 90-80".parse::<SecurityRule>().is_err());
        assert!("sideways tcp".parse::<SecurityRule>().is_err());
        assert!("ingress".parse::<SecurityRule>().is_err());
        assert!("ingress tcp 22 10.0.0.0/8 extra".parse::<SecurityRule>().is_err());
    }
}
