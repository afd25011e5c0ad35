//! ICMP echo for IPv4 (RFC 792): answering pings to an address the switch
//! owns (a network's gateway, the address `arp.rs` answers for).
//!
//! Sans-IO: a frame in, the reply frame out. Only a plain echo request is
//! answered: unicast to the gateway's MAC and address, not a fragment, no IP
//! options (RFC 1122 3.2.2.6 asks a host to reverse a source route and extend
//! a record route in the reply; refusing is simpler than getting those
//! right), both checksums valid (a host drops a corrupt request), and no
//! longer than the network's MTU. The reply repeats the identifier, the
//! sequence number and the data, and goes back to the requester's MAC with
//! the same 802.1Q tag, if the request had one.
//!
//! Wire layout of the reply (offsets after the Ethernet header):
//! ```text
//! IPv4  0  0x45 | DSCP of the request, ECN 0 | total length (the request's)
//!       4  identification 0 | flags DF, fragment offset 0
//!       8  TTL 64 | protocol 1 | header checksum
//!      12  source: the gateway | 16  destination: the requester
//! ICMP 20  type 0 | code 0 | checksum | identifier | sequence | data...
//! ```

use std::net::Ipv4Addr;

use crate::frame::{self, ETHERTYPE_IPV4, FrameError, Mac};
use crate::packet::{PROTO_ICMP, checksum};

/// ICMP type: echo reply.
pub const TYPE_ECHO_REPLY: u8 = 0;
/// ICMP type: echo request.
pub const TYPE_ECHO_REQUEST: u8 = 8;

/// Length of an IPv4 header without options.
const IPV4_HEADER: usize = 20;
/// Type, code, checksum, identifier, sequence number.
const ECHO_HEADER: usize = 8;
/// TTL of replies, Linux's default.
const REPLY_TTL: u8 = 64;
/// IPv4 flags and fragment offset of replies: don't fragment.
const FLAGS_DF: u16 = 0x4000;
/// More fragments, and the fragment offset: either makes a fragment.
const FRAGMENT_BITS: u16 = 0x3fff;
/// Shortest Ethernet frame without its FCS; replies are padded to it.
const MIN_ETHERNET: usize = 60;

/// Why a frame gets no echo reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EchoError {
    #[error("malformed Ethernet frame")]
    Frame(#[source] FrameError),
    #[error("frame to {0}, not to the gateway's MAC")]
    OtherMac(Mac),
    #[error("ethertype {0:#06x} is not IPv4")]
    NotIpv4(u16),
    #[error("IPv4 header truncated, or its version, header length or total length inconsistent")]
    IpHeader,
    #[error("IPv4 header with options")]
    IpOptions,
    #[error("IPv4 header checksum does not verify")]
    IpChecksum,
    #[error("IPv4 fragment")]
    Fragment,
    #[error("IP protocol {0} is not ICMP (1)")]
    NotIcmp(u8),
    #[error("packet to {0}, not to the gateway")]
    OtherAddress(Ipv4Addr),
    #[error("source address {0} cannot be answered")]
    Source(Ipv4Addr),
    #[error("ICMP message of {0} bytes is shorter than the {ECHO_HEADER} of an echo header")]
    Truncated(usize),
    #[error("ICMP type {ty} code {code} is not an echo request (8, 0)")]
    NotEchoRequest { ty: u8, code: u8 },
    #[error("IPv4 packet of {len} bytes is longer than the MTU of {mtu}")]
    TooLong { len: usize, mtu: u16 },
    #[error("ICMP checksum does not verify")]
    IcmpChecksum,
}

/// The echo reply to `frame` if it is an echo request to `ip`, which this
/// switch owns at `mac` on a network whose MTU is `mtu`; see the module
/// documentation for what is answered.
pub fn answer(frame: &[u8], ip: Ipv4Addr, mac: Mac, mtu: u16) -> Option<Vec<u8>> {
    reply(frame, ip, mac, mtu).ok()
}

/// [`answer`], with the reason when there is no reply.
pub fn reply(frame: &[u8], ip: Ipv4Addr, mac: Mac, mtu: u16) -> Result<Vec<u8>, EchoError> {
    let h = frame::parse(frame).map_err(EchoError::Frame)?;
    if h.dst != mac {
        return Err(EchoError::OtherMac(h.dst));
    }
    if h.ethertype != ETHERTYPE_IPV4 {
        return Err(EchoError::NotIpv4(h.ethertype));
    }
    let p = frame.get(h.payload..).unwrap_or_default();
    let Some(hdr) = p.get(..IPV4_HEADER) else { return Err(EchoError::IpHeader) };
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    if hdr[0] >> 4 != 4 || ihl < IPV4_HEADER {
        return Err(EchoError::IpHeader);
    }
    if ihl > IPV4_HEADER {
        return Err(EchoError::IpOptions);
    }
    let be16 = |at: usize| u16::from_be_bytes([hdr[at], hdr[at + 1]]);
    let total = usize::from(be16(2));
    // What follows the packet in the frame is Ethernet padding.
    let Some(packet) = p.get(..total).filter(|_| total >= IPV4_HEADER) else {
        return Err(EchoError::IpHeader);
    };
    if checksum(hdr, 0) != 0 {
        return Err(EchoError::IpChecksum);
    }
    if be16(6) & FRAGMENT_BITS != 0 {
        return Err(EchoError::Fragment);
    }
    if hdr[9] != PROTO_ICMP {
        return Err(EchoError::NotIcmp(hdr[9]));
    }
    let ip4 = |at: usize| Ipv4Addr::new(hdr[at], hdr[at + 1], hdr[at + 2], hdr[at + 3]);
    let (src, dst) = (ip4(12), ip4(16));
    if dst != ip {
        return Err(EchoError::OtherAddress(dst));
    }
    // A reply to any of these would go nowhere or to ourselves.
    if src == ip || src.is_unspecified() || src.is_broadcast() || src.is_multicast() || src.is_loopback() {
        return Err(EchoError::Source(src));
    }
    let icmp = &packet[IPV4_HEADER..];
    if icmp.len() < ECHO_HEADER {
        return Err(EchoError::Truncated(icmp.len()));
    }
    if (icmp[0], icmp[1]) != (TYPE_ECHO_REQUEST, 0) {
        return Err(EchoError::NotEchoRequest { ty: icmp[0], code: icmp[1] });
    }
    if total > usize::from(mtu) {
        return Err(EchoError::TooLong { len: total, mtu });
    }
    if checksum(icmp, 0) != 0 {
        return Err(EchoError::IcmpChecksum);
    }
    // `frame::parse` accepted the frame, so its header (tag included) is in bounds.
    let tag = frame.get(12..16).filter(|t| t.starts_with(&[0x81, 0x00]));
    let eth = Ethernet { dst: h.src, src: mac, tag };
    // DSCP stays, as Linux does; the reply is not ECN-capable.
    let tos = hdr[1] & 0xfc;
    Ok(build(&eth, dst, src, tos, TYPE_ECHO_REPLY, &icmp[4..]))
}

/// An echo request frame from `src_mac`/`src` to `dst_mac`/`dst`, for tests
/// and tools (a guest's ping).
pub fn request(
    src_mac: Mac,
    src: Ipv4Addr,
    dst_mac: Mac,
    dst: Ipv4Addr,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    let mut echo = Vec::with_capacity(4 + data.len());
    echo.extend_from_slice(&ident.to_be_bytes());
    echo.extend_from_slice(&seq.to_be_bytes());
    echo.extend_from_slice(data);
    build(&Ethernet { dst: dst_mac, src: src_mac, tag: None }, src, dst, 0, TYPE_ECHO_REQUEST, &echo)
}

/// The Ethernet header of a frame to build.
struct Ethernet<'a> {
    dst: Mac,
    src: Mac,
    /// An 802.1Q tag (four bytes starting 0x8100).
    tag: Option<&'a [u8]>,
}

/// A frame carrying an IPv4 packet without options from `src` to `dst`
/// with an ICMP echo message of type `ty` whose identifier, sequence number
/// and data are `echo`, checksums filled in, padded to the Ethernet minimum.
/// One allocation. `echo` fits: callers take it from a packet whose total
/// length was a `u16`, or (`request`) from tests and tools.
fn build(eth: &Ethernet<'_>, src: Ipv4Addr, dst: Ipv4Addr, tos: u8, ty: u8, echo: &[u8]) -> Vec<u8> {
    let total = IPV4_HEADER + 4 + echo.len();
    let tag = eth.tag.unwrap_or_default();
    let mut f = Vec::with_capacity((14 + tag.len() + total).max(MIN_ETHERNET));
    f.extend_from_slice(&eth.dst.0);
    f.extend_from_slice(&eth.src.0);
    f.extend_from_slice(tag);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let ip_at = f.len();
    f.extend_from_slice(&[0x45, tos]);
    f.extend_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&FLAGS_DF.to_be_bytes());
    f.extend_from_slice(&[REPLY_TTL, PROTO_ICMP, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let sum = checksum(&f[ip_at..], 0);
    f[ip_at + 10..ip_at + 12].copy_from_slice(&sum.to_be_bytes());
    let icmp_at = f.len();
    f.extend_from_slice(&[ty, 0, 0, 0]);
    f.extend_from_slice(echo);
    let sum = checksum(&f[icmp_at..], 0);
    f[icmp_at + 2..icmp_at + 4].copy_from_slice(&sum.to_be_bytes());
    if f.len() < MIN_ETHERNET {
        f.resize(MIN_ETHERNET, 0);
    }
    f
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const GW_MAC: Mac = Mac([0x02, 0, 0, 0, 0, 0x01]);
    const VM: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
    const VM_MAC: Mac = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    const MTU: u16 = 1500;

    fn ping(data: &[u8]) -> Vec<u8> {
        request(VM_MAC, VM, GW_MAC, GW, 0x1234, 1, data)
    }

    /// Recomputes the IPv4 header checksum of `f` (untagged) after a test changed the header.
    fn fix_ip_checksum(f: &mut [u8]) {
        f[24..26].copy_from_slice(&[0, 0]);
        let sum = checksum(&f[14..34], 0);
        f[24..26].copy_from_slice(&sum.to_be_bytes());
    }

    /// Recomputes the ICMP checksum of `f` (untagged, no options) after a test changed the message.
    fn fix_icmp_checksum(f: &mut [u8]) {
        let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
        f[36..38].copy_from_slice(&[0, 0]);
        let sum = checksum(&f[34..14 + total], 0);
        f[36..38].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn a_ping_to_the_gateway_gets_the_exact_reply() {
        let mut req = ping(b"abcdefgh");
        // What a guest sends: its own identification and TTL, a DSCP and ECN.
        req[15] = 0xb9; // DSCP 46, ECN CE
        req[18..20].copy_from_slice(&0xbeefu16.to_be_bytes());
        req[22] = 57;
        fix_ip_checksum(&mut req);
        let r = answer(&req, GW, GW_MAC, MTU).expect("an echo request to the gateway");
        #[rustfmt::skip]
        let expected: [u8; 60] = [
            // Ethernet: to the requester, from the gateway's MAC.
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00,
            // IPv4: 36 bytes, DSCP kept and ECN cleared, id 0, DF, TTL 64, ICMP.
            0x45, 0xb8, 0x00, 0x24, 0x00, 0x00, 0x40, 0x00, 0x40, 0x01, 0x26, 0x1c,
            10, 0, 0, 1, 10, 0, 0, 5,
            // ICMP echo reply: identifier 0x1234, sequence 1, the data.
            0x00, 0x00, 0x5c, 0x35, 0x12, 0x34, 0x00, 0x01, b'a', b'b', b'c', b'd', b'e', b'f', b'g', b'h',
            // Padding to 60 bytes.
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(r, expected);
        // Both checksums verify when recomputed over what they cover.
        assert_eq!(checksum(&r[14..34], 0), 0);
        assert_eq!(checksum(&r[34..50], 0), 0);
    }

    #[test]
    fn replies_repeat_any_data_and_verify() {
        for len in [0, 1, 2, 55, 56, 1000, usize::from(MTU) - 28] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let req = request(VM_MAC, VM, GW_MAC, GW, 0xfeed, 0xffff, &data);
            let r = answer(&req, GW, GW_MAC, MTU).unwrap_or_else(|| panic!("{len} bytes of data"));
            assert_eq!(r.len(), req.len(), "{len} bytes of data");
            let total = 28 + len;
            assert_eq!(r[16..18], (total as u16).to_be_bytes());
            assert_eq!(checksum(&r[14..34], 0), 0, "IP checksum, {len} bytes");
            assert_eq!(checksum(&r[34..14 + total], 0), 0, "ICMP checksum, {len} bytes");
            assert_eq!((r[34], r[35]), (TYPE_ECHO_REPLY, 0));
            assert_eq!(r[38..14 + total], req[38..14 + total], "identifier, sequence, data");
            assert_eq!(r[14 + total..], req[14 + total..], "padding");
        }
    }

    #[test]
    fn padded_and_tagged_requests_are_answered() {
        // Ethernet padding after the packet is not echoed.
        let mut padded = ping(b"");
        assert_eq!(padded.len(), 60);
        padded.resize(100, 0xee);
        let r = answer(&padded, GW, GW_MAC, MTU).expect("padded request");
        assert_eq!(r, answer(&ping(b""), GW, GW_MAC, MTU).expect("request"));
        assert!(r[42..].iter().all(|&b| b == 0));
        // An 802.1Q tag is kept.
        let plain = ping(b"xyz");
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x2a]);
        tagged.extend_from_slice(&plain[12..]);
        let r = answer(&tagged, GW, GW_MAC, MTU).expect("tagged request");
        assert_eq!(r[12..16], [0x81, 0x00, 0x00, 0x2a]);
        let untagged = answer(&plain, GW, GW_MAC, MTU).expect("request");
        assert_eq!(r[..12], untagged[..12]);
        assert_eq!(r[16..49], untagged[12..45], "ethertype and packet");
    }

    #[test]
    fn what_is_not_an_echo_request_for_the_gateway_is_refused() {
        let req = ping(b"abcdefgh");
        let other = Ipv4Addr::new(10, 0, 0, 9);
        assert_eq!(
            reply(&request(VM_MAC, VM, GW_MAC, other, 1, 1, b""), GW, GW_MAC, MTU),
            Err(EchoError::OtherAddress(other))
        );
        assert_eq!(reply(&req, other, GW_MAC, MTU), Err(EchoError::OtherAddress(GW)));
        assert_eq!(reply(&req, GW, VM_MAC, MTU), Err(EchoError::OtherMac(GW_MAC)));
        let bcast = request(VM_MAC, VM, Mac::BROADCAST, GW, 1, 1, b"");
        assert_eq!(reply(&bcast, GW, GW_MAC, MTU), Err(EchoError::OtherMac(Mac::BROADCAST)));
        // A reply is not answered, nor another type or code.
        let r = answer(&req, GW, GW_MAC, MTU).expect("request");
        assert_eq!(reply(&r, VM, VM_MAC, MTU), Err(EchoError::NotEchoRequest { ty: 0, code: 0 }));
        for (ty, code) in [(TYPE_ECHO_REPLY, 0), (TYPE_ECHO_REQUEST, 1), (13, 0), (3, 3)] {
            let mut f = req.clone();
            (f[34], f[35]) = (ty, code);
            fix_icmp_checksum(&mut f);
            assert_eq!(reply(&f, GW, GW_MAC, MTU), Err(EchoError::NotEchoRequest { ty, code }));
        }
        let mut udp = req.clone();
        udp[23] = 17;
        fix_ip_checksum(&mut udp);
        assert_eq!(reply(&udp, GW, GW_MAC, MTU), Err(EchoError::NotIcmp(17)));
        let mut arp = req.clone();
        arp[12..14].copy_from_slice(&frame::ETHERTYPE_ARP.to_be_bytes());
        assert_eq!(reply(&arp, GW, GW_MAC, MTU), Err(EchoError::NotIpv4(0x0806)));
        let mut v6 = req.clone();
        v6[14] = 0x65;
        fix_ip_checksum(&mut v6);
        assert_eq!(reply(&v6, GW, GW_MAC, MTU), Err(EchoError::IpHeader));
    }

    #[test]
    fn sources_a_reply_cannot_go_to_are_refused() {
        for src in
            [GW, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, Ipv4Addr::new(224, 0, 0, 1), Ipv4Addr::LOCALHOST]
        {
            let f = request(VM_MAC, src, GW_MAC, GW, 1, 1, b"");
            assert_eq!(reply(&f, GW, GW_MAC, MTU), Err(EchoError::Source(src)));
        }
        let group_mac = request(Mac([0x01, 0, 0x5e, 0, 0, 1]), VM, GW_MAC, GW, 1, 1, b"");
        assert!(matches!(reply(&group_mac, GW, GW_MAC, MTU), Err(EchoError::Frame(_))));
    }

    #[test]
    fn fragments_are_not_answered() {
        for flags in [0x2000u16, 0x0001, 0x2001, 0x1fff, 0x6000] {
            let mut f = ping(b"abcdefgh");
            f[20..22].copy_from_slice(&flags.to_be_bytes());
            fix_ip_checksum(&mut f);
            assert_eq!(reply(&f, GW, GW_MAC, MTU), Err(EchoError::Fragment), "flags {flags:#06x}");
        }
        // DF alone, or DF with the reserved bit, is not a fragment.
        let mut f = ping(b"abcdefgh");
        f[20..22].copy_from_slice(&0xc000u16.to_be_bytes());
        fix_ip_checksum(&mut f);
        assert!(reply(&f, GW, GW_MAC, MTU).is_ok());
    }

    #[test]
    fn bad_header_lengths_and_options_are_refused() {
        for ihl in 0..5 {
            let mut f = ping(b"abcdefgh");
            f[14] = 0x40 | ihl;
            fix_ip_checksum(&mut f);
            assert_eq!(reply(&f, GW, GW_MAC, MTU), Err(EchoError::IpHeader), "IHL {ihl}");
        }
        // A header with options (a no-op and an end of options), checksummed.
        let mut f = ping(b"abcdefgh");
        f.splice(34..34, [1, 1, 1, 0]);
        f[14] = 0x46;
        f[16..18].copy_from_slice(&40u16.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let sum = checksum(&f[14..38], 0);
        f[24..26].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(reply(&f, GW, GW_MAC, MTU), Err(EchoError::IpOptions));
        // IHL beyond the frame.
        let mut f = ping(b"");
        f[14] = 0x4f;
        assert_eq!(reply(&f, GW, GW_MAC, MTU), Err(EchoError::IpOptions));
    }

    #[test]
    fn truncated_or_lying_lengths_are_refused() {
        let req = ping(b"abcdefgh");
        let total = 14 + 36;
        // Cut anywhere inside the packet: no reply.
        for len in 0..total {
            assert!(reply(&req[..len], GW, GW_MAC, MTU).is_err(), "cut at {len}");
        }
        assert_eq!(reply(&req[..14 + 19], GW, GW_MAC, MTU), Err(EchoError::IpHeader));
        assert_eq!(reply(&req[..total - 1], GW, GW_MAC, MTU), Err(EchoError::IpHeader));
        // Total length beyond the frame, or shorter than the header.
        for claimed in [u16::MAX, 61 - 14, 19, 0] {
            let mut f = req.clone();
            f[16..18].copy_from_slice(&claimed.to_be_bytes());
            fix_ip_checksum(&mut f);
            assert_eq!(reply(&f, GW, GW_MAC, MTU), Err(EchoError::IpHeader), "total {claimed}");
        }
        // Too short for an echo header.
        for claimed in [20u16, 27] {
            let mut f = req.clone();
            f[16..18].copy_from_slice(&claimed.to_be_bytes());
            fix_ip_checksum(&mut f);
            let icmp = usize::from(claimed) - 20;
            assert_eq!(reply(&f, GW, GW_MAC, MTU), Err(EchoError::Truncated(icmp)), "total {claimed}");
        }
    }

    #[test]
    fn corrupt_and_oversized_requests_are_refused() {
        let req = ping(b"abcdefgh");
        let mut f = req.clone();
        f[22] ^= 1; // TTL, without fixing the checksum
        assert_eq!(reply(&f, GW, GW_MAC, MTU), Err(EchoError::IpChecksum));
        let mut f = req.clone();
        f[45] ^= 0x20; // data
        assert_eq!(reply(&f, GW, GW_MAC, MTU), Err(EchoError::IcmpChecksum));
        // The packet must fit the MTU; exactly the MTU is answered.
        let data = vec![0x5a; usize::from(MTU) - 28];
        let full = request(VM_MAC, VM, GW_MAC, GW, 1, 1, &data);
        assert!(reply(&full, GW, GW_MAC, MTU).is_ok());
        assert_eq!(reply(&full, GW, GW_MAC, MTU - 1), Err(EchoError::TooLong { len: 1500, mtu: MTU - 1 }));
        assert_eq!(reply(&req, GW, GW_MAC, 0), Err(EchoError::TooLong { len: 36, mtu: 0 }));
        // Jumbo frames beyond what a port may send at all.
        let huge = request(VM_MAC, VM, GW_MAC, GW, 1, 1, &vec![0; frame::MAX_FRAME]);
        assert!(matches!(reply(&huge, GW, GW_MAC, u16::MAX), Err(EchoError::Frame(_))));
    }

    /// Mutations of a valid request that keep it looking like one: the
    /// parser's checks, not the Ethernet ones, are what gets exercised.
    fn mutated_request(data_len: usize, edits: &[(usize, u8)], cut: usize) -> Vec<u8> {
        let mut f = request(VM_MAC, VM, GW_MAC, GW, 7, 9, &vec![0xa5; data_len]);
        for &(at, b) in edits {
            let at = 12 + at % (f.len() - 12);
            f[at] = b;
        }
        f.truncate(f.len().saturating_sub(cut));
        f
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), mtu in any::<u16>()) {
            let _ = reply(&bytes, GW, GW_MAC, mtu);
            let mut f = bytes;
            if f.len() >= 15 {
                f[..6].copy_from_slice(&GW_MAC.0);
                f[6] &= 0xfe;
                f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
                f[14] = 0x45;
            }
            let _ = reply(&f, GW, GW_MAC, mtu);
        }

        #[test]
        fn mutated_requests_never_panic_and_replies_verify(
            data_len in 0usize..1600,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
            cut in 0usize..64,
            mtu in prop_oneof![Just(1500u16), any::<u16>()],
        ) {
            let f = mutated_request(data_len, &edits, cut);
            if let Ok(r) = reply(&f, GW, GW_MAC, mtu) {
                // Whatever was answered, the reply is a well-formed echo reply.
                let total = usize::from(u16::from_be_bytes([r[16], r[17]]));
                prop_assert!(total <= usize::from(mtu));
                prop_assert!(r.len() >= (14 + total).max(MIN_ETHERNET));
                prop_assert_eq!(checksum(&r[14..34], 0), 0);
                prop_assert_eq!(checksum(&r[34..14 + total], 0), 0);
                prop_assert_eq!((r[34], r[35]), (TYPE_ECHO_REPLY, 0));
                prop_assert_eq!(&r[..6], &VM_MAC.0);
                prop_assert_eq!(&r[6..12], &GW_MAC.0);
            }
        }

        #[test]
        fn any_valid_request_is_answered(
            ident in any::<u16>(),
            seq in any::<u16>(),
            data in proptest::collection::vec(any::<u8>(), 0..1472),
        ) {
            let r = answer(&request(VM_MAC, VM, GW_MAC, GW, ident, seq, &data), GW, GW_MAC, MTU);
            let r = r.expect("a valid request");
            prop_assert_eq!(&r[38..40], &ident.to_be_bytes());
            prop_assert_eq!(&r[40..42], &seq.to_be_bytes());
            prop_assert_eq!(&r[42..42 + data.len()], &data[..]);
        }
    }
}
