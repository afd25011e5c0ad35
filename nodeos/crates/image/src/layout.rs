//! The initramfs tree, built from its parts, and those parts read back from a running node's
//! root file system, so a node can rebuild the exact initramfs it booted from.
//!
//! # Initramfs layout (format 2)
//! ```text
//! /init                             nodeos, 0755: the kernel runs it as PID 1
//! /sbin/nodeos -> /init             so `nodeos ...` works from the console
//! /boot/vmlinuz                     the kernel, 0644: what a node serves over PXE
//! /boot/<chainloader>               optional iPXE builds for vendor PXE ROMs (undionly.kpxe,
//!                                   ipxe.efi, snponly.efi), 0644, served over TFTP
//! /dev/console                      c 5 1, 0600: the kernel opens it before devtmpfs is mounted
//! /dev /proc /sys /run /var /etc    mount points and runtime dirs, 0755
//! /tmp                              1777
//! /etc/nodeos/image.json            identity: versions and the build inputs' sha256
//! /etc/nodeos/cmdline.default       the default kernel command line
//! /lib/modules/<ver>/load.order     module paths (relative to /lib/modules/<ver>), load order
//! /lib/modules/<ver>/kernel/...     the modules, as named in modules.dep
//! ```
//! Everything in it is read-only at run time by convention: PID 1 and the daemon only read
//! these paths, which is what lets [`ImageFiles::read_from_root`] give back the same bytes.

use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::hash::{FileDigest, HashingWriter, INITRAMFS_FILE, KERNEL_FILE, image_hash};
use crate::newc::{self, Archive, ArchiveError};

pub const INIT: &str = "init";
pub const KERNEL_COPY: &str = "boot/vmlinuz";
pub const IDENTITY: &str = "etc/nodeos/image.json";
pub const CMDLINE_DEFAULT: &str = "etc/nodeos/cmdline.default";
pub const LOAD_ORDER: &str = "load.order";
const BOOT_DIR: &str = "boot";
/// iPXE builds a node may carry and serve to vendor PXE ROMs, by file name.
pub const CHAINLOADERS: [&str; 3] = ["undionly.kpxe", "ipxe.efi", "snponly.efi"];

/// One kernel module: its path under `lib/modules/<ver>/` and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub path: String,
    pub data: Vec<u8>,
}

/// Everything the initramfs is made of.
#[derive(Debug, Clone)]
pub struct ImageFiles {
    pub nodeos: Vec<u8>,
    pub kernel: Vec<u8>,
    pub kernel_version: String,
    /// `etc/nodeos/image.json`, as bytes: written by image-builder, read back verbatim.
    pub identity_json: Vec<u8>,
    pub cmdline: String,
    /// In load order.
    pub modules: Vec<Module>,
    /// iPXE chainloaders (named as in [`CHAINLOADERS`]), under `boot/`.
    pub chainloaders: Vec<Module>,
}

/// The image a node serves: its two files and its hash.
#[derive(Debug, Clone)]
pub struct Built {
    pub kernel: FileDigest,
    pub initramfs: FileDigest,
    pub initramfs_bytes: Vec<u8>,
    pub image_hash: String,
    pub entries: usize,
    pub uncompressed_size: u64,
}

#[derive(Debug, Error)]
pub enum ReadError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Identity { path: PathBuf, reason: String },
}

#[derive(Debug, Error)]
pub enum BuildError {
    #[error("laying out the initramfs")]
    Layout(#[from] ArchiveError),
    #[error("compressing the initramfs")]
    Write(#[source] io::Error),
}

impl ImageFiles {
    pub fn modules_dir(&self) -> String {
        format!("lib/modules/{}", self.kernel_version)
    }

    pub fn load_order(&self) -> String {
        self.modules.iter().map(|m| format!("{}\n", m.path)).collect()
    }

    /// The initramfs tree, laid out as in the module docs.
    pub fn initramfs(&self) -> Result<Archive, ArchiveError> {
        let mut a = Archive::new();
        for dir in ["dev", "proc", "sys", "run", "var", "etc/nodeos", "sbin", "boot"] {
            a.dir(dir, 0o755)?;
        }
        a.dir("tmp", 0o1777)?;
        a.char_dev("dev/console", 0o600, 5, 1)?;
        a.file(INIT, 0o755, self.nodeos.clone())?;
        a.symlink("sbin/nodeos", "/init")?;
        a.file(KERNEL_COPY, 0o644, self.kernel.clone())?;
        for c in &self.chainloaders {
            a.file(&format!("{BOOT_DIR}/{}", c.path), 0o644, c.data.clone())?;
        }
        a.file(IDENTITY, 0o644, self.identity_json.clone())?;
        a.file(CMDLINE_DEFAULT, 0o644, format!("{}\n", self.cmdline).into_bytes())?;
        let modules_dir = self.modules_dir();
        a.dir(&modules_dir, 0o755)?;
        a.file(&format!("{modules_dir}/{LOAD_ORDER}"), 0o644, self.load_order().into_bytes())?;
        for m in &self.modules {
            a.file(&format!("{modules_dir}/{}", m.path), 0o644, m.data.clone())?;
        }
        Ok(a)
    }

    /// The compressed initramfs in memory, with the image's digests and hash.
    pub fn build(&self) -> Result<Built, BuildError> {
        let archive = self.initramfs()?;
        let counted = HashingWriter::new(newc::gzip(HashingWriter::new(BufWriter::new(Vec::new()))));
        let written = (|| {
            let (gz, _, uncompressed_size) = archive.write(counted)?.finish();
            let (buffered, sha256, size) = gz.finish()?.finish();
            let bytes = buffered.into_inner().map_err(|e| e.into_error())?;
            Ok::<_, io::Error>((bytes, sha256, size, uncompressed_size))
        })();
        let (initramfs_bytes, sha256, size, uncompressed_size) = written.map_err(BuildError::Write)?;
        let initramfs = FileDigest { name: INITRAMFS_FILE.into(), sha256, size };
        let kernel = FileDigest::of(KERNEL_FILE, &self.kernel);
        let image_hash = image_hash(&kernel, &initramfs, &self.cmdline);
        Ok(Built {
            kernel,
            initramfs,
            initramfs_bytes,
            image_hash,
            entries: archive.len(),
            uncompressed_size,
        })
    }

    /// Reads the parts back from a root file system holding the unpacked initramfs (`/` on a
    /// node running the image).
    pub fn read_from_root(root: &Path) -> Result<Self, ReadError> {
        let read = |rel: &str| {
            let path = root.join(rel);
            std::fs::read(&path).map_err(|source| ReadError::Read { path, source })
        };
        let identity_path = root.join(IDENTITY);
        let identity_json = read(IDENTITY)?;
        let bad = |reason: String| ReadError::Identity { path: identity_path.clone(), reason };
        let identity: serde_json::Value =
            serde_json::from_slice(&identity_json).map_err(|e| bad(format!("not JSON: {e}")))?;
        let format = identity["format"].as_u64().ok_or_else(|| bad("no `format`".into()))?;
        if format != u64::from(crate::hash::FORMAT) {
            return Err(bad(format!(
                "image format {format}; this nodeos reads format {}",
                crate::hash::FORMAT
            )));
        }
        let kernel_version = identity["kernel"]["version"]
            .as_str()
            .filter(|v| !v.is_empty() && !v.contains('/') && *v != "." && *v != "..")
            .ok_or_else(|| bad("no usable `kernel.version`".into()))?
            .to_owned();
        let cmdline_path = root.join(CMDLINE_DEFAULT);
        let cmdline = String::from_utf8(read(CMDLINE_DEFAULT)?)
            .map_err(|_| ReadError::Identity { path: cmdline_path.clone(), reason: "not UTF-8".into() })?;
        let cmdline = cmdline
            .strip_suffix('\n')
            .ok_or_else(|| ReadError::Identity { path: cmdline_path, reason: "no final newline".into() })?
            .to_owned();
        let modules_dir = format!("lib/modules/{kernel_version}");
        let order_rel = format!("{modules_dir}/{LOAD_ORDER}");
        let order = String::from_utf8(read(&order_rel)?)
            .map_err(|_| ReadError::Identity { path: root.join(&order_rel), reason: "not UTF-8".into() })?;
        let mut modules = Vec::new();
        for path in order.lines() {
            modules.push(Module { path: path.to_owned(), data: read(&format!("{modules_dir}/{path}"))? });
        }
        let mut chainloaders = Vec::new();
        for name in CHAINLOADERS {
            let rel = format!("{BOOT_DIR}/{name}");
            if root.join(&rel).is_file() {
                chainloaders.push(Module { path: name.to_owned(), data: read(&rel)? });
            }
        }
        Ok(ImageFiles {
            nodeos: read(INIT)?,
            kernel: read(KERNEL_COPY)?,
            kernel_version,
            identity_json,
            cmdline,
            modules,
            chainloaders,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn files() -> ImageFiles {
        ImageFiles {
            nodeos: b"nodeos binary".to_vec(),
            kernel: b"a kernel".to_vec(),
            kernel_version: "6.1.0-9-amd64".into(),
            identity_json: br#"{"format": 2, "kernel": {"version": "6.1.0-9-amd64"}}"#.to_vec(),
            cmdline: "console=ttyS0,115200 quiet".into(),
            modules: vec![
                Module { path: "kernel/virtio_ring.ko".into(), data: b"ring".to_vec() },
                Module { path: "kernel/virtio.ko".into(), data: b"virtio".to_vec() },
            ],
            chainloaders: vec![Module { path: "undionly.kpxe".into(), data: b"ipxe".to_vec() }],
        }
    }

    #[test]
    fn the_initramfs_has_the_documented_layout() {
        let archive = files().initramfs().unwrap();
        let paths: Vec<&str> = archive.paths().collect();
        assert_eq!(
            paths,
            [
                "boot",
                "boot/undionly.kpxe",
                "boot/vmlinuz",
                "dev",
                "dev/console",
                "etc",
                "etc/nodeos",
                "etc/nodeos/cmdline.default",
                "etc/nodeos/image.json",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.1.0-9-amd64",
                "lib/modules/6.1.0-9-amd64/kernel",
                "lib/modules/6.1.0-9-amd64/kernel/virtio.ko",
                "lib/modules/6.1.0-9-amd64/kernel/virtio_ring.ko",
                "lib/modules/6.1.0-9-amd64/load.order",
                "proc",
                "run",
                "sbin",
                "sbin/nodeos",
                "sys",
                "tmp",
                "var",
            ]
        );
        assert_eq!(files().load_order(), "kernel/virtio_ring.ko\nkernel/virtio.ko\n");
    }

    /// Unpacks a built initramfs into a directory the way the kernel does (files, dirs and
    /// symlinks; the device node is skipped), reads it back and rebuilds it.
    #[test]
    fn an_unpacked_initramfs_rebuilds_to_the_same_bytes() {
        let built = files().build().unwrap();
        let root = tempfile::tempdir().unwrap();
        let mut gz = flate2::read::GzDecoder::new(built.initramfs_bytes.as_slice());
        let mut raw = Vec::new();
        io::Read::read_to_end(&mut gz, &mut raw).unwrap();
        let mut rest = raw.as_slice();
        loop {
            let mut r = cpio::newc::Reader::new(rest).unwrap();
            let e = r.entry().clone();
            if e.is_trailer() {
                break;
            }
            let mut data = Vec::new();
            io::Read::read_to_end(&mut r, &mut data).unwrap();
            let path = root.path().join(e.name());
            match e.mode() & 0o170000 {
                0o040000 => std::fs::create_dir_all(&path).unwrap(),
                0o100000 => std::fs::write(&path, &data).unwrap(),
                0o120000 => std::os::unix::fs::symlink(String::from_utf8(data).unwrap(), &path).unwrap(),
                _ => {}
            }
            rest = r.finish().unwrap();
        }
        // Runtime additions next to the image's files change nothing.
        std::fs::write(root.path().join("etc/nodeos/node.conf"), "pool=x\n").unwrap();
        std::fs::create_dir_all(root.path().join("var/lib/nodeos")).unwrap();
        let again = ImageFiles::read_from_root(root.path()).unwrap().build().unwrap();
        assert_eq!(again.initramfs_bytes, built.initramfs_bytes);
        assert_eq!(again.image_hash, built.image_hash);
        assert_eq!(again.kernel, built.kernel);
        assert_eq!(ImageFiles::read_from_root(root.path()).unwrap().chainloaders, files().chainloaders);

        // A changed module changes the hash.
        std::fs::write(root.path().join("lib/modules/6.1.0-9-amd64/kernel/virtio.ko"), "other").unwrap();
        let changed = ImageFiles::read_from_root(root.path()).unwrap().build().unwrap();
        assert_ne!(changed.image_hash, built.image_hash);
    }

    #[test]
    fn a_root_without_an_image_is_refused_clearly() {
        let root = tempfile::tempdir().unwrap();
        let err = ImageFiles::read_from_root(root.path()).unwrap_err().to_string();
        assert!(err.contains("etc/nodeos/image.json"), "{err}");
        std::fs::create_dir_all(root.path().join("etc/nodeos")).unwrap();
        std::fs::write(root.path().join(IDENTITY), r#"{"format": 1, "kernel": {"version": "x"}}"#).unwrap();
        let err = ImageFiles::read_from_root(root.path()).unwrap_err().to_string();
        assert!(err.contains("image format 1"), "{err}");
        std::fs::write(root.path().join(IDENTITY), r#"{"format": 2, "kernel": {"version": "../x"}}"#)
            .unwrap();
        let err = ImageFiles::read_from_root(root.path()).unwrap_err().to_string();
        assert!(err.contains("kernel.version"), "{err}");
    }
}
