//! The proxy DHCP responder (PXE 2.1 specification, RFC 4578): boot
//! information for PXE clients, never addresses.
//!
//! Another DHCP server on the fabric leases addresses. A PXE client
//! broadcasts its DHCPDISCOVER to port 67 and collects offers from both: the
//! real server's carries an address (`yiaddr`), ours carries `yiaddr`
//! 0.0.0.0, `siaddr` = us, option 60 "PXEClient" and the boot file name in
//! the BOOTP `file` field. [`respond`] is a pure function from one received
//! datagram to what to send back; the server owns the sockets, and
//! `nodeos_dhcp` the message format.
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

use nodeos_dhcp::{
    ACK, BOOTREQUEST, DISCOVER, FILE_LEN, Header, HeaderError, INFORM, MessageBuilder, OFFER, OPT_END,
    OPT_MESSAGE_TYPE, OPT_SERVER_ID, OPT_VENDOR_CLASS, OPT_VENDOR_SPECIFIC, OptionError, Options, REQUEST,
};
use nodeos_types::net::MacAddr;

use crate::bundle::Bundle;

/// Where ProxyDHCPREQUESTs go (PXE 2.1 specification).
pub const PROXY_PORT: u16 = 4011;

// PXE options (RFC 4578, PXE 2.1 specification, iPXE); 43 (PXE sub-options
// inside) and 60 ("PXEClient...") are RFC 2132's, from `nodeos_dhcp`.
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

/// A boot configuration that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootConfigError {
    #[error("boot file name {name:?} is {len} bytes; the BOOTP file field holds at most 127")]
    FileNameTooLong { name: String, len: usize },
}

/// Why a message on a DHCP socket could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyDhcpError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error(transparent)]
    Options(#[from] OptionError),
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
        if script_url.len() >= FILE_LEN {
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
    let server_id = match req.options.address(OPT_SERVER_ID) {
        Ok(id) => id,
        Err(e) => return Outcome::Malformed(e.into()),
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
    let relay = req.header.giaddr;
    if relay.is_unspecified() { Destination::Broadcast } else { Destination::Relay(relay) }
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

/// Builds the OFFER or ACK for `req`.
fn build_reply(req: &Request<'_>, kind: ReplyKind, server_ip: Ipv4Addr, boot_file: &str) -> Vec<u8> {
    let mut header = Header::reply_to(&req.header);
    // RFC 2131 table 3: an ACK echoes ciaddr, an OFFER leaves it zero.
    if kind == ReplyKind::Ack {
        header.ciaddr = req.header.ciaddr;
    }
    header.siaddr = server_ip;
    header
        .set_file_name(boot_file.as_bytes())
        .expect("boot files are bundle loader names or the URL BootConfig::new checked against the field");
    let mut m = MessageBuilder::new(&header);
    let ty = match kind {
        ReplyKind::Offer => OFFER,
        ReplyKind::Ack => ACK,
    };
    // All of it fits the size limit: with the longest UUID a client can
    // send, the message is 524 bytes.
    m.push(OPT_MESSAGE_TYPE, &[ty]);
    m.push(OPT_SERVER_ID, &server_ip.octets());
    m.push(OPT_VENDOR_CLASS, PXE_CLIENT);
    // RFC 4578 section 2.3: the server must echo the client's UUID.
    if let Some(uuid) = req.options.get(OPT_CLIENT_UUID) {
        m.push(OPT_CLIENT_UUID, uuid);
    }
    m.push(OPT_VENDOR_SPECIFIC, &[PXE_DISCOVERY_CONTROL, 1, DISCOVERY_USE_FILE, OPT_END]);
    m.finish()
}

/// A DHCP client message that passed the checks every answer needs.
#[derive(Debug)]
struct Request<'a> {
    header: Header,
    message_type: u8,
    /// From the options field, and `file` and `sname` when option 52 says so.
    options: Options<'a>,
}

impl<'a> Request<'a> {
    /// `Ok(Err(_))` for well-formed messages that are not PXE client
    /// requests.
    fn parse(b: &'a [u8]) -> Result<Result<Self, Ignored>, ProxyDhcpError> {
        let header = Header::parse(b)?;
        if header.op != BOOTREQUEST {
            return Ok(Err(Ignored::NotRequest { op: header.op }));
        }
        if !header.is_ethernet() {
            return Ok(Err(Ignored::NotEthernet { htype: header.htype, hlen: header.hlen }));
        }
        if !header.is_dhcp() {
            return Ok(Err(Ignored::NotDhcp));
        }
        let options = Options::parse(b)?;
        let Some(message_type) = options.message_type()? else {
            return Ok(Err(Ignored::NotDhcp));
        };
        if !options.get(OPT_VENDOR_CLASS).is_some_and(|v| v.starts_with(PXE_CLIENT)) {
            return Ok(Err(Ignored::NotPxe));
        }
        Ok(Ok(Request { header, message_type, options }))
    }

    fn client(&self) -> MacAddr {
        MacAddr(self.header.mac())
    }

    fn is_ipxe(&self) -> bool {
        self.options.get(OPT_IPXE_ENCAP).is_some()
            || self.options.get(OPT_USER_CLASS).is_some_and(|v| v.windows(4).any(|w| w == b"iPXE"))
    }

    /// The client architecture: the first entry of option 93, else the
    /// "Arch:NNNNN" field of option 60.
    fn arch(&self) -> Result<Option<u16>, ProxyDhcpError> {
        match self.options.get(OPT_CLIENT_ARCH) {
            Some(&[hi, lo, ref rest @ ..]) if rest.len() % 2 == 0 => {
                return Ok(Some(u16::from_be_bytes([hi, lo])));
            }
            Some(v) => {
                let expected = "a non-zero multiple of 2";
                return Err(OptionError::Length { code: OPT_CLIENT_ARCH, len: v.len(), expected }.into());
            }
            None => {}
        }
        // "PXEClient:Arch:00007:UNDI:003016" (PXE 2.1 specification).
        let class = self.options.get(OPT_VENDOR_CLASS).unwrap_or_default();
        let arch = class
            .strip_prefix(b"PXEClient:Arch:")
            .and_then(|rest| rest.get(..5))
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| digits.parse().ok());
        Ok(arch)
    }
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
    use nodeos_dhcp::{
        BOOTREPLY, FILE_AT, MAGIC, MAGIC_AT, MIN_MESSAGE, OPT_OVERLOAD, OPT_PAD, OPTIONS_AT, SNAME_AT,
    };
    use proptest::prelude::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const US: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
    const UUID: [u8; 17] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

    /// A client message with the given type and extra options.
    fn client_message(message_type: u8, options: &[(u8, &[u8])]) -> Vec<u8> {
        let mut h = Header::new(BOOTREQUEST, 0xdead_beef, MAC);
        h.flags = nodeos_dhcp::BROADCAST_FLAG;
        let mut m = MessageBuilder::new(&h);
        assert!(m.push(OPT_MESSAGE_TYPE, &[message_type]));
        for (code, value) in options {
            assert!(m.push(*code, value));
        }
        m.finish()
    }

    fn bios_rom(message_type: u8) -> Vec<u8> {
        bios_rom_with(message_type, &[])
    }

    fn bios_rom_with(message_type: u8, extra: &[(u8, &[u8])]) -> Vec<u8> {
        let mut options: Vec<(u8, &[u8])> = vec![
            (OPT_VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001"),
            (OPT_CLIENT_ARCH, &[0, 0]),
            (OPT_CLIENT_NDI, &[1, 2, 1]),
            (OPT_CLIENT_UUID, &UUID),
        ];
        options.extend_from_slice(extra);
        client_message(message_type, &options)
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
        Options::parse(m).unwrap().iter().map(|(c, v)| (c, v.to_vec())).collect()
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
        let msg = bios_rom_with(REQUEST, &[(OPT_SERVER_ID, &US.octets())]);
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
        assert_eq!(
            respond(&[], Via::Dhcp, &cfg, &b),
            Outcome::Malformed(ProxyDhcpError::Header(HeaderError::Truncated(0)))
        );
        let msg = bios_rom(DISCOVER);
        assert_eq!(
            respond(&msg[..239], Via::Dhcp, &cfg, &b),
            Outcome::Malformed(ProxyDhcpError::Header(HeaderError::Truncated(239)))
        );
        let mut overrun = msg[..OPTIONS_AT].to_vec();
        overrun.extend_from_slice(&[OPT_MESSAGE_TYPE, 5, DISCOVER]);
        assert_eq!(
            respond(&overrun, Via::Dhcp, &cfg, &b),
            Outcome::Malformed(ProxyDhcpError::Options(OptionError::Overrun { code: OPT_MESSAGE_TYPE }))
        );
        let bad_arch = client_message(DISCOVER, &[(OPT_VENDOR_CLASS, b"PXEClient"), (OPT_CLIENT_ARCH, &[0])]);
        assert!(matches!(
            respond(&bad_arch, Via::Dhcp, &cfg, &b),
            Outcome::Malformed(ProxyDhcpError::Options(OptionError::Length {
                code: OPT_CLIENT_ARCH,
                len: 1,
                ..
            }))
        ));
        let bad_id = ipxe(REQUEST, &[(OPT_SERVER_ID, &[1, 2, 3])]);
        assert!(matches!(
            respond(&bad_id, Via::Proxy, &cfg, &b),
            Outcome::Malformed(ProxyDhcpError::Options(OptionError::Length {
                code: OPT_SERVER_ID,
                len: 3,
                ..
            }))
        ));
        let bad_type = client_message(DISCOVER, &[(OPT_MESSAGE_TYPE, &[1, 1])]);
        let mut bad_type = bad_type[..OPTIONS_AT].to_vec();
        bad_type.extend_from_slice(&[OPT_MESSAGE_TYPE, 2, 1, 1, OPT_END]);
        assert!(matches!(
            respond(&bad_type, Via::Dhcp, &cfg, &b),
            Outcome::Malformed(ProxyDhcpError::Options(OptionError::Length { code: OPT_MESSAGE_TYPE, .. }))
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
            Outcome::Malformed(ProxyDhcpError::Options(OptionError::Overload(4)))
        );
    }

    #[test]
    fn boot_config_url_fits_the_file_field() {
        let c = BootConfig::new(Ipv4Addr::new(255, 255, 255, 255), 65535).unwrap();
        assert!(c.script_url().len() < nodeos_dhcp::FILE_LEN);
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
            fixed in proptest::collection::vec(any::<u8>(), MAGIC_AT - SNAME_AT),
        ) {
            let mut m = bios_rom(ty);
            m[SNAME_AT..MAGIC_AT].copy_from_slice(&fixed);
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
