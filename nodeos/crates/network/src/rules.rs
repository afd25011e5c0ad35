//! The rules of the pool's network records as pure functions: what a request
//! may ask for, and which VNI, address, MAC and rules it gets given the
//! records read.
//!
//! [`crate::Networks`] reads the records, asks these functions, and writes
//! what they answer with a compare-and-swap; so every rule here is tested
//! without a store, and a refused request has written nothing.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;

use nodeos_switch::vxlan::{MAX_VNI, VXLAN_PORT};
use nodeos_types::net::{Cidr, MacAddr, SecurityRule};
use nodeos_types::records::{DEFAULT_NETWORK_MTU, NetworkRecord, PortKind, PortRecord};
use nodeos_types::{NodeId, SecurityGroupId};

use crate::networks::{NetworkError, NetworkUpdate, NewNetwork, NewPort};

/// First VNI handed out when none is asked for (lower ones are left to operators).
pub const FIRST_AUTO_VNI: u32 = 4096;
pub const DEFAULT_LEASE_SECS: u32 = 86400;
/// A minute, so clients do not renew in a storm; a year, so a lease still ends.
pub const LEASE_RANGE: RangeInclusive<u32> = 60..=31_536_000;
/// MTU bounds: IPv4's minimum, and a 9216-byte jumbo frame less the tunnel overhead.
pub const MTU_RANGE: RangeInclusive<u16> = 576..=9000;
/// Prefix lengths of a network: a /8 is already 16 M addresses to scan for a
/// free one; a /31 or /32 has no host address besides the gateway.
pub const PREFIX_RANGE: RangeInclusive<u8> = 8..=30;
pub const MAX_GROUPS_PER_PORT: usize = 16;
pub const MAX_RULES_PER_GROUP: usize = 256;
pub const MAX_EXTERNAL_VTEPS: usize = 64;

/// Names of networks and security groups: safe in a meta key and a shell.
pub fn check_name(what: &'static str, name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(NetworkError::Name { what, name: name.chars().take(80).collect() }) }
}

/// Linux interface names: what `ip link` accepts and a tap may be called.
pub fn check_ifname(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(()) } else { Err(NetworkError::Ifname(name.chars().take(32).collect())) }
}

/// Parses an external VTEP, `ip` or `ip:port` (port 4789 by default): a
/// unicast address, as flooded frames are sent to each VTEP one by one.
pub fn parse_vtep(s: &str) -> Result<SocketAddr, NetworkError> {
    let bad = || NetworkError::Vtep(s.chars().take(64).collect());
    let a = match s.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => SocketAddr::new(s.parse::<IpAddr>().map_err(|_| bad())?, VXLAN_PORT),
    };
    if a.port() == 0 || a.ip().is_unspecified() || a.ip().is_multicast() {
        return Err(bad());
    }
    Ok(a)
}

/// External VTEPs as stored: each `ip:port`, at most [`MAX_EXTERNAL_VTEPS`].
pub fn check_vteps(v: &[String]) -> Result<Vec<String>, NetworkError> {
    if v.len() > MAX_EXTERNAL_VTEPS {
        return Err(NetworkError::Vtep(format!("{} VTEPs (at most {MAX_EXTERNAL_VTEPS})", v.len())));
    }
    v.iter().map(|s| parse_vtep(s).map(|a| a.to_string())).collect()
}

/// `ip` is an address of `cidr` a port may have: neither the network nor the
/// broadcast address.
pub fn check_host(cidr: &Cidr, ip: Ipv4Addr, what: &'static str) -> Result<(), NetworkError> {
    let ok = cidr.hosts_v4().is_some_and(|h| h.contains(&u32::from(ip)));
    if ok { Ok(()) } else { Err(NetworkError::NotInNetwork { what, ip, cidr: *cidr }) }
}

pub fn check_lease(secs: u32) -> Result<(), NetworkError> {
    if LEASE_RANGE.contains(&secs) { Ok(()) } else { Err(NetworkError::Lease(secs)) }
}

pub fn check_mtu(mtu: u16) -> Result<(), NetworkError> {
    if MTU_RANGE.contains(&mtu) { Ok(()) } else { Err(NetworkError::Mtu(mtu)) }
}

pub fn check_vni(vni: u32) -> Result<(), NetworkError> {
    nodeos_switch::vxlan::check_vni(vni).map(drop).map_err(|_| NetworkError::Vni(vni))
}

pub fn check_cidr(cidr: Cidr) -> Result<(), NetworkError> {
    // `Cidr` itself refuses host bits; IPv6 blocks have no `hosts_v4`.
    if PREFIX_RANGE.contains(&cidr.prefix()) && cidr.hosts_v4().is_some() {
        Ok(())
    } else {
        Err(NetworkError::Cidr(cidr))
    }
}

/// A network request checked, with its defaults filled in: everything of
/// the record but its id, VNI and times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPlan {
    pub cidr: Cidr,
    pub gateway: Option<Ipv4Addr>,
    pub mtu: u16,
    pub lease_secs: u32,
    pub external_vteps: Vec<String>,
}

/// Checks every field of `req` that needs no records (the uplink's node
/// does: it must exist) and fills in the defaults.
pub fn plan_network(req: &NewNetwork) -> Result<NetworkPlan, NetworkError> {
    check_name("network", &req.name)?;
    let cidr = req.cidr.ok_or_else(|| {
        NetworkError::Cidr(Cidr::new(Ipv4Addr::UNSPECIFIED.into(), 0).expect("0.0.0.0/0 is a block"))
    })?;
    check_cidr(cidr)?;
    let gateway = match (req.no_gateway, req.gateway) {
        (true, _) => None,
        (false, Some(g)) => Some(g),
        (false, None) => cidr.hosts_v4().map(|h| Ipv4Addr::from(*h.start())),
    };
    if let Some(g) = gateway {
        check_host(&cidr, g, "gateway")?;
    }
    let mtu = req.mtu.unwrap_or(DEFAULT_NETWORK_MTU);
    check_mtu(mtu)?;
    let lease_secs = req.lease_secs.unwrap_or(DEFAULT_LEASE_SECS);
    check_lease(lease_secs)?;
    let external_vteps = check_vteps(&req.external_vteps)?;
    if let Some(u) = &req.uplink {
        check_ifname(&u.bridge)?;
    }
    if let Some(v) = req.vni {
        check_vni(v)?;
    }
    Ok(NetworkPlan { cidr, gateway, mtu, lease_secs, external_vteps })
}

/// The VNI a network gets when none is asked for: the lowest free one from
/// [`FIRST_AUTO_VNI`]. `None` when all are taken.
pub fn lowest_free_vni(used: &BTreeSet<u32>) -> Option<u32> {
    lowest_free(FIRST_AUTO_VNI..=MAX_VNI, used)
}

/// The lowest value of `range` not in `used`. Walks `used` rather than the
/// range, which may be 16 M long.
fn lowest_free(range: RangeInclusive<u32>, used: &BTreeSet<u32>) -> Option<u32> {
    if range.is_empty() {
        return None;
    }
    let mut want = *range.start();
    for &u in used.range(range.clone()) {
        if u != want {
            break;
        }
        want = want.checked_add(1)?;
    }
    range.contains(&want).then_some(want)
}

/// Checks an update's fields (but the uplink's node) and returns it with
/// its external VTEPs in stored form.
pub fn check_update(mut u: NetworkUpdate) -> Result<NetworkUpdate, NetworkError> {
    if let Some(m) = u.mtu {
        check_mtu(m)?;
    }
    if let Some(l) = u.lease_secs {
        check_lease(l)?;
    }
    if let Some(v) = &u.external_vteps {
        u.external_vteps = Some(check_vteps(v)?);
    }
    if let Some(Some(up)) = &u.uplink {
        check_ifname(&up.bridge)?;
    }
    Ok(u)
}

/// Applies a checked update; fields it leaves `None` stay as they are.
pub fn apply_update(r: &mut NetworkRecord, u: &NetworkUpdate) {
    if let Some(m) = u.mtu {
        r.mtu = m;
    }
    if let Some(d) = &u.dns {
        r.dns.clone_from(d);
    }
    if let Some(l) = u.lease_secs {
        r.lease_secs = l;
    }
    if let Some(up) = &u.uplink {
        r.uplink.clone_from(up);
    }
    if let Some(v) = &u.external_vteps {
        r.external_vteps.clone_from(v);
    }
}

/// Checks what a port request asks of network `net` on its own: a unicast
/// MAC, a host address that is not the gateway, a tap name, the number of
/// groups.
pub fn check_port(net: &NetworkRecord, req: &NewPort) -> Result<(), NetworkError> {
    if let Some(m) = req.mac
        && !m.is_unicast()
    {
        return Err(NetworkError::Mac(m));
    }
    if let Some(ip) = req.ip {
        check_host(&net.cidr, ip, "ip")?;
        if Some(ip) == net.gateway {
            return Err(NetworkError::IpTaken { ip, network: net.name.clone() });
        }
    }
    if let PortKind::Tap { ifname } = &req.kind {
        check_ifname(ifname)?;
    }
    if req.security_groups.len() > MAX_GROUPS_PER_PORT {
        return Err(NetworkError::TooManyGroups);
    }
    Ok(())
}

/// A tap port's name is the host interface's on its node: one port each,
/// whatever their networks.
pub fn check_tap_free(ports: &[PortRecord], node: NodeId, kind: &PortKind) -> Result<(), NetworkError> {
    let PortKind::Tap { ifname } = kind else { return Ok(()) };
    let taken =
        ports.iter().any(|p| p.node == node && matches!(&p.kind, PortKind::Tap { ifname: i } if i == ifname));
    if taken { Err(NetworkError::IfnameTaken { node, ifname: ifname.clone() }) } else { Ok(()) }
}

/// The MAC of a new port of `net`: `wanted` if no port of the network has
/// it, else a fresh one from `random` (which must give unicast addresses).
pub fn port_mac(
    ports: &[PortRecord],
    net: &NetworkRecord,
    wanted: Option<MacAddr>,
    mut random: impl FnMut() -> MacAddr,
) -> Result<MacAddr, NetworkError> {
    let macs: BTreeSet<MacAddr> = ports.iter().filter(|p| p.network == net.id).map(|p| p.mac).collect();
    match wanted {
        Some(m) if macs.contains(&m) => Err(NetworkError::MacTaken { mac: m, network: net.name.clone() }),
        Some(m) => Ok(m),
        // 46 random bits against at most a /8's worth of ports: ends at once.
        None => loop {
            let m = random();
            if !macs.contains(&m) {
                break Ok(m);
            }
        },
    }
}

/// The lowest host address of `net` that is neither leased nor the gateway.
pub fn lowest_free_ip(net: &NetworkRecord, leased: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, NetworkError> {
    let full = || NetworkError::Full(net.name.clone());
    let hosts = net.cidr.hosts_v4().ok_or_else(full)?;
    let used: BTreeSet<u32> = leased.iter().chain(&net.gateway).map(|ip| u32::from(*ip)).collect();
    lowest_free(hosts, &used).map(Ipv4Addr::from).ok_or_else(full)
}

/// The rules of a new group: `rules` once each, in order, and with
/// `default_egress` all egress (IPv4 and IPv6) as most operators expect.
pub fn new_group_rules(
    rules: &[SecurityRule],
    default_egress: bool,
) -> Result<Vec<SecurityRule>, NetworkError> {
    let mut out = Vec::with_capacity(rules.len() + 2);
    let egress = if default_egress { default_egress_rules() } else { Vec::new() };
    for r in rules.iter().chain(&egress) {
        if !out.contains(r) {
            out.push(*r);
        }
    }
    if out.len() > MAX_RULES_PER_GROUP {
        return Err(NetworkError::TooManyRules);
    }
    Ok(out)
}

/// All egress, IPv4 and IPv6: what a port with no groups, or a group made
/// with default egress, may start.
pub fn default_egress_rules() -> Vec<SecurityRule> {
    ["egress any 0.0.0.0/0", "egress any ::/0"]
        .iter()
        .map(|r| r.parse().expect("fixed rule text parses"))
        .collect()
}

/// Group `group`'s rules less `remove` (each must be there) plus `add`
/// (appended unless already there).
pub fn change_rule_set(
    group: &str,
    rules: &[SecurityRule],
    add: &[SecurityRule],
    remove: &[SecurityRule],
) -> Result<Vec<SecurityRule>, NetworkError> {
    let mut out = rules.to_vec();
    for r in remove {
        let before = out.len();
        out.retain(|x| x != r);
        if out.len() == before {
            return Err(NetworkError::NoRule { group: group.to_owned(), rule: r.to_string() });
        }
    }
    for r in add {
        if !out.contains(r) {
            out.push(*r);
        }
    }
    if out.len() > MAX_RULES_PER_GROUP {
        return Err(NetworkError::TooManyRules);
    }
    Ok(out)
}

/// How many ports list group `id`.
pub fn users_of_group(ports: &[PortRecord], id: SecurityGroupId) -> usize {
    ports.iter().filter(|p| p.security_groups.contains(&id)).count()
}

#[cfg(test)]
mod tests {
    use nodeos_types::records::Uplink;
    use nodeos_types::{NetworkId, PortId, VmId};

    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn rule(s: &str) -> SecurityRule {
        s.parse().unwrap()
    }

    fn new_network(c: &str) -> NewNetwork {
        NewNetwork { name: "tenant-a".into(), cidr: Some(cidr(c)), ..NewNetwork::default() }
    }

    fn net(c: &str, gateway: Option<&str>) -> NetworkRecord {
        NetworkRecord {
            id: NetworkId(1),
            name: "tenant-a".into(),
            vni: 4096,
            cidr: cidr(c),
            gateway: gateway.map(ip),
            mtu: DEFAULT_NETWORK_MTU,
            dns: vec![],
            lease_secs: DEFAULT_LEASE_SECS,
            uplink: None,
            external_vteps: vec![],
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn port(id: u64, network: u64, node: u64, kind: PortKind, mac: u8) -> PortRecord {
        PortRecord {
            id: PortId(id),
            network: NetworkId(network),
            node: NodeId(node),
            kind,
            mac: MacAddr([2, 0, 0, 0, 0, mac]),
            ip: None,
            security_groups: vec![],
            port_security: true,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn tap(name: &str) -> PortKind {
        PortKind::Tap { ifname: name.into() }
    }

    fn new_port(kind: PortKind) -> NewPort {
        NewPort {
            network: "tenant-a".into(),
            node: NodeId(1),
            kind,
            mac: None,
            ip: None,
            security_groups: vec![],
            port_security: true,
        }
    }

    #[test]
    fn vteps_parse_with_the_standard_port_by_default() {
        assert_eq!(parse_vtep("10.0.0.5").unwrap(), "10.0.0.5:4789".parse().unwrap());
        assert_eq!(parse_vtep("10.0.0.5:8472").unwrap(), "10.0.0.5:8472".parse().unwrap());
        assert_eq!(parse_vtep("fd00::5").unwrap(), "[fd00::5]:4789".parse().unwrap());
        for bad in ["", "10.0.0.5:0", "0.0.0.0", "0.0.0.0:4789", "host", "239.1.1.1", "10.0.0.5:99999"] {
            assert!(matches!(parse_vtep(bad), Err(NetworkError::Vtep(_))), "{bad}");
        }
    }

    #[test]
    fn a_multicast_vtep_is_refused_with_a_port_too() {
        assert!(matches!(parse_vtep("239.1.1.1:4789"), Err(NetworkError::Vtep(_))));
        assert!(matches!(parse_vtep("[ff02::1]:4789"), Err(NetworkError::Vtep(_))));
    }

    #[test]
    fn vteps_are_stored_as_ip_and_port_and_at_most_64() {
        let v = check_vteps(&["192.0.2.1".into(), "192.0.2.2:8472".into()]).unwrap();
        assert_eq!(v, ["192.0.2.1:4789", "192.0.2.2:8472"]);
        let many: Vec<String> = (0..65).map(|i| format!("192.0.2.{i}")).collect();
        assert!(matches!(check_vteps(&many), Err(NetworkError::Vtep(m)) if m.contains("65")));
        assert_eq!(check_vteps(&many[..64]).unwrap().len(), 64);
    }

    #[test]
    fn names_and_ifnames_are_checked() {
        assert!(check_name("network", "tenant-a_1").is_ok());
        assert!(check_name("network", &"a".repeat(63)).is_ok());
        for bad in ["", "Tenant", "a b", "a/b", "a.b", "é"] {
            assert!(matches!(check_name("network", bad), Err(NetworkError::Name { what: "network", .. })));
        }
        assert!(check_name("network", &"a".repeat(64)).is_err());
        assert!(check_ifname("nt-a.0").is_ok());
        assert!(check_ifname("fifteen-chars-x").is_ok());
        for bad in ["", "a/b", "a b", "sixteen-chars-xx"] {
            assert!(matches!(check_ifname(bad), Err(NetworkError::Ifname(_))), "{bad:?}");
        }
    }

    #[test]
    fn hosts_exclude_network_and_broadcast() {
        let c = cidr("10.9.0.0/30");
        assert!(check_host(&c, ip("10.9.0.1"), "ip").is_ok());
        assert!(check_host(&c, ip("10.9.0.2"), "ip").is_ok());
        for bad in ["10.9.0.0", "10.9.0.3", "10.9.1.1"] {
            assert!(matches!(
                check_host(&c, ip(bad), "ip"),
                Err(NetworkError::NotInNetwork { what: "ip", ip: i, .. }) if i == ip(bad)
            ));
        }
    }

    #[test]
    fn cidrs_are_ipv4_blocks_of_8_to_30_bits() {
        for ok in ["10.0.0.0/8", "10.9.0.0/30", "192.168.1.0/24"] {
            assert!(check_cidr(cidr(ok)).is_ok(), "{ok}");
        }
        for bad in ["10.0.0.0/7", "10.9.0.0/31", "10.9.0.1/32", "fd00::/64", "0.0.0.0/0"] {
            assert!(matches!(check_cidr(cidr(bad)), Err(NetworkError::Cidr(c)) if c == cidr(bad)), "{bad}");
        }
        // Host bits never make it into a `Cidr` at all.
        assert!(Cidr::new(ip("10.0.0.1").into(), 24).is_none());
    }

    #[test]
    fn a_network_gets_the_first_host_as_gateway_and_the_default_mtu_and_lease() {
        let p = plan_network(&new_network("10.1.0.0/24")).unwrap();
        assert_eq!(
            p,
            NetworkPlan {
                cidr: cidr("10.1.0.0/24"),
                gateway: Some(ip("10.1.0.1")),
                mtu: DEFAULT_NETWORK_MTU,
                lease_secs: DEFAULT_LEASE_SECS,
                external_vteps: vec![],
            }
        );
        let p = plan_network(&NewNetwork { no_gateway: true, ..new_network("10.1.0.0/24") }).unwrap();
        assert_eq!(p.gateway, None);
        let p = plan_network(&NewNetwork { gateway: Some(ip("10.1.0.254")), ..new_network("10.1.0.0/24") })
            .unwrap();
        assert_eq!(p.gateway, Some(ip("10.1.0.254")));
    }

    #[test]
    fn a_gateway_must_be_a_host_of_the_network() {
        for g in ["10.1.0.0", "10.1.0.255", "10.2.0.1"] {
            let req = NewNetwork { gateway: Some(ip(g)), ..new_network("10.1.0.0/24") };
            assert!(
                matches!(plan_network(&req), Err(NetworkError::NotInNetwork { what: "gateway", .. })),
                "{g}"
            );
        }
    }

    #[test]
    fn mtu_lease_and_vni_limits_are_inclusive() {
        let with = |f: fn(&mut NewNetwork)| {
            let mut r = new_network("10.1.0.0/24");
            f(&mut r);
            plan_network(&r)
        };
        assert_eq!(with(|r| r.mtu = Some(576)).unwrap().mtu, 576);
        assert_eq!(with(|r| r.mtu = Some(9000)).unwrap().mtu, 9000);
        assert!(matches!(with(|r| r.mtu = Some(575)), Err(NetworkError::Mtu(575))));
        assert!(matches!(with(|r| r.mtu = Some(9001)), Err(NetworkError::Mtu(9001))));
        assert_eq!(with(|r| r.lease_secs = Some(60)).unwrap().lease_secs, 60);
        assert!(matches!(with(|r| r.lease_secs = Some(59)), Err(NetworkError::Lease(59))));
        assert!(matches!(with(|r| r.lease_secs = Some(31_536_001)), Err(NetworkError::Lease(_))));
        assert!(with(|r| r.vni = Some(1)).is_ok());
        assert!(with(|r| r.vni = Some(MAX_VNI)).is_ok());
        assert!(matches!(with(|r| r.vni = Some(0)), Err(NetworkError::Vni(0))));
        assert!(matches!(with(|r| r.vni = Some(MAX_VNI + 1)), Err(NetworkError::Vni(v)) if v == MAX_VNI + 1));
    }

    #[test]
    fn a_network_request_is_refused_for_each_bad_field() {
        assert!(matches!(plan_network(&NewNetwork::default()), Err(NetworkError::Name { .. })));
        let no_cidr = NewNetwork { cidr: None, ..new_network("10.1.0.0/24") };
        assert!(matches!(plan_network(&no_cidr), Err(NetworkError::Cidr(_))));
        let wide = new_network("10.0.0.0/7");
        assert!(matches!(plan_network(&wide), Err(NetworkError::Cidr(_))));
        let vtep = NewNetwork { external_vteps: vec!["nowhere".into()], ..new_network("10.1.0.0/24") };
        assert!(matches!(plan_network(&vtep), Err(NetworkError::Vtep(_))));
        let uplink = NewNetwork {
            uplink: Some(Uplink { node: NodeId(1), bridge: "br 0".into() }),
            ..new_network("10.1.0.0/24")
        };
        assert!(matches!(plan_network(&uplink), Err(NetworkError::Ifname(_))));
    }

    #[test]
    fn auto_vnis_start_at_4096_and_fill_gaps() {
        assert_eq!(lowest_free_vni(&BTreeSet::new()), Some(FIRST_AUTO_VNI));
        assert_eq!(lowest_free_vni(&[5, 4096, 4097, 4099].into()), Some(4098));
        assert_eq!(lowest_free_vni(&[MAX_VNI].into()), Some(FIRST_AUTO_VNI));
    }

    #[test]
    fn the_lowest_free_value_is_none_when_the_range_is_used_up() {
        assert_eq!(lowest_free(10..=12, &[10, 11, 12].into()), None);
        assert_eq!(lowest_free(10..=12, &[9, 10, 12, 13].into()), Some(11));
        assert_eq!(lowest_free(10..=12, &[1, 2, 3].into()), Some(10));
        assert_eq!(lowest_free(u32::MAX - 1..=u32::MAX, &[u32::MAX - 1, u32::MAX].into()), None);
        assert_eq!(lowest_free(RangeInclusive::new(12, 10), &BTreeSet::new()), None);
    }

    #[test]
    fn an_update_changes_only_what_it_names() {
        let mut r = net("10.1.0.0/24", Some("10.1.0.1"));
        r.dns = vec![ip("9.9.9.9")];
        r.uplink = Some(Uplink { node: NodeId(2), bridge: "br0".into() });
        let before = r.clone();
        apply_update(&mut r, &check_update(NetworkUpdate::default()).unwrap());
        assert_eq!(r, before);
        let u = NetworkUpdate {
            mtu: Some(1400),
            uplink: Some(None),
            external_vteps: Some(vec!["192.0.2.7".into()]),
            ..NetworkUpdate::default()
        };
        apply_update(&mut r, &check_update(u).unwrap());
        assert_eq!((r.mtu, r.dns.clone(), r.uplink.clone()), (1400, before.dns.clone(), None));
        assert_eq!(r.external_vteps, ["192.0.2.7:4789"]);
        assert_eq!(r.lease_secs, before.lease_secs);
    }

    #[test]
    fn an_update_is_refused_for_each_bad_field() {
        let bad = [
            NetworkUpdate { mtu: Some(9001), ..NetworkUpdate::default() },
            NetworkUpdate { lease_secs: Some(1), ..NetworkUpdate::default() },
            NetworkUpdate { external_vteps: Some(vec!["0.0.0.0".into()]), ..NetworkUpdate::default() },
            NetworkUpdate {
                uplink: Some(Some(Uplink { node: NodeId(1), bridge: String::new() })),
                ..NetworkUpdate::default()
            },
        ];
        for u in bad {
            assert!(check_update(u.clone()).is_err(), "{u:?}");
        }
    }

    #[test]
    fn a_port_may_not_ask_for_the_network_broadcast_gateway_or_outside_address() {
        let n = net("10.1.0.0/24", Some("10.1.0.1"));
        let with_ip = |s: &str| NewPort { ip: Some(ip(s)), ..new_port(tap("t0")) };
        assert!(check_port(&n, &with_ip("10.1.0.2")).is_ok());
        assert!(check_port(&n, &with_ip("10.1.0.254")).is_ok());
        for bad in ["10.1.0.0", "10.1.0.255", "10.2.0.5"] {
            assert!(
                matches!(check_port(&n, &with_ip(bad)), Err(NetworkError::NotInNetwork { what: "ip", .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            check_port(&n, &with_ip("10.1.0.1")),
            Err(NetworkError::IpTaken { ip: i, .. }) if i == ip("10.1.0.1")
        ));
        // Without a gateway its address is a host like any other.
        assert!(check_port(&net("10.1.0.0/24", None), &with_ip("10.1.0.1")).is_ok());
    }

    #[test]
    fn a_port_request_is_refused_for_a_group_mac_bad_tap_or_too_many_groups() {
        let n = net("10.1.0.0/24", Some("10.1.0.1"));
        for m in [MacAddr::BROADCAST, MacAddr([1, 0, 0x5e, 0, 0, 1]), MacAddr([0; 6])] {
            let req = NewPort { mac: Some(m), ..new_port(tap("t0")) };
            assert!(matches!(check_port(&n, &req), Err(NetworkError::Mac(x)) if x == m));
        }
        assert!(matches!(check_port(&n, &new_port(tap("a/b"))), Err(NetworkError::Ifname(_))));
        let groups = |k: usize| NewPort { security_groups: vec!["g".into(); k], ..new_port(tap("t0")) };
        assert!(check_port(&n, &groups(MAX_GROUPS_PER_PORT)).is_ok());
        assert!(matches!(check_port(&n, &groups(MAX_GROUPS_PER_PORT + 1)), Err(NetworkError::TooManyGroups)));
        assert!(check_port(&n, &new_port(PortKind::Vm { vm: VmId(1), nic: 0 })).is_ok());
    }

    #[test]
    fn a_tap_name_is_taken_per_node_across_networks() {
        let ports = [port(1, 1, 1, tap("t0"), 1), port(2, 2, 2, tap("t1"), 2)];
        assert!(matches!(
            check_tap_free(&ports, NodeId(1), &tap("t0")),
            Err(NetworkError::IfnameTaken { node: NodeId(1), ifname }) if ifname == "t0"
        ));
        assert!(check_tap_free(&ports, NodeId(2), &tap("t0")).is_ok());
        assert!(check_tap_free(&ports, NodeId(1), &tap("t1")).is_ok());
        assert!(check_tap_free(&ports, NodeId(1), &PortKind::Vm { vm: VmId(1), nic: 0 }).is_ok());
    }

    #[test]
    fn a_mac_is_unique_per_network_and_a_random_one_avoids_taken_ones() {
        let n = net("10.1.0.0/24", None);
        let ports = [port(1, 1, 1, tap("t0"), 1), port(2, 2, 1, tap("t1"), 2)];
        let taken = MacAddr([2, 0, 0, 0, 0, 1]);
        assert!(matches!(
            port_mac(&ports, &n, Some(taken), MacAddr::random),
            Err(NetworkError::MacTaken { mac, .. }) if mac == taken
        ));
        let other_net = MacAddr([2, 0, 0, 0, 0, 2]);
        assert_eq!(port_mac(&ports, &n, Some(other_net), MacAddr::random).unwrap(), other_net);
        let mut draws = [taken, taken, MacAddr([2, 0, 0, 0, 0, 9])].into_iter();
        let got = port_mac(&ports, &n, None, || draws.next().unwrap()).unwrap();
        assert_eq!(got, MacAddr([2, 0, 0, 0, 0, 9]));
    }

    #[test]
    fn addresses_are_handed_out_lowest_first_skipping_the_gateway() {
        let n = net("10.1.0.0/29", Some("10.1.0.1"));
        assert_eq!(lowest_free_ip(&n, &BTreeSet::new()).unwrap(), ip("10.1.0.2"));
        let leased: BTreeSet<Ipv4Addr> = ["10.1.0.2", "10.1.0.3", "10.1.0.5"].map(ip).into();
        assert_eq!(lowest_free_ip(&n, &leased).unwrap(), ip("10.1.0.4"));
        let no_gw = net("10.1.0.0/29", None);
        assert_eq!(lowest_free_ip(&no_gw, &BTreeSet::new()).unwrap(), ip("10.1.0.1"));
    }

    #[test]
    fn a_full_network_says_so() {
        let n = net("10.1.0.0/30", Some("10.1.0.1"));
        let leased: BTreeSet<Ipv4Addr> = [ip("10.1.0.2")].into();
        assert!(matches!(lowest_free_ip(&n, &leased), Err(NetworkError::Full(name)) if name == "tenant-a"));
        // Nor is the broadcast address ever handed out.
        let no_gw = net("10.1.0.0/30", None);
        let leased: BTreeSet<Ipv4Addr> = ["10.1.0.1", "10.1.0.2"].map(ip).into();
        assert!(matches!(lowest_free_ip(&no_gw, &leased), Err(NetworkError::Full(_))));
    }

    #[test]
    fn a_new_group_has_its_rules_once_and_default_egress_if_asked() {
        let ssh = rule("ingress tcp 22");
        let rules = new_group_rules(&[ssh, ssh], false).unwrap();
        assert_eq!(rules, [ssh]);
        let rules = new_group_rules(&[ssh, rule("egress any ::/0")], true).unwrap();
        assert_eq!(rules, [ssh, rule("egress any ::/0"), rule("egress any 0.0.0.0/0")]);
    }

    #[test]
    fn a_group_holds_at_most_256_rules() {
        let many: Vec<SecurityRule> = (1..=256).map(|p| rule(&format!("ingress tcp {p}"))).collect();
        assert_eq!(new_group_rules(&many, false).unwrap().len(), 256);
        assert!(matches!(new_group_rules(&many, true), Err(NetworkError::TooManyRules)));
        assert!(matches!(
            change_rule_set("g", &many, &[rule("ingress udp 53")], &[]),
            Err(NetworkError::TooManyRules)
        ));
        let swapped = change_rule_set("g", &many, &[rule("ingress udp 53")], &[many[0]]).unwrap();
        assert_eq!((swapped.len(), swapped.last().copied()), (256, Some(rule("ingress udp 53"))));
    }

    #[test]
    fn rules_are_removed_then_added_and_a_missing_rule_is_named() {
        let (ssh, web, dns) = (rule("ingress tcp 22"), rule("ingress tcp 443"), rule("ingress udp 53"));
        assert_eq!(change_rule_set("g", &[ssh, web], &[dns, ssh], &[web]).unwrap(), [ssh, dns]);
        assert!(matches!(
            change_rule_set("g", &[ssh], &[], &[web]),
            Err(NetworkError::NoRule { group, rule }) if group == "g" && rule == web.to_string()
        ));
    }

    #[test]
    fn users_of_a_group_are_the_ports_that_list_it() {
        let mut a = port(1, 1, 1, tap("t0"), 1);
        a.security_groups = vec![SecurityGroupId(7), SecurityGroupId(8)];
        let mut b = port(2, 2, 2, tap("t0"), 2);
        b.security_groups = vec![SecurityGroupId(8)];
        let ports = [a, b, port(3, 1, 1, tap("t1"), 3)];
        assert_eq!(users_of_group(&ports, SecurityGroupId(7)), 1);
        assert_eq!(users_of_group(&ports, SecurityGroupId(8)), 2);
        assert_eq!(users_of_group(&ports, SecurityGroupId(9)), 0);
    }
}
