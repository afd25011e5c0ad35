//! One fio job against an NBD export (`--ioengine=nbd --uri=nbd://...`),
//! run to completion, with its JSON report (`--output-format=json`) parsed.
//!
//! Both sides of the benchmark get byte-identical command lines apart from
//! the URI, so fio's random offsets (default seeds) are the same too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use super::wait_exit;
use crate::proc::ChildGuard;

/// What a job does.
#[derive(Debug, Clone)]
pub struct FioJob {
    /// Short label: job name and file names.
    pub name: String,
    /// fio `rw`: write, randwrite, randread, ...
    pub rw: &'static str,
    /// Bytes per I/O.
    pub bs: u64,
    pub iodepth: u32,
    /// The region, from offset 0, bytes.
    pub size: u64,
    /// `Some`: time based, this long after `ramp`; `None`: one pass over the region.
    pub runtime: Option<Duration>,
    /// Not measured, before `runtime` (time-based jobs only).
    pub ramp: Duration,
}

impl FioJob {
    /// fio's arguments for `uri`, writing its JSON report to `out`.
    pub fn args(&self, uri: &str, out: &Path) -> Vec<String> {
        let mut a = vec![
            format!("--name={}", self.name),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            format!("--rw={}", self.rw),
            format!("--bs={}", self.bs),
            format!("--iodepth={}", self.iodepth),
            format!("--size={}", self.size),
            "--output-format=json".into(),
            format!("--output={}", out.display()),
        ];
        if let Some(rt) = self.runtime {
            a.push("--time_based".into());
            a.push(format!("--runtime={}ms", rt.as_millis()));
            if !self.ramp.is_zero() {
                a.push(format!("--ramp_time={}ms", self.ramp.as_millis()));
            }
        }
        a
    }

    /// Whether fio reports this job under "read" (else "write").
    fn reads(&self) -> bool {
        self.rw.contains("read")
    }
}

/// The measured part of one job.
#[derive(Debug, Clone, Copy)]
pub struct FioResult {
    pub iops: f64,
    pub mib_per_s: f64,
    /// Completion latency percentiles, microseconds.
    pub clat_p50_us: f64,
    pub clat_p99_us: f64,
    pub ios: u64,
    pub runtime_ms: u64,
}

/// Runs `job` against `uri` with the fio at `fio`; reports and logs go under `dir`.
pub async fn run(fio: &Path, uri: &str, job: &FioJob, dir: &Path, tag: &str) -> anyhow::Result<FioResult> {
    let out: PathBuf = dir.join(format!("fio-{tag}-{}.json", job.name));
    let mut cmd = Command::new(fio);
    cmd.args(job.args(uri, &out));
    let mut child = ChildGuard::spawn(
        format!("fio {tag} {}", job.name),
        cmd,
        &dir.join(format!("fio-{tag}-{}.log", job.name)),
    )?;
    // A one-pass job over the region is bounded by the slowest side's bandwidth.
    let limit = job.runtime.map_or(Duration::from_secs(300), |rt| rt + job.ramp + Duration::from_secs(60));
    let st = wait_exit(&mut child, limit).await?;
    if !st.success() {
        bail!("{} failed ({st}); log:\n{}", child.name(), child.log_tail(20));
    }
    let text = std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    parse(&text, job.reads())
        .with_context(|| format!("parsing {}; log:\n{}", out.display(), child.log_tail(20)))
}

/// The first job's figures from a fio JSON report.
pub fn parse(text: &str, reads: bool) -> anyhow::Result<FioResult> {
    // Some engines print a line before the JSON document.
    let start = text.find('{').context("no JSON object in fio's report")?;
    let v: Value = serde_json::from_str(&text[start..]).context("fio's report is not JSON")?;
    let job = &v["jobs"][0];
    if job.is_null() {
        bail!("fio's report has no job");
    }
    let err = job["error"].as_i64().unwrap_or(0);
    if err != 0 {
        bail!("fio's job ended with error {err}");
    }
    let side = &job[if reads { "read" } else { "write" }];
    let ios = side["total_ios"].as_u64().context("no total_ios")?;
    if ios == 0 {
        bail!("fio's job did no I/O");
    }
    let pct = |p: &str| -> anyhow::Result<f64> {
        let ns =
            side["clat_ns"]["percentile"][p].as_f64().with_context(|| format!("no clat percentile {p}"))?;
        Ok(ns / 1e3)
    };
    Ok(FioResult {
        iops: side["iops"].as_f64().context("no iops")?,
        mib_per_s: side["bw_bytes"].as_f64().context("no bw_bytes")? / 1048576.0,
        clat_p50_us: pct("50.000000")?,
        clat_p99_us: pct("99.000000")?,
        ios,
        runtime_ms: side["runtime"].as_u64().unwrap_or(0),
    })
}

/// Whether this fio has the nbd ioengine (it is optional, built with libnbd).
pub fn has_nbd_engine(fio: &Path) -> bool {
    Command::new(fio)
        .arg("--enghelp")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().any(|w| w == "nbd"))
}

/// fio's version line.
pub fn version(fio: &Path) -> String {
    Command::new(fio)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("version unknown: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"fio: connected to NBD server
{"jobs": [{"jobname": "x", "error": 0,
  "read": {"total_ios": 0, "iops": 0.0, "bw_bytes": 0, "runtime": 0, "clat_ns": {}},
  "write": {"total_ios": 1000, "iops": 2500.5, "bw_bytes": 10242048, "runtime": 10000,
            "clat_ns": {"percentile": {"50.000000": 366592, "99.000000": 1200000}}}}]}"#;

    #[test]
    fn parses_write_side_after_a_banner() {
        let r = parse(REPORT, false).expect("parses");
        assert_eq!(r.ios, 1000);
        assert!((r.iops - 2500.5).abs() < 1e-9);
        assert!((r.clat_p50_us - 366.592).abs() < 1e-9);
        assert!((r.mib_per_s - 9.767578125).abs() < 1e-9);
    }

    #[test]
    fn a_side_without_io_is_an_error() {
        assert!(parse(REPORT, true).is_err());
    }
}
