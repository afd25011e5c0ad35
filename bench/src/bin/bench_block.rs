//! `make bench-block`: nodeos volumes against local peers, all on 127.0.0.1.
//!
//! 1. fio over NBD: 4 KiB `randwrite` and `randread` at iodepth 1 and 32
//!    against a 3-replica volume of a 3-node pool (fio connects to node n0's
//!    NBD server), side by side with `qemu-nbd` serving a local raw file of the
//!    same size; the same fio command lines on both sides, one job at a time,
//!    alternating (nodeos, qemu-nbd). The region under test is prefilled on
//!    both sides by a sequential 1 MiB write pass before the first job, so
//!    writes overwrite and reads hit data. Metrics `rand{write,read}_qd{1,32}_iops`.
//! 2. Re-replication: a 4-node pool (one spare) with `--rereplicate-after 2`,
//!    a 3-replica volume partly filled through n0's NBD server; one node that
//!    holds copies and is neither n0 nor the raft leader is killed with
//!    SIGKILL, and the benchmark waits until every extent has 3 in-sync copies
//!    again (volume records polled; copy health confirmed with
//!    `VolumeService.Get`). Throughput = filled bytes that lived on the killed
//!    node / (kill -> all in-sync - grace). The peer is loopback TCP throughput
//!    (`iperf3`, else a tokio copy) measured in the same invocation. Metric
//!    `rereplication_mib_per_s`.
//!
//! Details without ratio lines: clat p50 of each fio job, the prefill's
//! bandwidth, and the re-replication rate over the copying time alone (from
//! the controller's `copies repaired` log lines, without detection and
//! grace). Ends with one `ratio <metric> <nodeos/peer>` line per metric.
//!
//! Environment: `NODEOS_BIN` (default target/release/nodeos),
//! `BENCH_FIO_RUNTIME_S` (measured seconds per fio job, default 10),
//! `BENCH_FIO_RAMP_S` (unmeasured seconds before each, default 1),
//! `BENCH_FIO_REGION_MIB` (default 256), `BENCH_VOLUME_MIB` (default 1024),
//! `BENCH_FILL_MIB` (default 512), `BENCH_TCP_S` (iperf3 seconds, default 5),
//! `BENCH_TCP_PEER=tokio` (skip iperf3). Without fio (with its nbd engine),
//! qemu-nbd or qemu-img it prints `SKIPPED: ...` and exits 2.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use nodeos_bench::block::fio::{self, FioJob, FioResult};
use nodeos_bench::block::peer::{self, QemuNbd};
use nodeos_bench::block::volume::{self, Volumes, all_in_sync, filled_per_extent, state_counts};
use nodeos_bench::block::{mib, problems};
use nodeos_bench::fmt_ratio;
use nodeos_bench::nodeos::{Nodeos, NodeosCluster, PoolOptions};
use nodeos_bench::system::Cluster;
use nodeos_bench::vmm::find_program;
use nodeos_proto::v1::PoolStatus;
use tokio::time::Instant;

const READY_LIMIT: Duration = Duration::from_secs(60);
const REREPLICATION_LIMIT: Duration = Duration::from_secs(180);
/// `--rereplicate-after` of the re-replication pool.
const GRACE: Duration = Duration::from_secs(2);
/// How often the volume record is read while waiting for re-replication.
const POLL: Duration = Duration::from_millis(100);
/// How often copy health is asked while waiting, whatever the record says.
const FALLBACK_GET: Duration = Duration::from_secs(5);
const KIB4: u64 = 4096;
const MIB1: u64 = 1 << 20;

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// The external programs.
struct Tools {
    fio: PathBuf,
    qemu_nbd: PathBuf,
    qemu_img: PathBuf,
    iperf3: Option<PathBuf>,
}

struct Config {
    runtime: Duration,
    ramp: Duration,
    region: u64,
    volume: u64,
    fill: u64,
    tcp_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Lower,
    Higher,
}

/// One row of the final table.
struct Row {
    name: String,
    unit: &'static str,
    better: Better,
    ours: f64,
    peer: f64,
    peer_name: String,
    /// Gets a `ratio` line (else a detail of the table only).
    headline: bool,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.ours / self.peer
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Index of each node id in the cluster (by its API address).
fn node_index(status: &PoolStatus, cluster: &NodeosCluster) -> HashMap<String, usize> {
    let addrs = cluster.client_addrs();
    status
        .members
        .iter()
        .filter_map(|m| addrs.iter().position(|a| *a == m.address).map(|i| (m.id.clone(), i)))
        .collect()
}

/// The WARN/ERROR lines of the given nodes' logs, grouped by node, level,
/// target and the message's first words, most frequent first.
fn log_summary(cluster: &NodeosCluster, nodes: &[usize], expected: &[&str]) -> String {
    let mut groups: Vec<(String, usize, String)> = Vec::new();
    for &i in nodes {
        let text = std::fs::read_to_string(cluster.log_path(i)).unwrap_or_default();
        for line in problems(&text, expected) {
            // "<time> <LEVEL> <target>: <message> key=value ..."
            let words: Vec<&str> = line.split_whitespace().skip(1).take(6).collect();
            let key = format!("n{i} {}", words.join(" "));
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => g.1 += 1,
                None => groups.push((key, 1, line)),
            }
        }
    }
    if groups.is_empty() {
        return "no WARN/ERROR lines".into();
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.1));
    let total: usize = groups.iter().map(|g| g.1).sum();
    let shown: Vec<String> = groups
        .iter()
        .take(6)
        .map(|(k, n, example)| {
            let node = k.split_whitespace().next().unwrap_or("");
            format!("{n:>5} x {node}: {}", example.chars().take(200).collect::<String>())
        })
        .collect();
    format!(
        "{total} WARN/ERROR line(s) in {} kind(s), most frequent:\n  {}",
        groups.len(),
        shown.join("\n  ")
    )
}

async fn start_pool(nodeos: &Nodeos, opts: &PoolOptions) -> anyhow::Result<(NodeosCluster, PoolStatus)> {
    let t = Instant::now();
    let mut cluster = nodeos.spawn_pool(opts)?;
    let status = cluster.wait_all_healthy(READY_LIMIT).await?;
    println!(
        "nodeos: {}-node pool formed in {:.1} s (leader {}){}",
        opts.nodes,
        secs(t.elapsed()),
        status.leader_id,
        if opts.extra_args.is_empty() {
            String::new()
        } else {
            format!(", flags {}", opts.extra_args.join(" "))
        }
    );
    Ok((cluster, status))
}

fn fio_line(what: &str, o: &FioResult, q: &FioResult) -> String {
    format!(
        "{what:<14} nodeos {:>8.0} IOPS {:>7.1} MiB/s p50 {:>8.1} us p99 {:>8.1} us | qemu-nbd {:>8.0} IOPS \
         {:>7.1} MiB/s p50 {:>8.1} us p99 {:>8.1} us",
        o.iops, o.mib_per_s, o.clat_p50_us, o.clat_p99_us, q.iops, q.mib_per_s, q.clat_p50_us, q.clat_p99_us
    )
}

/// Part 1: the fio jobs on both sides.
async fn fio_part(nodeos: &Nodeos, tools: &Tools, cfg: &Config, dir: &Path) -> anyhow::Result<Vec<Row>> {
    println!(
        "-- fio over NBD: 4 KiB random I/O on the first {} MiB of a {} MiB volume / raw file, {:.0} s ramp + {:.0} s \
         measured per job",
        cfg.region >> 20,
        cfg.volume >> 20,
        secs(cfg.ramp),
        secs(cfg.runtime)
    );
    let (mut cluster, status) = start_pool(nodeos, &PoolOptions::default()).await?;
    let mut api = Volumes::connect(&cluster.client_addrs()[0]).await?;
    let v = api.create("bench", cfg.volume, 3).await?;
    let holders: std::collections::BTreeSet<&String> = v.placement.iter().flat_map(|p| &p.node_ids).collect();
    println!(
        "nodeos: volume bench: {} extents of {} MiB, {} replicas on {} nodes; fio uses n0's NBD at {} (n0 is {})",
        v.placement.len(),
        v.extent_size_bytes >> 20,
        v.replicas,
        holders.len(),
        cluster.nbd_addrs()[0],
        if node_index(&status, &cluster).get(&status.leader_id) == Some(&0) {
            "the leader"
        } else {
            "a follower"
        }
    );
    let img = dir.join("qemu-nbd.img");
    peer::make_raw_image(&tools.qemu_img, &img, cfg.volume)?;
    let qemu = QemuNbd::start(&tools.qemu_nbd, &img, "bench", &dir.join("qemu-nbd.log")).await?;
    println!("qemu-nbd: {} (sparse raw file made by qemu-img create)", qemu.command);
    let ours_uri = format!("nbd://{}/bench", cluster.nbd_addrs()[0]);
    let peer_uri = format!("nbd://{}/bench", qemu.addr);

    let prefill = FioJob {
        name: "prefill".into(),
        rw: "write",
        bs: MIB1,
        iodepth: 8,
        size: cfg.region,
        runtime: None,
        ramp: Duration::ZERO,
    };
    let o = fio::run(&tools.fio, &ours_uri, &prefill, dir, "nodeos").await.context("nodeos prefill")?;
    cluster.check_running()?;
    let q = fio::run(&tools.fio, &peer_uri, &prefill, dir, "qemu").await.context("qemu-nbd prefill")?;
    println!("{}  (sequential 1 MiB, iodepth 8, one pass)", fio_line("prefill", &o, &q));
    let mut rows = vec![Row {
        name: "prefill_seqwrite_1m_mib_per_s".into(),
        unit: "MiB/s",
        better: Better::Higher,
        ours: o.mib_per_s,
        peer: q.mib_per_s,
        peer_name: "qemu-nbd".into(),
        headline: false,
    }];

    let mut details = Vec::new();
    for (rw, qd) in [("randwrite", 1), ("randwrite", 32), ("randread", 1), ("randread", 32)] {
        let job = FioJob {
            name: format!("{rw}-qd{qd}"),
            rw,
            bs: KIB4,
            iodepth: qd,
            size: cfg.region,
            runtime: Some(cfg.runtime),
            ramp: cfg.ramp,
        };
        if rows.len() == 1 {
            let args = job.args(&ours_uri, Path::new("REPORT.json")).join(" ");
            println!("fio command (nodeos side; the others differ in --rw and --iodepth): fio {args}");
        }
        let o = fio::run(&tools.fio, &ours_uri, &job, dir, "nodeos")
            .await
            .with_context(|| format!("nodeos {rw} qd{qd}"))?;
        cluster.check_running()?;
        let q = fio::run(&tools.fio, &peer_uri, &job, dir, "qemu")
            .await
            .with_context(|| format!("qemu-nbd {rw} qd{qd}"))?;
        println!("{}", fio_line(&format!("{rw} qd{qd}"), &o, &q));
        let name = format!("{rw}_qd{qd}");
        rows.push(Row {
            name: format!("{name}_iops"),
            unit: "IOPS",
            better: Better::Higher,
            ours: o.iops,
            peer: q.iops,
            peer_name: "qemu-nbd".into(),
            headline: true,
        });
        details.push(Row {
            name: format!("{name}_clat_p50_us"),
            unit: "us",
            better: Better::Lower,
            ours: o.clat_p50_us,
            peer: q.clat_p50_us,
            peer_name: "qemu-nbd".into(),
            headline: false,
        });
    }
    cluster.check_running()?;
    let after = api.record("bench").await?;
    if !after.warning.is_empty() {
        println!("nodeos: WARNING: volume bench says: {}", after.warning);
    }
    println!("nodeos logs: {}", log_summary(&cluster, &[0, 1, 2], &[]));
    println!();
    rows.extend(details);
    Ok(rows)
}

/// Part 2: kill a node holding copies; time until all copies are back in sync.
async fn rereplication_part(
    nodeos: &Nodeos,
    tools: &Tools,
    cfg: &Config,
    dir: &Path,
) -> anyhow::Result<Vec<Row>> {
    println!(
        "-- re-replication: 4-node pool, {} MiB volume with 3 replicas, first {} MiB filled through n0's NBD; \
         SIGKILL one node holding copies (not n0, not the leader)",
        cfg.volume >> 20,
        cfg.fill >> 20
    );
    let opts =
        PoolOptions { nodes: 4, extra_args: vec!["--rereplicate-after".into(), GRACE.as_secs().to_string()] };
    let (mut cluster, _) = start_pool(nodeos, &opts).await?;
    let mut api = Volumes::connect(&cluster.client_addrs()[0]).await?;
    let v = api.create("rerep", cfg.volume, 3).await?;
    let uri = format!("nbd://{}/rerep", cluster.nbd_addrs()[0]);
    let fill = FioJob {
        name: "fill".into(),
        rw: "write",
        bs: MIB1,
        iodepth: 8,
        size: cfg.fill,
        runtime: None,
        ramp: Duration::ZERO,
    };
    let f = fio::run(&tools.fio, &uri, &fill, dir, "nodeos").await.context("filling the volume")?;
    println!(
        "fill: {} MiB of fio's (non-zero) buffers in 1 MiB writes, iodepth 8: {:.1} MiB/s",
        cfg.fill >> 20,
        f.mib_per_s
    );

    // Start from a quiet, fully in-sync volume: writer gone, every copy equal.
    let settle = Instant::now() + Duration::from_secs(60);
    loop {
        cluster.check_running()?;
        let r = api.record("rerep").await?;
        if r.writer.is_none() {
            let d = api.detail("rerep").await?;
            if all_in_sync(&d, 3) {
                break;
            }
            if Instant::now() >= settle {
                bail!("the filled volume's copies did not agree within 60 s: {}", state_counts(&d));
            }
        } else if Instant::now() >= settle {
            bail!("the NBD writer slot was not released within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let status = cluster.wait_all_healthy(READY_LIMIT).await?;
    let index = node_index(&status, &cluster);
    let per_extent = filled_per_extent(v.extent_size_bytes, v.placement.len(), cfg.fill);
    let held = |id: &str| -> u64 {
        v.placement
            .iter()
            .zip(&per_extent)
            .filter(|(p, _)| p.node_ids.iter().any(|n| n == id))
            .map(|(_, b)| b)
            .sum()
    };
    let mut candidates: Vec<(&String, usize)> =
        index.iter().filter(|(id, i)| **i != 0 && **id != status.leader_id).map(|(id, i)| (id, *i)).collect();
    candidates.sort_by_key(|(id, i)| (std::cmp::Reverse(held(id)), *i));
    let Some(&(victim_id, victim)) = candidates.first() else {
        bail!("no node besides n0 and the leader: {index:?}");
    };
    let bytes = held(victim_id);
    let extents_held = v.placement.iter().filter(|p| p.node_ids.contains(victim_id)).count();
    let filled_held = v
        .placement
        .iter()
        .zip(&per_extent)
        .filter(|(p, b)| **b > 0 && p.node_ids.contains(victim_id))
        .count();
    if bytes == 0 {
        bail!("node n{victim} holds none of the filled extents");
    }
    let leader_i = index.get(&status.leader_id).map_or("?".into(), |i| format!("n{i}"));
    println!(
        "killing n{victim} ({victim_id}; leader is {leader_i}): it holds {extents_held} of {} extents, {filled_held} \
         of them filled = {:.0} MiB to re-copy",
        v.placement.len(),
        mib(bytes)
    );

    let kill_wall = unix_ms();
    let t_kill = Instant::now();
    cluster.kill_node(victim).await?;
    // The leader's controller marks the volume degraded on its first pass
    // without the node, re-copies after the grace period and clears the
    // warning at the end of the pass that re-copied. The record (`List`)
    // costs the replicas nothing, so it is polled often; copy health
    // (`Get`: digests from every copy) confirms the end, and is also asked
    // now and then in case a warning change is missed.
    let mut degraded_at = None;
    let mut last_get = t_kill;
    // Each poll is a linearizable read, which the leader confirms with a
    // quorum while a voter is dead: its latency is shown as a detail.
    let mut poll_ms = Vec::new();
    let done_at = loop {
        let t = Instant::now();
        if t - t_kill > REREPLICATION_LIMIT {
            let d = api.detail("rerep").await?;
            bail!(
                "copies not back in sync {REREPLICATION_LIMIT:?} after the kill: {}; warning {:?}\n{}",
                state_counts(&d),
                d.volume.map(|v| v.warning),
                cluster.logs()
            );
        }
        cluster.check_running()?;
        let r = api.record("rerep").await?;
        poll_ms.push(secs(t.elapsed()) * 1e3);
        if !r.warning.is_empty() && degraded_at.is_none() {
            degraded_at = Some(t);
        }
        let cleared = degraded_at.is_some() && r.warning.is_empty();
        if cleared || (t - t_kill > GRACE && last_get.elapsed() >= FALLBACK_GET) {
            last_get = Instant::now();
            let d = api.detail("rerep").await?;
            let placed_off =
                d.volume.as_ref().is_some_and(|v| volume::check_not_placed(v, victim_id).is_ok());
            if placed_off && all_in_sync(&d, 3) {
                break t;
            }
        }
        tokio::time::sleep(POLL.saturating_sub(t.elapsed())).await;
    };
    let total = done_at - t_kill;
    let copying = total.saturating_sub(GRACE);
    let rate = mib(bytes) / secs(copying);
    println!(
        "volume marked degraded at +{:.2} s; all {} extents 3 copies in-sync, none on n{victim}, at +{:.2} s \
         (record polled every {} ms, health confirmed by VolumeService.Get)",
        degraded_at.map_or(f64::NAN, |m| secs(m - t_kill)),
        v.placement.len(),
        secs(total),
        POLL.as_millis()
    );
    poll_ms.sort_by(f64::total_cmp);
    println!(
        "VolumeService.List while n{victim} is dead: {} calls, median {:.1} ms, max {:.1} ms",
        poll_ms.len(),
        poll_ms.get(poll_ms.len() / 2).copied().unwrap_or(f64::NAN),
        poll_ms.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "re-replication: {:.0} MiB in {:.2} s - {:.0} s grace = {:.2} s: {rate:.1} MiB/s",
        mib(bytes),
        secs(total),
        secs(GRACE),
        secs(copying)
    );

    // Cross-check with what the leader's controller logged.
    let survivors: Vec<usize> = (0..4).filter(|i| !cluster.is_down(*i)).collect();
    let (mut lost, mut repaired) = (Vec::new(), Vec::new());
    let mut copy_only = None;
    for &i in &survivors {
        let text = std::fs::read_to_string(cluster.log_path(i)).unwrap_or_default();
        let (l, r) = volume::controller_lines(&text, &v.id, kill_wall);
        lost.extend(l);
        repaired.extend(r);
    }
    if repaired.is_empty() {
        println!("node logs: no \"copies repaired\" lines for this volume after the kill");
    } else {
        let logged: u64 = repaired.iter().map(|r| r.blocks * KIB4).sum();
        let busy: f64 = repaired.iter().map(|r| mib(r.blocks * KIB4) / r.mib_per_s).sum();
        let (lo, hi) =
            repaired.iter().fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(r.mib_per_s), h.max(r.mib_per_s)));
        let first_lost = lost.iter().min().map_or(f64::NAN, |t| (*t as f64 - kill_wall as f64) / 1e3);
        let last = repaired.iter().map(|r| r.at_unix_ms).max().unwrap_or(kill_wall);
        println!(
            "node logs: first \"node lost; re-replicating\" at +{first_lost:.2} s, last \"copies repaired\" at +{:.2} s; \
             {} extent copies repaired, {:.0} MiB, per extent {lo:.1}..{hi:.1} MiB/s, {:.1} MiB/s over the copying \
             time alone",
            (last as f64 - kill_wall as f64) / 1e3,
            repaired.len(),
            mib(logged),
            mib(logged) / busy
        );
        copy_only = Some(mib(logged) / busy);
        if logged != bytes {
            println!(
                "node logs: NOTE: the controller re-copied {:.0} MiB, the benchmark counts {:.0} MiB",
                mib(logged),
                mib(bytes)
            );
        }
    }
    println!(
        "nodeos logs (survivors): {}",
        log_summary(&cluster, &survivors, &["node lost; re-replicating"])
    );
    drop(cluster);

    let tcp = peer::loopback_tcp(tools.iperf3.clone(), bytes, cfg.tcp_secs, dir).await?;
    println!(
        "peer: loopback TCP, {}: {:.0} MiB in {:.2} s = {:.0} MiB/s",
        tcp.how,
        mib(tcp.bytes),
        tcp.secs,
        tcp.mib_per_s()
    );
    println!();
    let peer_name = format!("loopback TCP ({})", if tcp.how.contains("iperf3") { "iperf3" } else { "tokio" });
    let mut rows = vec![Row {
        name: "rereplication_mib_per_s".into(),
        unit: "MiB/s",
        better: Better::Higher,
        ours: rate,
        peer: tcp.mib_per_s(),
        peer_name: peer_name.clone(),
        headline: true,
    }];
    if let Some(c) = copy_only {
        rows.push(Row {
            name: "rereplication_copying_mib_per_s".into(),
            unit: "MiB/s",
            better: Better::Higher,
            ours: c,
            peer: tcp.mib_per_s(),
            peer_name: format!("{peer_name}; ours from node logs"),
            headline: false,
        });
    }
    Ok(rows)
}

async fn run(tools: Tools) -> anyhow::Result<()> {
    let bin =
        std::env::var_os("NODEOS_BIN").map_or_else(|| PathBuf::from("target/release/nodeos"), PathBuf::from);
    if !bin.is_file() {
        bail!("nodeos binary {} not found (set NODEOS_BIN or run `make release`)", bin.display());
    }
    let nodeos = Nodeos { bin: bin.canonicalize()? };
    let cfg = Config {
        runtime: Duration::from_secs(env_u64("BENCH_FIO_RUNTIME_S", 10)?.max(1)),
        ramp: Duration::from_secs(env_u64("BENCH_FIO_RAMP_S", 1)?),
        region: env_u64("BENCH_FIO_REGION_MIB", 256)?.max(1) << 20,
        volume: env_u64("BENCH_VOLUME_MIB", 1024)?.max(1) << 20,
        fill: env_u64("BENCH_FILL_MIB", 512)?.max(1) << 20,
        tcp_secs: env_u64("BENCH_TCP_S", 5)?.max(1),
    };
    if cfg.region > cfg.volume || cfg.fill > cfg.volume {
        bail!("BENCH_FIO_REGION_MIB and BENCH_FILL_MIB must not exceed BENCH_VOLUME_MIB");
    }
    let began = Instant::now();
    let dir = tempfile::Builder::new().prefix("bench-block-").tempdir().context("creating a temp dir")?;

    println!(
        "== bench-block: nodeos volumes over NBD vs qemu-nbd on a raw file; re-replication vs loopback TCP =="
    );
    println!("nodeos:   {}", nodeos.bin.display());
    println!("fio:      {} ({}, ioengine=nbd)", tools.fio.display(), fio::version(&tools.fio));
    println!("qemu-nbd: {} ({})", tools.qemu_nbd.display(), peer::version_of(&tools.qemu_nbd, "--version"));
    match &tools.iperf3 {
        Some(p) => println!("iperf3:   {} ({})", p.display(), peer::version_of(p, "--version")),
        None => println!("iperf3:   not installed; loopback TCP is measured by a tokio copy"),
    }
    println!(
        "cpus: {}; everything on 127.0.0.1; data, raw file and logs under {} (one filesystem for both sides)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dir.path().display()
    );
    println!(
        "nodeos writes are acknowledged at 2 of 3 copies, replicated over TCP between the node processes; neither side \
         flushes during the jobs (fio sends no NBD flush), so both write into the page cache"
    );
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at start: {} (other work on this machine skews both sides)", l.trim());
    }
    println!();

    let mut rows = fio_part(&nodeos, &tools, &cfg, dir.path()).await?;
    rows.extend(rereplication_part(&nodeos, &tools, &cfg, dir.path()).await?);

    println!("{:<40} {:>12} {:>12} {:>12}  {:<6}  peer", "metric", "nodeos", "peer", "nodeos/peer", "better");
    let (head, rest): (Vec<&Row>, Vec<&Row>) = rows.iter().partition(|r| r.headline);
    for r in head.iter().chain(rest.iter()) {
        println!(
            "{:<40} {:>12.2} {:>12.2} {:>12}  {:<6}  {}",
            format!("{} [{}]", r.name, r.unit),
            r.ours,
            r.peer,
            fmt_ratio(r.ratio()),
            if r.better == Better::Lower { "lower" } else { "higher" },
            r.peer_name
        );
    }
    println!(
        "(rows after rereplication_mib_per_s are details without ratio lines; total benchmark time {:.0} s)",
        secs(began.elapsed())
    );
    println!();
    for r in head {
        println!("ratio {} {}", r.name, fmt_ratio(r.ratio()));
    }
    Ok(())
}

fn skipped(why: &str) -> ExitCode {
    let msg = format!("SKIPPED: bench-block: {why}");
    println!("{msg}");
    eprintln!("{msg}");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut found = Vec::new();
    for tool in ["fio", "qemu-nbd", "qemu-img"] {
        match find_program(tool) {
            Some(p) => found.push(p),
            None => return skipped(&format!("{tool} not installed (apt install fio qemu-utils)")),
        }
    }
    let [fio_bin, qemu_nbd, qemu_img]: [PathBuf; 3] = found.try_into().expect("three tools were looked up");
    if !fio::has_nbd_engine(&fio_bin) {
        return skipped(&format!(
            "{} has no nbd ioengine (a fio built with libnbd is needed)",
            fio_bin.display()
        ));
    }
    let tools = Tools { fio: fio_bin, qemu_nbd, qemu_img, iperf3: find_program("iperf3") };
    nodeos_bench::proc::run_until_signal("bench-block", run(tools)).await
}
