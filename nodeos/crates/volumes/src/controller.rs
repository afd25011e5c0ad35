//! The leader's volume controller: keeps every volume's copies where the
//! placement rules (`placement.rs`) want them, and the copies equal.
//!
//! Every pass runs only while this node leads raft, acts through the same
//! records and replica ops as everyone else, and is safe to interrupt: a
//! placement change is committed (compare-and-swap on the volume's record)
//! before any copying, so a half-done pass is finished by the next one, or by
//! the next leader.
//!
//! One pass:
//! 1. **Observe**: which members' replica servers answer; a member unreachable
//!    for longer than `rereplicate_after` is *lost*.
//! 2. **Tend** each available volume: replace copies on lost or departed
//!    nodes and grow short extents to the volume's target (`plan_repairs`),
//!    then fill the new copies by repair. Volumes without a writer also get
//!    their copies compared (and repaired) when a node came back, and every
//!    `CHECK_EVERY`; a writer repairs its own volume's copies (see
//!    `nodeos_block::client`). The record's `warning` is kept true.
//! 3. **Spread**: while every member answers, copies of writer-less volumes
//!    move from the most to the least loaded nodes (`plan_spread`), at most
//!    `spread_moves` per pass: the new copy is added and filled, every copy
//!    of the extent is proven equal, and only then is the old copy dropped.
//!    An extent left with a surplus copy (an interrupted move) is settled the
//!    same way on a later pass. The old copy's space is reclaimed with the
//!    volume (see `reclaim`).
//! 4. **Reclaim** deleting volumes' layers on every node, then their records.
//! 5. **Scrub** every copy's checksums every `scrub_every`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nodeos_block::repair;
use nodeos_block::store::LayerExtent;
use nodeos_block::transport::{ReplicaRef, TcpTransport, Transport};
use nodeos_block::wire::{Answer, Op};
use nodeos_types::records::{NodeRecord, VolumeRecord, VolumeState};
use nodeos_types::{NodeId, unix_millis};
use tracing::{info, warn};

use crate::health::scrub_volume;
use crate::placement::{Change, Load, NodeView, apply, load_of, plan_repairs, plan_spread, surplus};
use crate::volumes::{VolumeError, Volumes, layout_of, short_warning};

/// When the controller acts.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A node unreachable this long loses its copies to other nodes.
    pub rereplicate_after: Duration,
    /// How often every copy of every volume is scrubbed.
    pub scrub_every: Duration,
    /// Time between passes.
    pub period: Duration,
    /// Most copies moved for balance in one pass.
    pub spread_moves: usize,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            rereplicate_after: Duration::from_secs(60),
            scrub_every: Duration::from_secs(24 * 3600),
            period: Duration::from_secs(2),
            spread_moves: 4,
        }
    }
}

/// What one pass did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Copies rebuilt on another node because theirs was lost or left.
    pub replaced: usize,
    /// Copies added to extents short of their target.
    pub added: usize,
    /// Copies moved for balance (added, filled, proven, old one dropped).
    pub moved: usize,
    /// Extents whose copies were repaired.
    pub repaired: usize,
    /// Deleting volumes whose space was reclaimed.
    pub reclaimed: usize,
}

/// Extents repaired at the same time by one controller pass.
const PARALLEL_EXTENTS: usize = 4;

/// How often copies of writer-less volumes are compared even when no node
/// came back (a missed event, a repair that failed half-way).
const CHECK_EVERY: Duration = Duration::from_secs(300);

/// The leader's volume controller. Run [`Controller::run`] on every node;
/// it only acts while the node leads.
#[derive(Debug)]
pub struct Controller<T = TcpTransport> {
    volumes: Volumes<T>,
    cfg: ControllerConfig,
    /// When each node was first seen unreachable (this leadership).
    unreachable_since: HashMap<NodeId, Instant>,
    /// Nodes reachable again since the last pass: their copies may have
    /// missed writes.
    recovered: HashSet<NodeId>,
    last_scrub: Option<Instant>,
    /// When every writer-less volume's copies were last compared.
    last_check: Option<Instant>,
}

impl<T: Transport + Clone> Controller<T> {
    pub fn new(volumes: Volumes<T>, cfg: ControllerConfig) -> Self {
        Controller {
            volumes,
            cfg,
            unreachable_since: HashMap::new(),
            recovered: HashSet::new(),
            last_scrub: None,
            last_check: None,
        }
    }

    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()> + Send) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(self.cfg.period) => {}
            }
            if !self.volumes.meta().is_leader() {
                self.unreachable_since.clear();
                self.last_scrub = None;
                continue;
            }
            match self.pass().await {
                Ok(report) if report != PassReport::default() => info!(?report, "volume controller pass"),
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %nodeos_types::error_chain(&e), "volume controller pass failed; retrying")
                }
            }
        }
    }

    /// Whether a node's replica server answers.
    async fn reachable(&self, n: &NodeRecord) -> bool {
        let r = ReplicaRef { node: n.id, address: n.block_address.clone() };
        matches!(self.volumes.transport().call(&r, Op::Usage).await, Ok(Answer::Usage(_)))
    }

    /// Which members answer, and which are lost.
    async fn observe(&mut self, nodes: &BTreeMap<NodeId, NodeRecord>) -> NodeView {
        let mut view = NodeView { members: nodes.keys().copied().collect(), ..NodeView::default() };
        for n in nodes.values() {
            if self.reachable(n).await {
                view.up.insert(n.id);
                if self.unreachable_since.remove(&n.id).is_some() {
                    self.recovered.insert(n.id);
                }
            } else {
                self.unreachable_since.entry(n.id).or_insert_with(Instant::now);
            }
        }
        self.unreachable_since.retain(|n, _| nodes.contains_key(n));
        // A node in maintenance keeps serving its copies but takes no new ones:
        // out of `up`, never `lost` while it answers.
        for n in nodes.values().filter(|n| n.maintenance) {
            view.up.remove(&n.id);
        }
        view.lost = self
            .unreachable_since
            .iter()
            .filter(|(_, since)| since.elapsed() >= self.cfg.rereplicate_after)
            .map(|(n, _)| *n)
            .collect();
        // A node being removed loses its copies at once, reachable or not
        // (the removal checked that every extent has another copy up).
        for n in nodes.values().filter(|n| n.removing) {
            view.up.remove(&n.id);
            view.lost.insert(n.id);
        }
        view
    }

    /// One pass of every rule (see the module docs). Only the leader should
    /// call it; [`Controller::run`] does.
    pub async fn pass(&mut self) -> Result<PassReport, VolumeError> {
        let mut report = PassReport::default();
        let nodes = self.volumes.nodes().await?;
        let view = self.observe(&nodes).await;
        let full_check = self.last_check.is_none_or(|t| t.elapsed() >= CHECK_EVERY);
        if full_check {
            self.last_check = Some(Instant::now());
        }
        let recovered = std::mem::take(&mut self.recovered);
        // One listing per pass: every change below re-reads its own record
        // and writes it by compare-and-swap, so a stale entry costs a retry
        // next pass, never a wrong write (reclaim alone reads afresh what is
        // shared). `load` follows this pass's changes.
        let volumes = self.volumes.list().await?;
        let mut load = load_of(volumes.iter().map(|v| v.placement.as_slice()));
        for r in &volumes {
            let check = full_check || r.placement.iter().flatten().any(|n| recovered.contains(n));
            let result = match r.state {
                VolumeState::Deleting => self.reclaim(r, &nodes, &view).await.map(|()| report.reclaimed += 1),
                VolumeState::Available => self.tend(r, &nodes, &view, &mut load, check, &mut report).await,
            };
            if let Err(e) = result {
                warn!(volume = %r.id, error = %nodeos_types::error_chain(&e), "volume controller");
            }
        }
        if let Err(e) = self.spread(&volumes, &nodes, &view, &mut load, &mut report).await {
            warn!(error = %nodeos_types::error_chain(&e), "volume controller: spreading copies");
        }
        let scrub_due = self.last_scrub.is_none_or(|t| t.elapsed() >= self.cfg.scrub_every);
        if scrub_due {
            // The first pass of a leadership only starts the clock.
            if self.last_scrub.is_some() {
                for r in self.volumes.list().await? {
                    if r.state == VolumeState::Available {
                        let _ = scrub_volume(&self.volumes, &r.id.to_string()).await;
                    }
                }
            }
            self.last_scrub = Some(Instant::now());
        }
        Ok(report)
    }

    /// Rules 1–2 for one volume: new copies where needed, filled; copies
    /// compared when `check`; the warning kept true.
    async fn tend(
        &self,
        r: &VolumeRecord,
        nodes: &BTreeMap<NodeId, NodeRecord>,
        view: &NodeView,
        load: &mut Load,
        check: bool,
        report: &mut PassReport,
    ) -> Result<(), VolumeError> {
        let mut filled: Vec<usize> = Vec::new();
        let target = usize::from(r.replicas);
        let planned = plan_repairs(&r.placement, target, view, &mut load.clone());
        if !planned.is_empty() {
            let (mut cur, rev) = self.volumes.get(&r.id.to_string()).await?;
            // Planned again on the record as it is now: it may have changed.
            let changes = plan_repairs(&cur.placement, usize::from(cur.replicas), view, load);
            for c in &changes {
                match *c {
                    Change::Replace { extent, from, to } => {
                        warn!(volume = %cur.id, extent, lost = %from, new = %to, "copy lost; rebuilding it elsewhere");
                        report.replaced += 1;
                    }
                    Change::Add { extent, to } => {
                        info!(volume = %cur.id, extent, new = %to, "extent short of copies; adding one");
                        report.added += 1;
                    }
                    Change::Drop { .. } => {}
                }
            }
            apply(&mut cur.placement, &changes);
            cur.updated_at_ms = unix_millis();
            self.volumes.put_if(&cur, rev).await?;
            filled = changes.iter().filter(|c| c.fills()).map(Change::extent).collect();
        }
        let (r, _) = self.volumes.get(&r.id.to_string()).await?;
        let layout = layout_of(&r, nodes)?;
        let mut degraded = Vec::new();
        let mut jobs = Vec::new();
        for (e, reps) in layout.extents.iter().enumerate() {
            let live: Vec<ReplicaRef> = reps.iter().filter(|x| view.up.contains(&x.node)).cloned().collect();
            if live.len() < reps.len() {
                degraded.push(format!("extent {e}: {} of {} copies reachable", live.len(), reps.len()));
            }
            // A writer repairs its own copies; without one, the leader does.
            let must = filled.contains(&e) || (check && r.writer.is_none());
            // Repair needs a source and a target.
            if must && live.len() >= 2 {
                jobs.push((e, live));
            }
        }
        let (repaired, failed) =
            self.repair_extents(&r, &layout.layers, layout.extent_blocks(), jobs, &filled).await;
        report.repaired += repaired;
        degraded.extend(failed);
        let warning = warning_of(&r, nodes.len(), view, &degraded);
        if warning != r.warning {
            let (mut cur, rev) = self.volumes.get(&r.id.to_string()).await?;
            cur.warning = warning;
            cur.updated_at_ms = unix_millis();
            self.volumes.put_if(&cur, rev).await?;
        }
        Ok(())
    }

    /// Repairs extents (every layer), several at once. `fresh` extents have
    /// new copies and are repaired without comparing digests first. Answers
    /// how many extents were repaired and a message per failure.
    async fn repair_extents(
        &self,
        r: &VolumeRecord,
        layers: &[u64],
        blocks: u32,
        jobs: Vec<(usize, Vec<ReplicaRef>)>,
        fresh: &[usize],
    ) -> (usize, Vec<String>) {
        let transport = self.volumes.transport();
        let work: Vec<(usize, u64, Vec<ReplicaRef>)> = jobs
            .into_iter()
            .flat_map(|(e, live)| layers.iter().map(move |&layer| (e, layer, live.clone())))
            .collect();
        let results: Vec<(usize, Result<bool, String>)> = futures::stream::iter(work)
            .map(|(e, layer, live)| {
                let fresh = fresh.contains(&e);
                async move {
                    let key = LayerExtent { layer, index: e as u32 };
                    if !fresh && repair::digests_agree(transport, &live, key, blocks).await {
                        return (e, Ok(false));
                    }
                    let t0 = Instant::now();
                    match repair::repair_extent(transport, r.id, key, blocks, &live, false).await {
                        Ok(rep) => {
                            if rep.blocks_copied > 0 {
                                let secs = t0.elapsed().as_secs_f64().max(1e-6);
                                info!(
                                    volume = %r.id,
                                    extent = e,
                                    layer = format!("{layer:016x}"),
                                    blocks = rep.blocks_copied,
                                    mib_per_s = format!("{:.1}", rep.bytes_copied as f64 / secs / 1048576.0),
                                    "copies repaired"
                                );
                            }
                            (e, Ok(true))
                        }
                        Err(err) => (e, Err(format!("extent {e}: repair failed: {err}"))),
                    }
                }
            })
            .buffer_unordered(PARALLEL_EXTENTS)
            .collect()
            .await;
        let mut repaired = HashSet::new();
        let mut failed = Vec::new();
        for (e, res) in results {
            match res {
                Ok(true) => {
                    repaired.insert(e);
                }
                Ok(false) => {}
                Err(msg) => failed.push(msg),
            }
        }
        (repaired.len(), failed)
    }

    /// Rule 3: settles surplus copies and moves copies for balance, on
    /// writer-less volumes of a whole pool.
    async fn spread(
        &self,
        volumes: &[VolumeRecord],
        nodes: &BTreeMap<NodeId, NodeRecord>,
        view: &NodeView,
        load: &mut Load,
        report: &mut PassReport,
    ) -> Result<(), VolumeError> {
        if !view.whole() {
            return Ok(());
        }
        let mut budget = self.cfg.spread_moves;
        for r in volumes {
            if r.state != VolumeState::Available || r.writer.is_some() {
                continue;
            }
            let target = usize::from(r.replicas);
            let surplus_left = r.placement.iter().any(|s| s.len() > target);
            let moves = plan_spread(&r.placement, target, view, &mut load.clone(), budget);
            if !surplus_left && moves.is_empty() {
                continue;
            }
            let (mut cur, mut rev) = self.volumes.get(&r.id.to_string()).await?;
            if cur.writer.is_some() {
                continue;
            }
            let target = usize::from(cur.replicas);
            // Which copy each extent gives up once proven: the old end of a
            // move planned now, else (an interrupted move) the most loaded.
            let mut leaving: BTreeMap<usize, Vec<NodeId>> = cur
                .placement
                .iter()
                .enumerate()
                .filter(|(_, s)| s.len() > target)
                .map(|(e, s)| (e, surplus(s, target, load)))
                .collect();
            if !moves.is_empty() {
                let moves = plan_spread(&cur.placement, target, view, load, budget);
                let adds: Vec<Change> =
                    moves.iter().map(|m| Change::Add { extent: m.extent, to: m.to }).collect();
                for m in &moves {
                    info!(volume = %cur.id, extent = m.extent, from = %m.from, to = %m.to, "moving a copy for balance");
                    leaving.insert(m.extent, vec![m.from]);
                }
                apply(&mut cur.placement, &adds);
                cur.updated_at_ms = unix_millis();
                rev = self.volumes.put_if(&cur, rev).await?;
                budget = budget.saturating_sub(moves.len());
            }
            report.moved += self.settle(&mut cur, rev, &leaving, nodes).await?;
            if budget == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Drops the `leaving` copies of a writer-less volume's extents once every
    /// copy of the extent (the new one included) is filled and proven equal.
    /// Answers how many copies were dropped; an extent not proven keeps its
    /// surplus for a later pass.
    async fn settle(
        &self,
        cur: &mut VolumeRecord,
        rev: u64,
        leaving: &BTreeMap<usize, Vec<NodeId>>,
        nodes: &BTreeMap<NodeId, NodeRecord>,
    ) -> Result<usize, VolumeError> {
        let layout = layout_of(cur, nodes)?;
        let blocks = layout.extent_blocks();
        let transport = self.volumes.transport();
        let mut drops = Vec::new();
        for (&e, gone) in leaving {
            let Some(reps) = layout.extents.get(e) else { continue };
            let mut proven = true;
            for &layer in &layout.layers {
                let key = LayerExtent { layer, index: e as u32 };
                if repair::repair_extent(transport, cur.id, key, blocks, reps, false).await.is_err()
                    || !repair::digests_agree(transport, reps, key, blocks).await
                {
                    proven = false;
                    break;
                }
            }
            if !proven {
                warn!(volume = %cur.id, extent = e, "a moved copy is not proven equal yet; keeping the old one");
                continue;
            }
            let keep = cur.placement[e].len().saturating_sub(gone.len());
            if keep < usize::from(cur.replicas) {
                continue;
            }
            drops.extend(gone.iter().map(|&from| Change::Drop { extent: e, from }));
        }
        if drops.is_empty() {
            return Ok(0);
        }
        apply(&mut cur.placement, &drops);
        cur.updated_at_ms = unix_millis();
        // A writer that opened meanwhile changed the record: the drop waits
        // for a later pass (the writer's client repairs the new copy).
        match self.volumes.put_if(cur, rev).await {
            Ok(_) => {}
            Err(VolumeError::Conflict) => return Ok(0),
            Err(e) => return Err(e),
        }
        Ok(drops.len())
    }

    /// Deletes a deleting volume's own layers everywhere, then its record.
    /// "Everywhere" is every node placed now, and every member that answers:
    /// copies left on a node by a move, or on a node that came back after its
    /// copies were rebuilt elsewhere, go too.
    ///
    /// Which layers other volumes still share is read afresh, not from the
    /// pass's listing: a volume reclaimed earlier in the same pass (a clone)
    /// is gone, and its layers with it. A deleting volume gains no layer,
    /// snapshot or clone meanwhile (`Volumes::get_available`).
    async fn reclaim(
        &self,
        r: &VolumeRecord,
        nodes: &BTreeMap<NodeId, NodeRecord>,
        view: &NodeView,
    ) -> Result<(), VolumeError> {
        let shared: HashSet<u64> = self
            .volumes
            .list()
            .await?
            .into_iter()
            .filter(|v| v.id != r.id)
            .flat_map(|v| v.layers.into_iter().chain(v.snapshots.into_iter().map(|s| s.layer)))
            .collect();
        let holders: HashSet<NodeId> = r.placement.iter().flatten().chain(view.up.iter()).copied().collect();
        for layer in r.layers.iter().filter(|l| !shared.contains(l)) {
            for n in &holders {
                let Some(rec) = nodes.get(n) else { continue };
                let to = ReplicaRef { node: *n, address: rec.block_address.clone() };
                if let Err(e) = self.volumes.transport().call(&to, Op::DeleteLayer { layer: *layer }).await {
                    // Retried next pass; the record stays until every copy is gone.
                    return Err(VolumeError::Device(nodeos_block::device::DeviceError::Unavailable(
                        e.to_string(),
                    )));
                }
            }
        }
        let (_, rev) = self.volumes.get(&r.id.to_string()).await?;
        self.volumes.forget(r.id, rev).await?;
        info!(volume = %r.id, name = %r.name, "volume deleted; space reclaimed");
        Ok(())
    }
}

/// The record's warning: copies short of the target and why, then the first
/// degraded extent. Empty when the volume is fully protected.
fn warning_of(r: &VolumeRecord, members: usize, view: &NodeView, degraded: &[String]) -> String {
    let target = usize::from(r.replicas);
    let fewest = r.placement.iter().map(Vec::len).min().unwrap_or(target);
    let mut warning = if fewest >= target {
        String::new()
    } else if members < target {
        short_warning(u8::try_from(fewest).unwrap_or(u8::MAX), r.replicas, members)
    } else {
        let short = r.placement.iter().filter(|s| s.len() < target).count();
        format!(
            "only {fewest} of {target} copies on {short} extent(s): {} of {members} node(s) answer",
            view.up.len()
        )
    };
    if let Some(first) = degraded.first() {
        if !warning.is_empty() {
            warning.push_str("; ");
        }
        warning.push_str(&format!("degraded: {first}"));
        if degraded.len() > 1 {
            warning.push_str(&format!(" (+{} more)", degraded.len() - 1));
        }
    }
    warning
}
