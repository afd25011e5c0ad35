//! Networks and security groups against a real in-process store: each rule,
//! and that each refusal leaves every key as it was.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Bed, ip, new_network, tap_port};
use nodeos_network::NetworkError;
use nodeos_network::networks::{NetworkUpdate, NewNetwork};
use nodeos_switch::vxlan::MAX_VNI;
use nodeos_types::NodeId;
use nodeos_types::net::SecurityRule;
use nodeos_types::records::{
    DEFAULT_NETWORK_MTU, NETWORK_NAMES_PREFIX, NETWORK_VNIS_PREFIX, NETWORKS_PREFIX,
    SECURITY_GROUP_NAMES_PREFIX, SECURITY_GROUPS_PREFIX, Uplink, network_name_key, network_vni_key,
    security_group_name_key,
};

/// Rounds of a race between two requests: enough that both orders, and
/// the interleavings between them, come up.
const ROUNDS: usize = 30;

/// How long the second request of round `round` waits to start: sweeps the
/// offset between the two across the rounds.
fn stagger(round: usize) -> Duration {
    Duration::from_millis(u64::try_from(round % 10).unwrap())
}

/// Whether an error is the one a case expects.
type Expect = fn(&NetworkError) -> bool;

fn rule(s: &str) -> SecurityRule {
    s.parse().unwrap()
}

// ---- networks ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_gets_its_defaults_and_is_found_by_name_and_id() {
    let bed = Bed::new(1).await;
    let n = bed.network("tenant-a", "10.1.0.0/24").await;
    assert_eq!(
        (n.gateway, n.mtu, n.lease_secs, n.vni),
        (Some(ip("10.1.0.1")), DEFAULT_NETWORK_MTU, 86400, 4096)
    );
    assert_eq!(bed.nets.network("tenant-a").await.unwrap().0, n);
    assert_eq!(bed.nets.network(&n.id.to_string()).await.unwrap().0, n);
    assert_eq!(bed.nets.list_networks().await.unwrap(), std::slice::from_ref(&n));
    assert_eq!(bed.value(&network_name_key("tenant-a")).await, Some(n.id.to_string()));
    assert_eq!(bed.value(&network_vni_key(4096)).await, Some(n.id.to_string()));
    assert!(matches!(bed.nets.network("tenant-b").await, Err(NetworkError::NoNetwork(x)) if x == "tenant-b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_name_belongs_to_one_network() {
    let bed = Bed::new(1).await;
    bed.network("tenant-a", "10.1.0.0/24").await;
    let e = bed.refused(bed.nets.create_network(new_network("tenant-a", "10.2.0.0/24"))).await;
    assert!(matches!(e, NetworkError::NameTaken { what: "network", name } if name == "tenant-a"));
    // Even with a VNI of its own that is free.
    let req = NewNetwork { vni: Some(77), ..new_network("tenant-a", "10.2.0.0/24") };
    assert!(matches!(bed.refused(bed.nets.create_network(req)).await, NetworkError::NameTaken { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vnis_are_given_or_the_lowest_free_from_4096_and_never_shared() {
    let bed = Bed::new(1).await;
    let given = |name: &str, vni| NewNetwork { vni: Some(vni), ..new_network(name, "10.1.0.0/24") };
    assert_eq!(bed.nets.create_network(given("low", 100)).await.unwrap().vni, 100);
    assert_eq!(bed.nets.create_network(given("taken", 4096)).await.unwrap().vni, 4096);
    assert_eq!(bed.network("auto-1", "10.2.0.0/24").await.vni, 4097);
    assert_eq!(bed.network("auto-2", "10.3.0.0/24").await.vni, 4098);
    let e = bed.refused(bed.nets.create_network(given("again", 4097))).await;
    assert!(matches!(e, NetworkError::VniTaken(4097)));
    for bad in [0, MAX_VNI + 1] {
        let e = bed.refused(bed.nets.create_network(given("bad", bad))).await;
        assert!(matches!(e, NetworkError::Vni(v) if v == bad));
    }
    assert_eq!(bed.nets.create_network(given("top", MAX_VNI)).await.unwrap().vni, MAX_VNI);
    let vnis = bed.keys(NETWORK_VNIS_PREFIX).await;
    assert_eq!(vnis.len(), 5, "{vnis:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_made_at_once_get_distinct_vnis() {
    let bed = Bed::new(1).await;
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let nets = bed.nets.clone();
            tokio::spawn(
                async move { nets.create_network(new_network(&format!("n{i}"), "10.1.0.0/24")).await },
            )
        })
        .collect();
    let mut vnis = Vec::new();
    for t in tasks {
        vnis.push(t.await.unwrap().unwrap().vni);
    }
    vnis.sort_unstable();
    assert_eq!(vnis, (4096..4108).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_network_request_writes_nothing() {
    let bed = Bed::new(1).await;
    let base = || new_network("tenant-a", "10.1.0.0/24");
    let cases: Vec<(NewNetwork, Expect)> = vec![
        (NewNetwork { name: "Tenant".into(), ..base() }, |e| matches!(e, NetworkError::Name { .. })),
        (NewNetwork { cidr: None, ..base() }, |e| matches!(e, NetworkError::Cidr(_))),
        (new_network("a", "10.1.0.0/31"), |e| matches!(e, NetworkError::Cidr(_))),
        (new_network("a", "10.0.0.0/7"), |e| matches!(e, NetworkError::Cidr(_))),
        (new_network("a", "fd00::/64"), |e| matches!(e, NetworkError::Cidr(_))),
        (NewNetwork { gateway: Some(ip("10.1.0.255")), ..base() }, |e| {
            matches!(e, NetworkError::NotInNetwork { what: "gateway", .. })
        }),
        (NewNetwork { gateway: Some(ip("10.9.0.1")), ..base() }, |e| {
            matches!(e, NetworkError::NotInNetwork { what: "gateway", .. })
        }),
        (NewNetwork { mtu: Some(575), ..base() }, |e| matches!(e, NetworkError::Mtu(575))),
        (NewNetwork { mtu: Some(9001), ..base() }, |e| matches!(e, NetworkError::Mtu(9001))),
        (NewNetwork { lease_secs: Some(59), ..base() }, |e| matches!(e, NetworkError::Lease(59))),
        (NewNetwork { external_vteps: vec!["239.0.0.1:4789".into()], ..base() }, |e| {
            matches!(e, NetworkError::Vtep(_))
        }),
        (NewNetwork { uplink: Some(Uplink { node: NodeId(9), bridge: "br0".into() }), ..base() }, |e| {
            matches!(e, NetworkError::NoNode(NodeId(9)))
        }),
        (NewNetwork { uplink: Some(Uplink { node: NodeId(1), bridge: "br/0".into() }), ..base() }, |e| {
            matches!(e, NetworkError::Ifname(_))
        }),
    ];
    for (req, expected) in cases {
        let shown = format!("{req:?}");
        let e = bed.refused(bed.nets.create_network(req)).await;
        assert!(expected(&e), "{shown} gave {e:?}");
    }
    assert!(bed.keys(NETWORKS_PREFIX).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_may_have_no_gateway_or_its_own_and_limits_are_inclusive() {
    let bed = Bed::new(1).await;
    let none = NewNetwork {
        no_gateway: true,
        mtu: Some(576),
        lease_secs: Some(60),
        ..new_network("a", "10.1.0.0/24")
    };
    let n = bed.nets.create_network(none).await.unwrap();
    assert_eq!((n.gateway, n.mtu, n.lease_secs), (None, 576, 60));
    let own =
        NewNetwork { gateway: Some(ip("10.2.0.254")), mtu: Some(9000), ..new_network("b", "10.2.0.0/24") };
    let n = bed.nets.create_network(own).await.unwrap();
    assert_eq!((n.gateway, n.mtu), (Some(ip("10.2.0.254")), 9000));
    assert_eq!(bed.nets.network("b").await.unwrap().0, n, "stored as returned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplinks_and_external_vteps_are_checked_and_stored_as_ip_and_port() {
    let bed = Bed::new(2).await;
    let req = NewNetwork {
        uplink: Some(Uplink { node: NodeId(2), bridge: "br0".into() }),
        external_vteps: vec!["192.0.2.1".into(), "192.0.2.2:8472".into()],
        ..new_network("tenant-a", "10.1.0.0/24")
    };
    let n = bed.nets.create_network(req).await.unwrap();
    assert_eq!(n.uplink, Some(Uplink { node: NodeId(2), bridge: "br0".into() }));
    assert_eq!(n.external_vteps, ["192.0.2.1:4789", "192.0.2.2:8472"]);

    let to = |node, bridge: &str| NetworkUpdate {
        uplink: Some(Some(Uplink { node: NodeId(node), bridge: bridge.into() })),
        ..NetworkUpdate::default()
    };
    let e = bed.refused(bed.nets.update_network("tenant-a", to(7, "br0"))).await;
    assert!(matches!(e, NetworkError::NoNode(NodeId(7))));
    let e = bed.refused(bed.nets.update_network("tenant-a", to(1, ""))).await;
    assert!(matches!(e, NetworkError::Ifname(_)));
    let n = bed.nets.update_network("tenant-a", to(1, "br1")).await.unwrap();
    assert_eq!(n.uplink, Some(Uplink { node: NodeId(1), bridge: "br1".into() }));
    let u = NetworkUpdate { uplink: Some(None), external_vteps: Some(vec![]), ..NetworkUpdate::default() };
    let n = bed.nets.update_network("tenant-a", u).await.unwrap();
    assert_eq!((n.uplink.clone(), n.external_vteps.len()), (None, 0));
    assert_eq!(bed.nets.network("tenant-a").await.unwrap().0, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_changes_only_what_it_names_and_a_bad_one_nothing() {
    let bed = Bed::new(1).await;
    let before = bed.network("tenant-a", "10.1.0.0/24").await;
    let u = NetworkUpdate { mtu: Some(1400), dns: Some(vec![ip("9.9.9.9")]), ..NetworkUpdate::default() };
    let after = bed.nets.update_network("tenant-a", u).await.unwrap();
    assert_eq!((after.mtu, after.dns.clone()), (1400, vec![ip("9.9.9.9")]));
    let unchanged = |a: &nodeos_types::records::NetworkRecord| {
        (a.id, a.vni, a.cidr, a.gateway, a.lease_secs, a.created_at_ms, a.uplink.clone())
    };
    assert_eq!(unchanged(&after), unchanged(&before));
    for u in [
        NetworkUpdate { mtu: Some(10_000), ..NetworkUpdate::default() },
        NetworkUpdate { lease_secs: Some(0), ..NetworkUpdate::default() },
        NetworkUpdate { external_vteps: Some(vec!["x".into()]), ..NetworkUpdate::default() },
    ] {
        bed.refused(bed.nets.update_network("tenant-a", u)).await;
    }
    let e = bed.refused(bed.nets.update_network("nowhere", NetworkUpdate::default())).await;
    assert!(matches!(e, NetworkError::NoNetwork(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_with_ports_cannot_be_deleted_and_one_without_goes_with_its_keys() {
    let bed = Bed::new(1).await;
    let n = bed.network("tenant-a", "10.1.0.0/24").await;
    let p = bed.tap("tenant-a", 1, "t0").await;
    let e = bed.refused(bed.nets.delete_network("tenant-a")).await;
    assert!(matches!(e, NetworkError::HasPorts { network, ports: 1 } if network == "tenant-a"));
    bed.nets.delete_port(&p.id.to_string()).await.unwrap();
    assert_eq!(bed.nets.delete_network(&n.id.to_string()).await.unwrap().id, n.id);
    for prefix in [NETWORKS_PREFIX, NETWORK_NAMES_PREFIX, NETWORK_VNIS_PREFIX, "ipam/"] {
        assert!(bed.keys(prefix).await.is_empty(), "{prefix}");
    }
    let e = bed.refused(bed.nets.delete_network("tenant-a")).await;
    assert!(matches!(e, NetworkError::NoNetwork(_)));
    // Name and VNI are free again.
    let again = NewNetwork { vni: Some(n.vni), ..new_network("tenant-a", "10.9.0.0/24") };
    assert_eq!(bed.nets.create_network(again).await.unwrap().vni, n.vni);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_made_while_its_network_is_deleted_is_never_left_without_it() {
    let bed = Bed::racy(1, Duration::from_millis(4)).await;
    let through = bed.through_each_node();
    for round in 0..ROUNDS {
        let name = format!("n{round}");
        bed.network(&name, "10.1.0.0/24").await;
        let (nets_a, nets_b, n) = (through[1].clone(), through[2].clone(), name.clone());
        let port =
            tokio::spawn(async move { nets_a.create_port(tap_port(&n, 1, &format!("t{round}"))).await });
        let delete = tokio::spawn({
            let name = name.clone();
            async move {
                tokio::time::sleep(stagger(round)).await;
                nets_b.delete_network(&name).await
            }
        });
        let (port, delete) = (port.await.unwrap(), delete.await.unwrap());
        let networks = bed.nets.list_networks().await.unwrap();
        for p in bed.nets.list_ports().await.unwrap() {
            assert!(
                networks.iter().any(|n| n.id == p.network),
                "round {round}: port {} has no network",
                p.id
            );
        }
        match (port, delete) {
            (Ok(p), Err(NetworkError::HasPorts { .. })) => {
                bed.nets.delete_port(&p.id.to_string()).await.unwrap()
            }
            (Err(NetworkError::NoNetwork(_)), Ok(_)) => continue,
            other => panic!("round {round}: {other:?}"),
        };
        bed.nets.delete_network(&name).await.unwrap();
    }
    assert!(bed.keys("ipam/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_port_moves_the_name_entry_that_a_delete_compares() {
    // The deterministic half of the race above: a delete that counted no
    // ports compares this revision, so a port made after the count fails it.
    let bed = Bed::new(1).await;
    let n = bed.network("tenant-a", "10.1.0.0/24").await;
    let key = network_name_key("tenant-a");
    let before = bed.revision(&key).await;
    bed.tap("tenant-a", 1, "t0").await;
    assert!(bed.revision(&key).await > before);
    assert_eq!(bed.value(&key).await, Some(n.id.to_string()), "the entry still names the network");
}

// ---- security groups ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_made_with_its_rules_once_and_a_unique_name() {
    let bed = Bed::new(1).await;
    let ssh = rule("ingress tcp 22");
    let g = bed.nets.create_security_group("web", vec![ssh, ssh], true).await.unwrap();
    assert_eq!(g.rules, [ssh, rule("egress any 0.0.0.0/0"), rule("egress any ::/0")]);
    assert_eq!(bed.nets.security_group("web").await.unwrap().0, g);
    assert_eq!(bed.nets.security_group(&g.id.to_string()).await.unwrap().0, g);
    let bare = bed.nets.create_security_group("bare", vec![], false).await.unwrap();
    assert!(bare.rules.is_empty());
    let e = bed.refused(bed.nets.create_security_group("web", vec![], false)).await;
    assert!(matches!(e, NetworkError::NameTaken { what: "security group", .. }));
    let e = bed.refused(bed.nets.create_security_group("Web!", vec![], false)).await;
    assert!(matches!(e, NetworkError::Name { what: "security group", .. }));
    let many: Vec<SecurityRule> = (1..=255).map(|p| rule(&format!("ingress tcp {p}"))).collect();
    let e = bed.refused(bed.nets.create_security_group("many", many, true)).await;
    assert!(matches!(e, NetworkError::TooManyRules));
    assert_eq!(bed.keys(SECURITY_GROUPS_PREFIX).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_added_and_removed_and_a_bad_change_writes_nothing() {
    let bed = Bed::new(1).await;
    let (ssh, web, dns) = (rule("ingress tcp 22"), rule("ingress tcp 443"), rule("ingress udp 53"));
    bed.nets.create_security_group("g", vec![ssh], false).await.unwrap();
    let g = bed.nets.change_rules("g", &[web, ssh], &[]).await.unwrap();
    assert_eq!(g.rules, [ssh, web]);
    let g = bed.nets.change_rules("g", &[dns], &[ssh]).await.unwrap();
    assert_eq!(g.rules, [web, dns]);
    assert_eq!(bed.nets.security_group("g").await.unwrap().0.rules, [web, dns]);
    let e = bed.refused(bed.nets.change_rules("g", &[ssh], &[ssh])).await;
    assert!(matches!(e, NetworkError::NoRule { group, .. } if group == "g"));
    // 255 more, one of them (udp 53) already there: 256 is the most a group holds.
    let many: Vec<SecurityRule> = (1..=255).map(|p| rule(&format!("ingress udp {p}"))).collect();
    assert_eq!(bed.nets.change_rules("g", &many, &[]).await.unwrap().rules.len(), 256);
    let e = bed.refused(bed.nets.change_rules("g", &[rule("ingress udp 256")], &[])).await;
    assert!(matches!(e, NetworkError::TooManyRules));
    let e = bed.refused(bed.nets.change_rules("nope", &[ssh], &[])).await;
    assert!(matches!(e, NetworkError::NoSecurityGroup(x) if x == "nope"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_in_use_cannot_be_deleted() {
    let bed = Bed::new(1).await;
    bed.network("tenant-a", "10.1.0.0/24").await;
    let g = bed.nets.create_security_group("g", vec![], true).await.unwrap();
    let req = |ifname: &str| nodeos_network::networks::NewPort {
        security_groups: vec!["g".into(), g.id.to_string()],
        ..tap_port("tenant-a", 1, ifname)
    };
    let p1 = bed.nets.create_port(req("t1")).await.unwrap();
    assert_eq!(p1.security_groups, [g.id], "named twice, listed once");
    let p2 = bed.nets.create_port(req("t2")).await.unwrap();
    let e = bed.refused(bed.nets.delete_security_group("g")).await;
    assert!(matches!(e, NetworkError::GroupInUse { group, ports: 2 } if group == "g"));
    bed.nets.delete_port(&p1.id.to_string()).await.unwrap();
    let p2 = bed.nets.set_port_security(&p2.id.to_string(), Some(vec![]), None).await.unwrap();
    assert!(p2.security_groups.is_empty());
    assert_eq!(bed.nets.delete_security_group(&g.id.to_string()).await.unwrap().id, g.id);
    assert!(bed.keys(SECURITY_GROUPS_PREFIX).await.is_empty());
    assert!(bed.keys(SECURITY_GROUP_NAMES_PREFIX).await.is_empty());
    let e = bed.refused(bed.nets.delete_security_group("g")).await;
    assert!(matches!(e, NetworkError::NoSecurityGroup(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_given_a_group_while_it_is_deleted_never_keeps_a_missing_group() {
    let bed = Bed::racy(1, Duration::from_millis(4)).await;
    let through = bed.through_each_node();
    bed.network("tenant-a", "10.1.0.0/24").await;
    let p = bed.tap("tenant-a", 1, "t0").await;
    let port = p.id.to_string();
    for round in 0..ROUNDS {
        let name = format!("g{round}");
        bed.nets.create_security_group(&name, vec![], true).await.unwrap();
        let (nets_a, nets_b) = (through[1].clone(), through[2].clone());
        let set = tokio::spawn({
            let (port, name) = (port.clone(), name.clone());
            async move { nets_a.set_port_security(&port, Some(vec![name]), None).await }
        });
        let delete = tokio::spawn({
            let name = name.clone();
            async move {
                tokio::time::sleep(stagger(round)).await;
                nets_b.delete_security_group(&name).await
            }
        });
        let (set, delete) = (set.await.unwrap(), delete.await.unwrap());
        let groups = bed.nets.list_security_groups().await.unwrap();
        let (now, _) = bed.nets.port(&port).await.unwrap();
        for g in &now.security_groups {
            assert!(groups.iter().any(|x| x.id == *g), "round {round}: port keeps deleted group {g}");
        }
        match (set, delete) {
            (Ok(_), Err(NetworkError::GroupInUse { .. })) => {
                bed.nets.set_port_security(&port, Some(vec![]), None).await.unwrap();
                bed.nets.delete_security_group(&name).await.unwrap();
            }
            (Err(NetworkError::NoSecurityGroup(_)), Ok(_)) => {}
            other => panic!("round {round}: {other:?}"),
        }
    }
    assert!(bed.keys(SECURITY_GROUP_NAMES_PREFIX).await.is_empty(), "no name entry outlives its group");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_given_a_group_moves_the_name_entry_that_a_delete_compares() {
    let bed = Bed::new(1).await;
    bed.network("tenant-a", "10.1.0.0/24").await;
    let g = bed.nets.create_security_group("g", vec![], true).await.unwrap();
    let p = bed.tap("tenant-a", 1, "t0").await;
    let key = security_group_name_key("g");
    let before = bed.revision(&key).await;
    bed.nets.set_port_security(&p.id.to_string(), Some(vec!["g".into()]), None).await.unwrap();
    assert!(bed.revision(&key).await > before);
    assert_eq!(bed.value(&key).await, Some(g.id.to_string()));
}
