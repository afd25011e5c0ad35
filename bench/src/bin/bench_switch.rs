//! `make bench-switch`: the nodeos software switch against the Linux kernel's
//! bridge and vxlan device, the same topology on one host, side by side.
//!
//! Each side gets its own network namespaces (see `nodeos_bench::switch`):
//! two node namespaces joined by a veth pair (10.88.0.1/24, 10.88.0.2/24)
//! and one client namespace per node. The kernel side bridges each client
//! over a vxlan device (VNI 100, UDP 4789) to the other node; the nodeos
//! side runs one `nodeos node` per node namespace (a two-node pool), and
//! the CLI makes a security group allowing everything, a network and one
//! tap port per node whose tap is moved into the client namespace. Clients
//! use MTU 1450 on both sides.
//!
//! Metrics, from client 0 to client 1 with the same command lines on both
//! sides, one run at a time, the side that goes first alternating from
//! one run to the next: `tcp_gbit_per_s` (one iperf3 TCP stream, received
//! rate), `udp64_pps` (iperf3 UDP with 64-byte datagrams and no rate limit,
//! datagrams received per second), `ping_p50_us` (median round trip of
//! pings every 10 ms). With several rounds each side's value is the median
//! of its runs. Details without ratio lines: TCP retransmits, UDP sent rate
//! and loss, ping p90, CPU use during each run (the machine's, and each
//! nodeos process's), the nodeos ports' counters and the nodes' WARN/ERROR
//! lines. Ends with one `ratio <metric> <nodeos/linux>` line per metric
//! (for latency too: above 1 means nodeos is slower).
//!
//! Environment: `NODEOS_BIN` (default target/release/nodeos),
//! `BENCH_SWITCH_SECS` (seconds per iperf3 run, default 10),
//! `BENCH_SWITCH_PINGS` (pings per run, default 200), `BENCH_SWITCH_ROUNDS`
//! (runs per metric and side, default 1). Needs root, `ip`, `bridge`,
//! `iperf3`, `ping` or `busybox`, and kernel bridge, vxlan, veth and tun
//! support; without one of them it prints `SKIPPED: ...` and exits 2.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use nodeos_bench::block::peer::version_of;
use nodeos_bench::block::problems;
use nodeos_bench::fmt_ratio;
use nodeos_bench::switch::kernel::{KernelSide, add_vxlan};
use nodeos_bench::switch::measure::{self, CpuUse, CpuWatch, PingTool, median};
use nodeos_bench::switch::ours::{self, OurSide};
use nodeos_bench::switch::topo::{self, Netns};
use nodeos_bench::switch::{Ends, ip};
use nodeos_bench::vmm::find_program;
use tokio::time::Instant;

const REACH_LIMIT: Duration = Duration::from_secs(30);

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// The external programs.
#[derive(Debug)]
struct Tools {
    iperf3: PathBuf,
    ping: PingTool,
}

#[derive(Debug)]
struct Config {
    secs: u64,
    pings: usize,
    rounds: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    Tcp,
    Udp,
    Ping,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Tcp => "tcp_gbit_per_s",
            Metric::Udp => "udp64_pps",
            Metric::Ping => "ping_p50_us",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Metric::Tcp => "Gbit/s",
            Metric::Udp => "pps",
            Metric::Ping => "us",
        }
    }

    fn lower_is_better(self) -> bool {
        self == Metric::Ping
    }
}

/// What one run measured: the headline value and named details.
#[derive(Debug, Clone)]
struct Run {
    value: f64,
    details: Vec<(String, &'static str, f64)>,
    /// One line for the log of runs.
    line: String,
}

/// One row of the final table.
#[derive(Debug)]
struct Row {
    name: String,
    unit: &'static str,
    lower_is_better: bool,
    ours: f64,
    peer: f64,
}

fn cpu_text(cpu: &CpuUse) -> String {
    let mut s = format!("machine {:.2} CPUs busy", cpu.machine_busy);
    if !cpu.procs.is_empty() {
        let each: Vec<String> = cpu.procs.iter().enumerate().map(|(i, c)| format!("n{i} {c:.2}")).collect();
        s.push_str(&format!(", nodeos {}", each.join(" ")));
    }
    s
}

/// One run of `metric` on one side; `pids` are the processes whose CPU use
/// is reported (the nodeos nodes on our side).
async fn one_run(
    metric: Metric,
    ends: &Ends,
    pids: &[u32],
    tools: &Tools,
    cfg: &Config,
    dir: &Path,
    label: &str,
) -> anyhow::Result<Run> {
    let drops = measure::drop_counters(ends);
    let cpu = CpuWatch::start(pids);
    let mut details = Vec::new();
    let (value, what) = match metric {
        Metric::Tcp => {
            let r = measure::tcp(&tools.iperf3, ends, cfg.secs, dir, label).await?;
            let retr = r.retransmits.map_or(f64::NAN, |n| n as f64);
            details.push(("tcp_retransmits".to_owned(), "segments", retr));
            (r.gbit_per_s, format!("{:>8.3} Gbit/s received, {} retransmits", r.gbit_per_s, retr))
        }
        Metric::Udp => {
            let r = measure::udp64(&tools.iperf3, ends, cfg.secs, dir, label).await?;
            details.push(("udp64_sent_pps".to_owned(), "pps", r.sent_pps));
            details.push(("udp64_lost_percent".to_owned(), "%", r.lost_percent));
            (
                r.received_pps,
                format!(
                    "{:>9.0} pps received, {:.0} pps sent, {:.1} % lost",
                    r.received_pps, r.sent_pps, r.lost_percent
                ),
            )
        }
        Metric::Ping => {
            let r = measure::ping(&tools.ping, ends, cfg.pings).await?;
            details.push(("ping_p90_us".to_owned(), "us", r.percentile_us(90.0)));
            (
                r.p50_us(),
                format!(
                    "p50 {:>7.1} us, p90 {:.1} us, min {:.1} us, max {:.1} us, {} of {} replies",
                    r.p50_us(),
                    r.percentile_us(90.0),
                    r.percentile_us(0.0),
                    r.percentile_us(100.0),
                    r.rtts_us.len(),
                    r.sent
                ),
            )
        }
    };
    let cpu = cpu.stop();
    details.push((format!("{}_machine_cpus", metric_short(metric)), "CPUs", cpu.machine_busy));
    if !cpu.procs.is_empty() {
        details.push((format!("{}_nodeos_cpus", metric_short(metric)), "CPUs", cpu.procs.iter().sum()));
    }
    let drops = measure::grown(&drops, &measure::drop_counters(ends));
    Ok(Run { value, details, line: format!("{what}; {}; drops: {drops}", cpu_text(&cpu)) })
}

fn metric_short(m: Metric) -> &'static str {
    match m {
        Metric::Tcp => "tcp",
        Metric::Udp => "udp64",
        Metric::Ping => "ping",
    }
}

/// Pings until C0 reaches C1 on this side.
async fn wait_reachable(tools: &Tools, ends: &Ends) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while !measure::reachable(&tools.ping, ends).await? {
        if t.elapsed() >= REACH_LIMIT {
            bail!("{}: {} cannot reach {} after {REACH_LIMIT:?}", ends.side, ends.ips[0], ends.ips[1]);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(t.elapsed())
}

/// The WARN/ERROR lines of both nodes' logs, grouped by node, level,
/// target and the message's first words, most frequent first, with the
/// first line of each group.
fn log_summary(ours: &OurSide) -> String {
    // (key, count, first line)
    let mut groups: Vec<(String, usize, String)> = Vec::new();
    for i in 0..2 {
        let text = std::fs::read_to_string(ours.log_path(i)).unwrap_or_default();
        for line in problems(&text, &[]) {
            // "<time> <LEVEL> <target>: <message> key=value ..."
            let words: Vec<&str> = line.split_whitespace().skip(1).take(6).collect();
            let key = format!("n{i} {}", words.join(" "));
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => g.1 += 1,
                None => {
                    groups.push((key, 1, format!("n{i}: {}", line.chars().take(400).collect::<String>())))
                }
            }
        }
    }
    if groups.is_empty() {
        return "no WARN/ERROR lines".into();
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.1));
    let total: usize = groups.iter().map(|g| g.1).sum();
    let shown: Vec<String> = groups.iter().take(8).map(|(_, n, first)| format!("{n:>5} x {first}")).collect();
    format!(
        "{total} WARN/ERROR line(s) in {} kind(s), most frequent:\n  {}",
        groups.len(),
        shown.join("\n  ")
    )
}

/// One JSON value on one line, cut at `max` characters.
fn compact(v: &serde_json::Value, max: usize) -> String {
    let s = v.to_string();
    if s.chars().count() > max { format!("{}...", s.chars().take(max).collect::<String>()) } else { s }
}

async fn run(bin: PathBuf, tools: Tools) -> anyhow::Result<()> {
    let cfg = Config {
        secs: env_u64("BENCH_SWITCH_SECS", 10)?.max(1),
        pings: env_u64("BENCH_SWITCH_PINGS", 200)?.max(1) as usize,
        rounds: env_u64("BENCH_SWITCH_ROUNDS", 1)?.max(1) as usize,
    };
    let began = Instant::now();
    let stale = topo::remove_stale()?;
    if !stale.is_empty() {
        println!(
            "removed {} namespace(s) of an earlier run that was killed: {}",
            stale.len(),
            stale.join(" ")
        );
    }
    let dir = tempfile::Builder::new().prefix("bench-switch-").tempdir().context("creating a temp dir")?;

    println!("== bench-switch: nodeos switch (userspace, VXLAN between nodes) vs Linux bridge + vxlan ==");
    println!("nodeos:  {}", bin.display());
    println!("iperf3:  {} ({})", tools.iperf3.display(), version_of(&tools.iperf3, "--version"));
    println!("ping:    {}", tools.ping.describe());
    println!("kernel:  {}", std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim());
    println!(
        "cpus: {}; every process of both sides shares them; logs and iperf3 reports under {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dir.path().display()
    );
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at start: {} (other work on this machine skews both sides)", l.trim());
    }
    let tcp_cmd = measure::tcp_args(cfg.secs).join(" ");
    let udp_cmd = measure::udp_args(cfg.secs).join(" ");
    println!(
        "runs (client 0 -> client 1, server `iperf3 -s -1` in client 1): `iperf3 -c <c1> {tcp_cmd}`, \
         `iperf3 -c <c1> {udp_cmd}`, `ping -c {} -i 0.01 -W 2 <c1>`; {} round(s), the side going first alternates",
        cfg.pings, cfg.rounds
    );
    println!();

    let t = Instant::now();
    let peer = KernelSide::build()?;
    println!(
        "linux:  namespaces {}..{}: br0 + vx0 (vxlan id 100 dstport 4789 nolearning, fdb 00:00:00:00:00:00 -> \
         the other node) + veth to the client; clients {} and {}, MTU 1450 (built in {:.2} s)",
        peer.topo.node(0),
        peer.topo.client(1),
        kernel_ip(&peer, 0),
        kernel_ip(&peer, 1),
        t.elapsed().as_secs_f64()
    );
    let mut ours = OurSide::build(&bin, dir.path()).await?;
    println!(
        "nodeos: namespaces {}..{}: 2-node pool formed in {:.1} s (nodes {} and {}); security group with \
         `ingress any` (and the default egress); network {}; tap ports {} ({}, {}) and {} ({}, {}), MTU 1450",
        ours.topo.node(0),
        ours.topo.client(1),
        ours.formed_in.as_secs_f64(),
        ours.node_ids[0],
        ours.node_ids[1],
        ours::CIDR,
        ours.ports[0].id,
        ours.ports[0].ip,
        ours.ports[0].mac,
        ours.ports[1].id,
        ours.ports[1].ip,
        ours.ports[1].mac
    );
    let (peer_ends, our_ends) = (peer.ends(), ours.ends());
    let p = wait_reachable(&tools, &peer_ends).await?;
    let o = wait_reachable(&tools, &our_ends).await.map_err(|e| e.context(log_summary(&ours)))?;
    println!("first ping answered after {:.2} s (linux), {:.2} s (nodeos)", p.as_secs_f64(), o.as_secs_f64());
    println!();

    // (metric, nodeos runs, linux runs)
    let metrics = [Metric::Tcp, Metric::Udp, Metric::Ping];
    let mut runs: Vec<(Metric, Vec<Run>, Vec<Run>)> =
        metrics.iter().map(|m| (*m, Vec::new(), Vec::new())).collect();
    let mut pair = 0usize;
    for round in 1..=cfg.rounds {
        for (metric, our_runs, peer_runs) in runs.iter_mut() {
            let sides = if pair.is_multiple_of(2) { [false, true] } else { [true, false] };
            pair += 1;
            for nodeos_side in sides {
                let label = format!("{}-r{round}", metric_short(*metric));
                let r = if nodeos_side {
                    let pids = ours.pids();
                    let r =
                        one_run(*metric, &our_ends, &pids, &tools, &cfg, dir.path(), &label).await.map_err(
                            |e| e.context(format!("nodeos {}; {}", metric.name(), log_summary(&ours))),
                        )?;
                    ours.check_running()?;
                    r
                } else {
                    one_run(*metric, &peer_ends, &[], &tools, &cfg, dir.path(), &label)
                        .await
                        .with_context(|| format!("linux {}", metric.name()))?
                };
                println!(
                    "{:<6} round {round}  {:<6}  {}",
                    metric_short(*metric),
                    if nodeos_side { "nodeos" } else { "linux" },
                    r.line
                );
                if nodeos_side { our_runs.push(r) } else { peer_runs.push(r) }
            }
        }
    }
    println!();

    for (i, p) in ours.ports.iter().enumerate() {
        match ours.cli(i, &["port", "show", &p.id]).await {
            Ok(v) => println!("nodeos port {} (n{i}) counters: {}", p.id, compact(&v["stats"], 400)),
            Err(e) => println!("nodeos port {} (n{i}): `port show` failed: {e:#}", p.id),
        }
    }
    for i in 0..2 {
        match ours.cli(i, &["switch", "show"]).await {
            Ok(v) => println!("nodeos n{i} switch show: {}", compact(&v, 600)),
            Err(e) => println!("nodeos n{i}: `switch show` failed: {e:#}"),
        }
    }
    println!("nodeos logs: {}", log_summary(&ours));
    println!();

    let mut head = Vec::new();
    let mut rest: Vec<Row> = Vec::new();
    for (metric, our_runs, peer_runs) in &runs {
        let vals = |rs: &[Run]| median(&rs.iter().map(|r| r.value).collect::<Vec<_>>());
        head.push(Row {
            name: metric.name().into(),
            unit: metric.unit(),
            lower_is_better: metric.lower_is_better(),
            ours: vals(our_runs),
            peer: vals(peer_runs),
        });
        let Some(first) = our_runs.first() else { continue };
        for (k, (name, unit, _)) in first.details.iter().enumerate() {
            let detail = |rs: &[Run]| {
                median(&rs.iter().filter_map(|r| r.details.get(k).map(|d| d.2)).collect::<Vec<_>>())
            };
            let peer = if name.ends_with("_nodeos_cpus") { f64::NAN } else { detail(peer_runs) };
            let lower = !name.ends_with("_pps");
            rest.push(Row { name: name.clone(), unit, lower_is_better: lower, ours: detail(our_runs), peer });
        }
    }
    println!("{:<32} {:>14} {:>14} {:>12}  better", "metric", "nodeos", "linux", "nodeos/linux");
    for r in head.iter().chain(rest.iter()) {
        println!(
            "{:<32} {:>14.3} {:>14.3} {:>12}  {}",
            format!("{} [{}]", r.name, r.unit),
            r.ours,
            r.peer,
            fmt_ratio(r.ours / r.peer),
            if r.lower_is_better { "lower" } else { "higher" }
        );
    }
    println!(
        "(rows after ping_p50_us are details without ratio lines; {}; total benchmark time {:.0} s)",
        if cfg.rounds > 1 { "medians over the rounds" } else { "one run per side" },
        began.elapsed().as_secs_f64()
    );
    println!();
    for r in &head {
        println!("ratio {} {}", r.name, fmt_ratio(r.ours / r.peer));
    }
    Ok(())
}

fn kernel_ip(k: &KernelSide, i: usize) -> String {
    k.ends().ips[i].clone()
}

fn skipped(why: &str) -> ExitCode {
    let msg = format!("SKIPPED: bench-switch: {why}");
    println!("{msg}");
    eprintln!("{msg}");
    ExitCode::from(2)
}

/// Whether this kernel lets us make what both sides need; `Err` says what not.
fn probe_kernel() -> anyhow::Result<()> {
    let ns = Netns::create(topo::name('p', 'n', 0)).context("network namespaces")?;
    let n = ns.name();
    ip(&["-n", n, "link", "add", "br0", "type", "bridge"]).context("Linux bridges")?;
    add_vxlan(n, "1", "10.88.0.1").context("vxlan devices")?;
    ip(&["-n", n, "link", "add", "v0", "type", "veth", "peer", "name", "v1"]).context("veth pairs")?;
    ip(&["-n", n, "tuntap", "add", "t0", "mode", "tap"]).context("tap devices")?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return skipped("needs root (it makes network namespaces)");
    }
    for tool in ["ip", "bridge", "iperf3"] {
        if find_program(tool).is_none() {
            return skipped(&format!("{tool} not installed (apt install iproute2 iperf3)"));
        }
    }
    let ping = match (find_program("ping"), find_program("busybox")) {
        (Some(p), _) => PingTool::Iputils(p),
        (None, Some(b)) => PingTool::Busybox(b),
        (None, None) => return skipped("neither ping nor busybox installed (apt install iputils-ping)"),
    };
    if let Err(e) = probe_kernel() {
        return skipped(&format!("the kernel refuses {e:#}"));
    }
    let tools = Tools { iperf3: find_program("iperf3").expect("looked up above"), ping };
    let bin =
        std::env::var_os("NODEOS_BIN").map_or_else(|| PathBuf::from("target/release/nodeos"), PathBuf::from);
    let bin = match bin.canonicalize() {
        Ok(b) if b.is_file() => b,
        _ => {
            eprintln!(
                "bench-switch: FAILED: nodeos binary {} not found (set NODEOS_BIN or run `make release`)",
                bin.display()
            );
            return ExitCode::FAILURE;
        }
    };
    nodeos_bench::proc::run_until_signal("bench-switch", run(bin, tools)).await
}
