//! [`PxeServer`]: the sockets and tasks that put the sans-IO protocol
//! modules on the fabric.
//!
//! [`PxeServer::start`] binds every socket before it spawns anything, so a
//! server either serves completely or not at all, and the error names the
//! socket that could not be bound. It then runs four tokio tasks:
//!
//! - proxy DHCP on the DHCP port (0.0.0.0:67, `SO_REUSEADDR` because the
//!   port is shared with DHCP clients and relays on the node,
//!   `SO_BROADCAST` for the replies, `SO_BINDTODEVICE` to the fabric
//!   interface so that only that link is answered);
//! - proxy DHCP on the proxy port (server_ip:4011);
//! - TFTP on server_ip:69, which spawns one task and socket per transfer;
//! - HTTP on server_ip:7780, which spawns one task per connection.
//!
//! The per-transfer and per-connection tasks live in a `JoinSet` owned by
//! their listener's task, so aborting the four tasks (on [`PxeServer::stop`]
//! or drop) ends everything and closes every socket. Counters are shared
//! atomics, read by [`PxeServer::stats`].

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::bundle::Bundle;
use crate::http::{self, HEAD_TIMEOUT, HttpError};
use crate::proxydhcp::{
    self, BootConfig, BootConfigError, Destination, Outcome, PROXY_PORT, ReplyKind, ReportedClients, Via,
};
use crate::tftp::{self, ErrorCode, MAX_TRANSFERS, RequestOutcome, Step, Transfer};

/// Where iPXE fetches the boot files over HTTP.
pub const DEFAULT_HTTP_PORT: u16 = 7780;
/// HTTP connections served at once; further ones are closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Time to write each chunk of a response before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_CHUNK: usize = 64 * 1024;
/// How long, and how much, an error response waits for the client's
/// unread bytes before closing.
const DRAIN_TIME: Duration = Duration::from_secs(1);
const DRAIN_LIMIT: usize = 64 * 1024;
/// Clients remembered so that each unsupported one is reported once.
const REPORTED_CLIENTS: usize = 1024;
/// Receive buffer of the DHCP sockets: clients may send up to the
/// maximum message size they announce, bounded by an Ethernet frame.
const DHCP_BUFFER: usize = 1500;

/// Where and how to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PxeConfig {
    /// The fabric interface: the DHCP sockets are bound to it
    /// (`SO_BINDTODEVICE`). Empty: no binding (tests on loopback).
    pub interface: String,
    /// Our address on that interface: `siaddr`, option 54, the TFTP and
    /// HTTP bind address and the URLs handed out.
    pub server_ip: Ipv4Addr,
    /// 67 in production. Port 0 (any port here) lets the system pick, and
    /// [`PxeServer::config`] then shows the port it picked.
    pub dhcp_port: u16,
    /// 4011 in production.
    pub proxy_port: u16,
    /// 68 in production: where replies to the DHCP port go.
    pub client_port: u16,
    /// 69 in production.
    pub tftp_port: u16,
    /// [`DEFAULT_HTTP_PORT`] in production.
    pub http_port: u16,
    /// Where replies to the DHCP port go: 255.255.255.255 in production
    /// (the client has no address yet); tests on loopback use 127.0.0.1.
    pub reply_broadcast: Ipv4Addr,
}

impl PxeConfig {
    /// The production configuration for serving on `interface` at
    /// `server_ip`.
    pub fn new(interface: String, server_ip: Ipv4Addr) -> Self {
        Self {
            interface,
            server_ip,
            dhcp_port: nodeos_dhcp::SERVER_PORT,
            proxy_port: PROXY_PORT,
            client_port: nodeos_dhcp::CLIENT_PORT,
            tftp_port: 69,
            http_port: DEFAULT_HTTP_PORT,
            reply_broadcast: Ipv4Addr::BROADCAST,
        }
    }
}

/// Why the server could not start. `socket` names the socket: "dhcp",
/// "proxy", "tftp" or "http".
#[derive(Debug, thiserror::Error)]
pub enum PxeError {
    #[error("the boot configuration cannot be served")]
    BootConfig(#[from] BootConfigError),
    #[error("creating the {socket} socket")]
    SocketCreate {
        socket: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("setting {option} on the {socket} socket")]
    SocketOption {
        socket: &'static str,
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("binding the {socket} socket to interface {interface:?}")]
    BindDevice {
        socket: &'static str,
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("binding the {socket} socket to {addr}")]
    Bind {
        socket: &'static str,
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("listening on the {socket} socket at {addr}")]
    Listen {
        socket: &'static str,
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
}

/// A snapshot of the server's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PxeStats {
    pub offers: u64,
    pub acks: u64,
    /// DHCP messages not for us (not PXE, or for the real DHCP server).
    pub ignored: u64,
    /// Unreadable DHCP messages.
    pub malformed: u64,
    /// PXE clients the bundle has no boot file for.
    pub unsupported_clients: u64,
    /// TFTP downloads completed.
    pub tftp_transfers: u64,
    /// TFTP requests refused and transfers given up or broken.
    pub tftp_errors: u64,
    pub http_requests: u64,
    /// HTTP responses other than 2xx, and connections that failed.
    pub http_errors: u64,
    /// File bytes sent over TFTP and HTTP (retransmissions not counted).
    pub bytes_sent: u64,
}

#[derive(Debug, Default)]
struct Counters {
    offers: AtomicU64,
    acks: AtomicU64,
    ignored: AtomicU64,
    malformed: AtomicU64,
    unsupported_clients: AtomicU64,
    tftp_transfers: AtomicU64,
    tftp_errors: AtomicU64,
    http_requests: AtomicU64,
    http_errors: AtomicU64,
    bytes_sent: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> PxeStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PxeStats {
            offers: get(&self.offers),
            acks: get(&self.acks),
            ignored: get(&self.ignored),
            malformed: get(&self.malformed),
            unsupported_clients: get(&self.unsupported_clients),
            tftp_transfers: get(&self.tftp_transfers),
            tftp_errors: get(&self.tftp_errors),
            http_requests: get(&self.http_requests),
            http_errors: get(&self.http_errors),
            bytes_sent: get(&self.bytes_sent),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What every task shares.
#[derive(Debug)]
struct Shared {
    cfg: PxeConfig,
    boot: BootConfig,
    bundle: Arc<Bundle>,
    counters: Counters,
    /// Both DHCP tasks report unsupported clients; each client once.
    reported: Mutex<ReportedClients>,
}

/// The running PXE server. Dropping it stops it.
#[derive(Debug)]
pub struct PxeServer {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl PxeServer {
    /// Binds every socket first (an error names which socket and address
    /// failed, the cause is its source), then serves on tokio tasks until
    /// stopped or dropped.
    pub async fn start(cfg: PxeConfig, bundle: Arc<Bundle>) -> Result<PxeServer, PxeError> {
        let mut cfg = cfg;
        let device = (!cfg.interface.is_empty()).then_some(cfg.interface.as_str());
        let dhcp = udp_socket("dhcp", SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, cfg.dhcp_port), device, true)?;
        let proxy = udp_socket("proxy", SocketAddrV4::new(cfg.server_ip, cfg.proxy_port), device, false)?;
        let tftp = udp_socket("tftp", SocketAddrV4::new(cfg.server_ip, cfg.tftp_port), None, false)?;
        let http = tcp_listener("http", SocketAddrV4::new(cfg.server_ip, cfg.http_port))?;
        cfg.dhcp_port = local_port(dhcp.local_addr(), cfg.dhcp_port);
        cfg.proxy_port = local_port(proxy.local_addr(), cfg.proxy_port);
        cfg.tftp_port = local_port(tftp.local_addr(), cfg.tftp_port);
        cfg.http_port = local_port(http.local_addr(), cfg.http_port);
        let boot = BootConfig::new(cfg.server_ip, cfg.http_port)?;
        info!(
            interface = %cfg.interface,
            address = %cfg.server_ip,
            dhcp_port = cfg.dhcp_port,
            proxy_port = cfg.proxy_port,
            tftp_port = cfg.tftp_port,
            http_port = cfg.http_port,
            files = bundle.len(),
            "PXE server serving"
        );
        let shared = Arc::new(Shared {
            cfg,
            boot,
            bundle,
            counters: Counters::default(),
            reported: Mutex::new(ReportedClients::new(REPORTED_CLIENTS)),
        });
        let tasks = vec![
            tokio::spawn(serve_dhcp(dhcp, Via::Dhcp, shared.clone())),
            tokio::spawn(serve_dhcp(proxy, Via::Proxy, shared.clone())),
            tokio::spawn(serve_tftp(tftp, shared.clone())),
            tokio::spawn(serve_http(http, shared.clone())),
        ];
        Ok(PxeServer { shared, tasks })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PxeStats {
        self.shared.counters.snapshot()
    }

    /// The configuration served, with the ports actually bound.
    pub fn config(&self) -> &PxeConfig {
        &self.shared.cfg
    }

    /// Stops serving: aborts every task and waits until they are gone, so
    /// every socket is closed when this returns.
    pub async fn stop(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        info!(address = %self.shared.cfg.server_ip, "PXE server stopped");
    }
}

impl Drop for PxeServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn local_port(addr: io::Result<SocketAddr>, configured: u16) -> u16 {
    addr.map_or(configured, |a| a.port())
}

fn new_socket(socket: &'static str, ty: Type, protocol: Protocol) -> Result<Socket, PxeError> {
    Socket::new(Domain::IPV4, ty, Some(protocol)).map_err(|source| PxeError::SocketCreate { socket, source })
}

fn option(socket: &'static str, option: &'static str, r: io::Result<()>) -> Result<(), PxeError> {
    r.map_err(|source| PxeError::SocketOption { socket, option, source })
}

/// A non-blocking UDP socket bound to `addr`; `dhcp` adds `SO_REUSEADDR`
/// and `SO_BROADCAST`.
fn udp_socket(
    socket: &'static str,
    addr: SocketAddrV4,
    device: Option<&str>,
    dhcp: bool,
) -> Result<UdpSocket, PxeError> {
    let s = new_socket(socket, Type::DGRAM, Protocol::UDP)?;
    if dhcp {
        option(socket, "SO_REUSEADDR", s.set_reuse_address(true))?;
        option(socket, "SO_BROADCAST", s.set_broadcast(true))?;
    }
    if let Some(interface) = device {
        s.bind_device(Some(interface.as_bytes())).map_err(|source| PxeError::BindDevice {
            socket,
            interface: interface.to_owned(),
            source,
        })?;
    }
    option(socket, "O_NONBLOCK", s.set_nonblocking(true))?;
    s.bind(&SocketAddr::V4(addr).into()).map_err(|source| PxeError::Bind { socket, addr, source })?;
    UdpSocket::from_std(s.into()).map_err(|source| PxeError::SocketCreate { socket, source })
}

fn tcp_listener(socket: &'static str, addr: SocketAddrV4) -> Result<TcpListener, PxeError> {
    let s = new_socket(socket, Type::STREAM, Protocol::TCP)?;
    // A restarted server must not wait out the old connections' TIME_WAIT.
    option(socket, "SO_REUSEADDR", s.set_reuse_address(true))?;
    option(socket, "O_NONBLOCK", s.set_nonblocking(true))?;
    s.bind(&SocketAddr::V4(addr).into()).map_err(|source| PxeError::Bind { socket, addr, source })?;
    s.listen(128).map_err(|source| PxeError::Listen { socket, addr, source })?;
    TcpListener::from_std(s.into()).map_err(|source| PxeError::SocketCreate { socket, source })
}

/// Answers proxy DHCP on one socket until aborted.
async fn serve_dhcp(socket: UdpSocket, via: Via, shared: Arc<Shared>) {
    let c = &shared.counters;
    let mut buf = vec![0u8; DHCP_BUFFER];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                warn!(?via, error = %e, "proxy DHCP receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match proxydhcp::respond(&buf[..n], via, &shared.boot, &shared.bundle) {
            Outcome::Reply(reply) => {
                let to = match reply.to {
                    Destination::Broadcast => {
                        SocketAddr::from((shared.cfg.reply_broadcast, shared.cfg.client_port))
                    }
                    Destination::Relay(relay) => SocketAddr::from((relay, shared.cfg.dhcp_port)),
                    Destination::Requester => from,
                };
                debug!(?via, client = %reply.client, kind = ?reply.kind, boot_file = %reply.boot_file, %to, "proxy DHCP reply");
                match socket.send_to(&reply.message, to).await {
                    Ok(_) => bump(match reply.kind {
                        ReplyKind::Offer => &c.offers,
                        ReplyKind::Ack => &c.acks,
                    }),
                    Err(e) => warn!(?via, client = %reply.client, %to, error = %e, "proxy DHCP send failed"),
                }
            }
            Outcome::Ignored(why) => {
                bump(&c.ignored);
                debug!(?via, %from, ?why, "proxy DHCP ignored a message");
            }
            Outcome::Malformed(e) => {
                bump(&c.malformed);
                debug!(?via, %from, error = %e, "proxy DHCP dropped a malformed message");
            }
            Outcome::Unsupported(u) => {
                bump(&c.unsupported_clients);
                let first = shared
                    .reported
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .first_report(u.client);
                if first && u.wanted == [proxydhcp::BOOT_SCRIPT] {
                    warn!(
                        client = %u.client,
                        arch = ?u.arch,
                        wanted = ?u.wanted,
                        "iPXE client not answered: the image carries no boot script"
                    );
                } else if first {
                    warn!(
                        client = %u.client,
                        arch = ?u.arch,
                        wanted = ?u.wanted,
                        "PXE client not answered: the image carries no iPXE chainloader for it"
                    );
                } else {
                    debug!(client = %u.client, arch = ?u.arch, "PXE client not answered (reported before)");
                }
            }
        }
    }
}

/// Serves TFTP requests on the server port until aborted; every transfer
/// runs in `transfers` and ends with this task.
async fn serve_tftp(socket: UdpSocket, shared: Arc<Shared>) {
    let c = &shared.counters;
    let slots = Arc::new(Semaphore::new(MAX_TRANSFERS));
    let mut transfers = JoinSet::new();
    let mut buf = vec![0u8; 2048];
    loop {
        let received = tokio::select! {
            r = socket.recv_from(&mut buf) => r,
            Some(_) = transfers.join_next(), if !transfers.is_empty() => continue,
        };
        let (n, peer) = match received {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "TFTP receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let refuse = async |reply: &[u8]| {
            bump(&c.tftp_errors);
            if let Err(e) = socket.send_to(reply, peer).await {
                warn!(%peer, error = %e, "TFTP send failed");
            }
        };
        match tftp::on_request(&buf[..n], &shared.bundle) {
            RequestOutcome::Start { name, data, negotiated } => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    warn!(%peer, file = %name, limit = MAX_TRANSFERS, "TFTP request refused: too many transfers");
                    refuse(&tftp::error_packet(ErrorCode::NotDefined, "busy, try again later")).await;
                    continue;
                };
                let addr = SocketAddr::from((shared.cfg.server_ip, 0));
                let transfer_socket = match UdpSocket::bind(addr).await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(%peer, file = %name, error = %e, "TFTP transfer socket could not be bound");
                        refuse(&tftp::error_packet(ErrorCode::NotDefined, "server error")).await;
                        continue;
                    }
                };
                debug!(%peer, file = %name, blksize = negotiated.blksize, options = ?negotiated.granted, "TFTP transfer");
                let (transfer, first) = Transfer::start(data, &negotiated);
                let shared = shared.clone();
                transfers.spawn(async move {
                    run_transfer(transfer_socket, peer, &name, transfer, first, &shared).await;
                    drop(slot);
                });
            }
            RequestOutcome::Refuse { reply, reason } => {
                debug!(%peer, ?reason, "TFTP request refused");
                refuse(&reply).await;
            }
            RequestOutcome::Ignore => debug!(%peer, "TFTP ignored a packet that is not a request"),
        }
    }
}

/// One download, lock-step, on its own socket (its transfer ID).
async fn run_transfer(
    socket: UdpSocket,
    peer: SocketAddr,
    name: &str,
    mut t: Transfer,
    first: Vec<u8>,
    shared: &Shared,
) {
    let c = &shared.counters;
    let mut buf = vec![0u8; 2048];
    let mut packet = first;
    loop {
        if let Err(e) = socket.send_to(&packet, peer).await {
            warn!(%peer, file = %name, error = %e, "TFTP send failed");
            bump(&c.tftp_errors);
            return;
        }
        let deadline = Instant::now() + t.timeout();
        let step = loop {
            let step = match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
                Err(_elapsed) => t.on_timeout(),
                Ok(Err(e)) => {
                    warn!(%peer, file = %name, error = %e, "TFTP receive failed");
                    Step::GiveUp
                }
                Ok(Ok((_, from))) if from != peer => {
                    // RFC 1350: a packet from another transfer ID gets an
                    // error, and this transfer goes on.
                    let reply = tftp::error_packet(ErrorCode::UnknownTransferId, "unknown transfer ID");
                    let _ = socket.send_to(&reply, from).await;
                    Step::Wait
                }
                Ok(Ok((n, _))) => t.on_packet(&buf[..n]),
            };
            if step != Step::Wait {
                break step;
            }
        };
        match step {
            Step::Send(next) => packet = next,
            Step::Wait => {}
            Step::Done => {
                bump(&c.tftp_transfers);
                add(&c.bytes_sent, t.payload_sent());
                debug!(%peer, file = %name, bytes = t.payload_sent(), "TFTP transfer complete");
                return;
            }
            Step::Aborted { code, message } => {
                // PXE ROMs commonly ask for tsize and then abort to
                // re-request: not an error of ours.
                add(&c.bytes_sent, t.payload_sent());
                debug!(%peer, file = %name, code, %message, "TFTP transfer aborted by the client");
                return;
            }
            Step::Fail(reply) => {
                bump(&c.tftp_errors);
                add(&c.bytes_sent, t.payload_sent());
                warn!(%peer, file = %name, "TFTP transfer ended: the client broke the protocol");
                let _ = socket.send_to(&reply, peer).await;
                return;
            }
            Step::GiveUp => {
                bump(&c.tftp_errors);
                add(&c.bytes_sent, t.payload_sent());
                warn!(%peer, file = %name, retries = tftp::MAX_RETRIES, "TFTP transfer given up: the client stopped answering");
                return;
            }
        }
    }
}

/// Accepts HTTP connections until aborted; every connection runs in
/// `connections` and ends with this task.
async fn serve_http(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(r) => r,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            bump(&shared.counters.http_errors);
            warn!(%peer, limit = MAX_CONNECTIONS, "HTTP connection refused: too many connections");
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            serve_connection(stream, peer, &shared).await;
            drop(slot);
        });
    }
}

/// Reads one request head, writes one response, closes.
async fn serve_connection(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let c = &shared.counters;
    let request = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(r))) => r,
        // Closed before a complete head, or a read error: nothing to answer.
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            bump(&c.http_errors);
            debug!(%peer, error = %e, "HTTP read failed");
            return;
        }
        Err(_elapsed) => Err(HttpError::HeadTimeout),
    };
    bump(&c.http_requests);
    let response = http::respond(request.as_ref(), &shared.bundle);
    match &request {
        Ok(req) => {
            debug!(%peer, method = ?req.method, path = ?req.path, status = response.status, "HTTP request")
        }
        Err(e) => debug!(%peer, error = %e, status = response.status, "HTTP request refused"),
    }
    if !response.is_success() {
        bump(&c.http_errors);
    }
    match write_response(&mut stream, &response).await {
        Ok(()) => {
            if response.is_success() {
                add(&c.bytes_sent, response.body.as_ref().map_or(0, |b| b.len() as u64));
            }
        }
        Err(e) => {
            bump(&c.http_errors);
            warn!(%peer, status = response.status, error = %e, "HTTP response not delivered");
        }
    }
    let _ = stream.shutdown().await;
    if !response.is_success() {
        drain(&mut stream).await;
    }
}

/// Reads what the client still sends (the rest of an oversized head, a
/// request body) for a short while before closing: closing a socket with
/// unread data makes the kernel reset the connection, and the client might
/// then lose the error response it has not read yet.
async fn drain(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let mut left = DRAIN_LIMIT;
    let deadline = Instant::now() + DRAIN_TIME;
    while left > 0 {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

/// Reads until a complete head; `Ok(None)` when the peer closed first.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<Result<http::Request, HttpError>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        match http::parse_head(&buf) {
            Ok(None) => {}
            Ok(Some(req)) => return Ok(Some(Ok(req))),
            Err(e) => return Ok(Some(Err(e))),
        }
    }
}

async fn write_response(stream: &mut TcpStream, response: &http::Response) -> io::Result<()> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "client stopped reading");
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&response.head))
        .await
        .map_err(|_| timed_out())??;
    if let Some(body) = &response.body {
        for chunk in body.chunks(WRITE_CHUNK) {
            tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(chunk)).await.map_err(|_| timed_out())??;
        }
    }
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_config() {
        let c = PxeConfig::new("fabric0".into(), Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(
            (c.dhcp_port, c.proxy_port, c.client_port, c.tftp_port, c.http_port),
            (67, 4011, 68, 69, DEFAULT_HTTP_PORT)
        );
        assert_eq!(c.reply_broadcast, Ipv4Addr::BROADCAST);
    }

    #[test]
    fn counters_snapshot() {
        let c = Counters::default();
        bump(&c.offers);
        bump(&c.offers);
        add(&c.bytes_sent, 10);
        assert_eq!(c.snapshot(), PxeStats { offers: 2, bytes_sent: 10, ..PxeStats::default() });
    }

    #[tokio::test]
    async fn bind_errors_name_the_socket() {
        // An address that is not ours cannot be bound.
        let mut cfg = PxeConfig::new(String::new(), Ipv4Addr::new(192, 0, 2, 1));
        cfg.dhcp_port = 0;
        cfg.proxy_port = 0;
        let err = PxeServer::start(cfg, Arc::new(Bundle::new())).await.unwrap_err();
        assert!(matches!(err, PxeError::Bind { socket: "proxy", .. }), "{err:?}");
        assert!(err.to_string().contains("proxy socket to 192.0.2.1:0"), "{err}");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[tokio::test]
    async fn busy_port_is_reported() {
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut cfg = PxeConfig::new(String::new(), Ipv4Addr::LOCALHOST);
        (cfg.dhcp_port, cfg.proxy_port, cfg.tftp_port, cfg.http_port) = (0, 0, port, 0);
        let err = PxeServer::start(cfg, Arc::new(Bundle::new())).await.unwrap_err();
        assert!(matches!(err, PxeError::Bind { socket: "tftp", .. }), "{err:?}");
    }

    #[tokio::test]
    async fn ports_zero_are_resolved() {
        let mut cfg = PxeConfig::new(String::new(), Ipv4Addr::LOCALHOST);
        (cfg.dhcp_port, cfg.proxy_port, cfg.tftp_port, cfg.http_port) = (0, 0, 0, 0);
        let server = PxeServer::start(cfg, Arc::new(Bundle::new())).await.unwrap();
        let c = server.config().clone();
        assert!(c.dhcp_port != 0 && c.proxy_port != 0 && c.tftp_port != 0 && c.http_port != 0);
        assert_eq!(server.stats(), PxeStats::default());
        server.stop().await;
        // Every socket is closed once stop returns.
        std::net::UdpSocket::bind(("127.0.0.1", c.tftp_port)).unwrap();
        std::net::UdpSocket::bind(("127.0.0.1", c.proxy_port)).unwrap();
        std::net::TcpListener::bind(("127.0.0.1", c.http_port)).unwrap();
    }
}
