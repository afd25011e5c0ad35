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
//! The machines are `nodeos_tests::qemu`'s.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use nodeos_tests::qemu::{BOOT, Lab, POOL_NAME, accel, image_or_skip};
use nodeos_tests::{require, wait_until};

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
