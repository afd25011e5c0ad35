//! Wire format of the internal `PeerService` (see `proto/nodeos/v1/peer.proto`).
//!
//! Every call and every answer is an [`Envelope`]: a postcard payload plus the
//! sender id, a timestamp and a keyed MAC over all of them and the method name.
//! A receiver refuses an envelope whose MAC does not verify with its own pool
//! key (another pool, or a forged message) or whose timestamp is further than
//! [`MAX_CLOCK_SKEW_MS`] from its clock.
//!
//! Version 1 payloads, by method:
//!
//! | method | request | response |
//! |---|---|---|
//! | `append` | `AppendEntriesRequest` | `Result<AppendEntriesResponse, RaftError>` |
//! | `vote` | `VoteRequest` | `Result<VoteResponse, RaftError>` |
//! | `snapshot` | `InstallSnapshotRequest` | `Result<InstallSnapshotResponse, RaftError<InstallSnapshotError>>` |
//! | `hello` | [`Hello`] | [`HelloReply`] |
//! | `join` | [`JoinRequest`] | `Result<JoinReply, String>` |
//! | `forward` | [`Forwarded`] | `Result<ForwardedReply, ForwardError>` |

use nodeos_proto::v1::Envelope;
use nodeos_types::auth::PoolKey;
use nodeos_types::{NodeId, PoolId, unix_millis};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Command, Response};

/// Payload format version this build speaks.
pub const WIRE_VERSION: u32 = 1;
/// Largest clock difference accepted between sender and receiver.
pub const MAX_CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;

/// Method names, bound into every MAC so an envelope cannot be replayed to another method.
pub mod method {
    pub const APPEND: &str = "append";
    pub const VOTE: &str = "vote";
    pub const SNAPSHOT: &str = "snapshot";
    pub const HELLO: &str = "hello";
    pub const JOIN: &str = "join";
    pub const FORWARD: &str = "forward";
    pub const MIGRATION: &str = "migration";
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error(
        "envelope from node {sender} does not verify with this pool key (another pool, or a wrong --pool-key-file)"
    )]
    BadMac { sender: NodeId },
    #[error("envelope from node {sender} speaks wire version {version}; this node speaks {WIRE_VERSION}")]
    Version { sender: NodeId, version: u32 },
    #[error(
        "envelope from node {sender} is {skew_ms} ms away from this node's clock (limit {MAX_CLOCK_SKEW_MS} ms)"
    )]
    Stale { sender: NodeId, skew_ms: u64 },
    #[error("payload of a {method} envelope does not decode")]
    Decode {
        method: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("payload of a {method} envelope does not encode")]
    Encode {
        method: &'static str,
        #[source]
        source: postcard::Error,
    },
}

fn mac_fields<'a>(
    method: &'a str,
    version: &'a [u8; 4],
    sender: &'a [u8; 8],
    ts: &'a [u8; 8],
    payload: &'a [u8],
) -> [&'a [u8]; 5] {
    [method.as_bytes(), version, sender, ts, payload]
}

/// Encodes and authenticates a message.
pub fn seal<T: Serialize>(
    key: &PoolKey,
    sender: NodeId,
    method: &'static str,
    msg: &T,
) -> Result<Envelope, EnvelopeError> {
    let payload = postcard::to_stdvec(msg).map_err(|source| EnvelopeError::Encode { method, source })?;
    let timestamp_ms = unix_millis();
    let v = WIRE_VERSION.to_le_bytes();
    let s = sender.0.to_le_bytes();
    let t = timestamp_ms.to_le_bytes();
    let mac = key.mac(&mac_fields(method, &v, &s, &t, &payload));
    Ok(Envelope { version: WIRE_VERSION, sender: sender.0, timestamp_ms, payload, mac: mac.to_vec() })
}

/// Verifies and decodes a message; returns the sender and the message.
pub fn open<T: DeserializeOwned>(
    key: &PoolKey,
    method: &'static str,
    env: &Envelope,
) -> Result<(NodeId, T), EnvelopeError> {
    let sender = NodeId(env.sender);
    let v = env.version.to_le_bytes();
    let s = env.sender.to_le_bytes();
    let t = env.timestamp_ms.to_le_bytes();
    if !key.verify(&mac_fields(method, &v, &s, &t, &env.payload), &env.mac) {
        return Err(EnvelopeError::BadMac { sender });
    }
    if env.version != WIRE_VERSION {
        return Err(EnvelopeError::Version { sender, version: env.version });
    }
    let skew_ms = unix_millis().abs_diff(env.timestamp_ms);
    if skew_ms > MAX_CLOCK_SKEW_MS {
        return Err(EnvelopeError::Stale { sender, skew_ms });
    }
    let msg =
        postcard::from_bytes(&env.payload).map_err(|source| EnvelopeError::Decode { method, source })?;
    Ok((sender, msg))
}

/// Discovery probe: sent to seeds and to nodes heard by beacon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub pool_name: String,
    pub node: PeerInfo,
}

/// What a node tells about itself and what it knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub pool_name: String,
    pub node: PeerInfo,
    /// Set once the node is part of an initialised raft group.
    pub member: bool,
    /// Set once the pool record has been applied on this node.
    pub pool_id: Option<PoolId>,
    pub leader: Option<NodeId>,
    /// Other nodes this node has heard of, pooled or not, so that discovery spreads.
    pub known: Vec<PeerInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: NodeId,
    /// Address of its gRPC server.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub pool_name: String,
    pub node: PeerInfo,
    pub hostname: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinReply {
    pub pool_id: Option<PoolId>,
    pub leader: NodeId,
}

/// A request a follower hands to the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Forwarded {
    Write(Command),
    /// Ask for a read index: the log index a linearizable read must wait for.
    ReadIndex,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardedReply {
    Write(Response),
    ReadIndex(u64),
}

/// Why the leader could not serve a forwarded request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    #[error("node {0} is no longer the leader")]
    NotLeader(NodeId),
    #[error("{0}")]
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> PoolKey {
        PoolKey::from_secret(s.as_bytes()).expect("valid key")
    }

    #[test]
    fn sealed_envelope_opens_with_the_same_key_and_method() {
        let k = key("0123456789abcdef-pool-a");
        let env = seal(&k, NodeId(5), method::HELLO, &Forwarded::ReadIndex).expect("seals");
        let (sender, msg): (NodeId, Forwarded) = open(&k, method::HELLO, &env).expect("opens");
        assert_eq!(sender, NodeId(5));
        assert_eq!(msg, Forwarded::ReadIndex);
    }

    #[test]
    fn wrong_key_method_tamper_or_version_is_refused() {
        let k = key("0123456789abcdef-pool-a");
        let env = seal(&k, NodeId(5), method::HELLO, &Forwarded::ReadIndex).expect("seals");
        let other = key("0123456789abcdef-pool-b");
        assert!(matches!(open::<Forwarded>(&other, method::HELLO, &env), Err(EnvelopeError::BadMac { .. })));
        assert!(matches!(open::<Forwarded>(&k, method::JOIN, &env), Err(EnvelopeError::BadMac { .. })));
        let mut t = env.clone();
        t.sender = 6;
        assert!(matches!(open::<Forwarded>(&k, method::HELLO, &t), Err(EnvelopeError::BadMac { .. })));
        let mut t = env.clone();
        t.payload.push(0);
        assert!(open::<Forwarded>(&k, method::HELLO, &t).is_err());
        let mut t = env;
        t.timestamp_ms -= MAX_CLOCK_SKEW_MS + 1000;
        assert!(open::<Forwarded>(&k, method::HELLO, &t).is_err());
    }

    #[test]
    fn garbage_payload_with_valid_mac_is_a_decode_error() {
        let k = key("0123456789abcdef-pool-a");
        let env = seal(&k, NodeId(5), method::FORWARD, &vec![0xffu8; 40]).expect("seals");
        assert!(matches!(open::<Forwarded>(&k, method::FORWARD, &env), Err(EnvelopeError::Decode { .. })));
    }
}
