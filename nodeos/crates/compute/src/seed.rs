//! The cloud-init NoCloud seed: a small FAT disk image labelled `CIDATA` that
//! stock cloud images find by its label and configure themselves from.
//!
//! # Format
//! A whole-disk FAT12 (FAT16 above 4 MiB) file system, no partition table,
//! 512-byte sectors, the label `CIDATA` both in the boot sector and as the
//! volume-label entry of the root directory (fatfs writes both; util-linux's
//! blkid reports the entry as `LABEL`, the boot sector as `LABEL_FATBOOT`, and
//! cloud-init looks for either). Its root directory holds, under VFAT long names:
//! - `meta-data`: YAML with `instance-id` (the VM id), `local-hostname` when
//!   known, and `public-keys` (a list) when keys are given; every value is a
//!   double-quoted YAML scalar, so no input can change the document's shape;
//! - `user-data`: the user's bytes verbatim, or `#cloud-config\n` when none
//!   are given (cloud-init needs the file);
//! - `network-config`: only when given.
//!
//! The image is a pure function of its inputs: fixed timestamps (1980-01-01,
//! the FAT epoch), a volume serial derived from the instance id, zeroed free
//! space. A VM restart rebuilds it byte for byte, so the guest never sees its
//! seed disk change.

use std::fmt::Write as _;
use std::io::{Cursor, Write as _};
use std::path::{Path, PathBuf};

use fatfs::{Date, DateTime, FatType, FileSystem, FormatVolumeOptions, FsOptions, Time, TimeProvider};
use nodeos_types::records::VmRecord;

use crate::spec::valid_hostname;

/// The file system label cloud-init's NoCloud looks for (it also accepts `cidata`).
pub const LABEL: &[u8; 11] = b"CIDATA     ";
/// The user-data written when none is given.
pub const EMPTY_USER_DATA: &[u8] = b"#cloud-config\n";
/// Smallest image: FAT12 with 512-byte clusters.
const MIN_IMAGE: u64 = 1 << 20;
/// Largest image, FAT16 with a fixed root directory. Specs that pass
/// `spec::check` need at most 2 MiB.
pub const MAX_IMAGE: u64 = 16 << 20;
/// Room for the FATs, the root directory and cluster rounding, beyond the files.
const OVERHEAD: u64 = 128 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("the seed's files take {0} bytes; a seed image holds at most {MAX_IMAGE}")]
    TooLarge(u64),
    #[error("building the seed's FAT file system")]
    Fat(#[source] std::io::Error),
    #[error("cannot write the seed image {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What one seed says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seed {
    /// cloud-init runs its once-per-instance steps again when this changes.
    pub instance_id: String,
    pub local_hostname: Option<String>,
    pub public_keys: Vec<String>,
    /// Empty = [`EMPTY_USER_DATA`].
    pub user_data: Vec<u8>,
    pub network_config: Option<Vec<u8>>,
}

impl Seed {
    /// The seed of a VM with cloud-init data: instance id = VM id; the host
    /// name asked for, else the VM's name when that is a valid host name.
    pub fn for_vm(r: &VmRecord) -> Option<Seed> {
        let ci = r.spec.cloud_init.as_ref()?;
        let local_hostname = if !ci.hostname.is_empty() {
            Some(ci.hostname.clone())
        } else {
            valid_hostname(&r.name).then(|| r.name.clone())
        };
        Some(Seed {
            instance_id: r.id.to_string(),
            local_hostname,
            public_keys: ci.ssh_authorized_keys.clone(),
            user_data: ci.user_data.clone(),
            network_config: None,
        })
    }

    /// The `meta-data` file.
    pub fn meta_data(&self) -> String {
        let mut y = format!("instance-id: {}\n", yaml_string(&self.instance_id));
        if let Some(h) = &self.local_hostname {
            let _ = writeln!(y, "local-hostname: {}", yaml_string(h));
        }
        if !self.public_keys.is_empty() {
            y.push_str("public-keys:\n");
            for k in &self.public_keys {
                let _ = writeln!(y, "  - {}", yaml_string(k));
            }
        }
        y
    }

    /// The `user-data` file.
    pub fn user_data(&self) -> &[u8] {
        if self.user_data.is_empty() { EMPTY_USER_DATA } else { &self.user_data }
    }

    /// The files of the seed, by name, in the order they are written.
    pub fn files(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut files =
            vec![("meta-data", self.meta_data().into_bytes()), ("user-data", self.user_data().to_vec())];
        if let Some(n) = &self.network_config {
            files.push(("network-config", n.clone()));
        }
        files
    }

    /// The disk image.
    pub fn image(&self) -> Result<Vec<u8>, SeedError> {
        let files = self.files();
        // Size follows the contents (deterministically): a power of two with
        // room for every file rounded up to a cluster of the largest size used.
        let data: u64 = files.iter().map(|(_, b)| (b.len() as u64).next_multiple_of(4096)).sum();
        let size = (data + OVERHEAD).next_power_of_two().max(MIN_IMAGE);
        if size > MAX_IMAGE {
            return Err(SeedError::TooLarge(data));
        }
        let mut image = vec![0u8; usize::try_from(size).map_err(|_| SeedError::TooLarge(data))?];
        // fatfs would pick FAT16 at 4 MiB, with too few clusters for it.
        let fat_type = if size <= 4 << 20 { FatType::Fat12 } else { FatType::Fat16 };
        let options = FormatVolumeOptions::new()
            .fat_type(fat_type)
            .volume_label(*LABEL)
            .volume_id(serial(&self.instance_id))
            .total_sectors((size / 512) as u32);
        fatfs::format_volume(Cursor::new(&mut image[..]), options).map_err(SeedError::Fat)?;
        {
            let fs = FileSystem::new(Cursor::new(&mut image[..]), FsOptions::new().time_provider(&FAT_EPOCH))
                .map_err(SeedError::Fat)?;
            for (name, bytes) in &files {
                let mut f = fs.root_dir().create_file(name).map_err(SeedError::Fat)?;
                f.write_all(bytes).map_err(SeedError::Fat)?;
                f.flush().map_err(SeedError::Fat)?;
            }
            fs.unmount().map_err(SeedError::Fat)?;
        }
        Ok(image)
    }

    /// Writes the image to `path` atomically (a temporary file beside it, then
    /// a rename), so a worker never opens half a seed. Not synced: the node
    /// builds it again at every start.
    pub fn write(&self, path: &Path) -> Result<(), SeedError> {
        let image = self.image()?;
        let err = |source| SeedError::Write { path: path.to_owned(), source };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, &image).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e)
        })
    }
}

/// Every timestamp of the image: 1980-01-01 00:00:00, the FAT epoch.
#[derive(Debug)]
struct FatEpoch;

static FAT_EPOCH: FatEpoch = FatEpoch;

impl TimeProvider for FatEpoch {
    fn get_current_date(&self) -> Date {
        Date { year: 1980, month: 1, day: 1 }
    }

    fn get_current_date_time(&self) -> DateTime {
        DateTime { date: self.get_current_date(), time: Time { hour: 0, min: 0, sec: 0, millis: 0 } }
    }
}

/// The volume serial: FNV-1a of the instance id, so seeds of different VMs differ.
fn serial(instance_id: &str) -> u32 {
    instance_id.bytes().fold(0x811c_9dc5, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// A YAML double-quoted scalar holding exactly `s`: `"` and `\` escaped, and
/// every character YAML does not allow printed raw (controls, DEL, C1,
/// the BOM, U+FFFE and U+FFFF) escaped by code point.
pub fn yaml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        let printable = matches!(c, ' '..='~' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
            && c != '\u{feff}';
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if printable => out.push(c),
            c if u32::from(c) <= 0xff => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if u32::from(c) <= 0xffff => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\U{:08x}", u32::from(c));
            }
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use nodeos_types::records::{CloudInit, VmState};
    use nodeos_types::{NodeId, VmId};

    /// Files by name and contents.
    type Files = Vec<(String, Vec<u8>)>;

    /// The image's label, volume-label entry and files, read back with fatfs.
    fn read_back(image: &[u8]) -> (String, Option<String>, Files) {
        let fs = FileSystem::new(Cursor::new(image.to_vec()), FsOptions::new()).unwrap();
        let label = fs.volume_label();
        let entry = fs.read_volume_label_from_root_dir().unwrap();
        let mut files = Vec::new();
        for e in fs.root_dir().iter() {
            let e = e.unwrap();
            let mut bytes = Vec::new();
            e.to_file().read_to_end(&mut bytes).unwrap();
            files.push((e.file_name(), bytes));
        }
        (label, entry, files)
    }

    fn seed() -> Seed {
        Seed {
            instance_id: "00000000000000ab".into(),
            local_hostname: Some("web-1".into()),
            public_keys: vec![
                "ssh-ed25519 AAAAC3Nz me@host".into(),
                "ssh-rsa AAAAB3Nz \"quoted\" back\\slash 'single'".into(),
            ],
            user_data: b"#cloud-config\npackages: [nginx]\n".to_vec(),
            network_config: None,
        }
    }

    #[test]
    fn a_seed_reads_back_with_its_label_and_files() {
        let s = seed();
        let image = s.image().unwrap();
        assert_eq!(image.len() as u64, MIN_IMAGE);
        let (label, entry, files) = read_back(&image);
        assert_eq!(label, "CIDATA");
        assert_eq!(entry.as_deref(), Some("CIDATA"));
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["meta-data", "user-data"], "long names, volume label entry skipped");
        assert_eq!(files[1].1, s.user_data);
        assert_eq!(
            String::from_utf8(files[0].1.clone()).unwrap(),
            "instance-id: \"00000000000000ab\"\n\
             local-hostname: \"web-1\"\n\
             public-keys:\n  \
             - \"ssh-ed25519 AAAAC3Nz me@host\"\n  \
             - \"ssh-rsa AAAAB3Nz \\\"quoted\\\" back\\\\slash 'single'\"\n"
        );
        assert_eq!(&image[0x36..0x3e], b"FAT12   ");
        assert_eq!(&image[0x2b..0x36], LABEL, "boot sector label");
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes_and_other_vms_other_serials() {
        let a = seed().image().unwrap();
        assert_eq!(a, seed().image().unwrap());
        let b = Seed { instance_id: "00000000000000ac".into(), ..seed() }.image().unwrap();
        assert_ne!(a[0x27..0x2b], b[0x27..0x2b], "volume serial");
    }

    #[test]
    fn empty_user_data_becomes_cloud_config_and_network_config_is_optional() {
        let s = Seed {
            public_keys: vec![],
            local_hostname: None,
            user_data: vec![],
            network_config: Some(b"version: 2\n".to_vec()),
            ..seed()
        };
        let (_, _, files) = read_back(&s.image().unwrap());
        let by_name = |n: &str| files.iter().find(|(f, _)| f == n).map(|(_, b)| b.clone());
        assert_eq!(by_name("user-data").as_deref(), Some(EMPTY_USER_DATA));
        assert_eq!(by_name("network-config").as_deref(), Some(&b"version: 2\n"[..]));
        assert_eq!(by_name("meta-data").as_deref(), Some(&b"instance-id: \"00000000000000ab\"\n"[..]));
    }

    #[test]
    fn large_seeds_grow_the_image_and_too_large_ones_are_refused() {
        let s =
            Seed { user_data: vec![b'x'; 64 << 10], public_keys: vec!["k".repeat(16 << 10); 32], ..seed() };
        let image = s.image().unwrap();
        assert_eq!(image.len() as u64, 1 << 20, "64 KiB + 512 KiB fits the smallest image");
        let (_, _, files) = read_back(&image);
        assert_eq!(files[1].1.len(), 64 << 10);
        let big = Seed { user_data: vec![b'x'; 3 << 20], ..seed() };
        let (label, _, files) = read_back(&big.image().unwrap());
        assert_eq!((label.as_str(), files[1].1.len()), ("CIDATA", 3 << 20));
        assert!(matches!(
            Seed { user_data: vec![0; 16 << 20], ..seed() }.image(),
            Err(SeedError::TooLarge(_))
        ));
    }

    /// dosfstools' own checker finds nothing to repair: FAT12 and FAT16
    /// images, long names, the volume-label entry.
    #[test]
    fn fsck_fat_finds_the_images_clean() {
        let test = "seed::tests::fsck_fat_finds_the_images_clean";
        if std::process::Command::new("fsck.fat").arg("--help").output().is_err() {
            return nodeos_types::testing::skip(test, "no fsck.fat (dosfstools; scripts/test-deps.sh)");
        }
        let d = tempfile::tempdir().unwrap();
        let with_net = Seed { network_config: Some(b"version: 2\n".to_vec()), ..seed() };
        for (i, s) in [seed(), with_net, Seed { user_data: vec![b'x'; 6 << 20], ..seed() }].iter().enumerate()
        {
            let path = d.path().join(format!("seed{i}.img"));
            s.write(&path).unwrap();
            let out = std::process::Command::new("fsck.fat").arg("-n").arg(&path).output().unwrap();
            let text =
                String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "fsck.fat on seed {i}: {text}");
            // Its version, then the summary: any remark in between is a fault it found.
            let lines: Vec<&str> = text.lines().collect();
            assert!(lines.len() == 2 && lines[1].contains(" files, "), "fsck.fat on seed {i}: {text}");
        }
    }

    #[test]
    fn yaml_strings_escape_what_yaml_cannot_hold_raw() {
        assert_eq!(yaml_string("plain text"), "\"plain text\"");
        assert_eq!(yaml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(yaml_string("tab\there\n"), "\"tab\\x09here\\x0a\"");
        assert_eq!(yaml_string("\u{7f}\u{85}\u{feff}\u{ffff}é😀"), "\"\\x7f\\x85\\ufeff\\uffffé😀\"");
        // Looks like YAML of other types, stays a string.
        assert_eq!(yaml_string("yes"), "\"yes\"");
        assert_eq!(yaml_string("- [x]: {y}"), "\"- [x]: {y}\"");
    }

    #[test]
    fn a_vm_seed_defaults_its_host_name_to_the_vm_name() {
        let spec = crate::records::test_spec();
        let mut r = crate::records::new_record(VmId(0xab), "web-1", spec, NodeId(1));
        r.state = VmState::Stopped;
        assert_eq!(Seed::for_vm(&r), None, "no cloud-init, no seed");
        r.spec.cloud_init = Some(CloudInit::default());
        let s = Seed::for_vm(&r).unwrap();
        assert_eq!(
            (s.instance_id.as_str(), s.local_hostname.as_deref()),
            ("00000000000000ab", Some("web-1"))
        );
        r.name = "under_score".into();
        assert_eq!(Seed::for_vm(&r).unwrap().local_hostname, None, "not a host name: left to the image");
        r.spec.cloud_init = Some(CloudInit { hostname: "db.example.org".into(), ..CloudInit::default() });
        assert_eq!(Seed::for_vm(&r).unwrap().local_hostname.as_deref(), Some("db.example.org"));
    }

    #[test]
    fn writing_replaces_the_file_whole() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("cidata.img");
        std::fs::write(&path, b"old").unwrap();
        seed().write(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), seed().image().unwrap());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "no temporary file left");
        let e = seed().write(&d.path().join("no/such/dir/cidata.img")).unwrap_err();
        assert!(matches!(e, SeedError::Write { .. }), "{e:?}");
    }
}
