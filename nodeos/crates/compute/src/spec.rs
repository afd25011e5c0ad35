//! Checks of a requested VM against the host, before anything is recorded.

use std::io::Read;

use nodeos_types::records::VmSpec;
use nodeos_vmm::config::{MAX_CMDLINE, MAX_DISKS, MAX_NICS, MAX_VCPUS};
use nodeos_vmm::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};

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
    #[error("nics[{index}].mac {mac:?} is not a unicast aa:bb:cc:dd:ee:ff address")]
    Mac { index: usize, mac: String },
    #[error("nics[{index}].tap {tap:?} must be 1..=15 characters of a-z, A-Z, 0-9, '-', '_' and '.'")]
    Tap { index: usize, tap: String },
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
        }
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
