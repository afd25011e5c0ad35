//! Orderly power-off and reboot: stop the node daemon (SIGTERM, then SIGKILL
//! after [`DAEMON_STOP_TIMEOUT`]), stop every other process, flush and
//! unmount the data disk, then `reboot(2)`.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use super::disk::{DATA_MOUNT, DataDisk};

/// How long the daemon gets to stop its VMs and raft cleanly.
pub const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long every other process gets after SIGTERM.
const OTHERS_STOP_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);

/// What to do once everything is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Off,
    Reboot,
    /// Into the kernel loaded with [`load_kexec`], without the firmware.
    Kexec,
}

impl Power {
    pub fn verb(self) -> &'static str {
        match self {
            Power::Off => "powering off",
            Power::Reboot => "rebooting",
            Power::Kexec => "rebooting into the staged image",
        }
    }
}

/// A child that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub pid: Pid,
    /// Exit code, or `None` when a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<Signal>,
}

/// Collects every child that has ended, without blocking: PID 1 adopts every
/// orphan, and each must be waited for or it stays a zombie.
pub fn reap() -> Vec<Exit> {
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push(Exit { pid, code: Some(code), signal: None }),
            Ok(WaitStatus::Signaled(pid, sig, _)) => out.push(Exit { pid, code: None, signal: Some(sig) }),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return out,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => {
                warn!(error = %e, "waitpid failed");
                return out;
            }
        }
    }
}

/// Sends `sig` to `pid` and waits up to `timeout` for it to end, reaping
/// everything meanwhile. Returns whether it ended.
pub fn signal_and_wait(pid: Pid, sig: Signal, timeout: Duration, reaped: &mut Vec<Exit>) -> bool {
    if reaped.iter().any(|e| e.pid == pid) {
        return true;
    }
    if let Err(e) = kill(pid, sig) {
        // ESRCH: already gone (and reaped by someone's earlier call).
        return e == Errno::ESRCH;
    }
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        reaped.extend(reap());
        if reaped.iter().any(|e| e.pid == pid) {
            return true;
        }
        std::thread::sleep(POLL);
    }
    false
}

/// Stops the daemon: SIGTERM, then SIGKILL after [`DAEMON_STOP_TIMEOUT`].
/// Returns what was reaped on the way.
pub fn stop_daemon(pid: Pid) -> Vec<Exit> {
    let mut reaped = Vec::new();
    info!(pid = pid.as_raw(), timeout_s = DAEMON_STOP_TIMEOUT.as_secs(), "stopping the node daemon");
    if !signal_and_wait(pid, Signal::SIGTERM, DAEMON_STOP_TIMEOUT, &mut reaped) {
        warn!(pid = pid.as_raw(), "node daemon did not stop in time; killing it");
        if !signal_and_wait(pid, Signal::SIGKILL, OTHERS_STOP_TIMEOUT, &mut reaped) {
            error!(pid = pid.as_raw(), "node daemon survives SIGKILL");
        }
    }
    reaped
}

/// Ends every process but this one.
fn stop_everything() {
    for (sig, timeout) in [(Signal::SIGTERM, OTHERS_STOP_TIMEOUT), (Signal::SIGKILL, OTHERS_STOP_TIMEOUT)] {
        // -1: every process this one may signal, except itself.
        match kill(Pid::from_raw(-1), sig) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return,
            Err(e) => warn!(signal = %sig, error = %e, "cannot signal the remaining processes"),
        }
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            reap();
            // ECHILD: nothing is left to wait for.
            if matches!(waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)), Err(Errno::ECHILD)) {
                return;
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Unmounts the data disk, or at least leaves it read-only.
fn release_data(data: &DataDisk) {
    let DataDisk::Mounted { device } = data else { return };
    match umount2(Path::new(DATA_MOUNT), MntFlags::empty()) {
        Ok(()) => info!(device = %device.display(), "data disk unmounted"),
        Err(e) => {
            warn!(error = %e, "data disk does not unmount; remounting it read-only");
            let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            if let Err(e) = mount(None::<&str>, DATA_MOUNT, None::<&str>, ro, None::<&str>) {
                error!(error = %e, "data disk stays writable; sync was done");
            }
        }
    }
}

/// Loads a staged image (its kernel, initramfs and command line) for the
/// next `reboot(RB_KEXEC)`: nothing is stopped yet, so a refusal leaves the
/// node running as it was.
pub fn load_kexec(next: &nodeos_compute::upgrade::StagedBoot) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let open = |p: &Path| std::fs::File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()));
    let (kernel, initrd) = (open(&next.kernel)?, open(&next.initrd)?);
    let cmdline = std::ffi::CString::new(next.cmdline.as_str())
        .map_err(|_| "the command line holds a NUL".to_owned())?;
    let len = cmdline.as_bytes_with_nul().len();
    // SAFETY: both descriptors are open for the call, and `cmdline` is a
    // NUL-terminated string of `len` bytes (NUL included) that outlives it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel.as_raw_fd(),
            initrd.as_raw_fd(),
            len as libc::c_ulong,
            cmdline.as_ptr(),
            0 as libc::c_ulong,
        )
    };
    if r != 0 {
        return Err(format!("kexec_file_load: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Stops everything and powers off or reboots. Returns only when the kernel
/// refuses `reboot(2)`; the caller reports it and keeps running.
pub fn shutdown(how: Power, daemon: Option<Pid>, data: &DataDisk) -> Errno {
    warn!("{}: stopping the node", how.verb());
    if let Some(pid) = daemon {
        stop_daemon(pid);
    }
    stop_everything();
    nix::unistd::sync();
    release_data(data);
    nix::unistd::sync();
    warn!("{} now", how.verb());
    let mode = match how {
        Power::Off => RebootMode::RB_POWER_OFF,
        Power::Reboot => RebootMode::RB_AUTOBOOT,
        Power::Kexec => RebootMode::RB_KEXEC,
    };
    let Err(e) = reboot(mode);
    error!(error = %e, "the kernel refused: {}", how.verb());
    e
}
