//! In-process pools for tests: real raft and real sled stores in a temp dir,
//! joined by an in-memory network with fault knobs. No root, no sockets.
//!
//! [`TestPool::new`] gives `n` started, initialised nodes whose
//! [`MetaHandle`]s behave exactly as a node's do (writes forwarded to the
//! leader, linearizable reads, watches), so control-plane crates test their
//! rules against the real store: `nodeos-meta = { features = ["testing"] }`
//! in their dev-dependencies.
//!
//! [`Router`] is the network: it carries raft RPCs and forwarded requests
//! between nodes and can isolate a node, lose a fraction of messages (half
//! before delivery, half after, i.e. lost replies) and delay them.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use nodeos_types::NodeId;
use nodeos_types::auth::PoolKey;
use nodeos_types::records::{NodeRecord, node_key};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Config, RaftMetrics, ServerState};
use rand::Rng;
use tempfile::TempDir;

use crate::handle::{Forwarder, serve_forwarded};
use crate::network::{PeerClient, PeerError};
use crate::peer::{ForwardError, Forwarded, ForwardedReply};
use crate::{Command, MetaConfig, MetaError, MetaHandle, Raft, TypeConfig};

/// Raft timing fast enough for tests: 50 ms heartbeats, 150–300 ms elections.
pub fn fast_config() -> Config {
    Config {
        cluster_name: "nodeos-meta-test".into(),
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        ..Config::default()
    }
}

/// A node's record as it would write it on joining, with every address
/// derived from its id (`node-<id>:7700` API, `node-<id>:7800` replicas,
/// `10.255.0.<n>:4789` VXLAN, 1 TiB of replica room); tests change what they need.
pub fn node_record(id: NodeId) -> NodeRecord {
    NodeRecord {
        id,
        address: format!("node-{id}:7700"),
        hostname: format!("node-{}", id.0),
        version: "test".into(),
        image_hash: String::new(),
        joined_at_ms: nodeos_types::unix_millis(),
        block_address: format!("node-{id}:7800"),
        block_capacity: 1 << 40,
        vxlan_address: format!("10.255.0.{}:4789", id.0 % 256),
        cpu: None,
        memory_mib: 0,
        maintenance: false,
        removing: false,
    }
}

/// The pool key of every test pool.
pub fn test_key() -> PoolKey {
    PoolKey::from_secret(b"nodeos-test-pool-key-0123456789").expect("a 31-byte secret is a valid key")
}

#[derive(Default)]
struct RouterState {
    nodes: BTreeMap<NodeId, Raft>,
    isolated: BTreeSet<NodeId>,
    /// Fraction of messages lost: half of them before delivery, half after (lost reply).
    drop_rate: f64,
    /// Each message is delayed by a uniform 0..=max_delay.
    max_delay: Duration,
}

/// What the router decided for one message.
struct Route {
    raft: Raft,
    delay: Duration,
    drop_request: bool,
    drop_reply: bool,
}

/// The in-memory network: every node's `Raft`, and the faults to inject.
#[derive(Clone, Default)]
pub struct Router {
    state: Arc<Mutex<RouterState>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("Router")
            .field("nodes", &st.nodes.keys().collect::<Vec<_>>())
            .field("isolated", &st.isolated)
            .field("drop_rate", &st.drop_rate)
            .field("max_delay", &st.max_delay)
            .finish()
    }
}

impl Router {
    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `raft` reachable as node `id`.
    pub fn add(&self, id: NodeId, raft: Raft) {
        self.lock().nodes.insert(id, raft);
    }

    /// Takes node `id` off the network (it is down).
    pub fn remove(&self, id: NodeId) -> Option<Raft> {
        self.lock().nodes.remove(&id)
    }

    /// Cuts `id` off from every other node, both directions.
    pub fn isolate(&self, id: NodeId) {
        self.lock().isolated.insert(id);
    }

    pub fn heal(&self, id: NodeId) {
        self.lock().isolated.remove(&id);
    }

    pub fn set_drop_rate(&self, rate: f64) {
        self.lock().drop_rate = rate.clamp(0.0, 1.0);
    }

    pub fn set_max_delay(&self, delay: Duration) {
        self.lock().max_delay = delay;
    }

    /// Node `from`'s raft network.
    pub fn network(&self, from: NodeId) -> NodeNetwork {
        NodeNetwork { router: self.clone(), from }
    }

    /// Node `from`'s way to the leader for forwarded requests.
    pub fn forwarder(&self, from: NodeId) -> NodeForwarder {
        NodeForwarder { router: self.clone(), from }
    }

    fn cut(&self, from: NodeId, target: NodeId) -> bool {
        let st = self.lock();
        st.isolated.contains(&from) || st.isolated.contains(&target)
    }

    /// Where a message from `from` to `target` goes, or why it goes nowhere.
    fn route(&self, from: NodeId, target: NodeId) -> Result<Route, &'static str> {
        let st = self.lock();
        if st.isolated.contains(&from) || st.isolated.contains(&target) {
            return Err("partitioned");
        }
        let raft = st.nodes.get(&target).cloned().ok_or("node is down")?;
        let mut rng = rand::rng();
        let delay = if st.max_delay.is_zero() {
            Duration::ZERO
        } else {
            rng.random_range(Duration::ZERO..=st.max_delay)
        };
        let half = st.drop_rate / 2.0;
        Ok(Route { raft, delay, drop_request: rng.random_bool(half), drop_reply: rng.random_bool(half) })
    }

    /// Delivers one raft RPC through the faults, calling `call` on the target's Raft.
    async fn deliver<T, E, F, Fut>(
        &self,
        from: NodeId,
        target: NodeId,
        call: F,
    ) -> Result<T, RPCError<NodeId, BasicNode, E>>
    where
        E: std::error::Error,
        F: FnOnce(Raft) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let route = self.route(from, target).map_err(unreachable)?;
        if !route.delay.is_zero() {
            tokio::time::sleep(route.delay).await;
        }
        if route.drop_request || self.cut(from, target) {
            return Err(RPCError::Network(NetworkError::new(&io_err("request lost"))));
        }
        let reply = call(route.raft).await.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))?;
        if route.drop_reply || self.cut(from, target) {
            return Err(RPCError::Network(NetworkError::new(&io_err("reply lost"))));
        }
        Ok(reply)
    }
}

fn io_err(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, what.to_owned())
}

fn unreachable<E: std::error::Error>(what: &str) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&io_err(what)))
}

/// One node's raft network factory.
#[derive(Debug)]
pub struct NodeNetwork {
    router: Router,
    from: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for NodeNetwork {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
        Connection { router: self.router.clone(), from: self.from, target }
    }
}

/// One node's raft connection to another.
#[derive(Debug)]
pub struct Connection {
    router: Router,
    from: NodeId,
    target: NodeId,
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.router
            .deliver(self.from, self.target, |raft| async move { raft.append_entries(rpc).await })
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.router
            .deliver(self.from, self.target, |raft| async move { raft.install_snapshot(rpc).await })
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.router.deliver(self.from, self.target, |raft| async move { raft.vote(rpc).await }).await
    }

    fn backoff(&self) -> Backoff {
        // openraft's default is 500 ms; tests heal partitions and want quick catch-up.
        Backoff::new(std::iter::repeat(Duration::from_millis(50)))
    }
}

/// One node's [`Forwarder`]: the leader's `Raft` through the same faults.
#[derive(Debug)]
pub struct NodeForwarder {
    router: Router,
    from: NodeId,
}

impl Forwarder for NodeForwarder {
    fn forward<'a>(
        &'a self,
        leader: NodeId,
        address: &'a str,
        request: Forwarded,
    ) -> BoxFuture<'a, Result<Result<ForwardedReply, ForwardError>, PeerError>> {
        Box::pin(async move {
            let method = "forward";
            let route = self
                .router
                .route(self.from, leader)
                .map_err(|_| PeerError::Unreachable { address: address.to_owned(), method })?;
            if !route.delay.is_zero() {
                tokio::time::sleep(route.delay).await;
            }
            if route.drop_request || self.router.cut(self.from, leader) {
                return Err(PeerError::Unreachable { address: address.to_owned(), method });
            }
            let answer = serve_forwarded(&route.raft, leader, request).await;
            if route.drop_reply || self.router.cut(self.from, leader) {
                return Err(PeerError::Timeout { address: address.to_owned(), method });
            }
            Ok(answer)
        })
    }
}

/// The one leader that every node of `metrics` follows, if they agree on one.
pub fn agreed_leader(metrics: &[RaftMetrics<NodeId, BasicNode>]) -> Option<NodeId> {
    let mut leaders = metrics.iter().filter(|m| m.state == ServerState::Leader).map(|m| m.id);
    let leader = leaders.next()?;
    let agreed = leaders.next().is_none() && metrics.iter().all(|m| m.current_leader == Some(leader));
    agreed.then_some(leader)
}

/// A pool of in-process nodes (ids 1..=n), each with its own store under one temp dir.
#[derive(Debug)]
pub struct TestPool {
    router: Router,
    nodes: BTreeMap<NodeId, MetaHandle>,
    base: TempDir,
}

/// How long the pool's helpers wait for a leader before failing the test.
const WAIT: Duration = Duration::from_secs(20);

impl TestPool {
    /// A one-node pool, leading.
    pub async fn single() -> Result<TestPool, MetaError> {
        Self::new(1).await
    }

    /// `n` nodes (ids 1..=n), all voters; returns once every node follows one leader.
    pub async fn new(n: u64) -> Result<TestPool, MetaError> {
        let base = tempfile::tempdir().map_err(|e| MetaError::Dir("a temporary directory".into(), e))?;
        let mut pool = TestPool { router: Router::default(), nodes: BTreeMap::new(), base };
        let ids: Vec<NodeId> = (1..=n).map(NodeId).collect();
        for id in &ids {
            pool.start(*id).await?;
        }
        let voters = ids.iter().map(|id| (*id, BasicNode::new(id.to_string()))).collect();
        pool.handle(ids[0]).initialize(voters).await?;
        pool.wait_leader(&ids).await?;
        Ok(pool)
    }

    fn dir(&self, id: NodeId) -> PathBuf {
        self.base.path().join(id.to_string())
    }

    /// Starts node `id` on its directory (new, or kept from an earlier start).
    /// A new node belongs to no pool until initialised or added.
    pub async fn start(&mut self, id: NodeId) -> Result<MetaHandle, MetaError> {
        let fast = fast_config();
        let mut cfg = MetaConfig::new(self.dir(id), id, test_key());
        cfg.heartbeat_ms = fast.heartbeat_interval;
        cfg.election_timeout_ms = (fast.election_timeout_min, fast.election_timeout_max);
        let peers = PeerClient::new(id, test_key());
        // sled's file lock goes with the last handle of a stopped node, which
        // openraft's tasks may still hold for a moment after shutdown.
        let deadline = Instant::now() + Duration::from_secs(5);
        let meta = loop {
            let started = MetaHandle::start_with(
                cfg.clone(),
                peers.clone(),
                self.router.network(id),
                Arc::new(self.router.forwarder(id)),
            )
            .await;
            match started {
                Ok(m) => break m,
                Err(MetaError::Storage(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.router.add(id, meta.raft().clone());
        self.nodes.insert(id, meta.clone());
        Ok(meta)
    }

    /// Takes node `id` off the network and stops it; its directory stays.
    pub async fn stop(&mut self, id: NodeId) {
        self.router.remove(id);
        if let Some(meta) = self.nodes.remove(&id) {
            meta.shutdown().await;
        }
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// Node `id`'s handle.
    ///
    /// # Panics
    /// When node `id` is not running: a test asking for it is wrong.
    pub fn handle(&self, id: NodeId) -> MetaHandle {
        self.nodes.get(&id).cloned().unwrap_or_else(|| panic!("node {id} is not running in this test pool"))
    }

    /// The first running node's handle (the only one of a single-node pool).
    ///
    /// # Panics
    /// When no node runs.
    pub fn first(&self) -> MetaHandle {
        self.nodes.values().next().cloned().expect("a test pool has a running node")
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Records a node in the pool's key space (what a joining node writes).
    pub async fn put_node(&self, record: &NodeRecord) -> Result<(), MetaError> {
        let value = serde_json::to_vec(record).map_err(|e| MetaError::Refused(e.to_string()))?;
        self.leader().await?.write(Command::put(node_key(record.id), value)).await?;
        Ok(())
    }

    /// Waits until exactly one of `among` leads and all of `among` follow it.
    pub async fn wait_leader(&self, among: &[NodeId]) -> Result<NodeId, MetaError> {
        let deadline = Instant::now() + WAIT;
        loop {
            let metrics: Vec<_> = among.iter().map(|id| self.handle(*id).metrics()).collect();
            if let Some(leader) = agreed_leader(&metrics) {
                return Ok(leader);
            }
            if Instant::now() > deadline {
                return Err(MetaError::NoLeader(WAIT));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The leader's handle, once the running nodes agree on one.
    pub async fn leader(&self) -> Result<MetaHandle, MetaError> {
        let id = self.wait_leader(&self.ids()).await?;
        Ok(self.handle(id))
    }
}
