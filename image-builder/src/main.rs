//! image-builder: the static `nodeos` binary and a Debian kernel become a node image: `vmlinuz`,
//! a reproducible gzip'd newc `initramfs.img`, `boot.ipxe` and `manifest.json`.
//!
//! Same inputs, same bytes: entries are sorted, every timestamp is 0, owners are root, inode
//! numbers and permissions are fixed, the gzip header carries no time or name, and nothing is
//! read from the host beyond the named inputs. The output directory is replaced whole or not
//! at all (see `output`).
//!
//! # Layout
//! - `main.rs`: the command line, the build steps in order, the summary.
//! - `kernel.rs`: finding the kernel, the bzImage check, its version and config.
//! - `modules.rs`: the module list resolved through modules.dep into a load order.
//! - `image.rs`: the checked inputs, image.json and the manifest; the layout, archive writer and
//!   image hash are `nodeos_image`'s, shared with the node that serves its own image.
//! - `output.rs`: the staging directory and the swap into place.

mod image;
mod kernel;
mod modules;
mod output;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::Parser;

use nodeos_image::hash::{INITRAMFS_FILE, IPXE_FILE, KERNEL_FILE, MANIFEST_FILE};
use nodeos_image::{FileDigest, boot_ipxe};

use crate::image::{Contents, InitramfsInfo, Manifest};
use crate::kernel::{Kernel, KernelConfig};
use crate::modules::ModuleIndex;
use crate::output::Staging;

const BOOT_DIR: &str = "/boot";
const MODULES_ROOT: &str = "/lib/modules";

/// Builds the node image: kernel, initramfs (nodeos as /init plus the listed modules), an iPXE
/// script and a manifest with the image hash.
#[derive(Debug, Parser)]
#[command(name = "image-builder", version)]
struct Args {
    /// The nodeos binary to run as /init; statically linked (see `make image`).
    #[arg(long)]
    nodeos: PathBuf,
    /// nodeos's version for image.json and the manifest [default: asked from `<nodeos> --version`].
    #[arg(long)]
    nodeos_version: Option<String>,
    /// Kernel bzImage [default: the newest /boot/vmlinuz-<version> with a /lib/modules/<version>].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Kernel version (`uname -r`) [default: from the bzImage header, else the vmlinuz-<version> name].
    #[arg(long)]
    kernel_version: Option<String>,
    /// Kernel build config, read only if modules are compressed
    /// [default: config-<version> beside the kernel, else in /boot].
    #[arg(long)]
    kernel_config: Option<PathBuf>,
    /// The kernel's modules directory [default: /lib/modules/<version>].
    #[arg(long)]
    modules_dir: Option<PathBuf>,
    /// Module names to include, one a line, `#` comments.
    #[arg(long, default_value = "initramfs/modules.txt")]
    modules: PathBuf,
    /// Default kernel command line file, `#` comment lines.
    #[arg(long, default_value = "initramfs/cmdline.txt")]
    cmdline: PathBuf,
    /// A directory of iPXE builds (`/usr/lib/ipxe` from Debian's `ipxe` package) whose
    /// undionly.kpxe, ipxe.efi and snponly.efi the image carries, so its nodes can chainload
    /// machines with vendor PXE ROMs; at least one must be there.
    #[arg(long)]
    ipxe_dir: Option<PathBuf>,
    /// Output directory, replaced whole when the image is complete.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("image-builder: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    // First, so a bad --out fails before any work.
    let staging = Staging::prepare(&args.out)?;

    let kernel_path = match &args.kernel {
        Some(path) => path.clone(),
        None => kernel::find_on_host(Path::new(BOOT_DIR), Path::new(MODULES_ROOT))?,
    };
    let kernel = Kernel::load(&kernel_path, args.kernel_version.as_deref())?;
    let modules_dir =
        args.modules_dir.clone().unwrap_or_else(|| Path::new(MODULES_ROOT).join(&kernel.version));
    if !modules_dir.is_dir() {
        bail!(
            "no modules for kernel {}: {} is not a directory; pass --modules-dir",
            kernel.version,
            modules_dir.display()
        );
    }

    let nodeos =
        std::fs::read(&args.nodeos).with_context(|| format!("reading nodeos {}", args.nodeos.display()))?;
    if let Err(reason) = image::check_static(&nodeos) {
        bail!("nodeos {}: {reason}", args.nodeos.display());
    }
    let nodeos_version = match &args.nodeos_version {
        Some(v) => v.clone(),
        None => ask_version(&args.nodeos)?,
    };
    let cmdline = image::read_cmdline(&args.cmdline)?;

    let wanted = modules::read_list(&args.modules)?;
    let index = ModuleIndex::load(&modules_dir)?;
    let resolution =
        index.resolve(&wanted).with_context(|| format!("modules from {}", args.modules.display()))?;
    for name in &resolution.builtin {
        eprintln!("note: module `{name}` is built into kernel {}: nothing to load", kernel.version);
    }
    for note in &resolution.notes {
        eprintln!("note: {note}");
    }
    let config = KernelConfig::find(&config_candidates(args, &kernel))?;
    let module_files = modules::read_modules(&modules_dir, &resolution.load_order, &kernel.version, &config)?;

    let chainloaders = match &args.ipxe_dir {
        Some(dir) => image::read_chainloaders(dir)?,
        None => Vec::new(),
    };

    let contents = Contents {
        chainloaders,
        nodeos,
        nodeos_version,
        kernel,
        modules: module_files,
        builtin_modules: resolution.builtin,
        cmdline,
    };
    let built = contents.files().build()?;
    staging.write(INITRAMFS_FILE, &built.initramfs_bytes)?;
    staging.write(KERNEL_FILE, &contents.kernel.bytes)?;
    let image_hash = built.image_hash.clone();
    let ipxe = boot_ipxe(&contents.cmdline, &image_hash, "");
    staging.write(IPXE_FILE, ipxe.as_bytes())?;
    let (kernel_digest, initramfs, uncompressed_size) =
        (built.kernel, built.initramfs, built.uncompressed_size);

    let manifest = Manifest {
        format: nodeos_image::FORMAT,
        image_hash: image_hash.clone(),
        nodeos_version: contents.nodeos_version.clone(),
        kernel_version: contents.kernel.version.clone(),
        cmdline: contents.cmdline.clone(),
        files: vec![kernel_digest.clone(), initramfs.clone(), FileDigest::of(IPXE_FILE, ipxe.as_bytes())],
        modules: contents.modules.iter().map(|m| m.path.clone()).collect(),
        builtin_modules: contents.builtin_modules.clone(),
        initramfs: InitramfsInfo { compression: "gzip", entries: built.entries, uncompressed_size },
    };
    staging.write(MANIFEST_FILE, manifest.to_json().as_bytes())?;
    let out = staging.publish()?;

    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "image {image_hash}\n  nodeos {} ({}), kernel {} from {}, {} modules ({} built in)\n  \
         {:<14} {:>10}  sha256 {}\n  {:<14} {:>10}  sha256 {}  ({} uncompressed, {} entries)\n  written to {}",
        manifest.nodeos_version,
        human(contents.nodeos.len() as u64),
        manifest.kernel_version,
        contents.kernel.path.display(),
        manifest.modules.len(),
        manifest.builtin_modules.len(),
        kernel_digest.name,
        human(kernel_digest.size),
        kernel_digest.sha256,
        initramfs.name,
        human(initramfs.size),
        initramfs.sha256,
        human(uncompressed_size),
        manifest.initramfs.entries,
        out.display(),
    );
    Ok(())
}

/// Where the kernel's build config may be: as given, else `config-<version>` beside the kernel,
/// else in /boot (Debian's layout).
fn config_candidates(args: &Args, kernel: &Kernel) -> Vec<PathBuf> {
    if let Some(path) = &args.kernel_config {
        return vec![path.clone()];
    }
    let name = format!("config-{}", kernel.version);
    let mut candidates = Vec::new();
    if let Some(dir) = kernel.path.parent() {
        candidates.push(dir.join(&name));
    }
    let boot = Path::new(BOOT_DIR).join(&name);
    if !candidates.contains(&boot) {
        candidates.push(boot);
    }
    candidates
}

/// nodeos's version from `nodeos --version` (clap prints `nodeos <version>`).
fn ask_version(nodeos: &Path) -> anyhow::Result<String> {
    let hint = "; pass --nodeos-version";
    let output = Command::new(nodeos)
        .arg("--version")
        .output()
        .with_context(|| format!("nodeos version: running `{} --version`{hint}", nodeos.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.trim().strip_prefix("nodeos ") {
        Some(v) if output.status.success() && !v.is_empty() && !v.contains(char::is_whitespace) => {
            Ok(v.to_owned())
        }
        _ => bail!(
            "nodeos version: `{} --version` printed {:?} ({}){hint}",
            nodeos.display(),
            stdout.trim(),
            output.status
        ),
    }
}

/// Sizes for people: bytes below 10 KiB, else KiB or MiB with one decimal.
fn human(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if bytes < 10 * 1024 {
        format!("{bytes} B")
    } else if b < KIB * KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{:.1} MiB", b / KIB / KIB)
    }
}
