//! What image-builder adds around the shared image format (`nodeos_image`): the checked
//! inputs, the identity file inside the image, and the manifest beside it. The layout, the
//! archive writer and the image hash live in `nodeos_image`, which a node also uses to rebuild
//! and serve its own image.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nodeos_image::layout::{ImageFiles, Module};
use nodeos_image::{FORMAT, FileDigest, sha256_hex};
use serde::Serialize;
use thiserror::Error;

use crate::kernel::Kernel;
use crate::modules::ModuleFile;

/// x86's COMMAND_LINE_SIZE is 2048 with the NUL; leave room for what boot.ipxe appends
/// (` nodeos.image=<64 hex>` and ` initrd=initramfs.img`) and for the operator's `nodeos.*=`.
pub const CMDLINE_MAX: usize = 1536;

#[derive(Debug, Error)]
pub enum CmdlineError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Reads a command line file: `#` lines are comments, the other lines' words are joined by
/// single spaces.
pub fn read_cmdline(path: &Path) -> Result<String, CmdlineError> {
    let text =
        fs::read_to_string(path).map_err(|source| CmdlineError::Read { path: path.to_owned(), source })?;
    let words: Vec<&str> =
        text.lines().filter(|l| !l.trim_start().starts_with('#')).flat_map(str::split_whitespace).collect();
    let cmdline = words.join(" ");
    let invalid = |reason: String| Err(CmdlineError::Invalid { path: path.to_owned(), reason });
    if let Some(c) = cmdline.chars().find(|c| !c.is_ascii_graphic() && *c != ' ') {
        return invalid(format!("{c:?} is not printable ASCII"));
    }
    if cmdline.contains('$') {
        return invalid("`$` would be expanded by iPXE".into());
    }
    if cmdline.len() > CMDLINE_MAX {
        return invalid(format!("{} bytes, at most {CMDLINE_MAX} allowed", cmdline.len()));
    }
    if let Some(word) = words.iter().find(|w| w.starts_with("initrd=") || w.starts_with("nodeos.image=")) {
        return invalid(format!("`{word}`: boot.ipxe adds initrd= and nodeos.image= itself"));
    }
    Ok(cmdline)
}

/// Refuses a dynamically linked ELF (one with a PT_INTERP program header): the initramfs has no
/// loader or libraries, so it could not start as /init. Anything that is not a 64-bit
/// little-endian ELF is let through unchecked.
pub fn check_static(nodeos: &[u8]) -> Result<(), String> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| nodeos.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at =
        |at: usize| nodeos.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if nodeos.len() < 64 || &nodeos[..4] != b"\x7fELF" || nodeos[4] != 2 || nodeos[5] != 1 {
        return Ok(());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return Ok(());
    };
    for i in 0..u64::from(phnum) {
        let at = phoff.saturating_add(i * u64::from(phentsize));
        let Some(header) = usize::try_from(at).ok().and_then(|at| nodeos.get(at..at + 16)) else {
            return Err("truncated ELF program headers".into());
        };
        if u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) == PT_INTERP {
            let offset = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
            let interp = usize::try_from(offset)
                .ok()
                .and_then(|o| nodeos.get(o..))
                .map(|rest| {
                    String::from_utf8_lossy(rest.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
                })
                .unwrap_or_default();
            return Err(format!(
                "dynamically linked (interpreter {interp}), it cannot run as /init; \
                 link it statically (`make image` does)"
            ));
        }
    }
    Ok(())
}

/// Everything the image is made of, read and checked.
#[derive(Debug)]
pub struct Contents {
    pub nodeos: Vec<u8>,
    pub nodeos_version: String,
    pub kernel: Kernel,
    pub modules: Vec<ModuleFile>,
    /// Listed modules the kernel has built in, for the manifest.
    pub builtin_modules: Vec<String>,
    pub cmdline: String,
    /// iPXE builds for vendor PXE ROMs, by file name.
    pub chainloaders: Vec<ModuleFile>,
}

/// The iPXE chainloaders found in `dir` (see `nodeos_image::layout::CHAINLOADERS`).
pub fn read_chainloaders(dir: &Path) -> anyhow::Result<Vec<ModuleFile>> {
    let mut found = Vec::new();
    for name in nodeos_image::layout::CHAINLOADERS {
        let path = dir.join(name);
        match fs::read(&path) {
            Ok(data) => found.push(ModuleFile { path: name.to_owned(), data }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
        }
    }
    if found.is_empty() {
        anyhow::bail!(
            "--ipxe-dir {}: none of {} is there (Debian's `ipxe` package puts them in /usr/lib/ipxe)",
            dir.display(),
            nodeos_image::layout::CHAINLOADERS.join(", ")
        );
    }
    Ok(found)
}

/// `/etc/nodeos/image.json`: who this image is, from inside it.
#[derive(Debug, Serialize)]
struct Identity<'a> {
    format: u32,
    nodeos: Component<'a>,
    kernel: Component<'a>,
    cmdline: &'a str,
    modules: Vec<ModuleDigest<'a>>,
}

#[derive(Debug, Serialize)]
struct Component<'a> {
    version: &'a str,
    sha256: String,
    size: u64,
}

#[derive(Debug, Serialize)]
struct ModuleDigest<'a> {
    path: &'a str,
    sha256: String,
}

impl Contents {
    pub fn identity_json(&self) -> String {
        let identity = Identity {
            format: FORMAT,
            nodeos: Component {
                version: &self.nodeos_version,
                sha256: sha256_hex(&self.nodeos),
                size: self.nodeos.len() as u64,
            },
            kernel: Component {
                version: &self.kernel.version,
                sha256: sha256_hex(&self.kernel.bytes),
                size: self.kernel.bytes.len() as u64,
            },
            cmdline: &self.cmdline,
            modules: self
                .modules
                .iter()
                .map(|m| ModuleDigest { path: &m.path, sha256: sha256_hex(&m.data) })
                .collect(),
        };
        let mut json = serde_json::to_string_pretty(&identity).expect("plain structs serialize");
        json.push('\n');
        json
    }

    /// The parts of the initramfs, in the shared layout.
    pub fn files(&self) -> ImageFiles {
        ImageFiles {
            nodeos: self.nodeos.clone(),
            kernel: self.kernel.bytes.clone(),
            kernel_version: self.kernel.version.clone(),
            identity_json: self.identity_json().into_bytes(),
            cmdline: self.cmdline.clone(),
            modules: self
                .modules
                .iter()
                .map(|m| Module { path: m.path.clone(), data: m.data.clone() })
                .collect(),
            chainloaders: self
                .chainloaders
                .iter()
                .map(|m| Module { path: m.path.clone(), data: m.data.clone() })
                .collect(),
        }
    }
}

/// `manifest.json`, next to the image files.
#[derive(Debug, Serialize)]
pub struct Manifest {
    pub format: u32,
    /// See the module docs for exactly what it covers.
    pub image_hash: String,
    pub nodeos_version: String,
    pub kernel_version: String,
    pub cmdline: String,
    pub files: Vec<FileDigest>,
    /// Load order, relative to /lib/modules/<kernel_version>.
    pub modules: Vec<String>,
    pub builtin_modules: Vec<String>,
    pub initramfs: InitramfsInfo,
}

#[derive(Debug, Serialize)]
pub struct InitramfsInfo {
    pub compression: &'static str,
    pub entries: usize,
    pub uncompressed_size: u64,
}

impl Manifest {
    pub fn to_json(&self) -> String {
        let mut json = serde_json::to_string_pretty(self).expect("plain structs serialize");
        json.push('\n');
        json
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::tests::fake_bzimage;

    fn contents() -> Contents {
        Contents {
            nodeos: b"nodeos binary".to_vec(),
            nodeos_version: "0.1.0".into(),
            kernel: Kernel {
                path: "/boot/vmlinuz-6.1.0-9-amd64".into(),
                bytes: fake_bzimage("6.1.0-9-amd64", 0),
                version: "6.1.0-9-amd64".into(),
            },
            modules: vec![
                ModuleFile { path: "kernel/virtio_ring.ko".into(), data: b"ring".to_vec() },
                ModuleFile { path: "kernel/virtio.ko".into(), data: b"virtio".to_vec() },
            ],
            builtin_modules: vec!["af_packet".into()],
            cmdline: "console=ttyS0,115200 quiet".into(),
            chainloaders: vec![],
        }
    }

    #[test]
    fn the_identity_names_every_input() {
        let identity: serde_json::Value = serde_json::from_str(&contents().identity_json()).unwrap();
        assert_eq!(identity["format"], FORMAT);
        assert_eq!(identity["nodeos"]["sha256"], sha256_hex(b"nodeos binary"));
        assert_eq!(identity["kernel"]["version"], "6.1.0-9-amd64");
        assert_eq!(identity["modules"][1]["path"], "kernel/virtio.ko");
        let files = contents().files();
        assert_eq!(files.load_order(), "kernel/virtio_ring.ko\nkernel/virtio.ko\n");
        // What a node reads back to find its modules.
        assert_eq!(files.modules_dir(), "lib/modules/6.1.0-9-amd64");
    }

    #[test]
    fn chainloaders_are_taken_from_the_ipxe_dir() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_chainloaders(dir.path()).unwrap_err().to_string();
        assert!(err.contains("none of undionly.kpxe, ipxe.efi, snponly.efi"), "{err}");
        fs::write(dir.path().join("undionly.kpxe"), b"bios").unwrap();
        fs::write(dir.path().join("other.lkrn"), b"ignored").unwrap();
        let found = read_chainloaders(dir.path()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].path.as_str(), found[0].data.as_slice()), ("undionly.kpxe", &b"bios"[..]));
    }

    #[test]
    fn dynamic_binaries_are_refused() {
        // An ELF64 header with one program header at 64, then the interpreter's name.
        let mut elf = vec![0u8; 64 + 56 + 32];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        assert_eq!(check_static(&elf), Ok(()));
        elf[64..68].copy_from_slice(&3u32.to_le_bytes()); // PT_INTERP
        elf[72..80].copy_from_slice(&120u64.to_le_bytes());
        elf[120..120 + 27].copy_from_slice(b"/lib64/ld-linux-x86-64.so.2");
        let err = check_static(&elf).unwrap_err();
        assert!(err.contains("interpreter /lib64/ld-linux-x86-64.so.2"), "{err}");
        assert_eq!(check_static(b"not an ELF at all"), Ok(()));
        if let Ok(sh) = fs::read("/bin/sh") {
            assert!(check_static(&sh).is_err(), "/bin/sh is dynamic on Debian");
        }
    }

    #[test]
    fn cmdline_files_are_joined_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("cmdline.txt");
        fs::write(&path, "# default\nconsole=ttyS0,115200  console=tty0\n\n  quiet panic=10\n").unwrap();
        assert_eq!(read_cmdline(&path).unwrap(), "console=ttyS0,115200 console=tty0 quiet panic=10");
        for (bad, why) in [
            ("quiet initrd=x", "adds initrd="),
            ("a=${x}", "expanded by iPXE"),
            ("caf\u{e9}", "not printable ASCII"),
        ] {
            fs::write(&path, bad).unwrap();
            let err = read_cmdline(&path).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        fs::write(&path, "x".repeat(CMDLINE_MAX + 1)).unwrap();
        assert!(read_cmdline(&path).unwrap_err().to_string().contains("at most 1536"));
    }
}
