//! Identifiers and records shared by every nodeos subsystem.
//!
//! # Layout
//! - `lib.rs`: [`NodeId`], [`VmId`], [`VolumeId`], [`NetworkId`], [`PortId`],
//!   [`SecurityGroupId`], [`ImageId`], [`PoolId`], the id parse error.
//! - `cpu.rs`: a node's [`cpu::CpuModel`] and the pool's CPU [`cpu::baseline`].
//! - `net.rs`: address blocks ([`net::Cidr`]) and security-group rules.
//! - `records.rs`: the typed records stored in the pool's metadata key space
//!   ([`records::PoolRecord`], [`records::NodeRecord`]) and the key layout.
//! - `testing.rs`: [`testing::skip`], the loud skip of a test this machine cannot run.
//!
//! Ids print as fixed-width lowercase hex so they sort the same as text and as
//! numbers, and parse back from exactly that form.

pub mod auth;
pub mod cpu;
pub mod net;
pub mod records;
#[cfg(feature = "testing")]
pub mod testing;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a textual id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    #[error("{kind} id {input:?} must be exactly {digits} hex digits")]
    Format { kind: &'static str, input: String, digits: usize },
}

/// A node's identity: random, made on first boot, persisted in its data dir.
///
/// Zero is never a valid node id (it is openraft's "no node" default).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl NodeId {
    /// A fresh random node id (never zero).
    pub fn random() -> Self {
        loop {
            let v: u64 = rand::random();
            if v != 0 {
                return NodeId(v);
            }
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for NodeId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex(s, "node", 16)
            .and_then(|v| u64::try_from(v).ok())
            .filter(|v| *v != 0)
            .map(NodeId)
            .ok_or_else(|| IdParseError::Format { kind: "node", input: s.to_owned(), digits: 16 })
    }
}

/// A random 64-bit identity printed as 16 hex digits (zero is never valid).
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            pub fn random() -> Self {
                $name(NodeId::random().0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:016x}", self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex(s, $kind, 16)
                    .and_then(|v| u64::try_from(v).ok())
                    .filter(|v| *v != 0)
                    .map($name)
                    .ok_or_else(|| IdParseError::Format { kind: $kind, input: s.to_owned(), digits: 16 })
            }
        }
    };
}

id_type!(
    /// A VM's identity, made when it is created.
    VmId,
    "vm"
);
id_type!(
    /// A volume's identity, made when it is created.
    VolumeId,
    "volume"
);
id_type!(
    /// A tenant network's identity, made when it is created.
    NetworkId,
    "network"
);
id_type!(
    /// A switch port's identity (a VM NIC or a tap on one node), made when it is created.
    PortId,
    "port"
);
id_type!(
    /// A security group's identity, made when it is created.
    SecurityGroupId,
    "security group"
);
id_type!(
    /// A guest image's identity (a kernel or initramfs in the pool), made when it is uploaded.
    ImageId,
    "image"
);

/// A pool's identity: made once, when the pool's first leader initialises it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PoolId(pub u128);

impl PoolId {
    pub fn random() -> Self {
        PoolId(rand::random::<u128>().max(1))
    }
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl FromStr for PoolId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex(s, "pool", 32).map(PoolId).ok_or_else(|| IdParseError::Format {
            kind: "pool",
            input: s.to_owned(),
            digits: 32,
        })
    }
}

fn parse_hex(s: &str, _kind: &str, digits: usize) -> Option<u128> {
    if s.len() != digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

/// Whether the named failpoint is set in `NODEOS_FAILPOINTS` (comma
/// separated): fault-injection tests make a node or a VM worker fail at
/// exactly that step.
pub fn failpoint(name: &str) -> bool {
    std::env::var("NODEOS_FAILPOINTS").is_ok_and(|v| v.split(',').any(|f| f.trim() == name))
}

/// An error and all its causes on one line, `outer: cause: root cause`, for
/// messages that cross a process or API boundary.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Unix time in milliseconds, for records and wire timestamps.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trips_through_text() {
        let id = NodeId(0x00ab_cdef_0123_4567);
        assert_eq!(id.to_string(), "00abcdef01234567");
        assert_eq!("00abcdef01234567".parse::<NodeId>(), Ok(id));
    }

    #[test]
    fn node_id_refuses_bad_text() {
        for bad in ["", "abc", "00abcdef0123456g", "0000000000000000", "00abcdef012345678"] {
            assert!(bad.parse::<NodeId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn pool_id_round_trips_through_text() {
        let id = PoolId::random();
        assert_eq!(id.to_string().parse::<PoolId>(), Ok(id));
        assert!("xyz".parse::<PoolId>().is_err());
    }

    #[test]
    fn random_node_ids_are_never_zero() {
        for _ in 0..1000 {
            assert_ne!(NodeId::random().0, 0);
        }
    }
}
