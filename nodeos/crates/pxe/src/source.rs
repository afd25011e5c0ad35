//! Where the served image comes from, checked before anything is served.
//!
//! - [`ImageSource::Running`]: the image this node runs. The parts are read back from the root
//!   file system (the unpacked initramfs) and the initramfs is rebuilt with the image format's
//!   deterministic writer; the result must have the image hash the node booted with
//!   (`nodeos.image=`), or nothing is served. The rebuilt initramfs is kept under the data
//!   directory, so a reboot of the same image reads it back (and checks it) instead of
//!   compressing again.
//! - [`ImageSource::Bundle`]: a directory written by `make image` (nodes outside the image);
//!   its files must match its manifest's image hash.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use nodeos_image::hash::{INITRAMFS_FILE, KERNEL_FILE, MANIFEST_FILE};
use nodeos_image::{FileDigest, ImageFiles, image_hash};
use thiserror::Error;
use tracing::{info, warn};

/// The kernel, initramfs and default command line of one image, with its hash.
#[derive(Debug, Clone)]
pub struct ServedImage {
    pub kernel: Bytes,
    pub initramfs: Bytes,
    pub cmdline: String,
    pub image_hash: String,
    /// iPXE builds for vendor PXE ROMs, by file name (see `nodeos_image::layout::CHAINLOADERS`).
    pub chainloaders: Vec<(String, Bytes)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// The running image: its parts under `root`, the hash it booted with (empty: unknown),
    /// and where to keep the rebuilt initramfs.
    Running { root: PathBuf, booted_hash: String, cache_dir: Option<PathBuf> },
    /// A bundle directory with `vmlinuz`, `initramfs.img` and `manifest.json`.
    Bundle { dir: PathBuf },
    /// Nothing to serve, and why.
    Unavailable(String),
}

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("{0}")]
    Unavailable(String),
    #[error("reading the running image's parts")]
    Parts(#[from] nodeos_image::layout::ReadError),
    #[error("rebuilding the initramfs")]
    Build(#[from] nodeos_image::layout::BuildError),
    #[error(
        "the rebuilt image is {rebuilt}, but this node booted {booted}: its root file system is not \
         the image it booted, so it does not serve it"
    )]
    Mismatch { booted: String, rebuilt: String },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
}

impl ImageSource {
    /// Reads (and for the running image, rebuilds) the image and checks its hash. Blocking and
    /// CPU heavy: run it off the async runtime.
    pub fn prepare(&self) -> Result<ServedImage, SourceError> {
        match self {
            ImageSource::Unavailable(why) => Err(SourceError::Unavailable(why.clone())),
            ImageSource::Running { root, booted_hash, cache_dir } => {
                running(root, booted_hash, cache_dir.as_deref())
            }
            ImageSource::Bundle { dir } => bundle(dir),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, SourceError> {
    std::fs::read(path).map_err(|source| SourceError::Read { path: path.to_owned(), source })
}

fn cache_file(dir: &Path, hash: &str) -> PathBuf {
    dir.join(format!("initramfs-{hash}.img"))
}

fn running(root: &Path, booted: &str, cache_dir: Option<&Path>) -> Result<ServedImage, SourceError> {
    let files = ImageFiles::read_from_root(root)?;
    let kernel = FileDigest::of(KERNEL_FILE, &files.kernel);
    if let (Some(dir), false) = (cache_dir, booted.is_empty()) {
        let path = cache_file(dir, booted);
        if let Ok(initramfs) = std::fs::read(&path) {
            let digest = FileDigest::of(INITRAMFS_FILE, &initramfs);
            if image_hash(&kernel, &digest, &files.cmdline) == booted {
                info!(path = %path.display(), "served initramfs read back from the data disk");
                return Ok(ServedImage {
                    chainloaders: chainloaders(&files),
                    kernel: files.kernel.into(),
                    initramfs: initramfs.into(),
                    cmdline: files.cmdline,
                    image_hash: booted.to_owned(),
                });
            }
            warn!(path = %path.display(), "kept initramfs does not match the booted image: rebuilding");
        }
    }
    let started = std::time::Instant::now();
    let built = files.build()?;
    if !booted.is_empty() && built.image_hash != booted {
        return Err(SourceError::Mismatch { booted: booted.to_owned(), rebuilt: built.image_hash });
    }
    if booted.is_empty() {
        warn!(image = %built.image_hash, "booted without nodeos.image=: serving the rebuilt image unchecked");
    }
    info!(
        image = %built.image_hash,
        size = built.initramfs.size,
        secs = started.elapsed().as_secs_f64(),
        "initramfs rebuilt from the running image"
    );
    if let Some(dir) = cache_dir
        && let Err(e) = keep(dir, &built.image_hash, &built.initramfs_bytes)
    {
        warn!(dir = %dir.display(), error = %e, "cannot keep the rebuilt initramfs; it is rebuilt at next boot");
    }
    Ok(ServedImage {
        chainloaders: chainloaders(&files),
        kernel: files.kernel.into(),
        initramfs: built.initramfs_bytes.into(),
        cmdline: files.cmdline,
        image_hash: built.image_hash,
    })
}

fn chainloaders(files: &ImageFiles) -> Vec<(String, Bytes)> {
    files.chainloaders.iter().map(|c| (c.path.clone(), Bytes::from(c.data.clone()))).collect()
}

/// Writes the initramfs under `dir` (whole or not at all) and removes other images' copies.
fn keep(dir: &Path, hash: &str, bytes: &[u8]) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = cache_file(dir, hash);
    let tmp = dir.join(format!(".initramfs-{hash}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("initramfs-") && entry.path() != path {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

fn bundle(dir: &Path) -> Result<ServedImage, SourceError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let bad = |reason: String| SourceError::Manifest { path: manifest_path.clone(), reason };
    let manifest: serde_json::Value =
        serde_json::from_slice(&read(&manifest_path)?).map_err(|e| bad(format!("not JSON: {e}")))?;
    let want = manifest["image_hash"].as_str().ok_or_else(|| bad("no image_hash".into()))?.to_owned();
    let cmdline = manifest["cmdline"].as_str().ok_or_else(|| bad("no cmdline".into()))?.to_owned();
    let kernel = read(&dir.join(KERNEL_FILE))?;
    let initramfs = read(&dir.join(INITRAMFS_FILE))?;
    let got = image_hash(
        &FileDigest::of(KERNEL_FILE, &kernel),
        &FileDigest::of(INITRAMFS_FILE, &initramfs),
        &cmdline,
    );
    if got != want {
        return Err(bad(format!("says image {want}, but its files make image {got}")));
    }
    // A bundle directory may hold chainloaders next to the image (not covered by its hash).
    let mut chainloaders = Vec::new();
    for name in nodeos_image::layout::CHAINLOADERS {
        if let Ok(data) = std::fs::read(dir.join(name)) {
            chainloaders.push((name.to_owned(), Bytes::from(data)));
        }
    }
    Ok(ServedImage {
        kernel: kernel.into(),
        initramfs: initramfs.into(),
        cmdline,
        image_hash: got,
        chainloaders,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeos_image::Module;

    fn files() -> ImageFiles {
        ImageFiles {
            nodeos: b"nodeos".to_vec(),
            kernel: b"kernel".to_vec(),
            kernel_version: "6.1.0-9-amd64".into(),
            identity_json: br#"{"format": 2, "kernel": {"version": "6.1.0-9-amd64"}}"#.to_vec(),
            cmdline: "quiet".into(),
            modules: vec![Module { path: "kernel/a.ko".into(), data: b"a".to_vec() }],
            chainloaders: vec![],
        }
    }

    /// Writes the parts the way the unpacked initramfs holds them.
    fn root_of(f: &ImageFiles) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let put = |rel: &str, data: &[u8]| {
            let p = root.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        };
        put("init", &f.nodeos);
        put("boot/vmlinuz", &f.kernel);
        put("etc/nodeos/image.json", &f.identity_json);
        put("etc/nodeos/cmdline.default", format!("{}\n", f.cmdline).as_bytes());
        put("lib/modules/6.1.0-9-amd64/load.order", f.load_order().as_bytes());
        put("lib/modules/6.1.0-9-amd64/kernel/a.ko", b"a");
        root
    }

    #[test]
    fn the_running_image_is_rebuilt_checked_and_kept() {
        let f = files();
        let want = f.build().unwrap();
        let root = root_of(&f);
        let cache = tempfile::tempdir().unwrap();
        let src = ImageSource::Running {
            root: root.path().into(),
            booted_hash: want.image_hash.clone(),
            cache_dir: Some(cache.path().into()),
        };
        let got = src.prepare().unwrap();
        assert_eq!(got.image_hash, want.image_hash);
        assert_eq!(got.initramfs.as_ref(), want.initramfs_bytes.as_slice());
        assert_eq!(got.cmdline, "quiet");
        let kept = cache_file(cache.path(), &want.image_hash);
        assert_eq!(std::fs::read(&kept).unwrap(), want.initramfs_bytes);
        // Read back next time; a damaged copy is rebuilt, not served.
        std::fs::write(&kept, b"damaged").unwrap();
        assert_eq!(src.prepare().unwrap().initramfs.as_ref(), want.initramfs_bytes.as_slice());
        assert_eq!(std::fs::read(&kept).unwrap(), want.initramfs_bytes);

        // A root that is not the booted image is refused.
        std::fs::write(root.path().join("lib/modules/6.1.0-9-amd64/kernel/a.ko"), b"changed").unwrap();
        std::fs::remove_file(&kept).unwrap();
        let err = src.prepare().unwrap_err();
        assert!(matches!(err, SourceError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("does not serve it"), "{err}");
    }

    #[test]
    fn a_bundle_must_match_its_manifest() {
        let f = files();
        let built = f.build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), &f.kernel).unwrap();
        std::fs::write(dir.path().join("initramfs.img"), &built.initramfs_bytes).unwrap();
        let manifest = serde_json::json!({"image_hash": built.image_hash, "cmdline": "quiet"});
        std::fs::write(dir.path().join("manifest.json"), manifest.to_string()).unwrap();
        let src = ImageSource::Bundle { dir: dir.path().into() };
        assert_eq!(src.prepare().unwrap().image_hash, built.image_hash);
        std::fs::write(dir.path().join("vmlinuz"), b"another kernel").unwrap();
        let err = src.prepare().unwrap_err().to_string();
        assert!(err.contains("its files make image"), "{err}");
        let err = ImageSource::Unavailable("not from the image".into()).prepare().unwrap_err().to_string();
        assert_eq!(err, "not from the image");
    }
}
