//! Typed records of the pool metadata key space.
//!
//! Keys are UTF-8 paths; each prefix holds one record type, encoded as JSON so
//! that `nodeos pool watch` and stock tools can read them:
//!
//! | prefix | record |
//! |---|---|
//! | `pool` | [`PoolRecord`] (one key) |
//! | `nodes/<node id>` | [`NodeRecord`] |
//! | `vms/<vm id>` | [`VmRecord`] |
//! | `vm-names/<name>` | the VM id holding that name (names are unique in a pool) |
//! | `custom/<anything>` | operator bytes, never interpreted |

use serde::{Deserialize, Serialize};

use crate::{NodeId, PoolId, VmId};

/// Key of the single [`PoolRecord`].
pub const POOL_KEY: &str = "pool";
/// Prefix of [`NodeRecord`] keys.
pub const NODES_PREFIX: &str = "nodes/";
/// Prefix of the operator's own key space.
pub const CUSTOM_PREFIX: &str = "custom/";

/// Prefix of [`VmRecord`] keys.
pub const VMS_PREFIX: &str = "vms/";
/// Prefix of the VM name index.
pub const VM_NAMES_PREFIX: &str = "vm-names/";

pub fn vm_key(id: VmId) -> String {
    format!("{VMS_PREFIX}{id}")
}

pub fn vm_name_key(name: &str) -> String {
    format!("{VM_NAMES_PREFIX}{name}")
}

/// Key of a node's record.
pub fn node_key(id: NodeId) -> String {
    format!("{NODES_PREFIX}{id}")
}

/// The pool itself, written by the first leader right after initialising raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub id: PoolId,
    pub name: String,
    pub created_at_ms: u64,
    /// The node that initialised the pool.
    pub founder: NodeId,
}

/// A node known to the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// Address its gRPC server is reached at (host:port).
    pub address: String,
    pub hostname: String,
    /// nodeos version string of the binary it last started with.
    pub version: String,
    /// Hash of the node image, empty outside a node image.
    #[serde(default)]
    pub image_hash: String,
    pub joined_at_ms: u64,
}

/// What a VM is made of. Paths are on the node that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: String,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Host tap device the node attaches the NIC to.
    pub tap: String,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Stopped,
    Starting,
    Running,
    Paused,
    Stopping,
    /// The worker died without being asked to (signal, exit code, guest crash).
    Crashed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
        }
    }
}

/// A VM of the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: VmId,
    pub name: String,
    pub spec: VmSpec,
    /// The node it lives on.
    pub node: NodeId,
    pub state: VmState,
    /// Why it is in that state (exit status of a crashed worker, ...).
    #[serde(default)]
    pub reason: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_record_json_round_trip() {
        let r = NodeRecord {
            id: NodeId(7),
            address: "127.0.0.1:7700".into(),
            hostname: "h".into(),
            version: "0.1.0".into(),
            image_hash: String::new(),
            joined_at_ms: 1,
        };
        let j = serde_json::to_vec(&r).expect("serializable");
        assert_eq!(serde_json::from_slice::<NodeRecord>(&j).expect("parses"), r);
        assert_eq!(node_key(NodeId(7)), "nodes/0000000000000007");
    }
}
