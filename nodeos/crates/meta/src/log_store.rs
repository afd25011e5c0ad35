//! [`LogStore`]: openraft's raft log and vote storage over sled.
//!
//! Owns two trees of the node's database: `raft_log` (key: big-endian u64 log
//! index, value: postcard-encoded [`openraft::Entry`]) and `raft_state` (the
//! vote, the last committed log id and the last purged log id).
//!
//! # Durability
//! - `append` reports the entries written only after a durable flush (sled flush,
//!   then `fdatasync`, see [`MetaDb`]), done by a group-commit task, and `save_vote` before it
//!   returns. `save_committed` does not flush: openraft allows a stale committed
//!   id, which only limits how far a restart re-applies before hearing the leader.
//! - `truncate` and `purge` each delete their range in one atomic `sled::Batch`
//!   and flush before returning.
//! - `purge` flushes the whole database *before* deleting anything: the state
//!   machine lives in the same database and openraft only purges applied entries,
//!   so after that flush the durable state machine is at least at the purged
//!   index and a restart never needs a purged entry. `last_purged` is recorded
//!   before the entries go; entries a crash left at or below it are removed when
//!   the store is opened.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use std::ops::{Bound, RangeBounds};
use tokio::sync::mpsc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::TypeConfig;
use crate::store::{MetaDb, MetaTypeConfig, StoreError, be_u64, parse_be_u64};

const LOG_TREE: &str = "raft_log";
const STATE_TREE: &str = "raft_state";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// Most encoded bytes `limited_get_log_entries` returns at once (at least one
/// entry is always returned), so one replication RPC stays bounded.
const MAX_READ_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// The raft log and vote of one node, in its sled database. Cloning is cheap;
/// clones share the same trees.
pub struct LogStore<C: MetaTypeConfig = TypeConfig> {
    db: MetaDb,
    logs: sled::Tree,
    state: sled::Tree,
    flusher: Arc<Flusher<C>>,
    _config: PhantomData<fn() -> C>,
}

impl<C: MetaTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            db: self.db.clone(),
            logs: self.logs.clone(),
            state: self.state.clone(),
            flusher: self.flusher.clone(),
            _config: PhantomData,
        }
    }
}

/// Group commit of appends: `append` writes its entries into sled and queues
/// its callback; one task flushes durably and completes every callback queued
/// before that flush started, in order. Under concurrent load one fdatasync
/// covers many appends, and the raft core never waits on the disk.
struct Flusher<C: MetaTypeConfig> {
    tx: std::sync::Mutex<Option<mpsc::UnboundedSender<LogFlushed<C>>>>,
}

impl<C: MetaTypeConfig> Flusher<C> {
    fn new() -> Self {
        Flusher { tx: std::sync::Mutex::new(None) }
    }

    /// Queues a callback, starting the flush task on first use (inside the runtime).
    fn submit(&self, db: &MetaDb, callback: LogFlushed<C>) {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let sender = tx.get_or_insert_with(|| {
            let (t, rx) = mpsc::unbounded_channel();
            tokio::spawn(flush_loop::<C>(db.clone(), rx));
            t
        });
        if let Err(mpsc::error::SendError(cb)) = sender.send(callback) {
            cb.log_io_completed(Err(std::io::Error::other("the log flush task has stopped")));
        }
    }
}

async fn flush_loop<C: MetaTypeConfig>(db: MetaDb, mut rx: mpsc::UnboundedReceiver<LogFlushed<C>>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(cb) = rx.try_recv() {
            batch.push(cb);
        }
        let result = db.flush_durable("flush appended log entries").await;
        for cb in batch {
            cb.log_io_completed(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            });
        }
    }
}

impl<C: MetaTypeConfig> fmt::Debug for LogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // sled's `len()` walks the whole tree; a Debug print must stay cheap.
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    /// Opens the log trees in `db` (creating them when new).
    pub fn new(db: &MetaDb) -> Result<Self, StoreError> {
        Self::for_type_config(db)
    }
}

impl<C: MetaTypeConfig> LogStore<C> {
    /// [`LogStore::new`] for any [`MetaTypeConfig`] (tests use a `u64` node id).
    pub fn for_type_config(db: &MetaDb) -> Result<Self, StoreError> {
        let logs = db.open_tree(LOG_TREE).map_err(StoreError::io("open the raft log tree"))?;
        let state = db.open_tree(STATE_TREE).map_err(StoreError::io("open the raft state tree"))?;
        let store =
            Self { db: db.clone(), logs, state, flusher: Arc::new(Flusher::new()), _config: PhantomData };
        store.remove_purged_leftovers()?;
        Ok(store)
    }

    /// Deletes entries at or below `last_purged` that a crash in the middle of
    /// `purge` left behind, so reads never see them.
    fn remove_purged_leftovers(&self) -> Result<(), StoreError> {
        let Some(purged) = self.read_state::<LogId<C::NodeId>>(KEY_LAST_PURGED, "last purged log id")? else {
            return Ok(());
        };
        let removed = self.remove_range(..=purged.index)?;
        if removed > 0 {
            tracing::info!(removed, upto = purged.index, "removed log entries left by an interrupted purge");
        }
        Ok(())
    }

    fn read_state<T: DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        let Some(bytes) = self.state.get(key).map_err(StoreError::io("read raft state"))? else {
            return Ok(None);
        };
        postcard::from_bytes(&bytes).map(Some).map_err(StoreError::decode(what))
    }

    fn write_state<T: Serialize>(&self, key: &[u8], what: &'static str, value: &T) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(value).map_err(StoreError::encode(what))?;
        self.state.insert(key, bytes).map_err(StoreError::io("write raft state"))?;
        Ok(())
    }

    async fn flush(&self, step: &'static str) -> Result<(), StoreError> {
        self.db.flush_durable(step).await
    }

    /// Deletes the entries whose index is in `range`, in one atomic batch.
    fn remove_range(&self, range: impl RangeBounds<u64>) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        let Some((start, end)) = key_range(&range) else {
            return Ok(0);
        };
        let iter = match end {
            Some(end) => self.logs.range(be_u64(start)..be_u64(end)),
            None => self.logs.range(be_u64(start)..),
        };
        for key in iter.keys() {
            batch.remove(key.map_err(StoreError::io("scan log entries"))?);
            removed += 1;
        }
        self.logs.apply_batch(batch).map_err(StoreError::io("delete log entries"))?;
        Ok(removed)
    }

    /// Reads entries in `range`, stopping early after `max_bytes` of encoded data
    /// (at least one entry is returned when the range holds any).
    fn read_entries(
        &self,
        range: impl RangeBounds<u64>,
        max_bytes: usize,
    ) -> Result<Vec<C::Entry>, StoreError> {
        let Some((start, end)) = key_range(&range) else {
            return Ok(Vec::new());
        };
        let iter = match end {
            Some(end) => self.logs.range(be_u64(start)..be_u64(end)),
            None => self.logs.range(be_u64(start)..),
        };
        let mut entries = Vec::new();
        let mut bytes = 0;
        for item in iter {
            let (key, value) = item.map_err(StoreError::io("read log entries"))?;
            let index = parse_be_u64("log entry key", &key)?;
            let entry: openraft::Entry<C> =
                postcard::from_bytes(&value).map_err(StoreError::decode("log entry"))?;
            if entry.log_id.index != index {
                return Err(StoreError::Corrupt {
                    what: "log entry",
                    detail: format!("stored under index {index} but holds {}", entry.log_id),
                });
            }
            entries.push(entry);
            bytes += value.len();
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(entries)
    }

    fn last_log_id_in_tree(&self) -> Result<Option<LogId<C::NodeId>>, StoreError> {
        let Some((key, value)) = self.logs.last().map_err(StoreError::io("read the last log entry"))? else {
            return Ok(None);
        };
        let index = parse_be_u64("log entry key", &key)?;
        // `Entry` serializes its `log_id` first, so the prefix decodes on its own
        // without decoding a possibly large payload.
        let (log_id, _) = postcard::take_from_bytes::<LogId<C::NodeId>>(&value)
            .map_err(StoreError::decode("log entry id"))?;
        if log_id.index != index {
            return Err(StoreError::Corrupt {
                what: "log entry",
                detail: format!("stored under index {index} but holds {log_id}"),
            });
        }
        Ok(Some(log_id))
    }
}

/// `range` as `[start, end)` over u64 keys (`end` None = unbounded); None when empty.
fn key_range(range: &impl RangeBounds<u64>) -> Option<(u64, Option<u64>)> {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e.checked_add(1),
        Bound::Excluded(e) => Some(*e),
        Bound::Unbounded => None,
    };
    match end {
        Some(end) if start >= end => None,
        _ => Some((start, end)),
    }
}

fn read_logs_err<NID: openraft::NodeId>(e: StoreError) -> StorageError<NID> {
    e.into_raft(ErrorSubject::Logs, ErrorVerb::Read)
}

fn write_logs_err<NID: openraft::NodeId>(e: StoreError) -> StorageError<NID> {
    e.into_raft(ErrorSubject::Logs, ErrorVerb::Write)
}

fn delete_logs_err<NID: openraft::NodeId>(e: StoreError) -> StorageError<NID> {
    e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete)
}

impl<C: MetaTypeConfig> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        self.read_entries(range, usize::MAX).map_err(read_logs_err)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        self.read_entries(start..end, MAX_READ_BATCH_BYTES).map_err(read_logs_err)
    }
}

impl<C: MetaTypeConfig> RaftLogStorage<C> for LogStore<C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<C::NodeId>> {
        let last_purged_log_id = self
            .read_state::<LogId<C::NodeId>>(KEY_LAST_PURGED, "last purged log id")
            .map_err(read_logs_err)?;
        let last_in_tree = self.last_log_id_in_tree().map_err(read_logs_err)?;
        let last_log_id = last_in_tree.or_else(|| last_purged_log_id.clone());
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let result = async {
            self.write_state(KEY_VOTE, "vote", vote)?;
            self.flush("flush the vote").await
        };
        result.await.map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C::NodeId>>, StorageError<C::NodeId>> {
        self.read_state(KEY_VOTE, "vote").map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<C::NodeId>>,
    ) -> Result<(), StorageError<C::NodeId>> {
        // Not flushed here: the committed id only tells a restart how far it may
        // re-apply without the leader; a stale one is caught up by replication.
        // It becomes durable with the next append or vote.
        self.write_state(KEY_COMMITTED, "committed log id", &committed)
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        let committed = self
            .read_state::<Option<LogId<C::NodeId>>>(KEY_COMMITTED, "committed log id")
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Read))?;
        Ok(committed.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = postcard::to_stdvec(&entry)
                .map_err(StoreError::encode("log entry"))
                .map_err(write_logs_err)?;
            batch.insert(&be_u64(entry.log_id.index), bytes);
        }
        self.logs.apply_batch(batch).map_err(StoreError::io("append log entries")).map_err(write_logs_err)?;
        self.flusher.submit(&self.db, callback);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        tracing::debug!(since = %log_id, "truncating raft log");
        self.remove_range(log_id.index..).map_err(delete_logs_err)?;
        self.flush("flush log truncation").await.map_err(delete_logs_err)
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        tracing::debug!(upto = %log_id, "purging raft log");
        let result = async {
            // Makes the state machine (same database) durable at >= log_id first.
            self.flush("flush the state machine before purging").await?;
            self.write_state(KEY_LAST_PURGED, "last purged log id", &log_id)?;
            self.remove_range(..=log_id.index)?;
            self.flush("flush log purge").await
        };
        result.await.map_err(delete_logs_err)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_range_handles_edges() {
        assert_eq!(key_range(&(3..3)), None);
        assert_eq!(key_range(&(5..7)), Some((5, Some(7))));
        assert_eq!(key_range(&(5..=7)), Some((5, Some(8))));
        assert_eq!(key_range(&(..)), Some((0, None)));
        assert_eq!(key_range(&(..=u64::MAX)), Some((0, None)));
        assert_eq!(key_range(&(Bound::Excluded(u64::MAX), Bound::Unbounded)), None);
    }
}
