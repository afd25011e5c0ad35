//! [`MetaHandle`]: how the rest of the node uses the metadata store.
//!
//! Writes go through raft on the leader; a follower forwards them over the peer
//! API and never retries a write whose outcome it cannot know. Linearizable reads
//! take a read index from the leader (a quorum-confirmed commit index) and wait
//! until the local state machine has applied it, then read locally.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use futures::future::BoxFuture;
use nodeos_types::NodeId;
use nodeos_types::auth::PoolKey;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::network::RaftNetworkFactory;
use openraft::{BasicNode, ChangeMembers, RaftMetrics, ServerState, SnapshotPolicy};

use crate::command::CommandError;
use crate::network::{PeerClient, PeerError, PeerNetworkFactory};
use crate::peer::{ForwardError, Forwarded, ForwardedReply, method};
use crate::store::StoreError;
use crate::watch::WatchError;
use crate::{Command, Event, KeyValue, LogStore, Raft, Response, StateMachineStore, TypeConfig};

/// How long a write or read waits for a leader before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// Timeout of one forwarded request.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything needed to start the store.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    /// Directory for the sled database and snapshots (created if missing).
    pub dir: PathBuf,
    pub node_id: NodeId,
    pub pool_key: PoolKey,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: (u64, u64),
    /// Take a snapshot (and purge the log before it) every this many entries.
    pub snapshot_every: u64,
    /// When members without a lease renewal turn suspect, then dead.
    pub leases: crate::lease::LeasePolicy,
}

impl MetaConfig {
    pub fn new(dir: PathBuf, node_id: NodeId, pool_key: PoolKey) -> Self {
        MetaConfig {
            dir,
            node_id,
            pool_key,
            heartbeat_ms: 150,
            election_timeout_ms: (600, 1200),
            snapshot_every: 5000,
            leases: crate::lease::LeasePolicy::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error(transparent)]
    Invalid(#[from] CommandError),
    #[error("cannot create the metadata directory {0}")]
    Dir(String, #[source] std::io::Error),
    #[error("metadata store cannot open its storage")]
    Storage(#[from] StoreError),
    #[error("raft configuration is invalid")]
    Config(#[source] openraft::ConfigError),
    #[error("no leader elected within {0:?}; the pool may have lost its majority")]
    NoLeader(Duration),
    #[error("the leader did not answer; the request's outcome is unknown")]
    Indeterminate(#[source] PeerError),
    #[error("the leader could not be reached")]
    LeaderUnreachable(#[source] PeerError),
    #[error("the leader refused the request: {0}")]
    Refused(String),
    #[error("raft stopped: {0}")]
    Stopped(String),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("pool is already initialised")]
    AlreadyInitialized,
    #[error(transparent)]
    Watch(#[from] WatchError),
}

/// Read consistency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read started.
    Linearizable,
    /// Whatever this node has applied; may be behind.
    Local,
}

/// How a follower hands a request to the leader.
///
/// Contract: an `Err` of [`PeerError::Address`], [`PeerError::KeyRefused`] or
/// [`PeerError::Unreachable`] means nothing reached the leader, so the request
/// may be retried; any other `Err` leaves its outcome unknown. `Ok` carries the
/// leader's own answer, which may still be a refusal.
pub trait Forwarder: Send + Sync + std::fmt::Debug + 'static {
    fn forward<'a>(
        &'a self,
        leader: NodeId,
        address: &'a str,
        request: Forwarded,
    ) -> BoxFuture<'a, Result<Result<ForwardedReply, ForwardError>, PeerError>>;
}

/// The pool's forwarder: the peer API over gRPC, sealed with the pool key.
impl Forwarder for PeerClient {
    fn forward<'a>(
        &'a self,
        _leader: NodeId,
        address: &'a str,
        request: Forwarded,
    ) -> BoxFuture<'a, Result<Result<ForwardedReply, ForwardError>, PeerError>> {
        Box::pin(async move { self.call(address, method::FORWARD, &request, FORWARD_TIMEOUT).await })
    }
}

/// Cloneable handle to the running metadata store.
#[derive(Clone)]
pub struct MetaHandle {
    inner: Arc<Inner>,
}

struct Inner {
    me: NodeId,
    raft: Raft,
    sm: StateMachineStore,
    peers: PeerClient,
    forwarder: Arc<dyn Forwarder>,
    leases: crate::lease::LeasePolicy,
}

impl std::fmt::Debug for MetaHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaHandle").field("node", &self.inner.me).finish()
    }
}

impl MetaHandle {
    /// When this node applied each member's last lease renewal ([`crate::lease`]).
    pub fn leases(&self) -> Arc<crate::lease::LeaseBook> {
        self.inner.sm.leases()
    }

    /// When members turn suspect, then dead.
    pub fn lease_policy(&self) -> crate::lease::LeasePolicy {
        self.inner.leases
    }

    /// `node`'s liveness as this node sees it, and the time since the last
    /// renewal it applied (the leader's view is the pool's).
    pub fn liveness(&self, node: NodeId) -> (crate::lease::Liveness, Duration) {
        let age = self.inner.sm.leases().age(node.0);
        (self.inner.leases.classify(age), age)
    }

    /// Renews this node's lease: done once the renewal is committed.
    pub async fn renew_lease(&self) -> Result<(), MetaError> {
        self.write(Command::Renew { node: self.inner.me.0 }).await.map(|_| ())
    }

    /// Opens storage and starts raft over the peer API. The node is not part of
    /// any pool until [`MetaHandle::initialize`] runs here or a leader adds it.
    pub async fn start(cfg: MetaConfig, peers: PeerClient) -> Result<Self, MetaError> {
        let network = PeerNetworkFactory::new(peers.clone());
        let forwarder: Arc<dyn Forwarder> = Arc::new(peers.clone());
        Self::start_with(cfg, peers, network, forwarder).await
    }

    /// Opens storage and starts raft over any raft network and forwarder (the
    /// in-process pools of [`crate::testing`] use in-memory ones). `peers`
    /// stays the node's client for the other peer calls (discovery, join).
    pub async fn start_with<N>(
        cfg: MetaConfig,
        peers: PeerClient,
        network: N,
        forwarder: Arc<dyn Forwarder>,
    ) -> Result<Self, MetaError>
    where
        N: RaftNetworkFactory<TypeConfig>,
    {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| MetaError::Dir(cfg.dir.display().to_string(), e))?;
        let db = crate::store::open_db(&cfg.dir.join("sled"))?;
        let log = LogStore::new(&db)?;
        let sm = StateMachineStore::open(&db, &cfg.dir.join("snapshots"))?;
        let raft_cfg = openraft::Config {
            cluster_name: "nodeos".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_ms.0,
            election_timeout_max: cfg.election_timeout_ms.1,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
            max_in_snapshot_log_to_keep: cfg.snapshot_every / 5,
            // Snapshot chunks stay well below the peer message limit.
            snapshot_max_chunk_size: 4 * 1024 * 1024,
            ..Default::default()
        }
        .validate()
        .map_err(MetaError::Config)?;
        let raft = Raft::new(cfg.node_id, Arc::new(raft_cfg), network, log, sm.clone())
            .await
            .map_err(|e| MetaError::Stopped(e.to_string()))?;
        Ok(MetaHandle {
            inner: Arc::new(Inner { me: cfg.node_id, raft, sm, peers, forwarder, leases: cfg.leases }),
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.me
    }

    /// The raft instance, for the peer API server.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub fn peers(&self) -> &PeerClient {
        &self.inner.peers
    }

    pub fn state_machine(&self) -> &StateMachineStore {
        &self.inner.sm
    }

    pub fn metrics(&self) -> RaftMetrics<NodeId, BasicNode> {
        self.inner.raft.metrics().borrow().clone()
    }

    /// Whether this node belongs to an initialised raft group (it has a membership).
    pub fn is_member(&self) -> bool {
        let m = self.metrics();
        m.membership_config.membership().get_node(&self.inner.me).is_some()
    }

    pub fn is_leader(&self) -> bool {
        self.metrics().state == ServerState::Leader
    }

    /// Current leader id and address, if one is known.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let id = self.metrics().current_leader?;
        Some((id, self.node_address(id)?))
    }

    /// API address of a raft member, as recorded in the membership.
    pub fn node_address(&self, id: NodeId) -> Option<String> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    async fn wait_leader(&self, deadline: Instant) -> Result<(NodeId, String), MetaError> {
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                return Err(MetaError::NoLeader(LEADER_WAIT));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Proposes a command and waits until it is committed and applied.
    pub async fn write(&self, cmd: Command) -> Result<Response, MetaError> {
        cmd.validate()?;
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let (leader, addr) = self.wait_leader(deadline).await?;
            if leader == self.inner.me {
                match self.inner.raft.client_write(cmd.clone()).await {
                    Ok(r) => return Ok(r.data),
                    // Leadership moved before the entry was proposed: safe to retry.
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {}
                    Err(RaftError::APIError(e)) => return Err(MetaError::Refused(e.to_string())),
                    Err(RaftError::Fatal(f)) => return Err(MetaError::Stopped(f.to_string())),
                }
            } else {
                let reply = self
                    .inner
                    .forwarder
                    .forward(leader, &addr, Forwarded::Write(cmd.clone()))
                    .await
                    .map_err(|e| match e {
                        // Nothing was delivered: the leader never saw the write.
                        PeerError::Address { .. }
                        | PeerError::KeyRefused { .. }
                        | PeerError::Unreachable { .. } => MetaError::LeaderUnreachable(e),
                        _ => MetaError::Indeterminate(e),
                    })?;
                match reply {
                    Ok(ForwardedReply::Write(r)) => return Ok(r),
                    Ok(other) => {
                        return Err(MetaError::Refused(format!("unexpected forward reply {other:?}")));
                    }
                    // The peer refused before proposing: safe to retry with a newer leader.
                    Err(ForwardError::NotLeader(_)) => {}
                    Err(ForwardError::Refused(why)) => return Err(MetaError::Refused(why)),
                }
            }
            if Instant::now() >= deadline {
                return Err(MetaError::NoLeader(LEADER_WAIT));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Serves a write forwarded by a follower. Never forwards again.
    pub async fn serve_forwarded(&self, req: Forwarded) -> Result<ForwardedReply, ForwardError> {
        serve_forwarded(&self.inner.raft, self.inner.me, req).await
    }

    /// Waits until this node's state machine reflects every write committed
    /// before the call (raft read index, confirmed by a quorum).
    pub async fn linearize(&self) -> Result<(), MetaError> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let (leader, addr) = self.wait_leader(deadline).await?;
            let index = if leader == self.inner.me {
                match self.inner.raft.get_read_log_id().await {
                    Ok((read, _)) => Some(read.map(|l| l.index).unwrap_or(0)),
                    Err(RaftError::APIError(_)) => None,
                    Err(RaftError::Fatal(f)) => return Err(MetaError::Stopped(f.to_string())),
                }
            } else {
                let reply = self
                    .inner
                    .forwarder
                    .forward(leader, &addr, Forwarded::ReadIndex)
                    .await
                    .map_err(MetaError::LeaderUnreachable)?;
                match reply {
                    Ok(ForwardedReply::ReadIndex(i)) => Some(i),
                    Ok(other) => {
                        return Err(MetaError::Refused(format!("unexpected forward reply {other:?}")));
                    }
                    Err(ForwardError::NotLeader(_)) => None,
                    Err(ForwardError::Refused(why)) => return Err(MetaError::Refused(why)),
                }
            };
            if let Some(index) = index {
                let left = deadline.saturating_duration_since(Instant::now());
                self.inner
                    .raft
                    .wait(Some(left.max(Duration::from_millis(1))))
                    .applied_index_at_least(Some(index), "linearizable read")
                    .await
                    .map_err(|_| MetaError::NoLeader(LEADER_WAIT))?;
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(MetaError::NoLeader(LEADER_WAIT));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn get(&self, key: &str, c: Consistency) -> Result<(Option<KeyValue>, u64), MetaError> {
        if c == Consistency::Linearizable {
            self.linearize().await?;
        }
        Ok(self.inner.sm.get_with_revision(key)?)
    }

    pub async fn range(
        &self,
        prefix: &str,
        limit: usize,
        c: Consistency,
    ) -> Result<(Vec<KeyValue>, u64), MetaError> {
        if c == Consistency::Linearizable {
            self.linearize().await?;
        }
        Ok(self.inner.sm.range_with_revision(prefix, limit)?)
    }

    /// Events under `prefix` from `from_revision` (0: from now on).
    pub fn watch(
        &self,
        from_revision: u64,
        prefix: String,
    ) -> impl Stream<Item = Result<Event, WatchError>> + Send + 'static {
        self.inner.sm.watch(from_revision, prefix)
    }

    /// Initialises a new raft group with these voters. Fails if this node already belongs to one.
    pub async fn initialize(&self, voters: BTreeMap<NodeId, BasicNode>) -> Result<(), MetaError> {
        match self.inner.raft.initialize(voters).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Err(MetaError::AlreadyInitialized),
            Err(e) => Err(MetaError::Membership(e.to_string())),
        }
    }

    /// Adds a learner (on the leader). Returns once the membership change is committed.
    pub async fn add_learner(&self, id: NodeId, address: String) -> Result<(), MetaError> {
        self.inner
            .raft
            .add_learner(id, BasicNode::new(address), false)
            .await
            .map(|_| ())
            .map_err(|e| MetaError::Membership(e.to_string()))
    }

    /// Promotes learners to voters (on the leader).
    pub async fn promote(&self, ids: BTreeSet<NodeId>) -> Result<(), MetaError> {
        self.inner
            .raft
            .change_membership(ChangeMembers::AddVoterIds(ids), false)
            .await
            .map(|_| ())
            .map_err(|e| MetaError::Membership(e.to_string()))
    }

    /// Takes `id` out of the raft membership, as a voter and as a node (on
    /// the leader). Removing a voter is a joint change: the voters left must
    /// have a majority for it.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), MetaError> {
        let membership = self.metrics().membership_config.membership().clone();
        let ids: BTreeSet<NodeId> = [id].into();
        let change = if membership.voter_ids().any(|v| v == id) {
            ChangeMembers::RemoveVoters(ids)
        } else if membership.get_node(&id).is_some() {
            ChangeMembers::RemoveNodes(ids)
        } else {
            return Ok(());
        };
        self.inner
            .raft
            .change_membership(change, false)
            .await
            .map(|_| ())
            .map_err(|e| MetaError::Membership(e.to_string()))
    }

    /// Stops raft; the handle answers errors afterwards.
    pub async fn shutdown(&self) {
        let _ = self.inner.raft.shutdown().await;
    }
}

/// The leader's side of [`Forwarder`]: applies a forwarded request on `raft`
/// (node `me`), or says it no longer leads.
pub async fn serve_forwarded(
    raft: &Raft,
    me: NodeId,
    req: Forwarded,
) -> Result<ForwardedReply, ForwardError> {
    match req {
        Forwarded::Write(cmd) => {
            cmd.validate().map_err(|e| ForwardError::Refused(e.to_string()))?;
            match raft.client_write(cmd).await {
                Ok(r) => Ok(ForwardedReply::Write(r.data)),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    Err(ForwardError::NotLeader(me))
                }
                Err(e) => Err(ForwardError::Refused(e.to_string())),
            }
        }
        Forwarded::ReadIndex => match raft.get_read_log_id().await {
            Ok((read, _applied)) => Ok(ForwardedReply::ReadIndex(read.map(|l| l.index).unwrap_or(0))),
            Err(RaftError::APIError(_)) => Err(ForwardError::NotLeader(me)),
            Err(e) => Err(ForwardError::Refused(e.to_string())),
        },
    }
}
