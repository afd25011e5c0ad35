//! Live migration of a Linux guest on a two-node QEMU pool (nested virtualization, as in
//! tests/tests/linux_guest.rs). The guests are this machine's Debian kernel with the heartbeat
//! initramfs of tests/linux-guest/build.sh (`beat-initrd.img`), 2 vCPUs and 256 MiB each, on one
//! pool network: `lg` on node 0, with a replicated volume disk, and `peer` on node 1. Once a
//! second `lg` pings its gateway and `peer`, writes the beat's number to its disk with a flush,
//! and prints a numbered beat through the tty (the UART's interrupts) and through the kernel log
//! (printk's polled console); `peer` pings `lg` once a beat, a third port watching it move.
//!
//! Through the public CLI only, `lg` moves node 0 → node 1 → node 0 with `vm migrate`. After each
//! move it must go on where it was: its beats continue in sequence on the new node's console (no
//! reboot, no gap), through both paths, with every disk write succeeding; its clock stays near the
//! host's; the gateway (the switch of the node it now runs on) and `peer` (on the same node, then
//! across the nodes) answer again. At the end the volume, read through NBD, holds a beat at least
//! as new as the last one the guest saw flushed. The test prints one `linux-migrate: ...` line per
//! step with its figures, the pings `peer` lost across each move among them.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use nodeos_tests::linux_guest;
use nodeos_tests::nbd::NbdClient;
use nodeos_tests::qemu::{Lab, Machine, image_or_skip};
use nodeos_tests::{require, wait_until};

const NET_CIDR: &str = "10.78.0.0/24";
const GATEWAY: &str = "10.78.0.1";
const GUEST_IP: &str = "10.78.0.11";
const PEER_IP: &str = "10.78.0.12";
/// NBD exports, served on the fabric with `nodeos.nbd_public`.
const NBD_PORT: u16 = 10809;
/// From `vm start` to the first beats, on a slow shared host under nested TCG.
const GUEST_BOOT: Duration = Duration::from_secs(900);
/// From a committed move to three more beats on the new node.
const AFTER_MOVE: Duration = Duration::from_secs(120);

/// One `guest-beat: <n> <uptime> <unix> gw=ok|lost peer=ok|lost|- disk=ok|err|-` line.
#[derive(Debug, Clone, Copy)]
struct Beat {
    n: u64,
    uptime: f64,
    unix: i64,
    gw_ok: bool,
    /// The peer VM answered (true without a peer).
    peer_ok: bool,
    /// The flushed write to the disk succeeded (true without a disk).
    disk_ok: bool,
}

impl Beat {
    fn all_ok(&self) -> bool {
        self.gw_ok && self.peer_ok && self.disk_ok
    }
}

fn beats(console: &str) -> Vec<Beat> {
    console
        .lines()
        .filter_map(|l| {
            let mut it = l.split("guest-beat: ").nth(1)?.split_whitespace();
            Some(Beat {
                n: it.next()?.parse().ok()?,
                uptime: it.next()?.parse().ok()?,
                unix: it.next()?.parse().ok()?,
                gw_ok: it.next()? == "gw=ok",
                peer_ok: it.next()? != "peer=lost",
                disk_ok: it.next()? != "disk=err",
            })
        })
        .collect()
}

/// The numbers of the kernel-log beats (`guest-kbeat: <n>`).
fn kbeats(console: &str) -> Vec<u64> {
    console.lines().filter_map(|l| l.split("guest-kbeat: ").nth(1)?.trim().parse().ok()).collect()
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The lines of the nodes' consoles that tell what the migration did.
fn node_logs(ms: &[Machine]) -> String {
    let keys =
        ["WARN", "ERROR", "migrat", "vcpu ", "incoming", "worker", "clocks advanced", "volume", "panicked"];
    let mut out = String::new();
    for m in ms {
        let c = m.console();
        let lines: Vec<&str> = c.lines().filter(|l| keys.iter().any(|k| l.contains(k))).collect();
        out += &format!(
            "--- node {} console ---\n{}\n",
            m.index,
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
    out
}

/// What one move showed.
struct Move {
    took_s: f64,
    paused_ms: u64,
    /// Beats on the new node before the first whose gateway and peer both answered.
    net_lost: usize,
    /// The peer's pings of the moving VM lost from just before the move to
    /// three beats after it (one ping a beat).
    peer_lost: usize,
    first: u64,
}

async fn console(lab: &Lab, m: &Machine, vm: &str) -> anyhow::Result<String> {
    lab.cli_text(m, &["vm", "console", vm, "--from-start", "--no-follow"], Duration::from_secs(30)).await
}

/// Moves `lg` from `ms[from]` to `ms[to]` and checks it goes on there.
async fn move_guest(lab: &Lab, ms: &[Machine], from: usize, to: usize, to_id: &str) -> anyhow::Result<Move> {
    let before = beats(&console(lab, &ms[from], "lg").await?);
    let peer_before = beats(&console(lab, &ms[1], "peer").await?).len();
    let last = before.last().context("no beats before the move")?.n;
    let t = Instant::now();
    let args = ["-o", "json", "vm", "migrate", "lg", "--to", to_id];
    let (out, err) = match lab.cli_output(&ms[from], &args, Duration::from_secs(600)).await {
        Ok(o) => o,
        Err(e) => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            bail!("vm migrate lg (node {from} -> node {to}): {e:#}\n{}", node_logs(ms));
        }
    };
    let took_s = t.elapsed().as_secs_f64();
    let vm: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("vm migrate printed: {out}"))?;
    ensure!(vm["node_id"] == to_id && vm["state"] == "running", "lg after the move: {vm}");
    let paused_ms = err
        .split("paused ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("vm migrate said: {err}"))?;

    let after = wait_until(&format!("lg beats on node {to}"), AFTER_MOVE, || async {
        let c = console(lab, &ms[to], "lg").await?;
        let b = beats(&c);
        let k = kbeats(&c);
        ensure!(!c.contains("Linux version"), "lg booted again on node {to}:\n{c}");
        ensure!(
            b.len() >= 3 && k.len() >= 3 && b.last().is_some_and(Beat::all_ok),
            "lg on node {to} ({} tty beats, {} kernel-log beats, the last before the move was {last}):\n{c}\n{}",
            b.len(),
            k.len(),
            node_logs(ms)
        );
        Ok((c, b, k))
    })
    .await?;
    let (c, b, k) = after;
    // The sequence goes on from where it was: beats printed between the read
    // above and the pause were on the old node's console.
    let first = b[0].n;
    ensure!(
        first > last && first <= last + 30,
        "first beat on node {to} is {first}, the last before was {last}:\n{c}"
    );
    for (w, pair) in b.windows(2).enumerate() {
        ensure!(pair[1].n == pair[0].n + 1, "beats on node {to} skip after #{w}: {:?}\n{c}", &b);
        ensure!(pair[1].uptime >= pair[0].uptime, "guest uptime went back on node {to}:\n{c}");
    }
    ensure!(k.windows(2).all(|p| p[1] == p[0] + 1), "kernel-log beats skip on node {to}: {k:?}\n{c}");
    let newest = b.last().map(|b| b.unix).unwrap_or_default();
    ensure!(
        (newest - now_unix()).abs() < 300,
        "guest clock {newest} is far from the host's {}:\n{c}",
        now_unix()
    );
    ensure!(b.iter().all(|b| b.disk_ok), "a disk write failed on node {to}:\n{c}");
    let net_lost = b.iter().take_while(|b| !(b.gw_ok && b.peer_ok)).count();
    let peer = beats(&console(lab, &ms[1], "peer").await?);
    let peer_lost = peer.iter().skip(peer_before.saturating_sub(1)).filter(|b| !b.peer_ok).count();
    Ok(Move { took_s, paused_ms, net_lost, peer_lost, first })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linux_guest_live_migrates_there_and_back_on_a_two_node_qemu_pool() -> anyhow::Result<()> {
    let test = "a_linux_guest_live_migrates_there_and_back_on_a_two_node_qemu_pool";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(image) = image_or_skip(test)? else { return Ok(()) };
    if !linux_guest::tools_or_skip(test) {
        return Ok(());
    }
    let linux_guest::GuestPool { lab, ms, guest_dir, node_ids } =
        linux_guest::two_node_pool(test, image, env.bin.clone()).await?;

    let kernel = guest_dir.join("vmlinuz").display().to_string();
    let initrd = guest_dir.join("beat-initrd.img").display().to_string();
    let upload = Duration::from_secs(300);
    lab.cli_text(&ms[0], &["image", "upload", &kernel, "--name", "linux", "--kind", "kernel"], upload)
        .await?;
    lab.cli_text(&ms[1], &["image", "upload", &initrd, "--name", "beat-initrd", "--kind", "initrd"], upload)
        .await?;
    lab.cli(&ms[0], &["network", "create", "beatnet", "--cidr", NET_CIDR]).await?;
    let icmp_in = format!("ingress icmp {NET_CIDR}");
    lab.cli(&ms[0], &["security-group", "create", "beat", "--rule", &icmp_in]).await?;
    // lg on node 0 with a replicated volume disk; its peer on node 1.
    lab.cli(&ms[0], &["volume", "create", "lgdisk", "--size", "16M"]).await?;
    let create = |i: usize, name: &'static str, ip: &'static str, extra: Vec<String>| {
        let lab = &lab;
        let ms = &ms;
        async move {
            let cmdline = format!("console=ttyS0 beat.ip={ip} beat.gw={GATEWAY}");
            let nic = format!("network=beatnet,ip={ip},sg=beat");
            let mut args: Vec<String> = [
                "vm",
                "create",
                name,
                "--vcpus",
                "2",
                "--memory",
                "256",
                "--kernel",
                "image:linux",
                "--initrd",
                "image:beat-initrd",
                "--nic",
                &nic,
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            args.push("--cmdline".into());
            args.push(
                extra
                    .iter()
                    .fold(cmdline, |c, e| if e.starts_with("beat.") { format!("{c} {e}") } else { c }),
            );
            args.extend(extra.into_iter().filter(|e| !e.starts_with("beat.")));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            lab.cli(&ms[i], &args).await
        }
    };
    create(0, "lg", GUEST_IP, vec![format!("beat.peer={PEER_IP}"), "--disk".into(), "volume:lgdisk".into()])
        .await?;
    create(1, "peer", PEER_IP, vec![format!("beat.peer={GUEST_IP}")]).await?;
    let started = Instant::now();
    lab.cli(&ms[0], &["vm", "start", "lg"]).await?;
    lab.cli(&ms[1], &["vm", "start", "peer"]).await?;
    wait_until("lg's and its peer's first beats", GUEST_BOOT, || async {
        for (i, name) in [(0, "lg"), (1, "peer")] {
            let c = console(&lab, &ms[i], name).await?;
            ensure!(beats(&c).iter().filter(|b| b.all_ok()).count() >= 3, "{name}:\n{c}");
        }
        Ok(())
    })
    .await?;
    let boot_s = started.elapsed().as_secs_f64();

    let mut report = format!(
        "linux-migrate: boot ok {boot_s:.1} (vm start to 3 beats with the gateway, the peer and the disk answering)\n"
    );
    for (from, to) in [(0, 1), (1, 0)] {
        let m = move_guest(&lab, &ms, from, to, &node_ids[to]).await?;
        report += &format!(
            "linux-migrate: move ok {:.1} (node {from} -> node {to}, 256 MiB, 2 vCPUs, a volume disk) paused_ms={} net_lost_beats={} peer_lost_pings={} first_beat={}\n",
            m.took_s, m.paused_ms, m.net_lost, m.peer_lost, m.first
        );
    }

    // Every flushed write reached the volume: its first sector holds a beat at
    // least as new as the last one the guest saw flushed.
    let c = console(&lab, &ms[0], "lg").await?;
    let flushed = beats(&c).iter().filter(|b| b.disk_ok).map(|b| b.n).max().context("no flushed beat")?;
    lab.cli_text(&ms[0], &["vm", "stop", "lg", "--force"], Duration::from_secs(60)).await?;
    let mut nbd = NbdClient::connect((ms[1].ip, NBD_PORT).into(), "lgdisk").await?;
    let sector = nbd.read(0, 4096).await?.map_err(|e| anyhow::anyhow!("NBD read: {e:?}"))?;
    nbd.close().await?;
    let text = String::from_utf8_lossy(&sector);
    let on_disk: u64 = text
        .strip_prefix("beat ")
        .and_then(|r| r.split('\n').next()?.parse().ok())
        .with_context(|| format!("lgdisk's first sector: {text:?}"))?;
    ensure!(on_disk >= flushed, "lgdisk holds beat {on_disk}, the guest flushed beat {flushed}");
    report += &format!("linux-migrate: disk ok (beat {on_disk} on the volume, {flushed} seen flushed)\n");
    std::io::Write::write_all(&mut std::io::stderr(), report.as_bytes())?;
    Ok(())
}
