//! The control protocol between the node and a worker.
//!
//! A connected Unix SOCK_SEQPACKET socket (handed to the worker as a file
//! descriptor named by `--control-fd`), one message per packet: a JSON
//! [`ToWorker`] or [`FromWorker`]. The first message the node sends is
//! [`ToWorker::Start`], with the VM's file descriptors (NIC sockets) attached as
//! SCM_RIGHTS in the order `NicConfig::fd_index` names. The worker answers
//! every request with exactly one [`FromWorker::Ack`] or [`FromWorker::Failed`]
//! carrying the request's `seq`, and sends [`FromWorker::Event`]s on its own.

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
        config: WorkerConfig,
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

impl ToWorker {
    pub fn seq(&self) -> u64 {
        match self {
            ToWorker::Start { seq, .. }
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
