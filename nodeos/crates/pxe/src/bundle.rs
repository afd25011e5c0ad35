//! The files a PXE server hands out, by flat name.
//!
//! A bundle is built once (from the image the node booted) and shared read-only
//! by the TFTP and HTTP servers and by the proxy DHCP responder, which looks up
//! which iPXE chainloaders are present. Names are restricted to a flat,
//! portable alphabet so that no request can name anything outside the bundle
//! and every name fits the 128-byte BOOTP `file` field with room to spare.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;

/// Longest file name a bundle accepts.
pub const MAX_NAME_LEN: usize = 64;

/// Why a file could not be added to a bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("file name is empty; names are 1..={MAX_NAME_LEN} characters of [A-Za-z0-9._-]")]
    EmptyName,
    #[error("file name of {len} bytes is longer than {MAX_NAME_LEN}")]
    NameTooLong { len: usize },
    #[error("file name {name:?} starts with '.'; names may not be hidden or relative")]
    LeadingDot { name: String },
    #[error("file name {name:?} contains {found:?}; allowed are A-Z, a-z, 0-9, '.', '_' and '-'")]
    NameCharacter { name: String, found: char },
}

/// Checks `name` against the bundle's naming rules.
pub fn validate_name(name: &str) -> Result<(), BundleError> {
    if name.is_empty() {
        return Err(BundleError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(BundleError::NameTooLong { len: name.len() });
    }
    if name.starts_with('.') {
        return Err(BundleError::LeadingDot { name: name.to_owned() });
    }
    if let Some(found) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(BundleError::NameCharacter { name: name.to_owned(), found });
    }
    Ok(())
}

/// A set of named files held in memory (cheaply cloneable [`Bytes`]).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bundle {
    files: BTreeMap<String, Bytes>,
}

impl Bundle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the file `name`. Names are flat: 1..=64 characters
    /// of `[A-Za-z0-9._-]`, not starting with '.'.
    pub fn insert(&mut self, name: &str, data: Bytes) -> Result<(), BundleError> {
        validate_name(name)?;
        self.files.insert(name.to_owned(), data);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.files.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.files.contains_key(name)
    }

    /// File names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Names and sizes only: the contents are kernel images.
impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.files.iter().map(|(name, data)| (name, data.len()))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_flat_names() {
        let mut b = Bundle::new();
        for name in ["vmlinuz", "initramfs.img", "boot.ipxe", "undionly.kpxe", "a", "A-b_c.9"] {
            b.insert(name, Bytes::from_static(b"x")).unwrap();
        }
        b.insert(&"n".repeat(MAX_NAME_LEN), Bytes::new()).unwrap();
        assert_eq!(b.len(), 7);
        assert_eq!(b.get("vmlinuz").unwrap().as_ref(), b"x");
        assert!(b.get("missing").is_none());
        let names: Vec<_> = b.names().collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
    }

    #[test]
    fn refuses_bad_names() {
        let mut b = Bundle::new();
        assert_eq!(b.insert("", Bytes::new()), Err(BundleError::EmptyName));
        assert_eq!(
            b.insert(&"n".repeat(MAX_NAME_LEN + 1), Bytes::new()),
            Err(BundleError::NameTooLong { len: MAX_NAME_LEN + 1 })
        );
        assert!(matches!(b.insert(".hidden", Bytes::new()), Err(BundleError::LeadingDot { .. })));
        assert!(matches!(b.insert("..", Bytes::new()), Err(BundleError::LeadingDot { .. })));
        for bad in ["a/b", "/etc", "a b", "a\0", "é", "a:b", "a\\b"] {
            assert!(matches!(b.insert(bad, Bytes::new()), Err(BundleError::NameCharacter { .. })), "{bad:?}");
        }
        assert!(b.is_empty());
    }

    #[test]
    fn insert_replaces() {
        let mut b = Bundle::new();
        b.insert("f", Bytes::from_static(b"1")).unwrap();
        b.insert("f", Bytes::from_static(b"22")).unwrap();
        assert_eq!(b.get("f").unwrap().len(), 2);
        assert_eq!(format!("{b:?}"), r#"{"f": 2}"#);
    }
}
