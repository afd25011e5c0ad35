//! The built-in PXE server: a node of the pool serves its own image on the
//! fabric so that new bare-metal machines boot it and join.
//!
//! # Layout
//! - `bundle.rs`: [`Bundle`], the files served (kernel `vmlinuz`,
//!   `initramfs.img`, the iPXE script `boot.ipxe`, iPXE chainloaders), by
//!   flat name.
//! - `proxydhcp.rs`: [`proxydhcp::respond`], the pure proxy DHCP responder
//!   (PXE 2.1, RFC 4578): which boot file a PXE client gets, and the OFFER or
//!   ACK that says so. Notes on how iPXE reads it live there.
//! - `tftp.rs`: the read-only TFTP protocol (RFC 1350, 2347, 2348, 2349):
//!   packet codec, option negotiation and the per-transfer state machine.
//! - `http.rs`: the strict HTTP/1.1 request-head parser and the GET/HEAD
//!   file responses.
//! - `server.rs`: [`PxeServer`], the sockets and tokio tasks around the three
//!   protocols, and its counters ([`PxeStats`]).
//! - `source.rs`: the image served: this node's own, rebuilt from its root file
//!   system and checked against the hash it booted with, or a bundle directory.
//! - `agent.rs`: [`agent::PxeAgent`], which follows the pool's `pxe` settings
//!   record and starts or stops the server; the API asks it through a
//!   [`agent::PxeHandle`].
//!
//! # Boot flow
//! Another DHCP server on the fabric leases addresses; this one is a proxy
//! DHCP server and never does. A machine's PXE ROM broadcasts a DHCPDISCOVER;
//! we offer an iPXE chainloader (`undionly.kpxe` for BIOS, `ipxe.efi` or
//! `snponly.efi` for UEFI) over TFTP. iPXE then runs DHCP again, identifies
//! itself, and is offered `http://{server_ip}:{http_port}/boot.ipxe`; the
//! script fetches the kernel and initramfs over HTTP.
//!
//! # Tasks
//! [`PxeServer::start`] binds all sockets, then runs one task per socket:
//! proxy DHCP on ports 67 and 4011, TFTP on 69 (one child task and socket
//! per transfer) and HTTP (one child task per connection). The protocol
//! modules are sans-IO; the tasks only move datagrams and bytes. Stopping
//! or dropping the server aborts all of them. The agent is one task; the image
//! is prepared once per boot on a thread of its own at the lowest priority.

pub mod agent;
pub mod bundle;
pub mod http;
pub mod proxydhcp;
pub mod server;
pub mod source;
pub mod tftp;

pub use bundle::{Bundle, BundleError};
pub use proxydhcp::{BOOT_SCRIPT, BootConfig, BootConfigError, PROXY_PORT};
pub use server::{DEFAULT_HTTP_PORT, PxeConfig, PxeError, PxeServer, PxeStats};
