//! [`Volumes`]: the pool's volumes as records in meta, and opening them.
//!
//! Every change is a compare-and-swap on the volume's record (and its name
//! index), so two nodes acting at once cannot both win: two creates of one
//! name, two openers taking the same generation, a resize racing a
//! re-replication.
//!
//! Placement (`placement.rs`): each extent goes to `replicas` distinct nodes,
//! the least loaded first. `replicas` is the volume's target; a pool with
//! fewer nodes places fewer copies now (a loud warning, and the record's
//! `warning`), and the leader's controller adds the missing copies as soon as
//! nodes join.
//!
//! Writers open volumes only through [`crate::writer::WriterSlot`]; readers
//! through [`Volumes::open_reader`] and [`Volumes::open_snapshot`].

use std::collections::{BTreeMap, HashSet};

use futures::StreamExt;
use nodeos_block::client::{VolumeClient, VolumeLayout};
use nodeos_block::device::{BLOCK_SIZE, DeviceError};
use nodeos_block::transport::{ReplicaRef, TcpTransport, Transport};
use nodeos_meta::command::{Compare, Op as MetaOp, Txn};
use nodeos_meta::{Command, Consistency, MetaError, MetaHandle};
use nodeos_types::records::{
    NODES_PREFIX, NodeRecord, SnapshotRecord, VOLUMES_PREFIX, VolumeRecord, VolumeState, VolumeWriter,
    volume_key, volume_name_key,
};
use nodeos_types::{NodeId, VolumeId, unix_millis};
use tracing::{info, warn};

use crate::placement::{Load, load_of, place};

/// Extent size of volumes up to `MAX_EXTENTS * DEFAULT_EXTENT` bytes.
pub const DEFAULT_EXTENT: u64 = 64 << 20;
/// Most extents a volume has; larger volumes get larger extents so the
/// record stays small.
pub const MAX_EXTENTS: u64 = 4096;
/// Largest extent (the replica protocol addresses 2^24 blocks per extent).
pub const MAX_EXTENT: u64 = 64 << 30;
/// Copies of each extent on a pool of three or more nodes.
pub const WANTED_REPLICAS: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("no volume {0:?} in this pool")]
    NotFound(String),
    #[error("a volume named {0:?} already exists")]
    NameTaken(String),
    #[error("name must be 1..=63 characters of a-z, 0-9, '-' and '_', got {0:?}")]
    Name(String),
    #[error("size must be a positive multiple of {BLOCK_SIZE} bytes up to {max} bytes, got {got}")]
    Size { got: u64, max: u64 },
    #[error("replicas must be 1..=3, got {0}")]
    Replicas(u32),
    #[error(
        "a {size}-byte volume with {replicas} copies needs {need} bytes on node {node}, which can hold {capacity}"
    )]
    TooLarge { size: u64, replicas: u8, node: NodeId, need: u64, capacity: u64 },
    #[error("no node of the pool serves replicas yet")]
    NoNodes,
    #[error("volume {volume} is open for writing by {holder} on node {node}")]
    InUse { volume: String, holder: String, node: NodeId },
    #[error("volume {volume} has {size} bytes; it can only grow (asked for {asked})")]
    Shrink { volume: String, size: u64, asked: u64 },
    #[error("volume {volume} has no snapshot {snapshot:?}")]
    NoSnapshot { volume: String, snapshot: String },
    #[error("volume {volume} already has a snapshot {snapshot:?}")]
    SnapshotTaken { volume: String, snapshot: String },
    #[error("volume {volume} still has clones ({clones}); delete them first")]
    HasClones { volume: String, clones: String },
    #[error("the volume record changed while this request ran; retry")]
    Conflict,
    #[error("metadata store")]
    Meta(#[source] Box<MetaError>),
    #[error("stored record {0} does not decode")]
    Record(String),
    #[error("node {0} holds a copy but has no replica address")]
    NoAddress(NodeId),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl From<MetaError> for VolumeError {
    fn from(e: MetaError) -> Self {
        VolumeError::Meta(Box::new(e))
    }
}

/// Checks a volume or snapshot name.
pub fn check_name(name: &str) -> Result<(), VolumeError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(VolumeError::Name(name.chars().take(80).collect())) }
}

/// Extent size for a volume of `size` bytes.
pub fn extent_size_for(size: u64) -> u64 {
    let mut e = DEFAULT_EXTENT;
    while size.div_ceil(e) > MAX_EXTENTS && e < MAX_EXTENT {
        e *= 2;
    }
    e
}

pub fn max_volume_size() -> u64 {
    MAX_EXTENTS * MAX_EXTENT
}

/// What `create` needs.
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub name: String,
    pub size_bytes: u64,
    /// Copies wanted; `None` = as many as the pool allows, up to 3.
    pub replicas: Option<u32>,
}

/// The pool's volumes, seen from one node; `T` is how its clients reach
/// replicas (TCP on a node, in memory in tests).
#[derive(Debug, Clone)]
pub struct Volumes<T = TcpTransport> {
    meta: MetaHandle,
    transport: T,
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, VolumeError> {
    serde_json::from_slice(value).map_err(|_| VolumeError::Record(key.to_owned()))
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records always serialize")
}

impl<T: Transport + Clone> Volumes<T> {
    pub fn new(meta: MetaHandle, transport: T) -> Self {
        Volumes { meta, transport }
    }

    pub fn meta(&self) -> &MetaHandle {
        &self.meta
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Nodes that serve replicas, by id.
    pub async fn nodes(&self) -> Result<BTreeMap<NodeId, NodeRecord>, VolumeError> {
        let (kvs, _) = self.meta.range(NODES_PREFIX, 0, Consistency::Linearizable).await?;
        let mut out = BTreeMap::new();
        for kv in kvs {
            let n: NodeRecord = decode(&kv.key, &kv.value)?;
            if !n.block_address.is_empty() {
                out.insert(n.id, n);
            }
        }
        Ok(out)
    }

    pub async fn list(&self) -> Result<Vec<VolumeRecord>, VolumeError> {
        let (kvs, _) = self.meta.range(VOLUMES_PREFIX, 0, Consistency::Linearizable).await?;
        kvs.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
    }

    /// A volume by name or id, with its record's mod revision.
    pub async fn get(&self, volume: &str) -> Result<(VolumeRecord, u64), VolumeError> {
        if let Ok(id) = volume.parse::<VolumeId>()
            && let (Some(kv), _) = self.meta.get(&volume_key(id), Consistency::Linearizable).await?
        {
            return Ok((decode(&kv.key, &kv.value)?, kv.mod_revision));
        }
        let (kv, _) = self.meta.get(&volume_name_key(volume), Consistency::Linearizable).await?;
        let kv = kv.ok_or_else(|| VolumeError::NotFound(volume.to_owned()))?;
        let id: VolumeId = std::str::from_utf8(&kv.value)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| VolumeError::Record(kv.key.clone()))?;
        let (kv, _) = self.meta.get(&volume_key(id), Consistency::Linearizable).await?;
        let kv = kv.ok_or_else(|| VolumeError::NotFound(volume.to_owned()))?;
        Ok((decode(&kv.key, &kv.value)?, kv.mod_revision))
    }

    /// A volume that is not being deleted: a deleting volume's layers are
    /// going away, so nothing may read, grow, snapshot or clone it any more.
    pub async fn get_available(&self, volume: &str) -> Result<(VolumeRecord, u64), VolumeError> {
        let (r, rev) = self.get(volume).await?;
        if r.state != VolumeState::Available {
            return Err(VolumeError::NotFound(volume.to_owned()));
        }
        Ok((r, rev))
    }

    /// Writes `r` if its record is still at `rev` (else `Conflict`).
    pub async fn put_if(&self, r: &VolumeRecord, rev: u64) -> Result<u64, VolumeError> {
        let resp = self.meta.write(Command::put_if(volume_key(r.id), encode(r), rev)).await?;
        if resp.succeeded { Ok(resp.revision) } else { Err(VolumeError::Conflict) }
    }

    /// Copies placed per node over every volume.
    async fn load(&self) -> Result<Load, VolumeError> {
        let volumes = self.list().await?;
        Ok(load_of(volumes.iter().map(|v| v.placement.as_slice())))
    }

    pub async fn create(&self, req: NewVolume) -> Result<VolumeRecord, VolumeError> {
        check_name(&req.name)?;
        let max = max_volume_size();
        if req.size_bytes == 0
            || !req.size_bytes.is_multiple_of(u64::from(BLOCK_SIZE))
            || req.size_bytes > max
        {
            return Err(VolumeError::Size { got: req.size_bytes, max });
        }
        if let Some(r) = req.replicas
            && !(1..=3).contains(&r)
        {
            return Err(VolumeError::Replicas(r));
        }
        let nodes = self.nodes().await?;
        if nodes.is_empty() {
            return Err(VolumeError::NoNodes);
        }
        let ids = placeable(&nodes);
        let replicas = req.replicas.and_then(|r| u8::try_from(r).ok()).unwrap_or(WANTED_REPLICAS);
        let placed = replicas.min(u8::try_from(ids.len()).unwrap_or(u8::MAX));
        let warning = if placed < replicas {
            warn!(
                volume = %req.name,
                placed,
                replicas,
                "pool has only {} node(s) in service: the volume keeps fewer copies until more nodes join",
                ids.len()
            );
            short_warning(placed, replicas, ids.len())
        } else {
            String::new()
        };
        let extent_size = extent_size_for(req.size_bytes);
        let extents = req.size_bytes.div_ceil(extent_size) as usize;
        let placement = place(&ids, &mut self.load().await?, extents, usize::from(placed));
        self.check_capacity(&nodes, &placement, extent_size, req.size_bytes, placed, &Load::new())?;
        let now = unix_millis();
        let r = VolumeRecord {
            id: VolumeId::random(),
            name: req.name.clone(),
            size_bytes: req.size_bytes,
            extent_size,
            replicas,
            placement,
            layers: vec![rand::random::<u64>().max(1)],
            generation: 0,
            writer: None,
            snapshots: Vec::new(),
            origin: None,
            state: VolumeState::Available,
            warning,
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.insert(&r).await?;
        info!(volume = %r.id, name = %r.name, size = r.size_bytes, replicas = r.replicas, "volume created");
        Ok(r)
    }

    /// Writes a new record and its name, failing if the name is taken.
    async fn insert(&self, r: &VolumeRecord) -> Result<(), VolumeError> {
        let name_key = volume_name_key(&r.name);
        let txn = Txn {
            compares: vec![Compare::ModRevision { key: name_key.clone(), equals: 0 }],
            success: vec![
                MetaOp::Put { key: volume_key(r.id), value: encode(r) },
                MetaOp::Put { key: name_key, value: r.id.to_string().into_bytes() },
            ],
            failure: vec![],
        };
        if !self.meta.write(Command::Txn(txn)).await?.succeeded {
            return Err(VolumeError::NameTaken(r.name.clone()));
        }
        Ok(())
    }

    /// Refuses a placement that gives a node more of this volume than the
    /// node can hold. Volumes are thin: other volumes' unwritten space is not
    /// counted, so a pool may be overcommitted on purpose.
    fn check_capacity(
        &self,
        nodes: &BTreeMap<NodeId, NodeRecord>,
        placement: &[Vec<NodeId>],
        extent_size: u64,
        size: u64,
        replicas: u8,
        already: &Load,
    ) -> Result<(), VolumeError> {
        let mut need = Load::new();
        for n in placement.iter().flatten() {
            *need.entry(*n).or_default() += extent_size;
        }
        for (n, bytes) in need {
            let Some(rec) = nodes.get(&n) else { continue };
            // A node's capacity counts what it already holds; volumes are
            // thin, so only this volume's own worst case is checked.
            let mine = bytes.saturating_sub(already.get(&n).copied().unwrap_or(0));
            if mine > rec.block_capacity {
                return Err(VolumeError::TooLarge {
                    size,
                    replicas,
                    node: n,
                    need: mine,
                    capacity: rec.block_capacity,
                });
            }
        }
        Ok(())
    }

    /// Grows a volume (new extents are placed now; shrinking is refused).
    pub async fn resize(&self, volume: &str, size_bytes: u64) -> Result<VolumeRecord, VolumeError> {
        let (mut r, rev) = self.get_available(volume).await?;
        let max = r.extent_size.saturating_mul(MAX_EXTENTS);
        if size_bytes == 0 || !size_bytes.is_multiple_of(u64::from(BLOCK_SIZE)) || size_bytes > max {
            return Err(VolumeError::Size { got: size_bytes, max });
        }
        if size_bytes < r.size_bytes {
            return Err(VolumeError::Shrink { volume: r.name, size: r.size_bytes, asked: size_bytes });
        }
        let extents = size_bytes.div_ceil(r.extent_size) as usize;
        if extents > r.placement.len() {
            let nodes = self.nodes().await?;
            let ids = placeable(&nodes);
            let copies = usize::from(r.replicas).min(ids.len());
            let more = place(&ids, &mut self.load().await?, extents - r.placement.len(), copies);
            let mut held = Load::new();
            for n in r.placement.iter().flatten() {
                *held.entry(*n).or_default() += r.extent_size;
            }
            let mut all = r.placement.clone();
            all.extend(more);
            self.check_capacity(&nodes, &all, r.extent_size, size_bytes, r.replicas, &held)?;
            r.placement = all;
        }
        r.size_bytes = size_bytes;
        r.updated_at_ms = unix_millis();
        self.put_if(&r, rev).await?;
        info!(volume = %r.id, size = size_bytes, "volume resized");
        Ok(r)
    }

    /// Marks a volume deleting; the leader's controller reclaims its space
    /// on every replica, then removes the record.
    pub async fn delete(&self, volume: &str, force: bool) -> Result<VolumeRecord, VolumeError> {
        let (mut r, rev) = self.get_available(volume).await?;
        if let Some(w) = &r.writer
            && !force
        {
            return Err(VolumeError::InUse {
                volume: r.name.clone(),
                holder: w.holder.clone(),
                node: w.node,
            });
        }
        let clones: Vec<String> = self
            .list()
            .await?
            .into_iter()
            // A deleting clone no longer counts: reclaim keeps every layer
            // another volume still lists.
            .filter(|v| v.state == VolumeState::Available)
            .filter(|v| v.origin.as_deref().is_some_and(|o| o.starts_with(&format!("{}/", r.id))))
            .map(|v| v.name)
            .collect();
        if !clones.is_empty() {
            return Err(VolumeError::HasClones { volume: r.name.clone(), clones: clones.join(", ") });
        }
        // The name is freed at once; the record lives on (deleting) until
        // the controller has reclaimed the space.
        r.state = VolumeState::Deleting;
        r.updated_at_ms = unix_millis();
        r.generation += 1;
        r.writer = None;
        let txn = Txn {
            compares: vec![Compare::ModRevision { key: volume_key(r.id), equals: rev }],
            success: vec![
                MetaOp::Put { key: volume_key(r.id), value: encode(&r) },
                MetaOp::Delete { key: volume_name_key(&r.name) },
            ],
            failure: vec![],
        };
        if !self.meta.write(Command::Txn(txn)).await?.succeeded {
            return Err(VolumeError::Conflict);
        }
        info!(volume = %r.id, name = %r.name, "volume deleting");
        Ok(r)
    }

    /// Removes a deleting volume's record (after its space is reclaimed).
    pub async fn forget(&self, id: VolumeId, rev: u64) -> Result<(), VolumeError> {
        let resp = self.meta.write(Command::delete_if(volume_key(id), rev)).await?;
        if resp.succeeded { Ok(()) } else { Err(VolumeError::Conflict) }
    }

    /// Where a volume's copies are, with replica addresses.
    pub async fn layout(&self, r: &VolumeRecord) -> Result<VolumeLayout, VolumeError> {
        let nodes = self.nodes().await?;
        layout_of(r, &nodes)
    }

    /// Takes a new generation for a writer: refused while another writer
    /// holds the volume unless `takeover` (the old writer is then fenced).
    /// Only [`crate::writer::WriterSlot`] calls this: the slot gives it back.
    pub(crate) async fn open_writer(
        &self,
        volume: &str,
        node: NodeId,
        holder: &str,
        takeover: bool,
    ) -> Result<VolumeRecord, VolumeError> {
        let (mut r, rev) = self.get_available(volume).await?;
        if let Some(w) = &r.writer
            && !takeover
        {
            return Err(VolumeError::InUse {
                volume: r.name.clone(),
                holder: w.holder.clone(),
                node: w.node,
            });
        }
        if let Some(w) = &r.writer {
            warn!(volume = %r.id, old = %w.holder, old_node = %w.node, new = holder, "taking over the volume; the old writer is fenced");
        }
        r.generation += 1;
        r.writer = Some(VolumeWriter {
            node,
            holder: holder.to_owned(),
            since_ms: unix_millis(),
            // The generation it opened with: unique per open (taken by CAS).
            token: r.generation,
        });
        r.updated_at_ms = unix_millis();
        self.put_if(&r, rev).await?;
        info!(volume = %r.id, generation = r.generation, holder, "volume opened for writing");
        Ok(r)
    }

    /// Releases the writer slot if the writer that opened with `generation`
    /// still holds it.
    pub(crate) async fn close_writer(&self, id: VolumeId, generation: u64) -> Result<(), VolumeError> {
        for _ in 0..5 {
            let (mut r, rev) = self.get(&id.to_string()).await?;
            // The slot of the opener of `generation` (snapshots may have
            // handed it newer generations since).
            if r.writer.as_ref().map(|w| w.token) != Some(generation) {
                return Ok(());
            }
            r.writer = None;
            r.updated_at_ms = unix_millis();
            match self.put_if(&r, rev).await {
                Ok(_) => return Ok(()),
                Err(VolumeError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(VolumeError::Conflict)
    }

    /// Breaks a writer's hold on a volume (its node died, its process hangs):
    /// takes a new generation, records it on the replicas so the old writer
    /// can change nothing more, and frees the writer slot.
    pub async fn release(&self, volume: &str) -> Result<VolumeRecord, VolumeError> {
        let (mut r, rev) = self.get(volume).await?;
        r.generation += 1;
        let old = r.writer.take();
        r.updated_at_ms = unix_millis();
        self.put_if(&r, rev).await?;
        self.fence_replicas(&r).await?;
        info!(volume = %r.id, generation = r.generation, old = ?old.map(|w| w.holder), "volume writer released");
        Ok(r)
    }

    /// Records the record's generation on every copy; warns when an extent
    /// could not be fenced on a quorum (the next writer's open fences it).
    async fn fence_replicas(&self, r: &VolumeRecord) -> Result<(), VolumeError> {
        let layout = self.layout(r).await?;
        let op = nodeos_block::wire::Op::Fence { volume: r.id, generation: r.generation };
        let mut fenced = HashSet::new();
        for rep in layout.extents.iter().flatten() {
            if !fenced.contains(&rep.node) && self.transport.call(rep, op.clone()).await.is_ok() {
                fenced.insert(rep.node);
            }
        }
        let short = layout
            .extents
            .iter()
            .filter(|set| {
                set.iter().filter(|x| fenced.contains(&x.node)).count()
                    < nodeos_block::client::quorum(set.len())
            })
            .count();
        if short > 0 {
            warn!(volume = %r.id, extents = short, "some extents could not be fenced on a quorum; the next writer will fence them when it opens");
        }
        Ok(())
    }

    /// Opens a volume for reading in this process. The client follows
    /// changes of the record (new copies, growth, snapshots) until it is
    /// dropped.
    pub async fn open_reader(&self, volume: &str) -> Result<VolumeClient<T>, VolumeError> {
        let (r, _) = self.get_available(volume).await?;
        let mut layout = self.layout(&r).await?;
        layout.generation = 0;
        let client =
            VolumeClient::open(self.transport.clone(), layout, true, Some(self.meta.node_id())).await?;
        self.follow(&client, r.id, None);
        Ok(client)
    }

    /// A read-only view of a snapshot: the volume's layers up to the
    /// snapshot's, which never change.
    pub async fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<VolumeClient<T>, VolumeError> {
        let (r, _) = self.get_available(volume).await?;
        let snap = r.snapshots.iter().find(|s| s.name == snapshot).ok_or_else(|| {
            VolumeError::NoSnapshot { volume: r.name.clone(), snapshot: snapshot.to_owned() }
        })?;
        let upto = r.layers.iter().position(|l| *l == snap.layer).map(|i| i + 1).unwrap_or(0);
        let mut layout = self.layout(&r).await?;
        layout.layers.truncate(upto);
        layout.generation = 0;
        Ok(VolumeClient::open(self.transport.clone(), layout, true, Some(self.meta.node_id())).await?)
    }

    /// Keeps a client's layout in step with its volume record.
    /// `token` is the writer's own (see [`VolumeWriter::token`]).
    pub fn follow(&self, client: &VolumeClient<T>, id: VolumeId, token: Option<u64>) {
        let weak = client.downgrade();
        let this = self.clone();
        tokio::spawn(async move {
            let mut events = Box::pin(this.meta.watch(0, volume_key(id)));
            while let Some(ev) = events.next().await {
                let Some(client) = weak.upgrade() else { return };
                let Ok(ev) = ev else {
                    // Fell behind the watch history: re-read and restart.
                    if let Ok((r, rev)) = this.get(&id.to_string()).await {
                        if let Ok(l) = this.layout(&r).await {
                            client.update_layout(l, own(&r, token));
                        }
                        events = Box::pin(this.meta.watch(rev + 1, volume_key(id)));
                    }
                    continue;
                };
                if ev.kv.key != volume_key(id) || ev.kv.value.is_empty() {
                    continue;
                }
                let Ok(r) = decode::<VolumeRecord>(&ev.kv.key, &ev.kv.value) else { continue };
                match this.layout(&r).await {
                    Ok(l) => client.update_layout(l, own(&r, token)),
                    Err(e) => warn!(volume = %id, error = %e, "cannot follow volume layout"),
                }
            }
        });
    }

    /// Freezes the volume's current blocks as a snapshot: the top layer
    /// becomes read-only and a new one takes writes.
    pub async fn snapshot(&self, volume: &str, name: &str) -> Result<VolumeRecord, VolumeError> {
        check_name(name)?;
        let (mut r, rev) = self.get_available(volume).await?;
        if r.snapshots.iter().any(|s| s.name == name) {
            return Err(VolumeError::SnapshotTaken { volume: r.name, snapshot: name.to_owned() });
        }
        r.snapshots.push(SnapshotRecord {
            name: name.to_owned(),
            layer: r.top_layer(),
            created_at_ms: unix_millis(),
        });
        r.layers.push(rand::random::<u64>().max(1));
        // Sealing the old top layer: a new generation, handed to the same
        // writer (same token) and recorded on the replicas before this
        // returns, so no write issued after the snapshot can land in it. The
        // writer adopts the generation and re-addresses refused writes to the
        // new top layer; the snapshot holds every write completed before it.
        r.generation += 1;
        r.updated_at_ms = unix_millis();
        self.put_if(&r, rev).await?;
        self.fence_replicas(&r).await?;
        info!(volume = %r.id, snapshot = name, generation = r.generation, "snapshot taken");
        Ok(r)
    }

    /// A new volume whose blocks start as a snapshot's: it shares the
    /// snapshot's frozen layers (on the same nodes) and writes to its own.
    pub async fn clone_snapshot(
        &self,
        volume: &str,
        snapshot: &str,
        name: &str,
    ) -> Result<VolumeRecord, VolumeError> {
        check_name(name)?;
        let (src, _) = self.get_available(volume).await?;
        let snap = src.snapshots.iter().find(|s| s.name == snapshot).ok_or_else(|| {
            VolumeError::NoSnapshot { volume: src.name.clone(), snapshot: snapshot.to_owned() }
        })?;
        let upto = src.layers.iter().position(|l| *l == snap.layer).map(|i| i + 1).unwrap_or(0);
        let mut layers: Vec<u64> = src.layers[..upto].to_vec();
        layers.push(rand::random::<u64>().max(1));
        let now = unix_millis();
        let r = VolumeRecord {
            id: VolumeId::random(),
            name: name.to_owned(),
            size_bytes: src.size_bytes,
            extent_size: src.extent_size,
            replicas: src.replicas,
            placement: src.placement.clone(),
            layers,
            generation: 0,
            writer: None,
            snapshots: Vec::new(),
            origin: Some(format!("{}/{}", src.id, snapshot)),
            state: VolumeState::Available,
            warning: src.warning.clone(),
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.insert(&r).await?;
        info!(volume = %r.id, name, origin = %format!("{}/{snapshot}", src.name), "volume cloned");
        Ok(r)
    }

    /// Forgets a snapshot. Its layer stays in the chain (still holding the
    /// blocks newer layers do not override) unless no clone uses it.
    pub async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<VolumeRecord, VolumeError> {
        let (mut r, rev) = self.get_available(volume).await?;
        let before = r.snapshots.len();
        r.snapshots.retain(|s| s.name != snapshot);
        if r.snapshots.len() == before {
            return Err(VolumeError::NoSnapshot { volume: r.name, snapshot: snapshot.to_owned() });
        }
        let origin = format!("{}/{snapshot}", r.id);
        let clones: Vec<String> = self
            .list()
            .await?
            .into_iter()
            .filter(|v| v.state == VolumeState::Available && v.origin.as_deref() == Some(&origin))
            .map(|v| v.name)
            .collect();
        if !clones.is_empty() {
            return Err(VolumeError::HasClones {
                volume: format!("{}@{snapshot}", r.name),
                clones: clones.join(", "),
            });
        }
        r.updated_at_ms = unix_millis();
        self.put_if(&r, rev).await?;
        info!(volume = %r.id, snapshot, "snapshot deleted");
        Ok(r)
    }
}

/// The warning of a volume whose extents have fewer copies than its target
/// because the pool has too few nodes.
pub fn short_warning(copies: u8, target: u8, nodes: usize) -> String {
    format!("only {copies} of {target} copies: the pool has {nodes} node(s)")
}

/// Nodes new copies may go to: those not in maintenance (all of them if
/// every node is, so a pool being serviced can still make volumes), never
/// one being removed.
pub fn placeable(nodes: &BTreeMap<NodeId, NodeRecord>) -> Vec<NodeId> {
    let staying = nodes.values().filter(|n| !n.removing);
    let in_service: Vec<NodeId> = staying.clone().filter(|n| !n.maintenance).map(|n| n.id).collect();
    if in_service.is_empty() { staying.map(|n| n.id).collect() } else { in_service }
}

/// Whether the record's writer is the opener holding `token`.
fn own(r: &VolumeRecord, token: Option<u64>) -> bool {
    token.is_some() && r.writer.as_ref().map(|w| w.token) == token
}

/// A record's layout, with each copy's replica address.
pub fn layout_of(
    r: &VolumeRecord,
    nodes: &BTreeMap<NodeId, NodeRecord>,
) -> Result<VolumeLayout, VolumeError> {
    let extents = r
        .placement
        .iter()
        .map(|set| {
            set.iter()
                .map(|n| {
                    let addr = nodes.get(n).map(|rec| rec.block_address.clone()).unwrap_or_default();
                    if addr.is_empty() {
                        return Err(VolumeError::NoAddress(*n));
                    }
                    Ok(ReplicaRef { node: *n, address: addr })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VolumeLayout {
        volume: r.id,
        size: r.size_bytes,
        extent_size: r.extent_size,
        layers: r.layers.clone(),
        extents,
        generation: r.generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_grow_with_huge_volumes() {
        assert_eq!(extent_size_for(1 << 30), DEFAULT_EXTENT);
        assert_eq!(extent_size_for(MAX_EXTENTS * DEFAULT_EXTENT), DEFAULT_EXTENT);
        assert_eq!(extent_size_for(MAX_EXTENTS * DEFAULT_EXTENT + 1), 2 * DEFAULT_EXTENT);
        assert!(max_volume_size().div_ceil(extent_size_for(max_volume_size())) <= MAX_EXTENTS);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("disk-1_a").is_ok());
        for bad in ["", "Disk", "a b", "../x", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
