//! VMM benchmark (`bench-vmm`): the nodeos VMM and QEMU boot the same test guest
//! (`tests/guest`) with the same command lines, one run at a time.
//!
//! - [`ours`]: a one-node nodeos pool on 127.0.0.1; VMs are created, started,
//!   stopped and deleted through `VmService`; the guest's serial output is read
//!   from the worker's console log (`<data-dir>/vms/<id>/console.log`).
//! - [`qemu`]: `qemu-system-x86_64 -accel kvm -M pc`, serial to a file.
//!
//! Both consoles are files polled every millisecond by [`console::ConsoleWatch`],
//! so both sides are timed by the same code with the same resolution.

pub mod console;
pub mod ours;
pub mod qemu;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

/// Guest memory on both sides, MiB.
pub const GUEST_MEMORY_MIB: u64 = 64;
/// The benchmark disk, bytes.
pub const DISK_BYTES: u64 = 64 << 20;
/// How long an idle guest's VMM is watched (its CPU time over this window) before
/// its memory is read.
pub const SETTLE: Duration = Duration::from_millis(1000);
/// The guest's machine-readable line prefix.
pub const GUEST_PREFIX: &str = "NODEOS-GUEST:";

/// How a guest run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The guest prints `NODEOS-GUEST: done` and powers off.
    Done,
    /// The guest prints `NODEOS-GUEST: idle` and halts; the VMM's memory is
    /// read, then the VM is killed.
    Idle,
}

impl Until {
    pub fn line(self) -> &'static str {
        match self {
            Until::Done => "NODEOS-GUEST: done",
            Until::Idle => "NODEOS-GUEST: idle",
        }
    }
}

/// One boot of the guest.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// Short unique label (VM name on our side, temp dir prefix on QEMU's).
    pub label: String,
    pub cmdline: String,
    pub disk: Option<PathBuf>,
    pub until: Until,
    /// From the start request to the end line.
    pub timeout: Duration,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Start request → first byte of serial output (any: QEMU's firmware prints first).
    pub first_byte: Duration,
    /// Start request → first `NODEOS-GUEST:` bytes (the guest's own first line).
    pub first_guest_line: Duration,
    /// Start request → the end line.
    pub end_line: Duration,
    pub console: String,
    /// Start request → its answer (ours: the `Start` RPC returns once the vCPUs
    /// run; QEMU: none, the spawn is the request).
    pub start_returned: Option<Duration>,
    /// The VMM process's memory while the guest idles (Until::Idle only).
    pub mem: Option<ProcMem>,
    /// The VMM process's CPU use over [`SETTLE`] while the guest idles, percent
    /// of one CPU (Until::Idle only).
    pub idle_cpu_pct: Option<f64>,
    pub pid: u32,
}

impl RunOutcome {
    /// `key=value` fields of the first console line starting with `prefix`
    /// (e.g. `"NODEOS-GUEST: exits n="`), the prefix's own included.
    pub fn fields(&self, prefix: &str) -> anyhow::Result<Vec<(String, String)>> {
        let line = self
            .console
            .lines()
            .find(|l| l.starts_with(prefix))
            .with_context(|| format!("no {prefix:?} line on the console:\n{}", self.console))?;
        Ok(line
            .split_whitespace()
            .filter_map(|t| t.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect())
    }

    pub fn field_u64(&self, prefix: &str, key: &str) -> anyhow::Result<u64> {
        let f = self.fields(prefix)?;
        let v =
            f.iter().find(|(k, _)| k == key).with_context(|| format!("no {key}= in the {prefix:?} line"))?;
        v.1.parse().with_context(|| format!("{key}={} is not a number", v.1))
    }

    /// Operations per second from a guest line with `<count_key>=`, `tsc_cycles=`
    /// and `tsc_khz=` (the guest's TSC, calibrated against the PIT).
    pub fn per_second(&self, prefix: &str, count_key: &str) -> anyhow::Result<Rate> {
        let n = self.field_u64(prefix, count_key)?;
        let cycles = self.field_u64(prefix, "tsc_cycles")?;
        let khz = self.field_u64(prefix, "tsc_khz")?;
        if cycles == 0 || khz == 0 {
            bail!("tsc_cycles={cycles} tsc_khz={khz} in the {prefix:?} line");
        }
        let secs = cycles as f64 / (khz as f64 * 1e3);
        Ok(Rate { per_s: n as f64 / secs, secs, tsc_khz: khz })
    }
}

/// A rate measured by the guest.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_s: f64,
    pub secs: f64,
    pub tsc_khz: u64,
}

/// Fails with the console if the guest reported a failure.
pub fn check_guest_ok(console: &str) -> anyhow::Result<()> {
    if let Some(l) = console.lines().find(|l| l.starts_with(GUEST_PREFIX) && l.contains("FAIL")) {
        bail!("the guest reported a failure: {l}\nconsole:\n{console}");
    }
    Ok(())
}

/// Memory of a process from `/proc/PID/status`, KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcMem {
    pub vm_rss: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
    pub rss_shmem: u64,
}

impl ProcMem {
    pub fn read(pid: u32) -> anyhow::Result<Self> {
        let path = format!("/proc/{pid}/status");
        let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let get = |key: &str| -> anyhow::Result<u64> {
            let l = s
                .lines()
                .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
                .with_context(|| format!("no {key} in {path}"))?;
            l[key.len() + 1..]
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("bad {key} line in {path}: {l:?}"))
        };
        Ok(Self {
            vm_rss: get("VmRSS")?,
            rss_anon: get("RssAnon")?,
            rss_file: get("RssFile")?,
            rss_shmem: get("RssShmem")?,
        })
    }

    /// What the VMM itself holds: resident memory minus shared memory (the guest's
    /// RAM is a memfd on both sides, so it is all RssShmem), MiB.
    pub fn overhead_mib(&self) -> f64 {
        (self.rss_anon + self.rss_file) as f64 / 1024.0
    }
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = s.rsplit_once(')').map(|(_, r)| r).with_context(|| format!("bad {path}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        f.get(i).and_then(|v| v.parse().ok()).with_context(|| format!("bad field {} in {path}", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Ok(Duration::from_nanos(total * 1_000_000_000 / hz))
}

/// Watches an idle VMM for [`SETTLE`]: its CPU use over that window (percent of
/// one CPU), then its memory.
pub async fn idle_sample(pid: u32) -> anyhow::Result<(f64, ProcMem)> {
    let c0 = cpu_time(pid)?;
    let t0 = std::time::Instant::now();
    tokio::time::sleep(SETTLE).await;
    let c1 = cpu_time(pid)?;
    let pct = (c1 - c0).as_secs_f64() / t0.elapsed().as_secs_f64() * 100.0;
    Ok((pct, ProcMem::read(pid)?))
}

/// A fresh raw disk image of [`DISK_BYTES`], every block written (not sparse),
/// so reads hit allocated blocks on both sides.
pub fn make_disk(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut block = vec![0u8; 1 << 20];
    for (i, b) in block.iter_mut().enumerate() {
        *b = (i % 251) as u8 | 1;
    }
    for _ in 0..DISK_BYTES / block.len() as u64 {
        f.write_all(&block)?;
    }
    f.flush()?;
    f.into_inner().map_err(|e| e.into_error())?.sync_all().context("syncing the disk image")?;
    Ok(())
}

/// Whether `/dev/kvm` can be opened read-write.
pub fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm: {e}"))
}

/// `name` if it is a path to a file, else the first match on `PATH`.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if name.contains('/') {
        return p.is_file().then(|| p.to_owned());
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|c| c.is_file())
}

/// The median of `xs` (the upper one of an even count); 0 when empty.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
