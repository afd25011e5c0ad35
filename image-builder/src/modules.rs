//! Kernel modules for the image: the names in `initramfs/modules.txt`, resolved through the
//! kernel's `modules.dep` (plus `modules.softdep` and `modules.alias`) into a load order.
//!
//! The node has no modprobe: PID 1 loads `load.order` top to bottom with finit_module, so the
//! order must put every module after its dependencies. Resolution is a depth-first walk: a
//! module's `pre:` soft dependencies, then its hard dependencies (modules.dep already lists them
//! transitively, last-to-load first, so they are walked in reverse), then the module, then its
//! `post:` soft dependencies. Each module appears once; for the same files the order is the same.
//!
//! Soft dependencies matter because nothing can load a module on demand on the node: ext4 asks
//! the crypto API for crc32c at mount time and fails if `crypto-crc32c` (an alias of crc32c_intel
//! and crc32c_generic) was not loaded first. As with modprobe, a soft dependency that cannot be
//! found is skipped with a note, while a listed module that cannot be found is an error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModulesError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Parse { path: PathBuf, line: usize, reason: String },
    #[error(
        "module `{name}` is not in {dir}/modules.dep and not built into the kernel (modules.builtin); \
         check the name or the kernel version"
    )]
    Missing { name: String, dir: PathBuf },
    #[error("{dir}/modules.dep: `{dep}`, needed by `{by}`, has no line of its own")]
    DanglingDependency { dir: PathBuf, dep: String, by: String },
    #[error("{dir}/modules.dep: dependency cycle through `{path}`")]
    Cycle { dir: PathBuf, path: String },
    #[error("module file {path} (from modules.dep) is missing")]
    FileMissing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("decompressing module {path}")]
    Decompress {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "module {path} is {format}-compressed and kernel {version} cannot load compressed modules \
         ({reason}); use a kernel with CONFIG_MODULE_DECOMPRESS=y and CONFIG_MODULE_COMPRESS_{config}=y, \
         or uncompressed modules"
    )]
    CompressedUnsupported {
        path: PathBuf,
        format: &'static str,
        config: &'static str,
        version: String,
        reason: String,
    },
}

/// How a module file is stored, from its name (`.ko`, `.ko.gz`, `.ko.xz`, `.ko.zst`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleCompression {
    None,
    Gzip,
    Xz,
    Zstd,
}

impl ModuleCompression {
    const SUFFIXES: [(&'static str, ModuleCompression); 4] = [
        (".ko", ModuleCompression::None),
        (".ko.gz", ModuleCompression::Gzip),
        (".ko.xz", ModuleCompression::Xz),
        (".ko.zst", ModuleCompression::Zstd),
    ];

    pub fn of(path: &str) -> Option<Self> {
        Self::SUFFIXES.iter().find(|(suffix, _)| path.ends_with(suffix)).map(|(_, c)| *c)
    }

    /// The name's suffix in a user-facing message, and the `CONFIG_MODULE_COMPRESS_*` that goes
    /// with it.
    pub fn names(self) -> (&'static str, &'static str) {
        match self {
            ModuleCompression::None => ("un", "NONE"),
            ModuleCompression::Gzip => ("gzip", "GZIP"),
            ModuleCompression::Xz => ("xz", "XZ"),
            ModuleCompression::Zstd => ("zstd", "ZSTD"),
        }
    }
}

/// The module name of a modules.dep path: the file name without `.ko*`, `-` spelled `_`
/// (`kernel/arch/x86/kvm/kvm-intel.ko` is `kvm_intel`).
pub fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let (suffix, _) = ModuleCompression::SUFFIXES.iter().find(|(suffix, _)| file.ends_with(suffix))?;
    let stem = &file[..file.len() - suffix.len()];
    (!stem.is_empty()).then(|| normalize(stem))
}

/// Module names treat `-` and `_` alike; `_` is the canonical spelling.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Reads a module list: one name a line, `#` starts a comment. Names are normalized; a name
/// listed twice is kept once, at its first place.
pub fn read_list(path: &Path) -> Result<Vec<String>, ModulesError> {
    let text = read_text(path)?;
    let mut names = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        if line.split_whitespace().count() != 1 {
            return Err(ModulesError::Parse {
                path: path.to_owned(),
                line: i + 1,
                reason: format!("expected one module name, found `{line}`"),
            });
        }
        let name = normalize(line);
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

/// What the kernel's modules directory says about its modules.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    dir: PathBuf,
    /// Module name -> its path relative to `dir`, from modules.dep.
    by_name: BTreeMap<String, String>,
    /// Path -> its hard dependencies' paths, in modules.dep order.
    deps: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
    /// Module name -> (pre, post) soft dependencies: module names or aliases.
    softdeps: BTreeMap<String, (Vec<String>, Vec<String>)>,
    /// Literal alias -> module names, in modules.alias order. Patterns with wildcards are left
    /// out: soft dependencies name literal aliases (`crypto-crc32c`).
    aliases: BTreeMap<String, Vec<String>>,
}

/// The outcome of [`ModuleIndex::resolve`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Paths relative to the modules directory, dependencies first.
    pub load_order: Vec<String>,
    /// Listed names that the kernel has built in: nothing to load.
    pub builtin: Vec<String>,
    /// Soft dependencies that were looked for and not found.
    pub notes: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Visit {
    InProgress,
    Done,
}

impl ModuleIndex {
    /// Reads `modules.dep` (required) and `modules.builtin`, `modules.softdep`, `modules.alias`
    /// (each optional: a missing one means none) from a `/lib/modules/<version>` directory.
    pub fn load(dir: &Path) -> Result<Self, ModulesError> {
        let mut index = ModuleIndex { dir: dir.to_owned(), ..Default::default() };

        let dep_path = dir.join("modules.dep");
        for (i, line) in read_text(&dep_path)?.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parse_err =
                |reason: String| ModulesError::Parse { path: dep_path.clone(), line: i + 1, reason };
            let (module, deps) =
                line.split_once(':').ok_or_else(|| parse_err("expected `path: dependencies`".into()))?;
            let module = module.trim();
            let name =
                module_name(module).ok_or_else(|| parse_err(format!("`{module}` is not a .ko path")))?;
            let deps: Vec<String> = deps.split_whitespace().map(str::to_owned).collect();
            if let Some(dep) = deps.iter().find(|d| module_name(d).is_none()) {
                return Err(parse_err(format!("`{dep}` is not a .ko path")));
            }
            index.by_name.insert(name, module.to_owned());
            index.deps.insert(module.to_owned(), deps);
        }

        if let Some(text) = read_optional(&dir.join("modules.builtin"))? {
            index.builtin = text.lines().filter_map(|l| module_name(l.trim())).collect();
        }

        if let Some(text) = read_optional(&dir.join("modules.softdep"))? {
            for line in text.lines() {
                let mut words = line.split_whitespace();
                if words.next() != Some("softdep") {
                    continue;
                }
                let Some(name) = words.next() else { continue };
                let entry = index.softdeps.entry(normalize(name)).or_default();
                // As in kmod: words before the first `pre:`/`post:` belong to neither list.
                let mut list: Option<&mut Vec<String>> = None;
                for word in words {
                    match word {
                        "pre:" => list = Some(&mut entry.0),
                        "post:" => list = Some(&mut entry.1),
                        _ => {
                            if let Some(list) = list.as_deref_mut() {
                                list.push(word.to_owned());
                            }
                        }
                    }
                }
            }
        }

        if let Some(text) = read_optional(&dir.join("modules.alias"))? {
            for line in text.lines() {
                let mut words = line.split_whitespace();
                if let (Some("alias"), Some(alias), Some(module)) = (words.next(), words.next(), words.next())
                    && !alias.contains(['*', '?', '['])
                {
                    let names = index.aliases.entry(alias.to_owned()).or_default();
                    let module = normalize(module);
                    if !names.contains(&module) {
                        names.push(module);
                    }
                }
            }
        }
        Ok(index)
    }

    /// The load order for `wanted` (normalized names, in the order the list gives them).
    pub fn resolve(&self, wanted: &[String]) -> Result<Resolution, ModulesError> {
        let mut walk = Walk { index: self, state: HashMap::new(), out: Resolution::default() };
        for name in wanted {
            let name = normalize(name);
            if let Some(path) = self.by_name.get(&name) {
                walk.visit(path, false)?;
            } else if self.builtin.contains(&name) {
                walk.out.builtin.push(name);
            } else {
                return Err(ModulesError::Missing { name, dir: self.dir.clone() });
            }
        }
        Ok(walk.out)
    }
}

struct Walk<'a> {
    index: &'a ModuleIndex,
    state: HashMap<&'a str, Visit>,
    out: Resolution,
}

impl<'a> Walk<'a> {
    /// Emits `path` after everything it needs. A soft edge into a module already being walked is
    /// dropped (modprobe does the same); a hard one is a broken modules.dep.
    fn visit(&mut self, path: &'a str, soft: bool) -> Result<(), ModulesError> {
        match self.state.get(path) {
            Some(Visit::Done) => return Ok(()),
            Some(Visit::InProgress) if soft => return Ok(()),
            Some(Visit::InProgress) => {
                return Err(ModulesError::Cycle { dir: self.index.dir.clone(), path: path.to_owned() });
            }
            None => {}
        }
        self.state.insert(path, Visit::InProgress);
        let name = module_name(path).expect("modules.dep paths were checked when loaded");
        let soft_deps = self.index.softdeps.get(&name);
        for wanted in soft_deps.map(|s| s.0.as_slice()).unwrap_or_default() {
            self.visit_soft(wanted, &name)?;
        }
        let deps = self.index.deps.get(path).map(Vec::as_slice).unwrap_or_default();
        for dep in deps.iter().rev() {
            let Some((dep, _)) = self.index.deps.get_key_value(dep.as_str()) else {
                return Err(ModulesError::DanglingDependency {
                    dir: self.index.dir.clone(),
                    dep: dep.clone(),
                    by: path.to_owned(),
                });
            };
            self.visit(dep, false)?;
        }
        self.state.insert(path, Visit::Done);
        self.out.load_order.push(path.to_owned());
        for wanted in soft_deps.map(|s| s.1.as_slice()).unwrap_or_default() {
            self.visit_soft(wanted, &name)?;
        }
        Ok(())
    }

    /// A soft dependency names a module or an alias of one or more modules.
    fn visit_soft(&mut self, wanted: &str, by: &str) -> Result<(), ModulesError> {
        let index = self.index;
        let direct = normalize(wanted);
        let names: Vec<&String> = match (index.by_name.get_key_value(&direct), index.aliases.get(wanted)) {
            (Some((name, _)), _) => vec![name],
            (None, Some(names)) => names.iter().collect(),
            (None, None) if index.builtin.contains(&direct) => Vec::new(),
            (None, None) => {
                self.out.notes.push(format!("`{by}`: soft dependency `{wanted}` not found, skipped"));
                Vec::new()
            }
        };
        for name in names {
            if let Some(path) = index.by_name.get(name) {
                self.visit(path, true)?;
            } else if !index.builtin.contains(name) {
                self.out.notes.push(format!("`{by}`: soft dependency `{wanted}` names `{name}`, not found"));
            }
        }
        Ok(())
    }
}

/// A module's bytes as they go into the image, under `path` (relative to the modules dir).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    pub path: String,
    pub data: Vec<u8>,
}

/// Whether the kernel can load modules compressed a given way (`CONFIG_MODULE_DECOMPRESS` and
/// the matching `CONFIG_MODULE_COMPRESS_*`), or why that is unknown.
pub trait DecompressSupport {
    fn can_load(&self, compression: ModuleCompression) -> Result<bool, String>;
}

/// Reads the modules in `load_order` from `dir`. Compressed modules are copied as they are when
/// the kernel can decompress them (PID 1 then passes MODULE_INIT_COMPRESSED_FILE); otherwise
/// gzip ones are decompressed here (renamed `.ko`) and others are an error.
pub fn read_modules(
    dir: &Path,
    load_order: &[String],
    kernel_version: &str,
    kernel: &dyn DecompressSupport,
) -> Result<Vec<ModuleFile>, ModulesError> {
    let mut files = Vec::with_capacity(load_order.len());
    for rel in load_order {
        let path = dir.join(rel);
        let data =
            fs::read(&path).map_err(|source| ModulesError::FileMissing { path: path.clone(), source })?;
        let compression = ModuleCompression::of(rel).expect("modules.dep paths were checked when loaded");
        if compression == ModuleCompression::None {
            files.push(ModuleFile { path: rel.clone(), data });
            continue;
        }
        let unsupported = |reason: String| {
            let (format, config) = compression.names();
            ModulesError::CompressedUnsupported {
                path: path.clone(),
                format,
                config,
                version: kernel_version.to_owned(),
                reason,
            }
        };
        match kernel.can_load(compression) {
            Ok(true) => files.push(ModuleFile { path: rel.clone(), data }),
            Ok(false) if compression == ModuleCompression::Gzip => {
                let mut plain = Vec::new();
                flate2::read::GzDecoder::new(data.as_slice())
                    .read_to_end(&mut plain)
                    .map_err(|source| ModulesError::Decompress { path: path.clone(), source })?;
                let stem = rel.strip_suffix(".gz").expect("a .ko.gz path");
                files.push(ModuleFile { path: stem.to_owned(), data: plain });
            }
            Ok(false) => return Err(unsupported("CONFIG_MODULE_DECOMPRESS is not set for it".into())),
            Err(reason) => return Err(unsupported(reason)),
        }
    }
    Ok(files)
}

fn read_text(path: &Path) -> Result<String, ModulesError> {
    fs::read_to_string(path).map_err(|source| ModulesError::Read { path: path.to_owned(), source })
}

fn read_optional(path: &Path) -> Result<Option<String>, ModulesError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModulesError::Read { path: path.to_owned(), source }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A fake `/lib/modules/<version>` shaped like Debian's: virtio, ext4 with its crc32c soft
    /// dependency, kvm, a builtin af_packet, and module files with fixed contents.
    pub(crate) fn fake_modules_dir(dir: &Path) {
        let dep = "\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/crypto/crc32c_generic.ko:
kernel/virt/lib/irqbypass.ko:
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm-intel.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
";
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("modules.dep"), dep).unwrap();
        fs::write(dir.join("modules.builtin"), "kernel/net/packet/af_packet.ko\nkernel/net/unix/unix.ko\n")
            .unwrap();
        fs::write(
            dir.join("modules.softdep"),
            "# Soft dependencies extracted from modules themselves.\n\
             softdep ext4 pre: crypto-crc32c\n\
             softdep jbd2 pre: crypto-crc32c\n\
             softdep kvm_intel post: no-such-thing\n",
        )
        .unwrap();
        fs::write(
            dir.join("modules.alias"),
            "alias crypto-crc32c crc32c_intel\nalias crypto-crc32c crc32c_generic\n\
             alias pci:v00001AF4d* virtio_pci\n",
        )
        .unwrap();
        for line in dep.lines() {
            let path = line.split(':').next().unwrap();
            let file = dir.join(path);
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            let mut f = fs::File::create(file).unwrap();
            write!(f, "\x7fELF fake module {path}").unwrap();
        }
    }

    fn names(order: &[String]) -> Vec<String> {
        order.iter().map(|p| module_name(p).unwrap()).collect()
    }

    fn wanted(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn names_come_from_file_names() {
        assert_eq!(module_name("kernel/arch/x86/kvm/kvm-intel.ko").as_deref(), Some("kvm_intel"));
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko.xz").as_deref(), Some("ext4"));
        assert_eq!(module_name("kernel/a/b.ko.zst").as_deref(), Some("b"));
        assert_eq!(module_name("kernel/a/b.ko.gz").as_deref(), Some("b"));
        assert_eq!(module_name("kernel/a/b.o"), None);
        assert_eq!(module_name(".ko"), None);
    }

    #[test]
    fn dependencies_come_first_once_each_in_a_stable_order() {
        let tmp = tempfile::tempdir().unwrap();
        fake_modules_dir(tmp.path());
        let index = ModuleIndex::load(tmp.path()).unwrap();
        let r = index.resolve(&wanted(&["virtio_pci", "virtio-net", "ext4", "kvm_intel"])).unwrap();
        assert_eq!(
            names(&r.load_order),
            [
                "virtio_ring",
                "virtio",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "failover",
                "net_failover",
                "virtio_net",
                "crc32c_intel",
                "crc32c_generic",
                "jbd2",
                "mbcache",
                "crc16",
                "ext4",
                "irqbypass",
                "kvm",
                "kvm_intel",
            ]
        );
        assert_eq!(r.notes, ["`kvm_intel`: soft dependency `no-such-thing` not found, skipped"]);
        // Every module after its dependencies, whatever order the list gives.
        let reversed = index.resolve(&wanted(&["kvm_intel", "ext4", "virtio_net", "virtio_pci"])).unwrap();
        for order in [&r.load_order, &reversed.load_order] {
            for (i, path) in order.iter().enumerate() {
                for dep in &index.deps[path] {
                    let at = order.iter().position(|p| p == dep).unwrap();
                    assert!(at < i, "{dep} after {path}");
                }
            }
        }
        assert_eq!(index.resolve(&wanted(&["virtio_pci", "virtio-net", "ext4", "kvm_intel"])).unwrap(), r);
    }

    #[test]
    fn transitive_dependencies_are_followed() {
        let tmp = tempfile::tempdir().unwrap();
        fake_modules_dir(tmp.path());
        // modules.dep that lists only direct dependencies still resolves fully.
        fs::write(
            tmp.path().join("modules.dep"),
            "kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\n",
        )
        .unwrap();
        let index = ModuleIndex::load(tmp.path()).unwrap();
        let r = index.resolve(&wanted(&["a"])).unwrap();
        assert_eq!(r.load_order, ["kernel/c.ko", "kernel/b.ko", "kernel/a.ko"]);
    }

    #[test]
    fn builtin_modules_are_skipped_and_missing_ones_named() {
        let tmp = tempfile::tempdir().unwrap();
        fake_modules_dir(tmp.path());
        let index = ModuleIndex::load(tmp.path()).unwrap();
        let r = index.resolve(&wanted(&["af_packet", "virtio"])).unwrap();
        assert_eq!(r.builtin, ["af_packet"]);
        assert_eq!(names(&r.load_order), ["virtio_ring", "virtio"]);

        let err = index.resolve(&wanted(&["virtio", "e1000x"])).unwrap_err();
        assert!(matches!(&err, ModulesError::Missing { name, .. } if name == "e1000x"));
        assert!(err.to_string().contains("module `e1000x` is not in"), "{err}");
    }

    #[test]
    fn broken_modules_dep_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("modules.dep"), "kernel/a.ko: kernel/b.ko\n").unwrap();
        let index = ModuleIndex::load(tmp.path()).unwrap();
        let err = index.resolve(&wanted(&["a"])).unwrap_err();
        assert!(matches!(err, ModulesError::DanglingDependency { .. }), "{err}");

        fs::write(tmp.path().join("modules.dep"), "kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n")
            .unwrap();
        let index = ModuleIndex::load(tmp.path()).unwrap();
        assert!(matches!(index.resolve(&wanted(&["a"])), Err(ModulesError::Cycle { .. })));

        fs::write(tmp.path().join("modules.dep"), "kernel/a.o:\n").unwrap();
        let err = ModuleIndex::load(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("modules.dep:1: `kernel/a.o` is not a .ko path"), "{err}");

        let err = ModuleIndex::load(&tmp.path().join("nope")).unwrap_err();
        assert!(matches!(err, ModulesError::Read { .. }));
    }

    #[test]
    fn lists_allow_comments_and_dashes() {
        let tmp = tempfile::tempdir().unwrap();
        let list = tmp.path().join("modules.txt");
        fs::write(&list, "# header\nvirtio_pci  # why\n\nkvm-intel\nkvm_intel\n").unwrap();
        assert_eq!(read_list(&list).unwrap(), ["virtio_pci", "kvm_intel"]);
        fs::write(&list, "virtio_pci virtio_net\n").unwrap();
        let err = read_list(&list).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("modules.txt:1: expected one module name, found `virtio_pci virtio_net`")
        );
    }

    #[test]
    fn the_shipped_list_carries_kvm_for_both_cpu_vendors() {
        // The node loads the one its CPU takes (nodeos init's `Kvm`); the image must hold both.
        let list = Path::new(env!("CARGO_MANIFEST_DIR")).join("../initramfs/modules.txt");
        let names = read_list(&list).unwrap();
        for kvm in ["kvm", "kvm_intel", "kvm_amd"] {
            assert!(names.iter().any(|n| n == kvm), "{} lacks {kvm}", list.display());
        }
    }

    struct Support(Result<bool, String>);
    impl DecompressSupport for Support {
        fn can_load(&self, _: ModuleCompression) -> Result<bool, String> {
            self.0.clone()
        }
    }

    #[test]
    fn compressed_modules_are_copied_decompressed_or_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::create_dir_all(dir.join("kernel")).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"plain module").unwrap();
        fs::write(dir.join("kernel/a.ko.gz"), gz.finish().unwrap()).unwrap();
        fs::write(dir.join("kernel/b.ko.xz"), b"xz bytes").unwrap();
        fs::write(dir.join("kernel/c.ko"), b"c").unwrap();

        let order = wanted(&["kernel/c.ko", "kernel/a.ko.gz"]);
        let got = read_modules(dir, &order, "6.1.0", &Support(Ok(false))).unwrap();
        assert_eq!(got[0], ModuleFile { path: "kernel/c.ko".into(), data: b"c".to_vec() });
        assert_eq!(got[1], ModuleFile { path: "kernel/a.ko".into(), data: b"plain module".to_vec() });

        let order = wanted(&["kernel/b.ko.xz"]);
        let got = read_modules(dir, &order, "6.1.0", &Support(Ok(true))).unwrap();
        assert_eq!(got[0].path, "kernel/b.ko.xz");
        let err = read_modules(dir, &order, "6.1.0", &Support(Ok(false))).unwrap_err();
        assert!(err.to_string().contains("xz-compressed and kernel 6.1.0 cannot"), "{err}");
        let err = read_modules(dir, &order, "6.1.0", &Support(Err("no config".into()))).unwrap_err();
        assert!(err.to_string().contains("(no config)"), "{err}");

        let err = read_modules(dir, &wanted(&["kernel/d.ko"]), "6.1.0", &Support(Ok(true))).unwrap_err();
        assert!(matches!(err, ModulesError::FileMissing { .. }));
    }
}
