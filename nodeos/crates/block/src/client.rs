//! [`VolumeClient`]: a volume opened by one writer (a VM worker, an NBD
//! export, an import) or by a reader, speaking to the extents' replicas.
//!
//! # Rules
//! - **Open** (writer): the caller has taken a new generation in meta; the
//!   client records it on every replica (a quorum of each extent is
//!   required), then reconciles: copies whose extent digests differ are
//!   repaired before the first request is served.
//! - **Write**: split per extent; each piece gets a sequence number and goes
//!   to every replica of its extent; it completes once a quorum (2 of 3, or
//!   all of 1–2) has it. A replica that fails a write is *stale*: it still
//!   receives writes but is not read from until repaired.
//! - **Read**: from a non-stale replica with no acknowledged write still
//!   outstanding on it, verifying every block's CRC; a mismatch or error
//!   tries the next copy and marks the bad one for repair.
//! - **Flush**: every replica holding writes since the last flush fdatasyncs;
//!   the flush completes when, for every extent written since, a quorum of
//!   replicas that missed none of those writes has flushed.
//! - **Repair**: a background task repairs stale copies (see `repair.rs`),
//!   then, with writes to that extent paused, compares digests with a good
//!   copy before reading from it again.
//! - A `StaleGeneration` answer means a newer writer opened the volume: the
//!   client is fenced for good and every later request fails.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use nodeos_types::{NodeId, VolumeId};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::device::{BLOCK_SIZE, BlockDevice, DeviceError, check_range};
use crate::repair::{self, answer_name};
use crate::store::{BlockState, LayerExtent, block_crc};
use crate::transport::{CallError, ReplicaRef, Transport};
use crate::wire::{Answer, MAX_BLOCKS_PER_REQUEST, MAX_METAS_PER_REQUEST, Op, ReplicaError};

const BS: u64 = BLOCK_SIZE as u64;
/// Writes to an extent pause behind this many gates (striped by extent).
const GATES: usize = 256;
const REPAIR_PERIOD: Duration = Duration::from_millis(500);
/// How long a read waits for some copy to become readable.
const READ_WAIT: Duration = Duration::from_secs(10);

/// Where a volume's blocks are, as handed to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeLayout {
    pub volume: VolumeId,
    pub size: u64,
    pub extent_size: u64,
    /// Layer chain, oldest first; the last one takes writes.
    pub layers: Vec<u64>,
    /// Replicas of each extent.
    pub extents: Vec<Vec<ReplicaRef>>,
    /// The writer's generation (0 for a reader).
    pub generation: u64,
}

impl VolumeLayout {
    pub fn extent_blocks(&self) -> u32 {
        u32::try_from(self.extent_size / BS).unwrap_or(u32::MAX)
    }

    fn top(&self) -> u64 {
        self.layers.last().copied().unwrap_or(0)
    }

    fn chain(&self) -> Vec<u64> {
        self.layers.iter().rev().copied().collect()
    }
}

/// Copies needed for a write to complete: 2 of 3, or all of 1 or 2.
pub fn quorum(replicas: usize) -> usize {
    replicas.min(2)
}

/// An extent written since the last flush: a change counter and the copies
/// that missed at least one of those writes.
type Dirty = (u64, HashSet<NodeId>);

#[derive(Debug, Default)]
struct Health {
    /// Copies that may lack acknowledged writes (or hold corrupt blocks).
    stale: HashSet<(u32, NodeId)>,
    /// Copies whose last repair must check checksums.
    suspect: HashSet<(u32, NodeId)>,
    /// Acknowledged writes still outstanding on a copy.
    lagging: HashMap<(u32, NodeId), u32>,
    /// Extents written since the last flush: a change counter and the
    /// copies that missed at least one of those writes.
    dirty: HashMap<u32, Dirty>,
    dirty_counter: u64,
}

#[derive(Debug)]
struct Inner<T> {
    transport: T,
    layout: RwLock<Arc<VolumeLayout>>,
    read_only: bool,
    seq: AtomicU64,
    /// A newer generation some replica reported; 0 while not fenced.
    fenced_by: AtomicU64,
    health: Mutex<Health>,
    /// Woken when a copy stops lagging or becomes readable.
    changed: Notify,
    gates: Vec<tokio::sync::RwLock<()>>,
    next_read: AtomicUsize,
    local: Option<NodeId>,
}

/// A volume opened by this process. Cloning shares the same opener.
#[derive(Debug)]
pub struct VolumeClient<T: Transport> {
    inner: Arc<Inner<T>>,
}

/// A handle that does not keep the volume open.
#[derive(Debug)]
pub struct WeakVolumeClient<T: Transport>(Weak<Inner<T>>);

impl<T: Transport> WeakVolumeClient<T> {
    pub fn upgrade(&self) -> Option<VolumeClient<T>> {
        self.0.upgrade().map(|inner| VolumeClient { inner })
    }
}

impl<T: Transport> Clone for VolumeClient<T> {
    fn clone(&self) -> Self {
        VolumeClient { inner: self.inner.clone() }
    }
}

fn unavailable(what: impl Into<String>) -> DeviceError {
    DeviceError::Unavailable(what.into())
}

/// Tracks one replicated op after it completes for the caller: copies that
/// were still working on it lag until they answer.
#[derive(Debug, Default)]
struct Track {
    acked: bool,
    done: HashSet<NodeId>,
}

impl<T: Transport> VolumeClient<T> {
    /// Opens a volume. A writer (`layout.generation > 0`, not `read_only`)
    /// fences older writers on every replica first. `local` is this node,
    /// whose copies are read first.
    pub async fn open(
        transport: T,
        layout: VolumeLayout,
        read_only: bool,
        local: Option<NodeId>,
    ) -> Result<Self, DeviceError> {
        if !read_only && layout.generation == 0 {
            return Err(DeviceError::Io("a writer needs a generation from the pool".into()));
        }
        let inner = Arc::new(Inner {
            transport,
            layout: RwLock::new(Arc::new(layout)),
            read_only,
            seq: AtomicU64::new(1),
            fenced_by: AtomicU64::new(0),
            health: Mutex::new(Health::default()),
            changed: Notify::new(),
            gates: (0..GATES).map(|_| tokio::sync::RwLock::new(())).collect(),
            next_read: AtomicUsize::new(0),
            local,
        });
        let client = VolumeClient { inner };
        if !read_only {
            client.fence().await?;
        }
        client.reconcile().await?;
        let weak = Arc::downgrade(&client.inner);
        tokio::spawn(repairer(weak));
        Ok(client)
    }

    pub fn layout(&self) -> Arc<VolumeLayout> {
        self.inner.layout()
    }

    pub fn downgrade(&self) -> WeakVolumeClient<T> {
        WeakVolumeClient(Arc::downgrade(&self.inner))
    }

    /// Takes a new layout from the pool (re-replication, growth, snapshot).
    /// Copies new to an extent start stale and are repaired. With
    /// `own_generation`, the layout's generation was handed to this very
    /// writer (a snapshot sealed its top layer) and is adopted; otherwise the
    /// writer keeps its generation and will find itself fenced if a newer
    /// writer took the volume.
    pub fn update_layout(&self, mut new: VolumeLayout, own_generation: bool) {
        let old = self.inner.layout();
        if !own_generation || new.generation < old.generation || self.inner.read_only {
            new.generation = old.generation;
        }
        let mut h = self.inner.health();
        for (e, reps) in new.extents.iter().enumerate() {
            let e = e as u32;
            let before: HashSet<NodeId> =
                old.extents.get(e as usize).map(|r| r.iter().map(|r| r.node).collect()).unwrap_or_default();
            for r in reps {
                if !before.contains(&r.node) && (e as usize) < old.extents.len() {
                    info!(volume = %new.volume, extent = e, node = %r.node, "new copy; repairing it");
                    h.stale.insert((e, r.node));
                    if let Some(d) = h.dirty.get_mut(&e) {
                        d.1.insert(r.node);
                    }
                }
            }
            let now: HashSet<NodeId> = reps.iter().map(|r| r.node).collect();
            h.stale.retain(|(x, n)| *x != e || now.contains(n));
        }
        drop(h);
        *self.inner.layout.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        self.inner.changed.notify_waiters();
    }

    /// Copies not currently trusted for reads, as (extent, node).
    pub fn stale_copies(&self) -> Vec<(u32, NodeId)> {
        let mut v: Vec<_> = self.inner.health().stale.iter().copied().collect();
        v.sort();
        v
    }

    pub fn generation(&self) -> u64 {
        self.inner.layout().generation
    }

    async fn fence(&self) -> Result<(), DeviceError> {
        let layout = self.inner.layout();
        let nodes: HashMap<NodeId, ReplicaRef> =
            layout.extents.iter().flatten().map(|r| (r.node, r.clone())).collect();
        let op = Op::Fence { volume: layout.volume, generation: layout.generation };
        let mut calls: FuturesUnordered<_> = nodes
            .values()
            .map(|r| {
                let op = op.clone();
                async move { (r.node, self.inner.transport.call(r, op).await) }
            })
            .collect();
        let mut ok = HashSet::new();
        while let Some((node, res)) = calls.next().await {
            match res {
                Ok(Answer::Fenced { generation }) if generation > layout.generation => {
                    self.inner.fenced_by.store(generation, Ordering::Release);
                    return Err(DeviceError::Fenced { ours: layout.generation, current: generation });
                }
                Ok(_) => {
                    ok.insert(node);
                }
                Err(e) => warn!(volume = %layout.volume, node = %node, error = %e, "cannot fence replica"),
            }
        }
        let mut h = self.inner.health();
        for (e, reps) in layout.extents.iter().enumerate() {
            let good = reps.iter().filter(|r| ok.contains(&r.node)).count();
            if good < quorum(reps.len()) {
                return Err(unavailable(format!(
                    "extent {e}: only {good} of {} replicas reachable to fence older writers",
                    reps.len()
                )));
            }
            for r in reps.iter().filter(|r| !ok.contains(&r.node)) {
                h.stale.insert((e as u32, r.node));
            }
        }
        Ok(())
    }

    /// Compares every extent's copies and repairs those that differ.
    async fn reconcile(&self) -> Result<(), DeviceError> {
        let layout = self.inner.layout();
        let extents = layout.extents.len() as u32;
        let results: Vec<Result<(), DeviceError>> = futures::stream::iter(0..extents)
            .map(|e| self.inner.settle_extent(e, true))
            .buffer_unordered(8)
            .collect()
            .await;
        results.into_iter().collect()
    }

    fn check_usable(&self, write: bool) -> Result<Arc<VolumeLayout>, DeviceError> {
        let layout = self.inner.layout();
        let by = self.inner.fenced_by.load(Ordering::Acquire);
        if by != 0 {
            return Err(DeviceError::Fenced { ours: layout.generation, current: by });
        }
        if write && self.inner.read_only {
            return Err(DeviceError::ReadOnly);
        }
        Ok(layout)
    }

    /// Splits `[offset, offset+len)` into per-extent pieces of at most
    /// `max_blocks` blocks: (extent, first block in extent, blocks, byte
    /// offset within the request).
    fn pieces(layout: &VolumeLayout, offset: u64, len: u64, max_blocks: u32) -> Vec<(u32, u32, u32, usize)> {
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let e = pos / layout.extent_size;
            let within = pos % layout.extent_size;
            let room = (layout.extent_size - within).min(end - pos).min(u64::from(max_blocks) * BS);
            out.push((e as u32, (within / BS) as u32, (room / BS) as u32, (pos - offset) as usize));
            pos += room;
        }
        out
    }

    /// Sends a write-like op to every copy of extent `e`; resolves once a
    /// quorum has applied it. A newer generation that the pool handed to this
    /// same writer (a snapshot sealed the old top layer) is adopted and the op
    /// is re-addressed to it; any other newer generation fences this writer.
    async fn replicate(&self, volume: VolumeId, e: u32, mut op: Op) -> Result<(), DeviceError> {
        loop {
            match self.replicate_once(e, op.clone()).await {
                Err(DeviceError::Fenced { ours, current }) => {
                    let Some(layout) = self.inner.adopted(current).await else {
                        self.inner.fenced_by.store(current, Ordering::Release);
                        warn!(volume = %volume, ours, current, "fenced by a newer writer");
                        return Err(DeviceError::Fenced { ours, current });
                    };
                    let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
                    match &mut op {
                        Op::Write { generation, seq: s, key, .. }
                        | Op::WriteZeroes { generation, seq: s, key, .. } => {
                            *generation = layout.generation;
                            *s = seq;
                            key.layer = layout.top();
                        }
                        _ => return Err(DeviceError::Io("only writes are replicated".into())),
                    }
                }
                other => return other,
            }
        }
    }

    async fn replicate_once(&self, e: u32, op: Op) -> Result<(), DeviceError> {
        let _gate = self.inner.gates[e as usize % GATES].read().await;
        // The replica set may have changed since the op was built (a copy
        // added by re-replication must receive it too).
        let reps = self
            .inner
            .layout()
            .extents
            .get(e as usize)
            .cloned()
            .ok_or_else(|| DeviceError::Io(format!("extent {e} is not in the volume layout")))?;
        let need = quorum(reps.len());
        self.inner.mark_dirty(e);
        let track = Arc::new(Mutex::new(Track::default()));
        let mut calls = FuturesUnordered::new();
        for r in reps.iter().cloned() {
            let (inner, op, track) = (self.inner.clone(), op.clone(), track.clone());
            calls.push(tokio::spawn(async move {
                let res = inner.transport.call(&r, op).await;
                let mut t = track.lock().unwrap_or_else(|p| p.into_inner());
                t.done.insert(r.node);
                let failed =
                    !matches!(res, Ok(_) | Err(CallError::Replica(ReplicaError::StaleGeneration { .. })));
                if t.acked || failed {
                    let mut h = inner.health();
                    if t.acked
                        && let Some(n) = h.lagging.get_mut(&(e, r.node))
                    {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            h.lagging.remove(&(e, r.node));
                        }
                    }
                    if failed {
                        h.missed(e, r.node);
                    }
                    drop(h);
                    inner.changed.notify_waiters();
                }
                if let Err(err) = &res
                    && failed
                {
                    warn!(node = %r.node, extent = e, error = %err, "replica missed a write; marked stale");
                }
                (r.node, res)
            }));
        }
        let mut ok = 0;
        let mut errors = Vec::new();
        while let Some(joined) = calls.next().await {
            let Ok((node, res)) = joined else { continue };
            match res {
                Ok(_) => ok += 1,
                Err(CallError::Replica(ReplicaError::StaleGeneration { ours, current })) => {
                    return Err(DeviceError::Fenced { ours, current });
                }
                Err(err) => errors.push(format!("{node}: {err}")),
            }
            if ok >= need {
                let mut t = track.lock().unwrap_or_else(|p| p.into_inner());
                t.acked = true;
                let mut h = self.inner.health();
                for r in &reps {
                    if !t.done.contains(&r.node) {
                        *h.lagging.entry((e, r.node)).or_default() += 1;
                    }
                }
                return Ok(());
            }
        }
        Err(unavailable(format!(
            "extent {e}: {ok} of {} replicas applied the write, {need} needed ({})",
            reps.len(),
            errors.join("; ")
        )))
    }

    /// One flush round. Answers the extents not yet durable on a quorum of
    /// complete copies, and why.
    async fn flush_once(&self) -> Result<Option<(Vec<u32>, String)>, DeviceError> {
        let layout = self.check_usable(false)?;
        let (dirty, lagging): (HashMap<u32, Dirty>, HashSet<(u32, NodeId)>) = {
            let h = self.inner.health();
            (h.dirty.clone(), h.lagging.keys().copied().collect())
        };
        if dirty.is_empty() {
            return Ok(None);
        }
        let nodes: HashMap<NodeId, ReplicaRef> = dirty
            .keys()
            .filter_map(|e| layout.extents.get(*e as usize))
            .flatten()
            .map(|r| (r.node, r.clone()))
            .collect();
        let mut calls: FuturesUnordered<_> = nodes
            .values()
            .map(|r| async move { (r.node, self.inner.transport.call(r, Op::Flush).await) })
            .collect();
        let mut flushed = HashSet::new();
        let mut errors = Vec::new();
        while let Some((node, res)) = calls.next().await {
            match res {
                Ok(_) => {
                    flushed.insert(node);
                }
                Err(e) => errors.push(format!("{node}: {e}")),
            }
        }
        let mut short = Vec::new();
        let mut why = String::new();
        for (e, (_, missed)) in &dirty {
            let Some(reps) = layout.extents.get(*e as usize) else { continue };
            let durable = reps
                .iter()
                .filter(|r| {
                    flushed.contains(&r.node) && !missed.contains(&r.node) && !lagging.contains(&(*e, r.node))
                })
                .count();
            if durable < quorum(reps.len()) {
                short.push(*e);
                why = format!(
                    "flush: extent {e} is durable on {durable} complete copies, {} needed ({})",
                    quorum(reps.len()),
                    errors.join("; ")
                );
            }
        }
        if !short.is_empty() {
            short.sort_unstable();
            return Ok(Some((short, why)));
        }
        let mut h = self.inner.health();
        for (e, (counter, _)) in dirty {
            if h.dirty.get(&e).is_some_and(|d| d.0 == counter) {
                h.dirty.remove(&e);
            }
        }
        Ok(None)
    }

    async fn read_piece(&self, e: u32, first: u32, count: u32) -> Result<Vec<u8>, DeviceError> {
        let deadline = tokio::time::Instant::now() + READ_WAIT;
        let mut last_err = String::from("no readable copy");
        loop {
            let notified = self.inner.changed.notified();
            let layout = self.inner.layout();
            let reps = layout.extents.get(e as usize).cloned().unwrap_or_default();
            let mut order: Vec<ReplicaRef> = {
                let h = self.inner.health();
                reps.iter()
                    .filter(|r| !h.stale.contains(&(e, r.node)) && !h.lagging.contains_key(&(e, r.node)))
                    .cloned()
                    .collect()
            };
            if !order.is_empty() {
                let start = self.inner.next_read.fetch_add(1, Ordering::Relaxed) % order.len();
                order.rotate_left(start);
                if let Some(local) = self.inner.local
                    && let Some(i) = order.iter().position(|r| r.node == local)
                {
                    order.swap(0, i);
                }
            }
            for r in &order {
                let op = Op::Read { chain: layout.chain(), index: e, first, count };
                match self.inner.transport.call(r, op).await {
                    Ok(Answer::Blocks { data, metas })
                        if data.len() == count as usize * BS as usize && metas.len() == count as usize =>
                    {
                        let bad = metas
                            .iter()
                            .zip(data.chunks_exact(BS as usize))
                            .position(|(m, b)| m.state == BlockState::Data && block_crc(b) != m.crc);
                        match bad {
                            None => return Ok(data),
                            Some(i) => {
                                last_err = format!(
                                    "{}: block {} failed its checksum in transit",
                                    r.node,
                                    first as usize + i
                                );
                                self.inner.suspect(e, r.node);
                            }
                        }
                    }
                    Ok(other) => last_err = format!("{}: unexpected answer {}", r.node, answer_name(&other)),
                    Err(CallError::Replica(ReplicaError::Corrupt { blocks })) => {
                        warn!(node = %r.node, extent = e, ?blocks, "corrupt blocks on replica; reading another copy");
                        last_err = format!("{}: corrupt blocks {blocks:?}", r.node);
                        self.inner.suspect(e, r.node);
                    }
                    Err(err) => {
                        last_err = err.to_string();
                        self.inner.health().missed(e, r.node);
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(unavailable(format!("extent {e}: no copy could be read ({last_err})")));
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }
}

/// How long a writer waits to learn that a newer generation is its own.
const ADOPT_WAIT: Duration = Duration::from_secs(5);

impl<T> Inner<T> {
    /// Waits for the pool to hand this writer generation `current` (or
    /// newer); the layout then, or `None` if it does not come in time.
    async fn adopted(&self, current: u64) -> Option<Arc<VolumeLayout>> {
        let deadline = tokio::time::Instant::now() + ADOPT_WAIT;
        loop {
            let notified = self.changed.notified();
            let l = self.layout();
            if l.generation >= current {
                return Some(l);
            }
            if self.fenced_by.load(Ordering::Acquire) != 0 || tokio::time::Instant::now() >= deadline {
                return None;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }

    fn layout(&self) -> Arc<VolumeLayout> {
        self.layout.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_dirty(&self, e: u32) {
        let mut h = self.health();
        h.dirty_counter += 1;
        let c = h.dirty_counter;
        h.dirty.entry(e).or_default().0 = c;
    }

    fn suspect(&self, e: u32, node: NodeId) {
        let mut h = self.health();
        h.stale.insert((e, node));
        h.suspect.insert((e, node));
    }
}

impl Health {
    fn missed(&mut self, e: u32, node: NodeId) {
        self.stale.insert((e, node));
        if let Some(d) = self.dirty.get_mut(&e) {
            d.1.insert(node);
        }
    }
}

impl<T: Transport> Inner<T> {
    /// Repairs extent `e` where its copies differ and marks the copies that
    /// then match the others readable. With `all`, every copy is checked
    /// (open); otherwise only stale ones.
    async fn settle_extent(self: &Arc<Self>, e: u32, all: bool) -> Result<(), DeviceError> {
        let layout = self.layout();
        let Some(reps) = layout.extents.get(e as usize).cloned() else { return Ok(()) };
        let (targets, verify): (Vec<NodeId>, bool) = {
            let h = self.health();
            let t: Vec<NodeId> =
                reps.iter().map(|r| r.node).filter(|n| all || h.stale.contains(&(e, *n))).collect();
            let v = t.iter().any(|n| h.suspect.contains(&(e, *n)));
            (t, v)
        };
        if targets.is_empty() {
            return Ok(());
        }
        let blocks = layout.extent_blocks();
        for &layer in &layout.layers {
            let key = LayerExtent { layer, index: e };
            // Cheap check first: identical digests need no repair.
            if !verify && repair::digests_agree(&self.transport, &reps, key, blocks).await {
                continue;
            }
            if let Err(err) =
                repair::repair_extent(&self.transport, layout.volume, key, blocks, &reps, verify).await
            {
                warn!(volume = %layout.volume, extent = e, error = %nodeos_types::error_chain(&err), "repair failed");
            }
        }
        // Pause writes to this extent and let outstanding ones land, then
        // trust exactly the copies whose digests match the majority.
        let _gate = self.gates[e as usize % GATES].write().await;
        for _ in 0..100 {
            let lag = self.health().lagging.keys().any(|(x, _)| *x == e);
            if !lag {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut sums: HashMap<NodeId, Vec<[u8; 32]>> = HashMap::new();
        for r in &reps {
            let mut v = Vec::new();
            for &layer in &layout.layers {
                match self
                    .transport
                    .call(r, Op::Digest { key: LayerExtent { layer, index: e }, blocks })
                    .await
                {
                    Ok(Answer::Digest { digest, .. }) => v.push(digest),
                    _ => break,
                }
            }
            if v.len() == layout.layers.len() {
                sums.insert(r.node, v);
            }
        }
        let mut counts: HashMap<&Vec<[u8; 32]>, usize> = HashMap::new();
        for s in sums.values() {
            *counts.entry(s).or_default() += 1;
        }
        let best = counts.iter().max_by_key(|(_, c)| **c).map(|(s, c)| ((*s).clone(), *c));
        let mut h = self.health();
        match best {
            Some((sum, n)) if n >= quorum(reps.len()) => {
                for r in &reps {
                    if sums.get(&r.node) == Some(&sum) {
                        if h.stale.remove(&(e, r.node)) {
                            info!(volume = %layout.volume, extent = e, node = %r.node, "copy repaired; readable again");
                        }
                        h.suspect.remove(&(e, r.node));
                        if let Some(d) = h.dirty.get_mut(&e) {
                            d.1.remove(&r.node);
                        }
                    } else {
                        h.stale.insert((e, r.node));
                    }
                }
            }
            _ if all => {
                return Err(unavailable(format!(
                    "extent {e}: fewer than {} copies reachable and in agreement",
                    quorum(reps.len())
                )));
            }
            _ => {}
        }
        drop(h);
        self.changed.notify_waiters();
        Ok(())
    }
}

/// Repairs stale copies in the background while the client lives.
async fn repairer<T: Transport>(weak: Weak<Inner<T>>) {
    loop {
        tokio::time::sleep(REPAIR_PERIOD).await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.fenced_by.load(Ordering::Acquire) != 0 {
            return;
        }
        let extents: Vec<u32> = {
            let h = inner.health();
            let mut v: Vec<u32> = h.stale.iter().map(|(e, _)| *e).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        for e in extents {
            if let Err(err) = inner.settle_extent(e, false).await {
                warn!(extent = e, error = %err, "background repair");
            }
        }
    }
}

impl<T: Transport> BlockDevice for VolumeClient<T> {
    fn size(&self) -> u64 {
        self.inner.layout().size
    }

    fn read_only(&self) -> bool {
        self.inner.read_only
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        let layout = self.check_usable(false)?;
        check_range(offset, u64::from(len), layout.size, BLOCK_SIZE)?;
        let pieces = Self::pieces(&layout, offset, u64::from(len), MAX_BLOCKS_PER_REQUEST);
        let parts = futures::future::try_join_all(
            pieces.iter().map(|&(e, first, count, _)| self.read_piece(e, first, count)),
        )
        .await?;
        Ok(parts.concat())
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        let layout = self.check_usable(true)?;
        check_range(offset, data.len() as u64, layout.size, BLOCK_SIZE)?;
        let pieces = Self::pieces(&layout, offset, data.len() as u64, MAX_BLOCKS_PER_REQUEST);
        futures::future::try_join_all(pieces.iter().map(|&(e, first, count, at)| {
            let bytes = data[at..at + count as usize * BS as usize].to_vec();
            let crcs = bytes.chunks_exact(BS as usize).map(block_crc).collect();
            let op = Op::Write {
                volume: layout.volume,
                generation: layout.generation,
                seq: self.inner.seq.fetch_add(1, Ordering::Relaxed),
                key: LayerExtent { layer: layout.top(), index: e },
                first,
                data: bytes,
                crcs,
            };
            self.replicate(layout.volume, e, op)
        }))
        .await?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.flush_once().await? {
                None => return Ok(()),
                // Copies that missed writes are repaired, then flushed: a
                // flush waits for redundancy rather than failing on it.
                Some((short, why)) if attempt < 4 => {
                    warn!(extents = ?short, reason = %why, "flush found too few complete copies; repairing");
                    for e in short {
                        self.inner.settle_extent(e, false).await?;
                    }
                }
                Some((_, why)) => return Err(unavailable(why)),
            }
        }
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.write_zeroes(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let layout = self.check_usable(true)?;
        check_range(offset, len, layout.size, BLOCK_SIZE)?;
        let pieces = Self::pieces(&layout, offset, len, MAX_METAS_PER_REQUEST);
        futures::future::try_join_all(pieces.iter().map(|&(e, first, count, _)| {
            let op = Op::WriteZeroes {
                volume: layout.volume,
                generation: layout.generation,
                seq: self.inner.seq.fetch_add(1, Ordering::Relaxed),
                key: LayerExtent { layer: layout.top(), index: e },
                first,
                count,
            };
            self.replicate(layout.volume, e, op)
        }))
        .await?;
        Ok(())
    }
}
