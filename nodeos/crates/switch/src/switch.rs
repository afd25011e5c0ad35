//! The running switch of one node: its ports' descriptors, its VXLAN socket,
//! and the state that decides where each frame goes.
//!
//! Ownership and threads:
//! - [`SwitchHandle`] is the cloneable front. [`SwitchHandle::apply`] takes
//!   the whole wanted configuration (networks and ports, from the pool's
//!   records) and changes what differs; [`SwitchHandle::attach`] hands over a
//!   VM NIC's socket when its worker starts.
//! - One reader task per attached port and one for the VXLAN socket. A
//!   reader takes the state lock for the decision only (sans-IO
//!   [`Network`], [`PortFilter`], DHCP and ARP answers) and sends after
//!   releasing it, with non-blocking writes: a full port or socket drops the
//!   frame and counts it, like a full NIC queue.
//!
//! Pipeline of a frame a port sends (egress), with port security on:
//! source MAC must be the port's → ARP must name the port's addresses, and
//! ARP for the gateway is answered here → DHCP is answered here, DHCP server
//! replies from ports are dropped → IPv4 must come from the port's address
//! → the port's security groups → a ping to the gateway is answered here
//! (the reply passes the port's security groups for ingress, as the reply to
//! the request they just tracked) → forwarding. Frames delivered to a port
//! pass its security groups for ingress first. Without port security the
//! answers are the same and no checks or security groups apply. Tunnel
//! frames with a bad header, an unknown VNI or from a VTEP the network does
//! not list are dropped and counted.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nodeos_types::PortId;
use nodeos_types::net::{Cidr, SecurityRule};
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::acl::{PortFilter, Verdict};
use crate::dhcp::{self, Lease, Outcome};
use crate::frame::{self, Mac};
use crate::network::{Counters, Network, Output};
use crate::packet::{self, IpPacket, L4};
use crate::tap::{self, TapError};
use crate::{arp, icmp, uplink, vxlan};

/// Largest frame a port may hand over (a 9000-byte jumbo plus headers).
const MAX_PORT_FRAME: usize = frame::MAX_FRAME;
/// Socket buffer asked for the VXLAN socket (the kernel caps it at
/// `net.core.rmem_max`/`wmem_max`): the default 208 KiB overflows within a
/// millisecond of a TCP burst from a VM, and every overflow is a lost segment.
const TUNNEL_SOCKET_BUFFER: usize = 8 << 20;
/// How often MAC tables and connection tables are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("cannot start the switch's thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot bind the VXLAN socket to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("port {0} is not on this node's switch")]
    UnknownPort(PortId),
    #[error("port {0} is not a VM port")]
    NotVmPort(PortId),
    #[error("cannot set up the descriptor of port {port}")]
    PortIo {
        port: PortId,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Uplink(#[from] Box<uplink::UplinkError>),
}

/// One network as this node's switch needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub vni: u32,
    pub cidr: Cidr,
    pub gateway: Option<Ipv4Addr>,
    /// Answer ARP for the gateway here (no uplink carries a real router).
    pub answer_gateway: bool,
    pub mtu: u16,
    pub dns: Vec<Ipv4Addr>,
    pub lease_secs: u32,
    /// Other nodes' VTEPs with ports on the network, and VTEPs outside the pool.
    pub vteps: BTreeSet<SocketAddr>,
}

/// What a port's frames come from and go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// A tap the switch creates with this name.
    Tap { ifname: String },
    /// A VM NIC: its socket arrives with [`SwitchHandle::attach`].
    Vm,
    /// A tap the switch creates and enslaves to a host bridge.
    Uplink { ifname: String, bridge: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    pub id: PortId,
    pub vni: u32,
    pub mac: Mac,
    pub ip: Option<Ipv4Addr>,
    pub port_security: bool,
    pub rules: Vec<SecurityRule>,
    pub attachment: Attachment,
    pub hostname: Option<String>,
}

/// The switch configuration a node should have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub networks: Vec<NetworkConfig>,
    pub ports: Vec<PortConfig>,
}

/// Counters of one port, as `nodeos port show` prints them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    pub attached: bool,
    /// Frames received from the port and sent to it, and malformed frames.
    pub rx: u64,
    pub tx: u64,
    pub malformed: u64,
    /// Frames with another source MAC or IP than the port's.
    pub spoofed: u64,
    pub denied_ingress: u64,
    pub denied_egress: u64,
    pub dhcp_answered: u64,
    pub dhcp_dropped: u64,
    pub arp_answered: u64,
    /// Echo replies sent for the gateway address (see `icmp.rs`).
    pub ping_answered: u64,
    /// Frames dropped because the port's queue was full or it was detached.
    pub tx_dropped: u64,
    pub flows: u64,
}

/// Counters of the VXLAN socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelStats {
    pub rx: u64,
    pub tx: u64,
    pub bad_header: u64,
    pub unknown_vni: u64,
    pub unknown_vtep: u64,
    pub send_failed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkStats {
    pub vni: u32,
    pub ports: usize,
    pub macs: usize,
    pub macs_refused: u64,
    pub vteps: Vec<(SocketAddr, Counters)>,
}

type PortFd = Arc<AsyncFd<OwnedFd>>;

struct Port {
    cfg: PortConfig,
    filter: PortFilter,
    io: Option<PortFd>,
    reader: Option<JoinHandle<()>>,
    /// Tells this attachment's reader from a later one's.
    attach_seq: u64,
    stats: PortStats,
}

impl Drop for Port {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

struct Net {
    cfg: NetworkConfig,
    fwd: Network,
    gateway_mac: Mac,
}

#[derive(Default)]
struct State {
    nets: HashMap<u32, Net>,
    ports: HashMap<PortId, Port>,
    tunnel: TunnelStats,
    attach_seq: u64,
}

struct Inner {
    state: Mutex<State>,
    udp: Arc<UdpSocket>,
    local_vtep: SocketAddr,
    /// The switch's own runtime (one thread, "switch"): frame readers run
    /// there, so a flood of tenant traffic cannot starve the node's raft and
    /// API tasks, and those cannot delay frames.
    rt: tokio::runtime::Handle,
}

/// The cloneable front of this node's switch.
#[derive(Clone)]
pub struct SwitchHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SwitchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchHandle").field("vtep", &self.inner.local_vtep).finish()
    }
}

/// A send decided under the lock and done after it.
enum Send {
    Port(PortId, PortFd, Vec<u8>),
    Vtep(SocketAddr, Vec<u8>),
}

/// The MAC the switch answers ARP and DHCP from on network `vni`: locally
/// administered, the same on every node.
pub fn gateway_mac(vni: u32) -> Mac {
    let v = vni.to_be_bytes();
    Mac([0x02, 0x6e, 0x6f, v[1], v[2], v[3]])
}

impl SwitchHandle {
    /// Starts the switch's thread, binds the VXLAN socket and starts the
    /// tunnel reader and the sweeper.
    pub async fn start(vxlan_listen: SocketAddr) -> Result<Self, SwitchError> {
        let rt = switch_runtime()?;
        let bind = |source| SwitchError::Bind { addr: vxlan_listen, source };
        let sock = tunnel_socket(vxlan_listen).map_err(bind)?;
        let udp = {
            // Registered with the switch's runtime, where its reader runs.
            let _in = rt.enter();
            UdpSocket::from_std(sock).map_err(bind)?
        };
        let local_vtep = udp.local_addr().map_err(bind)?;
        let inner =
            Arc::new(Inner { state: Mutex::new(State::default()), udp: Arc::new(udp), local_vtep, rt });
        let h = SwitchHandle { inner };
        h.inner.rt.spawn(tunnel_reader(Arc::downgrade(&h.inner)));
        h.inner.rt.spawn(sweeper(Arc::downgrade(&h.inner)));
        info!(listen = %local_vtep, "switch listening for VXLAN");
        Ok(h)
    }

    /// The address the VXLAN socket is bound to.
    pub fn local_vtep(&self) -> SocketAddr {
        self.inner.local_vtep
    }

    /// Makes the switch hold exactly `want`: networks and ports that are not
    /// in it go away, new ones are made, changed ones are updated in place
    /// (security group changes apply to live connections). Errors for single
    /// ports (a tap that cannot be made) are returned together; the rest of
    /// the configuration is applied regardless.
    pub async fn apply(&self, want: Desired) -> Vec<(PortId, SwitchError)> {
        let mut uplinks = Vec::new();
        let mut failed = self.apply_locked(want, &mut uplinks);
        for (id, ifname, bridge) in uplinks {
            if let Err(e) = uplink::enslave(&ifname, &bridge).await {
                failed.push((id, Box::new(e).into()));
            }
        }
        failed
    }

    fn apply_locked(
        &self,
        want: Desired,
        uplinks: &mut Vec<(PortId, String, String)>,
    ) -> Vec<(PortId, SwitchError)> {
        let now = Instant::now();
        let mut failed = Vec::new();
        let mut st = self.inner.lock();
        let st = &mut *st;
        let want_nets: HashMap<u32, NetworkConfig> = want.networks.into_iter().map(|n| (n.vni, n)).collect();
        st.nets.retain(|vni, _| want_nets.contains_key(vni));
        for (vni, cfg) in want_nets {
            let net = st.nets.entry(vni).or_insert_with(|| {
                info!(vni, "network added to the switch");
                Net { cfg: cfg.clone(), fwd: Network::new(vni), gateway_mac: gateway_mac(vni) }
            });
            net.fwd.set_vteps(&cfg.vteps);
            net.cfg = cfg;
        }
        let want_ports: HashMap<PortId, PortConfig> = want.ports.into_iter().map(|p| (p.id, p)).collect();
        let gone: Vec<PortId> = st.ports.keys().filter(|p| !want_ports.contains_key(p)).copied().collect();
        for id in gone {
            if let Some(p) = st.ports.remove(&id) {
                if let Some(n) = st.nets.get_mut(&p.cfg.vni) {
                    n.fwd.remove_port(id);
                }
                info!(port = %id, "port removed from the switch");
            }
        }
        for (id, cfg) in want_ports {
            if !st.nets.contains_key(&cfg.vni) {
                continue;
            }
            let existing = st.ports.get_mut(&id);
            match existing {
                Some(p) if p.cfg.vni == cfg.vni && p.cfg.attachment == cfg.attachment => {
                    if p.cfg.rules != cfg.rules {
                        p.filter.set_rules(cfg.rules.clone(), now);
                    }
                    p.cfg = cfg;
                }
                _ => {
                    if let Some(old) = st.ports.remove(&id)
                        && let Some(n) = st.nets.get_mut(&old.cfg.vni)
                    {
                        n.fwd.remove_port(id);
                    }
                    let mtu = st.nets.get(&cfg.vni).map(|n| n.cfg.mtu);
                    let io = match open_attachment(&cfg, mtu) {
                        Ok(io) => io,
                        Err(e) => {
                            failed.push((id, e));
                            continue;
                        }
                    };
                    let mut port = Port {
                        filter: PortFilter::new(cfg.rules.clone()),
                        cfg,
                        io: None,
                        reader: None,
                        attach_seq: 0,
                        stats: PortStats::default(),
                    };
                    if let Some(net) = st.nets.get_mut(&port.cfg.vni) {
                        net.fwd.add_port(id);
                    }
                    if let Attachment::Uplink { ifname, bridge } = &port.cfg.attachment {
                        uplinks.push((id, ifname.clone(), bridge.clone()));
                    }
                    if let Some(fd) = io {
                        st.attach_seq += 1;
                        self.start_reader(&mut port, fd, st.attach_seq);
                    }
                    info!(port = %id, vni = port.cfg.vni, mac = %port.cfg.mac, "port added to the switch");
                    st.ports.insert(id, port);
                }
            }
        }
        failed
    }

    /// Hands over VM port `id`'s end of its NIC socket (SOCK_SEQPACKET, one
    /// frame per message). Replaces an earlier attachment.
    /// On error the descriptor comes back, so the caller may retry.
    pub fn attach(&self, id: PortId, fd: OwnedFd) -> Result<(), (SwitchError, OwnedFd)> {
        let mut st = self.inner.lock();
        st.attach_seq += 1;
        let seq = st.attach_seq;
        let Some(port) = st.ports.get_mut(&id) else { return Err((SwitchError::UnknownPort(id), fd)) };
        if port.cfg.attachment != Attachment::Vm {
            return Err((SwitchError::NotVmPort(id), fd));
        }
        if let Err(e) =
            nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
        {
            return Err((SwitchError::PortIo { port: id, source: e.into() }, fd));
        }
        self.start_reader(port, fd, seq);
        info!(port = %id, "VM NIC attached");
        Ok(())
    }

    /// Takes VM port `id`'s socket away (the VM stopped); frames for it are dropped.
    pub fn detach(&self, id: PortId) {
        let mut st = self.inner.lock();
        if let Some(p) = st.ports.get_mut(&id) {
            p.io = None;
            if let Some(r) = p.reader.take() {
                r.abort();
            }
        }
    }

    fn start_reader(&self, port: &mut Port, fd: OwnedFd, seq: u64) {
        let id = port.cfg.id;
        let _in = self.inner.rt.enter();
        // SAFETY: the AsyncFd takes ownership of `fd`, which stays open and
        // unchanged until the AsyncFd (the last Arc of it) drops.
        let fd = match unsafe { AsyncFd::register(fd) } {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                warn!(port = %id, error = %e, "cannot watch the port's descriptor");
                return;
            }
        };
        if let Some(r) = port.reader.take() {
            r.abort();
        }
        port.io = Some(fd.clone());
        port.attach_seq = seq;
        port.reader = Some(self.inner.rt.spawn(port_reader(Arc::downgrade(&self.inner), id, fd, seq)));
    }

    pub fn port_stats(&self, id: PortId) -> Option<PortStats> {
        let st = self.inner.lock();
        let p = st.ports.get(&id)?;
        let mut s = p.stats;
        s.attached = p.io.is_some();
        s.flows = p.filter.flows() as u64;
        if let Some(c) = st.nets.get(&p.cfg.vni).and_then(|n| n.fwd.port_counters(id)) {
            s.rx = c.rx;
            s.tx = c.tx;
            s.malformed += c.dropped;
        }
        Some(s)
    }

    pub fn tunnel_stats(&self) -> TunnelStats {
        self.inner.lock().tunnel
    }

    pub fn network_stats(&self) -> Vec<NetworkStats> {
        let st = self.inner.lock();
        let mut v: Vec<NetworkStats> = st
            .nets
            .values()
            .map(|n| {
                let (macs, macs_refused) = n.fwd.fdb_stats();
                NetworkStats {
                    vni: n.cfg.vni,
                    ports: n.fwd.ports().count(),
                    macs,
                    macs_refused,
                    vteps: n.fwd.vteps().collect(),
                }
            })
            .collect();
        v.sort_by_key(|n| n.vni);
        v
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A frame port `id` sent.
    fn port_frame(&self, id: PortId, f: &[u8]) {
        let now = Instant::now();
        let mut sends = Vec::new();
        {
            let mut st = self.lock();
            let State { nets, ports, .. } = &mut *st;
            let Some(port) = ports.get_mut(&id) else { return };
            let Some(net) = nets.get_mut(&port.cfg.vni) else { return };
            let pkt = packet::parse(f);
            // Answers (DHCP, ARP, ping) are queued even when the frame goes no further.
            if egress_allowed(net, port, f, &pkt, now, &mut sends) {
                for o in net.fwd.from_port(id, f, now) {
                    match o {
                        Output::Port(to) => deliver(ports, to, f, &pkt, now, &mut sends),
                        Output::Vtep(v) => sends.push(Send::Vtep(v, encapsulate(net.cfg.vni, f))),
                    }
                }
            }
        }
        self.send(sends);
    }

    /// A datagram the VXLAN socket received from `src`.
    fn tunnel_datagram(&self, src: SocketAddr, datagram: &[u8]) {
        let now = Instant::now();
        let mut sends = Vec::new();
        {
            let mut st = self.lock();
            let State { nets, ports, tunnel, .. } = &mut *st;
            let (vni, f) = match vxlan::decode(datagram) {
                Ok(d) => d,
                Err(_) => {
                    tunnel.bad_header += 1;
                    return;
                }
            };
            let Some(net) = nets.get_mut(&vni) else {
                tunnel.unknown_vni += 1;
                return;
            };
            let Some(vtep) = net.fwd.vtep_for(src) else {
                tunnel.unknown_vtep += 1;
                return;
            };
            tunnel.rx += 1;
            let pkt = packet::parse(f);
            for o in net.fwd.from_vtep(vtep, f, now) {
                if let Output::Port(to) = o {
                    deliver(ports, to, f, &pkt, now, &mut sends);
                }
            }
        }
        self.send(sends);
    }

    fn send(&self, sends: Vec<Send>) {
        if sends.is_empty() {
            return;
        }
        let mut failed_ports = Vec::new();
        let (mut tx, mut send_failed) = (0, 0);
        for s in sends {
            match s {
                Send::Port(id, fd, f) => {
                    if nix::unistd::write(fd.get_ref(), &f).is_err() {
                        failed_ports.push(id);
                    }
                }
                Send::Vtep(to, d) => match self.udp.try_send_to(&d, to) {
                    Ok(_) => tx += 1,
                    Err(e) => {
                        debug!(vtep = %to, error = %e, "tunnel send failed");
                        send_failed += 1;
                    }
                },
            }
        }
        let mut st = self.lock();
        st.tunnel.tx += tx;
        st.tunnel.send_failed += send_failed;
        for id in failed_ports {
            if let Some(p) = st.ports.get_mut(&id) {
                p.stats.tx_dropped += 1;
            }
        }
    }

    fn port_closed(&self, id: PortId, seq: u64) {
        let mut st = self.lock();
        if let Some(p) = st.ports.get_mut(&id)
            && p.attach_seq == seq
        {
            p.io = None;
            p.reader = None;
            info!(port = %id, "port detached: its descriptor closed");
        }
    }
}

/// Starts the switch's runtime on a thread of its own; the thread lives as
/// long as the process.
fn switch_runtime() -> Result<tokio::runtime::Handle, SwitchError> {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(SwitchError::Thread)?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("switch".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(SwitchError::Thread)?;
    Ok(handle)
}

/// The VXLAN socket: non-blocking, with large buffers.
fn tunnel_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    for (what, r) in [
        ("receive", s.set_recv_buffer_size(TUNNEL_SOCKET_BUFFER)),
        ("send", s.set_send_buffer_size(TUNNEL_SOCKET_BUFFER)),
    ] {
        if let Err(e) = r {
            warn!(error = %e, "cannot enlarge the VXLAN socket's {what} buffer");
        }
    }
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn encapsulate(vni: u32, f: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(vxlan::HEADER_LEN + f.len());
    // VNIs are checked when networks are made: encoding cannot fail here.
    d.extend_from_slice(&vxlan::encode(vni).unwrap_or([0; vxlan::HEADER_LEN]));
    d.extend_from_slice(f);
    d
}

/// Port security, ARP and DHCP answers, security groups and ping answers
/// for a frame `port` sent; `true` when the frame goes on to forwarding.
fn egress_allowed(
    net: &mut Net,
    port: &mut Port,
    f: &[u8],
    pkt: &Result<Option<IpPacket>, packet::PacketError>,
    now: Instant,
    sends: &mut Vec<Send>,
) -> bool {
    let Ok(h) = frame::parse(f) else {
        // Counted as malformed by the network.
        return true;
    };
    let secure = port.cfg.port_security;
    if secure && h.src != port.cfg.mac {
        port.stats.spoofed += 1;
        return false;
    }
    match arp::parse(f) {
        Ok(Some(a)) => {
            let own_ip = port.cfg.ip.is_some_and(|ip| ip == a.sender_ip);
            if secure && (a.sender_mac != port.cfg.mac || !(own_ip || a.sender_ip.is_unspecified())) {
                port.stats.spoofed += 1;
                return false;
            }
            if net.cfg.answer_gateway
                && let Some(gw) = net.cfg.gateway
                && let Some(r) = arp::answer(f, gw, net.gateway_mac)
            {
                port.stats.arp_answered += 1;
                reply(port, [r], sends);
                return false;
            }
            return true;
        }
        Ok(None) => {}
        Err(_) => {
            port.stats.malformed += 1;
            return false;
        }
    }
    // Only frames to the DHCP server port can be DHCP: the lease (which
    // allocates) is made for those alone, not for every frame.
    let to_dhcp_server =
        matches!(pkt, Ok(Some(IpPacket { l4: L4::Udp { dst_port: dhcp::SERVER_PORT, .. }, .. })));
    let outcome = if to_dhcp_server {
        dhcp::handle(f, port.cfg.mac, lease_for(net, port).as_ref())
    } else {
        Outcome::NotDhcp
    };
    match outcome {
        Outcome::NotDhcp => {}
        Outcome::Answered(frames) => {
            port.stats.dhcp_answered += frames.len() as u64;
            reply(port, frames, sends);
            return false;
        }
        Outcome::Dropped(e) => {
            debug!(port = %port.cfg.id, error = %e, "DHCP message dropped");
            port.stats.dhcp_dropped += 1;
            return false;
        }
    }
    if secure && !ip_allowed(port, f, pkt, now) {
        return false;
    }
    !answer_ping(net, port, f, pkt, now, sends)
}

/// Port security and security groups for a frame a port with port security
/// sent that is not ARP or DHCP for the switch.
fn ip_allowed(
    port: &mut Port,
    f: &[u8],
    pkt: &Result<Option<IpPacket>, packet::PacketError>,
    now: Instant,
) -> bool {
    if dhcp::is_server_message(f) {
        port.stats.spoofed += 1;
        return false;
    }
    match pkt {
        Ok(None) => true,
        Err(_) => {
            port.stats.malformed += 1;
            false
        }
        Ok(Some(p)) => {
            if let IpAddr::V4(src) = p.src
                && port.cfg.ip != Some(src)
            {
                port.stats.spoofed += 1;
                return false;
            }
            match port.filter.egress_frame(f, p, now) {
                Verdict::Allow => true,
                Verdict::Deny => {
                    port.stats.denied_egress += 1;
                    false
                }
            }
        }
    }
}

/// Answers an echo request from `port` to the gateway address the switch
/// owns on `net`; `true` when it was one, and the frame goes no further.
fn answer_ping(
    net: &Net,
    port: &mut Port,
    f: &[u8],
    pkt: &Result<Option<IpPacket>, packet::PacketError>,
    now: Instant,
    sends: &mut Vec<Send>,
) -> bool {
    let gw = match net.cfg.gateway {
        Some(gw) if net.cfg.answer_gateway => gw,
        _ => return false,
    };
    // Most frames are not pings to the gateway: the parsed packet tells
    // before `icmp::answer` checks the frame in full.
    let Ok(Some(IpPacket { dst: IpAddr::V4(dst), l4: L4::Icmp { ty: icmp::TYPE_ECHO_REQUEST, .. }, .. })) =
        pkt
    else {
        return false;
    };
    if *dst != gw {
        return false;
    }
    let Some(r) = icmp::answer(f, gw, net.gateway_mac, net.cfg.mtu) else { return false };
    if port.cfg.port_security {
        let admitted = match packet::parse(&r) {
            Ok(Some(p)) => port.filter.ingress_frame(&r, &p, now) == Verdict::Allow,
            _ => false,
        };
        if !admitted {
            port.stats.denied_ingress += 1;
            return true;
        }
    }
    port.stats.ping_answered += 1;
    reply(port, [r], sends);
    true
}

/// Queues the switch's answers to a frame `port` sent back to it; they are
/// lost if the port is detached.
fn reply(port: &Port, frames: impl IntoIterator<Item = Vec<u8>>, sends: &mut Vec<Send>) {
    if let Some(fd) = &port.io {
        for r in frames {
            sends.push(Send::Port(port.cfg.id, fd.clone(), r));
        }
    }
}

fn lease_for(net: &Net, port: &Port) -> Option<Lease> {
    let ip = port.cfg.ip?;
    let netmask = net.cfg.cidr.netmask_v4()?;
    let server_ip =
        net.cfg.gateway.or_else(|| net.cfg.cidr.hosts_v4().map(|h| Ipv4Addr::from(*h.start())))?;
    Some(Lease {
        ip,
        netmask,
        router: net.cfg.gateway,
        dns: net.cfg.dns.clone(),
        mtu: net.cfg.mtu,
        lease_secs: net.cfg.lease_secs,
        server_ip,
        server_mac: net.gateway_mac,
        hostname: port.cfg.hostname.clone(),
    })
}

/// Queues `f` for local port `to` if its security groups admit it.
fn deliver(
    ports: &mut HashMap<PortId, Port>,
    to: PortId,
    f: &[u8],
    pkt: &Result<Option<IpPacket>, packet::PacketError>,
    now: Instant,
    sends: &mut Vec<Send>,
) {
    let Some(p) = ports.get_mut(&to) else { return };
    if p.cfg.port_security {
        let allowed = match pkt {
            Ok(Some(ip)) => p.filter.ingress_frame(f, ip, now) == Verdict::Allow,
            Ok(None) => true,
            Err(_) => false,
        };
        if !allowed {
            p.stats.denied_ingress += 1;
            return;
        }
    }
    match &p.io {
        Some(fd) => sends.push(Send::Port(to, fd.clone(), f.to_vec())),
        None => p.stats.tx_dropped += 1,
    }
}

fn open_attachment(cfg: &PortConfig, mtu: Option<u16>) -> Result<Option<OwnedFd>, SwitchError> {
    match &cfg.attachment {
        Attachment::Vm => Ok(None),
        Attachment::Tap { ifname } => Ok(Some(tap::open_with(ifname, Some(cfg.mac), mtu)?.into())),
        Attachment::Uplink { ifname, .. } => Ok(Some(tap::open_with(ifname, None, mtu)?.into())),
    }
}

async fn port_reader(inner: std::sync::Weak<Inner>, id: PortId, fd: PortFd, seq: u64) {
    let mut buf = vec![0u8; MAX_PORT_FRAME + 1];
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                warn!(port = %id, error = %e, "port descriptor failed");
                break;
            }
        };
        let Some(inner) = inner.upgrade() else { return };
        // Drain what is queued, then wait again.
        loop {
            match nix::unistd::read(guard.get_inner().as_fd(), &mut buf) {
                Ok(0) => {
                    inner.port_closed(id, seq);
                    return;
                }
                Ok(n) if n > MAX_PORT_FRAME => {
                    let mut st = inner.lock();
                    if let Some(p) = st.ports.get_mut(&id) {
                        p.stats.malformed += 1;
                    }
                }
                Ok(n) => inner.port_frame(id, &buf[..n]),
                Err(nix::errno::Errno::EAGAIN) => {
                    guard.clear_ready();
                    break;
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    debug!(port = %id, error = %e, "port closed");
                    inner.port_closed(id, seq);
                    return;
                }
            }
        }
    }
    if let Some(inner) = inner.upgrade() {
        inner.port_closed(id, seq);
    }
}

async fn tunnel_reader(inner: std::sync::Weak<Inner>) {
    let Some(udp) = inner.upgrade().map(|i| i.udp.clone()) else { return };
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, src) = match udp.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors surface here on Linux; the socket stays usable.
                debug!(error = %e, "VXLAN receive failed");
                continue;
            }
        };
        let Some(inner) = inner.upgrade() else { return };
        inner.tunnel_datagram(src, &buf[..n]);
    }
}

async fn sweeper(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let mut st = inner.lock();
        for n in st.nets.values_mut() {
            n.fwd.expire(now);
        }
        for p in st.ports.values_mut() {
            p.filter.sweep(now);
        }
    }
}
