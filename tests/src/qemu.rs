//! QEMU machines booting the node image (`make image`) for end-to-end tests:
//! each with its own data disk (ext4 labelled `nodeos-data`) and a virtio NIC
//! on a tap enslaved to the test's bridge, so the host CLI reaches every node.
//!
//! QEMU uses KVM only on hosts with hardware virtualization (a loaded
//! kvm_intel or kvm_amd module), TCG with `-cpu max` otherwise: that CPU
//! offers AMD SVM with nested paging, so the nodes can run VMs themselves.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};

use crate::netns::{TestNet, ip};
use crate::{BuiltImage, built_image, wait_until};

/// Boot to a serving API under TCG on a slow shared host.
pub const BOOT: Duration = Duration::from_secs(240);
pub const POOL_NAME: &str = "qemupool";

/// The image, or a loud skip line when the machine cannot run the test.
pub fn image_or_skip(test: &str) -> anyhow::Result<Option<BuiltImage>> {
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

pub fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(cmd)).find(|p| p.is_file())
}

/// KVM only where the host has hardware virtualization.
pub fn accel() -> &'static str {
    let hw = ["kvm_intel", "kvm_amd"].iter().any(|m| Path::new("/sys/module").join(m).exists());
    if hw && Path::new("/dev/kvm").exists() { "kvm" } else { "tcg" }
}

/// One QEMU machine booting the image.
#[derive(Debug)]
pub struct Machine {
    pub index: usize,
    pub child: Option<tokio::process::Child>,
    pub console: PathBuf,
    pub disk: PathBuf,
    pub tap: String,
    pub ip: std::net::Ipv4Addr,
}

impl Machine {
    pub fn api(&self) -> String {
        format!("{}:7700", self.ip)
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    pub fn kill(&mut self) {
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

#[derive(Debug)]
pub struct Lab {
    pub net: TestNet,
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub key: String,
    pub bin: PathBuf,
    pub image_hash: String,
    /// Members the pool waits for before it forms (`nodeos.bootstrap_expect`).
    pub bootstrap_expect: usize,
    /// Each machine's memory and CPUs.
    pub memory_mib: u32,
    pub cpus: u32,
    /// Each machine's data disk.
    pub disk_mib: u64,
    /// Appended to every machine's kernel command line (` nodeos.x=y ...`).
    pub extra_cmdline: String,
    /// The admin credential the CLI calls the pool with.
    pub creds: crate::client::Credentials,
}

impl Lab {
    pub fn new(built: BuiltImage, bin: PathBuf) -> anyhow::Result<Self> {
        let (image, image_hash) = (built.dir, built.hash);
        let key: String = (0..32).map(|_| format!("{:x}", rand::random::<u8>() & 0xf)).collect();
        let dir = tempfile::tempdir()?;
        let key_file = dir.path().join("pool.key");
        std::fs::write(&key_file, format!("{key}\n")).context("writing the pool key")?;
        let creds = crate::client::Credentials::bootstrap(&bin, &key_file, &dir.path().join("cli.json"))?;
        Ok(Lab {
            creds,
            net: TestNet::new()?,
            dir,
            image,
            key,
            bin,
            image_hash,
            bootstrap_expect: 3,
            memory_mib: 1024,
            cpus: 1,
            disk_mib: 256,
            extra_cmdline: String::new(),
        })
    }

    /// A fresh data disk for machine `i` (`disk_mib`), ext4 labelled for nodeos.
    pub fn disk(&self, i: usize) -> anyhow::Result<PathBuf> {
        let p = self.dir.path().join(format!("data{i}.img"));
        std::fs::File::create(&p)?.set_len(self.disk_mib << 20)?;
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "nodeos-data"])
            .arg(&p)
            .output()?;
        ensure!(out.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
        Ok(p)
    }

    pub fn machine(&self, i: usize, disk: PathBuf) -> Machine {
        Machine {
            index: i,
            child: None,
            console: self.dir.path().join(format!("console{i}.log")),
            disk,
            tap: self.net.link_name(i),
            ip: self.net.ip_of(i),
        }
    }

    pub fn cmdline(&self, m: &Machine) -> String {
        format!(
            "console=ttyS0,115200 panic=-1 nodeos.pool={POOL_NAME} nodeos.key={} nodeos.bootstrap_expect={} \
             nodeos.ip={}/24 nodeos.hostname=qnode{} nodeos.image={}{}",
            self.key, self.bootstrap_expect, m.ip, m.index, self.image_hash, self.extra_cmdline
        )
    }

    /// A TFTP root holding the bundle, with a boot script that adds this
    /// pool's parameters for machine `m` (its fabric NIC is the second one).
    pub fn tftp_root(&self, m: &Machine) -> anyhow::Result<PathBuf> {
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
    pub async fn boot_pxe(&self, m: &mut Machine) -> anyhow::Result<()> {
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

    pub async fn attach_tap(&self, m: &Machine) -> anyhow::Result<()> {
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
    pub fn spawn(&self, m: &mut Machine, args: &[String]) -> anyhow::Result<()> {
        let console = std::fs::OpenOptions::new().create(true).append(true).open(&m.console)?;
        let cpu = if accel() == "kvm" { "host" } else { "max" };
        let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
        let (memory, cpus) = (self.memory_mib.to_string(), self.cpus.to_string());
        cmd.args(["-accel", accel(), "-cpu", cpu, "-m", &memory, "-smp", &cpus, "-nographic", "-no-reboot"])
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
    pub async fn boot_from_pool(&self, m: &mut Machine) -> anyhow::Result<()> {
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
    pub async fn boot_direct(&self, m: &mut Machine, cmdline: &str, nic: bool) -> anyhow::Result<()> {
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
    pub fn dhcp_server(&self) -> anyhow::Result<tokio::process::Child> {
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
    pub async fn boot(&self, m: &mut Machine) -> anyhow::Result<()> {
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
    pub async fn cli(&self, m: &Machine, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = self.cli_text(m, &[&["-o", "json"], args].concat(), Duration::from_secs(30)).await?;
        serde_json::from_str(&out)
            .with_context(|| format!("`nodeos {}` printed no JSON: {out}", args.join(" ")))
    }

    /// `nodeos --endpoint <m> ARGS` within `within`: what it printed.
    pub async fn cli_text(&self, m: &Machine, args: &[&str], within: Duration) -> anyhow::Result<String> {
        Ok(self.cli_output(m, args, within).await?.0)
    }

    /// `nodeos --endpoint <m> ARGS` within `within`: its standard output and error.
    pub async fn cli_output(
        &self,
        m: &Machine,
        args: &[&str],
        within: Duration,
    ) -> anyhow::Result<(String, String)> {
        let out = tokio::process::Command::new(&self.bin)
            .arg("--config")
            .arg(&self.creds.config)
            .args(["--endpoint", &m.api(), "--request-timeout", "10"])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(within, out).await.context("CLI timed out")??;
        if !out.status.success() {
            bail!(
                "`nodeos {}` on {}: {}",
                args.join(" "),
                m.api(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Waits until every healthy member, as `via` sees them, reports this image's hash (a
    /// member's record follows its membership by a moment); the pool status.
    pub async fn healthy_run_the_image(&self, via: &Machine) -> anyhow::Result<serde_json::Value> {
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
    pub async fn healthy(&self, via: &Machine, n: usize, within: Duration) -> anyhow::Result<Vec<String>> {
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
