//! The Linux guests of the QEMU pool tests: this machine's Debian kernel and
//! the busybox initramfs images `tests/linux-guest/build.sh` makes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};

use crate::qemu::{BOOT, Lab, Machine, accel, which};
use crate::{BuiltImage, wait_until};

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

/// Two QEMU machines booting the node image, formed into one pool that can
/// run Linux guests, with the guests built in `guest_dir`.
#[derive(Debug)]
pub struct GuestPool {
    pub lab: Lab,
    pub ms: Vec<Machine>,
    pub guest_dir: PathBuf,
    /// Each machine's node id, in machine order.
    pub node_ids: Vec<String>,
}

/// Builds the guests and boots a two-node pool for them: 1.5 GiB per machine
/// (the node, its page cache and a 256 MiB guest), NBD exports on the fabric
/// (`nodeos.nbd_public`), and one CPU per machine: a guest's two vCPUs
/// time-share it, and TCG has no second CPU to race on KVM's code patching in
/// the node kernel (two-CPU machines were seen to wedge both CPUs in KVM's
/// LAPIC code while a guest booted). Returns once both members are healthy and
/// have written their node records (volumes, and so images, need both).
pub async fn two_node_pool(test: &str, image: BuiltImage, bin: PathBuf) -> anyhow::Result<GuestPool> {
    let mut lab = Lab::new(image, bin)?;
    lab.bootstrap_expect = 2;
    lab.memory_mib = 1536;
    lab.cpus = 1;
    lab.disk_mib = 512;
    lab.extra_cmdline = " nodeos.nbd_public".into();
    let guest_dir = lab.dir.path().join("guest");
    build(&guest_dir)?;

    let mut ms = vec![lab.machine(0, lab.disk(0)?), lab.machine(1, lab.disk(1)?)];
    let t0 = Instant::now();
    for m in &mut ms {
        lab.boot(m).await?;
    }
    lab.healthy(&ms[0], 2, BOOT)
        .await
        .with_context(|| format!("consoles:\n{}\n---\n{}", ms[0].console(), ms[1].console()))?;
    eprintln!(
        "nodeos-tests: {test}: accel {}, 2 healthy members {:.1} s after boot",
        accel(),
        t0.elapsed().as_secs_f64()
    );
    for m in &ms {
        let c = m.console();
        let kvm = c.lines().find(|l| l.contains("kvm_amd") || l.contains("kvm_intel"));
        eprintln!(
            "nodeos-tests: {test}: node {}: {}",
            m.index,
            kvm.map(str::trim).unwrap_or("(no KVM line)")
        );
    }
    let node_ids = wait_until("both node records", Duration::from_secs(60), || async {
        let nodes = lab.cli(&ms[0], &["node", "list"]).await?;
        let list = nodes.as_array().context("node list")?;
        let id_of = |m: &Machine| {
            let prefix = format!("{}:", m.ip);
            list.iter()
                .find(|n| {
                    n["hostname"] != "" && n["address"].as_str().is_some_and(|a| a.starts_with(&prefix))
                })
                .and_then(|n| n["id"].as_str())
                .map(str::to_owned)
        };
        let ids: Vec<String> = ms.iter().filter_map(id_of).collect();
        ensure!(ids.len() == 2, "{nodes}");
        Ok(ids)
    })
    .await?;
    Ok(GuestPool { lab, ms, guest_dir, node_ids })
}
