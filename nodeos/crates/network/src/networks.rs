//! [`Networks`]: the pool's networks, ports and security groups in meta.
//!
//! Invariants kept by transactions (each create or delete writes every key
//! it affects at once, guarded by compares on what it read):
//! - a network name and a VNI belong to one network (`network-names/`,
//!   `network-vnis/`);
//! - an address of a network belongs to one port (`ipam/<network>/<ip>`),
//!   never the gateway, the network or the broadcast address;
//! - a port's network and security groups exist;
//! - a network with ports, and a security group used by ports, cannot be
//!   deleted.
//!
//! The last one spans records no single compare covers (a new port is a new
//! key), so a new port, or a port given groups, also rewrites the name
//! entries (`network-names/<name>`, `security-group-names/<name>`) of its
//! network and groups with the value they have. That moves their revisions
//! and nothing else: a delete reads the entry's revision before it counts
//! the users and compares it when it writes, so it fails rather than strand
//! a port made in between. A port's own compares are on the records, which
//! ports never write, so ports made at once do not conflict with each other.
//!
//! The rules themselves are pure functions in [`crate::rules`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use nodeos_meta::command::{Compare, Op, Txn};
use nodeos_meta::{Command, Consistency, MetaError, MetaHandle};
use nodeos_switch::vxlan::MAX_VNI;
use nodeos_types::net::{Cidr, MacAddr, SecurityRule};
use nodeos_types::records::{
    IPAM_PREFIX, NETWORK_VNIS_PREFIX, NETWORKS_PREFIX, NODES_PREFIX, NetworkRecord, NodeRecord, PORTS_PREFIX,
    PortKind, PortRecord, SECURITY_GROUPS_PREFIX, SecurityGroupRecord, Uplink, ipam_key, network_key,
    network_name_key, network_vni_key, node_key, port_key, security_group_key, security_group_name_key,
};
use nodeos_types::{NetworkId, NodeId, PortId, SecurityGroupId, VmId, unix_millis};
use tracing::info;

use crate::rules::{self, check_name};

/// Retries of a transaction whose records changed under it.
const TXN_RETRIES: usize = 8;
/// Tries of a request that keeps losing the key it picked (an address, a
/// VNI) to others. Each loss is another request's success, so this only
/// bounds a pathological churn; racers that many all get served.
const RACE_RETRIES: usize = 256;

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
    #[error("external VTEP {0:?} is not a unicast ip or ip:port")]
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

/// What a port listing `groups` adds to its transaction: compares that the
/// groups are as read (so still there), and their name entries rewritten
/// with the value they have (see the module docs).
fn group_users(groups: &[(SecurityGroupRecord, u64)]) -> (Vec<Compare>, Vec<Op>) {
    groups
        .iter()
        .map(|(g, rev)| {
            (
                unchanged(&security_group_key(g.id), *rev),
                put(security_group_name_key(&g.name), g.id.to_string().into_bytes()),
            )
        })
        .unzip()
}

/// How many times a request has failed its compare-and-swap, by cause.
#[derive(Debug, Default)]
struct Retries {
    conflicts: usize,
    races: usize,
}

impl Retries {
    /// The records it read changed under it.
    fn conflict(&mut self) -> Result<(), NetworkError> {
        self.conflicts += 1;
        if self.conflicts >= TXN_RETRIES { Err(NetworkError::Conflict) } else { Ok(()) }
    }

    /// Another request took the key it picked: it picks again.
    fn lost_race(&mut self) -> Result<(), NetworkError> {
        self.races += 1;
        if self.races >= RACE_RETRIES { Err(NetworkError::Conflict) } else { Ok(()) }
    }
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
        let plan = rules::plan_network(&req)?;
        if let Some(u) = &req.uplink {
            self.check_node(u.node).await?;
        }
        let mut retries = Retries::default();
        loop {
            let vni = match req.vni {
                Some(v) => v,
                None => self.free_vni().await?,
            };
            let now = unix_millis();
            let r = NetworkRecord {
                id: NetworkId::random(),
                name: req.name.clone(),
                vni,
                cidr: plan.cidr,
                gateway: plan.gateway,
                mtu: plan.mtu,
                dns: req.dns.clone(),
                lease_secs: plan.lease_secs,
                uplink: req.uplink.clone(),
                external_vteps: plan.external_vteps.clone(),
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
            if self.revision(&name_key).await? != 0 {
                return Err(NetworkError::NameTaken { what: "network", name: r.name });
            }
            if self.revision(&vni_key).await? == 0 {
                retries.conflict()?;
            } else if req.vni.is_some() {
                return Err(NetworkError::VniTaken(vni));
            } else {
                retries.lost_race()?;
            }
        }
    }

    /// The mod revision of `key`, 0 when it is absent.
    async fn revision(&self, key: &str) -> Result<u64, NetworkError> {
        Ok(self.meta.get(key, Consistency::Linearizable).await?.0.map_or(0, |kv| kv.mod_revision))
    }

    async fn free_vni(&self) -> Result<u32, NetworkError> {
        let (kvs, _) = self.meta.range(NETWORK_VNIS_PREFIX, 0, Consistency::Linearizable).await?;
        let used: BTreeSet<u32> =
            kvs.iter().filter_map(|kv| kv.key.strip_prefix(NETWORK_VNIS_PREFIX)?.parse().ok()).collect();
        // Vni(0) is how callers tell "none left" from a bad request.
        rules::lowest_free_vni(&used).ok_or(NetworkError::Vni(0))
    }

    async fn check_node(&self, node: NodeId) -> Result<(), NetworkError> {
        let (kv, _) = self.meta.get(&node_key(node), Consistency::Linearizable).await?;
        kv.map(|_| ()).ok_or(NetworkError::NoNode(node))
    }

    pub async fn update_network(
        &self,
        network: &str,
        u: NetworkUpdate,
    ) -> Result<NetworkRecord, NetworkError> {
        let u = rules::check_update(u)?;
        if let Some(Some(up)) = &u.uplink {
            self.check_node(up.node).await?;
        }
        let mut retries = Retries::default();
        loop {
            let (mut r, rev) = self.network(network).await?;
            rules::apply_update(&mut r, &u);
            r.updated_at_ms = unix_millis();
            let key = network_key(r.id);
            let ok = self.meta.write(Command::put_if(key, encode(&r), rev)).await?.succeeded;
            if ok {
                info!(network = %r.name, "network changed");
                return Ok(r);
            }
            retries.conflict()?;
        }
    }

    pub async fn delete_network(&self, network: &str) -> Result<NetworkRecord, NetworkError> {
        let mut retries = Retries::default();
        loop {
            let (r, rev) = self.network(network).await?;
            let key = network_key(r.id);
            let name_key = network_name_key(&r.name);
            // Read before the ports are counted; see the module docs.
            let name_rev = self.revision(&name_key).await?;
            let ports = self.ports_of(r.id).await?.len();
            if ports > 0 {
                return Err(NetworkError::HasPorts { network: r.name, ports });
            }
            let ok = self
                .txn(Txn {
                    compares: vec![unchanged(&key, rev), unchanged(&name_key, name_rev)],
                    success: vec![
                        Op::Delete { key },
                        Op::Delete { key: name_key },
                        Op::Delete { key: network_vni_key(r.vni) },
                    ],
                    failure: vec![],
                })
                .await?;
            if ok {
                info!(network = %r.name, "network deleted");
                return Ok(r);
            }
            retries.conflict()?;
        }
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

    /// The groups named, each once, with their records' mod revisions.
    async fn groups(&self, names: &[String]) -> Result<Vec<(SecurityGroupRecord, u64)>, NetworkError> {
        if names.len() > rules::MAX_GROUPS_PER_PORT {
            return Err(NetworkError::TooManyGroups);
        }
        let mut out: Vec<(SecurityGroupRecord, u64)> = Vec::new();
        for name in names {
            let (g, rev) = self.security_group(name).await?;
            if !out.iter().any(|(x, _)| x.id == g.id) {
                out.push((g, rev));
            }
        }
        Ok(out)
    }

    pub async fn create_port(&self, req: NewPort) -> Result<PortRecord, NetworkError> {
        let (net, _) = self.network(&req.network).await?;
        let net_id = net.id;
        self.check_node(req.node).await?;
        rules::check_port(&net, &req)?;
        let mut retries = Retries::default();
        loop {
            // Re-read: the port is only made on the network and groups as they stand.
            let (net, net_rev) = self.network(&net_id.to_string()).await.map_err(|e| match e {
                NetworkError::NoNetwork(_) => NetworkError::NoNetwork(req.network.clone()),
                e => e,
            })?;
            let groups = self.groups(&req.security_groups).await?;
            let ports = self.list_ports().await?;
            rules::check_tap_free(&ports, req.node, &req.kind)?;
            let mac = rules::port_mac(&ports, &net, req.mac, MacAddr::random)?;
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
                security_groups: groups.iter().map(|(g, _)| g.id).collect(),
                port_security: req.port_security,
                created_at_ms: now,
                updated_at_ms: now,
            };
            let lease = ipam_key(net.id, ip);
            let mut compares = vec![absent(&lease), unchanged(&network_key(net.id), net_rev)];
            let mut success = vec![
                put(port_key(p.id), encode(&p)),
                put(lease.clone(), p.id.to_string().into_bytes()),
                // Same value, new revision: see the module docs.
                put(network_name_key(&net.name), net.id.to_string().into_bytes()),
            ];
            let (more_compares, more_success) = group_users(&groups);
            compares.extend(more_compares);
            success.extend(more_success);
            if self.txn(Txn { compares, success, failure: vec![] }).await? {
                info!(port = %p.id, network = %net.name, node = %p.node, mac = %p.mac, ip = %ip, "port created");
                return Ok(p);
            }
            if self.revision(&lease).await? == 0 {
                // The network or a group changed: the address is still free.
                retries.conflict()?;
            } else if req.ip.is_some() {
                return Err(NetworkError::IpTaken { ip, network: net.name });
            } else {
                retries.lost_race()?;
            }
        }
    }

    async fn free_ip(&self, net: &NetworkRecord) -> Result<Ipv4Addr, NetworkError> {
        let prefix = format!("{IPAM_PREFIX}{}/", net.id);
        let (kvs, _) = self.meta.range(&prefix, 0, Consistency::Linearizable).await?;
        let leased: BTreeSet<Ipv4Addr> =
            kvs.iter().filter_map(|kv| kv.key.strip_prefix(&prefix)?.parse().ok()).collect();
        rules::lowest_free_ip(net, &leased)
    }

    /// Replaces a port's security groups and port-security switch.
    pub async fn set_port_security(
        &self,
        port: &str,
        groups: Option<Vec<String>>,
        port_security: Option<bool>,
    ) -> Result<PortRecord, NetworkError> {
        let mut retries = Retries::default();
        loop {
            let groups = match &groups {
                Some(g) => Some(self.groups(g).await?),
                None => None,
            };
            let (mut p, rev) = self.port(port).await?;
            if let Some(groups) = &groups {
                p.security_groups = groups.iter().map(|(g, _)| g.id).collect();
            }
            if let Some(s) = port_security {
                p.port_security = s;
            }
            p.updated_at_ms = unix_millis();
            let key = port_key(p.id);
            let mut compares = vec![unchanged(&key, rev)];
            let mut success = vec![put(key, encode(&p))];
            let (more_compares, more_success) = group_users(groups.as_deref().unwrap_or_default());
            compares.extend(more_compares);
            success.extend(more_success);
            if self.txn(Txn { compares, success, failure: vec![] }).await? {
                info!(port = %p.id, "port security changed");
                return Ok(p);
            }
            retries.conflict()?;
        }
    }

    /// The writes that move `ports` to `node`'s switch, for the caller's own
    /// transaction (a live migration commits them with the VM's record).
    pub async fn port_moves(&self, ports: &[PortId], node: NodeId) -> Result<Vec<Op>, NetworkError> {
        let mut ops = Vec::with_capacity(ports.len());
        for id in ports {
            let (mut p, _) = self.port(&id.to_string()).await?;
            p.node = node;
            p.updated_at_ms = unix_millis();
            ops.push(put(port_key(p.id), encode(&p)));
        }
        Ok(ops)
    }

    pub async fn delete_port(&self, port: &str) -> Result<PortRecord, NetworkError> {
        let mut retries = Retries::default();
        loop {
            let (p, rev) = self.port(port).await?;
            let key = port_key(p.id);
            let mut success = vec![Op::Delete { key: key.clone() }];
            if let Some(ip) = p.ip {
                success.push(Op::Delete { key: ipam_key(p.network, ip) });
            }
            if self.txn(Txn { compares: vec![unchanged(&key, rev)], success, failure: vec![] }).await? {
                info!(port = %p.id, "port deleted");
                return Ok(p);
            }
            // Changed meanwhile (its groups, say): delete it as it is now.
            retries.conflict()?;
        }
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
        rules: Vec<SecurityRule>,
        default_egress: bool,
    ) -> Result<SecurityGroupRecord, NetworkError> {
        check_name("security group", name)?;
        let rules = rules::new_group_rules(&rules, default_egress)?;
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
        let mut retries = Retries::default();
        loop {
            let (mut g, rev) = self.security_group(group).await?;
            g.rules = rules::change_rule_set(&g.name, &g.rules, add, remove)?;
            g.updated_at_ms = unix_millis();
            let key = security_group_key(g.id);
            let ok = self.meta.write(Command::put_if(key, encode(&g), rev)).await?.succeeded;
            if ok {
                info!(group = %g.name, rules = g.rules.len(), "security group rules changed");
                return Ok(g);
            }
            retries.conflict()?;
        }
    }

    pub async fn delete_security_group(&self, group: &str) -> Result<SecurityGroupRecord, NetworkError> {
        let mut retries = Retries::default();
        loop {
            let (g, rev) = self.security_group(group).await?;
            let key = security_group_key(g.id);
            let name_key = security_group_name_key(&g.name);
            // Read before the users are counted; see the module docs.
            let name_rev = self.revision(&name_key).await?;
            let users = rules::users_of_group(&self.list_ports().await?, g.id);
            if users > 0 {
                return Err(NetworkError::GroupInUse { group: g.name, ports: users });
            }
            let ok = self
                .txn(Txn {
                    compares: vec![unchanged(&key, rev), unchanged(&name_key, name_rev)],
                    success: vec![Op::Delete { key }, Op::Delete { key: name_key }],
                    failure: vec![],
                })
                .await?;
            if ok {
                info!(group = %g.name, "security group deleted");
                return Ok(g);
            }
            retries.conflict()?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_give_up_after_a_few_tries_and_lost_races_after_many() {
        let mut r = Retries::default();
        for _ in 1..TXN_RETRIES {
            assert!(r.conflict().is_ok());
        }
        assert!(matches!(r.conflict(), Err(NetworkError::Conflict)));
        let mut r = Retries::default();
        for _ in 1..RACE_RETRIES {
            assert!(r.lost_race().is_ok());
        }
        assert!(r.conflict().is_ok(), "the two causes are counted apart");
        assert!(matches!(r.lost_race(), Err(NetworkError::Conflict)));
    }
}
