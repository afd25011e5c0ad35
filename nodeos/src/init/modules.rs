//! Kernel modules from the image, loaded at boot.
//!
//! The image lists them in `/lib/modules/<release>/load.order`, one a line,
//! dependencies before the modules that need them:
//!
//! ```text
//! # comments and blank lines are skipped
//! kernel/drivers/virtio/virtio.ko
//! kernel/arch/x86/kvm/kvm-intel.ko nested=1
//! ```
//!
//! A line is a path relative to that directory (`.ko`, or `.ko.xz`/`.ko.zst`/
//! `.ko.gz` for a kernel that decompresses modules itself), then optional
//! module parameters. Each is loaded with `finit_module(2)`. A module that is
//! already loaded (or built in) counts as loaded; one that fails is reported and
//! the rest still load. Modules that failed are tried again after every pass
//! that loaded something, so a list in the wrong order still loads.

use std::ffi::CString;
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};

/// The list's name in the release's module directory.
pub const LOAD_ORDER: &str = "load.order";
/// `MODULE_INIT_COMPRESSED_FILE` (Linux 5.17): the kernel decompresses the file.
const COMPRESSED_FILE: u32 = 4;

/// One line of `load.order`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleLine {
    /// Path relative to the release's module directory.
    pub path: String,
    /// Module parameters, blank separated, as `insmod` takes them.
    pub params: String,
}

impl ModuleLine {
    /// The module name, as the kernel and `lsmod` show it.
    pub fn name(&self) -> String {
        let file = self.path.rsplit('/').next().unwrap_or(&self.path);
        let base = file.split(".ko").next().unwrap_or(file);
        base.replace('-', "_")
    }

    fn compressed(&self) -> bool {
        [".ko.xz", ".ko.zst", ".ko.gz"].iter().any(|s| self.path.ends_with(s))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot read the module list {0}")]
    List(String, #[source] std::io::Error),
    #[error("cannot open module file {0}")]
    Open(String, #[source] std::io::Error),
    #[error("module parameters of {0} contain a NUL byte")]
    Params(String),
    #[error("the kernel refused module {0}")]
    Load(String, #[source] Errno),
}

impl ModuleError {
    /// The module is for hardware this machine does not have (kvm-amd on an
    /// Intel CPU): expected, not a fault.
    pub fn no_hardware(&self) -> bool {
        matches!(self, ModuleError::Load(_, Errno::ENODEV | Errno::ENXIO | Errno::EOPNOTSUPP))
    }
}

/// Parses `load.order`.
pub fn parse_load_order(text: &str) -> Vec<ModuleLine> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.split_once(char::is_whitespace) {
            Some((path, params)) => ModuleLine { path: path.to_owned(), params: params.trim().to_owned() },
            None => ModuleLine { path: l.to_owned(), params: String::new() },
        })
        .collect()
}

/// The module directory of the running kernel.
pub fn release_dir() -> Result<PathBuf, ModuleError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| ModuleError::List("/proc/sys/kernel/osrelease".into(), e))?;
    Ok(Path::new("/lib/modules").join(release.trim()))
}

/// What loading the list did.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// Already loaded or built into the kernel.
    pub present: Vec<String>,
    pub failed: Vec<(String, ModuleError)>,
}

/// Loads one module; `Ok(false)` when it was already there.
fn load(dir: &Path, m: &ModuleLine) -> Result<bool, ModuleError> {
    let path = dir.join(&m.path);
    let shown = path.display().to_string();
    let file = File::open(&path).map_err(|e| ModuleError::Open(shown.clone(), e))?;
    let params = CString::new(m.params.as_str()).map_err(|_| ModuleError::Params(shown.clone()))?;
    let flags = if m.compressed() {
        ModuleInitFlags::from_bits_retain(COMPRESSED_FILE)
    } else {
        ModuleInitFlags::empty()
    };
    match finit_module(&file, &params, flags) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(e) => Err(ModuleError::Load(m.name(), e)),
    }
}

/// Loads every module of `dir/load.order`, in order, passing over the
/// failures again while a pass makes progress.
pub fn load_all(dir: &Path) -> Result<LoadReport, ModuleError> {
    let list_path = dir.join(LOAD_ORDER);
    let text = std::fs::read_to_string(&list_path)
        .map_err(|e| ModuleError::List(list_path.display().to_string(), e))?;
    Ok(load_list(dir, parse_load_order(&text), load))
}

fn load_list(
    dir: &Path,
    mut pending: Vec<ModuleLine>,
    mut load: impl FnMut(&Path, &ModuleLine) -> Result<bool, ModuleError>,
) -> LoadReport {
    let mut report = LoadReport::default();
    loop {
        let mut failed = Vec::new();
        let before = pending.len();
        for m in pending {
            match load(dir, &m) {
                Ok(true) => report.loaded.push(m.name()),
                Ok(false) => report.present.push(m.name()),
                Err(e) => failed.push((m, e)),
            }
        }
        let retry = failed.iter().any(|(_, e)| !e.no_hardware() && !matches!(e, ModuleError::Open(..)));
        if failed.len() == before || !retry {
            report.failed = failed.into_iter().map(|(m, e)| (m.name(), e)).collect();
            return report;
        }
        pending = failed.into_iter().map(|(m, _)| m).collect();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_list_format() {
        let text = "# virtio first\n\nkernel/drivers/virtio/virtio.ko\n  kernel/arch/x86/kvm/kvm-intel.ko  nested=1 enable_apicv=0 \nkernel/fs/ext4/ext4.ko.xz\n";
        let lines = parse_load_order(text);
        assert_eq!(
            lines,
            vec![
                ModuleLine { path: "kernel/drivers/virtio/virtio.ko".into(), params: String::new() },
                ModuleLine {
                    path: "kernel/arch/x86/kvm/kvm-intel.ko".into(),
                    params: "nested=1 enable_apicv=0".into()
                },
                ModuleLine { path: "kernel/fs/ext4/ext4.ko.xz".into(), params: String::new() },
            ]
        );
        assert_eq!(lines[1].name(), "kvm_intel");
        assert_eq!(lines[2].name(), "ext4");
        assert!(lines[2].compressed());
        assert!(!lines[0].compressed());
    }

    fn line(p: &str) -> ModuleLine {
        ModuleLine { path: format!("kernel/{p}.ko"), params: String::new() }
    }

    #[test]
    fn failures_do_not_stop_the_rest_and_order_mistakes_heal() {
        // "b" needs "c", but the list has it first; "kvm_amd" has no hardware;
        // "gone" is missing; "a" is built in.
        let list = vec![line("a"), line("b"), line("c"), line("kvm-amd"), line("gone")];
        let mut have = BTreeSet::from(["a".to_owned()]);
        let mut calls = 0;
        let report = load_list(Path::new("/lib/modules/x"), list, |_, m| {
            calls += 1;
            let name = m.name();
            match name.as_str() {
                "a" if have.contains("a") => Ok(false),
                "b" if !have.contains("c") => Err(ModuleError::Load(name, Errno::ENOENT)),
                "kvm_amd" => Err(ModuleError::Load(name, Errno::ENODEV)),
                "gone" => Err(ModuleError::Open(m.path.clone(), std::io::ErrorKind::NotFound.into())),
                _ => {
                    have.insert(name);
                    Ok(true)
                }
            }
        });
        assert_eq!(report.loaded, vec!["c", "b"]);
        assert_eq!(report.present, vec!["a"]);
        let failed: Vec<_> = report.failed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(failed, vec!["kvm_amd", "gone"]);
        assert!(report.failed[0].1.no_hardware());
        assert!(!report.failed[1].1.no_hardware());
        // Pass 1: five modules; pass 2: the three failures; then only failures
        // that another pass cannot mend are left.
        assert_eq!(calls, 5 + 3);
    }

    #[test]
    fn a_missing_list_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let e = load_all(dir.path()).expect_err("no list");
        assert!(e.to_string().contains("load.order"), "{e}");
    }
}
