//! [`Formation`]: the task that turns a started node into a pool member and
//! keeps the pool's membership growing.
//!
//! Each round (one second) it probes seeds and nodes heard by beacon with an
//! authenticated hello, applies [`crate::decide::decide`], and acts: join through
//! a member, initialise raft, or, once formed, keep this node's record current.
//! On the leader it also writes the pool record once and promotes caught-up
//! learners to voters while the pool has fewer than [`crate::MAX_VOTERS`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodeos_meta::BasicNode;
use nodeos_meta::Command;
use nodeos_meta::handle::{Consistency, MetaHandle};
use nodeos_meta::network::PeerError;
use nodeos_meta::peer::{Hello, HelloReply, JoinReply, JoinRequest, PeerInfo, method};
use nodeos_types::records::{NodeRecord, POOL_KEY, PoolRecord, node_key};
use nodeos_types::{NodeId, PoolId, unix_millis};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::beacon;
use crate::decide::{Decision, Seen, WaitReason, decide};

/// Discovery round while the node is not a pool member yet.
const FORMING_ROUND: Duration = Duration::from_millis(250);
/// Upkeep round once it is.
const ROUND: Duration = Duration::from_secs(1);
const HELLO_TIMEOUT: Duration = Duration::from_millis(900);
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Least time between two join requests of a node waiting to be admitted.
const JOIN_EVERY: Duration = Duration::from_secs(2);
/// A node not heard from for this long is forgotten by discovery.
const FORGET_AFTER: Duration = Duration::from_secs(10);
/// Log a repeated refusal from the same address at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(30);
/// A learner within this many entries of the leader's log counts as caught up.
const CAUGHT_UP_LAG: u64 = 64;

/// What formation needs to know about this node and its pool.
#[derive(Debug, Clone)]
pub struct FormationConfig {
    pub pool_name: String,
    /// Address other nodes reach this node's gRPC server at.
    pub address: String,
    pub hostname: String,
    pub version: String,
    pub image_hash: String,
    pub seeds: Vec<String>,
    pub bootstrap_expect: usize,
    /// Interface to send and hear beacons on; none means seeds only.
    pub discovery_iface: Option<String>,
    pub beacon_port: u16,
    /// Address other nodes reach this node's replica server at.
    pub block_address: String,
    /// Where this node's switch receives VXLAN traffic (ip:port).
    pub vxlan_address: String,
    /// Bytes this node's replica store may hold, asked at every upkeep.
    pub block_capacity: CapacityProbe,
}

/// Asks the replica store how many bytes it may hold.
#[derive(Clone)]
pub struct CapacityProbe(pub Arc<dyn Fn() -> u64 + Send + Sync>);

impl std::fmt::Debug for CapacityProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CapacityProbe")
    }
}

/// Capacity is reported in these steps so that small changes in free space
/// do not rewrite the node record every round.
const CAPACITY_STEP: u64 = 64 << 20;

#[derive(Debug, Clone)]
struct SeenEntry {
    address: String,
    verified: bool,
    member: bool,
    heard: Instant,
}

/// Cloneable handle to the formation state; the peer API answers hello and
/// join through it.
#[derive(Clone, Debug)]
pub struct Formation {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: FormationConfig,
    meta: MetaHandle,
    seen: Mutex<BTreeMap<NodeId, SeenEntry>>,
    refusals: Mutex<HashMap<String, Instant>>,
}

impl Formation {
    pub fn new(cfg: FormationConfig, meta: MetaHandle) -> Self {
        Formation { inner: Arc::new(Inner { cfg, meta, seen: Mutex::default(), refusals: Mutex::default() }) }
    }

    fn me(&self) -> PeerInfo {
        PeerInfo { id: self.inner.meta.node_id(), address: self.inner.cfg.address.clone() }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, SeenEntry>> {
        self.inner.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pool_id(&self) -> Option<PoolId> {
        let kv = self.inner.meta.state_machine().get(POOL_KEY).ok()??;
        serde_json::from_slice::<PoolRecord>(&kv.value).ok().map(|p| p.id)
    }

    /// Answers a hello from a node that proved it holds the pool key.
    pub fn hello_reply(&self, from: &Hello) -> HelloReply {
        let me = self.me();
        if from.pool_name == self.inner.cfg.pool_name && from.node.id != me.id {
            let mut seen = self.seen();
            let e = seen.entry(from.node.id).or_insert_with(|| SeenEntry {
                address: from.node.address.clone(),
                verified: true,
                member: false,
                heard: Instant::now(),
            });
            e.address = from.node.address.clone();
            e.verified = true;
            e.heard = Instant::now();
        }
        let metrics = self.inner.meta.metrics();
        let mut known: BTreeSet<PeerInfo> = self
            .seen()
            .iter()
            .filter(|(_, s)| s.verified)
            .map(|(id, s)| PeerInfo { id: *id, address: s.address.clone() })
            .collect();
        for (id, node) in metrics.membership_config.membership().nodes() {
            known.insert(PeerInfo { id: *id, address: node.addr.clone() });
        }
        known.remove(&me);
        HelloReply {
            pool_name: self.inner.cfg.pool_name.clone(),
            node: me,
            member: self.inner.meta.is_member(),
            pool_id: self.pool_id(),
            leader: metrics.current_leader,
            known: known.into_iter().collect(),
        }
    }

    /// Admits a node that proved it holds the pool key: on the leader, as a
    /// learner (promotion follows once it has caught up); elsewhere, by
    /// handing the request to the leader.
    pub async fn serve_join(&self, req: JoinRequest) -> Result<JoinReply, String> {
        let meta = &self.inner.meta;
        if req.pool_name != self.inner.cfg.pool_name {
            return Err(format!(
                "pool name {:?} does not match this pool {:?}",
                req.pool_name, self.inner.cfg.pool_name
            ));
        }
        if !meta.is_member() {
            return Err("this node is not a pool member yet".into());
        }
        let Some((leader, leader_addr)) = meta.leader() else {
            return Err("the pool has no leader right now; retry".into());
        };
        if leader != meta.node_id() {
            return meta
                .peers()
                .call::<_, Result<JoinReply, String>>(&leader_addr, method::JOIN, &req, JOIN_TIMEOUT)
                .await
                .map_err(|e| format!("cannot reach the leader: {e}"))?;
        }
        let membership = meta.metrics().membership_config.membership().clone();
        if membership.get_node(&req.node.id).is_none() {
            info!(node = %req.node.id, address = %req.node.address, "admitting node as learner");
            meta.add_learner(req.node.id, req.node.address.clone()).await.map_err(|e| e.to_string())?;
        }
        Ok(JoinReply { pool_id: self.pool_id(), leader })
    }

    /// Runs discovery, bootstrap and upkeep until `shutdown` turns true.
    pub fn spawn(&self, shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        if let Some(iface) = self.inner.cfg.discovery_iface.clone() {
            tokio::spawn(me.clone().beacons(iface, shutdown.clone()));
        }
        tokio::spawn(me.run(shutdown))
    }

    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut last_candidates: BTreeSet<NodeId> = BTreeSet::new();
        let mut stable_rounds = 0u32;
        let mut last_wait: Option<WaitReason> = None;
        let mut announced = false;
        let mut last_join: Option<Instant> = None;
        loop {
            let round = if self.inner.meta.is_member() { ROUND } else { FORMING_ROUND };
            tokio::select! {
                _ = tokio::time::sleep(round) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            let member = self.inner.meta.is_member();
            if !member || self.inner.meta.leader().is_none() {
                self.probe().await;
            }
            let view = self.view();
            let candidates: BTreeSet<NodeId> =
                view.iter().filter(|(_, s)| s.verified).map(|(id, _)| *id).collect();
            if candidates == last_candidates {
                stable_rounds = stable_rounds.saturating_add(1);
            } else {
                stable_rounds = 0;
                last_candidates = candidates;
            }
            let me = self.me();
            match decide(me.id, &me.address, member, &view, self.inner.cfg.bootstrap_expect, stable_rounds) {
                Decision::Formed => {
                    if !announced {
                        info!(node = %me.id, "node is a pool member");
                        announced = true;
                    }
                    self.upkeep().await;
                }
                Decision::Join { .. } if last_join.is_some_and(|t| t.elapsed() < JOIN_EVERY) => {}
                Decision::Join { via, address } => {
                    last_join = Some(Instant::now());
                    info!(via = %via, %address, "asking the pool to admit this node");
                    let req = JoinRequest {
                        pool_name: self.inner.cfg.pool_name.clone(),
                        node: me.clone(),
                        hostname: self.inner.cfg.hostname.clone(),
                        version: self.inner.cfg.version.clone(),
                    };
                    match self
                        .inner
                        .meta
                        .peers()
                        .call::<_, Result<JoinReply, String>>(&address, method::JOIN, &req, JOIN_TIMEOUT)
                        .await
                    {
                        Ok(Ok(r)) => info!(leader = %r.leader, "join accepted; waiting for replication"),
                        Ok(Err(why)) => warn!(via = %via, reason = %why, "join refused"),
                        Err(e) => self.peer_failed(&address, &e),
                    }
                }
                Decision::Bootstrap { voters } => {
                    info!(
                        voters = voters.len(),
                        "no pool found and this node has the lowest id: initialising the pool"
                    );
                    let nodes: BTreeMap<NodeId, BasicNode> =
                        voters.into_iter().map(|(id, a)| (id, BasicNode::new(a))).collect();
                    match self.inner.meta.initialize(nodes).await {
                        Ok(()) => info!("raft initialised"),
                        Err(e) => warn!(error = %e, "initialising the pool failed"),
                    }
                }
                Decision::Wait(reason) => {
                    if last_wait.as_ref() != Some(&reason) {
                        info!(reason = ?reason, "waiting to form a pool");
                        last_wait = Some(reason);
                    }
                }
            }
        }
    }

    /// Seen nodes, minus forgotten ones, in the shape the rule wants.
    fn view(&self) -> BTreeMap<NodeId, Seen> {
        let mut seen = self.seen();
        seen.retain(|_, s| s.heard.elapsed() < FORGET_AFTER);
        seen.iter()
            .map(|(id, s)| (*id, Seen { address: s.address.clone(), verified: s.verified, member: s.member }))
            .collect()
    }

    /// Hello to every seed and every node heard of but not verified recently.
    async fn probe(&self) {
        let me = self.me();
        let mut targets: BTreeSet<String> = self.inner.cfg.seeds.iter().cloned().collect();
        targets.extend(self.seen().values().map(|s| s.address.clone()));
        targets.remove(&me.address);
        let hello = Hello { pool_name: self.inner.cfg.pool_name.clone(), node: me.clone() };
        let calls = targets.into_iter().map(|addr| {
            let hello = hello.clone();
            async move {
                let r = self
                    .inner
                    .meta
                    .peers()
                    .call::<_, HelloReply>(&addr, method::HELLO, &hello, HELLO_TIMEOUT)
                    .await;
                (addr, r)
            }
        });
        for (addr, r) in futures::future::join_all(calls).await {
            match r {
                Ok(reply) if reply.pool_name != self.inner.cfg.pool_name => {
                    self.refused(
                        &addr,
                        &format!("it serves pool {:?}, not {:?}", reply.pool_name, self.inner.cfg.pool_name),
                    );
                }
                Ok(reply) if reply.node.id == me.id => {}
                Ok(reply) => {
                    let mut seen = self.seen();
                    seen.insert(
                        reply.node.id,
                        SeenEntry {
                            address: reply.node.address.clone(),
                            verified: true,
                            member: reply.member,
                            heard: Instant::now(),
                        },
                    );
                    for k in reply.known {
                        if k.id == me.id {
                            continue;
                        }
                        seen.entry(k.id).or_insert_with(|| SeenEntry {
                            address: k.address.clone(),
                            verified: false,
                            member: false,
                            heard: Instant::now(),
                        });
                    }
                }
                Err(e) => self.peer_failed(&addr, &e),
            }
        }
    }

    fn peer_failed(&self, addr: &str, e: &PeerError) {
        match e {
            PeerError::KeyRefused { .. } | PeerError::Envelope { .. } => {
                self.refused(addr, "pool key mismatch: it refused our pool key or answered with another");
            }
            other => debug!(%addr, error = %other, "peer did not answer"),
        }
    }

    fn refused(&self, addr: &str, why: &str) {
        let mut r = self.inner.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let due = r.get(addr).is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY);
        if due {
            error!(peer = %addr, reason = %why, "peer refused: not joining it");
            r.insert(addr.to_owned(), Instant::now());
        }
    }

    /// Member duties: this node's record; on the leader, the pool record and promotions.
    async fn upkeep(&self) {
        let meta = &self.inner.meta;
        let me = meta.node_id();
        let cfg = &self.inner.cfg;
        if let Ok((current, _)) = meta.get(&node_key(me), Consistency::Local).await {
            let old: Option<NodeRecord> = current.and_then(|kv| serde_json::from_slice(&kv.value).ok());
            let want = NodeRecord {
                id: me,
                address: cfg.address.clone(),
                hostname: cfg.hostname.clone(),
                version: cfg.version.clone(),
                image_hash: cfg.image_hash.clone(),
                joined_at_ms: old.as_ref().map(|o| o.joined_at_ms).unwrap_or_else(unix_millis),
                block_address: cfg.block_address.clone(),
                block_capacity: (cfg.block_capacity.0)() / CAPACITY_STEP * CAPACITY_STEP,
                vxlan_address: cfg.vxlan_address.clone(),
            };
            if old.as_ref() != Some(&want) {
                match serde_json::to_vec(&want) {
                    Ok(v) => match meta.write(Command::put(node_key(me), v)).await {
                        Ok(_) => info!(node = %me, address = %want.address, "node record written"),
                        Err(e) => debug!(error = %e, "node record not written yet"),
                    },
                    Err(e) => error!(error = %e, "node record does not serialize"),
                }
            }
        }
        if !meta.is_leader() {
            return;
        }
        if self.pool_id().is_none() {
            let rec = PoolRecord {
                id: PoolId::random(),
                name: cfg.pool_name.clone(),
                created_at_ms: unix_millis(),
                founder: me,
            };
            if let Ok(v) = serde_json::to_vec(&rec) {
                match meta.write(Command::put_if(POOL_KEY, v, 0)).await {
                    Ok(r) if r.succeeded => info!(pool = %rec.id, name = %rec.name, "pool created"),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "pool record not written yet"),
                }
            }
        }
        self.promote().await;
    }

    async fn promote(&self) {
        let meta = &self.inner.meta;
        let m = meta.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.len() >= crate::MAX_VOTERS {
            return;
        }
        let last = m.last_log_index.unwrap_or(0);
        let Some(repl) = m.replication.as_ref() else { return };
        let ready: BTreeSet<NodeId> = membership
            .learner_ids()
            .filter(|id| {
                repl.get(id).and_then(|l| l.as_ref()).is_some_and(|l| l.index + CAUGHT_UP_LAG >= last)
            })
            .take(crate::MAX_VOTERS - voters.len())
            .collect();
        if ready.is_empty() {
            return;
        }
        info!(nodes = ?ready, voters = voters.len(), "promoting caught-up learners to voters");
        if let Err(e) = meta.promote(ready).await {
            warn!(error = %e, "promotion failed; will retry");
        }
    }

    /// Sends a beacon every round and records valid beacons heard.
    async fn beacons(self, iface: String, mut shutdown: watch::Receiver<bool>) {
        let port = self.inner.cfg.beacon_port;
        let (sock, group) = loop {
            match beacon::bind(&iface, port) {
                Ok(s) => break s,
                Err(e) => {
                    warn!(%iface, error = %e, "beacon socket not ready; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        };
        info!(%iface, %group, "discovery beacons on");
        let me = self.me();
        let key = self.inner.meta.peers().key().clone();
        let mut next_send = tokio::time::Instant::now();
        let mut buf = vec![0u8; beacon::MAX_BEACON + 1];
        let mut bad = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep_until(next_send) => {
                    let every = if self.inner.meta.is_member() { ROUND } else { FORMING_ROUND };
                    next_send = tokio::time::Instant::now() + every;
                    match beacon::encode(&key, &beacon::make(&self.inner.cfg.pool_name, me.id, &me.address)) {
                        Ok(b) => {
                            if let Err(e) = sock.send_to(&b, group).await {
                                debug!(error = %e, "beacon send failed");
                            }
                        }
                        Err(e) => error!(error = %e, "beacon does not encode"),
                    }
                }
                r = sock.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { continue };
                    match beacon::decode(&key, &buf[..n]) {
                        Ok(b) if b.node == me.id || b.pool_name != self.inner.cfg.pool_name => {}
                        Ok(b) => {
                            let mut seen = self.seen();
                            let e = seen.entry(b.node).or_insert_with(|| SeenEntry {
                                address: b.address.clone(),
                                verified: false,
                                member: false,
                                heard: Instant::now(),
                            });
                            if !e.verified {
                                e.address = b.address;
                                e.heard = Instant::now();
                            }
                        }
                        Err(e) => {
                            bad += 1;
                            self.refused(&from.to_string(), &format!("beacon dropped ({e}); {bad} dropped so far"));
                        }
                    }
                }
            }
        }
    }
}
