//! Child processes and loopback ports for benchmark clusters.
//!
//! Every process is held by a [`ChildGuard`], which kills and reaps it on drop
//! (also while unwinding from a panic); each child additionally gets
//! `PR_SET_PDEATHSIG = SIGKILL`, so it dies with the benchmark even when the
//! benchmark itself is killed and no destructor runs.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// The only address benchmarks use.
pub const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A running child process, killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr going to `log`.
    pub fn spawn(name: impl Into<String>, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let name = name.into();
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file handle")?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("spawning {name} ({cmd:?})"))?;
        Ok(ChildGuard { name, child, log: log.to_owned() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait().context("polling a child")
    }

    /// Fails if the process has already exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait().context("polling a child")? {
            None => Ok(()),
            Some(st) => bail!("{} exited early ({st}); log:\n{}", self.name, self.log_tail(20)),
        }
    }

    /// The last `n` lines of the process's log.
    pub fn log_tail(&self, n: usize) -> String {
        match std::fs::read_to_string(&self.log) {
            Ok(s) => {
                let lines: Vec<&str> = s.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", self.log.display()),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tails of every child's log, for error messages.
pub fn logs_of(children: &[ChildGuard], n: usize) -> String {
    children.iter().map(|c| format!("--- {} ---\n{}\n", c.name(), c.log_tail(n))).collect()
}

/// `n` distinct TCP ports on 127.0.0.1 that were free a moment ago.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    // Hold every listener until all are chosen so that the ports are distinct.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind(SocketAddr::from((LOOPBACK, 0))))
        .collect::<Result<_, _>>()
        .context("binding 127.0.0.1:0")?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_tcp(addr: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("nothing listens on {addr} after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs a benchmark to its end, or until Ctrl-C or SIGTERM: then the future
/// is dropped, which kills every child and removes every temporary directory
/// through the guards it owns. The exit code says which happened.
pub async fn run_until_signal(
    name: &str,
    bench: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{name}: cannot handle SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        r = bench => match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: FAILED: {e:#}");
                ExitCode::FAILURE
            }
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!("{name}: interrupted");
            ExitCode::from(130)
        }
        _ = term.recv() => {
            eprintln!("{name}: terminated");
            ExitCode::from(143)
        }
    }
}
