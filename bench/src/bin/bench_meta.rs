//! `make bench-meta`: the nodeos metadata store against a 3-member etcd, both
//! on loopback, driven by the same load generator, one system at a time.
//!
//! Measures replicated durable puts (256-byte values, distinct keys) with 1 and
//! 64 concurrent clients against each system's leader, and pool formation time
//! (spawn of 3 fresh processes → first committed write). Ends with one
//! `ratio <metric> <nodeos/etcd>` line per metric.
//!
//! Environment: `NODEOS_BIN` (default `target/release/nodeos`), `ETCD_BIN`,
//! `BENCH_TRIALS` (formation trials per system, default 3), `BENCH_WARMUP_MS`
//! (default 1500), `BENCH_MEASURE_MS` (default 8000).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use nodeos_bench::etcd::Etcd;
use nodeos_bench::fmt_ratio;
use nodeos_bench::load::{Phase, PhaseResult, VALUE_LEN, first_commit, run_phase};
use nodeos_bench::nodeos::Nodeos;
use nodeos_bench::system::{Cluster, System};
use tokio::time::Instant;

const FORMATION_LIMIT: Duration = Duration::from_secs(60);
const READY_LIMIT: Duration = Duration::from_secs(60);

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn nodeos_bin() -> anyhow::Result<PathBuf> {
    let bin =
        std::env::var_os("NODEOS_BIN").map_or_else(|| PathBuf::from("target/release/nodeos"), PathBuf::from);
    if !bin.is_file() {
        bail!("nodeos binary {} not found (set NODEOS_BIN or run `make release`)", bin.display());
    }
    Ok(bin)
}

/// Spawn 3 fresh members → first committed put, on a cluster killed afterwards.
async fn formation<S: System>(sys: &S) -> anyhow::Result<Duration> {
    let spawned = Instant::now();
    let mut cluster = sys.spawn_cluster()?;
    let took = first_commit(&sys.connector(), &cluster.client_addrs(), spawned, FORMATION_LIMIT).await;
    let took = match took {
        Ok(t) => t,
        Err(e) => {
            cluster.check_running()?;
            return Err(e.context(format!("{} formation\n{}", sys.name(), cluster.logs())));
        }
    };
    drop(cluster);
    // Let the killed processes' memory and files go before the next run.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(took)
}

/// Every load phase on one fresh cluster, against its leader.
async fn load<S: System>(sys: &S, phases: &[Phase]) -> anyhow::Result<Vec<PhaseResult>> {
    let mut cluster = sys.spawn_cluster()?;
    let leader = cluster.wait_ready_leader(READY_LIMIT).await?;
    println!("{}: cluster ready, clients connect to the leader at {leader}", sys.name());
    let mut out = Vec::new();
    for phase in phases {
        let r = run_phase(&sys.connector(), &leader, phase)
            .await
            .with_context(|| format!("{} phase {}\n{}", sys.name(), phase.name, cluster.logs()))?;
        cluster.check_running()?;
        println!(
            "{}: {:<4} {:>9.0} writes/s  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  ({} ok, {} errors)",
            sys.name(),
            phase.name,
            r.writes_per_s,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.ops,
            r.errors
        );
        out.push(r);
    }
    let after = cluster.wait_ready_leader(READY_LIMIT).await?;
    if after != leader {
        println!("{}: WARNING: the leader moved from {leader} to {after} during the load", sys.name());
    }
    Ok(out)
}

fn median(xs: &[Duration]) -> Duration {
    let mut v = xs.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run(etcd: Etcd) -> anyhow::Result<()> {
    let nodeos = Nodeos { bin: nodeos_bin()? };
    let trials = env_u64("BENCH_TRIALS", 3)?.max(1) as usize;
    let warmup = Duration::from_millis(env_u64("BENCH_WARMUP_MS", 1500)?);
    let measure = Duration::from_millis(env_u64("BENCH_MEASURE_MS", 8000)?);
    let phases = [
        Phase { name: "c1".into(), clients: 1, connections: 1, warmup, measure },
        Phase { name: "c64".into(), clients: 64, connections: 4, warmup, measure },
    ];

    println!("== bench-meta: nodeos metadata store vs etcd, 3 members each on 127.0.0.1 ==");
    println!("nodeos: {}", nodeos.bin.display());
    println!("etcd:   {} ({})", etcd.bin.display(), etcd.version());
    println!(
        "cpus: {}, data dirs under {} (fresh per cluster), default fsync and timeouts on both",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::env::temp_dir().display()
    );
    println!(
        "load: puts of {VALUE_LEN}-byte values to distinct keys; c1 = 1 client on 1 connection, \
         c64 = 64 clients (64 in flight) on 4 connections; {warmup:?} warmup + {measure:?} measured per phase"
    );
    println!(
        "clients connect to the leader on both sides, so neither pays a forwarding hop \
         (nodeos: PoolService.Status leader_id -> member address; etcd: Maintenance.Status leader -> member)"
    );
    println!("one system runs at a time: each cluster is killed before the other's starts");
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at start: {} (other work on this machine skews both sides)", l.trim());
    }
    println!();

    println!(
        "-- formation: spawn 3 fresh processes -> first committed put ({trials} trials each, alternating)"
    );
    let (mut nf, mut ef) = (Vec::new(), Vec::new());
    for t in 1..=trials {
        let n = formation(&nodeos).await?;
        let e = formation(&etcd).await?;
        println!("trial {t}: nodeos {:>8.1} ms   etcd {:>8.1} ms", ms(n), ms(e));
        nf.push(n);
        ef.push(e);
    }
    println!();

    println!("-- load");
    let nl = load(&nodeos, &phases).await?;
    let el = load(&etcd, &phases).await?;
    println!();

    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    for (i, p) in phases.iter().enumerate() {
        rows.push((format!("writes_per_s_{}", p.name), nl[i].writes_per_s, el[i].writes_per_s));
        rows.push((format!("p50_ms_{}", p.name), nl[i].p50_ms, el[i].p50_ms));
        rows.push((format!("p99_ms_{}", p.name), nl[i].p99_ms, el[i].p99_ms));
    }
    rows.push(("formation_ms".into(), ms(median(&nf)), ms(median(&ef))));

    println!("{:<18} {:>12} {:>12} {:>12}", "metric", "nodeos", "etcd", "nodeos/etcd");
    for (name, n, e) in &rows {
        println!("{name:<18} {n:>12.2} {e:>12.2} {:>12}", fmt_ratio(n / e));
    }
    println!("(writes_per_s: higher is better; *_ms: lower is better; formation_ms: median of {trials})");
    println!();
    for (name, n, e) in &rows {
        println!("ratio {name} {}", fmt_ratio(n / e));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let Some(etcd) = Etcd::find() else {
        let msg = "SKIPPED: etcd not installed (apt-get install etcd-server)";
        println!("{msg}");
        eprintln!("{msg}");
        return ExitCode::from(2);
    };
    nodeos_bench::proc::run_until_signal("bench-meta", run(etcd)).await
}
