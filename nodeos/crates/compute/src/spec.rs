//! Checks of a requested VM against the host and the VMM's rules, before
//! anything is recorded: its kernel (a file's headers read here, or an
//! image's facts recorded at upload) must boot with its memory, initramfs and
//! command line as the VMM's loader will place them.

use nodeos_types::records::{CloudInit, ImageKind, ImageRecord, KernelInfo, VmSpec, image_ref};
use nodeos_vmm::boot::probe::{self, FitError, KernelError};
use nodeos_vmm::config::{MAX_CMDLINE, MAX_DISKS, MAX_NICS, MAX_VCPUS};
use nodeos_vmm::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};

/// Which files of its node a VM may be made of: kernels, initramfs images and
/// disks given as host paths rather than pool images and volumes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HostPaths {
    /// None (the default): pool images and volumes only.
    #[default]
    Off,
    /// Regular files under this directory, symlinks resolved; never a device.
    Under(std::path::PathBuf),
}

/// The host paths a spec names, with the flag each comes from.
pub fn host_paths(spec: &VmSpec) -> Vec<(&'static str, &str)> {
    let mut out = Vec::new();
    if image_ref(&spec.kernel).is_none() {
        out.push(("--kernel", spec.kernel.as_str()));
    }
    if let Some(i) = spec.initrd.as_deref().filter(|i| image_ref(i).is_none()) {
        out.push(("--initrd", i));
    }
    out.extend(spec.disks.iter().filter(|d| d.volume.is_none()).map(|d| ("--disk", d.path.as_str())));
    out
}

/// Refuses host paths the node's policy does not allow, before any of them
/// is opened: none at all by default; under `--host-images-dir` only regular
/// files whose real path (symlinks resolved) lies in that directory; a device
/// never. A path outside the directory is refused by its words alone, so the
/// answer says nothing about files elsewhere on the node.
pub fn check_host_paths(spec: &VmSpec, policy: &HostPaths) -> Result<(), SpecError> {
    use std::os::unix::fs::FileTypeExt;
    use std::path::{Component, Path};
    for (flag, path) in host_paths(spec) {
        let owned = || path.to_owned();
        let dir = match policy {
            HostPaths::Off => return Err(SpecError::HostPathsOff { flag, path: owned() }),
            HostPaths::Under(dir) => dir,
        };
        let outside = || SpecError::HostPathOutside { flag, path: owned(), dir: dir.display().to_string() };
        let p = Path::new(path);
        if path.starts_with("/dev/") || path == "/dev" {
            return Err(SpecError::HostDevice { flag, path: owned() });
        }
        if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) || !p.starts_with(dir) {
            return Err(outside());
        }
        let real = std::fs::canonicalize(p).map_err(|e| SpecError::File {
            flag,
            path: owned(),
            why: e.to_string(),
        })?;
        let real_dir = std::fs::canonicalize(dir).map_err(|_| outside())?;
        if !real.starts_with(&real_dir) {
            return Err(outside());
        }
        let kind = std::fs::metadata(&real)
            .map_err(|e| SpecError::File { flag, path: owned(), why: e.to_string() })?
            .file_type();
        if real.starts_with("/dev") || kind.is_block_device() || kind.is_char_device() {
            return Err(SpecError::HostDevice { flag, path: owned() });
        }
    }
    Ok(())
}

/// Largest cloud-init user-data, bytes. OpenStack's limit (EC2 takes 16 KiB):
/// room for real `#cloud-config` files and scripts, while a VM record with
/// it stays far below the metadata store's value limit.
pub const MAX_USER_DATA: usize = 64 * 1024;
/// Most SSH keys a VM's cloud-init data may carry.
pub const MAX_SSH_KEYS: usize = 32;
/// Longest SSH public key line, bytes (a 16384-bit RSA key is about 2.8 KiB).
pub const MAX_SSH_KEY: usize = 16 * 1024;
/// Key types an SSH public key line may start with: what OpenSSH accepts
/// today in `authorized_keys`, DSA left out.
pub const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];
/// Longest host name (RFC 1123 with RFC 1035's limit) and label.
const MAX_HOSTNAME: usize = 253;
const MAX_LABEL: usize = 63;

/// A refused spec. Messages use the command line's words (`--kernel`,
/// `--memory`, ...), which is how people write specs; the API's fields carry
/// the same names without the dashes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "{flag} {path:?}: this node takes no host files for VMs; upload it as a pool image \
         (`nodeos image upload`, then {flag} image:NAME) or use a volume, or start the node \
         with --host-images-dir DIR to allow files under DIR"
    )]
    HostPathsOff { flag: &'static str, path: String },
    #[error("{flag} {path:?} is outside this node's host images directory {dir:?}")]
    HostPathOutside { flag: &'static str, path: String, dir: String },
    #[error("{flag} {path:?} is a device: host devices are never taken for VMs; make a volume")]
    HostDevice { flag: &'static str, path: String },
    #[error("name must be 1..=63 characters of a-z, 0-9, '-' and '_', got {0:?}")]
    Name(String),
    #[error("--vcpus must be 1..={MAX_VCPUS}, got {0}")]
    Vcpus(u32),
    #[error("--memory must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB, got {0}")]
    Memory(u64),
    #[error("--memory {want} MiB is more than this host has available ({available} MiB)")]
    NoMemory { want: u64, available: u64 },
    #[error("{flag} {path:?} cannot be read: {why}")]
    File { flag: &'static str, path: String, why: String },
    #[error("{flag} image {image:?}: no such image in this pool")]
    NoImage { flag: &'static str, image: String },
    #[error(
        "{flag} image {image:?} is {} {kind} image; {flag} takes {} {wanted} image",
        article(kind),
        article(wanted)
    )]
    ImageKind { flag: &'static str, image: String, kind: &'static str, wanted: &'static str },
    #[error("{kernel} is not bootable: {why}")]
    Kernel { kernel: String, why: String },
    #[error(
        "{kernel} needs {} of guest memory below 3 GiB; a VM with {memory_mib} MiB of memory has {}",
        size_text(*needs), size_text(*has)
    )]
    KernelMemory { kernel: String, needs: u64, memory_mib: u64, has: u64 },
    #[error(
        "{kernel} needs guest memory up to {}, past the first GiB that its 64-bit entry finds mapped",
        size_text(*needs)
    )]
    IdentityMap { kernel: String, needs: u64 },
    #[error(
        "{initrd} is {}; a VM with {memory_mib} MiB of memory takes at most {} beside its kernel",
        size_text(*size), size_text(*room)
    )]
    Initrd { initrd: String, size: u64, memory_mib: u64, room: u64 },
    #[error("--cmdline is {0} bytes; the limit is {MAX_CMDLINE}")]
    Cmdline(usize),
    #[error("--cmdline is {len} bytes; {kernel} takes at most {max}")]
    KernelCmdline { len: usize, max: usize, kernel: String },
    #[error("the {} --disk needs exactly one of a file path and a volume", nth(*index))]
    Disk { index: usize },
    #[error("at most {MAX_DISKS} --disk and {MAX_NICS} --nic")]
    TooMany,
    #[error(
        "at most {most} --disk with cloud-init (its seed is one more disk), got {0}",
        most = MAX_DISKS - 1
    )]
    SeedDisk(usize),
    #[error("--user-data is {0} bytes; the NoCloud limit is {MAX_USER_DATA} (64 KiB)")]
    UserData(usize),
    #[error(
        "--hostname {0:?} is not a host name: dot-separated labels of 1..={MAX_LABEL} letters, \
         digits and '-' (not first or last), at most {MAX_HOSTNAME} characters"
    )]
    Hostname(String),
    #[error("--ssh-key gives {0} keys; the limit is {MAX_SSH_KEYS}")]
    SshKeys(usize),
    #[error("--ssh-key: the {} key {fault}", nth(*index))]
    SshKey { index: usize, fault: KeyFault },
    #[error("the {} --nic: mac {mac:?} is not a unicast aa:bb:cc:dd:ee:ff address", nth(*index))]
    Mac { index: usize, mac: String },
    #[error(
        "the {} --nic: tap {tap:?} must be 1..=15 characters of a-z, A-Z, 0-9, '-', '_' and '.'",
        nth(*index)
    )]
    Tap { index: usize, tap: String },
}

/// "1st", "2nd", ... for the item at `index` (from 0).
fn nth(index: usize) -> String {
    let n = index + 1;
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// "a" or "an" before `word`.
pub(crate) fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" }
}

/// Bytes in the largest binary unit that keeps the number at least 1, with
/// the exact count when the unit rounds it.
pub fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["bytes", "KiB", "MiB", "GiB"];
    let unit = (0..UNITS.len()).rev().find(|u| bytes >= 1 << (10 * u)).unwrap_or(0);
    let scale = 1u64 << (10 * unit);
    if bytes.is_multiple_of(scale) {
        format!("{} {}", bytes / scale, UNITS[unit])
    } else {
        format!("{:.1} {} ({bytes} bytes)", bytes as f64 / scale as f64, UNITS[unit])
    }
}

/// The pool images a spec names (`image:` kernel or initrd), as found
/// before the check; a name not found is left out, and the check says so.
#[derive(Debug, Clone, Default)]
pub struct SpecImages {
    pub kernel: Option<ImageRecord>,
    pub initrd: Option<ImageRecord>,
}

/// What is wrong with one SSH public key line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyFault {
    #[error("is {0} bytes; the limit is {MAX_SSH_KEY}")]
    Length(usize),
    #[error("must be one line of text: no NUL, CR, LF or other control characters")]
    NotOneLine,
    #[error("must be a key type ({}) followed by the key's base64 data", SSH_KEY_TYPES.join(", "))]
    Format,
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Parses `aa:bb:cc:dd:ee:ff` into bytes; unicast and non-zero only.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        mac[i] = u8::from_str_radix(p, 16).ok()?;
    }
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// An RFC 1123 host name: dot-separated labels of letters, digits and '-',
/// none starting or ending with '-'.
pub fn valid_hostname(h: &str) -> bool {
    let label = |l: &str| {
        (1..=MAX_LABEL).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    h.len() <= MAX_HOSTNAME && h.split('.').all(label)
}

/// An OpenSSH public key line as `authorized_keys` takes it, without options:
/// `TYPE BASE64 [COMMENT]`.
pub fn check_ssh_key(key: &str) -> Result<(), KeyFault> {
    if key.len() > MAX_SSH_KEY {
        return Err(KeyFault::Length(key.len()));
    }
    // Tabs separate fields as spaces do; every other control character would
    // end or corrupt the line in authorized_keys and the seed's YAML.
    if key.chars().any(|c| c.is_control() && c != '\t') {
        return Err(KeyFault::NotOneLine);
    }
    let mut fields = key.split([' ', '\t']).filter(|f| !f.is_empty());
    let kind = fields.next().unwrap_or_default();
    let data = fields.next().unwrap_or_default();
    let base64 = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=');
    if !SSH_KEY_TYPES.contains(&kind) || data.is_empty() || !data.bytes().all(base64) {
        return Err(KeyFault::Format);
    }
    Ok(())
}

fn check_cloud_init(ci: &CloudInit) -> Result<(), SpecError> {
    if ci.user_data.len() > MAX_USER_DATA {
        return Err(SpecError::UserData(ci.user_data.len()));
    }
    if !ci.hostname.is_empty() && !valid_hostname(&ci.hostname) {
        return Err(SpecError::Hostname(ci.hostname.clone()));
    }
    if ci.ssh_authorized_keys.len() > MAX_SSH_KEYS {
        return Err(SpecError::SshKeys(ci.ssh_authorized_keys.len()));
    }
    for (index, key) in ci.ssh_authorized_keys.iter().enumerate() {
        check_ssh_key(key).map_err(|fault| SpecError::SshKey { index, fault })?;
    }
    Ok(())
}

fn valid_tap(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 15
        && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn readable(flag: &'static str, path: &str) -> Result<std::fs::File, SpecError> {
    let err = |why: String| SpecError::File { flag, path: path.to_owned(), why };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| err(e.to_string()))
}

/// The kernel a spec boots: how the command line names it, and what it needs
/// (read from the file's headers here, or recorded with the image).
fn boot_kernel(spec: &VmSpec, images: &SpecImages) -> Result<(String, KernelInfo), SpecError> {
    const FLAG: &str = "--kernel";
    let Some(wanted) = image_ref(&spec.kernel) else {
        let label = format!("{FLAG} {:?}", spec.kernel);
        let mut f = readable(FLAG, &spec.kernel)?;
        let info = probe::probe(&mut f).map_err(|e| match e {
            KernelError::Read(io) => {
                SpecError::File { flag: FLAG, path: spec.kernel.clone(), why: io.to_string() }
            }
            e => SpecError::Kernel { kernel: label.clone(), why: e.to_string() },
        })?;
        return Ok((label, info));
    };
    let image = image_of(FLAG, wanted, images.kernel.as_ref(), ImageKind::Kernel)?;
    let label = format!("{FLAG} image {:?}", image.name);
    // Every kernel image was probed at upload; a record without the result is not one.
    let info = image.kernel.ok_or_else(|| SpecError::Kernel {
        kernel: label.clone(),
        why: "its record holds no kernel facts; upload it again".into(),
    })?;
    Ok((label, info))
}

/// The initramfs a spec boots: how the command line names it, and its size.
fn boot_initrd(source: &str, images: &SpecImages) -> Result<(String, u64), SpecError> {
    const FLAG: &str = "--initrd";
    let Some(wanted) = image_ref(source) else {
        let f = readable(FLAG, source)?;
        let size = f.metadata().map(|m| m.len()).map_err(|e| SpecError::File {
            flag: FLAG,
            path: source.to_owned(),
            why: e.to_string(),
        })?;
        return Ok((format!("{FLAG} {source:?}"), size));
    };
    let image = image_of(FLAG, wanted, images.initrd.as_ref(), ImageKind::Initrd)?;
    Ok((format!("{FLAG} image {:?}", image.name), image.size_bytes))
}

/// The image found for `wanted`, if it is of the kind `flag` takes.
fn image_of<'a>(
    flag: &'static str,
    wanted: &str,
    found: Option<&'a ImageRecord>,
    kind: ImageKind,
) -> Result<&'a ImageRecord, SpecError> {
    let image = found.ok_or_else(|| SpecError::NoImage { flag, image: wanted.to_owned() })?;
    if image.kind != kind {
        return Err(SpecError::ImageKind {
            flag,
            image: image.name.clone(),
            kind: image.kind.as_str(),
            wanted: kind.as_str(),
        });
    }
    Ok(image)
}

/// Checks that the kernel boots with the spec's memory, initramfs and
/// command line, by the VMM loader's rules.
fn check_boot(spec: &VmSpec, images: &SpecImages) -> Result<(), SpecError> {
    let (kernel, info) = boot_kernel(spec, images)?;
    let initrd = spec.initrd.as_deref().map(|i| boot_initrd(i, images)).transpose()?;
    let memory_mib = spec.memory_mib;
    probe::check_fit(&info, memory_mib, initrd.as_ref().map(|(_, size)| *size), spec.cmdline.len()).map_err(
        |e| match e {
            FitError::Memory { needs, low_ram } => {
                SpecError::KernelMemory { kernel, needs, memory_mib, has: low_ram }
            }
            FitError::IdentityMap { needs } => SpecError::IdentityMap { kernel, needs },
            FitError::Initrd { size, room } => SpecError::Initrd {
                initrd: initrd.map(|(label, _)| label).unwrap_or_default(),
                size,
                memory_mib,
                room,
            },
            FitError::Cmdline { len, max } => SpecError::KernelCmdline { len, max, kernel },
        },
    )
}

/// MemAvailable of this host, MiB.
pub fn host_available_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Checks a spec as given, with the pool images it names found beforehand;
/// memory availability is checked again at start.
pub fn check(name: &str, spec: &VmSpec, images: &SpecImages) -> Result<(), SpecError> {
    if !valid_name(name) {
        return Err(SpecError::Name(name.to_owned()));
    }
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(SpecError::Vcpus(spec.vcpus.into()));
    }
    check_memory(spec.memory_mib)?;
    if spec.cmdline.len() > MAX_CMDLINE {
        return Err(SpecError::Cmdline(spec.cmdline.len()));
    }
    if spec.disks.len() > MAX_DISKS || spec.nics.len() > MAX_NICS {
        return Err(SpecError::TooMany);
    }
    if let Some(ci) = &spec.cloud_init {
        if spec.disks.len() >= MAX_DISKS {
            return Err(SpecError::SeedDisk(spec.disks.len()));
        }
        check_cloud_init(ci)?;
    }
    check_boot(spec, images)?;
    for (index, d) in spec.disks.iter().enumerate() {
        match (&d.volume, d.path.is_empty()) {
            (Some(_), true) => {}
            (None, false) => {
                readable("--disk", &d.path)?;
            }
            _ => return Err(SpecError::Disk { index }),
        }
    }
    for (index, n) in spec.nics.iter().enumerate() {
        if parse_mac(&n.mac).is_none() {
            return Err(SpecError::Mac { index, mac: n.mac.clone() });
        }
        if n.port.is_none() && !valid_tap(&n.tap) {
            return Err(SpecError::Tap { index, tap: n.tap.clone() });
        }
    }
    Ok(())
}

pub fn check_memory(mib: u64) -> Result<(), SpecError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(SpecError::Memory(mib));
    }
    if let Some(available) = host_available_mib()
        && mib > available
    {
        return Err(SpecError::NoMemory { want: mib, available });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_are_refused_unless_under_the_configured_directory() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let inside = dir.path().join("k.elf");
        std::fs::write(&inside, b"k").expect("the kernel file written");
        let spec = |kernel: &str, disk: Option<&str>| VmSpec {
            kernel: kernel.into(),
            disks: disk
                .map(|d| {
                    vec![nodeos_types::records::DiskSpec { path: d.into(), read_only: false, volume: None }]
                })
                .unwrap_or_default(),
            ..crate::records::test_spec()
        };
        let k = inside.display().to_string();
        let off = HostPaths::Off;
        assert!(matches!(check_host_paths(&spec(&k, None), &off), Err(SpecError::HostPathsOff { .. })));
        assert_eq!(check_host_paths(&spec("image:k", None), &off), Ok(()), "pool images need no host path");
        let under = HostPaths::Under(dir.path().to_owned());
        assert_eq!(check_host_paths(&spec(&k, None), &under), Ok(()));
        for bad in ["/etc/passwd", "relative.img"] {
            assert!(
                matches!(
                    check_host_paths(&spec(&k, Some(bad)), &under),
                    Err(SpecError::HostPathOutside { .. })
                ),
                "{bad}"
            );
        }
        let escape = format!("{}/../../etc/passwd", dir.path().display());
        assert!(matches!(
            check_host_paths(&spec(&escape, None), &under),
            Err(SpecError::HostPathOutside { .. })
        ));
        // A symlink inside that points out.
        let link = dir.path().join("out");
        std::os::unix::fs::symlink("/etc/passwd", &link).expect("the symlink made");
        let link = link.display().to_string();
        assert!(matches!(
            check_host_paths(&spec(&link, None), &under),
            Err(SpecError::HostPathOutside { .. })
        ));
        // A device, even where the directory would take it.
        let root = HostPaths::Under("/".into());
        for dev in ["/dev/null", "/dev/sda"] {
            assert!(
                matches!(check_host_paths(&spec(&k, Some(dev)), &root), Err(SpecError::HostDevice { .. })),
                "{dev}"
            );
        }
    }
    use nodeos_types::records::{DiskSpec, KernelFormat, NicSpec};
    use nodeos_types::{ImageId, VolumeId};
    use nodeos_vmm::boot::testdata::{BzImageSpec, Segment, elf};

    /// A bzImage that needs the first 20 MiB of guest memory.
    fn bzimage(d: &tempfile::TempDir) -> String {
        let p = d.path().join("bzImage");
        std::fs::write(&p, BzImageSpec::default().build()).unwrap();
        p.display().to_string()
    }

    fn check(name: &str, spec: &VmSpec) -> Result<(), SpecError> {
        super::check(name, spec, &SpecImages::default())
    }

    fn spec(kernel: &str) -> VmSpec {
        VmSpec {
            vcpus: 1,
            memory_mib: 64,
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            disks: vec![],
            nics: vec![],
            cloud_init: None,
        }
    }

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9vb29vb29vb29vb29vb29vb29vb29vb29vb29vb29v me@host";

    fn with_cloud_init(k: &str, ci: CloudInit) -> VmSpec {
        VmSpec { cloud_init: Some(ci), ..spec(k) }
    }

    #[test]
    fn bad_specs_name_the_field() {
        let d = tempfile::tempdir().unwrap();
        let junk = d.path().join("junk");
        std::fs::write(&junk, b"hello").unwrap();
        let k = bzimage(&d);
        assert_eq!(check("vm1", &spec(&k)), Ok(()));
        assert!(matches!(check("VM 1", &spec(&k)), Err(SpecError::Name(_))));
        assert_eq!(check("vm1", &VmSpec { vcpus: 0, ..spec(&k) }), Err(SpecError::Vcpus(0)));
        assert_eq!(check("vm1", &VmSpec { memory_mib: 1, ..spec(&k) }), Err(SpecError::Memory(1)));
        assert!(matches!(
            check("vm1", &VmSpec { memory_mib: MAX_MEMORY_MIB, ..spec(&k) }),
            Err(SpecError::NoMemory { .. })
        ));
        assert!(matches!(check("vm1", &spec("/nonexistent")), Err(SpecError::File { flag: "--kernel", .. })));
        let e = check("vm1", &spec(&junk.display().to_string())).unwrap_err();
        assert!(matches!(e, SpecError::Kernel { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with(&format!(
                "--kernel {:?} is not bootable: it is neither",
                junk.display().to_string()
            )),
            "{e}"
        );
        assert!(matches!(check("vm1", &spec(&d.path().display().to_string())), Err(SpecError::File { .. })));
        let disk = VmSpec {
            disks: vec![DiskSpec { path: "/nope".into(), read_only: false, volume: None }],
            ..spec(&k)
        };
        assert!(matches!(check("vm1", &disk), Err(SpecError::File { flag: "--disk", .. })));
        let nic = VmSpec {
            nics: vec![NicSpec { mac: "01:00:00:00:00:01".into(), tap: "t0".into(), port: None }],
            ..spec(&k)
        };
        let e = check("vm1", &nic).unwrap_err();
        assert!(matches!(e, SpecError::Mac { .. }));
        assert!(e.to_string().starts_with("the 1st --nic: mac \"01:00:00:00:00:01\""), "{e}");
        let nic = VmSpec {
            nics: vec![NicSpec { mac: "52:54:00:00:00:01".into(), tap: "a/b".into(), port: None }],
            ..spec(&k)
        };
        assert!(matches!(check("vm1", &nic), Err(SpecError::Tap { .. })));
    }

    #[test]
    fn cloud_init_is_checked_field_by_field() {
        let d = tempfile::tempdir().unwrap();
        let k = bzimage(&d);
        let good = CloudInit {
            user_data: vec![b'#'; MAX_USER_DATA],
            ssh_authorized_keys: vec![KEY.into(); MAX_SSH_KEYS],
            hostname: "web-1.example.org".into(),
        };
        assert_eq!(check("vm1", &with_cloud_init(&k, good.clone())), Ok(()));
        assert_eq!(check("vm1", &with_cloud_init(&k, CloudInit::default())), Ok(()));

        let bad = |ci: CloudInit| check("vm1", &with_cloud_init(&k, ci)).unwrap_err();
        let e = bad(CloudInit { user_data: vec![0; MAX_USER_DATA + 1], ..good.clone() });
        assert_eq!(e, SpecError::UserData(MAX_USER_DATA + 1));
        assert!(e.to_string().starts_with("--user-data is 65537 bytes; the NoCloud limit is 65536"), "{e}");

        for h in ["-web", "web-", "we_b", "a..b", ".a", "a.", "a b", &"a".repeat(64), &["abc"; 64].join(".")]
        {
            let e = bad(CloudInit { hostname: h.into(), ..good.clone() });
            assert_eq!(e, SpecError::Hostname(h.into()));
            assert!(e.to_string().starts_with("--hostname"), "{e}");
        }
        assert!(valid_hostname(&"a".repeat(63)));
        assert!(valid_hostname(&["abc"; 63].join(".")), "251 characters");
        assert!(valid_hostname("Web-01"));

        let e = bad(CloudInit { ssh_authorized_keys: vec![KEY.into(); MAX_SSH_KEYS + 1], ..good.clone() });
        assert_eq!(e, SpecError::SshKeys(MAX_SSH_KEYS + 1));
        let long = format!("ssh-rsa {}", "A".repeat(MAX_SSH_KEY));
        for (key, fault) in [
            (format!("{KEY}\nssh-rsa AAAA"), KeyFault::NotOneLine),
            (format!("{KEY}\r"), KeyFault::NotOneLine),
            (format!("{KEY}\0"), KeyFault::NotOneLine),
            (long.clone(), KeyFault::Length(long.len())),
            ("ssh-dss AAAAB3NzaC1kc3M=".into(), KeyFault::Format),
            ("AAAAC3NzaC1lZDI1NTE5AAAAI".into(), KeyFault::Format),
            ("ssh-ed25519".into(), KeyFault::Format),
            ("ssh-ed25519 not:base64".into(), KeyFault::Format),
            (String::new(), KeyFault::Format),
        ] {
            let keys = vec![KEY.into(), key.clone()];
            let e = bad(CloudInit { ssh_authorized_keys: keys, ..good.clone() });
            assert_eq!(e, SpecError::SshKey { index: 1, fault }, "{key:?}");
            assert!(e.to_string().starts_with("--ssh-key: the 2nd key "), "{e}");
        }
        for ok in [
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ== a comment with spaces",
            "ecdsa-sha2-nistp521 AAAAE2VjZHNh",
            "sk-ssh-ed25519@openssh.com AAAAGnNr\tme",
            "sk-ecdsa-sha2-nistp256@openssh.com AAAAInNr",
        ] {
            assert_eq!(check_ssh_key(ok), Ok(()), "{ok}");
        }

        // The seed is one more disk.
        let disk = DiskSpec { path: k.clone(), read_only: true, volume: None };
        let full = VmSpec { disks: vec![disk; MAX_DISKS], ..spec(&k) };
        assert_eq!(check("vm1", &full), Ok(()));
        let e = check("vm1", &VmSpec { cloud_init: Some(CloudInit::default()), ..full.clone() }).unwrap_err();
        assert_eq!(e, SpecError::SeedDisk(MAX_DISKS));
        assert!(e.to_string().contains("--disk with cloud-init"), "{e}");
        let fits = VmSpec {
            disks: full.disks[1..].to_vec(),
            cloud_init: Some(CloudInit::default()),
            ..full.clone()
        };
        assert_eq!(check("vm1", &fits), Ok(()));
    }

    #[test]
    fn kernels_must_boot_with_the_memory_initrd_and_cmdline_given() {
        let d = tempfile::tempdir().unwrap();
        let k = bzimage(&d);
        let initrd = |n: usize| {
            let p = d.path().join(format!("initrd-{n}"));
            std::fs::write(&p, vec![1u8; n]).unwrap();
            p.display().to_string()
        };
        // 64 MiB less the kernel's 20 MiB: 44 MiB of initramfs.
        let fits = VmSpec { initrd: Some(initrd(44 << 20)), ..spec(&k) };
        assert_eq!(check("vm1", &fits), Ok(()));
        let big = initrd((44 << 20) + 1);
        let e = check("vm1", &VmSpec { initrd: Some(big.clone()), ..spec(&k) }).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "--initrd {big:?} is 44.0 MiB (46137345 bytes); a VM with 64 MiB of memory takes at most 44 MiB beside its kernel"
            )
        );
        let e = check("vm1", &VmSpec { memory_mib: 16, ..spec(&k) }).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "--kernel {k:?} needs 20 MiB of guest memory below 3 GiB; a VM with 16 MiB of memory has 16 MiB"
            )
        );
        let e = check("vm1", &VmSpec { initrd: Some("/no/initrd".into()), ..spec(&k) }).unwrap_err();
        assert!(matches!(e, SpecError::File { flag: "--initrd", .. }), "{e:?}");

        let short = d.path().join("short-cmdline");
        std::fs::write(&short, BzImageSpec { cmdline_size: 16, ..Default::default() }.build()).unwrap();
        let short = short.display().to_string();
        let e = check("vm1", &VmSpec { cmdline: "x".repeat(17), ..spec(&short) }).unwrap_err();
        assert_eq!(e.to_string(), format!("--cmdline is 17 bytes; --kernel {short:?} takes at most 16"));
        assert_eq!(check("vm1", &VmSpec { cmdline: "x".repeat(16), ..spec(&short) }), Ok(()));
        let e = check("vm1", &VmSpec { cmdline: "x".repeat(MAX_CMDLINE + 1), ..spec(&k) }).unwrap_err();
        assert_eq!(e, SpecError::Cmdline(MAX_CMDLINE + 1));

        let old = d.path().join("old");
        std::fs::write(&old, BzImageSpec { version: 0x0209, ..Default::default() }.build()).unwrap();
        let e = check("vm1", &spec(&old.display().to_string())).unwrap_err();
        assert!(
            e.to_string().ends_with(
                "is not bootable: it is a bzImage of boot protocol 2.09; the VMM needs 2.10 or newer"
            ),
            "{e}"
        );
        let pvh = d.path().join("pvh");
        let seg = [Segment { paddr: 0x10_0000, data: vec![0x90; 64], memsz: 0x1000 }];
        std::fs::write(&pvh, elf(0x10_0000, &seg, Some(0x10_0000))).unwrap();
        assert_eq!(check("vm1", &spec(&pvh.display().to_string())), Ok(()));
    }

    fn image(name: &str, kind: ImageKind, size_bytes: u64) -> ImageRecord {
        let kernel = (kind == ImageKind::Kernel).then_some(KernelInfo {
            format: KernelFormat::BzImage { protocol: 0x020f },
            kernel_end: 0x140_0000,
            initrd_limit: 0x8000_0000,
            cmdline_max: 2047,
        });
        ImageRecord {
            id: ImageId(7),
            name: name.into(),
            kind,
            size_bytes,
            sha256: String::new(),
            volume: VolumeId(9),
            kernel,
            created_at_ms: 0,
        }
    }

    #[test]
    fn images_are_checked_by_kind_and_by_what_was_recorded_at_upload() {
        let k = image("k", ImageKind::Kernel, 10 << 20);
        let i = image("i", ImageKind::Initrd, 300 << 20);
        let with = |kernel: Option<&ImageRecord>, initrd: Option<&ImageRecord>| SpecImages {
            kernel: kernel.cloned(),
            initrd: initrd.cloned(),
        };
        let s = VmSpec { initrd: Some("image:i".into()), ..spec("image:k") };
        assert_eq!(
            super::check("vm1", &VmSpec { memory_mib: 512, ..s.clone() }, &with(Some(&k), Some(&i))),
            Ok(())
        );
        let e = super::check("vm1", &VmSpec { memory_mib: 256, ..s.clone() }, &with(Some(&k), Some(&i)))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--initrd image \"i\" is 300 MiB; a VM with 256 MiB of memory takes at most 236 MiB beside its kernel"
        );
        let e = super::check("vm1", &s, &with(None, Some(&i))).unwrap_err();
        assert_eq!(e.to_string(), "--kernel image \"k\": no such image in this pool");
        let e = super::check("vm1", &s, &with(Some(&i), Some(&i))).unwrap_err();
        assert_eq!(e.to_string(), "--kernel image \"i\" is an initrd image; --kernel takes a kernel image");
        let e = super::check("vm1", &s, &with(Some(&k), Some(&k))).unwrap_err();
        assert_eq!(e.to_string(), "--initrd image \"k\" is a kernel image; --initrd takes an initrd image");
    }

    #[test]
    fn sizes_read_in_whole_units_or_exactly() {
        assert_eq!(size_text(300 << 20), "300 MiB");
        assert_eq!(size_text(4096), "4 KiB");
        assert_eq!(size_text(100), "100 bytes");
        assert_eq!(size_text((2 << 20) + 100), "2.0 MiB (2097252 bytes)");
        assert_eq!(size_text(3 << 30), "3 GiB");
        assert_eq!(
            (nth(0), nth(1), nth(2), nth(3), nth(10), nth(11), nth(20)),
            (
                "1st".into(),
                "2nd".into(),
                "3rd".into(),
                "4th".into(),
                "11th".into(),
                "12th".into(),
                "21st".into()
            )
        );
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(parse_mac("52:54:00:ab:cd:ef"), Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:00",
            "5:54:00:ab:cd:ef",
            "zz:54:00:ab:cd:ef",
            "00:00:00:00:00:00",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
