//! Typed records of the pool metadata key space.
//!
//! Keys are UTF-8 paths; each prefix holds one record type, encoded as JSON so
//! that `nodeos pool watch` and stock tools can read them:
//!
//! | prefix | record |
//! |---|---|
//! | `pool` | [`PoolRecord`] (one key) |
//! | `nodes/<node id>` | [`NodeRecord`] |
//! | `custom/<anything>` | operator bytes, never interpreted |

use serde::{Deserialize, Serialize};

use crate::{NodeId, PoolId};

/// Key of the single [`PoolRecord`].
pub const POOL_KEY: &str = "pool";
/// Prefix of [`NodeRecord`] keys.
pub const NODES_PREFIX: &str = "nodes/";
/// Prefix of the operator's own key space.
pub const CUSTOM_PREFIX: &str = "custom/";

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
