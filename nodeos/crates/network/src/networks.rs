//! [`Networks`]: the pool's networks, ports and security groups in meta.
//!
//! Invariants kept by transactions (each create or delete writes every key
//! it affects at once, guarded by compares on what it read):
//! - a network name and a VNI belong to one network (`network-names/`,
//!   `network-vnis/`);
//! - an address of a network belongs to one port (`ipam/<network>/<ip>`),
//!   never the gateway, the network or the broadcast address;
//! - a network with ports, and a security group used by ports, cannot be
//!   deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use nodeos_meta::command::{Compare, Op, Txn};
use nodeos_meta::{Command, Consistency, MetaError, MetaHandle};
use nodeos_switch::vxlan::{MAX_VNI, VXLAN_PORT};
use nodeos_types::net::{Cidr, MacAddr, SecurityRule};
use nodeos_types::records::{
    DEFAULT_NETWORK_MTU, IPAM_PREFIX, NETWORK_VNIS_PREFIX, NETWORKS_PREFIX, NODES_PREFIX, NetworkRecord,
    NodeRecord, PORTS_PREFIX, PortKind, PortRecord, SECURITY_GROUPS_PREFIX, SecurityGroupRecord, Uplink,
    ipam_key, network_key, network_name_key, network_vni_key, node_key, port_key, security_group_key,
    security_group_name_key,
};
use nodeos_types::{NetworkId, NodeId, PortId, SecurityGroupId, VmId, unix_millis};
use tracing::info;

/// First VNI handed out when none is asked for (lower ones are left to operators).
const FIRST_AUTO_VNI: u32 = 4096;
const DEFAULT_LEASE_SECS: u32 = 86400;
/// MTU bounds: IPv4's minimum, and a 9216-byte jumbo frame less the tunnel overhead.
const MTU_RANGE: std::ops::RangeInclusive<u16> = 576..=9000;
/// Retries of a transaction that lost a race (an address taken meanwhile).
const TXN_RETRIES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("no network {0:?} in this pool")]
    NoNetwork(String),
    #[error("no port {0:?} in this pool")]
    NoPort(String),
    #[error("no security group {0:?} in this pool")]
    NoSecurityGroup(String),
    #[error("no node {0} in this pool")]
    NoNode(NodeId),
    #[error("{what} name must be 1..=63 characters of a-z, 0-9, '-' and '_', got {name:?}")]
    Name { what: &'static str, name: String },
    #[error("a {what} named {name:?} already exists")]
    NameTaken { what: &'static str, name: String },
    #[error("vni must be 1..={MAX_VNI}, got {0}")]
    Vni(u32),
    #[error("VNI {0} is already used by another network")]
    VniTaken(u32),
    #[error("cidr {0} must be an IPv4 block of /8../30")]
    Cidr(Cidr),
    #[error("{what} {ip} must be a host address of {cidr}")]
    NotInNetwork { what: &'static str, ip: Ipv4Addr, cidr: Cidr },
    #[error("mtu must be 576..=9000, got {0}")]
    Mtu(u16),
    #[error("lease time must be 60..=31536000 seconds, got {0}")]
    Lease(u32),
    #[error("external VTEP {0:?} is not ip or ip:port")]
    Vtep(String),
    #[error("interface name {0:?} must be 1..=15 characters of a-z, A-Z, 0-9, '-', '_' and '.'")]
    Ifname(String),
    #[error("node {node} already has a port on interface {ifname}")]
    IfnameTaken { node: NodeId, ifname: String },
    #[error("MAC {0} must be a unicast address")]
    Mac(MacAddr),
    #[error("MAC {mac} is already used on network {network}")]
    MacTaken { mac: MacAddr, network: String },
    #[error("address {ip} is already leased on network {network}")]
    IpTaken { ip: Ipv4Addr, network: String },
    #[error("network {0} has no free address left")]
    Full(String),
    #[error("network {network} still has {ports} port(s); delete them first")]
    HasPorts { network: String, ports: usize },
    #[error("security group {group} is used by {ports} port(s); take it off them first")]
    GroupInUse { group: String, ports: usize },
    #[error("security group {group} has no rule {rule}")]
    NoRule { group: String, rule: String },
    #[error("a port can have at most 16 security groups")]
    TooManyGroups,
    #[error("a security group can have at most 256 rules")]
    TooManyRules,
    #[error("the records changed while this request ran; retry")]
    Conflict,
    #[error("metadata store")]
    Meta(#[source] Box<MetaError>),
    #[error("stored record {0} does not decode")]
    Record(String),
}

impl From<MetaError> for NetworkError {
    fn from(e: MetaError) -> Self {
        NetworkError::Meta(Box::new(e))
    }
}

fn check_name(what: &'static str, name: &str) -> Result<(), NetworkError> {
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

/// Parses an external VTEP, `ip` or `ip:port` (port 4789 by default).
pub fn parse_vtep(s: &str) -> Result<SocketAddr, NetworkError> {
    let bad = || NetworkError::Vtep(s.chars().take(64).collect());
    if let Ok(a) = s.parse::<SocketAddr>() {
        return if a.port() == 0 || a.ip().is_unspecified() { Err(bad()) } else { Ok(a) };
    }
    let ip: IpAddr = s.parse().map_err(|_| bad())?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(bad());
    }
    Ok(SocketAddr::new(ip, VXLAN_PORT))
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, NetworkError> {
    serde_json::from_slice(value).map_err(|_| NetworkError::Record(key.to_owned()))
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records always serialize")
}

fn put(key: String, value: Vec<u8>) -> Op {
    Op::Put { key, value }
}

fn absent(key: &str) -> Compare {
    Compare::ModRevision { key: key.to_owned(), equals: 0 }
}

fn unchanged(key: &str, rev: u64) -> Compare {
    Compare::ModRevision { key: key.to_owned(), equals: rev }
}

/// A network to create.
#[derive(Debug, Clone, Default)]
pub struct NewNetwork {
    pub name: String,
    /// Given, or the lowest free one from 4096.
    pub vni: Option<u32>,
    pub cidr: Option<Cidr>,
    /// Given, or the block's first host address; `no_gateway` for none.
    pub gateway: Option<Ipv4Addr>,
    pub no_gateway: bool,
    pub mtu: Option<u16>,
    pub dns: Vec<Ipv4Addr>,
    pub lease_secs: Option<u32>,
    pub uplink: Option<Uplink>,
    pub external_vteps: Vec<String>,
}

/// Changes to a network; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct NetworkUpdate {
    pub mtu: Option<u16>,
    pub dns: Option<Vec<Ipv4Addr>>,
    pub lease_secs: Option<u32>,
    /// `Some(None)` removes the uplink.
    pub uplink: Option<Option<Uplink>>,
    pub external_vteps: Option<Vec<String>>,
}

/// A port to create.
#[derive(Debug, Clone)]
pub struct NewPort {
    pub network: String,
    pub node: NodeId,
    pub kind: PortKind,
    pub mac: Option<MacAddr>,
    /// Given, or the lowest free address of the network.
    pub ip: Option<Ipv4Addr>,
    pub security_groups: Vec<String>,
    pub port_security: bool,
}

/// The pool's network records, over meta.
#[derive(Clone, Debug)]
pub struct Networks {
    meta: MetaHandle,
}

impl Networks {
    pub fn new(meta: MetaHandle) -> Self {
        Networks { meta }
    }

    async fn range<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(T, u64)>, NetworkError> {
        let (kvs, _) = self.meta.range(prefix, 0, Consistency::Linearizable).await?;
        kvs.iter().map(|kv| Ok((decode(&kv.key, &kv.value)?, kv.mod_revision))).collect()
    }

    async fn txn(&self, t: Txn) -> Result<bool, NetworkError> {
        Ok(self.meta.write(Command::Txn(t)).await?.succeeded)
    }

    /// A record by id or through a name index, with its mod revision.
    async fn lookup<T: serde::de::DeserializeOwned>(
        &self,
        key_of_id: Option<String>,
        name_key: Option<String>,
        id_key: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<(T, u64)>, NetworkError> {
        if let Some(k) = key_of_id
            && let (Some(kv), _) = self.meta.get(&k, Consistency::Linearizable).await?
        {
            return Ok(Some((decode(&kv.key, &kv.value)?, kv.mod_revision)));
        }
        let Some(nk) = name_key else { return Ok(None) };
        let (Some(kv), _) = self.meta.get(&nk, Consistency::Linearizable).await? else { return Ok(None) };
        let Some(k) = std::str::from_utf8(&kv.value).ok().and_then(&id_key) else {
            return Err(NetworkError::Record(kv.key.clone()));
        };
        let (kv, _) = self.meta.get(&k, Consistency::Linearizable).await?;
        kv.map(|kv| Ok((decode(&kv.key, &kv.value)?, kv.mod_revision))).transpose()
    }

    // ---- networks ----

    pub async fn list_networks(&self) -> Result<Vec<NetworkRecord>, NetworkError> {
        Ok(self.range(NETWORKS_PREFIX).await?.into_iter().map(|(r, _)| r).collect())
    }

    /// A network by name or id, with its record's mod revision.
    pub async fn network(&self, network: &str) -> Result<(NetworkRecord, u64), NetworkError> {
        self.lookup(
            network.parse::<NetworkId>().ok().map(network_key),
            check_name("network", network).is_ok().then(|| network_name_key(network)),
            |id| id.parse::<NetworkId>().ok().map(network_key),
        )
        .await?
        .ok_or_else(|| NetworkError::NoNetwork(network.to_owned()))
    }

    pub async fn create_network(&self, req: NewNetwork) -> Result<NetworkRecord, NetworkError> {
        check_name("network", &req.name)?;
        let cidr =
            req.cidr.ok_or(NetworkError::Cidr(Cidr::new(Ipv4Addr::UNSPECIFIED.into(), 0).expect("valid")))?;
        if !(8..=30).contains(&cidr.prefix()) || cidr.hosts_v4().is_none() {
            return Err(NetworkError::Cidr(cidr));
        }
        let gateway = match (req.no_gateway, req.gateway) {
            (true, _) => None,
            (false, Some(g)) => Some(g),
            (false, None) => cidr.hosts_v4().map(|h| Ipv4Addr::from(*h.start())),
        };
        if let Some(g) = gateway {
            check_host(&cidr, g, "gateway")?;
        }
        let mtu = req.mtu.unwrap_or(DEFAULT_NETWORK_MTU);
        if !MTU_RANGE.contains(&mtu) {
            return Err(NetworkError::Mtu(mtu));
        }
        let lease_secs = req.lease_secs.unwrap_or(DEFAULT_LEASE_SECS);
        check_lease(lease_secs)?;
        let external_vteps = check_vteps(&req.external_vteps)?;
        if let Some(u) = &req.uplink {
            self.check_uplink(u).await?;
        }
        if let Some(v) = req.vni
            && !(1..=MAX_VNI).contains(&v)
        {
            return Err(NetworkError::Vni(v));
        }
        for _ in 0..TXN_RETRIES {
            let vni = match req.vni {
                Some(v) => v,
                None => self.free_vni().await?,
            };
            let now = unix_millis();
            let r = NetworkRecord {
                id: NetworkId::random(),
                name: req.name.clone(),
                vni,
                cidr,
                gateway,
                mtu,
                dns: req.dns.clone(),
                lease_secs,
                uplink: req.uplink.clone(),
                external_vteps: external_vteps.clone(),
                created_at_ms: now,
                updated_at_ms: now,
            };
            let (name_key, vni_key) = (network_name_key(&r.name), network_vni_key(vni));
            let ok = self
                .txn(Txn {
                    compares: vec![absent(&name_key), absent(&vni_key)],
                    success: vec![
                        put(network_key(r.id), encode(&r)),
                        put(name_key.clone(), r.id.to_string().into_bytes()),
                        put(vni_key.clone(), r.id.to_string().into_bytes()),
                    ],
                    failure: vec![],
                })
                .await?;
            if ok {
                info!(network = %r.name, id = %r.id, vni, cidr = %r.cidr, "network created");
                return Ok(r);
            }
            if self.meta.get(&name_key, Consistency::Linearizable).await?.0.is_some() {
                return Err(NetworkError::NameTaken { what: "network", name: r.name });
            }
            if req.vni.is_some() {
                return Err(NetworkError::VniTaken(vni));
            }
        }
        Err(NetworkError::Conflict)
    }

    async fn free_vni(&self) -> Result<u32, NetworkError> {
        let (kvs, _) = self.meta.range(NETWORK_VNIS_PREFIX, 0, Consistency::Linearizable).await?;
        let used: BTreeSet<u32> =
            kvs.iter().filter_map(|kv| kv.key.strip_prefix(NETWORK_VNIS_PREFIX)?.parse().ok()).collect();
        (FIRST_AUTO_VNI..=MAX_VNI).find(|v| !used.contains(v)).ok_or(NetworkError::Vni(0))
    }

    async fn check_uplink(&self, u: &Uplink) -> Result<(), NetworkError> {
        check_ifname(&u.bridge)?;
        let (kv, _) = self.meta.get(&node_key(u.node), Consistency::Linearizable).await?;
        kv.map(|_| ()).ok_or(NetworkError::NoNode(u.node))
    }

    pub async fn update_network(
        &self,
        network: &str,
        u: NetworkUpdate,
    ) -> Result<NetworkRecord, NetworkError> {
        if let Some(m) = u.mtu
            && !MTU_RANGE.contains(&m)
        {
            return Err(NetworkError::Mtu(m));
        }
        if let Some(l) = u.lease_secs {
            check_lease(l)?;
        }
        let vteps = u.external_vteps.as_deref().map(check_vteps).transpose()?;
        if let Some(Some(up)) = &u.uplink {
            self.check_uplink(up).await?;
        }
        for _ in 0..TXN_RETRIES {
            let (mut r, rev) = self.network(network).await?;
            if let Some(m) = u.mtu {
                r.mtu = m;
            }
            if let Some(d) = &u.dns {
                r.dns = d.clone();
            }
            if let Some(l) = u.lease_secs {
                r.lease_secs = l;
            }
            if let Some(up) = &u.uplink {
                r.uplink = up.clone();
            }
            if let Some(v) = &vteps {
                r.external_vteps = v.clone();
            }
            r.updated_at_ms = unix_millis();
            let key = network_key(r.id);
            let ok = self
                .txn(Txn {
                    compares: vec![unchanged(&key, rev)],
                    success: vec![put(key, encode(&r))],
                    failure: vec![],
                })
                .await?;
            if ok {
                info!(network = %r.name, "network changed");
                return Ok(r);
            }
        }
        Err(NetworkError::Conflict)
    }

    pub async fn delete_network(&self, network: &str) -> Result<NetworkRecord, NetworkError> {
        let (r, rev) = self.network(network).await?;
        let ports = self.ports_of(r.id).await?.len();
        if ports > 0 {
            return Err(NetworkError::HasPorts { network: r.name, ports });
        }
        let key = network_key(r.id);
        let ok = self
            .txn(Txn {
                compares: vec![unchanged(&key, rev)],
                success: vec![
                    Op::Delete { key },
                    Op::Delete { key: network_name_key(&r.name) },
                    Op::Delete { key: network_vni_key(r.vni) },
                ],
                failure: vec![],
            })
            .await?;
        if !ok {
            return Err(NetworkError::Conflict);
        }
        info!(network = %r.name, "network deleted");
        Ok(r)
    }

    // ---- ports ----

    pub async fn list_ports(&self) -> Result<Vec<PortRecord>, NetworkError> {
        Ok(self.range(PORTS_PREFIX).await?.into_iter().map(|(r, _)| r).collect())
    }

    async fn ports_of(&self, network: NetworkId) -> Result<Vec<PortRecord>, NetworkError> {
        Ok(self.list_ports().await?.into_iter().filter(|p| p.network == network).collect())
    }

    /// The ports of VM `vm`, in NIC order.
    pub async fn ports_of_vm(&self, vm: VmId) -> Result<Vec<PortRecord>, NetworkError> {
        let mut v: Vec<PortRecord> = self
            .list_ports()
            .await?
            .into_iter()
            .filter(|p| matches!(p.kind, PortKind::Vm { vm: v, .. } if v == vm))
            .collect();
        v.sort_by_key(|p| match p.kind {
            PortKind::Vm { nic, .. } => nic,
            PortKind::Tap { .. } => 0,
        });
        Ok(v)
    }

    pub async fn port(&self, port: &str) -> Result<(PortRecord, u64), NetworkError> {
        self.lookup(port.parse::<PortId>().ok().map(port_key), None, |_| None)
            .await?
            .ok_or_else(|| NetworkError::NoPort(port.to_owned()))
    }

    async fn group_ids(&self, groups: &[String]) -> Result<Vec<SecurityGroupId>, NetworkError> {
        if groups.len() > 16 {
            return Err(NetworkError::TooManyGroups);
        }
        let mut ids = Vec::new();
        for g in groups {
            let id = self.security_group(g).await?.0.id;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    pub async fn create_port(&self, req: NewPort) -> Result<PortRecord, NetworkError> {
        let (net, _) = self.network(&req.network).await?;
        let net_id = net.id;
        if self.meta.get(&node_key(req.node), Consistency::Linearizable).await?.0.is_none() {
            return Err(NetworkError::NoNode(req.node));
        }
        if let Some(m) = req.mac
            && !m.is_unicast()
        {
            return Err(NetworkError::Mac(m));
        }
        if let Some(ip) = req.ip {
            check_host(&net.cidr, ip, "ip")?;
            if Some(ip) == net.gateway {
                return Err(NetworkError::IpTaken { ip, network: net.name });
            }
        }
        let groups = self.group_ids(&req.security_groups).await?;
        for _ in 0..TXN_RETRIES {
            // Re-read: the port is only made on the network as it stands.
            let (net, net_rev) = self.network(&net_id.to_string()).await?;
            let ports = self.list_ports().await?;
            if let PortKind::Tap { ifname } = &req.kind {
                check_ifname(ifname)?;
                let taken = ports.iter().any(|p| {
                    p.node == req.node && matches!(&p.kind, PortKind::Tap { ifname: i } if i == ifname)
                });
                if taken {
                    return Err(NetworkError::IfnameTaken { node: req.node, ifname: ifname.clone() });
                }
            }
            let macs: BTreeSet<MacAddr> =
                ports.iter().filter(|p| p.network == net.id).map(|p| p.mac).collect();
            let mac = match req.mac {
                Some(m) if macs.contains(&m) => {
                    return Err(NetworkError::MacTaken { mac: m, network: net.name });
                }
                Some(m) => m,
                None => loop {
                    let m = MacAddr::random();
                    if !macs.contains(&m) {
                        break m;
                    }
                },
            };
            let ip = match req.ip {
                Some(ip) => ip,
                None => self.free_ip(&net).await?,
            };
            let now = unix_millis();
            let p = PortRecord {
                id: PortId::random(),
                network: net.id,
                node: req.node,
                kind: req.kind.clone(),
                mac,
                ip: Some(ip),
                security_groups: groups.clone(),
                port_security: req.port_security,
                created_at_ms: now,
                updated_at_ms: now,
            };
            let lease = ipam_key(net.id, ip);
            let ok = self
                .txn(Txn {
                    compares: vec![absent(&lease), unchanged(&network_key(net.id), net_rev)],
                    success: vec![put(port_key(p.id), encode(&p)), put(lease, p.id.to_string().into_bytes())],
                    failure: vec![],
                })
                .await?;
            if ok {
                info!(port = %p.id, network = %net.name, node = %p.node, mac = %p.mac, ip = %ip, "port created");
                return Ok(p);
            }
            if req.ip.is_some() {
                return Err(NetworkError::IpTaken { ip, network: net.name });
            }
        }
        Err(NetworkError::Conflict)
    }

    async fn free_ip(&self, net: &NetworkRecord) -> Result<Ipv4Addr, NetworkError> {
        let prefix = format!("{IPAM_PREFIX}{}/", net.id);
        let (kvs, _) = self.meta.range(&prefix, 0, Consistency::Linearizable).await?;
        let used: BTreeSet<Ipv4Addr> =
            kvs.iter().filter_map(|kv| kv.key.strip_prefix(&prefix)?.parse().ok()).collect();
        let hosts = net.cidr.hosts_v4().ok_or_else(|| NetworkError::Full(net.name.clone()))?;
        hosts
            .map(Ipv4Addr::from)
            .find(|ip| !used.contains(ip) && Some(*ip) != net.gateway)
            .ok_or_else(|| NetworkError::Full(net.name.clone()))
    }

    /// Replaces a port's security groups and port-security switch.
    pub async fn set_port_security(
        &self,
        port: &str,
        groups: Option<Vec<String>>,
        port_security: Option<bool>,
    ) -> Result<PortRecord, NetworkError> {
        let ids = match &groups {
            Some(g) => Some(self.group_ids(g).await?),
            None => None,
        };
        for _ in 0..TXN_RETRIES {
            let (mut p, rev) = self.port(port).await?;
            if let Some(ids) = &ids {
                p.security_groups = ids.clone();
            }
            if let Some(s) = port_security {
                p.port_security = s;
            }
            p.updated_at_ms = unix_millis();
            let key = port_key(p.id);
            let ok = self
                .txn(Txn {
                    compares: vec![unchanged(&key, rev)],
                    success: vec![put(key, encode(&p))],
                    failure: vec![],
                })
                .await?;
            if ok {
                info!(port = %p.id, "port security changed");
                return Ok(p);
            }
        }
        Err(NetworkError::Conflict)
    }

    pub async fn delete_port(&self, port: &str) -> Result<PortRecord, NetworkError> {
        let (p, rev) = self.port(port).await?;
        let key = port_key(p.id);
        let mut success = vec![Op::Delete { key: key.clone() }];
        if let Some(ip) = p.ip {
            success.push(Op::Delete { key: ipam_key(p.network, ip) });
        }
        if !self.txn(Txn { compares: vec![unchanged(&key, rev)], success, failure: vec![] }).await? {
            return Err(NetworkError::Conflict);
        }
        info!(port = %p.id, "port deleted");
        Ok(p)
    }

    // ---- security groups ----

    pub async fn list_security_groups(&self) -> Result<Vec<SecurityGroupRecord>, NetworkError> {
        Ok(self.range(SECURITY_GROUPS_PREFIX).await?.into_iter().map(|(r, _)| r).collect())
    }

    pub async fn security_group(&self, group: &str) -> Result<(SecurityGroupRecord, u64), NetworkError> {
        self.lookup(
            group.parse::<SecurityGroupId>().ok().map(security_group_key),
            check_name("security group", group).is_ok().then(|| security_group_name_key(group)),
            |id| id.parse::<SecurityGroupId>().ok().map(security_group_key),
        )
        .await?
        .ok_or_else(|| NetworkError::NoSecurityGroup(group.to_owned()))
    }

    /// Creates a group with `rules`; with `default_egress` it also allows
    /// all egress (IPv4 and IPv6), as most operators expect of a new group.
    pub async fn create_security_group(
        &self,
        name: &str,
        mut rules: Vec<SecurityRule>,
        default_egress: bool,
    ) -> Result<SecurityGroupRecord, NetworkError> {
        check_name("security group", name)?;
        if default_egress {
            for r in ["egress any 0.0.0.0/0", "egress any ::/0"] {
                let r: SecurityRule = r.parse().expect("fixed rule text parses");
                if !rules.contains(&r) {
                    rules.push(r);
                }
            }
        }
        if rules.len() > 256 {
            return Err(NetworkError::TooManyRules);
        }
        let now = unix_millis();
        let g = SecurityGroupRecord {
            id: SecurityGroupId::random(),
            name: name.to_owned(),
            rules,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let name_key = security_group_name_key(name);
        let ok = self
            .txn(Txn {
                compares: vec![absent(&name_key)],
                success: vec![
                    put(security_group_key(g.id), encode(&g)),
                    put(name_key, g.id.to_string().into_bytes()),
                ],
                failure: vec![],
            })
            .await?;
        if !ok {
            return Err(NetworkError::NameTaken { what: "security group", name: name.to_owned() });
        }
        info!(group = %g.name, id = %g.id, rules = g.rules.len(), "security group created");
        Ok(g)
    }

    /// Adds and removes rules of a group; ports using it follow at once.
    pub async fn change_rules(
        &self,
        group: &str,
        add: &[SecurityRule],
        remove: &[SecurityRule],
    ) -> Result<SecurityGroupRecord, NetworkError> {
        for _ in 0..TXN_RETRIES {
            let (mut g, rev) = self.security_group(group).await?;
            for r in remove {
                let before = g.rules.len();
                g.rules.retain(|x| x != r);
                if g.rules.len() == before {
                    return Err(NetworkError::NoRule { group: g.name, rule: r.to_string() });
                }
            }
            for r in add {
                if !g.rules.contains(r) {
                    g.rules.push(*r);
                }
            }
            if g.rules.len() > 256 {
                return Err(NetworkError::TooManyRules);
            }
            g.updated_at_ms = unix_millis();
            let key = security_group_key(g.id);
            let ok = self
                .txn(Txn {
                    compares: vec![unchanged(&key, rev)],
                    success: vec![put(key, encode(&g))],
                    failure: vec![],
                })
                .await?;
            if ok {
                info!(group = %g.name, rules = g.rules.len(), "security group rules changed");
                return Ok(g);
            }
        }
        Err(NetworkError::Conflict)
    }

    pub async fn delete_security_group(&self, group: &str) -> Result<SecurityGroupRecord, NetworkError> {
        let (g, rev) = self.security_group(group).await?;
        let users = self.list_ports().await?.iter().filter(|p| p.security_groups.contains(&g.id)).count();
        if users > 0 {
            return Err(NetworkError::GroupInUse { group: g.name, ports: users });
        }
        let key = security_group_key(g.id);
        let ok = self
            .txn(Txn {
                compares: vec![unchanged(&key, rev)],
                success: vec![Op::Delete { key }, Op::Delete { key: security_group_name_key(&g.name) }],
                failure: vec![],
            })
            .await?;
        if !ok {
            return Err(NetworkError::Conflict);
        }
        info!(group = %g.name, "security group deleted");
        Ok(g)
    }

    /// Every node record, by id.
    pub async fn nodes(&self, c: Consistency) -> Result<BTreeMap<NodeId, NodeRecord>, NetworkError> {
        let (kvs, _) = self.meta.range(NODES_PREFIX, 0, c).await?;
        let mut out = BTreeMap::new();
        for kv in kvs {
            let n: NodeRecord = decode(&kv.key, &kv.value)?;
            out.insert(n.id, n);
        }
        Ok(out)
    }
}

fn check_host(cidr: &Cidr, ip: Ipv4Addr, what: &'static str) -> Result<(), NetworkError> {
    let ok = cidr.hosts_v4().is_some_and(|h| h.contains(&u32::from(ip)));
    if ok { Ok(()) } else { Err(NetworkError::NotInNetwork { what, ip, cidr: *cidr }) }
}

fn check_lease(secs: u32) -> Result<(), NetworkError> {
    if (60..=31_536_000).contains(&secs) { Ok(()) } else { Err(NetworkError::Lease(secs)) }
}

fn check_vteps(v: &[String]) -> Result<Vec<String>, NetworkError> {
    if v.len() > 64 {
        return Err(NetworkError::Vtep(format!("{} VTEPs (at most 64)", v.len())));
    }
    v.iter().map(|s| parse_vtep(s).map(|a| a.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vteps_parse_with_the_standard_port_by_default() {
        assert_eq!(parse_vtep("10.0.0.5").unwrap(), "10.0.0.5:4789".parse().unwrap());
        assert_eq!(parse_vtep("10.0.0.5:8472").unwrap(), "10.0.0.5:8472".parse().unwrap());
        for bad in ["", "10.0.0.5:0", "0.0.0.0", "host", "239.1.1.1", "10.0.0.5:99999"] {
            assert!(parse_vtep(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_and_ifnames_are_checked() {
        assert!(check_name("network", "tenant-a_1").is_ok());
        assert!(check_name("network", "Tenant").is_err());
        assert!(check_ifname("nt-a.0").is_ok());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("sixteen-chars-xx").is_err());
    }

    #[test]
    fn hosts_exclude_network_and_broadcast() {
        let c: Cidr = "10.9.0.0/30".parse().unwrap();
        assert!(check_host(&c, Ipv4Addr::new(10, 9, 0, 1), "ip").is_ok());
        assert!(check_host(&c, Ipv4Addr::new(10, 9, 0, 0), "ip").is_err());
        assert!(check_host(&c, Ipv4Addr::new(10, 9, 0, 3), "ip").is_err());
        assert!(check_host(&c, Ipv4Addr::new(10, 9, 1, 1), "ip").is_err());
    }
}
