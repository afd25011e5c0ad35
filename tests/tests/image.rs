//! The node image end to end: three QEMU machines boot the image built by
//! `make image` (kernel + initramfs, nodeos as PID 1), each with its own
//! data disk (ext4 labelled `nodeos-data`) and a virtio NIC on a tap
//! enslaved to the test's bridge, so the host CLI reaches every node. The
//! nodes form a pool with no manual step; one is killed and the pool keeps
//! serving; it boots again and rejoins with its data. A diskless machine boots from the
//! network through QEMU's iPXE ROM and a TFTP server holding the bundle; then node 0 serves PXE
//! itself and a fifth machine boots the pool's own image from it and joins. Machines with a
//! wrong pool key or no network say so on their consoles.
//!
//! QEMU uses KVM only on hosts with hardware virtualization (a loaded
//! kvm_intel or kvm_amd module), TCG otherwise.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nodeos_tests::netns::{TestNet, ip};
use nodeos_tests::{BuiltImage, built_image, require, wait_until};

/// Boot to a serving API under TCG on a slow shared host.
const BOOT: Duration = Duration::from_secs(240);
const POOL_NAME: &str = "qemupool";

/// The image, or a loud skip line when the machine cannot run the test.
fn image_or_skip(test: &str) -> anyhow::Result<Option<BuiltImage>> {
    let skip = |why: &str| nodeos_types::testing::skip(test, why);
    if which("qemu-system-x86_64").is_none() {
        skip("qemu-system-x86_64 is not installed");
        return Ok(None);
    }
    if which("mkfs.ext4").is_none() {
        skip("mkfs.ext4 is not installed (e2fsprogs)");
        return Ok(None);
    }
    built_image().map(Some)
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(cmd)).find(|p| p.is_file())
}

/// KVM only where the host has hardware virtualization.
fn accel() -> &'static str {
    let hw = ["kvm_intel", "kvm_amd"].iter().any(|m| Path::new("/sys/module").join(m).exists());
    if hw && Path::new("/dev/kvm").exists() { "kvm" } else { "tcg" }
}

/// One QEMU machine booting the image.
struct Machine {
    index: usize,
    child: Option<tokio::process::Child>,
    console: PathBuf,
    disk: PathBuf,
    tap: String,
    ip: std::net::Ipv4Addr,
}

impl Machine {
    fn api(&self) -> String {
        format!("{}:7700", self.ip)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Lab {
    net: TestNet,
    dir: tempfile::TempDir,
    image: PathBuf,
    key: String,
    bin: PathBuf,
    image_hash: String,
}

impl Lab {
    fn new(built: BuiltImage, bin: PathBuf) -> anyhow::Result<Self> {
        let (image, image_hash) = (built.dir, built.hash);
        let key: String = (0..32).map(|_| format!("{:x}", rand::random::<u8>() & 0xf)).collect();
        Ok(Lab { net: TestNet::new()?, dir: tempfile::tempdir()?, image, key, bin, image_hash })
    }

    /// A fresh 256 MiB data disk for machine `i`, ext4 labelled for nodeos.
    fn disk(&self, i: usize) -> anyhow::Result<PathBuf> {
        let p = self.dir.path().join(format!("data{i}.img"));
        std::fs::File::create(&p)?.set_len(256 << 20)?;
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "nodeos-data"])
            .arg(&p)
            .output()?;
        ensure!(out.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
        Ok(p)
    }

    fn machine(&self, i: usize, disk: PathBuf) -> Machine {
        Machine {
            index: i,
            child: None,
            console: self.dir.path().join(format!("console{i}.log")),
            disk,
            tap: self.net.link_name(i),
            ip: self.net.ip_of(i),
        }
    }

    fn cmdline(&self, m: &Machine) -> String {
        format!(
            "console=ttyS0,115200 panic=-1 nodeos.pool={POOL_NAME} nodeos.key={} nodeos.bootstrap_expect=3 \
             nodeos.ip={}/24 nodeos.hostname=qnode{} nodeos.image={}",
            self.key, m.ip, m.index, self.image_hash
        )
    }

    /// A TFTP root holding the bundle, with a boot script that adds this
    /// pool's parameters for machine `m` (its fabric NIC is the second one).
    fn tftp_root(&self, m: &Machine) -> anyhow::Result<PathBuf> {
        let root = self.dir.path().join("tftp");
        std::fs::create_dir_all(&root)?;
        for f in ["vmlinuz", "initramfs.img"] {
            std::fs::copy(self.image.join(f), root.join(f))?;
        }
        let script = format!(
            "#!ipxe\nkernel vmlinuz {} nodeos.iface=eth1 nodeos.data=ram initrd=initramfs.img\ninitrd initramfs.img\nboot\n",
            self.cmdline(m)
        );
        std::fs::write(root.join("boot.ipxe"), script)?;
        Ok(root)
    }

    /// Boots machine `m` from the network only: QEMU's iPXE ROM fetches the
    /// bundle over TFTP on a first NIC; the second NIC is on the fabric.
    async fn boot_pxe(&self, m: &mut Machine) -> anyhow::Result<()> {
        let root = self.tftp_root(m)?;
        let args: Vec<String> = [
            "-boot",
            "n",
            "-netdev",
            &format!("user,id=pxe,tftp={},bootfile=boot.ipxe", root.display()),
            "-device",
            "virtio-net-pci,netdev=pxe,bootindex=1",
            "-netdev",
            &format!("tap,id=fabric,ifname={},script=no,downscript=no", m.tap),
            "-device",
            &format!("virtio-net-pci,netdev=fabric,mac=52:54:00:4e:4f:{:02x},romfile=", m.index),
        ]
        .map(str::to_owned)
        .into();
        self.spawn(m, &args)?;
        self.attach_tap(m).await
    }

    async fn attach_tap(&self, m: &Machine) -> anyhow::Result<()> {
        let tap = m.tap.clone();
        wait_until(&format!("tap {tap}"), Duration::from_secs(20), || {
            let tap = tap.clone();
            async move { ip(&["link", "show", &tap]).map(|_| ()) }
        })
        .await?;
        ip(&["link", "set", &m.tap, "master", self.net.bridge()])?;
        ip(&["link", "set", &m.tap, "up"])?;
        Ok(())
    }

    /// Starts QEMU for machine `m` with the common flags plus `args`.
    fn spawn(&self, m: &mut Machine, args: &[String]) -> anyhow::Result<()> {
        let console = std::fs::OpenOptions::new().create(true).append(true).open(&m.console)?;
        let cpu = if accel() == "kvm" { "host" } else { "max" };
        let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
        cmd.args(["-accel", accel(), "-cpu", cpu, "-m", "1024", "-smp", "1", "-nographic", "-no-reboot"])
            .args(["-nodefaults", "-device", "virtio-rng-pci", "-serial", "stdio"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .kill_on_drop(true);
        m.child = Some(cmd.spawn().context("starting qemu-system-x86_64")?);
        Ok(())
    }

    /// Boots machine `m` from its fabric NIC only, through QEMU's iPXE ROM: the addresses come
    /// from the test's DHCP server on the bridge, the boot file from a pool node's proxy DHCP.
    async fn boot_from_pool(&self, m: &mut Machine) -> anyhow::Result<()> {
        let args: Vec<String> = [
            "-boot",
            "n",
            "-netdev",
            &format!("tap,id=fabric,ifname={},script=no,downscript=no", m.tap),
            "-device",
            &format!("virtio-net-pci,netdev=fabric,mac=52:54:00:4e:4f:{:02x},bootindex=1", m.index),
        ]
        .map(str::to_owned)
        .into();
        self.spawn(m, &args)?;
        self.attach_tap(m).await
    }

    /// Boots machine `m` from the image files with the kernel arguments `cmdline`, with no
    /// disk, and with a fabric NIC only if `nic`.
    async fn boot_direct(&self, m: &mut Machine, cmdline: &str, nic: bool) -> anyhow::Result<()> {
        let mut args: Vec<String> = vec![
            "-kernel".into(),
            self.image.join("vmlinuz").display().to_string(),
            "-initrd".into(),
            self.image.join("initramfs.img").display().to_string(),
            "-append".into(),
            cmdline.into(),
        ];
        if nic {
            args.extend([
                "-netdev".into(),
                format!("tap,id=fabric,ifname={},script=no,downscript=no", m.tap),
                "-device".into(),
                format!("virtio-net-pci,netdev=fabric,mac=52:54:00:4e:4f:{:02x}", m.index),
            ]);
        }
        self.spawn(m, &args)?;
        if nic { self.attach_tap(m).await } else { Ok(()) }
    }

    /// A DHCP server on the bridge (busybox udhcpd) for machines that boot from the network:
    /// addresses only, no boot file, as on a fabric where a pool node answers the PXE part.
    fn dhcp_server(&self) -> anyhow::Result<tokio::process::Child> {
        let ip = self.net.bridge_ip().octets();
        let conf = self.dir.path().join("udhcpd.conf");
        let leases = self.dir.path().join("udhcpd.leases");
        std::fs::write(&leases, "")?;
        std::fs::write(
            &conf,
            format!(
                "start {a}.{b}.{c}.100\nend {a}.{b}.{c}.150\ninterface {br}\nlease_file {l}\n\
                 option subnet 255.255.255.0\noption lease 3600\n",
                a = ip[0],
                b = ip[1],
                c = ip[2],
                br = self.net.bridge(),
                l = leases.display()
            ),
        )?;
        let log = std::fs::File::create(self.dir.path().join("udhcpd.log"))?;
        tokio::process::Command::new("busybox")
            .args(["udhcpd", "-f"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting busybox udhcpd (busybox-static)")
    }

    /// Boots (or boots again) machine `m` on its disk.
    async fn boot(&self, m: &mut Machine) -> anyhow::Result<()> {
        // A CPU with RDRAND (`max` under TCG, see `spawn`): without an entropy source the
        // kernel's CRNG is not ready for minutes and the daemon's first getrandom() waits.
        let args: Vec<String> = vec![
            "-kernel".into(),
            self.image.join("vmlinuz").display().to_string(),
            "-initrd".into(),
            self.image.join("initramfs.img").display().to_string(),
            "-append".into(),
            self.cmdline(m),
            "-drive".into(),
            format!("file={},format=raw,if=virtio", m.disk.display()),
            "-netdev".into(),
            format!("tap,id=fabric,ifname={},script=no,downscript=no", m.tap),
            "-device".into(),
            format!("virtio-net-pci,netdev=fabric,mac=52:54:00:4e:4f:{:02x}", m.index),
        ];
        self.spawn(m, &args)?;
        self.attach_tap(m).await
    }

    /// `nodeos --endpoint <m> -o json ARGS`.
    async fn cli(&self, m: &Machine, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = tokio::process::Command::new(&self.bin)
            .args(["--endpoint", &m.api(), "--request-timeout", "10", "-o", "json"])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), out).await.context("CLI timed out")??;
        if !out.status.success() {
            bail!(
                "`nodeos {}` on {}: {}",
                args.join(" "),
                m.api(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until every healthy member, as `via` sees them, reports this image's hash (a
    /// member's record follows its membership by a moment); the pool status.
    async fn healthy_run_the_image(&self, via: &Machine) -> anyhow::Result<serde_json::Value> {
        wait_until("every healthy member reports the image hash", Duration::from_secs(60), || async {
            let status = self.cli(via, &["pool", "status"]).await?;
            let members = status["members"].as_array().context("members")?;
            for m in members.iter().filter(|m| m["health"] == "healthy") {
                ensure!(m["image_hash"] == self.image_hash.as_str(), "member reports another image: {m}");
            }
            Ok(status)
        })
        .await
    }

    /// Waits until `via` reports `n` healthy members; their ids.
    async fn healthy(&self, via: &Machine, n: usize, within: Duration) -> anyhow::Result<Vec<String>> {
        wait_until(&format!("{n} healthy members via node {}", via.index), within, || async {
            let s = self.cli(via, &["pool", "status"]).await?;
            let members = s["members"].as_array().context("no members")?;
            let healthy: Vec<String> = members
                .iter()
                .filter(|m| m["health"] == "healthy")
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect();
            ensure!(healthy.len() == n, "{} healthy: {s}", healthy.len());
            Ok(healthy)
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_machines_boot_the_image_form_a_pool_and_survive_a_node_loss() -> anyhow::Result<()> {
    let test = "three_machines_boot_the_image_form_a_pool_and_survive_a_node_loss";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(image) = image_or_skip(test)? else { return Ok(()) };
    let lab = Lab::new(image, env.bin.clone())?;
    let mut ms = Vec::new();
    for i in 0..3 {
        ms.push(lab.machine(i, lab.disk(i)?));
    }
    let t0 = Instant::now();
    for m in &mut ms {
        lab.boot(m).await?;
    }
    let first = wait_until("node 0's API", BOOT, || async { lab.cli(&ms[0], &["pool", "status"]).await })
        .await
        .with_context(|| format!("node 0 console:\n{}", ms[0].console()))?;
    let serving = t0.elapsed();
    let ids = lab.healthy(&ms[0], 3, BOOT).await.with_context(|| {
        format!("consoles:\n{}\n---\n{}\n---\n{}", ms[0].console(), ms[1].console(), ms[2].console())
    })?;
    let formed = t0.elapsed();
    eprintln!(
        "nodeos-tests: {test}: accel {}, first API answer {:.1} s ({first}), 3 healthy members {:.1} s after boot",
        accel(),
        serving.as_secs_f64(),
        formed.as_secs_f64()
    );
    // Each node reports the image it booted.
    lab.healthy_run_the_image(&ms[1]).await?;
    ensure!(
        ms[0].console().contains("data disk"),
        "node 0 did not report its data disk:\n{}",
        ms[0].console()
    );
    lab.cli(&ms[0], &["meta", "put", "survives", "yes"]).await?;

    // Node 0 starts serving PXE now: it rebuilds its image from its root file system (minutes
    // under TCG) while the rest of the test goes on.
    let id0 = lab.cli(&ms[0], &["pool", "status"]).await?["answered_by"]
        .as_str()
        .and_then(|s| s.split_whitespace().next())
        .context("answered_by")?
        .to_owned();
    lab.cli(&ms[0], &["pxe", "enable", "--nodes", &id0]).await?;
    let t_pxe_enabled = Instant::now();

    // Kill machine 2: the pool keeps serving.
    // `answered_by` is the node asked, then "(via <leader>)" when handed over.
    let victim_id = lab.cli(&ms[2], &["pool", "status"]).await?["answered_by"]
        .as_str()
        .and_then(|s| s.split_whitespace().next())
        .context("answered_by")?
        .to_owned();
    ms[2].kill();
    // If it led, the other two elect a leader first.
    let t_kill = Instant::now();
    wait_until("a write while node 2 is down", Duration::from_secs(90), || async {
        lab.cli(&ms[0], &["meta", "put", "while-down", "ok"]).await
    })
    .await?;
    eprintln!("nodeos-tests: {test}: writes accepted {:.1} s after the kill", t_kill.elapsed().as_secs_f64());
    lab.healthy(&ms[0], 2, Duration::from_secs(60)).await?;

    // It boots again on the same disk and rejoins with its data.
    let disk = ms[2].disk.clone();
    ms[2] = lab.machine(2, disk);
    lab.boot(&mut ms[2]).await?;
    let again = lab.healthy(&ms[0], 3, BOOT).await?;
    ensure!(again.iter().all(|id| ids.contains(id)), "a node rejoined under a new id: {ids:?} -> {again:?}");
    ensure!(again.contains(&victim_id), "node {victim_id} did not come back under its id");
    let got = wait_until("the written key via the returned node", Duration::from_secs(60), || async {
        let v = lab.cli(&ms[2], &["meta", "get", "while-down"]).await?;
        ensure!(v.to_string().contains("ok"), "{v}");
        Ok(v)
    })
    .await?;
    eprintln!("nodeos-tests: {test}: rejoined, read {got}");

    // A fourth machine with no disk boots from the network only and joins.
    let mut pxe = lab.machine(3, PathBuf::new());
    let t_pxe = Instant::now();
    lab.boot_pxe(&mut pxe).await?;
    let all =
        lab.healthy(&ms[0], 4, BOOT).await.with_context(|| format!("PXE console:\n{}", pxe.console()))?;
    eprintln!(
        "nodeos-tests: {test}: PXE-booted machine joined {:.1} s after power-on ({} members)",
        t_pxe.elapsed().as_secs_f64(),
        all.len()
    );
    let console = pxe.console();
    ensure!(console.contains("iPXE"), "the machine did not boot through iPXE:\n{console}");
    ensure!(console.contains("NO DATA DISK"), "a diskless node must say its state lives in RAM:\n{console}");
    pxe.kill();
    lab.healthy(&ms[0], 3, Duration::from_secs(90)).await?;

    // The pool grows itself: a fifth machine boots from node 0's PXE server (its address from
    // the fabric's DHCP server) and joins.
    let pxe_ready = wait_until("node 0 serving PXE", BOOT * 2, || async {
        let s = lab.cli(&ms[0], &["pxe", "status", "--node", &id0]).await?;
        let n = &s["nodes"][0];
        ensure!(n["state"] == "serving", "{n}");
        ensure!(n["image_hash"] == lab.image_hash.as_str(), "node 0 serves another image: {n}");
        Ok(())
    })
    .await
    .with_context(|| format!("node 0 console:\n{}", ms[0].console()));
    pxe_ready?;
    eprintln!(
        "nodeos-tests: {test}: node 0 serving its own image over PXE {:.1} s after `pxe enable`",
        t_pxe_enabled.elapsed().as_secs_f64()
    );
    let _dhcp = lab.dhcp_server()?;
    let mut grown = lab.machine(4, PathBuf::new());
    let t_grow = Instant::now();
    lab.boot_from_pool(&mut grown).await?;

    // Meanwhile, bad boots say why on the console: a wrong pool key, and no network at all.
    let mut stranger = lab.machine(5, PathBuf::new());
    let wrong_key: String = (0..32).map(|_| format!("{:x}", rand::random::<u8>() & 0xf)).collect();
    let stranger_cmdline = format!(
        "console=ttyS0,115200 panic=-1 nodeos.pool={POOL_NAME} nodeos.key={wrong_key} nodeos.ip={}/24 \
         nodeos.seeds={} nodeos.data=ram",
        stranger.ip,
        ms[0].api()
    );
    lab.boot_direct(&mut stranger, &stranger_cmdline, true).await?;
    let mut offline = lab.machine(6, PathBuf::new());
    let offline_cmdline = format!(
        "console=ttyS0,115200 panic=-1 nodeos.pool={POOL_NAME} nodeos.key={} nodeos.data=ram",
        lab.key
    );
    lab.boot_direct(&mut offline, &offline_cmdline, false).await?;
    wait_until("the wrong key's refusal on the console", BOOT, || async {
        let c = stranger.console();
        ensure!(c.contains("pool key mismatch"), "not yet");
        Ok(())
    })
    .await
    .with_context(|| format!("wrong-key console:\n{}", stranger.console()))?;
    wait_until("no network on the console", BOOT, || async {
        ensure!(offline.console().contains("no network yet"), "not yet");
        Ok(())
    })
    .await
    .with_context(|| format!("no-network console:\n{}", offline.console()))?;
    stranger.kill();
    offline.kill();

    let all = lab
        .healthy(&ms[0], 4, BOOT)
        .await
        .with_context(|| format!("pool-booted console:\n{}", grown.console()))?;
    eprintln!(
        "nodeos-tests: {test}: machine booted by the pool joined {:.1} s after power-on ({} healthy)",
        t_grow.elapsed().as_secs_f64(),
        all.len()
    );
    let console = grown.console();
    ensure!(console.contains("iPXE"), "the machine did not boot through iPXE:\n{console}");
    for line in console.lines().filter(|l| l.contains("boot.ipxe") || l.contains("nodeos.pool=")).take(3) {
        eprintln!("nodeos-tests: {test}: pool-booted console: {}", line.trim());
    }
    let s = lab.cli(&ms[0], &["pxe", "status", "--node", &id0]).await?;
    let n = &s["nodes"][0]["counters"];
    ensure!(n["offers"].as_u64() >= Some(1) && n["http_requests"].as_u64() >= Some(3), "{n}");
    // The machine killed above is still a member, unreachable; the healthy ones run the image.
    let status = lab.healthy_run_the_image(&ms[0]).await?;
    let members = status["members"].as_array().context("members")?.len();
    ensure!(members == 5, "the pool has {members} members; the wrong-key machine must not be one: {status}");
    Ok(())
}
