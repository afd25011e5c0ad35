//! The peer: one `qemu-system-x86_64 -accel kvm -M pc` process per guest run,
//! timed from its spawn.
//!
//! Matched to our VMM: 1 vCPU (QEMU's default CPU model: `-cpu host` aborts on
//! this host's PVM, which refuses MSR 0x10a), 64 MiB of guest RAM in a memfd
//! (`memory-backend-memfd`, so the guest's RAM counts as RssShmem on both
//! sides), no default devices, COM1 to a file, the debug-exit port at 0xf4,
//! and the disk as `virtio-blk-pci` on a raw file with `cache=writeback`,
//! `aio=threads`: buffered pread/pwrite through the page cache and fdatasync on
//! a guest flush, which is what our file backend does. `-M pc` is QEMU's default
//! machine; it boots a PVH kernel through its SeaBIOS firmware (and the pvh
//! option ROM), which is part of QEMU's start time.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;

use super::console::ConsoleWatch;
use super::{GUEST_MEMORY_MIB, GuestRun, RunOutcome, Until, check_guest_ok, idle_sample};
use crate::proc::ChildGuard;

/// How long QEMU may take to exit after the guest's last line.
const EXIT_LIMIT: Duration = Duration::from_secs(30);
/// QEMU's exit status when the guest wrote 0 to the debug-exit port: (0 << 1) | 1.
const EXIT_GUEST_OK: i32 = 1;

#[derive(Debug)]
pub struct QemuVmm {
    pub bin: PathBuf,
    guest: PathBuf,
}

impl QemuVmm {
    pub fn new(bin: &Path, guest: &Path) -> Self {
        Self { bin: bin.to_owned(), guest: guest.to_owned() }
    }

    /// `qemu-system-x86_64 --version`, first line.
    pub fn version(&self) -> String {
        Command::new(&self.bin)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned))
            .unwrap_or_else(|| "unknown version".into())
    }

    /// The full command line of a run (also printed once by the benchmark).
    pub fn args(&self, cmdline: &str, serial: &Path, disk: Option<&Path>) -> Vec<OsString> {
        let mib = GUEST_MEMORY_MIB;
        let mut a: Vec<OsString> = [
            "-accel",
            "kvm",
            "-M",
            "pc,memory-backend=ram0",
            "-smp",
            "1",
            "-m",
            &format!("{mib}M"),
            "-object",
            &format!("memory-backend-memfd,id=ram0,size={mib}M"),
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-chardev",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let mut chardev = OsString::from("file,id=ser0,path=");
        chardev.push(serial);
        a.push(chardev);
        a.extend(["-serial", "chardev:ser0", "-kernel"].map(OsString::from));
        a.push(self.guest.clone().into());
        a.push("-append".into());
        a.push(cmdline.into());
        if let Some(d) = disk {
            let mut drive = OsString::from("file=");
            drive.push(d);
            drive.push(",if=none,id=d0,format=raw,cache=writeback,aio=threads");
            a.extend(["-drive".into(), drive, "-device".into(), "virtio-blk-pci,drive=d0".into()]);
        }
        a
    }

    /// Boots the guest once in a fresh QEMU process.
    pub async fn run(&mut self, run: &GuestRun) -> anyhow::Result<RunOutcome> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("bench-vmm-qemu-{}-", run.label))
            .tempdir()
            .context("creating a temp dir")?;
        let serial = dir.path().join("serial.log");
        let mut cmd = Command::new(&self.bin);
        cmd.args(self.args(&run.cmdline, &serial, run.disk.as_deref()));
        let log = dir.path().join("qemu.log");
        let since = Instant::now();
        let mut child = ChildGuard::spawn(format!("qemu {}", run.label), cmd, &log)?;
        let r = follow(&mut child, &serial, since, run).await;
        // The child dies (SIGKILL) before its directory goes.
        drop(child);
        drop(dir);
        r.with_context(|| format!("qemu run {}", run.label))
    }
}

async fn follow(
    child: &mut ChildGuard,
    serial: &Path,
    since: Instant,
    run: &GuestRun,
) -> anyhow::Result<RunOutcome> {
    let mut watch = ConsoleWatch::new(serial, since);
    let end = run.until.line();
    loop {
        watch.tick().await;
        watch.poll()?;
        if watch.contains(end) {
            break;
        }
        if let Some(st) = child.try_wait()? {
            watch.poll()?;
            if watch.contains(end) {
                break;
            }
            bail!(
                "QEMU exited ({st}) before {end:?}; log:\n{}\nconsole:\n{}",
                child.log_tail(20),
                watch.text()
            );
        }
        if watch.elapsed() > run.timeout {
            bail!("no {end:?} within {:?}; console:\n{}", run.timeout, watch.text());
        }
    }
    let end_line = watch.elapsed();
    let text = watch.text();
    check_guest_ok(&text)?;
    let first_byte = watch.first_byte().context("no console output")?;
    let first_guest_line = watch.first_guest_line().context("no guest line")?;
    let pid = child.pid();
    let mut mem = None;
    let mut idle_cpu_pct = None;
    match run.until {
        Until::Idle => {
            let (cpu, m) = idle_sample(pid).await?;
            idle_cpu_pct = Some(cpu);
            mem = Some(m);
        }
        Until::Done => {
            let deadline = Instant::now() + EXIT_LIMIT;
            let st = loop {
                if let Some(st) = child.try_wait()? {
                    break st;
                }
                if Instant::now() >= deadline {
                    bail!("QEMU did not exit within {EXIT_LIMIT:?} after the guest's last line");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            if st.code() != Some(EXIT_GUEST_OK) {
                bail!(
                    "QEMU exited {st}, expected status {EXIT_GUEST_OK} (debug-exit 0); log:\n{}",
                    child.log_tail(20)
                );
            }
        }
    }
    Ok(RunOutcome {
        first_byte,
        first_guest_line,
        end_line,
        console: text,
        start_returned: None,
        mem,
        idle_cpu_pct,
        pid,
    })
}
