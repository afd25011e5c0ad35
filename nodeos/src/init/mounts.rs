//! The kernel file systems and scratch space every node needs, mounted first
//! at boot. A mount point that already carries a file system (the kernel
//! mounted devtmpfs itself, or init is run twice) is left as it is.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use nix::mount::{MsFlags, mount};

/// One file system to mount.
#[derive(Debug, Clone, Copy)]
pub struct Mount {
    pub fstype: &'static str,
    pub target: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);
const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

/// In order: a later mount point may lie inside an earlier one.
pub const MOUNTS: &[Mount] = &[
    Mount { fstype: "proc", target: "/proc", flags: NOSUID_NODEV_NOEXEC, data: None },
    Mount { fstype: "sysfs", target: "/sys", flags: NOSUID_NODEV_NOEXEC, data: None },
    Mount { fstype: "devtmpfs", target: "/dev", flags: MsFlags::MS_NOSUID, data: Some("mode=0755") },
    Mount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
    },
    Mount { fstype: "tmpfs", target: "/dev/shm", flags: NOSUID_NODEV, data: Some("mode=1777") },
    Mount { fstype: "tmpfs", target: "/run", flags: NOSUID_NODEV, data: Some("mode=0755") },
    Mount { fstype: "tmpfs", target: "/tmp", flags: NOSUID_NODEV, data: Some("mode=1777") },
];

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create mount point {target}")]
    MountPoint {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: String,
        target: String,
        #[source]
        source: nix::Error,
    },
}

/// Whether `target` is a mount point: it lies on another device than its
/// parent. Every file system mounted here has a device of its own.
pub fn is_mount_point(target: &Path) -> bool {
    let parent = target.parent().unwrap_or(Path::new("/"));
    match (std::fs::metadata(target), std::fs::metadata(parent)) {
        (Ok(t), Ok(p)) => t.dev() != p.dev(),
        _ => false,
    }
}

/// Mounts `m` unless its target is already a mount point. Returns whether it
/// mounted.
pub fn ensure(m: &Mount) -> Result<bool, MountError> {
    let target = Path::new(m.target);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(target)
        .map_err(|source| MountError::MountPoint { target: m.target.to_owned(), source })?;
    if is_mount_point(target) {
        return Ok(false);
    }
    mount(Some(m.fstype), target, Some(m.fstype), m.flags, m.data).map_err(|source| MountError::Mount {
        fstype: m.fstype.to_owned(),
        target: m.target.to_owned(),
        source,
    })?;
    Ok(true)
}

/// Mounts everything in [`MOUNTS`]; a failure does not stop the rest.
pub fn mount_all() -> Vec<MountError> {
    MOUNTS.iter().filter_map(|m| ensure(m).err()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_differ_from_their_parent() {
        // /proc is a mount point on any Linux that runs these tests.
        assert!(is_mount_point(Path::new("/proc")));
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(!is_mount_point(dir.path()));
        assert!(!is_mount_point(&dir.path().join("missing")));
    }

    #[test]
    fn parents_come_first() {
        for (i, m) in MOUNTS.iter().enumerate() {
            for later in &MOUNTS[i + 1..] {
                assert!(
                    !m.target.starts_with(&format!("{}/", later.target)),
                    "{} before {}",
                    m.target,
                    later.target
                );
            }
        }
    }
}
