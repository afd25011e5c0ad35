//! High availability, process level (network namespaces): node liveness from
//! lease renewals. Every member renews its lease through the raft log once a
//! second; a member without a renewal turns `suspect`, then `dead` after the
//! lease TTL (4 s here), and the VMs its record says run there show `unknown`
//! with the reason, never `running`; back, it is alive again, and records the
//! VM crashed with its volume's writer slot freed. A node cut off
//! from the others pauses its VMs (self-fencing) before the pool may count it
//! dead, and resumes them when it is back and nobody took them over. A worker
//! that panics ends at once, and its VM is recorded crashed with the panic.

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
        let mut vms = VmServiceClient::connect(format!("http://{}", c.node(2)?.addr)).await?;
        let v = c.cli(2, &["volume", "create", "disk2", "--size", "8M"]).await?;
        let volume = v["id"].as_str().context("volume id")?.to_owned();
        let spec = pb::VmSpec {
            disks: vec![pb::DiskSpec { path: String::new(), read_only: false, volume }],
            ..guest_spec(guest, "mode=idle")
        };
        vms.create(pb::CreateVmRequest { name: "on2".into(), spec: Some(spec) }).await?;
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
    let mut vms = VmServiceClient::connect(format!("http://{}", c.node(2)?.addr)).await?;
    let spec = guest_spec(&guest, "mode=dirty dirty_mib=1");
    let vm = vms.create(pb::CreateVmRequest { name: "on2".into(), spec: Some(spec) }).await?.into_inner();
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
    let mut vms = VmServiceClient::connect(format!("http://{}", c.node(0)?.addr)).await?;
    let spec = guest_spec(&guest, "mode=idle");
    vms.create(pb::CreateVmRequest { name: "p".into(), spec: Some(spec) }).await?;
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
