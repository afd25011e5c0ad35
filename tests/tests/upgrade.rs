//! Rolling image upgrade of a three-node pool of node images under QEMU
//! (nested virtualization, as in tests/tests/pxe.rs and linux_guest.rs).
//!
//! Image A is `make image`'s bundle; image B is the same kernel and initramfs
//! with another default command line (`panic=11`), so another image hash: a
//! real second image as far as the pool can tell. A VM (the test guest,
//! dirtying memory and numbering its passes) runs on the pool throughout.
//! Through the public CLI only, `nodeos pool upgrade --image B` must take
//! every node to image B, one at a time: each drained (the VM live-migrates
//! off), rebooted into B by kexec, back in the pool and out of maintenance.
//! At the end every node reports image B, the upgrade says done, and the VM
//! was never restarted: it runs, and its pass numbers went on from where they
//! were (a restarted guest counts from 1 again and prints `boot ok` again).
//! The test prints one `upgrade: ...` line with the total and per-node times.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use sha2::{Digest, Sha256};

const KERNEL_FILE: &str = "vmlinuz";
const INITRAMFS_FILE: &str = "initramfs.img";
const MANIFEST_FILE: &str = "manifest.json";
const FORMAT: u32 = 2;

/// A bundle file's name, sha256 and size, as its manifest lists it.
struct FileDigest {
    name: String,
    sha256: String,
    size: u64,
}

impl FileDigest {
    fn of(name: &str, bytes: &[u8]) -> Self {
        FileDigest { name: name.into(), sha256: hex::encode(Sha256::digest(bytes)), size: bytes.len() as u64 }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "name": self.name, "sha256": self.sha256, "size": self.size })
    }
}

/// The image hash as the README of the image format gives it: the sha256 of
/// `nodeos-image v2`, then each file's line, then the command line.
fn image_hash(kernel: &FileDigest, initramfs: &FileDigest, cmdline: &str) -> String {
    let text = format!(
        "nodeos-image v{FORMAT}\n{KERNEL_FILE} {} {}\n{INITRAMFS_FILE} {} {}\ncmdline {cmdline}\n",
        kernel.sha256, kernel.size, initramfs.sha256, initramfs.size
    );
    hex::encode(Sha256::digest(text.as_bytes()))
}
use nodeos_tests::qemu::{BOOT, Lab, Machine, accel, image_or_skip};
use nodeos_tests::{require, wait_until};

/// The whole upgrade of three nested-TCG machines, on a slow shared host.
const UPGRADE: Duration = Duration::from_secs(40 * 60);

/// Image B: image A's files with another default command line; its bundle dir.
fn image_b(a: &Path, dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    let kernel = std::fs::read(a.join(KERNEL_FILE))?;
    let initramfs = std::fs::read(a.join(INITRAMFS_FILE))?;
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(a.join(MANIFEST_FILE))?)?;
    let cmdline = manifest["cmdline"].as_str().context("cmdline")?.replace("panic=10", "panic=11");
    let cmdline = if cmdline.contains("panic=11") { cmdline } else { format!("{cmdline} panic=11") };
    let hash = image_hash(
        &FileDigest::of(KERNEL_FILE, &kernel),
        &FileDigest::of(INITRAMFS_FILE, &initramfs),
        &cmdline,
    );
    manifest["cmdline"] = cmdline.into();
    manifest["image_hash"] = hash.clone().into();
    std::fs::write(dir.join(KERNEL_FILE), kernel)?;
    std::fs::write(dir.join(INITRAMFS_FILE), initramfs)?;
    std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec_pretty(&manifest)?)?;
    Ok(hash)
}

/// The largest `dirty pass=N` the guest printed, and how many times it booted.
fn passes(console: &str) -> (u64, usize) {
    let max = console
        .lines()
        .filter_map(|l| l.split("NODEOS-GUEST: dirty pass=").nth(1)?.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0);
    (max, console.matches("NODEOS-GUEST: boot ok").count())
}

/// The VM's console, read from the node it runs on (consoles are not proxied).
async fn console(lab: &Lab, ms: &[Machine]) -> anyhow::Result<String> {
    let vm = lab.cli(&ms[0], &["vm", "show", "up"]).await?;
    let nodes = lab.cli(&ms[0], &["node", "list"]).await?;
    let addr = nodes
        .as_array()
        .and_then(|l| l.iter().find(|n| n["id"] == vm["node_id"]))
        .and_then(|n| n["address"].as_str())
        .with_context(|| format!("no address for the VM's node: {vm} {nodes}"))?
        .to_owned();
    let m = ms.iter().find(|m| addr.starts_with(&format!("{}:", m.ip))).context("no machine at {addr}")?;
    lab.cli_text(m, &["vm", "console", "up", "--from-start", "--no-follow"], Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_takes_every_node_to_image_b_without_restarting_a_vm() -> anyhow::Result<()> {
    let test = "a_rolling_upgrade_takes_every_node_to_image_b_without_restarting_a_vm";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(image) = image_or_skip(test)? else { return Ok(()) };
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build/nodeos-test-guest.elf");
    ensure!(guest.is_file(), "the test guest is not built ({}): run `make guest`", guest.display());
    let mut lab = Lab::new(image, env.bin.clone())?;
    lab.memory_mib = 1024;
    lab.cpus = 1;
    lab.disk_mib = 512;
    let b_dir = lab.dir.path().join("image-b");
    let b = image_b(&lab.image, &b_dir)?;
    ensure!(b != lab.image_hash, "image B has image A's hash");

    let mut ms: Vec<Machine> =
        (0..3).map(|i| Ok(lab.machine(i, lab.disk(i)?))).collect::<anyhow::Result<_>>()?;
    let t0 = Instant::now();
    for m in &mut ms {
        lab.boot(m).await?;
    }
    lab.healthy(&ms[0], 3, BOOT).await.with_context(|| format!("console 0:\n{}", ms[0].console()))?;
    lab.healthy_run_the_image(&ms[0]).await?;
    eprintln!(
        "nodeos-tests: {test}: accel {}, 3 healthy members on image A {:.1} s after boot",
        accel(),
        t0.elapsed().as_secs_f64()
    );

    // The VM: the test guest as a pool image, so it may run on any node.
    let g = guest.display().to_string();
    lab.cli(&ms[0], &["image", "upload", &g, "--name", "guest", "--kind", "kernel"]).await?;
    let spec = ["--memory", "32", "--kernel", "image:guest", "--cmdline", "mode=dirty dirty_mib=1"];
    lab.cli(&ms[0], &[&["vm", "create", "up"][..], &spec[..]].concat()).await?;
    lab.cli(&ms[0], &["vm", "start", "up"]).await?;
    let before = wait_until("the guest numbers its passes", Duration::from_secs(300), || async {
        let (p, boots) = passes(&console(&lab, &ms).await?);
        ensure!(p >= 3 && boots == 1, "pass {p}, {boots} boots");
        Ok(p)
    })
    .await?;

    let started = Instant::now();
    let (out, err) = lab
        .cli_output(
            &ms[1],
            &["-o", "json", "pool", "upgrade", "--image", &b_dir.display().to_string()],
            UPGRADE,
        )
        .await
        .with_context(|| {
            format!("consoles:\n{}\n---\n{}\n---\n{}", ms[0].console(), ms[1].console(), ms[2].console())
        })?;
    let total = started.elapsed();
    eprintln!("{err}");
    let done: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("upgrade printed {out}"))?;
    ensure!(done["state"] == "done" && done["image_hash"] == b.as_str(), "{done}");

    // Every node on image B, in the pool, in service.
    let nodes = wait_until("every node reports image B", Duration::from_secs(120), || async {
        let nodes = lab.cli(&ms[0], &["node", "list"]).await?;
        let list = nodes.as_array().context("node list")?;
        ensure!(list.len() == 3, "{nodes}");
        for n in list {
            ensure!(
                n["image_hash"] == b.as_str() && n["liveness"] == "alive" && n["maintenance"] != true,
                "{n}"
            );
        }
        Ok(nodes)
    })
    .await?;
    // The VM never restarted: it runs, its passes went on, one boot.
    let vm = lab.cli(&ms[0], &["vm", "show", "up"]).await?;
    ensure!(vm["state"] == "running", "{vm}");
    let (after, boots) = wait_until("the guest goes on", Duration::from_secs(120), || async {
        let (p, boots) = passes(&console(&lab, &ms).await?);
        ensure!(p > before, "pass {p}, {before} before the upgrade");
        Ok((p, boots))
    })
    .await?;
    ensure!(boots <= 1, "the guest booted {boots} times");
    let per_node: Vec<String> = done["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .map(|n| {
            let took = n["finished_at_ms"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(n["started_at_ms"].as_u64().unwrap_or(0));
            format!("{} {:.1} s", n["node_id"].as_str().unwrap_or("?"), took as f64 / 1000.0)
        })
        .collect();
    eprintln!(
        "upgrade: 3 nodes image A -> B ({}) in {:.1} s total; per node: {}; VM passes {before} -> {after}, one boot; nodes: {}",
        &b[..12],
        total.as_secs_f64(),
        per_node.join(", "),
        nodes.as_array().map_or(0, Vec::len)
    );
    Ok(())
}

/// `nodeos pool upgrade --image DIR` via node 0: the error's text, or the answer.
async fn upgrade(c: &nodeos_tests::cluster::Cluster, dir: &Path) -> Result<serde_json::Value, String> {
    c.cli(0, &["pool", "upgrade", "--image", &dir.display().to_string()]).await.map_err(|e| format!("{e:#}"))
}

/// A bundle of `kernel` and `initramfs` bytes with a manifest that matches
/// them, in `dir`; its image hash.
fn bundle(dir: &Path, kernel: &[u8], initramfs: &[u8]) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    let (k, i) = (FileDigest::of(KERNEL_FILE, kernel), FileDigest::of(INITRAMFS_FILE, initramfs));
    let hash = image_hash(&k, &i, "quiet");
    let manifest = serde_json::json!({
        "format": FORMAT, "image_hash": hash, "nodeos_version": "0.1.0",
        "kernel_version": "test", "cmdline": "quiet", "files": [k.json(), i.json()]
    });
    std::fs::write(dir.join(KERNEL_FILE), kernel)?;
    std::fs::write(dir.join(INITRAMFS_FILE), initramfs)?;
    std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec_pretty(&manifest)?)?;
    Ok(hash)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_refuses_a_bundle_that_does_not_verify_and_stops_at_a_node_that_cannot_reboot()
-> anyhow::Result<()> {
    let test = "an_upgrade_refuses_a_bundle_that_does_not_verify_and_stops_at_a_node_that_cannot_reboot";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = nodeos_tests::cluster::Cluster::new(&env, test)?;
    let spec = nodeos_tests::NodeSpec { bootstrap_expect: Some(3), ..c.spec() };
    let idx = c.add_nodes(3, &spec)?;
    let ids = c.ids(&idx).await?;
    let want = nodeos_tests::Expect { members: ids.clone(), voters: 3, healthy: ids, pool_id: None };
    c.wait_pool("pool formed", &idx, &want, Duration::from_secs(60)).await?;
    // Any kernel the pool's image store takes: the test guest.
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build/nodeos-test-guest.elf");
    ensure!(guest.is_file(), "the test guest is not built ({}): run `make guest`", guest.display());
    let kernel = std::fs::read(&guest)?;
    let dir = tempfile::tempdir()?;

    // A manifest that does not match its files: refused before anything is stored.
    let bad = dir.path().join("bad");
    bundle(&bad, &kernel, b"initramfs")?;
    std::fs::write(bad.join(INITRAMFS_FILE), b"another initramfs")?;
    let e = upgrade(&c, &bad).await.expect_err("a bundle whose files changed");
    ensure!(e.contains("does not verify") && e.contains("initramfs.img is 17 bytes"), "{e}");
    let forged = dir.path().join("forged");
    bundle(&forged, &kernel, b"initramfs")?;
    let m = std::fs::read_to_string(forged.join(MANIFEST_FILE))?;
    let h: serde_json::Value = serde_json::from_str(&m)?;
    let other = m.replace(h["image_hash"].as_str().context("hash")?, &"ab".repeat(32));
    std::fs::write(forged.join(MANIFEST_FILE), other)?;
    let e = upgrade(&c, &forged).await.expect_err("a manifest naming another image");
    ensure!(e.contains("but its files make image"), "{e}");
    let images = c.cli(0, &["image", "list"]).await?;
    ensure!(images.as_array().is_some_and(Vec::is_empty), "a refused bundle left images: {images}");
    let status = c.cli(0, &["pool", "status"]).await?;
    ensure!(status["upgrade"].is_null(), "a refused bundle started an upgrade: {status}");

    // A good bundle on nodes that do not run the node image: the upgrade
    // starts and stops at the first node, saying why; no node is left in
    // maintenance.
    let good = dir.path().join("good");
    let hash = bundle(&good, &kernel, b"initramfs")?;
    let e = upgrade(&c, &good).await.expect_err("process nodes cannot reboot into an image");
    ensure!(e.contains("stopped") && e.contains("does not run the node image as PID 1"), "{e}");
    let status = c.cli(1, &["pool", "status"]).await?;
    let u = &status["upgrade"];
    ensure!(u["state"] == "failed" && u["image_hash"] == hash.as_str(), "{status}");
    ensure!(u["nodes"][0]["phase"] == "failed" && u["nodes"][1]["phase"] == "pending", "{status}");
    let nodes = c.cli(0, &["node", "list"]).await?;
    ensure!(!nodes.to_string().contains("\"maintenance\":true"), "{nodes}");
    c.finish();
    Ok(())
}
