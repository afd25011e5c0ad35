//! How clients and repairers reach replicas: [`Transport`] and its two
//! implementations, [`TcpTransport`] (the replica protocol over TCP, one
//! multiplexed connection per node) and [`MemTransport`] (replicas in this
//! process, with fault knobs, for deterministic tests).
//!
//! Contract: `call` sends one [`Op`] and resolves to the replica's answer or
//! to a [`CallError`]. A `Timeout` or `Unreachable` leaves the outcome unknown
//! (the op may or may not have been applied); the block rules make retrying
//! safe. Calls to one node may be answered out of order.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodeos_types::NodeId;
use nodeos_types::auth::PoolKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::replica::Replica;
use crate::wire::{self, Answer, Op, ReplicaError, Reply, Request};

/// A replica as a client addresses it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplicaRef {
    pub node: NodeId,
    /// `host:port` of the node's replica server.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("replica {node} unreachable: {reason}")]
    Unreachable { node: NodeId, reason: String },
    #[error("replica {node} did not answer in time")]
    Timeout { node: NodeId },
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

pub trait Transport: Send + Sync + 'static {
    fn call(&self, to: &ReplicaRef, op: Op) -> impl Future<Output = Result<Answer, CallError>> + Send;
}

/// How long a call may take before its outcome is declared unknown.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed connect, calls to that node fail at once for this long.
const BACKOFF: Duration = Duration::from_millis(300);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Answer, ReplicaError>>>>>;

#[derive(Debug)]
struct Conn {
    frames: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    next_id: AtomicU64,
    dead: Arc<AtomicBool>,
}

/// The replica protocol over TCP.
#[derive(Debug, Clone)]
pub struct TcpTransport {
    inner: Arc<TcpInner>,
}

#[derive(Debug)]
struct TcpInner {
    key: PoolKey,
    /// Mutual TLS around the replica protocol; `None`: plain TCP (loopback pools).
    tls: Option<nodeos_auth::tls::Connector>,
    conns: Mutex<HashMap<ReplicaRef, Arc<Conn>>>,
    connecting: tokio::sync::Mutex<()>,
    down_until: Mutex<HashMap<ReplicaRef, Instant>>,
    timeout: Duration,
}

impl TcpTransport {
    pub fn new(key: PoolKey) -> Self {
        Self::with_timeout(key, CALL_TIMEOUT)
    }

    pub fn with_timeout(key: PoolKey, timeout: Duration) -> Self {
        Self::build(key, timeout, None)
    }

    /// Connections run in mutual TLS made by `connector`.
    pub fn with_tls(key: PoolKey, connector: nodeos_auth::tls::Connector) -> Self {
        Self::build(key, CALL_TIMEOUT, Some(connector))
    }

    fn build(key: PoolKey, timeout: Duration, tls: Option<nodeos_auth::tls::Connector>) -> Self {
        TcpTransport {
            inner: Arc::new(TcpInner {
                key,
                tls,
                conns: Mutex::new(HashMap::new()),
                connecting: tokio::sync::Mutex::new(()),
                down_until: Mutex::new(HashMap::new()),
                timeout,
            }),
        }
    }

    fn live(&self, to: &ReplicaRef) -> Option<Arc<Conn>> {
        let conns = self.inner.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.get(to).filter(|c| !c.dead.load(Ordering::Acquire)).cloned()
    }

    async fn conn(&self, to: &ReplicaRef) -> Result<Arc<Conn>, CallError> {
        if let Some(c) = self.live(to) {
            return Ok(c);
        }
        let _one_at_a_time = self.inner.connecting.lock().await;
        if let Some(c) = self.live(to) {
            return Ok(c);
        }
        let unreachable = |reason: String| CallError::Unreachable { node: to.node, reason };
        if let Some(until) = self.inner.down_until.lock().unwrap_or_else(|p| p.into_inner()).get(to)
            && Instant::now() < *until
        {
            return Err(unreachable("recently failed; backing off".into()));
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, connect(to, &self.inner.key, self.inner.tls.as_ref()))
            .await
        {
            Ok(Ok(c)) => {
                let c = Arc::new(c);
                self.inner.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(to.clone(), c.clone());
                self.inner.down_until.lock().unwrap_or_else(|p| p.into_inner()).remove(to);
                Ok(c)
            }
            Ok(Err(e)) => {
                self.mark_down(to);
                Err(unreachable(nodeos_types::error_chain(&e)))
            }
            Err(_) => {
                self.mark_down(to);
                Err(unreachable("connect timed out".into()))
            }
        }
    }

    fn mark_down(&self, to: &ReplicaRef) {
        self.inner
            .down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(to.clone(), Instant::now() + BACKOFF);
    }
}

async fn connect(
    to: &ReplicaRef,
    key: &PoolKey,
    tls: Option<&nodeos_auth::tls::Connector>,
) -> Result<Conn, wire::WireError> {
    let s = TcpStream::connect(&to.address).await?;
    s.set_nodelay(true)?;
    match tls {
        None => connect_on(s, to, key).await,
        Some(c) => connect_on(nodeos_auth::tls::connect_to(c.client_config(), s).await?, to, key).await,
    }
}

async fn connect_on<S>(mut s: S, to: &ReplicaRef, key: &PoolKey) -> Result<Conn, wire::WireError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let node = wire::client_handshake(&mut s, key).await?;
    if node != to.node {
        return Err(wire::WireError::Refused(format!("{} is node {node}, not {}", to.address, to.node)));
    }
    debug!(node = %to.node, address = %to.address, "connected to replica");
    let (mut rd, wr) = tokio::io::split(s);
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let dead = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
    // Writer: coalesces frames queued together into one flush.
    let dead_w = dead.clone();
    tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 * 1024, wr);
        while let Some(frame) = rx.recv().await {
            let mut ok = wire::write_frame(&mut w, &frame).await.is_ok();
            while ok && let Ok(more) = rx.try_recv() {
                ok = wire::write_frame(&mut w, &more).await.is_ok();
            }
            if !ok || w.flush().await.is_err() {
                break;
            }
        }
        dead_w.store(true, Ordering::Release);
    });
    // Reader: hands each reply to its caller; on any error the connection is
    // dead and every waiting caller learns it (its sender is dropped).
    let (pending_r, dead_r, node) = (pending.clone(), dead.clone(), to.node);
    tokio::spawn(async move {
        loop {
            match wire::recv::<_, Reply>(&mut rd).await {
                Ok(reply) => {
                    let waiter = pending_r.lock().unwrap_or_else(|p| p.into_inner()).remove(&reply.id);
                    if let Some(w) = waiter {
                        let _ = w.send(reply.result);
                    }
                }
                Err(e) => {
                    debug!(node = %node, error = %nodeos_types::error_chain(&e), "replica connection closed");
                    break;
                }
            }
        }
        dead_r.store(true, Ordering::Release);
        pending_r.lock().unwrap_or_else(|p| p.into_inner()).clear();
    });
    Ok(Conn { frames: tx, pending, next_id: AtomicU64::new(1), dead })
}

impl Transport for TcpTransport {
    async fn call(&self, to: &ReplicaRef, op: Op) -> Result<Answer, CallError> {
        let conn = self.conn(to).await?;
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let frame = postcard::to_stdvec(&Request { id, op }).map_err(|e| CallError::Unreachable {
            node: to.node,
            reason: format!("cannot encode request: {e}"),
        })?;
        let lost = || CallError::Unreachable { node: to.node, reason: "connection lost".into() };
        if conn.frames.send(frame).await.is_err() {
            conn.dead.store(true, Ordering::Release);
            return Err(lost());
        }
        match tokio::time::timeout(self.inner.timeout, rx).await {
            Ok(Ok(r)) => r.map_err(CallError::Replica),
            Ok(Err(_)) => Err(lost()),
            Err(_) => {
                conn.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                warn!(node = %to.node, "replica call timed out");
                Err(CallError::Timeout { node: to.node })
            }
        }
    }
}

/// Fault knobs of a [`MemTransport`].
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Nodes that answer nothing (`Unreachable`).
    pub down: HashSet<NodeId>,
    /// Percent of requests lost before they reach the replica (`Timeout`).
    pub drop_request_pct: u8,
    /// Percent of replies lost after the replica applied the op (`Timeout`).
    pub drop_reply_pct: u8,
    /// Each call waits a random 0..=max_delay first, so calls overtake each other.
    pub max_delay: Duration,
}

/// Replicas in this process behind a transport with faults, for tests.
#[derive(Debug, Clone)]
pub struct MemTransport {
    replicas: Arc<Mutex<HashMap<NodeId, Arc<Replica>>>>,
    faults: Arc<Mutex<(Faults, StdRng)>>,
}

impl MemTransport {
    pub fn new(seed: u64) -> Self {
        MemTransport {
            replicas: Arc::new(Mutex::new(HashMap::new())),
            faults: Arc::new(Mutex::new((Faults::default(), StdRng::seed_from_u64(seed)))),
        }
    }

    pub fn add(&self, node: NodeId, replica: Arc<Replica>) {
        self.replicas.lock().unwrap_or_else(|p| p.into_inner()).insert(node, replica);
    }

    pub fn set_faults(&self, f: Faults) {
        self.faults.lock().unwrap_or_else(|p| p.into_inner()).0 = f;
    }

    pub fn set_down(&self, node: NodeId, down: bool) {
        let mut g = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        if down {
            g.0.down.insert(node);
        } else {
            g.0.down.remove(&node);
        }
    }
}

impl Transport for MemTransport {
    async fn call(&self, to: &ReplicaRef, op: Op) -> Result<Answer, CallError> {
        let (delay, drop_req, drop_reply) = {
            let mut g = self.faults.lock().unwrap_or_else(|p| p.into_inner());
            let (f, rng) = &mut *g;
            if f.down.contains(&to.node) {
                return Err(CallError::Unreachable { node: to.node, reason: "down".into() });
            }
            let delay = if f.max_delay.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_micros(rng.random_range(0..=f.max_delay.as_micros() as u64))
            };
            (
                delay,
                rng.random_range(0..100) < f.drop_request_pct,
                rng.random_range(0..100) < f.drop_reply_pct,
            )
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if drop_req {
            return Err(CallError::Timeout { node: to.node });
        }
        let replica = self.replicas.lock().unwrap_or_else(|p| p.into_inner()).get(&to.node).cloned();
        let Some(replica) = replica else {
            return Err(CallError::Unreachable { node: to.node, reason: "no such replica".into() });
        };
        // A node taken down while the call was delayed must not apply it.
        if self.faults.lock().unwrap_or_else(|p| p.into_inner()).0.down.contains(&to.node) {
            return Err(CallError::Unreachable { node: to.node, reason: "down".into() });
        }
        let r = replica.handle(op);
        if drop_reply {
            return Err(CallError::Timeout { node: to.node });
        }
        r.map_err(CallError::Replica)
    }
}
