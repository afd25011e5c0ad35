//! Checks of a requested VM against the host, before anything is recorded.

use std::io::Read;

use nodeos_types::records::{CloudInit, VmSpec};
use nodeos_vmm::config::{MAX_CMDLINE, MAX_DISKS, MAX_NICS, MAX_VCPUS};
use nodeos_vmm::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};

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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("name must be 1..=63 characters of a-z, 0-9, '-' and '_', got {0:?}")]
    Name(String),
    #[error("vcpus must be 1..={MAX_VCPUS}, got {0}")]
    Vcpus(u32),
    #[error("memory_mib must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}, got {0}")]
    Memory(u64),
    #[error("memory_mib {want} is more than this host has available ({available} MiB)")]
    NoMemory { want: u64, available: u64 },
    #[error("{field} {path:?} cannot be read: {why}")]
    File { field: &'static str, path: String, why: String },
    #[error("kernel {0:?} is neither a bzImage nor an ELF image")]
    KernelFormat(String),
    #[error("cmdline is {0} bytes; the limit is {MAX_CMDLINE}")]
    Cmdline(usize),
    #[error("disks[{index}] needs exactly one of a file path and a volume")]
    Disk { index: usize },
    #[error("at most {MAX_DISKS} disks and {MAX_NICS} NICs")]
    TooMany,
    #[error("at most {most} disks with cloud_init (its seed is one more disk), got {0}", most = MAX_DISKS - 1)]
    SeedDisk(usize),
    #[error("cloud_init.user_data is {0} bytes; the limit is {MAX_USER_DATA} (64 KiB)")]
    UserData(usize),
    #[error(
        "cloud_init.hostname {0:?} is not a host name: dot-separated labels of 1..={MAX_LABEL} letters, \
         digits and '-' (not first or last), at most {MAX_HOSTNAME} characters"
    )]
    Hostname(String),
    #[error("cloud_init.ssh_authorized_keys has {0} keys; the limit is {MAX_SSH_KEYS}")]
    SshKeys(usize),
    #[error("cloud_init.ssh_authorized_keys[{index}] {fault}")]
    SshKey { index: usize, fault: KeyFault },
    #[error("nics[{index}].mac {mac:?} is not a unicast aa:bb:cc:dd:ee:ff address")]
    Mac { index: usize, mac: String },
    #[error("nics[{index}].tap {tap:?} must be 1..=15 characters of a-z, A-Z, 0-9, '-', '_' and '.'")]
    Tap { index: usize, tap: String },
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

fn readable(field: &'static str, path: &str) -> Result<std::fs::File, SpecError> {
    let err = |why: String| SpecError::File { field, path: path.to_owned(), why };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| err(e.to_string()))
}

/// Checks the kernel's magic: a bzImage has "HdrS" at 0x202, an ELF starts with 0x7f "ELF".
fn check_kernel(path: &str) -> Result<(), SpecError> {
    let mut f = readable("kernel", path)?;
    let mut head = [0u8; 0x206];
    let n = f.read(&mut head).map_err(|e| SpecError::File {
        field: "kernel",
        path: path.into(),
        why: e.to_string(),
    })?;
    let elf = n >= 4 && head[..4] == *b"\x7fELF";
    let bz = n >= 0x206 && head[0x202..0x206] == *b"HdrS";
    if elf || bz { Ok(()) } else { Err(SpecError::KernelFormat(path.to_owned())) }
}

/// MemAvailable of this host, MiB.
pub fn host_available_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Checks a spec as given; memory availability is checked again at start.
pub fn check(name: &str, spec: &VmSpec) -> Result<(), SpecError> {
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
    check_kernel(&spec.kernel)?;
    if let Some(i) = &spec.initrd {
        readable("initrd", i)?;
    }
    for (index, d) in spec.disks.iter().enumerate() {
        match (&d.volume, d.path.is_empty()) {
            (Some(_), true) => {}
            (None, false) => {
                readable("disk", &d.path)?;
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
    use nodeos_types::records::{DiskSpec, NicSpec};

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
        let elf = d.path().join("k.elf");
        std::fs::write(&elf, b"\x7fELF....").unwrap();
        let junk = d.path().join("junk");
        std::fs::write(&junk, b"hello").unwrap();
        let k = elf.display().to_string();
        assert_eq!(check("vm1", &spec(&k)), Ok(()));
        assert!(matches!(check("VM 1", &spec(&k)), Err(SpecError::Name(_))));
        assert_eq!(check("vm1", &VmSpec { vcpus: 0, ..spec(&k) }), Err(SpecError::Vcpus(0)));
        assert_eq!(check("vm1", &VmSpec { memory_mib: 1, ..spec(&k) }), Err(SpecError::Memory(1)));
        assert!(matches!(
            check("vm1", &VmSpec { memory_mib: MAX_MEMORY_MIB, ..spec(&k) }),
            Err(SpecError::NoMemory { .. })
        ));
        assert!(matches!(check("vm1", &spec("/nonexistent")), Err(SpecError::File { field: "kernel", .. })));
        assert!(matches!(check("vm1", &spec(&junk.display().to_string())), Err(SpecError::KernelFormat(_))));
        assert!(matches!(check("vm1", &spec(&d.path().display().to_string())), Err(SpecError::File { .. })));
        let disk = VmSpec {
            disks: vec![DiskSpec { path: "/nope".into(), read_only: false, volume: None }],
            ..spec(&k)
        };
        assert!(matches!(check("vm1", &disk), Err(SpecError::File { field: "disk", .. })));
        let nic = VmSpec {
            nics: vec![NicSpec { mac: "01:00:00:00:00:01".into(), tap: "t0".into(), port: None }],
            ..spec(&k)
        };
        assert!(matches!(check("vm1", &nic), Err(SpecError::Mac { .. })));
        let nic = VmSpec {
            nics: vec![NicSpec { mac: "52:54:00:00:00:01".into(), tap: "a/b".into(), port: None }],
            ..spec(&k)
        };
        assert!(matches!(check("vm1", &nic), Err(SpecError::Tap { .. })));
    }

    #[test]
    fn cloud_init_is_checked_field_by_field() {
        let d = tempfile::tempdir().unwrap();
        let elf = d.path().join("k.elf");
        std::fs::write(&elf, b"\x7fELF....").unwrap();
        let k = elf.display().to_string();
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
        assert!(e.to_string().starts_with("cloud_init.user_data is 65537 bytes; the limit is 65536"), "{e}");

        for h in ["-web", "web-", "we_b", "a..b", ".a", "a.", "a b", &"a".repeat(64), &["abc"; 64].join(".")]
        {
            let e = bad(CloudInit { hostname: h.into(), ..good.clone() });
            assert_eq!(e, SpecError::Hostname(h.into()));
            assert!(e.to_string().starts_with("cloud_init.hostname"), "{e}");
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
            assert!(e.to_string().starts_with("cloud_init.ssh_authorized_keys[1] "), "{e}");
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
        assert!(e.to_string().contains("with cloud_init"), "{e}");
        let fits = VmSpec {
            disks: full.disks[1..].to_vec(),
            cloud_init: Some(CloudInit::default()),
            ..full.clone()
        };
        assert_eq!(check("vm1", &fits), Ok(()));
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
