//! The numbers RFC 2131 and RFC 2132 assign: UDP ports, BOOTP op codes,
//! hardware types, flags, DHCP message types and option codes.

/// The UDP port servers and relay agents listen on.
pub const SERVER_PORT: u16 = 67;
/// The UDP port clients listen on.
pub const CLIENT_PORT: u16 = 68;

/// `op` of a message from a client.
pub const BOOTREQUEST: u8 = 1;
/// `op` of a message from a server.
pub const BOOTREPLY: u8 = 2;
/// `htype` of Ethernet (the ARP hardware type, RFC 1700).
pub const HTYPE_ETHERNET: u8 = 1;
/// `hlen` of Ethernet: a MAC is six bytes.
pub const HLEN_ETHERNET: u8 = 6;
/// The one defined bit of `flags`: the client cannot take unicast before it
/// has an address, so the reply must be broadcast (RFC 2131 section 4.1).
pub const BROADCAST_FLAG: u16 = 0x8000;

// Message types: the value of option 53 (RFC 2132 section 9.6).
/// A client looks for servers.
pub const DISCOVER: u8 = 1;
/// A server offers an address.
pub const OFFER: u8 = 2;
/// A client takes an offer, confirms or extends its lease.
pub const REQUEST: u8 = 3;
/// A client found the offered address in use.
pub const DECLINE: u8 = 4;
/// A server confirms a lease, or answers an INFORM.
pub const ACK: u8 = 5;
/// A server refuses a REQUEST.
pub const NAK: u8 = 6;
/// A client gives its address back.
pub const RELEASE: u8 = 7;
/// A client with an address asks for configuration only.
pub const INFORM: u8 = 8;

// Option codes (RFC 2132).
/// Fills space; one byte, no length (section 3.1).
pub const OPT_PAD: u8 = 0;
/// The subnet mask, 4 bytes (section 3.3).
pub const OPT_SUBNET_MASK: u8 = 1;
/// Routers in order of preference, 4 bytes each (section 3.5).
pub const OPT_ROUTER: u8 = 3;
/// Name servers in order of preference, 4 bytes each (section 3.8).
pub const OPT_DNS: u8 = 6;
/// The client's host name (section 3.14).
pub const OPT_HOSTNAME: u8 = 12;
/// The interface MTU, 2 bytes, at least 68 (section 5.1).
pub const OPT_MTU: u8 = 26;
/// Vendor-specific information, sub-options inside (section 8.4).
pub const OPT_VENDOR_SPECIFIC: u8 = 43;
/// The address a client asks for, 4 bytes (section 9.1).
pub const OPT_REQUESTED_IP: u8 = 50;
/// Lease time in seconds, 4 bytes; all ones is infinite (section 9.2).
pub const OPT_LEASE_TIME: u8 = 51;
/// `file` and `sname` hold further options, 1 byte (section 9.3).
pub const OPT_OVERLOAD: u8 = 52;
/// The DHCP message type, 1 byte (section 9.6).
pub const OPT_MESSAGE_TYPE: u8 = 53;
/// The server identifier: an address of the server, 4 bytes (section 9.7).
pub const OPT_SERVER_ID: u8 = 54;
/// The options a client asks for, one code each (section 9.8).
pub const OPT_PARAMETERS: u8 = 55;
/// The largest message a client accepts, 2 bytes (section 9.10).
pub const OPT_MAX_SIZE: u8 = 57;
/// Renewal time (T1) in seconds, 4 bytes (section 9.11).
pub const OPT_RENEWAL_TIME: u8 = 58;
/// Rebinding time (T2) in seconds, 4 bytes (section 9.12).
pub const OPT_REBINDING_TIME: u8 = 59;
/// The vendor class identifier, "PXEClient..." from PXE ROMs (section 9.13).
pub const OPT_VENDOR_CLASS: u8 = 60;
/// The client identifier: a hardware type and address, or opaque (section 9.14).
pub const OPT_CLIENT_ID: u8 = 61;
/// Ends an options area; one byte, no length (section 3.2).
pub const OPT_END: u8 = 255;
