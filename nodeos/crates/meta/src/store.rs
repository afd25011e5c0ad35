//! Opening the node's sled database, and the storage error every store returns.
//!
//! One sled [`sled::Db`] per node holds both the raft log ([`crate::LogStore`]) and
//! the state machine ([`crate::StateMachineStore`]), each in its own trees. sled
//! buffers writes in memory and makes them durable only on `flush`; who flushes
//! when is the contract of each store (see their module docs). sled keeps
//! `apply_batch` atomic across a crash, which both stores rely on.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::{ErrorSubject, ErrorVerb, RaftTypeConfig, StorageError, StorageIOError};

use crate::command::{Command, Response};

/// Page cache of the sled database. sled keeps roughly this much of the hot data
/// in memory (its RSS grows past it under write load; see DEPENDENCIES.md).
pub const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// The openraft type configurations the stores work with.
///
/// The pool runs [`crate::TypeConfig`]; the trait exists so that openraft's storage
/// conformance suite, which needs `NodeId: From<u64>`, can run the same stores
/// under a test configuration whose node id is a plain `u64`.
pub trait MetaTypeConfig:
    RaftTypeConfig<D = Command, R = Response, Entry = openraft::Entry<Self>, SnapshotData = Cursor<Vec<u8>>>
{
}

impl<C> MetaTypeConfig for C where
    C: RaftTypeConfig<D = Command, R = Response, Entry = openraft::Entry<C>, SnapshotData = Cursor<Vec<u8>>>
{
}

/// Why a metadata store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database directory could not be opened: missing permissions, held by
    /// another process, or corrupt.
    #[error("cannot open the metadata database at {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    /// The database was written before (its marker file says so) but sled
    /// opened it empty, as it does when its log file is overwritten with garbage.
    /// Starting would forget this node's vote and log, which raft cannot survive.
    #[error(
        "metadata database at {} was written before but opened empty; refusing to start with a blank raft state",
        path.display()
    )]
    Emptied { path: PathBuf },
    /// The marker file that records the database was created could not be written.
    #[error("cannot write the database marker file {}", path.display())]
    Marker {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// sled refused a read, write or flush.
    #[error("metadata database failed to {step}")]
    Io {
        step: &'static str,
        #[source]
        source: sled::Error,
    },
    /// A snapshot file could not be read, written or synced.
    #[error("snapshot file {} failed to {step}", path.display())]
    SnapshotFile {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A value could not be encoded for storage.
    #[error("cannot encode {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    /// Stored bytes do not decode: the data is corrupt or from an unknown version.
    #[error("cannot decode stored {what}")]
    Decode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    /// Stored data decoded but breaks an invariant (bad key layout, checksum
    /// mismatch, unsupported format version).
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// A blocking task doing file I/O did not finish (runtime shutting down).
    #[error("background task for {step} did not complete")]
    Task {
        step: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl StoreError {
    pub(crate) fn io(step: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
        move |source| StoreError::Io { step, source }
    }

    pub(crate) fn decode(what: &'static str) -> impl FnOnce(postcard::Error) -> StoreError {
        move |source| StoreError::Decode { what, source }
    }

    pub(crate) fn encode(what: &'static str) -> impl FnOnce(postcard::Error) -> StoreError {
        move |source| StoreError::Encode { what, source }
    }

    /// Converts into openraft's storage error. openraft shuts the raft node down
    /// on any storage error, which is what a failing disk deserves.
    pub fn into_raft<NID: openraft::NodeId>(
        self,
        subject: ErrorSubject<NID>,
        verb: ErrorVerb,
    ) -> StorageError<NID> {
        StorageIOError::new(subject, verb, &self).into()
    }
}

/// Marker file, next to sled's own files, written once the database holds its
/// creation key; see [`StoreError::Emptied`].
const MARKER_FILE: &str = "nodeos-meta.created";
const MARKER_TREE: &str = "nodeos_meta";
const MARKER_KEY: &[u8] = b"created";

/// Opens (creating if needed) the sled database in `dir`.
///
/// A directory that is corrupt, locked by another process or unreadable gives
/// [`StoreError::Open`] naming it. sled may panic on some malformed files instead
/// of returning an error; that panic is caught and reported the same way. sled
/// opens a database whose log file was overwritten as an *empty* database; a
/// marker file outside sled catches that ([`StoreError::Emptied`]).
pub fn open_db(dir: &Path) -> Result<MetaDb, StoreError> {
    let config = sled::Config::new().path(dir).cache_capacity(CACHE_BYTES).mode(sled::Mode::LowSpace);
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
    let result = match opened {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic while opening".to_owned());
            tracing::error!(path = %dir.display(), panic = %what, "sled panicked while opening");
            Err(sled::Error::ReportableBug(format!("panicked while opening: {what}")))
        }
    };
    let db = result.map_err(|source| StoreError::Open { path: dir.to_owned(), source })?;
    check_marker(&db, dir)?;
    let data = dir.join(SLED_DATA_FILE);
    let data_file = std::fs::File::open(&data).map_err(|source| StoreError::SnapshotFile {
        step: "open for syncing",
        path: data.clone(),
        source,
    })?;
    tracing::info!(path = %dir.display(), recovered = db.was_recovered(), "metadata database opened");
    Ok(MetaDb { db, data_file: Arc::new(data_file) })
}

/// sled 0.34 keeps its whole log in this one file of its directory.
const SLED_DATA_FILE: &str = "db";

/// The node's sled database plus a handle on its data file.
///
/// sled's `flush` on Linux ends in `sync_file_range`, which neither flushes the
/// disk's write cache nor the file's metadata (a grown file's size), so it is
/// not durability. [`MetaDb::flush_durable`] follows it with `fdatasync` on the
/// same file; every store flushes through it.
#[derive(Clone, Debug)]
pub struct MetaDb {
    db: sled::Db,
    data_file: Arc<std::fs::File>,
}

impl std::ops::Deref for MetaDb {
    type Target = sled::Db;
    fn deref(&self) -> &sled::Db {
        &self.db
    }
}

impl MetaDb {
    /// Writes out everything sled buffered and makes it durable on the disk.
    pub async fn flush_durable(&self, step: &'static str) -> Result<(), StoreError> {
        self.db.flush_async().await.map_err(StoreError::io(step))?;
        let file = self.data_file.clone();
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|source| StoreError::Task { step, source })?
            .map_err(|source| StoreError::SnapshotFile { step, path: SLED_DATA_FILE.into(), source })
    }
}

/// Fails if `dir` held a database before but sled opened it without its
/// creation key; otherwise makes sure both the key and the marker file exist.
fn check_marker(db: &sled::Db, dir: &Path) -> Result<(), StoreError> {
    let marker = dir.join(MARKER_FILE);
    let tree = db.open_tree(MARKER_TREE).map_err(StoreError::io("open the marker tree"))?;
    let created = tree.get(MARKER_KEY).map_err(StoreError::io("read the creation key"))?.is_some();
    let marked = marker.try_exists().map_err(|source| StoreError::Marker { path: marker.clone(), source })?;
    if !created {
        if marked {
            return Err(StoreError::Emptied { path: dir.to_owned() });
        }
        tree.insert(MARKER_KEY, &b"1"[..]).map_err(StoreError::io("write the creation key"))?;
        db.flush().map_err(StoreError::io("flush the creation key"))?;
    }
    if !marked {
        // The key is durable first, so a crash between the two steps only means
        // the marker is written on the next open.
        let write = || -> std::io::Result<()> {
            std::fs::File::create(&marker)?.sync_all()?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|source| StoreError::Marker { path: marker.clone(), source })?;
    }
    Ok(())
}

/// Big-endian bytes of `v`, so sled's byte order is numeric order.
pub(crate) fn be_u64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// Parses a big-endian u64 key written by [`be_u64`].
pub(crate) fn parse_be_u64(what: &'static str, bytes: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        what,
        detail: format!("key is {} bytes, expected 8", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn open_reports_the_path_when_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _db = open_db(dir.path()).unwrap();
        // sled holds an exclusive file lock; a second open in the same process fails.
        let err = open_db(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    /// Writes a key, then overwrites the sled files `pick` selects with garbage.
    fn corrupt(pick: impl Fn(&str) -> bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open_db(dir.path()).unwrap();
            db.insert(b"k", b"v".to_vec()).unwrap();
            db.flush().unwrap();
        }
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if path.is_file() && name != MARKER_FILE && pick(&name) {
                std::fs::write(&path, vec![0xA5; 4096]).unwrap();
            }
        }
        dir
    }

    #[test]
    fn open_reports_a_corrupt_config_with_the_path() {
        let dir = corrupt(|name| name == "conf");
        match open_db(dir.path()) {
            Err(StoreError::Open { path, .. }) => assert_eq!(path, dir.path()),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn open_refuses_a_log_that_sled_would_silently_empty() {
        // sled opens a garbage `db` file as an empty database; the marker catches it.
        let dir = corrupt(|name| name != "conf");
        match open_db(dir.path()) {
            Err(StoreError::Emptied { path }) => assert_eq!(path, dir.path()),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn reopen_keeps_the_marker_happy() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_db(dir.path()).unwrap());
        assert!(dir.path().join(MARKER_FILE).exists());
        drop(open_db(dir.path()).unwrap());
    }

    #[test]
    fn be_keys_sort_numerically() {
        assert!(be_u64(2) < be_u64(256));
        assert_eq!(parse_be_u64("k", &be_u64(77)).unwrap(), 77);
        assert!(parse_be_u64("k", b"abc").is_err());
    }
}
