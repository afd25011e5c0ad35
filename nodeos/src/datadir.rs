//! A node's data dir: who the node is and which pool its state belongs to.
//!
//! Layout: `node.json` (identity), `lock` (held while a daemon runs),
//! `meta/` (raft log, state machine, snapshots). The identity file is written
//! once, atomically; a data dir of another pool or an unknown format is refused
//! and left untouched.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nodeos_types::{NodeId, unix_millis};
use serde::{Deserialize, Serialize};

const IDENTITY: &str = "node.json";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot create data dir {0}")]
    Create(String, #[source] std::io::Error),
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(String, #[source] std::io::Error),
    #[error("{path} is not a nodeos identity file")]
    Foreign {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has format {found}; this nodeos reads format {FORMAT}")]
    Format { path: String, found: u32 },
    #[error("data dir {dir} belongs to pool {found:?}, not {wanted:?}; refusing to touch it")]
    OtherPool { dir: String, found: String, wanted: String },
    #[error("data dir {0} is in use by another running nodeos")]
    Locked(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Identity {
    format: u32,
    node_id: NodeId,
    pool: String,
    created_at_ms: u64,
}

/// An opened data dir; the lock is held until this drops.
#[derive(Debug)]
pub struct DataDir {
    pub path: PathBuf,
    pub node_id: NodeId,
    _lock: Flock<File>,
}

impl DataDir {
    /// Opens (creating on first boot) the data dir of a node of `pool`.
    pub fn open(path: &Path, pool: &str) -> Result<Self, DataDirError> {
        let shown = path.display().to_string();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| DataDirError::Create(shown.clone(), e))?;
        let lock_path = path.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| DataDirError::Write(lock_path.display().to_string(), e))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| DataDirError::Locked(shown.clone()))?;
        let id_path = path.join(IDENTITY);
        let id_shown = id_path.display().to_string();
        let identity = match fs::read(&id_path) {
            Ok(bytes) => {
                let id: Identity = serde_json::from_slice(&bytes)
                    .map_err(|source| DataDirError::Foreign { path: id_shown.clone(), source })?;
                if id.format != FORMAT {
                    return Err(DataDirError::Format { path: id_shown, found: id.format });
                }
                if id.pool != pool {
                    return Err(DataDirError::OtherPool {
                        dir: shown,
                        found: id.pool,
                        wanted: pool.to_owned(),
                    });
                }
                id
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity {
                    format: FORMAT,
                    node_id: NodeId::random(),
                    pool: pool.to_owned(),
                    created_at_ms: unix_millis(),
                };
                write_atomic(
                    &id_path,
                    &serde_json::to_vec_pretty(&id)
                        .map_err(|source| DataDirError::Foreign { path: id_shown.clone(), source })?,
                )
                .map_err(|e| DataDirError::Write(id_shown, e))?;
                id
            }
            Err(e) => return Err(DataDirError::Read(id_shown, e)),
        };
        Ok(DataDir { path: path.to_owned(), node_id: identity.node_id, _lock: lock })
    }

    pub fn meta_dir(&self) -> PathBuf {
        self.path.join("meta")
    }
}

/// Writes a file so that a crash leaves either the old or the new content.
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_and_other_pools_are_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let id = {
            let dd = DataDir::open(d.path(), "lab").expect("opens");
            dd.node_id
        };
        let again = DataDir::open(d.path(), "lab").expect("reopens");
        assert_eq!(again.node_id, id);
        drop(again);
        let e = DataDir::open(d.path(), "prod").expect_err("other pool");
        assert!(e.to_string().contains("belongs to pool \"lab\""), "{e}");
    }

    #[test]
    fn a_running_daemon_locks_its_data_dir() {
        let d = tempfile::tempdir().expect("tempdir");
        let _held = DataDir::open(d.path(), "lab").expect("opens");
        assert!(matches!(DataDir::open(d.path(), "lab"), Err(DataDirError::Locked(_))));
    }

    #[test]
    fn garbage_identity_is_refused_and_left_alone() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join(IDENTITY), b"not json").expect("write");
        assert!(matches!(DataDir::open(d.path(), "lab"), Err(DataDirError::Foreign { .. })));
        assert_eq!(std::fs::read(d.path().join(IDENTITY)).expect("read"), b"not json");
    }
}
