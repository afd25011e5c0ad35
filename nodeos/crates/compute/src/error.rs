//! [`ComputeError`]: what can go wrong supervising this node's VMs.

use nodeos_meta::MetaError;
use nodeos_network::networks::NetworkError;
use nodeos_switch::switch::SwitchError;
use nodeos_types::NodeId;
use nodeos_volumes::VolumeError;

use crate::images::ImageError;
use crate::process::ProcessError;
use crate::seed::SeedError;
use crate::spec::SpecError;
use crate::tap::TapError;

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("no VM {0:?} in this pool")]
    NotFound(String),
    #[error("live migration: {0}")]
    Migration(String),
    /// A high-availability setting that cannot be (in the command line's words).
    #[error("{0}")]
    Ha(String),
    /// A rolling upgrade refused, or a node's part of it failed, and why.
    #[error("upgrade: {0}")]
    Upgrade(String),
    /// A node removal refused or not finished, and why.
    #[error("{0}")]
    Removal(String),
    #[error("VM {vm} is {state}; cannot {op} it")]
    State { vm: String, state: &'static str, op: &'static str },
    #[error("a VM named {0:?} already exists")]
    NameTaken(String),
    #[error("VM {vm} lives on node {node}")]
    Elsewhere { vm: String, node: NodeId },
    #[error("metadata store")]
    Meta(#[source] Box<MetaError>),
    #[error("VM worker")]
    Worker(#[from] ProcessError),
    #[error("network tap")]
    Tap(#[from] TapError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("stored VM record {0} does not decode")]
    Record(String),
    #[error("volume disk")]
    Volume(#[source] Box<VolumeError>),
    #[error("network port")]
    Network(#[source] Box<NetworkError>),
    #[error("nics[{0}]: a NIC plugs into a network or a tap, once")]
    NicNetwork(usize),
    #[error("cannot plug a NIC into the switch")]
    Switch(#[source] SwitchError),
    #[error("cloud-init seed disk")]
    Seed(#[from] SeedError),
    /// A pool image a VM boots from: `what` says which ("kernel image k").
    #[error("{what}")]
    Image {
        what: String,
        #[source]
        source: Box<ImageError>,
    },
}

impl From<NetworkError> for ComputeError {
    fn from(e: NetworkError) -> Self {
        ComputeError::Network(Box::new(e))
    }
}

impl From<VolumeError> for ComputeError {
    fn from(e: VolumeError) -> Self {
        ComputeError::Volume(Box::new(e))
    }
}

impl From<MetaError> for ComputeError {
    fn from(e: MetaError) -> Self {
        ComputeError::Meta(Box::new(e))
    }
}

/// `what` failed with an I/O error.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ComputeError {
    let what = what.into();
    move |source| ComputeError::Io { what, source }
}
