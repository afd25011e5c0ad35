//! The replica server every node runs: accepts replica-protocol connections
//! (see `wire.rs`), proves the pool key both ways, then answers requests
//! with [`Replica::handle`] on the blocking pool, many at a time per
//! connection (at most [`MAX_IN_FLIGHT`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use nodeos_auth::Role;
use nodeos_auth::tls::TlsState;
use nodeos_types::NodeId;
use nodeos_types::auth::PoolKey;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use crate::replica::Replica;
use crate::wire::{self, ReplicaError, Reply, Request};

/// Requests one connection may have in progress.
pub const MAX_IN_FLIGHT: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves replica connections until `shutdown` resolves. With `tls`, a
/// connection is taken only from a node or a VM worker of the pool (mutual
/// TLS with the pool's CA), the pool-key handshake inside.
pub async fn serve(
    listener: TcpListener,
    replica: Arc<Replica>,
    node: NodeId,
    key: PoolKey,
    tls: Option<TlsState>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(address = %addr, "replica server listening");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (replica, key, tls) = (replica.clone(), key.clone(), tls.clone());
                    tokio::spawn(async move {
                        let _ = stream.set_nodelay(true);
                        let ended = match tls {
                            None => connection(stream, peer.to_string(), replica, node, key).await,
                            Some(tls) => {
                                match nodeos_auth::tls::accept_from(tls.server(), stream, &[Role::Node, Role::Worker]).await {
                                    Ok((s, _)) => connection(s, peer.to_string(), replica, node, key).await,
                                    Err(why) => {
                                        refused(peer, &why);
                                        return;
                                    }
                                }
                            }
                        };
                        if let Err(e) = ended {
                            debug!(peer = %peer, error = %nodeos_types::error_chain(&e), "replica connection ended");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "replica server accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// A refused TLS connection, logged at most once a minute per source address.
fn refused(peer: std::net::SocketAddr, why: &str) {
    static LOGGED: std::sync::LazyLock<nodeos_auth::tls::RefusalLog> =
        std::sync::LazyLock::new(Default::default);
    if LOGGED.due(peer) {
        warn!(%peer, why, "replica connection refused (not a node or worker of this pool)");
    }
}

async fn connection<S>(
    mut stream: S,
    peer: String,
    replica: Arc<Replica>,
    node: NodeId,
    key: PoolKey,
) -> Result<(), wire::WireError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, wire::server_handshake(&mut stream, &key, node)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(peer = %peer, error = %nodeos_types::error_chain(&e), "replica client refused");
            return Err(e);
        }
        Err(_) => {
            warn!(peer = %peer, "replica client handshake timed out");
            return Ok(());
        }
    }
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 * 1024, wr);
        while let Some(reply) = rx.recv().await {
            let mut ok = wire::send(&mut w, &reply).await.is_ok();
            while ok && let Ok(more) = rx.try_recv() {
                ok = wire::send(&mut w, &more).await.is_ok();
            }
            if !ok || w.flush().await.is_err() {
                break;
            }
        }
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let result = loop {
        let req: Request = match wire::recv(&mut rd).await {
            Ok(r) => r,
            Err(wire::WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => {
                warn!(peer = %peer, error = %nodeos_types::error_chain(&e), "bad replica request; closing");
                break Err(e);
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else { break Ok(()) };
        let (replica, tx) = (replica.clone(), tx.clone());
        tokio::spawn(async move {
            let id = req.id;
            let result = tokio::task::spawn_blocking(move || replica.handle(req.op))
                .await
                .unwrap_or_else(|e| Err(ReplicaError::Io(format!("request task failed: {e}"))));
            let _ = tx.send(Reply { id, result }).await;
            drop(permit);
        });
    };
    drop(tx);
    let _ = writer.await;
    result
}
