//! The Linux guests of the QEMU pool tests: this machine's Debian kernel and
//! the busybox initramfs images `tests/linux-guest/build.sh` makes.

use std::path::Path;

use anyhow::{Context, ensure};

use crate::qemu::which;

/// Whether the machine has what the guests are built from (the Debian kernel,
/// busybox-static, e2fsprogs' debugfs, cpio); a loud skip line if not.
pub fn tools_or_skip(test: &str) -> bool {
    let skip = |why: &str| nodeos_types::testing::skip(test, why);
    let kernels = std::fs::read_dir("/boot")
        .map(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-")));
    if !kernels.unwrap_or(false) {
        skip("no /boot/vmlinuz-* (linux-image-amd64) for the guests");
        return false;
    }
    for (tool, package) in [("busybox", "busybox-static"), ("debugfs", "e2fsprogs"), ("cpio", "cpio")] {
        if which(tool).is_none() {
            skip(&format!("{tool} is not installed ({package})"));
            return false;
        }
    }
    true
}

/// Builds the guests' kernel, initramfs images and root file system into `dir`.
pub fn build(dir: &Path) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("linux-guest/build.sh");
    let out = std::process::Command::new(&script).arg(dir).output().context("running build.sh")?;
    ensure!(
        out.status.success(),
        "{}: {}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("nodeos-tests: {}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(())
}
