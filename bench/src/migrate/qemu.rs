//! The peer: a live migration between two `qemu-system-x86_64` processes on
//! 127.0.0.1, driven over QMP.
//!
//! Both processes get the same machine (`-M pc` with its SeaBIOS, as
//! `bench-vmm` boots QEMU; 1 vCPU, QEMU's default CPU model, no default
//! devices, the debug-exit port at 0xf4) and the guest ELF as `-kernel`; the
//! destination also gets `-incoming tcp:127.0.0.1:<port>`. Each serial port is a
//! `-chardev socket` connecting to a [`SerialSocket`] here; each QMP monitor is
//! a unix socket QEMU listens on. `-accel kvm`, or `-accel tcg` with a loud
//! line when `/dev/kvm` is not usable.
//!
//! Steps: wait for [`REPORTS_BEFORE`] `dirty pass=` reports on the source; set
//! `downtime-limit` and lift `max-bandwidth` (QEMU's default caps a migration
//! at 128 MiB/s, a limit nodeos does not have; on loopback the link is not the
//! bottleneck either way); `migrate`; poll `query-migrate` every
//! [`POLL_MIGRATE`] until `completed`; then keep reading the destination's
//! serial for [`WATCH_AFTER`] and until it printed [`REPORTS_AFTER`] reports.
//! Any `CORRUPT` or `FAIL` line from the guest, on either side, fails the run.
//! Both processes are killed when the run ends, whichever way it ends
//! ([`ChildGuard`]).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::serial::{
    SerialSocket, TimedLine, dirty_rate_mib_s, is_problem, largest_reported_gap_ms, largest_stamp_gap_ms,
    pass_report,
};
use super::{DirtyCmdline, MigrationFigures};
use crate::proc::{ChildGuard, LOOPBACK, free_ports};
use crate::vmm::{find_program, kvm_usable};

/// Pass reports the source prints before the migration starts (the guest
/// reports pass 1 at once, then about once a second).
pub const REPORTS_BEFORE: usize = 3;
/// Pass reports the destination must print after the move.
pub const REPORTS_AFTER: usize = 2;
/// How long the destination's serial is read after the migration completed
/// (at least; until [`REPORTS_AFTER`] reports).
pub const WATCH_AFTER: Duration = Duration::from_secs(3);
/// From spawn to the source's [`REPORTS_BEFORE`]th report (SeaBIOS under an
/// emulating KVM takes several seconds to boot).
const BOOT_LIMIT: Duration = Duration::from_secs(120);
/// From the migrate request to `completed`; a guest dirtying faster than the
/// copy converges never does, and the run fails.
const MIGRATE_LIMIT: Duration = Duration::from_secs(120);
/// From completion to the destination's [`REPORTS_AFTER`]th report.
const AFTER_LIMIT: Duration = Duration::from_secs(60);
/// For QEMU's QMP socket to appear and answer.
const QMP_LIMIT: Duration = Duration::from_secs(20);
const POLL_MIGRATE: Duration = Duration::from_millis(10);
/// `max-bandwidth` for the migration, bytes/s: far above what loopback carries.
const MAX_BANDWIDTH: u64 = 64 << 30;

/// Moves the guest booted with `cmdline` (`mode=dirty`; `dirty_stamp_ms` is
/// added when missing) from one QEMU to another on loopback. Fails if the
/// guest reports corruption or a failure on either side, or the destination
/// does not go on reporting passes.
pub fn migrate_qemu(
    guest: &Path,
    cmdline: &str,
    memory_mib: u64,
    downtime_limit_ms: u64,
) -> anyhow::Result<MigrationFigures> {
    Ok(run(guest, cmdline, memory_mib, downtime_limit_ms)?.figures)
}

/// The `-accel` QEMU uses here: `kvm` when `/dev/kvm` opens read-write, else
/// `tcg`, said once, loudly, on stdout and stderr.
pub fn accel() -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| match kvm_usable() {
        Ok(()) => "kvm",
        Err(why) => {
            let msg = format!(
                "*** migrate: KVM NOT USABLE ({why}): QEMU runs with -accel tcg, its figures are TCG's ***"
            );
            println!("{msg}");
            eprintln!("{msg}");
            "tcg"
        }
    })
}

/// The QEMU binary: `$QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn qemu_bin() -> Option<PathBuf> {
    find_program(&std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()))
}

/// A finished migration: its figures and both serial streams (for a benchmark
/// that wants to show or check more than the figures).
#[derive(Debug)]
pub struct Outcome {
    pub figures: MigrationFigures,
    pub source: Vec<TimedLine>,
    pub destination: Vec<TimedLine>,
    /// When the migrate request was sent, since the serial epoch.
    pub migrate_at: Duration,
}

/// One QEMU process with its sockets. Fields drop in order: QEMU is killed
/// before its serial reader is joined.
#[derive(Debug)]
struct Side {
    child: ChildGuard,
    serial: SerialSocket,
    qmp_path: PathBuf,
}

impl Side {
    fn spawn(
        name: &str,
        bin: &Path,
        dir: &Path,
        machine: &[OsString],
        incoming: Option<u16>,
        epoch: Instant,
    ) -> anyhow::Result<Self> {
        let serial = SerialSocket::listen(&dir.join(format!("{name}.serial")), epoch)?;
        let qmp_path = dir.join(format!("{name}.qmp"));
        let mut cmd = Command::new(bin);
        cmd.args(machine);
        let mut chardev = OsString::from("socket,id=ser0,path=");
        chardev.push(serial.path());
        cmd.arg("-chardev").arg(chardev).args(["-serial", "chardev:ser0"]);
        let mut qmp = OsString::from("unix:");
        qmp.push(&qmp_path);
        qmp.push(",server=on,wait=off");
        cmd.arg("-qmp").arg(qmp);
        if let Some(port) = incoming {
            cmd.arg("-incoming").arg(format!("tcp:{LOOPBACK}:{port}"));
        }
        let child = ChildGuard::spawn(format!("qemu {name}"), cmd, &dir.join(format!("{name}.log")))?;
        Ok(Self { child, serial, qmp_path })
    }

    fn qmp(&mut self) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + QMP_LIMIT;
        loop {
            self.child.check_running()?;
            if let Ok(s) = UnixStream::connect(&self.qmp_path) {
                return Qmp::handshake(s).with_context(|| format!("QMP of {}", self.child.name()));
            }
            if Instant::now() >= deadline {
                bail!("{}: no QMP socket after {QMP_LIMIT:?}", self.child.name());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Fails on a guest problem line or an exited QEMU.
    fn check(&mut self) -> anyhow::Result<()> {
        let lines = self.serial.lines();
        if let Some(l) = lines.iter().find(|l| is_problem(&l.text)) {
            bail!("{}: the guest reported {:?}; serial:\n{}", self.child.name(), l.text, self.serial.text());
        }
        self.child.check_running()
    }

    fn reports(&self) -> usize {
        self.serial.lines().iter().filter(|l| pass_report(&l.text).is_some()).count()
    }

    /// Waits until the guest printed `n` pass reports.
    fn wait_reports(&mut self, n: usize, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check()?;
            if self.reports() >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: {} of {n} dirty pass reports after {limit:?}; serial:\n{}",
                    self.child.name(),
                    self.reports(),
                    self.serial.text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The machine both sides run: everything but the sockets and `-incoming`.
fn machine_args(guest: &Path, cmdline: &str, memory_mib: u64, accel: &str) -> Vec<OsString> {
    let mut a: Vec<OsString> = [
        "-accel",
        accel,
        "-M",
        "pc",
        "-smp",
        "1",
        "-m",
        &format!("{memory_mib}M"),
        "-nodefaults",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    a.push(guest.into());
    a.push("-append".into());
    a.push(cmdline.into());
    a
}

/// [`migrate_qemu`], keeping both serial streams.
pub fn run(guest: &Path, cmdline: &str, memory_mib: u64, downtime_limit_ms: u64) -> anyhow::Result<Outcome> {
    let dirty = DirtyCmdline::parse(cmdline, memory_mib)?;
    let bin = qemu_bin().context("qemu-system-x86_64 not found (set QEMU=)")?;
    if !guest.is_file() {
        bail!("no guest at {} (make -C tests/guest)", guest.display());
    }
    let dir =
        tempfile::Builder::new().prefix("bench-migrate-qemu-").tempdir().context("creating a temp dir")?;
    let machine = machine_args(guest, &dirty.cmdline, memory_mib, accel());
    let port = free_ports(1)?[0];
    let epoch = Instant::now();
    // Declared after `dir`: both QEMUs die before their sockets' directory goes.
    let mut dst = Side::spawn("destination", &bin, dir.path(), &machine, Some(port), epoch)?;
    let mut src = Side::spawn("source", &bin, dir.path(), &machine, None, epoch)?;
    let mut dst_qmp = dst.qmp()?;
    let mut src_qmp = src.qmp()?;
    // The incoming listener is up once QMP answers; this confirms the state.
    let status = dst_qmp.execute("query-status", None)?;
    if status["status"] != "inmigrate" {
        bail!("the destination is {status}, not waiting for a migration");
    }

    src.wait_reports(REPORTS_BEFORE, BOOT_LIMIT)?;
    src_qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "downtime-limit": downtime_limit_ms, "max-bandwidth": MAX_BANDWIDTH })),
    )?;
    let migrate_at = epoch.elapsed();
    src_qmp.execute("migrate", Some(json!({ "uri": format!("tcp:{LOOPBACK}:{port}") })))?;
    let info = wait_completed(&mut src, &mut src_qmp)?;

    let done = Instant::now();
    loop {
        dst.check()?;
        if done.elapsed() >= WATCH_AFTER && dst.reports() >= REPORTS_AFTER {
            break;
        }
        if done.elapsed() >= AFTER_LIMIT {
            bail!(
                "the destination printed {} of {REPORTS_AFTER} dirty pass reports in {AFTER_LIMIT:?} after the \
                 migration; serial:\n{}",
                dst.reports(),
                dst.serial.text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    src.check()?;
    let status = dst_qmp.execute("query-status", None)?;
    if status["status"] != "running" {
        bail!("the destination is {status} after the migration, not running");
    }

    let (source, destination) = (src.serial.lines(), dst.serial.lines());
    let figures = figures(&info, &source, &destination, migrate_at, &dirty)?;
    Ok(Outcome { figures, source, destination, migrate_at })
}

/// Polls `query-migrate` until `completed`; its answer then.
fn wait_completed(src: &mut Side, qmp: &mut Qmp) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let info = qmp.execute("query-migrate", None)?;
        match info["status"].as_str() {
            Some("completed") => return Ok(info),
            Some("failed" | "cancelled") => {
                bail!("the migration ended {info}; log:\n{}", src.child.log_tail(20))
            }
            _ => {}
        }
        src.check()?;
        if start.elapsed() >= MIGRATE_LIMIT {
            let _ = qmp.execute("migrate_cancel", None);
            bail!(
                "the migration did not complete within {MIGRATE_LIMIT:?} (it may not converge); last: {info}"
            );
        }
        std::thread::sleep(POLL_MIGRATE);
    }
}

fn figures(
    info: &Value,
    source: &[TimedLine],
    destination: &[TimedLine],
    migrate_at: Duration,
    dirty: &DirtyCmdline,
) -> anyhow::Result<MigrationFigures> {
    let num =
        |v: &Value, what: &str| v.as_u64().with_context(|| format!("no {what} in query-migrate: {info}"));
    let gap = largest_stamp_gap_ms(&[source, destination], migrate_at)
        .context("no two dirty stamps after the migrate request")?;
    Ok(MigrationFigures {
        downtime_ms_host: num(&info["downtime"], "downtime")? as f64,
        downtime_ms_serial: gap - dirty.stamp_ms as f64,
        downtime_ms_guest_tsc: largest_reported_gap_ms(destination),
        total_ms: num(&info["total-time"], "total-time")? as f64,
        bytes_sent: num(&info["ram"]["transferred"], "ram.transferred")?,
        passes: info["ram"]["dirty-sync-count"].as_u64(),
        dirty_rate_mib_s: dirty_rate_mib_s(source, migrate_at, dirty.dirty_mib)
            .context("fewer than two dirty pass reports before the migration")?,
    })
}

/// A minimal QMP client: one command at a time, events skipped.
#[derive(Debug)]
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Reads the greeting and leaves capabilities negotiation.
    fn handshake(stream: UnixStream) -> anyhow::Result<Self> {
        stream.set_read_timeout(Some(QMP_LIMIT)).context("setting a QMP read timeout")?;
        let writer = stream.try_clone().context("cloning the QMP socket")?;
        let mut qmp = Self { reader: BufReader::new(stream), writer };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).context("reading QMP")? == 0 {
            bail!("QMP closed");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP message {line:?}"))
    }

    /// Runs `command`; its `return` value, or its `error` as an error.
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> anyhow::Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).context("encoding a QMP command")?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).with_context(|| format!("sending QMP {command}"))?;
        loop {
            let reply = self.read().with_context(|| format!("QMP {command}"))?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                bail!("QMP {command} failed: {} ({})", e["desc"], e["class"]);
            }
            // an event ({"event": ...}): not ours
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::print_raw;
    use crate::migrate::serial::stamp_seq;

    fn guest() -> PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guest");
        let st = Command::new("make").arg("-s").arg("-C").arg(&dir).status().expect("running make");
        assert!(st.success(), "make -C tests/guest failed");
        dir.join("build/nodeos-test-guest.elf")
    }

    #[test]
    fn qemu_migration_keeps_the_guest_dirtying() {
        if qemu_bin().is_none() {
            let msg = "SKIPPED: migrate qemu test: qemu-system-x86_64 not found ***";
            println!("{msg}");
            eprintln!("{msg}");
            return;
        }
        let cmdline = "mode=dirty dirty_mib=8 dirty_words=1 dirty_stamp_ms=10";
        let out = run(&guest(), cmdline, 64, 300).expect("migration");
        let f = out.figures;
        print_raw(&format!("qemu-{} test", accel()), &f);
        assert!(f.total_ms > 0.0 && f.bytes_sent > 0, "{f:?}");
        assert!(f.downtime_ms_host >= 0.0 && f.dirty_rate_mib_s > 0.0, "{f:?}");
        assert!(f.downtime_ms_serial.is_finite(), "{f:?}");
        // The destination went on from where the source stopped: later passes
        // verified the earlier ones, no CORRUPT, the stamp sequence continued.
        let last =
            |lines: &[TimedLine]| lines.iter().filter_map(|l| pass_report(&l.text)).map(|r| r.pass).max();
        let (src_pass, dst_pass) = (last(&out.source).unwrap(), last(&out.destination).unwrap());
        assert!(dst_pass > src_pass, "destination pass {dst_pass} after source pass {src_pass}");
        assert!(out.destination.iter().all(|l| !is_problem(&l.text)));
        let reports: Vec<_> = out.destination.iter().filter_map(|l| pass_report(&l.text)).collect();
        assert!(reports.len() >= REPORTS_AFTER && reports.iter().all(|r| r.ok), "{reports:?}");
        let first_dst_stamp = out.destination.iter().find_map(|l| stamp_seq(&l.text)).unwrap();
        let last_src_stamp = out.source.iter().filter_map(|l| stamp_seq(&l.text)).max().unwrap();
        // The sequence continues, not restarted: a stamp or two printed around
        // the pause may be lost on the way to the host (at 10 ms per stamp the
        // 300 ms budget allows 30).
        assert!(
            first_dst_stamp + 2 >= last_src_stamp && first_dst_stamp <= last_src_stamp + 31,
            "stamps {last_src_stamp} -> {first_dst_stamp}"
        );
    }
}
