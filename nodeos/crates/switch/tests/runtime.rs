//! Two running switches on loopback, VM-style ports on socket pairs: frames
//! cross the VXLAN tunnel, port security and security groups hold, and
//! tunnel traffic from unlisted VTEPs or unknown VNIs is dropped and counted.
//! Needs no privileges (no taps).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, recv, send, socketpair};
use nodeos_switch::frame::Mac;
use nodeos_switch::packet::{PROTO_TCP, checksum};
use nodeos_switch::switch::{Attachment, Desired, NetworkConfig, PortConfig, SwitchHandle};
use nodeos_switch::vxlan;
use nodeos_types::PortId;
use nodeos_types::net::SecurityRule;

const VNI: u32 = 100;

fn mac(n: u8) -> Mac {
    Mac([2, 0, 0, 0, 0, n])
}

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, n)
}

fn network(vteps: &[SocketAddr]) -> NetworkConfig {
    NetworkConfig {
        vni: VNI,
        cidr: "10.0.0.0/24".parse().expect("cidr"),
        gateway: Some(ip(1)),
        answer_gateway: true,
        mtu: 1450,
        dns: vec![],
        lease_secs: 3600,
        vteps: vteps.iter().copied().collect::<BTreeSet<_>>(),
    }
}

fn port(n: u8, rules: &[&str]) -> PortConfig {
    PortConfig {
        id: PortId(u64::from(n)),
        vni: VNI,
        mac: mac(n),
        ip: Some(ip(n)),
        port_security: true,
        rules: rules.iter().map(|r| r.parse::<SecurityRule>().expect("rule")).collect(),
        attachment: Attachment::Vm,
        hostname: None,
    }
}

/// A VM's end of a NIC socket whose other end is attached to `sw` as `port`.
fn plug(sw: &SwitchHandle, port: u8) -> OwnedFd {
    let (node, vm) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .expect("socketpair");
    sw.attach(PortId(u64::from(port)), node).map_err(|(e, _)| e).expect("attach");
    vm
}

/// An IPv4 TCP SYN from port `from` to port `to`.
fn tcp_syn(from: u8, to: u8, dst_port: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&mac(to).0);
    f.extend_from_slice(&mac(from).0);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut iph = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, PROTO_TCP, 0, 0];
    iph.extend_from_slice(&ip(from).octets());
    iph.extend_from_slice(&ip(to).octets());
    let sum = checksum(&iph, 0);
    iph[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&iph);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x02;
    f.extend_from_slice(&tcp);
    f
}

fn raw(dst: Mac, src: Mac) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.resize(60, 0x42);
    f
}

/// The next frame on a VM end within `wait`, if any.
async fn next_frame(fd: &OwnedFd, wait: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 9300];
    loop {
        match recv(std::os::fd::AsRawFd::as_raw_fd(fd), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => return Some(buf[..n].to_vec()),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(_) => return None,
        }
    }
}

fn put(fd: &OwnedFd, f: &[u8]) {
    send(std::os::fd::AsRawFd::as_raw_fd(fd), f, MsgFlags::empty()).expect("send");
}

async fn pair() -> (SwitchHandle, SwitchHandle) {
    let a = SwitchHandle::start("127.0.0.1:0".parse().expect("addr")).await.expect("switch a");
    let b = SwitchHandle::start("127.0.0.1:0".parse().expect("addr")).await.expect("switch b");
    (a, b)
}

#[tokio::test]
async fn frames_cross_the_tunnel_and_groups_decide_what_is_delivered() {
    let (a, b) = pair().await;
    let (va, vb) = (a.local_vtep(), b.local_vtep());
    let out = ["egress any"];
    assert!(a.apply(Desired { networks: vec![network(&[vb])], ports: vec![port(2, &out)] }).await.is_empty());
    let rules = ["ingress tcp 22 10.0.0.0/24"];
    assert!(
        b.apply(Desired { networks: vec![network(&[va])], ports: vec![port(3, &rules)] }).await.is_empty()
    );
    let (p2, p3) = (plug(&a, 2), plug(&b, 3));

    // Broadcast from port 2 reaches port 3 on the other switch.
    let bcast = raw(Mac::BROADCAST, mac(2));
    put(&p2, &bcast);
    assert_eq!(next_frame(&p3, Duration::from_secs(2)).await.as_deref(), Some(&bcast[..]));
    // An allowed SYN goes through; one to another port is refused and counted.
    put(&p2, &tcp_syn(2, 3, 22));
    assert!(next_frame(&p3, Duration::from_secs(2)).await.is_some(), "allowed SYN not delivered");
    put(&p2, &tcp_syn(2, 3, 23));
    assert!(next_frame(&p3, Duration::from_millis(300)).await.is_none(), "SYN to port 23 delivered");
    assert_eq!(b.port_stats(PortId(3)).map(|s| s.denied_ingress), Some(1));
    // Spoofed source MAC and source IP never leave port 2.
    put(&p2, &raw(Mac::BROADCAST, mac(9)));
    let mut spoofed_ip = tcp_syn(2, 3, 22);
    spoofed_ip[26..30].copy_from_slice(&ip(9).octets());
    put(&p2, &spoofed_ip);
    assert!(next_frame(&p3, Duration::from_millis(300)).await.is_none(), "spoofed frame delivered");
    assert_eq!(a.port_stats(PortId(2)).map(|s| s.spoofed), Some(2));
    // Garbage from a port is counted, not forwarded.
    put(&p2, &[1, 2, 3]);
    assert!(next_frame(&p3, Duration::from_millis(200)).await.is_none());
    assert_eq!(a.port_stats(PortId(2)).map(|s| s.malformed), Some(1));

    // Rules change live: port 23 is allowed once a rule says so.
    let rules = ["ingress tcp 22 10.0.0.0/24", "ingress tcp 23"];
    assert!(
        b.apply(Desired { networks: vec![network(&[va])], ports: vec![port(3, &rules)] }).await.is_empty()
    );
    put(&p2, &tcp_syn(2, 3, 23));
    assert!(next_frame(&p3, Duration::from_secs(2)).await.is_some(), "SYN to 23 refused after the rule");
}

#[tokio::test]
async fn tunnel_traffic_from_strangers_or_for_unknown_networks_is_dropped() {
    let (a, b) = pair().await;
    let vb = b.local_vtep();
    assert!(a.apply(Desired { networks: vec![network(&[vb])], ports: vec![port(2, &[])] }).await.is_empty());
    let p2 = plug(&a, 2);
    // Another address than switch b's: a VTEP is also matched by its IP
    // alone (Linux picks its source port per flow).
    let stranger = tokio::net::UdpSocket::bind("127.0.0.2:0").await.expect("bind");
    let frame = raw(Mac::BROADCAST, mac(7));
    let mut d = vxlan::encode(VNI).expect("vni").to_vec();
    d.extend_from_slice(&frame);
    stranger.send_to(&d, a.local_vtep()).await.expect("send");
    let mut other_vni = vxlan::encode(VNI + 1).expect("vni").to_vec();
    other_vni.extend_from_slice(&frame);
    stranger.send_to(&other_vni, a.local_vtep()).await.expect("send");
    stranger.send_to(&[0xff; 5], a.local_vtep()).await.expect("send");
    assert!(next_frame(&p2, Duration::from_millis(500)).await.is_none(), "a stranger's frame was delivered");
    let t = a.tunnel_stats();
    assert_eq!((t.unknown_vtep, t.unknown_vni, t.bad_header), (1, 1, 1), "{t:?}");
    // A node gone from the network's VTEPs is no longer heard either.
    let (vb_sock, _) = (vb, ());
    assert!(a.apply(Desired { networks: vec![network(&[])], ports: vec![port(2, &[])] }).await.is_empty());
    assert!(
        b.apply(Desired { networks: vec![network(&[a.local_vtep()])], ports: vec![port(3, &[])] })
            .await
            .is_empty()
    );
    let p3 = plug(&b, 3);
    put(&p3, &raw(Mac::BROADCAST, mac(3)));
    assert!(next_frame(&p2, Duration::from_millis(500)).await.is_none(), "frame from {vb_sock} delivered");
    assert_eq!(a.tunnel_stats().unknown_vtep, 2);
}

#[tokio::test]
async fn the_switch_answers_arp_for_the_gateway_and_detached_ports_drop() {
    let (a, _b) = pair().await;
    assert!(a.apply(Desired { networks: vec![network(&[])], ports: vec![port(2, &[])] }).await.is_empty());
    let p2 = plug(&a, 2);
    put(&p2, &nodeos_switch::arp::request(mac(2), ip(2), ip(1)));
    let reply = next_frame(&p2, Duration::from_secs(2)).await;
    let reply = reply.unwrap_or_else(|| panic!("no ARP reply: {:?}", a.port_stats(PortId(2))));
    let arp = nodeos_switch::arp::parse(&reply).expect("parses").expect("is ARP");
    assert_eq!((arp.op, arp.sender_ip), (nodeos_switch::arp::OP_REPLY, ip(1)));
    assert_eq!(arp.sender_mac, nodeos_switch::switch::gateway_mac(VNI));
    // The VM side closes: the port is detached.
    drop(p2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.port_stats(PortId(2)).map(|s| s.attached), Some(false));
    // Ports of networks that are gone go with them.
    assert!(a.apply(Desired::default()).await.is_empty());
    assert!(a.port_stats(PortId(2)).is_none());
}
