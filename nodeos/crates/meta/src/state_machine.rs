//! [`StateMachineStore`]: the revisioned key space that raft entries are applied
//! to, its snapshots and its watch feed.
//!
//! # Layout
//! One sled tree, `state_machine`, with key prefixes:
//! - `k/<key>`: the [`KeyValue`] of each live key (postcard);
//! - `e/<be u64 revision><be u32 seq>`: the retained [`Event`] history, newest
//!   [`MAX_EVENTS`] events (whole revisions are dropped, oldest first);
//! - `m/applied`, `m/membership`, `m/revision`, `m/compacted`: the last applied
//!   log id, last membership, current revision and the highest revision whose
//!   events were dropped.
//!
//! Snapshots are one file, `current.snap`, in the snapshot directory (format
//! below, at [`write_snapshot_file`]).
//!
//! # Durability
//! Each `apply` call writes everything it changed (keys, events, history
//! compaction, applied log id, revision) as ONE atomic `sled::Batch`, so the
//! on-disk state is always a prefix of the applied log. `apply` does not flush:
//! the raft log is the durable source, openraft re-applies from the stored
//! `last_applied`, and the log store flushes this tree before it purges any
//! entry. `install_snapshot` replaces the whole tree in one batch and flushes
//! before it returns. The snapshot file is replaced atomically (tmp file, fsync,
//! rename, fsync of the directory).
//!
//! # Concurrency
//! openraft drives `apply`/`install_snapshot` from one task; the node reads
//! through clones. A `RwLock` around the in-memory bookkeeping makes every read
//! see one revision, and makes a watcher's subscription and its view of the
//! current revision atomic with respect to applies.

use std::fmt;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::lease::LeaseBook;
use crate::store::MetaDb;
use futures::Stream;
use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StoredMembership,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::TypeConfig;
use crate::command::{Command, Compare, Event, EventKind, KeyValue, Op, Response};
use crate::store::{MetaTypeConfig, StoreError, be_u64};
use crate::watch::{self, FeedItem, History, HistoryPage, HistoryPos, WatchError, WatchStart};

const TREE: &str = "state_machine";
const KV_PREFIX: &[u8] = b"k/";
const EVENT_PREFIX: &[u8] = b"e/";
const META_APPLIED: &[u8] = b"m/applied";
const META_MEMBERSHIP: &[u8] = b"m/membership";
const META_REVISION: &[u8] = b"m/revision";
const META_COMPACTED: &[u8] = b"m/compacted";

/// Events kept in the history for watchers to replay.
pub const MAX_EVENTS: u64 = 10_000;

/// Version of the snapshot data layout ([`SnapshotBody`]).
const SNAPSHOT_FORMAT: u32 = 1;
const SNAPSHOT_FILE: &str = "current.snap";
const SNAPSHOT_TMP: &str = "current.snap.tmp";
const SNAPSHOT_MAGIC: &[u8; 8] = b"NODEOSSN";
/// Version of the snapshot file layout (header around meta + data).
const SNAPSHOT_FILE_VERSION: u32 = 1;

/// The pool's key space. Cloning is cheap: clones share one store, so the node
/// keeps one for reads and watches while openraft owns another.
pub struct StateMachineStore<C: MetaTypeConfig = TypeConfig> {
    inner: Arc<Inner<C>>,
}

impl<C: MetaTypeConfig> Clone for StateMachineStore<C> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<C: MetaTypeConfig> fmt::Debug for StateMachineStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.read_state();
        f.debug_struct("StateMachineStore")
            .field("revision", &state.revision)
            .field("last_applied", &state.last_applied)
            .field("compacted", &state.compacted)
            .finish_non_exhaustive()
    }
}

struct Inner<C: MetaTypeConfig> {
    db: MetaDb,
    tree: sled::Tree,
    snapshot_dir: PathBuf,
    state: RwLock<SmState<C>>,
    /// Live watch feed; sent to under the write lock, after the batch is written.
    feed: broadcast::Sender<FeedItem>,
    /// Meta of the snapshot file on disk; the lock serialises writes of the file.
    snapshot: tokio::sync::Mutex<Option<SnapshotMeta<C::NodeId, C::Node>>>,
    /// When each member's last lease renewal was applied here.
    leases: Arc<LeaseBook>,
}

/// In-memory copy of the `m/` keys (plus the history size), changed only after
/// the batch that writes them succeeded.
#[derive(Clone)]
struct SmState<C: MetaTypeConfig> {
    last_applied: Option<LogId<C::NodeId>>,
    membership: StoredMembership<C::NodeId, C::Node>,
    revision: u64,
    compacted: u64,
    /// Number of `e/` keys in the tree.
    events: u64,
}

/// A snapshot's meta and its encoded data.
type MetaAndData<C> =
    (SnapshotMeta<<C as openraft::RaftTypeConfig>::NodeId, <C as openraft::RaftTypeConfig>::Node>, Vec<u8>);

/// The snapshot data, format [`SNAPSHOT_FORMAT`]: postcard of
/// `(SNAPSHOT_FORMAT: u32, SnapshotBody)`. Event history is not included.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
struct SnapshotBody<NID: openraft::NodeId, N: openraft::Node> {
    last_applied: Option<LogId<NID>>,
    last_membership: StoredMembership<NID, N>,
    revision: u64,
    compacted_revision: u64,
    kvs: Vec<KeyValue>,
}

impl StateMachineStore {
    /// Opens the state machine tree in `db` and the snapshot file in `snapshot_dir`
    /// (both created when new).
    pub fn open(db: &MetaDb, snapshot_dir: &Path) -> Result<Self, StoreError> {
        Self::for_type_config(db, snapshot_dir)
    }
}

impl<C: MetaTypeConfig> StateMachineStore<C> {
    /// [`StateMachineStore::open`] for any [`MetaTypeConfig`] (tests use a `u64` node id).
    pub fn for_type_config(db: &MetaDb, snapshot_dir: &Path) -> Result<Self, StoreError> {
        let tree = db.open_tree(TREE).map_err(StoreError::io("open the state machine tree"))?;
        let last_applied: Option<LogId<C::NodeId>> =
            read_meta::<Option<LogId<C::NodeId>>>(&tree, META_APPLIED, "last applied log id")?.flatten();
        let membership = read_meta(&tree, META_MEMBERSHIP, "last membership")?.unwrap_or_default();
        let revision = read_meta(&tree, META_REVISION, "revision")?.unwrap_or(0);
        let compacted = read_meta(&tree, META_COMPACTED, "compacted revision")?.unwrap_or(0);
        let mut events = 0;
        for key in tree.scan_prefix(EVENT_PREFIX).keys() {
            key.map_err(StoreError::io("count event history"))?;
            events += 1;
        }

        std::fs::create_dir_all(snapshot_dir).map_err(|source| StoreError::SnapshotFile {
            step: "create the snapshot directory",
            path: snapshot_dir.to_owned(),
            source,
        })?;
        let tmp = snapshot_dir.join(SNAPSHOT_TMP);
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StoreError::SnapshotFile {
                    step: "remove a partial snapshot",
                    path: tmp,
                    source: e,
                });
            }
            _ => {}
        }
        let snapshot = read_snapshot_file::<C>(snapshot_dir)?.map(|(meta, _)| meta);

        tracing::info!(
            revision,
            compacted,
            events,
            last_applied = ?last_applied,
            snapshot = ?snapshot.as_ref().map(|m| &m.snapshot_id),
            "state machine opened"
        );
        let (feed, _) = broadcast::channel(watch::FEED_CAPACITY);
        let state = SmState { last_applied, membership, revision, compacted, events };
        Ok(Self {
            inner: Arc::new(Inner {
                db: db.clone(),
                tree,
                snapshot_dir: snapshot_dir.to_owned(),
                state: RwLock::new(state),
                feed,
                snapshot: tokio::sync::Mutex::new(snapshot),
                leases: Arc::default(),
            }),
        })
    }

    /// When this node applied each member's last lease renewal.
    pub fn leases(&self) -> Arc<LeaseBook> {
        self.inner.leases.clone()
    }

    /// The current value of `key`.
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let _state = self.inner.read_state();
        read_kv(&self.inner.tree, key)
    }

    /// [`Self::get`], plus the revision the value was read at (one consistent view).
    pub fn get_with_revision(&self, key: &str) -> Result<(Option<KeyValue>, u64), StoreError> {
        let state = self.inner.read_state();
        Ok((read_kv(&self.inner.tree, key)?, state.revision))
    }

    /// Keys starting with `prefix`, sorted by key; at most `limit` (0 = no limit).
    pub fn range(&self, prefix: &str, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        Ok(self.range_with_revision(prefix, limit)?.0)
    }

    /// [`Self::range`], plus the revision the result was read at (one consistent view).
    pub fn range_with_revision(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let state = self.inner.read_state();
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut out = Vec::new();
        for item in self.inner.tree.scan_prefix(kv_key(prefix)).values().take(limit) {
            let bytes = item.map_err(StoreError::io("read keys"))?;
            out.push(postcard::from_bytes(&bytes).map_err(StoreError::decode("key value"))?);
        }
        Ok((out, state.revision))
    }

    /// The pool revision: bumped once by every txn that changed a key.
    pub fn revision(&self) -> u64 {
        self.inner.read_state().revision
    }

    /// The highest revision whose events are no longer kept; watches must start above it.
    pub fn compacted_revision(&self) -> u64 {
        self.inner.read_state().compacted
    }

    /// The last log entry applied.
    pub fn last_applied(&self) -> Option<LogId<C::NodeId>> {
        self.inner.read_state().last_applied.clone()
    }

    /// Events for keys starting with `prefix`, from `from_revision` on (0 = only
    /// future events): the retained history first, then live, with no gap and no
    /// duplicate. Ends with [`WatchError::Compacted`] if `from_revision` is no
    /// longer kept, or [`WatchError::Lagged`] if the consumer falls behind.
    pub fn watch(
        &self,
        from_revision: u64,
        prefix: String,
    ) -> impl Stream<Item = Result<Event, WatchError>> + Send + Unpin + 'static {
        let start = {
            let state = self.inner.read_state();
            let history: Arc<dyn History> = self.inner.clone();
            WatchStart {
                feed: self.inner.feed.subscribe(),
                revision: state.revision,
                replay_from: (from_revision > 0).then_some(from_revision),
                history,
            }
        };
        watch::stream(start, prefix)
    }
}

impl<C: MetaTypeConfig> Inner<C> {
    fn read_state(&self) -> RwLockReadGuard<'_, SmState<C>> {
        // The state is replaced wholesale after a successful batch, so a panic
        // elsewhere cannot leave it half-updated; poisoning carries no meaning.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, SmState<C>> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `entries` as one batch; returns one response per entry.
    fn apply_entries(&self, entries: Vec<openraft::Entry<C>>) -> Result<Vec<Response>, StoreError> {
        let mut state = self.write_state();
        let mut next = state.clone();
        let mut overlay = Overlay { tree: &self.tree, changes: Default::default() };
        let mut events = Vec::new();
        let mut responses = Vec::with_capacity(entries.len());
        let mut membership_changed = false;
        let mut renewed = Vec::new();

        for entry in entries {
            let response = match entry.payload {
                EntryPayload::Blank => {
                    Response { revision: next.revision, succeeded: true, ..Default::default() }
                }
                EntryPayload::Membership(membership) => {
                    next.membership = StoredMembership::new(Some(entry.log_id.clone()), membership);
                    membership_changed = true;
                    Response { revision: next.revision, succeeded: true, ..Default::default() }
                }
                EntryPayload::Normal(Command::Renew { node }) => {
                    renewed.push(node);
                    Response { revision: next.revision, succeeded: true, ..Default::default() }
                }
                EntryPayload::Normal(command) => {
                    apply_command(&mut overlay, &mut next.revision, command, &mut events)?
                }
            };
            next.last_applied = Some(entry.log_id);
            responses.push(response);
        }

        let mut batch = sled::Batch::default();
        for (key, value) in overlay.changes {
            match value {
                Some(kv) => batch.insert(kv_key(&key), encode(&kv, "key value")?),
                None => batch.remove(kv_key(&key)),
            }
        }
        let persisted = self.compact_history(&mut batch, &mut next, &events)?;
        let mut seq = 0u32;
        let mut last_revision = None;
        for (i, event) in events.iter().enumerate() {
            seq = if last_revision == Some(event.revision) { seq.saturating_add(1) } else { 0 };
            last_revision = Some(event.revision);
            if i >= events.len() - persisted {
                batch.insert(&event_key(event.revision, seq)[..], encode(event, "event")?);
            }
        }
        next.events += persisted as u64;
        batch.insert(META_APPLIED, encode(&next.last_applied, "last applied log id")?);
        if membership_changed {
            batch.insert(META_MEMBERSHIP, encode(&next.membership, "last membership")?);
        }
        batch.insert(META_REVISION, encode(&next.revision, "revision")?);
        batch.insert(META_COMPACTED, encode(&next.compacted, "compacted revision")?);
        self.tree.apply_batch(batch).map_err(StoreError::io("write applied entries"))?;

        *state = next;
        for node in renewed {
            self.leases.renewed(node);
        }
        if !events.is_empty() {
            // An error only means nobody is watching.
            let _ = self.feed.send(FeedItem::Events(events.into()));
        }
        Ok(responses)
    }

    /// Drops the oldest events (whole revisions) so at most [`MAX_EVENTS`] remain
    /// after `new_events` are added; returns how many of `new_events` (counted
    /// from the end) are to be persisted. Updates `state.events` and
    /// `state.compacted` for the stored events it drops.
    fn compact_history(
        &self,
        batch: &mut sled::Batch,
        state: &mut SmState<C>,
        new_events: &[Event],
    ) -> Result<usize, StoreError> {
        let total = state.events + new_events.len() as u64;
        if total <= MAX_EVENTS {
            return Ok(new_events.len());
        }
        let mut excess = total - MAX_EVENTS;
        let mut last_dropped = None;
        for key in self.tree.scan_prefix(EVENT_PREFIX).keys() {
            let key = key.map_err(StoreError::io("scan event history"))?;
            let (revision, _) = parse_event_key(&key)?;
            if excess == 0 && last_dropped != Some(revision) {
                break;
            }
            batch.remove(key);
            excess = excess.saturating_sub(1);
            state.events = state.events.saturating_sub(1);
            last_dropped = Some(revision);
        }
        // Only when one call brings more than MAX_EVENTS events: some never get stored.
        let mut skipped = 0;
        for event in new_events {
            if excess == 0 && last_dropped != Some(event.revision) {
                break;
            }
            excess = excess.saturating_sub(1);
            skipped += 1;
            last_dropped = Some(event.revision);
        }
        if let Some(revision) = last_dropped {
            state.compacted = state.compacted.max(revision);
        }
        Ok(new_events.len() - skipped)
    }

    /// Encodes the whole key space as snapshot data, at one revision.
    fn build_snapshot_data(&self) -> Result<MetaAndData<C>, StoreError> {
        let state = self.read_state();
        let mut kvs = Vec::new();
        for item in self.tree.scan_prefix(KV_PREFIX).values() {
            let bytes = item.map_err(StoreError::io("read keys for a snapshot"))?;
            kvs.push(postcard::from_bytes(&bytes).map_err(StoreError::decode("key value"))?);
        }
        let body = SnapshotBody::<C::NodeId, C::Node> {
            last_applied: state.last_applied.clone(),
            last_membership: state.membership.clone(),
            revision: state.revision,
            compacted_revision: state.compacted,
            kvs,
        };
        let data = encode(&(SNAPSHOT_FORMAT, &body), "snapshot data")?;
        let snapshot_id = match &state.last_applied {
            Some(id) => format!("{}-{}-{:016x}", id.leader_id.term, id.index, rand::random::<u64>()),
            None => format!("0-0-{:016x}", rand::random::<u64>()),
        };
        let meta = SnapshotMeta {
            last_log_id: state.last_applied.clone(),
            last_membership: state.membership.clone(),
            snapshot_id,
        };
        Ok((meta, data))
    }

    /// Replaces the whole key space with `body`, in one batch; history restarts
    /// at the snapshot's revision. The caller flushes.
    fn install(
        &self,
        meta: &SnapshotMeta<C::NodeId, C::Node>,
        body: SnapshotBody<C::NodeId, C::Node>,
    ) -> Result<(), StoreError> {
        let mut state = self.write_state();
        let mut batch = sled::Batch::default();
        for key in self.tree.iter().keys() {
            batch.remove(key.map_err(StoreError::io("scan the state machine"))?);
        }
        for kv in &body.kvs {
            batch.insert(kv_key(&kv.key), encode(kv, "key value")?);
        }
        let next = SmState::<C> {
            last_applied: meta.last_log_id.clone(),
            membership: meta.last_membership.clone(),
            revision: body.revision,
            compacted: body.revision,
            events: 0,
        };
        batch.insert(META_APPLIED, encode(&next.last_applied, "last applied log id")?);
        batch.insert(META_MEMBERSHIP, encode(&next.membership, "last membership")?);
        batch.insert(META_REVISION, encode(&next.revision, "revision")?);
        batch.insert(META_COMPACTED, encode(&next.compacted, "compacted revision")?);
        self.tree.apply_batch(batch).map_err(StoreError::io("install a snapshot"))?;
        tracing::info!(
            snapshot = %meta.snapshot_id,
            revision = body.revision,
            keys = body.kvs.len(),
            "state machine replaced by a snapshot"
        );
        *state = next;
        let _ = self.feed.send(FeedItem::Reset { revision: body.revision });
        Ok(())
    }

    /// Makes `meta` + `data` the current snapshot file, unless a newer one is
    /// already there. Gives `data` back.
    async fn save_snapshot(
        &self,
        meta: &SnapshotMeta<C::NodeId, C::Node>,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        let mut current = self.snapshot.lock().await;
        if let Some(cur) = current.as_ref()
            && cur.last_log_id > meta.last_log_id
        {
            tracing::debug!(kept = %cur.snapshot_id, dropped = %meta.snapshot_id, "older snapshot not saved");
            return Ok(data);
        }
        let dir = self.snapshot_dir.clone();
        let file_meta = meta.clone();
        let data = tokio::task::spawn_blocking(move || {
            write_snapshot_file::<C>(&dir, &file_meta, &data).map(|()| data)
        })
        .await
        .map_err(|source| StoreError::Task { step: "write the snapshot file", source })??;
        *current = Some(meta.clone());
        Ok(data)
    }
}

impl<C: MetaTypeConfig> History for Inner<C> {
    fn read_history(&self, pos: HistoryPos, until: u64, max: usize) -> Result<HistoryPage, WatchError> {
        let state = self.read_state();
        if pos.0 <= state.compacted {
            return Err(WatchError::Compacted { requested: pos.0, oldest: state.compacted + 1 });
        }
        let mut events = Vec::new();
        for item in self.tree.range(&event_key(pos.0, pos.1)[..]..) {
            let (key, value) = item.map_err(StoreError::io("read event history"))?;
            if !key.starts_with(EVENT_PREFIX) {
                break;
            }
            let (revision, seq) = parse_event_key(&key)?;
            if revision > until {
                break;
            }
            if events.len() >= max {
                return Ok(HistoryPage { events, next: Some((revision, seq)) });
            }
            events.push(postcard::from_bytes(&value).map_err(StoreError::decode("event"))?);
        }
        Ok(HistoryPage { events, next: None })
    }
}

/// Keys changed so far in one apply call, over the stored tree.
struct Overlay<'a> {
    tree: &'a sled::Tree,
    changes: std::collections::BTreeMap<String, Option<KeyValue>>,
}

impl Overlay<'_> {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        match self.changes.get(key) {
            Some(value) => Ok(value.clone()),
            None => read_kv(self.tree, key),
        }
    }

    fn set(&mut self, key: String, value: Option<KeyValue>) {
        self.changes.insert(key, value);
    }
}

/// Applies one command per `command.rs`: compares, then success or failure ops;
/// the revision moves by one iff a key changed. An invalid command (only a buggy
/// peer could have proposed it) is a no-op with `succeeded = false`.
fn apply_command(
    overlay: &mut Overlay<'_>,
    revision: &mut u64,
    command: Command,
    events: &mut Vec<Event>,
) -> Result<Response, StoreError> {
    if let Err(error) = command.validate() {
        tracing::warn!(%error, "invalid command in the raft log, applied as a no-op");
        return Ok(Response { revision: *revision, succeeded: false, ..Default::default() });
    }
    let txn = match command {
        Command::Txn(txn) => txn,
        Command::Renew { .. } => {
            return Ok(Response { revision: *revision, succeeded: true, ..Default::default() });
        }
    };

    let mut succeeded = true;
    let mut compared = Vec::with_capacity(txn.compares.len());
    for compare in &txn.compares {
        let Compare::ModRevision { key, equals } = compare;
        let current = overlay.get(key)?;
        if current.as_ref().map_or(0, |kv| kv.mod_revision) != *equals {
            succeeded = false;
        }
        compared.push(current);
    }

    let ops = if succeeded { txn.success } else { txn.failure };
    let new_revision = revision.saturating_add(1);
    let events_before = events.len();
    let mut prev = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::Put { key, value } => {
                let old = overlay.get(&key)?;
                let kv = match &old {
                    Some(old) => KeyValue {
                        key: key.clone(),
                        value,
                        create_revision: old.create_revision,
                        mod_revision: new_revision,
                        version: old.version.saturating_add(1),
                    },
                    None => KeyValue {
                        key: key.clone(),
                        value,
                        create_revision: new_revision,
                        mod_revision: new_revision,
                        version: 1,
                    },
                };
                events.push(Event { revision: new_revision, kind: EventKind::Put, kv: kv.clone() });
                overlay.set(key, Some(kv));
                prev.push(old);
            }
            Op::Delete { key } => {
                let old = overlay.get(&key)?;
                if old.is_some() {
                    // Like etcd's tombstone: only the key and the deleting revision.
                    let kv = KeyValue {
                        key: key.clone(),
                        value: Vec::new(),
                        create_revision: 0,
                        mod_revision: new_revision,
                        version: 0,
                    };
                    events.push(Event { revision: new_revision, kind: EventKind::Delete, kv });
                    overlay.set(key, None);
                }
                prev.push(old);
            }
        }
    }
    if events.len() > events_before {
        *revision = new_revision;
    }
    Ok(Response { revision: *revision, succeeded, compared, prev })
}

fn kv_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(KV_PREFIX.len() + key.len());
    k.extend_from_slice(KV_PREFIX);
    k.extend_from_slice(key.as_bytes());
    k
}

fn event_key(revision: u64, seq: u32) -> [u8; 14] {
    let mut k = [0u8; 14];
    k[..2].copy_from_slice(EVENT_PREFIX);
    k[2..10].copy_from_slice(&be_u64(revision));
    k[10..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn parse_event_key(key: &[u8]) -> Result<(u64, u32), StoreError> {
    let corrupt =
        || StoreError::Corrupt { what: "event key", detail: format!("{} bytes, expected 14", key.len()) };
    let rest = key.strip_prefix(EVENT_PREFIX).filter(|r| r.len() == 12).ok_or_else(corrupt)?;
    let (rev, seq) = rest.split_at(8);
    let rev: [u8; 8] = rev.try_into().map_err(|_| corrupt())?;
    let seq: [u8; 4] = seq.try_into().map_err(|_| corrupt())?;
    Ok((u64::from_be_bytes(rev), u32::from_be_bytes(seq)))
}

fn encode<T: Serialize + ?Sized>(value: &T, what: &'static str) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(StoreError::encode(what))
}

fn read_meta<T: DeserializeOwned>(
    tree: &sled::Tree,
    key: &[u8],
    what: &'static str,
) -> Result<Option<T>, StoreError> {
    let Some(bytes) = tree.get(key).map_err(StoreError::io("read state machine metadata"))? else {
        return Ok(None);
    };
    postcard::from_bytes(&bytes).map(Some).map_err(StoreError::decode(what))
}

fn read_kv(tree: &sled::Tree, key: &str) -> Result<Option<KeyValue>, StoreError> {
    let Some(bytes) = tree.get(kv_key(key)).map_err(StoreError::io("read a key"))? else {
        return Ok(None);
    };
    postcard::from_bytes(&bytes).map(Some).map_err(StoreError::decode("key value"))
}

fn decode_snapshot_data<C: MetaTypeConfig>(
    data: &[u8],
) -> Result<SnapshotBody<C::NodeId, C::Node>, StoreError> {
    let (format, rest) =
        postcard::take_from_bytes::<u32>(data).map_err(StoreError::decode("snapshot format"))?;
    if format != SNAPSHOT_FORMAT {
        return Err(StoreError::Corrupt {
            what: "snapshot data",
            detail: format!("format {format}, this node reads {SNAPSHOT_FORMAT}"),
        });
    }
    postcard::from_bytes(rest).map_err(StoreError::decode("snapshot data"))
}

/// Writes the snapshot file atomically. Layout, version [`SNAPSHOT_FILE_VERSION`]:
///
/// ```text
/// magic "NODEOSSN" | u32 LE file version | 32-byte blake3 of everything after it
/// | u64 LE meta length | postcard SnapshotMeta | snapshot data
/// ```
fn write_snapshot_file<C: MetaTypeConfig>(
    dir: &Path,
    meta: &SnapshotMeta<C::NodeId, C::Node>,
    data: &[u8],
) -> Result<(), StoreError> {
    let meta_bytes = encode(meta, "snapshot meta")?;
    let meta_len = (meta_bytes.len() as u64).to_le_bytes();
    let mut hasher = blake3::Hasher::new();
    hasher.update(&meta_len);
    hasher.update(&meta_bytes);
    hasher.update(data);
    let hash = hasher.finalize();

    let tmp = dir.join(SNAPSHOT_TMP);
    let path = dir.join(SNAPSHOT_FILE);
    let file_err = |step: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::SnapshotFile { step, path, source }
    };
    let mut file = std::fs::File::create(&tmp).map_err(file_err("create", &tmp))?;
    file.write_all(SNAPSHOT_MAGIC)
        .and_then(|()| file.write_all(&SNAPSHOT_FILE_VERSION.to_le_bytes()))
        .and_then(|()| file.write_all(hash.as_bytes()))
        .and_then(|()| file.write_all(&meta_len))
        .and_then(|()| file.write_all(&meta_bytes))
        .and_then(|()| file.write_all(data))
        .map_err(file_err("write", &tmp))?;
    file.sync_all().map_err(file_err("fsync", &tmp))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(file_err("rename into place", &path))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(file_err("fsync the directory of", &path))?;
    tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "snapshot saved");
    Ok(())
}

/// Reads the snapshot file, if there is one, checking its header and checksum.
fn read_snapshot_file<C: MetaTypeConfig>(dir: &Path) -> Result<Option<MetaAndData<C>>, StoreError> {
    let path = dir.join(SNAPSHOT_FILE);
    let mut bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::SnapshotFile { step: "read", path, source });
        }
    };
    let corrupt = |detail: String| StoreError::Corrupt { what: "snapshot file", detail };
    const HEADER: usize = 8 + 4 + 32;
    if bytes.len() < HEADER + 8 || &bytes[..8] != SNAPSHOT_MAGIC {
        return Err(corrupt(format!("{} is not a snapshot file", path.display())));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != SNAPSHOT_FILE_VERSION {
        return Err(corrupt(format!("file version {version}, this node reads {SNAPSHOT_FILE_VERSION}")));
    }
    if blake3::hash(&bytes[HEADER..]).as_bytes()[..] != bytes[12..HEADER] {
        return Err(corrupt(format!("{} fails its checksum", path.display())));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[HEADER..HEADER + 8]);
    let meta_end = usize::try_from(u64::from_le_bytes(len))
        .ok()
        .and_then(|l| l.checked_add(HEADER + 8))
        .filter(|end| *end <= bytes.len())
        .ok_or_else(|| corrupt("meta length past the end of the file".to_owned()))?;
    let meta =
        postcard::from_bytes(&bytes[HEADER + 8..meta_end]).map_err(StoreError::decode("snapshot meta"))?;
    let data = bytes.split_off(meta_end);
    Ok(Some((meta, data)))
}

fn sm_err<NID: openraft::NodeId>(verb: ErrorVerb) -> impl FnOnce(StoreError) -> StorageError<NID> {
    move |e| e.into_raft(ErrorSubject::StateMachine, verb)
}

fn snapshot_err<NID: openraft::NodeId>(verb: ErrorVerb) -> impl FnOnce(StoreError) -> StorageError<NID> {
    move |e| e.into_raft(ErrorSubject::Snapshot(None), verb)
}

impl<C: MetaTypeConfig> RaftSnapshotBuilder<C> for StateMachineStore<C> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<C>, StorageError<C::NodeId>> {
        let inner = self.inner.clone();
        let (meta, data) = tokio::task::spawn_blocking(move || inner.build_snapshot_data())
            .await
            .map_err(|source| StoreError::Task { step: "build a snapshot", source })
            .and_then(|r| r)
            .map_err(snapshot_err(ErrorVerb::Read))?;
        let data = self.inner.save_snapshot(&meta, data).await.map_err(snapshot_err(ErrorVerb::Write))?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "snapshot built");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl<C: MetaTypeConfig> RaftStateMachine<C> for StateMachineStore<C> {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<C::NodeId>>, StoredMembership<C::NodeId, C::Node>), StorageError<C::NodeId>>
    {
        let state = self.inner.read_state();
        Ok((state.last_applied.clone(), state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        self.inner.apply_entries(entries).map_err(sm_err(ErrorVerb::Write))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<C::NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<C::NodeId, C::Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<C::NodeId>> {
        let data = snapshot.into_inner();
        let result = async {
            let body = decode_snapshot_data::<C>(&data)?;
            if body.last_applied != meta.last_log_id {
                return Err(StoreError::Corrupt {
                    what: "received snapshot",
                    detail: format!(
                        "data is at {:?} but its meta says {:?}",
                        body.last_applied, meta.last_log_id
                    ),
                });
            }
            self.inner.install(meta, body)?;
            self.inner.db.flush_durable("flush an installed snapshot").await?;
            self.inner.save_snapshot(meta, data).await?;
            Ok(())
        };
        result.await.map_err(snapshot_err(ErrorVerb::Write))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<C>>, StorageError<C::NodeId>> {
        let dir = self.inner.snapshot_dir.clone();
        let read = tokio::task::spawn_blocking(move || read_snapshot_file::<C>(&dir))
            .await
            .map_err(|source| StoreError::Task { step: "read the snapshot file", source })
            .and_then(|r| r)
            .map_err(snapshot_err(ErrorVerb::Read))?;
        Ok(read.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use futures::StreamExt;
    use nodeos_types::NodeId;
    use openraft::{BasicNode, CommittedLeaderId, Membership};

    use super::*;
    use crate::command::Txn;
    use crate::store::open_db;

    struct Fixture {
        dir: tempfile::TempDir,
        sm: StateMachineStore,
        next_index: u64,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let sm = open_sm(dir.path());
            Self { dir, sm, next_index: 1 }
        }

        fn log_id(&mut self) -> LogId<NodeId> {
            let id = LogId::new(CommittedLeaderId::new(1, NodeId(1)), self.next_index);
            self.next_index += 1;
            id
        }

        fn entry(&mut self, command: Command) -> openraft::Entry<TypeConfig> {
            openraft::Entry { log_id: self.log_id(), payload: EntryPayload::Normal(command) }
        }

        async fn apply(&mut self, command: Command) -> Response {
            let entry = self.entry(command);
            let mut r = self.sm.apply(vec![entry]).await.unwrap();
            assert_eq!(r.len(), 1);
            r.remove(0)
        }

        async fn apply_many(&mut self, commands: Vec<Command>) -> Vec<Response> {
            let entries: Vec<_> = commands.into_iter().map(|c| self.entry(c)).collect();
            self.sm.apply(entries).await.unwrap()
        }
    }

    fn open_sm(dir: &Path) -> StateMachineStore {
        let db = open_db(&dir.join("sled")).unwrap();
        StateMachineStore::open(&db, &dir.join("snapshots")).unwrap()
    }

    fn put(key: &str, value: &str) -> Command {
        Command::put(key, value.as_bytes().to_vec())
    }

    async fn next_event(
        stream: &mut (impl Stream<Item = Result<Event, WatchError>> + Unpin),
    ) -> Result<Event, WatchError> {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("watch event in time")
            .expect("stream still open")
    }

    #[tokio::test]
    async fn a_lease_renewal_is_noted_and_changes_no_key_or_revision() {
        let mut f = Fixture::new();
        f.apply(put("a", "1")).await;
        std::thread::sleep(Duration::from_millis(30));
        let before = f.sm.leases().age(7);
        let r = f.apply(Command::Renew { node: 7 }).await;
        assert_eq!((r.revision, r.succeeded), (1, true));
        assert!(f.sm.leases().age(7) < before, "the renewal was noted");
        assert!(f.sm.leases().age(8) >= before, "another node's age still counts from the start");
        let r = f.apply(put("b", "2")).await;
        assert_eq!(r.revision, 2, "the renewal took no revision");
        let events: Vec<Event> = f.sm.watch(1, String::new()).take(2).map(|e| e.unwrap()).collect().await;
        assert_eq!(events.iter().map(|e| e.kv.key.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    }

    #[tokio::test]
    async fn put_and_delete_keep_etcd_revision_bookkeeping() {
        let mut f = Fixture::new();
        let r = f.apply(put("a", "1")).await;
        assert_eq!((r.revision, r.succeeded, r.prev.clone()), (1, true, vec![None]));
        let a1 = f.sm.get("a").unwrap().unwrap();
        assert_eq!((a1.create_revision, a1.mod_revision, a1.version), (1, 1, 1));

        let r = f.apply(put("a", "2")).await;
        assert_eq!(r.revision, 2);
        assert_eq!(r.prev, vec![Some(a1.clone())]);
        let a2 = f.sm.get("a").unwrap().unwrap();
        assert_eq!(
            (a2.value.as_slice(), a2.create_revision, a2.mod_revision, a2.version),
            (&b"2"[..], 1, 2, 2)
        );

        assert_eq!(f.apply(put("b", "x")).await.revision, 3);
        let r = f.apply(Command::delete("a")).await;
        assert_eq!((r.revision, r.prev.clone()), (4, vec![Some(a2)]));
        assert_eq!(f.sm.get("a").unwrap(), None);

        // Deleting an absent key changes nothing, not even the revision.
        let r = f.apply(Command::delete("a")).await;
        assert_eq!((r.revision, r.succeeded, r.prev), (4, true, vec![None]));
        assert_eq!(f.sm.revision(), 4);

        // Re-created: a fresh create_revision and version.
        f.apply(put("a", "3")).await;
        let a3 = f.sm.get("a").unwrap().unwrap();
        assert_eq!((a3.create_revision, a3.mod_revision, a3.version), (5, 5, 1));
        assert_eq!(f.sm.last_applied().map(|l| l.index), Some(6));

        let keys: Vec<_> = f.sm.range("", 0).unwrap().into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(f.sm.range("", 1).unwrap().len(), 1);
        assert_eq!(f.sm.range("b", 0).unwrap()[0].key, "b");
        assert_eq!(f.sm.range_with_revision("c", 0).unwrap(), (vec![], 5));
        assert_eq!(f.sm.get_with_revision("b").unwrap().1, 5);
    }

    #[tokio::test]
    async fn compare_and_swap_runs_success_or_failure_ops() {
        let mut f = Fixture::new();
        let r = f.apply(Command::put_if("k", b"v1".to_vec(), 0)).await;
        assert!(r.succeeded);
        assert_eq!(r.compared, vec![None]);
        let k1 = f.sm.get("k").unwrap().unwrap();

        // Same start revision again: the key now exists, so the compare fails
        // and nothing changes.
        let r = f.apply(Command::put_if("k", b"v2".to_vec(), 0)).await;
        assert!(!r.succeeded);
        assert_eq!((r.revision, r.compared.clone(), r.prev.clone()), (1, vec![Some(k1.clone())], vec![]));
        assert_eq!(f.sm.get("k").unwrap(), Some(k1.clone()));
        assert_eq!(f.sm.revision(), 1);

        let r = f.apply(Command::put_if("k", b"v2".to_vec(), k1.mod_revision)).await;
        assert!(r.succeeded);
        assert_eq!(r.revision, 2);

        // A failed compare runs the failure ops.
        let txn = Txn {
            compares: vec![Compare::ModRevision { key: "k".into(), equals: 1 }],
            success: vec![Op::Delete { key: "k".into() }],
            failure: vec![Op::Put { key: "lost".into(), value: b"cas".to_vec() }],
        };
        let r = f.apply(Command::Txn(txn)).await;
        assert!(!r.succeeded);
        assert_eq!((r.revision, r.prev), (3, vec![None]));
        assert!(f.sm.get("k").unwrap().is_some());
        assert_eq!(f.sm.get("lost").unwrap().unwrap().value, b"cas");

        assert!(f.apply(Command::delete_if("k", 2)).await.succeeded);
        assert_eq!(f.sm.get("k").unwrap(), None);
    }

    #[tokio::test]
    async fn entries_in_one_apply_call_see_each_other() {
        let mut f = Fixture::new();
        let rs = f
            .apply_many(vec![
                Command::put_if("k", b"a".to_vec(), 0),
                Command::put_if("k", b"b".to_vec(), 1),
                Command::put_if("k", b"c".to_vec(), 1),
            ])
            .await;
        let ok: Vec<_> = rs.iter().map(|r| (r.succeeded, r.revision)).collect();
        assert_eq!(ok, [(true, 1), (true, 2), (false, 2)]);
        let k = f.sm.get("k").unwrap().unwrap();
        assert_eq!((k.value.as_slice(), k.version, k.create_revision), (&b"b"[..], 2, 1));
    }

    #[tokio::test]
    async fn blank_and_membership_entries_move_last_applied_only() {
        let mut f = Fixture::new();
        f.apply(put("a", "1")).await;
        let blank = openraft::Entry { log_id: f.log_id(), payload: EntryPayload::Blank };
        let members = BTreeMap::from([(NodeId(1), BasicNode::new("n1"))]);
        let membership = Membership::new(vec![members.keys().copied().collect()], members);
        let mem_id = f.log_id();
        let mem = openraft::Entry { log_id: mem_id, payload: EntryPayload::Membership(membership.clone()) };
        let rs = f.sm.apply(vec![blank, mem]).await.unwrap();
        for r in &rs {
            assert_eq!(r, &Response { revision: 1, succeeded: true, ..Default::default() });
        }
        let (applied, stored) = f.sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(mem_id));
        assert_eq!(stored, StoredMembership::new(Some(mem_id), membership));
        assert_eq!(f.sm.revision(), 1);
    }

    #[tokio::test]
    async fn invalid_command_is_a_no_op() {
        let mut f = Fixture::new();
        f.apply(put("a", "1")).await;
        for bad in [
            put("has space", "x"),
            put("", "x"),
            Command::put("big", vec![0; crate::command::MAX_VALUE_LEN + 1]),
        ] {
            let r = f.apply(bad).await;
            assert_eq!(r, Response { revision: 1, succeeded: false, ..Default::default() });
        }
        assert_eq!(f.sm.range("", 0).unwrap().len(), 1);
        assert_eq!(f.sm.last_applied().map(|l| l.index), Some(4));
    }

    #[tokio::test]
    async fn corrupt_stored_value_is_an_error_not_a_panic() {
        let f = Fixture::new();
        f.sm.inner.tree.insert(kv_key("x"), vec![0xff; 3]).unwrap();
        assert!(matches!(f.sm.get("x"), Err(StoreError::Decode { .. })));
        assert!(f.sm.range("", 0).is_err());
        let mut sm = f.sm.clone();
        assert!(sm.get_snapshot_builder().await.build_snapshot().await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_replays_history_then_follows_live_without_gap_or_duplicate() {
        let mut f = Fixture::new();
        for i in 0..5 {
            f.apply(put(&format!("w/{i}"), "v")).await;
            f.apply(put(&format!("other/{i}"), "v")).await;
        }
        // Revisions: w/i at 2i+1, other/i at 2i+2.
        let mut stream = f.sm.watch(4, "w/".to_owned());
        for want in [5, 7, 9] {
            assert_eq!(next_event(&mut stream).await.unwrap().revision, want);
        }

        // Live writes racing a second watcher that starts mid-flight.
        let sm = f.sm.clone();
        let writer = tokio::spawn(async move {
            let mut f = f;
            for i in 0..300 {
                f.apply(put(&format!("w/live{i}"), "v")).await;
            }
            f
        });
        tokio::task::yield_now().await;
        let mut late = sm.watch(1, "w/".to_owned());
        let mut seen = Vec::new();
        while seen.len() < 305 {
            seen.push(next_event(&mut late).await.unwrap().revision);
        }
        let mut expected: Vec<u64> = vec![1, 3, 5, 7, 9];
        expected.extend(11..311);
        assert_eq!(seen, expected, "late watcher saw a gap or a duplicate");
        let mut live = Vec::new();
        while live.len() < 300 {
            live.push(next_event(&mut stream).await.unwrap().revision);
        }
        assert_eq!(live, (11..311).collect::<Vec<_>>());
        let f = writer.await.unwrap();

        // from 0 = only future events.
        let mut future_only = f.sm.watch(0, String::new());
        let mut f = f;
        f.apply(put("z", "1")).await;
        let e = next_event(&mut future_only).await.unwrap();
        assert_eq!((e.revision, e.kind, e.kv.key.as_str()), (311, EventKind::Put, "z"));
        f.apply(Command::delete("z")).await;
        let e = next_event(&mut future_only).await.unwrap();
        assert_eq!((e.revision, e.kind, e.kv.mod_revision), (312, EventKind::Delete, 312));
    }

    #[tokio::test]
    async fn watch_from_a_compacted_revision_fails_and_history_stays_bounded() {
        let mut f = Fixture::new();
        // 3 events per revision, so compaction has to drop whole revisions.
        let mut commands = Vec::new();
        for i in 0..3_500u32 {
            let ops = (0..3).map(|j| Op::Put { key: format!("k{j}"), value: i.to_be_bytes().to_vec() });
            commands.push(Command::Txn(Txn { success: ops.collect(), ..Txn::default() }));
        }
        for chunk in commands.chunks(500) {
            f.apply_many(chunk.to_vec()).await;
        }
        assert_eq!(f.sm.revision(), 3_500);
        let compacted = f.sm.compacted_revision();
        // 10_500 events, keep <= 10_000 => at least 167 whole revisions dropped.
        assert_eq!(compacted, 167);
        assert_eq!(f.sm.inner.read_state().events, (3_500 - 167) * 3);
        assert_eq!(f.sm.inner.tree.scan_prefix(EVENT_PREFIX).count() as u64, (3_500 - 167) * 3);

        let mut stream = f.sm.watch(compacted, String::new());
        match next_event(&mut stream).await {
            Err(WatchError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (compacted, compacted + 1));
            }
            other => panic!("expected compaction error, got {other:?}"),
        }
        assert!(stream.next().await.is_none());

        let mut stream = f.sm.watch(compacted + 1, "k1".to_owned());
        let e = next_event(&mut stream).await.unwrap();
        assert_eq!((e.revision, e.kv.key.as_str()), (compacted + 1, "k1"));
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_ends_with_lagged() {
        let mut f = Fixture::new();
        f.apply(put("a", "0")).await;
        let mut stream = f.sm.watch(0, String::new());
        for i in 0..(watch::FEED_CAPACITY + 10) {
            f.apply(put("a", &i.to_string())).await;
        }
        match next_event(&mut stream).await {
            Err(WatchError::Lagged { resume_from }) => assert_eq!(resume_from, 2),
            other => panic!("expected lag, got {other:?}"),
        }
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn snapshot_installs_into_a_fresh_store_with_identical_reads() {
        let mut f = Fixture::new();
        for i in 0..50 {
            f.apply(put(&format!("key/{i:02}"), &format!("v{i}"))).await;
        }
        f.apply(Command::delete("key/07")).await;
        let mut builder = f.sm.get_snapshot_builder().await;
        let snap = builder.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id, f.sm.last_applied());
        let current = f.sm.clone().get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snap.meta);
        assert_eq!(current.snapshot.get_ref(), snap.snapshot.get_ref());

        let g = Fixture::new();
        let mut follower = g.sm.clone();
        let mut live = follower.watch(0, String::new());
        follower.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
        assert_eq!(follower.range("", 0).unwrap(), f.sm.range("", 0).unwrap());
        assert_eq!(follower.get("key/08").unwrap(), f.sm.get("key/08").unwrap());
        assert_eq!(follower.revision(), f.sm.revision());
        assert_eq!(follower.last_applied(), f.sm.last_applied());
        assert_eq!(follower.applied_state().await.unwrap(), f.sm.clone().applied_state().await.unwrap());
        assert_eq!(follower.compacted_revision(), 51);
        let got = follower.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(got.meta, snap.meta);

        // Live watchers learn that they missed everything up to the snapshot.
        match next_event(&mut live).await {
            Err(WatchError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (1, 52))
            }
            other => panic!("expected reset, got {other:?}"),
        }
        // History restarts at the snapshot's revision.
        assert!(matches!(
            next_event(&mut follower.watch(51, String::new())).await,
            Err(WatchError::Compacted { .. })
        ));

        // Garbage snapshot data is an error, and leaves the store untouched.
        let meta = g.sm.get_current_snapshot_meta_for_test().await;
        let mut bad = g.sm.clone();
        let res = bad.install_snapshot(&meta, Box::new(Cursor::new(vec![1, 2, 3]))).await;
        assert!(res.is_err());
        assert_eq!(g.sm.revision(), 51);
        drop(g.dir);
    }

    #[tokio::test]
    async fn reopening_the_same_directory_keeps_data_history_and_snapshot() {
        let mut f = Fixture::new();
        for i in 0..10 {
            f.apply(put(&format!("k{i}"), "v")).await;
        }
        let snap = f.sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        f.apply(Command::delete("k3")).await;
        let before = (f.sm.range("", 0).unwrap(), f.sm.revision(), f.sm.last_applied());
        let dir = f.dir;
        drop(f.sm);

        let mut sm = open_sm(dir.path());
        assert_eq!((sm.range("", 0).unwrap(), sm.revision(), sm.last_applied()), before);
        let cur = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(cur.meta, snap.meta);
        let mut stream = sm.watch(9, String::new());
        assert_eq!(next_event(&mut stream).await.unwrap().revision, 9);
        assert_eq!(next_event(&mut stream).await.unwrap().revision, 10);
        let e = next_event(&mut stream).await.unwrap();
        assert_eq!((e.revision, e.kind), (11, EventKind::Delete));
    }

    impl StateMachineStore {
        async fn get_current_snapshot_meta_for_test(&self) -> SnapshotMeta<NodeId, BasicNode> {
            self.inner.snapshot.lock().await.clone().unwrap()
        }
    }
}
