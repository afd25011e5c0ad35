//! Live migration between nodes: this node as the source (one of its VMs
//! moves away) and as the destination (another node's VM arrives).
//!
//! ```text
//! source node                                  destination node
//!   check (running here, no migration yet,
//!   destination known, not itself, not in
//!   maintenance, room for the memory)
//!   record.migration = to ──────────────────▶ (seen by `vm show`)
//!   Prepare ──────────────────────────────────▶ plug NICs (not attached), volumes
//!                                               unowned, listen on an ephemeral port
//!   connect; MigrateOut(stream) to the worker ─▶ accept; start the worker incoming
//!   ... pre-copy, progress to the caller ...    ... the worker receives ...
//!   worker: MigrationSent (VM frozen)           worker: MigrationReceived
//!   COMMIT: one compare-and-swap on the VM's record: node = destination,
//!   its ports' records moved in the same transaction
//!   Commit ───────────────────────────────────▶ take each volume's next generation
//!                                               (fences the source at the replicas),
//!                                               attach the ports, Resume: it runs
//!   MigrationCommitted: the worker here ends
//! ```
//! Before the commit, any failure (the destination dies, the stream breaks,
//! the guest will not converge, a cancel) resumes the VM here and tells the
//! destination to drop its copy. After it the VM never runs here again. A
//! commit whose answer was lost is settled by reading the record, never by a
//! timeout. Only pool networks move: a VM with a host tap or a host-path
//! disk is refused before anything happens.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodeos_meta::peer::method;
use nodeos_types::records::{NodeRecord, VmMigration, VmRecord, VmState};
use nodeos_types::{ImageId, NodeId, PortId, VmId, unix_millis};
use nodeos_vmm::config::{DiskConfig, WorkerConfig};
use nodeos_vmm::control::{MigrateOut, MigrationKey, ToWorker, WorkerEvent};
use nodeos_vmm::migration::{Budget, Progress, Summary};
use nodeos_volumes::{Takeover, WriterSlot};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::error::{ComputeError, io};
use crate::process::{self, WorkerProcess};
use crate::supervisor::{Compute, Held, MigrationTap};

/// How long a peer call of the migration may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination waits for the source's stream.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination's worker may take to build the empty VM.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Read/write timeout of the stream: a peer silent this long is gone.
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the destination reads the VM's record while it waits for the decision.
const RECORD_POLL: Duration = Duration::from_millis(500);
/// How long the destination waits without a readable record before it drops its copy.
const DECISION_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the destination may take to run a committed VM.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

/// What the caller asks.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Destination node id or hostname; `None`: the node with the most free memory.
    pub to: Option<String>,
    pub downtime: Duration,
    /// Stream rate cap, MiB/s.
    pub bandwidth_mib: Option<u32>,
}

/// What the caller is told while a migration runs.
#[derive(Debug, Clone)]
pub enum MigrateEvent {
    Preparing { to: NodeId },
    Progress { to: NodeId, progress: Progress },
    Committed { vm: Box<VmRecord>, summary: Summary },
}

/// Node-to-node messages (`PeerService.Migration`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Get ready to receive `vm` from `source`.
    Prepare { vm: VmId, source: NodeId },
    /// The record names you now: run it.
    Commit { vm: VmId },
    /// No hand-over: drop the incoming copy.
    Abort { vm: VmId },
    /// Are you there (maintenance checks which voters answer).
    Ping,
    /// Start an election (leadership leaves a node entering maintenance).
    Elect,
    /// The pool restarts this crashed HA VM, whose record names you (see `ha.rs`).
    HaStart { vm: VmId },
    /// Rolling upgrade: drain, stage this image, reboot into it (see `upgrade.rs`).
    UpgradeStage { image_hash: String, cmdline: String, kernel_image: ImageId, initrd_image: ImageId },
    /// Leave maintenance (the last step of a node's upgrade).
    MaintenanceExit,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerReply {
    /// Connect the stream here.
    Prepared {
        address: String,
    },
    Done,
}

/// Where an incoming VM stands on the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    Waiting,
    Received,
    Running,
    Failed(String),
}

/// An incoming VM on the destination, until it runs or is dropped.
#[derive(Debug)]
pub(crate) struct Incoming {
    phase: watch::Receiver<Phase>,
    /// Commit (true) or abort (false), answered when done.
    decide: Option<oneshot::Sender<Decision>>,
}

/// Commit (true) or abort (false), and where to say how it went.
type Decision = (bool, oneshot::Sender<Result<(), String>>);

pub(crate) type IncomingMap = Mutex<HashMap<VmId, Incoming>>;

fn peer_err(e: impl std::fmt::Display) -> ComputeError {
    ComputeError::Migration(e.to_string())
}

/// The last `n` lines of a worker's log, for an error that says why it ended.
fn log_tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

impl Compute {
    /// The last lines of VM `id`'s worker log here, for an error about its worker.
    fn worker_log_tail(&self, id: VmId) -> String {
        log_tail(&self.vm_dir(id).join("worker.log"), 3)
    }

    fn incoming(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Incoming>> {
        self.inner.incoming.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn call_peer(
        &self,
        node: NodeId,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerReply, ComputeError> {
        self.call_peer_with(node, req, timeout).await
    }

    /// One sealed call of `PeerService.Migration` to `node`.
    pub(crate) async fn call_peer_with(
        &self,
        node: NodeId,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerReply, ComputeError> {
        let meta = self.inner.records.meta();
        let addr = meta
            .node_address(node)
            .ok_or_else(|| peer_err(format!("node {node} is not a member of this pool")))?;
        let r: Result<PeerReply, String> = meta
            .peers()
            .call(&addr, method::MIGRATION, req, timeout)
            .await
            .map_err(|e| peer_err(nodeos_types::error_chain(&e)))?;
        r.map_err(ComputeError::Migration)
    }

    /// The node a VM goes to: the one named, checked; or the one with the
    /// most free memory that can take it.
    async fn destination(&self, r: &VmRecord, to: Option<&str>) -> Result<NodeId, ComputeError> {
        let me = self.inner.cfg.node_id;
        let nodes: Vec<NodeRecord> = self.inner.records.nodes().await?;
        let vms = self.inner.records.list().await?;
        let free = |n: &NodeRecord| crate::ha::free_mib(n, &vms);
        let fits = |n: &NodeRecord| free(n).is_none_or(|f| f >= r.spec.memory_mib);
        match to {
            Some(name) => {
                let n = nodes
                    .iter()
                    .find(|n| {
                        n.id.to_string() == name || n.hostname == name || format!("{:x}", n.id.0) == name
                    })
                    .ok_or_else(|| {
                        ComputeError::Migration(format!("--to {name}: no such node in this pool"))
                    })?;
                if n.id == me {
                    return Err(ComputeError::Migration(format!(
                        "--to {name}: the VM already runs on that node"
                    )));
                }
                if n.maintenance || n.removing {
                    return Err(ComputeError::Migration(format!(
                        "--to {name}: the node is in maintenance or being removed"
                    )));
                }
                if !fits(n) {
                    return Err(ComputeError::Migration(format!(
                        "--to {name}: the node has {} MiB free; the VM needs {} MiB",
                        free(n).unwrap_or(0),
                        r.spec.memory_mib
                    )));
                }
                Ok(n.id)
            }
            None => nodes
                .iter()
                .filter(|n| n.id != me && !n.maintenance && !n.removing && n.cpu.is_some() && fits(n))
                .max_by_key(|n| free(n).unwrap_or(u64::MAX))
                .map(|n| n.id)
                .ok_or_else(|| {
                    ComputeError::Migration(format!(
                        "no other node can take a VM of {} MiB (all full, in maintenance, or without KVM)",
                        r.spec.memory_mib
                    ))
                }),
        }
    }

    /// Why a VM cannot move, if it cannot: only pool resources move.
    fn movable(r: &VmRecord) -> Result<(), ComputeError> {
        if let Some((i, n)) = r.spec.nics.iter().enumerate().find(|(_, n)| n.port.is_none()) {
            return Err(ComputeError::Migration(format!(
                "nics[{i}] is the host tap {:?}: only NICs on pool networks move with a VM",
                n.tap
            )));
        }
        if let Some((i, _)) = r.spec.disks.iter().enumerate().find(|(_, d)| d.volume.is_none()) {
            return Err(ComputeError::Migration(format!(
                "disks[{i}] is a file on this node: only pool volumes move with a VM"
            )));
        }
        Ok(())
    }

    /// Live-migrates a VM of this node; `events` hears each step. Returns
    /// the record as committed (the VM runs on the destination).
    pub async fn migrate(
        &self,
        vm: &str,
        opts: MigrateOptions,
        events: mpsc::UnboundedSender<MigrateEvent>,
    ) -> Result<VmRecord, ComputeError> {
        let id = self.resolve(vm).await?.id;
        let lock = self.lock_for(id);
        let _held = lock.try_lock().map_err(|_| {
            ComputeError::Migration(format!("VM {vm} is busy (another migration or operation is under way)"))
        })?;
        let mut r = self.resolve(&id.to_string()).await?;
        self.here(&r)?;
        if r.state != VmState::Running {
            return Err(ComputeError::State { vm: r.id.to_string(), state: r.state.as_str(), op: "migrate" });
        }
        Self::movable(&r)?;
        let live = self.live_map().get(&r.id).map(|l| (l.process.clone(), l.migration.clone()));
        let Some(live) = live else {
            return Err(ComputeError::State { vm: r.id.to_string(), state: r.state.as_str(), op: "migrate" });
        };
        let to = self.destination(&r, opts.to.as_deref()).await?;
        r.migration = Some(VmMigration { to, started_at_ms: unix_millis() });
        self.inner.records.save(&mut r).await?;
        let _ = events.send(MigrateEvent::Preparing { to });
        info!(vm = %r.id, to = %to, "live migration starting");
        let outcome = self.migrate_to(&r, to, &opts, &live, &events).await;
        match outcome {
            Ok((committed, summary)) => {
                let _ = events.send(MigrateEvent::Committed { vm: Box::new(committed.clone()), summary });
                Ok(committed)
            }
            Err(e) => {
                warn!(vm = %r.id, to = %to, error = %nodeos_types::error_chain(&e), "live migration failed; the VM runs here");
                // The record first: a dead destination must not keep the VM
                // looking busy while the call below times out.
                // Retried: the failure may have taken the raft leader along.
                for attempt in 0..30 {
                    let cleared = match self.inner.records.load(r.id).await {
                        Ok((mut now, _)) if now.node == self.inner.cfg.node_id => {
                            now.migration = None;
                            self.inner.records.save(&mut now).await
                        }
                        Ok(_) => Ok(()),
                        Err(e) => Err(e),
                    };
                    match cleared {
                        Ok(()) => break,
                        Err(s) => {
                            warn!(vm = %r.id, attempt, error = %s, "cannot clear the failed migration from the record yet")
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                // The destination also drops its copy when it sees the record cleared.
                let (this, vm) = (self.clone(), r.id);
                tokio::spawn(async move {
                    if let Err(a) = this.call_peer(to, &PeerRequest::Abort { vm }, PEER_TIMEOUT).await {
                        tracing::debug!(vm = %vm, error = %nodeos_types::error_chain(&a), "cannot tell the destination to drop its copy");
                    }
                });
                Err(e)
            }
        }
    }

    /// Cancels the migration of a VM of this node that is under way.
    pub async fn cancel_migration(&self, vm: &str) -> Result<VmRecord, ComputeError> {
        let r = self.resolve(vm).await?;
        self.here(&r)?;
        if r.migration.is_none() {
            return Err(ComputeError::Migration(format!("no migration of VM {vm} is under way")));
        }
        let (process, _, _) =
            self.live(r.id).ok_or_else(|| ComputeError::Migration("the VM has no worker".into()))?;
        process.request(|seq| ToWorker::MigrationAbort { seq }, PEER_TIMEOUT).await?;
        Ok(r)
    }

    async fn migrate_to(
        &self,
        r: &VmRecord,
        to: NodeId,
        opts: &MigrateOptions,
        live: &(Arc<WorkerProcess>, MigrationTap),
        events: &mpsc::UnboundedSender<MigrateEvent>,
    ) -> Result<(VmRecord, Summary), ComputeError> {
        let (process, tap) = live;
        let PeerReply::Prepared { address } = self
            .call_peer(to, &PeerRequest::Prepare { vm: r.id, source: self.inner.cfg.node_id }, PEER_TIMEOUT)
            .await?
        else {
            return Err(peer_err("the destination did not say where to send the VM"));
        };
        let stream = tokio::time::timeout(PEER_TIMEOUT, tokio::net::TcpStream::connect(&address))
            .await
            .map_err(|_| peer_err(format!("connecting to {address} timed out")))?
            .map_err(io(format!("cannot connect to the destination at {address}")))?;
        let fd: OwnedFd = match &self.inner.cfg.tls {
            None => worker_stream(stream.into_std().map_err(io("migration stream"))?)?,
            Some(tls) => {
                let _ = stream.set_nodelay(true);
                let s = nodeos_auth::tls::connect_to(tls.client(), stream)
                    .await
                    .map_err(io(format!("TLS with the destination at {address}")))?;
                through_tls(s)?
            }
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        *tap.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let params = MigrateOut {
            key: MigrationKey(self.inner.cfg.pool_key.derived_bytes()),
            budget: Budget { downtime: opts.downtime, ..Budget::default() },
            bandwidth: opts.bandwidth_mib.filter(|b| *b > 0).map(|b| u64::from(b) << 20),
        };
        let sent = process
            .request_with_fds(|seq| ToWorker::MigrateOut { seq, params }, vec![fd], PEER_TIMEOUT)
            .await;
        let result = match sent {
            Err(e) => Err(e.into()),
            Ok(()) => loop {
                match rx.recv().await {
                    Some(WorkerEvent::MigrationProgress(progress)) => {
                        let _ = events.send(MigrateEvent::Progress { to, progress });
                    }
                    Some(WorkerEvent::MigrationSent(summary)) => break Ok(summary),
                    Some(WorkerEvent::MigrationFailed { error }) => {
                        break Err(ComputeError::Migration(error));
                    }
                    Some(_) => {}
                    None => {
                        break Err(ComputeError::Migration(
                            "the VM's worker ended during the migration".into(),
                        ));
                    }
                }
            },
        };
        tap.lock().unwrap_or_else(|p| p.into_inner()).take();
        let summary = result?;
        // The VM is frozen here and restored there: decide.
        match self.commit(r, to).await {
            Ok(committed) => {
                if nodeos_types::failpoint("migration-after-commit") {
                    // Test hook: the source node dies right after the hand-over.
                    warn!("failpoint migration-after-commit: aborting the node");
                    std::process::abort();
                }
                if let Err(e) =
                    process.request(|seq| ToWorker::MigrationCommitted { seq }, PEER_TIMEOUT).await
                {
                    // It must not run here again: make sure.
                    warn!(vm = %r.id, error = %e, "cannot end the source worker politely; killing it");
                    process.kill();
                }
                let ran = self.call_peer(to, &PeerRequest::Commit { vm: r.id }, COMMIT_TIMEOUT).await;
                if let Err(e) = ran {
                    // The record names the destination: it runs the VM when it
                    // can (its node restarts it from the record), never this node.
                    warn!(vm = %r.id, to = %to, error = %nodeos_types::error_chain(&e), "the destination did not confirm the start of the committed VM");
                }
                info!(vm = %r.id, to = %to, paused_ms = summary.paused_ms, total_ms = summary.total_ms, "live migration committed");
                Ok((committed, summary))
            }
            Err(e) => {
                if let Err(u) = process.request(|seq| ToWorker::MigrationAbort { seq }, PEER_TIMEOUT).await {
                    warn!(vm = %r.id, error = %u, "cannot resume the VM after a refused commit");
                }
                Err(e)
            }
        }
    }

    /// The hand-over: one compare-and-swap on the VM's record, ports moved
    /// in the same transaction. A lost answer is settled by reading the record.
    async fn commit(&self, r: &VmRecord, to: NodeId) -> Result<VmRecord, ComputeError> {
        let (mut rec, rev) = self.inner.records.load(r.id).await?;
        if rec.node != self.inner.cfg.node_id || rec.migration.as_ref().map(|m| m.to) != Some(to) {
            return Err(ComputeError::Migration("the VM's record changed during the migration".into()));
        }
        rec.reason = format!("live-migrated from node {}", self.inner.cfg.node_id);
        match self.hand_over(&mut rec, rev, to).await {
            Ok(true) => Ok(rec),
            Ok(false) => Err(ComputeError::Migration("the VM's record changed during the migration".into())),
            Err(e) => {
                // Did it land? Read, do not guess.
                for _ in 0..10 {
                    if let Ok((now, _)) = self.inner.records.load(r.id).await {
                        return if now.node == to { Ok(now) } else { Err(e) };
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e)
            }
        }
    }

    /// Serves the other node's side of a migration (`PeerService.Migration`).
    pub async fn serve_migration(&self, sender: NodeId, req: PeerRequest) -> Result<PeerReply, String> {
        if let Some(r) = self.serve_node_request(&req).await {
            return r.map_err(|e| nodeos_types::error_chain(&e));
        }
        let r = match req {
            PeerRequest::Ping | PeerRequest::Elect => Ok(PeerReply::Done),
            PeerRequest::HaStart { vm } => self.ha_start(vm).await.map(|_| PeerReply::Done),
            PeerRequest::UpgradeStage { .. } => self.stage_upgrade(&req).await.map(|()| PeerReply::Done),
            PeerRequest::MaintenanceExit => self.exit_maintenance().await.map(|_| PeerReply::Done),
            PeerRequest::Prepare { vm, source } if source == sender => {
                self.prepare_incoming(vm, source).await
            }
            PeerRequest::Prepare { .. } => {
                Err(ComputeError::Migration("a prepare must come from the VM's node".into()))
            }
            PeerRequest::Commit { vm } => self.commit_incoming(vm).await,
            PeerRequest::Abort { vm } => {
                self.abort_incoming(vm).await;
                Ok(PeerReply::Done)
            }
        };
        r.map_err(|e| nodeos_types::error_chain(&e))
    }

    async fn prepare_incoming(&self, id: VmId, source: NodeId) -> Result<PeerReply, ComputeError> {
        let r = self.resolve(&id.to_string()).await?;
        if r.node != source || r.migration.as_ref().map(|m| m.to) != Some(self.inner.cfg.node_id) {
            return Err(ComputeError::Migration(format!(
                "VM {id} is not migrating from node {source} to this node"
            )));
        }
        if self.incoming().contains_key(&id) {
            return Err(ComputeError::Migration(format!("VM {id} is already arriving here")));
        }
        Self::movable(&r)?;
        let dir = self.vm_dir(r.id);
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
        // A console log left from an earlier stay here is stale: the console
        // starts again with the VM's arrival (its history stays on the nodes it left).
        let console = self.console_path(r.id);
        if let Err(e) = std::fs::remove_file(&console)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(io(format!("cannot reset {}", console.display()))(e));
        }
        let boot = self.boot_files(&r).await?;
        let cpu_baseline = self.inner.records.cpu_baseline().await?;
        // NIC sockets, not attached: the switch here takes the ports at the commit.
        let mut nic_configs = Vec::new();
        let mut worker_fds = Vec::new();
        let mut node_ends = Vec::new();
        for (i, n) in r.spec.nics.iter().enumerate() {
            let mac = crate::spec::parse_mac(&n.mac)
                .ok_or(crate::spec::SpecError::Mac { index: i, mac: n.mac.clone() })?;
            let (node_end, worker_end) = nix::sys::socket::socketpair(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::SeqPacket,
                None,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| io("cannot create a NIC socket")(e.into()))?;
            nic_configs.push(nodeos_vmm::config::NicConfig { mac, fd_index: worker_fds.len() });
            worker_fds.push(worker_end);
            node_ends.extend(n.port.map(|p| (p, node_end)));
        }
        // Volumes with the layout as it is; writable ones open at the commit.
        let mut disks = Vec::new();
        for d in &r.spec.disks {
            let Some(vid) = d.volume else { continue };
            let (rec, _) = self.inner.volumes.get(&vid.to_string()).await?;
            let layout = self.inner.volumes.layout(&rec).await?;
            disks.push(DiskConfig {
                path: Default::default(),
                read_only: d.read_only,
                volume: Some(nodeos_vmm::config::VolumeDisk {
                    tls: self.worker_tls(&r.id.to_string()),
                    layout,
                    pool_key: self.inner.cfg.pool_key.derived_bytes(),
                    node: self.inner.cfg.node_id,
                }),
            });
        }
        if let Some(seed) = crate::seed::Seed::for_vm(&r) {
            let path = self.seed_path(r.id);
            seed.write(&path)?;
            disks.push(DiskConfig { path, read_only: true, volume: None });
        }
        let config = WorkerConfig {
            vm_id: r.id.to_string(),
            vcpus: r.spec.vcpus,
            memory_mib: r.spec.memory_mib,
            kernel: boot.kernel,
            initrd: boot.initrd,
            cmdline: r.spec.cmdline.clone(),
            disks,
            nics: nic_configs,
            console_log: self.console_path(r.id),
            cpu_baseline,
        };
        let listener = tokio::net::TcpListener::bind((self.inner.cfg.migration_address, 0)).await.map_err(
            io(format!("cannot listen for the migration on {}", self.inner.cfg.migration_address)),
        )?;
        let address = listener.local_addr().map_err(io("migration listener"))?.to_string();
        let (phase_tx, phase_rx) = watch::channel(Phase::Waiting);
        let (decide_tx, decide_rx) = oneshot::channel();
        self.incoming().insert(id, Incoming { phase: phase_rx, decide: Some(decide_tx) });
        tokio::spawn(self.clone().receive(r, listener, config, worker_fds, node_ends, phase_tx, decide_rx));
        info!(vm = %id, from = %source, %address, "ready to receive a live migration");
        Ok(PeerReply::Prepared { address })
    }

    /// The destination's whole part, on a task of its own: accept, start the
    /// worker incoming, wait for the state, then run or drop the VM as decided.
    #[allow(clippy::too_many_arguments)]
    async fn receive(
        self,
        r: VmRecord,
        listener: tokio::net::TcpListener,
        config: WorkerConfig,
        mut worker_fds: Vec<OwnedFd>,
        node_ends: Vec<(PortId, OwnedFd)>,
        phase: watch::Sender<Phase>,
        decide: oneshot::Receiver<Decision>,
    ) {
        let id = r.id;
        let fail = |why: String| {
            warn!(vm = %id, error = %why, "incoming migration failed");
            let _ = phase.send(Phase::Failed(why));
            // Nothing arrives any more: a later migration of this VM may try again.
            self.incoming().remove(&id);
        };
        let accepted = tokio::time::timeout(ACCEPT_TIMEOUT, listener.accept()).await;
        drop(listener);
        let stream = match accepted {
            Ok(Ok((s, _))) => s,
            Ok(Err(e)) => return fail(format!("accepting the stream: {e}")),
            Err(_) => return fail("the source never connected".into()),
        };
        let fd = match &self.inner.cfg.tls {
            None => stream
                .into_std()
                .map_err(|e| e.to_string())
                .and_then(|s| worker_stream(s).map_err(|e| e.to_string())),
            Some(tls) => {
                match nodeos_auth::tls::accept_from(tls.server(), stream, &[nodeos_auth::Role::Node]).await {
                    Ok((s, _)) => through_tls(s).map_err(|e| e.to_string()),
                    Err(why) => Err(format!("the migration stream's TLS: {why}")),
                }
            }
        };
        match fd {
            Ok(fd) => worker_fds.push(fd),
            Err(e) => return fail(format!("migration stream: {e}")),
        }
        let log_path = self.vm_dir(id).join("worker.log");
        let log = match std::fs::OpenOptions::new().create(true).append(true).open(&log_path) {
            Ok(l) => l,
            Err(e) => return fail(format!("cannot open {}: {e}", log_path.display())),
        };
        let key = MigrationKey(self.inner.cfg.pool_key.derived_bytes());
        let spawned = match process::spawn(self.inner.launcher.as_ref(), config, worker_fds, log, Some(key)) {
            Ok(s) => s,
            Err(e) => return fail(format!("cannot start the worker: {e}")),
        };
        let process::Spawned { process, mut events, exit, started } = spawned;
        let kill = |process: &WorkerProcess| process.kill();
        if let Err(e) = WorkerProcess::wait_started(started, START_TIMEOUT).await {
            kill(&process);
            return fail(format!("the incoming worker did not start: {e}"));
        }
        let received = loop {
            match events.recv().await {
                Some(WorkerEvent::MigrationReceived) => break Ok(()),
                Some(WorkerEvent::MigrationFailed { error }) => break Err(error),
                Some(_) => {}
                None => break Err(format!("the incoming worker ended: {}", self.worker_log_tail(id))),
            }
        };
        if let Err(e) = received {
            kill(&process);
            return fail(e);
        }
        let _ = phase.send(Phase::Received);
        let (commit, answer) = match self.await_decision(id, decide).await {
            Some(d) => d,
            None => {
                kill(&process);
                return fail("no decision came and the record did not move here".into());
            }
        };
        if !commit {
            kill(&process);
            let _ = phase.send(Phase::Failed("aborted by the source".into()));
            if let Some(a) = answer {
                let _ = a.send(Ok(()));
            }
            return;
        }
        let ran = self.run_incoming(&r, process.clone(), events, exit, node_ends).await;
        match &ran {
            Ok(()) => {
                let _ = phase.send(Phase::Running);
            }
            Err(e) => {
                kill(&process);
                let _ = phase.send(Phase::Failed(e.clone()));
                // The record names this node: say the VM is not running, and why.
                if let Ok((mut now, _)) = self.inner.records.load(id).await
                    && now.node == self.inner.cfg.node_id
                {
                    now.state = VmState::Crashed;
                    now.reason = format!("the live-migrated VM could not start here: {e}");
                    if let Err(s) = self.inner.records.save(&mut now).await {
                        warn!(vm = %id, error = %s, "cannot record the failed start of a migrated VM");
                    }
                }
            }
        }
        if let Some(a) = answer {
            let _ = a.send(ran);
        }
    }

    /// The source's decision, or the record's: a source that died after its
    /// compare-and-swap never sends the commit, but the record names this
    /// node, and that alone decides. A record that stops naming a migration
    /// to this node (the source cleared it) is an abort.
    async fn await_decision(
        &self,
        id: VmId,
        mut decide: oneshot::Receiver<Decision>,
    ) -> Option<(bool, Option<oneshot::Sender<Result<(), String>>>)> {
        let me = self.inner.cfg.node_id;
        let mut unreadable_since = None::<tokio::time::Instant>;
        loop {
            tokio::select! {
                d = &mut decide => return d.ok().map(|(c, a)| (c, Some(a))),
                () = tokio::time::sleep(RECORD_POLL) => {}
            }
            match self.inner.records.load(id).await {
                // Committed (an HA restart hands a VM over crashed: not this copy's to run).
                Ok((r, _)) if r.node == me && r.state == VmState::Running => {
                    info!(vm = %id, "the record names this node: running the VM without the source's word");
                    self.incoming().remove(&id);
                    return Some((true, None));
                }
                Ok((r, _)) if r.migration.as_ref().map(|m| m.to) != Some(me) => {
                    self.incoming().remove(&id);
                    return Some((false, None));
                }
                Ok(_) => unreadable_since = None,
                Err(e) => {
                    // Without a readable record nothing can be decided; give
                    // up only after a long while (the pool may be electing).
                    let since = *unreadable_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > DECISION_TIMEOUT {
                        warn!(vm = %id, error = %e, "no decision on the incoming VM");
                        return None;
                    }
                }
            }
        }
    }

    /// Runs a committed incoming VM: its volumes' next generations (fencing
    /// the source), its ports on this switch, then its vCPUs.
    async fn run_incoming(
        &self,
        r: &VmRecord,
        process: Arc<WorkerProcess>,
        events: mpsc::Receiver<WorkerEvent>,
        exit: oneshot::Receiver<std::io::Result<std::process::ExitStatus>>,
        node_ends: Vec<(PortId, OwnedFd)>,
    ) -> Result<(), String> {
        let chain = |e: ComputeError| nodeos_types::error_chain(&e);
        let holder = format!("vm {}", r.id);
        let mut slots = Vec::new();
        for d in r.spec.disks.iter().filter(|d| !d.read_only) {
            let Some(vid) = d.volume else { continue };
            let (slot, rec) = self.take_writer_slot(vid, &holder).await.map_err(|e| chain(e.into()))?;
            let layout = self.inner.volumes.layout(&rec).await.map_err(|e| chain(e.into()))?;
            slots.push(slot);
            process
                .request(|seq| ToWorker::VolumeLayout { seq, layout, own: true }, PEER_TIMEOUT)
                .await
                .map_err(|e| format!("volume {vid}: {e} (worker log: {})", self.worker_log_tail(r.id)))?;
        }
        for (port, fd) in node_ends {
            self.attach_port(port, fd).await.map_err(chain)?;
        }
        process
            .request(|seq| ToWorker::Resume { seq }, PEER_TIMEOUT)
            .await
            .map_err(|e| format!("{e} (worker log: {})", self.worker_log_tail(r.id)))?;
        let held = Held { relays: Vec::new(), slots, tap: MigrationTap::default() };
        self.supervise(r.id, &r.spec, process.clone(), events, exit, held);
        info!(vm = %r.id, pid = process.pid, "live-migrated VM running here");
        Ok(())
    }

    /// The volume's next generation for the arriving VM. A concurrent change
    /// of the volume's record (another hand-over, the volume controller) is
    /// retried: after the commit this must not fail for a transient reason.
    async fn take_writer_slot(
        &self,
        vid: nodeos_types::VolumeId,
        holder: &str,
    ) -> Result<(WriterSlot, nodeos_types::records::VolumeRecord), nodeos_volumes::VolumeError> {
        let mut wait = Duration::from_millis(20);
        for _ in 0..20 {
            let taken = WriterSlot::acquire(
                &self.inner.volumes,
                &vid.to_string(),
                self.inner.cfg.node_id,
                holder,
                Takeover::OwnHolder,
            )
            .await;
            match taken {
                Err(nodeos_volumes::VolumeError::Conflict) => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
        Err(nodeos_volumes::VolumeError::Conflict)
    }

    async fn decide_incoming(&self, id: VmId, commit: bool) -> Result<(), ComputeError> {
        let (mut phase, decide) = {
            let mut m = self.incoming();
            let Some(inc) = m.get_mut(&id) else {
                return Err(ComputeError::Migration(format!("VM {id} is not arriving here")));
            };
            (inc.phase.clone(), inc.decide.take())
        };
        let Some(decide) = decide else {
            return Err(ComputeError::Migration(format!("VM {id} is already decided here")));
        };
        if commit {
            // The source commits after our worker said Restored; the event
            // saying so may trail a moment.
            let ready = tokio::time::timeout(PEER_TIMEOUT, phase.wait_for(|p| *p != Phase::Waiting))
                .await
                .map(|r| r.map(|p| p.clone()));
            if !matches!(&ready, Ok(Ok(Phase::Received))) {
                let why = phase.borrow().clone();
                self.incoming().remove(&id);
                return Err(ComputeError::Migration(format!("the incoming VM is not ready to run: {why:?}")));
            }
        }
        let (tx, rx) = oneshot::channel();
        let _ = decide.send((commit, tx));
        let r = rx.await.unwrap_or(Ok(()));
        self.incoming().remove(&id);
        r.map_err(ComputeError::Migration)
    }

    async fn commit_incoming(&self, id: VmId) -> Result<PeerReply, ComputeError> {
        // Only a committed record makes this node run the VM.
        let r = self.resolve(&id.to_string()).await?;
        if r.node != self.inner.cfg.node_id {
            return Err(ComputeError::Migration(format!(
                "VM {id}'s record does not name this node; not running it"
            )));
        }
        self.decide_incoming(id, true).await?;
        Ok(PeerReply::Done)
    }

    async fn abort_incoming(&self, id: VmId) {
        if let Err(e) = self.decide_incoming(id, false).await {
            tracing::debug!(vm = %id, error = %e, "abort of an incoming migration found nothing to drop");
        }
        self.incoming().remove(&id);
    }
}

/// A plain TCP migration stream as the worker reads it: blocking, with timeouts.
fn worker_stream(s: std::net::TcpStream) -> Result<OwnedFd, ComputeError> {
    s.set_nonblocking(false).map_err(io("migration stream"))?;
    s.set_nodelay(true).map_err(io("migration stream"))?;
    s.set_read_timeout(Some(STREAM_TIMEOUT)).map_err(io("migration stream"))?;
    s.set_write_timeout(Some(STREAM_TIMEOUT)).map_err(io("migration stream"))?;
    Ok(s.into())
}

/// A TLS migration stream for the worker: the node keeps the TLS session and
/// relays it through a socket pair, so no credential enters the worker. The
/// worker's end, blocking with timeouts.
fn through_tls<S>(tls: S) -> Result<OwnedFd, ComputeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (worker, node) = std::os::unix::net::UnixStream::pair().map_err(io("migration socket pair"))?;
    node.set_nonblocking(true).map_err(io("migration socket pair"))?;
    let mut node = tokio::net::UnixStream::from_std(node).map_err(io("migration socket pair"))?;
    worker.set_read_timeout(Some(STREAM_TIMEOUT)).map_err(io("migration stream"))?;
    worker.set_write_timeout(Some(STREAM_TIMEOUT)).map_err(io("migration stream"))?;
    tokio::spawn(async move {
        let mut tls = tls;
        if let Err(e) =
            tokio::io::copy_bidirectional_with_sizes(&mut node, &mut tls, 256 * 1024, 256 * 1024).await
        {
            tracing::debug!(error = %e, "migration stream relay ended");
        }
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    });
    Ok(worker.into())
}
