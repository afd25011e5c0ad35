//! [`MessageBuilder`]: a message from a [`Header`] and options, kept within
//! the size every client accepts and padded to the BOOTP minimum. Servers'
//! replies, the node's requests and the PXE proxy's offers are all built
//! here.

use crate::codes::{OPT_END, OPT_PAD};
use crate::header::Header;

/// The largest message built: the 576-byte IP datagram every DHCP client
/// must accept (RFC 2131 section 2), less the IP and UDP headers.
pub const MAX_MESSAGE: usize = 576 - 20 - 8;
/// The smallest message built: the fixed size of a BOOTP message, which old
/// clients and relay agents expect (RFC 1542).
pub const MIN_MESSAGE: usize = 300;

/// A message being built: the header, then options in the order pushed.
#[derive(Debug)]
pub struct MessageBuilder {
    buf: Vec<u8>,
}

impl MessageBuilder {
    /// Starts a message with `header`.
    pub fn new(header: &Header) -> Self {
        let mut buf = Vec::with_capacity(MAX_MESSAGE);
        header.write(&mut buf);
        Self { buf }
    }

    /// Value bytes one more option can carry: what [`MAX_MESSAGE`] leaves
    /// after the option's code and length and the end option, and at most
    /// the 255 a length byte can say.
    pub fn room(&self) -> usize {
        MAX_MESSAGE.saturating_sub(self.buf.len() + 2 + 1).min(usize::from(u8::MAX))
    }

    /// Appends option `code` with `value` if it fits in [`Self::room`], and
    /// says whether it did. An option that does not fit is left out, so that
    /// a message carries what fits rather than nothing; callers that cannot
    /// do without an option push it first.
    pub fn push(&mut self, code: u8, value: &[u8]) -> bool {
        if value.len() > self.room() {
            return false;
        }
        let Ok(len) = u8::try_from(value.len()) else { return false };
        self.buf.extend_from_slice(&[code, len]);
        self.buf.extend_from_slice(value);
        true
    }

    /// The message: the options closed by the end option, padded to
    /// [`MIN_MESSAGE`].
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.push(OPT_END);
        if self.buf.len() < MIN_MESSAGE {
            self.buf.resize(MIN_MESSAGE, OPT_PAD);
        }
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codes::{BOOTREQUEST, OPT_DNS, OPT_HOSTNAME, OPT_MESSAGE_TYPE, OPT_OVERLOAD};
    use crate::header::OPTIONS_AT;
    use crate::options::Options;

    fn builder() -> MessageBuilder {
        MessageBuilder::new(&Header::new(BOOTREQUEST, 0x1234, [2, 0, 0, 0, 0, 1]))
    }

    #[test]
    fn a_message_reads_back() {
        let mut b = builder();
        assert!(b.push(OPT_MESSAGE_TYPE, &[1]));
        assert!(b.push(OPT_HOSTNAME, b"n1"));
        assert!(b.push(200, &[]));
        let m = b.finish();
        assert_eq!(m.len(), MIN_MESSAGE);
        assert_eq!(m[OPTIONS_AT..OPTIONS_AT + 10], [53, 1, 1, 12, 2, b'n', b'1', 200, 0, OPT_END]);
        assert!(m[OPTIONS_AT + 10..].iter().all(|&b| b == OPT_PAD));
        assert_eq!(Header::parse(&m).unwrap().xid, 0x1234);
        let o = Options::parse(&m).unwrap();
        assert_eq!(o.iter().collect::<Vec<_>>(), [(53, &[1][..]), (12, &b"n1"[..]), (200, &[][..])]);
    }

    #[test]
    fn options_that_do_not_fit_are_left_out() {
        let mut b = builder();
        assert_eq!(b.room(), 255);
        assert!(!b.push(OPT_DNS, &[0; 256]), "longer than a length byte says");
        assert!(b.push(OPT_DNS, &[1; 255]));
        // 240 + 257 taken: 548 - 497 - 3 = 48 bytes left for one more value.
        assert_eq!(b.room(), 48);
        assert!(!b.push(OPT_HOSTNAME, &[b'h'; 49]));
        assert!(b.push(OPT_HOSTNAME, &[b'h'; 48]));
        assert_eq!(b.room(), 0);
        assert!(!b.push(OPT_MESSAGE_TYPE, &[1]));
        let m = b.finish();
        assert_eq!(m.len(), MAX_MESSAGE);
        assert_eq!(m.last(), Some(&OPT_END));
    }

    proptest! {
        // Option 52 is left out: pushed by hand, it would send readers into
        // the empty `file` and `sname` fields.
        #[test]
        fn any_options_make_a_message_within_bounds(
            options in proptest::collection::vec(
                ((1u8..255).prop_filter("no overload", |c| *c != OPT_OVERLOAD), proptest::collection::vec(any::<u8>(), 0..300)),
                0..8,
            ),
        ) {
            let mut b = builder();
            let mut kept = Vec::new();
            for (code, value) in &options {
                if b.push(*code, value) {
                    kept.push((*code, &value[..]));
                }
            }
            let m = b.finish();
            prop_assert!((MIN_MESSAGE..=MAX_MESSAGE).contains(&m.len()));
            let read = Options::parse(&m).unwrap();
            prop_assert_eq!(read.iter().collect::<Vec<_>>(), kept);
        }
    }
}
