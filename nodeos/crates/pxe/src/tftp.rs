//! A read-only TFTP server's protocol (RFC 1350) with option negotiation
//! (RFC 2347): block size (RFC 2348), transfer size and timeout (RFC 2349).
//!
//! Vendor PXE ROMs load their iPXE chainloader over TFTP; everything after
//! that goes over HTTP, so this server only needs to be correct, not fast.
//! The module is sans-IO: [`parse`] and the builders are the packet codec,
//! [`on_request`] decides what a datagram on the server port (69) starts, and
//! [`Transfer`] is one download's lock-step state machine. The server owns
//! the sockets: one for port 69 and one per transfer, bound to port 0 (the
//! transfer ID of RFC 1350).
//!
//! # Rules
//! - Only RRQs in octet mode ("netascii" and "mail" get error 0; PXE ROMs
//!   and iPXE ask for octet). WRQ gets error 2 (read-only server), an unknown
//!   file error 1. A leading '/' in the file name is ignored.
//! - Options: `blksize` 8..=65464 is granted but clamped to
//!   [`MAX_BLKSIZE`] so a DATA packet fits a 1500-byte MTU; `tsize` is
//!   answered with the file's size; `timeout` 1..=255 s sets the
//!   retransmission interval. Other options, and values out of range, are
//!   ignored. An OACK is sent only when some option was granted, and the
//!   transfer then waits for ACK 0 before DATA 1.
//! - Lock-step: one DATA in flight, sent again on timeout up to
//!   [`MAX_RETRIES`] times, then the transfer is given up. ACKs for any block
//!   other than the one in flight (duplicates) are ignored, never answered,
//!   so a delayed ACK cannot double the traffic (the Sorcerer's Apprentice
//!   syndrome, RFC 1123 section 4.2.3.1).
//! - Block numbers are 16 bits and wrap from 65535 to 0, so files of any
//!   size can be sent. The last block is shorter than the block size: an
//!   empty one follows a file whose size is a multiple of it.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;

use crate::bundle::Bundle;

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// Block size without the `blksize` option.
pub const DEFAULT_BLKSIZE: usize = 512;
/// The range RFC 2348 allows a client to ask for.
pub const MIN_BLKSIZE: u64 = 8;
pub const RFC_MAX_BLKSIZE: u64 = 65464;
/// The largest block we send: 1500 bytes of MTU less IPv4 (20), UDP (8)
/// and TFTP (4) headers.
pub const MAX_BLKSIZE: usize = 1468;
/// Retransmission interval without the `timeout` option.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Retransmissions of one packet before a transfer is given up.
pub const MAX_RETRIES: u8 = 5;
/// Transfers running at once; further RRQs are refused with "busy".
pub const MAX_TRANSFERS: usize = 64;

/// Error codes of RFC 1350 and RFC 2347.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    NotDefined = 0,
    FileNotFound = 1,
    AccessViolation = 2,
    DiskFull = 3,
    IllegalOperation = 4,
    UnknownTransferId = 5,
    FileExists = 6,
    NoSuchUser = 7,
    OptionRefused = 8,
}

/// Why a datagram is not a TFTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TftpError {
    #[error("TFTP packet of {0} bytes is shorter than its {1}-byte header")]
    Truncated(usize, usize),
    #[error("TFTP opcode {0} is not 1..=6")]
    Opcode(u16),
    #[error("the {0} of a request is not NUL-terminated")]
    Unterminated(&'static str),
    #[error("the {0} of a request is not UTF-8 text")]
    NotText(&'static str),
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub filename: &'a str,
    pub mode: &'a str,
    /// Option names and values in the order sent.
    pub options: Vec<(&'a str, &'a str)>,
}

/// A TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Rrq(Request<'a>),
    Wrq(Request<'a>),
    Data { block: u16, data: &'a [u8] },
    Ack { block: u16 },
    Error { code: u16, message: Cow<'a, str> },
    Oack(Vec<(&'a str, &'a str)>),
}

/// Parses one datagram.
pub fn parse(b: &[u8]) -> Result<Packet<'_>, TftpError> {
    let Some((&[hi, lo], rest)) = b.split_first_chunk::<2>() else {
        return Err(TftpError::Truncated(b.len(), 2));
    };
    let opcode = u16::from_be_bytes([hi, lo]);
    let block = || match rest {
        [hi, lo, ..] => Ok(u16::from_be_bytes([*hi, *lo])),
        _ => Err(TftpError::Truncated(b.len(), 4)),
    };
    match opcode {
        OP_RRQ => Ok(Packet::Rrq(parse_request(rest)?)),
        OP_WRQ => Ok(Packet::Wrq(parse_request(rest)?)),
        OP_DATA => Ok(Packet::Data { block: block()?, data: &rest[2..] }),
        OP_ACK => Ok(Packet::Ack { block: block()? }),
        OP_ERROR => {
            let code = block()?;
            let text = &rest[2..];
            let end = text.iter().position(|&c| c == 0).unwrap_or(text.len());
            Ok(Packet::Error { code, message: String::from_utf8_lossy(&text[..end]) })
        }
        OP_OACK => Ok(Packet::Oack(parse_options(rest))),
        _ => Err(TftpError::Opcode(opcode)),
    }
}

fn parse_request(b: &[u8]) -> Result<Request<'_>, TftpError> {
    let (filename, rest) = take_string(b, "file name")?;
    let (mode, rest) = take_string(rest, "mode")?;
    Ok(Request { filename, mode, options: parse_options(rest) })
}

/// Option pairs up to the first incomplete or non-text one: some clients
/// pad requests, and an option we cannot read is one we would ignore.
fn parse_options(mut b: &[u8]) -> Vec<(&str, &str)> {
    let mut options = Vec::new();
    while let Ok((name, rest)) = take_string(b, "option name") {
        let Ok((value, rest)) = take_string(rest, "option value") else { break };
        if name.is_empty() {
            break;
        }
        options.push((name, value));
        b = rest;
    }
    options
}

fn take_string<'a>(b: &'a [u8], what: &'static str) -> Result<(&'a str, &'a [u8]), TftpError> {
    let end = b.iter().position(|&c| c == 0).ok_or(TftpError::Unterminated(what))?;
    let s = std::str::from_utf8(&b[..end]).map_err(|_| TftpError::NotText(what))?;
    Ok((s, &b[end + 1..]))
}

pub fn data_packet(block: u16, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + data.len());
    p.extend_from_slice(&OP_DATA.to_be_bytes());
    p.extend_from_slice(&block.to_be_bytes());
    p.extend_from_slice(data);
    p
}

pub fn ack_packet(block: u16) -> Vec<u8> {
    let mut p = OP_ACK.to_be_bytes().to_vec();
    p.extend_from_slice(&block.to_be_bytes());
    p
}

pub fn error_packet(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut p = OP_ERROR.to_be_bytes().to_vec();
    p.extend_from_slice(&(code as u16).to_be_bytes());
    p.extend(message.bytes().filter(|&c| c != 0));
    p.push(0);
    p
}

pub fn oack_packet(options: &[(&'static str, String)]) -> Vec<u8> {
    let mut p = OP_OACK.to_be_bytes().to_vec();
    for (name, value) in options {
        p.extend_from_slice(name.as_bytes());
        p.push(0);
        p.extend_from_slice(value.as_bytes());
        p.push(0);
    }
    p
}

/// The transfer parameters agreed with a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: usize,
    pub timeout: Duration,
    /// The options granted, for the OACK; empty: no OACK.
    pub granted: Vec<(&'static str, String)>,
}

/// Grants what it can of a request's `options` for a file of `file_size`
/// bytes. The first instance of an option counts; names are
/// case-insensitive.
pub fn negotiate(options: &[(&str, &str)], file_size: u64) -> Negotiated {
    let mut n = Negotiated { blksize: DEFAULT_BLKSIZE, timeout: DEFAULT_TIMEOUT, granted: Vec::new() };
    let number = |v: &str| v.trim().parse::<u64>().ok();
    for &(name, value) in options {
        let name = name.to_ascii_lowercase();
        if n.granted.iter().any(|(granted, _)| *granted == name) {
            continue;
        }
        match name.as_str() {
            "blksize" => {
                if let Some(v) = number(value).filter(|v| (MIN_BLKSIZE..=RFC_MAX_BLKSIZE).contains(v)) {
                    n.blksize = usize::try_from(v).map_or(MAX_BLKSIZE, |v| v.min(MAX_BLKSIZE));
                    n.granted.push(("blksize", n.blksize.to_string()));
                }
            }
            "tsize" if number(value).is_some() => {
                n.granted.push(("tsize", file_size.to_string()));
            }
            "timeout" => {
                if let Some(v) = number(value).filter(|v| (1..=255).contains(v)) {
                    n.timeout = Duration::from_secs(v);
                    n.granted.push(("timeout", v.to_string()));
                }
            }
            _ => {}
        }
    }
    n
}

/// What a datagram on the server port asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    /// A download to start on a new socket.
    Start { name: String, data: Bytes, negotiated: Negotiated },
    /// A request refused with this ERROR packet.
    Refuse { reply: Vec<u8>, reason: Refusal },
    /// Not a request (a stray ACK, DATA, ERROR or OACK): no reply.
    Ignore,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Malformed(TftpError),
    Write,
    Mode(String),
    NotFound(String),
}

/// Decides what the datagram `msg` on the server port starts.
pub fn on_request(msg: &[u8], bundle: &Bundle) -> RequestOutcome {
    let refuse =
        |code, text: &str, reason| RequestOutcome::Refuse { reply: error_packet(code, text), reason };
    let req = match parse(msg) {
        Ok(Packet::Rrq(req)) => req,
        Ok(Packet::Wrq(_)) => return refuse(ErrorCode::AccessViolation, "read-only server", Refusal::Write),
        Ok(_) => return RequestOutcome::Ignore,
        Err(e @ TftpError::Opcode(_)) => {
            return refuse(ErrorCode::IllegalOperation, "unknown opcode", Refusal::Malformed(e));
        }
        Err(e) => return refuse(ErrorCode::IllegalOperation, "malformed request", Refusal::Malformed(e)),
    };
    if !req.mode.eq_ignore_ascii_case("octet") {
        let text = if req.mode.eq_ignore_ascii_case("netascii") {
            "netascii mode is not supported, use octet"
        } else {
            "only octet mode is supported"
        };
        return refuse(ErrorCode::NotDefined, text, Refusal::Mode(req.mode.chars().take(32).collect()));
    }
    let name = req.filename.trim_start_matches('/');
    let Some(data) = bundle.get(name) else {
        return refuse(
            ErrorCode::FileNotFound,
            "file not found",
            Refusal::NotFound(name.chars().take(128).collect()),
        );
    };
    let negotiated = negotiate(&req.options, data.len() as u64);
    RequestOutcome::Start { name: name.to_owned(), data: data.clone(), negotiated }
}

/// What a transfer does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send this packet (the next block, or a retransmission) and wait.
    Send(Vec<u8>),
    /// Nothing to send; keep waiting for the same deadline.
    Wait,
    /// The client acknowledged the last block.
    Done,
    /// The client ended the transfer with an ERROR packet.
    Aborted { code: u16, message: String },
    /// The client broke the protocol: send this ERROR and stop.
    Fail(Vec<u8>),
    /// Retransmitted [`MAX_RETRIES`] times without an answer.
    GiveUp,
}

/// One download's lock-step state machine.
pub struct Transfer {
    data: Bytes,
    blksize: usize,
    timeout: Duration,
    /// Index of the packet in flight: 0 is the OACK, n the n-th DATA block
    /// (its block number is n modulo 2^16).
    current: u64,
    /// Index of the last (short) block.
    last: u64,
    /// The packet in flight, for retransmission.
    in_flight: Vec<u8>,
    retries: u8,
    /// File bytes sent, retransmissions not counted.
    payload_sent: u64,
}

/// The position, not the file contents.
impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer")
            .field("len", &self.data.len())
            .field("blksize", &self.blksize)
            .field("current", &self.current)
            .field("last", &self.last)
            .field("retries", &self.retries)
            .finish()
    }
}

impl Transfer {
    /// A transfer of `data`, and its first packet: an OACK when options
    /// were granted, else DATA block 1.
    pub fn start(data: Bytes, negotiated: &Negotiated) -> (Self, Vec<u8>) {
        let blksize = negotiated.blksize.clamp(MIN_BLKSIZE as usize, MAX_BLKSIZE);
        let last = data.len() as u64 / blksize as u64 + 1;
        let mut t = Transfer {
            data,
            blksize,
            timeout: negotiated.timeout,
            current: 0,
            last,
            in_flight: Vec::new(),
            retries: 0,
            payload_sent: 0,
        };
        if negotiated.granted.is_empty() {
            t.advance();
        } else {
            t.in_flight = oack_packet(&negotiated.granted);
        }
        let first = t.in_flight.clone();
        (t, first)
    }

    /// The retransmission interval.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn blksize(&self) -> usize {
        self.blksize
    }

    pub fn payload_sent(&self) -> u64 {
        self.payload_sent
    }

    /// Moves to the next block and builds its DATA packet.
    fn advance(&mut self) {
        self.current += 1;
        self.retries = 0;
        let start = usize::try_from((self.current - 1) * self.blksize as u64).unwrap_or(usize::MAX);
        let start = start.min(self.data.len());
        let end = start.saturating_add(self.blksize).min(self.data.len());
        let chunk = &self.data[start..end];
        self.payload_sent += chunk.len() as u64;
        // Wraps from 65535 to 0 by design.
        self.in_flight = data_packet(self.current as u16, chunk);
    }

    /// Handles a datagram from the client.
    pub fn on_packet(&mut self, msg: &[u8]) -> Step {
        match parse(msg) {
            Ok(Packet::Ack { block }) if block == self.current as u16 => {
                if self.current == self.last {
                    Step::Done
                } else {
                    self.advance();
                    Step::Send(self.in_flight.clone())
                }
            }
            // A duplicate or stale ACK: the packet in flight stays the only
            // one, retransmitted by the timer alone.
            Ok(Packet::Ack { .. }) => Step::Wait,
            Ok(Packet::Error { code, message }) => Step::Aborted { code, message: message.into_owned() },
            Ok(Packet::Rrq(_)) => Step::Wait,
            Ok(_) | Err(_) => Step::Fail(error_packet(ErrorCode::IllegalOperation, "expected an ACK")),
        }
    }

    /// Handles the retransmission timer firing.
    pub fn on_timeout(&mut self) -> Step {
        if self.retries >= MAX_RETRIES {
            return Step::GiveUp;
        }
        self.retries += 1;
        Step::Send(self.in_flight.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rrq(name: &str, mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
        let mut p = OP_RRQ.to_be_bytes().to_vec();
        for s in [name, mode].into_iter().chain(options.iter().flat_map(|(n, v)| [*n, *v])) {
            p.extend_from_slice(s.as_bytes());
            p.push(0);
        }
        p
    }

    fn bundle(files: &[(&str, usize)]) -> Bundle {
        let mut b = Bundle::new();
        for (name, len) in files {
            let data: Vec<u8> = (0..*len).map(|i| (i % 251) as u8).collect();
            b.insert(name, Bytes::from(data)).unwrap();
        }
        b
    }

    fn start(msg: &[u8], b: &Bundle) -> (Transfer, Vec<u8>) {
        match on_request(msg, b) {
            RequestOutcome::Start { data, negotiated, .. } => Transfer::start(data, &negotiated),
            other => panic!("expected a transfer, got {other:?}"),
        }
    }

    fn refusal(msg: &[u8], b: &Bundle) -> (u16, String, Refusal) {
        match on_request(msg, b) {
            RequestOutcome::Refuse { reply, reason } => match parse(&reply).unwrap() {
                Packet::Error { code, message } => (code, message.into_owned(), reason),
                other => panic!("refusal is not an ERROR: {other:?}"),
            },
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Runs a transfer to the end with a perfect client; returns the file
    /// and the number of DATA packets.
    fn download(mut t: Transfer, first: Vec<u8>) -> (Vec<u8>, u64) {
        let mut got = Vec::new();
        let mut packets = 0;
        let mut p = first;
        loop {
            let ack = match parse(&p).unwrap() {
                Packet::Oack(_) => ack_packet(0),
                Packet::Data { block, data } => {
                    assert!(data.len() <= t.blksize());
                    got.extend_from_slice(data);
                    packets += 1;
                    ack_packet(block)
                }
                other => panic!("unexpected {other:?}"),
            };
            match t.on_packet(&ack) {
                Step::Send(next) => p = next,
                Step::Done => return (got, packets),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn codec_round_trips() {
        assert_eq!(parse(&ack_packet(7)).unwrap(), Packet::Ack { block: 7 });
        assert_eq!(parse(&data_packet(9, b"abc")).unwrap(), Packet::Data { block: 9, data: b"abc" });
        assert_eq!(
            parse(&error_packet(ErrorCode::FileNotFound, "nope")).unwrap(),
            Packet::Error { code: 1, message: "nope".into() }
        );
        assert_eq!(
            parse(&oack_packet(&[("blksize", "1468".into()), ("tsize", "10".into())])).unwrap(),
            Packet::Oack(vec![("blksize", "1468"), ("tsize", "10")])
        );
        assert_eq!(
            parse(&rrq("f", "octet", &[("blksize", "1428")])).unwrap(),
            Packet::Rrq(Request { filename: "f", mode: "octet", options: vec![("blksize", "1428")] })
        );
    }

    #[test]
    fn codec_rejects_garbage() {
        assert_eq!(parse(&[]), Err(TftpError::Truncated(0, 2)));
        assert_eq!(parse(&[0, 4, 1]), Err(TftpError::Truncated(3, 4)));
        assert_eq!(parse(&[0, 9, 0, 0]), Err(TftpError::Opcode(9)));
        assert_eq!(parse(&[0, 1, b'f']), Err(TftpError::Unterminated("file name")));
        assert_eq!(parse(&[0, 1, b'f', 0, b'o']), Err(TftpError::Unterminated("mode")));
        assert_eq!(parse(&[0, 1, 0xff, 0, b'o', 0]), Err(TftpError::NotText("file name")));
        // Trailing padding and half options are dropped, not fatal.
        let expected = Packet::Rrq(Request { filename: "f", mode: "octet", options: vec![("tsize", "0")] });
        let mut padded = rrq("f", "octet", &[("tsize", "0")]);
        padded.extend_from_slice(&[0, 0, 0]);
        assert_eq!(parse(&padded).unwrap(), expected);
        let mut half = rrq("f", "octet", &[("tsize", "0")]);
        half.extend_from_slice(b"blksize\0");
        assert_eq!(parse(&half).unwrap(), expected);
    }

    #[test]
    fn negotiation() {
        let n =
            negotiate(&[("BLKSIZE", "1428"), ("tsize", "0"), ("timeout", "3"), ("windowsize", "8")], 4242);
        assert_eq!(n.blksize, 1428);
        assert_eq!(n.timeout, Duration::from_secs(3));
        assert_eq!(
            n.granted,
            vec![("blksize", "1428".to_owned()), ("tsize", "4242".to_owned()), ("timeout", "3".to_owned())]
        );
        // Clamped to the MTU, not refused.
        assert_eq!(negotiate(&[("blksize", "65464")], 0).blksize, MAX_BLKSIZE);
        assert_eq!(negotiate(&[("blksize", "8")], 0).blksize, 8);
        // Out of range or unreadable: ignored.
        for (name, value) in [
            ("blksize", "7"),
            ("blksize", "65465"),
            ("blksize", "x"),
            ("timeout", "0"),
            ("timeout", "256"),
            ("tsize", "-1"),
        ] {
            let n = negotiate(&[(name, value)], 1);
            assert!(n.granted.is_empty(), "{name}={value}");
            assert_eq!((n.blksize, n.timeout), (DEFAULT_BLKSIZE, DEFAULT_TIMEOUT));
        }
        // First instance wins.
        assert_eq!(negotiate(&[("blksize", "1024"), ("blksize", "600")], 0).granted.len(), 1);
        assert_eq!(negotiate(&[("blksize", "1024"), ("blksize", "600")], 0).blksize, 1024);
    }

    #[test]
    fn requests_refused() {
        let b = bundle(&[("undionly.kpxe", 100)]);
        let mut wrq = rrq("undionly.kpxe", "octet", &[]);
        wrq[1] = OP_WRQ as u8;
        assert_eq!(refusal(&wrq, &b), (2, "read-only server".into(), Refusal::Write));
        assert_eq!(refusal(&rrq("missing", "octet", &[]), &b).0, 1);
        assert_eq!(refusal(&rrq("../etc/passwd", "octet", &[]), &b).0, 1);
        let (code, text, reason) = refusal(&rrq("undionly.kpxe", "netascii", &[]), &b);
        assert_eq!((code, reason), (0, Refusal::Mode("netascii".into())));
        assert!(text.contains("netascii"));
        assert_eq!(refusal(&rrq("undionly.kpxe", "mail", &[]), &b).0, 0);
        assert_eq!(refusal(&[0, 1, b'x'], &b).0, 4);
        assert_eq!(refusal(&[0, 42], &b).0, 4);
        assert_eq!(on_request(&ack_packet(1), &b), RequestOutcome::Ignore);
        assert_eq!(on_request(&error_packet(ErrorCode::NotDefined, "x"), &b), RequestOutcome::Ignore);
    }

    #[test]
    fn leading_slash_and_mode_case_are_accepted() {
        let b = bundle(&[("undionly.kpxe", 100)]);
        assert!(matches!(
            on_request(&rrq("/undionly.kpxe", "OCTET", &[]), &b),
            RequestOutcome::Start { ref name, .. } if name == "undionly.kpxe"
        ));
    }

    #[test]
    fn without_options_data_starts_at_once_in_512_byte_blocks() {
        let b = bundle(&[("f", 512 * 3 + 100)]);
        let (t, first) = start(&rrq("f", "octet", &[]), &b);
        assert_eq!(parse(&first).unwrap(), Packet::Data { block: 1, data: &b.get("f").unwrap()[..512] });
        let (got, packets) = download(t, first);
        assert_eq!(got, b.get("f").unwrap().as_ref());
        assert_eq!(packets, 4);
    }

    #[test]
    fn oack_then_ack_zero_then_data() {
        let b = bundle(&[("f", 3000)]);
        let (mut t, first) = start(&rrq("f", "octet", &[("blksize", "1428"), ("tsize", "0")]), &b);
        assert_eq!(parse(&first).unwrap(), Packet::Oack(vec![("blksize", "1428"), ("tsize", "3000")]));
        // Nothing moves until ACK 0.
        assert_eq!(t.on_packet(&ack_packet(1)), Step::Wait);
        match t.on_packet(&ack_packet(0)) {
            Step::Send(p) => {
                assert!(matches!(parse(&p).unwrap(), Packet::Data { block: 1, data } if data.len() == 1428))
            }
            other => panic!("{other:?}"),
        }
        let (t, first) = start(&rrq("f", "octet", &[("blksize", "1428"), ("tsize", "0")]), &b);
        let (got, packets) = download(t, first);
        assert_eq!(got.len(), 3000);
        assert_eq!(packets, 3);
    }

    #[test]
    fn unknown_options_only_means_no_oack() {
        let b = bundle(&[("f", 10)]);
        let (_, first) = start(&rrq("f", "octet", &[("windowsize", "4")]), &b);
        assert!(matches!(parse(&first).unwrap(), Packet::Data { block: 1, .. }));
    }

    #[test]
    fn last_block_is_short_even_when_empty() {
        for (len, blocks, last_len) in
            [(0, 1, 0), (1, 1, 1), (511, 1, 511), (512, 2, 0), (1024, 3, 0), (1025, 3, 1)]
        {
            let b = bundle(&[("f", len)]);
            let (mut t, mut p) = start(&rrq("f", "octet", &[]), &b);
            let mut sizes = Vec::new();
            loop {
                let Packet::Data { block, data } = parse(&p).unwrap() else { panic!() };
                sizes.push(data.len());
                match t.on_packet(&ack_packet(block)) {
                    Step::Send(next) => p = next,
                    Step::Done => break,
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(sizes.len(), blocks, "len {len}");
            assert_eq!(*sizes.last().unwrap(), last_len, "len {len}");
            assert!(sizes[..sizes.len() - 1].iter().all(|&s| s == 512));
            assert_eq!(t.payload_sent(), len as u64);
        }
    }

    #[test]
    fn block_numbers_roll_over() {
        // 70000 blocks of 8 bytes, plus an empty last one.
        let len = 8 * 70_000;
        let b = bundle(&[("big", len)]);
        let (mut t, mut p) = start(&rrq("big", "octet", &[("blksize", "8")]), &b);
        assert!(matches!(parse(&p).unwrap(), Packet::Oack(_)));
        let mut expect: u64 = 0;
        let mut got = Vec::with_capacity(len);
        loop {
            let ack = match parse(&p).unwrap() {
                Packet::Oack(_) => 0,
                Packet::Data { block, data } => {
                    assert_eq!(block, expect as u16);
                    got.extend_from_slice(data);
                    block
                }
                other => panic!("{other:?}"),
            };
            match t.on_packet(&ack_packet(ack)) {
                Step::Send(next) => {
                    expect += 1;
                    p = next
                }
                Step::Done => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(expect, 70_001);
        assert_eq!(got, b.get("big").unwrap().as_ref());
    }

    #[test]
    fn duplicate_acks_are_ignored() {
        let b = bundle(&[("f", 2000)]);
        let (mut t, _) = start(&rrq("f", "octet", &[]), &b);
        assert!(matches!(t.on_packet(&ack_packet(1)), Step::Send(_)));
        // The delayed duplicate of ACK 1 must not trigger a second DATA 2.
        assert_eq!(t.on_packet(&ack_packet(1)), Step::Wait);
        assert_eq!(t.on_packet(&ack_packet(0)), Step::Wait);
        assert_eq!(t.on_packet(&ack_packet(9)), Step::Wait);
        match t.on_packet(&ack_packet(2)) {
            Step::Send(p) => assert!(matches!(parse(&p).unwrap(), Packet::Data { block: 3, .. })),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retransmits_then_gives_up() {
        let b = bundle(&[("f", 2000)]);
        let (mut t, first) = start(&rrq("f", "octet", &[("timeout", "1")]), &b);
        assert_eq!(t.timeout(), Duration::from_secs(1));
        for _ in 0..MAX_RETRIES {
            assert_eq!(t.on_timeout(), Step::Send(first.clone()));
        }
        assert_eq!(t.on_timeout(), Step::GiveUp);
        // An answer resets the count.
        let (mut t, _) = start(&rrq("f", "octet", &[]), &b);
        for _ in 0..MAX_RETRIES {
            t.on_timeout();
        }
        let Step::Send(second) = t.on_packet(&ack_packet(1)) else { panic!() };
        assert_eq!(t.on_timeout(), Step::Send(second));
    }

    #[test]
    fn client_errors_and_violations() {
        let b = bundle(&[("f", 2000)]);
        let (mut t, _) = start(&rrq("f", "octet", &[("tsize", "0")]), &b);
        assert_eq!(
            t.on_packet(&error_packet(ErrorCode::OptionRefused, "no")),
            Step::Aborted { code: 8, message: "no".into() }
        );
        let (mut t, _) = start(&rrq("f", "octet", &[]), &b);
        assert!(matches!(t.on_packet(&data_packet(1, b"x")), Step::Fail(_)));
        let (mut t, _) = start(&rrq("f", "octet", &[]), &b);
        assert!(matches!(t.on_packet(&[0, 77]), Step::Fail(_)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&bytes);
            let b = bundle(&[("f", 1000)]);
            let _ = on_request(&bytes, &b);
            let (mut t, _) = start(&rrq("f", "octet", &[("blksize", "100")]), &b);
            let _ = t.on_packet(&bytes);
        }

        #[test]
        fn arbitrary_options_never_panic(
            options in proptest::collection::vec(("[a-zA-Z]{0,8}", "[0-9a-z-]{0,8}"), 0..6),
            len in 0usize..3000,
        ) {
            let options: Vec<(&str, &str)> = options.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let b = bundle(&[("f", len)]);
            let (t, first) = start(&rrq("f", "octet", &options), &b);
            let blksize = t.blksize();
            prop_assert!((8..=MAX_BLKSIZE).contains(&blksize));
            let (got, packets) = download(t, first);
            prop_assert_eq!(got.len(), len);
            prop_assert_eq!(packets as usize, len / blksize + 1);
        }
    }
}
