//! ARP for IPv4 over Ethernet (RFC 826): parsing for port security and
//! answering requests for an address the switch owns (a network's gateway).
//!
//! Sans-IO: frames in, frames out. Only the IPv4-over-Ethernet form is
//! accepted (hardware type 1, protocol 0x0800, address lengths 6 and 4); any
//! other ARP packet is an error for the caller to count and drop. A request
//! that arrived with an 802.1Q tag is answered with the same tag.

use std::net::Ipv4Addr;

use crate::frame::{self, ETHERTYPE_ARP, ETHERTYPE_IPV4, FrameError, Mac};

/// ARP operation: request.
pub const OP_REQUEST: u16 = 1;
/// ARP operation: reply.
pub const OP_REPLY: u16 = 2;

/// Length of an ARP packet for IPv4 over Ethernet.
const ARP_LEN: usize = 28;
/// Shortest Ethernet frame without its FCS; replies are padded to it.
const MIN_ETHERNET: usize = 60;
/// Hardware type: Ethernet.
const HTYPE_ETHERNET: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ArpError {
    #[error("malformed Ethernet frame")]
    Frame(#[source] FrameError),
    #[error("ARP packet of {0} bytes is shorter than the {ARP_LEN} of IPv4 over Ethernet")]
    Truncated(usize),
    #[error("ARP hardware type {0} is not Ethernet (1)")]
    HardwareType(u16),
    #[error("ARP protocol type {0:#06x} is not IPv4 (0x0800)")]
    ProtocolType(u16),
    #[error("ARP address lengths {hlen}/{plen} are not 6/4")]
    AddressLengths { hlen: u8, plen: u8 },
}

/// An ARP packet for IPv4 over Ethernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// [`OP_REQUEST`], [`OP_REPLY`], or another value (kept as sent).
    pub op: u16,
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_mac: Mac,
    pub target_ip: Ipv4Addr,
}

impl Arp {
    /// The 28 bytes of this packet on the wire.
    fn encode(&self) -> [u8; ARP_LEN] {
        let mut p = [0u8; ARP_LEN];
        p[0..2].copy_from_slice(&HTYPE_ETHERNET.to_be_bytes());
        p[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        p[4] = 6;
        p[5] = 4;
        p[6..8].copy_from_slice(&self.op.to_be_bytes());
        p[8..14].copy_from_slice(&self.sender_mac.0);
        p[14..18].copy_from_slice(&self.sender_ip.octets());
        p[18..24].copy_from_slice(&self.target_mac.0);
        p[24..28].copy_from_slice(&self.target_ip.octets());
        p
    }
}

/// Parses the ARP packet in a frame: `Ok(None)` for frames that carry
/// something else.
pub fn parse(frame: &[u8]) -> Result<Option<Arp>, ArpError> {
    let h = frame::parse(frame).map_err(ArpError::Frame)?;
    if h.ethertype != ETHERTYPE_ARP {
        return Ok(None);
    }
    let p = frame.get(h.payload..).unwrap_or_default();
    let Some(p) = p.get(..ARP_LEN) else {
        return Err(ArpError::Truncated(p.len()));
    };
    let be16 = |at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
    let mac = |at: usize| Mac([p[at], p[at + 1], p[at + 2], p[at + 3], p[at + 4], p[at + 5]]);
    let ip = |at: usize| Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]);
    let htype = be16(0);
    if htype != HTYPE_ETHERNET {
        return Err(ArpError::HardwareType(htype));
    }
    let ptype = be16(2);
    if ptype != ETHERTYPE_IPV4 {
        return Err(ArpError::ProtocolType(ptype));
    }
    if (p[4], p[5]) != (6, 4) {
        return Err(ArpError::AddressLengths { hlen: p[4], plen: p[5] });
    }
    Ok(Some(Arp {
        op: be16(6),
        sender_mac: mac(8),
        sender_ip: ip(14),
        target_mac: mac(18),
        target_ip: ip(24),
    }))
}

/// The reply to `frame` if it is an ARP request for `ip`, which this switch
/// owns at `mac`.
///
/// Probes (sender 0.0.0.0, RFC 5227) are answered: that is how a client
/// learns that the address is taken. Announcements and other requests whose
/// sender claims `ip` itself are not: answering would only confuse the
/// announcer. Requests from a group sender address are not answered either,
/// since the reply would be flooded.
pub fn answer(frame: &[u8], ip: Ipv4Addr, mac: Mac) -> Option<Vec<u8>> {
    let req = parse(frame).ok()??;
    if req.op != OP_REQUEST || req.target_ip != ip || req.sender_ip == ip || !req.sender_mac.is_unicast() {
        return None;
    }
    let reply = Arp {
        op: OP_REPLY,
        sender_mac: mac,
        sender_ip: ip,
        target_mac: req.sender_mac,
        target_ip: req.sender_ip,
    };
    // `parse` accepted the frame, so its header (tag included) is in bounds.
    let tag = frame.get(12..16).filter(|t| t.starts_with(&[0x81, 0x00]));
    Some(build(req.sender_mac, mac, tag, &reply))
}

/// A broadcast request from `src_mac`/`src_ip` for `target_ip`'s MAC
/// (`src_ip` 0.0.0.0 makes it an RFC 5227 probe).
pub fn request(src_mac: Mac, src_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let req =
        Arp { op: OP_REQUEST, sender_mac: src_mac, sender_ip: src_ip, target_mac: Mac([0; 6]), target_ip };
    build(Mac::BROADCAST, src_mac, None, &req)
}

/// An Ethernet frame carrying `arp`, with an optional 802.1Q tag (the four
/// bytes starting 0x8100), padded to the Ethernet minimum.
fn build(dst: Mac, src: Mac, tag: Option<&[u8]>, arp: &Arp) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_ETHERNET + 4);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(tag.unwrap_or_default());
    f.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f.extend_from_slice(&arp.encode());
    if f.len() < MIN_ETHERNET {
        f.resize(MIN_ETHERNET, 0);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const GW_MAC: Mac = Mac([0x02, 0, 0, 0, 0, 0x01]);
    const VM: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
    const VM_MAC: Mac = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    #[test]
    fn requests_parse_back() {
        let f = request(VM_MAC, VM, GW);
        assert_eq!(f.len(), 60);
        assert_eq!(f[..6], [0xff; 6]);
        let a = parse(&f).unwrap().unwrap();
        assert_eq!(
            a,
            Arp { op: OP_REQUEST, sender_mac: VM_MAC, sender_ip: VM, target_mac: Mac([0; 6]), target_ip: GW }
        );
    }

    #[test]
    fn gateway_requests_are_answered() {
        let r = answer(&request(VM_MAC, VM, GW), GW, GW_MAC).expect("a request for the gateway");
        assert_eq!(r.len(), 60);
        let h = frame::parse(&r).unwrap();
        assert_eq!((h.dst, h.src, h.ethertype), (VM_MAC, GW_MAC, ETHERTYPE_ARP));
        let a = parse(&r).unwrap().unwrap();
        assert_eq!(
            a,
            Arp { op: OP_REPLY, sender_mac: GW_MAC, sender_ip: GW, target_mac: VM_MAC, target_ip: VM }
        );
        assert!(r[14 + ARP_LEN..].iter().all(|&b| b == 0), "padding is zero");
    }

    #[test]
    fn other_targets_and_replies_are_not_answered() {
        assert_eq!(answer(&request(VM_MAC, VM, Ipv4Addr::new(10, 0, 0, 9)), GW, GW_MAC), None);
        let reply = answer(&request(VM_MAC, VM, GW), GW, GW_MAC).unwrap();
        assert_eq!(answer(&reply, GW, GW_MAC), None, "replies are not answered");
        let mut ipv4 = request(VM_MAC, VM, GW);
        ipv4[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        assert_eq!(answer(&ipv4, GW, GW_MAC), None);
        assert_eq!(parse(&ipv4), Ok(None));
    }

    #[test]
    fn gratuitous_arp_is_not_answered_but_probes_are() {
        assert_eq!(answer(&request(VM_MAC, GW, GW), GW, GW_MAC), None);
        let r = answer(&request(VM_MAC, Ipv4Addr::UNSPECIFIED, GW), GW, GW_MAC).expect("probe answered");
        let a = parse(&r).unwrap().unwrap();
        assert_eq!((a.op, a.sender_ip, a.sender_mac), (OP_REPLY, GW, GW_MAC));
        assert_eq!((a.target_ip, a.target_mac), (Ipv4Addr::UNSPECIFIED, VM_MAC));
        assert_eq!(frame::parse(&r).unwrap().dst, VM_MAC);
    }

    #[test]
    fn tagged_requests_are_answered_with_the_tag() {
        let plain = request(VM_MAC, VM, GW);
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x2a]);
        tagged.extend_from_slice(&plain[12..]);
        assert_eq!(parse(&tagged).unwrap(), parse(&plain).unwrap());
        let r = answer(&tagged, GW, GW_MAC).unwrap();
        assert_eq!(r[12..16], [0x81, 0x00, 0x00, 0x2a]);
        assert_eq!(parse(&r).unwrap().unwrap().target_mac, VM_MAC);
    }

    #[test]
    fn malformed_arp_is_refused() {
        let f = request(VM_MAC, VM, GW);
        assert_eq!(parse(&f[..14 + 27]), Err(ArpError::Truncated(27)));
        let mut bad = f.clone();
        bad[15] = 6; // hardware type 6 (IEEE 802)
        assert_eq!(parse(&bad), Err(ArpError::HardwareType(6)));
        let mut bad = f.clone();
        bad[16..18].copy_from_slice(&frame::ETHERTYPE_IPV6.to_be_bytes());
        assert_eq!(parse(&bad), Err(ArpError::ProtocolType(0x86dd)));
        let mut bad = f.clone();
        bad[19] = 16;
        assert_eq!(parse(&bad), Err(ArpError::AddressLengths { hlen: 6, plen: 16 }));
        assert!(matches!(parse(&f[..10]), Err(ArpError::Frame(_))));
        assert_eq!(answer(&bad, GW, GW_MAC), None);
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let _ = parse(&bytes);
            let _ = answer(&bytes, GW, GW_MAC);
            let mut arp = bytes.clone();
            if arp.len() >= 14 {
                arp[6] &= 0xfe;
                arp[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
            }
            let _ = parse(&arp);
            let _ = answer(&arp, GW, GW_MAC);
        }

        #[test]
        fn any_request_for_the_gateway_is_answered(
            mac in proptest::prelude::any::<[u8; 6]>(),
            ip in proptest::prelude::any::<[u8; 4]>(),
        ) {
            let (mac, ip) = (Mac(mac), Ipv4Addr::from(ip));
            let r = answer(&request(mac, ip, GW), GW, GW_MAC);
            let expected = ip != GW && mac.is_unicast();
            proptest::prop_assert_eq!(r.is_some(), expected);
        }
    }
}
