//! [`Compute`]: this node's VMs: their records in meta and their live workers.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use nodeos_block::volumes::{VolumeError, Volumes};
use nodeos_meta::command::{Compare, Op, Txn};
use nodeos_meta::{Command, Consistency, MetaError, MetaHandle};
use nodeos_network::Networks;
use nodeos_network::networks::{NetworkError, NewPort};
use nodeos_switch::switch::{SwitchError, SwitchHandle};
use nodeos_types::auth::PoolKey;
use nodeos_types::net::MacAddr;
use nodeos_types::records::{
    PortKind, VMS_PREFIX, VmRecord, VmSpec, VmState, VolumeRecord, vm_key, vm_name_key, volume_key,
};
use nodeos_types::{NodeId, VmId, unix_millis};
use nodeos_types::{PortId, VolumeId};
use nodeos_vmm::config::{DiskConfig, NicConfig, VolumeDisk, WorkerConfig};
use nodeos_vmm::control::{StopReason, ToWorker, WorkerEvent};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::process::{self, ProcessError, WorkerProcess};
use crate::spec::{self, SpecError};
use crate::tap::{self, TapError};

/// How long a worker may take to build its VM and start vCPUs.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a VM start waits for the switch to learn of the VM's ports.
const PORT_WAIT: Duration = Duration::from_secs(5);
/// How long a control request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("no VM {0:?} in this pool")]
    NotFound(String),
    #[error("VM {vm} is {state}; cannot {op} it")]
    State { vm: String, state: &'static str, op: &'static str },
    #[error("a VM named {0:?} already exists")]
    NameTaken(String),
    #[error("VM {vm} lives on node {node}")]
    Elsewhere { vm: String, node: NodeId },
    #[error("metadata store")]
    Meta(#[source] Box<MetaError>),
    #[error("VM worker")]
    Worker(#[from] ProcessError),
    #[error("network tap")]
    Tap(#[from] TapError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("stored VM record {0} does not decode")]
    Record(String),
    #[error("volume disk")]
    Volume(#[source] Box<VolumeError>),
    #[error("network port")]
    Network(#[source] Box<NetworkError>),
    #[error("nics[{0}]: a NIC plugs into a network or a tap, once")]
    NicNetwork(usize),
    #[error("cannot plug a NIC into the switch")]
    Switch(#[source] SwitchError),
}

impl From<NetworkError> for ComputeError {
    fn from(e: NetworkError) -> Self {
        ComputeError::Network(Box::new(e))
    }
}

/// A NIC that plugs into a pool network: its port is made with the VM (on
/// the VM's node, with the NIC's MAC) and deleted with it.
#[derive(Debug, Clone)]
pub struct NicNetwork {
    /// Index into the spec's NICs.
    pub nic: usize,
    /// Network name or id.
    pub network: String,
    pub ip: Option<std::net::Ipv4Addr>,
    pub security_groups: Vec<String>,
    pub port_security: bool,
}

impl From<VolumeError> for ComputeError {
    fn from(e: VolumeError) -> Self {
        ComputeError::Volume(Box::new(e))
    }
}

impl From<MetaError> for ComputeError {
    fn from(e: MetaError) -> Self {
        ComputeError::Meta(Box::new(e))
    }
}

#[derive(Debug, Clone)]
pub struct ComputeConfig {
    pub node_id: NodeId,
    /// Per-VM directories (console and worker logs) go here.
    pub state_dir: PathBuf,
    /// The binary that runs `vm-worker` (this binary).
    pub worker_exe: PathBuf,
    /// Handed to workers whose disks are volumes (replica handshake).
    pub pool_key: PoolKey,
}

/// What a running worker holds besides its process: NIC relays and volume
/// writer slots, given back when it ends.
struct Held {
    relays: Vec<tokio::task::JoinHandle<()>>,
    volumes: Vec<(VolumeId, u64)>,
}

/// A VM with a live worker on this node.
#[derive(Debug)]
struct Live {
    process: Arc<WorkerProcess>,
    /// Set before the node stops or kills the worker, so its exit is not a crash.
    stopping: Arc<AtomicBool>,
    /// Turns true once the exit has been recorded.
    done: watch::Receiver<bool>,
}

#[derive(Clone, Debug)]
pub struct Compute {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: ComputeConfig,
    meta: MetaHandle,
    volumes: Volumes,
    networks: Networks,
    switch: SwitchHandle,
    live: Mutex<HashMap<VmId, Live>>,
    locks: Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ComputeError {
    let what = what.into();
    move |source| ComputeError::Io { what, source }
}

fn describe_exit(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("worker exited with code {c}"),
            (None, Some(sig)) => {
                let name = nix::sys::signal::Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("unknown");
                format!("worker killed by signal {sig} ({name})")
            }
            _ => "worker ended".into(),
        },
        Err(e) => format!("worker status unknown: {e}"),
    }
}

impl Compute {
    /// Starts the supervisor. VMs recorded as running on this node have lost
    /// their workers with the previous node process: they are marked crashed.
    pub fn new(
        cfg: ComputeConfig,
        meta: MetaHandle,
        volumes: Volumes,
        networks: Networks,
        switch: SwitchHandle,
    ) -> Self {
        let c = Compute {
            inner: Arc::new(Inner {
                cfg,
                meta,
                volumes,
                networks,
                switch,
                live: Mutex::default(),
                locks: Mutex::default(),
            }),
        };
        tokio::spawn(c.clone().reconcile());
        c
    }

    async fn reconcile(self) {
        loop {
            match self.mark_orphans_crashed().await {
                Ok(()) => return,
                Err(e) => tracing::debug!(error = %e, "VM records not reconciled yet; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    async fn mark_orphans_crashed(&self) -> Result<(), ComputeError> {
        for mut r in self.list().await? {
            let live = self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&r.id);
            if r.node == self.inner.cfg.node_id
                && !live
                && matches!(
                    r.state,
                    VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
                )
            {
                warn!(vm = %r.id, name = %r.name, "VM was running when this node stopped; marking it crashed");
                r.state = VmState::Crashed;
                r.reason = "the node restarted while the VM ran; its worker died with it".into();
                self.save(&mut r).await?;
            }
        }
        Ok(())
    }

    fn lock_for(&self, id: VmId) -> Arc<tokio::sync::Mutex<()>> {
        self.inner.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_default().clone()
    }

    async fn save(&self, r: &mut VmRecord) -> Result<(), ComputeError> {
        r.updated_at_ms = unix_millis();
        let v = serde_json::to_vec(r).map_err(|_| ComputeError::Record(r.id.to_string()))?;
        self.inner.meta.write(Command::put(vm_key(r.id), v)).await?;
        Ok(())
    }

    /// Every VM of the pool (linearizable).
    pub async fn list(&self) -> Result<Vec<VmRecord>, ComputeError> {
        let (kvs, _) = self.inner.meta.range(VMS_PREFIX, 0, Consistency::Linearizable).await?;
        kvs.into_iter()
            .map(|kv| serde_json::from_slice(&kv.value).map_err(|_| ComputeError::Record(kv.key)))
            .collect()
    }

    /// Finds a VM by id or name (linearizable).
    pub async fn resolve(&self, vm: &str) -> Result<VmRecord, ComputeError> {
        let meta = &self.inner.meta;
        // An id first; a name may also look like an id, so fall back to names.
        if let Ok(id) = vm.parse::<VmId>() {
            let (kv, _) = meta.get(&vm_key(id), Consistency::Linearizable).await?;
            if let Some(kv) = kv {
                return serde_json::from_slice(&kv.value).map_err(|_| ComputeError::Record(kv.key));
            }
        }
        let (kv, _) = meta.get(&vm_name_key(vm), Consistency::Linearizable).await?;
        let kv = kv.ok_or_else(|| ComputeError::NotFound(vm.to_owned()))?;
        let id: VmId = std::str::from_utf8(&kv.value)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ComputeError::Record(kv.key.clone()))?;
        let (kv, _) = meta.get(&vm_key(id), Consistency::Linearizable).await?;
        let kv = kv.ok_or_else(|| ComputeError::NotFound(vm.to_owned()))?;
        serde_json::from_slice(&kv.value).map_err(|_| ComputeError::Record(kv.key))
    }

    pub fn worker_pid(&self, id: VmId) -> Option<u32> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|l| l.process.pid)
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.cfg.node_id
    }

    fn vm_dir(&self, id: VmId) -> PathBuf {
        self.inner.cfg.state_dir.join(id.to_string())
    }

    /// The serial console log of a VM of this node.
    pub fn console_path(&self, id: VmId) -> PathBuf {
        self.vm_dir(id).join("console.log")
    }

    /// Records a new, stopped VM on this node. Names are unique in the pool.
    pub async fn create(
        &self,
        name: &str,
        mut spec: VmSpec,
        nets: Vec<NicNetwork>,
    ) -> Result<VmRecord, ComputeError> {
        let id = VmId::random();
        let mut seen = std::collections::BTreeSet::new();
        for n in &nets {
            let ok = spec.nics.get(n.nic).is_some_and(|s| s.tap.is_empty() && s.port.is_none());
            if !ok || !seen.insert(n.nic) {
                return Err(ComputeError::NicNetwork(n.nic));
            }
        }
        // Ports are recorded only for a spec that passes every other check;
        // mark those NICs as network NICs for the check.
        for n in &nets {
            spec.nics[n.nic].port = Some(PortId(0));
        }
        spec::check(name, &spec)?;
        let mut made = Vec::new();
        for n in &nets {
            let mac = spec.nics[n.nic]
                .mac
                .parse::<MacAddr>()
                .map_err(|_| SpecError::Mac { index: n.nic, mac: spec.nics[n.nic].mac.clone() })?;
            let port = self
                .inner
                .networks
                .create_port(NewPort {
                    network: n.network.clone(),
                    node: self.inner.cfg.node_id,
                    kind: PortKind::Vm { vm: id, nic: u8::try_from(n.nic).unwrap_or(u8::MAX) },
                    mac: Some(mac),
                    ip: n.ip,
                    security_groups: n.security_groups.clone(),
                    port_security: n.port_security,
                })
                .await;
            match port {
                Ok(p) => {
                    spec.nics[n.nic].port = Some(p.id);
                    made.push(p.id);
                }
                Err(e) => {
                    self.delete_ports(&made).await;
                    return Err(e.into());
                }
            }
        }
        let created = self.record_new(id, name, spec).await;
        if created.is_err() {
            self.delete_ports(&made).await;
        }
        created
    }

    /// Hands a NIC socket to the switch, waiting a moment for the switch to
    /// learn of a port made just before.
    async fn attach_port(&self, port: PortId, fd: OwnedFd) -> Result<(), ComputeError> {
        let deadline = tokio::time::Instant::now() + PORT_WAIT;
        let mut fd = Some(fd);
        loop {
            let Some(f) = fd.take() else { return Err(ComputeError::Switch(SwitchError::UnknownPort(port))) };
            match self.inner.switch.attach(port, f) {
                Ok(()) => return Ok(()),
                Err((SwitchError::UnknownPort(_), back)) if tokio::time::Instant::now() < deadline => {
                    fd = Some(back);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err((e, _)) => return Err(ComputeError::Switch(e)),
            }
        }
    }

    fn detach_ports(&self, ports: &[PortId]) {
        for p in ports {
            self.inner.switch.detach(*p);
        }
    }

    async fn delete_ports(&self, ports: &[PortId]) {
        for p in ports {
            if let Err(e) = self.inner.networks.delete_port(&p.to_string()).await {
                warn!(port = %p, error = %nodeos_types::error_chain(&e), "port left behind");
            }
        }
    }

    async fn record_new(&self, id: VmId, name: &str, spec: VmSpec) -> Result<VmRecord, ComputeError> {
        let now = unix_millis();
        let r = VmRecord {
            id,
            name: name.to_owned(),
            spec,
            node: self.inner.cfg.node_id,
            state: VmState::Stopped,
            reason: "created".into(),
            created_at_ms: now,
            updated_at_ms: now,
        };
        let v = serde_json::to_vec(&r).map_err(|_| ComputeError::Record(r.id.to_string()))?;
        let txn = Txn {
            compares: vec![Compare::ModRevision { key: vm_name_key(name), equals: 0 }],
            success: vec![
                Op::Put { key: vm_name_key(name), value: r.id.to_string().into_bytes() },
                Op::Put { key: vm_key(r.id), value: v },
            ],
            failure: vec![],
        };
        let resp = self.inner.meta.write(Command::Txn(txn)).await?;
        if !resp.succeeded {
            return Err(ComputeError::NameTaken(name.to_owned()));
        }
        info!(vm = %r.id, name = %r.name, "VM created");
        Ok(r)
    }

    fn here(&self, r: &VmRecord) -> Result<(), ComputeError> {
        if r.node != self.inner.cfg.node_id {
            return Err(ComputeError::Elsewhere { vm: r.id.to_string(), node: r.node });
        }
        Ok(())
    }

    /// Spawns the VM's worker and waits until its vCPUs run.
    pub async fn start(&self, vm: &str) -> Result<VmRecord, ComputeError> {
        let mut r = self.resolve(vm).await?;
        let lock = self.lock_for(r.id);
        let _held = lock.lock().await;
        let mut r2 = self.resolve(&r.id.to_string()).await?;
        std::mem::swap(&mut r, &mut r2);
        self.here(&r)?;
        if !matches!(r.state, VmState::Stopped | VmState::Crashed) {
            return Err(ComputeError::State { vm: r.id.to_string(), state: r.state.as_str(), op: "start" });
        }
        spec::check_memory(r.spec.memory_mib)?;
        let dir = self.vm_dir(r.id);
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;

        // NIC plumbing first: a tap that cannot be opened fails the start before any process exists.
        let mut nic_cfgs = Vec::new();
        let mut worker_fds: Vec<OwnedFd> = Vec::new();
        let mut relays = Vec::new();
        let mut switch_ports = Vec::new();
        for (i, n) in r.spec.nics.iter().enumerate() {
            let mac = spec::parse_mac(&n.mac).ok_or(SpecError::Mac { index: i, mac: n.mac.clone() })?;
            let (node_end, worker_end) =
                socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
                    .map_err(|e| io("cannot create a NIC socket")(e.into()))?;
            nic_cfgs.push(NicConfig { mac, fd_index: worker_fds.len() });
            worker_fds.push(worker_end);
            match n.port {
                Some(port) => {
                    if let Err(e) = self.attach_port(port, node_end).await {
                        self.detach_ports(&switch_ports);
                        return Err(e);
                    }
                    switch_ports.push(port);
                }
                None => relays.push((tap::open(&n.tap)?, node_end, n.tap.clone())),
            }
        }
        // Volume disks: take each volume's writer generation (fencing any
        // older writer, e.g. this VM's crashed worker) before the worker runs.
        let mut disk_cfgs = Vec::new();
        let mut held: Vec<(VolumeId, u64)> = Vec::new();
        for d in &r.spec.disks {
            let Some(vid) = d.volume else {
                disk_cfgs.push(DiskConfig {
                    path: d.path.clone().into(),
                    read_only: d.read_only,
                    volume: None,
                });
                continue;
            };
            match self.volume_disk(r.id, vid, d.read_only).await {
                Ok((disk, generation)) => {
                    if generation > 0 {
                        held.push((vid, generation));
                    }
                    disk_cfgs.push(DiskConfig {
                        path: PathBuf::new(),
                        read_only: d.read_only,
                        volume: Some(disk),
                    });
                }
                Err(e) => {
                    self.release_volumes(&held).await;
                    return Err(e);
                }
            }
        }
        let config = WorkerConfig {
            vm_id: r.id.to_string(),
            vcpus: r.spec.vcpus,
            memory_mib: r.spec.memory_mib,
            kernel: r.spec.kernel.clone().into(),
            initrd: r.spec.initrd.clone().map(Into::into),
            cmdline: r.spec.cmdline.clone(),
            disks: disk_cfgs,
            nics: nic_cfgs,
            console_log: self.console_path(r.id),
        };
        let log_path = dir.join("worker.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("cannot open {}", log_path.display())))?;
        let spawned = process::spawn(&self.inner.cfg.worker_exe, config, worker_fds, log)?;
        let relay_tasks: Vec<_> = relays
            .into_iter()
            .map(|(t, s, name)| {
                tokio::spawn(async move {
                    match tap::relay(t, s, name.clone()).await {
                        Ok(st) => info!(tap = %name, to_tap = st.to_tap, to_vm = st.to_vm, dropped = st.dropped, "NIC relay ended"),
                        Err(e) => warn!(tap = %name, error = %e, "NIC relay failed"),
                    }
                })
            })
            .collect();
        let process = spawned.process.clone();
        let stopping = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = watch::channel(false);
        r.state = VmState::Starting;
        r.reason = String::new();
        let started = WorkerProcess::wait_started(spawned.started, START_TIMEOUT).await;
        if let Err(e) = started {
            // Nothing may be left behind: kill, reap, stop relays.
            process.kill();
            let status = spawned.exit.await.unwrap_or_else(|_| Err(std::io::Error::other("waiter gone")));
            for t in relay_tasks {
                t.abort();
            }
            self.detach_ports(&switch_ports);
            let why = match &e {
                ProcessError::Refused(msg) => msg.clone(),
                other => format!("{other} ({})", describe_exit(&status)),
            };
            r.state = VmState::Stopped;
            r.reason = format!("start failed: {why}");
            let _ = self.save(&mut r).await;
            self.release_volumes(&held).await;
            return Err(e.into());
        }
        // From here the monitor owns the worker's end, whatever happens next.
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).insert(
            r.id,
            Live { process: process.clone(), stopping: stopping.clone(), done: done_rx.clone() },
        );
        for vid in r.spec.disks.iter().filter_map(|d| d.volume) {
            let opened = held.iter().find(|(v, _)| *v == vid).map(|(_, g)| *g);
            tokio::spawn(self.clone().follow_volume(r.id, vid, opened, process.clone(), done_rx.clone()));
        }
        tokio::spawn(self.clone().monitor(
            r.id,
            spawned.events,
            spawned.exit,
            stopping.clone(),
            Held { relays: relay_tasks, volumes: held },
            done_tx,
        ));
        r.state = VmState::Running;
        r.reason = String::new();
        if let Err(e) = self.save(&mut r).await {
            // A VM the pool cannot see running must not run: stop it again.
            warn!(vm = %r.id, error = %e, "cannot record the VM as running; stopping it");
            stopping.store(true, Ordering::SeqCst);
            process.kill();
            let mut done = done_rx;
            let _ = done.wait_for(|d| *d).await;
            return Err(e);
        }
        info!(vm = %r.id, name = %r.name, pid = process.pid, "VM running");
        Ok(r)
    }

    /// Watches one worker until it exits, then records how it ended.
    /// A volume disk's worker config; for a writable disk, takes the
    /// volume's writer slot (a new generation). Answers the generation (0 for
    /// read-only).
    async fn volume_disk(
        &self,
        vm: VmId,
        vid: VolumeId,
        read_only: bool,
    ) -> Result<(VolumeDisk, u64), ComputeError> {
        let volumes = &self.inner.volumes;
        let holder = format!("vm {vm}");
        let rec = if read_only {
            volumes.get(&vid.to_string()).await?.0
        } else {
            match volumes.open_writer(&vid.to_string(), self.inner.cfg.node_id, &holder, false).await {
                Ok(r) => r,
                // This VM's own earlier worker (crashed, or its node died):
                // take over and fence it.
                Err(VolumeError::InUse { holder: h, .. }) if h == holder => {
                    volumes.open_writer(&vid.to_string(), self.inner.cfg.node_id, &holder, true).await?
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut layout = volumes.layout(&rec).await?;
        if read_only {
            layout.generation = 0;
        }
        let generation = layout.generation;
        let disk = VolumeDisk {
            layout,
            pool_key: self.inner.cfg.pool_key.derived_bytes(),
            node: self.inner.cfg.node_id,
        };
        Ok((disk, generation))
    }

    /// Hands a running worker every change of one of its volumes' layout
    /// (copies rebuilt elsewhere, growth, snapshots) until the worker ends.
    /// `opened` is the generation the worker opened the volume with.
    async fn follow_volume(
        self,
        vm: VmId,
        vid: VolumeId,
        opened: Option<u64>,
        process: Arc<WorkerProcess>,
        mut done: watch::Receiver<bool>,
    ) {
        use futures::StreamExt;
        let volumes = self.inner.volumes.clone();
        let mut events = Box::pin(volumes.meta().watch(0, volume_key(vid)));
        loop {
            let ev = tokio::select! {
                _ = done.wait_for(|d| *d) => return,
                ev = events.next() => ev,
            };
            let record = match ev {
                None => return,
                Some(Ok(ev)) if ev.kv.key == volume_key(vid) && !ev.kv.value.is_empty() => {
                    serde_json::from_slice::<VolumeRecord>(&ev.kv.value).ok()
                }
                Some(Ok(_)) => None,
                Some(Err(_)) => {
                    // Behind the watch history: read the record now and go on from there.
                    events = Box::pin(volumes.meta().watch(0, volume_key(vid)));
                    volumes.get(&vid.to_string()).await.ok().map(|(r, _)| r)
                }
            };
            let Some(rec) = record else { continue };
            let own = opened.is_some() && rec.writer.as_ref().map(|w| w.token) == opened;
            let layout = match volumes.layout(&rec).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(vm = %vm, volume = %vid, error = %nodeos_types::error_chain(&e), "cannot follow the volume");
                    continue;
                }
            };
            let sent = process
                .request(|seq| ToWorker::VolumeLayout { seq, layout: layout.clone(), own }, REQUEST_TIMEOUT)
                .await;
            if let Err(e) = sent {
                warn!(vm = %vm, volume = %vid, error = %e, "cannot hand the worker its volume's new layout");
            }
        }
    }

    /// Gives back the writer slots a worker held.
    async fn release_volumes(&self, held: &[(VolumeId, u64)]) {
        for (vid, generation) in held {
            if let Err(e) = self.inner.volumes.close_writer(*vid, *generation).await {
                warn!(volume = %vid, error = %nodeos_types::error_chain(&e), "cannot release the volume's writer slot");
            }
        }
    }

    async fn monitor(
        self,
        id: VmId,
        mut events: tokio::sync::mpsc::Receiver<WorkerEvent>,
        exit: tokio::sync::oneshot::Receiver<std::io::Result<ExitStatus>>,
        stopping: Arc<AtomicBool>,
        held: Held,
        done: watch::Sender<bool>,
    ) {
        let Held { relays, volumes: held } = held;
        let mut reason: Option<StopReason> = None;
        tokio::pin!(exit);
        let status = loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(WorkerEvent::Stopped { reason: r }) => reason = Some(r),
                    Some(_) => {}
                    None => {
                        // Control socket closed: only the exit is left to see.
                        break (&mut exit).await.unwrap_or_else(|_| Err(std::io::Error::other("waiter gone")));
                    }
                },
                st = &mut exit => break st.unwrap_or_else(|_| Err(std::io::Error::other("waiter gone"))),
            }
        };
        for t in relays {
            t.abort();
        }
        self.release_volumes(&held).await;
        let asked = stopping.load(Ordering::SeqCst);
        let clean = status.as_ref().is_ok_and(|s| s.success());
        let (state, why) = match reason {
            Some(StopReason::GuestShutdown) if clean => {
                (VmState::Stopped, "the guest powered off".to_owned())
            }
            Some(StopReason::GuestReset) if clean => (VmState::Stopped, "the guest reset itself".to_owned()),
            Some(StopReason::Killed) if clean => (VmState::Stopped, "stopped".to_owned()),
            Some(StopReason::GuestCrash) => {
                (VmState::Crashed, format!("guest crashed; {}", describe_exit(&status)))
            }
            _ if asked => (VmState::Stopped, format!("stopped ({})", describe_exit(&status))),
            _ => (VmState::Crashed, describe_exit(&status)),
        };
        if state == VmState::Crashed {
            error!(vm = %id, reason = %why, "VM crashed");
        } else {
            info!(vm = %id, reason = %why, "VM stopped");
        }
        // The record must follow the process; retry while the pool has no leader.
        for attempt in 0..30 {
            match self.resolve(&id.to_string()).await {
                Ok(mut r) => {
                    r.state = state;
                    r.reason = why.clone();
                    match self.save(&mut r).await {
                        Ok(()) => break,
                        Err(e) => warn!(vm = %id, attempt, error = %e, "cannot record the VM's end yet"),
                    }
                }
                Err(ComputeError::NotFound(_)) => break,
                Err(e) => warn!(vm = %id, attempt, error = %e, "cannot record the VM's end yet"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Only now is the worker forgotten: until the record says how the VM
        // ended, readers see it running with its worker, never running without one.
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        let _ = done.send(true);
    }

    fn live(&self, id: VmId) -> Option<(Arc<WorkerProcess>, Arc<AtomicBool>, watch::Receiver<bool>)> {
        self.inner
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|l| (l.process.clone(), l.stopping.clone(), l.done.clone()))
    }

    /// Stops a VM: by asking the guest (then killing after `timeout`), or at once with `force`.
    pub async fn stop(&self, vm: &str, force: bool, timeout: Duration) -> Result<VmRecord, ComputeError> {
        let r = self.resolve(vm).await?;
        self.here(&r)?;
        let lock = self.lock_for(r.id);
        let _held = lock.lock().await;
        let Some((process, stopping, mut done)) = self.live(r.id) else {
            return Err(ComputeError::State { vm: r.id.to_string(), state: r.state.as_str(), op: "stop" });
        };
        stopping.store(true, Ordering::SeqCst);
        if force {
            process.kill();
        } else {
            if let Err(e) = process.request(|seq| ToWorker::RequestShutdown { seq }, REQUEST_TIMEOUT).await {
                warn!(vm = %r.id, error = %e, "graceful shutdown request failed; killing");
                process.kill();
            }
            if tokio::time::timeout(timeout, done.wait_for(|d| *d)).await.is_err() {
                warn!(vm = %r.id, ?timeout, "guest did not shut down in time; killing");
                process.kill();
            }
        }
        let _ = done.wait_for(|d| *d).await;
        self.resolve(&r.id.to_string()).await
    }

    async fn simple(
        &self,
        vm: &str,
        op: &'static str,
        from: VmState,
        to: VmState,
    ) -> Result<VmRecord, ComputeError> {
        let r = self.resolve(vm).await?;
        self.here(&r)?;
        let lock = self.lock_for(r.id);
        let _held = lock.lock().await;
        let mut r = self.resolve(&r.id.to_string()).await?;
        let live = self.live(r.id);
        let Some((process, _, _)) = live.filter(|_| r.state == from) else {
            return Err(ComputeError::State { vm: r.id.to_string(), state: r.state.as_str(), op });
        };
        match to {
            VmState::Paused => process.request(|seq| ToWorker::Pause { seq }, REQUEST_TIMEOUT).await?,
            _ => process.request(|seq| ToWorker::Resume { seq }, REQUEST_TIMEOUT).await?,
        }
        r.state = to;
        r.reason = String::new();
        self.save(&mut r).await?;
        Ok(r)
    }

    pub async fn pause(&self, vm: &str) -> Result<VmRecord, ComputeError> {
        self.simple(vm, "pause", VmState::Running, VmState::Paused).await
    }

    pub async fn resume(&self, vm: &str) -> Result<VmRecord, ComputeError> {
        self.simple(vm, "resume", VmState::Paused, VmState::Running).await
    }

    /// Removes a stopped or crashed VM: its records and its directory.
    pub async fn delete(&self, vm: &str) -> Result<(), ComputeError> {
        let r = self.resolve(vm).await?;
        self.here(&r)?;
        let lock = self.lock_for(r.id);
        let _held = lock.lock().await;
        let r = self.resolve(&r.id.to_string()).await?;
        if self.live(r.id).is_some() || !matches!(r.state, VmState::Stopped | VmState::Crashed) {
            return Err(ComputeError::State { vm: r.id.to_string(), state: r.state.as_str(), op: "delete" });
        }
        let txn = Txn {
            compares: vec![],
            success: vec![Op::Delete { key: vm_key(r.id) }, Op::Delete { key: vm_name_key(&r.name) }],
            failure: vec![],
        };
        self.inner.meta.write(Command::Txn(txn)).await?;
        let ports: Vec<PortId> = r.spec.nics.iter().filter_map(|n| n.port).collect();
        self.delete_ports(&ports).await;
        let dir = self.vm_dir(r.id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(format!("cannot remove {}", dir.display())))?;
        }
        self.inner.locks.lock().unwrap_or_else(|p| p.into_inner()).remove(&r.id);
        info!(vm = %r.id, name = %r.name, "VM deleted");
        Ok(())
    }

    /// Types into a running VM's serial console.
    pub async fn console_input(&self, id: VmId, bytes: Vec<u8>) -> Result<(), ComputeError> {
        let Some((process, _, _)) = self.live(id) else {
            return Err(ComputeError::State { vm: id.to_string(), state: "not running", op: "type into" });
        };
        process.request(|seq| ToWorker::ConsoleInput { seq, bytes }, REQUEST_TIMEOUT).await?;
        Ok(())
    }
}
