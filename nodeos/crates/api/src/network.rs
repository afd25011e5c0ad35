//! `NetworkService`: networks, ports, security groups and each node's switch.
//!
//! Records are read and changed through [`Networks`] on any node. Counters
//! live in the switch of the node holding a port: a request for another
//! node's port or switch is handed to that node once ([`crate::proxy`]).
//! When that node does not answer, a port is answered with its record alone,
//! saying why its counters are missing.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use nodeos_meta::{Consistency, MetaHandle};
use nodeos_network::Networks;
use nodeos_network::networks::{NetworkUpdate, NewNetwork, NewPort};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::network_service_client::NetworkServiceClient;
use nodeos_proto::v1::network_service_server::NetworkService;
use nodeos_switch::switch::{PortStats, SwitchHandle};
use nodeos_types::net::{Cidr, MacAddr, SecurityRule};
use nodeos_types::records::{NetworkRecord, PortKind, PortRecord, SecurityGroupRecord, Uplink};
use nodeos_types::{NetworkId, NodeId, SecurityGroupId};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::error::network_status;
use crate::proxy::{Route, hop_timeout, is_proxied, mark, route};

/// Counters are small answers: a node that takes longer is treated as not answering.
/// How long a node may take to read its switch's counters.
const STATS_WORK: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct NetworkApi {
    networks: Networks,
    switch: SwitchHandle,
    meta: MetaHandle,
    dialer: crate::proxy::Dialer,
}

impl NetworkApi {
    /// Hands requests over to other nodes through `dialer` (mutual TLS on a secured pool).
    pub fn with_dialer(mut self, dialer: crate::proxy::Dialer) -> Self {
        self.dialer = dialer;
        self
    }

    pub fn new(networks: Networks, switch: SwitchHandle, meta: MetaHandle) -> Self {
        NetworkApi { networks, switch, meta, dialer: crate::proxy::Dialer::default() }
    }

    fn node_id(&self) -> NodeId {
        self.meta.node_id()
    }

    /// A client of `node`'s API for requests taking up to `timeout`, or why there is none.
    async fn client_for(
        &self,
        node: NodeId,
        timeout: Duration,
    ) -> Result<NetworkServiceClient<Channel>, Status> {
        let nodes = self.networks.nodes(Consistency::Local).await.map_err(network_status)?;
        let addr = nodes
            .get(&node)
            .map(|n| n.address.clone())
            .ok_or_else(|| Status::not_found(format!("no node {node} in this pool")))?;
        Ok(NetworkServiceClient::new(self.dialer.channel(node, &addr, timeout).await?))
    }

    /// Names of networks and security groups, for answers that name them.
    async fn names(&self) -> Result<Names, Status> {
        let networks = self.networks.list_networks().await.map_err(network_status)?;
        let groups = self.networks.list_security_groups().await.map_err(network_status)?;
        Ok(Names {
            networks: networks.into_iter().map(|n| (n.id, n.name)).collect(),
            groups: groups.into_iter().map(|g| (g.id, g.name)).collect(),
        })
    }

    /// Ports (of one network, or all) by network name, address and id.
    async fn sorted_ports(&self, only: Option<NetworkId>, names: &Names) -> Result<Vec<PortRecord>, Status> {
        let mut ports: Vec<PortRecord> = self
            .networks
            .list_ports()
            .await
            .map_err(network_status)?
            .into_iter()
            .filter(|p| only.is_none_or(|n| p.network == n))
            .collect();
        ports.sort_by(|a, b| {
            let key = |p: &PortRecord| (names.networks.get(&p.network).cloned(), p.ip, p.id);
            key(a).cmp(&key(b))
        });
        Ok(ports)
    }

    /// A port of this node with its switch's counters.
    fn with_local_stats(&self, mut out: pb::Port, p: &PortRecord) -> pb::Port {
        if p.node != self.node_id() {
            out.stats_unavailable = format!("the port lives on node {}", p.node);
            return out;
        }
        match self.switch.port_stats(p.id) {
            Some(s) => {
                out.stats = Some(stats_to_pb(s));
                out.stats_from_node = true;
            }
            None => {
                out.stats_unavailable = format!("the switch of node {} has not taken the port up yet", p.node)
            }
        }
        out
    }

    /// This node's switch.
    async fn local_switch(&self) -> Result<pb::Switch, Status> {
        let me = self.node_id();
        let nodes = self.networks.nodes(Consistency::Local).await.map_err(network_status)?;
        let vxlan_address = nodes
            .get(&me)
            .map(|n| n.vxlan_address.clone())
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| self.switch.local_vtep().to_string());
        let by_vni: BTreeMap<u32, NetworkRecord> = self
            .networks
            .list_networks()
            .await
            .map_err(network_status)?
            .into_iter()
            .map(|n| (n.vni, n))
            .collect();
        let t = self.switch.tunnel_stats();
        let mut networks: Vec<pb::SwitchNetwork> = self
            .switch
            .network_stats()
            .into_iter()
            .map(|n| {
                let rec = by_vni.get(&n.vni);
                pb::SwitchNetwork {
                    vni: n.vni,
                    network_id: rec.map(|r| r.id.to_string()).unwrap_or_default(),
                    network: rec.map(|r| r.name.clone()).unwrap_or_default(),
                    ports: saturate(n.ports),
                    macs: saturate(n.macs),
                    macs_refused: n.macs_refused,
                    vteps: n
                        .vteps
                        .into_iter()
                        .map(|(a, c)| pb::VtepStats {
                            address: a.to_string(),
                            rx: c.rx,
                            tx: c.tx,
                            dropped: c.dropped,
                        })
                        .collect(),
                }
            })
            .collect();
        networks.sort_by_key(|n| n.vni);
        Ok(pb::Switch {
            node_id: me.to_string(),
            vxlan_address,
            tunnel: Some(pb::TunnelStats {
                rx: t.rx,
                tx: t.tx,
                bad_header: t.bad_header,
                unknown_vni: t.unknown_vni,
                unknown_vtep: t.unknown_vtep,
                send_failed: t.send_failed,
            }),
            networks,
        })
    }

    async fn group_to_pb(&self, g: SecurityGroupRecord) -> Result<pb::SecurityGroup, Status> {
        let users = self.group_users().await?;
        Ok(group_to_pb(g, &users))
    }

    /// How many ports use each security group.
    async fn group_users(&self) -> Result<BTreeMap<SecurityGroupId, u32>, Status> {
        let mut users = BTreeMap::new();
        for p in self.networks.list_ports().await.map_err(network_status)? {
            for g in p.security_groups {
                *users.entry(g).or_insert(0u32) += 1;
            }
        }
        Ok(users)
    }
}

/// Ids to names, read once per answer.
#[derive(Debug, Default)]
struct Names {
    networks: BTreeMap<NetworkId, String>,
    groups: BTreeMap<SecurityGroupId, String>,
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn invalid(field: &str, e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {e}"))
}

pub(crate) fn parse_ip(field: &str, s: &str) -> Result<Ipv4Addr, Status> {
    s.trim().parse().map_err(|_| invalid(field, format_args!("{s:?} is not an IPv4 address like 10.0.0.1")))
}

/// Empty means "not given".
fn parse_opt_ip(field: &str, s: &str) -> Result<Option<Ipv4Addr>, Status> {
    if s.is_empty() { Ok(None) } else { parse_ip(field, s).map(Some) }
}

fn parse_ips(field: &str, v: &[String]) -> Result<Vec<Ipv4Addr>, Status> {
    v.iter().enumerate().map(|(i, s)| parse_ip(&format!("{field}[{i}]"), s)).collect()
}

fn parse_node(field: &str, s: &str) -> Result<NodeId, Status> {
    s.parse().map_err(|e| invalid(field, e))
}

fn parse_mtu(m: u32) -> Result<u16, Status> {
    u16::try_from(m).map_err(|_| Status::invalid_argument(format!("mtu must be 576..=9000, got {m}")))
}

fn parse_rules(field: &str, v: &[String]) -> Result<Vec<SecurityRule>, Status> {
    v.iter().map(|r| r.parse::<SecurityRule>().map_err(|e| invalid(field, e))).collect()
}

fn uplink_from_pb(u: pb::Uplink) -> Result<Uplink, Status> {
    if u.node_id.is_empty() || u.bridge.is_empty() {
        return Err(Status::invalid_argument("uplink needs a node_id and a bridge"));
    }
    Ok(Uplink { node: parse_node("uplink.node_id", &u.node_id)?, bridge: u.bridge })
}

fn network_to_pb(r: NetworkRecord) -> pb::Network {
    pb::Network {
        id: r.id.to_string(),
        name: r.name,
        vni: r.vni,
        cidr: r.cidr.to_string(),
        gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
        mtu: r.mtu.into(),
        dns: r.dns.iter().map(ToString::to_string).collect(),
        lease_secs: r.lease_secs,
        uplink: r.uplink.map(|u| pb::Uplink { node_id: u.node.to_string(), bridge: u.bridge }),
        external_vteps: r.external_vteps,
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
    }
}

fn port_to_pb(p: &PortRecord, names: &Names) -> pb::Port {
    let (kind, tap, vm_id, nic) = match &p.kind {
        PortKind::Tap { ifname } => ("tap", ifname.clone(), String::new(), 0),
        PortKind::Vm { vm, nic } => ("vm", String::new(), vm.to_string(), u32::from(*nic)),
    };
    pb::Port {
        id: p.id.to_string(),
        network_id: p.network.to_string(),
        network: names.networks.get(&p.network).cloned().unwrap_or_default(),
        node_id: p.node.to_string(),
        kind: kind.to_owned(),
        tap,
        vm_id,
        nic,
        mac: p.mac.to_string(),
        ip: p.ip.map(|i| i.to_string()).unwrap_or_default(),
        security_group_ids: p.security_groups.iter().map(ToString::to_string).collect(),
        security_groups: p
            .security_groups
            .iter()
            .map(|g| names.groups.get(g).cloned().unwrap_or_else(|| g.to_string()))
            .collect(),
        port_security: p.port_security,
        created_at_ms: p.created_at_ms,
        updated_at_ms: p.updated_at_ms,
        stats_from_node: false,
        stats: None,
        stats_unavailable: String::new(),
    }
}

fn stats_to_pb(s: PortStats) -> pb::PortStats {
    pb::PortStats {
        attached: s.attached,
        rx: s.rx,
        tx: s.tx,
        malformed: s.malformed,
        spoofed: s.spoofed,
        denied_ingress: s.denied_ingress,
        denied_egress: s.denied_egress,
        dhcp_answered: s.dhcp_answered,
        dhcp_dropped: s.dhcp_dropped,
        arp_answered: s.arp_answered,
        tx_dropped: s.tx_dropped,
        flows: s.flows,
    }
}

fn group_to_pb(g: SecurityGroupRecord, users: &BTreeMap<SecurityGroupId, u32>) -> pb::SecurityGroup {
    pb::SecurityGroup {
        id: g.id.to_string(),
        ports: users.get(&g.id).copied().unwrap_or(0),
        name: g.name,
        rules: g.rules.iter().map(ToString::to_string).collect(),
        created_at_ms: g.created_at_ms,
        updated_at_ms: g.updated_at_ms,
    }
}

#[tonic::async_trait]
impl NetworkService for NetworkApi {
    async fn create_network(
        &self,
        req: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        let r = req.into_inner();
        if r.cidr.is_empty() {
            return Err(Status::invalid_argument("cidr is required: an IPv4 block like 10.0.0.0/24"));
        }
        let cidr: Cidr = r.cidr.trim().parse().map_err(|e| invalid("cidr", e))?;
        if r.no_gateway && !r.gateway.is_empty() {
            return Err(Status::invalid_argument("give a gateway or no_gateway, not both"));
        }
        let new = NewNetwork {
            name: r.name,
            vni: (r.vni != 0).then_some(r.vni),
            cidr: Some(cidr),
            gateway: parse_opt_ip("gateway", &r.gateway)?,
            no_gateway: r.no_gateway,
            mtu: (r.mtu != 0).then(|| parse_mtu(r.mtu)).transpose()?,
            dns: parse_ips("dns", &r.dns)?,
            lease_secs: (r.lease_secs != 0).then_some(r.lease_secs),
            uplink: r.uplink.map(uplink_from_pb).transpose()?,
            external_vteps: r.external_vteps,
        };
        let n = self.networks.create_network(new).await.map_err(network_status)?;
        Ok(Response::new(network_to_pb(n)))
    }

    async fn list_networks(
        &self,
        _req: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        let mut nets = self.networks.list_networks().await.map_err(network_status)?;
        nets.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(pb::ListNetworksResponse {
            networks: nets.into_iter().map(network_to_pb).collect(),
        }))
    }

    async fn get_network(&self, req: Request<pb::NetworkRef>) -> Result<Response<pb::NetworkDetail>, Status> {
        let (n, _) = self.networks.network(&req.get_ref().network).await.map_err(network_status)?;
        let names = self.names().await?;
        let ports = self.sorted_ports(Some(n.id), &names).await?;
        Ok(Response::new(pb::NetworkDetail {
            ports: ports.iter().map(|p| port_to_pb(p, &names)).collect(),
            network: Some(network_to_pb(n)),
        }))
    }

    async fn update_network(
        &self,
        req: Request<pb::UpdateNetworkRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        let r = req.into_inner();
        if !r.set_dns && !r.dns.is_empty() {
            return Err(Status::invalid_argument("dns is only read with set_dns"));
        }
        if !r.set_uplink && r.uplink.is_some() {
            return Err(Status::invalid_argument("uplink is only read with set_uplink"));
        }
        if !r.set_external_vteps && !r.external_vteps.is_empty() {
            return Err(Status::invalid_argument("external_vteps is only read with set_external_vteps"));
        }
        let u = NetworkUpdate {
            mtu: r.mtu.map(parse_mtu).transpose()?,
            dns: r.set_dns.then(|| parse_ips("dns", &r.dns)).transpose()?,
            lease_secs: r.lease_secs,
            uplink: if r.set_uplink { Some(r.uplink.map(uplink_from_pb).transpose()?) } else { None },
            external_vteps: r.set_external_vteps.then_some(r.external_vteps),
        };
        let n = self.networks.update_network(&r.network, u).await.map_err(network_status)?;
        Ok(Response::new(network_to_pb(n)))
    }

    async fn delete_network(&self, req: Request<pb::NetworkRef>) -> Result<Response<pb::Network>, Status> {
        let n = self.networks.delete_network(&req.get_ref().network).await.map_err(network_status)?;
        Ok(Response::new(network_to_pb(n)))
    }

    async fn create_port(&self, req: Request<pb::CreatePortRequest>) -> Result<Response<pb::Port>, Status> {
        let r = req.into_inner();
        if r.tap.is_empty() {
            return Err(Status::invalid_argument(
                "tap is required: the host tap the port's node makes (VM ports are made with their VM)",
            ));
        }
        let node = if r.node_id.is_empty() { self.node_id() } else { parse_node("node_id", &r.node_id)? };
        let mac = if r.mac.is_empty() {
            None
        } else {
            Some(r.mac.trim().parse::<MacAddr>().map_err(|e| invalid("mac", e))?)
        };
        let p = self
            .networks
            .create_port(NewPort {
                network: r.network,
                node,
                kind: PortKind::Tap { ifname: r.tap },
                mac,
                ip: parse_opt_ip("ip", &r.ip)?,
                security_groups: r.security_groups,
                port_security: !r.no_port_security,
            })
            .await
            .map_err(network_status)?;
        Ok(Response::new(port_to_pb(&p, &self.names().await?)))
    }

    async fn list_ports(
        &self,
        req: Request<pb::ListPortsRequest>,
    ) -> Result<Response<pb::ListPortsResponse>, Status> {
        let network = &req.get_ref().network;
        let only = if network.is_empty() {
            None
        } else {
            Some(self.networks.network(network).await.map_err(network_status)?.0.id)
        };
        let names = self.names().await?;
        let ports = self.sorted_ports(only, &names).await?;
        Ok(Response::new(pb::ListPortsResponse {
            ports: ports.iter().map(|p| port_to_pb(p, &names)).collect(),
        }))
    }

    async fn get_port(&self, req: Request<pb::PortRef>) -> Result<Response<pb::Port>, Status> {
        let (p, _) = self.networks.port(&req.get_ref().port).await.map_err(network_status)?;
        let names = self.names().await?;
        let out = port_to_pb(&p, &names);
        let Route::Forward(node) = route(p.node, self.node_id(), is_proxied(&req)) else {
            // Here, or handed over to a node that no longer holds it: the
            // record, with the reason its counters are missing.
            return Ok(Response::new(self.with_local_stats(out, &p)));
        };
        let timeout = hop_timeout(&req, STATS_WORK);
        let why = match self.client_for(node, timeout).await {
            Ok(mut c) => match c.get_port(mark(req.into_inner())).await {
                Ok(r) => return Ok(r),
                // Deleted meanwhile: the owner's answer is the newer one.
                Err(s) if s.code() == Code::NotFound => return Err(s),
                Err(s) => format!("node {node} did not answer: {}", s.message()),
            },
            Err(s) => s.message().to_owned(),
        };
        Ok(Response::new(pb::Port { stats_unavailable: why, ..out }))
    }

    async fn set_port_security(
        &self,
        req: Request<pb::SetPortSecurityRequest>,
    ) -> Result<Response<pb::Port>, Status> {
        let r = req.into_inner();
        if !r.set_security_groups && !r.security_groups.is_empty() {
            return Err(Status::invalid_argument("security_groups is only read with set_security_groups"));
        }
        let groups = r.set_security_groups.then_some(r.security_groups);
        let p = self
            .networks
            .set_port_security(&r.port, groups, r.port_security)
            .await
            .map_err(network_status)?;
        Ok(Response::new(port_to_pb(&p, &self.names().await?)))
    }

    async fn delete_port(&self, req: Request<pb::PortRef>) -> Result<Response<pb::Port>, Status> {
        let p = self.networks.delete_port(&req.get_ref().port).await.map_err(network_status)?;
        Ok(Response::new(port_to_pb(&p, &self.names().await?)))
    }

    async fn create_security_group(
        &self,
        req: Request<pb::CreateSecurityGroupRequest>,
    ) -> Result<Response<pb::SecurityGroup>, Status> {
        let r = req.into_inner();
        let rules = parse_rules("rules", &r.rules)?;
        let g = self
            .networks
            .create_security_group(&r.name, rules, !r.no_default_egress)
            .await
            .map_err(network_status)?;
        Ok(Response::new(group_to_pb(g, &BTreeMap::new())))
    }

    async fn list_security_groups(
        &self,
        _req: Request<pb::ListSecurityGroupsRequest>,
    ) -> Result<Response<pb::ListSecurityGroupsResponse>, Status> {
        let mut groups = self.networks.list_security_groups().await.map_err(network_status)?;
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        let users = self.group_users().await?;
        Ok(Response::new(pb::ListSecurityGroupsResponse {
            groups: groups.into_iter().map(|g| group_to_pb(g, &users)).collect(),
        }))
    }

    async fn get_security_group(
        &self,
        req: Request<pb::SecurityGroupRef>,
    ) -> Result<Response<pb::SecurityGroup>, Status> {
        let (g, _) = self.networks.security_group(&req.get_ref().group).await.map_err(network_status)?;
        Ok(Response::new(self.group_to_pb(g).await?))
    }

    async fn change_rules(
        &self,
        req: Request<pb::ChangeRulesRequest>,
    ) -> Result<Response<pb::SecurityGroup>, Status> {
        let r = req.into_inner();
        if r.add.is_empty() && r.remove.is_empty() {
            return Err(Status::invalid_argument("give rules to add or remove"));
        }
        let add = parse_rules("add", &r.add)?;
        let remove = parse_rules("remove", &r.remove)?;
        let g = self.networks.change_rules(&r.group, &add, &remove).await.map_err(network_status)?;
        Ok(Response::new(self.group_to_pb(g).await?))
    }

    async fn delete_security_group(
        &self,
        req: Request<pb::SecurityGroupRef>,
    ) -> Result<Response<pb::SecurityGroup>, Status> {
        let g = self.networks.delete_security_group(&req.get_ref().group).await.map_err(network_status)?;
        Ok(Response::new(group_to_pb(g, &BTreeMap::new())))
    }

    async fn get_switch(&self, req: Request<pb::GetSwitchRequest>) -> Result<Response<pb::Switch>, Status> {
        let me = self.node_id();
        let node = match req.get_ref().node_id.as_str() {
            "" => me,
            s => parse_node("node_id", s)?,
        };
        match route(node, me, is_proxied(&req)) {
            Route::Here => Ok(Response::new(self.local_switch().await?)),
            Route::NotHere(_) => {
                Err(Status::failed_precondition(format!("this is node {me}, not node {node}")))
            }
            Route::Forward(node) => {
                let mut c = self.client_for(node, hop_timeout(&req, STATS_WORK)).await?;
                c.get_switch(mark(req.into_inner())).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fields_are_named() {
        let e = parse_ip("spec.nics[0].ip", "10.0.0").unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("spec.nics[0].ip: "), "{}", e.message());
        assert!(
            parse_ips("dns", &["1.1.1.1".into(), "x".into()]).unwrap_err().message().starts_with("dns[1]:")
        );
        assert_eq!(parse_opt_ip("ip", "").unwrap(), None);
        assert!(parse_mtu(70_000).unwrap_err().message().contains("576..=9000"));
        let e = parse_rules("add", &["ingress tcp 0".into()]).unwrap_err();
        assert!(e.message().contains("port"), "{}", e.message());
        assert!(uplink_from_pb(pb::Uplink { node_id: String::new(), bridge: "br0".into() }).is_err());
    }
}
