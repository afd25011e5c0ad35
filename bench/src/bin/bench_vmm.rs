//! `make bench-vmm`: the nodeos VMM (a one-node pool on 127.0.0.1, VMs through
//! `VmService`) against QEMU (`-accel kvm -M pc`), both booting the same test
//! guest ELF (`tests/guest`) with the same command lines, one VM at a time,
//! alternating sides within each trial.
//!
//! Metrics (each the median of `BENCH_RUNS` runs per side):
//! - `start_to_first_serial_ms` (`mode=boot`): from the start request (our
//!   `VmService.Start` RPC sent; QEMU's process spawned) to the first byte of
//!   serial output in the console file. On both sides that byte is the guest's
//!   own leading newline (QEMU's SeaBIOS prints nothing to the serial port
//!   without `-nographic`; a console starting otherwise is reported). QEMU's
//!   figure includes its firmware (SeaBIOS + the PVH option ROM), which is how
//!   `-M pc` boots a PVH kernel; our VMM loads the ELF itself.
//! - `overhead_rss_mib` (`mode=idle`): the VMM process's RssAnon + RssFile
//!   (= VmRSS - RssShmem) from /proc/PID/status while the guest halts after boot.
//!   The guest's RAM is a memfd on both sides (QEMU: memory-backend-memfd), so
//!   it is all RssShmem and this is what the VMM holds besides the guest.
//!   Our VMM process is the VM's `nodeos vm-worker` (pid from VmService.Get); the
//!   node daemon is the control plane, as libvirtd would be for QEMU, not counted.
//!   The VMM's CPU use while the guest halts is shown as a detail.
//! - `blk_iops_qd{1,32}_{read,write}` (`mode=blkbench`): random 4 KiB requests on
//!   a fresh, fully written 64 MiB raw file per run (same filesystem both sides),
//!   timed by the guest's TSC: ops / (tsc_cycles / tsc_khz). The guest
//!   negotiates VIRTIO_BLK_F_FLUSH (as Linux does), so both devices may cache
//!   writes; one extra run without it (`blk_flush=0`) is shown as a detail.
//! - `exits_per_s` (`mode=exits`): `outb`s to an unclaimed port, guest-timed.
//!
//! Environment: `NODEOS_BIN` (default target/release/nodeos), `NODEOS_GUEST`
//! (default tests/guest/build/nodeos-test-guest.elf), `QEMU` (default
//! qemu-system-x86_64), `BENCH_RUNS` (default 3), `BENCH_EXITS` (default 20000),
//! `BENCH_BLK_OPS_QD1` (default 2000), `BENCH_BLK_OPS_QD32` (default 4000).
//! Without a usable /dev/kvm or QEMU it prints `SKIPPED: ...` and exits 2.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use nodeos_bench::fmt_ratio;
use nodeos_bench::vmm::ours::OurVmm;
use nodeos_bench::vmm::qemu::QemuVmm;
use nodeos_bench::vmm::{
    GUEST_MEMORY_MIB, GuestRun, RunOutcome, Until, find_program, kvm_usable, make_disk, median, ms,
};
use tokio::time::Instant;

const RUN_LIMIT: Duration = Duration::from_secs(90);

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn env_path(name: &str, default: &str) -> PathBuf {
    std::env::var_os(name).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// Both sides, run one after the other.
struct Sides {
    ours: OurVmm,
    qemu: QemuVmm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Lower,
    Higher,
}

/// One metric: every run's value on both sides.
struct Metric {
    name: String,
    unit: &'static str,
    better: Better,
    ours: Vec<f64>,
    qemu: Vec<f64>,
}

impl Metric {
    fn new(name: impl Into<String>, unit: &'static str, better: Better) -> Self {
        Self { name: name.into(), unit, better, ours: Vec::new(), qemu: Vec::new() }
    }

    fn ratio(&self) -> f64 {
        median(&self.ours) / median(&self.qemu)
    }
}

fn fmt_runs(xs: &[f64]) -> String {
    if xs.len() > 5 {
        let (lo, hi) = xs.iter().fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        return format!("{} values, {lo:.0}..{hi:.0}", xs.len());
    }
    xs.iter()
        .map(|x| if x.abs() >= 100.0 { format!("{x:.0}") } else { format!("{x:.2}") })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Sides {
    /// One run per side, ours first; a fresh disk for each when `disk` is set.
    async fn trial(&mut self, run: &GuestRun, disks: &Path) -> anyhow::Result<(RunOutcome, RunOutcome)> {
        let mut ours_run = run.clone();
        let mut qemu_run = run.clone();
        let mut made = Vec::new();
        if run.disk.is_some() {
            let a = disks.join(format!("{}-nodeos.img", run.label));
            let b = disks.join(format!("{}-qemu.img", run.label));
            make_disk(&a)?;
            make_disk(&b)?;
            ours_run.disk = Some(a.clone());
            qemu_run.disk = Some(b.clone());
            made = vec![a, b];
        }
        let o = self.ours.run(&ours_run).await;
        let q = match &o {
            Ok(_) => self.qemu.run(&qemu_run).await,
            Err(_) => Err(anyhow::anyhow!("not run")),
        };
        for f in made {
            let _ = std::fs::remove_file(f);
        }
        self.ours.check_running()?;
        Ok((o.context("nodeos")?, q.context("qemu")?))
    }
}

fn guest_run(label: String, cmdline: String, disk: bool, until: Until) -> GuestRun {
    GuestRun { label, cmdline, disk: disk.then(|| PathBuf::from("fresh")), until, timeout: RUN_LIMIT }
}

async fn run(qemu_bin: PathBuf) -> anyhow::Result<()> {
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
    let runs = env_u64("BENCH_RUNS", 3)?.max(1) as usize;
    let exits_n = env_u64("BENCH_EXITS", 20000)?.max(1);
    let ops_qd1 = env_u64("BENCH_BLK_OPS_QD1", 2000)?.max(1);
    let ops_qd32 = env_u64("BENCH_BLK_OPS_QD32", 4000)?.max(1);
    let began = Instant::now();

    let qemu = QemuVmm::new(&qemu_bin, &guest);
    println!("== bench-vmm: nodeos VMM vs QEMU, the same test guest under the same KVM ==");
    println!("nodeos: {} (one-node pool on 127.0.0.1, VMs through VmService)", nodeos_bin.display());
    println!("qemu:   {} ({})", qemu.bin.display(), qemu.version());
    println!("guest:  {} ({} bytes)", guest.display(), std::fs::metadata(&guest)?.len());
    println!(
        "cpus: {}; guest: 1 vCPU, {GUEST_MEMORY_MIB} MiB (a memfd on both sides); {runs} runs per metric and side, \
         sides alternating (nodeos, qemu) in each trial",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let example: Vec<String> = qemu
        .args("CMDLINE", Path::new("SERIAL"), Some(Path::new("DISK")))
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    println!("qemu command: {} {}", qemu.bin.display(), example.join(" "));
    println!(
        "disks: a fresh 64 MiB raw file per run, every block written and synced, under {}; both sides \
         read/write it through the page cache (ours: pread/pwrite + fdatasync on flush; QEMU: cache=writeback, \
         aio=threads); the guest never flushes in blkbench",
        std::env::temp_dir().display()
    );
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at start: {} (other work on this machine skews both sides)", l.trim());
    }
    println!();

    let t = Instant::now();
    let ours = OurVmm::start(&nodeos_bin, &guest).await?;
    println!("nodeos: one-node pool formed in {:.0} ms at {}", ms(t.elapsed()), ours.addr());
    let mut sides = Sides { ours, qemu };
    let disks =
        tempfile::Builder::new().prefix("bench-vmm-disks-").tempdir().context("creating a temp dir")?;

    // Warm-up (not counted): binaries and the guest file into the page cache.
    let (o, q) = sides
        .trial(&guest_run("warmup".into(), "mode=boot".into(), false, Until::Done), disks.path())
        .await?;
    println!(
        "warm-up boot: nodeos {:.1} ms, qemu {:.1} ms to the guest's first line (not counted)",
        ms(o.first_guest_line),
        ms(q.first_guest_line)
    );
    println!();

    let mut metrics: Vec<Metric> = Vec::new();
    let mut info: Vec<Metric> = Vec::new();

    // 1. start latency
    println!("-- start_to_first_serial_ms: mode=boot");
    let mut m = Metric::new("start_to_first_serial_ms", "ms", Better::Lower);
    let mut line = Metric::new("start_to_guest_line_ms", "ms", Better::Lower);
    let mut done = Metric::new("start_to_done_ms", "ms", Better::Lower);
    for i in 1..=runs {
        let r = guest_run(format!("boot-{i}"), "mode=boot".into(), false, Until::Done);
        let (o, q) = sides.trial(&r, disks.path()).await?;
        println!(
            "run {i}: first serial byte nodeos {:>8.1} ms  qemu {:>8.1} ms   (nodeos Start RPC returned at {:.1} ms; \
             first guest line: {:.1} / {:.1} ms; done: {:.1} / {:.1} ms)",
            ms(o.first_byte),
            ms(q.first_byte),
            o.start_returned.map_or(f64::NAN, ms),
            ms(o.first_guest_line),
            ms(q.first_guest_line),
            ms(o.end_line),
            ms(q.end_line)
        );
        for (side, out) in [("nodeos", &o), ("qemu", &q)] {
            if !out.console.starts_with("\nNODEOS-GUEST:") {
                println!(
                    "WARNING: {side}'s console does not start with the guest's output: the first byte is not the guest's"
                );
            }
        }
        m.ours.push(ms(o.first_byte));
        m.qemu.push(ms(q.first_byte));
        line.ours.push(ms(o.first_guest_line));
        line.qemu.push(ms(q.first_guest_line));
        done.ours.push(ms(o.end_line));
        done.qemu.push(ms(q.end_line));
    }
    metrics.push(m);
    info.push(line);
    info.push(done);
    println!();

    // 2. memory overhead
    println!(
        "-- overhead_rss_mib: mode=idle; the VMM's CPU time over {:?} after the idle line, then /proc/PID/status",
        nodeos_bench::vmm::SETTLE
    );
    let mut m = Metric::new("overhead_rss_mib", "MiB", Better::Lower);
    let mut anon = Metric::new("rss_anon_mib", "MiB", Better::Lower);
    let mut file = Metric::new("rss_file_mib", "MiB", Better::Lower);
    let mut shmem = Metric::new("rss_shmem_mib (guest RAM)", "MiB", Better::Lower);
    let mut total = Metric::new("vm_rss_mib", "MiB", Better::Lower);
    let mut cpu = Metric::new("idle_cpu_pct (of one CPU)", "%", Better::Lower);
    for i in 1..=runs {
        let r = guest_run(format!("idle-{i}"), "mode=idle".into(), false, Until::Idle);
        let (o, q) = sides.trial(&r, disks.path()).await?;
        let (om, qm) = (o.mem.context("no memory reading")?, q.mem.context("no memory reading")?);
        println!(
            "run {i}: nodeos worker pid {} VmRSS {} kB = anon {} + file {} + shmem {} kB, idle CPU {:.1}% | \
             qemu pid {} VmRSS {} kB = anon {} + file {} + shmem {} kB, idle CPU {:.1}%",
            o.pid,
            om.vm_rss,
            om.rss_anon,
            om.rss_file,
            om.rss_shmem,
            o.idle_cpu_pct.unwrap_or(f64::NAN),
            q.pid,
            qm.vm_rss,
            qm.rss_anon,
            qm.rss_file,
            qm.rss_shmem,
            q.idle_cpu_pct.unwrap_or(f64::NAN)
        );
        let mib = |k: u64| k as f64 / 1024.0;
        m.ours.push(om.overhead_mib());
        m.qemu.push(qm.overhead_mib());
        anon.ours.push(mib(om.rss_anon));
        anon.qemu.push(mib(qm.rss_anon));
        file.ours.push(mib(om.rss_file));
        file.qemu.push(mib(qm.rss_file));
        shmem.ours.push(mib(om.rss_shmem));
        shmem.qemu.push(mib(qm.rss_shmem));
        total.ours.push(mib(om.vm_rss));
        total.qemu.push(mib(qm.vm_rss));
        cpu.ours.push(o.idle_cpu_pct.unwrap_or(f64::NAN));
        cpu.qemu.push(q.idle_cpu_pct.unwrap_or(f64::NAN));
    }
    metrics.push(m);
    info.extend([anon, file, shmem, total, cpu]);
    println!();

    // 3. block I/O
    let mut tsc = Metric::new("guest tsc_khz", "kHz", Better::Higher);
    for (qd, ops) in [(1u64, ops_qd1), (32, ops_qd32)] {
        for rw in ["read", "write"] {
            let name = format!("blk_iops_qd{qd}_{rw}");
            println!("-- {name}: mode=blkbench blk_ops={ops} blk_qd={qd} blk_rw={rw}, random 4 KiB");
            let mut m = Metric::new(name, "IOPS", Better::Higher);
            for i in 1..=runs {
                let cmdline = format!("mode=blkbench blk_ops={ops} blk_qd={qd} blk_rw={rw} blk_seed={i}");
                let r = guest_run(format!("blk-qd{qd}-{rw}-{i}"), cmdline, true, Until::Done);
                let (o, q) = sides.trial(&r, disks.path()).await?;
                let (or, qr) = (
                    o.per_second("NODEOS-GUEST: blkbench rw=", "ops")?,
                    q.per_second("NODEOS-GUEST: blkbench rw=", "ops")?,
                );
                println!(
                    "run {i}: nodeos {:>8.0} IOPS ({:.3} s)  qemu {:>8.0} IOPS ({:.3} s)",
                    or.per_s, or.secs, qr.per_s, qr.secs
                );
                m.ours.push(or.per_s);
                m.qemu.push(qr.per_s);
                tsc.ours.push(or.tsc_khz as f64);
                tsc.qemu.push(qr.tsc_khz as f64);
            }
            metrics.push(m);
            println!();
        }
    }

    // Detail: writes when the driver does not negotiate VIRTIO_BLK_F_FLUSH, i.e.
    // expects a write-through device (Linux assumes so; QEMU then syncs every write).
    let ops = ops_qd1;
    println!(
        "-- detail blk_iops_qd1_write_noflush: mode=blkbench blk_ops={ops} blk_qd=1 blk_rw=write blk_flush=0, 1 run"
    );
    let mut m = Metric::new("blk_iops_qd1_write_noflush", "IOPS", Better::Higher);
    let cmdline = format!("mode=blkbench blk_ops={ops} blk_qd=1 blk_rw=write blk_flush=0");
    let (o, q) =
        sides.trial(&guest_run("blk-noflush".into(), cmdline, true, Until::Done), disks.path()).await?;
    let (or, qr) = (
        o.per_second("NODEOS-GUEST: blkbench rw=", "ops")?,
        q.per_second("NODEOS-GUEST: blkbench rw=", "ops")?,
    );
    println!(
        "run 1: nodeos {:>8.0} IOPS ({:.3} s)  qemu {:>8.0} IOPS ({:.3} s)",
        or.per_s, or.secs, qr.per_s, qr.secs
    );
    m.ours.push(or.per_s);
    m.qemu.push(qr.per_s);
    info.push(m);
    println!();

    // 4. exits
    println!("-- exits_per_s: mode=exits exits_n={exits_n} (outb to port 0x520, unclaimed on both sides)");
    let mut m = Metric::new("exits_per_s", "1/s", Better::Higher);
    let mut per_exit = Metric::new("us_per_exit", "us", Better::Lower);
    for i in 1..=runs {
        let r = guest_run(format!("exits-{i}"), format!("mode=exits exits_n={exits_n}"), false, Until::Done);
        let (o, q) = sides.trial(&r, disks.path()).await?;
        let (or, qr) =
            (o.per_second("NODEOS-GUEST: exits n=", "n")?, q.per_second("NODEOS-GUEST: exits n=", "n")?);
        println!(
            "run {i}: nodeos {:>8.0} exits/s ({:.2} us each)  qemu {:>8.0} exits/s ({:.2} us each)",
            or.per_s,
            1e6 / or.per_s,
            qr.per_s,
            1e6 / qr.per_s
        );
        m.ours.push(or.per_s);
        m.qemu.push(qr.per_s);
        per_exit.ours.push(1e6 / or.per_s);
        per_exit.qemu.push(1e6 / qr.per_s);
        tsc.ours.push(or.tsc_khz as f64);
        tsc.qemu.push(qr.tsc_khz as f64);
    }
    metrics.push(m);
    info.push(per_exit);
    info.push(tsc);
    println!();

    // Stop our node (and check that no worker outlives it) before the report.
    let pids = sides.ours.worker_pids.clone();
    drop(sides);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("vm-worker"))
        })
        .collect();
    if !left.is_empty() {
        println!("WARNING: vm-worker processes outlived their node: {left:?}");
    }

    println!(
        "{:<30} {:>12} {:>12} {:>12}  {:<6} runs nodeos | qemu",
        "metric (median)", "nodeos", "qemu", "nodeos/qemu", "better"
    );
    for m in metrics.iter().chain(info.iter()) {
        println!(
            "{:<30} {:>12.2} {:>12.2} {:>12}  {:<6} {} | {}",
            format!("{} [{}]", m.name, m.unit),
            median(&m.ours),
            median(&m.qemu),
            fmt_ratio(m.ratio()),
            if m.better == Better::Lower { "lower" } else { "higher" },
            fmt_runs(&m.ours),
            fmt_runs(&m.qemu)
        );
    }
    println!(
        "(rows below exits_per_s are details without ratio lines; first serial byte = the guest's leading newline on \
         both sides; total benchmark time {:.0} s)",
        began.elapsed().as_secs_f64()
    );
    println!();
    for m in &metrics {
        println!("ratio {} {}", m.name, fmt_ratio(m.ratio()));
    }
    Ok(())
}

fn skipped(why: &str) -> ExitCode {
    let msg = format!("SKIPPED: bench-vmm: {why} ***");
    println!("{msg}");
    eprintln!("{msg}");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    if let Err(why) = kvm_usable() {
        return skipped(&format!("no usable KVM ({why})"));
    }
    let qemu_name = std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let Some(qemu_bin) = find_program(&qemu_name) else {
        return skipped(&format!("{qemu_name} not found (apt-get install qemu-system-x86)"));
    };
    nodeos_bench::proc::run_until_signal("bench-vmm", run(qemu_bin)).await
}
