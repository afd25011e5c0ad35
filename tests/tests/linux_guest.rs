//! The proof that the pool runs real Linux: two QEMU machines boot the node image (under TCG,
//! `-cpu max` offers AMD SVM with nested paging, so each node loads kvm_amd and runs VMs) and
//! form a pool. Through the public CLI only, the test uploads this machine's Debian kernel and a
//! busybox initramfs as pool images, imports a root file system into one replicated volume per
//! VM, makes a pool network, and starts one VM on each node: 2 vCPUs, 256 MiB, root on its volume
//! (virtio-blk), a NIC on the network (virtio-net), a cloud-init seed. The guest
//! (tests/linux-guest/build.sh) prints one `guest-check:` line per check; the test verifies each
//! against what it knows (its VM id, host name, address, token, the time) and prints
//! `linux-guest: <check> ok <seconds since vm start>` per check and guest. Then `vm stop`
//! without `--force` must stop each guest through the ACPI power button, and the host reads the
//! file each guest wrote back through its volume's NBD export. The guests' consoles must not show
//! the complaints Linux made before the VMM had ACPI, an RTC, an i8042 and a consistent CPUID.
//! Live migration of a Linux guest is proven apart, in tests/tests/linux_migrate.rs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use nodeos_tests::linux_guest;
use nodeos_tests::nbd::NbdClient;
use nodeos_tests::qemu::{Machine, image_or_skip};
use nodeos_tests::{require, wait_until};

/// From `vm start` to every check of both guests, on a slow shared host.
const GUEST_BOOT: Duration = Duration::from_secs(900);
/// The pool network and the VMs' fixed addresses (handed out by the switch's DHCP).
const NET_CIDR: &str = "10.77.0.0/24";
const GATEWAY: &str = "10.77.0.1";
fn vm_ip(i: usize) -> String {
    format!("10.77.0.{}", 11 + i)
}
/// NBD exports, served on the fabric with `nodeos.nbd_public`.
const NBD_PORT: u16 = 10809;

/// What Linux said before the VMM had ACPI, a consistent CPUID leaf 0xD, an i8042 and an RTC.
const COMPLAINTS: &[&str] = &[
    "A valid RSDP was not found",
    "XSAVE consistency problem",
    "Can't read CTR",
    "broken or not accessible",
    "WARNING: CPU:",
];

/// The checks every guest passes, in the order the guest runs them.
const CHECKS: &[&str] = &["userspace", "cloud-init", "volume", "vcpus", "clock", "dhcp", "ping"];

/// One guest of the test.
struct Guest {
    name: String,
    id: String,
    hostname: String,
    token: String,
    node: usize,
    started: Instant,
    /// Check → (seconds after `vm start` it was first seen, its details).
    seen: BTreeMap<String, (f64, String)>,
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// `key=value` from a check's details.
fn field<'a>(details: &'a str, key: &str) -> Option<&'a str> {
    details.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

impl Guest {
    /// Verifies one check's details against what the test knows.
    fn verify(&self, check: &str, details: &str, peer_ip: &str) -> anyhow::Result<()> {
        let want = |key: &str, value: &str| -> anyhow::Result<()> {
            let got = field(details, key);
            ensure!(
                got == Some(value),
                "{}: {check}: {key} is {got:?}, want {value:?} ({details})",
                self.name
            );
            Ok(())
        };
        let near_now = |key: &str| -> anyhow::Result<()> {
            let got: i64 = field(details, key)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{}: {check}: no {key} in {details:?}", self.name))?;
            // The line is read a moment after the guest printed it; a wrong clock is hours or
            // years off (an RTC that counts from 1970 or 2000, a clock without kvm-clock).
            let off = (got - now_unix()).abs();
            ensure!(off < 300, "{}: {check}: {key} is {got}, {off} s from the host's clock", self.name);
            Ok(())
        };
        match check {
            "userspace" => want("root", "/dev/vda"),
            "cloud-init" => {
                want("hostname", &self.hostname)?;
                want("instance", &self.id)
            }
            "volume" => want("token", &self.token),
            "vcpus" => {
                want("online", "0-1")?;
                want("count", "2")
            }
            "clock" => {
                near_now("date")?;
                near_now("rtc")
            }
            "dhcp" => {
                want("ip", &vm_ip(self.node))?;
                want("gateway", GATEWAY)
            }
            "ping" => {
                want("gateway", GATEWAY)?;
                want("peer", peer_ip)
            }
            _ => Ok(()),
        }
    }

    /// Takes in the console so far: new checks, verified; an error at the first failed one.
    fn read_console(&mut self, console: &str, peer_ip: &str) -> anyhow::Result<()> {
        if let Some(l) = console.lines().find(|l| l.contains("guest-fail:")) {
            bail!("{} failed: {}\n--- console ---\n{console}", self.name, l.trim());
        }
        let at = self.started.elapsed().as_secs_f64();
        for line in console.lines() {
            let Some(rest) = line.split_once("guest-check: ").map(|(_, r)| r) else { continue };
            let mut parts = rest.splitn(3, ' ');
            let (Some(check), Some(_uptime)) = (parts.next(), parts.next()) else { continue };
            let details = parts.next().unwrap_or("").trim();
            if self.seen.contains_key(check) {
                continue;
            }
            self.verify(check, details, peer_ip).with_context(|| format!("--- console ---\n{console}"))?;
            self.seen.insert(check.to_owned(), (at, details.to_owned()));
        }
        Ok(())
    }

    fn done(&self) -> bool {
        CHECKS.iter().all(|c| self.seen.contains_key(*c)) && self.seen.contains_key("ready")
    }
}

/// The file `path` of the ext4 file system in volume `name`, read through node `m`'s NBD export.
async fn read_back(m: &Machine, name: &str, size: u64, path: &str, scratch: &Path) -> anyhow::Result<String> {
    let mut nbd = NbdClient::connect((m.ip, NBD_PORT).into(), name).await?;
    let mut image = Vec::with_capacity(size as usize);
    const CHUNK: u32 = 1 << 20;
    while (image.len() as u64) < size {
        let len = CHUNK.min((size - image.len() as u64) as u32);
        let block =
            nbd.read(image.len() as u64, len).await?.map_err(|e| anyhow::anyhow!("NBD read: {e:?}"))?;
        image.extend_from_slice(&block);
    }
    nbd.close().await?;
    let file = scratch.join(format!("{name}.readback"));
    std::fs::write(&file, &image)?;
    let out =
        std::process::Command::new("debugfs").args(["-R", &format!("cat {path}")]).arg(&file).output()?;
    ensure!(out.status.success(), "debugfs: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_vms_boot_on_a_two_node_qemu_pool_with_volume_network_cloud_init_and_acpi_stop()
-> anyhow::Result<()> {
    let test = "linux_vms_boot_on_a_two_node_qemu_pool_with_volume_network_cloud_init_and_acpi_stop";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(image) = image_or_skip(test)? else { return Ok(()) };
    if !linux_guest::tools_or_skip(test) {
        return Ok(());
    }
    let linux_guest::GuestPool { lab, ms, guest_dir, .. } =
        linux_guest::two_node_pool(test, image, env.bin.clone()).await?;

    // The guest's kernel and initramfs reach the nodes as pool images, through the API.
    let kernel = guest_dir.join("vmlinuz").display().to_string();
    let initrd = guest_dir.join("initrd.img").display().to_string();
    let upload = Duration::from_secs(300);
    lab.cli_text(&ms[0], &["image", "upload", &kernel, "--name", "linux", "--kind", "kernel"], upload)
        .await?;
    lab.cli_text(&ms[1], &["image", "upload", &initrd, "--name", "proof-initrd", "--kind", "initrd"], upload)
        .await?;
    lab.cli(&ms[0], &["network", "create", "proofnet", "--cidr", NET_CIDR]).await?;
    // A port without groups accepts no new inbound connections: the VMs ping each other.
    let icmp_in = format!("ingress icmp {NET_CIDR}");
    lab.cli(&ms[0], &["security-group", "create", "proof", "--rule", &icmp_in]).await?;

    let rootfs = guest_dir.join("rootfs.img").display().to_string();
    let rootfs_size = std::fs::metadata(&rootfs)?.len();
    let mut guests = Vec::new();
    for (i, m) in ms.iter().enumerate() {
        let name = format!("lg{i}");
        let root = format!("root{i}");
        lab.cli_text(m, &["volume", "import", &rootfs, "--name", &root], upload).await?;
        let token: String = (0..16).map(|_| format!("{:x}", rand::random::<u8>() & 0xf)).collect();
        let user_data = lab.dir.path().join(format!("user-data{i}"));
        std::fs::write(&user_data, format!("#!/bin/sh\nTOKEN={token}\nPEER={}\n", vm_ip(1 - i)))?;
        let hostname = format!("proof-{i}");
        let vm = lab
            .cli(
                m,
                &[
                    "vm",
                    "create",
                    &name,
                    "--vcpus",
                    "2",
                    "--memory",
                    "256",
                    "--kernel",
                    "image:linux",
                    "--initrd",
                    "image:proof-initrd",
                    "--cmdline",
                    "console=ttyS0",
                    "--disk",
                    &format!("volume:{root}"),
                    "--nic",
                    &format!("network=proofnet,ip={},sg=proof", vm_ip(i)),
                    "--user-data",
                    &user_data.display().to_string(),
                    "--hostname",
                    &hostname,
                ],
            )
            .await?;
        let id = vm["id"].as_str().context("vm id")?.to_owned();
        guests.push(Guest {
            name,
            id,
            hostname,
            token,
            node: i,
            started: Instant::now(),
            seen: BTreeMap::new(),
        });
    }
    for g in &mut guests {
        lab.cli(&ms[g.node], &["vm", "start", &g.name]).await?;
        g.started = Instant::now();
    }

    // Every check of both guests, verified as they come.
    let deadline = Instant::now() + GUEST_BOOT;
    let mut consoles = vec![String::new(); guests.len()];
    while !guests.iter().all(Guest::done) {
        if Instant::now() > deadline {
            let missing: Vec<String> = guests
                .iter()
                .flat_map(|g| {
                    CHECKS
                        .iter()
                        .filter(|c| !g.seen.contains_key(**c))
                        .map(move |c| format!("{} {c}", g.name))
                })
                .collect();
            bail!(
                "guests not done after {GUEST_BOOT:?}: missing {missing:?}\n--- lg0 ---\n{}\n--- lg1 ---\n{}\n--- node consoles ---\n{}\n---\n{}",
                consoles[0],
                consoles[1],
                ms[0].console(),
                ms[1].console()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        for (i, g) in guests.iter_mut().enumerate() {
            let args = ["vm", "console", g.name.as_str(), "--from-start", "--no-follow"];
            if let Ok(c) = lab.cli_text(&ms[g.node], &args, Duration::from_secs(30)).await {
                consoles[i] = c;
            }
            g.read_console(&consoles[i], &vm_ip(1 - g.node))?;
        }
    }
    for (g, console) in guests.iter().zip(&consoles) {
        for c in COMPLAINTS {
            ensure!(!console.contains(c), "{} complained \"{c}\":\n{console}", g.name);
        }
        ensure!(
            console.contains("Switched to clocksource kvm-clock"),
            "{} does not keep time with kvm-clock:\n{console}",
            g.name
        );
    }

    // A clean stop through the ACPI power button, no --force.
    let mut stopped = Vec::new();
    for g in &guests {
        let t = Instant::now();
        lab.cli_text(&ms[g.node], &["vm", "stop", &g.name, "--timeout", "120"], Duration::from_secs(180))
            .await?;
        let vm = wait_until(&format!("{} stopped", g.name), Duration::from_secs(60), || async {
            let vm = lab.cli(&ms[g.node], &["vm", "show", &g.name]).await?;
            ensure!(vm["state"] == "stopped", "{vm}");
            Ok(vm)
        })
        .await?;
        let reason = vm["reason"].as_str().unwrap_or_default().to_owned();
        ensure!(
            reason.contains("powered off"),
            "{} stopped, but not by powering off: {reason:?}\n{}",
            g.name,
            lab.cli_text(
                &ms[g.node],
                &["vm", "console", &g.name, "--from-start", "--no-follow"],
                Duration::from_secs(30)
            )
            .await
            .unwrap_or_default()
        );
        stopped.push(t.elapsed().as_secs_f64());
    }

    // What each guest wrote to its root volume, read back through the NBD export.
    for g in &guests {
        let text =
            read_back(&ms[1 - g.node], &format!("root{}", g.node), rootfs_size, "/proof.txt", lab.dir.path())
                .await
                .with_context(|| format!("reading {}'s volume back", g.name))?;
        ensure!(text == format!("proof {}", g.token), "{}'s volume holds {text:?}", g.name);
    }

    // Straight to stderr, past the test harness's capture: CI's log shows these lines.
    let mut report = String::new();
    for (g, stop) in guests.iter().zip(&stopped) {
        let at = format!("({} on node {})", g.name, g.node);
        for c in CHECKS {
            let (secs, details) = &g.seen[*c];
            report += &format!("linux-guest: {c} ok {secs:.1} {at} {details}\n");
        }
        report += &format!("linux-guest: acpi-stop ok {stop:.1} {at}\n");
        report +=
            &format!("linux-guest: boot ok {:.1} {at} (vm start to the last check)\n", g.seen["ready"].0);
    }
    std::io::Write::write_all(&mut std::io::stderr(), report.as_bytes())?;
    Ok(())
}
