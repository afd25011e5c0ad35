//! The options of a message (RFC 2132 section 2): code, length and value
//! triples, with pad (0) and end (255) a single byte each. [`split_options`]
//! walks one area; [`Options`] reads every area a message has: the options
//! field, then `file` and `sname` when option 52 lends them (RFC 2131
//! section 4.1).

use std::net::Ipv4Addr;

use crate::codes::{OPT_END, OPT_MESSAGE_TYPE, OPT_OVERLOAD, OPT_PAD};
use crate::header::{FILE_AT, MAGIC_AT, OPTIONS_AT, SNAME_AT};

/// Bit of option 52: the `file` field holds options.
pub const OVERLOAD_FILE: u8 = 1;
/// Bit of option 52: the `sname` field holds options.
pub const OVERLOAD_SNAME: u8 = 2;

/// Why the options of a message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// An option's length byte, or the value it announces, is not all there.
    #[error("option {code} runs past the end of its field")]
    Overrun {
        /// The option cut short.
        code: u8,
    },
    /// An option's value has a length its type does not allow.
    #[error("option {code} is {len} bytes long, expected {expected}")]
    Length {
        /// The option.
        code: u8,
        /// Its length on the wire.
        len: usize,
        /// What the option's type allows, in words.
        expected: &'static str,
    },
    /// Option 52 names fields that do not exist.
    #[error("option overload (52) value {0} is not 1, 2 or 3")]
    Overload(u8),
}

/// Splits an options area into (code, value) pairs, appended to `out`: pads
/// are skipped, the end option or the end of the area stops. An option whose
/// length byte or value runs past the area is refused with its code.
pub fn split_options<'a>(mut area: &'a [u8], out: &mut Vec<(u8, &'a [u8])>) -> Result<(), OptionError> {
    loop {
        match area {
            [] | [OPT_END, ..] => return Ok(()),
            [OPT_PAD, rest @ ..] => area = rest,
            [code, len, rest @ ..] => {
                let Some((value, rest)) = rest.split_at_checked(usize::from(*len)) else {
                    return Err(OptionError::Overrun { code: *code });
                };
                out.push((*code, value));
                area = rest;
            }
            [code] => return Err(OptionError::Overrun { code: *code }),
        }
    }
}

/// Every option of one message, in the order read (pad and end left out),
/// borrowing their values from the message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options<'a>(Vec<(u8, &'a [u8])>);

impl<'a> Options<'a> {
    /// Reads the options of `message`, a whole message with its header: the
    /// options field, then the `file` and `sname` fields when option 52 says
    /// they hold options. A message too short to have an options field has
    /// none.
    pub fn parse(message: &'a [u8]) -> Result<Self, OptionError> {
        let mut list = Vec::new();
        split_options(message.get(OPTIONS_AT..).unwrap_or_default(), &mut list)?;
        let overload = list.iter().find(|(c, _)| *c == OPT_OVERLOAD).map(|&(_, v)| v);
        match overload {
            None => {}
            Some(&[v @ 1..=3]) => {
                // The order RFC 2131 section 4.1 gives: options, file, sname.
                if v & OVERLOAD_FILE != 0 {
                    split_options(message.get(FILE_AT..MAGIC_AT).unwrap_or_default(), &mut list)?;
                }
                if v & OVERLOAD_SNAME != 0 {
                    split_options(message.get(SNAME_AT..FILE_AT).unwrap_or_default(), &mut list)?;
                }
            }
            Some(&[v]) => return Err(OptionError::Overload(v)),
            Some(v) => return Err(OptionError::Length { code: OPT_OVERLOAD, len: v.len(), expected: "1" }),
        }
        Ok(Options(list))
    }

    /// The first instance of option `code`.
    pub fn get(&self, code: u8) -> Option<&'a [u8]> {
        self.0.iter().find(|(c, _)| *c == code).map(|&(_, v)| v)
    }

    /// Every option, in the order read.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &'a [u8])> + '_ {
        self.0.iter().copied()
    }

    /// Option 53, the DHCP message type; `None` in a plain BOOTP message.
    pub fn message_type(&self) -> Result<Option<u8>, OptionError> {
        match self.get(OPT_MESSAGE_TYPE) {
            None => Ok(None),
            Some(&[ty]) => Ok(Some(ty)),
            Some(v) => Err(OptionError::Length { code: OPT_MESSAGE_TYPE, len: v.len(), expected: "1" }),
        }
    }

    /// Option `code` holding one address.
    pub fn address(&self, code: u8) -> Result<Option<Ipv4Addr>, OptionError> {
        match self.get(code) {
            None => Ok(None),
            Some(&[a, b, c, d]) => Ok(Some(Ipv4Addr::new(a, b, c, d))),
            Some(v) => Err(OptionError::Length { code, len: v.len(), expected: "4" }),
        }
    }

    /// Option `code` holding a list of addresses, in the order sent; empty
    /// when the option is absent.
    pub fn addresses(&self, code: u8) -> Result<Vec<Ipv4Addr>, OptionError> {
        match self.get(code) {
            None => Ok(Vec::new()),
            Some(v) if !v.is_empty() && v.len() % 4 == 0 => {
                Ok(v.chunks_exact(4).map(|a| Ipv4Addr::new(a[0], a[1], a[2], a[3])).collect())
            }
            Some(v) => Err(OptionError::Length { code, len: v.len(), expected: "a non-zero multiple of 4" }),
        }
    }

    /// Option `code` holding a 32-bit number, such as a time in seconds.
    pub fn u32(&self, code: u8) -> Result<Option<u32>, OptionError> {
        match self.get(code) {
            None => Ok(None),
            Some(&[a, b, c, d]) => Ok(Some(u32::from_be_bytes([a, b, c, d]))),
            Some(v) => Err(OptionError::Length { code, len: v.len(), expected: "4" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codes::{OPT_DNS, OPT_HOSTNAME, OPT_LEASE_TIME, OPT_ROUTER, OPT_SERVER_ID, OPT_VENDOR_CLASS};
    use crate::header::MAGIC;

    fn split(area: &[u8]) -> Result<Vec<(u8, &[u8])>, OptionError> {
        let mut out = Vec::new();
        split_options(area, &mut out).map(|()| out)
    }

    /// A message with an empty header and `options` as its options field.
    fn message(options: &[u8]) -> Vec<u8> {
        let mut m = vec![0; MAGIC_AT];
        m.extend_from_slice(&MAGIC);
        m.extend_from_slice(options);
        m
    }

    #[test]
    fn pads_are_skipped_and_end_stops() {
        assert_eq!(split(&[]), Ok(vec![]));
        assert_eq!(
            split(&[OPT_PAD, OPT_PAD, 53, 1, 5, OPT_PAD, 12, 2, b'h', b'i', OPT_END, 1, 200]).unwrap(),
            [(53, &[5][..]), (12, &b"hi"[..])]
        );
        assert_eq!(split(&[OPT_END]), Ok(vec![]));
        // An empty value is a value.
        assert_eq!(split(&[77, 0]).unwrap(), [(77, &[][..])]);
    }

    #[test]
    fn a_missing_end_is_the_end_of_the_area() {
        assert_eq!(split(&[53, 1, 5]).unwrap(), [(53, &[5][..])]);
    }

    #[test]
    fn overruns_are_refused_with_their_code() {
        assert_eq!(split(&[53, 1, 5, 61]), Err(OptionError::Overrun { code: 61 }));
        assert_eq!(split(&[53, 1, 5, 61, 7, 1, 2]), Err(OptionError::Overrun { code: 61 }));
    }

    #[test]
    fn overloaded_fields_are_read_after_the_options_field() {
        let mut m = message(&[OPT_OVERLOAD, 1, 3, 53, 1, 1, OPT_END]);
        m[FILE_AT..FILE_AT + 4].copy_from_slice(&[60, 2, b'P', b'X']);
        m[FILE_AT + 4] = OPT_END;
        m[SNAME_AT..SNAME_AT + 3].copy_from_slice(&[12, 1, b'h']);
        let o = Options::parse(&m).unwrap();
        let codes: Vec<u8> = o.iter().map(|(c, _)| c).collect();
        assert_eq!(codes, [OPT_OVERLOAD, OPT_MESSAGE_TYPE, OPT_VENDOR_CLASS, OPT_HOSTNAME]);
        assert_eq!(o.get(OPT_VENDOR_CLASS), Some(&b"PX"[..]));

        // Only the fields option 52 names.
        m[MAGIC_AT + 6] = OVERLOAD_SNAME;
        let o = Options::parse(&m).unwrap();
        assert_eq!((o.get(OPT_VENDOR_CLASS), o.get(OPT_HOSTNAME)), (None, Some(&b"h"[..])));
        // Without option 52, the fields are names, not options.
        let mut plain = m.clone();
        plain[OPTIONS_AT..OPTIONS_AT + 3].fill(OPT_PAD);
        assert_eq!(Options::parse(&plain).unwrap().iter().count(), 1);
    }

    #[test]
    fn bad_overloads_are_refused() {
        let m = message(&[OPT_OVERLOAD, 1, 4]);
        assert_eq!(Options::parse(&m), Err(OptionError::Overload(4)));
        let m = message(&[OPT_OVERLOAD, 2, 1, 1]);
        assert_eq!(
            Options::parse(&m),
            Err(OptionError::Length { code: OPT_OVERLOAD, len: 2, expected: "1" })
        );
        let mut m = message(&[OPT_OVERLOAD, 1, 1]);
        m[FILE_AT] = OPT_DNS;
        m[FILE_AT + 1] = 200;
        assert_eq!(Options::parse(&m), Err(OptionError::Overrun { code: OPT_DNS }));
    }

    #[test]
    fn short_messages_have_no_options() {
        assert_eq!(Options::parse(&[1, 2, 3]), Ok(Options::default()));
        assert_eq!(Options::parse(&message(&[])), Ok(Options::default()));
    }

    #[test]
    fn typed_values_check_their_length() {
        let m = message(&[
            53, 1, 5, 54, 4, 10, 0, 0, 1, 3, 8, 10, 0, 0, 1, 10, 0, 0, 2, 51, 4, 0, 0, 0x0e, 0x10, 6, 3, 1,
            2, 3, 58, 2, 0, 1, 1, 0,
        ]);
        let o = Options::parse(&m).unwrap();
        assert_eq!(o.message_type(), Ok(Some(5)));
        assert_eq!(o.address(OPT_SERVER_ID), Ok(Some(Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!(o.addresses(OPT_ROUTER), Ok(vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]));
        assert_eq!(o.u32(OPT_LEASE_TIME), Ok(Some(3600)));
        assert_eq!(
            o.addresses(OPT_DNS),
            Err(OptionError::Length { code: OPT_DNS, len: 3, expected: "a non-zero multiple of 4" })
        );
        assert_eq!(
            o.address(OPT_ROUTER),
            Err(OptionError::Length { code: OPT_ROUTER, len: 8, expected: "4" })
        );
        assert_eq!(o.u32(58), Err(OptionError::Length { code: 58, len: 2, expected: "4" }));
        assert_eq!(
            o.addresses(1),
            Err(OptionError::Length { code: 1, len: 0, expected: "a non-zero multiple of 4" })
        );
        assert_eq!((o.address(50), o.u32(59), o.addresses(42)), (Ok(None), Ok(None), Ok(vec![])));
        let m = message(&[53, 2, 1, 1]);
        let two_types = Options::parse(&m).unwrap();
        assert_eq!(two_types.message_type(), Err(OptionError::Length { code: 53, len: 2, expected: "1" }));
        assert_eq!(Options::parse(&message(&[])).unwrap().message_type(), Ok(None));
    }

    #[test]
    fn the_first_instance_counts() {
        let m = message(&[53, 1, 1, 53, 1, 3]);
        let o = Options::parse(&m).unwrap();
        assert_eq!(o.message_type(), Ok(Some(1)));
        assert_eq!(o.iter().count(), 2);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            if let Ok(o) = Options::parse(&bytes) {
                for (code, value) in o.iter() {
                    prop_assert!(code != OPT_PAD && code != OPT_END);
                    // Every value lies inside the message.
                    let start = value.as_ptr() as usize - bytes.as_ptr() as usize;
                    prop_assert!(start + value.len() <= bytes.len());
                    let _ = (o.message_type(), o.address(code), o.addresses(code), o.u32(code));
                }
            }
        }

        #[test]
        fn arbitrary_option_areas_never_panic(
            area in proptest::collection::vec(any::<u8>(), 0..400),
            file in proptest::collection::vec(any::<u8>(), MAGIC_AT - SNAME_AT),
            overload in 0u8..5,
        ) {
            let mut m = message(&[OPT_OVERLOAD, 1, overload]);
            m[SNAME_AT..MAGIC_AT].copy_from_slice(&file);
            m.extend_from_slice(&area);
            if let Ok(o) = Options::parse(&m) {
                for (_, value) in o.iter() {
                    // Values from the overloaded fields lie inside the message too.
                    let start = value.as_ptr() as usize - m.as_ptr() as usize;
                    prop_assert!(start + value.len() <= m.len());
                }
            }
        }
    }
}
