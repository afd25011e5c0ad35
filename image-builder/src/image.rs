//! What the image is: the initramfs layout, the identity file inside it, the image hash, the
//! iPXE script and the manifest beside it.
//!
//! # Initramfs layout (format 1)
//! ```text
//! /init                             nodeos, 0755: the kernel runs it as PID 1
//! /sbin/nodeos -> /init             so `nodeos ...` works from the console
//! /dev/console                      c 5 1, 0600: the kernel opens it before devtmpfs is mounted
//! /dev /proc /sys /run /var /etc    mount points and runtime dirs, 0755
//! /tmp                              1777
//! /etc/nodeos/image.json            identity: versions and the build inputs' sha256
//! /etc/nodeos/cmdline.default       the default kernel command line
//! /lib/modules/<ver>/load.order     module paths (relative to /lib/modules/<ver>), load order
//! /lib/modules/<ver>/kernel/...     the modules, as named in modules.dep
//! ```
//!
//! # Image hash (format 1)
//! The sha256 of this text, each line ending in `\n` (hex is lowercase, sizes are decimal bytes):
//! ```text
//! nodeos-image v1
//! vmlinuz <sha256 of the kernel> <size>
//! initramfs.img <sha256 of the initramfs> <size>
//! cmdline <the default command line>
//! ```
//! so `printf` and `sha256sum` can check it. The initramfs cannot hold its own hash; boot.ipxe
//! passes it to the node as `nodeos.image=<hash>`, after the hashed command line.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::kernel::Kernel;
use crate::modules::ModuleFile;
use crate::newc::{Archive, ArchiveError};

/// Version of the layout, identity file and hash text above; bump when any of them changes.
pub const FORMAT: u32 = 1;

pub const KERNEL_FILE: &str = "vmlinuz";
pub const INITRAMFS_FILE: &str = "initramfs.img";
pub const IPXE_FILE: &str = "boot.ipxe";
pub const MANIFEST_FILE: &str = "manifest.json";

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

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
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
    fn modules_dir(&self) -> String {
        format!("lib/modules/{}", self.kernel.version)
    }

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

    pub fn load_order(&self) -> String {
        self.modules.iter().map(|m| format!("{}\n", m.path)).collect()
    }

    /// The initramfs tree, laid out as in the module docs.
    pub fn initramfs(&self) -> Result<Archive, ArchiveError> {
        let mut a = Archive::new();
        for dir in ["dev", "proc", "sys", "run", "var", "etc/nodeos", "sbin"] {
            a.dir(dir, 0o755)?;
        }
        a.dir("tmp", 0o1777)?;
        a.char_dev("dev/console", 0o600, 5, 1)?;
        a.file("init", 0o755, self.nodeos.clone())?;
        a.symlink("sbin/nodeos", "/init")?;
        a.file("etc/nodeos/image.json", 0o644, self.identity_json().into_bytes())?;
        a.file("etc/nodeos/cmdline.default", 0o644, format!("{}\n", self.cmdline).into_bytes())?;
        let modules_dir = self.modules_dir();
        a.dir(&modules_dir, 0o755)?;
        a.file(&format!("{modules_dir}/load.order"), 0o644, self.load_order().into_bytes())?;
        for m in &self.modules {
            a.file(&format!("{modules_dir}/{}", m.path), 0o644, m.data.clone())?;
        }
        Ok(a)
    }
}

/// A published file's name, sha256 and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileDigest {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

impl FileDigest {
    pub fn of(name: &str, bytes: &[u8]) -> Self {
        FileDigest { name: name.to_owned(), sha256: sha256_hex(bytes), size: bytes.len() as u64 }
    }
}

/// The text the image hash is taken over (see the module docs).
pub fn image_hash_text(kernel: &FileDigest, initramfs: &FileDigest, cmdline: &str) -> String {
    format!(
        "nodeos-image v{FORMAT}\n{KERNEL_FILE} {} {}\n{INITRAMFS_FILE} {} {}\ncmdline {cmdline}\n",
        kernel.sha256, kernel.size, initramfs.sha256, initramfs.size
    )
}

pub fn image_hash(kernel: &FileDigest, initramfs: &FileDigest, cmdline: &str) -> String {
    sha256_hex(image_hash_text(kernel, initramfs, cmdline).as_bytes())
}

/// An iPXE script with names relative to itself, so the bundle works from any TFTP or HTTP root.
pub fn boot_ipxe(cmdline: &str, image_hash: &str) -> String {
    let args = [cmdline, &format!("nodeos.image={image_hash}"), &format!("initrd={INITRAMFS_FILE}")]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "#!ipxe\n# nodeos image {image_hash}\nkernel {KERNEL_FILE} {args}\ninitrd {INITRAMFS_FILE}\nboot\n"
    )
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

/// A writer that hashes and counts what passes through it.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), size: 0 }
    }

    /// The inner writer, the sha256 (hex) and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.size)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
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
        }
    }

    #[test]
    fn the_initramfs_has_the_documented_layout() {
        let archive = contents().initramfs().unwrap();
        let paths: Vec<&str> = archive.paths().collect();
        assert_eq!(
            paths,
            [
                "dev",
                "dev/console",
                "etc",
                "etc/nodeos",
                "etc/nodeos/cmdline.default",
                "etc/nodeos/image.json",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.1.0-9-amd64",
                "lib/modules/6.1.0-9-amd64/kernel",
                "lib/modules/6.1.0-9-amd64/kernel/virtio.ko",
                "lib/modules/6.1.0-9-amd64/kernel/virtio_ring.ko",
                "lib/modules/6.1.0-9-amd64/load.order",
                "proc",
                "run",
                "sbin",
                "sbin/nodeos",
                "sys",
                "tmp",
                "var",
            ]
        );
        assert_eq!(contents().load_order(), "kernel/virtio_ring.ko\nkernel/virtio.ko\n");
        let identity: serde_json::Value = serde_json::from_str(&contents().identity_json()).unwrap();
        assert_eq!(identity["nodeos"]["sha256"], sha256_hex(b"nodeos binary"));
        assert_eq!(identity["kernel"]["version"], "6.1.0-9-amd64");
        assert_eq!(identity["modules"][1]["path"], "kernel/virtio.ko");
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
    fn the_image_hash_is_over_the_documented_text() {
        let k = FileDigest::of("vmlinuz", b"kernel");
        let i = FileDigest::of("initramfs.img", b"initramfs");
        let text = image_hash_text(&k, &i, "quiet");
        assert_eq!(
            text,
            format!("nodeos-image v1\nvmlinuz {} 6\ninitramfs.img {} 9\ncmdline quiet\n", k.sha256, i.sha256)
        );
        assert_eq!(image_hash(&k, &i, "quiet"), sha256_hex(text.as_bytes()));
        assert_ne!(image_hash(&k, &i, "quiet"), image_hash(&k, &i, "quiet panic=10"));
    }

    #[test]
    fn boot_ipxe_uses_relative_names() {
        let script = boot_ipxe("console=ttyS0 quiet", "ab12");
        assert_eq!(
            script,
            "#!ipxe\n# nodeos image ab12\n\
             kernel vmlinuz console=ttyS0 quiet nodeos.image=ab12 initrd=initramfs.img\n\
             initrd initramfs.img\nboot\n"
        );
        assert!(boot_ipxe("", "ab").contains("kernel vmlinuz nodeos.image=ab initrd=initramfs.img\n"));
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
