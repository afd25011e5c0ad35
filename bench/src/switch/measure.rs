//! The measurements, the same on both sides, always from client C0 to
//! client C1: one iperf3 TCP stream (`-t SECS`), one iperf3 UDP stream of
//! 64-byte datagrams at no rate limit (`-u -l 64 -b 0`), and `ping`
//! (iputils if installed, else busybox) every 10 ms; each iperf3 server is
//! a fresh `iperf3 -s -1` in C1. CPU use is read from `/proc` around each run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::time::Instant;

use super::{Ends, exec_in, ip, text};
use crate::block::wait_exit;
use crate::proc::ChildGuard;

/// Which `ping` both sides use.
#[derive(Debug, Clone)]
pub enum PingTool {
    Iputils(PathBuf),
    Busybox(PathBuf),
}

impl PingTool {
    /// The program and its leading arguments.
    fn command(&self) -> (String, Vec<String>) {
        match self {
            PingTool::Iputils(p) => (p.display().to_string(), Vec::new()),
            PingTool::Busybox(p) => (p.display().to_string(), vec!["ping".into()]),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PingTool::Iputils(p) => format!("{} (iputils)", p.display()),
            PingTool::Busybox(p) => format!("{} ping", p.display()),
        }
    }
}

/// One TCP run.
#[derive(Debug, Clone, Copy)]
pub struct TcpResult {
    /// Received bits per second, in Gbit/s.
    pub gbit_per_s: f64,
    /// The sender's retransmitted segments, if iperf3 reports them.
    pub retransmits: Option<u64>,
}

/// One UDP run.
#[derive(Debug, Clone, Copy)]
pub struct UdpResult {
    /// Datagrams the server received per second.
    pub received_pps: f64,
    /// Datagrams the client sent per second.
    pub sent_pps: f64,
    /// Share of sent datagrams not received, percent.
    pub lost_percent: f64,
}

/// One ping run.
#[derive(Debug, Clone)]
pub struct PingResult {
    pub sent: usize,
    /// Round-trip times of the replies, microseconds, sorted.
    pub rtts_us: Vec<f64>,
}

impl PingResult {
    pub fn p50_us(&self) -> f64 {
        median(&self.rtts_us)
    }

    /// Nearest-rank percentile `p` (0..=100) of the round-trip times.
    pub fn percentile_us(&self, p: f64) -> f64 {
        let n = self.rtts_us.len();
        if n == 0 {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.rtts_us[rank.clamp(1, n) - 1]
    }
}

/// The median of `xs` (mean of the middle two for an even count); NaN when empty.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if !n.is_multiple_of(2) => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `iperf3 -s -1` in C1 on its client address, listening once it returns.
async fn server(bin: &Path, ends: &Ends, log: &Path) -> anyhow::Result<ChildGuard> {
    let mut cmd = Command::new("ip");
    // --forceflush: the banner waited for below reaches the log file at once.
    cmd.args(["netns", "exec", &ends.clients[1]]).arg(bin).args([
        "-s",
        "-1",
        "--forceflush",
        "-B",
        &ends.ips[1],
    ]);
    let mut server = ChildGuard::spawn(format!("iperf3 -s ({})", ends.side), cmd, log)?;
    // A bare connect would count as the server's one test; wait for its banner instead.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(log).is_ok_and(|s| s.contains("Server listening")) {
        server.check_running()?;
        if Instant::now() >= deadline {
            bail!("iperf3 -s did not start listening; log:\n{}", server.log_tail(10));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(server)
}

/// One iperf3 client run from C0 to C1 with `args` after `-c <C1>`; its JSON report.
async fn iperf3(
    bin: &Path,
    ends: &Ends,
    args: &[&str],
    secs: u64,
    dir: &Path,
    label: &str,
) -> anyhow::Result<Value> {
    let _server = server(bin, ends, &dir.join(format!("iperf3-s-{}-{label}.log", ends.side))).await?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ends.clients[0]]).arg(bin).args(["-c", &ends.ips[1]]).args(args);
    let report = dir.join(format!("iperf3-c-{}-{label}.json", ends.side));
    let mut client = ChildGuard::spawn(format!("iperf3 -c ({})", ends.side), cmd, &report)?;
    let st = wait_exit(&mut client, Duration::from_secs(secs + 30)).await?;
    let text = std::fs::read_to_string(&report).with_context(|| format!("reading {}", report.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("iperf3's report is not JSON ({st}): {}", text.trim()))?;
    if !st.success() || v.get("error").is_some() {
        bail!("iperf3 -c {} {} failed ({st}): {}", ends.ips[1], args.join(" "), v["error"]);
    }
    Ok(v)
}

/// The iperf3 arguments of the TCP run.
pub fn tcp_args(secs: u64) -> Vec<String> {
    ["-t", &secs.to_string(), "-J"].map(String::from).to_vec()
}

/// The iperf3 arguments of the UDP run.
pub fn udp_args(secs: u64) -> Vec<String> {
    ["-u", "-l", "64", "-b", "0", "-t", &secs.to_string(), "-J"].map(String::from).to_vec()
}

pub async fn tcp(bin: &Path, ends: &Ends, secs: u64, dir: &Path, label: &str) -> anyhow::Result<TcpResult> {
    let args = tcp_args(secs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    parse_tcp(&iperf3(bin, ends, &args, secs, dir, label).await?)
}

pub async fn udp64(bin: &Path, ends: &Ends, secs: u64, dir: &Path, label: &str) -> anyhow::Result<UdpResult> {
    let args = udp_args(secs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    parse_udp(&iperf3(bin, ends, &args, secs, dir, label).await?)
}

/// `end.sum_received.bits_per_second` and the sender's retransmits.
pub fn parse_tcp(v: &Value) -> anyhow::Result<TcpResult> {
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3: no end.sum_received.bits_per_second in {}", v["end"]))?;
    Ok(TcpResult { gbit_per_s: bps / 1e9, retransmits: v["end"]["sum_sent"]["retransmits"].as_u64() })
}

/// Received datagrams per second: `packets - lost_packets` over `seconds`
/// of the server's view (`end.sum_received`, iperf3 >= 3.11), else of
/// `end.sum` (which carries the server's loss count in older versions).
pub fn parse_udp(v: &Value) -> anyhow::Result<UdpResult> {
    let end = &v["end"];
    let sum = if end["sum_received"]["packets"].is_u64() { &end["sum_received"] } else { &end["sum"] };
    let field = |k: &str| sum[k].as_f64().with_context(|| format!("iperf3: no {k} in the UDP summary {sum}"));
    let (packets, lost, secs) = (field("packets")?, field("lost_packets")?, field("seconds")?);
    if secs <= 0.0 {
        bail!("iperf3: a UDP run of {secs} s");
    }
    let sent =
        end["sum_sent"]["packets"].as_f64().or_else(|| end["sum"]["packets"].as_f64()).unwrap_or(packets);
    let sent_secs = end["sum_sent"]["seconds"].as_f64().unwrap_or(secs);
    Ok(UdpResult {
        received_pps: (packets - lost).max(0.0) / secs,
        sent_pps: sent / sent_secs,
        lost_percent: if packets > 0.0 { 100.0 * lost / packets } else { 0.0 },
    })
}

/// `count` pings from C0 to C1 every 10 ms.
pub async fn ping(tool: &PingTool, ends: &Ends, count: usize) -> anyhow::Result<PingResult> {
    let (prog, mut args) = tool.command();
    args.extend(["-c", &count.to_string(), "-i", "0.01", "-W", "2", &ends.ips[1]].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let limit = Duration::from_secs(count as u64 / 50 + 20);
    let out = exec_in(&ends.clients[0], &prog, &args, limit).await?;
    let mut rtts_us = parse_ping(&String::from_utf8_lossy(&out.stdout));
    if rtts_us.is_empty() {
        bail!(
            "ping {} from {} got no replies ({}): {}",
            ends.ips[1],
            ends.clients[0],
            out.status,
            text(&out)
        );
    }
    rtts_us.sort_by(f64::total_cmp);
    Ok(PingResult { sent: count, rtts_us })
}

/// Whether C0 reaches C1 (a few pings; also fills both ARP caches).
pub async fn reachable(tool: &PingTool, ends: &Ends) -> anyhow::Result<bool> {
    let (prog, mut args) = tool.command();
    args.extend(["-c", "2", "-W", "1", &ends.ips[1]].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = exec_in(&ends.clients[0], &prog, &args, Duration::from_secs(10)).await?;
    Ok(!parse_ping(&String::from_utf8_lossy(&out.stdout)).is_empty())
}

/// Round-trip times (microseconds) of the reply lines of ping's output
/// (`... time=0.073 ms`, busybox and iputils alike).
pub fn parse_ping(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| {
            let t = l.split_once("time=")?.1;
            let (num, unit) = t.trim().split_once(' ').unwrap_or((t.trim(), "ms"));
            let x: f64 = num.parse().ok()?;
            match unit.trim() {
                "ms" => Some(x * 1e3),
                "us" | "µs" => Some(x),
                "s" => Some(x * 1e6),
                _ => None,
            }
        })
        .collect()
}

/// Drop and error counters of one side that should stay at zero: every
/// link's rx/tx drops in its four namespaces (a tap's tx drops are frames
/// its reader, the switch, did not take in time) and the UDP receive errors
/// of the node namespaces (tunnel datagrams a full socket buffer refused).
/// Keys are `<ns role> <what>`, e.g. `c0 tb0 tx_dropped`, `n1 udp RcvbufErrors`.
pub fn drop_counters(ends: &Ends) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let spaces = ends.nodes.iter().map(|n| (n, 'n')).chain(ends.clients.iter().map(|c| (c, 'c')));
    for (k, (ns, role)) in spaces.enumerate() {
        let who = format!("{role}{}", k % 2);
        let links: Value = ip(&["-n", ns, "-j", "-s", "link", "show"])
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        for l in links.as_array().into_iter().flatten() {
            let name = l["ifname"].as_str().unwrap_or("?");
            for dir in ["rx", "tx"] {
                for what in ["dropped", "errors"] {
                    if let Some(n) = l["stats64"][dir][what].as_u64() {
                        out.insert(format!("{who} {name} {dir}_{what}"), n);
                    }
                }
            }
        }
        if role == 'n'
            && let Ok(snmp) = super::run("ip", &["netns", "exec", ns, "cat", "/proc/net/snmp"])
        {
            let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp: ")).collect();
            if let [names, values] = udp[..] {
                for (n, v) in names.split_whitespace().zip(values.split_whitespace()).skip(1) {
                    if matches!(n, "InErrors" | "RcvbufErrors" | "SndbufErrors" | "MemErrors")
                        && let Ok(v) = v.parse()
                    {
                        out.insert(format!("{who} udp {n}"), v);
                    }
                }
            }
        }
    }
    out
}

/// The counters that grew from `before` to `after`, as `key +n, ...`
/// (`none` if none did).
pub fn grown(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let grew: Vec<String> = after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| format!("{k} +{d}"))
        })
        .collect();
    if grew.is_empty() { "none".into() } else { grew.join(", ") }
}

/// Seconds of CPU a process has used (user + system), from `/proc/PID/stat`.
pub fn process_cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces; fields resume after its ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        f.get(i).and_then(|s| s.parse::<u64>().ok()).map(|t| t as f64).context("a short /proc/PID/stat")
    };
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf(3) takes no pointers.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// The machine's CPU time so far (from `/proc/stat`): (busy, total), seconds.
pub fn machine_cpu_secs() -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().find(|l| l.starts_with("cpu ")).context("no cpu line in /proc/stat")?;
    let v: Vec<f64> = line.split_whitespace().skip(1).take(8).filter_map(|s| s.parse().ok()).collect();
    if v.len() < 5 {
        bail!("a short cpu line in /proc/stat: {line}");
    }
    let total: f64 = v.iter().sum();
    // idle and iowait are the 4th and 5th columns.
    Ok(((total - v[3] - v[4]) / clock_ticks(), total / clock_ticks()))
}

/// CPU use over one run: the whole machine and some processes.
#[derive(Debug, Clone)]
pub struct CpuWatch {
    machine: (f64, f64),
    procs: Vec<(u32, f64)>,
    t: Instant,
}

/// What a [`CpuWatch`] saw, in CPUs (1.0 = one CPU busy all the time).
#[derive(Debug, Clone)]
pub struct CpuUse {
    pub machine_busy: f64,
    pub procs: Vec<f64>,
}

impl CpuWatch {
    pub fn start(pids: &[u32]) -> Self {
        let procs = pids.iter().map(|&p| (p, process_cpu_secs(p).unwrap_or(f64::NAN))).collect();
        CpuWatch { machine: machine_cpu_secs().unwrap_or((f64::NAN, f64::NAN)), procs, t: Instant::now() }
    }

    pub fn stop(&self) -> CpuUse {
        let wall = self.t.elapsed().as_secs_f64();
        let (busy, total) = machine_cpu_secs().unwrap_or((f64::NAN, f64::NAN));
        let cpus = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        CpuUse {
            machine_busy: (busy - self.machine.0) / (total - self.machine.1) * cpus,
            procs: self
                .procs
                .iter()
                .map(|&(p, before)| (process_cpu_secs(p).unwrap_or(f64::NAN) - before) / wall)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_replies_of_busybox_and_iputils_parse() {
        let out = "PING 10.89.0.2 (10.89.0.2): 56 data bytes\n\
                   64 bytes from 10.89.0.2: seq=0 ttl=64 time=0.073 ms\n\
                   64 bytes from 10.89.0.2: icmp_seq=2 ttl=64 time=1.25 ms\n\
                   \n--- 10.89.0.2 ping statistics ---\n\
                   round-trip min/avg/max = 0.057/0.062/0.073 ms\n";
        let rtts = parse_ping(out);
        assert_eq!(rtts.len(), 2);
        assert!((rtts[0] - 73.0).abs() < 1e-9 && (rtts[1] - 1250.0).abs() < 1e-9, "{rtts:?}");
        assert!(parse_ping("no answer\n").is_empty());
    }

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let p = PingResult { sent: 10, rtts_us: (1..=10).map(f64::from).collect() };
        assert_eq!((p.percentile_us(90.0), p.percentile_us(100.0), p.percentile_us(0.0)), (9.0, 10.0, 1.0));
    }

    #[test]
    fn udp_received_rate_comes_from_the_servers_view() {
        // The shape of iperf3 3.12's report (numbers from a real run).
        let v = serde_json::json!({"end": {
            "sum": {"seconds": 2.0, "packets": 578320, "lost_packets": 88078, "lost_percent": 15.2},
            "sum_sent": {"seconds": 2.0, "packets": 578320, "lost_packets": 0},
            "sum_received": {"seconds": 2.0, "packets": 578314, "lost_packets": 88078}
        }});
        let u = parse_udp(&v).unwrap();
        assert_eq!(u.received_pps, (578314.0 - 88078.0) / 2.0);
        assert_eq!(u.sent_pps, 578320.0 / 2.0);
        // Older reports: `end.sum` only.
        let old = serde_json::json!({"end": {"sum": {"seconds": 4.0, "packets": 400, "lost_packets": 100}}});
        assert_eq!(parse_udp(&old).unwrap().received_pps, 75.0);
        assert!(parse_udp(&serde_json::json!({"end": {}})).is_err());
        let tcp = serde_json::json!({"end": {"sum_received": {"bits_per_second": 2.5e9}, "sum_sent": {"retransmits": 3}}});
        let t = parse_tcp(&tcp).unwrap();
        assert_eq!((t.gbit_per_s, t.retransmits), (2.5, Some(3)));
    }
}
