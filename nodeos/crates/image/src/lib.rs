//! The node image's format, shared by the host tool that builds it (image-builder) and the node
//! that serves it over PXE: the initramfs layout, the deterministic newc + gzip writer, and the
//! image hash.
//!
//! Same parts, same bytes: a node that reads its parts back from its root file system rebuilds
//! the initramfs it booted from byte for byte, and proves it by the image hash.
//!
//! # Layout
//! - `newc.rs`: the deterministic newc archive and the fixed-header gzip stream.
//! - `layout.rs`: the initramfs tree from its parts; the parts read back from a root.
//! - `hash.rs`: file names, the image hash, boot.ipxe, a hashing writer.

pub mod hash;
pub mod layout;
pub mod newc;

pub use hash::{FORMAT, FileDigest, HashingWriter, boot_ipxe, image_hash, kernel_args, sha256_hex};
pub use layout::{Built, ImageFiles, Module};
