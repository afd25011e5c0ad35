//! The pool key: the shared secret that makes a node a member of one pool.
//!
//! Every beacon, join request and peer RPC carries a keyed BLAKE3 MAC made with a
//! key derived from the operator's pool key file. A node holding another key
//! cannot be discovered, cannot join and cannot speak raft to the pool.

use std::fmt;
use std::path::Path;

/// Shortest pool key accepted, in bytes after trimming whitespace.
pub const MIN_POOL_KEY_LEN: usize = 16;
/// Longest pool key file read, in bytes.
pub const MAX_POOL_KEY_LEN: usize = 4096;

const DERIVE_CONTEXT: &str = "nodeos pool key v1 2026-11 message authentication";
const CA_CONTEXT: &str = "nodeos pool key v1 2026-12 certificate authority seed";

#[derive(Debug, thiserror::Error)]
pub enum PoolKeyError {
    #[error("cannot read pool key file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pool key in {path} is {len} bytes after trimming; it must be {MIN_POOL_KEY_LEN}..={MAX_POOL_KEY_LEN} bytes (for example: head -c 32 /dev/urandom | base64 > {path})"
    )]
    Length { path: String, len: usize },
}

/// A derived MAC key, and (only where the operator's secret was read) the
/// seed of the pool's CA. Never printed.
#[derive(Clone)]
pub struct PoolKey {
    key: [u8; 32],
    /// `None` in a key rebuilt from [`PoolKey::derived_bytes`] (a VM worker's):
    /// it authenticates messages but cannot sign certificates.
    ca_seed: Option<[u8; 32]>,
}

impl fmt::Debug for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PoolKey(fingerprint {})", self.fingerprint())
    }
}

/// A 32-byte message authentication code.
pub type Mac = [u8; 32];

impl PoolKey {
    /// Derives the MAC key from the operator's secret bytes.
    pub fn from_secret(secret: &[u8]) -> Result<Self, PoolKeyError> {
        let trimmed = secret.trim_ascii();
        if !(MIN_POOL_KEY_LEN..=MAX_POOL_KEY_LEN).contains(&trimmed.len()) {
            return Err(PoolKeyError::Length { path: "<inline>".into(), len: trimmed.len() });
        }
        Ok(PoolKey {
            key: blake3::derive_key(DERIVE_CONTEXT, trimmed),
            ca_seed: Some(blake3::derive_key(CA_CONTEXT, trimmed)),
        })
    }

    /// Reads and derives the key from a file holding the secret.
    pub fn from_file(path: &Path) -> Result<Self, PoolKeyError> {
        let shown = path.display().to_string();
        let bytes =
            std::fs::read(path).map_err(|source| PoolKeyError::Read { path: shown.clone(), source })?;
        PoolKey::from_secret(&bytes).map_err(|e| match e {
            PoolKeyError::Length { len, .. } => PoolKeyError::Length { path: shown, len },
            other => other,
        })
    }

    /// MAC over a sequence of fields; each field is length-prefixed so that
    /// field boundaries cannot be shifted.
    pub fn mac(&self, fields: &[&[u8]]) -> Mac {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        for f in fields {
            h.update(&(f.len() as u64).to_le_bytes());
            h.update(f);
        }
        *h.finalize().as_bytes()
    }

    /// Constant-time check of a MAC over `fields`.
    pub fn verify(&self, fields: &[&[u8]], mac: &[u8]) -> bool {
        let Ok(mac): Result<[u8; 32], _> = mac.try_into() else {
            return false;
        };
        let mut h = blake3::Hasher::new_keyed(&self.key);
        for f in fields {
            h.update(&(f.len() as u64).to_le_bytes());
            h.update(f);
        }
        h.finalize() == blake3::Hash::from_bytes(mac)
    }

    /// Short public fingerprint, safe to log, to tell keys apart.
    /// The derived key bytes, for handing to a child process of this node (a
    /// VM worker's block client) over a private socket. Never logged or stored.
    pub fn derived_bytes(&self) -> [u8; 32] {
        self.key
    }

    /// The inverse of [`PoolKey::derived_bytes`]: a key that authenticates
    /// messages but holds no CA seed.
    pub fn from_derived(key: [u8; 32]) -> Self {
        PoolKey { key, ca_seed: None }
    }

    /// Material the pool's CA keys are derived from; `None` in a key rebuilt
    /// from derived bytes. Never logged, stored or sent.
    pub fn ca_seed(&self) -> Option<&[u8; 32]> {
        self.ca_seed.as_ref()
    }

    pub fn fingerprint(&self) -> String {
        let h = blake3::keyed_hash(&self.key, b"fingerprint");
        hex::encode(&h.as_bytes()[..4])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_verifies_only_with_the_same_key_and_fields() {
        let a = PoolKey::from_secret(b"correct horse battery staple").expect("valid key");
        let b = PoolKey::from_secret(b"correct horse battery stapler").expect("valid key");
        let m = a.mac(&[b"hello", b"world"]);
        assert!(a.verify(&[b"hello", b"world"], &m));
        assert!(!b.verify(&[b"hello", b"world"], &m));
        assert!(!a.verify(&[b"hellow", b"orld"], &m), "field boundaries are authenticated");
        assert!(!a.verify(&[b"hello", b"world"], &m[..31]));
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn short_keys_are_refused_and_whitespace_is_trimmed() {
        assert!(PoolKey::from_secret(b"short\n").is_err());
        let a = PoolKey::from_secret(b"0123456789abcdef\n").expect("valid key");
        let b = PoolKey::from_secret(b"  0123456789abcdef").expect("valid key");
        assert_eq!(a.fingerprint(), b.fingerprint());
    }
}
