//! The DHCPv4 message format (RFC 2131, options from RFC 2132), shared by the
//! node's own DHCP client, the switch's DHCP server and the PXE proxy DHCP
//! server.
//!
//! # Layout
//! - `codes.rs`: the numbers: UDP ports, op codes, flags, message types and
//!   option codes.
//! - `header.rs`: [`Header`], the fixed BOOTP header and the magic cookie,
//!   read with bounds checks and written back.
//! - `options.rs`: [`split_options`], the one walker of an options area, and
//!   [`Options`], every option of a message with typed getters.
//! - `builder.rs`: [`MessageBuilder`], a header and options kept within the
//!   size every client accepts and padded to the BOOTP minimum.
//!
//! The crate owns no state, threads or sockets: it turns bytes into typed
//! values and back, and its users decide what to answer.
//!
//! # The format
//! A DHCP message is a BOOTP message (RFC 951) whose 64-byte vendor area has
//! become a variable options area, opened by a magic cookie. Numbers are
//! big-endian.
//!
//! ```text
//! offset size field
//!      0    1 op       1 BOOTREQUEST (client), 2 BOOTREPLY (server)
//!      1    1 htype    hardware type, 1 for Ethernet
//!      2    1 hlen     hardware address length, 6 for Ethernet
//!      3    1 hops     relay agents passed
//!      4    4 xid      transaction id, chosen by the client
//!      8    2 secs     seconds since the client began
//!     10    2 flags    bit 15: broadcast the reply
//!     12    4 ciaddr   the client's address, when it has one
//!     16    4 yiaddr   "your" address, given by the server
//!     20    4 siaddr   next server (TFTP), given by the server
//!     24    4 giaddr   the relay agent's address
//!     28   16 chaddr   client hardware address, zero padded
//!     44   64 sname    server host name, or options (option 52)
//!    108  128 file     boot file name, or options (option 52)
//!    236    4 cookie   99.130.83.99
//!    240    - options  (code, length, value)..., end (255), pad (0)
//! ```
//!
//! # Versions and limits
//! The format carries no version: the magic cookie tells DHCP from plain
//! BOOTP, and option 53 tells the DHCP message types apart. Readers parse any
//! bytes without panicking; a message shorter than 240 bytes, an option that
//! runs past its area or an option of the wrong length is an error that names
//! it. A missing end option is not an error: the area's end stops the walk.
//! Option 52 (overload) is honoured when reading: the `file` field, then
//! `sname`, are read as further options areas. Of an option sent more than
//! once the first instance counts; long options split by RFC 3396 are not
//! joined. Writers never overload, keep a message within 548 bytes (the
//! 576-byte IP datagram every client must accept, RFC 2131 section 2) by
//! leaving out options that do not fit, and pad it to 300 bytes, the BOOTP
//! size that old clients and relays expect (RFC 1542).

#![warn(missing_docs)]

mod builder;
mod codes;
mod header;
mod options;

pub use builder::{MAX_MESSAGE, MIN_MESSAGE, MessageBuilder};
pub use codes::*;
pub use header::{FILE_AT, FILE_LEN, Header, HeaderError, MAGIC, MAGIC_AT, OPTIONS_AT, SNAME_AT, SNAME_LEN};
pub use options::{OVERLOAD_FILE, OVERLOAD_SNAME, OptionError, Options, split_options};
