//! What the pool metadata state machine applies, and what it answers.
//!
//! Every write is a [`Txn`]: compares, then the `success` ops if all compares
//! hold, else the `failure` ops. A txn that changes at least one key bumps the
//! pool's revision by exactly one; every key it touched records that revision as
//! its `mod_revision`, and one [`Event`] per changed key is emitted. Txns that
//! change nothing (failed compare with no failure ops, delete of an absent key)
//! leave the revision unchanged.
//!
//! These types travel inside raft log entries and snapshots (postcard encoded),
//! so changes must stay backward compatible: add enum variants at the end only.

use serde::{Deserialize, Serialize};

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// Largest value accepted, in bytes.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;
/// Most ops (success + failure) and compares in one txn.
pub const MAX_TXN_OPS: usize = 128;

/// A raft log payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Txn(Txn),
    /// Member `node` renews its lease ([`crate::lease`]). Changes no key and
    /// no revision; every node notes when it applied it.
    Renew {
        node: u64,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

/// A condition on the current state of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compare {
    /// The key's `mod_revision` equals this; 0 means the key must be absent.
    ModRevision { key: String, equals: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// One key's stored value and its revision bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the txn that created the key (since its last delete).
    pub create_revision: u64,
    /// Revision of the txn that last changed it.
    pub mod_revision: u64,
    /// Number of puts since creation, starting at 1.
    pub version: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change to one key. For deletes, `kv.value` is empty and `kv.mod_revision`
/// is the deleting revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub revision: u64,
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// The state machine's answer to one log entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Pool revision after this entry was applied.
    pub revision: u64,
    /// Whether all compares held (always true for entries that are not txns).
    pub succeeded: bool,
    /// Current value of each compared key, in `compares` order, as seen before the ops ran.
    pub compared: Vec<Option<KeyValue>>,
    /// Previous value of each key the executed ops touched, in op order.
    pub prev: Vec<Option<KeyValue>>,
}

/// Why a command was refused before it reached the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("key must be 1..={MAX_KEY_LEN} bytes of printable ASCII without spaces, got {0:?}")]
    Key(String),
    #[error("value for key {key:?} is {len} bytes; the limit is {MAX_VALUE_LEN}")]
    ValueTooLarge { key: String, len: usize },
    #[error("a txn holds at most {MAX_TXN_OPS} compares and ops, got {0}")]
    TooManyOps(usize),
}

/// Checks a key: printable ASCII, no whitespace, bounded length.
pub fn validate_key(key: &str) -> Result<(), CommandError> {
    let ok = !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic());
    if ok { Ok(()) } else { Err(CommandError::Key(key.chars().take(64).collect())) }
}

impl Command {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Command::Txn(Txn {
            success: vec![Op::Put { key: key.into(), value: value.into() }],
            ..Txn::default()
        })
    }

    pub fn delete(key: impl Into<String>) -> Self {
        Command::Txn(Txn { success: vec![Op::Delete { key: key.into() }], ..Txn::default() })
    }

    /// Put only if the key's mod_revision equals `expect` (0 = absent).
    pub fn put_if(key: impl Into<String>, value: impl Into<Vec<u8>>, expect: u64) -> Self {
        let key = key.into();
        Command::Txn(Txn {
            compares: vec![Compare::ModRevision { key: key.clone(), equals: expect }],
            success: vec![Op::Put { key, value: value.into() }],
            failure: vec![],
        })
    }

    /// Delete only if the key's mod_revision equals `expect`.
    pub fn delete_if(key: impl Into<String>, expect: u64) -> Self {
        let key = key.into();
        Command::Txn(Txn {
            compares: vec![Compare::ModRevision { key: key.clone(), equals: expect }],
            success: vec![Op::Delete { key }],
            failure: vec![],
        })
    }

    /// Checks keys, value sizes and op counts; called before proposing.
    pub fn validate(&self) -> Result<(), CommandError> {
        let t = match self {
            Command::Txn(t) => t,
            Command::Renew { .. } => return Ok(()),
        };
        let n = t.compares.len() + t.success.len() + t.failure.len();
        if n > MAX_TXN_OPS {
            return Err(CommandError::TooManyOps(n));
        }
        for c in &t.compares {
            let Compare::ModRevision { key, .. } = c;
            validate_key(key)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            match op {
                Op::Put { key, value } => {
                    validate_key(key)?;
                    if value.len() > MAX_VALUE_LEN {
                        return Err(CommandError::ValueTooLarge { key: key.clone(), len: value.len() });
                    }
                }
                Op::Delete { key } => validate_key(key)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_refuses_bad_keys_and_sizes() {
        assert!(Command::put("custom/a", b"x".to_vec()).validate().is_ok());
        assert!(Command::put("", b"x".to_vec()).validate().is_err());
        assert!(Command::put("has space", b"x".to_vec()).validate().is_err());
        assert!(Command::put("k".repeat(MAX_KEY_LEN + 1), b"x".to_vec()).validate().is_err());
        assert!(Command::put("k", vec![0; MAX_VALUE_LEN + 1]).validate().is_err());
        let many = Command::Txn(Txn {
            success: (0..MAX_TXN_OPS + 1).map(|i| Op::Delete { key: format!("k{i}") }).collect(),
            ..Txn::default()
        });
        assert_eq!(many.validate(), Err(CommandError::TooManyOps(MAX_TXN_OPS + 1)));
    }
}
