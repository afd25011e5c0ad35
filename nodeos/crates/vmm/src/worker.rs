//! `nodeos vm-worker`: the process that runs one VM.
//!
//! Threads: the main thread builds the VM (and, for an incoming migration,
//! receives it), then waits for the VM's end; a control thread serves the
//! node's requests; one thread per vCPU; one I/O thread per active virtio
//! device; a waiter that turns platform requests (guest power-off or reset)
//! and vCPU failures into the worker's end; during an outgoing migration a
//! sender thread (and its throttle). The worker exits 0 after telling the
//! node why it stopped, and non-zero only when it could not even report.

use std::io::{IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{self, ControlMessageOwned, MsgFlags};
use tracing::{error, info, warn};

use crate::config::WorkerConfig;
use crate::control::{
    self, FromWorker, MAX_MESSAGE, MigrateOut, PROTOCOL_VERSION, StopReason, ToWorker, WorkerEvent,
};
use crate::migration::{self, send::SendParams};
use crate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("control socket")]
    Socket(#[source] nix::Error),
    #[error("the node closed the control socket")]
    Closed,
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("expected a start message first")]
    NotStart,
    #[error("the node speaks control protocol {0}, this worker {PROTOCOL_VERSION}")]
    Version(u32),
}

/// The worker's end of the control socket.
#[derive(Debug, Clone)]
pub struct Control {
    fd: Arc<OwnedFd>,
}

impl Control {
    pub fn send(&self, msg: &FromWorker) {
        match control::encode(msg) {
            Ok(bytes) => {
                if let Err(e) = socket::send(self.fd.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL) {
                    warn!(error = %e, "cannot send to the node");
                }
            }
            Err(e) => error!(error = %e, "control message does not encode"),
        }
    }

    fn recv(&self) -> Result<(ToWorker, Vec<OwnedFd>), WorkerError> {
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let mut cmsg = nix::cmsg_space!([RawFd; 16]);
        let (n, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = socket::recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(WorkerError::Socket)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(WorkerError::Socket)? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for r in raw {
                        // SAFETY: SCM_RIGHTS just installed this descriptor in our table; we are its only owner.
                        fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                    }
                }
            }
            (msg.bytes, fds)
        };
        if n == 0 {
            return Err(WorkerError::Closed);
        }
        Ok((control::decode(&buf[..n])?, fds))
    }
}

/// A `Write` that appends the serial console to its log file.
#[derive(Debug)]
pub struct ConsoleLog {
    file: std::fs::File,
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logging() {
    let filter = tracing_subscriber_filter();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

fn tracing_subscriber_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("NODEOS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// The line a panicking worker leaves last in its log, which the node quotes
/// in the VM's crash reason.
pub const PANIC_MARK: &str = "vm-worker panicked";

/// Any panic ends the worker at once. A thread that dies alone would leave a
/// VM that runs on but answers nothing (a dead control thread), runs with a
/// vCPU missing, or drops a device: the node records a crash instead, with
/// the panic as the reason, and nothing of the VM is left half alive.
fn abort_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        error!(thread = %thread, "{PANIC_MARK}: {what}{at}");
        eprintln!("{PANIC_MARK} in thread {thread}{at}: {what}");
        // Not abort(): a jailed worker is PID 1 of its namespace, where a
        // signal it raises at itself is ignored. Exit code 134 is the shell's
        // word for SIGABRT; every thread ends at once.
        // SAFETY: _exit ends the process without running anything of ours.
        unsafe { libc::_exit(134) }
    }));
}

/// Entry point of `nodeos vm-worker --control-fd N`.
pub fn main(control_fd: RawFd) -> ExitCode {
    init_logging();
    abort_on_panic();
    if control_fd < 3 {
        eprintln!("vm-worker: --control-fd must name the socket the node passed (3 or above)");
        return ExitCode::from(2);
    }
    // SAFETY: the node passed this descriptor as our control socket; nothing
    // else in this process refers to it.
    let ctl = Control { fd: Arc::new(unsafe { OwnedFd::from_raw_fd(control_fd) }) };
    // While this process has one thread: a mount namespace of its own.
    let mounts = match crate::jail::private_mounts() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("vm-worker: cannot make a private mount namespace: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (config, mut fds, seq, incoming) = match ctl.recv() {
        Ok((ToWorker::Start { seq, version, config, incoming }, fds)) => {
            if version != PROTOCOL_VERSION {
                let e = WorkerError::Version(version);
                ctl.send(&FromWorker::Failed { seq, error: e.to_string() });
                return ExitCode::FAILURE;
            }
            (config, fds, seq, incoming)
        }
        Ok((other, _)) => {
            ctl.send(&FromWorker::Failed { seq: other.seq(), error: WorkerError::NotStart.to_string() });
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("vm-worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    // An incoming migration's stream comes after the NICs' sockets.
    let incoming = match incoming {
        Some(key) => match fds.pop() {
            Some(fd) if fds.len() >= config.nics.len() => Some((key, std::net::TcpStream::from(fd))),
            _ => {
                ctl.send(&FromWorker::Failed { seq, error: "no migration stream with the start".into() });
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let nic_fds = fds;
    info!(vm = %config.vm_id, vcpus = config.vcpus, memory_mib = config.memory_mib, "building VM");
    let has_volumes = config.disks.iter().any(|d| d.volume.is_some());
    let vm_id = config.vm_id.clone();
    let vm = match build(*config, nic_fds, incoming.is_some()) {
        Ok(vm) => vm,
        Err(e) => {
            let msg = nodeos_types::error_chain(&e);
            error!(error = %msg, "VM cannot start");
            ctl.send(&FromWorker::Failed { seq, error: msg });
            return ExitCode::FAILURE;
        }
    };
    // Measured before confinement: /proc is out of reach afterwards.
    let rss = rss_kib();
    // Everything the VM needs is open: from here on the worker is confined,
    // first to an empty root as an unprivileged user, then by seccomp.
    match &mounts {
        Some(m) => match crate::jail::confine(m, &vm_id) {
            Ok(uid) => info!(uid, "confined: empty root, own uid and gid, no capabilities"),
            Err(e) => {
                let msg = format!("cannot jail the worker: {}", nodeos_types::error_chain(&e));
                error!(error = %msg, "VM cannot start");
                ctl.send(&FromWorker::Failed { seq, error: msg });
                return ExitCode::FAILURE;
            }
        },
        None => info!("not running as root: the worker keeps the node's unprivileged user"),
    }
    if let Err(e) = crate::seccomp::apply_to_process(has_volumes) {
        let msg = nodeos_types::error_chain(&e);
        error!(error = %msg, "cannot confine the worker");
        ctl.send(&FromWorker::Failed { seq, error: msg });
        return ExitCode::FAILURE;
    }
    ctl.send(&FromWorker::Ack { seq });
    let vm = Arc::new(Mutex::new(vm));
    match incoming {
        Some((key, stream)) => {
            let pool_key = nodeos_types::auth::PoolKey::from_derived(key.0);
            let mut progress = |p: &migration::Progress| {
                ctl.send(&FromWorker::Event(WorkerEvent::MigrationProgress(p.clone())));
            };
            match migration::receive::receive(&vm, stream, &vm_id, &pool_key, &mut progress) {
                // The stream closes here: the source needs nothing more from it.
                Ok(_) => ctl.send(&FromWorker::Event(WorkerEvent::MigrationReceived)),
                Err(e) => {
                    let error = nodeos_types::error_chain(&e);
                    error!(error = %error, "incoming migration failed");
                    ctl.send(&FromWorker::Event(WorkerEvent::MigrationFailed { error }));
                    return ExitCode::FAILURE;
                }
            }
        }
        None => ctl.send(&FromWorker::Event(WorkerEvent::Running { rss_kib: rss })),
    }
    // The control thread serves requests until the node goes away or asks to kill.
    let control_vm = vm.clone();
    let control = ctl.clone();
    let ends = Vm::end_signal(&vm);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || serve_control(control, vm_id, control_vm))
        .map(|_| ())
        .unwrap_or_else(|e| error!(error = %e, "cannot start the control thread"));
    let reason = ends.wait();
    info!(?reason, "VM stopping");
    if let Ok(mut v) = vm.lock() {
        v.shutdown();
    }
    ctl.send(&FromWorker::Event(WorkerEvent::Stopped { reason }));
    ExitCode::SUCCESS
}

fn build(config: WorkerConfig, nic_fds: Vec<OwnedFd>, incoming: bool) -> Result<Vm, VmError> {
    config.validate().map_err(VmError::Config)?;
    let console = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&config.console_log)
        .map_err(|e| VmError::Console(config.console_log.display().to_string(), e))?;
    let console = Box::new(ConsoleLog { file: console });
    if incoming {
        Vm::build_incoming(&config, nic_fds, console)
    } else {
        Vm::build(&config, nic_fds, console)
    }
}

/// Where this worker's outgoing migration stands.
#[derive(Debug, Default)]
enum Outgoing {
    #[default]
    Idle,
    /// Pre-copy under way; setting the flag cancels it.
    Sending(Arc<AtomicBool>),
    /// The destination holds the VM; it stays frozen until commit or abort.
    Frozen,
}

type OutgoingSlot = Arc<Mutex<Outgoing>>;

fn slot(s: &OutgoingSlot) -> std::sync::MutexGuard<'_, Outgoing> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the sender thread of an outgoing migration.
fn migrate_out(
    ctl: &Control,
    vm_id: &str,
    vm: &Arc<Mutex<Vm>>,
    out: &OutgoingSlot,
    params: MigrateOut,
    fds: Vec<OwnedFd>,
) -> Result<(), String> {
    let stream = fds.into_iter().next().ok_or("no migration stream attached")?;
    let stream = std::net::TcpStream::from(stream);
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let mut s = slot(out);
        if !matches!(*s, Outgoing::Idle) {
            return Err("a migration of this VM is already under way".into());
        }
        *s = Outgoing::Sending(cancel.clone());
    }
    let send = SendParams {
        vm_id: vm_id.to_string(),
        pool_key: nodeos_types::auth::PoolKey::from_derived(params.key.0),
        budget: params.budget,
        bandwidth: params.bandwidth,
    };
    let (ctl, vm, slot_out) = (ctl.clone(), vm.clone(), out.clone());
    let spawned = std::thread::Builder::new().name("mig-send".into()).spawn(move || {
        let out = slot_out;
        let mut progress = |p: &migration::Progress| {
            ctl.send(&FromWorker::Event(WorkerEvent::MigrationProgress(p.clone())));
        };
        let result = migration::send::send(&vm, stream, &send, &cancel, &mut progress);
        match result {
            Ok(summary) => {
                *slot(&out) = Outgoing::Frozen;
                ctl.send(&FromWorker::Event(WorkerEvent::MigrationSent(summary)));
            }
            Err(e) => {
                *slot(&out) = Outgoing::Idle;
                let error = nodeos_types::error_chain(&e);
                warn!(error = %error, "migration failed; the VM runs here as before");
                ctl.send(&FromWorker::Event(WorkerEvent::MigrationFailed { error }));
            }
        }
    });
    if let Err(e) = spawned {
        *slot(out) = Outgoing::Idle;
        return Err(format!("cannot start the migration thread: {e}"));
    }
    Ok(())
}

fn serve_control(ctl: Control, vm_id: String, vm: Arc<Mutex<Vm>>) {
    let out = OutgoingSlot::default();
    loop {
        let (msg, fds) = match ctl.recv() {
            Ok(m) => m,
            Err(WorkerError::Closed) => {
                // The node is gone: nobody supervises this VM any more.
                Vm::request_end(&vm, StopReason::Killed);
                return;
            }
            Err(e) => {
                warn!(error = %e, "bad control message ignored");
                continue;
            }
        };
        let seq = msg.seq();
        let result: Result<(), String> = match msg {
            ToWorker::Start { .. } => Err("already started".into()),
            ToWorker::Pause { .. } if nodeos_types::failpoint("worker-panic-on-pause") => {
                panic!("failpoint worker-panic-on-pause")
            }
            ToWorker::Pause { .. } => vm
                .lock()
                .map_err(|_| "VM lock poisoned".to_string())
                .and_then(|mut v| v.pause().map_err(|e| e.to_string())),
            ToWorker::Resume { .. } => vm
                .lock()
                .map_err(|_| "VM lock poisoned".to_string())
                .and_then(|mut v| v.resume().map_err(|e| nodeos_types::error_chain(&e))),
            ToWorker::RequestShutdown { .. } => {
                vm.lock().map_err(|_| "VM lock poisoned".to_string()).map(|v| v.request_shutdown())
            }
            ToWorker::ConsoleInput { bytes, .. } => {
                vm.lock().map_err(|_| "VM lock poisoned".to_string()).map(|v| v.console_input(&bytes))
            }
            ToWorker::VolumeLayout { layout, own, .. } => vm
                .lock()
                .map_err(|_| "VM lock poisoned".to_string())
                .and_then(|v| v.update_volume(layout, own)),
            ToWorker::MigrateOut { params, .. } => migrate_out(&ctl, &vm_id, &vm, &out, params, fds),
            ToWorker::MigrationCommitted { .. } => {
                if matches!(*slot(&out), Outgoing::Frozen) {
                    ctl.send(&FromWorker::Ack { seq });
                    info!("migration committed: the VM runs on the destination now");
                    Vm::request_end(&vm, StopReason::Migrated);
                    return;
                }
                Err("no migration waits for a commit".into())
            }
            ToWorker::MigrationAbort { .. } => {
                let mut s = slot(&out);
                match &*s {
                    Outgoing::Sending(cancel) => {
                        cancel.store(true, Ordering::SeqCst);
                        Ok(())
                    }
                    Outgoing::Frozen => {
                        *s = Outgoing::Idle;
                        drop(s);
                        info!("migration aborted after the copy: the VM runs here again");
                        vm.lock()
                            .map_err(|_| "VM lock poisoned".to_string())
                            .and_then(|mut v| v.unfreeze().map_err(|e| nodeos_types::error_chain(&e)))
                    }
                    Outgoing::Idle => Err("no migration of this VM is under way".into()),
                }
            }
            ToWorker::Kill { .. } => {
                ctl.send(&FromWorker::Ack { seq });
                Vm::request_end(&vm, StopReason::Killed);
                return;
            }
        };
        ctl.send(&match result {
            Ok(()) => FromWorker::Ack { seq },
            Err(error) => FromWorker::Failed { seq, error },
        });
    }
}

/// Resident set of this process, KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
