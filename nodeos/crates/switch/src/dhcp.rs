//! A DHCPv4 server (RFC 2131, options from RFC 2132) that answers for one
//! port at a time.
//!
//! Every port has at most one address, assigned by the pool's IPAM, so the
//! server keeps no state: it offers and acknowledges exactly the port's
//! [`Lease`], refuses any other address with a NAK, and stays silent for a
//! port without an address. The switch hands [`handle`] every frame a port
//! sends before forwarding it, and drops what [`is_server_message`] flags (a
//! DHCP server running in a VM). The message format (header, options,
//! building) is `nodeos_dhcp`'s; this module decides what to answer.
//!
//! Client messages are untrusted: every field is bounds-checked, and a
//! message that is not acceptable becomes a [`DhcpError`] naming what was
//! wrong. Incoming checksums are not verified, because guests using checksum
//! offload hand over frames whose UDP checksum is not filled in yet.
//!
//! Replies are addressed as RFC 2131 section 4.1 says, never exceed 576 bytes
//! of IP (what every client must accept), are padded to the 300-byte BOOTP
//! minimum that old clients expect (RFC 1542), echo the client identifier
//! (RFC 6842), and carry the request's 802.1Q tag if it had one.

use std::net::Ipv4Addr;

// `switch.rs` tells DHCP client messages by this port.
pub(crate) use nodeos_dhcp::SERVER_PORT;
use nodeos_dhcp::{
    ACK, BOOTREQUEST, BROADCAST_FLAG, CLIENT_PORT, DECLINE, DISCOVER, HLEN_ETHERNET, HTYPE_ETHERNET, Header,
    HeaderError, INFORM, MessageBuilder, NAK, OFFER, OPT_CLIENT_ID, OPT_DNS, OPT_HOSTNAME, OPT_LEASE_TIME,
    OPT_MESSAGE_TYPE, OPT_MTU, OPT_REBINDING_TIME, OPT_RENEWAL_TIME, OPT_REQUESTED_IP, OPT_ROUTER,
    OPT_SERVER_ID, OPT_SUBNET_MASK, OptionError, Options, RELEASE, REQUEST,
};

use crate::frame::{self, Mac};
use crate::packet::{self, L4};

/// Smallest MTU option 26 may carry (RFC 2132 section 5.1).
const MIN_MTU: u16 = 68;

/// Why a DHCP client message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DhcpError {
    #[error("DHCP message in an IPv4 fragment")]
    Fragment,
    #[error("UDP length {claimed} does not fit the {available} bytes the IPv4 packet carries")]
    UdpLength { claimed: u16, available: usize },
    #[error("Ethernet source {0} is not the port's MAC")]
    ForeignSource(Mac),
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("BOOTP op {0} is not a request (1)")]
    Op(u8),
    #[error("hardware type {0} is not Ethernet (1)")]
    HardwareType(u8),
    #[error("hardware address length {0} is not 6")]
    HardwareLength(u8),
    #[error("magic cookie {0:#010x} is not 0x63825363")]
    MagicCookie(u32),
    #[error(transparent)]
    Options(#[from] OptionError),
    #[error("no message type (option 53): a BOOTP request, not DHCP")]
    NoMessageType,
    #[error("message type {0} is not one a client sends (1, 3, 4, 7 or 8)")]
    MessageType(u8),
    #[error("client hardware address {0} is not the port's MAC")]
    ForeignClient(Mac),
}

/// The one address a port may hold, and what its DHCP replies tell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// Option 26; left out below 68, the least RFC 2132 allows.
    pub mtu: u16,
    /// Option 51; renewal (T1, option 58) is at 50% of it, rebinding (T2,
    /// option 59) at 87.5%.
    pub lease_secs: u32,
    /// Option 54 and the replies' IP source: an address of the network,
    /// usually its gateway.
    pub server_ip: Ipv4Addr,
    /// The replies' Ethernet source.
    pub server_mac: Mac,
    /// Option 12, when set.
    pub hostname: Option<String>,
}

/// What the switch does with a frame a port sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not a DHCP client message (not IPv4/UDP to port 67 from port 68):
    /// forward it normally.
    NotDhcp,
    /// A DHCP client message: send these frames (possibly none) to the port
    /// and do not forward the original.
    Answered(Vec<Vec<u8>>),
    /// A DHCP client message that is malformed or not acceptable: drop it
    /// (do not forward) and count it.
    Dropped(DhcpError),
}

/// Answers the DHCP client message in `frame`, sent by the port with MAC
/// `port_mac` that holds `lease` (`None`: the port has no address, and gets
/// no answers).
pub fn handle(frame: &[u8], port_mac: Mac, lease: Option<&Lease>) -> Outcome {
    let Some(datagram) = client_datagram(frame) else {
        return Outcome::NotDhcp;
    };
    match datagram.and_then(|d| respond(&d, port_mac, lease)) {
        Ok(frames) => Outcome::Answered(frames),
        Err(e) => Outcome::Dropped(e),
    }
}

/// True for frames that look like DHCP server traffic (IPv4 UDP from port 67
/// to port 68): the switch drops these when a port sends them (a rogue DHCP
/// server in a VM).
pub fn is_server_message(frame: &[u8]) -> bool {
    matches!(
        packet::parse(frame),
        Ok(Some(p)) if p.src.is_ipv4() && p.l4 == L4::Udp { src_port: SERVER_PORT, dst_port: CLIENT_PORT }
    )
}

/// A UDP datagram to the server port, as the port sent it.
struct Datagram<'a> {
    src: Mac,
    /// The 802.1Q tag (0x8100 and the TCI) the frame carried.
    tag: Option<[u8; 4]>,
    payload: &'a [u8],
}

/// The datagram in `f` if it is IPv4 UDP from the client port to the server
/// port; `None` for every other frame, including malformed IP, which the
/// switch's own checks count.
fn client_datagram(f: &[u8]) -> Option<Result<Datagram<'_>, DhcpError>> {
    let h = frame::parse(f).ok()?;
    let p = packet::parse(f).ok()??;
    if !p.src.is_ipv4() || p.l4 != (L4::Udp { src_port: CLIENT_PORT, dst_port: SERVER_PORT }) {
        return None;
    }
    let tag = match (f.get(12..14), f.get(12..16)) {
        (Some([0x81, 0x00]), Some(&[a, b, c, d])) => Some([a, b, c, d]),
        _ => None,
    };
    Some(udp_payload(f.get(p.ip_offset..).unwrap_or_default()).map(|payload| Datagram {
        src: h.src,
        tag,
        payload,
    }))
}

/// The UDP payload of the IPv4 packet `ip`, which `packet::parse` found
/// consistent (header length and total length within the frame).
fn udp_payload(ip: &[u8]) -> Result<&[u8], DhcpError> {
    let be16 = |b: &[u8], at: usize| match b.get(at..at + 2) {
        Some(&[hi, lo]) => u16::from_be_bytes([hi, lo]),
        _ => 0,
    };
    // More fragments follow: a DHCP message is never that large.
    if ip.get(6).is_some_and(|flags| flags & 0x20 != 0) {
        return Err(DhcpError::Fragment);
    }
    let ihl = ip.first().map_or(0, |b| usize::from(b & 0x0f) * 4);
    let total = usize::from(be16(ip, 2));
    let udp = ip.get(ihl..total).unwrap_or_default();
    let claimed = be16(udp, 4);
    match udp.get(8..usize::from(claimed)) {
        Some(payload) => Ok(payload),
        None => Err(DhcpError::UdpLength { claimed, available: udp.len() }),
    }
}

/// A client message: its BOOTP header and DHCP options.
#[derive(Debug)]
struct Request<'a> {
    header: Header,
    options: Options<'a>,
}

impl<'a> Request<'a> {
    /// Reads an Ethernet DHCP message; which op it carries is the caller's
    /// check, so that the tests read replies with it too.
    fn parse(b: &'a [u8]) -> Result<Self, DhcpError> {
        let header = Header::parse(b)?;
        if header.htype != HTYPE_ETHERNET {
            return Err(DhcpError::HardwareType(header.htype));
        }
        if header.hlen != HLEN_ETHERNET {
            return Err(DhcpError::HardwareLength(header.hlen));
        }
        if !header.is_dhcp() {
            return Err(DhcpError::MagicCookie(u32::from_be_bytes(header.cookie)));
        }
        Ok(Request { header, options: Options::parse(b)? })
    }

    fn client_mac(&self) -> Mac {
        Mac(self.header.mac())
    }

    fn message_type(&self) -> Result<u8, DhcpError> {
        self.options.message_type()?.ok_or(DhcpError::NoMessageType)
    }
}

/// The kinds of reply the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Offer,
    /// An ACK handing out the lease.
    Ack,
    /// An ACK to an INFORM: configuration only, no address or lease times.
    InformAck,
    Nak,
}

fn respond(d: &Datagram<'_>, port_mac: Mac, lease: Option<&Lease>) -> Result<Vec<Vec<u8>>, DhcpError> {
    if d.src != port_mac {
        return Err(DhcpError::ForeignSource(d.src));
    }
    let req = Request::parse(d.payload)?;
    if req.header.op != BOOTREQUEST {
        return Err(DhcpError::Op(req.header.op));
    }
    if req.client_mac() != port_mac {
        return Err(DhcpError::ForeignClient(req.client_mac()));
    }
    let ty = req.message_type()?;
    if !matches!(ty, DISCOVER | REQUEST | DECLINE | RELEASE | INFORM) {
        return Err(DhcpError::MessageType(ty));
    }
    let Some(lease) = lease else {
        return Ok(Vec::new());
    };
    let reply = match ty {
        DISCOVER => Some(Reply::Offer),
        REQUEST => {
            let requested = req.options.address(OPT_REQUESTED_IP)?;
            let server = req.options.address(OPT_SERVER_ID)?;
            // RENEWING and REBINDING clients name their address in ciaddr;
            // SELECTING and INIT-REBOOT ones in option 50.
            let wanted = requested.or(Some(req.header.ciaddr).filter(|a| !a.is_unspecified()));
            if server.is_some_and(|s| s != lease.server_ip) {
                // The client chose another server's offer.
                None
            } else if wanted == Some(lease.ip) {
                Some(Reply::Ack)
            } else {
                Some(Reply::Nak)
            }
        }
        INFORM => Some(Reply::InformAck),
        // RELEASE and DECLINE: the lease belongs to the port whatever the
        // client says, so there is nothing to record.
        _ => None,
    };
    Ok(reply.map(|r| reply_frame(&req, r, lease, port_mac, d.tag)).into_iter().collect())
}

/// Builds the frame carrying reply `kind` to `req`, addressed as RFC 2131
/// section 4.1 says.
fn reply_frame(
    req: &Request<'_>,
    kind: Reply,
    lease: &Lease,
    port_mac: Mac,
    tag: Option<[u8; 4]>,
) -> Vec<u8> {
    let m = reply_message(req, kind, lease);
    let relayed = !req.header.giaddr.is_unspecified();
    let yiaddr = match kind {
        Reply::Offer | Reply::Ack => lease.ip,
        Reply::InformAck | Reply::Nak => Ipv4Addr::UNSPECIFIED,
    };
    let broadcast = (Mac::BROADCAST, Ipv4Addr::BROADCAST, CLIENT_PORT);
    let (eth_dst, ip_dst, udp_dst) = if relayed {
        (port_mac, req.header.giaddr, SERVER_PORT)
    } else if kind == Reply::Nak {
        broadcast
    } else if !req.header.ciaddr.is_unspecified() {
        (port_mac, req.header.ciaddr, CLIENT_PORT)
    } else if req.header.wants_broadcast() || yiaddr.is_unspecified() {
        broadcast
    } else {
        (port_mac, yiaddr, CLIENT_PORT)
    };
    let mut f = packet::udp_v4_frame(
        lease.server_mac.0,
        eth_dst.0,
        lease.server_ip,
        ip_dst,
        SERVER_PORT,
        udp_dst,
        &m,
    );
    if let Some(tag) = tag {
        let rest = f.split_off(12);
        f.extend_from_slice(&tag);
        f.extend_from_slice(&rest);
    }
    f
}

/// The DHCP message of reply `kind` to `req`. Configuration options that do
/// not fit the message are left out; the ones a client cannot do without
/// come first.
fn reply_message(req: &Request<'_>, kind: Reply, lease: &Lease) -> Vec<u8> {
    let mut header = Header::reply_to(&req.header);
    if kind == Reply::Nak && !req.header.giaddr.is_unspecified() {
        // The relay broadcasts a NAK, since the client may hold no address.
        header.flags |= BROADCAST_FLAG;
    }
    if matches!(kind, Reply::Ack | Reply::InformAck) {
        header.ciaddr = req.header.ciaddr;
    }
    if matches!(kind, Reply::Offer | Reply::Ack) {
        header.yiaddr = lease.ip;
    }
    let mut m = MessageBuilder::new(&header);
    let ty = match kind {
        Reply::Offer => OFFER,
        Reply::Ack | Reply::InformAck => ACK,
        Reply::Nak => NAK,
    };
    m.push(OPT_MESSAGE_TYPE, &[ty]);
    m.push(OPT_SERVER_ID, &lease.server_ip.octets());
    if let Some(id) = req.options.get(OPT_CLIENT_ID) {
        m.push(OPT_CLIENT_ID, id);
    }
    if kind == Reply::Nak {
        return m.finish();
    }
    if kind != Reply::InformAck {
        let secs = u64::from(lease.lease_secs);
        let fraction = |num: u64, den: u64| u32::try_from(secs * num / den).unwrap_or(u32::MAX);
        m.push(OPT_LEASE_TIME, &lease.lease_secs.to_be_bytes());
        m.push(OPT_RENEWAL_TIME, &fraction(1, 2).to_be_bytes());
        m.push(OPT_REBINDING_TIME, &fraction(7, 8).to_be_bytes());
    }
    m.push(OPT_SUBNET_MASK, &lease.netmask.octets());
    if let Some(router) = lease.router {
        m.push(OPT_ROUTER, &router.octets());
    }
    if lease.mtu >= MIN_MTU {
        m.push(OPT_MTU, &lease.mtu.to_be_bytes());
    }
    // As many name servers as fit, in order of preference.
    let dns: Vec<u8> = lease.dns.iter().take(m.room() / 4).flat_map(|a| a.octets()).collect();
    if !dns.is_empty() {
        m.push(OPT_DNS, &dns);
    }
    if let Some(name) = lease.hostname.as_deref().filter(|n| !n.is_empty()) {
        m.push(OPT_HOSTNAME, name.as_bytes());
    }
    m.finish()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use proptest::prelude::*;

    use nodeos_dhcp::{BOOTREPLY, MAGIC, MAGIC_AT, MIN_MESSAGE, OPT_END, OPT_PAD, OPTIONS_AT};

    use super::*;
    use crate::packet::IpPacket;

    const VM_MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    const GW_MAC: Mac = Mac([0x02, 0x00, 0x00, 0x00, 0x00, 0x01]);
    const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
    const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const XID: u32 = 0x3903_f326;

    fn lease() -> Lease {
        Lease {
            ip: VM_IP,
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: Some(GW_IP),
            dns: vec![Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(9, 9, 9, 9)],
            mtu: 1450,
            lease_secs: 86_400,
            server_ip: GW_IP,
            server_mac: GW_MAC,
            hostname: Some("web-1".into()),
        }
    }

    /// A client message as busybox udhcpc builds it.
    struct Client {
        ty: u8,
        flags: u16,
        ciaddr: Ipv4Addr,
        giaddr: Ipv4Addr,
        chaddr: Mac,
        requested: Option<Ipv4Addr>,
        server: Option<Ipv4Addr>,
    }

    impl Client {
        fn new(ty: u8) -> Self {
            Client {
                ty,
                flags: 0,
                ciaddr: Ipv4Addr::UNSPECIFIED,
                giaddr: Ipv4Addr::UNSPECIFIED,
                chaddr: VM_MAC,
                requested: None,
                server: None,
            }
        }

        fn bootp(&self) -> Vec<u8> {
            let mut m = vec![BOOTREQUEST, 1, 6, 0];
            m.extend_from_slice(&XID.to_be_bytes());
            m.extend_from_slice(&[0, 3]); // secs
            m.extend_from_slice(&self.flags.to_be_bytes());
            for a in [self.ciaddr, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, self.giaddr] {
                m.extend_from_slice(&a.octets());
            }
            m.extend_from_slice(&self.chaddr.0);
            m.resize(MAGIC_AT, 0);
            m.extend_from_slice(&MAGIC);
            m.extend_from_slice(&[OPT_MESSAGE_TYPE, 1, self.ty]);
            m.extend_from_slice(&[OPT_CLIENT_ID, 7, 1]);
            m.extend_from_slice(&self.chaddr.0);
            if let Some(r) = self.requested {
                m.extend_from_slice(&[OPT_REQUESTED_IP, 4]);
                m.extend_from_slice(&r.octets());
            }
            if let Some(s) = self.server {
                m.extend_from_slice(&[OPT_SERVER_ID, 4]);
                m.extend_from_slice(&s.octets());
            }
            m.extend_from_slice(&[57, 2, 0x02, 0x40]); // max message size 576
            m.extend_from_slice(&[60, 12]);
            m.extend_from_slice(b"udhcp 1.36.1");
            m.extend_from_slice(&[OPT_HOSTNAME, 5]);
            m.extend_from_slice(b"web-1");
            m.extend_from_slice(&[55, 7, 1, 3, 6, 12, 15, 28, 42]);
            m.push(OPT_END);
            m.resize(MIN_MESSAGE, 0);
            m
        }

        fn frame(&self) -> Vec<u8> {
            let (eth_dst, src, dst) = if self.ciaddr.is_unspecified() {
                (Mac::BROADCAST, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST)
            } else {
                (GW_MAC, self.ciaddr, GW_IP)
            };
            udp(eth_dst, src, dst, &self.bootp())
        }
    }

    fn udp(eth_dst: Mac, src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        packet::udp_v4_frame(VM_MAC.0, eth_dst.0, src, dst, CLIENT_PORT, SERVER_PORT, payload)
    }

    fn answers(f: &[u8], lease: Option<&Lease>) -> Vec<Vec<u8>> {
        match handle(f, VM_MAC, lease) {
            Outcome::Answered(frames) => frames,
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    fn one_answer(f: &[u8]) -> Vec<u8> {
        let mut frames = answers(f, Some(&lease()));
        assert_eq!(frames.len(), 1, "exactly one reply");
        frames.remove(0)
    }

    fn dropped(f: &[u8]) -> DhcpError {
        match handle(f, VM_MAC, Some(&lease())) {
            Outcome::Dropped(e) => e,
            other => panic!("expected a drop, got {other:?}"),
        }
    }

    /// Checks a reply's framing and checksums, and parses its message.
    fn reply(f: &[u8]) -> (frame::Header, IpPacket, Request<'_>) {
        let h = frame::parse(f).unwrap();
        let p = packet::parse(f).unwrap().unwrap();
        assert_eq!(h.src, GW_MAC);
        assert_eq!(p.src, IpAddr::V4(GW_IP));
        let ip = &f[p.ip_offset..];
        assert_eq!(packet::checksum(&ip[..20], 0), 0, "IP header checksum");
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert!(total <= 576, "{total} bytes of IP");
        assert_eq!(total, ip.len());
        let udp = &ip[20..total];
        let mut pseudo = u32::from(packet::PROTO_UDP) + udp.len() as u32;
        for w in ip[12..20].chunks(2) {
            pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        assert_eq!(packet::checksum(udp, pseudo), 0, "UDP checksum");
        let m = Request::parse(&udp[8..]).unwrap();
        assert_eq!(m.header.op, BOOTREPLY);
        assert!(udp.len() - 8 >= MIN_MESSAGE);
        assert_eq!((m.header.xid, m.client_mac(), m.header.siaddr), (XID, VM_MAC, Ipv4Addr::UNSPECIFIED));
        assert_eq!(m.header.chaddr[6..], [0; 10]);
        assert_eq!(m.options.address(OPT_SERVER_ID).unwrap(), Some(GW_IP));
        let mut client_id = vec![1];
        client_id.extend_from_slice(&VM_MAC.0);
        assert_eq!(m.options.get(OPT_CLIENT_ID), Some(&client_id[..]), "client id echoed");
        // The options field ends with the end option, then only padding.
        let opts = &udp[8 + OPTIONS_AT..];
        let end = opts.len() - opts.iter().rev().position(|&b| b != 0).unwrap() - 1;
        assert_eq!(opts[end], OPT_END);
        (h, p, m)
    }

    fn u32_option(m: &Request<'_>, code: u8) -> Option<u32> {
        m.options.get(code).map(|v| u32::from_be_bytes(v.try_into().unwrap()))
    }

    /// Every option a lease reply must carry, with the lease's values.
    fn assert_lease_options(m: &Request<'_>, times: bool) {
        let l = lease();
        let times_sent = [OPT_LEASE_TIME, OPT_RENEWAL_TIME, OPT_REBINDING_TIME].map(|c| u32_option(m, c));
        if times {
            assert_eq!(times_sent, [Some(86_400), Some(43_200), Some(75_600)]);
        } else {
            assert_eq!(times_sent, [None; 3]);
        }
        assert_eq!(m.options.address(OPT_SUBNET_MASK).unwrap(), Some(l.netmask));
        assert_eq!(m.options.address(OPT_ROUTER).unwrap(), l.router);
        assert_eq!(m.options.get(OPT_DNS), Some(&[10, 0, 0, 2, 9, 9, 9, 9][..]));
        assert_eq!(m.options.get(OPT_MTU), Some(&1450u16.to_be_bytes()[..]));
        assert_eq!(m.options.get(OPT_HOSTNAME), Some(&b"web-1"[..]));
    }

    #[test]
    fn udhcpc_discover_and_request_get_offer_and_ack() {
        let offer = one_answer(&Client::new(DISCOVER).frame());
        let (h, p, m) = reply(&offer);
        assert_eq!(m.message_type(), Ok(OFFER));
        assert_eq!((m.header.yiaddr, m.header.ciaddr, m.header.flags), (VM_IP, Ipv4Addr::UNSPECIFIED, 0));
        // No broadcast flag, no ciaddr: unicast to the offered address.
        assert_eq!((h.dst, p.dst), (VM_MAC, IpAddr::V4(VM_IP)));
        assert_eq!(p.l4, L4::Udp { src_port: SERVER_PORT, dst_port: CLIENT_PORT });
        assert_lease_options(&m, true);
        assert!(is_server_message(&offer));

        let request =
            Client { requested: Some(m.header.yiaddr), server: Some(GW_IP), ..Client::new(REQUEST) };
        let ack = one_answer(&request.frame());
        let (h, p, m) = reply(&ack);
        assert_eq!(m.message_type(), Ok(ACK));
        assert_eq!(m.header.yiaddr, VM_IP);
        assert_eq!((h.dst, p.dst), (VM_MAC, IpAddr::V4(VM_IP)));
        assert_lease_options(&m, true);
    }

    #[test]
    fn broadcast_flag_gets_broadcast_replies() {
        let c = Client { flags: BROADCAST_FLAG, ..Client::new(DISCOVER) };
        let offer = one_answer(&c.frame());
        let (h, p, m) = reply(&offer);
        assert_eq!((h.dst, p.dst), (Mac::BROADCAST, IpAddr::V4(Ipv4Addr::BROADCAST)));
        assert_eq!((m.header.flags, m.header.yiaddr), (BROADCAST_FLAG, VM_IP));
    }

    #[test]
    fn init_reboot_request_without_server_id_is_acked() {
        let c = Client { requested: Some(VM_IP), ..Client::new(REQUEST) };
        let f = one_answer(&c.frame());
        let (_, _, m) = reply(&f);
        assert_eq!((m.message_type(), m.header.yiaddr), (Ok(ACK), VM_IP));
    }

    #[test]
    fn renewal_is_acked_unicast_to_ciaddr() {
        let c = Client { ciaddr: VM_IP, ..Client::new(REQUEST) };
        let ack = one_answer(&c.frame());
        let (h, p, m) = reply(&ack);
        assert_eq!(m.message_type(), Ok(ACK));
        assert_eq!((m.header.ciaddr, m.header.yiaddr), (VM_IP, VM_IP));
        assert_eq!((h.dst, p.dst), (VM_MAC, IpAddr::V4(VM_IP)));
        assert_lease_options(&m, true);
        // Even with the broadcast flag: a client with an address gets unicast.
        let c = Client { ciaddr: VM_IP, flags: BROADCAST_FLAG, ..Client::new(REQUEST) };
        let f = one_answer(&c.frame());
        let (h, p, _) = reply(&f);
        assert_eq!((h.dst, p.dst), (VM_MAC, IpAddr::V4(VM_IP)));
    }

    #[test]
    fn request_for_another_address_is_nakked() {
        for c in [
            Client {
                requested: Some(Ipv4Addr::new(10, 0, 0, 9)),
                server: Some(GW_IP),
                ..Client::new(REQUEST)
            },
            Client { requested: Some(Ipv4Addr::new(192, 168, 1, 20)), ..Client::new(REQUEST) },
            Client { ciaddr: Ipv4Addr::new(10, 0, 0, 9), ..Client::new(REQUEST) },
            Client::new(REQUEST),
        ] {
            let nak = one_answer(&c.frame());
            let (h, p, m) = reply(&nak);
            assert_eq!(m.message_type(), Ok(NAK));
            assert_eq!((m.header.yiaddr, m.header.ciaddr), (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED));
            assert_eq!((h.dst, p.dst), (Mac::BROADCAST, IpAddr::V4(Ipv4Addr::BROADCAST)));
            for code in [OPT_LEASE_TIME, OPT_RENEWAL_TIME, OPT_REBINDING_TIME, OPT_SUBNET_MASK, OPT_ROUTER] {
                assert_eq!(m.options.get(code), None, "option {code} in a NAK");
            }
        }
    }

    #[test]
    fn request_naming_another_server_is_not_answered() {
        let c = Client {
            requested: Some(Ipv4Addr::new(192, 168, 1, 20)),
            server: Some(Ipv4Addr::new(192, 168, 1, 1)),
            ..Client::new(REQUEST)
        };
        assert_eq!(handle(&c.frame(), VM_MAC, Some(&lease())), Outcome::Answered(vec![]));
        let c = Client { requested: Some(VM_IP), server: Some(Ipv4Addr::new(10, 0, 0, 3)), ..c };
        assert_eq!(handle(&c.frame(), VM_MAC, Some(&lease())), Outcome::Answered(vec![]));
    }

    #[test]
    fn release_and_decline_are_swallowed() {
        let release = Client { ciaddr: VM_IP, server: Some(GW_IP), ..Client::new(RELEASE) };
        assert_eq!(handle(&release.frame(), VM_MAC, Some(&lease())), Outcome::Answered(vec![]));
        let decline = Client { requested: Some(VM_IP), server: Some(GW_IP), ..Client::new(DECLINE) };
        assert_eq!(handle(&decline.frame(), VM_MAC, Some(&lease())), Outcome::Answered(vec![]));
    }

    #[test]
    fn inform_gets_configuration_without_a_lease() {
        let c = Client { ciaddr: VM_IP, ..Client::new(INFORM) };
        let f = one_answer(&c.frame());
        let (h, p, m) = reply(&f);
        assert_eq!(m.message_type(), Ok(ACK));
        assert_eq!((m.header.yiaddr, m.header.ciaddr), (Ipv4Addr::UNSPECIFIED, VM_IP));
        assert_eq!((h.dst, p.dst), (VM_MAC, IpAddr::V4(VM_IP)));
        assert_lease_options(&m, false);
    }

    #[test]
    fn relayed_messages_go_back_to_the_relay() {
        let relay = Ipv4Addr::new(10, 0, 0, 5);
        let c = Client { giaddr: relay, ..Client::new(DISCOVER) };
        let f = one_answer(&c.frame());
        let (h, p, m) = reply(&f);
        assert_eq!((h.dst, p.dst, m.header.giaddr), (VM_MAC, IpAddr::V4(relay), relay));
        assert_eq!(p.l4, L4::Udp { src_port: SERVER_PORT, dst_port: SERVER_PORT });
        let c = Client { giaddr: relay, requested: Some(Ipv4Addr::new(10, 0, 0, 9)), ..Client::new(REQUEST) };
        let f = one_answer(&c.frame());
        let (_, _, m) = reply(&f);
        assert_eq!((m.message_type(), m.header.flags), (Ok(NAK), BROADCAST_FLAG));
    }

    #[test]
    fn other_macs_get_no_leases() {
        let c = Client { chaddr: Mac([0x52, 0x54, 0, 0, 0, 0x99]), ..Client::new(DISCOVER) };
        assert_eq!(dropped(&c.frame()), DhcpError::ForeignClient(c.chaddr));
        let mut f = Client::new(DISCOVER).frame();
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0x99]);
        assert_eq!(dropped(&f), DhcpError::ForeignSource(Mac([0x52, 0x54, 0, 0, 0, 0x99])));
    }

    #[test]
    fn a_port_without_an_address_gets_no_answers() {
        for c in [
            Client::new(DISCOVER),
            Client { requested: Some(VM_IP), server: Some(GW_IP), ..Client::new(REQUEST) },
            Client { ciaddr: VM_IP, ..Client::new(INFORM) },
        ] {
            assert!(answers(&c.frame(), None).is_empty());
        }
    }

    #[test]
    fn garbage_client_messages_are_dropped() {
        let good = Client::new(DISCOVER).bootp();
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut m = good.clone();
            edit(&mut m);
            dropped(&udp(Mac::BROADCAST, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, &m))
        };
        assert_eq!(with(&|m| m.truncate(239)), DhcpError::Header(HeaderError::Truncated(239)));
        assert_eq!(with(&|m| m.truncate(0)), DhcpError::Header(HeaderError::Truncated(0)));
        assert_eq!(with(&|m| m[0] = BOOTREPLY), DhcpError::Op(BOOTREPLY));
        assert_eq!(with(&|m| m[1] = 6), DhcpError::HardwareType(6));
        assert_eq!(with(&|m| m[2] = 16), DhcpError::HardwareLength(16));
        assert_eq!(with(&|m| m[MAGIC_AT] = 0), DhcpError::MagicCookie(0x0082_5363));
        // The first option after the message type claims more than is left.
        assert_eq!(
            with(&|m| {
                m.truncate(OPTIONS_AT + 3);
                m.extend_from_slice(&[OPT_CLIENT_ID, 40, 1, 2]);
            }),
            DhcpError::Options(OptionError::Overrun { code: OPT_CLIENT_ID })
        );
        assert_eq!(
            with(&|m| {
                m.truncate(OPTIONS_AT + 3);
                m.push(OPT_HOSTNAME);
            }),
            DhcpError::Options(OptionError::Overrun { code: OPT_HOSTNAME })
        );
        // BOOTP: no message type.
        assert_eq!(with(&|m| m[OPTIONS_AT..OPTIONS_AT + 3].fill(OPT_PAD)), DhcpError::NoMessageType);
        assert_eq!(with(&|m| m[OPTIONS_AT] = OPT_END), DhcpError::NoMessageType);
        assert_eq!(with(&|m| m[OPTIONS_AT + 2] = OFFER), DhcpError::MessageType(OFFER));
        assert_eq!(with(&|m| m[OPTIONS_AT + 2] = 42), DhcpError::MessageType(42));
        assert_eq!(
            with(&|m| {
                m.truncate(OPTIONS_AT);
                m.extend_from_slice(&[OPT_MESSAGE_TYPE, 2, DISCOVER, DISCOVER, OPT_END]);
            }),
            DhcpError::Options(OptionError::Length { code: OPT_MESSAGE_TYPE, len: 2, expected: "1" })
        );
        let mut m = Client::new(REQUEST).bootp();
        m.truncate(OPTIONS_AT + 3);
        m.extend_from_slice(&[OPT_REQUESTED_IP, 3, 10, 0, 0, OPT_END]);
        assert_eq!(
            dropped(&udp(Mac::BROADCAST, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, &m)),
            DhcpError::Options(OptionError::Length { code: OPT_REQUESTED_IP, len: 3, expected: "4" })
        );
    }

    #[test]
    fn broken_datagrams_are_dropped() {
        let mut f = Client::new(DISCOVER).frame();
        f[14 + 6] |= 0x20; // more fragments
        assert_eq!(dropped(&f), DhcpError::Fragment);
        let mut f = Client::new(DISCOVER).frame();
        f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4000u16.to_be_bytes());
        assert_eq!(dropped(&f), DhcpError::UdpLength { claimed: 4000, available: 8 + MIN_MESSAGE });
        f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&7u16.to_be_bytes());
        assert!(matches!(dropped(&f), DhcpError::UdpLength { claimed: 7, .. }));
    }

    #[test]
    fn other_traffic_is_not_dhcp() {
        let bootp = Client::new(DISCOVER).bootp();
        let other = |src_port, dst_port| {
            packet::udp_v4_frame(VM_MAC.0, [0xff; 6], VM_IP, GW_IP, src_port, dst_port, &bootp)
        };
        for f in [other(68, 53), other(67, 67), other(1000, 67), other(67, 68)] {
            assert_eq!(handle(&f, VM_MAC, Some(&lease())), Outcome::NotDhcp);
        }
        assert!(is_server_message(&other(67, 68)));
        assert!(!is_server_message(&Client::new(DISCOVER).frame()));
        let arp = crate::arp::request(VM_MAC, VM_IP, GW_IP);
        assert_eq!(handle(&arp, VM_MAC, Some(&lease())), Outcome::NotDhcp);
        assert_eq!(handle(&[0; 10], VM_MAC, Some(&lease())), Outcome::NotDhcp);
        // Malformed IP is the switch's to count, not DHCP's.
        let mut f = Client::new(DISCOVER).frame();
        f[14 + 2] = 0xff;
        assert_eq!(handle(&f, VM_MAC, Some(&lease())), Outcome::NotDhcp);
    }

    #[test]
    fn tagged_requests_get_tagged_replies() {
        let plain = Client::new(DISCOVER).frame();
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        tagged.extend_from_slice(&plain[12..]);
        let offer = one_answer(&tagged);
        assert_eq!(offer[12..16], [0x81, 0x00, 0x00, 0x07]);
        let (_, _, m) = reply(&offer);
        assert_eq!(m.header.yiaddr, VM_IP);
    }

    #[test]
    fn oversized_configuration_stays_within_576_bytes() {
        let big = Lease {
            dns: (0..200).map(|i| Ipv4Addr::new(10, 1, 0, i as u8)).collect(),
            hostname: Some("h".repeat(255)),
            ..lease()
        };
        let frames = answers(&Client::new(DISCOVER).frame(), Some(&big));
        let (_, _, m) = reply(&frames[0]);
        assert_eq!(m.header.yiaddr, VM_IP);
        assert_eq!(u32_option(&m, OPT_LEASE_TIME), Some(86_400));
        assert_eq!(m.options.get(OPT_MTU), Some(&1450u16.to_be_bytes()[..]));
        let dns = m.options.get(OPT_DNS).unwrap();
        assert!(!dns.is_empty() && dns.len() % 4 == 0);
        assert_eq!(dns[..4], [10, 1, 0, 0], "the first servers are kept");
        // No MTU below the minimum, no empty hostname, no router when unset.
        let small = Lease { mtu: 0, hostname: Some(String::new()), router: None, dns: vec![], ..lease() };
        let frames = answers(&Client::new(DISCOVER).frame(), Some(&small));
        let (_, _, m) = reply(&frames[0]);
        for code in [OPT_MTU, OPT_HOSTNAME, OPT_ROUTER, OPT_DNS] {
            assert_eq!(m.options.get(code), None, "option {code}");
        }
        // An infinite lease keeps T1 and T2 finite and ordered.
        let forever = Lease { lease_secs: u32::MAX, ..lease() };
        let frames = answers(&Client::new(DISCOVER).frame(), Some(&forever));
        let (_, _, m) = reply(&frames[0]);
        let t = [OPT_LEASE_TIME, OPT_RENEWAL_TIME, OPT_REBINDING_TIME].map(|c| u32_option(&m, c));
        assert_eq!(t, [Some(u32::MAX), Some(u32::MAX / 2), Some(3_758_096_383)]);
    }

    fn check_no_panic(f: &[u8]) {
        let l = lease();
        for lease in [None, Some(&l)] {
            let _ = handle(f, VM_MAC, lease);
        }
        let _ = is_server_message(f);
        let _ = crate::arp::parse(f);
        let _ = crate::arp::answer(f, GW_IP, GW_MAC);
    }

    proptest! {
        #[test]
        fn random_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            check_no_panic(&bytes);
        }

        #[test]
        fn random_dhcp_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            check_no_panic(&udp(Mac::BROADCAST, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, &bytes));
        }

        #[test]
        fn random_options_never_panic(
            options in proptest::collection::vec(any::<u8>(), 0..400),
            ty in 0u8..10,
            flags in any::<u16>(),
            ciaddr in any::<[u8; 4]>(),
            giaddr in any::<[u8; 4]>(),
        ) {
            let c = Client {
                flags,
                ciaddr: ciaddr.into(),
                giaddr: giaddr.into(),
                requested: Some(VM_IP),
                ..Client::new(ty)
            };
            let mut m = c.bootp();
            m.truncate(OPTIONS_AT + 3);
            m.extend_from_slice(&options);
            let f = udp(Mac::BROADCAST, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, &m);
            check_no_panic(&f);
            // Whatever the options, replies stay well-formed.
            if let Outcome::Answered(frames) = handle(&f, VM_MAC, Some(&lease())) {
                for r in &frames {
                    let p = packet::parse(r).unwrap().unwrap();
                    prop_assert!(r.len() - p.ip_offset <= 576);
                    prop_assert_eq!(packet::checksum(&r[p.ip_offset..p.ip_offset + 20], 0), 0);
                }
            }
        }
    }
}
