//! Ports and IPAM against a real in-process store: addresses are handed out
//! once, even to requests racing each other, and a refused port writes
//! nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use common::{Bed, ip, tap_port};
use nodeos_network::networks::{NetworkUpdate, NewPort};
use nodeos_network::{NetworkError, Networks};
use nodeos_types::net::MacAddr;
use nodeos_types::records::{IPAM_PREFIX, PORTS_PREFIX, PortKind, ipam_key};
use nodeos_types::{NodeId, VmId};

/// Creates `n` ports on `network` at once, each through `nets[i % len]`.
async fn race(nets: &[Networks], network: &str, n: usize) -> Vec<Result<Ipv4Addr, NetworkError>> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (nets, network) = (nets[i % nets.len()].clone(), network.to_owned());
            tokio::spawn(async move {
                let p = nets.create_port(tap_port(&network, 1, &format!("t{i}"))).await?;
                Ok(p.ip.unwrap())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn distinct(ips: &[Ipv4Addr]) -> bool {
    ips.iter().collect::<BTreeSet<_>>().len() == ips.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_get_the_lowest_free_address_and_hold_its_lease() {
    let bed = Bed::new(1).await;
    let n = bed.network("tenant-a", "10.1.0.0/24").await;
    let a = bed.tap("tenant-a", 1, "t0").await;
    let b = bed.tap("tenant-a", 1, "t1").await;
    let c = bed.tap("tenant-a", 1, "t2").await;
    assert_eq!([a.ip, b.ip, c.ip], ["10.1.0.2", "10.1.0.3", "10.1.0.4"].map(|s| Some(ip(s))));
    assert_eq!(bed.value(&ipam_key(n.id, ip("10.1.0.3"))).await, Some(b.id.to_string()));
    assert_eq!(bed.nets.port(&b.id.to_string()).await.unwrap().0, b);
    assert!(a.mac.is_unicast() && a.mac != b.mac);

    assert_eq!(bed.nets.delete_port(&b.id.to_string()).await.unwrap().id, b.id);
    assert_eq!(bed.value(&ipam_key(n.id, ip("10.1.0.3"))).await, None, "the lease goes with the port");
    assert_eq!(bed.keys(PORTS_PREFIX).await.len(), 2);
    assert_eq!(bed.tap("tenant-a", 1, "t3").await.ip, Some(ip("10.1.0.3")), "a freed address is reused");
    let e = bed.refused(bed.nets.delete_port(&b.id.to_string())).await;
    assert!(matches!(e, NetworkError::NoPort(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_made_at_once_never_share_an_address() {
    let bed = Bed::new(1).await;
    let n = bed.network("tenant-a", "10.1.0.0/24").await;
    // More racers than a transaction's conflict retries: every one is served.
    let got: Vec<Ipv4Addr> =
        race(std::slice::from_ref(&bed.nets), "tenant-a", 16).await.into_iter().map(Result::unwrap).collect();
    assert!(distinct(&got), "{got:?}");
    let want: BTreeSet<Ipv4Addr> = (2..18).map(|i| Ipv4Addr::new(10, 1, 0, i)).collect();
    assert_eq!(got.iter().copied().collect::<BTreeSet<_>>(), want, "the lowest ones, none skipped");
    let leases = bed.keys(&format!("{IPAM_PREFIX}{}/", n.id)).await;
    assert_eq!(leases.len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racers_for_the_last_addresses_get_them_once_and_the_rest_hear_full() {
    let bed = Bed::new(1).await;
    // A /28 with a gateway has 13 addresses for ports.
    bed.network("small", "10.1.0.0/28").await;
    let results = race(std::slice::from_ref(&bed.nets), "small", 16).await;
    let got: Vec<Ipv4Addr> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    assert_eq!(got.len(), 13, "{results:?}");
    assert!(distinct(&got), "{got:?}");
    assert!(!got.contains(&ip("10.1.0.1")) && !got.contains(&ip("10.1.0.15")));
    for r in &results {
        assert!(matches!(r, Ok(_) | Err(NetworkError::Full(_))), "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_made_through_different_nodes_at_once_never_share_an_address() {
    let bed = Bed::racy(1, Duration::from_millis(2)).await;
    bed.network("tenant-a", "10.1.0.0/24").await;
    let nets = bed.through_each_node();
    let got: Vec<Ipv4Addr> = race(&nets, "tenant-a", 12).await.into_iter().map(Result::unwrap).collect();
    assert!(distinct(&got), "{got:?}");
    assert_eq!(bed.nets.list_ports().await.unwrap().len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_asked_for_is_refused_outside_the_hosts_on_the_gateway_or_when_taken() {
    let bed = Bed::new(1).await;
    bed.network("tenant-a", "10.1.0.0/24").await;
    let at = |s: &str, ifname: &str| NewPort { ip: Some(ip(s)), ..tap_port("tenant-a", 1, ifname) };
    let p = bed.nets.create_port(at("10.1.0.200", "t0")).await.unwrap();
    assert_eq!(p.ip, Some(ip("10.1.0.200")));
    for bad in ["10.1.0.0", "10.1.0.255", "10.2.0.7"] {
        let e = bed.refused(bed.nets.create_port(at(bad, "t1"))).await;
        assert!(
            matches!(e, NetworkError::NotInNetwork { what: "ip", ip: i, .. } if i == ip(bad)),
            "{bad}: {e:?}"
        );
    }
    for taken in ["10.1.0.1", "10.1.0.200"] {
        let e = bed.refused(bed.nets.create_port(at(taken, "t1"))).await;
        assert!(matches!(e, NetworkError::IpTaken { ip: i, .. } if i == ip(taken)), "{taken}: {e:?}");
    }
    // The lowest free address skips the one handed out by request.
    assert_eq!(bed.tap("tenant-a", 1, "t2").await.ip, Some(ip("10.1.0.2")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_address_asked_for_is_not_called_taken_when_the_network_changes_meanwhile() {
    let bed = Bed::racy(1, Duration::from_millis(4)).await;
    let through = bed.through_each_node();
    bed.network("tenant-a", "10.1.0.0/24").await;
    for round in 0..20u8 {
        let (nets_a, nets_b) = (through[1].clone(), through[2].clone());
        let want = Ipv4Addr::new(10, 1, 0, 10 + round);
        let port = tokio::spawn(async move {
            nets_a
                .create_port(NewPort { ip: Some(want), ..tap_port("tenant-a", 1, &format!("t{round}")) })
                .await
        });
        let update = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(u64::from(round % 10))).await;
            let mtu = NetworkUpdate { mtu: Some(1400 - u16::from(round)), ..NetworkUpdate::default() };
            nets_b.update_network("tenant-a", mtu).await
        });
        let (port, update) = (port.await.unwrap(), update.await.unwrap());
        update.unwrap();
        assert_eq!(port.unwrap().ip, Some(want), "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_network_says_so() {
    let bed = Bed::new(1).await;
    // A /30 holds two hosts: the gateway and one port.
    bed.network("tiny", "10.1.0.0/30").await;
    assert_eq!(bed.tap("tiny", 1, "t0").await.ip, Some(ip("10.1.0.2")));
    let e = bed.refused(bed.nets.create_port(tap_port("tiny", 1, "t1"))).await;
    assert!(matches!(e, NetworkError::Full(n) if n == "tiny"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_on_an_unknown_network_node_or_group_writes_nothing() {
    let bed = Bed::new(1).await;
    bed.network("tenant-a", "10.1.0.0/24").await;
    let e = bed.refused(bed.nets.create_port(tap_port("nowhere", 1, "t0"))).await;
    assert!(matches!(e, NetworkError::NoNetwork(n) if n == "nowhere"));
    let e = bed.refused(bed.nets.create_port(tap_port("tenant-a", 5, "t0"))).await;
    assert!(matches!(e, NetworkError::NoNode(NodeId(5))));
    let grouped = NewPort { security_groups: vec!["ghost".into()], ..tap_port("tenant-a", 1, "t0") };
    let e = bed.refused(bed.nets.create_port(grouped)).await;
    assert!(matches!(e, NetworkError::NoSecurityGroup(g) if g == "ghost"));
    let many = NewPort { security_groups: vec!["g".into(); 17], ..tap_port("tenant-a", 1, "t0") };
    assert!(matches!(bed.refused(bed.nets.create_port(many)).await, NetworkError::TooManyGroups));
    let multicast = NewPort { mac: Some(MacAddr([1, 0, 0x5e, 0, 0, 1])), ..tap_port("tenant-a", 1, "t0") };
    assert!(matches!(bed.refused(bed.nets.create_port(multicast)).await, NetworkError::Mac(_)));
    let bad_tap = tap_port("tenant-a", 1, "a-much-too-long-name");
    assert!(matches!(bed.refused(bed.nets.create_port(bad_tap)).await, NetworkError::Ifname(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_name_is_one_per_node_and_a_mac_one_per_network() {
    let bed = Bed::new(2).await;
    bed.network("a", "10.1.0.0/24").await;
    bed.network("b", "10.2.0.0/24").await;
    let mac = MacAddr([2, 0, 0, 0, 0, 1]);
    bed.nets.create_port(NewPort { mac: Some(mac), ..tap_port("a", 1, "t0") }).await.unwrap();
    let e = bed.refused(bed.nets.create_port(tap_port("b", 1, "t0"))).await;
    assert!(matches!(e, NetworkError::IfnameTaken { node: NodeId(1), ifname } if ifname == "t0"));
    bed.tap("b", 2, "t0").await;
    let e = bed.refused(bed.nets.create_port(NewPort { mac: Some(mac), ..tap_port("a", 1, "t1") })).await;
    assert!(matches!(e, NetworkError::MacTaken { mac: m, network } if m == mac && network == "a"));
    let other = bed.nets.create_port(NewPort { mac: Some(mac), ..tap_port("b", 1, "t1") }).await.unwrap();
    assert_eq!(other.mac, mac);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vms_ports_come_back_in_nic_order() {
    let bed = Bed::new(1).await;
    bed.network("a", "10.1.0.0/24").await;
    let vm = |vm: u64, nic: u8| NewPort { kind: PortKind::Vm { vm: VmId(vm), nic }, ..tap_port("a", 1, "") };
    let second = bed.nets.create_port(vm(7, 1)).await.unwrap();
    bed.nets.create_port(vm(8, 0)).await.unwrap();
    let first = bed.nets.create_port(vm(7, 0)).await.unwrap();
    let ids: Vec<_> = bed.nets.ports_of_vm(VmId(7)).await.unwrap().into_iter().map(|p| p.id).collect();
    assert_eq!(ids, [first.id, second.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_security_and_groups_change_and_an_unknown_group_writes_nothing() {
    let bed = Bed::new(1).await;
    bed.network("a", "10.1.0.0/24").await;
    let g = bed.nets.create_security_group("g", vec![], true).await.unwrap();
    let p = bed.tap("a", 1, "t0").await;
    let id = p.id.to_string();
    let p = bed.nets.set_port_security(&id, Some(vec!["g".into()]), Some(false)).await.unwrap();
    assert_eq!((p.security_groups.clone(), p.port_security), (vec![g.id], false));
    assert_eq!(bed.nets.port(&id).await.unwrap().0, p);
    let p = bed.nets.set_port_security(&id, None, Some(true)).await.unwrap();
    assert_eq!((p.security_groups.clone(), p.port_security), (vec![g.id], true), "groups left as they were");
    let e = bed.refused(bed.nets.set_port_security(&id, Some(vec!["ghost".into()]), None)).await;
    assert!(matches!(e, NetworkError::NoSecurityGroup(_)));
    let e = bed.refused(bed.nets.set_port_security(&id, Some(vec!["g".into(); 17]), None)).await;
    assert!(matches!(e, NetworkError::TooManyGroups));
    let e = bed.refused(bed.nets.set_port_security("0000000000000001", None, Some(false))).await;
    assert!(matches!(e, NetworkError::NoPort(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_changed_while_it_is_deleted_is_still_deleted_with_its_lease() {
    let bed = Bed::racy(1, Duration::from_millis(4)).await;
    let through = bed.through_each_node();
    let n = bed.network("tenant-a", "10.1.0.0/24").await;
    for round in 0..20u64 {
        let p = bed.tap("tenant-a", 1, "t0").await;
        let (nets_a, nets_b, id) = (through[1].clone(), through[2].clone(), p.id.to_string());
        let change = tokio::spawn({
            let id = id.clone();
            async move { nets_a.set_port_security(&id, None, Some(round % 2 == 0)).await }
        });
        let delete = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(round % 10)).await;
            nets_b.delete_port(&id).await
        });
        let (change, delete) = (change.await.unwrap(), delete.await.unwrap());
        assert_eq!(delete.unwrap().id, p.id, "round {round}");
        assert!(matches!(change, Ok(_) | Err(NetworkError::NoPort(_))), "round {round}: {change:?}");
        assert!(bed.nets.list_ports().await.unwrap().is_empty(), "round {round}");
        assert!(bed.keys(&format!("{IPAM_PREFIX}{}/", n.id)).await.is_empty(), "round {round}");
    }
}
