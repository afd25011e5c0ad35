//! Block benchmark (`bench-block`): nodeos volumes served over NBD against
//! `qemu-nbd` serving a local raw file, both driven by the same fio jobs; and
//! re-replication of a killed node's copies against plain loopback TCP.
//!
//! # Layout
//! - [`fio`]: one fio job over NBD (`ioengine=nbd`), its JSON result.
//! - [`peer`]: the peers: `qemu-nbd` on a raw file, loopback TCP throughput
//!   (`iperf3`, or a tokio copy when iperf3 is missing).
//! - [`volume`]: volumes through `VolumeService` (create, records, copy
//!   health) and the nodes' `copies repaired` log lines.
//!
//! Every external program runs under a [`ChildGuard`], so it is killed when
//! the benchmark fails or is interrupted.

pub mod fio;
pub mod peer;
pub mod volume;

use std::process::ExitStatus;
use std::time::Duration;

use anyhow::bail;

use crate::proc::ChildGuard;

/// Waits for `child` to exit on its own; fails (killing it on drop) after `limit`.
pub async fn wait_exit(child: &mut ChildGuard, limit: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{} did not finish within {limit:?}; log:\n{}", child.name(), child.log_tail(20));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Mebibytes.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// `s` without ANSI colour sequences (ESC '[' ... final letter); node logs
/// are coloured.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The WARN and ERROR lines of a node log, colours stripped, except those
/// whose text contains one of `expected`.
pub fn problems(log: &str, expected: &[&str]) -> Vec<String> {
    log.lines()
        .map(strip_ansi)
        .filter(|l| {
            let level = l.split_whitespace().nth(1).unwrap_or("");
            (level == "WARN" || level == "ERROR") && !expected.iter().any(|e| l.contains(e))
        })
        .collect()
}
