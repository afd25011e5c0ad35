//! The kernel: finding it on the host, checking it is a bzImage, its version, and what its
//! build configuration says about loading compressed modules.
//!
//! The version comes from, in order: `--kernel-version`, the string the bzImage header points at
//! (the kernel's own `uname -r`, the name of its modules directory), the `vmlinuz-<version>` file
//! name. A given version that disagrees with the header is refused: modules built for another
//! version would not load.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::modules::{DecompressSupport, ModuleCompression};

/// Setup header fields of the x86 boot protocol (Documentation/arch/x86/boot.rst).
const HEADER_MAGIC_OFFSET: usize = 0x202;
const HEADER_MAGIC: &[u8; 4] = b"HdrS";
const PROTOCOL_OFFSET: usize = 0x206;
const KERNEL_VERSION_OFFSET: usize = 0x20e;
const LOADFLAGS_OFFSET: usize = 0x211;
const LOADED_HIGH: u8 = 0x01;

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("reading kernel {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no kernel found on this host: no {boot}/vmlinuz-<version> with a matching {modules}/<version>; \
         install linux-image-amd64 or pass --kernel"
    )]
    NotFound { boot: PathBuf, modules: PathBuf },
    #[error("kernel {path} is not a bzImage: {reason}")]
    NotBzImage { path: PathBuf, reason: String },
    #[error(
        "kernel version: --kernel-version says {given} but {path} is {header}; \
         modules of one version do not load into the other"
    )]
    VersionMismatch { given: String, header: String, path: PathBuf },
    #[error(
        "kernel version of {path}: not in its header nor its file name (vmlinuz-<version>); pass --kernel-version"
    )]
    VersionUnknown { path: PathBuf },
}

/// A kernel image checked to be a bzImage.
#[derive(Debug)]
pub struct Kernel {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub version: String,
}

impl Kernel {
    pub fn load(path: &Path, given_version: Option<&str>) -> Result<Self, KernelError> {
        let bytes = fs::read(path).map_err(|source| KernelError::Read { path: path.to_owned(), source })?;
        let header = check_bzimage(&bytes)
            .map_err(|reason| KernelError::NotBzImage { path: path.to_owned(), reason })?;
        let from_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        let version = match (given_version, header) {
            (Some(given), Some(header)) if given != header => {
                return Err(KernelError::VersionMismatch {
                    given: given.to_owned(),
                    header,
                    path: path.to_owned(),
                });
            }
            (Some(given), _) => given.to_owned(),
            (None, Some(header)) => header,
            (None, None) => from_name.ok_or_else(|| KernelError::VersionUnknown { path: path.to_owned() })?,
        };
        Ok(Kernel { path: path.to_owned(), bytes, version })
    }
}

/// Checks the x86 boot header: the "HdrS" magic at 0x202 and a kernel loaded high (a bzImage,
/// not an old zImage). Returns the version string the header points at, if it has one.
pub fn check_bzimage(bytes: &[u8]) -> Result<Option<String>, String> {
    if bytes.len() < 0x250 {
        return Err(format!("{} bytes, too short for a boot header", bytes.len()));
    }
    if &bytes[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4] != HEADER_MAGIC {
        return Err("no \"HdrS\" magic at offset 0x202 (is it a vmlinux ELF, or compressed?)".into());
    }
    let protocol = u16::from_le_bytes([bytes[PROTOCOL_OFFSET], bytes[PROTOCOL_OFFSET + 1]]);
    if protocol < 0x0200 || bytes[LOADFLAGS_OFFSET] & LOADED_HIGH == 0 {
        return Err(format!("boot protocol {:#06x} without LOADED_HIGH: a zImage", protocol));
    }
    let pointer = u16::from_le_bytes([bytes[KERNEL_VERSION_OFFSET], bytes[KERNEL_VERSION_OFFSET + 1]]);
    if pointer == 0 {
        return Ok(None);
    }
    let start = usize::from(pointer) + 0x200;
    let Some(tail) = bytes.get(start..) else { return Ok(None) };
    let text = &tail[..tail.iter().take(256).position(|&b| b == 0).unwrap_or(tail.len().min(256))];
    let version = std::str::from_utf8(text).ok().and_then(|s| s.split_whitespace().next());
    Ok(version.filter(|v| v.bytes().all(|b| b.is_ascii_graphic())).map(str::to_owned))
}

/// The newest `<boot>/vmlinuz-<version>` that has a `<modules>/<version>` directory.
pub fn find_on_host(boot: &Path, modules: &Path) -> Result<PathBuf, KernelError> {
    let not_found = || KernelError::NotFound { boot: boot.to_owned(), modules: modules.to_owned() };
    let entries = fs::read_dir(boot).map_err(|_| not_found())?;
    let mut best: Option<(String, PathBuf)> = None;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(version) = name.to_str().and_then(|n| n.strip_prefix("vmlinuz-")) else { continue };
        if version.is_empty() || !modules.join(version).is_dir() {
            continue;
        }
        if best.as_ref().is_none_or(|(b, _)| compare_versions(version, b) == Ordering::Greater) {
            best = Some((version.to_owned(), entry.path()));
        }
    }
    best.map(|(_, path)| path).ok_or_else(not_found)
}

/// Orders versions like `sort -V`: digit runs numerically, everything else bytewise.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, x), (db, y)) in ca.iter().zip(cb.iter()) {
        let ord = if *da && *db {
            let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
            x.len().cmp(&y.len()).then_with(|| x.cmp(y))
        } else {
            x.cmp(y)
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// A kernel build configuration (`/boot/config-<version>`), if one was found.
#[derive(Debug)]
pub struct KernelConfig {
    /// Where it was read from, or the places looked at when none was found.
    source: Result<PathBuf, Vec<PathBuf>>,
    options: BTreeMap<String, String>,
}

impl KernelConfig {
    /// Reads the first of `candidates` that exists; none existing is not an error here, only
    /// when a question needs the answer.
    pub fn find(candidates: &[PathBuf]) -> Result<Self, KernelError> {
        for path in candidates {
            match fs::read_to_string(path) {
                Ok(text) => {
                    let options = text
                        .lines()
                        .filter_map(|l| l.split_once('='))
                        .filter(|(k, _)| k.starts_with("CONFIG_"))
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect();
                    return Ok(KernelConfig { source: Ok(path.clone()), options });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(KernelError::Read { path: path.clone(), source }),
            }
        }
        Ok(KernelConfig { source: Err(candidates.to_vec()), options: BTreeMap::new() })
    }

    fn enabled(&self, option: &str) -> bool {
        self.options.get(option).is_some_and(|v| v == "y")
    }
}

impl DecompressSupport for KernelConfig {
    fn can_load(&self, compression: ModuleCompression) -> Result<bool, String> {
        if compression == ModuleCompression::None {
            return Ok(true);
        }
        if let Err(looked) = &self.source {
            let looked: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
            return Err(format!(
                "no kernel config to tell, looked at {}; pass --kernel-config",
                if looked.is_empty() { "nothing".into() } else { looked.join(", ") }
            ));
        }
        let (_, config) = compression.names();
        Ok(self.enabled("CONFIG_MODULE_DECOMPRESS")
            && self.enabled(&format!("CONFIG_MODULE_COMPRESS_{config}")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bytes that pass [`check_bzimage`] and report `version`, like a real bzImage's first page.
    pub(crate) fn fake_bzimage(version: &str, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len.max(0x1000)];
        b[0x1fe] = 0x55;
        b[0x1ff] = 0xaa;
        b[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4].copy_from_slice(HEADER_MAGIC);
        b[PROTOCOL_OFFSET..PROTOCOL_OFFSET + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        b[LOADFLAGS_OFFSET] = LOADED_HIGH;
        let at = 0x400usize;
        b[KERNEL_VERSION_OFFSET..KERNEL_VERSION_OFFSET + 2]
            .copy_from_slice(&u16::try_from(at - 0x200).unwrap().to_le_bytes());
        let text = format!("{version} (someone@example) #1 SMP");
        b[at..at + text.len()].copy_from_slice(text.as_bytes());
        b
    }

    #[test]
    fn bzimage_header_is_checked_and_its_version_read() {
        assert_eq!(
            check_bzimage(&fake_bzimage("6.1.0-56-amd64", 0)).unwrap().as_deref(),
            Some("6.1.0-56-amd64")
        );

        let elf = b"\x7fELF".iter().copied().chain(std::iter::repeat_n(0, 0x1000)).collect::<Vec<_>>();
        assert!(check_bzimage(&elf).unwrap_err().contains("no \"HdrS\" magic"));
        assert!(check_bzimage(b"short").unwrap_err().contains("too short"));

        let mut zimage = fake_bzimage("1.0", 0);
        zimage[LOADFLAGS_OFFSET] = 0;
        assert!(check_bzimage(&zimage).unwrap_err().contains("zImage"));

        let mut no_version = fake_bzimage("1.0", 0);
        no_version[KERNEL_VERSION_OFFSET] = 0;
        no_version[KERNEL_VERSION_OFFSET + 1] = 0;
        assert_eq!(check_bzimage(&no_version).unwrap(), None);
    }

    #[test]
    fn the_real_kernel_is_a_bzimage() {
        let Ok(path) = find_on_host(Path::new("/boot"), Path::new("/lib/modules")) else {
            nodeos_types::testing::skip("the_real_kernel_is_a_bzimage", "no kernel in /boot");
            return;
        };
        let kernel = Kernel::load(&path, None).unwrap();
        assert_eq!(path.file_name().unwrap().to_str().unwrap(), format!("vmlinuz-{}", kernel.version));
    }

    #[test]
    fn kernel_version_comes_from_flag_header_or_name() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("vmlinuz-6.1.0-9-amd64");
        fs::write(&path, fake_bzimage("6.1.0-9-amd64", 0)).unwrap();
        assert_eq!(Kernel::load(&path, None).unwrap().version, "6.1.0-9-amd64");
        assert_eq!(Kernel::load(&path, Some("6.1.0-9-amd64")).unwrap().version, "6.1.0-9-amd64");
        let err = Kernel::load(&path, Some("6.1.0-8-amd64")).unwrap_err();
        assert!(matches!(err, KernelError::VersionMismatch { .. }), "{err}");

        let mut headerless = fake_bzimage("x", 0);
        headerless[KERNEL_VERSION_OFFSET] = 0;
        headerless[KERNEL_VERSION_OFFSET + 1] = 0;
        fs::write(&path, &headerless).unwrap();
        assert_eq!(Kernel::load(&path, None).unwrap().version, "6.1.0-9-amd64");
        let bare = tmp.path().join("bzImage");
        fs::write(&bare, &headerless).unwrap();
        assert!(matches!(Kernel::load(&bare, None), Err(KernelError::VersionUnknown { .. })));
        assert_eq!(Kernel::load(&bare, Some("7.0")).unwrap().version, "7.0");

        let err = Kernel::load(&tmp.path().join("missing"), None).unwrap_err();
        assert!(err.to_string().starts_with("reading kernel "), "{err}");
    }

    #[test]
    fn the_newest_kernel_with_modules_is_found() {
        let tmp = tempfile::tempdir().unwrap();
        let (boot, modules) = (tmp.path().join("boot"), tmp.path().join("modules"));
        fs::create_dir_all(&boot).unwrap();
        fs::create_dir_all(&modules).unwrap();
        assert!(matches!(find_on_host(&boot, &modules), Err(KernelError::NotFound { .. })));
        for v in ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.12.0-1-amd64"] {
            fs::write(boot.join(format!("vmlinuz-{v}")), b"").unwrap();
        }
        fs::write(boot.join("config-6.12.0-1-amd64"), b"").unwrap();
        fs::create_dir(modules.join("6.1.0-9-amd64")).unwrap();
        fs::create_dir(modules.join("6.1.0-10-amd64")).unwrap();
        assert_eq!(find_on_host(&boot, &modules).unwrap(), boot.join("vmlinuz-6.1.0-10-amd64"));
    }

    #[test]
    fn versions_sort_numerically() {
        assert_eq!(compare_versions("6.1.0-10-amd64", "6.1.0-9-amd64"), Ordering::Greater);
        assert_eq!(compare_versions("6.12.0", "6.2.0"), Ordering::Greater);
        assert_eq!(compare_versions("6.1.0", "6.1.0-1"), Ordering::Less);
        assert_eq!(compare_versions("6.1.0", "6.1.0"), Ordering::Equal);
    }

    #[test]
    fn compressed_modules_need_module_decompress() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config-x");
        fs::write(&path, "CONFIG_MODULE_COMPRESS_XZ=y\nCONFIG_MODULE_DECOMPRESS=y\n").unwrap();
        let config = KernelConfig::find(&[tmp.path().join("none"), path.clone()]).unwrap();
        assert_eq!(config.can_load(ModuleCompression::Xz), Ok(true));
        assert_eq!(config.can_load(ModuleCompression::Zstd), Ok(false));
        fs::write(&path, "CONFIG_MODULE_COMPRESS_NONE=y\n# CONFIG_MODULE_DECOMPRESS is not set\n").unwrap();
        let config = KernelConfig::find(std::slice::from_ref(&path)).unwrap();
        assert_eq!(config.can_load(ModuleCompression::Gzip), Ok(false));
        assert_eq!(config.can_load(ModuleCompression::None), Ok(true));
        let none = KernelConfig::find(&[tmp.path().join("none")]).unwrap();
        assert!(none.can_load(ModuleCompression::Xz).unwrap_err().contains("pass --kernel-config"));
    }
}
