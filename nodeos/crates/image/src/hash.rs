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

/// What an image bundle's manifest says that an upgrade needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleManifest {
    pub image_hash: String,
    pub nodeos_version: String,
    /// The image's default kernel command line.
    pub cmdline: String,
}

/// Checks a bundle's `manifest.json` against its kernel and initramfs: the
/// format, each file's sha256 and size as listed, and the image hash taken
/// over them. The reason is in words for an operator.
pub fn check_bundle(
    manifest: &[u8],
    kernel: &FileDigest,
    initramfs: &FileDigest,
) -> Result<BundleManifest, String> {
    let m: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| format!("{MANIFEST_FILE} is not JSON: {e}"))?;
    let field =
        |k: &str| m[k].as_str().map(str::to_owned).ok_or_else(|| format!("{MANIFEST_FILE} has no {k}"));
    if m["format"].as_u64() != Some(u64::from(FORMAT)) {
        return Err(format!("{MANIFEST_FILE} is format {}, this nodeos reads format {FORMAT}", m["format"]));
    }
    let (want, cmdline, version) = (field("image_hash")?, field("cmdline")?, field("nodeos_version")?);
    for f in [kernel, initramfs] {
        let listed = m["files"].as_array().and_then(|a| a.iter().find(|e| e["name"] == f.name.as_str()));
        let Some(listed) = listed else { return Err(format!("{MANIFEST_FILE} does not list {}", f.name)) };
        if listed["sha256"] != f.sha256.as_str() || listed["size"].as_u64() != Some(f.size) {
            return Err(format!(
                "{} is {} bytes with sha256 {}, but {MANIFEST_FILE} says {} bytes with sha256 {}",
                f.name, f.size, f.sha256, listed["size"], listed["sha256"]
            ));
        }
    }
    let got = image_hash(kernel, initramfs, &cmdline);
    if got != want {
        return Err(format!("{MANIFEST_FILE} says image {want}, but its files make image {got}"));
    }
    Ok(BundleManifest { image_hash: got, nodeos_version: version, cmdline })
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
    fn a_bundle_checks_only_against_its_own_files() {
        let k = FileDigest::of(KERNEL_FILE, b"kernel");
        let i = FileDigest::of(INITRAMFS_FILE, b"initramfs");
        let manifest = |hash: &str, k: &FileDigest| {
            serde_json::json!({
                "format": FORMAT, "image_hash": hash, "nodeos_version": "0.1.0", "cmdline": "quiet",
                "files": [k, i]
            })
            .to_string()
        };
        let good = image_hash(&k, &i, "quiet");
        let m = check_bundle(manifest(&good, &k).as_bytes(), &k, &i).expect("a good bundle");
        assert_eq!((m.image_hash.as_str(), m.cmdline.as_str()), (good.as_str(), "quiet"));
        let e = check_bundle(manifest(&"0".repeat(64), &k).as_bytes(), &k, &i).unwrap_err();
        assert!(e.contains("but its files make image"), "{e}");
        let other = FileDigest::of(KERNEL_FILE, b"another kernel");
        let e = check_bundle(manifest(&good, &k).as_bytes(), &other, &i).unwrap_err();
        assert!(e.contains("vmlinuz is 14 bytes"), "{e}");
        assert!(check_bundle(b"{", &k, &i).unwrap_err().contains("not JSON"));
    }

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
