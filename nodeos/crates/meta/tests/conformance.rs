//! openraft's storage conformance suite against [`LogStore`] + [`StateMachineStore`].
//!
//! The suite builds node ids from `u64`, which `nodeos_types::NodeId` deliberately
//! does not implement (zero is not a valid node id), so it runs the same stores
//! under a test type configuration whose node id is a plain `u64`.

#![allow(clippy::unwrap_used)]

use std::io::Cursor;

use nodeos_meta::store::{StoreError, open_db};
use nodeos_meta::{Command, LogStore, Response, StateMachineStore};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{ErrorSubject, ErrorVerb, StorageError, StorageIOError};
use tempfile::TempDir;

openraft::declare_raft_types!(
    pub TestConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TestConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

struct SledBuilder;

impl StoreBuilder<TestConfig, LogStore<TestConfig>, StateMachineStore<TestConfig>, TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore<TestConfig>, StateMachineStore<TestConfig>), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let to_raft = |e: StoreError| e.into_raft(ErrorSubject::Store, ErrorVerb::Write);
        let db = open_db(&dir.path().join("sled")).map_err(to_raft)?;
        let log = LogStore::for_type_config(&db).map_err(to_raft)?;
        let sm = StateMachineStore::for_type_config(&db, &dir.path().join("snapshots")).map_err(to_raft)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    // The suite makes its own tokio runtime per case, so this is a plain #[test].
    Suite::test_all(SledBuilder).expect("storage conformance suite");
}
