//! Our side: a live migration between the two nodes of a nodeos pool on
//! 127.0.0.1, driven through the gRPC API only.
//!
//! Steps: [`Nodeos::spawn_pool`] with two nodes; the guest ELF goes into the
//! pool with `ImageService.Upload` (a VM booted from a host file cannot move),
//! and the VM (1 vCPU, no disks, no NICs, `kernel: "image:<name>"`) is created
//! and started on node 0. Its console is followed two ways while it runs:
//! - through `VmService.Console` (`from_start`), as a user would: the stream
//!   of the node the VM leaves ends when its worker does, and the follower
//!   opens the console again on whichever node the VM's record names (the API
//!   does not forward a console; it names the owner). Every line is stamped on
//!   arrival.
//! - by tailing each node's `<data-dir>/vms/<id>/console.log` every
//!   [`TAIL_POLL`]. The `Console` RPC polls that same file every 50 ms, which
//!   would put a 50 ms floor under any stamp gap, while QEMU's serial socket
//!   hands each line over at once; the file tail times our side as finely as
//!   `SerialSocket` times QEMU's (bench-vmm reads the file for the same reason).
//!
//! After [`REPORTS_BEFORE`] pass reports, `VmService.Migrate` moves the VM to
//! the other node and its stream is read to `committed`. Then the VM must be
//! running on the destination, its console must go on there (both ways) for
//! [`WATCH_AFTER`] and at least [`REPORTS_AFTER`] reports, with passes
//! continuing from the source's, and no `CORRUPT` or `FAIL` line anywhere.
//! Everything (nodes, their workers, the followers) is stopped when the run
//! ends, whichever way; a worker that outlives its node fails the run.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nodeos_proto::v1::image_service_client::ImageServiceClient;
use nodeos_proto::v1::upload_image_request::Msg;
use nodeos_proto::v1::vm_service_client::VmServiceClient;
use nodeos_proto::v1::{
    ConsoleInput, CreateVmRequest, ImageKind, MigrateVmProgress, MigrateVmRequest, UploadImageChunk,
    UploadImageRequest, UploadImageStart, Vm, VmRef, VmSpec,
};
use tonic::codegen::tokio_stream;
use tonic::transport::Channel;

use super::qemu::{REPORTS_AFTER, REPORTS_BEFORE, WATCH_AFTER};
use super::serial::{
    TimedLine, dirty_rate_mib_s, is_problem, largest_reported_gap_ms, largest_stamp_gap_ms, pass_report,
};
use super::{DirtyCmdline, MigrationFigures};
use crate::nodeos::{Nodeos, NodeosCluster, PoolOptions, channel};
use crate::system::Cluster;
use crate::vmm::kvm_usable;

/// How often each node's console log file is read.
pub const TAIL_POLL: Duration = Duration::from_millis(1);
/// For the two nodes to form a pool and write their node records.
const FORM_LIMIT: Duration = Duration::from_secs(90);
/// From the Start RPC to the source's [`REPORTS_BEFORE`]th report.
const BOOT_LIMIT: Duration = Duration::from_secs(120);
/// From the Migrate RPC to `committed`.
const MIGRATE_LIMIT: Duration = Duration::from_secs(300);
/// From `committed` to the destination's [`REPORTS_AFTER`]th report.
const AFTER_LIMIT: Duration = Duration::from_secs(60);
/// A console stream that ended this soon is opened again only after a pause,
/// so a VM without a worker does not make the follower spin.
const QUICK_END: Duration = Duration::from_millis(100);
/// What the image is called in the pool.
const IMAGE_NAME: &str = "bench-migrate-guest";
/// Upload chunk size: the largest the API takes (a multiple of 4096).
const CHUNK: usize = 4 << 20;
/// Lines of each log kept in an error.
const LOG_LINES: usize = 60;

/// Moves the guest booted with `cmdline` (`mode=dirty`; `dirty_stamp_ms` is
/// added when missing) between the two nodes of a fresh pool, `downtime_limit_ms`
/// as the Migrate request's `downtime_ms`.
pub async fn migrate_nodeos(
    bin: &Path,
    guest: &Path,
    cmdline: &str,
    memory_mib: u64,
    downtime_limit_ms: u64,
) -> anyhow::Result<MigrationFigures> {
    Ok(run(bin, guest, cmdline, memory_mib, downtime_limit_ms).await?.figures)
}

/// A finished migration: its figures and what else was seen.
#[derive(Debug)]
pub struct Outcome {
    pub figures: MigrationFigures,
    /// The console log files as tailed on the source and destination node.
    pub source: Vec<TimedLine>,
    pub destination: Vec<TimedLine>,
    /// `downtime_ms_serial` as the `Console` RPC shows it (lines stamped on
    /// arrival through the API, which polls the log every 50 ms): what a user
    /// watching the console sees, not comparable with QEMU's socket.
    pub downtime_ms_serial_rpc: Option<f64>,
    /// Each `copying` report of the Migrate stream, in order.
    pub copying: Vec<MigrateVmProgress>,
    /// When the Migrate RPC was sent, since the console epoch.
    pub migrate_at: Duration,
}

/// [`migrate_nodeos`], keeping the consoles and the progress reports.
pub async fn run(
    bin: &Path,
    guest: &Path,
    cmdline: &str,
    memory_mib: u64,
    downtime_limit_ms: u64,
) -> anyhow::Result<Outcome> {
    let dirty = DirtyCmdline::parse(cmdline, memory_mib)?;
    if !bin.is_file() {
        bail!("no nodeos binary at {} (make release)", bin.display());
    }
    if !guest.is_file() {
        bail!("no guest at {} (make -C tests/guest)", guest.display());
    }
    if let Err(why) = kvm_usable() {
        bail!("the nodes need KVM: {why}");
    }
    let downtime_ms = u32::try_from(downtime_limit_ms)
        .ok()
        .filter(|&d| d > 0)
        .with_context(|| format!("downtime_limit_ms={downtime_limit_ms} must be in 1..={}", u32::MAX))?;
    let mut pool =
        Nodeos { bin: bin.to_owned() }.spawn_pool(&PoolOptions { nodes: 2, extra_args: Vec::new() })?;
    let mut run = Run::new(&mut pool, dirty).await?;
    let result = run.migrate(guest, memory_mib, downtime_ms).await;
    let workers = run.worker_pids.clone();
    let vm = run.vm.clone();
    let result = match result {
        Ok(out) => Ok(out),
        Err(e) => Err(e.context(format!("nodeos migration of VM {vm}\n{}", run.logs()))),
    };
    // The followers first (they read the nodes' files and API), then the nodes.
    drop(run);
    drop(pool);
    let leftovers = reap_workers(&workers).await;
    let out = result?;
    leftovers?;
    Ok(out)
}

/// One run's state: the pool, the VM, the followers of its console.
struct Run<'a> {
    pool: &'a mut NodeosCluster,
    dirty: DirtyCmdline,
    /// Node id → index in the pool (for its address and data dir).
    index_of: HashMap<String, usize>,
    ids: Vec<String>,
    vms: Vec<VmServiceClient<Channel>>,
    vm: String,
    epoch: Instant,
    tails: Vec<ConsoleTail>,
    follow: Option<ConsoleFollow>,
    worker_pids: Vec<u32>,
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.follow.take() {
            f.task.abort();
        }
    }
}

impl<'a> Run<'a> {
    /// Waits for both nodes and learns their ids.
    async fn new(pool: &'a mut NodeosCluster, dirty: DirtyCmdline) -> anyhow::Result<Self> {
        let status = pool.wait_all_healthy(FORM_LIMIT).await?;
        let addrs = pool.client_addrs();
        let mut index_of = HashMap::new();
        let mut ids = vec![String::new(); addrs.len()];
        for m in &status.members {
            if let Some(i) = addrs.iter().position(|a| *a == m.address) {
                index_of.insert(m.id.clone(), i);
                ids[i] = m.id.clone();
            }
        }
        if ids.iter().any(String::is_empty) {
            bail!("the pool status does not name every node: {status:?}");
        }
        let mut vms = Vec::new();
        for a in &addrs {
            vms.push(VmServiceClient::new(channel(a).await?));
        }
        Ok(Self {
            pool,
            dirty,
            index_of,
            ids,
            vms,
            vm: String::new(),
            epoch: Instant::now(),
            tails: Vec::new(),
            follow: None,
            worker_pids: Vec::new(),
        })
    }

    async fn migrate(&mut self, guest: &Path, memory_mib: u64, downtime_ms: u32) -> anyhow::Result<Outcome> {
        let addrs = self.pool.client_addrs();
        let image = upload(&addrs[0], guest).await?;
        let spec = VmSpec {
            vcpus: 1,
            memory_mib,
            kernel: format!("image:{IMAGE_NAME}"),
            initrd: String::new(),
            cmdline: self.dirty.cmdline.clone(),
            disks: vec![],
            nics: vec![],
            cloud_init: None,
        };
        let created = self.vms[0]
            .create(CreateVmRequest { ha: None, name: "bench-migrate".into(), spec: Some(spec) })
            .await
            .with_context(|| format!("VmService.Create (kernel image {})", image))?
            .into_inner();
        self.vm = created.id.clone();
        // Tail both nodes' console files from before the start: the file
        // appears with the worker.
        self.epoch = Instant::now();
        for i in 0..addrs.len() {
            let path = data_dir(self.pool, i).join("vms").join(&self.vm).join("console.log");
            self.tails.push(ConsoleTail::start(path, self.epoch)?);
        }
        let started =
            self.vms[0].start(VmRef { vm: self.vm.clone() }).await.context("VmService.Start")?.into_inner();
        let src = self.node_index(&started)?;
        self.note_worker(&started);
        let nodes: HashMap<String, String> =
            self.index_of.iter().map(|(id, &i)| (id.clone(), addrs[i].clone())).collect();
        self.follow = Some(ConsoleFollow::start(self.vm.clone(), nodes, self.vms[0].clone(), self.epoch));

        self.wait_reports(Some(&self.ids[src].clone()), REPORTS_BEFORE, BOOT_LIMIT, "before the move")
            .await?;
        let dst = 1 - src;
        let migrate_at = self.epoch.elapsed();
        let (committed, copying) = self.migrate_call(src, dst, downtime_ms).await?;

        let vm = self.get().await?;
        if self.node_index(&vm)? != dst || vm.state != "running" || !vm.migrating_to.is_empty() {
            bail!(
                "after the committed move the VM is {} on node {} (migrating_to {:?}); wanted running on {}",
                vm.state,
                vm.node_id,
                vm.migrating_to,
                self.ids[dst]
            );
        }
        self.note_worker(&vm);
        let done = Instant::now();
        self.wait_reports(Some(&self.ids[dst].clone()), REPORTS_AFTER, AFTER_LIMIT, "after the move").await?;
        let watched = done.elapsed();
        if watched < WATCH_AFTER {
            tokio::time::sleep(WATCH_AFTER - watched).await;
        }
        self.check().await?;
        let vm = self.get().await?;
        if self.node_index(&vm)? != dst || vm.state != "running" {
            bail!("{WATCH_AFTER:?} after the move the VM is {} on node {}", vm.state, vm.node_id);
        }

        let (source, destination) = (self.tails[src].lines(), self.tails[dst].lines());
        check_continued(&source, &destination)?;
        let rpc = self.follow.as_ref().map(ConsoleFollow::segments).unwrap_or_default();
        let rpc_sides: Vec<&[TimedLine]> = rpc.iter().map(|s| s.lines.as_slice()).collect();
        let stamp_ms = self.dirty.stamp_ms as f64;
        let gap = largest_stamp_gap_ms(&[&source, &destination], migrate_at)
            .context("no two dirty stamps after the Migrate request")?;
        let figures = MigrationFigures {
            downtime_ms_host: committed.paused_ms as f64,
            downtime_ms_serial: gap - stamp_ms,
            downtime_ms_guest_tsc: largest_reported_gap_ms(&destination),
            total_ms: committed.total_ms as f64,
            bytes_sent: committed.bytes_sent,
            passes: Some(u64::from(committed.pass)),
            dirty_rate_mib_s: dirty_rate_mib_s(&source, migrate_at, self.dirty.dirty_mib)
                .context("fewer than two dirty pass reports before the migration")?,
        };
        Ok(Outcome {
            figures,
            source,
            destination,
            downtime_ms_serial_rpc: largest_stamp_gap_ms(&rpc_sides, migrate_at).map(|g| g - stamp_ms),
            copying,
            migrate_at,
        })
    }

    /// Sends the Migrate RPC to the source node and reads its stream to
    /// `committed`: that report and every `copying` one before it.
    async fn migrate_call(
        &mut self,
        src: usize,
        dst: usize,
        downtime_ms: u32,
    ) -> anyhow::Result<(MigrateVmProgress, Vec<MigrateVmProgress>)> {
        let req = MigrateVmRequest {
            vm: self.vm.clone(),
            to: self.ids[dst].clone(),
            downtime_ms,
            bandwidth_mib: 0,
            cancel: false,
        };
        let mut vms = self.vms[src].clone();
        let deadline = tokio::time::Instant::now() + MIGRATE_LIMIT;
        let mut stream = tokio::time::timeout_at(deadline, vms.migrate(req))
            .await
            .context("VmService.Migrate did not answer")?
            .context("VmService.Migrate")?
            .into_inner();
        let mut copying = Vec::new();
        let mut phases = Vec::new();
        loop {
            let next = tokio::time::timeout_at(deadline, stream.message()).await;
            let Ok(next) = next else {
                bail!(
                    "the migration did not commit within {MIGRATE_LIMIT:?}; phases {phases:?}, last {:?}",
                    copying.last()
                );
            };
            match next.context("the Migrate stream failed")? {
                Some(p) if p.phase == "committed" => return Ok((p, copying)),
                Some(p) => {
                    if phases.last() != Some(&p.phase) {
                        phases.push(p.phase.clone());
                    }
                    if p.phase == "copying" {
                        copying.push(p);
                    }
                }
                None => bail!(
                    "the Migrate stream ended without committing; phases {phases:?}, last {:?}",
                    copying.last()
                ),
            }
            self.check().await?;
        }
    }

    async fn get(&mut self) -> anyhow::Result<Vm> {
        Ok(self.vms[0].get(VmRef { vm: self.vm.clone() }).await.context("VmService.Get")?.into_inner())
    }

    fn node_index(&self, vm: &Vm) -> anyhow::Result<usize> {
        self.index_of
            .get(&vm.node_id)
            .copied()
            .with_context(|| format!("the VM is on an unknown node: {vm:?}"))
    }

    fn note_worker(&mut self, vm: &Vm) {
        if vm.worker_pid != 0 && !self.worker_pids.contains(&vm.worker_pid) {
            self.worker_pids.push(vm.worker_pid);
        }
    }

    /// Waits until the console, as the `Console` RPC shows it from `node`
    /// (any node when `None`) and as that node's file shows it, holds `n`
    /// pass reports.
    async fn wait_reports(
        &mut self,
        node: Option<&str>,
        n: usize,
        limit: Duration,
        when: &str,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check().await?;
            let rpc = self.follow.as_ref().map_or(0, |f| f.reports_from(node));
            let file = match node.and_then(|id| self.index_of.get(id)) {
                Some(&i) => reports(&self.tails[i].lines()),
                None => self.tails.iter().map(|t| reports(&t.lines())).max().unwrap_or(0),
            };
            if rpc >= n && file >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{when}: {rpc} (Console RPC) and {file} (console file) of {n} dirty pass reports from node {} \
                     within {limit:?}",
                    node.unwrap_or("any")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails on an exited node or a guest problem line, in a file or through the API.
    async fn check(&mut self) -> anyhow::Result<()> {
        self.pool.check_running()?;
        let files = self.tails.iter().map(|t| (t.path.display().to_string(), t.lines()));
        let rpc = self
            .follow
            .as_ref()
            .map(ConsoleFollow::segments)
            .unwrap_or_default()
            .into_iter()
            .map(|s| (format!("Console RPC on node {}", s.node), s.lines));
        for (what, lines) in files.chain(rpc) {
            if let Some(l) = lines.iter().find(|l| is_problem(&l.text)) {
                bail!("the guest reported {:?} ({what}); console:\n{}", l.text, text_of(&lines));
            }
        }
        Ok(())
    }

    /// Every node's log tail and every worker log of the VM, and the consoles.
    fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..self.pool.client_addrs().len() {
            let id = self.ids.get(i).map_or("?", String::as_str);
            out += &format!(
                "--- node n{i} ({id}) log {} ---\n{}\n",
                self.pool.log_path(i).display(),
                tail_of(&self.pool.log_path(i))
            );
            if !self.vm.is_empty() {
                let w = data_dir(self.pool, i).join("vms").join(&self.vm).join("worker.log");
                out += &format!("--- node n{i} worker log {} ---\n{}\n", w.display(), tail_of(&w));
            }
        }
        for t in &self.tails {
            let lines = t.lines();
            let keep = &lines[lines.len().saturating_sub(LOG_LINES)..];
            out += &format!(
                "--- console file {} (last {} lines) ---\n{}",
                t.path.display(),
                keep.len(),
                text_of(keep)
            );
        }
        out
    }
}

/// Node `i`'s data directory: [`Nodeos::spawn_pool`] lays it out as
/// `<dir>/n<i>`, beside its log `<dir>/n<i>.log`.
fn data_dir(pool: &NodeosCluster, i: usize) -> PathBuf {
    pool.log_path(i).with_extension("")
}

/// The last [`LOG_LINES`] lines of a file (or why it cannot be read).
fn tail_of(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(LOG_LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read: {e})"),
    }
}

fn text_of(lines: &[TimedLine]) -> String {
    lines.iter().map(|l| format!("{}\n", l.text)).collect()
}

fn reports(lines: &[TimedLine]) -> usize {
    lines.iter().filter(|l| pass_report(&l.text).is_some()).count()
}

/// Fails unless the destination's reports carry on from the source's: its
/// first pass comes after the source's last, every report is ok.
fn check_continued(source: &[TimedLine], destination: &[TimedLine]) -> anyhow::Result<()> {
    let passes = |lines: &[TimedLine]| lines.iter().filter_map(|l| pass_report(&l.text)).collect::<Vec<_>>();
    let (src, dst) = (passes(source), passes(destination));
    let last_src = src.iter().map(|r| r.pass).max().context("no pass report on the source")?;
    let first_dst = dst.first().context("no pass report on the destination")?;
    if first_dst.pass <= last_src {
        bail!("the destination reported pass {} after the source's pass {last_src}", first_dst.pass);
    }
    if let Some(bad) = src.iter().chain(&dst).find(|r| !r.ok) {
        bail!("pass {} was reported CORRUPT", bad.pass);
    }
    Ok(())
}

/// Uploads the guest ELF as the kernel image [`IMAGE_NAME`]; its id.
async fn upload(addr: &str, guest: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(guest).with_context(|| format!("reading {}", guest.display()))?;
    let start = UploadImageStart {
        name: IMAGE_NAME.into(),
        kind: ImageKind::Kernel as i32,
        total_bytes: bytes.len() as u64,
        sha256: String::new(),
    };
    let mut msgs = vec![UploadImageRequest { msg: Some(Msg::Start(start)) }];
    msgs.extend(
        bytes
            .chunks(CHUNK)
            .map(|c| UploadImageRequest { msg: Some(Msg::Chunk(UploadImageChunk { data: c.to_vec() })) }),
    );
    let mut images = ImageServiceClient::new(channel(addr).await?);
    let image = images
        .upload(tokio_stream::iter(msgs))
        .await
        .with_context(|| format!("ImageService.Upload of {}", guest.display()))?
        .into_inner();
    Ok(image.id)
}

/// After the pool is gone: every worker it ran must be gone too (they die
/// with their node). One still alive is killed, by its pid, and reported.
async fn reap_workers(pids: &[u32]) -> anyhow::Result<()> {
    let alive = |p: &u32| {
        std::fs::read(format!("/proc/{p}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("vm-worker"))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left: Vec<u32> = pids.iter().copied().filter(alive).collect();
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left.retain(alive);
    }
    if left.is_empty() {
        return Ok(());
    }
    for &p in &left {
        if let Ok(pid) = libc::pid_t::try_from(p) {
            // SAFETY: kill(2) takes no pointers; `p` was just seen running a
            // vm-worker of this run (a reused pid would not run one).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    bail!("vm-worker processes outlived their node and were killed: {left:?}")
}

/// Splits bytes into [`TimedLine`]s, each stamped with the time of the read
/// that completed it.
#[derive(Debug, Default)]
struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    fn push(&mut self, bytes: &[u8], at: Duration, out: &mut Vec<TimedLine>) {
        for &b in bytes {
            if b == b'\n' {
                let text = String::from_utf8_lossy(&self.partial);
                out.push(TimedLine { at, text: text.strip_suffix('\r').unwrap_or(&text).to_owned() });
                self.partial.clear();
            } else {
                self.partial.push(b);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking follower leaves whole lines behind: still worth reading.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A console log file tailed on a thread every [`TAIL_POLL`]; the thread
/// stops when this is dropped.
#[derive(Debug)]
struct ConsoleTail {
    path: PathBuf,
    lines: Arc<Mutex<Vec<TimedLine>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl ConsoleTail {
    fn start(path: PathBuf, epoch: Instant) -> anyhow::Result<Self> {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, l, s) = (path.clone(), lines.clone(), stop.clone());
        let reader = std::thread::Builder::new()
            .name("console-tail".into())
            .spawn(move || tail_file(&p, epoch, &l, &s))
            .context("spawning a console tail")?;
        Ok(Self { path, lines, stop, reader: Some(reader) })
    }

    fn lines(&self) -> Vec<TimedLine> {
        lock(&self.lines).clone()
    }
}

impl Drop for ConsoleTail {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

/// Reads `path` as it grows (it may not exist yet). A file that shrinks
/// (written anew) is read again from its start.
fn tail_file(path: &Path, epoch: Instant, lines: &Mutex<Vec<TimedLine>>, stop: &AtomicBool) {
    let mut file: Option<File> = None;
    let mut pos = 0u64;
    let mut split = LineSplitter::default();
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        if file.is_none() {
            file = File::open(path).ok();
            pos = 0;
        }
        if let Some(f) = file.as_mut() {
            let mut done = Vec::new();
            loop {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        split.push(&buf[..n], epoch.elapsed(), &mut done);
                        pos += n as u64;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            lock(lines).extend(done);
            if std::fs::metadata(path).is_ok_and(|m| m.len() < pos) {
                file = None;
                split = LineSplitter::default();
            }
        }
        std::thread::sleep(TAIL_POLL);
    }
}

/// The console as a user follows it through `VmService.Console`: one
/// [`Segment`] per stream opened, on whichever node owns the VM at the time.
struct ConsoleFollow {
    segments: Arc<Mutex<Vec<Segment>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What one `Console` stream delivered.
#[derive(Debug, Clone)]
struct Segment {
    /// The node that served it.
    node: String,
    lines: Vec<TimedLine>,
}

impl ConsoleFollow {
    /// Follows `vm`'s console; `nodes` maps node ids to API addresses, `vms`
    /// answers where the VM lives.
    fn start(
        vm: String,
        nodes: HashMap<String, String>,
        vms: VmServiceClient<Channel>,
        epoch: Instant,
    ) -> Self {
        let segments = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(follow(vm, nodes, vms, epoch, segments.clone()));
        Self { segments, task }
    }

    fn segments(&self) -> Vec<Segment> {
        lock(&self.segments).clone()
    }

    /// Pass reports in the streams served by `node` (any when `None`), the most in one stream.
    fn reports_from(&self, node: Option<&str>) -> usize {
        lock(&self.segments)
            .iter()
            .filter(|s| node.is_none_or(|n| s.node == n))
            .map(|s| reports(&s.lines))
            .max()
            .unwrap_or(0)
    }
}

async fn follow(
    vm: String,
    nodes: HashMap<String, String>,
    mut vms: VmServiceClient<Channel>,
    epoch: Instant,
    segments: Arc<Mutex<Vec<Segment>>>,
) {
    let mut clients: HashMap<String, VmServiceClient<Channel>> = HashMap::new();
    loop {
        let opened = Instant::now();
        let _ = follow_once(&vm, &nodes, &mut vms, &mut clients, epoch, &segments).await;
        if opened.elapsed() < QUICK_END {
            tokio::time::sleep(QUICK_END).await;
        }
    }
}

/// Opens the console on the VM's owner and reads it to its end.
async fn follow_once(
    vm: &str,
    nodes: &HashMap<String, String>,
    vms: &mut VmServiceClient<Channel>,
    clients: &mut HashMap<String, VmServiceClient<Channel>>,
    epoch: Instant,
    segments: &Mutex<Vec<Segment>>,
) -> anyhow::Result<()> {
    let owner = vms.get(VmRef { vm: vm.to_owned() }).await?.into_inner().node_id;
    let addr = nodes.get(&owner).with_context(|| format!("unknown node {owner}"))?;
    let client = match clients.get(addr) {
        Some(c) => c.clone(),
        None => {
            let c = VmServiceClient::new(channel(addr).await?);
            clients.insert(addr.clone(), c.clone());
            c
        }
    };
    let first = ConsoleInput { vm: vm.to_owned(), from_start: true, data: vec![] };
    let mut stream = client.clone().console(tokio_stream::iter([first])).await?.into_inner();
    let index = {
        let mut s = lock(segments);
        s.push(Segment { node: owner, lines: Vec::new() });
        s.len() - 1
    };
    let mut split = LineSplitter::default();
    while let Some(chunk) = stream.message().await? {
        let mut done = Vec::new();
        split.push(&chunk.data, epoch.elapsed(), &mut done);
        lock(segments)[index].lines.extend(done);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_reads() {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        s.push(b"\nNODEOS-GUEST: a\r\nNODEOS-GUEST: b", Duration::from_millis(1), &mut out);
        s.push(b"c\n", Duration::from_millis(7), &mut out);
        let got: Vec<(u64, &str)> = out.iter().map(|l| (l.at.as_millis() as u64, l.text.as_str())).collect();
        assert_eq!(got, [(1, ""), (1, "NODEOS-GUEST: a"), (7, "NODEOS-GUEST: bc")]);
    }

    #[test]
    fn a_tailed_file_is_timed_and_reread_when_written_anew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let epoch = Instant::now();
        let tail = ConsoleTail::start(path.clone(), epoch).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, "one\ntwo\nthr").unwrap();
        let wait = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while tail.lines().len() < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        wait(2);
        std::fs::write(&path, "x\n").unwrap();
        wait(3);
        let texts: Vec<String> = tail.lines().into_iter().map(|l| l.text).collect();
        assert_eq!(texts, ["one", "two", "x"]);
    }

    fn report(ms: u64, pass: u64, verdict: &str) -> TimedLine {
        TimedLine {
            at: Duration::from_millis(ms),
            text: format!("NODEOS-GUEST: dirty pass={pass} checksum=0123456789abcdef {verdict} max_gap_us=5"),
        }
    }

    #[test]
    fn the_destination_must_carry_on() {
        let src = [report(1, 1, "ok"), report(2, 2, "ok")];
        assert!(check_continued(&src, &[report(3, 3, "ok")]).is_ok());
        assert!(check_continued(&src, &[report(3, 2, "ok")]).is_err());
        assert!(check_continued(&src, &[report(3, 3, "CORRUPT")]).is_err());
        assert!(check_continued(&src, &[]).is_err());
    }
}
