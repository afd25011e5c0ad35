//! Leader-side loops that keep volumes healthy, and the on-demand checks the
//! API offers (scrub, copy health).
//!
//! Every pass runs only while this node leads raft, acts through the same
//! records and replica ops as everyone else, and is safe to interrupt: a
//! half-done re-replication is finished by the next pass (or the next
//! leader) because the placement change is committed before any copying.
//!
//! - **Re-replication**: a node unreachable for longer than the grace period
//!   is replaced in every extent it holds by a reachable node outside the
//!   extent's set (the least loaded); the new copy is filled by repair.
//! - **Repair**: extents of volumes without a writer whose copies' digests
//!   differ (a node that missed writes and came back) are repaired. A writer
//!   repairs its own volume's copies (see `client.rs`).
//! - **Reclaim**: a deleting volume's layers are deleted on every node, then
//!   its record.
//! - **Scrub**: every copy's checksums are verified and corrupt blocks are
//!   replaced from good copies, on a long period and on demand.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nodeos_types::records::{NodeRecord, VolumeRecord, VolumeState};
use nodeos_types::{NodeId, unix_millis};
use serde::Serialize;
use tracing::{info, warn};

use crate::repair;
use crate::store::LayerExtent;
use crate::transport::{ReplicaRef, Transport};
use crate::volumes::{VolumeError, Volumes, layout_of, place};
use crate::wire::{Answer, Op};

/// When the controllers act.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A node unreachable this long loses its copies to other nodes.
    pub rereplicate_after: Duration,
    /// How often every copy of every volume is scrubbed.
    pub scrub_every: Duration,
    pub period: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            rereplicate_after: Duration::from_secs(60),
            scrub_every: Duration::from_secs(24 * 3600),
            period: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScrubReport {
    pub extents: u64,
    pub corrupt: u64,
    pub repaired_blocks: u64,
    pub unreachable: Vec<NodeId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CopyState {
    /// Same block versions as the majority of copies.
    InSync,
    /// Differs from the majority (missing writes; being repaired).
    Differs,
    Unreachable,
}

impl CopyState {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyState::InSync => "in-sync",
            CopyState::Differs => "differs",
            CopyState::Unreachable => "unreachable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopyHealth {
    pub node: NodeId,
    pub address: String,
    pub state: CopyState,
    pub written_blocks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtentHealth {
    pub index: u32,
    pub copies: Vec<CopyHealth>,
}

/// Extents repaired at the same time by one controller pass.
const PARALLEL_EXTENTS: usize = 4;

/// Most extents `health` inspects (larger volumes show their first ones).
pub const HEALTH_EXTENTS: usize = 256;

/// Compares the copies of each extent (every layer's block versions).
pub async fn health(v: &Volumes, r: &VolumeRecord) -> Vec<ExtentHealth> {
    let Ok(layout) = v.layout(r).await else {
        return Vec::new();
    };
    let blocks = layout.extent_blocks();
    let mut out = Vec::new();
    for (e, reps) in layout.extents.iter().enumerate().take(HEALTH_EXTENTS) {
        let mut sums: Vec<Option<(Vec<[u8; 32]>, u64)>> = Vec::new();
        for rep in reps {
            let mut digests = Vec::new();
            let mut written = 0u64;
            for &layer in &layout.layers {
                match v
                    .transport()
                    .call(rep, Op::Digest { key: LayerExtent { layer, index: e as u32 }, blocks })
                    .await
                {
                    Ok(Answer::Digest { digest, written: w }) => {
                        digests.push(digest);
                        written += u64::from(w);
                    }
                    _ => break,
                }
            }
            sums.push((digests.len() == layout.layers.len()).then_some((digests, written)));
        }
        let mut counts: HashMap<&Vec<[u8; 32]>, usize> = HashMap::new();
        for (d, _) in sums.iter().flatten() {
            *counts.entry(d).or_default() += 1;
        }
        let majority = counts.iter().max_by_key(|(_, c)| **c).map(|(d, _)| (*d).clone());
        let copies = reps
            .iter()
            .zip(&sums)
            .map(|(rep, s)| CopyHealth {
                node: rep.node,
                address: rep.address.clone(),
                state: match s {
                    None => CopyState::Unreachable,
                    Some((d, _)) if Some(d) == majority.as_ref() => CopyState::InSync,
                    Some(_) => CopyState::Differs,
                },
                written_blocks: s.as_ref().map(|(_, w)| *w).unwrap_or(0),
            })
            .collect();
        out.push(ExtentHealth { index: e as u32, copies });
    }
    out
}

/// Verifies every copy's checksums and replaces corrupt or missing blocks
/// from good copies.
pub async fn scrub_volume(v: &Volumes, volume: &str) -> Result<ScrubReport, VolumeError> {
    let (r, _) = v.get(volume).await?;
    let layout = v.layout(&r).await?;
    let mut report = ScrubReport::default();
    let mut unreachable = HashSet::new();
    for (e, reps) in layout.extents.iter().enumerate() {
        report.extents += 1;
        for &layer in &layout.layers {
            let key = LayerExtent { layer, index: e as u32 };
            match repair::repair_extent(v.transport(), r.id, key, layout.extent_blocks(), reps, true).await {
                Ok(rep) => {
                    report.corrupt += rep.corrupt;
                    report.repaired_blocks += rep.blocks_copied;
                    unreachable.extend(rep.unreachable);
                }
                Err(err) => {
                    warn!(volume = %r.id, extent = e, error = %nodeos_types::error_chain(&err), "scrub could not repair");
                    unreachable.extend(reps.iter().map(|r| r.node));
                }
            }
        }
    }
    report.unreachable = unreachable.into_iter().collect();
    report.unreachable.sort();
    if report.corrupt > 0 {
        warn!(volume = %r.id, corrupt = report.corrupt, repaired = report.repaired_blocks, "scrub found corrupt blocks");
    } else {
        info!(volume = %r.id, repaired = report.repaired_blocks, "scrub clean");
    }
    Ok(report)
}

/// The leader's volume controllers. Run [`Controller::run`] on every node;
/// it only acts while the node leads.
#[derive(Debug)]
pub struct Controller {
    volumes: Volumes,
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

/// How often copies of writer-less volumes are compared even when no node
/// came back (a missed event, a repair that failed half-way).
const CHECK_EVERY: Duration = Duration::from_secs(300);

impl Controller {
    pub fn new(volumes: Volumes, cfg: ControllerConfig) -> Self {
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
            if let Err(e) = self.pass().await {
                warn!(error = %nodeos_types::error_chain(&e), "volume controller pass failed; retrying");
            }
        }
    }

    /// Whether a node's replica server answers.
    async fn reachable(&self, n: &NodeRecord) -> bool {
        let r = ReplicaRef { node: n.id, address: n.block_address.clone() };
        matches!(self.volumes.transport().call(&r, Op::Usage).await, Ok(Answer::Usage(_)))
    }

    async fn pass(&mut self) -> Result<(), VolumeError> {
        let nodes = self.volumes.nodes().await?;
        let mut up = HashSet::new();
        for n in nodes.values() {
            if self.reachable(n).await {
                up.insert(n.id);
                if self.unreachable_since.remove(&n.id).is_some() {
                    self.recovered.insert(n.id);
                }
            } else {
                self.unreachable_since.entry(n.id).or_insert_with(Instant::now);
            }
        }
        let lost: HashSet<NodeId> = self
            .unreachable_since
            .iter()
            .filter(|(_, since)| since.elapsed() >= self.cfg.rereplicate_after)
            .map(|(n, _)| *n)
            .collect();
        let full_check = self.last_check.is_none_or(|t| t.elapsed() >= CHECK_EVERY);
        if full_check {
            self.last_check = Some(Instant::now());
        }
        let recovered = std::mem::take(&mut self.recovered);
        for r in self.volumes.list().await? {
            let check = full_check || r.placement.iter().flatten().any(|n| recovered.contains(n));
            let result = match r.state {
                VolumeState::Deleting => self.reclaim(&r, &nodes).await,
                VolumeState::Available => self.tend(&r, &nodes, &up, &lost, check).await,
            };
            if let Err(e) = result {
                warn!(volume = %r.id, error = %nodeos_types::error_chain(&e), "volume controller");
            }
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
        Ok(())
    }

    /// Re-replicates copies on lost nodes, repairs copies that differ,
    /// keeps the record's warning true.
    async fn tend(
        &self,
        r: &VolumeRecord,
        nodes: &BTreeMap<NodeId, NodeRecord>,
        up: &HashSet<NodeId>,
        lost: &HashSet<NodeId>,
        check: bool,
    ) -> Result<(), VolumeError> {
        let mut moved = Vec::new();
        if r.placement.iter().flatten().any(|n| lost.contains(n) || !nodes.contains_key(n)) {
            moved = self.rereplicate(r, nodes, up, lost).await?;
        }
        let (r, _) = self.volumes.get(&r.id.to_string()).await?;
        let layout = layout_of(&r, nodes)?;
        let blocks = layout.extent_blocks();
        let mut degraded = Vec::new();
        let mut jobs = Vec::new();
        for (e, reps) in layout.extents.iter().enumerate() {
            let live: Vec<ReplicaRef> = reps.iter().filter(|x| up.contains(&x.node)).cloned().collect();
            if live.len() < reps.len() {
                degraded.push(format!("extent {e}: {} of {} copies reachable", live.len(), reps.len()));
            }
            // A writer repairs its own copies; without one, the leader does.
            let must_repair = moved.contains(&e) || (check && r.writer.is_none());
            // Repair needs a source and a target.
            if must_repair && live.len() >= 2 {
                jobs.extend(layout.layers.iter().map(|&layer| (e, layer, live.clone())));
            }
        }
        // Several extents at once: one extent's copy runs alone leave the
        // network and disks idle between requests.
        let transport = self.volumes.transport();
        let results: Vec<Option<String>> = futures::stream::iter(jobs)
            .map(|(e, layer, live)| {
                let moved = moved.contains(&e);
                async move {
                    let key = LayerExtent { layer, index: e as u32 };
                    if !moved && repair::digests_agree(transport, &live, key, blocks).await {
                        return None;
                    }
                    let t0 = Instant::now();
                    match repair::repair_extent(transport, r.id, key, blocks, &live, false).await {
                        Ok(rep) if rep.blocks_copied > 0 => {
                            let secs = t0.elapsed().as_secs_f64().max(1e-6);
                            info!(
                                volume = %r.id,
                                extent = e,
                                layer = format!("{layer:016x}"),
                                blocks = rep.blocks_copied,
                                mib_per_s = format!("{:.1}", rep.bytes_copied as f64 / secs / 1048576.0),
                                "copies repaired"
                            );
                            None
                        }
                        Ok(_) => None,
                        Err(err) => Some(format!("extent {e}: repair failed: {err}")),
                    }
                }
            })
            .buffer_unordered(PARALLEL_EXTENTS)
            .collect()
            .await;
        degraded.extend(results.into_iter().flatten());
        let short = r.replicas < crate::volumes::WANTED_REPLICAS;
        let mut warning = if short && nodes.len() < usize::from(crate::volumes::WANTED_REPLICAS) {
            format!(
                "only {} of {} copies: the pool has {} node(s)",
                r.replicas,
                crate::volumes::WANTED_REPLICAS,
                nodes.len()
            )
        } else {
            String::new()
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
        if warning != r.warning {
            let (mut cur, rev) = self.volumes.get(&r.id.to_string()).await?;
            cur.warning = warning;
            cur.updated_at_ms = unix_millis();
            self.volumes.put_if(&cur, rev).await?;
        }
        Ok(())
    }

    /// Replaces lost nodes in the volume's placement. Returns the extents
    /// that got a new copy.
    async fn rereplicate(
        &self,
        r: &VolumeRecord,
        nodes: &BTreeMap<NodeId, NodeRecord>,
        up: &HashSet<NodeId>,
        lost: &HashSet<NodeId>,
    ) -> Result<Vec<usize>, VolumeError> {
        let (mut cur, rev) = self.volumes.get(&r.id.to_string()).await?;
        let candidates: Vec<NodeId> = nodes.keys().copied().filter(|n| up.contains(n)).collect();
        let mut load: HashMap<NodeId, u64> = HashMap::new();
        for v in self.volumes.list().await? {
            for n in v.placement.iter().flatten() {
                *load.entry(*n).or_default() += 1;
            }
        }
        let mut moved = Vec::new();
        for (e, set) in cur.placement.iter_mut().enumerate() {
            for i in 0..set.len() {
                let n = set[i];
                if !lost.contains(&n) && nodes.contains_key(&n) {
                    continue;
                }
                let free: Vec<NodeId> = candidates.iter().copied().filter(|c| !set.contains(c)).collect();
                let Some(new) =
                    place(&free, &mut load, 1, 1).into_iter().next().and_then(|s| s.into_iter().next())
                else {
                    continue;
                };
                warn!(volume = %cur.id, extent = e, lost = %n, new = %new, "node lost; re-replicating its copy");
                set[i] = new;
                moved.push(e);
            }
        }
        if moved.is_empty() {
            return Ok(moved);
        }
        cur.updated_at_ms = unix_millis();
        self.volumes.put_if(&cur, rev).await?;
        Ok(moved)
    }

    /// Deletes a deleting volume's own layers everywhere, then its record.
    async fn reclaim(
        &self,
        r: &VolumeRecord,
        nodes: &BTreeMap<NodeId, NodeRecord>,
    ) -> Result<(), VolumeError> {
        let shared: HashSet<u64> = self
            .volumes
            .list()
            .await?
            .into_iter()
            .filter(|v| v.id != r.id)
            .flat_map(|v| v.layers.into_iter().chain(v.snapshots.into_iter().map(|s| s.layer)))
            .collect();
        let holders: HashSet<NodeId> = r.placement.iter().flatten().copied().collect();
        for layer in r.layers.iter().filter(|l| !shared.contains(l)) {
            for n in &holders {
                let Some(rec) = nodes.get(n) else { continue };
                let to = ReplicaRef { node: *n, address: rec.block_address.clone() };
                if let Err(e) = self.volumes.transport().call(&to, Op::DeleteLayer { layer: *layer }).await {
                    // Retried next pass; the record stays until every copy is gone.
                    return Err(VolumeError::Device(crate::device::DeviceError::Unavailable(e.to_string())));
                }
            }
        }
        let (_, rev) = self.volumes.get(&r.id.to_string()).await?;
        self.volumes.forget(r.id, rev).await?;
        info!(volume = %r.id, name = %r.name, "volume deleted; space reclaimed");
        Ok(())
    }
}
