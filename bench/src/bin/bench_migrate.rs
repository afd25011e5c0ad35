//! `make bench-migrate`: live migration on nodeos (two nodes of a pool on
//! 127.0.0.1, `VmService.Migrate`) against QEMU (two `qemu-system-x86_64
//! -accel kvm` on 127.0.0.1, QMP `migrate`), both moving the same test guest
//! (`tests/guest`, `mode=dirty`) with the same command line, memory and
//! downtime limit ([`DOWNTIME_LIMIT_MS`]), for each dirty profile in
//! [`PROFILES`], one side after the other.
//!
//! Prints, per profile, `raw nodeos <profile> ...` and `raw qemu-kvm <profile>
//! ...` (every figure, see `nodeos_bench::migrate`), then the ratios ours/peer
//! per profile (`ratio downtime_ms.<profile> x`) and, last, for the whole run,
//! the geometric mean of the per-profile ratios (`ratio downtime_ms x`); lower
//! is better for all three:
//! - `downtime_ms`: the serial-measured downtime (`downtime_ms_serial`), the
//!   one figure both sides measure the same way, from outside. The VMMs' own
//!   figures differ in scope: QEMU's `downtime` ends when its source has sent
//!   the last bytes (the destination's load and resume are not in it), ours
//!   (`paused_ms`) ends when the destination has restored the VM.
//! - `total_ms`: the Migrate request to completion, as each VMM reports it.
//! - `bytes_sent`: guest memory bytes sent.
//!
//! Environment: `NODEOS_BIN` (default target/release/nodeos), `NODEOS_GUEST`
//! (default tests/guest/build/nodeos-test-guest.elf), `QEMU` (default
//! qemu-system-x86_64). Without a usable /dev/kvm or QEMU it prints
//! `SKIPPED: ...` and exits 2: no ratios are made up.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use nodeos_bench::fmt_ratio;
use nodeos_bench::migrate::qemu::{accel, qemu_bin};
use nodeos_bench::migrate::{DEFAULT_STAMP_MS, MigrationFigures, PROFILES, print_raw};
use nodeos_bench::vmm::kvm_usable;

/// The downtime limit both sides are given, ms.
const DOWNTIME_LIMIT_MS: u64 = 300;

/// How a compared metric is read from one side's figures.
type Read = fn(&MigrationFigures) -> f64;

/// The three compared metrics: name and how each side's figure is read.
const METRICS: [(&str, Read); 3] = [
    // Serial-measured on both sides: QEMU's own `downtime` covers its source
    // side only, so the VMMs' own figures are not compared.
    ("downtime_ms", |f| f.downtime_ms_serial),
    ("total_ms", |f| f.total_ms),
    ("bytes_sent", |f| f.bytes_sent as f64),
];

fn env_path(name: &str, default: &str) -> PathBuf {
    std::env::var_os(name).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// ours/peer, NaN when either side measured nothing positive.
fn ratio(ours: f64, peer: f64) -> f64 {
    if ours > 0.0 && peer > 0.0 { ours / peer } else { f64::NAN }
}

/// The geometric mean, NaN if any ratio is NaN (or there are none).
fn geomean(rs: &[f64]) -> f64 {
    if rs.is_empty() || rs.iter().any(|r| !r.is_finite() || *r <= 0.0) {
        return f64::NAN;
    }
    (rs.iter().map(|r| r.ln()).sum::<f64>() / rs.len() as f64).exp()
}

async fn run(qemu: PathBuf) -> anyhow::Result<()> {
    let nodeos_bin = env_path("NODEOS_BIN", "target/release/nodeos");
    if !nodeos_bin.is_file() {
        bail!("nodeos binary {} not found (set NODEOS_BIN or run `make release`)", nodeos_bin.display());
    }
    let guest = env_path("NODEOS_GUEST", "tests/guest/build/nodeos-test-guest.elf");
    if !guest.is_file() {
        bail!("test guest {} not found (set NODEOS_GUEST or run `make guest`)", guest.display());
    }
    let nodeos_bin = nodeos_bin.canonicalize()?;
    let guest = guest.canonicalize()?;
    let began = Instant::now();
    let peer = format!("qemu-{}", accel());
    println!("== bench-migrate: nodeos live migration vs QEMU, the same test guest, both on 127.0.0.1 ==");
    println!(
        "nodeos: {} (two-node pool, the guest as a pool image, VmService.Migrate)",
        nodeos_bin.display()
    );
    println!("qemu:   {} ({peer}, -M pc, QMP migrate over tcp:127.0.0.1)", qemu.display());
    println!("guest:  {} ({} bytes)", guest.display(), std::fs::metadata(&guest)?.len());
    println!(
        "cpus: {}; guest: 1 vCPU; downtime limit {DOWNTIME_LIMIT_MS} ms on both sides; no bandwidth cap on either; \
         stamps every {DEFAULT_STAMP_MS} ms",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "downtime ratio = downtime_ms_serial (the largest gap between the guest's serial stamps, minus the stamp \
         interval): QEMU's own downtime covers only its source side, ours (paused_ms) runs until the destination \
         restored the VM, so the VMMs' figures are shown but not compared"
    );
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at start: {}", l.trim());
    }
    println!();

    let mut per_profile: Vec<(&str, MigrationFigures, MigrationFigures)> = Vec::new();
    for p in PROFILES {
        let cmdline = p.cmdline(DEFAULT_STAMP_MS);
        let memory_mib = p.memory_mib();
        println!("-- {}: {cmdline}, {memory_mib} MiB (aim {} MiB/s)", p.name, p.aim_mib_s);
        let t = Instant::now();
        let ours =
            nodeos_bench::migrate::nodeos::run(&nodeos_bin, &guest, &cmdline, memory_mib, DOWNTIME_LIMIT_MS)
                .await
                .with_context(|| format!("nodeos, profile {}", p.name))?;
        print_raw(&format!("nodeos {}", p.name), &ours.figures);
        let last = ours.copying.last();
        println!(
            "   nodeos: {} copying reports, last pass {} dirty_pages {} expected_downtime_ms {}; Console RPC \
             downtime_ms_serial {} (50 ms polling, not compared); run {:.1} s",
            ours.copying.len(),
            last.map_or(0, |c| c.pass),
            last.map_or(0, |c| c.dirty_pages),
            last.map_or(0, |c| c.expected_downtime_ms),
            ours.downtime_ms_serial_rpc.map_or_else(|| "n/a".into(), |v| format!("{v:.1}")),
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let (g, c) = (guest.clone(), cmdline.clone());
        let theirs = tokio::task::spawn_blocking(move || {
            nodeos_bench::migrate::qemu::migrate_qemu(&g, &c, memory_mib, DOWNTIME_LIMIT_MS)
        })
        .await
        .context("the QEMU run panicked")?
        .with_context(|| format!("QEMU, profile {}", p.name))?;
        print_raw(&format!("{peer} {}", p.name), &theirs);
        println!("   {peer}: run {:.1} s", t.elapsed().as_secs_f64());
        per_profile.push((p.name, ours.figures, theirs));
        println!();
    }

    for (metric, read) in METRICS {
        for (name, ours, theirs) in &per_profile {
            println!("ratio {metric}.{name} {}", fmt_ratio(ratio(read(ours), read(theirs))));
        }
    }
    println!(
        "(geometric means over {} profiles; total benchmark time {:.0} s)",
        per_profile.len(),
        began.elapsed().as_secs_f64()
    );
    for (metric, read) in METRICS {
        let rs: Vec<f64> = per_profile.iter().map(|(_, o, t)| ratio(read(o), read(t))).collect();
        println!("ratio {metric} {}", fmt_ratio(geomean(&rs)));
    }
    Ok(())
}

fn skipped(why: &str) -> ExitCode {
    let msg = format!("SKIPPED: bench-migrate: {why} ***");
    println!("{msg}");
    eprintln!("{msg}");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    if let Err(why) = kvm_usable() {
        return skipped(&format!("no usable KVM ({why})"));
    }
    let Some(qemu) = qemu_bin() else {
        return skipped("qemu-system-x86_64 not found (set QEMU= or apt-get install qemu-system-x86)");
    };
    nodeos_bench::proc::run_until_signal("bench-migrate", run(qemu)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_their_mean() {
        assert_eq!(ratio(2.0, 4.0), 0.5);
        assert!(ratio(0.0, 4.0).is_nan() && ratio(1.0, -1.0).is_nan());
        assert!((geomean(&[0.5, 2.0]) - 1.0).abs() < 1e-12);
        assert!((geomean(&[2.0, 8.0]) - 4.0).abs() < 1e-12);
        assert!(geomean(&[1.0, f64::NAN]).is_nan() && geomean(&[]).is_nan());
    }
}
