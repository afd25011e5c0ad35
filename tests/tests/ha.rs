//! High availability, process level (network namespaces): node liveness from
//! lease renewals. Every member renews its lease through the raft log once a
//! second; a member without a renewal turns `suspect`, then `dead` after the
//! lease TTL (4 s here), and the VMs its record says run there show `unknown`
//! with the reason, never `running`; back, it is alive again, and records the
//! VM crashed with its volume's writer slot freed. A node cut off
//! from the others pauses its VMs (self-fencing) before the pool may count it
//! dead, and resumes them when it is back and nobody took them over. A worker
//! that panics ends at once, and its VM is recorded crashed with the panic.
//!
//! HA restart: VMs marked `--ha restart` of a node killed, frozen or cut off
//! run again on another node once its lease ran out, with every write they
//! saw acknowledged; the old node's worker, should it still run, has no
//! write accepted, and the old node ends its copy when it is back. A whole
//! pool powered off and on starts each HA VM once.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::vm_service_client::VmServiceClient;
use nodeos_tests::cluster::Cluster;
use nodeos_tests::{NodeSpec, require, wait_until};

const FORM: Duration = Duration::from_secs(60);
/// The lease TTL the test's nodes run with.
const TTL: Duration = Duration::from_secs(4);

/// Node `id`'s row of `node list` as node `via` answers it.
async fn member(c: &Cluster, via: usize, id: &str) -> anyhow::Result<serde_json::Value> {
    let nodes = c.cli(via, &["node", "list"]).await?;
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["id"] == id))
        .cloned()
        .with_context(|| format!("no node {id} in {nodes}"))
}

/// The test guest, or `None` (with a loud skip line) without /dev/kvm.
fn guest_or_skip(test: &str, why: &str) -> anyhow::Result<Option<PathBuf>> {
    if !Path::new("/dev/kvm").exists() {
        nodeos_types::testing::skip(test, why);
        return Ok(None);
    }
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build/nodeos-test-guest.elf");
    ensure!(guest.is_file(), "the test guest is not built ({}): run `make guest`", guest.display());
    Ok(Some(guest))
}

/// A pool of `n` nodes started from `spec`; their ids in node order.
async fn pool(c: &mut Cluster, n: usize, spec: NodeSpec) -> anyhow::Result<Vec<String>> {
    let spec = NodeSpec { bootstrap_expect: Some(u16::try_from(n)?), ..spec };
    let idx = c.add_nodes(n, &spec)?;
    let ids = c.ids(&idx).await?;
    let want = nodeos_tests::Expect { members: ids.clone(), voters: n, healthy: ids, pool_id: None };
    c.wait_pool("pool formed", &idx, &want, FORM).await?;
    let mut ordered = Vec::with_capacity(n);
    for i in idx {
        ordered.push(c.id(i).await?);
    }
    Ok(ordered)
}

/// Nodes renewing their leases with the test's TTL.
fn with_ttl(c: &Cluster) -> NodeSpec {
    NodeSpec { extra_args: vec!["--lease-ttl".into(), TTL.as_secs().to_string()], ..c.spec() }
}

/// The test guest in `cmdline`'s mode, 1 vCPU, 32 MiB.
fn guest_spec(guest: &Path, cmdline: &str) -> pb::VmSpec {
    pb::VmSpec {
        vcpus: 1,
        memory_mib: 32,
        kernel: guest.display().to_string(),
        cmdline: cmdline.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_lease_runs_out_and_its_vms_show_unknown() -> anyhow::Result<()> {
    let test = "a_dead_nodes_lease_runs_out_and_its_vms_show_unknown";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let spec = with_ttl(&c);
    let ids = pool(&mut c, 3, spec).await?;
    for id in &ids {
        wait_until(&format!("node {id} alive"), Duration::from_secs(20), || async {
            let n = member(&c, 0, id).await?;
            ensure!(n["liveness"] == "alive", "{n}");
            Ok(())
        })
        .await?;
    }

    // A VM running on node 2 (the test guest, idling).
    let guest = guest_or_skip(test, "no /dev/kvm: the VM part (unknown, not running) is not checked")?;
    let with_vm = guest.is_some();
    if let Some(guest) = &guest {
        let mut vms = VmServiceClient::new(c.channel(2).await?);
        let v = c.cli(2, &["volume", "create", "disk2", "--size", "8M"]).await?;
        let volume = v["id"].as_str().context("volume id")?.to_owned();
        let spec = pb::VmSpec {
            disks: vec![pb::DiskSpec { path: String::new(), read_only: false, volume }],
            ..guest_spec(guest, "mode=idle")
        };
        vms.create(pb::CreateVmRequest { ha: None, name: "on2".into(), spec: Some(spec) }).await?;
        vms.start(pb::VmRef { vm: "on2".into() }).await?;
        let shown = c.cli(0, &["vm", "show", "on2"]).await?;
        ensure!(shown["state"] == "running" && shown["node_id"] == ids[2].as_str(), "{shown}");
    }

    c.kill9(2)?;
    let killed = Instant::now();
    let suspect = wait_until("node 2 suspect", TTL * 3, || async {
        let n = member(&c, 0, &ids[2]).await?;
        ensure!(n["liveness"] != "alive", "{n}");
        Ok(killed.elapsed())
    })
    .await?;
    let dead = wait_until("node 2 dead", TTL * 3, || async {
        let n = member(&c, 0, &ids[2]).await?;
        ensure!(n["liveness"] == "dead", "{n}");
        ensure!(n["lease_age_ms"].as_u64().unwrap_or(0) >= TTL.as_millis() as u64, "{n}");
        Ok(killed.elapsed())
    })
    .await?;
    // Not before a whole TTL since the last renewal (at most one renewal
    // period before the kill), and not long after.
    ensure!(dead + Duration::from_secs(1) >= TTL, "node 2 dead after {dead:?}, the TTL is {TTL:?}");
    ensure!(dead <= TTL + Duration::from_secs(4), "node 2 dead only after {dead:?}");
    for id in &ids[..2] {
        let n = member(&c, 1, id).await?;
        ensure!(n["liveness"] == "alive", "a live node is not alive: {n}");
    }
    if with_vm {
        // Nobody can say whether it still runs: not `running`, with the reason.
        for via in [0, 1] {
            let shown = c.cli(via, &["vm", "show", "on2"]).await?;
            let reason = shown["reason"].as_str().unwrap_or_default();
            ensure!(
                shown["state"] == "unknown" && reason.contains("dead") && reason.contains(ids[2].as_str()),
                "the VM on the dead node, as node {via} shows it: {shown}"
            );
        }
        let listed = c.cli(1, &["vm", "list"]).await?;
        ensure!(listed.to_string().contains("\"unknown\""), "vm list: {listed}");
    }

    c.restart(2)?;
    let back = wait_until("node 2 alive again", Duration::from_secs(60), || async {
        let n = member(&c, 0, &ids[2]).await?;
        ensure!(n["liveness"] == "alive", "{n}");
        Ok(killed.elapsed())
    })
    .await?;
    if with_vm {
        // Back, the node records the VM crashed and frees its volume's writer
        // slot: a crashed VM is not left as the volume's writer.
        wait_until("the VM crashed and its volume free", Duration::from_secs(30), || async {
            let shown = c.cli(0, &["vm", "show", "on2"]).await?;
            ensure!(shown["state"] == "crashed", "{shown}");
            let v = c.cli(0, &["volume", "show", "disk2"]).await?;
            ensure!(v["volume"]["writer"].is_null(), "the crashed VM still holds its volume: {v}");
            Ok(())
        })
        .await?;
    }
    eprintln!(
        "nodeos-tests: {test}: node 2 suspect after {:.1} s, dead after {:.1} s (TTL {} s), alive again {:.1} s after the kill",
        suspect.as_secs_f64(),
        dead.as_secs_f64(),
        TTL.as_secs(),
        back.as_secs_f64()
    );
    c.finish();
    Ok(())
}

/// `dirty pass=N ... ok` reports in a console.
fn passes(console: &str) -> usize {
    console.lines().filter(|l| l.contains("NODEOS-GUEST: dirty pass=") && l.contains(" ok")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_pauses_its_vms_before_the_pool_counts_it_dead_and_resumes_them_when_back()
-> anyhow::Result<()> {
    let test = "a_cut_off_node_pauses_its_vms_before_the_pool_counts_it_dead_and_resumes_them_when_back";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test, "no /dev/kvm")? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let spec = with_ttl(&c);
    let ids = pool(&mut c, 3, spec).await?;
    let id2 = &ids[2];

    // A guest on node 2 that reports a pass every few milliseconds.
    let mut vms = VmServiceClient::new(c.channel(2).await?);
    let spec = guest_spec(&guest, "mode=dirty dirty_mib=1");
    let vm = vms
        .create(pb::CreateVmRequest { ha: None, name: "on2".into(), spec: Some(spec) })
        .await?
        .into_inner();
    vms.start(pb::VmRef { vm: "on2".into() }).await?;
    let console = c.node(2)?.data_dir.join("vms").join(&vm.id).join("console.log");
    let count = || passes(&std::fs::read_to_string(&console).unwrap_or_default());
    wait_until("the guest reports passes", Duration::from_secs(30), || async {
        ensure!(count() >= 3, "{} passes", count());
        Ok(())
    })
    .await?;

    c.cut(2)?;
    let cut = Instant::now();
    let fenced = wait_until("node 2 pauses its VM", TTL * 3, || async {
        ensure!(c.log(2)?.contains("VM paused by self-fencing"), "not yet");
        Ok(cut.elapsed())
    })
    .await?;
    let dead = wait_until("the pool counts node 2 dead", TTL * 3, || async {
        let n = member(&c, 0, id2).await?;
        ensure!(n["liveness"] == "dead", "{n}");
        Ok(cut.elapsed())
    })
    .await?;
    ensure!(
        fenced < dead,
        "node 2 paused its VM {fenced:?} after the cut, the pool counted it dead at {dead:?}"
    );
    // Paused: no pass while it is cut off.
    let before = count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(count() == before, "the guest ran on while its node was cut off: {before} -> {} passes", count());
    let shown = c.cli(0, &["vm", "show", "on2"]).await?;
    ensure!(shown["state"] == "unknown", "{shown}");

    // Back on the network, nobody took the VM over: it resumes where it was.
    c.heal(2)?;
    wait_until("node 2 resumes its VM", Duration::from_secs(30), || async {
        ensure!(c.log(2)?.contains("VM resumed after self-fencing"), "not yet");
        ensure!(count() > before + 2, "{} passes, {before} before", count());
        Ok(())
    })
    .await?;
    let shown = wait_until("the VM shows running again", Duration::from_secs(20), || async {
        let shown = c.cli(0, &["vm", "show", "on2"]).await?;
        ensure!(shown["state"] == "running", "{shown}");
        Ok(shown)
    })
    .await?;
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    ensure!(!text.contains("CORRUPT") && !text.contains("FAIL"), "the guest after the pause:\n{text}");
    eprintln!(
        "nodeos-tests: {test}: VM paused {:.1} s after the cut, node dead at {:.1} s (TTL {} s); running again: {}",
        fenced.as_secs_f64(),
        dead.as_secs_f64(),
        TTL.as_secs(),
        shown["state"]
    );
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_is_a_crash_with_the_panic_as_its_reason() -> anyhow::Result<()> {
    let test = "a_panicking_worker_is_a_crash_with_the_panic_as_its_reason";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test, "no /dev/kvm")? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    // The worker panics in its control thread when asked to pause.
    let spec =
        NodeSpec { env: vec![("NODEOS_FAILPOINTS".into(), "worker-panic-on-pause".into())], ..c.spec() };
    pool(&mut c, 1, spec).await?;
    let mut vms = VmServiceClient::new(c.channel(0).await?);
    let spec = guest_spec(&guest, "mode=idle");
    vms.create(pb::CreateVmRequest { ha: None, name: "p".into(), spec: Some(spec) }).await?;
    vms.start(pb::VmRef { vm: "p".into() }).await?;
    let paused = c.cli(0, &["vm", "pause", "p"]).await;
    ensure!(paused.is_err(), "a pause the worker died on was acknowledged: {paused:?}");
    // Not a VM that runs on with a dead control thread: a crash, saying why.
    let shown = wait_until("the VM crashed", Duration::from_secs(30), || async {
        let shown = c.cli(0, &["vm", "show", "p"]).await?;
        ensure!(shown["state"] == "crashed", "{shown}");
        Ok(shown)
    })
    .await?;
    let reason = shown["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("SIGABRT")
            && reason.contains("panicked")
            && reason.contains("failpoint worker-panic-on-pause"),
        "crash reason: {reason:?}"
    );
    let workers = c.node(0)?.children().len();
    ensure!(workers == 0, "{workers} worker processes left");
    c.finish();
    Ok(())
}

/// The HA tests' guest: a 4 KiB write, flush and read-back per pass over 16
/// blocks of its volume disk; at boot it reports the largest pass it finds
/// there (`dirty blk found max_seed=`).
const WRITER_CMDLINE: &str = "mode=dirty dirty_mib=1 dirty_blk=1 dirty_blk_span=16";

/// Creates and starts VM `name` on node `node`: the writer guest on a new
/// 8 MiB volume, with `--ha restart` at `priority` if given. Its id.
async fn writer_vm(
    c: &Cluster,
    node: usize,
    name: &str,
    guest: &Path,
    ha: Option<i32>,
) -> anyhow::Result<String> {
    let disk = format!("{name}-disk");
    c.cli(node, &["volume", "create", &disk, "--size", "8M"]).await?;
    let (kernel, volume) = (guest.display().to_string(), format!("volume:{disk}"));
    let mut args = vec!["vm", "create", name, "--memory", "32", "--kernel", &kernel];
    args.extend(["--cmdline", WRITER_CMDLINE, "--disk", &volume]);
    let priority = ha.map(|p| p.to_string());
    if let Some(p) = &priority {
        args.extend(["--ha", "restart", "--ha-priority", p]);
    }
    let v = c.cli(node, &args).await?;
    c.cli(node, &["vm", "start", name]).await?;
    Ok(v["id"].as_str().context("vm id")?.to_owned())
}

/// A VM's console log on node `node`.
fn console_of(c: &Cluster, node: usize, id: &str) -> anyhow::Result<String> {
    let path = c.node(node)?.data_dir.join("vms").join(id).join("console.log");
    Ok(std::fs::read_to_string(path).unwrap_or_default())
}

/// The last pass whose write the guest saw acknowledged (and flushed), from
/// its `dirty blk pass=P ok` reports.
fn acked_pass(console: &str) -> Option<u64> {
    console.lines().rev().find_map(|l| {
        let rest = l.split("NODEOS-GUEST: dirty blk pass=").nth(1)?;
        let (p, tail) = rest.split_once(' ')?;
        tail.starts_with("ok").then(|| p.parse().ok()).flatten()
    })
}

/// One `dirty blk pass=P ok|FAIL ... blk_writes=W` report of the guest.
#[derive(Debug, Clone, Copy)]
struct BlkReport {
    pass: u64,
    /// Its successful writes so far.
    writes: u64,
    /// Some request failed since the previous report.
    failed: bool,
}

/// A three-node pool with the test's TTL, and HA VM `name` on node 2
/// writing its disk: the node ids and the VM's id.
async fn pool_with_ha_vm_on_2(
    c: &mut Cluster,
    guest: &Path,
    name: &str,
) -> anyhow::Result<(Vec<String>, String)> {
    let spec = with_ttl(c);
    let ids = pool(c, 3, spec).await?;
    let id = writer_vm(c, 2, name, guest, Some(0)).await?;
    writes_acked(c, 2, &id, 3).await?;
    Ok((ids, id))
}

/// Waits until the guest of VM `id` on node `node` saw pass `n`'s write acknowledged.
async fn writes_acked(c: &Cluster, node: usize, id: &str, n: u64) -> anyhow::Result<()> {
    wait_until("the guest writes its disk", Duration::from_secs(30), || async {
        let p = acked_pass(&console_of(c, node, id)?).unwrap_or(0);
        ensure!(p >= n, "acknowledged pass {p}");
        Ok(())
    })
    .await
}

/// The guest's disk reports, in order.
fn blk_reports(console: &str) -> Vec<BlkReport> {
    console
        .lines()
        .filter_map(|l| {
            let field =
                |k: &str| l.split(&format!("{k}=")).nth(1)?.split_whitespace().next()?.parse::<u64>().ok();
            let failed = l.contains("NODEOS-GUEST: dirty blk FAIL pass=");
            if !failed && !l.contains("NODEOS-GUEST: dirty blk pass=") {
                return None;
            }
            Some(BlkReport { pass: field("pass")?, writes: field("blk_writes")?, failed })
        })
        .collect()
}

/// `(max_seed, bad)` of the guest's `dirty blk found` line.
fn found(console: &str) -> Option<(u64, u64)> {
    let l = console.lines().find(|l| l.contains("NODEOS-GUEST: dirty blk found "))?;
    let field = |k: &str| l.split(&format!("{k}=")).nth(1)?.split_whitespace().next()?.parse::<u64>().ok();
    Some((field("max_seed")?, field("bad")?))
}

/// Waits until VM `name` runs on a node other than `not_on` (as node `via`
/// sees it); its node's id.
async fn running_elsewhere(
    c: &Cluster,
    via: usize,
    name: &str,
    not_on: &str,
    within: Duration,
) -> anyhow::Result<String> {
    wait_until(&format!("{name} running on another node"), within, || async {
        let v = c.cli(via, &["vm", "show", name]).await?;
        ensure!(v["state"] == "running" && v["node_id"] != not_on, "{v}");
        Ok(v["node_id"].as_str().unwrap_or_default().to_owned())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_vms_of_a_killed_node_restart_elsewhere_with_every_acknowledged_write() -> anyhow::Result<()> {
    let test = "ha_vms_of_a_killed_node_restart_elsewhere_with_every_acknowledged_write";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test, "no /dev/kvm")? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let spec = with_ttl(&c);
    let ids = pool(&mut c, 3, spec).await?;
    let dead = ids[2].clone();

    // Three HA VMs and one without HA, all on node 2, all writing their disks.
    let ha = [("ha-a", 10), ("ha-b", 0), ("ha-c", -5)];
    let mut vm_ids = Vec::new();
    for (name, priority) in ha {
        vm_ids.push(writer_vm(&c, 2, name, &guest, Some(priority)).await?);
    }
    let plain = writer_vm(&c, 2, "plain", &guest, None).await?;
    // Bad HA settings: a clear error, nothing changed.
    let refused = |args: &'static [&'static str]| {
        let c = &c;
        async move { c.cli(0, args).await.map(|v| v.to_string()).map_err(|e| format!("{e:#}")) }
    };
    let e = refused(&["vm", "ha", "nosuch", "restart"]).await.expect_err("an unknown VM");
    ensure!(e.contains("no VM \"nosuch\""), "{e}");
    let e = refused(&["vm", "ha", "ha-a", "restart", "--priority", "5000"]).await.expect_err("out of range");
    ensure!(e.contains("--ha-priority 5000 is out of range"), "{e}");
    let g = guest.display().to_string();
    let local = c.node(0)?.data_dir.join("local.img");
    std::fs::write(&local, vec![0u8; 1 << 20])?;
    let local = local.display().to_string();
    let args = ["vm", "create", "local", "--kernel", &g, "--disk", &local, "--ha", "restart"];
    let e = c.cli(0, &args).await.map_err(|e| format!("{e:#}")).expect_err("a VM of host files");
    ensure!(e.contains("pool volumes only"), "{e}");
    let shown = c.cli(0, &["vm", "show", "ha-a"]).await?;
    ensure!(shown["ha"]["priority"] == 10, "a refused setting changed the VM: {shown}");
    ensure!(c.cli(0, &["vm", "show", "local"]).await.is_err(), "a refused VM was created");
    let status = c.cli(0, &["pool", "status"]).await?;
    ensure!(
        status["ha_protected_vms"] == 3 && status["ha_failures_to_tolerate"] == 1,
        "pool status: {status}"
    );
    for id in vm_ids.iter().chain([&plain]) {
        writes_acked(&c, 2, id, 3).await?;
    }

    c.kill9(2)?;
    let killed = Instant::now();
    // What each guest saw acknowledged before its node died.
    let mut acked = Vec::new();
    for id in &vm_ids {
        acked.push(acked_pass(&console_of(&c, 2, id)?).context("no acknowledged pass")?);
    }

    // Each runs on another node after the TTL, in priority order at most
    // two at a time; given the TTL, the start and a round of the controller.
    let mut restarted = Vec::new();
    let mut first = None;
    for ((name, _), (id, before)) in ha.iter().zip(vm_ids.iter().zip(&acked)) {
        let node = running_elsewhere(&c, 0, name, &dead, TTL + Duration::from_secs(60)).await?;
        let after = killed.elapsed();
        first = first.or(Some(after));
        let i = c.index_of(&node)?;
        let (max_seed, bad) =
            wait_until("the guest reports what its disk holds", Duration::from_secs(30), || async {
                found(&console_of(&c, i, id)?).context("no `dirty blk found` line yet")
            })
            .await?;
        ensure!(bad == 0, "{name}: {bad} sectors of its disk hold no pass's pattern");
        ensure!(
            max_seed >= *before,
            "{name}: its disk holds pass {max_seed}, but pass {before} was acknowledged before the kill"
        );
        let shown = c.cli(1, &["vm", "show", name]).await?;
        ensure!(shown["ha_restarts_ms"].as_array().map(Vec::len) == Some(1), "{shown}");
        restarted.push(format!(
            "{name} on node {i} by {:.1} s (acked {before}, found {max_seed})",
            after.as_secs_f64()
        ));
    }
    // Not before the lease ran out (the last renewal came up to a second before the kill).
    let first = first.context("no VM restarted")?;
    ensure!(first + Duration::from_secs(1) >= TTL, "restarted {first:?} after the kill, the TTL is {TTL:?}");
    // Without HA: nobody restarts it.
    let shown = c.cli(0, &["vm", "show", "plain"]).await?;
    ensure!(shown["state"] == "unknown" && shown["node_id"] == dead.as_str(), "{shown}");

    // The dead node comes back: it runs none of them, the one without HA is
    // crashed, and nothing is restarted twice.
    c.restart(2)?;
    wait_until("the VM without HA crashed", Duration::from_secs(60), || async {
        let shown = c.cli(0, &["vm", "show", "plain"]).await?;
        ensure!(shown["state"] == "crashed", "{shown}");
        Ok(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(c.node(2)?.children().is_empty(), "node 2 runs workers again");
    for (name, _) in ha {
        let shown = c.cli(2, &["vm", "show", name]).await?;
        ensure!(shown["state"] == "running" && shown["node_id"] != dead.as_str(), "{shown}");
        ensure!(shown["ha_restarts_ms"].as_array().map(Vec::len) == Some(1), "restarted twice: {shown}");
    }
    eprintln!("nodeos-tests: {test}: kill -9 of node 2 (TTL {} s): {}", TTL.as_secs(), restarted.join("; "));
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_nodes_worker_cannot_write_once_its_vm_restarted_elsewhere() -> anyhow::Result<()> {
    let test = "a_frozen_nodes_worker_cannot_write_once_its_vm_restarted_elsewhere";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test, "no /dev/kvm")? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let (ids, id) = pool_with_ha_vm_on_2(&mut c, &guest, "fz").await?;

    // The node process hangs; its worker runs on, writing with its old generation.
    c.freeze(2)?;
    let frozen = Instant::now();
    let node = running_elsewhere(&c, 0, "fz", &ids[2], TTL + Duration::from_secs(60)).await?;
    let restarted = frozen.elapsed();
    let i = c.index_of(&node)?;
    // The old guest goes on trying (its passes count up) and not one of its
    // writes is accepted once it has seen one refused. Its writes are
    // sequential, so a write acknowledged before the fence cannot complete
    // after a refused one; the counters of its first report with a failure
    // are the baseline (a report taken at a fixed time can predate a write
    // acknowledged before the fence, counted in the next report).
    let (pass_a, writes_a) =
        wait_until("the stale worker reports refused writes", Duration::from_secs(30), || async {
            let old = console_of(&c, 2, &id)?;
            // From the first write the device answered with an error status.
            let refused = old.find("dirty blk FAIL write sector=").context("no refused write yet")?;
            let after = &old[refused..];
            ensure!(
                after.lines().next().is_some_and(|l| l.contains("status=")),
                "not a refusal: {}",
                after.lines().next().unwrap_or("")
            );
            blk_reports(after)
                .into_iter()
                .find(|r| r.failed)
                .map(|r| (r.pass, r.writes))
                .context("no report after it yet")
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let old = console_of(&c, 2, &id)?;
    let last = *blk_reports(&old).last().context("no report")?;
    ensure!(last.pass > pass_a, "the frozen node's worker stopped: pass {pass_a} -> {}", last.pass);
    ensure!(
        last.writes == writes_a,
        "the stale worker got {} writes accepted after its first refused one (pass {pass_a} -> {})",
        last.writes - writes_a,
        last.pass
    );
    let (passes_a, passes_b) = (pass_a, last.pass);
    let new = console_of(&c, i, &id)?;
    ensure!(!new.contains("FAIL") && acked_pass(&new).is_some(), "the restarted VM:\n{new}");

    // Thawed, the node finds the VM elsewhere and ends its copy unresumed.
    c.thaw(2)?;
    wait_until("node 2 ends its stale copy", Duration::from_secs(30), || async {
        ensure!(c.log(2)?.contains("runs elsewhere now: ending it here, unresumed"), "not yet");
        ensure!(c.node(2)?.children().is_empty(), "its worker still runs");
        Ok(())
    })
    .await?;
    let shown = c.cli(2, &["vm", "show", "fz"]).await?;
    ensure!(shown["state"] == "running" && shown["node_id"] == node.as_str(), "{shown}");
    let v = c.cli(0, &["volume", "show", "fz-disk"]).await?;
    ensure!(v["volume"]["writer"]["node_id"] == node.as_str(), "{v}");
    eprintln!(
        "nodeos-tests: {test}: restarted on node {i} {:.1} s after the freeze; stale worker: {} more passes, 0 writes accepted",
        restarted.as_secs_f64(),
        passes_b - passes_a
    );
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_nodes_ha_vm_is_paused_restarted_on_the_majority_and_ended_when_it_heals()
-> anyhow::Result<()> {
    let test = "a_cut_off_nodes_ha_vm_is_paused_restarted_on_the_majority_and_ended_when_it_heals";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test, "no /dev/kvm")? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let (ids, id) = pool_with_ha_vm_on_2(&mut c, &guest, "cut").await?;

    c.cut(2)?;
    let cut = Instant::now();
    wait_until("node 2 pauses its VM", TTL * 3, || async {
        ensure!(c.log(2)?.contains("VM paused by self-fencing"), "not yet");
        Ok(())
    })
    .await?;
    let node = running_elsewhere(&c, 0, "cut", &ids[2], TTL + Duration::from_secs(60)).await?;
    let restarted = cut.elapsed();
    let old_passes = passes(&console_of(&c, 2, &id)?);

    c.heal(2)?;
    wait_until("node 2 ends its copy", Duration::from_secs(30), || async {
        ensure!(c.log(2)?.contains("runs elsewhere now: ending it here, unresumed"), "not yet");
        ensure!(c.node(2)?.children().is_empty(), "its worker still runs");
        Ok(())
    })
    .await?;
    let old = console_of(&c, 2, &id)?;
    ensure!(passes(&old) == old_passes, "the isolated copy ran again before it was ended");
    let shown = c.cli(2, &["vm", "show", "cut"]).await?;
    ensure!(shown["state"] == "running" && shown["node_id"] == node.as_str(), "{shown}");
    eprintln!(
        "nodeos-tests: {test}: restarted on node {} {:.1} s after the cut; ended on node 2 when it healed",
        c.index_of(&node)?,
        restarted.as_secs_f64()
    );
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_pool_reboot_restarts_each_ha_vm_once() -> anyhow::Result<()> {
    let test = "a_whole_pool_reboot_restarts_each_ha_vm_once";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test, "no /dev/kvm")? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let spec = with_ttl(&c);
    pool(&mut c, 3, spec).await?;
    for i in 0..3 {
        writer_vm(&c, i, &format!("r{i}"), &guest, Some(0)).await?;
    }
    writer_vm(&c, 0, "plain", &guest, None).await?;

    // Power loss: every node at once, then every node back.
    for i in 0..3 {
        c.kill9(i)?;
    }
    for i in 0..3 {
        c.restart(i)?;
    }
    for i in 0..3 {
        wait_until(&format!("r{i} running again"), Duration::from_secs(90), || async {
            let v = c.cli(0, &["vm", "show", &format!("r{i}")]).await?;
            ensure!(v["state"] == "running", "{v}");
            Ok(())
        })
        .await?;
    }
    // A while later: each started once, one worker each, the other VM crashed.
    tokio::time::sleep(TTL * 2).await;
    let vms = c.cli(0, &["vm", "list"]).await?;
    let vms = vms.as_array().context("vm list")?;
    for v in vms {
        let restarts = v["ha_restarts_ms"].as_array().map_or(0, Vec::len);
        if v["name"] == "plain" {
            ensure!(v["state"] == "crashed" && restarts == 0, "{v}");
        } else {
            ensure!(v["state"] == "running" && restarts == 1, "not started exactly once: {v}");
        }
    }
    let workers: usize = (0..3).map(|i| c.node(i).map_or(0, |n| n.children().len())).sum();
    ensure!(workers == 3, "{workers} workers run for 3 HA VMs");
    let starts: usize =
        (0..3).map(|i| c.log(i).map_or(0, |l| l.matches("HA restart: starting the VM").count())).sum();
    ensure!(starts == 3, "{starts} HA restarts logged for 3 VMs");
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_restart_time_over_repeated_kills() -> anyhow::Result<()> {
    let test = "ha_restart_time_over_repeated_kills";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test, "no /dev/kvm")? else { return Ok(()) };
    // NODEOS_HA_KILLS=N for more or fewer rounds.
    let kills: usize = std::env::var("NODEOS_HA_KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(10);
    let mut c = Cluster::new(&env, test)?;
    let spec = with_ttl(&c);
    let ids = pool(&mut c, 3, spec).await?;
    let mut times = Vec::with_capacity(kills);
    for k in 0..kills {
        // A new HA VM each round (the flap guard would hold back a fourth
        // restart of one VM within ten minutes), on the node killed next.
        let (victim, name) = (k % 3, format!("m{k}"));
        let id = writer_vm(&c, victim, &name, &guest, Some(0)).await?;
        writes_acked(&c, victim, &id, 2).await?;
        c.kill9(victim)?;
        let killed = Instant::now();
        running_elsewhere(&c, (victim + 1) % 3, &name, &ids[victim], TTL + Duration::from_secs(60)).await?;
        times.push(killed.elapsed());
        c.restart(victim)?;
        wait_until("the killed node alive again", Duration::from_secs(60), || async {
            let n = member(&c, (victim + 1) % 3, &ids[victim]).await?;
            ensure!(n["liveness"] == "alive", "{n}");
            Ok(())
        })
        .await?;
        c.cli(victim, &["vm", "stop", &name, "--force"]).await?;
        c.cli(victim, &["vm", "delete", &name]).await?;
    }
    times.sort();
    let ms = |d: &Duration| d.as_millis();
    eprintln!(
        "nodeos-tests: {test}: kill -9 -> HA VM running on another node, {kills} kills, TTL {} s: median {} ms, max {} ms, min {} ms (all: {:?})",
        TTL.as_secs(),
        times.get(kills / 2).map_or(0, ms),
        times.last().map_or(0, ms),
        times.first().map_or(0, ms),
        times.iter().map(ms).collect::<Vec<_>>()
    );
    c.finish();
    Ok(())
}

/// How many nodes `node list` shows, via node 0.
async fn members(c: &Cluster) -> anyhow::Result<usize> {
    c.cli(0, &["node", "list"]).await.map(|n| n.as_array().map_or(0, Vec::len))
}

/// `nodeos node remove` through node `via`: the error's text, or the answer.
async fn remove(c: &Cluster, via: usize, node: &str) -> Result<serde_json::Value, String> {
    c.cli(via, &["node", "remove", node]).await.map_err(|e| format!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_removed_with_its_vms_rehomed_and_its_copies_rebuilt_and_stays_out()
-> anyhow::Result<()> {
    let test = "a_dead_node_is_removed_with_its_vms_rehomed_and_its_copies_rebuilt_and_stays_out";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test, "no /dev/kvm")? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let spec = with_ttl(&c);
    let ids = pool(&mut c, 3, spec).await?;
    // The node removed is one that does not lead: the leader refuses its own
    // removal (checked below), and the test must not depend on who won the
    // first election.
    let leader = c.leader(0).await?;
    let leader_id = c.id(leader).await?;
    let g = (0..3).rev().find(|i| *i != leader).context("a node that does not lead")?;
    let gone = ids[g].clone();
    let via = (0..3).find(|i| *i != g && *i != leader).context("a third node")?;
    // On node g: a running VM and a stopped one, both on 3-copy volumes.
    writer_vm(&c, g, "busy", &guest, None).await?;
    writer_vm(&c, g, "idle", &guest, None).await?;
    c.cli(g, &["vm", "stop", "idle", "--force"]).await?;

    // Refused, nothing changed: an unknown node, the leader, a live node
    // running a VM, the only copy of an extent.
    let e = remove(&c, 0, "nosuch").await.expect_err("an unknown node");
    ensure!(e.contains("no node \"nosuch\""), "{e}");
    let e = remove(&c, via, &leader_id).await.expect_err("the leader");
    ensure!(e.contains("leads the pool"), "{e}");
    let e = remove(&c, 0, &gone).await.expect_err("a node running a VM");
    ensure!(e.contains("VM busy is running there"), "{e}");
    let solo = c.cli(0, &["volume", "create", "solo", "--size", "1M", "--replicas", "1"]).await?;
    let solo_node = solo["placement"][0]["node_ids"][0].as_str().context("solo's node")?.to_owned();
    let e = remove(&c, 0, &solo_node).await.expect_err("the only copy");
    ensure!(e.contains("extent 0 of volume solo has its only copy"), "{e}");
    c.cli(0, &["volume", "delete", "solo"]).await?;
    ensure!(members(&c).await? == 3, "a refused removal changed the members");

    // Dead: removed, its VMs now live elsewhere, its copies rebuilt.
    c.kill9(g)?;
    wait_until("the node dead", TTL * 3, || async {
        let n = member(&c, 0, &gone).await?;
        ensure!(n["liveness"] == "dead", "{n}");
        Ok(())
    })
    .await?;
    let r = remove(&c, 0, &gone).await.map_err(anyhow::Error::msg)?;
    ensure!(r["node_id"] == gone.as_str(), "{r}");
    let rehomed = r["vms_rehomed"].to_string();
    ensure!(rehomed.contains("busy") && rehomed.contains("idle"), "{r}");
    ensure!(r["copies_rebuilt"].as_u64().unwrap_or(0) >= 2, "{r}");
    ensure!(members(&c).await? == 2, "the removed node is still listed");
    let status = c.status(0).await?;
    ensure!(!status.members.iter().any(|m| m.id == gone), "the removed node is still a member: {status:?}");
    for name in ["busy-disk", "idle-disk"] {
        let v = c.cli(0, &["volume", "show", name]).await?;
        ensure!(!v["volume"]["placement"].to_string().contains(gone.as_str()), "{v}");
    }
    let busy = c.cli(via, &["vm", "show", "busy"]).await?;
    ensure!(busy["state"] == "crashed" && busy["node_id"] != gone.as_str(), "{busy}");
    ensure!(busy["reason"].as_str().unwrap_or_default().contains("was removed"), "{busy}");
    let idle = c.cli(via, &["vm", "show", "idle"]).await?;
    ensure!(idle["state"] == "stopped" && idle["node_id"] != gone.as_str(), "{idle}");
    // It runs again on its new node, its disk whole.
    c.cli(0, &["vm", "start", "busy"]).await?;
    let id = busy["id"].as_str().context("id")?;
    let i = c.index_of(busy["node_id"].as_str().unwrap_or_default())?;
    let (_, bad) = wait_until("busy reports its disk", Duration::from_secs(30), || async {
        found(&console_of(&c, i, id)?).context("no `dirty blk found` line yet")
    })
    .await?;
    ensure!(bad == 0, "busy's disk after the removal: {bad} bad sectors");

    // Back with the removed id: refused, saying why; the pool goes on.
    c.restart(g)?;
    wait_until("the node told it was removed", Duration::from_secs(30), || async {
        ensure!(c.log(g)?.contains("was removed from this pool"), "not yet");
        Ok(())
    })
    .await?;
    tokio::time::sleep(TTL).await;
    ensure!(members(&c).await? == 2, "the removed node came back into the pool");
    c.put(0, "after-removal", b"ok").await?;
    // The last voter of a pool is never removed (here: the leader refuses itself first).
    let leader_id = c.id(c.leader(0).await?).await?;
    let e = remove(&c, 0, &leader_id).await.expect_err("the leader");
    ensure!(e.contains("leads the pool"), "{e}");
    c.finish();
    Ok(())
}
