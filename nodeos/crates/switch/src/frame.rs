//! Ethernet II frames (with an optional 802.1Q tag) as ports hand them over.

/// Shortest frame accepted: two addresses and an ethertype.
pub const MIN_FRAME: usize = 14;
/// Longest frame accepted (jumbo frames included).
pub const MAX_FRAME: usize = 9216;

pub use nodeos_types::net::MacAddr as Mac;

/// IPv4 ethertype.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// ARP ethertype.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// IPv6 ethertype.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    Short(usize),
    #[error("frame of {0} bytes is longer than {MAX_FRAME}")]
    Long(usize),
    #[error("frame from a group address {0}")]
    GroupSource(Mac),
}

/// The parts of a frame the switch decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub dst: Mac,
    pub src: Mac,
    /// The ethertype after any 802.1Q tag.
    pub ethertype: u16,
    /// Offset of the payload.
    pub payload: usize,
}

/// Parses a frame's header; malformed frames are refused (and counted by
/// the caller), never trusted.
pub fn parse(frame: &[u8]) -> Result<Header, FrameError> {
    if frame.len() < MIN_FRAME {
        return Err(FrameError::Short(frame.len()));
    }
    if frame.len() > MAX_FRAME {
        return Err(FrameError::Long(frame.len()));
    }
    let mac = |at: usize| Mac(frame[at..at + 6].try_into().expect("6 bytes inside the checked length"));
    let (dst, src) = (mac(0), mac(6));
    if src.is_multicast() {
        return Err(FrameError::GroupSource(src));
    }
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let mut payload = 14;
    if ethertype == 0x8100 {
        if frame.len() < 18 {
            return Err(FrameError::Short(frame.len()));
        }
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        payload = 18;
    }
    Ok(Header { dst, src, ethertype, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, len: usize) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.resize(len.max(14), 0);
        f
    }

    #[test]
    fn parses_plain_and_tagged_frames() {
        let f = frame([0xff; 6], [2, 0, 0, 0, 0, 1], 0x0800, 60);
        let h = parse(&f).expect("valid");
        assert_eq!(
            (h.dst, h.src, h.ethertype, h.payload),
            (Mac::BROADCAST, Mac([2, 0, 0, 0, 0, 1]), 0x0800, 14)
        );
        let mut t = frame([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], 0x8100, 64);
        t[16..18].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse(&t).expect("tagged").ethertype, 0x0806);
        assert_eq!(parse(&t[..16]), Err(FrameError::Short(16)));
    }

    #[test]
    fn malformed_frames_are_refused() {
        assert_eq!(parse(&[0; 13]), Err(FrameError::Short(13)));
        assert_eq!(parse(&vec![0; MAX_FRAME + 1]), Err(FrameError::Long(MAX_FRAME + 1)));
        let f = frame([2; 6], [1, 0, 0, 0, 0, 1], 0x0800, 60);
        assert!(matches!(parse(&f), Err(FrameError::GroupSource(_))));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = parse(&bytes);
        }
    }
}
