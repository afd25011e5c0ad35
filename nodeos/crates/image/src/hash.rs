//! The image's identity from outside it: the published file names, the image hash, the iPXE
//! script, and a writer that hashes what passes through it.
//!
//! # Image hash (format 2)
//! The sha256 of this text, each line ending in `\n` (hex is lowercase, sizes are decimal bytes):
//! ```text
//! nodeos-image v2
//! vmlinuz <sha256 of the kernel> <size>
//! initramfs.img <sha256 of the initramfs> <size>
//! cmdline <the default command line>
//! ```
//! so `printf` and `sha256sum` can check it. The initramfs cannot hold its own hash; boot.ipxe
//! passes it to the node as `nodeos.image=<hash>`, after the hashed command line.

use std::io::{self, Write};

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Version of the layout (see `layout`), identity file and hash text; bump when any changes.
/// 2: the initramfs carries the kernel (`boot/vmlinuz`) so a node can serve its own image.
pub const FORMAT: u32 = 2;

pub const KERNEL_FILE: &str = "vmlinuz";
pub const INITRAMFS_FILE: &str = "initramfs.img";
pub const IPXE_FILE: &str = "boot.ipxe";
pub const MANIFEST_FILE: &str = "manifest.json";

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A published file's name, sha256 and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileDigest {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

impl FileDigest {
    pub fn of(name: &str, bytes: &[u8]) -> Self {
        FileDigest { name: name.to_owned(), sha256: sha256_hex(bytes), size: bytes.len() as u64 }
    }
}

/// The text the image hash is taken over (see the module docs).
pub fn image_hash_text(kernel: &FileDigest, initramfs: &FileDigest, cmdline: &str) -> String {
    format!(
        "nodeos-image v{FORMAT}\n{KERNEL_FILE} {} {}\n{INITRAMFS_FILE} {} {}\ncmdline {cmdline}\n",
        kernel.sha256, kernel.size, initramfs.sha256, initramfs.size
    )
}

pub fn image_hash(kernel: &FileDigest, initramfs: &FileDigest, cmdline: &str) -> String {
    sha256_hex(image_hash_text(kernel, initramfs, cmdline).as_bytes())
}

/// The kernel arguments of an image: its default command line, then `nodeos.image=`, then
/// `extra` (the operator's `nodeos.*=` words), then `initrd=` (which EFI stub kernels need).
pub fn kernel_args(cmdline: &str, image_hash: &str, extra: &str) -> String {
    [cmdline, &format!("nodeos.image={image_hash}"), extra, &format!("initrd={INITRAMFS_FILE}")]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// An iPXE script with names relative to itself, so the bundle works from any TFTP or HTTP root
/// (iPXE resolves them against the script's own URI).
pub fn boot_ipxe(cmdline: &str, image_hash: &str, extra: &str) -> String {
    let args = kernel_args(cmdline, image_hash, extra);
    format!(
        "#!ipxe\n# nodeos image {image_hash}\nkernel {KERNEL_FILE} {args}\ninitrd {INITRAMFS_FILE}\nboot\n"
    )
}

/// A writer that hashes and counts what passes through it.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), size: 0 }
    }

    /// The inner writer, the sha256 (hex) and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.size)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_hash_is_over_the_documented_text() {
        let k = FileDigest::of("vmlinuz", b"kernel");
        let i = FileDigest::of("initramfs.img", b"initramfs");
        let text = image_hash_text(&k, &i, "quiet");
        assert_eq!(
            text,
            format!("nodeos-image v2\nvmlinuz {} 6\ninitramfs.img {} 9\ncmdline quiet\n", k.sha256, i.sha256)
        );
        assert_eq!(image_hash(&k, &i, "quiet"), sha256_hex(text.as_bytes()));
        assert_ne!(image_hash(&k, &i, "quiet"), image_hash(&k, &i, "quiet panic=10"));
    }

    #[test]
    fn boot_ipxe_uses_relative_names() {
        let script = boot_ipxe("console=ttyS0 quiet", "ab12", "");
        assert_eq!(
            script,
            "#!ipxe\n# nodeos image ab12\n\
             kernel vmlinuz console=ttyS0 quiet nodeos.image=ab12 initrd=initramfs.img\n\
             initrd initramfs.img\nboot\n"
        );
        assert!(boot_ipxe("", "ab", "").contains("kernel vmlinuz nodeos.image=ab initrd=initramfs.img\n"));
        assert!(
            boot_ipxe("quiet", "ab", "nodeos.pool=p")
                .contains("kernel vmlinuz quiet nodeos.image=ab nodeos.pool=p initrd=initramfs.img\n")
        );
    }

    #[test]
    fn the_hashing_writer_counts_and_hashes() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"abc").unwrap();
        let (inner, sha, n) = w.finish();
        assert_eq!((inner.as_slice(), n), (&b"abc"[..], 3));
        assert_eq!(sha, sha256_hex(b"abc"));
    }
}
