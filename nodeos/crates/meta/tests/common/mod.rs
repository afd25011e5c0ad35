//! In-process raft clusters for tests: real sled stores on temp dirs, joined by
//! an in-memory network with fault knobs (isolate a node, drop a fraction of
//! messages, add delay).

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodeos_meta::store::open_db;
use nodeos_meta::{Command, LogStore, Raft, Response, StateMachineStore, TypeConfig};
use nodeos_types::NodeId;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Config, ServerState};
use rand::Rng;
use tempfile::TempDir;

/// A raft config fast enough for tests: 50 ms heartbeats, 150–300 ms elections.
pub fn fast_config() -> Config {
    Config {
        cluster_name: "nodeos-meta-test".into(),
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        ..Config::default()
    }
}

#[derive(Default)]
struct RouterState {
    nodes: BTreeMap<NodeId, Raft>,
    isolated: BTreeSet<NodeId>,
    /// Fraction of RPCs lost: half of them before delivery, half after (lost reply).
    drop_rate: f64,
    /// Each RPC is delayed by a uniform 0..=max_delay.
    max_delay: Duration,
}

/// The in-memory network: every node's `Raft`, and the faults to inject.
#[derive(Clone, Default)]
pub struct Router {
    state: Arc<Mutex<RouterState>>,
}

impl Router {
    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap()
    }

    pub fn add(&self, id: NodeId, raft: Raft) {
        self.lock().nodes.insert(id, raft);
    }

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

    pub fn network(&self, from: NodeId) -> NodeNetwork {
        NodeNetwork { router: self.clone(), from }
    }

    fn cut(&self, from: NodeId, target: NodeId) -> bool {
        let st = self.lock();
        st.isolated.contains(&from) || st.isolated.contains(&target)
    }

    /// Delivers one RPC through the faults, calling `call` on the target's Raft.
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
        let (raft, delay, drop_request, drop_reply) = {
            let st = self.lock();
            if st.isolated.contains(&from) || st.isolated.contains(&target) {
                return Err(unreachable("partitioned"));
            }
            let Some(raft) = st.nodes.get(&target).cloned() else {
                return Err(unreachable("node is down"));
            };
            let mut rng = rand::rng();
            let delay = if st.max_delay.is_zero() {
                Duration::ZERO
            } else {
                rng.random_range(Duration::ZERO..=st.max_delay)
            };
            let half = st.drop_rate / 2.0;
            (raft, delay, rng.random_bool(half), rng.random_bool(half))
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if drop_request || self.cut(from, target) {
            return Err(RPCError::Network(NetworkError::new(&io_err("request lost"))));
        }
        let reply = call(raft).await.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))?;
        if drop_reply || self.cut(from, target) {
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

/// One node's network factory.
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

/// A running node: its Raft and a reading clone of its state machine.
pub struct TestNode {
    pub raft: Raft,
    pub sm: StateMachineStore,
}

/// A cluster of in-process nodes, each with its own sled dir under one temp dir.
pub struct Cluster {
    pub router: Router,
    pub nodes: BTreeMap<NodeId, TestNode>,
    config: Arc<Config>,
    base: TempDir,
}

impl Cluster {
    /// Starts nodes 1..=n and initialises the cluster with all of them as voters.
    pub async fn new(n: u64, config: Config) -> Cluster {
        let config = Arc::new(config.validate().expect("valid raft config"));
        let mut cluster = Cluster {
            router: Router::default(),
            nodes: BTreeMap::new(),
            config,
            base: tempfile::tempdir().unwrap(),
        };
        let ids: Vec<NodeId> = (1..=n).map(NodeId).collect();
        for id in &ids {
            cluster.start(*id).await;
        }
        let members: BTreeMap<NodeId, BasicNode> =
            ids.iter().map(|id| (*id, BasicNode::new(id.to_string()))).collect();
        cluster.nodes[&ids[0]].raft.initialize(members).await.expect("initialize");
        cluster
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    fn dir(&self, id: NodeId) -> PathBuf {
        self.base.path().join(id.to_string())
    }

    /// Opens `id`'s stores from its directory (new or existing) and starts its Raft.
    pub async fn start(&mut self, id: NodeId) {
        let dir = self.dir(id);
        // sled's file lock goes with the last handle of a stopped node, which
        // openraft's tasks may still hold for a moment after shutdown.
        let deadline = Instant::now() + Duration::from_secs(5);
        let db = loop {
            match open_db(&dir.join("sled")) {
                Ok(db) => break db,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(%id, error = %e, "waiting for the previous instance to release sled");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("reopen {id}: {e:?}"),
            }
        };
        let log = LogStore::new(&db).unwrap();
        let sm = StateMachineStore::open(&db, &dir.join("snapshots")).unwrap();
        let raft = Raft::new(id, self.config.clone(), self.router.network(id), log, sm.clone())
            .await
            .expect("raft starts");
        self.router.add(id, raft.clone());
        self.nodes.insert(id, TestNode { raft, sm });
    }

    /// Takes `id` off the network and shuts its Raft down, dropping its stores.
    pub async fn stop(&mut self, id: NodeId) {
        self.router.remove(id);
        let node = self.nodes.remove(&id).expect("node is running");
        node.raft.shutdown().await.expect("shutdown");
    }

    pub fn node(&self, id: NodeId) -> &TestNode {
        &self.nodes[&id]
    }

    /// Waits until exactly one of `among` is leader and all of `among` follow it.
    pub async fn wait_leader(&self, among: &[NodeId], timeout: Duration) -> NodeId {
        let deadline = Instant::now() + timeout;
        loop {
            let metrics: Vec<_> =
                among.iter().map(|id| self.nodes[id].raft.metrics().borrow().clone()).collect();
            let leaders: Vec<NodeId> =
                metrics.iter().filter(|m| m.state == ServerState::Leader).map(|m| m.id).collect();
            if let [leader] = leaders[..]
                && metrics.iter().all(|m| m.current_leader == Some(leader))
            {
                return leader;
            }
            if Instant::now() > deadline {
                let summary: Vec<_> =
                    metrics.iter().map(|m| (m.id, m.state, m.current_term, m.current_leader)).collect();
                panic!("no single leader among {among:?} after {timeout:?}: {summary:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes through whichever of `among` leads, retrying on leader changes and
    /// lost messages. A retried write may apply twice; use it for idempotent puts.
    pub async fn write(&self, among: &[NodeId], command: Command) -> Response {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let leader = self.wait_leader(among, Duration::from_secs(5)).await;
            let raft = &self.nodes[&leader].raft;
            match tokio::time::timeout(Duration::from_secs(2), raft.client_write(command.clone())).await {
                Ok(Ok(resp)) => return resp.data,
                Ok(Err(e)) => tracing::debug!(%leader, error = %e, "write failed, retrying"),
                Err(_) => tracing::debug!(%leader, "write timed out, retrying"),
            }
            assert!(Instant::now() < deadline, "write {command:?} not acknowledged in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every node in `ids` has applied the same log id and holds the
    /// same key space and revision; returns that revision.
    pub async fn wait_converged(&self, ids: &[NodeId], timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let views: Vec<_> = ids
                .iter()
                .map(|id| {
                    let sm = &self.nodes[id].sm;
                    (sm.last_applied(), sm.revision(), sm.range("", 0).unwrap())
                })
                .collect();
            if views.windows(2).all(|w| w[0] == w[1]) && views[0].0.is_some() {
                return views[0].1;
            }
            if Instant::now() > deadline {
                let summary: Vec<_> =
                    ids.iter().zip(&views).map(|(id, v)| (*id, v.0, v.1, v.2.len())).collect();
                panic!("nodes did not converge in {timeout:?}: {summary:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
