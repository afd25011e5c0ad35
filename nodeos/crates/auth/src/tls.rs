//! Mutual TLS on the API port: the server side (an accept loop that hands
//! tonic finished handshakes and says once per source why one failed) and the
//! client side (a connector for tonic channels). Both trust the pool's CA
//! generations in [`Trust`] and present a certificate it signed.
//!
//! Configurations are swapped whole ([`TlsState::set`]), so a renewed node
//! certificate or a rotated CA takes effect on the next connection while open
//! ones go on.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::ca::{Credential, NODE_DNS_NAME};

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one log line per source address in this time.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Handshakes running at once; more wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate in {0}")]
    NoCertificate(&'static str),
    #[error("no private key in the credential: {0}")]
    Key(String),
    #[error("the {what} is not valid PEM: {why}")]
    Pem { what: &'static str, why: String },
    #[error("TLS configuration refused: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

// ring, not aws-lc-rs: no C library to build (DEPENDENCIES.md). rustls marks
// ring's provider deprecated only for its lack of post-quantum key exchange.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Certificates in a PEM text.
pub fn certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { what, why: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what));
    }
    Ok(certs)
}

fn roots(trusted_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs("trusted CA list", trusted_pem)? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

fn key(cred: &Credential) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = certs("credential", &cred.cert_pem)?;
    let key =
        PrivateKeyDer::from_pem_slice(cred.key_pem.as_bytes()).map_err(|e| TlsError::Key(e.to_string()))?;
    Ok((chain, key))
}

/// A server that demands a client certificate signed by one of `trusted_pem`.
pub fn server_config(cred: &Credential, trusted_pem: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(trusted_pem)?, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let (chain, key) = key(cred)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client presenting `cred` and trusting nodes signed by one of `trusted_pem`.
pub fn client_config(cred: &Credential, trusted_pem: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let (chain, key) = key(cred)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(trusted_pem)?)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The configurations a node uses now, both ways. Cheap to clone.
#[derive(Clone)]
pub struct TlsState {
    inner: Arc<RwLock<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>)>>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsState")
    }
}

impl TlsState {
    pub fn new(cred: &Credential, trusted_pem: &str) -> Result<Self, TlsError> {
        let pair = (server_config(cred, trusted_pem)?, client_config(cred, trusted_pem)?);
        Ok(TlsState { inner: Arc::new(RwLock::new(pair)) })
    }

    /// Replaces both configurations: new connections use them.
    pub fn set(&self, cred: &Credential, trusted_pem: &str) -> Result<(), TlsError> {
        let pair = (server_config(cred, trusted_pem)?, client_config(cred, trusted_pem)?);
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = pair;
        Ok(())
    }

    pub fn server(&self) -> Arc<rustls::ServerConfig> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    pub fn client(&self) -> Arc<rustls::ClientConfig> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    /// A tonic connector speaking TLS with this node's certificate.
    pub fn connector(&self) -> Connector {
        Connector::Node(self.clone())
    }
}

/// The TLS server side of a node-to-node stream (the replica protocol, a
/// migration): the handshake, then the peer's identity, which must be one of
/// `allowed` roles.
pub async fn accept_from(
    cfg: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    allowed: &[crate::Role],
) -> Result<(TlsStream<TcpStream>, crate::Identity), String> {
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(cfg).accept(tcp))
        .await
        .map_err(|_| "no TLS handshake within 10 s".to_owned())?
        .map_err(|e| format!("TLS handshake refused: {e}"))?;
    let der = s.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or("no client certificate")?;
    let id = crate::identity::identity(der).map_err(|e| e.to_string())?;
    if !allowed.contains(&id.subject.role) {
        return Err(format!("{id} may not open this stream"));
    }
    Ok((s, id))
}

/// The TLS client side of a node-to-node stream, verifying the server as a
/// node of the pool.
pub async fn connect_to(
    cfg: Arc<rustls::ClientConfig>,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = ServerName::try_from(NODE_DNS_NAME).map_err(std::io::Error::other)?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsConnector::from(cfg).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no TLS handshake within 10 s"))?
}

impl Connector {
    /// The client configuration a connection made now uses.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        match self {
            Connector::Node(s) => s.client(),
            Connector::Fixed(c) => c.clone(),
        }
    }
}

/// Dials `host:port` from a tonic `http://` URI and runs the TLS handshake,
/// verifying the server as a node of the pool (its certificate names
/// [`NODE_DNS_NAME`], whatever address was dialled).
#[derive(Clone)]
pub enum Connector {
    Node(TlsState),
    Fixed(Arc<rustls::ClientConfig>),
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector")
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let cfg = self.client_config();
        Box::pin(async move {
            let host = uri.host().ok_or("the address names no host")?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(7700);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(NODE_DNS_NAME)?;
            let tls = TlsConnector::from(cfg).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Accepts TCP connections on `listener` and yields those whose TLS
/// handshake succeeded. A failed handshake (no certificate, another CA, an
/// expired one, plaintext, garbage) closes the connection and is logged at
/// most once a minute per source address.
pub fn incoming(
    listener: TcpListener,
    tls: TlsState,
) -> impl futures_core::Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let logged: Arc<RefusalLog> = Arc::default();
    tokio::spawn(async move {
        loop {
            let (tcp, from) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let Ok(permit) = limit.clone().acquire_owned().await else { return };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.server());
            let tx = tx.clone();
            let logged = logged.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => refused(&logged, from, &e.to_string()),
                    Err(_) => refused(&logged, from, "no TLS handshake within 10 s"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Says why connections from a source address were refused, at most once
/// a minute per address (a flood of bad handshakes costs one line a minute).
#[derive(Debug, Default)]
pub struct RefusalLog {
    last: Mutex<HashMap<IpAddr, Instant>>,
}

impl RefusalLog {
    /// Whether a refusal from `from` should be logged now (and notes it).
    pub fn due(&self, from: SocketAddr) -> bool {
        let mut m = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if m.len() > 4096 {
            m.retain(|_, at| now.duration_since(*at) < LOG_EVERY);
        }
        if m.get(&from.ip()).is_some_and(|at| now.duration_since(*at) < LOG_EVERY) {
            return false;
        }
        m.insert(from.ip(), now);
        true
    }
}

fn refused(logged: &RefusalLog, from: SocketAddr, why: &str) {
    if logged.due(from) {
        tracing::warn!(%from, why, "TLS handshake refused (a client without a valid pool credential?); next from this address logged in a minute at the earliest");
    }
}
