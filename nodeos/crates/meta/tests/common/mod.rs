//! In-process raft clusters at the level of `Raft` itself (the conformance and
//! fault tests drive raft directly): real sled stores on temp dirs, joined by
//! `nodeos_meta::testing`'s in-memory network with its fault knobs.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodeos_meta::store::open_db;
pub use nodeos_meta::testing::{Router, agreed_leader, fast_config};
use nodeos_meta::{Command, LogStore, Raft, Response, StateMachineStore};
use nodeos_types::NodeId;
use openraft::{BasicNode, Config};
use tempfile::TempDir;

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
            if let Some(leader) = agreed_leader(&metrics) {
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
