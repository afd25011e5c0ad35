//! A deterministic newc (SVR4 "070701") cpio archive, the format the kernel unpacks as initramfs,
//! and the gzip stream around it.
//!
//! Determinism is by construction: entries live in a map sorted by path (byte order), so the
//! order they were added in does not matter; every header has mtime 0, uid/gid 0, dev 0:0 and an
//! inode number assigned from 1 in sorted order; permissions are whatever the caller fixed, never
//! the host file's. Parents are always written before children because a path sorts after its
//! prefix. Regular files have nlink 1: the kernel treats nlink >= 2 as a hard-link set.
//!
//! Paths are stored without a leading `/` (`init`, `lib/modules/...`), as the kernel expects.

use std::collections::BTreeMap;
use std::io::{self, Write};

use cpio::newc::{Builder, ModeFileType};
use flate2::{Compression, GzBuilder};
use thiserror::Error;

/// The gzip header's OS byte: 3 (Unix), what `gzip -n` writes; fixed so the host never leaks in.
pub const GZIP_OS_UNIX: u8 = 3;

/// zlib's default level: 0.5% larger than 9 on the image but about four times faster, which
/// matters because every node that serves PXE compresses its image again (under QEMU TCG, at a
/// tenth of the host's speed).
const GZIP_LEVEL: u32 = 6;

#[derive(Debug, Error)]
pub enum ArchiveError {
    #[error("archive path `{path}`: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("archive path `{path}` added twice")]
    Duplicate { path: String },
    #[error("archive path `{path}`: its parent `{parent}` is not a directory")]
    ParentNotDirectory { path: String, parent: String },
    #[error("archive path `{path}`: {size} bytes is more than newc's 4 GiB limit")]
    TooLarge { path: String, size: usize },
}

/// One archive member. Permission bits only; the file type comes from the variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { perm: u32 },
    File { perm: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { perm: u32, major: u32, minor: u32 },
}

impl Node {
    fn mode(&self) -> u32 {
        let (kind, perm) = match self {
            Node::Dir { perm } => (ModeFileType::Directory, *perm),
            Node::File { perm, .. } => (ModeFileType::Regular, *perm),
            Node::Symlink { .. } => (ModeFileType::Symlink, 0o777),
            Node::CharDev { perm, .. } => (ModeFileType::Char, *perm),
        };
        u32::from(kind) | (perm & 0o7777)
    }

    fn data(&self) -> &[u8] {
        match self {
            Node::File { data, .. } => data,
            Node::Symlink { target } => target.as_bytes(),
            Node::Dir { .. } | Node::CharDev { .. } => &[],
        }
    }
}

/// The archive being assembled; nothing is written until [`Archive::write`].
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Node>,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (and any missing parents, mode 0755). Adding an existing directory again
    /// only fixes its mode, so callers need not track which parents exist.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), ArchiveError> {
        check_path(path)?;
        self.parents(path)?;
        match self.entries.get_mut(path) {
            Some(Node::Dir { perm: p }) => {
                *p = perm;
                Ok(())
            }
            Some(_) => Err(ArchiveError::Duplicate { path: path.to_owned() }),
            None => {
                self.entries.insert(path.to_owned(), Node::Dir { perm });
                Ok(())
            }
        }
    }

    pub fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<(), ArchiveError> {
        if u32::try_from(data.len()).is_err() {
            return Err(ArchiveError::TooLarge { path: path.to_owned(), size: data.len() });
        }
        self.insert(path, Node::File { perm, data })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), ArchiveError> {
        self.insert(path, Node::Symlink { target: target.to_owned() })
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<(), ArchiveError> {
        self.insert(path, Node::CharDev { perm, major, minor })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Paths in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<(), ArchiveError> {
        check_path(path)?;
        if self.entries.contains_key(path) {
            return Err(ArchiveError::Duplicate { path: path.to_owned() });
        }
        self.parents(path)?;
        self.entries.insert(path.to_owned(), node);
        Ok(())
    }

    fn parents(&mut self, path: &str) -> Result<(), ArchiveError> {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            let parent = &path[..end + i];
            match self.entries.get(parent) {
                Some(Node::Dir { .. }) => {}
                Some(_) => {
                    return Err(ArchiveError::ParentNotDirectory {
                        path: path.to_owned(),
                        parent: parent.to_owned(),
                    });
                }
                None => {
                    self.entries.insert(parent.to_owned(), Node::Dir { perm: 0o755 });
                }
            }
            end += i + 1;
        }
        Ok(())
    }

    /// Writes the archive (entries in path order, then the trailer) and returns the writer.
    pub fn write<W: Write>(&self, mut w: W) -> io::Result<W> {
        for (index, (path, node)) in self.entries.iter().enumerate() {
            let ino = u32::try_from(index + 1).map_err(|_| io::Error::other("more than 2^32 entries"))?;
            let data = node.data();
            let size = u32::try_from(data.len()).map_err(|_| io::Error::other("entry over 4 GiB"))?;
            let (rdev_major, rdev_minor) = match node {
                Node::CharDev { major, minor, .. } => (*major, *minor),
                _ => (0, 0),
            };
            let nlink = if matches!(node, Node::Dir { .. }) { 2 } else { 1 };
            let mut entry = Builder::new(path)
                .ino(ino)
                .mode(node.mode())
                .uid(0)
                .gid(0)
                .nlink(nlink)
                .mtime(0)
                .dev_major(0)
                .dev_minor(0)
                .rdev_major(rdev_major)
                .rdev_minor(rdev_minor)
                .write(w, size);
            entry.write_all(data)?;
            w = entry.finish()?;
        }
        cpio::newc::trailer(w)
    }
}

/// Archive paths are relative, `/`-separated, with no empty, `.` or `..` components.
fn check_path(path: &str) -> Result<(), ArchiveError> {
    let bad = |reason| Err(ArchiveError::BadPath { path: path.to_owned(), reason });
    if path.is_empty() {
        return bad("empty");
    }
    if path.starts_with('/') {
        return bad("must be relative (no leading `/`)");
    }
    if path.contains('\0') {
        return bad("contains a NUL byte");
    }
    if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return bad("has an empty, `.` or `..` component");
    }
    Ok(())
}

/// A gzip encoder with a fixed header: mtime 0, no file name, OS byte [`GZIP_OS_UNIX`].
pub fn gzip<W: Write>(w: W) -> flate2::write::GzEncoder<W> {
    GzBuilder::new().mtime(0).operating_system(GZIP_OS_UNIX).write(w, Compression::new(GZIP_LEVEL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn add(a: &mut Archive, step: usize) {
        match step {
            0 => a.file("init", 0o755, b"#!binary".to_vec()).unwrap(),
            1 => a.symlink("sbin/nodeos", "/init").unwrap(),
            2 => a.char_dev("dev/console", 0o600, 5, 1).unwrap(),
            3 => a.dir("tmp", 0o1777).unwrap(),
            4 => a.file("lib/modules/6.1.0/kernel/a.ko", 0o644, vec![1, 2, 3]).unwrap(),
            5 => a.file("lib/modules/6.1.0/load.order", 0o644, b"kernel/a.ko\n".to_vec()).unwrap(),
            _ => a.dir("proc", 0o555).unwrap(),
        }
    }

    fn sample(order: &[usize]) -> Archive {
        let mut a = Archive::new();
        for &step in order {
            add(&mut a, step);
        }
        a
    }

    fn bytes(a: &Archive) -> Vec<u8> {
        a.write(Vec::new()).unwrap()
    }

    #[test]
    fn insertion_order_does_not_change_the_bytes() {
        let forward = bytes(&sample(&[0, 1, 2, 3, 4, 5, 6]));
        let backward = bytes(&sample(&[6, 5, 4, 3, 2, 1, 0]));
        let shuffled = bytes(&sample(&[3, 0, 5, 2, 6, 1, 4]));
        assert_eq!(forward, backward);
        assert_eq!(forward, shuffled);
    }

    #[test]
    fn entries_are_sorted_with_fixed_metadata() {
        let raw = bytes(&sample(&[4, 2, 0, 6, 1, 5, 3]));
        let mut rest = raw.as_slice();
        let mut seen = Vec::new();
        loop {
            let mut r = cpio::newc::Reader::new(rest).unwrap();
            let e = r.entry().clone();
            if e.is_trailer() {
                break;
            }
            assert_eq!((e.mtime(), e.uid(), e.gid(), e.dev_major(), e.dev_minor()), (0, 0, 0, 0, 0));
            assert_eq!(e.ino() as usize, seen.len() + 1, "{}", e.name());
            let mut data = Vec::new();
            r.read_to_end(&mut data).unwrap();
            match e.name() {
                "init" => assert_eq!((e.mode(), data.as_slice()), (0o100755, &b"#!binary"[..])),
                "sbin/nodeos" => assert_eq!((e.mode(), data.as_slice()), (0o120777, &b"/init"[..])),
                "dev/console" => assert_eq!((e.mode(), e.rdev_major(), e.rdev_minor()), (0o020600, 5, 1)),
                "tmp" => assert_eq!(e.mode(), 0o041777),
                "lib" | "lib/modules" => assert_eq!(e.mode(), 0o040755),
                _ => {}
            }
            seen.push(e.name().to_owned());
            rest = r.finish().unwrap();
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted);
        assert_eq!(
            seen,
            [
                "dev",
                "dev/console",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.1.0",
                "lib/modules/6.1.0/kernel",
                "lib/modules/6.1.0/kernel/a.ko",
                "lib/modules/6.1.0/load.order",
                "proc",
                "sbin",
                "sbin/nodeos",
                "tmp"
            ]
        );
    }

    #[test]
    fn bad_paths_and_duplicates_are_refused() {
        let mut a = Archive::new();
        assert!(matches!(a.file("/init", 0o755, vec![]), Err(ArchiveError::BadPath { .. })));
        assert!(matches!(a.file("a/../b", 0o644, vec![]), Err(ArchiveError::BadPath { .. })));
        assert!(matches!(a.file("a//b", 0o644, vec![]), Err(ArchiveError::BadPath { .. })));
        a.file("init", 0o755, vec![]).unwrap();
        assert!(matches!(a.file("init", 0o755, vec![]), Err(ArchiveError::Duplicate { .. })));
        assert!(matches!(a.file("init/x", 0o644, vec![]), Err(ArchiveError::ParentNotDirectory { .. })));
        a.dir("etc", 0o755).unwrap();
        a.dir("etc", 0o700).unwrap();
        assert!(matches!(a.symlink("etc", "x"), Err(ArchiveError::Duplicate { .. })));
    }

    #[test]
    fn gzip_header_is_fixed() {
        let mut enc = gzip(Vec::new());
        enc.write_all(b"same input").unwrap();
        let out = enc.finish().unwrap();
        // ID1 ID2 CM FLG MTIME(4) XFL OS: deflate, no flags (so no name or comment), mtime 0.
        assert_eq!(&out[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&out[4..8], &[0, 0, 0, 0]);
        assert_eq!(out[8], 0, "XFL: neither the fastest nor the best level");
        assert_eq!(out[9], GZIP_OS_UNIX);
        let mut again = gzip(Vec::new());
        again.write_all(b"same input").unwrap();
        assert_eq!(out, again.finish().unwrap());
        let mut back = String::new();
        flate2::read::GzDecoder::new(out.as_slice()).read_to_string(&mut back).unwrap();
        assert_eq!(back, "same input");
    }
}
