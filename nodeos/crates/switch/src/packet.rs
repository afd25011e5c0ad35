//! The IP view of a frame that security groups and the DHCP responder need:
//! addresses, protocol, ports, TCP flags, ICMP type. Bounds-checked; a frame
//! that claims to be IP but is truncated or inconsistent is an error (and is
//! dropped by the caller), never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::frame::{self, ETHERTYPE_IPV4, ETHERTYPE_IPV6};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("not an Ethernet frame")]
    Frame,
    #[error("truncated or inconsistent IP header")]
    IpHeader,
    #[error("truncated transport header")]
    Transport,
}

/// The transport part of an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    /// ICMP or ICMPv6; `ident` is the echo identifier for echo requests and replies.
    Icmp {
        ty: u8,
        code: u8,
        ident: Option<u16>,
    },
    /// Another protocol, or a non-first fragment (no transport header).
    Other {
        proto: u8,
    },
}

/// An IPv4 or IPv6 packet inside a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// Offset of the IP header in the frame.
    pub ip_offset: usize,
}

impl IpPacket {
    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Icmp { .. } if self.src.is_ipv4() => PROTO_ICMP,
            L4::Icmp { .. } => PROTO_ICMPV6,
            L4::Other { proto } => proto,
        }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses the IP packet in an Ethernet frame: `Ok(None)` for frames that
/// carry something else (ARP, other ethertypes).
pub fn parse(f: &[u8]) -> Result<Option<IpPacket>, PacketError> {
    let h = frame::parse(f).map_err(|_| PacketError::Frame)?;
    let at = h.payload;
    match h.ethertype {
        ETHERTYPE_IPV4 => parse_v4(f, at).map(Some),
        ETHERTYPE_IPV6 => parse_v6(f, at).map(Some),
        _ => Ok(None),
    }
}

fn parse_v4(f: &[u8], at: usize) -> Result<IpPacket, PacketError> {
    let ip = f.get(at..).ok_or(PacketError::IpHeader)?;
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Err(PacketError::IpHeader);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2).ok_or(PacketError::IpHeader)?);
    if ihl < 20 || total < ihl || total > ip.len() {
        return Err(PacketError::IpHeader);
    }
    let frag_offset = be16(ip, 6).ok_or(PacketError::IpHeader)? & 0x1fff;
    let proto = ip[9];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 =
        if frag_offset != 0 { L4::Other { proto } } else { transport(proto, &ip[ihl..total], PROTO_ICMP)? };
    Ok(IpPacket { src: src.into(), dst: dst.into(), l4, ip_offset: at })
}

fn parse_v6(f: &[u8], at: usize) -> Result<IpPacket, PacketError> {
    let ip = f.get(at..).ok_or(PacketError::IpHeader)?;
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return Err(PacketError::IpHeader);
    }
    let payload = usize::from(be16(ip, 4).ok_or(PacketError::IpHeader)?);
    if 40 + payload > ip.len() {
        return Err(PacketError::IpHeader);
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&ip[24..40]);
    // Extension headers are not followed: their packets match rules as
    // "other" protocols, which only `any` rules allow.
    let l4 = transport(ip[6], &ip[40..40 + payload], PROTO_ICMPV6)?;
    Ok(IpPacket { src: Ipv6Addr::from(src).into(), dst: Ipv6Addr::from(dst).into(), l4, ip_offset: at })
}

fn transport(proto: u8, t: &[u8], icmp: u8) -> Result<L4, PacketError> {
    let port = |i| be16(t, i).ok_or(PacketError::Transport);
    Ok(match proto {
        PROTO_TCP => {
            if t.len() < 20 {
                return Err(PacketError::Transport);
            }
            L4::Tcp { src_port: port(0)?, dst_port: port(2)?, flags: t[13] }
        }
        PROTO_UDP => {
            if t.len() < 8 {
                return Err(PacketError::Transport);
            }
            L4::Udp { src_port: port(0)?, dst_port: port(2)? }
        }
        p if p == icmp => {
            if t.len() < 4 {
                return Err(PacketError::Transport);
            }
            // Echo request/reply: 8/0 for ICMP, 128/129 for ICMPv6.
            let echo = matches!((icmp, t[0]), (PROTO_ICMP, 0 | 8) | (PROTO_ICMPV6, 128 | 129));
            let ident = if echo { Some(port(4)?) } else { None };
            L4::Icmp { ty: t[0], code: t[1], ident }
        }
        proto => L4::Other { proto },
    })
}

/// The Internet checksum (RFC 1071) of `data`, continuing from `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Builds an Ethernet + IPv4 + UDP frame, checksums filled in.
pub fn udp_v4_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let ip_at = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(ip_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_UDP, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let ip_sum = checksum(&f[ip_at..ip_at + 20], 0);
    f[ip_at + 10..ip_at + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let udp_at = f.len();
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    let mut pseudo = 0u32;
    for w in [src.octets(), dst.octets()] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]])) + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    pseudo += u32::from(PROTO_UDP) + udp_len as u32;
    let sum = match checksum(&f[udp_at..], pseudo) {
        0 => 0xffff,
        s => s,
    };
    f[udp_at + 6..udp_at + 8].copy_from_slice(&sum.to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_udp_frames_parse_back_with_valid_checksums() {
        let f = udp_v4_frame(
            [2, 0, 0, 0, 0, 1],
            [0xff; 6],
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            67,
            68,
            b"hello",
        );
        let p = parse(&f).unwrap().unwrap();
        assert_eq!(p.src, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(p.l4, L4::Udp { src_port: 67, dst_port: 68 });
        // A correct header sums to zero.
        assert_eq!(checksum(&f[14..34], 0), 0);
    }

    #[test]
    fn truncated_or_lying_headers_are_errors() {
        let mut f = udp_v4_frame([2; 6], [4; 6], Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 1, 2, b"x");
        f[16] = 0xff; // total length far beyond the frame
        assert_eq!(parse(&f), Err(PacketError::IpHeader));
        let f = udp_v4_frame([2; 6], [4; 6], Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 1, 2, b"x");
        assert!(parse(&f[..30]).is_err());
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(parse(&arp), Ok(None));
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
            let mut v4 = bytes.clone();
            if v4.len() > 14 { v4[12] = 0x08; v4[13] = 0; v4[14] = 0x45; }
            let _ = parse(&v4);
        }
    }
}
