//! [`Formation`]: the task that turns a started node into a pool member and
//! keeps the pool's membership growing.
//!
//! Each round ([`crate::pace::round`]) it greets seeds and known nodes with an
//! authenticated hello, feeds the answers to its [`Discovery`] table, applies
//! the rule, and acts: join through a member, initialise raft, or, once
//! formed, keep this node's record current. On the leader it also writes the
//! pool record once and promotes caught-up learners to voters while the pool
//! has fewer than [`crate::MAX_VOTERS`]. Every decision is made by the
//! sans-IO modules (`discovery`, `decide`, `membership`, `pace`); this file
//! only does the IO and the logging.
//!
//! Tasks: [`Formation::spawn`] starts the round loop, the lease renewals
//! ([`nodeos_meta::lease`]) and, with a discovery interface, the beacon loop;
//! all end when the shutdown flag turns true.
//! The peer API calls [`Formation::hello_reply`] and [`Formation::serve_join`]
//! from its own tasks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nodeos_meta::BasicNode;
use nodeos_meta::Command;
use nodeos_meta::handle::{Consistency, MetaHandle};
use nodeos_meta::lease::RENEW_EVERY;
use nodeos_meta::network::PeerError;
use nodeos_meta::peer::{Hello, HelloReply, JoinReply, JoinRequest, PeerInfo, method};
use nodeos_types::records::{NodeRecord, POOL_KEY, PoolRecord, node_key};
use nodeos_types::{NodeId, PoolId, unix_millis};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::beacon;
use crate::decide::{Decision, WaitReason};
use crate::discovery::{Answered, Discovery, Standing};
use crate::membership::{Admission, admit, forward_once, node_record, promotions};
use crate::pace::{
    self, BIND_RETRY, HELLO_TIMEOUT, JOIN_EVERY, JOIN_TIMEOUT, MAX_REFUSALS, Pacer, REFUSAL_LOG_EVERY,
    RefusalLog,
};

/// Longest wait for one lease renewal to commit.
const RENEW_TIMEOUT: Duration = Duration::from_secs(3);

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
    /// What KVM offers VMs here, recorded for the pool's CPU baseline.
    pub cpu: Option<nodeos_types::cpu::CpuModel>,
    /// Memory of this node, MiB, recorded for VM placement (0: unknown).
    pub memory_mib: u64,
}

/// Asks the replica store how many bytes it may hold.
#[derive(Clone)]
pub struct CapacityProbe(pub Arc<dyn Fn() -> u64 + Send + Sync>);

impl std::fmt::Debug for CapacityProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CapacityProbe")
    }
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
    /// One lock, so that answering a hello and deciding to bootstrap never
    /// interleave (the safety argument in `discovery` needs it).
    discovery: Mutex<Discovery>,
    refusals: Mutex<RefusalLog>,
    /// When the last lease renewal that got committed was sent.
    renewed: Mutex<Option<Instant>>,
}

impl Formation {
    pub fn new(cfg: FormationConfig, meta: MetaHandle) -> Self {
        let me = PeerInfo { id: meta.node_id(), address: cfg.address.clone() };
        let discovery = Mutex::new(Discovery::new(me, cfg.pool_name.clone()));
        let refusals = Mutex::new(RefusalLog::new(REFUSAL_LOG_EVERY, MAX_REFUSALS));
        Formation { inner: Arc::new(Inner { cfg, meta, discovery, refusals, renewed: Mutex::default() }) }
    }

    /// Time since this node sent the last lease renewal that got committed
    /// (`None` before the first): past the TTL the pool may count it dead.
    pub fn since_renewal(&self) -> Option<Duration> {
        self.inner.renewed.lock().unwrap_or_else(|p| p.into_inner()).map(|t| t.elapsed())
    }

    fn discovery(&self) -> MutexGuard<'_, Discovery> {
        // Every table method leaves it whole, so a panic elsewhere while it
        // was held does not make it unusable.
        self.inner.discovery.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pool_id(&self) -> Option<PoolId> {
        let kv = self.inner.meta.state_machine().get(POOL_KEY).ok()??;
        serde_json::from_slice::<PoolRecord>(&kv.value).ok().map(|p| p.id)
    }

    /// This node's place in the pool, as raft reports it now.
    fn standing(&self) -> Standing {
        let meta = &self.inner.meta;
        let metrics = meta.metrics();
        let members = metrics
            .membership_config
            .membership()
            .nodes()
            .map(|(id, node)| PeerInfo { id: *id, address: node.addr.clone() })
            .collect();
        Standing {
            member: meta.is_member(),
            pool_id: self.pool_id(),
            leader: metrics.current_leader,
            members,
        }
    }

    /// Answers a hello from a node that proved it holds the pool key.
    pub fn hello_reply(&self, from: &Hello) -> HelloReply {
        let standing = self.standing();
        self.discovery().answer(from, &standing, Instant::now())
    }

    /// Admits a node that proved it holds the pool key: on the leader, as a
    /// learner (promotion follows once it has caught up); elsewhere, by
    /// handing the request to the leader, once (`handed_over`: another member
    /// sent it, see [`forward_once`]).
    pub async fn serve_join(&self, req: JoinRequest, handed_over: bool) -> Result<JoinReply, String> {
        let meta = &self.inner.meta;
        let in_membership = meta.metrics().membership_config.membership().get_node(&req.node.id).is_some();
        let admission = admit(
            &req,
            &self.inner.cfg.pool_name,
            meta.node_id(),
            meta.is_member(),
            meta.leader(),
            in_membership,
        )
        .and_then(|a| forward_once(a, handed_over, meta.node_id()))
        .map_err(|e| e.to_string())?;
        match admission {
            Admission::Forward { address, .. } => {
                return meta
                    .peers()
                    .call::<_, Result<JoinReply, String>>(&address, method::JOIN, &req, JOIN_TIMEOUT)
                    .await
                    .map_err(|e| format!("cannot reach the leader: {e}"))?;
            }
            Admission::AlreadyMember => {}
            Admission::AddLearner => {
                info!(node = %req.node.id, address = %req.node.address, "admitting node as learner");
                meta.add_learner(req.node.id, req.node.address.clone()).await.map_err(|e| e.to_string())?;
            }
        }
        Ok(JoinReply { pool_id: self.pool_id(), leader: meta.node_id() })
    }

    /// Runs discovery, bootstrap and upkeep until `shutdown` turns true.
    pub fn spawn(&self, shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        if let Some(iface) = self.inner.cfg.discovery_iface.clone() {
            tokio::spawn(me.clone().beacons(iface, shutdown.clone()));
        }
        tokio::spawn(me.clone().renew_leases(shutdown.clone()));
        tokio::spawn(me.run(shutdown))
    }

    /// Renews this node's lease every [`RENEW_EVERY`] while it is a member.
    /// Logs once when renewals start failing and once when they succeed again.
    async fn renew_leases(self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(RENEW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            let meta = &self.inner.meta;
            if !meta.is_member() {
                continue;
            }
            let sent = Instant::now();
            match tokio::time::timeout(RENEW_TIMEOUT, meta.renew_lease()).await {
                Ok(Ok(())) => {
                    *self.inner.renewed.lock().unwrap_or_else(|p| p.into_inner()) = Some(sent);
                    if let Some(since) = failing_since.take() {
                        info!(failed_for_s = since.elapsed().as_secs(), "lease renewed again");
                    }
                }
                Ok(Err(e)) if failing_since.is_none() => {
                    failing_since = Some(sent);
                    warn!(error = %e, "cannot renew this node's lease");
                }
                Err(_) if failing_since.is_none() => {
                    failing_since = Some(sent);
                    warn!(
                        timeout_s = RENEW_TIMEOUT.as_secs(),
                        "cannot renew this node's lease: no commit in time"
                    );
                }
                _ => {}
            }
        }
    }

    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut last_wait: Option<WaitReason> = None;
        let mut announced = false;
        let mut joins = Pacer::new(JOIN_EVERY);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(pace::round(self.inner.meta.is_member())) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            let member = self.inner.meta.is_member();
            if !member || self.inner.meta.leader().is_none() {
                self.probe().await;
            }
            let decision = self.discovery().decide(member, self.inner.cfg.bootstrap_expect, Instant::now());
            match decision {
                Decision::Formed => {
                    if !announced {
                        info!(node = %self.inner.meta.node_id(), "node is a pool member");
                        announced = true;
                    }
                    self.upkeep().await;
                }
                Decision::Join { via, address } => {
                    if joins.ready(Instant::now()) {
                        self.join(via, &address).await;
                    }
                }
                Decision::Bootstrap { voters } => self.bootstrap(voters).await,
                Decision::Wait(reason) => {
                    if last_wait.as_ref() != Some(&reason) {
                        info!(reason = ?reason, "waiting to form a pool");
                        last_wait = Some(reason);
                    }
                }
            }
        }
    }

    async fn join(&self, via: NodeId, address: &str) {
        info!(via = %via, %address, "asking the pool to admit this node");
        let cfg = &self.inner.cfg;
        let req = JoinRequest {
            pool_name: cfg.pool_name.clone(),
            node: self.discovery().me().clone(),
            hostname: cfg.hostname.clone(),
            version: cfg.version.clone(),
        };
        match self
            .inner
            .meta
            .peers()
            .call::<_, Result<JoinReply, String>>(address, method::JOIN, &req, JOIN_TIMEOUT)
            .await
        {
            Ok(Ok(r)) => info!(leader = %r.leader, "join accepted; waiting for replication"),
            Ok(Err(why)) => warn!(via = %via, reason = %why, "join refused"),
            Err(e) => self.peer_failed(address, &e),
        }
    }

    async fn bootstrap(&self, voters: BTreeMap<NodeId, String>) {
        info!(voters = voters.len(), "no pool found and this node has the lowest id: initialising the pool");
        let nodes: BTreeMap<NodeId, BasicNode> =
            voters.into_iter().map(|(id, a)| (id, BasicNode::new(a))).collect();
        match self.inner.meta.initialize(nodes).await {
            Ok(()) => info!("raft initialised"),
            Err(e) => {
                warn!(error = %e, "initialising the pool failed");
                self.discovery().release_claim();
            }
        }
    }

    /// Hello to every seed and every node in the table.
    async fn probe(&self) {
        let asked = Instant::now();
        let (targets, hello) = {
            let mut d = self.discovery();
            (d.targets(&self.inner.cfg.seeds, asked), d.hello())
        };
        let peers = self.inner.meta.peers();
        let calls = targets.into_iter().map(|addr| {
            let hello = &hello;
            async move {
                let r = peers.call::<_, HelloReply>(&addr, method::HELLO, hello, HELLO_TIMEOUT).await;
                (addr, r)
            }
        });
        for (addr, r) in futures::future::join_all(calls).await {
            let reply = match r {
                Ok(reply) => reply,
                Err(e) => {
                    self.peer_failed(&addr, &e);
                    continue;
                }
            };
            let answered = self.discovery().answered(&addr, &reply, asked);
            match answered {
                Answered::Recorded | Answered::Myself => {}
                Answered::OtherPool(theirs) => self.refused(
                    &addr,
                    &format!("it serves pool {theirs:?}, not {:?}", self.inner.cfg.pool_name),
                ),
                Answered::NoId => debug!(%addr, "peer answered with node id 0; ignored"),
            }
        }
    }

    fn peer_failed(&self, addr: &str, e: &PeerError) {
        if key_mismatch(e) {
            self.refused(addr, "pool key mismatch: it refused our pool key or answered with another");
        } else {
            debug!(%addr, error = %e, "peer did not answer");
        }
    }

    fn refused(&self, addr: &str, why: &str) {
        let due = self.inner.refusals.lock().unwrap_or_else(|p| p.into_inner()).due(addr, Instant::now());
        if due {
            error!(peer = %addr, reason = %why, "peer refused: not joining it");
        }
    }

    /// Member duties: this node's record; on the leader, the pool record and promotions.
    async fn upkeep(&self) {
        let meta = &self.inner.meta;
        let me = meta.node_id();
        let cfg = &self.inner.cfg;
        if let Ok((current, _)) = meta.get(&node_key(me), Consistency::Local).await {
            let old: Option<NodeRecord> = current.and_then(|kv| serde_json::from_slice(&kv.value).ok());
            if let Some(want) = node_record(cfg, me, (cfg.block_capacity.0)(), old.as_ref(), unix_millis()) {
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
        // Only the leader tracks replication.
        let Some(repl) = m.replication.as_ref() else { return };
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let matched: BTreeMap<NodeId, Option<u64>> =
            repl.iter().map(|(id, l)| (*id, l.as_ref().map(|l| l.index))).collect();
        let ready = promotions(&voters, &learners, &matched, m.last_log_index);
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
                        _ = tokio::time::sleep(BIND_RETRY) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        };
        info!(%iface, %group, "discovery beacons on");
        let me = self.discovery().me().clone();
        let key = self.inner.meta.peers().key().clone();
        let mut next_send = tokio::time::Instant::now();
        let mut buf = vec![0u8; beacon::MAX_BEACON + 1];
        let mut bad = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep_until(next_send) => {
                    next_send = tokio::time::Instant::now() + pace::round(self.inner.meta.is_member());
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
                    let (n, from) = match r {
                        Ok(got) => got,
                        Err(e) => {
                            // A socket that keeps failing must not spin PID 1.
                            warn!(error = %e, "beacon socket receive failed; pausing");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    match beacon::decode(&key, &buf[..n]) {
                        Ok(b) => {
                            self.discovery().heard_beacon(&b, Instant::now());
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

/// Whether a failed call means the peer holds another pool key (worth an
/// error in the log), rather than being down or slow.
fn key_mismatch(e: &PeerError) -> bool {
    matches!(e, PeerError::KeyRefused { .. } | PeerError::Envelope { .. })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nodeos_meta::testing::TestPool;

    use super::*;

    fn cfg(address: &str) -> FormationConfig {
        FormationConfig {
            pool_name: "lab".into(),
            address: address.into(),
            hostname: "host".into(),
            version: "test".into(),
            image_hash: String::new(),
            seeds: vec![],
            bootstrap_expect: 3,
            discovery_iface: None,
            beacon_port: 7799,
            block_address: String::new(),
            vxlan_address: String::new(),
            block_capacity: CapacityProbe(Arc::new(|| 3 << 30)),
            cpu: None,
            memory_mib: 0,
        }
    }

    fn join(pool: &str, id: u64) -> JoinRequest {
        JoinRequest {
            pool_name: pool.into(),
            node: PeerInfo { id: NodeId(id), address: format!("n{id}:7700") },
            hostname: format!("host{id}"),
            version: "test".into(),
        }
    }

    fn ids(v: impl IntoIterator<Item = NodeId>) -> Vec<u64> {
        v.into_iter().map(|id| id.0).collect()
    }

    /// Polls `done` until it holds; fails the test after a generous bound.
    async fn eventually<F, Fut>(what: &str, mut done: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn only_key_trouble_is_worth_an_error() {
        let refused = PeerError::KeyRefused { address: "a:1".into(), method: method::HELLO };
        let down = PeerError::Unreachable { address: "a:1".into(), method: method::HELLO };
        let slow = PeerError::Timeout { address: "a:1".into(), method: method::HELLO };
        assert!(key_mismatch(&refused));
        assert!(!key_mismatch(&down));
        assert!(!key_mismatch(&slow));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_leader_admits_learners_and_promotes_them_up_to_five_voters() {
        let mut pool = TestPool::new(3).await.expect("a test pool starts");
        let leader = pool.leader().await.expect("the pool elects a leader");
        let f = Formation::new(cfg("n0:7700"), leader.clone());
        for id in 4..=6 {
            pool.start(NodeId(id)).await.expect("a new node starts");
        }
        for id in 4..=6 {
            f.serve_join(join("lab", id), false).await.expect("the leader admits a new node");
        }
        // A retried join changes nothing.
        f.serve_join(join("lab", 4), false).await.expect("a retried join is answered");
        let m = leader.metrics();
        let membership = m.membership_config.membership();
        assert_eq!(ids(membership.voter_ids()), [1, 2, 3]);
        assert_eq!(ids(membership.learner_ids()), [4, 5, 6]);
        // Learners become voters once caught up (lowest ids first among those
        // caught up: which two depends on who catches up first), five at most.
        eventually("two promotions", || async {
            f.promote().await;
            leader.metrics().membership_config.membership().voter_ids().count() == crate::MAX_VOTERS
        })
        .await;
        f.promote().await;
        let m = leader.metrics();
        let membership = m.membership_config.membership();
        let voters = ids(membership.voter_ids());
        let learners = ids(membership.learner_ids());
        assert_eq!(voters.len(), crate::MAX_VOTERS, "{voters:?}");
        assert_eq!(voters[..3], [1, 2, 3], "{voters:?}");
        assert_eq!(learners.len(), 1, "{learners:?}");
        let mut all: Vec<u64> = voters.iter().chain(&learners).copied().collect();
        all.sort_unstable();
        assert_eq!(all, [1, 2, 3, 4, 5, 6]);
        let six = pool.handle(NodeId(6));
        eventually("node 6 to learn it is a member", || async { six.is_member() }).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn joins_are_refused_with_a_reason_and_only_members_admit() {
        let mut pool = TestPool::new(3).await.expect("a test pool starts");
        let leader = pool.leader().await.expect("the pool elects a leader");
        let f = Formation::new(cfg("n0:7700"), leader.clone());
        let e = f.serve_join(join("other", 7), false).await.expect_err("another pool's name is refused");
        assert!(e.contains("pool name"), "{e}");
        let e = f.serve_join(join("lab", 0), false).await.expect_err("node id 0 is refused");
        assert!(e.contains("node id 0"), "{e}");
        let mut bad = join("lab", 7);
        bad.node.address = "nowhere".into();
        let e = f.serve_join(bad, false).await.expect_err("an address without port is refused");
        assert!(e.contains("not usable"), "{e}");
        assert_eq!(leader.metrics().membership_config.membership().nodes().count(), 3);
        // A node that belongs to no pool admits nobody.
        let loner = pool.start(NodeId(9)).await.expect("a new node starts");
        let e = Formation::new(cfg("n9:7700"), loner)
            .serve_join(join("lab", 7), false)
            .await
            .expect_err("no member");
        assert!(e.contains("not a pool member"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hello_answers_say_what_raft_says_and_record_the_greeter() {
        let mut pool = TestPool::new(3).await.expect("a test pool starts");
        let leader = pool.leader().await.expect("the pool elects a leader");
        let f = Formation::new(cfg("n0:7700"), leader.clone());
        let greeter =
            Hello { pool_name: "lab".into(), node: PeerInfo { id: NodeId(7), address: "n7:7700".into() } };
        let r = f.hello_reply(&greeter);
        assert!(r.member);
        assert_eq!(r.leader, Some(leader.node_id()));
        let known: Vec<u64> = ids(r.known.iter().map(|k| k.id));
        let mut want: Vec<u64> = [1, 2, 3, 7].into_iter().filter(|id| *id != leader.node_id().0).collect();
        want.sort_unstable();
        assert_eq!(known, want);
        assert!(f.discovery().view(Instant::now()).contains_key(&NodeId(7)));
        // A node that belongs to no pool says so.
        let loner = pool.start(NodeId(9)).await.expect("a new node starts");
        let r = Formation::new(cfg("n9:7700"), loner).hello_reply(&greeter);
        assert!(!r.member);
        assert_eq!(r.leader, None);
        assert_eq!(ids(r.known.iter().map(|k| k.id)), [7]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upkeep_writes_the_node_record_and_the_pool_record_once() {
        let pool = TestPool::new(3).await.expect("a test pool starts");
        let leader = pool.leader().await.expect("the pool elects a leader");
        let f = Formation::new(cfg("n0:7700"), leader.clone());
        f.upkeep().await;
        let pool_id = f.pool_id().expect("the leader wrote the pool record");
        let (kv, _) =
            leader.get(&node_key(leader.node_id()), Consistency::Linearizable).await.expect("reads");
        let rec: NodeRecord =
            serde_json::from_slice(&kv.expect("the node record exists").value).expect("decodes");
        assert_eq!(rec.address, "n0:7700");
        assert_eq!(rec.block_capacity, 3 << 30);
        f.upkeep().await;
        assert_eq!(f.pool_id(), Some(pool_id), "the pool record is written once");
        let r = f.serve_join(join("lab", 4), false).await.expect("the leader admits a new node");
        assert_eq!(r.pool_id, Some(pool_id));
        // A follower keeps its own record but leaves the pool record alone.
        let follower_id = pool.ids().into_iter().find(|id| *id != leader.node_id()).expect("three nodes");
        let follower = Formation::new(cfg("n8:7700"), pool.handle(follower_id));
        follower.upkeep().await;
        let (kv, _) = leader.get(&node_key(follower_id), Consistency::Linearizable).await.expect("reads");
        assert!(kv.is_some(), "the follower's record was forwarded and written");
        assert_eq!(f.pool_id(), Some(pool_id));
    }
}
