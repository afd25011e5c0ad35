//! [`Header`]: the fixed part of a BOOTP/DHCP message (RFC 2131 section 2,
//! figure 1) and the magic cookie that follows it, 240 bytes in all.

use std::net::Ipv4Addr;

use crate::codes::{BOOTREPLY, BROADCAST_FLAG, HLEN_ETHERNET, HTYPE_ETHERNET};

/// The magic cookie that opens the options area of a DHCP message (RFC 2131
/// section 3); a BOOTP message without it has vendor extensions instead.
pub const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Offset of `sname`, the server host name.
pub const SNAME_AT: usize = 44;
/// Size of `sname`.
pub const SNAME_LEN: usize = 64;
/// Offset of `file`, the boot file name.
pub const FILE_AT: usize = SNAME_AT + SNAME_LEN;
/// Size of `file`.
pub const FILE_LEN: usize = 128;
/// Offset of the magic cookie, right after the fixed BOOTP header.
pub const MAGIC_AT: usize = FILE_AT + FILE_LEN;
/// Offset of the options area, and the least a DHCP message can be.
pub const OPTIONS_AT: usize = MAGIC_AT + MAGIC.len();

/// Why a header could not be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The message ends before its options area begins.
    #[error("BOOTP message of {0} bytes is shorter than the 240 of a DHCP message")]
    Truncated(usize),
    /// A boot file name longer than the `file` field holds.
    #[error("boot file name of {len} bytes does not fit the file field: at most 127 with its NUL")]
    FileNameTooLong {
        /// The name's length.
        len: usize,
    },
}

/// The fixed header of a message and its cookie, field by field as they sit
/// on the wire. Reading checks only that the bytes are there: whether the op,
/// hardware type or cookie are acceptable is the reader's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// [`BOOTREQUEST`](crate::BOOTREQUEST) or [`BOOTREPLY`].
    pub op: u8,
    /// Hardware type, [`HTYPE_ETHERNET`] for Ethernet.
    pub htype: u8,
    /// Hardware address length, [`HLEN_ETHERNET`] for Ethernet.
    pub hlen: u8,
    /// Relay agents the message passed.
    pub hops: u8,
    /// Transaction id, chosen by the client and echoed by servers.
    pub xid: u32,
    /// Seconds since the client began acquiring or renewing.
    pub secs: u16,
    /// [`BROADCAST_FLAG`] or nothing.
    pub flags: u16,
    /// The client's address, when it has one.
    pub ciaddr: Ipv4Addr,
    /// The address a server gives the client.
    pub yiaddr: Ipv4Addr,
    /// The next server of the boot (TFTP), given by a server.
    pub siaddr: Ipv4Addr,
    /// The relay agent that forwarded the request.
    pub giaddr: Ipv4Addr,
    /// Client hardware address: a MAC and ten zero bytes on Ethernet.
    pub chaddr: [u8; 16],
    /// Server host name, NUL terminated, or options (option 52).
    pub sname: [u8; SNAME_LEN],
    /// Boot file name, NUL terminated, or options (option 52).
    pub file: [u8; FILE_LEN],
    /// [`MAGIC`] in a DHCP message.
    pub cookie: [u8; 4],
}

impl Header {
    /// A DHCP header from an Ethernet host `mac`: every field not named is
    /// zero, the cookie is [`MAGIC`].
    pub fn new(op: u8, xid: u32, mac: [u8; 6]) -> Self {
        let mut chaddr = [0; 16];
        for (to, from) in chaddr.iter_mut().zip(mac) {
            *to = from;
        }
        Header {
            op,
            htype: HTYPE_ETHERNET,
            hlen: HLEN_ETHERNET,
            hops: 0,
            xid,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            sname: [0; SNAME_LEN],
            file: [0; FILE_LEN],
            cookie: MAGIC,
        }
    }

    /// The header of a server's reply to `request`, with what RFC 2131
    /// table 3 has a reply echo (hardware type and address, `xid`, `flags`,
    /// `giaddr`); `ciaddr`, `yiaddr`, `siaddr`, `sname` and `file` start out
    /// empty for the server to fill.
    pub fn reply_to(request: &Header) -> Self {
        Header {
            op: BOOTREPLY,
            htype: request.htype,
            hlen: request.hlen,
            hops: 0,
            xid: request.xid,
            secs: 0,
            flags: request.flags,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: request.giaddr,
            chaddr: request.chaddr,
            sname: [0; SNAME_LEN],
            file: [0; FILE_LEN],
            cookie: MAGIC,
        }
    }

    /// Reads the first 240 bytes of `message`; the options that follow are
    /// [`Options::parse`](crate::Options::parse)'s.
    pub fn parse(message: &[u8]) -> Result<Self, HeaderError> {
        read(message).ok_or(HeaderError::Truncated(message.len()))
    }

    /// Appends the 240 bytes of this header to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.op, self.htype, self.hlen, self.hops]);
        out.extend_from_slice(&self.xid.to_be_bytes());
        out.extend_from_slice(&self.secs.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        for a in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            out.extend_from_slice(&a.octets());
        }
        out.extend_from_slice(&self.chaddr);
        out.extend_from_slice(&self.sname);
        out.extend_from_slice(&self.file);
        out.extend_from_slice(&self.cookie);
    }

    /// The first six bytes of `chaddr`: the client's MAC on Ethernet.
    pub fn mac(&self) -> [u8; 6] {
        let [a, b, c, d, e, f, ..] = self.chaddr;
        [a, b, c, d, e, f]
    }

    /// True for Ethernet (hardware type 1, six-byte addresses).
    pub fn is_ethernet(&self) -> bool {
        self.htype == HTYPE_ETHERNET && self.hlen == HLEN_ETHERNET
    }

    /// True when the cookie says DHCP rather than plain BOOTP.
    pub fn is_dhcp(&self) -> bool {
        self.cookie == MAGIC
    }

    /// True when the client asked for a broadcast reply.
    pub fn wants_broadcast(&self) -> bool {
        self.flags & BROADCAST_FLAG != 0
    }

    /// The boot file name: `file` up to its first NUL.
    pub fn file_name(&self) -> &[u8] {
        self.file.split(|&b| b == 0).next().unwrap_or_default()
    }

    /// Sets the boot file name; the rest of `file` is zeroed, so the name
    /// keeps the NUL readers look for.
    pub fn set_file_name(&mut self, name: &[u8]) -> Result<(), HeaderError> {
        if name.len() >= FILE_LEN {
            return Err(HeaderError::FileNameTooLong { len: name.len() });
        }
        self.file = [0; FILE_LEN];
        for (to, from) in self.file.iter_mut().zip(name) {
            *to = *from;
        }
        Ok(())
    }
}

/// The header at the start of `b`, or `None` when `b` is too short.
fn read(mut b: &[u8]) -> Option<Header> {
    let [op, htype, hlen, hops] = take(&mut b)?;
    // Fields are read in wire order: struct fields evaluate as written.
    Some(Header {
        op,
        htype,
        hlen,
        hops,
        xid: u32::from_be_bytes(take(&mut b)?),
        secs: u16::from_be_bytes(take(&mut b)?),
        flags: u16::from_be_bytes(take(&mut b)?),
        ciaddr: Ipv4Addr::from(take::<4>(&mut b)?),
        yiaddr: Ipv4Addr::from(take::<4>(&mut b)?),
        siaddr: Ipv4Addr::from(take::<4>(&mut b)?),
        giaddr: Ipv4Addr::from(take::<4>(&mut b)?),
        chaddr: take(&mut b)?,
        sname: take(&mut b)?,
        file: take(&mut b)?,
        cookie: take(&mut b)?,
    })
}

/// Splits the first `N` bytes off `b`.
fn take<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = b.split_first_chunk::<N>()?;
    *b = rest;
    Some(*head)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codes::BOOTREQUEST;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    #[test]
    fn fields_sit_where_rfc_2131_puts_them() {
        let mut h = Header::new(BOOTREQUEST, 0x0102_0304, MAC);
        h.hops = 3;
        h.secs = 0x0506;
        h.flags = BROADCAST_FLAG;
        h.ciaddr = Ipv4Addr::new(10, 0, 0, 1);
        h.yiaddr = Ipv4Addr::new(10, 0, 0, 2);
        h.siaddr = Ipv4Addr::new(10, 0, 0, 3);
        h.giaddr = Ipv4Addr::new(10, 0, 0, 4);
        h.sname[0] = b's';
        h.set_file_name(b"boot").unwrap();
        let mut b = Vec::new();
        h.write(&mut b);
        assert_eq!(b.len(), OPTIONS_AT);
        assert_eq!(b[..12], [1, 1, 6, 3, 1, 2, 3, 4, 5, 6, 0x80, 0]);
        assert_eq!(b[12..28], [10, 0, 0, 1, 10, 0, 0, 2, 10, 0, 0, 3, 10, 0, 0, 4]);
        assert_eq!(b[28..34], MAC);
        assert_eq!(b[34..SNAME_AT], [0; 10]);
        assert_eq!(b[SNAME_AT], b's');
        assert_eq!(b[FILE_AT..FILE_AT + 5], *b"boot\0");
        assert_eq!(b[MAGIC_AT..], MAGIC);
        assert_eq!(Header::parse(&b), Ok(h.clone()));
        assert!(h.is_ethernet() && h.is_dhcp() && h.wants_broadcast());
        assert_eq!(h.mac(), MAC);
    }

    #[test]
    fn short_messages_are_refused_with_their_length() {
        let mut b = Vec::new();
        Header::new(BOOTREQUEST, 1, MAC).write(&mut b);
        for n in [0, 1, MAGIC_AT, OPTIONS_AT - 1] {
            assert_eq!(Header::parse(&b[..n]), Err(HeaderError::Truncated(n)));
        }
        b.extend_from_slice(&[0xff; 60]);
        assert!(Header::parse(&b).is_ok(), "options after the header are not its business");
    }

    #[test]
    fn a_reply_echoes_what_rfc_2131_table_3_says() {
        let mut req = Header::new(BOOTREQUEST, 7, MAC);
        req.hops = 1;
        req.secs = 9;
        req.flags = BROADCAST_FLAG;
        req.ciaddr = Ipv4Addr::new(10, 0, 0, 5);
        req.giaddr = Ipv4Addr::new(10, 1, 0, 1);
        req.set_file_name(b"x").unwrap();
        let r = Header::reply_to(&req);
        assert_eq!(
            (r.op, r.xid, r.flags, r.giaddr, r.chaddr),
            (BOOTREPLY, 7, BROADCAST_FLAG, req.giaddr, req.chaddr)
        );
        assert_eq!((r.hops, r.secs, r.ciaddr), (0, 0, Ipv4Addr::UNSPECIFIED));
        assert_eq!(r.file_name(), b"");
        assert!(r.is_dhcp() && r.is_ethernet());
    }

    #[test]
    fn file_names_keep_their_nul() {
        let mut h = Header::new(BOOTREPLY, 1, MAC);
        assert_eq!(h.file_name(), b"");
        h.set_file_name(&[b'f'; FILE_LEN - 1]).unwrap();
        assert_eq!(h.file_name(), &[b'f'; FILE_LEN - 1][..]);
        assert_eq!(h.set_file_name(&[b'f'; FILE_LEN]), Err(HeaderError::FileNameTooLong { len: FILE_LEN }));
        h.set_file_name(b"short").unwrap();
        assert_eq!(h.file_name(), b"short");
        assert!(h.file[5..].iter().all(|&b| b == 0), "a shorter name clears the longer one");
        // A field another sender filled to the brim reads whole.
        h.file = [b'g'; FILE_LEN];
        assert_eq!(h.file_name().len(), FILE_LEN);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            match Header::parse(&bytes) {
                Ok(h) => {
                    let mut again = Vec::new();
                    h.write(&mut again);
                    prop_assert_eq!(&again[..], &bytes[..OPTIONS_AT]);
                    let _ = (h.mac(), h.file_name());
                }
                Err(e) => prop_assert_eq!(e, HeaderError::Truncated(bytes.len())),
            }
        }
    }
}
