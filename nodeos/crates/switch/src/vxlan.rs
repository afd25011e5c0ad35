//! The VXLAN header (RFC 7348), as Linux's vxlan driver sends and accepts it:
//! 8 bytes before the inner Ethernet frame, carried in UDP (port 4789).
//!
//! ```text
//! |R|R|R|R|I|R|R|R|   reserved (24)   |   VNI (24)   | reserved (8) |
//! ```
//! The I flag must be set; every reserved bit must be zero on send, and is
//! ignored on receive except the flags byte (RFC 7348 §5).

/// IANA's VXLAN UDP port.
pub const VXLAN_PORT: u16 = 4789;
pub const HEADER_LEN: usize = 8;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Bytes VXLAN adds around an inner frame on IPv4: outer Ethernet 14 + IPv4 20
/// + UDP 8 + VXLAN 8. The MTU offered to VMs is the fabric's minus this.
pub const OVERHEAD_V4: u32 = 50;

const FLAG_I: u8 = 0x08;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VxlanError {
    #[error("datagram of {0} bytes is shorter than a VXLAN header and an Ethernet header")]
    Short(usize),
    #[error("VXLAN flags {0:#04x} do not have the I (valid VNI) flag")]
    NoVni(u8),
    #[error("VNI {0} is outside 1..={MAX_VNI}")]
    BadVni(u32),
}

/// Checks a VNI for a network (0 is reserved here: it means "none").
pub fn check_vni(vni: u32) -> Result<u32, VxlanError> {
    if (1..=MAX_VNI).contains(&vni) { Ok(vni) } else { Err(VxlanError::BadVni(vni)) }
}

/// The header for `vni`.
pub fn encode(vni: u32) -> Result<[u8; HEADER_LEN], VxlanError> {
    let vni = check_vni(vni)?;
    let v = vni.to_be_bytes();
    Ok([FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0])
}

/// Splits a received datagram into its VNI and inner frame.
pub fn decode(datagram: &[u8]) -> Result<(u32, &[u8]), VxlanError> {
    if datagram.len() < HEADER_LEN + crate::frame::MIN_FRAME {
        return Err(VxlanError::Short(datagram.len()));
    }
    if datagram[0] & FLAG_I == 0 {
        return Err(VxlanError::NoVni(datagram[0]));
    }
    let vni = u32::from_be_bytes([0, datagram[4], datagram[5], datagram[6]]);
    Ok((check_vni(vni)?, &datagram[HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_matches_rfc_7348_layout() {
        assert_eq!(encode(0x123456), Ok([0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]));
        let mut d = encode(42).expect("valid").to_vec();
        d.extend_from_slice(&[0xaa; 14]);
        let (vni, inner) = decode(&d).expect("decodes");
        assert_eq!((vni, inner.len()), (42, 14));
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(encode(0), Err(VxlanError::BadVni(0)));
        assert_eq!(encode(MAX_VNI + 1), Err(VxlanError::BadVni(MAX_VNI + 1)));
        assert_eq!(decode(&[0x08; 10]), Err(VxlanError::Short(10)));
        let mut d = vec![0u8; 22];
        assert_eq!(decode(&d), Err(VxlanError::NoVni(0)));
        d[0] = 0x08;
        assert_eq!(decode(&d), Err(VxlanError::BadVni(0)), "VNI 0 never belongs to a network");
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
            let _ = decode(&bytes);
        }
    }
}
