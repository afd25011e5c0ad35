//! Our side: one `nodeos node` (`--bootstrap-expect 1`) on 127.0.0.1; every
//! guest run is a VM created, started, stopped and deleted through `VmService`.
//! The start is timed from the moment the `Start` RPC is sent; the guest's
//! output is read from the worker's console log file (the `Console` RPC reads the
//! same file but polls it every 50 ms, which would blur the timing).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use nodeos_proto::v1::pool_service_client::PoolServiceClient;
use nodeos_proto::v1::vm_service_client::VmServiceClient;
use nodeos_proto::v1::{CreateVmRequest, DiskSpec, StatusRequest, StopVmRequest, Vm, VmRef, VmSpec};
use rand::Rng;
use tempfile::TempDir;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::console::ConsoleWatch;
use super::{GUEST_MEMORY_MIB, GuestRun, RunOutcome, Until, check_guest_ok, idle_sample};
use crate::nodeos::channel;
use crate::proc::{ChildGuard, LOOPBACK, free_ports};

const FORM_LIMIT: Duration = Duration::from_secs(60);
const END_LIMIT: Duration = Duration::from_secs(30);
/// How often the VM's state is checked while its console is followed.
const STATE_EVERY: Duration = Duration::from_millis(200);

/// A running one-node pool. Dropping it kills the node (its workers die with it:
/// they run with PR_SET_PDEATHSIG) and removes its data directory.
#[derive(Debug)]
pub struct OurVmm {
    // Declared before `dir`: the node dies before its data is removed.
    node: ChildGuard,
    dir: TempDir,
    addr: String,
    vms: VmServiceClient<Channel>,
    guest: PathBuf,
    /// Every worker pid seen, to check that none outlives the benchmark.
    pub worker_pids: Vec<u32>,
}

impl OurVmm {
    /// Starts the node under a fresh temporary directory and waits for the pool.
    pub async fn start(bin: &Path, guest: &Path) -> anyhow::Result<Self> {
        let dir =
            tempfile::Builder::new().prefix("bench-vmm-nodeos-").tempdir().context("creating a temp dir")?;
        let key: String =
            rand::rng().sample_iter(rand::distr::Alphanumeric).take(32).map(char::from).collect();
        let key_file = dir.path().join("pool.key");
        std::fs::write(&key_file, key).context("writing the pool key")?;
        let ports = free_ports(4)?;
        let addr = format!("{LOOPBACK}:{}", ports[0]);
        let mut cmd = Command::new(bin);
        cmd.arg("node")
            .args(["--host-images-dir", "/"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--pool", "bench", "--pool-key-file"])
            .arg(&key_file)
            .args(["--listen", &addr, "--bootstrap-expect", "1"])
            .arg("--plaintext-loopback")
            .args(["--block-listen", &format!("{LOOPBACK}:{}", ports[1])])
            .args(["--nbd-listen", &format!("{LOOPBACK}:{}", ports[2])])
            .args(["--vxlan-listen", &format!("{LOOPBACK}:{}", ports[3])]);
        let mut node = ChildGuard::spawn("nodeos node", cmd, &dir.path().join("node.log"))?;
        wait_formed(&mut node, &addr).await?;
        let vms = VmServiceClient::new(channel(&addr).await?);
        Ok(Self { node, dir, addr, vms, guest: guest.to_owned(), worker_pids: Vec::new() })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("data").join("vms").join(id)
    }

    /// Tails of the node's log and the VM's worker log, for errors.
    fn logs(&self, id: &str) -> String {
        let worker = std::fs::read_to_string(self.vm_dir(id).join("worker.log")).unwrap_or_default();
        let wl: Vec<&str> = worker.lines().collect();
        format!(
            "--- node log ---\n{}\n--- worker log ---\n{}",
            self.node.log_tail(15),
            wl[wl.len().saturating_sub(15)..].join("\n")
        )
    }

    async fn get(&mut self, id: &str) -> anyhow::Result<Vm> {
        Ok(self.vms.get(VmRef { vm: id.to_owned() }).await.context("VmService.Get")?.into_inner())
    }

    /// Boots the guest once: Create, Start (timed), follow the console to the
    /// end line, then Stop (force, for idle guests) and Delete.
    pub async fn run(&mut self, run: &GuestRun) -> anyhow::Result<RunOutcome> {
        let spec = VmSpec {
            vcpus: 1,
            memory_mib: GUEST_MEMORY_MIB,
            kernel: self.guest.display().to_string(),
            initrd: String::new(),
            cmdline: run.cmdline.clone(),
            disks: run
                .disk
                .iter()
                .map(|p| DiskSpec { path: p.display().to_string(), read_only: false, volume: String::new() })
                .collect(),
            nics: vec![],
            cloud_init: None,
        };
        let vm = self
            .vms
            .create(CreateVmRequest { ha: None, name: run.label.clone(), spec: Some(spec) })
            .await
            .context("VmService.Create")?
            .into_inner();
        let id = vm.id.clone();
        let result = self.boot(&id, run).await;
        // Whatever happened, the VM must not stay behind.
        let cleanup = self.remove(&id).await;
        let out =
            result.map_err(|e| e.context(format!("nodeos VM {} ({})\n{}", run.label, id, self.logs(&id))))?;
        cleanup?;
        Ok(out)
    }

    async fn boot(&mut self, id: &str, run: &GuestRun) -> anyhow::Result<RunOutcome> {
        let console = self.vm_dir(id).join("console.log");
        let since = Instant::now();
        let mut watch = ConsoleWatch::new(&console, since);
        let mut vms = self.vms.clone();
        let start = vms.start(VmRef { vm: id.to_owned() });
        tokio::pin!(start);
        let mut started: Option<Vm> = None;
        let mut start_returned = None;
        let mut next_state = since + STATE_EVERY;
        let end = run.until.line();
        loop {
            if started.is_none() {
                tokio::select! {
                    r = &mut start => {
                        start_returned = Some(since.elapsed());
                        started = Some(r.context("VmService.Start")?.into_inner());
                    }
                    _ = watch.tick() => {}
                }
            } else {
                watch.tick().await;
            }
            watch.poll()?;
            if watch.contains(end) {
                break;
            }
            if watch.elapsed() > run.timeout {
                bail!("no {end:?} within {:?}; console:\n{}", run.timeout, watch.text());
            }
            if started.is_some() && Instant::now() >= next_state {
                next_state = Instant::now() + STATE_EVERY;
                let v = self.get(id).await?;
                if v.worker_pid == 0 {
                    watch.poll()?;
                    if watch.contains(end) {
                        break;
                    }
                    bail!("the VM is {} ({}) before {end:?}; console:\n{}", v.state, v.reason, watch.text());
                }
            }
        }
        let end_line = watch.elapsed();
        if started.is_none() {
            started = Some(start.await.context("VmService.Start")?.into_inner());
            start_returned = Some(since.elapsed());
        }
        let text = watch.text();
        check_guest_ok(&text)?;
        let first_byte = watch.first_byte().context("no console output")?;
        let first_guest_line = watch.first_guest_line().context("no guest line")?;
        let mut pid = started.as_ref().map_or(0, |v| v.worker_pid);
        let mut mem = None;
        let mut idle_cpu_pct = None;
        match run.until {
            Until::Idle => {
                let v = self.get(id).await?;
                pid = v.worker_pid;
                if pid == 0 {
                    bail!("an idle VM has no worker ({}: {})", v.state, v.reason);
                }
                self.worker_pids.push(pid);
                let (cpu, m) = idle_sample(pid).await?;
                idle_cpu_pct = Some(cpu);
                mem = Some(m);
            }
            Until::Done => {
                if pid != 0 {
                    self.worker_pids.push(pid);
                }
                // The guest powers off right after its last line.
                let v = self.wait_ended(id).await?;
                if v.state != "stopped" {
                    bail!("the VM ended {} ({}), not stopped", v.state, v.reason);
                }
            }
        }
        Ok(RunOutcome {
            first_byte,
            first_guest_line,
            end_line,
            console: text,
            start_returned,
            mem,
            idle_cpu_pct,
            pid,
        })
    }

    /// Waits until the VM has no worker and its record shows how it ended.
    ///
    /// The node drops the worker (Get's `worker_pid` turns 0) a moment before it
    /// records the end, so for a while Get answers `running` with no worker.
    async fn wait_ended(&mut self, id: &str) -> anyhow::Result<Vm> {
        let deadline = Instant::now() + END_LIMIT;
        loop {
            let v = self.get(id).await?;
            if v.worker_pid == 0 && matches!(v.state.as_str(), "stopped" | "crashed") {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!("VM {id} is still {} (worker pid {}) after {END_LIMIT:?}", v.state, v.worker_pid);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops (force) the VM if it still has a worker, waits until its end is
    /// recorded, deletes it.
    async fn remove(&mut self, id: &str) -> anyhow::Result<()> {
        let v = self.get(id).await?;
        if v.worker_pid != 0 {
            self.vms
                .stop(StopVmRequest { vm: id.to_owned(), force: true, timeout_seconds: 0 })
                .await
                .context("VmService.Stop")?;
        }
        if v.worker_pid != 0 || matches!(v.state.as_str(), "running" | "starting" | "paused" | "stopping") {
            self.wait_ended(id).await?;
        }
        self.vms.delete(VmRef { vm: id.to_owned() }).await.context("VmService.Delete")?;
        Ok(())
    }

    /// Fails if the node has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        self.node.check_running()
    }
}

/// Waits until the node reports a pool with a leader.
async fn wait_formed(node: &mut ChildGuard, addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + FORM_LIMIT;
    loop {
        node.check_running()?;
        let status = async {
            let mut c = PoolServiceClient::new(channel(addr).await?);
            anyhow::Ok(c.status(StatusRequest {}).await?.into_inner())
        };
        let last = match tokio::time::timeout(Duration::from_secs(2), status).await {
            Ok(Ok(s)) if !s.pool_id.is_empty() && !s.leader_id.is_empty() => return Ok(()),
            Ok(Ok(s)) => format!("{s:?}"),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "status timed out".to_owned(),
        };
        if Instant::now() >= deadline {
            bail!("the one-node pool did not form within {FORM_LIMIT:?}: {last}\n{}", node.log_tail(20));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
