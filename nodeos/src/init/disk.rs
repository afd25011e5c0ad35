//! The data disk: an ext4 file system found by its volume label and mounted at
//! [`DATA_MOUNT`], where the node daemon keeps its identity and state.
//!
//! Every whole disk and partition in `/sys/block` is read (its first 2 KiB
//! through `/dev`); the ext4 superblock starts at byte 1024, holds the magic
//! 0xEF53 (little endian) at offset 56 and the NUL-padded 16-byte volume label
//! at offset 120. The first device in name order whose label matches is
//! mounted. Block devices can show up a little after their driver loads, so
//! the search is repeated for a while before giving up. With no such disk
//! (or `nodeos.data=ram`), a tmpfs is mounted there instead and the console
//! says loudly that the state is lost at reboot.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use tracing::{info, warn};

use super::cmdline::DataConfig;

/// Where the node's state lives.
pub const DATA_MOUNT: &str = "/var/lib/nodeos";
/// How long to look for a labelled disk before falling back to RAM.
pub const WAIT_FOR_DISK: Duration = Duration::from_secs(10);
const SUPERBLOCK_AT: usize = 1024;
const MAGIC_AT: usize = 56;
const EXT_MAGIC: u16 = 0xEF53;
const LABEL_AT: usize = 120;
const LABEL_LEN: usize = 16;
/// Bytes read from each device: enough to hold the label.
pub const PROBE_LEN: usize = SUPERBLOCK_AT + LABEL_AT + LABEL_LEN;
/// Devices never searched: RAM disks, network block devices (reading an
/// unconnected one can hang), optical and floppy drives. Loop devices are
/// searched: a node image run in a container or test harness gets its data
/// disk that way.
const SKIP_PREFIXES: &[&str] = &["ram", "zram", "nbd", "sr", "fd"];
const MOUNT_TRIES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot create {0}")]
    MountPoint(String, #[source] std::io::Error),
    #[error("cannot mount {device} (ext4) on {DATA_MOUNT}")]
    Mount {
        device: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot mount a tmpfs on {DATA_MOUNT}")]
    Tmpfs(#[source] nix::Error),
}

/// Where the node's state ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDisk {
    /// The labelled disk, mounted at [`DATA_MOUNT`]; unmounted at shutdown.
    Mounted { device: PathBuf },
    /// A tmpfs: everything is lost at reboot.
    Ram,
}

/// The ext volume label in the first bytes of a device, if they hold an
/// ext2/3/4 superblock.
pub fn ext_label(head: &[u8]) -> Option<String> {
    let sb = head.get(SUPERBLOCK_AT..PROBE_LEN)?;
    let magic = u16::from_le_bytes([sb[MAGIC_AT], sb[MAGIC_AT + 1]]);
    if magic != EXT_MAGIC {
        return None;
    }
    let raw = &sb[LABEL_AT..LABEL_AT + LABEL_LEN];
    let end = raw.iter().position(|b| *b == 0).unwrap_or(LABEL_LEN);
    Some(String::from_utf8_lossy(&raw[..end]).into_owned())
}

/// Reads the ext volume label of a device or image file.
pub fn read_label(dev: &Path) -> std::io::Result<Option<String>> {
    let mut head = Vec::with_capacity(PROBE_LEN);
    File::open(dev)?.take(PROBE_LEN as u64).read_to_end(&mut head)?;
    Ok(ext_label(&head))
}

/// Names of the block devices to search under `sys_block` (`/sys/block`):
/// each disk, then its partitions, in name order.
pub fn block_devices(sys_block: &Path) -> Vec<String> {
    let mut disks: Vec<String> = std::fs::read_dir(sys_block)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !SKIP_PREFIXES.iter().any(|p| n.starts_with(p)))
        .collect();
    disks.sort();
    let mut out = Vec::new();
    for disk in disks {
        let mut parts: Vec<String> = std::fs::read_dir(sys_block.join(&disk))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("partition").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        parts.sort();
        out.push(disk);
        out.extend(parts);
    }
    out
}

/// Devices under `dev_dir` whose ext label is `label`, in search order.
pub fn find_labelled(sys_block: &Path, dev_dir: &Path, label: &str) -> Vec<PathBuf> {
    block_devices(sys_block)
        .into_iter()
        .map(|n| dev_dir.join(n))
        .filter(|p| matches!(read_label(p), Ok(Some(l)) if l == label))
        .collect()
}

fn mount_point() -> Result<(), DiskError> {
    std::fs::create_dir_all(DATA_MOUNT).map_err(|e| DiskError::MountPoint(DATA_MOUNT.into(), e))
}

fn mount_ext4(device: &Path) -> Result<(), DiskError> {
    mount_point()?;
    mount(Some(device), DATA_MOUNT, Some("ext4"), MsFlags::MS_NOATIME, None::<&str>)
        .map_err(|source| DiskError::Mount { device: device.display().to_string(), source })
}

fn mount_tmpfs() -> Result<(), DiskError> {
    mount_point()?;
    mount(Some("tmpfs"), DATA_MOUNT, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0700"))
        .map_err(DiskError::Tmpfs)
}

/// Finds and mounts the data disk, or RAM. Never fails: a RAM data dir is
/// the last resort and the console says so.
pub fn prepare(cfg: &DataConfig) -> DataDisk {
    if super::mounts::is_mount_point(Path::new(DATA_MOUNT)) {
        info!(path = DATA_MOUNT, "data dir already mounted");
        return DataDisk::Mounted { device: PathBuf::from("(mounted before init)") };
    }
    let label = match cfg {
        DataConfig::Label(l) => l,
        DataConfig::Ram => {
            ram("nodeos.data=ram was given");
            return DataDisk::Ram;
        }
    };
    info!(label = %label, wait_s = WAIT_FOR_DISK.as_secs(), "looking for the data disk");
    let started = Instant::now();
    let found = loop {
        let found = find_labelled(Path::new("/sys/block"), Path::new("/dev"), label);
        if !found.is_empty() || started.elapsed() >= WAIT_FOR_DISK {
            break found;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let Some(device) = found.first() else {
        ram(&format!(
            "no disk or partition holds an ext4 file system labelled {label:?} (make one with: mkfs.ext4 -L {label} /dev/DISK)"
        ));
        return DataDisk::Ram;
    };
    if found.len() > 1 {
        warn!(using = %device.display(), ignored = ?found[1..], "several file systems carry the data label; using the first");
    }
    for attempt in 1..=MOUNT_TRIES {
        match mount_ext4(device) {
            Ok(()) => {
                info!(device = %device.display(), path = DATA_MOUNT, "data disk mounted");
                return DataDisk::Mounted { device: device.clone() };
            }
            Err(e) => {
                warn!(attempt, error = %super::chain(&e), "data disk does not mount");
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
    ram(&format!("the data disk {} does not mount (see above)", device.display()));
    DataDisk::Ram
}

fn ram(why: &str) {
    if let Err(e) = mount_tmpfs() {
        warn!(error = %super::chain(&e), "no tmpfs for the data dir; using the root file system (RAM too)");
    }
    warn!("================================================================");
    warn!("NO DATA DISK: {why}.");
    warn!("This node's state lives in RAM at {DATA_MOUNT} and is LOST AT REBOOT.");
    warn!("================================================================");
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn superblock(label: &[u8], magic: u16) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[SUPERBLOCK_AT + MAGIC_AT..SUPERBLOCK_AT + MAGIC_AT + 2].copy_from_slice(&magic.to_le_bytes());
        b[SUPERBLOCK_AT + LABEL_AT..SUPERBLOCK_AT + LABEL_AT + label.len()].copy_from_slice(label);
        b
    }

    #[test]
    fn labels_from_bytes() {
        assert_eq!(ext_label(&superblock(b"nodeos-data", EXT_MAGIC)).as_deref(), Some("nodeos-data"));
        assert_eq!(
            ext_label(&superblock(b"sixteen-bytes-xy", EXT_MAGIC)).as_deref(),
            Some("sixteen-bytes-xy")
        );
        assert_eq!(ext_label(&superblock(b"", EXT_MAGIC)).as_deref(), Some(""));
        assert_eq!(ext_label(&superblock(b"nodeos-data", 0x1234)), None);
        assert_eq!(ext_label(&superblock(b"nodeos-data", EXT_MAGIC)[..PROBE_LEN - 1]), None);
        assert_eq!(ext_label(&[]), None);
    }

    /// A fake /sys/block and /dev: whole disks, partitions, and devices
    /// that are never searched.
    #[test]
    fn finds_the_labelled_disk_or_partition() {
        let root = tempfile::tempdir().expect("temp dir");
        let sys = root.path().join("sys/block");
        let dev = root.path().join("dev");
        std::fs::create_dir_all(&dev).expect("dev");
        for d in ["vda", "vdb", "sda", "zram0"] {
            std::fs::create_dir_all(sys.join(d)).expect("disk");
        }
        for p in ["vdb1", "vdb2"] {
            std::fs::create_dir_all(sys.join("vdb").join(p)).expect("part");
            std::fs::write(sys.join("vdb").join(p).join("partition"), "1\n").expect("partition");
        }
        // Not a partition: a queue directory.
        std::fs::create_dir_all(sys.join("vdb/queue")).expect("queue");
        assert_eq!(block_devices(&sys), vec!["sda", "vda", "vdb", "vdb1", "vdb2"]);
        std::fs::write(dev.join("vda"), superblock(b"other", EXT_MAGIC)).expect("vda");
        std::fs::write(dev.join("vdb"), vec![0u8; 4096]).expect("vdb");
        std::fs::write(dev.join("vdb2"), superblock(b"nodeos-data", EXT_MAGIC)).expect("vdb2");
        std::fs::write(dev.join("zram0"), superblock(b"nodeos-data", EXT_MAGIC)).expect("zram0");
        // sda and vdb1 have no device node: skipped without error.
        assert_eq!(find_labelled(&sys, &dev, "nodeos-data"), vec![dev.join("vdb2")]);
        assert_eq!(find_labelled(&sys, &dev, "other"), vec![dev.join("vda")]);
        assert!(find_labelled(&sys, &dev, "none").is_empty());
    }

    /// The byte reader against what mkfs.ext4 writes, when e2fsprogs is there.
    #[test]
    fn reads_a_label_made_by_mkfs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let img = dir.path().join("disk.img");
        let made =
            Command::new("mkfs.ext4").args(["-q", "-F", "-L", "nodeos-data"]).arg(&img).arg("4M").status();
        match made {
            Ok(s) if s.success() => {}
            _ => {
                nodeos_types::testing::skip("data disk label", "mkfs.ext4 is not available");
                return;
            }
        }
        assert_eq!(read_label(&img).expect("read").as_deref(), Some("nodeos-data"));
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, vec![0u8; 8192]).expect("empty");
        assert_eq!(read_label(&empty).expect("read"), None);
    }
}
