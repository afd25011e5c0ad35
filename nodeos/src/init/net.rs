//! The management network, brought up over rtnetlink on a thread of its own
//! (`nodeos-net`, a current-thread tokio runtime) that reports to the
//! supervisor with [`NetEvent`]s.
//!
//! Steps: `lo` up; every ethernet link up; the management interface is
//! `nodeos.iface`, or the first ethernet link (lowest index) with carrier;
//! then either the static address and default route of `nodeos.ip`, or the
//! DHCP client of [`super::dhcp`] on a UDP socket bound to the interface,
//! which keeps the lease renewed. Without carrier or without an answer this
//! waits and asks forever, saying on the console why, at most every
//! [`REPORT_EVERY`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::{info, warn};

use super::Throttle;
use super::cmdline::IpConfig;
use super::dhcp::{self, Action, Dest, Lease, Phase};

/// How often the console repeats why the network is not up.
pub const REPORT_EVERY: Duration = Duration::from_secs(30);
/// Quiet time before the first "no network" line: links need a moment for carrier.
const FIRST_REPORT_AFTER: Duration = Duration::from_secs(5);
const LINK_POLL: Duration = Duration::from_millis(500);
/// Where a node's name servers go.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// What the network thread tells the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetEvent {
    /// The management address is configured.
    Up { iface: String, addr: Ipv4Addr },
    /// The management address was removed (lease lost).
    Down { iface: String, addr: Ipv4Addr },
}

/// What the network thread needs.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub ip: IpConfig,
    pub iface: Option<String>,
    pub dns: Vec<Ipv4Addr>,
    pub hostname: String,
    /// Where name servers are written (`/etc/resolv.conf` on a node).
    pub resolv_conf: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot start the network thread's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot open a netlink socket")]
    Netlink(#[source] std::io::Error),
    #[error("cannot list network links")]
    Links(#[source] rtnetlink::Error),
    #[error("cannot set link {0} up")]
    LinkUp(String, #[source] rtnetlink::Error),
    #[error("cannot add address {addr}/{prefix} to {iface}")]
    AddAddress {
        iface: String,
        addr: Ipv4Addr,
        prefix: u8,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot remove address {addr} from {iface}")]
    DelAddress {
        iface: String,
        addr: Ipv4Addr,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot add the default route via {0}")]
    Route(Ipv4Addr, #[source] rtnetlink::Error),
    #[error("cannot open the DHCP socket on {0}")]
    DhcpSocket(String, #[source] std::io::Error),
}

/// Starts the network thread. It returns only on a failure that needs a
/// fresh start; the supervisor restarts it.
pub fn spawn(cfg: NetConfig, events: Sender<NetEvent>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("nodeos-net".into()).spawn(move || {
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NetError::Runtime)
            .and_then(|rt| rt.block_on(run(&cfg, &events)));
        if let Err(e) = result {
            warn!(error = %super::chain(&e), "network set-up failed; it will be started again");
        }
    })
}

/// An ethernet link.
#[derive(Debug, Clone)]
struct Link {
    index: u32,
    name: String,
    mac: [u8; 6],
    carrier: bool,
    up: bool,
}

fn link_of(m: &LinkMessage) -> Option<Link> {
    if m.header.link_layer_type != LinkLayerType::Ether || m.header.flags.contains(LinkFlags::Loopback) {
        return None;
    }
    let mut name = None;
    let mut mac = None;
    let mut carrier = m.header.flags.contains(LinkFlags::LowerUp);
    let mut is_virtual = false;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::Carrier(c) => carrier = carrier || *c == 1,
            // Bridges, taps, VXLAN and the like are not ways out of the
            // node; a veth is one in containers and network namespaces.
            LinkAttribute::LinkInfo(infos) => {
                is_virtual = infos.iter().any(|i| matches!(i, LinkInfo::Kind(k) if *k != InfoKind::Veth));
            }
            _ => {}
        }
    }
    if is_virtual {
        return None;
    }
    Some(Link {
        index: m.header.index,
        name: name?,
        mac: mac?,
        carrier,
        up: m.header.flags.contains(LinkFlags::Up),
    })
}

async fn ethernet_links(h: &Handle) -> Result<Vec<Link>, NetError> {
    let all: Vec<LinkMessage> = h.link().get().execute().try_collect().await.map_err(NetError::Links)?;
    let mut links: Vec<Link> = all.iter().filter_map(link_of).collect();
    links.sort_by_key(|l| l.index);
    Ok(links)
}

async fn set_up(h: &Handle, name: &str) -> Result<(), NetError> {
    h.link()
        .set(LinkUnspec::new_with_name(name).up().build())
        .execute()
        .await
        .map_err(|e| NetError::LinkUp(name.to_owned(), e))
}

/// Why no link was chosen yet, for the console.
fn waiting_reason(links: &[Link], wanted: Option<&str>) -> String {
    let list = || {
        links
            .iter()
            .map(|l| format!("{} ({})", l.name, if l.carrier { "carrier" } else { "no carrier" }))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match wanted {
        Some(w) if !links.iter().any(|l| l.name == w) => {
            if links.is_empty() {
                format!("link {w} (nodeos.iface) does not exist and no ethernet link does")
            } else {
                format!("link {w} (nodeos.iface) does not exist; ethernet links: {}", list())
            }
        }
        Some(w) => format!("link {w} (nodeos.iface) has no carrier: is the cable in?"),
        None if links.is_empty() => {
            "no ethernet link exists (is the network driver's module in the image?)".to_owned()
        }
        None => format!("no ethernet link has carrier: {}", list()),
    }
}

/// The chosen link among `links`.
fn choose<'a>(links: &'a [Link], wanted: Option<&str>) -> Option<&'a Link> {
    match wanted {
        Some(w) => links.iter().find(|l| l.name == w && l.carrier),
        None => links.iter().find(|l| l.carrier),
    }
}

/// Waits for the management link, saying why at a bounded rate.
async fn pick(h: &Handle, wanted: Option<&str>) -> Result<Link, NetError> {
    let started = Instant::now();
    let mut said = Throttle::new(REPORT_EVERY);
    loop {
        let links = ethernet_links(h).await?;
        for l in links.iter().filter(|l| !l.up) {
            if let Err(e) = set_up(h, &l.name).await {
                warn!(error = %super::chain(&e), "link stays down");
            }
        }
        if let Some(l) = choose(&links, wanted) {
            return Ok(l.clone());
        }
        if started.elapsed() >= FIRST_REPORT_AFTER {
            let why = waiting_reason(&links, wanted);
            if said.allow(Instant::now(), &why) {
                warn!("no network yet: {why}; still waiting");
            }
        }
        tokio::time::sleep(LINK_POLL).await;
    }
}

async fn run(cfg: &NetConfig, events: &Sender<NetEvent>) -> Result<(), NetError> {
    let (conn, h, _) = rtnetlink::new_connection().map_err(NetError::Netlink)?;
    tokio::spawn(conn);
    set_up(&h, "lo").await?;
    let link = pick(&h, cfg.iface.as_deref()).await?;
    info!(iface = %link.name, mac = %mac_text(&link.mac), "management interface");
    match &cfg.ip {
        IpConfig::Static { addr, prefix, gateway } => {
            let lease = Lease {
                addr: *addr,
                prefix: *prefix,
                router: *gateway,
                dns: cfg.dns.clone(),
                server: Ipv4Addr::UNSPECIFIED,
                lease: Duration::MAX,
                t1: Duration::MAX,
                t2: Duration::MAX,
            };
            apply(&h, &link, &lease, RouteProtocol::Static, &cfg.resolv_conf).await?;
            info!(iface = %link.name, addr = %addr, prefix, gateway = ?gateway, "static address configured");
            let _ = events.send(NetEvent::Up { iface: link.name.clone(), addr: *addr });
            std::future::pending::<()>().await;
            Ok(())
        }
        IpConfig::Dhcp => dhcp_loop(&h, &link, cfg, events).await,
    }
}

fn mac_text(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Configures `lease` on `link`: address, default route, name servers.
async fn apply(
    h: &Handle,
    link: &Link,
    lease: &Lease,
    proto: RouteProtocol,
    resolv_conf: &Path,
) -> Result<(), NetError> {
    h.address().add(link.index, IpAddr::V4(lease.addr), lease.prefix).replace().execute().await.map_err(
        |source| NetError::AddAddress {
            iface: link.name.clone(),
            addr: lease.addr,
            prefix: lease.prefix,
            source,
        },
    )?;
    if let Some(gw) = lease.router {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(link.index)
            .protocol(proto)
            .build();
        h.route().add(route).replace().execute().await.map_err(|e| NetError::Route(gw, e))?;
    }
    if !lease.dns.is_empty() {
        let text: String = lease.dns.iter().map(|d| format!("nameserver {d}\n")).collect();
        let written = match resolv_conf.parent() {
            Some(dir) => std::fs::create_dir_all(dir).and_then(|()| std::fs::write(resolv_conf, text)),
            None => std::fs::write(resolv_conf, text),
        };
        if let Err(e) = written {
            warn!(error = %e, path = %resolv_conf.display(), "name servers not written");
        }
    }
    Ok(())
}

/// Removes `addr` from `link` (its routes go with it).
async fn remove(h: &Handle, link: &Link, addr: Ipv4Addr) -> Result<(), NetError> {
    let del = |source| NetError::DelAddress { iface: link.name.clone(), addr, source };
    let found: Vec<_> =
        h.address().get().set_link_index_filter(link.index).execute().try_collect().await.map_err(del)?;
    for m in found {
        if m.attributes.iter().any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == addr)) {
            h.address().del(m).execute().await.map_err(del)?;
        }
    }
    Ok(())
}

fn dhcp_socket(iface: &str) -> Result<tokio::net::UdpSocket, NetError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |e| NetError::DhcpSocket(iface.to_owned(), e);
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.set_broadcast(true).map_err(err)?;
    s.bind_device(Some(iface.as_bytes())).map_err(err)?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dhcp::CLIENT_PORT).into()).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    tokio::net::UdpSocket::from_std(s.into()).map_err(err)
}

async fn dhcp_loop(
    h: &Handle,
    link: &Link,
    cfg: &NetConfig,
    events: &Sender<NetEvent>,
) -> Result<(), NetError> {
    let sock = dhcp_socket(&link.name)?;
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from_le_bytes([
                link.mac[0],
                link.mac[1],
                link.mac[2],
                link.mac[3],
                link.mac[4],
                link.mac[5],
                0,
                0,
            ]);
    let mut client = dhcp::Client::new(link.mac, Some(cfg.hostname.clone()), seed, Instant::now());
    let mut said = Throttle::new(REPORT_EVERY);
    // Larger than any UDP payload, so a datagram that fills it was cut short.
    let mut buf = vec![0u8; 65536];
    info!(iface = %link.name, "asking for an address over DHCP");
    loop {
        let deadline = tokio::time::Instant::from_std(client.deadline());
        let actions = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => client.on_timeout(Instant::now()),
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) if from.port() == dhcp::SERVER_PORT && n < buf.len() => {
                    client.on_message(Instant::now(), &buf[..n])
                }
                Ok(_) => Vec::new(),
                Err(e) => {
                    warn!(error = %e, "DHCP socket receive failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Vec::new()
                }
            },
        };
        for a in actions {
            match a {
                Action::Send { dest, payload } => {
                    let to = match dest {
                        Dest::Broadcast => Ipv4Addr::BROADCAST,
                        Dest::Unicast(s) => s,
                    };
                    if let Err(e) = sock.send_to(&payload, SocketAddr::from((to, dhcp::SERVER_PORT))).await {
                        let why = format!("DHCP request on {} cannot be sent: {e}", link.name);
                        if said.allow(Instant::now(), &why) {
                            warn!("no network yet: {why}; still trying");
                        }
                    }
                }
                Action::Apply(lease) => {
                    match apply(h, link, &lease, RouteProtocol::Dhcp, &cfg.resolv_conf).await {
                        Ok(()) => {
                            info!(
                                iface = %link.name,
                                addr = %lease.addr,
                                prefix = lease.prefix,
                                router = ?lease.router,
                                server = %lease.server,
                                lease_s = lease.lease.as_secs(),
                                "DHCP lease configured"
                            );
                            let _ = events.send(NetEvent::Up { iface: link.name.clone(), addr: lease.addr });
                        }
                        Err(e) => {
                            warn!(error = %super::chain(&e), "DHCP lease not configured; retried at renewal")
                        }
                    }
                }
                Action::Drop(lease) => {
                    warn!(iface = %link.name, addr = %lease.addr, "DHCP lease lost; address removed");
                    if let Err(e) = remove(h, link, lease.addr).await {
                        warn!(error = %super::chain(&e), "address not removed");
                    }
                    let _ = events.send(NetEvent::Down { iface: link.name.clone(), addr: lease.addr });
                }
            }
        }
        if let Phase::Discovering { discovers } = client.phase()
            && discovers >= 2
        {
            let why = format!("no DHCP server answers on {} ({discovers} requests sent)", link.name);
            if said.allow(Instant::now(), &why) {
                warn!("no network yet: {why}; still asking");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};
    use std::sync::mpsc::{Receiver, channel};

    use super::*;

    /// Network namespaces made for one test, removed (with the processes
    /// started in them) when it ends.
    struct Namespaces {
        names: Vec<String>,
        children: Vec<Child>,
    }

    impl Namespaces {
        fn new(tag: &str, count: usize) -> Self {
            let names: Vec<String> =
                (0..count).map(|i| format!("nodeos-init-{tag}-{}-{i}", std::process::id())).collect();
            for n in &names {
                ip(&["netns", "add", n]);
            }
            Namespaces { names, children: Vec::new() }
        }
    }

    impl Drop for Namespaces {
        fn drop(&mut self) {
            for c in &mut self.children {
                let _ = c.kill();
                let _ = c.wait();
            }
            for n in &self.names {
                let _ = Command::new("ip").args(["netns", "del", n]).status();
            }
        }
    }

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("ip runs");
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Root, `ip` and busybox: what these tests need.
    fn can_run() -> bool {
        let have =
            |cmd: &str, arg: &str| Command::new(cmd).arg(arg).output().is_ok_and(|o| o.status.success());
        if !nix::unistd::geteuid().is_root() || !have("ip", "-V") || !have("busybox", "true") {
            nodeos_types::testing::skip(
                "init DHCP in a namespace",
                "needs root, ip and busybox (network namespaces, udhcpd)",
            );
            return false;
        }
        true
    }

    /// Runs the network thread inside namespace `ns` (threads inherit the
    /// namespace of the thread that starts them). The thread is left running:
    /// it ends with the test process.
    fn start_in(ns: &str, cfg: NetConfig) -> Receiver<NetEvent> {
        let (tx, rx) = channel();
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("netns file");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            spawn(cfg, tx).expect("net thread");
        })
        .join()
        .expect("starter");
        rx
    }

    #[test]
    fn dhcp_from_busybox_udhcpd_in_a_namespace() {
        if !can_run() {
            return;
        }
        let mut ns = Namespaces::new("dhcp", 2);
        let (srv, cli) = (ns.names[0].clone(), ns.names[1].clone());
        ip(&["-n", &cli, "link", "add", "eth0", "type", "veth", "peer", "name", "srv0", "netns", &srv]);
        ip(&["-n", &srv, "addr", "add", "10.99.7.1/24", "dev", "srv0"]);
        ip(&["-n", &srv, "link", "set", "srv0", "up"]);
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("udhcpd.conf");
        std::fs::write(
            &conf,
            format!(
                "start 10.99.7.100\nend 10.99.7.150\ninterface srv0\nlease_file {}\npidfile {}\n\
                 option subnet 255.255.255.0\noption router 10.99.7.1\noption dns 10.99.7.53\nmin_lease 10\noption lease 20\n",
                dir.path().join("leases").display(),
                dir.path().join("pid").display()
            ),
        )
        .expect("conf");
        std::fs::write(dir.path().join("leases"), b"").expect("leases");
        let server = Command::new("ip")
            .args(["netns", "exec", &srv, "busybox", "udhcpd", "-f"])
            .arg(&conf)
            .spawn()
            .expect("udhcpd");
        ns.children.push(server);
        let resolv = dir.path().join("etc/resolv.conf");
        let events = start_in(
            &cli,
            NetConfig {
                ip: IpConfig::Dhcp,
                iface: None,
                dns: Vec::new(),
                hostname: "nodeos-test".into(),
                resolv_conf: resolv.clone(),
            },
        );
        let ev = events.recv_timeout(Duration::from_secs(60)).expect("an address within a minute");
        let NetEvent::Up { iface, addr } = ev else { panic!("not up: {ev:?}") };
        assert_eq!(iface, "eth0");
        let octets = addr.octets();
        assert_eq!(octets[..3], [10, 99, 7], "{addr}");
        assert!((100..=150).contains(&octets[3]), "{addr}");
        let addrs = ip(&["-n", &cli, "-4", "addr", "show", "dev", "eth0"]);
        assert!(addrs.contains(&format!("{addr}/24")), "{addrs}");
        let routes = ip(&["-n", &cli, "-4", "route", "show", "default"]);
        assert!(routes.contains("default via 10.99.7.1 dev eth0 proto dhcp"), "{routes}");
        assert_eq!(std::fs::read_to_string(&resolv).expect("resolv.conf"), "nameserver 10.99.7.53\n");
        let lo = ip(&["-n", &cli, "link", "show", "lo"]);
        assert!(lo.contains("UP"), "{lo}");
        // T1 is half the 20 s lease: the renewal is unicast to the server
        // from the bound address, and keeps it.
        let ev = events.recv_timeout(Duration::from_secs(30)).expect("a renewal within 30 s");
        assert_eq!(ev, NetEvent::Up { iface: "eth0".into(), addr });
    }

    #[test]
    fn a_static_address_in_a_namespace() {
        if !can_run() {
            return;
        }
        let ns = Namespaces::new("static", 1);
        let n = ns.names[0].clone();
        ip(&["-n", &n, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
        let dir = tempfile::tempdir().expect("temp dir");
        let resolv = dir.path().join("resolv.conf");
        let events = start_in(
            &n,
            NetConfig {
                ip: IpConfig::Static {
                    addr: Ipv4Addr::new(10, 99, 8, 5),
                    prefix: 24,
                    gateway: Some(Ipv4Addr::new(10, 99, 8, 1)),
                },
                iface: Some("eth0".into()),
                dns: vec![Ipv4Addr::new(10, 99, 8, 53)],
                hostname: "nodeos-test".into(),
                resolv_conf: resolv.clone(),
            },
        );
        let ev = events.recv_timeout(Duration::from_secs(30)).expect("configured");
        assert_eq!(ev, NetEvent::Up { iface: "eth0".into(), addr: Ipv4Addr::new(10, 99, 8, 5) });
        let addrs = ip(&["-n", &n, "-4", "addr", "show", "dev", "eth0"]);
        assert!(addrs.contains("10.99.8.5/24"), "{addrs}");
        let routes = ip(&["-n", &n, "-4", "route", "show", "default"]);
        assert!(routes.contains("default via 10.99.8.1 dev eth0 proto static"), "{routes}");
        assert_eq!(std::fs::read_to_string(&resolv).expect("resolv.conf"), "nameserver 10.99.8.53\n");
    }

    fn link(index: u32, name: &str, carrier: bool) -> Link {
        Link { index, name: name.into(), mac: [2, 0, 0, 0, 0, index as u8], carrier, up: true }
    }

    #[test]
    fn the_first_link_with_carrier_or_the_named_one() {
        let links = vec![link(2, "eth0", false), link(3, "eth1", true), link(4, "eth2", true)];
        assert_eq!(choose(&links, None).map(|l| l.name.as_str()), Some("eth1"));
        assert_eq!(choose(&links, Some("eth2")).map(|l| l.name.as_str()), Some("eth2"));
        assert!(choose(&links, Some("eth0")).is_none());
        assert!(choose(&links, Some("eth9")).is_none());
        assert!(choose(&[], None).is_none());
    }

    #[test]
    fn the_console_says_why() {
        let links = vec![link(2, "eth0", false), link(3, "eth1", false)];
        assert_eq!(
            waiting_reason(&links, None),
            "no ethernet link has carrier: eth0 (no carrier), eth1 (no carrier)"
        );
        assert!(waiting_reason(&[], None).contains("no ethernet link exists"));
        assert_eq!(
            waiting_reason(&links, Some("eth7")),
            "link eth7 (nodeos.iface) does not exist; ethernet links: eth0 (no carrier), eth1 (no carrier)"
        );
        assert!(waiting_reason(&links, Some("eth0")).contains("has no carrier"));
    }
}
