//! One `nodeos vm-worker` child process, seen from the node.
//!
//! A [`Launcher`] brings the worker to life: [`ExecLauncher`] re-executes this
//! binary as `nodeos vm-worker`, which gets its end of a SOCK_SEQPACKET
//! control socket as fd 3 and dies with the node (PR_SET_PDEATHSIG): a worker
//! never outlives the node that supervises it. Tests launch an in-process
//! worker that speaks the same protocol instead. Requests carry a sequence number and are answered by exactly
//! one ack or failure; events flow to the supervisor through a channel; the
//! process's exit status arrives on its own channel.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
use nodeos_vmm::config::WorkerConfig;
use nodeos_vmm::control::{self, FromWorker, MAX_MESSAGE, PROTOCOL_VERSION, ToWorker, WorkerEvent};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

/// The fd number the worker finds its control socket at.
pub const CONTROL_FD: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot create the worker control socket")]
    Socket(#[source] nix::Error),
    #[error("cannot start the worker process")]
    Spawn(#[source] std::io::Error),
    #[error("cannot send to the worker")]
    Send(#[source] nix::Error),
    #[error("worker message")]
    Control(#[from] control::ControlError),
    #[error("worker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("worker exited")]
    Gone,
    #[error("worker refused: {0}")]
    Refused(String),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<(), String>>>>>;

/// A launched worker, before the control protocol starts.
pub struct Launched {
    /// Its process id (shown to operators; 0 if it has none).
    pub pid: u32,
    /// Ends it at once (SIGKILL for a process); its exit follows on `exit`.
    pub kill: Box<dyn Fn() + Send + Sync>,
    /// Its exit status, once it ends.
    pub exit: oneshot::Receiver<std::io::Result<ExitStatus>>,
}

impl std::fmt::Debug for Launched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launched").field("pid", &self.pid).finish_non_exhaustive()
    }
}

/// How workers come to life.
///
/// Contract: the worker finds `control` as its control socket and speaks the
/// protocol of `nodeos_vmm::control` on it; its output goes to `log`; `kill`
/// ends it even if it ignores the protocol, and `exit` resolves once it has
/// ended, whatever ended it.
pub trait Launcher: Send + Sync + std::fmt::Debug + 'static {
    fn launch(&self, control: OwnedFd, log: std::fs::File) -> Result<Launched, ProcessError>;
}

/// Launches workers as `<exe> vm-worker --control-fd 3` child processes.
#[derive(Debug, Clone)]
pub struct ExecLauncher {
    /// The binary that runs `vm-worker` (this binary).
    pub exe: PathBuf,
}

impl Launcher for ExecLauncher {
    fn launch(&self, control: OwnedFd, log: std::fs::File) -> Result<Launched, ProcessError> {
        let worker_raw = control.as_raw_fd();
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("vm-worker")
            .arg("--control-fd")
            .arg(CONTROL_FD.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(ProcessError::Spawn)?)
            .stderr(log)
            .kill_on_drop(false);
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (dup2, prctl) on values captured by copy.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(worker_raw, CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(ProcessError::Spawn)?;
        // The child holds its own copy now.
        drop(control);
        let pid = child.id().unwrap_or(0);
        let (exit_tx, exit) = oneshot::channel();
        tokio::spawn(async move {
            let _ = exit_tx.send(child.wait().await);
        });
        let kill = Box::new(move || {
            if pid != 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
        Ok(Launched { pid, kill, exit })
    }
}

/// A running worker. Dropping it does not end the worker; call [`WorkerProcess::kill`].
pub struct WorkerProcess {
    pub pid: u32,
    ctl: Arc<AsyncFd<OwnedFd>>,
    seq: AtomicU64,
    pending: Pending,
    kill: Box<dyn Fn() + Send + Sync>,
}

impl WorkerProcess {
    /// The process running the VM: the worker's child in its own PID
    /// namespace when it jailed itself (see `nodeos_vmm::jail`), else the
    /// worker itself.
    pub fn vm_pid(&self) -> u32 {
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
            .unwrap_or(self.pid)
    }
}

impl std::fmt::Debug for WorkerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerProcess").field("pid", &self.pid).finish_non_exhaustive()
    }
}

/// What [`spawn`] hands back besides the process.
#[derive(Debug)]
pub struct Spawned {
    pub process: Arc<WorkerProcess>,
    pub events: mpsc::Receiver<WorkerEvent>,
    pub exit: oneshot::Receiver<std::io::Result<ExitStatus>>,
    /// The answer to the start message: the VM is built and its vCPUs run.
    pub started: oneshot::Receiver<Result<(), String>>,
}

/// Starts a worker and sends it its configuration with the NIC sockets.
/// The returned process has not acknowledged the start yet: await
/// [`WorkerProcess::wait_started`].
/// With `incoming`, the worker receives its VM over the stream passed as the
/// last descriptor (a live migration) instead of booting it.
pub fn spawn(
    launcher: &dyn Launcher,
    config: WorkerConfig,
    nic_fds: Vec<OwnedFd>,
    log: std::fs::File,
    incoming: Option<nodeos_vmm::control::MigrationKey>,
) -> Result<Spawned, ProcessError> {
    let (node_end, worker_end) =
        socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(ProcessError::Socket)?;
    let Launched { pid, kill, exit } = launcher.launch(worker_end, log)?;

    let seq = 1;
    let start = control::encode(&ToWorker::Start {
        seq,
        version: PROTOCOL_VERSION,
        config: Box::new(config),
        incoming,
    })?;
    let raw: Vec<RawFd> = nic_fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    socket::sendmsg::<()>(node_end.as_raw_fd(), &[IoSlice::new(&start)], cmsgs, MsgFlags::empty(), None)
        .map_err(ProcessError::Send)?;
    // The worker holds its own copies now.
    drop(nic_fds);

    nix::fcntl::fcntl(node_end.as_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
        .map_err(ProcessError::Socket)?;
    let ctl = Arc::new(register(node_end).map_err(ProcessError::Spawn)?);
    let pending: Pending = Arc::default();
    let (start_tx, started) = oneshot::channel();
    pending.lock().unwrap_or_else(|p| p.into_inner()).insert(seq, start_tx);
    let (ev_tx, events) = mpsc::channel(64);
    tokio::spawn(read_loop(ctl.clone(), pending.clone(), ev_tx, pid));
    let process =
        Arc::new(WorkerProcess { pid, ctl, seq: AtomicU64::new(seq + 1), pending: pending.clone(), kill });
    Ok(Spawned { process, events, exit, started })
}

async fn read_loop(
    ctl: Arc<AsyncFd<OwnedFd>>,
    pending: Pending,
    events: mpsc::Sender<WorkerEvent>,
    pid: u32,
) {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    loop {
        let Ok(mut guard) = ctl.readable().await else { break };
        match socket::recv(guard.get_inner().as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => break,
            Ok(n) => match control::decode::<FromWorker>(&buf[..n]) {
                Ok(FromWorker::Ack { seq }) => complete(&pending, seq, Ok(())),
                Ok(FromWorker::Failed { seq, error }) => complete(&pending, seq, Err(error)),
                Ok(FromWorker::Event(e)) => {
                    let _ = events.send(e).await;
                }
                Err(e) => warn!(worker = pid, error = %e, "undecodable message from worker"),
            },
            Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            Err(e) => {
                debug!(worker = pid, error = %e, "control socket closed");
                break;
            }
        }
    }
    // Whoever still waits learns the worker is gone.
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

fn complete(pending: &Pending, seq: u64, r: Result<(), String>) {
    if let Some(tx) = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&seq) {
        let _ = tx.send(r);
    }
}

impl WorkerProcess {
    fn register(&self, seq: u64) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(seq, tx);
        rx
    }

    async fn wait_reply(
        rx: oneshot::Receiver<Result<(), String>>,
        timeout: Duration,
    ) -> Result<(), ProcessError> {
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(ProcessError::Timeout(timeout)),
            Ok(Err(_)) => Err(ProcessError::Gone),
            Ok(Ok(Err(e))) => Err(ProcessError::Refused(e)),
            Ok(Ok(Ok(()))) => Ok(()),
        }
    }

    /// Waits for [`Spawned::started`].
    pub async fn wait_started(
        rx: oneshot::Receiver<Result<(), String>>,
        timeout: Duration,
    ) -> Result<(), ProcessError> {
        Self::wait_reply(rx, timeout).await
    }

    /// Sends a request built from a fresh sequence number and waits for its answer.
    pub async fn request(
        &self,
        make: impl FnOnce(u64) -> ToWorker,
        timeout: Duration,
    ) -> Result<(), ProcessError> {
        self.request_with_fds(make, Vec::new(), timeout).await
    }

    /// [`WorkerProcess::request`] with descriptors attached (SCM_RIGHTS); the
    /// worker holds its own copies once sent.
    pub async fn request_with_fds(
        &self,
        make: impl FnOnce(u64) -> ToWorker,
        fds: Vec<OwnedFd>,
        timeout: Duration,
    ) -> Result<(), ProcessError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let msg = control::encode(&make(seq))?;
        let rx = self.register(seq);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
        loop {
            let mut guard = self.ctl.writable().await.map_err(|_| ProcessError::Gone)?;
            match socket::sendmsg::<()>(
                guard.get_inner().as_raw_fd(),
                &[IoSlice::new(&msg)],
                cmsgs,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => break,
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(_) => return Err(ProcessError::Gone),
            }
        }
        drop(fds);
        Self::wait_reply(rx, timeout).await
    }

    /// Ends the worker at once (SIGKILL); the exit is reported on the exit channel.
    pub fn kill(&self) {
        (self.kill)();
    }
}

/// Registers an owned descriptor with the reactor.
fn register<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor, which stays open and unchanged until
    // the AsyncFd (which takes ownership of `inner`) drops.
    unsafe { AsyncFd::register(inner) }.map_err(|e| std::io::Error::other(e.to_string()))
}
