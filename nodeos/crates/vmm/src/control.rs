//! The control protocol between the node and a worker.
//!
//! A connected Unix SOCK_SEQPACKET socket (handed to the worker as a file
//! descriptor named by `--control-fd`), one message per packet: a JSON
//! [`ToWorker`] or [`FromWorker`]. The first message the node sends is
//! [`ToWorker::Start`], with the VM's file descriptors (NIC sockets) attached as
//! SCM_RIGHTS in the order `NicConfig::fd_index` names. The worker answers
//! every request with exactly one [`FromWorker::Ack`] or [`FromWorker::Failed`]
//! carrying the request's `seq`, and sends [`FromWorker::Event`]s on its own.
//!
//! Live migration: the source's node sends [`ToWorker::MigrateOut`] with the
//! TCP stream to the destination attached (connected, timeouts set); the
//! worker reports [`WorkerEvent::MigrationProgress`], then
//! [`WorkerEvent::MigrationSent`] (VM frozen, the destination holds it) or
//! [`WorkerEvent::MigrationFailed`] (VM running as before). The node then
//! sends [`ToWorker::MigrationCommitted`] (the worker ends, reason
//! [`StopReason::Migrated`]) or [`ToWorker::MigrationAbort`] (the VM runs
//! again; also cancels a migration still in pre-copy). The destination's
//! worker gets [`ToWorker::Start`] with `incoming` set and the accepted
//! stream as the last descriptor; it builds the VM without booting it,
//! receives it, reports [`WorkerEvent::MigrationReceived`], and runs it on
//! [`ToWorker::Resume`].

use serde::{Deserialize, Serialize};

use crate::config::WorkerConfig;

/// Largest control message, bytes.
/// Below the default socket send buffer (208 KiB), which bounds one
/// SOCK_SEQPACKET message; a volume layout of ~1000 extents fits.
pub const MAX_MESSAGE: usize = 192 * 1024;
/// Protocol version; the node refuses a worker of another version.
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    Start {
        seq: u64,
        version: u32,
        config: Box<WorkerConfig>,
        /// An incoming live migration: build the VM empty and receive it
        /// over the last descriptor attached.
        #[serde(default)]
        incoming: Option<MigrationKey>,
    },
    /// Migrate the VM out over the attached TCP stream.
    MigrateOut {
        seq: u64,
        params: MigrateOut,
    },
    /// The hand-over is committed: end without resuming.
    MigrationCommitted {
        seq: u64,
    },
    /// No hand-over: cancel the migration, or resume a frozen VM.
    MigrationAbort {
        seq: u64,
    },
    Pause {
        seq: u64,
    },
    Resume {
        seq: u64,
    },
    /// Ask the guest to shut down (Ctrl-Alt-Del on its keyboard controller).
    RequestShutdown {
        seq: u64,
    },
    /// Stop vCPUs and exit now.
    Kill {
        seq: u64,
    },
    ConsoleInput {
        seq: u64,
        bytes: Vec<u8>,
    },
    /// A volume disk's layout changed in the pool (a copy rebuilt elsewhere,
    /// growth, a snapshot); `own` when its generation was handed to this VM.
    VolumeLayout {
        seq: u64,
        layout: nodeos_block::client::VolumeLayout,
        own: bool,
    },
}

/// The pool key's derived bytes, authenticating the migration stream.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationKey(pub [u8; 32]);

impl std::fmt::Debug for MigrationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationKey(..)")
    }
}

/// How a worker migrates its VM out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOut {
    pub key: MigrationKey,
    pub budget: crate::migration::Budget,
    /// Stream rate cap, bytes per second.
    pub bandwidth: Option<u64>,
}

impl ToWorker {
    pub fn seq(&self) -> u64 {
        match self {
            ToWorker::Start { seq, .. }
            | ToWorker::MigrateOut { seq, .. }
            | ToWorker::MigrationCommitted { seq }
            | ToWorker::MigrationAbort { seq }
            | ToWorker::Pause { seq }
            | ToWorker::Resume { seq }
            | ToWorker::RequestShutdown { seq }
            | ToWorker::Kill { seq }
            | ToWorker::ConsoleInput { seq, .. }
            | ToWorker::VolumeLayout { seq, .. } => *seq,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    Ack { seq: u64 },
    Failed { seq: u64, error: String },
    Event(WorkerEvent),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerEvent {
    /// vCPUs run; `rss_kib` is the worker's resident size before the guest touched memory.
    Running {
        rss_kib: u64,
    },
    Paused,
    /// A pre-copy pass ended.
    MigrationProgress(crate::migration::Progress),
    /// The destination holds the VM; this one is frozen until committed or aborted.
    MigrationSent(crate::migration::Summary),
    /// The migration ended without a hand-over; the VM runs here as before.
    MigrationFailed {
        error: String,
    },
    /// (Destination) the VM is here, restored, and waits for Resume.
    MigrationReceived,
    /// The guest powered off, reset, or the VM was killed; the worker exits next.
    Stopped {
        reason: StopReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    GuestShutdown,
    GuestReset,
    Killed,
    /// A vCPU hit something it cannot continue from (triple fault, entry failure).
    GuestCrash,
    /// The VM moved to another node (a committed live migration).
    Migrated,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control message of {0} bytes exceeds {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("control message does not decode")]
    Decode(#[source] serde_json::Error),
    #[error("control message does not encode")]
    Encode(#[source] serde_json::Error),
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ControlError> {
    let v = serde_json::to_vec(msg).map_err(ControlError::Encode)?;
    if v.len() > MAX_MESSAGE {
        return Err(ControlError::TooLarge(v.len()));
    }
    Ok(v)
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ControlError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(ControlError::TooLarge(bytes.len()));
    }
    serde_json::from_slice(bytes).map_err(ControlError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let m = FromWorker::Event(WorkerEvent::Stopped { reason: StopReason::GuestShutdown });
        assert_eq!(decode::<FromWorker>(&encode(&m).unwrap()).unwrap(), m);
        assert!(decode::<ToWorker>(b"{nope").is_err());
        assert!(decode::<ToWorker>(&vec![b' '; MAX_MESSAGE + 1]).is_err());
        assert_eq!(ToWorker::Kill { seq: 9 }.seq(), 9);
    }
}
