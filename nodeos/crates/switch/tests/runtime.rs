//! Two running switches on loopback, VM-style ports on socket pairs: frames
//! cross the VXLAN tunnel, port security and security groups hold, the
//! switch answers ARP and pings for the gateway, and tunnel traffic from
//! unlisted VTEPs or unknown VNIs is dropped and counted.
//! Needs no privileges (no taps).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, recv, send, socketpair};
use nodeos_switch::frame::Mac;
use nodeos_switch::icmp;
use nodeos_switch::packet::{self, L4, PROTO_TCP, checksum};
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

#[tokio::test]
async fn the_switch_answers_pings_to_the_gateway_on_the_pinging_port_only() {
    let (a, b) = pair().await;
    let (va, vb) = (a.local_vtep(), b.local_vtep());
    let gw_mac = nodeos_switch::switch::gateway_mac(VNI);
    let open = ["ingress any"];
    let without_security = PortConfig { port_security: false, ..port(5, &[]) };
    let ports = vec![port(2, &["egress icmp"]), port(4, &open), without_security];
    assert!(a.apply(Desired { networks: vec![network(&[vb])], ports }).await.is_empty());
    assert!(
        b.apply(Desired { networks: vec![network(&[va])], ports: vec![port(3, &open)] }).await.is_empty()
    );
    let (p2, p4, p5, p3) = (plug(&a, 2), plug(&a, 4), plug(&a, 5), plug(&b, 3));
    let quiet = |what: &'static str| {
        let (p3, p4, p5) = (&p3, &p4, &p5);
        async move {
            for (name, p) in [("port 3", p3), ("port 4", p4), ("port 5", p5)] {
                let f = next_frame(p, Duration::from_millis(200)).await;
                assert!(f.is_none(), "{what}: a frame reached {name}: {f:?}");
            }
        }
    };

    // A ping from port 2 comes back to port 2 from the gateway, and to no other port.
    let ping = icmp::request(mac(2), ip(2), gw_mac, ip(1), 0x4242, 7, b"are you there?");
    put(&p2, &ping);
    let r = next_frame(&p2, Duration::from_secs(2)).await;
    let r = r.unwrap_or_else(|| panic!("no echo reply: {:?}", a.port_stats(PortId(2))));
    assert_eq!((&r[..6], &r[6..12]), (&mac(2).0[..], &gw_mac.0[..]));
    let p = packet::parse(&r).expect("parses").expect("is IP");
    assert_eq!((p.src, p.dst), (ip(1).into(), ip(2).into()));
    assert_eq!(p.l4, L4::Icmp { ty: icmp::TYPE_ECHO_REPLY, code: 0, ident: Some(0x4242) });
    assert_eq!(checksum(&r[14..34], 0), 0, "IP checksum");
    assert_eq!(checksum(&r[34..14 + 28 + 14], 0), 0, "ICMP checksum");
    assert_eq!(&r[40..42], &7u16.to_be_bytes(), "sequence");
    assert_eq!(&r[42..56], b"are you there?");
    assert_eq!(r[22], 64, "TTL");
    quiet("echo request from port 2").await;
    assert_eq!(a.port_stats(PortId(2)).map(|s| s.ping_answered), Some(1));

    // Port security holds: a ping from another address is neither answered nor forwarded.
    let spoofed = icmp::request(mac(2), ip(9), gw_mac, ip(1), 1, 1, b"");
    put(&p2, &spoofed);
    assert!(next_frame(&p2, Duration::from_millis(300)).await.is_none(), "spoofed ping answered");
    quiet("spoofed echo request").await;
    assert_eq!(a.port_stats(PortId(2)).map(|s| (s.spoofed, s.ping_answered)), Some((1, 1)));

    // So do security groups: port 4 may send nothing, so its ping is not answered.
    put(&p4, &icmp::request(mac(4), ip(4), gw_mac, ip(1), 1, 1, b""));
    assert!(next_frame(&p4, Duration::from_millis(300)).await.is_none(), "denied ping answered");
    let s = a.port_stats(PortId(4)).expect("port 4");
    assert_eq!((s.denied_egress, s.ping_answered), (1, 0));

    // Without port security there are no checks, and the gateway still answers.
    put(&p5, &icmp::request(mac(5), ip(5), gw_mac, ip(1), 9, 9, b""));
    let r = next_frame(&p5, Duration::from_secs(2)).await.expect("echo reply on port 5");
    assert_eq!(&r[..6], &mac(5).0[..]);
    assert_eq!(a.port_stats(PortId(5)).map(|s| s.ping_answered), Some(1));

    // A fragment is not answered.
    let mut fragment = icmp::request(mac(2), ip(2), gw_mac, ip(1), 1, 2, b"0123456789abcdef");
    fragment[20] |= 0x20;
    fragment[24..26].copy_from_slice(&[0, 0]);
    let sum = checksum(&fragment[14..34], 0);
    fragment[24..26].copy_from_slice(&sum.to_be_bytes());
    put(&p2, &fragment);
    // A ping longer than the network's MTU is not answered either.
    put(&p2, &icmp::request(mac(2), ip(2), gw_mac, ip(1), 1, 3, &[0; 1450 - 28 + 1]));
    assert!(next_frame(&p2, Duration::from_millis(300)).await.is_none(), "fragment or big ping answered");
    assert_eq!(a.port_stats(PortId(2)).map(|s| s.ping_answered), Some(1));
}
