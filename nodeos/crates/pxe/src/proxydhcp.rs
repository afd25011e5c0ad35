//! The proxy DHCP responder (PXE 2.1 specification, RFC 4578): boot
//! information for PXE clients, never addresses.
//!
//! Another DHCP server on the fabric leases addresses. A PXE client
//! broadcasts its DHCPDISCOVER to port 67 and collects offers from both: the
//! real server's carries an address (`yiaddr`), ours carries `yiaddr`
//! 0.0.0.0, `siaddr` = us, option 60 "PXEClient" and the boot file name in
//! the BOOTP `file` field. [`respond`] is a pure function from one received
//! datagram to what to send back; the server owns the sockets.
//!
//! # What a client gets
//! - iPXE (option 77 user class containing "iPXE", or option 175 present):
//!   `http://{server_ip}:{http_port}/boot.ipxe`, fetched over HTTP.
//! - A vendor PXE ROM, by option 93 (client system architecture): 0 (x86
//!   BIOS) gets `undionly.kpxe`; 7 and 9 (x64 UEFI) get `ipxe.efi`, else
//!   `snponly.efi`; fetched over TFTP from `siaddr`. Each only if the bundle
//!   has the file: otherwise no reply at all, so that another PXE server on
//!   the fabric may still boot the machine ([`Outcome::Unsupported`]).
//!   Without option 93, the architecture is read from option 60
//!   ("PXEClient:Arch:NNNNN:..."), and a PXE 2.0 ROM that sends neither is
//!   taken for x86 BIOS.
//!
//! # Which requests are answered
//! Only BOOTREQUESTs on Ethernet (htype 1, hlen 6) with the DHCP magic
//! cookie and an option 60 starting with "PXEClient"; everything else is
//! [`Outcome::Ignored`]. On the DHCP port (67): DHCPDISCOVER gets a
//! DHCPOFFER; a DHCPREQUEST belongs to the real DHCP server and is ignored
//! unless its option 54 names us (then DHCPACK). On the proxy port (4011):
//! DHCPREQUEST and DHCPINFORM get a DHCPACK (unless option 54 names another
//! server). Replies on port 67 are broadcast (the client has no address
//! yet) or sent to the relay in `giaddr`; replies on port 4011 go back to the
//! request's source address and port.
//!
//! # How iPXE reads our replies (checked against ipxe/ipxe, `src/net/udp/dhcp.c`)
//! - `dhcp_deliver`: a reply must carry the request's `xid` and `chaddr`.
//!   The server's "pseudo-ID" is option 54, else `siaddr`, else the source
//!   address of the datagram.
//! - `dhcp_discovery_rx`: an offer counts as a ProxyDHCP offer when option
//!   60 begins with the nine bytes "PXEClient" and there is a pseudo-ID; the
//!   source port is not checked. It only counts as an address offer when
//!   `yiaddr` is non-zero and it came from port 67, which is why `yiaddr`
//!   stays 0.0.0.0.
//! - `dhcp_request_rx`: once the real server ACKs, iPXE checks the proxy
//!   offer with `dhcp_has_pxeopts`: `siaddr` non-zero and a boot file name
//!   (option 67, or the `file` field: `dhcppkt_fetch` in `src/net/dhcppkt.c`
//!   returns the field when it is populated), or a PXE boot menu (43.9). If
//!   so it uses the offer as is and sends no ProxyDHCPREQUEST; our offers
//!   always qualify.
//! - Otherwise `dhcp_proxy_tx` sends a DHCPREQUEST unicast to the pseudo-ID,
//!   port 4011, with option 54 set to it, and `dhcp_proxy_rx` accepts only an
//!   OFFER or ACK whose source port is 4011, whose pseudo-ID matches and
//!   that has PXE options: so the ACK must come from the 4011 socket and
//!   carry `siaddr` and `file` too.
//! - iPXE does not need option 43: `have_pxe_menu` (`src/usr/autoboot.c`)
//!   shows a menu only with 43.9 present and not (43.6 has bit 3 set and a
//!   file name exists). We send 43.6 = 8 (PXE 2.1 "boot file name in the
//!   offer, no boot server discovery") for vendor ROMs, which do rely on it.
//! - Every iPXE request carries option 77 "iPXE" and option 175 (its
//!   feature list; `dhcp_request_options_data`, `dhcp_create_request`), and
//!   option 97 (type 0 + 16-byte UUID) when the machine has a UUID.

use std::collections::{HashSet, VecDeque};
use std::net::Ipv4Addr;

use nodeos_switch::dhcp::{
    ACK, BOOTREPLY, BOOTREQUEST, DISCOVER, HTYPE_ETHERNET, INFORM, MAGIC, MAGIC_AT, MIN_MESSAGE, OFFER,
    OPT_END, OPT_MESSAGE_TYPE, OPT_OVERLOAD, OPT_PAD, OPT_SERVER_ID, OPTIONS_AT, REQUEST,
};
use nodeos_types::net::MacAddr;

use crate::bundle::Bundle;

/// Where ProxyDHCPREQUESTs go (PXE 2.1 specification).
pub const PROXY_PORT: u16 = 4011;

// PXE options (RFC 4578, PXE 2.1 specification, iPXE).
/// Option 43: vendor-specific information, PXE sub-options inside.
pub const OPT_VENDOR_SPECIFIC: u8 = 43;
/// Option 60: vendor class identifier, "PXEClient..." from PXE clients.
pub const OPT_VENDOR_CLASS: u8 = 60;
/// Option 77: user class; iPXE sends "iPXE".
pub const OPT_USER_CLASS: u8 = 77;
/// Option 93: client system architecture (RFC 4578 section 2.1).
pub const OPT_CLIENT_ARCH: u8 = 93;
/// Option 94: client network device interface (RFC 4578 section 2.2).
pub const OPT_CLIENT_NDI: u8 = 94;
/// Option 97: client machine identifier, the UUID (RFC 4578 section 2.3).
pub const OPT_CLIENT_UUID: u8 = 97;
/// Option 175: iPXE's encapsulated options.
pub const OPT_IPXE_ENCAP: u8 = 175;
/// Sub-option 6 of option 43: PXE discovery control.
pub const PXE_DISCOVERY_CONTROL: u8 = 6;
/// Discovery control bit 3: boot the file named in the offer, no prompt,
/// menu or boot server discovery.
pub const DISCOVERY_USE_FILE: u8 = 8;
/// Option 60 in requests starts with this, and our replies carry it.
pub const PXE_CLIENT: &[u8] = b"PXEClient";

/// The iPXE script iPXE clients are pointed at.
pub const BOOT_SCRIPT: &str = "boot.ipxe";
/// The iPXE chainloader for x86 BIOS PXE ROMs (uses the ROM's UNDI driver).
pub const BIOS_LOADER: &str = "undionly.kpxe";
/// iPXE chainloaders for x64 UEFI, in order of preference.
pub const EFI_LOADERS: [&str; 2] = ["ipxe.efi", "snponly.efi"];

/// Architecture types of option 93 (RFC 4578, IANA registry).
pub const ARCH_X86_BIOS: u16 = 0;
pub const ARCH_EFI_BC: u16 = 7;
pub const ARCH_EFI_X64: u16 = 9;

/// Size of the BOOTP `file` field.
const FILE_FIELD: usize = 128;
const SNAME_AT: usize = 44;
const FILE_AT: usize = 108;

/// A boot configuration that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootConfigError {
    #[error("boot file name {name:?} is {len} bytes; the BOOTP file field holds at most 127")]
    FileNameTooLong { name: String, len: usize },
}

/// Why a message on a DHCP socket could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyDhcpError {
    #[error("BOOTP message of {0} bytes is shorter than the 240 of a DHCP message")]
    Truncated(usize),
    #[error("option {code} runs past the end of its field")]
    OptionOverrun { code: u8 },
    #[error("option {code} is {len} bytes long, expected {expected}")]
    OptionLength { code: u8, len: usize, expected: &'static str },
    #[error("option overload (52) value {0} is not 1, 2 or 3")]
    Overload(u8),
}

/// Which socket a message arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The DHCP server port (67), shared with the real DHCP server.
    Dhcp,
    /// The PXE proxy port (4011), ours alone.
    Proxy,
}

/// What the responder needs to know about the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    server_ip: Ipv4Addr,
    script_url: String,
}

impl BootConfig {
    /// The boot information for a server at `server_ip` whose HTTP server
    /// listens on `http_port`. Fails when the iPXE script URL would not fit
    /// the BOOTP `file` field with its terminating NUL.
    pub fn new(server_ip: Ipv4Addr, http_port: u16) -> Result<Self, BootConfigError> {
        let script_url = format!("http://{server_ip}:{http_port}/{BOOT_SCRIPT}");
        if script_url.len() >= FILE_FIELD {
            return Err(BootConfigError::FileNameTooLong { len: script_url.len(), name: script_url });
        }
        Ok(Self { server_ip, script_url })
    }

    pub fn server_ip(&self) -> Ipv4Addr {
        self.server_ip
    }

    /// The boot file name iPXE clients get.
    pub fn script_url(&self) -> &str {
        &self.script_url
    }
}

/// What to do with a received datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Reply(Reply),
    /// Not for us (not a PXE client, or a message for the real DHCP
    /// server): no reply.
    Ignored(Ignored),
    /// Unreadable: no reply.
    Malformed(ProxyDhcpError),
    /// A PXE client we have nothing to boot with: no reply.
    Unsupported(Unsupported),
}

/// A reply to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub kind: ReplyKind,
    /// The DHCP message (UDP payload).
    pub message: Vec<u8>,
    pub to: Destination,
    pub client: MacAddr,
    /// What the `file` field says.
    pub boot_file: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    Offer,
    Ack,
}

/// Where a reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The broadcast address, client port (68): the client has no address.
    Broadcast,
    /// The relay agent that forwarded the request (`giaddr`), server port.
    Relay(Ipv4Addr),
    /// The request's source address and port.
    Requester,
}

/// Why a well-formed message got no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// A BOOTREPLY (another server's answer) or an unknown op.
    NotRequest {
        op: u8,
    },
    NotEthernet {
        htype: u8,
        hlen: u8,
    },
    /// No magic cookie or no message type: plain BOOTP.
    NotDhcp,
    /// No option 60 starting with "PXEClient".
    NotPxe,
    /// A message type we do not answer on this port.
    MessageType {
        message_type: u8,
        via: Via,
    },
    /// A request whose option 54 names another server.
    OtherServer(Ipv4Addr),
}

/// A PXE client that gets no reply because the bundle lacks what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub client: MacAddr,
    /// Option 93 (or what it was taken to be); `None` for iPXE without it.
    pub arch: Option<u16>,
    /// The bundle files that would serve it, any one of them; empty when no
    /// file serves this architecture.
    pub wanted: &'static [&'static str],
}

/// Answers one message received on the `via` socket.
pub fn respond(msg: &[u8], via: Via, cfg: &BootConfig, bundle: &Bundle) -> Outcome {
    match Request::parse(msg) {
        Ok(Ok(req)) => answer(&req, via, cfg, bundle),
        Ok(Err(ignored)) => Outcome::Ignored(ignored),
        Err(e) => Outcome::Malformed(e),
    }
}

fn answer(req: &Request<'_>, via: Via, cfg: &BootConfig, bundle: &Bundle) -> Outcome {
    let ty = req.message_type;
    let server_id = match req.address_option(OPT_SERVER_ID) {
        Ok(id) => id,
        Err(e) => return Outcome::Malformed(e),
    };
    let (kind, to) = match (via, ty) {
        (Via::Dhcp, DISCOVER) => (ReplyKind::Offer, broadcast_or_relay(req)),
        (Via::Dhcp, REQUEST) => match server_id {
            Some(id) if id == cfg.server_ip => (ReplyKind::Ack, broadcast_or_relay(req)),
            Some(id) => return Outcome::Ignored(Ignored::OtherServer(id)),
            None => return Outcome::Ignored(Ignored::MessageType { message_type: ty, via }),
        },
        (Via::Proxy, REQUEST | INFORM) => match server_id {
            Some(id) if id != cfg.server_ip => return Outcome::Ignored(Ignored::OtherServer(id)),
            _ => (ReplyKind::Ack, Destination::Requester),
        },
        _ => return Outcome::Ignored(Ignored::MessageType { message_type: ty, via }),
    };
    let boot_file = match boot_file(req, cfg, bundle) {
        Ok(Ok(f)) => f,
        Ok(Err(unsupported)) => return Outcome::Unsupported(unsupported),
        Err(e) => return Outcome::Malformed(e),
    };
    Outcome::Reply(Reply {
        kind,
        message: build_reply(req, kind, cfg.server_ip, &boot_file),
        to,
        client: req.client(),
        boot_file,
    })
}

fn broadcast_or_relay(req: &Request<'_>) -> Destination {
    if req.giaddr.is_unspecified() { Destination::Broadcast } else { Destination::Relay(req.giaddr) }
}

/// The boot file for the client, or why there is none.
fn boot_file(
    req: &Request<'_>,
    cfg: &BootConfig,
    bundle: &Bundle,
) -> Result<Result<String, Unsupported>, ProxyDhcpError> {
    let arch = req.arch()?;
    let unsupported = |arch, wanted| Unsupported { client: req.client(), arch, wanted };
    if req.is_ipxe() {
        return Ok(if bundle.contains(BOOT_SCRIPT) {
            Ok(cfg.script_url.clone())
        } else {
            Err(unsupported(arch, &[BOOT_SCRIPT]))
        });
    }
    let arch = arch.unwrap_or(ARCH_X86_BIOS);
    let wanted: &'static [&'static str] = match arch {
        ARCH_X86_BIOS => &[BIOS_LOADER],
        ARCH_EFI_BC | ARCH_EFI_X64 => &EFI_LOADERS,
        _ => &[],
    };
    Ok(match wanted.iter().find(|name| bundle.contains(name)) {
        Some(name) => Ok((*name).to_owned()),
        None => Err(unsupported(Some(arch), wanted)),
    })
}

/// Builds the OFFER or ACK for `req`. `boot_file` is shorter than the
/// `file` field (a bundle name, or the URL [`BootConfig::new`] checked).
fn build_reply(req: &Request<'_>, kind: ReplyKind, server_ip: Ipv4Addr, boot_file: &str) -> Vec<u8> {
    let mut m = vec![0u8; OPTIONS_AT];
    m[0] = BOOTREPLY;
    m[1] = HTYPE_ETHERNET;
    m[2] = 6;
    m[4..8].copy_from_slice(&req.xid);
    m[10..12].copy_from_slice(&req.flags);
    // RFC 2131 table 3: an ACK echoes ciaddr, an OFFER leaves it zero.
    if kind == ReplyKind::Ack {
        m[12..16].copy_from_slice(&req.ciaddr.octets());
    }
    m[20..24].copy_from_slice(&server_ip.octets());
    m[24..28].copy_from_slice(&req.giaddr.octets());
    m[28..44].copy_from_slice(&req.chaddr);
    let file = boot_file.as_bytes();
    let n = file.len().min(FILE_FIELD - 1);
    m[FILE_AT..FILE_AT + n].copy_from_slice(&file[..n]);
    m[MAGIC_AT..OPTIONS_AT].copy_from_slice(&MAGIC);

    let ty = match kind {
        ReplyKind::Offer => OFFER,
        ReplyKind::Ack => ACK,
    };
    push_option(&mut m, OPT_MESSAGE_TYPE, &[ty]);
    push_option(&mut m, OPT_SERVER_ID, &server_ip.octets());
    push_option(&mut m, OPT_VENDOR_CLASS, PXE_CLIENT);
    // RFC 4578 section 2.3: the server must echo the client's UUID.
    if let Some(uuid) = req.option(OPT_CLIENT_UUID) {
        push_option(&mut m, OPT_CLIENT_UUID, uuid);
    }
    push_option(&mut m, OPT_VENDOR_SPECIFIC, &[PXE_DISCOVERY_CONTROL, 1, DISCOVERY_USE_FILE, OPT_END]);
    m.push(OPT_END);
    if m.len() < MIN_MESSAGE {
        m.resize(MIN_MESSAGE, OPT_PAD);
    }
    m
}

/// Appends option `code`; values come from a parsed option or are ours,
/// so they are at most 255 bytes.
fn push_option(m: &mut Vec<u8>, code: u8, value: &[u8]) {
    let len = u8::try_from(value.len()).expect("option values come from one-byte length fields");
    m.push(code);
    m.push(len);
    m.extend_from_slice(value);
}

/// A DHCP client message that passed the checks every answer needs.
#[derive(Debug)]
struct Request<'a> {
    xid: [u8; 4],
    flags: [u8; 2],
    ciaddr: Ipv4Addr,
    giaddr: Ipv4Addr,
    chaddr: [u8; 16],
    message_type: u8,
    /// Options in the order sent, from the options field and then from
    /// `file` and `sname` when option 52 says so (pad and end left out).
    options: Vec<(u8, &'a [u8])>,
}

impl<'a> Request<'a> {
    /// `Ok(Err(_))` for well-formed messages that are not PXE client
    /// requests.
    fn parse(b: &'a [u8]) -> Result<Result<Self, Ignored>, ProxyDhcpError> {
        let Some(fixed) = b.get(..OPTIONS_AT) else {
            return Err(ProxyDhcpError::Truncated(b.len()));
        };
        let ip = |at: usize| Ipv4Addr::new(fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]);
        if fixed[0] != BOOTREQUEST {
            return Ok(Err(Ignored::NotRequest { op: fixed[0] }));
        }
        if fixed[1] != HTYPE_ETHERNET || fixed[2] != 6 {
            return Ok(Err(Ignored::NotEthernet { htype: fixed[1], hlen: fixed[2] }));
        }
        if fixed[MAGIC_AT..OPTIONS_AT] != MAGIC {
            return Ok(Err(Ignored::NotDhcp));
        }
        let mut options = Vec::new();
        parse_options(&b[OPTIONS_AT..], &mut options)?;
        let overload = options.iter().find(|(c, _)| *c == OPT_OVERLOAD).map(|&(_, v)| v);
        match overload {
            None => {}
            Some(&[v @ 1..=3]) => {
                // RFC 2131 section 4.1: options, then file, then sname.
                if v & 1 != 0 {
                    parse_options(&fixed[FILE_AT..MAGIC_AT], &mut options)?;
                }
                if v & 2 != 0 {
                    parse_options(&fixed[SNAME_AT..FILE_AT], &mut options)?;
                }
            }
            Some(&[v]) => return Err(ProxyDhcpError::Overload(v)),
            Some(v) => {
                return Err(ProxyDhcpError::OptionLength { code: OPT_OVERLOAD, len: v.len(), expected: "1" });
            }
        }
        let message_type = match options.iter().find(|(c, _)| *c == OPT_MESSAGE_TYPE) {
            None => return Ok(Err(Ignored::NotDhcp)),
            Some(&(_, &[ty])) => ty,
            Some((_, v)) => {
                return Err(ProxyDhcpError::OptionLength {
                    code: OPT_MESSAGE_TYPE,
                    len: v.len(),
                    expected: "1",
                });
            }
        };
        let is_pxe = options
            .iter()
            .find(|(c, _)| *c == OPT_VENDOR_CLASS)
            .is_some_and(|(_, v)| v.starts_with(PXE_CLIENT));
        if !is_pxe {
            return Ok(Err(Ignored::NotPxe));
        }
        let mut xid = [0u8; 4];
        xid.copy_from_slice(&fixed[4..8]);
        let mut chaddr = [0u8; 16];
        chaddr.copy_from_slice(&fixed[28..44]);
        Ok(Ok(Request {
            xid,
            flags: [fixed[10], fixed[11]],
            ciaddr: ip(12),
            giaddr: ip(24),
            chaddr,
            message_type,
            options,
        }))
    }

    fn client(&self) -> MacAddr {
        let c = &self.chaddr;
        MacAddr([c[0], c[1], c[2], c[3], c[4], c[5]])
    }

    /// The first instance of option `code`.
    fn option(&self, code: u8) -> Option<&'a [u8]> {
        self.options.iter().find(|(c, _)| *c == code).map(|&(_, v)| v)
    }

    fn address_option(&self, code: u8) -> Result<Option<Ipv4Addr>, ProxyDhcpError> {
        match self.option(code) {
            None => Ok(None),
            Some(&[a, b, c, d]) => Ok(Some(Ipv4Addr::new(a, b, c, d))),
            Some(v) => Err(ProxyDhcpError::OptionLength { code, len: v.len(), expected: "4" }),
        }
    }

    fn is_ipxe(&self) -> bool {
        self.option(OPT_IPXE_ENCAP).is_some()
            || self.option(OPT_USER_CLASS).is_some_and(|v| v.windows(4).any(|w| w == b"iPXE"))
    }

    /// The client architecture: the first entry of option 93, else the
    /// "Arch:NNNNN" field of option 60.
    fn arch(&self) -> Result<Option<u16>, ProxyDhcpError> {
        match self.option(OPT_CLIENT_ARCH) {
            Some(&[hi, lo, ref rest @ ..]) if rest.len() % 2 == 0 => {
                return Ok(Some(u16::from_be_bytes([hi, lo])));
            }
            Some(v) => {
                return Err(ProxyDhcpError::OptionLength {
                    code: OPT_CLIENT_ARCH,
                    len: v.len(),
                    expected: "a non-zero multiple of 2",
                });
            }
            None => {}
        }
        // "PXEClient:Arch:00007:UNDI:003016" (PXE 2.1 specification).
        let class = self.option(OPT_VENDOR_CLASS).unwrap_or_default();
        let arch = class
            .strip_prefix(b"PXEClient:Arch:")
            .and_then(|rest| rest.get(..5))
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| digits.parse().ok());
        Ok(arch)
    }
}

/// Splits an options area into (code, value) pairs, appending to `out`
/// (the switch's reader: the end option may be missing, an overrun is refused).
fn parse_options<'a>(b: &'a [u8], out: &mut Vec<(u8, &'a [u8])>) -> Result<(), ProxyDhcpError> {
    nodeos_switch::dhcp::split_options(b, out).map_err(|code| ProxyDhcpError::OptionOverrun { code })
}

/// Remembers which clients were already reported as unsupported, so a
/// machine retrying its DISCOVER every few seconds is logged once. Bounded:
/// the oldest entry is forgotten when full.
#[derive(Debug)]
pub struct ReportedClients {
    seen: HashSet<MacAddr>,
    order: VecDeque<MacAddr>,
    capacity: usize,
}

impl ReportedClients {
    pub fn new(capacity: usize) -> Self {
        Self { seen: HashSet::new(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    /// True the first time `mac` is seen (since it was last forgotten).
    pub fn first_report(&mut self, mac: MacAddr) -> bool {
        if !self.seen.insert(mac) {
            return false;
        }
        self.order.push_back(mac);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const US: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
    const UUID: [u8; 17] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

    /// A client message with the given type and extra options.
    fn client_message(message_type: u8, options: &[(u8, &[u8])]) -> Vec<u8> {
        let mut m = vec![0u8; OPTIONS_AT];
        m[0] = BOOTREQUEST;
        m[1] = HTYPE_ETHERNET;
        m[2] = 6;
        m[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        m[10] = 0x80;
        m[28..34].copy_from_slice(&MAC);
        m[MAGIC_AT..].copy_from_slice(&MAGIC);
        push_option(&mut m, OPT_MESSAGE_TYPE, &[message_type]);
        for (code, value) in options {
            push_option(&mut m, *code, value);
        }
        m.push(OPT_END);
        m
    }

    fn bios_rom(message_type: u8) -> Vec<u8> {
        client_message(
            message_type,
            &[
                (OPT_VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001"),
                (OPT_CLIENT_ARCH, &[0, 0]),
                (OPT_CLIENT_NDI, &[1, 2, 1]),
                (OPT_CLIENT_UUID, &UUID),
            ],
        )
    }

    fn ipxe(message_type: u8, extra: &[(u8, &[u8])]) -> Vec<u8> {
        let mut options: Vec<(u8, &[u8])> = vec![
            (OPT_VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001"),
            (OPT_CLIENT_ARCH, &[0, 0]),
            (OPT_USER_CLASS, b"iPXE"),
            (OPT_IPXE_ENCAP, &[0x13, 1, 1]),
        ];
        options.extend_from_slice(extra);
        client_message(message_type, &options)
    }

    fn cfg() -> BootConfig {
        BootConfig::new(US, 7780).unwrap()
    }

    fn bundle(names: &[&str]) -> Bundle {
        let mut b = Bundle::new();
        for name in names {
            b.insert(name, Bytes::from_static(b"data")).unwrap();
        }
        b
    }

    fn full() -> Bundle {
        bundle(&["vmlinuz", "initramfs.img", BOOT_SCRIPT, BIOS_LOADER, "ipxe.efi"])
    }

    fn reply(o: Outcome) -> Reply {
        match o {
            Outcome::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// The options of a reply, as (code, value).
    fn reply_options(m: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        parse_options(&m[OPTIONS_AT..], &mut out).unwrap();
        out.into_iter().map(|(c, v)| (c, v.to_vec())).collect()
    }

    fn file_field(m: &[u8]) -> String {
        let f = &m[FILE_AT..MAGIC_AT];
        let end = f.iter().position(|&b| b == 0).unwrap();
        assert!(f[end..].iter().all(|&b| b == 0), "file field is NUL padded");
        String::from_utf8(f[..end].to_vec()).unwrap()
    }

    fn check_common(r: &Reply, ty: u8) {
        let m = &r.message;
        assert!(m.len() >= MIN_MESSAGE && m.len() <= 548, "{}", m.len());
        assert_eq!(m[0], BOOTREPLY);
        assert_eq!(&m[1..3], &[1, 6]);
        assert_eq!(&m[4..8], &[0xde, 0xad, 0xbe, 0xef], "xid");
        assert_eq!(&m[10..12], &[0x80, 0], "flags");
        assert_eq!(&m[16..20], &[0, 0, 0, 0], "yiaddr");
        assert_eq!(&m[20..24], &US.octets(), "siaddr");
        assert_eq!(&m[28..34], &MAC, "chaddr");
        assert_eq!(&m[MAGIC_AT..OPTIONS_AT], &MAGIC);
        assert_eq!(file_field(m), r.boot_file);
        assert_eq!(r.client, MacAddr(MAC));
        let opts = reply_options(m);
        let get = |code| opts.iter().find(|(c, _)| *c == code).map(|(_, v)| v.clone());
        assert_eq!(get(OPT_MESSAGE_TYPE), Some(vec![ty]));
        assert_eq!(get(OPT_SERVER_ID), Some(US.octets().to_vec()));
        assert_eq!(get(OPT_VENDOR_CLASS), Some(b"PXEClient".to_vec()));
        assert_eq!(get(OPT_VENDOR_SPECIFIC), Some(vec![6, 1, 8, 255]));
    }

    #[test]
    fn ipxe_discover_gets_the_script_url() {
        let r = reply(respond(&ipxe(DISCOVER, &[]), Via::Dhcp, &cfg(), &full()));
        assert_eq!(r.kind, ReplyKind::Offer);
        assert_eq!(r.to, Destination::Broadcast);
        assert_eq!(r.boot_file, "http://10.0.0.5:7780/boot.ipxe");
        check_common(&r, OFFER);
    }

    #[test]
    fn ipxe_is_recognised_by_either_option() {
        let only_user_class = client_message(
            DISCOVER,
            &[(OPT_VENDOR_CLASS, b"PXEClient"), (OPT_CLIENT_ARCH, &[0, 7]), (OPT_USER_CLASS, b"xx-iPXE-yy")],
        );
        let only_encap = client_message(
            DISCOVER,
            &[(OPT_VENDOR_CLASS, b"PXEClient"), (OPT_CLIENT_ARCH, &[0, 7]), (OPT_IPXE_ENCAP, &[])],
        );
        for msg in [only_user_class, only_encap] {
            let r = reply(respond(&msg, Via::Dhcp, &cfg(), &full()));
            assert_eq!(r.boot_file, "http://10.0.0.5:7780/boot.ipxe");
        }
    }

    #[test]
    fn ipxe_without_script_is_unsupported() {
        let o = respond(&ipxe(DISCOVER, &[]), Via::Dhcp, &cfg(), &bundle(&[BIOS_LOADER]));
        assert_eq!(
            o,
            Outcome::Unsupported(Unsupported { client: MacAddr(MAC), arch: Some(0), wanted: &[BOOT_SCRIPT] })
        );
    }

    #[test]
    fn bios_rom_gets_undionly_when_present() {
        let r = reply(respond(&bios_rom(DISCOVER), Via::Dhcp, &cfg(), &full()));
        assert_eq!(r.boot_file, BIOS_LOADER);
        check_common(&r, OFFER);
    }

    #[test]
    fn bios_rom_without_undionly_is_unsupported() {
        let o = respond(&bios_rom(DISCOVER), Via::Dhcp, &cfg(), &bundle(&[BOOT_SCRIPT, "ipxe.efi"]));
        assert_eq!(
            o,
            Outcome::Unsupported(Unsupported { client: MacAddr(MAC), arch: Some(0), wanted: &[BIOS_LOADER] })
        );
    }

    #[test]
    fn efi_rom_prefers_ipxe_efi_then_snponly() {
        for arch in [ARCH_EFI_BC, ARCH_EFI_X64] {
            let msg = client_message(
                DISCOVER,
                &[
                    (OPT_VENDOR_CLASS, b"PXEClient:Arch:00007:UNDI:003016"),
                    (OPT_CLIENT_ARCH, &arch.to_be_bytes()),
                ],
            );
            let both = bundle(&["ipxe.efi", "snponly.efi"]);
            assert_eq!(reply(respond(&msg, Via::Dhcp, &cfg(), &both)).boot_file, "ipxe.efi");
            let snp = bundle(&["snponly.efi"]);
            assert_eq!(reply(respond(&msg, Via::Dhcp, &cfg(), &snp)).boot_file, "snponly.efi");
            let none = bundle(&[BIOS_LOADER]);
            assert_eq!(
                respond(&msg, Via::Dhcp, &cfg(), &none),
                Outcome::Unsupported(Unsupported {
                    client: MacAddr(MAC),
                    arch: Some(arch),
                    wanted: &EFI_LOADERS
                })
            );
        }
    }

    #[test]
    fn unknown_arch_is_unsupported() {
        let msg = client_message(DISCOVER, &[(OPT_VENDOR_CLASS, b"PXEClient"), (OPT_CLIENT_ARCH, &[0, 11])]);
        assert_eq!(
            respond(&msg, Via::Dhcp, &cfg(), &full()),
            Outcome::Unsupported(Unsupported { client: MacAddr(MAC), arch: Some(11), wanted: &[] })
        );
    }

    #[test]
    fn arch_falls_back_to_vendor_class_then_bios() {
        let efi = client_message(DISCOVER, &[(OPT_VENDOR_CLASS, b"PXEClient:Arch:00009:UNDI:003016")]);
        assert_eq!(reply(respond(&efi, Via::Dhcp, &cfg(), &full())).boot_file, "ipxe.efi");
        let bare = client_message(DISCOVER, &[(OPT_VENDOR_CLASS, b"PXEClient")]);
        assert_eq!(reply(respond(&bare, Via::Dhcp, &cfg(), &full())).boot_file, BIOS_LOADER);
    }

    #[test]
    fn uuid_is_echoed_only_when_sent() {
        let r = reply(respond(&bios_rom(DISCOVER), Via::Dhcp, &cfg(), &full()));
        assert!(reply_options(&r.message).contains(&(OPT_CLIENT_UUID, UUID.to_vec())));
        let r = reply(respond(&ipxe(DISCOVER, &[]), Via::Dhcp, &cfg(), &full()));
        assert!(!reply_options(&r.message).iter().any(|(c, _)| *c == OPT_CLIENT_UUID));
    }

    #[test]
    fn request_on_dhcp_port_for_another_server_is_ignored() {
        let other = [10, 0, 0, 1];
        let msg = ipxe(REQUEST, &[(OPT_SERVER_ID, &other), (50, &[10, 0, 0, 77])]);
        assert_eq!(
            respond(&msg, Via::Dhcp, &cfg(), &full()),
            Outcome::Ignored(Ignored::OtherServer(Ipv4Addr::new(10, 0, 0, 1)))
        );
        let no_id = ipxe(REQUEST, &[]);
        assert_eq!(
            respond(&no_id, Via::Dhcp, &cfg(), &full()),
            Outcome::Ignored(Ignored::MessageType { message_type: REQUEST, via: Via::Dhcp })
        );
    }

    #[test]
    fn request_on_dhcp_port_naming_us_is_acked() {
        let msg = bios_rom(REQUEST);
        let mut msg = msg[..msg.len() - 1].to_vec();
        push_option(&mut msg, OPT_SERVER_ID, &US.octets());
        msg.push(OPT_END);
        let r = reply(respond(&msg, Via::Dhcp, &cfg(), &full()));
        assert_eq!(r.kind, ReplyKind::Ack);
        assert_eq!(r.to, Destination::Broadcast);
        check_common(&r, ACK);
    }

    #[test]
    fn proxy_port_request_and_inform_get_a_unicast_ack() {
        for ty in [REQUEST, INFORM] {
            let mut msg = ipxe(ty, &[(OPT_SERVER_ID, &US.octets())]);
            msg[12..16].copy_from_slice(&[10, 0, 0, 77]);
            let r = reply(respond(&msg, Via::Proxy, &cfg(), &full()));
            assert_eq!(r.kind, ReplyKind::Ack);
            assert_eq!(r.to, Destination::Requester);
            assert_eq!(&r.message[12..16], &[10, 0, 0, 77], "ACK echoes ciaddr");
            check_common(&r, ACK);
        }
        let no_id = bios_rom(REQUEST);
        assert_eq!(reply(respond(&no_id, Via::Proxy, &cfg(), &full())).boot_file, BIOS_LOADER);
        let other = ipxe(REQUEST, &[(OPT_SERVER_ID, &[10, 9, 9, 9])]);
        assert!(matches!(
            respond(&other, Via::Proxy, &cfg(), &full()),
            Outcome::Ignored(Ignored::OtherServer(_))
        ));
    }

    #[test]
    fn unanswered_message_types() {
        for (ty, via) in
            [(DISCOVER, Via::Proxy), (INFORM, Via::Dhcp), (4, Via::Dhcp), (7, Via::Proxy), (99, Via::Dhcp)]
        {
            assert_eq!(
                respond(&bios_rom(ty), via, &cfg(), &full()),
                Outcome::Ignored(Ignored::MessageType { message_type: ty, via })
            );
        }
    }

    #[test]
    fn relayed_discover_goes_to_the_relay() {
        let mut msg = bios_rom(DISCOVER);
        msg[24..28].copy_from_slice(&[10, 1, 0, 1]);
        let r = reply(respond(&msg, Via::Dhcp, &cfg(), &full()));
        assert_eq!(r.to, Destination::Relay(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(&r.message[24..28], &[10, 1, 0, 1]);
    }

    #[test]
    fn non_pxe_and_non_dhcp_are_ignored() {
        let plain = client_message(DISCOVER, &[(OPT_VENDOR_CLASS, b"MSFT 5.0")]);
        assert_eq!(respond(&plain, Via::Dhcp, &cfg(), &full()), Outcome::Ignored(Ignored::NotPxe));
        let no_class = client_message(DISCOVER, &[]);
        assert_eq!(respond(&no_class, Via::Dhcp, &cfg(), &full()), Outcome::Ignored(Ignored::NotPxe));

        let mut reply_op = bios_rom(DISCOVER);
        reply_op[0] = BOOTREPLY;
        assert_eq!(
            respond(&reply_op, Via::Dhcp, &cfg(), &full()),
            Outcome::Ignored(Ignored::NotRequest { op: 2 })
        );

        let mut ib = bios_rom(DISCOVER);
        ib[1] = 32;
        ib[2] = 0;
        assert_eq!(
            respond(&ib, Via::Dhcp, &cfg(), &full()),
            Outcome::Ignored(Ignored::NotEthernet { htype: 32, hlen: 0 })
        );

        let mut bootp = bios_rom(DISCOVER);
        bootp[MAGIC_AT] = 0;
        assert_eq!(respond(&bootp, Via::Dhcp, &cfg(), &full()), Outcome::Ignored(Ignored::NotDhcp));

        let mut no_type = bios_rom(DISCOVER);
        no_type[OPTIONS_AT] = OPT_PAD;
        no_type[OPTIONS_AT + 1] = OPT_PAD;
        no_type[OPTIONS_AT + 2] = OPT_PAD;
        assert_eq!(respond(&no_type, Via::Dhcp, &cfg(), &full()), Outcome::Ignored(Ignored::NotDhcp));
    }

    #[test]
    fn malformed_messages() {
        let cfg = cfg();
        let b = full();
        assert_eq!(respond(&[], Via::Dhcp, &cfg, &b), Outcome::Malformed(ProxyDhcpError::Truncated(0)));
        let msg = bios_rom(DISCOVER);
        assert_eq!(
            respond(&msg[..239], Via::Dhcp, &cfg, &b),
            Outcome::Malformed(ProxyDhcpError::Truncated(239))
        );
        let mut overrun = msg[..OPTIONS_AT].to_vec();
        overrun.extend_from_slice(&[OPT_MESSAGE_TYPE, 5, DISCOVER]);
        assert_eq!(
            respond(&overrun, Via::Dhcp, &cfg, &b),
            Outcome::Malformed(ProxyDhcpError::OptionOverrun { code: OPT_MESSAGE_TYPE })
        );
        let bad_arch = client_message(DISCOVER, &[(OPT_VENDOR_CLASS, b"PXEClient"), (OPT_CLIENT_ARCH, &[0])]);
        assert!(matches!(
            respond(&bad_arch, Via::Dhcp, &cfg, &b),
            Outcome::Malformed(ProxyDhcpError::OptionLength { code: OPT_CLIENT_ARCH, len: 1, .. })
        ));
        let bad_id = ipxe(REQUEST, &[(OPT_SERVER_ID, &[1, 2, 3])]);
        assert!(matches!(
            respond(&bad_id, Via::Proxy, &cfg, &b),
            Outcome::Malformed(ProxyDhcpError::OptionLength { code: OPT_SERVER_ID, len: 3, .. })
        ));
        let bad_type = client_message(DISCOVER, &[(OPT_MESSAGE_TYPE, &[1, 1])]);
        let mut bad_type = bad_type[..OPTIONS_AT].to_vec();
        bad_type.extend_from_slice(&[OPT_MESSAGE_TYPE, 2, 1, 1, OPT_END]);
        assert!(matches!(
            respond(&bad_type, Via::Dhcp, &cfg, &b),
            Outcome::Malformed(ProxyDhcpError::OptionLength { code: OPT_MESSAGE_TYPE, .. })
        ));
    }

    #[test]
    fn overloaded_options_are_read() {
        // Option 60 and 93 in the file field, announced by option 52.
        let mut m = client_message(DISCOVER, &[(OPT_OVERLOAD, &[1])]);
        let area =
            [OPT_VENDOR_CLASS, 9, b'P', b'X', b'E', b'C', b'l', b'i', b'e', b'n', b't', 93, 2, 0, 9, 255];
        m[FILE_AT..FILE_AT + area.len()].copy_from_slice(&area);
        assert_eq!(reply(respond(&m, Via::Dhcp, &cfg(), &full())).boot_file, "ipxe.efi");
        let bad = client_message(DISCOVER, &[(OPT_OVERLOAD, &[4])]);
        assert_eq!(
            respond(&bad, Via::Dhcp, &cfg(), &full()),
            Outcome::Malformed(ProxyDhcpError::Overload(4))
        );
    }

    #[test]
    fn boot_config_url_fits_the_file_field() {
        let c = BootConfig::new(Ipv4Addr::new(255, 255, 255, 255), 65535).unwrap();
        assert!(c.script_url().len() < FILE_FIELD);
        assert_eq!(c.server_ip(), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn reported_clients_is_bounded() {
        let mut r = ReportedClients::new(2);
        let mac = |n| MacAddr([0, 0, 0, 0, 0, n]);
        assert!(r.first_report(mac(1)));
        assert!(!r.first_report(mac(1)));
        assert!(r.first_report(mac(2)));
        assert!(r.first_report(mac(3)));
        assert_eq!(r.seen.len(), 2);
        assert!(r.first_report(mac(1)), "forgotten when full");
        assert!(!r.first_report(mac(3)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let b = full();
            let _ = respond(&bytes, Via::Dhcp, &cfg(), &b);
            let _ = respond(&bytes, Via::Proxy, &cfg(), &b);
        }

        #[test]
        fn arbitrary_options_never_panic(
            ty in 0u8..10,
            tail in proptest::collection::vec(any::<u8>(), 0..400),
            fixed in proptest::collection::vec(any::<u8>(), 236 - 44),
        ) {
            let mut m = bios_rom(ty);
            m[44..236].copy_from_slice(&fixed);
            m.truncate(OPTIONS_AT + 3);
            m.extend_from_slice(&tail);
            let b = full();
            for via in [Via::Dhcp, Via::Proxy] {
                if let Outcome::Reply(r) = respond(&m, via, &cfg(), &b) {
                    prop_assert!(r.message.len() >= MIN_MESSAGE && r.message.len() <= 548);
                }
            }
        }
    }
}
