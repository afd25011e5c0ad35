//! [`Compute`]: this node's VMs: their records in meta and their live workers.
//!
//! Starting a VM is five jobs, each its own function: fetch the pool images
//! it boots from into its directory ([`Compute::boot_files`]), plug its NICs
//! ([`Compute::plug_nics`]), open its disks ([`Compute::open_disks`]), launch
//! its worker and wait until the vCPUs run ([`Compute::launch`]), then watch
//! it ([`Compute::monitor`], and [`Compute::follow_volume`] per volume disk).
//! Whatever a step took is given back if a later step fails.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use nodeos_meta::MetaHandle;
use nodeos_network::Networks;
use nodeos_network::networks::NewPort;
use nodeos_switch::switch::{SwitchError, SwitchHandle};
use nodeos_types::auth::PoolKey;
use nodeos_types::net::MacAddr;
use nodeos_types::records::{
    IMAGE_REF_PREFIX, ImageKind, ImageRecord, PortKind, VmRecord, VmSpec, VmState, VolumeRecord, image_ref,
    volume_key,
};
use nodeos_types::{NodeId, PortId, VmId, VolumeId};
use nodeos_vmm::config::{DiskConfig, NicConfig, VolumeDisk, WorkerConfig};
use nodeos_vmm::control::{StopReason, ToWorker, WorkerEvent};
use nodeos_volumes::{Takeover, Volumes, WriterSlot};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::error::{ComputeError, io};
use crate::images::{ImageError, Images};
use crate::process::{self, Launcher, ProcessError, Spawned, WorkerProcess};
use crate::records::{self, VmRecords};
use crate::seed::Seed;
use crate::spec::{self, SpecError, SpecImages};
use crate::tap;

/// How long a worker may take to build its VM and start vCPUs.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a VM start waits for the switch to learn of the VM's ports.
const PORT_WAIT: Duration = Duration::from_secs(5);
/// How long a control request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the events a worker sent before it exited may take to arrive.
const EVENT_DRAIN: Duration = Duration::from_secs(1);

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

#[derive(Debug, Clone)]
pub struct ComputeConfig {
    pub node_id: NodeId,
    /// Per-VM directories (console and worker logs) go here.
    pub state_dir: PathBuf,
    /// Handed to workers whose disks are volumes (replica handshake).
    pub pool_key: PoolKey,
    /// The address other nodes reach this one at: incoming live migrations listen here.
    pub migration_address: std::net::IpAddr,
    /// Which host files VMs may be made of (`--host-images-dir`).
    pub host_paths: crate::spec::HostPaths,
    /// How this node reboots into another node image; `None` outside the
    /// image's PID 1 (it cannot take part in a rolling upgrade).
    pub image_reboot: Option<crate::upgrade::ImageReboot>,
    /// Makes each VM worker its TLS credential for the replica protocol;
    /// `None` on a plaintext (loopback) pool.
    pub worker_tls: Option<WorkerTlsIssuer>,
    /// Mutual TLS for migration streams between nodes (the node relays it
    /// to its worker); `None` on a plaintext (loopback) pool.
    pub tls: Option<nodeos_auth::tls::TlsState>,
}

/// Makes the TLS credential of the worker of a VM (by id); `None` when it cannot.
pub type IssueWorkerTls = dyn Fn(&str) -> Option<nodeos_vmm::config::WorkerTls> + Send + Sync;

/// Issues the credential of the worker of a VM (by id): see [`ComputeConfig::worker_tls`].
#[derive(Clone)]
pub struct WorkerTlsIssuer(pub std::sync::Arc<IssueWorkerTls>);

impl std::fmt::Debug for WorkerTlsIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerTlsIssuer")
    }
}

/// A VM's NICs, plugged: the worker's configs and socket ends, and the
/// node's ends (switch ports attached, taps to relay once the worker runs).
#[derive(Debug, Default)]
pub(crate) struct Nics {
    pub(crate) configs: Vec<NicConfig>,
    pub(crate) worker_fds: Vec<OwnedFd>,
    pub(crate) relays: Vec<(std::fs::File, OwnedFd, String)>,
    pub(crate) ports: Vec<PortId>,
}

/// A VM's disks, opened: the worker's configs and the writer slots held.
#[derive(Debug, Default)]
pub(crate) struct Disks {
    pub(crate) configs: Vec<DiskConfig>,
    pub(crate) slots: Vec<WriterSlot>,
}

/// The files a VM's worker boots: host paths as the spec gives them, or pool
/// images materialised into the VM's directory.
#[derive(Debug)]
pub(crate) struct BootFiles {
    pub(crate) kernel: PathBuf,
    pub(crate) initrd: Option<PathBuf>,
}

/// Who asked for a VM's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartedBy {
    Operator,
    /// The pool's HA controller.
    Ha,
}

/// A VM with a live worker on this node.
#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) process: Arc<WorkerProcess>,
    /// Set before the node stops or kills the worker, so its exit is not a crash.
    pub(crate) stopping: Arc<AtomicBool>,
    /// Turns true once the exit has been recorded.
    pub(crate) done: watch::Receiver<bool>,
    /// Where the worker's migration events go while a migration of this VM runs.
    pub(crate) migration: MigrationTap,
}

/// The sender of a running migration's worker events, set by the migration.
pub(crate) type MigrationTap = Arc<Mutex<Option<tokio::sync::mpsc::UnboundedSender<WorkerEvent>>>>;

/// What a running worker holds besides its process, given back when it ends.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) relays: Vec<tokio::task::JoinHandle<()>>,
    pub(crate) slots: Vec<WriterSlot>,
    /// Where migration events go (shared with the VM's `Live` entry).
    pub(crate) tap: MigrationTap,
}

#[derive(Clone, Debug)]
pub struct Compute {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) cfg: ComputeConfig,
    pub(crate) records: VmRecords,
    pub(crate) volumes: Volumes,
    pub(crate) images: Images,
    pub(crate) networks: Networks,
    pub(crate) switch: SwitchHandle,
    pub(crate) launcher: Arc<dyn Launcher>,
    pub(crate) live: Mutex<HashMap<VmId, Live>>,
    pub(crate) locks: Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
    /// VMs arriving by live migration, until they run or are dropped.
    pub(crate) incoming: crate::migration::IncomingMap,
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
        launcher: Arc<dyn Launcher>,
    ) -> Self {
        let c = Compute {
            inner: Arc::new(Inner {
                cfg,
                records: VmRecords::new(meta.clone()),
                images: Images::new(meta, volumes.clone()),
                volumes,
                networks,
                switch,
                launcher,
                live: Mutex::default(),
                locks: Mutex::default(),
                incoming: Mutex::default(),
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
            let live = self.live_map().contains_key(&r.id);
            if records::lost_with_node(&r, self.inner.cfg.node_id, live) {
                warn!(vm = %r.id, name = %r.name, "VM was running when this node stopped; marking it crashed");
                r.state = VmState::Crashed;
                r.reason = "the node restarted while the VM ran; its worker died with it".into();
                self.inner.records.save(&mut r).await?;
                self.release_orphan_writers(&r).await;
            }
        }
        Ok(())
    }

    /// Frees the volume writer slots a VM's worker held here when it died with
    /// the node, so a crashed VM is not left listed as its volumes' writer. A
    /// release takes the next generation: the dead worker could write nothing
    /// more anyway.
    async fn release_orphan_writers(&self, r: &VmRecord) {
        let holder = format!("vm {}", r.id);
        let me = self.inner.cfg.node_id;
        for vid in r.spec.disks.iter().filter(|d| !d.read_only).filter_map(|d| d.volume) {
            let vid = vid.to_string();
            let held = match self.inner.volumes.get(&vid).await {
                Ok((v, _)) => v.writer.is_some_and(|w| w.holder == holder && w.node == me),
                Err(e) => {
                    warn!(vm = %r.id, volume = %vid, error = %e, "cannot check a crashed VM's volume writer");
                    false
                }
            };
            if held {
                match self.inner.volumes.release(&vid).await {
                    Ok(v) => {
                        info!(vm = %r.id, volume = %vid, generation = v.generation, "crashed VM's volume writer released")
                    }
                    Err(e) => {
                        warn!(vm = %r.id, volume = %vid, error = %e, "cannot release a crashed VM's volume writer; `nodeos volume release` frees it")
                    }
                }
            }
        }
    }

    pub(crate) fn live_map(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Live>> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock_for(&self, id: VmId) -> Arc<tokio::sync::Mutex<()>> {
        self.inner.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_default().clone()
    }

    /// Every VM of the pool (linearizable).
    pub async fn list(&self) -> Result<Vec<VmRecord>, ComputeError> {
        self.inner.records.list().await
    }

    /// Finds a VM by id or name (linearizable).
    pub async fn resolve(&self, vm: &str) -> Result<VmRecord, ComputeError> {
        self.inner.records.resolve(vm).await
    }

    pub fn worker_pid(&self, id: VmId) -> Option<u32> {
        self.live_map().get(&id).map(|l| l.process.vm_pid())
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.cfg.node_id
    }

    /// The pool's guest images, which VMs boot from.
    pub fn images(&self) -> &Images {
        &self.inner.images
    }

    /// The pool's volumes, which VM disks may be.
    pub fn volumes(&self) -> &Volumes {
        &self.inner.volumes
    }

    pub(crate) fn vm_dir(&self, id: VmId) -> PathBuf {
        self.inner.cfg.state_dir.join(id.to_string())
    }

    /// The serial console log of a VM of this node.
    pub fn console_path(&self, id: VmId) -> PathBuf {
        self.vm_dir(id).join("console.log")
    }

    /// The cloud-init seed disk of a VM of this node, built at every start of
    /// a VM with cloud-init data and removed with the VM's directory.
    pub fn seed_path(&self, id: VmId) -> PathBuf {
        self.vm_dir(id).join("cidata.img")
    }

    /// Records a new, stopped VM on this node. Names are unique in the pool.
    /// With `ha.restart` it must be made of pool volumes and networks only.
    pub async fn create(
        &self,
        name: &str,
        mut spec: VmSpec,
        nets: Vec<NicNetwork>,
        ha: nodeos_types::records::VmHa,
    ) -> Result<VmRecord, ComputeError> {
        let id = VmId::random();
        crate::ha::check_ha(&ha)?;
        // Before anything is opened: the API names files of this node.
        spec::check_host_paths(&spec, &self.inner.cfg.host_paths)?;
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
        let images = SpecImages {
            kernel: self.find_image("--kernel", Some(&spec.kernel)).await?,
            initrd: self.find_image("--initrd", spec.initrd.as_deref()).await?,
        };
        spec::check(name, &spec, &images)?;
        if ha.restart {
            crate::ha::check_movable(&spec)?;
        }
        // The VM keeps the image it was created with, whatever is named so later.
        if let Some(k) = &images.kernel {
            spec.kernel = format!("{IMAGE_REF_PREFIX}{}", k.id);
        }
        if let Some(i) = &images.initrd {
            spec.initrd = Some(format!("{IMAGE_REF_PREFIX}{}", i.id));
        }
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
        let mut r = records::new_record(id, name, spec, self.inner.cfg.node_id);
        r.ha = ha;
        if let Err(e) = self.inner.records.insert(&r).await {
            self.delete_ports(&made).await;
            return Err(e);
        }
        info!(vm = %r.id, name = %r.name, "VM created");
        Ok(r)
    }

    /// The pool image `source` names (`image:<name or id>`), if it names one
    /// that exists; the spec check refuses a name that is not found.
    async fn find_image(
        &self,
        flag: &str,
        source: Option<&str>,
    ) -> Result<Option<ImageRecord>, ComputeError> {
        let Some(wanted) = source.and_then(image_ref) else { return Ok(None) };
        match self.inner.images.get(wanted).await {
            Ok(r) => Ok(Some(r)),
            Err(ImageError::NotFound(_)) => Ok(None),
            Err(e) => {
                Err(ComputeError::Image { what: format!("{flag} image {wanted:?}"), source: Box::new(e) })
            }
        }
    }

    /// Hands a NIC socket to the switch, waiting a moment for the switch to
    /// learn of a port made just before.
    pub(crate) async fn attach_port(&self, port: PortId, fd: OwnedFd) -> Result<(), ComputeError> {
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

    pub(crate) fn detach_ports(&self, ports: &[PortId]) {
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

    /// Hands a VM to node `to`: one compare-and-swap of its record `r`
    /// (loaded at `rev`, its state and reason already set by the caller) that
    /// moves its switch ports in the same transaction. `Ok(false)`: the record
    /// changed meanwhile; nothing was written.
    pub(crate) async fn hand_over(
        &self,
        r: &mut VmRecord,
        rev: u64,
        to: NodeId,
    ) -> Result<bool, ComputeError> {
        let ports: Vec<PortId> = r.spec.nics.iter().filter_map(|n| n.port).collect();
        let moves = self
            .inner
            .networks
            .port_moves(&ports, to)
            .await
            .map_err(|e| ComputeError::Network(Box::new(e)))?;
        r.node = to;
        r.migration = None;
        self.inner.records.swap(r, rev, moves).await
    }

    pub(crate) fn here(&self, r: &VmRecord) -> Result<(), ComputeError> {
        if r.node != self.inner.cfg.node_id {
            return Err(ComputeError::Elsewhere { vm: r.id.to_string(), node: r.node });
        }
        Ok(())
    }

    /// Spawns the VM's worker and waits until its vCPUs run.
    pub async fn start(&self, vm: &str) -> Result<VmRecord, ComputeError> {
        self.start_as(vm, StartedBy::Operator).await
    }

    /// A start, by an operator (which clears the VM's HA restart history) or
    /// by the pool's HA controller (only a crashed HA VM; the restart counts
    /// towards the flap guard, and a failed start leaves it crashed).
    pub(crate) async fn start_as(&self, vm: &str, by: StartedBy) -> Result<VmRecord, ComputeError> {
        let id = self.resolve(vm).await?.id;
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        // Read again under the lock: the first read only found the VM.
        let mut r = self.resolve(&id.to_string()).await?;
        self.here(&r)?;
        let startable = match by {
            StartedBy::Operator => matches!(r.state, VmState::Stopped | VmState::Crashed),
            StartedBy::Ha => r.state == VmState::Crashed && r.ha.restart,
        };
        if !startable {
            return Err(ComputeError::State { vm: r.id.to_string(), state: r.state.as_str(), op: "start" });
        }
        match by {
            StartedBy::Operator => r.ha_restarts.clear(),
            StartedBy::Ha => crate::ha::note_restart(&mut r, nodeos_types::unix_millis()),
        }
        spec::check_memory(r.spec.memory_mib)?;
        // Again: the node may have been restarted with another directory.
        spec::check_host_paths(&r.spec, &self.inner.cfg.host_paths)?;
        if self.in_maintenance().await? {
            return Err(ComputeError::Migration(format!(
                "node {} is in maintenance: no VM starts here until `nodeos node maintenance exit {}`",
                self.inner.cfg.node_id, self.inner.cfg.node_id
            )));
        }
        let dir = self.vm_dir(r.id);
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
        // Images first: they take nothing that must be given back.
        let boot = self.boot_files(&r).await?;
        let cpu_baseline = self.inner.records.cpu_baseline().await?;
        // Then NICs: a tap that cannot be opened fails the start before any disk is taken.
        let nics = self.plug_nics(&r).await?;
        let disks = match self.open_disks(&r).await {
            Ok(d) => d,
            Err(e) => {
                self.detach_ports(&nics.ports);
                return Err(e);
            }
        };
        self.launch(r, boot, cpu_baseline, nics, disks, by).await
    }

    /// The kernel and initramfs files of a VM: host paths as given; pool
    /// images read from their volumes into the VM's directory (once per
    /// image: a later start finds them there) and checked against their hash.
    pub(crate) async fn boot_files(&self, r: &VmRecord) -> Result<BootFiles, ComputeError> {
        let kernel = self.boot_file(r, "kernel", &r.spec.kernel, ImageKind::Kernel).await?;
        let initrd = match &r.spec.initrd {
            Some(i) => Some(self.boot_file(r, "initrd", i, ImageKind::Initrd).await?),
            None => None,
        };
        Ok(BootFiles { kernel, initrd })
    }

    async fn boot_file(
        &self,
        r: &VmRecord,
        field: &'static str,
        source: &str,
        kind: ImageKind,
    ) -> Result<PathBuf, ComputeError> {
        let Some(wanted) = image_ref(source) else { return Ok(PathBuf::from(source)) };
        let named = |image: &str, e: ImageError| ComputeError::Image {
            what: format!("{field} image {image}"),
            source: Box::new(e),
        };
        let images = &self.inner.images;
        let image = images.get(wanted).await.map_err(|e| named(wanted, e))?;
        if image.kind != kind {
            let e = ImageError::Kind {
                name: image.name.clone(),
                found: image.kind.as_str(),
                wanted: kind.as_str(),
            };
            return Err(named(&image.name, e));
        }
        images.materialise(&image, &self.vm_dir(r.id), field).await.map_err(|e| named(&image.name, e))
    }

    /// Makes each NIC's socket pair and plugs the node's end into the switch
    /// (network NICs) or opens its tap (tap NICs). On failure nothing stays plugged.
    pub(crate) async fn plug_nics(&self, r: &VmRecord) -> Result<Nics, ComputeError> {
        let mut nics = Nics::default();
        let plugged = async {
            for (i, n) in r.spec.nics.iter().enumerate() {
                let mac = spec::parse_mac(&n.mac).ok_or(SpecError::Mac { index: i, mac: n.mac.clone() })?;
                let (node_end, worker_end) = socket::socketpair(
                    AddressFamily::Unix,
                    SockType::SeqPacket,
                    None,
                    SockFlag::SOCK_CLOEXEC,
                )
                .map_err(|e| io("cannot create a NIC socket")(e.into()))?;
                nics.configs.push(NicConfig { mac, fd_index: nics.worker_fds.len() });
                nics.worker_fds.push(worker_end);
                match n.port {
                    Some(port) => {
                        self.attach_port(port, node_end).await?;
                        nics.ports.push(port);
                    }
                    None => nics.relays.push((tap::open(&n.tap)?, node_end, n.tap.clone())),
                }
            }
            Ok::<(), ComputeError>(())
        }
        .await;
        match plugged {
            Ok(()) => Ok(nics),
            Err(e) => {
                self.detach_ports(&nics.ports);
                Err(e)
            }
        }
    }

    /// The worker's disk configs: the spec's disks, then the cloud-init seed
    /// (read-only, last, so the spec's disks keep their names in the guest).
    /// The seed is written first, into the VM's directory. A writable volume
    /// disk takes the volume's writer slot (a new generation, fencing any
    /// older writer such as this VM's crashed worker) before the worker runs.
    /// On failure every slot taken is given back.
    pub(crate) async fn open_disks(&self, r: &VmRecord) -> Result<Disks, ComputeError> {
        let seed = match Seed::for_vm(r) {
            Some(seed) => {
                let path = self.seed_path(r.id);
                seed.write(&path)?;
                Some(DiskConfig { path, read_only: true, volume: None })
            }
            None => None,
        };
        let mut disks = Disks::default();
        for d in &r.spec.disks {
            let Some(vid) = d.volume else {
                disks.configs.push(DiskConfig {
                    path: d.path.clone().into(),
                    read_only: d.read_only,
                    volume: None,
                });
                continue;
            };
            match self.volume_disk(r.id, vid, d.read_only).await {
                Ok((disk, slot)) => {
                    disks.slots.extend(slot);
                    disks.configs.push(DiskConfig {
                        path: PathBuf::new(),
                        read_only: d.read_only,
                        volume: Some(disk),
                    });
                }
                Err(e) => {
                    Self::release_slots(std::mem::take(&mut disks.slots)).await;
                    return Err(e);
                }
            }
        }
        disks.configs.extend(seed);
        Ok(disks)
    }

    /// The TLS credential of `vm`'s worker, when the pool speaks TLS.
    pub(crate) fn worker_tls(&self, vm: &str) -> Option<nodeos_vmm::config::WorkerTls> {
        self.inner.cfg.worker_tls.as_ref().and_then(|issue| (issue.0)(vm))
    }

    /// A volume disk's worker config, and for a writable disk its writer slot.
    pub(crate) async fn volume_disk(
        &self,
        vm: VmId,
        vid: VolumeId,
        read_only: bool,
    ) -> Result<(VolumeDisk, Option<WriterSlot>), ComputeError> {
        let volumes = &self.inner.volumes;
        let (rec, slot) = if read_only {
            (volumes.get(&vid.to_string()).await?.0, None)
        } else {
            let holder = format!("vm {vm}");
            let (slot, rec) = WriterSlot::acquire(
                volumes,
                &vid.to_string(),
                self.inner.cfg.node_id,
                &holder,
                Takeover::OwnHolder,
            )
            .await?;
            (rec, Some(slot))
        };
        let layout = match volumes.layout(&rec).await {
            Ok(mut l) => {
                if read_only {
                    l.generation = 0;
                }
                l
            }
            Err(e) => {
                Self::release_slots(slot.into_iter().collect()).await;
                return Err(e.into());
            }
        };
        let disk = VolumeDisk {
            tls: self.worker_tls(&vm.to_string()),
            layout,
            pool_key: self.inner.cfg.pool_key.derived_bytes(),
            node: self.inner.cfg.node_id,
        };
        Ok((disk, slot))
    }

    /// Gives writer slots back (a worker ended, or a start failed).
    pub(crate) async fn release_slots(slots: Vec<WriterSlot>) {
        for slot in slots {
            let (volume, generation) = (slot.volume(), slot.generation());
            if let Err(e) = slot.release().await {
                warn!(volume = %volume, generation, error = %nodeos_types::error_chain(&e), "cannot release the volume's writer slot");
            }
        }
    }

    /// Launches the worker with its NICs and disks and waits until its vCPUs
    /// run; from then on [`Compute::monitor`] owns its end. A worker that
    /// does not start is killed and reaped, and everything is given back.
    async fn launch(
        &self,
        mut r: VmRecord,
        boot: BootFiles,
        cpu_baseline: Option<nodeos_types::cpu::CpuModel>,
        nics: Nics,
        disks: Disks,
        by: StartedBy,
    ) -> Result<VmRecord, ComputeError> {
        let config = WorkerConfig {
            vm_id: r.id.to_string(),
            vcpus: r.spec.vcpus,
            memory_mib: r.spec.memory_mib,
            kernel: boot.kernel,
            initrd: boot.initrd,
            cmdline: r.spec.cmdline.clone(),
            disks: disks.configs,
            nics: nics.configs,
            console_log: self.console_path(r.id),
            cpu_baseline,
        };
        let log_path = self.vm_dir(r.id).join("worker.log");
        let spawned = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("cannot open {}", log_path.display())))
            .and_then(|log| {
                Ok(process::spawn(self.inner.launcher.as_ref(), config, nics.worker_fds, log, None)?)
            });
        let Spawned { process, events, exit, started } = match spawned {
            Ok(s) => s,
            Err(e) => {
                self.detach_ports(&nics.ports);
                Self::release_slots(disks.slots).await;
                return Err(e);
            }
        };
        let relays: Vec<_> =
            nics.relays.into_iter().map(|(t, s, name)| tokio::spawn(relay(t, s, name))).collect();
        if let Err(e) = WorkerProcess::wait_started(started, START_TIMEOUT).await {
            // Nothing may be left behind: kill, reap, stop relays.
            process.kill();
            let status = exit.await.unwrap_or_else(|_| Err(std::io::Error::other("waiter gone")));
            for t in relays {
                t.abort();
            }
            self.detach_ports(&nics.ports);
            let why = match &e {
                ProcessError::Refused(msg) => msg.clone(),
                other => format!("{other} ({})", records::describe_exit(&status)),
            };
            r.state = match by {
                StartedBy::Operator => VmState::Stopped,
                // Still meant to run: the controller tries again.
                StartedBy::Ha => VmState::Crashed,
            };
            r.reason = format!("start failed: {why}");
            let _ = self.inner.records.save(&mut r).await;
            Self::release_slots(disks.slots).await;
            return Err(e.into());
        }
        let held = Held { relays, slots: disks.slots, tap: MigrationTap::default() };
        let (stopping, done_rx) = self.supervise(r.id, &r.spec, process.clone(), events, exit, held);
        r.state = VmState::Running;
        r.reason = String::new();
        if let Err(e) = self.inner.records.save(&mut r).await {
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

    /// Makes a started worker this node's live VM: its `Live` entry, a
    /// follower per volume disk, and the monitor that owns its end from here
    /// on, whatever happens next. Returns its stop flag and done signal.
    pub(crate) fn supervise(
        &self,
        id: VmId,
        spec: &VmSpec,
        process: Arc<WorkerProcess>,
        events: tokio::sync::mpsc::Receiver<WorkerEvent>,
        exit: tokio::sync::oneshot::Receiver<std::io::Result<std::process::ExitStatus>>,
        held: Held,
    ) -> (Arc<AtomicBool>, watch::Receiver<bool>) {
        let stopping = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = watch::channel(false);
        self.live_map().insert(
            id,
            Live {
                process: process.clone(),
                stopping: stopping.clone(),
                done: done_rx.clone(),
                migration: held.tap.clone(),
            },
        );
        for d in spec.disks.iter().filter_map(|d| d.volume) {
            let opened = held.slots.iter().find(|s| s.volume() == d).map(WriterSlot::generation);
            tokio::spawn(self.clone().follow_volume(id, d, opened, process.clone(), done_rx.clone()));
        }
        tokio::spawn(self.clone().monitor(id, events, exit, stopping.clone(), held, done_tx));
        (stopping, done_rx)
    }

    /// Hands a running worker every change of one of its volumes' layout
    /// (copies rebuilt elsewhere, growth, snapshots) until the worker ends.
    /// `opened` is the generation the worker opened the volume with.
    pub(crate) async fn follow_volume(
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
            match sent {
                Ok(()) => {}
                // The worker ended (the VM stopped or moved away): nothing left to follow.
                Err(ProcessError::Gone) => return,
                Err(e) => {
                    warn!(vm = %vm, volume = %vid, error = %e, "cannot hand the worker its volume's new layout")
                }
            }
        }
    }

    /// Watches one worker until it exits, then gives back what it held and
    /// records how it ended.
    pub(crate) async fn monitor(
        self,
        id: VmId,
        mut events: tokio::sync::mpsc::Receiver<WorkerEvent>,
        exit: tokio::sync::oneshot::Receiver<std::io::Result<std::process::ExitStatus>>,
        stopping: Arc<AtomicBool>,
        held: Held,
        done: watch::Sender<bool>,
    ) {
        let tap = held.tap.clone();
        let mut reason: Option<StopReason> = None;
        tokio::pin!(exit);
        let status = loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(WorkerEvent::Stopped { reason: r }) => reason = Some(r),
                    Some(ev @ (WorkerEvent::MigrationProgress(_)
                        | WorkerEvent::MigrationSent(_)
                        | WorkerEvent::MigrationFailed { .. })) => {
                        if let Some(t) = tap.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                            let _ = t.send(ev);
                        }
                    }
                    Some(_) => {}
                    None => {
                        // Control socket closed: only the exit is left to see.
                        break (&mut exit).await.unwrap_or_else(|_| Err(std::io::Error::other("waiter gone")));
                    }
                },
                st = &mut exit => break st.unwrap_or_else(|_| Err(std::io::Error::other("waiter gone"))),
            }
        };
        // The exit can be seen before the last events the worker sent (its
        // stop reason): read what is left until the control socket closes.
        while let Ok(Some(ev)) = tokio::time::timeout(EVENT_DRAIN, events.recv()).await {
            if let WorkerEvent::Stopped { reason: r } = ev {
                reason = Some(r);
            }
        }
        for t in held.relays {
            t.abort();
        }
        // The tap's owner learns the worker is gone (its sender drops).
        tap.lock().unwrap_or_else(|p| p.into_inner()).take();
        // After a committed migration another node took each volume's next
        // generation: these releases find the slots gone and change nothing.
        Self::release_slots(held.slots).await;
        if reason == Some(StopReason::Migrated) {
            // The record belongs to the destination now.
            info!(vm = %id, "VM moved to another node; its worker here ended");
            self.live_map().remove(&id);
            let _ = done.send(true);
            return;
        }
        let (state, mut why) = records::verdict(reason, &status, stopping.load(Ordering::SeqCst));
        if state == VmState::Crashed
            && let Some(panic) = records::worker_panic(&self.vm_dir(id).join("worker.log"))
        {
            why = format!("{why}; {panic}");
        }
        if state == VmState::Crashed {
            error!(vm = %id, reason = %why, "VM crashed");
        } else {
            info!(vm = %id, reason = %why, "VM stopped");
        }
        // The record must follow the process; retry while the pool has no leader.
        for attempt in 0..30 {
            match self.resolve(&id.to_string()).await {
                Ok(r) if r.node != self.inner.cfg.node_id => {
                    // Restarted elsewhere meanwhile: the record is that node's now.
                    info!(vm = %id, now_on = %r.node, "the VM's record names another node; left as it is");
                    break;
                }
                Ok(mut r) => {
                    r.state = state;
                    r.reason = why.clone();
                    match self.inner.records.save(&mut r).await {
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
        self.live_map().remove(&id);
        let _ = done.send(true);
    }

    pub(crate) fn live(
        &self,
        id: VmId,
    ) -> Option<(Arc<WorkerProcess>, Arc<AtomicBool>, watch::Receiver<bool>)> {
        self.live_map().get(&id).map(|l| (l.process.clone(), l.stopping.clone(), l.done.clone()))
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

    /// Pause or resume: a request to the worker, then the record.
    async fn toggle(
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
        self.inner.records.save(&mut r).await?;
        Ok(r)
    }

    pub async fn pause(&self, vm: &str) -> Result<VmRecord, ComputeError> {
        self.toggle(vm, "pause", VmState::Running, VmState::Paused).await
    }

    pub async fn resume(&self, vm: &str) -> Result<VmRecord, ComputeError> {
        self.toggle(vm, "resume", VmState::Paused, VmState::Running).await
    }

    /// Removes a stopped or crashed VM: its records, its ports and its
    /// directory (console log, worker log, cloud-init seed, images).
    pub async fn delete(&self, vm: &str) -> Result<(), ComputeError> {
        let r = self.resolve(vm).await?;
        self.here(&r)?;
        let lock = self.lock_for(r.id);
        let _held = lock.lock().await;
        let r = self.resolve(&r.id.to_string()).await?;
        if self.live(r.id).is_some() || !matches!(r.state, VmState::Stopped | VmState::Crashed) {
            return Err(ComputeError::State { vm: r.id.to_string(), state: r.state.as_str(), op: "delete" });
        }
        self.inner.records.remove(&r).await?;
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

/// Carries frames between a tap and a NIC socket until either closes.
async fn relay(t: std::fs::File, s: OwnedFd, name: String) {
    match tap::relay(t, s, name.clone()).await {
        Ok(st) => {
            info!(tap = %name, to_tap = st.to_tap, to_vm = st.to_vm, dropped = st.dropped, "NIC relay ended")
        }
        Err(e) => warn!(tap = %name, error = %e, "NIC relay failed"),
    }
}
