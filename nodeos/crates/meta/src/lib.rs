//! The pool metadata store: a raft-replicated, revisioned key space.
//!
//! # Layout
//! - `command.rs`: what the state machine applies ([`Command`], [`Txn`]) and answers.
//! - `store.rs`: opening the sled database in a node's data dir.
//! - `log_store.rs`: [`LogStore`], openraft's `RaftLogStorage` over sled.
//! - `state_machine.rs`: [`StateMachineStore`], the revisioned key space, snapshots
//!   and the watch feed.
//! - `lease.rs`: node leases, renewed through the log ([`LeaseBook`], [`Liveness`]).
//! - `watch.rs`: the watch stream (history replay, then live events) and [`WatchError`].
//! - `network.rs`: openraft's network over the `PeerService` gRPC API.
//! - `handle.rs`: [`MetaHandle`], what the rest of the node uses: writes, linearizable
//!   reads, watches, membership changes; [`handle::Forwarder`], how a follower
//!   reaches the leader.
//! - `testing.rs` (feature `testing`): in-process pools for tests, real raft and
//!   sled over an in-memory network with fault knobs.
//!
//! # Durability
//! The log store flushes sled before it reports any vote or log write complete;
//! the state machine lives in the same sled database and is flushed before any
//! log is purged, so a restart never needs a purged entry to catch up.

pub mod command;
pub mod handle;
pub mod lease;
pub mod log_store;
pub mod network;
pub mod peer;
pub mod state_machine;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod watch;

pub use command::{Command, Compare, Event, EventKind, KeyValue, Op, Response, Txn};
pub use handle::{Consistency, Forwarder, MetaConfig, MetaError, MetaHandle};
pub use lease::{LeaseBook, LeasePolicy, Liveness};
pub use log_store::LogStore;
pub use openraft::{self, BasicNode};
pub use state_machine::StateMachineStore;
pub use store::{MetaDb, StoreError, open_db};
pub use watch::WatchError;

use std::io::Cursor;

openraft::declare_raft_types!(
    /// openraft configuration of the pool metadata store.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = nodeos_types::NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// Raft instance of the metadata store.
pub type Raft = openraft::Raft<TypeConfig>;
