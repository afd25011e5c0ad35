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
//!
//! The image carries both KVM vendor modules; only the one for this CPU's
//! hardware virtualization ([`Kvm::of_cpuinfo`]) is loaded, and
//! [`kvm_status`] tells afterwards whether VMs can run and with nested paging.

use std::ffi::CString;
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};

/// The list's name in the release's module directory.
pub const LOAD_ORDER: &str = "load.order";
/// Where the CPU's feature flags are read.
pub const CPUINFO: &str = "/proc/cpuinfo";
/// One directory per loaded (or built-in) module, with its parameters.
pub const SYS_MODULE: &str = "/sys/module";
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
    /// Not tried: not for this machine (the other CPU vendor's KVM module).
    pub skipped: Vec<String>,
    pub failed: Vec<(String, ModuleError)>,
}

/// The hardware virtualization of the CPU, and so the KVM vendor module it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kvm {
    /// Intel VT-x (`vmx` flag): `kvm_intel`, nested paging is EPT.
    Intel,
    /// AMD-V (`svm` flag): `kvm_amd`, nested paging is NPT.
    Amd,
    /// Neither flag: no VM can run here. A VM node whose hypervisor does not
    /// pass VT-x/AMD-V through, or a CPU with it off in the firmware (Linux
    /// then clears the flag), looks like this.
    Unsupported,
}

/// Both vendor modules; the image carries both, a CPU takes at most one.
const KVM_VENDOR_MODULES: [&str; 2] = ["kvm_intel", "kvm_amd"];

impl Kvm {
    /// From `/proc/cpuinfo`: the first `flags` line (every CPU has the same).
    pub fn of_cpuinfo(text: &str) -> Kvm {
        let flags = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(key, _)| key.trim() == "flags")
            .map_or("", |(_, flags)| flags);
        let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
        if has("vmx") {
            Kvm::Intel
        } else if has("svm") {
            Kvm::Amd
        } else {
            Kvm::Unsupported
        }
    }

    /// The vendor module, as the kernel names it.
    pub fn module(self) -> Option<&'static str> {
        match self {
            Kvm::Intel => Some("kvm_intel"),
            Kvm::Amd => Some("kvm_amd"),
            Kvm::Unsupported => None,
        }
    }

    /// The vendor module's parameter that says whether nested paging is on.
    fn nested_paging_parameter(self) -> Option<&'static str> {
        match self {
            Kvm::Intel => Some("ept"),
            Kvm::Amd => Some("npt"),
            Kvm::Unsupported => None,
        }
    }

    /// Whether module `name` is a KVM vendor module this CPU cannot use: it is
    /// skipped rather than loaded to fail with ENODEV/EIO and a kernel error line.
    pub fn skips(self, name: &str) -> bool {
        KVM_VENDOR_MODULES.contains(&name) && self.module() != Some(name)
    }
}

/// Whether VMs can run on this node, once the modules are loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmStatus {
    /// The CPU's vendor module is loaded or built in; `nested_paging` as its
    /// parameter says (`None`: unreadable).
    Ready { module: &'static str, nested_paging: Option<bool> },
    /// The CPU has VT-x/AMD-V but its module is not in the kernel: missing
    /// from the image, or it failed (reported with the other failures).
    NotLoaded { module: &'static str },
    /// The CPU has no hardware virtualization.
    Unsupported,
}

/// Reads what the kernel says about `kvm`'s vendor module under `sys_module`
/// ([`SYS_MODULE`]).
pub fn kvm_status(kvm: Kvm, sys_module: &Path) -> KvmStatus {
    let (Some(module), Some(parameter)) = (kvm.module(), kvm.nested_paging_parameter()) else {
        return KvmStatus::Unsupported;
    };
    let dir = sys_module.join(module);
    if !dir.is_dir() {
        return KvmStatus::NotLoaded { module };
    }
    let nested_paging =
        std::fs::read_to_string(dir.join("parameters").join(parameter)).ok().and_then(|t| parse_bool(&t));
    KvmStatus::Ready { module, nested_paging }
}

/// A boolean module parameter as sysfs shows it: `Y`/`N`, or `1`/`0` for an
/// integer one (`kvm_amd.npt` before Linux 5.10).
pub fn parse_bool(text: &str) -> Option<bool> {
    match text.trim() {
        "Y" | "y" | "1" => Some(true),
        "N" | "n" | "0" => Some(false),
        _ => None,
    }
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

/// Loads every module of `dir/load.order` but those `skip` names, in order,
/// passing over the failures again while a pass makes progress.
pub fn load_all(dir: &Path, skip: impl Fn(&str) -> bool) -> Result<LoadReport, ModuleError> {
    let list_path = dir.join(LOAD_ORDER);
    let text = std::fs::read_to_string(&list_path)
        .map_err(|e| ModuleError::List(list_path.display().to_string(), e))?;
    Ok(load_list(dir, parse_load_order(&text), skip, load))
}

fn load_list(
    dir: &Path,
    list: Vec<ModuleLine>,
    skip: impl Fn(&str) -> bool,
    mut load: impl FnMut(&Path, &ModuleLine) -> Result<bool, ModuleError>,
) -> LoadReport {
    let mut report = LoadReport::default();
    let (skipped, mut pending): (Vec<_>, Vec<_>) = list.into_iter().partition(|m| skip(&m.name()));
    report.skipped = skipped.iter().map(ModuleLine::name).collect();
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
        let report = load_list(
            Path::new("/lib/modules/x"),
            list,
            |_| false,
            |_, m| {
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
            },
        );
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
        let e = load_all(dir.path(), |_| false).expect_err("no list");
        assert!(e.to_string().contains("load.order"), "{e}");
    }

    /// Abridged `/proc/cpuinfo` of one CPU; the real one repeats this per CPU.
    fn cpuinfo(flags: &str) -> String {
        format!(
            "processor\t: 0\nvendor_id\t: Test\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\
             vmx flags\t: vnmi preemption_timer invvpid ept_x_only ept_ad\nbugs\t\t: spectre_v1\n\n"
        )
    }

    #[test]
    fn the_cpu_flags_choose_the_kvm_module() {
        let intel = cpuinfo("fpu vme de pse tsc msr pae mce cx8 apic vmx smx est tm2 ssse3");
        assert_eq!(Kvm::of_cpuinfo(&intel), Kvm::Intel);
        let amd = cpuinfo("fpu vme de pse tsc msr pae mce cx8 apic lahf_lm cmp_legacy svm extapic");
        assert_eq!(Kvm::of_cpuinfo(&amd), Kvm::Amd);
        // A VM without nested virtualization: no vmx, though "vmx flags" or
        // flags that merely contain the letters ("svm_lock") are there.
        let none = cpuinfo("fpu vme de pse tsc msr hypervisor svm_lock vmxx");
        assert_eq!(Kvm::of_cpuinfo(&none), Kvm::Unsupported);
        assert_eq!(Kvm::of_cpuinfo(""), Kvm::Unsupported);
        assert_eq!(Kvm::of_cpuinfo(&format!("{intel}{intel}")), Kvm::Intel, "every CPU repeats the flags");
        assert_eq!(Kvm::Intel.module(), Some("kvm_intel"));
        assert_eq!(Kvm::Amd.module(), Some("kvm_amd"));
        assert_eq!(Kvm::Unsupported.module(), None);
    }

    #[test]
    fn only_the_other_vendors_module_is_skipped() {
        let skipped = |kvm: Kvm| {
            let names = ["kvm", "kvm_intel", "kvm_amd", "ccp", "tun"];
            names.into_iter().filter(|n| kvm.skips(n)).collect::<Vec<_>>()
        };
        assert_eq!(skipped(Kvm::Intel), vec!["kvm_amd"]);
        assert_eq!(skipped(Kvm::Amd), vec!["kvm_intel"]);
        assert_eq!(skipped(Kvm::Unsupported), vec!["kvm_intel", "kvm_amd"]);

        let list = vec![line("kvm"), line("kvm-intel"), line("kvm-amd"), line("tun")];
        let mut tried = Vec::new();
        let report = load_list(
            Path::new("/lib/modules/x"),
            list,
            |n| Kvm::Amd.skips(n),
            |_, m| {
                tried.push(m.name());
                Ok(true)
            },
        );
        assert_eq!(tried, vec!["kvm", "kvm_amd", "tun"]);
        assert_eq!(report.skipped, vec!["kvm_intel"]);
        assert!(report.failed.is_empty(), "a skipped module is no failure");
    }

    #[test]
    fn module_parameters_read_as_booleans() {
        assert_eq!(parse_bool("Y\n"), Some(true));
        assert_eq!(parse_bool("1\n"), Some(true));
        assert_eq!(parse_bool("N\n"), Some(false));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool(""), None);
        assert_eq!(parse_bool("auto"), None);
    }

    #[test]
    fn kvm_status_reads_the_vendor_module_in_sysfs() {
        let sys = tempfile::tempdir().expect("temp dir");
        assert_eq!(kvm_status(Kvm::Unsupported, sys.path()), KvmStatus::Unsupported);
        assert_eq!(kvm_status(Kvm::Amd, sys.path()), KvmStatus::NotLoaded { module: "kvm_amd" });

        let params = sys.path().join("kvm_amd/parameters");
        std::fs::create_dir_all(&params).expect("mkdir");
        assert_eq!(
            kvm_status(Kvm::Amd, sys.path()),
            KvmStatus::Ready { module: "kvm_amd", nested_paging: None },
            "loaded, but the parameter is unreadable"
        );
        std::fs::write(params.join("npt"), "1\n").expect("write");
        assert_eq!(
            kvm_status(Kvm::Amd, sys.path()),
            KvmStatus::Ready { module: "kvm_amd", nested_paging: Some(true) }
        );

        let params = sys.path().join("kvm_intel/parameters");
        std::fs::create_dir_all(&params).expect("mkdir");
        std::fs::write(params.join("ept"), "N\n").expect("write");
        assert_eq!(
            kvm_status(Kvm::Intel, sys.path()),
            KvmStatus::Ready { module: "kvm_intel", nested_paging: Some(false) }
        );
    }
}
