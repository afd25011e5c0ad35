//! NBD export of any [`BlockDevice`]: the fixed-newstyle network block device
//! protocol as specified in the NBD project's `doc/proto.md`, with simple
//! replies only (no structured replies, no metadata contexts, no TLS).
//!
//! # Layout
//! - Wire constants, limits, [`NbdError`], and the resolver contract
//!   ([`ExportResolver`], [`ExportInfo`], [`ExportError`]).
//! - Sans-IO negotiation: greeting, client flags, option headers and option
//!   data (`parse_option`), option-reply encoders.
//! - Sans-IO transmission: request headers (`parse_request`), the
//!   per-request decision (`plan`: run it, reject it and skip its payload,
//!   or reject it and close), simple replies, device error to NBD errno.
//! - IO: [`serve`] (accept loop), one task per connection (negotiation, then a
//!   request reader and a reply writer joined in that task), one task per
//!   command.
//!
//! # Negotiation
//! The server offers `FIXED_NEWSTYLE | NO_ZEROES`. It answers `NBD_OPT_GO`,
//! `NBD_OPT_INFO` (export size and flags, block sizes, the name if asked),
//! `NBD_OPT_LIST`, `NBD_OPT_ABORT` and the old `NBD_OPT_EXPORT_NAME`; every
//! other option, `NBD_OPT_STRUCTURED_REPLY` and `NBD_OPT_STARTTLS` included,
//! gets `NBD_REP_ERR_UNSUP`. Option data over [`MAX_OPTION_LEN`] is skipped
//! without being buffered and answered with `NBD_REP_ERR_TOO_BIG`. The whole
//! negotiation, resolver calls included, must finish within 60 seconds.
//!
//! Block sizes are always advertised (the protocol allows it unrequested):
//! minimum and preferred are the device's block size, the maximum is
//! [`MAX_PAYLOAD`]. qemu and libnbd honour the minimum (qemu does
//! read-modify-write for smaller guest I/O). A client that ignores it gets
//! `EINVAL` for misaligned requests rather than being refused at `NBD_OPT_GO`.
//!
//! # Transmission
//! Advertised flags: `HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM |
//! SEND_WRITE_ZEROES`, plus `READ_ONLY` for read-only devices. `CAN_MULTI_CONN`
//! is not advertised. Every request is checked before the device sees it, so a
//! bad request never changes data:
//! - unknown command, unknown or misplaced command flag, zero length,
//!   misaligned offset or length, a READ or WRITE over [`MAX_PAYLOAD`], a READ
//!   past the end: `EINVAL`;
//! - WRITE, TRIM or WRITE_ZEROES past the end: `ENOSPC`;
//! - any of those on a read-only export: `EPERM`;
//! - a device failure other than the above: `EIO`.
//!
//! A rejected WRITE's payload is read and discarded, so the connection
//! survives; a payload over 64 MiB is not worth reading (the stream is more
//! likely out of sync than holding a real request), so that request gets its
//! `EINVAL` and the connection is closed. A bad request magic closes the
//! connection. `NBD_CMD_FLUSH` ignores its reserved offset and length.
//!
//! # Concurrency
//! The reader parses requests and spawns each command as its own task, so
//! replies may leave out of order (as the protocol allows). A connection has
//! at most [`MAX_IN_FLIGHT`] commands and 64 MiB of payload (write data being
//! written, read data waiting to be sent) in flight; past that the reader stops
//! reading the socket, which pushes back on the client through TCP. One writer
//! sends replies, batching whatever is ready into one socket write.
//!
//! # Flush
//! `NBD_CMD_FLUSH` calls [`BlockDevice::flush`], which makes every *completed*
//! write durable. That is exactly what NBD asks: a flush covers the writes the
//! server has replied to before it received the flush. Writes still in flight
//! when the flush arrives may or may not be covered, as on any disk with a
//! volatile cache; clients that need them wait for their replies first. FUA on
//! WRITE is passed to the device; FUA on TRIM or WRITE_ZEROES is a flush after
//! the command.
//!
//! # Lifetime
//! The device returned by [`ExportResolver::open`] belongs to the connection.
//! When the client disconnects (`NBD_CMD_DISC`, EOF, or a protocol error) the
//! reader stops, every command in flight finishes and has its reply sent if
//! the socket still works, and then the device is dropped. It is never flushed
//! implicitly: NBD clients flush before they disconnect. On server shutdown,
//! connections stop reading new requests, drain the same way, and are aborted
//! if they have not finished within 30 seconds.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::device::{BlockDevice, DeviceError, check_range};

// ---------------------------------------------------------------------------
// Wire constants (all integers on the wire are big-endian).

/// "NBDMAGIC", first word of the greeting.
const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": second word of the greeting and the start of every option.
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1 << 0;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

const GREETING_LEN: usize = 18;
const OPTION_HEADER_LEN: usize = 16;
const REQUEST_LEN: usize = 28;
const SIMPLE_REPLY_LEN: usize = 16;
/// Reserved bytes after an `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES`.
const EXPORT_NAME_PADDING: usize = 124;

// ---------------------------------------------------------------------------
// Limits.

/// Largest READ or WRITE, advertised as the maximum block size. qemu never
/// sends more than 32 MiB per request either.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Commands one connection runs at once; more requests wait in the socket.
pub const MAX_IN_FLIGHT: usize = 64;
/// Largest option data buffered during negotiation.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Payload bytes one connection holds in flight, counted in [`BUDGET_UNIT`]s.
const IN_FLIGHT_BYTES: usize = 64 << 20;
const BUDGET_UNIT: u32 = 4096;
/// Largest unwanted payload (rejected WRITE, oversized option) read and
/// discarded to keep the connection; anything larger closes it.
const MAX_SKIP: u64 = 64 << 20;
/// Longest string (export name, error message) the protocol allows.
const MAX_STRING: usize = 4096;
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(60);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_BUFFER: usize = 256 << 10;
/// Pause after an accept error such as `EMFILE` before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const _: () = assert!(MAX_PAYLOAD as usize <= IN_FLIGHT_BYTES, "a maximal request must fit the budget");

// ---------------------------------------------------------------------------
// Errors and the resolver contract.

/// Why a connection ended abnormally (logged; the client just sees the
/// connection close).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("reading from the client")]
    Read(#[source] io::Error),
    #[error("writing to the client")]
    Write(#[source] io::Error),
    #[error("negotiation did not finish within {0:?}")]
    NegotiationTimeout(Duration),
    #[error("{what} needs {need} bytes, got {got}")]
    Truncated { what: &'static str, need: usize, got: usize },
    #[error("client flags {flags:#x} carry bits other than FIXED_NEWSTYLE and NO_ZEROES")]
    ClientFlags { flags: u32 },
    #[error("option magic {magic:#x} is not IHAVEOPT")]
    OptionMagic { magic: u64 },
    #[error("option {option} carries {len} bytes; at most {limit} are skipped")]
    OptionTooLong { option: u32, len: u32, limit: u64 },
    #[error("NBD_OPT_EXPORT_NAME carries an invalid name: {reason}")]
    ExportNameInvalid { reason: &'static str },
    #[error("NBD_OPT_EXPORT_NAME for {name:?} refused")]
    ExportNameRefused {
        name: String,
        #[source]
        source: ExportError,
    },
    #[error("request magic {magic:#x} is not {REQUEST_MAGIC:#x}")]
    RequestMagic { magic: u32 },
    #[error("write payload of {len} bytes is larger than the {limit} bytes skipped")]
    PayloadTooLong { len: u32, limit: u64 },
}

/// Why an export cannot be described or opened; the message is shown to the
/// client (truncated to 4096 bytes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// No such export, or not available right now: `NBD_REP_ERR_UNKNOWN`.
    #[error("export unavailable: {0}")]
    Unknown(String),
    /// The export exists but this client may not use it: `NBD_REP_ERR_POLICY`.
    #[error("export refused: {0}")]
    Refused(String),
}

/// What a client learns about an export before using it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Advertised as minimum and preferred block size: a power of two, at most
    /// 64 KiB.
    pub block_size: u32,
    pub read_only: bool,
}

impl ExportInfo {
    pub fn of<D: BlockDevice>(device: &D) -> Self {
        Self { size: device.size(), block_size: device.block_size(), read_only: device.read_only() }
    }

    /// The block size NBD can advertise: a power of two from 1 to 64 KiB.
    fn check(&self) -> Result<(), &'static str> {
        if self.block_size.is_power_of_two() && self.block_size <= 64 << 10 {
            Ok(())
        } else {
            Err("the export's block size is not a power of two of at most 64 KiB")
        }
    }

    fn transmission_flags(&self) -> u16 {
        let flags =
            TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        if self.read_only { flags | TFLAG_READ_ONLY } else { flags }
    }
}

/// Finds exports by name for the negotiation phase.
///
/// Contract:
/// - Methods are called concurrently from many connections, several times per
///   connection, and their futures may be dropped before completing (client
///   gone, the 60 s negotiation timeout, server shutdown): they must be
///   cancel-safe.
/// - `describe` answers `NBD_OPT_INFO`, a query: it must not disturb other
///   users of the export (for a volume: no new writer generation).
/// - `open` answers `NBD_OPT_GO` and `NBD_OPT_EXPORT_NAME` and may take
///   ownership (for a volume: a new writer generation that fences older
///   writers). The connection owns the device until the client disconnects
///   and every command in flight has finished; then it is dropped without an
///   implicit flush.
/// - The device's size is read once when the export is opened; a resize is
///   seen by clients only when they reconnect.
pub trait ExportResolver: Send + Sync + 'static {
    type Device: BlockDevice;

    /// Names for `NBD_OPT_LIST`.
    fn list(&self) -> impl Future<Output = Vec<String>> + Send;
    fn describe(&self, name: &str) -> impl Future<Output = Result<ExportInfo, ExportError>> + Send;
    fn open(&self, name: &str) -> impl Future<Output = Result<Self::Device, ExportError>> + Send;
}

// ---------------------------------------------------------------------------
// Sans-IO negotiation.

fn be_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(buf[at..at + 2].try_into().expect("slice of two bytes"))
}

fn be_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("slice of four bytes"))
}

fn be_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("slice of eight bytes"))
}

fn need(what: &'static str, buf: &[u8], need: usize) -> Result<(), NbdError> {
    if buf.len() < need { Err(NbdError::Truncated { what, need, got: buf.len() }) } else { Ok(()) }
}

/// The server's first message.
fn greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// What the client's flags commit the server to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClientFlags {
    /// Omit the 124 reserved bytes after an `NBD_OPT_EXPORT_NAME` reply.
    no_zeroes: bool,
}

/// The client's answer to the greeting. A client without `FIXED_NEWSTYLE`
/// is served the same way: it only ever sends `NBD_OPT_EXPORT_NAME`, which
/// behaves identically in both dialects.
fn parse_client_flags(buf: &[u8]) -> Result<ClientFlags, NbdError> {
    need("client flags", buf, 4)?;
    let flags = be_u32(buf, 0);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::ClientFlags { flags });
    }
    Ok(ClientFlags { no_zeroes: flags & FLAG_C_NO_ZEROES != 0 })
}

/// Option code and data length from an option header.
fn parse_option_header(buf: &[u8]) -> Result<(u32, u32), NbdError> {
    need("option header", buf, OPTION_HEADER_LEN)?;
    let magic = be_u64(buf, 0);
    if magic != IHAVEOPT {
        return Err(NbdError::OptionMagic { magic });
    }
    Ok((be_u32(buf, 8), be_u32(buf, 12)))
}

/// The export an `NBD_OPT_INFO` or `NBD_OPT_GO` is about.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExportQuery {
    name: String,
    /// Information types the client asked for (unknown ones are ignored).
    infos: Vec<u16>,
}

/// A client option, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ClientOption {
    ExportName(String),
    Abort,
    List,
    Info(ExportQuery),
    Go(ExportQuery),
    /// Unknown, or known and not offered: `NBD_REP_ERR_UNSUP`.
    Unsupported,
    /// A known option with malformed data: `NBD_REP_ERR_INVALID` (for
    /// `NBD_OPT_EXPORT_NAME`, which cannot fail politely, a closed connection).
    Invalid(&'static str),
}

fn parse_name(bytes: &[u8]) -> Result<String, &'static str> {
    if bytes.len() > MAX_STRING {
        return Err("export name longer than 4096 bytes");
    }
    if bytes.contains(&0) {
        return Err("export name contains NUL");
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| "export name is not UTF-8")
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data: name length (u32), name, number of info
/// requests (u16), that many info types (u16 each), nothing more.
fn parse_export_query(data: &[u8]) -> Result<ExportQuery, &'static str> {
    if data.len() < 4 {
        return Err("option data shorter than the name length field");
    }
    let name_len = be_u32(data, 0) as usize;
    let rest = &data[4..];
    if name_len > rest.len() {
        return Err("export name runs past the option data");
    }
    let name = parse_name(&rest[..name_len])?;
    let rest = &rest[name_len..];
    if rest.len() < 2 {
        return Err("option data ends before the information request count");
    }
    let count = usize::from(be_u16(rest, 0));
    let rest = &rest[2..];
    if rest.len() != count * 2 {
        return Err("information request count does not match the option length");
    }
    let infos = rest.chunks_exact(2).map(|c| be_u16(c, 0)).collect();
    Ok(ExportQuery { name, infos })
}

/// Decodes one option; never fails, malformed data becomes
/// [`ClientOption::Invalid`].
fn parse_option(option: u32, data: &[u8]) -> ClientOption {
    match option {
        OPT_EXPORT_NAME => match parse_name(data) {
            Ok(name) => ClientOption::ExportName(name),
            Err(reason) => ClientOption::Invalid(reason),
        },
        // Data on an abort is meaningless; the client is leaving either way.
        OPT_ABORT => ClientOption::Abort,
        OPT_LIST if data.is_empty() => ClientOption::List,
        OPT_LIST => ClientOption::Invalid("NBD_OPT_LIST carries no data"),
        OPT_INFO | OPT_GO => match parse_export_query(data) {
            Ok(query) if option == OPT_GO => ClientOption::Go(query),
            Ok(query) => ClientOption::Info(query),
            Err(reason) => ClientOption::Invalid(reason),
        },
        _ => ClientOption::Unsupported,
    }
}

/// One option reply: magic, option, reply type, length, data.
fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).expect("option replies are built from bounded strings and infos");
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Cuts a message to the protocol's string limit on a character boundary.
fn truncated_message(message: &str) -> &[u8] {
    let mut end = message.len().min(MAX_STRING);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message.as_bytes()[..end]
}

fn error_reply(option: u32, error: &ExportError) -> Vec<u8> {
    match error {
        ExportError::Unknown(m) => option_reply(option, REP_ERR_UNKNOWN, truncated_message(m)),
        ExportError::Refused(m) => option_reply(option, REP_ERR_POLICY, truncated_message(m)),
    }
}

/// `NBD_REP_SERVER` data for `NBD_OPT_LIST`: name length, name.
fn server_entry(name: &str) -> Vec<u8> {
    let name = truncated_message(name);
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&u32::try_from(name.len()).expect("at most 4096").to_be_bytes());
    out.extend_from_slice(name);
    out
}

/// The `NBD_REP_INFO` replies and final `NBD_REP_ACK` for an export query.
fn info_replies(option: u32, query: &ExportQuery, info: &ExportInfo) -> Vec<u8> {
    let mut export = Vec::with_capacity(12);
    export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    export.extend_from_slice(&info.size.to_be_bytes());
    export.extend_from_slice(&info.transmission_flags().to_be_bytes());
    let mut block = Vec::with_capacity(14);
    block.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    block.extend_from_slice(&info.block_size.to_be_bytes());
    block.extend_from_slice(&info.block_size.to_be_bytes());
    block.extend_from_slice(&max_block(info.block_size).to_be_bytes());

    let mut out = option_reply(option, REP_INFO, &export);
    out.extend(option_reply(option, REP_INFO, &block));
    if query.infos.contains(&INFO_NAME) {
        let mut name = INFO_NAME.to_be_bytes().to_vec();
        name.extend_from_slice(query.name.as_bytes());
        out.extend(option_reply(option, REP_INFO, &name));
    }
    out.extend(option_reply(option, REP_ACK, &[]));
    out
}

/// The advertised maximum block size: [`MAX_PAYLOAD`], which NBD requires to
/// be a multiple of the minimum (it is, for any power of two up to 64 KiB).
fn max_block(block_size: u32) -> u32 {
    MAX_PAYLOAD - MAX_PAYLOAD % block_size.max(1)
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and unless
/// the client set `NO_ZEROES` 124 reserved zero bytes.
fn export_name_reply(info: &ExportInfo, flags: ClientFlags) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    out.extend_from_slice(&info.size.to_be_bytes());
    out.extend_from_slice(&info.transmission_flags().to_be_bytes());
    if !flags.no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_PADDING]);
    }
    out
}

// ---------------------------------------------------------------------------
// Sans-IO transmission.

/// The errors NBD defines that this server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Errno {
    Perm = 1,
    Io = 5,
    Inval = 22,
    NoSpc = 28,
}

/// A request header as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Request {
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

fn parse_request(buf: &[u8]) -> Result<Request, NbdError> {
    need("request header", buf, REQUEST_LEN)?;
    let magic = be_u32(buf, 0);
    if magic != REQUEST_MAGIC {
        return Err(NbdError::RequestMagic { magic });
    }
    Ok(Request {
        flags: be_u16(buf, 4),
        kind: be_u16(buf, 6),
        handle: be_u64(buf, 8),
        offset: be_u64(buf, 16),
        len: be_u32(buf, 24),
    })
}

/// A valid command, ready for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// `len` payload bytes follow the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
}

impl Command {
    /// Bytes this command holds in memory while in flight.
    fn buffer_len(&self) -> u32 {
        match *self {
            Command::Read { len, .. } | Command::Write { len, .. } => len,
            Command::Flush | Command::Trim { .. } | Command::WriteZeroes { .. } => 0,
        }
    }
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Run(Command),
    /// Read and discard `skip` payload bytes, then reply with `errno`.
    Reject {
        errno: Errno,
        skip: u32,
    },
    /// Reply with `errno` and close: the payload is too large to skip.
    RejectAndClose {
        errno: Errno,
    },
    Disconnect,
}

/// Decides what a request asks for, checking everything the protocol and the
/// export's geometry require before the device is involved.
fn plan(req: &Request, export: &ExportInfo) -> Plan {
    // Only WRITE carries a payload; for an unknown command none is assumed.
    let payload = if req.kind == CMD_WRITE { req.len } else { 0 };
    let reject = |errno| {
        if u64::from(payload) <= MAX_SKIP {
            Plan::Reject { errno, skip: payload }
        } else {
            Plan::RejectAndClose { errno }
        }
    };
    let allowed_flags = match req.kind {
        CMD_DISC => return Plan::Disconnect,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        // FUA must be accepted on every command once SEND_FUA is advertised.
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        _ => return reject(Errno::Inval),
    };
    if req.flags & !allowed_flags != 0 {
        return reject(Errno::Inval);
    }
    if req.kind == CMD_FLUSH {
        return Plan::Run(Command::Flush);
    }
    let writes = req.kind != CMD_READ;
    if writes && export.read_only {
        return reject(Errno::Perm);
    }
    if req.len == 0 {
        return reject(Errno::Inval);
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE) && req.len > MAX_PAYLOAD {
        return reject(Errno::Inval);
    }
    match check_range(req.offset, u64::from(req.len), export.size, export.block_size) {
        Ok(()) => {}
        Err(DeviceError::OutOfRange { .. }) if writes => return reject(Errno::NoSpc),
        Err(_) => return reject(Errno::Inval),
    }
    let (offset, len, fua) = (req.offset, req.len, req.flags & CMD_FLAG_FUA != 0);
    Plan::Run(match req.kind {
        CMD_READ => Command::Read { offset, len },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_TRIM => Command::Trim { offset, len, fua },
        _ => Command::WriteZeroes { offset, len, fua },
    })
}

/// A simple reply header (read data, if any, follows it).
fn simple_reply(handle: u64, errno: Option<Errno>) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&errno.map_or(0, |e| e as u32).to_be_bytes());
    out[8..].copy_from_slice(&handle.to_be_bytes());
    out
}

/// The NBD error for a device failure. Requests are checked before the device
/// sees them, so a range or read-only error here means the device's view
/// differs from the one negotiated (e.g. it shrank or was fenced read-only).
fn device_errno(error: &DeviceError, writes: bool) -> Errno {
    match error {
        DeviceError::Misaligned { .. } => Errno::Inval,
        DeviceError::OutOfRange { .. } if writes => Errno::NoSpc,
        DeviceError::OutOfRange { .. } => Errno::Inval,
        DeviceError::ReadOnly => Errno::Perm,
        DeviceError::Fenced { .. } | DeviceError::Unavailable(_) | DeviceError::Io(_) => Errno::Io,
    }
}

// ---------------------------------------------------------------------------
// IO: accept loop.

/// Serves NBD on `listener` until `shutdown` completes, then stops accepting,
/// lets every connection finish its commands in flight (aborting those still
/// running after 30 s) and returns. Returns early only on an accept error that
/// is not about one connection or a temporary lack of resources.
pub async fn serve<R: ExportResolver>(
    listener: TcpListener,
    resolver: Arc<R>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    let result = loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = &mut shutdown => break Ok(()),
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                connections.spawn(connection(stream, peer, resolver.clone(), stop_rx.clone()));
            }
            Err(e) if accept_error_is_transient(&e) => {
                warn!(error = %e, "nbd accept failed; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
            Err(e) => break Err(e),
        }
    };
    stop_tx.send_replace(true);
    let drained =
        tokio::time::timeout(DRAIN_TIMEOUT, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(left = connections.len(), "nbd connections did not drain in time; aborting them");
        connections.shutdown().await;
    }
    result
}

fn accept_error_is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    ) || matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Resolves once the server is shutting down; never if the server is gone
/// (its task then aborts this connection anyway).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One client from accept to close.
async fn connection<R: ExportResolver>(
    stream: TcpStream,
    peer: SocketAddr,
    resolver: Arc<R>,
    mut stop: watch::Receiver<bool>,
) {
    // Replies are small and latency-bound; batching happens in the writer.
    if let Err(e) = stream.set_nodelay(true) {
        warn!(%peer, error = %e, "cannot set TCP_NODELAY on nbd connection");
    }
    let (read, write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER, write);
    let negotiated = tokio::select! {
        () = stopped(&mut stop) => return,
        n = tokio::time::timeout(NEGOTIATION_TIMEOUT, negotiate(&mut reader, &mut writer, &*resolver)) => {
            n.unwrap_or(Err(NbdError::NegotiationTimeout(NEGOTIATION_TIMEOUT)))
        }
    };
    let (export, device) = match negotiated {
        Ok(Some(opened)) => opened,
        Ok(None) => {
            debug!(%peer, "nbd client left during negotiation");
            return;
        }
        Err(e) => {
            warn!(%peer, error = &e as &dyn std::error::Error, "nbd negotiation failed");
            return;
        }
    };
    let info = ExportInfo::of(&device);
    info!(%peer, %export, size = info.size, read_only = info.read_only, "nbd client connected");
    let end = transmit(&mut reader, writer, Arc::new(device), info, &mut stop).await;
    match end {
        Ok(reason) => info!(%peer, %export, reason, "nbd client disconnected"),
        Err(e) => {
            warn!(%peer, %export, error = &e as &dyn std::error::Error, "nbd connection closed on error")
        }
    }
}

// ---------------------------------------------------------------------------
// IO: negotiation.

async fn send<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> Result<(), NbdError> {
    writer.write_all(bytes).await.map_err(NbdError::Write)?;
    writer.flush().await.map_err(NbdError::Write)
}

/// Reads and discards `len` bytes without buffering them.
async fn skip<R: AsyncRead + Unpin>(reader: &mut R, len: u64) -> Result<(), NbdError> {
    let copied =
        tokio::io::copy(&mut reader.take(len), &mut tokio::io::sink()).await.map_err(NbdError::Read)?;
    if copied < len {
        return Err(NbdError::Read(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

/// Runs option haggling until the client picks an export (`Some`) or leaves
/// (`None`).
async fn negotiate<R, Rd, Wr>(
    reader: &mut Rd,
    writer: &mut Wr,
    resolver: &R,
) -> Result<Option<(String, R::Device)>, NbdError>
where
    R: ExportResolver,
    Rd: AsyncRead + Unpin,
    Wr: AsyncWrite + Unpin,
{
    send(writer, &greeting()).await?;
    let mut flags = [0u8; 4];
    reader.read_exact(&mut flags).await.map_err(NbdError::Read)?;
    let client = parse_client_flags(&flags)?;
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(NbdError::Read(e)),
        }
        let (option, len) = parse_option_header(&header)?;
        if len > MAX_OPTION_LEN {
            if option == OPT_EXPORT_NAME || u64::from(len) > MAX_SKIP {
                return Err(NbdError::OptionTooLong { option, len, limit: MAX_SKIP });
            }
            skip(reader, u64::from(len)).await?;
            debug!(option, len, "nbd option data too long");
            send(writer, &option_reply(option, REP_ERR_TOO_BIG, b"option data longer than 64 KiB")).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        reader.read_exact(&mut data).await.map_err(NbdError::Read)?;
        match parse_option(option, &data) {
            ClientOption::ExportName(name) => {
                let device = resolver
                    .open(&name)
                    .await
                    .map_err(|source| NbdError::ExportNameRefused { name: name.clone(), source })?;
                let info = ExportInfo::of(&device);
                if let Err(reason) = info.check() {
                    error!(export = %name, reason, "nbd export cannot be served");
                    return Err(NbdError::ExportNameRefused {
                        name,
                        source: ExportError::Unknown(reason.to_owned()),
                    });
                }
                send(writer, &export_name_reply(&info, client)).await?;
                return Ok(Some((name, device)));
            }
            ClientOption::Abort => {
                // The client may already be gone; it is leaving either way.
                let _ = send(writer, &option_reply(option, REP_ACK, &[])).await;
                return Ok(None);
            }
            ClientOption::List => {
                let mut out = Vec::new();
                for name in resolver.list().await {
                    out.extend(option_reply(option, REP_SERVER, &server_entry(&name)));
                }
                out.extend(option_reply(option, REP_ACK, &[]));
                send(writer, &out).await?;
            }
            ClientOption::Info(query) => {
                let reply = match resolver.describe(&query.name).await {
                    Ok(info) => match info.check() {
                        Ok(()) => info_replies(option, &query, &info),
                        Err(reason) => {
                            error!(export = %query.name, reason, "nbd export cannot be served");
                            option_reply(option, REP_ERR_UNKNOWN, reason.as_bytes())
                        }
                    },
                    Err(e) => error_reply(option, &e),
                };
                send(writer, &reply).await?;
            }
            ClientOption::Go(query) => match resolver.open(&query.name).await {
                Ok(device) => {
                    let info = ExportInfo::of(&device);
                    if let Err(reason) = info.check() {
                        error!(export = %query.name, reason, "nbd export cannot be served");
                        send(writer, &option_reply(option, REP_ERR_UNKNOWN, reason.as_bytes())).await?;
                        continue;
                    }
                    send(writer, &info_replies(option, &query, &info)).await?;
                    return Ok(Some((query.name, device)));
                }
                Err(e) => {
                    debug!(export = %query.name, error = %e, "nbd export not opened");
                    send(writer, &error_reply(option, &e)).await?;
                }
            },
            ClientOption::Unsupported => {
                debug!(option, "nbd option not supported");
                send(writer, &option_reply(option, REP_ERR_UNSUP, &[])).await?;
            }
            ClientOption::Invalid(reason) if option == OPT_EXPORT_NAME => {
                return Err(NbdError::ExportNameInvalid { reason });
            }
            ClientOption::Invalid(reason) => {
                debug!(option, reason, "nbd option invalid");
                send(writer, &option_reply(option, REP_ERR_INVALID, reason.as_bytes())).await?;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// IO: transmission.

/// A reply on its way to the writer. Holding `_budget` keeps the command's
/// in-flight slot and buffer bytes taken until the reply is on the socket.
struct Reply {
    handle: u64,
    outcome: Result<Vec<u8>, Errno>,
    _budget: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

/// Serves requests until the client leaves; returns why, for the log.
async fn transmit<D, Rd, Wr>(
    reader: &mut Rd,
    writer: Wr,
    device: Arc<D>,
    info: ExportInfo,
    stop: &mut watch::Receiver<bool>,
) -> Result<&'static str, NbdError>
where
    D: BlockDevice,
    Rd: AsyncRead + Unpin + Send,
    Wr: AsyncWrite + Unpin + Send,
{
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    let reading = async move {
        let mut tasks = JoinSet::new();
        let end = read_requests(reader, &device, info, &tx, &mut tasks, stop).await;
        // Drain before the device can drop: every command in flight finishes
        // and queues its reply.
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                error!(error = %e, "nbd command task failed");
            }
        }
        end
    };
    let (end, written) = tokio::join!(reading, write_replies(rx, writer));
    let end = end?;
    written?;
    Ok(end)
}

/// Reads requests and starts their commands until the client disconnects,
/// the writer fails, or the server stops.
async fn read_requests<D, Rd>(
    reader: &mut Rd,
    device: &Arc<D>,
    info: ExportInfo,
    tx: &mpsc::Sender<Reply>,
    tasks: &mut JoinSet<()>,
    stop: &mut watch::Receiver<bool>,
) -> Result<&'static str, NbdError>
where
    D: BlockDevice,
    Rd: AsyncRead + Unpin,
{
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let buffers = Arc::new(Semaphore::new(IN_FLIGHT_BYTES / BUDGET_UNIT as usize));
    loop {
        while let Some(joined) = tasks.try_join_next() {
            if let Err(e) = joined {
                error!(error = %e, "nbd command task failed");
            }
        }
        let mut header = [0u8; REQUEST_LEN];
        // Cancelling the read loses a partial header, which is fine: each
        // other branch ends the connection.
        let read = tokio::select! {
            () = stopped(stop) => return Ok("server shutting down"),
            () = tx.closed() => return Ok("reply writer stopped"),
            read = read_header(reader, &mut header) => read,
        };
        if !read.map_err(NbdError::Read)? {
            return Ok("client closed the connection");
        }
        let req = parse_request(&header)?;
        let slot = slots.clone().acquire_owned().await.expect("the slot semaphore is never closed");
        match plan(&req, &info) {
            Plan::Disconnect => return Ok("client sent NBD_CMD_DISC"),
            Plan::Reject { errno, skip: len } => {
                skip(reader, u64::from(len)).await?;
                debug!(kind = req.kind, offset = req.offset, len = req.len, ?errno, "nbd request rejected");
                // A send error means the writer is gone; the loop notices.
                let _ =
                    tx.send(Reply { handle: req.handle, outcome: Err(errno), _budget: (slot, None) }).await;
            }
            Plan::RejectAndClose { errno } => {
                let _ =
                    tx.send(Reply { handle: req.handle, outcome: Err(errno), _budget: (slot, None) }).await;
                return Err(NbdError::PayloadTooLong { len: req.len, limit: MAX_SKIP });
            }
            Plan::Run(command) => {
                let units = command.buffer_len().div_ceil(BUDGET_UNIT);
                let buffer = match units {
                    0 => None,
                    n => Some(
                        buffers
                            .clone()
                            .acquire_many_owned(n)
                            .await
                            .expect("the buffer semaphore is never closed"),
                    ),
                };
                let payload = match command {
                    Command::Write { len, .. } => {
                        let mut data = vec![0u8; len as usize];
                        reader.read_exact(&mut data).await.map_err(NbdError::Read)?;
                        data
                    }
                    _ => Vec::new(),
                };
                let device = device.clone();
                let tx = tx.clone();
                let handle = req.handle;
                tasks.spawn(async move {
                    // A panicking device must not leave the client waiting
                    // forever for this handle.
                    let outcome = AssertUnwindSafe(execute(&*device, command, payload))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| {
                            error!(?command, "nbd command panicked");
                            Err(Errno::Io)
                        });
                    let _ = tx.send(Reply { handle, outcome, _budget: (slot, buffer) }).await;
                });
            }
        }
    }
}

/// Fills `buf`; `Ok(false)` if the stream ended cleanly before its first byte.
async fn read_header<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let first = reader.read(buf).await?;
    if first == 0 {
        return Ok(false);
    }
    reader.read_exact(&mut buf[first..]).await?;
    Ok(true)
}

/// Runs one checked command on the device; read data on success.
async fn execute<D: BlockDevice>(device: &D, command: Command, payload: Vec<u8>) -> Result<Vec<u8>, Errno> {
    let failed = |e: DeviceError, writes: bool| {
        let errno = device_errno(&e, writes);
        warn!(?command, error = %e, ?errno, "nbd command failed");
        errno
    };
    let written = match command {
        Command::Read { offset, len } => {
            let data = device.read(offset, len).await.map_err(|e| failed(e, false))?;
            if data.len() != len as usize {
                error!(?command, got = data.len(), "device returned a read of the wrong length");
                return Err(Errno::Io);
            }
            return Ok(data);
        }
        Command::Write { offset, fua, .. } => device.write(offset, payload, fua).await,
        Command::Flush => device.flush().await,
        Command::Trim { offset, len, fua } => match device.trim(offset, u64::from(len)).await {
            Ok(()) if fua => device.flush().await,
            done => done,
        },
        Command::WriteZeroes { offset, len, fua } => {
            match device.write_zeroes(offset, u64::from(len)).await {
                Ok(()) if fua => device.flush().await,
                done => done,
            }
        }
    };
    written.map(|()| Vec::new()).map_err(|e| failed(e, true))
}

/// Sends replies until every sender is gone, then closes the write side.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Reply>,
    mut writer: W,
) -> Result<(), NbdError> {
    while let Some(reply) = rx.recv().await {
        write_reply(&mut writer, reply).await?;
        while let Ok(reply) = rx.try_recv() {
            write_reply(&mut writer, reply).await?;
        }
        writer.flush().await.map_err(NbdError::Write)?;
    }
    writer.shutdown().await.map_err(NbdError::Write)
}

async fn write_reply<W: AsyncWrite + Unpin>(writer: &mut W, reply: Reply) -> Result<(), NbdError> {
    let (errno, data) = match &reply.outcome {
        Ok(data) => (None, data.as_slice()),
        Err(errno) => (Some(*errno), &[][..]),
    };
    writer.write_all(&simple_reply(reply.handle, errno)).await.map_err(NbdError::Write)?;
    writer.write_all(data).await.map_err(NbdError::Write)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use proptest::prelude::*;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;

    // -- sans-IO ------------------------------------------------------------

    fn export(size: u64, read_only: bool) -> ExportInfo {
        ExportInfo { size, block_size: 4096, read_only }
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request { flags, kind, handle: 7, offset, len }
    }

    fn option_header(option: u32, len: u32) -> Vec<u8> {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out
    }

    fn query_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut out = (name.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(name);
        out.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            out.extend_from_slice(&i.to_be_bytes());
        }
        out
    }

    /// Splits concatenated option replies into (option, type, data).
    fn split_option_replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(be_u64(bytes, 0), OPTION_REPLY_MAGIC);
            let len = be_u32(bytes, 16) as usize;
            out.push((be_u32(bytes, 8), be_u32(bytes, 12), bytes[20..20 + len].to_vec()));
            bytes = &bytes[20 + len..];
        }
        out
    }

    #[test]
    fn greeting_offers_fixed_newstyle_and_no_zeroes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(be_u16(&g, 16), 0b11);
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags(&[0, 0, 0, 1]).unwrap(), ClientFlags { no_zeroes: false });
        assert_eq!(parse_client_flags(&[0, 0, 0, 3]).unwrap(), ClientFlags { no_zeroes: true });
        assert_eq!(parse_client_flags(&[0, 0, 0, 0]).unwrap(), ClientFlags { no_zeroes: false });
        assert!(matches!(parse_client_flags(&[0, 0, 0, 4]), Err(NbdError::ClientFlags { flags: 4 })));
        assert!(matches!(parse_client_flags(&[0, 0, 1]), Err(NbdError::Truncated { got: 3, .. })));
    }

    #[test]
    fn option_headers() {
        assert_eq!(parse_option_header(&option_header(OPT_GO, 12)).unwrap(), (OPT_GO, 12));
        let mut bad = option_header(OPT_GO, 12);
        bad[0] ^= 1;
        assert!(matches!(parse_option_header(&bad), Err(NbdError::OptionMagic { .. })));
        assert!(matches!(parse_option_header(&bad[..15]), Err(NbdError::Truncated { need: 16, .. })));
    }

    #[test]
    fn options_decode() {
        assert_eq!(parse_option(OPT_EXPORT_NAME, b"vol"), ClientOption::ExportName("vol".into()));
        assert_eq!(parse_option(OPT_EXPORT_NAME, b""), ClientOption::ExportName(String::new()));
        assert!(matches!(parse_option(OPT_EXPORT_NAME, &[0xff]), ClientOption::Invalid(_)));
        assert!(matches!(parse_option(OPT_EXPORT_NAME, b"a\0b"), ClientOption::Invalid(_)));
        assert!(matches!(parse_option(OPT_EXPORT_NAME, &[b'a'; 4097]), ClientOption::Invalid(_)));
        assert_eq!(parse_option(OPT_ABORT, b"junk"), ClientOption::Abort);
        assert_eq!(parse_option(OPT_LIST, b""), ClientOption::List);
        assert!(matches!(parse_option(OPT_LIST, b"x"), ClientOption::Invalid(_)));
        let q = ExportQuery { name: "v".into(), infos: vec![INFO_BLOCK_SIZE, INFO_NAME] };
        assert_eq!(parse_option(OPT_GO, &query_data(b"v", &[3, 1])), ClientOption::Go(q.clone()));
        assert_eq!(parse_option(OPT_INFO, &query_data(b"v", &[3, 1])), ClientOption::Info(q));
        for (option, unsupported) in
            [(8, "STRUCTURED_REPLY"), (5, "STARTTLS"), (10, "SET_META_CONTEXT"), (99, "?")]
        {
            assert_eq!(parse_option(option, b""), ClientOption::Unsupported, "{unsupported}");
        }
    }

    #[test]
    fn malformed_export_queries_are_invalid() {
        let good = query_data(b"name", &[3]);
        for cut in 0..good.len() {
            assert!(parse_export_query(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(parse_export_query(&trailing).is_err());
        let mut huge_len = good.clone();
        huge_len[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_export_query(&huge_len).is_err());
        assert!(parse_export_query(&query_data(&[0xc3], &[])).is_err());
        assert!(parse_export_query(&query_data(&[b'x'; 5000], &[])).is_err());
        assert_eq!(
            parse_export_query(&query_data(b"", &[])).unwrap(),
            ExportQuery { name: "".into(), infos: vec![] }
        );
    }

    #[test]
    fn info_replies_carry_export_block_sizes_and_name_on_request() {
        let info = export(1 << 30, false);
        let q = ExportQuery { name: "vol".into(), infos: vec![] };
        let replies = split_option_replies(&info_replies(OPT_GO, &q, &info));
        assert_eq!(replies.len(), 3);
        let (opt, kind, data) = &replies[0];
        assert_eq!((*opt, *kind, data.len()), (OPT_GO, REP_INFO, 12));
        assert_eq!(be_u16(data, 0), INFO_EXPORT);
        assert_eq!(be_u64(data, 2), 1 << 30);
        let flags = be_u16(data, 10);
        assert_eq!(flags, 0b110_1101, "HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES");
        let (_, kind, data) = &replies[1];
        assert_eq!((*kind, data.len()), (REP_INFO, 14));
        assert_eq!(
            (be_u16(data, 0), be_u32(data, 2), be_u32(data, 6), be_u32(data, 10)),
            (3, 4096, 4096, MAX_PAYLOAD)
        );
        assert_eq!(replies[2], (OPT_GO, REP_ACK, vec![]));

        let q = ExportQuery { name: "vol".into(), infos: vec![INFO_NAME] };
        let replies = split_option_replies(&info_replies(OPT_INFO, &q, &export(4096, true)));
        assert_eq!(replies.len(), 4);
        assert_eq!(be_u16(&replies[0].2, 10) & TFLAG_READ_ONLY, TFLAG_READ_ONLY);
        assert_eq!(replies[2].2, [&[0, 1][..], b"vol"].concat());
    }

    #[test]
    fn block_size_limits() {
        assert!(export(0, false).check().is_ok());
        assert!(ExportInfo { size: 0, block_size: 3000, read_only: false }.check().is_err());
        assert!(ExportInfo { size: 0, block_size: 128 << 10, read_only: false }.check().is_err());
        assert_eq!(max_block(4096), MAX_PAYLOAD);
        assert_eq!(max_block(64 << 10) % (64 << 10), 0);
    }

    #[test]
    fn export_name_reply_respects_no_zeroes() {
        let info = export(8192, false);
        let full = export_name_reply(&info, ClientFlags { no_zeroes: false });
        assert_eq!(full.len(), 134);
        assert_eq!(be_u64(&full, 0), 8192);
        assert_eq!(be_u16(&full, 8), info.transmission_flags());
        assert_eq!(export_name_reply(&info, ClientFlags { no_zeroes: true }).len(), 10);
    }

    #[test]
    fn error_messages_are_cut_on_char_boundaries() {
        let long = "é".repeat(3000);
        let cut = truncated_message(&long);
        assert_eq!(cut.len(), 4096);
        assert!(std::str::from_utf8(cut).is_ok());
        let replies = split_option_replies(&error_reply(OPT_GO, &ExportError::Refused("no".into())));
        assert_eq!(replies, vec![(OPT_GO, REP_ERR_POLICY, b"no".to_vec())]);
        let replies = split_option_replies(&error_reply(OPT_GO, &ExportError::Unknown("gone".into())));
        assert_eq!(replies, vec![(OPT_GO, REP_ERR_UNKNOWN, b"gone".to_vec())]);
    }

    #[test]
    fn requests_decode() {
        let mut buf = REQUEST_MAGIC.to_be_bytes().to_vec();
        buf.extend_from_slice(&1u16.to_be_bytes());
        buf.extend_from_slice(&CMD_WRITE.to_be_bytes());
        buf.extend_from_slice(&0xdead_beefu64.to_be_bytes());
        buf.extend_from_slice(&8192u64.to_be_bytes());
        buf.extend_from_slice(&4096u32.to_be_bytes());
        assert_eq!(
            parse_request(&buf).unwrap(),
            Request { flags: 1, kind: CMD_WRITE, handle: 0xdead_beef, offset: 8192, len: 4096 }
        );
        assert!(matches!(parse_request(&buf[..27]), Err(NbdError::Truncated { need: 28, got: 27, .. })));
        buf[3] = 0;
        assert!(matches!(parse_request(&buf), Err(NbdError::RequestMagic { .. })));
    }

    #[test]
    fn plans() {
        let rw = export(1 << 20, false);
        let ro = export(1 << 20, true);
        let reject = |errno, skip| Plan::Reject { errno, skip };
        let cases = [
            (req(CMD_READ, 0, 4096, 8192), rw, Plan::Run(Command::Read { offset: 4096, len: 8192 })),
            (req(CMD_READ, CMD_FLAG_FUA, 0, 4096), rw, Plan::Run(Command::Read { offset: 0, len: 4096 })),
            (req(CMD_WRITE, 1, 0, 4096), rw, Plan::Run(Command::Write { offset: 0, len: 4096, fua: true })),
            (req(CMD_FLUSH, 0, 0, 0), rw, Plan::Run(Command::Flush)),
            (req(CMD_FLUSH, 0, 123, 5), ro, Plan::Run(Command::Flush)),
            (
                req(CMD_TRIM, 0, 0, 1 << 20),
                rw,
                Plan::Run(Command::Trim { offset: 0, len: 1 << 20, fua: false }),
            ),
            (
                req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 4096, 4096),
                rw,
                Plan::Run(Command::WriteZeroes { offset: 4096, len: 4096, fua: true }),
            ),
            (req(CMD_DISC, 0xffff, 1, 1), rw, Plan::Disconnect),
            // Misaligned, zero length, past the end.
            (req(CMD_READ, 0, 512, 4096), rw, reject(Errno::Inval, 0)),
            (req(CMD_WRITE, 0, 0, 512), rw, reject(Errno::Inval, 512)),
            (req(CMD_READ, 0, 0, 0), rw, reject(Errno::Inval, 0)),
            (req(CMD_WRITE, 0, 0, 0), rw, reject(Errno::Inval, 0)),
            (req(CMD_READ, 0, 1 << 20, 4096), rw, reject(Errno::Inval, 0)),
            (req(CMD_READ, 0, u64::MAX - 4095, 4096), rw, reject(Errno::Inval, 0)),
            (req(CMD_WRITE, 0, 1 << 20, 4096), rw, reject(Errno::NoSpc, 4096)),
            (req(CMD_TRIM, 0, (1 << 20) - 4096, 8192), rw, reject(Errno::NoSpc, 0)),
            (req(CMD_WRITE_ZEROES, 0, u64::MAX - 4095, 4096), rw, reject(Errno::NoSpc, 0)),
            // Read-only.
            (req(CMD_READ, 0, 0, 4096), ro, Plan::Run(Command::Read { offset: 0, len: 4096 })),
            (req(CMD_WRITE, 0, 0, 4096), ro, reject(Errno::Perm, 4096)),
            (req(CMD_TRIM, 0, 0, 4096), ro, reject(Errno::Perm, 0)),
            (req(CMD_WRITE_ZEROES, 0, 0, 4096), ro, reject(Errno::Perm, 0)),
            // Flags not valid for the command, unknown commands.
            (req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 4096), rw, reject(Errno::Inval, 0)),
            (req(CMD_READ, 1 << 2, 0, 4096), rw, reject(Errno::Inval, 0)),
            (req(CMD_WRITE, 1 << 4, 0, 4096), rw, reject(Errno::Inval, 4096)),
            (req(CMD_WRITE_ZEROES, 1 << 4, 0, 4096), rw, reject(Errno::Inval, 0)),
            (req(5, 0, 0, 4096), rw, reject(Errno::Inval, 0)),
            (req(7, 0, 0, 4096), rw, reject(Errno::Inval, 0)),
            (req(0xffff, 0, 0, u32::MAX), rw, reject(Errno::Inval, 0)),
            // Size caps: READ/WRITE only; a large payload closes.
            (req(CMD_READ, 0, 0, MAX_PAYLOAD + 4096), export(1 << 30, false), reject(Errno::Inval, 0)),
            (
                req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 4096),
                export(1 << 30, false),
                reject(Errno::Inval, MAX_PAYLOAD + 4096),
            ),
            (req(CMD_WRITE, 0, 0, u32::MAX), rw, Plan::RejectAndClose { errno: Errno::Inval }),
            (req(CMD_WRITE, 0, 0, (64 << 20) + 4096), ro, Plan::RejectAndClose { errno: Errno::Perm }),
            (
                req(CMD_TRIM, 0, 0, u32::MAX - 4095),
                export(1 << 33, false),
                Plan::Run(Command::Trim { offset: 0, len: u32::MAX - 4095, fua: false }),
            ),
        ];
        for (r, e, want) in cases {
            assert_eq!(plan(&r, &e), want, "{r:?} on {e:?}");
        }
    }

    #[test]
    fn simple_replies() {
        let r = simple_reply(0x0102_0304_0506_0708, None);
        assert_eq!(&r[..], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(be_u32(&simple_reply(1, Some(Errno::NoSpc)), 4), 28);
        assert_eq!(
            [Errno::Perm, Errno::Io, Errno::Inval, Errno::NoSpc].map(|e| e as u32),
            [libc::EPERM, libc::EIO, libc::EINVAL, libc::ENOSPC].map(|e| e as u32)
        );
    }

    #[test]
    fn device_errors_map_to_nbd_errnos() {
        let oor = DeviceError::OutOfRange { offset: 0, len: 1, size: 0 };
        assert_eq!(device_errno(&oor, true), Errno::NoSpc);
        assert_eq!(device_errno(&oor, false), Errno::Inval);
        assert_eq!(
            device_errno(&DeviceError::Misaligned { offset: 1, len: 1, block: 4096 }, true),
            Errno::Inval
        );
        assert_eq!(device_errno(&DeviceError::ReadOnly, true), Errno::Perm);
        assert_eq!(device_errno(&DeviceError::Fenced { ours: 1, current: 2 }, true), Errno::Io);
        assert_eq!(device_errno(&DeviceError::Unavailable("x".into()), false), Errno::Io);
        assert_eq!(device_errno(&DeviceError::Io("x".into()), false), Errno::Io);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), option in any::<u32>()) {
            let _ = parse_client_flags(&bytes);
            let _ = parse_option_header(&bytes);
            let _ = parse_option(option, &bytes);
            let _ = parse_option(OPT_GO, &bytes);
            let _ = parse_export_query(&bytes);
            let _ = parse_request(&bytes);
        }

        #[test]
        fn planned_commands_fit_the_export(
            kind in 0u16..10, flags in any::<u16>(), offset in any::<u64>(), len in any::<u32>(),
            size_blocks in 0u64..1 << 20, read_only in any::<bool>(),
        ) {
            let e = export(size_blocks * 4096, read_only);
            match plan(&req(kind, flags, offset, len), &e) {
                Plan::Run(Command::Flush) => prop_assert_eq!(kind, CMD_FLUSH),
                Plan::Run(_) => {
                    prop_assert!(len > 0 && offset % 4096 == 0 && len % 4096 == 0);
                    prop_assert!(offset + u64::from(len) <= e.size);
                    prop_assert!(!read_only || kind == CMD_READ);
                }
                Plan::Reject { skip, .. } => prop_assert!(u64::from(skip) <= MAX_SKIP && (skip == 0 || kind == CMD_WRITE)),
                Plan::RejectAndClose { .. } => prop_assert!(kind == CMD_WRITE && u64::from(len) > MAX_SKIP),
                Plan::Disconnect => prop_assert_eq!(kind, CMD_DISC),
            }
        }
    }

    // -- loopback: an in-memory device behind the real server ------------------

    /// One export's bytes and counters, shared by every device opened on it.
    #[derive(Debug, Default)]
    struct Disk {
        data: Mutex<Vec<u8>>,
        flushes: AtomicUsize,
        fua_writes: AtomicUsize,
        open: AtomicUsize,
    }

    #[derive(Debug)]
    struct MemDevice {
        disk: Arc<Disk>,
        read_only: bool,
        /// Reads at this offset take 300 ms, to observe reordering and draining.
        slow_offset: Option<u64>,
        /// Reads at this offset panic.
        panic_offset: Option<u64>,
    }

    impl Drop for MemDevice {
        fn drop(&mut self) {
            self.disk.open.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl MemDevice {
        fn check(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
            check_range(offset, len, self.size(), self.block_size())
        }
    }

    impl BlockDevice for MemDevice {
        fn size(&self) -> u64 {
            self.disk.data.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
            self.check(offset, len.into())?;
            if self.slow_offset == Some(offset) {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            assert_ne!(self.panic_offset, Some(offset), "device bug");
            let data = self.disk.data.lock().unwrap();
            Ok(data[offset as usize..][..len as usize].to_vec())
        }
        async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
            self.check(offset, data.len() as u64)?;
            if fua {
                self.disk.fua_writes.fetch_add(1, Ordering::SeqCst);
            }
            self.disk.data.lock().unwrap()[offset as usize..][..data.len()].copy_from_slice(&data);
            Ok(())
        }
        async fn flush(&self) -> Result<(), DeviceError> {
            self.disk.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
            self.write_zeroes(offset, len).await
        }
        async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
            self.check(offset, len)?;
            self.disk.data.lock().unwrap()[offset as usize..][..len as usize].fill(0);
            Ok(())
        }
    }

    #[derive(Debug, Default)]
    struct MemResolver {
        exports: HashMap<String, (Arc<Disk>, bool)>,
        slow_offset: Option<u64>,
        panic_offset: Option<u64>,
    }

    impl MemResolver {
        fn with(mut self, name: &str, size: usize, read_only: bool) -> Self {
            let disk = Disk { data: Mutex::new(vec![0; size]), ..Disk::default() };
            self.exports.insert(name.into(), (Arc::new(disk), read_only));
            self
        }
        fn disk(&self, name: &str) -> Arc<Disk> {
            self.exports[name].0.clone()
        }
    }

    impl ExportResolver for MemResolver {
        type Device = MemDevice;
        async fn list(&self) -> Vec<String> {
            let mut names: Vec<_> = self.exports.keys().cloned().collect();
            names.sort();
            names
        }
        async fn describe(&self, name: &str) -> Result<ExportInfo, ExportError> {
            let dev = self.open(name).await?;
            Ok(ExportInfo::of(&dev))
        }
        async fn open(&self, name: &str) -> Result<MemDevice, ExportError> {
            let (disk, read_only) =
                self.exports.get(name).ok_or_else(|| ExportError::Unknown(format!("no volume {name:?}")))?;
            disk.open.fetch_add(1, Ordering::SeqCst);
            Ok(MemDevice {
                disk: disk.clone(),
                read_only: *read_only,
                slow_offset: self.slow_offset,
                panic_offset: self.panic_offset,
            })
        }
    }

    struct Server {
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<io::Result<()>>,
    }

    impl Server {
        async fn start(resolver: MemResolver) -> (Self, Arc<MemResolver>) {
            let resolver = Arc::new(resolver);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel();
            let task = tokio::spawn(serve(listener, resolver.clone(), async {
                let _ = stopped.await;
            }));
            (Self { addr, stop: Some(stop), task }, resolver)
        }

        async fn shutdown(mut self) {
            self.stop.take().unwrap().send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(5), self.task).await.unwrap().unwrap().unwrap();
        }
    }

    /// Just enough of an NBD client to drive the server byte by byte.
    struct Client {
        s: TcpStream,
    }

    /// One option reply: (option, reply type, data).
    type OptionReply = (u32, u32, Vec<u8>);

    impl Client {
        async fn connect_with_flags(addr: SocketAddr, flags: u32) -> Self {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut g = [0u8; GREETING_LEN];
            s.read_exact(&mut g).await.unwrap();
            assert_eq!(g, greeting());
            s.write_all(&flags.to_be_bytes()).await.unwrap();
            Self { s }
        }

        async fn connect(addr: SocketAddr) -> Self {
            Self::connect_with_flags(addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await
        }

        async fn option(&mut self, option: u32, data: &[u8]) {
            let mut out = option_header(option, data.len() as u32);
            out.extend_from_slice(data);
            self.s.write_all(&out).await.unwrap();
        }

        async fn option_reply(&mut self) -> OptionReply {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).await.unwrap();
            assert_eq!(be_u64(&h, 0), OPTION_REPLY_MAGIC);
            let mut data = vec![0u8; be_u32(&h, 16) as usize];
            self.s.read_exact(&mut data).await.unwrap();
            (be_u32(&h, 8), be_u32(&h, 12), data)
        }

        /// Replies up to and including the first ACK or error.
        async fn option_replies(&mut self) -> Vec<OptionReply> {
            let mut out = Vec::new();
            loop {
                let r = self.option_reply().await;
                let last = r.1 == REP_ACK || r.1 & (1 << 31) != 0;
                out.push(r);
                if last {
                    return out;
                }
            }
        }

        /// NBD_OPT_GO; on success the export's size and transmission flags.
        async fn go(&mut self, name: &str) -> Result<(u64, u16), (u32, String)> {
            self.option(OPT_GO, &query_data(name.as_bytes(), &[INFO_BLOCK_SIZE])).await;
            let replies = self.option_replies().await;
            let (_, last, message) = replies.last().unwrap().clone();
            if last != REP_ACK {
                return Err((last, String::from_utf8(message).unwrap()));
            }
            let export = replies.iter().find(|r| be_u16(&r.2, 0) == INFO_EXPORT).unwrap();
            Ok((be_u64(&export.2, 2), be_u16(&export.2, 10)))
        }

        async fn request(
            &mut self,
            kind: u16,
            flags: u16,
            handle: u64,
            offset: u64,
            len: u32,
            payload: &[u8],
        ) {
            let mut out = REQUEST_MAGIC.to_be_bytes().to_vec();
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&handle.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(payload);
            self.s.write_all(&out).await.unwrap();
        }

        /// A reply header: (handle, errno).
        async fn reply(&mut self) -> (u64, u32) {
            let mut h = [0u8; SIMPLE_REPLY_LEN];
            self.s.read_exact(&mut h).await.unwrap();
            assert_eq!(be_u32(&h, 0), SIMPLE_REPLY_MAGIC);
            (be_u64(&h, 8), be_u32(&h, 4))
        }

        async fn data(&mut self, len: u32) -> Vec<u8> {
            let mut data = vec![0u8; len as usize];
            self.s.read_exact(&mut data).await.unwrap();
            data
        }

        async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
            self.request(CMD_READ, 0, 1, offset, len, &[]).await;
            match self.reply().await {
                (1, 0) => Ok(self.data(len).await),
                (1, errno) => Err(errno),
                (h, _) => panic!("reply for handle {h}"),
            }
        }

        /// Sends a command whose reply has no data; returns the errno.
        async fn command(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> u32 {
            self.request(kind, flags, 2, offset, len, payload).await;
            let (handle, errno) = self.reply().await;
            assert_eq!(handle, 2);
            errno
        }

        async fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
            self.command(CMD_WRITE, 0, offset, data.len() as u32, data).await
        }

        /// True once the server has closed the connection.
        async fn closed(&mut self) -> bool {
            let mut b = [0u8; 1];
            matches!(
                tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b)).await,
                Ok(Ok(0) | Err(_))
            )
        }
    }

    const EINVAL: u32 = 22;
    const ENOSPC: u32 = 28;
    const EPERM: u32 = 1;
    const EIO: u32 = 5;
    const MIB: usize = 1 << 20;

    #[tokio::test]
    async fn go_then_read_write_flush_trim_zeroes() {
        let (server, resolver) = Server::start(MemResolver::default().with("vol", 4 * MIB, false)).await;
        let disk = resolver.disk("vol");
        let mut c = Client::connect(server.addr).await;
        let (size, flags) = c.go("vol").await.unwrap();
        assert_eq!(size, 4 * MIB as u64);
        assert_eq!(flags & TFLAG_READ_ONLY, 0);
        assert_eq!(flags & (1 << 8), 0, "no CAN_MULTI_CONN");
        assert_eq!(disk.open.load(Ordering::SeqCst), 1);

        let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(c.write(8192, &pattern).await, 0);
        assert_eq!(c.read(8192, 65536).await.unwrap(), pattern);
        assert_eq!(c.command(CMD_WRITE, CMD_FLAG_FUA, 0, 4096, &[7; 4096]).await, 0);
        assert_eq!(disk.fua_writes.load(Ordering::SeqCst), 1);
        assert_eq!(c.command(CMD_FLUSH, 0, 0, 0, &[]).await, 0);
        assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
        assert_eq!(c.command(CMD_TRIM, 0, 8192, 4096, &[]).await, 0);
        assert_eq!(c.command(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 16384, 4096, &[]).await, 0);
        assert_eq!(disk.flushes.load(Ordering::SeqCst), 2, "FUA on WRITE_ZEROES flushes");
        let back = c.read(0, 32768).await.unwrap();
        assert_eq!(&back[..4096], &[7; 4096]);
        assert_eq!(&back[4096..8192], &[0; 4096]);
        assert_eq!(&back[8192..12288], &[0; 4096], "trimmed");
        assert_eq!(&back[12288..16384], &pattern[4096..8192]);
        assert_eq!(&back[16384..20480], &[0; 4096], "zeroed");
        assert_eq!(&back[20480..], &pattern[12288..24576]);
        assert_eq!(c.read(4 * MIB as u64 - 4096, 4096).await.unwrap(), vec![0; 4096], "last block");

        c.request(CMD_DISC, 0, 3, 0, 0, &[]).await;
        assert!(c.closed().await);
        server.shutdown().await;
        assert_eq!(disk.open.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn bad_requests_get_errors_and_change_nothing() {
        let (server, resolver) = Server::start(MemResolver::default().with("vol", MIB, false)).await;
        let disk = resolver.disk("vol");
        let mut c = Client::connect(server.addr).await;
        c.go("vol").await.unwrap();
        assert_eq!(c.write(0, &[0xaa; 8192]).await, 0);
        let before = disk.data.lock().unwrap().clone();

        assert_eq!(c.write(512, &[1; 4096]).await, EINVAL, "misaligned offset");
        assert_eq!(c.write(0, &[1; 1000]).await, EINVAL, "misaligned length");
        assert_eq!(c.write(MIB as u64, &[1; 4096]).await, ENOSPC, "past the end");
        assert_eq!(c.write(MIB as u64 - 4096, &[1; 8192]).await, ENOSPC, "straddles the end");
        assert_eq!(c.command(CMD_TRIM, 0, MIB as u64, 4096, &[]).await, ENOSPC);
        assert_eq!(c.command(CMD_WRITE_ZEROES, 0, 0, 100, &[]).await, EINVAL);
        assert_eq!(c.command(CMD_WRITE, 0, 0, 0, &[]).await, EINVAL, "zero length");
        assert_eq!(c.read(MIB as u64, 4096).await, Err(EINVAL), "read past the end");
        assert_eq!(c.read(100, 4096).await, Err(EINVAL));
        assert_eq!(c.command(9, 0, 0, 4096, &[]).await, EINVAL, "unknown command");
        assert_eq!(c.command(CMD_WRITE, 1 << 4, 0, 4096, &[1; 4096]).await, EINVAL, "FAST_ZERO not offered");
        assert_eq!(c.command(CMD_READ, 1 << 2, 0, 4096, &[]).await, EINVAL, "DF without structured replies");
        assert_eq!(c.read(0, 64 << 20).await, Err(EINVAL), "read over the maximum");
        // A write over the maximum is skipped without being buffered and the
        // connection stays usable.
        let big = vec![1u8; (MAX_PAYLOAD + 4096) as usize];
        assert_eq!(c.write(0, &big).await, EINVAL);

        assert_eq!(*disk.data.lock().unwrap(), before, "no rejected request changed data");
        assert_eq!(c.read(0, 8192).await.unwrap(), vec![0xaa; 8192]);
        c.request(CMD_DISC, 0, 3, 0, 0, &[]).await;
        assert!(c.closed().await);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn unskippable_write_is_rejected_then_closed() {
        let (server, _) = Server::start(MemResolver::default().with("vol", MIB, false)).await;
        let mut c = Client::connect(server.addr).await;
        c.go("vol").await.unwrap();
        c.request(CMD_WRITE, 0, 9, 0, 100 << 20, &[]).await;
        assert_eq!(c.reply().await, (9, EINVAL));
        assert!(c.closed().await);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn protocol_violations_close_the_connection() {
        let (server, resolver) = Server::start(MemResolver::default().with("vol", MIB, false)).await;
        let mut c = Client::connect_with_flags(server.addr, 1 << 5).await;
        assert!(c.closed().await, "unknown client flag");

        let mut c = Client::connect(server.addr).await;
        c.s.write_all(&[0u8; 16]).await.unwrap();
        assert!(c.closed().await, "bad option magic");

        let mut c = Client::connect(server.addr).await;
        c.go("vol").await.unwrap();
        c.s.write_all(&[0u8; REQUEST_LEN]).await.unwrap();
        assert!(c.closed().await, "bad request magic");

        let mut c = Client::connect(server.addr).await;
        c.option(OPT_EXPORT_NAME, b"nope").await;
        assert!(c.closed().await, "EXPORT_NAME cannot fail politely");
        server.shutdown().await;
        assert_eq!(resolver.disk("vol").open.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn read_only_exports_refuse_writes() {
        let (server, resolver) = Server::start(MemResolver::default().with("ro", MIB, true)).await;
        resolver.disk("ro").data.lock().unwrap()[..4096].fill(9);
        let mut c = Client::connect(server.addr).await;
        let (_, flags) = c.go("ro").await.unwrap();
        assert_eq!(flags & TFLAG_READ_ONLY, TFLAG_READ_ONLY);
        assert_eq!(c.write(0, &[1; 4096]).await, EPERM);
        assert_eq!(c.command(CMD_TRIM, 0, 0, 4096, &[]).await, EPERM);
        assert_eq!(c.command(CMD_WRITE_ZEROES, 0, 0, 4096, &[]).await, EPERM);
        assert_eq!(c.command(CMD_FLUSH, 0, 0, 0, &[]).await, 0);
        assert_eq!(c.read(0, 4096).await.unwrap(), vec![9; 4096]);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn option_haggling() {
        let (server, _) =
            Server::start(MemResolver::default().with("a", MIB, false).with("b", 2 * MIB, true)).await;
        let mut c = Client::connect(server.addr).await;

        c.option(OPT_LIST, &[]).await;
        let replies = c.option_replies().await;
        let names: Vec<_> = replies[..2].iter().map(|r| (r.1, r.2.clone())).collect();
        assert_eq!(
            names,
            vec![
                (REP_SERVER, [&[0, 0, 0, 1][..], b"a"].concat()),
                (REP_SERVER, [&[0, 0, 0, 1][..], b"b"].concat())
            ]
        );
        assert_eq!(replies[2], (OPT_LIST, REP_ACK, vec![]));

        c.option(OPT_LIST, b"x").await;
        assert_eq!(c.option_reply().await.1, REP_ERR_INVALID);
        c.option(8, &[]).await;
        assert_eq!(c.option_reply().await, (8, REP_ERR_UNSUP, vec![]), "structured replies");
        c.option(0x1234, b"whatever").await;
        assert_eq!(c.option_reply().await, (0x1234, REP_ERR_UNSUP, vec![]));
        c.option(OPT_GO, &[0, 0, 0, 9, b'a']).await;
        assert_eq!(c.option_reply().await.1, REP_ERR_INVALID, "truncated GO");
        c.option(OPT_INFO, &vec![0; MAX_OPTION_LEN as usize + 1]).await;
        assert_eq!(c.option_reply().await.1, REP_ERR_TOO_BIG);

        c.option(OPT_INFO, &query_data(b"b", &[INFO_NAME])).await;
        let replies = c.option_replies().await;
        assert_eq!(replies.len(), 4);
        assert_eq!(be_u64(&replies[0].2, 2), 2 * MIB as u64);
        assert_eq!(replies[2].2, [&[0, 1][..], b"b"].concat());

        let (kind, message) = c.go("missing").await.unwrap_err();
        assert_eq!(kind, REP_ERR_UNKNOWN);
        assert!(message.contains("missing"), "{message}");
        assert_eq!(c.go("a").await.unwrap().0, MIB as u64, "GO after a failed GO");
        assert_eq!(c.read(0, 4096).await.unwrap(), vec![0; 4096]);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn abort_is_acknowledged() {
        let (server, _) = Server::start(MemResolver::default().with("a", MIB, false)).await;
        let mut c = Client::connect(server.addr).await;
        c.option(OPT_ABORT, &[]).await;
        assert_eq!(c.option_reply().await, (OPT_ABORT, REP_ACK, vec![]));
        assert!(c.closed().await);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn export_name_with_and_without_zeroes() {
        let (server, _) = Server::start(MemResolver::default().with("a", MIB, false)).await;
        for (flags, reply_len) in [(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10), (0, 134)] {
            let mut c = Client::connect_with_flags(server.addr, flags).await;
            c.option(OPT_EXPORT_NAME, b"a").await;
            let reply = c.data(reply_len).await;
            assert_eq!(be_u64(&reply, 0), MIB as u64);
            assert_eq!(be_u16(&reply, 8), export(0, false).transmission_flags());
            assert!(reply[10..].iter().all(|b| *b == 0));
            assert_eq!(c.write(4096, &[3; 4096]).await, 0);
            assert_eq!(c.read(4096, 4096).await.unwrap(), vec![3; 4096]);
        }
        server.shutdown().await;
    }

    #[tokio::test]
    async fn requests_run_concurrently_and_reply_out_of_order() {
        let resolver = MemResolver { slow_offset: Some(0), ..MemResolver::default() }.with("a", MIB, false);
        let (server, _) = Server::start(resolver).await;
        let mut c = Client::connect(server.addr).await;
        c.go("a").await.unwrap();
        // A slow read first, then 32 writes and 32 reads pipelined behind it.
        c.request(CMD_READ, 0, 1000, 0, 4096, &[]).await;
        for i in 1..=32u64 {
            c.request(CMD_WRITE, 0, i, i * 4096, 4096, &[i as u8; 4096]).await;
        }
        let mut pending: HashMap<u64, Option<u64>> = (1..=32).map(|i| (i, None)).collect();
        pending.insert(1000, Some(0));
        let mut order = Vec::new();
        while !pending.is_empty() {
            let (handle, errno) = c.reply().await;
            assert_eq!(errno, 0, "handle {handle}");
            let read_at = pending.remove(&handle).expect("known handle");
            if let Some(offset) = read_at {
                let data = c.data(4096).await;
                assert!(data.iter().all(|b| u64::from(*b) == (offset / 4096) % 256), "handle {handle}");
            } else if handle <= 32 {
                // The write completed: read it back through the pipeline too.
                c.request(CMD_READ, 0, 100 + handle, handle * 4096, 4096, &[]).await;
                pending.insert(100 + handle, Some(handle * 4096));
            }
            order.push(handle);
        }
        assert_eq!(*order.last().unwrap(), 1000, "the slow read finished last");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn device_dropped_only_after_commands_in_flight_finish() {
        let resolver = MemResolver { slow_offset: Some(0), ..MemResolver::default() }.with("a", MIB, false);
        let (server, resolver) = Server::start(resolver).await;
        let disk = resolver.disk("a");
        let mut c = Client::connect(server.addr).await;
        c.go("a").await.unwrap();
        c.request(CMD_READ, 0, 5, 0, 4096, &[]).await;
        c.request(CMD_DISC, 0, 6, 0, 0, &[]).await;
        assert_eq!(c.reply().await, (5, 0), "in-flight read answered after DISC");
        assert_eq!(c.data(4096).await, vec![0; 4096]);
        assert!(c.closed().await);
        for _ in 0..100 {
            if disk.open.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(disk.open.load(Ordering::SeqCst), 0);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn panicking_device_answers_eio() {
        let resolver =
            MemResolver { panic_offset: Some(8192), ..MemResolver::default() }.with("a", MIB, false);
        let (server, _) = Server::start(resolver).await;
        let mut c = Client::connect(server.addr).await;
        c.go("a").await.unwrap();
        assert_eq!(c.read(8192, 4096).await, Err(EIO));
        assert_eq!(c.read(0, 4096).await.unwrap(), vec![0; 4096]);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_closes_idle_and_negotiating_clients() {
        let (server, resolver) = Server::start(MemResolver::default().with("a", MIB, false)).await;
        let mut idle = Client::connect(server.addr).await;
        idle.go("a").await.unwrap();
        let mut negotiating = Client::connect(server.addr).await;
        server.shutdown().await;
        assert!(idle.closed().await);
        assert!(negotiating.closed().await);
        assert_eq!(resolver.disk("a").open.load(Ordering::SeqCst), 0);
    }
}
