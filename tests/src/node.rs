//! [`NodeProc`]: one `nodeos node` process in its network namespace.
//!
//! Started as `ip netns exec <ns> $NODEOS_BIN node ...` (`ip` execs the binary,
//! so the child pid is the node's own); stdout and stderr go to a log file
//! next to the node's data dir, appended across restarts. Dropping it kills
//! the process (SIGKILL) and reaps it.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use nodeos_types::NodeId;

/// How long a SIGTERM'd node may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a started node may take to write its identity file.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(20);

/// How one node runs.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub pool: String,
    pub key_file: PathBuf,
    /// Addresses given as `--seeds` (none: the flag is left out).
    pub seeds: Vec<SocketAddr>,
    /// Whether to pass `--discovery-iface eth0` (multicast beacons).
    pub beacons: bool,
    /// `--bootstrap-expect`, if not the default.
    pub bootstrap_expect: Option<u16>,
    /// More daemon flags (e.g. `--rereplicate-after 3`).
    pub extra_args: Vec<String>,
    /// Environment of the daemon (e.g. `NODEOS_FAILPOINTS` for fault injection).
    pub env: Vec<(String, String)>,
    /// `--host-images-dir`: the tests' VMs boot the test guest from the
    /// repository and use disk files under the test's directory (`/` by
    /// default; `None`: the node takes no host files for VMs).
    pub host_images_dir: Option<PathBuf>,
}

/// Port of every test node's NBD server (on its own address).
pub const NBD_PORT: u16 = 10809;

/// A node process (possibly stopped) with its data dir and log.
#[derive(Debug)]
pub struct NodeProc {
    pub index: usize,
    pub ns: String,
    /// Its gRPC address (listen = advertise).
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    bin: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    starts: u32,
    id: Option<String>,
}

impl NodeProc {
    /// Prepares (does not start) node `index`; its files go under `dir`.
    pub fn new(index: usize, ns: &str, addr: SocketAddr, bin: &Path, dir: &Path, spec: &NodeSpec) -> Self {
        let data_dir = dir.join(format!("node{index}"));
        let log_path = dir.join(format!("node{index}.log"));
        let mut args: Vec<OsString> = vec![
            "node".into(),
            "--data-dir".into(),
            data_dir.clone().into(),
            "--pool".into(),
            spec.pool.clone().into(),
            "--pool-key-file".into(),
            spec.key_file.clone().into(),
            "--listen".into(),
            addr.to_string().into(),
            // NBD on the node's own address, so tests on the host reach it.
            "--nbd-listen".into(),
            format!("{}:{NBD_PORT}", addr.ip()).into(),
        ];
        if let Some(dir) = &spec.host_images_dir {
            args.extend(["--host-images-dir".into(), dir.clone().into()]);
        }
        args.extend(spec.extra_args.iter().map(OsString::from));
        if !spec.seeds.is_empty() {
            let seeds: Vec<String> = spec.seeds.iter().map(ToString::to_string).collect();
            args.extend(["--seeds".into(), seeds.join(",").into()]);
        }
        if spec.beacons {
            args.extend(["--discovery-iface".into(), "eth0".into()]);
        }
        if let Some(n) = spec.bootstrap_expect {
            args.extend(["--bootstrap-expect".into(), n.to_string().into()]);
        }
        NodeProc {
            index,
            ns: ns.to_owned(),
            addr,
            data_dir,
            log_path,
            bin: bin.to_owned(),
            args,
            env: spec.env.clone(),
            child: None,
            starts: 0,
            id: None,
        }
    }

    /// Starts the process (again, with the same data dir, after a stop).
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("node {} is already running", self.index);
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        self.starts += 1;
        writeln!(
            log,
            "==== nodeos-tests: start #{} of node {} in {} ====",
            self.starts, self.index, self.ns
        )?;
        let err = log.try_clone().context("duplicating the log file handle")?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&self.bin)
            .args(&self.args)
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning node {} ({})", self.index, self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Whether the process runs (reaping it if it ended on its own).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_)) | Err(_)) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// The exit status if the process ended by itself since the last look.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// SIGKILL and reap.
    /// The daemon's process id while it runs (`ip netns exec` execs it in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Processes the daemon started that still run (its VM workers).
    pub fn children(&self) -> Vec<u32> {
        let Some(pid) = self.pid() else { return Vec::new() };
        let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
        dir.filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat")).ok().is_some_and(|s| {
                    // "pid (comm) state ppid ...": the comm may hold spaces, so split after ')'.
                    s.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                        == Some(pid)
                })
            })
            .collect()
    }

    /// Sends `sig` to the daemon only (its workers run on).
    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        let pid = self.pid().with_context(|| format!("node {} is not running", self.index))?;
        let pid = Pid::from_raw(i32::try_from(pid).context("pid does not fit i32")?);
        kill(pid, sig).with_context(|| format!("{sig} to node {}", self.index))
    }

    pub fn kill9(&mut self) -> anyhow::Result<()> {
        let Some(mut c) = self.child.take() else { bail!("node {} is not running", self.index) };
        c.kill().with_context(|| format!("killing node {}", self.index))?;
        c.wait().with_context(|| format!("reaping node {}", self.index))?;
        Ok(())
    }

    /// SIGTERM, then waits for the process to end; its exit status.
    pub async fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut c) = self.child.take() else { bail!("node {} is not running", self.index) };
        let pid = Pid::from_raw(i32::try_from(c.id()).context("pid does not fit i32")?);
        kill(pid, Signal::SIGTERM).with_context(|| format!("SIGTERM to node {}", self.index))?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(s) = c.try_wait().with_context(|| format!("waiting for node {}", self.index))? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("node {} did not stop within {STOP_TIMEOUT:?} of SIGTERM (killed)", self.index);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node id (16 hex digits) from its data dir, once the node wrote it.
    pub async fn id(&mut self) -> anyhow::Result<String> {
        if let Some(id) = &self.id {
            return Ok(id.clone());
        }
        let path = self.data_dir.join("node.json");
        let deadline = Instant::now() + IDENTITY_TIMEOUT;
        let id = loop {
            if let Ok(bytes) = fs::read(&path) {
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
                let raw = v["node_id"]
                    .as_u64()
                    .with_context(|| format!("{} has no numeric node_id", path.display()))?;
                break NodeId(raw).to_string();
            }
            if !self.is_running() {
                bail!(
                    "node {} exited before writing {}; log:\n{}",
                    self.index,
                    path.display(),
                    self.log_tail(30)
                );
            }
            if Instant::now() >= deadline {
                bail!("node {} wrote no {} within {IDENTITY_TIMEOUT:?}", self.index, path.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.id = Some(id.clone());
        Ok(id)
    }

    /// The node id if it is already known.
    pub fn known_id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Everything the node logged (all starts).
    pub fn log(&self) -> String {
        fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGKILL and reap if running; never fails (for teardown).
    pub fn halt(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.halt();
    }
}
