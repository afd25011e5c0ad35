//! Live migration end to end: a three-node pool (each node in its own network
//! namespace) runs the test guest dirtying its memory with a running
//! checksum, writing its replicated volume every pass, on a pool network;
//! `nodeos vm migrate` moves it to another node and back while it runs.
//! Needs root and /dev/kvm; without them it prints `SKIPPED: ...`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use futures::StreamExt;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::vm_service_client::VmServiceClient;
use nodeos_tests::cluster::Cluster;
use nodeos_tests::{NodeSpec, require, wait_until};
use tonic::transport::Channel;

const FORM: Duration = Duration::from_secs(60);
const GUEST: Duration = Duration::from_secs(120);

fn guest_or_skip(test: &str) -> anyhow::Result<Option<PathBuf>> {
    if !Path::new("/dev/kvm").exists() {
        nodeos_types::testing::skip(test, "no /dev/kvm");
        return Ok(None);
    }
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build/nodeos-test-guest.elf");
    ensure!(guest.is_file(), "the test guest is not built ({}): run `make guest`", guest.display());
    Ok(Some(guest))
}

async fn pool(c: &mut Cluster, n: usize) -> anyhow::Result<Vec<String>> {
    let idx = c.add_nodes(n, &NodeSpec { bootstrap_expect: Some(u16::try_from(n)?), ..c.spec() })?;
    let ids = c.ids(&idx).await?;
    let want = nodeos_tests::Expect { members: ids.clone(), voters: n, healthy: ids, pool_id: None };
    c.wait_pool("pool formed", &idx, &want, FORM).await?;
    let mut out = Vec::new();
    for i in idx {
        out.push(c.id(i).await?);
    }
    Ok(out)
}

/// `dirty pass=N checksum=C ok` reports of a console text: (pass, checksum).
fn passes(console: &str) -> Vec<(u64, String)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("NODEOS-GUEST: dirty pass=")?;
            let mut it = rest.split_whitespace();
            let pass = it.next()?.parse().ok()?;
            let sum = it.next()?.strip_prefix("checksum=")?.to_string();
            (it.next()? == "ok").then_some((pass, sum))
        })
        .collect()
}

/// The checksum the guest reports after `pass` passes over `pages` pages (its README).
fn expected_checksum(pass: u64, pages: u64) -> String {
    fn mix64(mut x: u64) -> u64 {
        x ^= x >> 30;
        x = x.wrapping_mul(0xbf58476d1ce4e5b9);
        x ^= x >> 27;
        x = x.wrapping_mul(0x94d049bb133111eb);
        x ^ (x >> 31)
    }
    let mut c = 0u64;
    for p in 1..=pass {
        for i in 0..pages {
            c = c.rotate_left(1) ^ mix64((p << 32) ^ i ^ 0xD1B54A32D192ED03);
        }
    }
    format!("{c:016x}")
}

/// A VM API client of the node VM `vm` runs on (consoles are served there).
async fn owner(c: &Cluster, vm: &str) -> anyhow::Result<VmServiceClient<Channel>> {
    let mut any = VmServiceClient::new(c.channel(0).await?);
    let v = any.get(pb::VmRef { vm: vm.into() }).await?.into_inner();
    let i = c.index_of(&v.node_id)?;
    Ok(VmServiceClient::new(c.channel(i).await?))
}

/// The VM's console (as its current node has it) once it holds `n` dirty reports.
async fn console_reports(vms: &mut VmServiceClient<Channel>, vm: &str, n: usize) -> anyhow::Result<String> {
    let first = pb::ConsoleInput { vm: vm.to_owned(), from_start: true, data: vec![] };
    let mut out = vms.console(futures::stream::iter(vec![first])).await?.into_inner();
    let mut text = String::new();
    let read = tokio::time::timeout(GUEST, async {
        while let Some(chunk) = out.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk?.data));
            if passes(&text).len() >= n || text.contains("CORRUPT") || text.contains("FAIL") {
                break;
            }
        }
        anyhow::Ok(())
    })
    .await;
    ensure!(read.is_ok(), "fewer than {n} dirty reports within {GUEST:?}:\n{text}");
    read??;
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_moves_between_nodes_and_back_without_losing_a_page_or_a_write() -> anyhow::Result<()> {
    let test = "a_running_vm_moves_between_nodes_and_back_without_losing_a_page_or_a_write";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let ids = pool(&mut c, 3).await?;
    c.cli(0, &["network", "create", "mignet", "--cidr", "10.70.0.0/24"]).await?;
    let v = c.cli(0, &["volume", "create", "migdisk", "--size", "8M"]).await?;
    let volume = v["id"].as_str().context("volume id")?.to_owned();
    let mut vms = VmServiceClient::new(c.channel(0).await?);
    // 2 MiB dirtied per pass (512 pages), a 4 KiB volume write per pass.
    let spec = pb::VmSpec {
        vcpus: 1,
        memory_mib: 64,
        kernel: guest.display().to_string(),
        initrd: String::new(),
        cmdline: "mode=dirty dirty_mib=2 dirty_blk=1 dirty_blk_span=16".into(),
        disks: vec![pb::DiskSpec { path: String::new(), read_only: false, volume }],
        nics: vec![pb::NicSpec { network: "mignet".into(), ..Default::default() }],
        cloud_init: None,
    };
    // A host-path kernel stays where it is: migration moves pool resources
    // only, so the kernel is uploaded as a pool image.
    c.cli(0, &["image", "upload", &guest.display().to_string(), "--name", "testguest", "--kind", "kernel"])
        .await?;
    let spec = pb::VmSpec { kernel: "image:testguest".into(), ..spec };
    vms.create(pb::CreateVmRequest { ha: None, name: "mig".into(), spec: Some(spec) }).await?;
    vms.start(pb::VmRef { vm: "mig".into() }).await?;
    let before = console_reports(&mut vms, "mig", 2).await?;
    ensure!(!before.contains("CORRUPT") && !before.contains("FAIL"), "before the move:\n{before}");

    // Bad requests change nothing.
    let same = c.cli(0, &["vm", "migrate", "mig", "--to", &ids[0]]).await;
    ensure!(
        format!("{:#}", same.as_ref().err().context("same node accepted")?).contains("already runs"),
        "{same:?}"
    );
    let unknown = c.cli(0, &["vm", "migrate", "mig", "--to", "nosuchnode"]).await;
    ensure!(
        format!("{:#}", unknown.as_ref().err().context("unknown node accepted")?).contains("no such node"),
        "{unknown:?}"
    );

    let mut last_pass = passes(&before).last().map_or(0, |p| p.0);
    let generation = |v: &serde_json::Value| v["volume"]["generation"].as_u64().unwrap_or(0);
    let writer =
        |v: &serde_json::Value| v["volume"]["writer"]["node_id"].as_str().unwrap_or_default().to_owned();
    let mut held = c.cli(0, &["volume", "show", "migdisk"]).await?;
    ensure!(writer(&held) == ids[0], "the writer before the move: {held}");
    for (round, target) in [(1, &ids[1]), (2, &ids[0])] {
        let moved = c
            .cli(0, &["vm", "migrate", "mig", "--to", target])
            .await
            .with_context(|| format!("round {round}"))?;
        ensure!(moved["node_id"] == target.as_str(), "round {round}: the VM is on {}", moved["node_id"]);
        ensure!(moved["state"] == "running", "round {round}: the VM is {}", moved["state"]);
        ensure!(moved["migrating_to"] == "", "round {round}: still migrating: {moved}");
        let mut there = owner(&c, "mig").await?;
        let after = console_reports(&mut there, "mig", 3).await.with_context(|| format!("round {round}"))?;
        ensure!(
            !after.contains("CORRUPT") && !after.contains("FAIL"),
            "round {round}: after the move:\n{after}"
        );
        let reports = passes(&after);
        ensure!(
            reports[0].0 > last_pass,
            "round {round}: pass {} reported again after {last_pass}",
            reports[0].0
        );
        for (p, sum) in &reports {
            ensure!(
                *sum == expected_checksum(*p, 512),
                "round {round}: checksum of pass {p} after the move:\n{after}"
            );
        }
        // The volume writes go on under the new node's generation.
        ensure!(
            after.contains("NODEOS-GUEST: dirty blk pass="),
            "round {round}: no volume writes after the move:\n{after}"
        );
        // The destination writes under a newer generation than the source
        // held: the replicas refuse the source's from the commit on (a stale
        // writer's refusal is tests/tests/block.rs's fencing test).
        let now = c.cli(2, &["volume", "show", "migdisk"]).await?;
        ensure!(
            generation(&now) > generation(&held) && writer(&now) == *target,
            "round {round}: the volume's writer did not move to a newer generation: {held} -> {now}"
        );
        held = now;
        last_pass = reports.last().map_or(last_pass, |p| p.0);
        let shown = c.cli(2, &["vm", "show", "mig"]).await?;
        ensure!(
            shown["node_id"] == target.as_str(),
            "round {round}: node 2 sees the VM on {}",
            shown["node_id"]
        );
    }
    // 18 more moves (20 in all): nothing may pile up on any node.
    for k in 0..18 {
        let target = &ids[1 + k % 2];
        let moved = c
            .cli(0, &["vm", "migrate", "mig", "--to", target])
            .await
            .with_context(|| format!("move {}", k + 3))?;
        ensure!(moved["node_id"] == target.as_str(), "move {}: the VM is on {}", k + 3, moved["node_id"]);
    }
    let mut there = owner(&c, "mig").await?;
    let end = console_reports(&mut there, "mig", 2).await?;
    ensure!(!end.contains("CORRUPT") && !end.contains("FAIL"), "after 20 moves:\n{end}");
    let workers: usize = (0..3).map(|i| c.node(i).map(|n| n.children().len()).unwrap_or(0)).sum();
    ensure!(workers == 1, "{workers} VM workers run in the pool after 20 moves of one VM");
    let ports = c.cli(0, &["port", "list"]).await?;
    let ports = ports.as_array().context("port list")?;
    ensure!(ports.len() == 1, "ports after 20 moves: {ports:?}");
    let v = vms.get(pb::VmRef { vm: "mig".into() }).await?.into_inner();
    ensure!(
        ports[0]["node_id"] == v.node_id.as_str() || ports[0]["node"] == v.node_id.as_str(),
        "the port stayed behind: {ports:?} vs {v:?}"
    );
    ensure!(v.state == "running" && v.migrating_to.is_empty(), "{v:?}");
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_host_files_or_not_running_is_refused_and_keeps_running() -> anyhow::Result<()> {
    let test = "a_vm_with_host_files_or_not_running_is_refused_and_keeps_running";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let ids = pool(&mut c, 2).await?;
    let mut vms = VmServiceClient::new(c.channel(0).await?);
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)?.set_len(1 << 20)?;
    let spec = pb::VmSpec {
        vcpus: 1,
        memory_mib: 64,
        kernel: guest.display().to_string(),
        initrd: String::new(),
        cmdline: "mode=dirty dirty_mib=1".into(),
        disks: vec![pb::DiskSpec {
            path: disk.display().to_string(),
            read_only: false,
            volume: String::new(),
        }],
        nics: vec![],
        cloud_init: None,
    };
    vms.create(pb::CreateVmRequest { ha: None, name: "local".into(), spec: Some(spec) }).await?;
    let stopped = c.cli(0, &["vm", "migrate", "local", "--to", &ids[1]]).await;
    ensure!(
        format!("{:#}", stopped.as_ref().err().context("a stopped VM moved")?).contains("stopped"),
        "{stopped:?}"
    );
    vms.start(pb::VmRef { vm: "local".into() }).await?;
    console_reports(&mut vms, "local", 1).await?;
    let refused = c.cli(0, &["vm", "migrate", "local", "--to", &ids[1]]).await;
    ensure!(
        format!("{:#}", refused.as_ref().err().context("a host-file disk moved")?)
            .contains("only pool volumes move"),
        "{refused:?}"
    );
    let v = wait_until("the VM still runs on node 0", Duration::from_secs(10), || {
        let mut vms = vms.clone();
        async move { Ok(vms.get(pb::VmRef { vm: "local".into() }).await?.into_inner()) }
    })
    .await?;
    ensure!(v.state == "running" && v.node_id == ids[0] && v.migrating_to.is_empty(), "{v:?}");
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_moves_every_vm_off_a_node_without_restarting_any() -> anyhow::Result<()> {
    let test = "maintenance_moves_every_vm_off_a_node_without_restarting_any";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let ids = pool(&mut c, 3).await?;
    c.cli(0, &["image", "upload", &guest.display().to_string(), "--name", "testguest", "--kind", "kernel"])
        .await?;
    let v = c.cli(0, &["volume", "create", "mdisk", "--size", "8M"]).await?;
    let volume = v["id"].as_str().context("volume id")?.to_owned();
    let mut vms = VmServiceClient::new(c.channel(0).await?);
    let names = ["m0", "m1", "m2"];
    for (i, name) in names.iter().enumerate() {
        let disks = if i == 0 {
            vec![pb::DiskSpec { path: String::new(), read_only: false, volume: volume.clone() }]
        } else {
            vec![]
        };
        let spec = pb::VmSpec {
            vcpus: 1,
            memory_mib: 32,
            kernel: "image:testguest".into(),
            initrd: String::new(),
            cmdline: format!("mode=dirty dirty_mib=1{}", if i == 0 { " dirty_blk=1" } else { "" }),
            disks,
            nics: vec![],
            cloud_init: None,
        };
        vms.create(pb::CreateVmRequest { ha: None, name: (*name).into(), spec: Some(spec) }).await?;
        vms.start(pb::VmRef { vm: (*name).into() }).await?;
    }
    let mut last = Vec::new();
    for name in names {
        let text = console_reports(&mut vms, name, 1).await?;
        last.push(passes(&text).last().map_or(0, |p| p.0));
    }
    let out = c.cli(1, &["node", "maintenance", "enter", &ids[0]]).await?;
    ensure!(out.to_string().contains("\"maintenance\":true"), "node 0 not marked: {out}");
    for (name, before) in names.iter().zip(&last) {
        let mut there = owner(&c, name).await?;
        let v = there.get(pb::VmRef { vm: (*name).into() }).await?.into_inner();
        ensure!(v.node_id != ids[0] && v.state == "running", "{name} did not leave node 0: {v:?}");
        let text = console_reports(&mut there, name, 2).await?;
        // Moved, not restarted: the guest never booted again, and its passes go on.
        ensure!(!text.contains("NODEOS-GUEST: boot ok"), "{name} was restarted:\n{text}");
        ensure!(!text.contains("CORRUPT") && !text.contains("FAIL"), "{name}:\n{text}");
        let first = passes(&text).first().map_or(0, |p| p.0);
        ensure!(first > *before, "{name}: pass {first} after {before}");
    }
    // Nothing new starts there; new volume copies go elsewhere.
    let late = pb::VmSpec {
        vcpus: 1,
        memory_mib: 32,
        kernel: "image:testguest".into(),
        initrd: String::new(),
        cmdline: "mode=dirty dirty_mib=1".into(),
        disks: vec![],
        nics: vec![],
        cloud_init: None,
    };
    vms.create(pb::CreateVmRequest { ha: None, name: "late".into(), spec: Some(late) }).await?;
    let refused = c.cli(0, &["vm", "start", "late"]).await;
    let why = format!("{:#}", refused.as_ref().err().context("a VM started on the node in maintenance")?);
    ensure!(why.contains("maintenance"), "{why}");
    let nodes = c.cli(2, &["node", "list"]).await?;
    let zero = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["id"] == ids[0].as_str()))
        .context("node 0 listed")?;
    ensure!(zero["maintenance"] == true, "{zero}");
    let nv = c.cli(1, &["volume", "create", "after", "--size", "8M"]).await?;
    ensure!(!nv.to_string().contains(&ids[0]), "a new copy went to the node in maintenance: {nv}");
    // With node 0 in maintenance, node 1 cannot follow: the volumes' extents
    // would keep one reachable copy.
    let blocked = c.cli(2, &["node", "maintenance", "enter", &ids[1]]).await;
    let why = format!("{:#}", blocked.as_ref().err().context("a second node entered maintenance")?);
    ensure!(why.contains("reachable cop") && why.contains("cannot enter maintenance"), "{why}");
    let back = c.cli(2, &["node", "maintenance", "exit", &ids[0]]).await?;
    ensure!(
        back.to_string().contains("\"maintenance\":false")
            || !back.to_string().contains("\"maintenance\":true"),
        "{back}"
    );
    c.finish();
    Ok(())
}

/// A VM that dirties 16 MiB per pass, and a migration capped at 2 MiB/s: it
/// cannot converge, so it runs until it is cancelled or fails.
async fn slow_vm(c: &Cluster, vms: &mut VmServiceClient<Channel>, guest: &Path) -> anyhow::Result<u64> {
    c.cli(0, &["image", "upload", &guest.display().to_string(), "--name", "testguest", "--kind", "kernel"])
        .await?;
    let spec = pb::VmSpec {
        vcpus: 1,
        memory_mib: 64,
        kernel: "image:testguest".into(),
        initrd: String::new(),
        cmdline: "mode=dirty dirty_mib=16".into(),
        disks: vec![],
        nics: vec![],
        cloud_init: None,
    };
    vms.create(pb::CreateVmRequest { ha: None, name: "slow".into(), spec: Some(spec) }).await?;
    vms.start(pb::VmRef { vm: "slow".into() }).await?;
    let text = console_reports(vms, "slow", 1).await?;
    Ok(passes(&text).last().map_or(0, |p| p.0))
}

/// Starts `vm migrate slow --to <to> --bandwidth 2` in the background and
/// waits until the record shows the migration.
async fn start_slow_migration(
    c: &Cluster,
    vms: &mut VmServiceClient<Channel>,
    to: &str,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<serde_json::Value>>> {
    let bin = std::env::var("NODEOS_BIN").context("NODEOS_BIN")?;
    let addr = c.node(0)?.addr.to_string();
    let to = to.to_owned();
    let config = c.cli_config().to_owned();
    let run = tokio::spawn(async move {
        let out = tokio::process::Command::new(bin)
            .arg("--config")
            .arg(&config)
            .args([
                "--endpoint",
                &addr,
                "-o",
                "json",
                "vm",
                "migrate",
                "slow",
                "--to",
                &to,
                "--bandwidth",
                "2",
            ])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await?;
        ensure!(!out.status.success(), "the migration finished: {}", String::from_utf8_lossy(&out.stdout));
        Ok(serde_json::Value::String(String::from_utf8_lossy(&out.stderr).into_owned()))
    });
    wait_until("the migration shows", Duration::from_secs(30), || {
        let mut vms = vms.clone();
        async move {
            let v = vms.get(pb::VmRef { vm: "slow".into() }).await?.into_inner();
            ensure!(!v.migrating_to.is_empty(), "not migrating yet");
            Ok(())
        }
    })
    .await?;
    // Let pre-copy run a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(run)
}

/// The VM runs on node 0 with no migration, and its guest goes on after `after`.
async fn still_here(vms: &mut VmServiceClient<Channel>, node: &str, after: u64) -> anyhow::Result<u64> {
    let v = wait_until("the VM back to plain running", Duration::from_secs(30), || {
        let mut vms = vms.clone();
        async move {
            let v = vms.get(pb::VmRef { vm: "slow".into() }).await?.into_inner();
            ensure!(v.migrating_to.is_empty(), "still migrating: {v:?}");
            Ok(v)
        }
    })
    .await?;
    ensure!(v.node_id == node && v.state == "running", "{v:?}");
    let deadline = tokio::time::Instant::now() + GUEST;
    loop {
        let text = console_reports(vms, "slow", 1).await?;
        ensure!(!text.contains("CORRUPT") && !text.contains("FAIL"), "{text}");
        let last = passes(&text).last().map_or(0, |p| p.0);
        if last > after {
            return Ok(last);
        }
        ensure!(tokio::time::Instant::now() < deadline, "the guest stopped at pass {last}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_migration_or_a_dead_destination_leaves_the_vm_running_where_it_was() -> anyhow::Result<()>
{
    let test = "a_cancelled_migration_or_a_dead_destination_leaves_the_vm_running_where_it_was";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let ids = pool(&mut c, 3).await?;
    let mut vms = VmServiceClient::new(c.channel(0).await?);
    let mut last = slow_vm(&c, &mut vms, &guest).await?;

    // A second migration of the same VM is refused while one runs; then cancel.
    let run = start_slow_migration(&c, &mut vms, &ids[1]).await?;
    let second = c.cli(0, &["vm", "migrate", "slow", "--to", &ids[2]]).await;
    ensure!(
        format!("{:#}", second.as_ref().err().context("a second migration ran")?).contains("busy"),
        "{second:?}"
    );
    c.cli(0, &["vm", "migrate", "slow", "--cancel"]).await?;
    let why = run.await??;
    ensure!(why.to_string().contains("cancel"), "the migration ended otherwise: {why}");
    last = still_here(&mut vms, &ids[0], last).await?;

    // The destination dies in pre-copy: the source keeps the VM.
    let run = start_slow_migration(&c, &mut vms, &ids[2]).await?;
    c.kill9(2)?;
    let why = run.await??;
    eprintln!("migrate: destination killed in pre-copy: {why}");
    still_here(&mut vms, &ids[0], last).await?;
    let workers: usize = (0..2).map(|i| c.node(i).map(|n| n.children().len()).unwrap_or(0)).sum();
    ensure!(workers == 1, "{workers} VM workers left on the live nodes");
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_runs_the_vm_when_the_source_dies_right_after_the_commit() -> anyhow::Result<()> {
    let test = "the_destination_runs_the_vm_when_the_source_dies_right_after_the_commit";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    // Node 0 aborts right after its compare-and-swap hands the VM over,
    // before it can tell the destination.
    let failing = NodeSpec {
        bootstrap_expect: Some(3),
        env: vec![("NODEOS_FAILPOINTS".into(), "migration-after-commit".into())],
        ..c.spec()
    };
    let plain = NodeSpec { bootstrap_expect: Some(3), ..c.spec() };
    let idx = vec![c.add_node(&failing)?, c.add_node(&plain)?, c.add_node(&plain)?];
    let ids = c.ids(&idx).await?;
    let want = nodeos_tests::Expect { members: ids.clone(), voters: 3, healthy: ids, pool_id: None };
    c.wait_pool("pool formed", &idx, &want, FORM).await?;
    let one = c.id(1).await?;
    c.cli(0, &["image", "upload", &guest.display().to_string(), "--name", "testguest", "--kind", "kernel"])
        .await?;
    let v = c.cli(0, &["volume", "create", "fdisk", "--size", "8M"]).await?;
    let volume = v["id"].as_str().context("volume id")?.to_owned();
    let mut vms = VmServiceClient::new(c.channel(0).await?);
    let spec = pb::VmSpec {
        vcpus: 1,
        memory_mib: 32,
        kernel: "image:testguest".into(),
        initrd: String::new(),
        cmdline: "mode=dirty dirty_mib=1 dirty_blk=1".into(),
        disks: vec![pb::DiskSpec { path: String::new(), read_only: false, volume }],
        nics: vec![],
        cloud_init: None,
    };
    vms.create(pb::CreateVmRequest { ha: None, name: "orphan".into(), spec: Some(spec) }).await?;
    vms.start(pb::VmRef { vm: "orphan".into() }).await?;
    let before = console_reports(&mut vms, "orphan", 1).await?;
    let last = passes(&before).last().map_or(0, |p| p.0);
    let lost_source = c.cli(0, &["vm", "migrate", "orphan", "--to", &one]).await;
    ensure!(lost_source.is_err(), "the source node answered after it should have died");
    let mut vms1 = VmServiceClient::new(c.channel(1).await?);
    let v = wait_until("the VM runs on node 1", Duration::from_secs(60), || {
        let mut vms1 = vms1.clone();
        let one = one.clone();
        async move {
            let v = vms1.get(pb::VmRef { vm: "orphan".into() }).await?.into_inner();
            ensure!(v.node_id == one && v.state == "running" && v.worker_pid > 0, "{v:?}");
            Ok(v)
        }
    })
    .await?;
    ensure!(v.migrating_to.is_empty(), "{v:?}");
    let after = console_reports(&mut vms1, "orphan", 2).await?;
    ensure!(!after.contains("CORRUPT") && !after.contains("FAIL"), "{after}");
    ensure!(!after.contains("NODEOS-GUEST: boot ok"), "the VM was restarted, not moved:\n{after}");
    ensure!(passes(&after)[0].0 > last, "passes went back:\n{after}");
    ensure!(after.contains("NODEOS-GUEST: dirty blk pass="), "no volume writes on node 1:\n{after}");
    c.finish();
    Ok(())
}
