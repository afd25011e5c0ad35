//! [`Agent`]: keeps this node's switch in step with the pool's records.
//!
//! The agent reads networks, ports, security groups and nodes (local reads:
//! the switch follows this node's copy of meta, which trails the leader by
//! at most a round trip), derives the [`Desired`] switch configuration with
//! [`desired`] (pure, unit-tested), and applies it. It runs again on every
//! watch event under those prefixes and every 30 s regardless.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use nodeos_meta::{Consistency, MetaHandle};
use nodeos_switch::frame::Mac;
use nodeos_switch::switch::{Attachment, Desired, NetworkConfig, PortConfig, SwitchHandle};
use nodeos_types::records::{
    NETWORKS_PREFIX, NODES_PREFIX, NetworkRecord, NodeRecord, PORTS_PREFIX, PortKind, PortRecord,
    SECURITY_GROUPS_PREFIX, SecurityGroupRecord,
};
use nodeos_types::{NodeId, PortId, SecurityGroupId};
use tracing::{debug, warn};

/// Re-applies the configuration this often even without events.
const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// Events closer together than this are applied once.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// The pool's network records, as the agent reads them.
#[derive(Debug, Default)]
pub struct Records {
    pub networks: Vec<NetworkRecord>,
    pub ports: Vec<PortRecord>,
    pub groups: Vec<SecurityGroupRecord>,
    pub nodes: Vec<NodeRecord>,
}

/// The uplink port of a network: a fixed id per network, so that re-deriving
/// the configuration finds the same port.
pub fn uplink_port_id(n: &NetworkRecord) -> PortId {
    PortId(n.id.0 ^ 0x7570_6c69_6e6b_0000)
}

/// Interface name of a network's uplink tap (`nsu` + the VNI in hex).
pub fn uplink_ifname(vni: u32) -> String {
    format!("nsu{vni:x}")
}

/// The switch configuration node `me` should have.
pub fn desired(me: NodeId, r: &Records) -> Desired {
    let vteps_of: HashMap<NodeId, SocketAddr> =
        r.nodes.iter().filter_map(|n| Some((n.id, n.vxlan_address.parse().ok()?))).collect();
    let groups: HashMap<SecurityGroupId, &SecurityGroupRecord> = r.groups.iter().map(|g| (g.id, g)).collect();
    let mut members: BTreeMap<_, BTreeSet<NodeId>> = BTreeMap::new();
    for p in &r.ports {
        members.entry(p.network).or_default().insert(p.node);
    }
    let mut out = Desired::default();
    for n in &r.networks {
        let mut nodes = members.get(&n.id).cloned().unwrap_or_default();
        if let Some(u) = &n.uplink {
            nodes.insert(u.node);
        }
        if !nodes.contains(&me) {
            continue;
        }
        let mut vteps: BTreeSet<SocketAddr> =
            nodes.iter().filter(|id| **id != me).filter_map(|id| vteps_of.get(id).copied()).collect();
        vteps.extend(n.external_vteps.iter().filter_map(|v| crate::rules::parse_vtep(v).ok()));
        out.networks.push(NetworkConfig {
            vni: n.vni,
            cidr: n.cidr,
            gateway: n.gateway,
            answer_gateway: n.uplink.is_none(),
            mtu: n.mtu,
            dns: n.dns.clone(),
            lease_secs: n.lease_secs,
            vteps,
        });
        if let Some(u) = &n.uplink
            && u.node == me
        {
            let id = uplink_port_id(n);
            out.ports.push(PortConfig {
                id,
                vni: n.vni,
                mac: nodeos_switch::switch::gateway_mac(n.vni),
                ip: None,
                port_security: false,
                rules: Vec::new(),
                attachment: Attachment::Uplink { ifname: uplink_ifname(n.vni), bridge: u.bridge.clone() },
                hostname: None,
            });
        }
    }
    let vnis: HashMap<_, u32> = r.networks.iter().map(|n| (n.id, n.vni)).collect();
    for p in r.ports.iter().filter(|p| p.node == me) {
        let Some(vni) = vnis.get(&p.network) else { continue };
        // A port without groups may start connections but accept none.
        let rules = if p.security_groups.is_empty() {
            crate::rules::default_egress_rules()
        } else {
            p.security_groups
                .iter()
                .filter_map(|g| groups.get(g))
                .flat_map(|g| g.rules.iter().copied())
                .collect()
        };
        out.ports.push(PortConfig {
            id: p.id,
            vni: *vni,
            mac: Mac(p.mac.0),
            ip: p.ip,
            port_security: p.port_security,
            rules,
            attachment: match &p.kind {
                PortKind::Tap { ifname } => Attachment::Tap { ifname: ifname.clone() },
                PortKind::Vm { .. } => Attachment::Vm,
            },
            hostname: None,
        });
    }
    out
}

/// Every record the agent derives from, from this node's copy of meta, and
/// the lowest revision they were read at. Records that do not decode are
/// left out (and logged): one bad record must not take the node's switch
/// down. `None` when meta cannot be read.
async fn read(meta: &MetaHandle) -> Option<(Records, u64)> {
    async fn all<T: serde::de::DeserializeOwned>(meta: &MetaHandle, prefix: &str) -> Option<(Vec<T>, u64)> {
        let (kvs, rev) = meta.range(prefix, 0, Consistency::Local).await.ok()?;
        let v = kvs
            .iter()
            .filter_map(|kv| match serde_json::from_slice(&kv.value) {
                Ok(r) => Some(r),
                Err(_) => {
                    warn!(key = %kv.key, "record does not decode: ignored");
                    None
                }
            })
            .collect();
        Some((v, rev))
    }
    let (networks, r1) = all(meta, NETWORKS_PREFIX).await?;
    let (ports, r2) = all(meta, PORTS_PREFIX).await?;
    let (groups, r3) = all(meta, SECURITY_GROUPS_PREFIX).await?;
    let (nodes, r4) = all(meta, NODES_PREFIX).await?;
    Some((Records { networks, ports, groups, nodes }, r1.min(r2).min(r3).min(r4)))
}

/// One per node: see the module docs.
#[derive(Debug)]
pub struct Agent {
    meta: MetaHandle,
    switch: SwitchHandle,
}

impl Agent {
    pub fn new(meta: MetaHandle, switch: SwitchHandle) -> Self {
        Agent { meta, switch }
    }

    /// Applies the current records once.
    pub async fn sync(&self) -> u64 {
        let Some((records, rev)) = read(&self.meta).await else { return 0 };
        let want = desired(self.meta.node_id(), &records);
        for (port, e) in self.switch.apply(want).await {
            warn!(port = %port, error = %nodeos_types::error_chain(&e), "port not set up on the switch");
        }
        rev
    }

    /// Runs until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let rev = self.sync().await;
            let from = if rev == 0 { 0 } else { rev + 1 };
            let mut events = futures::stream::select_all(
                [NETWORKS_PREFIX, PORTS_PREFIX, SECURITY_GROUPS_PREFIX, NODES_PREFIX]
                    .map(|p| self.meta.watch(from, p.to_owned()).boxed()),
            );
            // One event (or the timer) and the whole configuration is read again.
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(RESYNC_EVERY) => {}
                ev = events.next() => match ev {
                    Some(Ok(_)) => tokio::time::sleep(DEBOUNCE).await,
                    Some(Err(e)) => {
                        debug!(error = %e, "watch ended; reading again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    None => tokio::time::sleep(Duration::from_millis(200)).await,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeos_meta::Command;
    use nodeos_meta::testing::{TestPool, node_record};
    use nodeos_types::net::{MacAddr, SecurityRule};
    use nodeos_types::records::Uplink;
    use nodeos_types::{NetworkId, VmId};

    use crate::Networks;
    use crate::networks::{NewNetwork, NewPort};

    fn node(id: u64, vxlan: &str) -> NodeRecord {
        NodeRecord { vxlan_address: vxlan.into(), ..node_record(NodeId(id)) }
    }

    fn net(id: u64, vni: u32) -> NetworkRecord {
        NetworkRecord {
            id: NetworkId(id),
            name: format!("n{id}"),
            vni,
            cidr: "10.0.0.0/24".parse().unwrap(),
            gateway: Some("10.0.0.1".parse().unwrap()),
            mtu: 1450,
            dns: vec![],
            lease_secs: 3600,
            uplink: None,
            external_vteps: vec!["192.0.2.9".into()],
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn port(id: u64, network: u64, node: u64) -> PortRecord {
        PortRecord {
            id: PortId(id),
            network: NetworkId(network),
            node: NodeId(node),
            kind: PortKind::Vm { vm: VmId(id), nic: 0 },
            mac: MacAddr([2, 0, 0, 0, 0, id as u8]),
            ip: None,
            security_groups: vec![SecurityGroupId(5)],
            port_security: true,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn a_node_gets_its_networks_with_the_vteps_of_the_other_members_only() {
        let r = Records {
            networks: vec![net(1, 100), net(2, 200)],
            ports: vec![port(10, 1, 1), port(11, 1, 2), port(12, 2, 3)],
            groups: vec![SecurityGroupRecord {
                id: SecurityGroupId(5),
                name: "g".into(),
                rules: vec!["ingress tcp 22".parse().unwrap()],
                created_at_ms: 0,
                updated_at_ms: 0,
            }],
            nodes: vec![node(1, "10.1.0.1:4789"), node(2, "10.1.0.2:4789"), node(3, "10.1.0.3:4789")],
        };
        let d = desired(NodeId(1), &r);
        assert_eq!(d.networks.len(), 1, "network 2 has no port here");
        let vteps: Vec<String> = d.networks[0].vteps.iter().map(|v| v.to_string()).collect();
        assert_eq!(vteps, ["10.1.0.2:4789", "192.0.2.9:4789"].map(String::from));
        assert_eq!(d.ports.len(), 1);
        assert_eq!(d.ports[0].rules.len(), 1, "rules of the port's groups");
        assert!(desired(NodeId(4), &r).networks.is_empty());
    }

    #[test]
    fn the_uplink_node_holds_the_network_and_its_uplink_port() {
        let mut n = net(1, 100);
        n.uplink = Some(Uplink { node: NodeId(3), bridge: "br0".into() });
        let r = Records {
            networks: vec![n],
            ports: vec![port(10, 1, 1)],
            groups: vec![],
            nodes: vec![node(1, "10.1.0.1:4789"), node(3, "10.1.0.3:4789")],
        };
        let d = desired(NodeId(3), &r);
        assert_eq!(d.networks.len(), 1);
        assert!(!d.networks[0].answer_gateway, "a real router sits behind the uplink");
        assert!(matches!(&d.ports[0].attachment, Attachment::Uplink { bridge, .. } if bridge == "br0"));
        assert!(desired(NodeId(1), &r).networks[0].vteps.contains(&"10.1.0.3:4789".parse().unwrap()));
    }

    fn rule(s: &str) -> SecurityRule {
        s.parse().unwrap()
    }

    fn group(id: u64, rules: &[&str]) -> SecurityGroupRecord {
        SecurityGroupRecord {
            id: SecurityGroupId(id),
            name: format!("g{id}"),
            rules: rules.iter().map(|r| rule(r)).collect(),
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn nodes(n: u64) -> Vec<NodeRecord> {
        (1..=n).map(|i| node(i, &format!("10.1.0.{i}:4789"))).collect()
    }

    fn vteps(d: &NetworkConfig) -> Vec<String> {
        d.vteps.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn only_this_nodes_ports_are_configured_each_as_its_record_says() {
        let mut tap = port(10, 1, 1);
        tap.kind = PortKind::Tap { ifname: "t0".into() };
        tap.ip = Some("10.0.0.7".parse().unwrap());
        tap.port_security = false;
        let r = Records {
            networks: vec![net(1, 100)],
            ports: vec![tap, port(11, 1, 1), port(12, 1, 2)],
            groups: vec![group(5, &["ingress tcp 22"])],
            nodes: nodes(2),
        };
        let d = desired(NodeId(1), &r);
        let ids: Vec<PortId> = d.ports.iter().map(|p| p.id).collect();
        assert_eq!(ids, [PortId(10), PortId(11)], "node 2's port is not here");
        let p = &d.ports[0];
        assert_eq!(
            (p.vni, p.mac, p.ip, p.port_security, p.attachment.clone()),
            (
                100,
                Mac([2, 0, 0, 0, 0, 10]),
                Some("10.0.0.7".parse().unwrap()),
                false,
                Attachment::Tap { ifname: "t0".into() }
            )
        );
        assert_eq!(d.ports[1].attachment, Attachment::Vm);
        assert_eq!(desired(NodeId(2), &r).ports.iter().map(|p| p.id).collect::<Vec<_>>(), [PortId(12)]);
    }

    #[test]
    fn a_network_is_carried_with_its_settings() {
        let mut n = net(1, 100);
        n.dns = vec!["9.9.9.9".parse().unwrap()];
        n.mtu = 1400;
        let r = Records {
            networks: vec![n.clone()],
            ports: vec![port(10, 1, 1)],
            groups: vec![],
            nodes: nodes(1),
        };
        let d = desired(NodeId(1), &r);
        let c = &d.networks[0];
        assert_eq!(
            (c.vni, c.cidr, c.gateway, c.mtu, c.dns.clone(), c.lease_secs),
            (n.vni, n.cidr, n.gateway, 1400, n.dns.clone(), n.lease_secs)
        );
        assert!(c.answer_gateway, "no uplink: the switch answers for the gateway");
        assert_eq!(vteps(c), ["192.0.2.9:4789"], "alone in the pool, only the external VTEP");
    }

    #[test]
    fn flooding_goes_to_the_nodes_with_ports_on_the_network_and_no_others() {
        let mut n1 = net(1, 100);
        n1.external_vteps = vec!["192.0.2.9:8472".into(), "not a vtep".into()];
        let r = Records {
            networks: vec![n1, net(2, 200)],
            // Node 3 is only on network 2; node 4 has no usable VXLAN address.
            ports: vec![port(10, 1, 1), port(11, 1, 2), port(12, 1, 2), port(13, 2, 3), port(14, 1, 4)],
            groups: vec![],
            nodes: vec![
                node(1, "10.1.0.1:4789"),
                node(2, "10.1.0.2:4789"),
                node(3, "10.1.0.3:4789"),
                node(4, ""),
            ],
        };
        let d = desired(NodeId(1), &r);
        assert_eq!(d.networks.iter().map(|n| n.vni).collect::<Vec<_>>(), [100]);
        assert_eq!(vteps(&d.networks[0]), ["10.1.0.2:4789", "192.0.2.9:8472"]);
        let d = desired(NodeId(2), &r);
        assert_eq!(vteps(&d.networks[0]), ["10.1.0.1:4789", "192.0.2.9:8472"], "never its own VTEP");
        let d = desired(NodeId(3), &r);
        assert_eq!(d.networks.iter().map(|n| n.vni).collect::<Vec<_>>(), [200]);
        assert_eq!(vteps(&d.networks[0]), ["192.0.2.9:4789"]);
        assert_eq!(desired(NodeId(5), &r), Desired::default(), "a node with no ports gets nothing");
    }

    #[test]
    fn the_uplink_port_is_on_the_uplink_node_only() {
        let mut n = net(1, 0x64);
        n.uplink = Some(Uplink { node: NodeId(3), bridge: "br0".into() });
        let r = Records {
            networks: vec![n.clone()],
            ports: vec![port(10, 1, 1), port(11, 1, 2)],
            groups: vec![],
            nodes: nodes(4),
        };
        let d = desired(NodeId(3), &r);
        assert_eq!(vteps(&d.networks[0]), ["10.1.0.1:4789", "10.1.0.2:4789", "192.0.2.9:4789"]);
        assert_eq!(d.ports.len(), 1);
        let up = &d.ports[0];
        assert_eq!(
            (up.id, up.vni, up.mac, up.ip, up.port_security, up.rules.len()),
            (uplink_port_id(&n), 0x64, nodeos_switch::switch::gateway_mac(0x64), None, false, 0)
        );
        assert_eq!(up.attachment, Attachment::Uplink { ifname: "nsu64".into(), bridge: "br0".into() });
        for me in [1, 2] {
            let d = desired(NodeId(me), &r);
            assert!(!d.networks[0].answer_gateway, "a real router sits behind the uplink");
            assert!(d.networks[0].vteps.contains(&"10.1.0.3:4789".parse().unwrap()));
            assert!(d.ports.iter().all(|p| !matches!(p.attachment, Attachment::Uplink { .. })), "node {me}");
        }
        assert_eq!(desired(NodeId(4), &r), Desired::default());
    }

    #[test]
    fn the_uplink_port_id_is_stable_and_differs_per_network() {
        let (a, b) = (net(1, 100), net(2, 200));
        assert_eq!(uplink_port_id(&a), uplink_port_id(&a.clone()));
        assert_ne!(uplink_port_id(&a), uplink_port_id(&b));
        assert_eq!(uplink_ifname(0xff_ffff), "nsuffffff", "fits a 15-byte interface name");
    }

    #[test]
    fn a_port_gets_the_rules_of_its_groups_or_egress_only_without_any() {
        let mut both = port(10, 1, 1);
        both.security_groups = vec![SecurityGroupId(5), SecurityGroupId(6)];
        let mut none = port(11, 1, 1);
        none.security_groups = vec![];
        let mut gone = port(12, 1, 1);
        gone.security_groups = vec![SecurityGroupId(99), SecurityGroupId(5)];
        let r = Records {
            networks: vec![net(1, 100)],
            ports: vec![both, none, gone],
            groups: vec![group(5, &["ingress tcp 22"]), group(6, &["ingress tcp 443", "ingress udp 53"])],
            nodes: nodes(1),
        };
        let d = desired(NodeId(1), &r);
        let rules: Vec<Vec<String>> =
            d.ports.iter().map(|p| p.rules.iter().map(ToString::to_string).collect()).collect();
        assert_eq!(
            rules,
            [
                vec!["ingress tcp 22 0.0.0.0/0", "ingress tcp 443 0.0.0.0/0", "ingress udp 53 0.0.0.0/0"],
                vec!["egress any 0.0.0.0/0", "egress any ::/0"],
                vec!["ingress tcp 22 0.0.0.0/0"],
            ]
        );
    }

    #[test]
    fn a_port_whose_network_is_not_in_the_records_is_left_out() {
        let r = Records {
            networks: vec![net(1, 100)],
            ports: vec![port(10, 9, 1)],
            groups: vec![],
            nodes: nodes(1),
        };
        assert_eq!(desired(NodeId(1), &r), Desired::default());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_written_by_networks_give_each_node_its_ports() {
        let pool = TestPool::single().await.unwrap();
        let meta = pool.first();
        for n in nodes(3) {
            pool.put_node(&n).await.unwrap();
        }
        let nets = Networks::new(meta.clone());
        let n = nets
            .create_network(NewNetwork {
                name: "a".into(),
                cidr: Some("10.7.0.0/24".parse().unwrap()),
                ..NewNetwork::default()
            })
            .await
            .unwrap();
        let g = nets.create_security_group("ssh", vec![rule("ingress tcp 22")], false).await.unwrap();
        let mut made = Vec::new();
        for node in [1, 2] {
            let req = NewPort {
                network: "a".into(),
                node: NodeId(node),
                kind: PortKind::Vm { vm: VmId(node), nic: 0 },
                mac: None,
                ip: None,
                security_groups: vec!["ssh".into()],
                port_security: true,
            };
            made.push(nets.create_port(req).await.unwrap());
        }
        // A record no one can read must not hide the others.
        meta.write(Command::put(format!("{PORTS_PREFIX}garbage"), b"{".to_vec())).await.unwrap();

        let (records, rev) = read(&meta).await.unwrap();
        assert!(rev > 0);
        assert_eq!((records.networks.len(), records.ports.len(), records.groups.len()), (1, 2, 1));
        let d = desired(NodeId(1), &records);
        assert_eq!(d.ports.len(), 1);
        assert_eq!(
            (d.ports[0].id, d.ports[0].ip, d.ports[0].rules.clone()),
            (made[0].id, made[0].ip, g.rules)
        );
        assert_eq!((d.networks[0].vni, vteps(&d.networks[0])), (n.vni, vec!["10.1.0.2:4789".to_owned()]));
        assert_eq!(desired(NodeId(2), &records).ports[0].id, made[1].id);
        assert_eq!(desired(NodeId(3), &records), Desired::default());
    }
}
