//! `VmService`: VMs and their consoles.
//!
//! A VM lives on one node; a request for a VM of another node is handed to that
//! node's API once (unary calls) and answered from there. NICs that name a
//! pool network get a port made with the VM; answers name each NIC's port and
//! its network.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use nodeos_compute::NicNetwork;
use nodeos_compute::migration::{MigrateEvent, MigrateOptions};
use nodeos_compute::{Compute, ComputeError};
use nodeos_meta::MetaHandle;
use nodeos_network::Networks;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::vm_service_client::VmServiceClient;
use nodeos_proto::v1::vm_service_server::VmService;
use nodeos_types::records::{CloudInit, DiskSpec, NicSpec, VmHa, VmRecord, VmSpec};
use nodeos_types::{NodeId, PortId, VmId, VolumeId};
use nodeos_volumes::VolumeError;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tonic::{Request, Response, Status, Streaming};

use crate::error::{chain, meta_status, network_status};
use crate::proxy::{Route, hop_timeout, is_proxied, mark, route};

/// How long a VM's owner may take to start it (the worker builds the VM).
const START_WORK: Duration = Duration::from_secs(40);
/// How long a VM's owner may take for a quick request (pause, resume, delete).
const REQUEST_WORK: Duration = Duration::from_secs(15);
/// Default graceful stop timeout.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct VmApi {
    compute: Compute,
    meta: MetaHandle,
    networks: Networks,
    dialer: crate::proxy::Dialer,
}

impl VmApi {
    /// Hands requests over to other nodes through `dialer` (mutual TLS on a secured pool).
    pub fn with_dialer(mut self, dialer: crate::proxy::Dialer) -> Self {
        self.dialer = dialer;
        self
    }

    pub fn new(compute: Compute, meta: MetaHandle, networks: Networks) -> Self {
        VmApi { compute, meta, networks, dialer: crate::proxy::Dialer::default() }
    }

    /// The network name of each port of `vms`' NICs. Best effort: an answer
    /// about a VM is not refused because the network records cannot be read.
    async fn port_networks<'a>(&self, vms: impl IntoIterator<Item = &'a VmRecord>) -> PortNetworks {
        let wanted: Vec<PortId> =
            vms.into_iter().flat_map(|v| v.spec.nics.iter().filter_map(|n| n.port)).collect();
        if wanted.is_empty() {
            return PortNetworks::new();
        }
        let (Ok(ports), Ok(nets)) = (self.networks.list_ports().await, self.networks.list_networks().await)
        else {
            return PortNetworks::new();
        };
        let names: BTreeMap<_, _> = nets.into_iter().map(|n| (n.id, n.name)).collect();
        ports
            .into_iter()
            .filter(|p| wanted.contains(&p.id))
            .map(|p| (p.id, names.get(&p.network).cloned().unwrap_or_else(|| p.network.to_string())))
            .collect()
    }

    /// Volume disks named by volume name get the volume's id (a VM records ids).
    async fn volume_ids(&self, disks: &mut [pb::DiskSpec]) -> Result<(), Status> {
        for d in disks.iter_mut() {
            if d.volume.is_empty() || d.volume.parse::<VolumeId>().is_ok() {
                continue;
            }
            match self.compute.volumes().get_available(&d.volume).await {
                Ok((v, _)) => d.volume = v.id.to_string(),
                Err(VolumeError::NotFound(_)) => {
                    return Err(Status::invalid_argument(format!(
                        "--disk volume:{}: no such volume in this pool",
                        d.volume
                    )));
                }
                Err(e) => return Err(crate::error::volume_status(e)),
            }
        }
        Ok(())
    }

    async fn answer(&self, r: VmRecord, pid: Option<u32>) -> pb::Vm {
        let nets = self.port_networks([&r]).await;
        self.observed(to_pb(r, pid, &nets))
    }

    /// A VM whose record says it runs (or is starting, paused, stopping) on
    /// a node whose lease renewals are late shows `unknown`: nobody can say
    /// whether it still runs there.
    fn observed(&self, mut v: pb::Vm) -> pb::Vm {
        if !matches!(v.state.as_str(), "running" | "paused" | "starting" | "stopping") {
            return v;
        }
        let Ok(node) = v.node_id.parse::<NodeId>() else { return v };
        let (liveness, age) = self.meta.liveness(node);
        if liveness != nodeos_meta::Liveness::Alive {
            v.reason = format!(
                "node {node} is {}: no lease renewal for {} s; the VM was {} there",
                liveness.as_str(),
                age.as_secs(),
                v.state
            );
            v.state = "unknown".into();
        }
        v
    }

    /// A client of the VM's node, for requests taking up to `timeout`.
    async fn client_for(
        &self,
        node: NodeId,
        timeout: Duration,
    ) -> Result<VmServiceClient<tonic::transport::Channel>, Status> {
        let addr = self.meta.node_address(node).ok_or_else(|| {
            Status::unavailable(format!("the VM lives on node {node}, which is not a pool member"))
        })?;
        Ok(VmServiceClient::new(self.dialer.channel(node, &addr, timeout).await?))
    }
}

/// The one place compute errors become statuses.
pub fn compute_status(e: ComputeError) -> Status {
    match e {
        ComputeError::Spec(s) => Status::invalid_argument(s.to_string()),
        ComputeError::NotFound(_) => Status::not_found(e.to_string()),
        ComputeError::Migration(_) => Status::failed_precondition(e.to_string()),
        ComputeError::Ha(_) => Status::invalid_argument(e.to_string()),
        ComputeError::Removal(_) | ComputeError::Upgrade(_) => Status::failed_precondition(e.to_string()),
        ComputeError::State { .. } => Status::failed_precondition(e.to_string()),
        ComputeError::NameTaken(_) => Status::already_exists(e.to_string()),
        ComputeError::Elsewhere { .. } => Status::failed_precondition(e.to_string()),
        ComputeError::Meta(m) => meta_status(*m),
        ComputeError::Worker(_) | ComputeError::Tap(_) => Status::failed_precondition(chain(&e)),
        ComputeError::Io { .. } | ComputeError::Record(_) => Status::internal(chain(&e)),
        ComputeError::Volume(v) => crate::error::volume_status(*v),
        ComputeError::Network(n) => network_status(*n),
        ComputeError::NicNetwork(_) => Status::invalid_argument(e.to_string()),
        ComputeError::Switch(_) => Status::failed_precondition(chain(&e)),
        ComputeError::Seed(_) => Status::internal(chain(&e)),
        // A VM's image is gone, of the wrong kind, unreadable or corrupt:
        // the VM cannot start until that changes.
        ComputeError::Image { .. } => Status::failed_precondition(chain(&e)),
    }
}

/// The spec, and the NICs that plug into pool networks.
fn spec_from_pb(s: Option<pb::VmSpec>) -> Result<(VmSpec, Vec<NicNetwork>), Status> {
    let s = s.ok_or_else(|| Status::invalid_argument("spec is required"))?;
    let vcpus = u8::try_from(s.vcpus)
        .map_err(|_| Status::invalid_argument(format!("vcpus must be 1..=64, got {}", s.vcpus)))?;
    let mut nets = Vec::new();
    let mut nics = Vec::with_capacity(s.nics.len());
    for (i, n) in s.nics.into_iter().enumerate() {
        if n.network.is_empty() {
            if !n.ip.is_empty() || !n.security_groups.is_empty() || n.no_port_security {
                return Err(Status::invalid_argument(format!(
                    "spec.nics[{i}]: ip, security_groups and no_port_security need a network"
                )));
            }
        } else {
            if !n.tap.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "spec.nics[{i}]: a NIC plugs into a network or a tap, not both"
                )));
            }
            let ip = if n.ip.is_empty() {
                None
            } else {
                Some(crate::network::parse_ip(&format!("spec.nics[{i}].ip"), &n.ip)?)
            };
            nets.push(NicNetwork {
                nic: i,
                network: n.network,
                ip,
                security_groups: n.security_groups,
                port_security: !n.no_port_security,
            });
        }
        let mac = if n.mac.is_empty() { random_mac() } else { n.mac };
        nics.push(NicSpec { mac, tap: n.tap, port: None });
    }
    let spec = VmSpec {
        vcpus,
        memory_mib: s.memory_mib,
        kernel: s.kernel,
        initrd: (!s.initrd.is_empty()).then_some(s.initrd),
        cmdline: s.cmdline,
        disks: s
            .disks
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let volume = if d.volume.is_empty() {
                    None
                } else {
                    Some(
                        d.volume
                            .parse()
                            .map_err(|e| Status::invalid_argument(format!("spec.disks[{i}].volume: {e}")))?,
                    )
                };
                Ok(DiskSpec { path: d.path, volume, read_only: d.read_only })
            })
            .collect::<Result<_, Status>>()?,
        nics,
        cloud_init: s.cloud_init.map(|c| CloudInit {
            user_data: c.user_data,
            ssh_authorized_keys: c.ssh_authorized_keys,
            hostname: c.hostname,
        }),
    };
    Ok((spec, nets))
}

/// A locally administered unicast MAC.
fn random_mac() -> String {
    let v = VmId::random().0.to_le_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", v[0], v[1], v[2])
}

/// Port id to the name of its network.
type PortNetworks = BTreeMap<PortId, String>;

fn to_pb(r: VmRecord, pid: Option<u32>, nets: &PortNetworks) -> pb::Vm {
    pb::Vm {
        id: r.id.to_string(),
        name: r.name,
        spec: Some(pb::VmSpec {
            vcpus: r.spec.vcpus.into(),
            memory_mib: r.spec.memory_mib,
            kernel: r.spec.kernel,
            initrd: r.spec.initrd.unwrap_or_default(),
            cmdline: r.spec.cmdline,
            disks: r
                .spec
                .disks
                .into_iter()
                .map(|d| pb::DiskSpec {
                    path: d.path,
                    read_only: d.read_only,
                    volume: d.volume.map(|v| v.to_string()).unwrap_or_default(),
                })
                .collect(),
            nics: r
                .spec
                .nics
                .into_iter()
                .map(|n| pb::NicSpec {
                    mac: n.mac,
                    tap: n.tap,
                    network: n.port.and_then(|p| nets.get(&p).cloned()).unwrap_or_default(),
                    port: n.port.map(|p| p.to_string()).unwrap_or_default(),
                    ..Default::default()
                })
                .collect(),
            cloud_init: r.spec.cloud_init.map(|c| pb::CloudInit {
                user_data: c.user_data,
                ssh_authorized_keys: c.ssh_authorized_keys,
                hostname: c.hostname,
            }),
        }),
        node_id: r.node.to_string(),
        state: r.state.as_str().to_owned(),
        reason: r.reason,
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
        worker_pid: pid.unwrap_or(0),
        migrating_to: r.migration.as_ref().map(|m| m.to.to_string()).unwrap_or_default(),
        migration_started_ms: r.migration.map_or(0, |m| m.started_at_ms),
        ha: (!r.ha.is_off()).then_some(pb::HaPolicy { restart: r.ha.restart, priority: r.ha.priority }),
        ha_restarts_ms: r.ha_restarts,
    }
}

fn ha_from_pb(h: pb::HaPolicy) -> VmHa {
    VmHa { restart: h.restart, priority: h.priority }
}

type ConsoleStream = Pin<Box<dyn Stream<Item = Result<pb::ConsoleOutput, Status>> + Send>>;
type MigrateStream = Pin<Box<dyn Stream<Item = Result<pb::MigrateVmProgress, Status>> + Send>>;

/// How long a migration may take end to end before a hand-over gives up.
const MIGRATE_WORK: Duration = Duration::from_secs(14 * 60);
/// Default downtime budget.
const DEFAULT_DOWNTIME_MS: u32 = 300;

fn progress_pb(ev: MigrateEvent, nets: &PortNetworks) -> pb::MigrateVmProgress {
    match ev {
        MigrateEvent::Preparing { to } => {
            pb::MigrateVmProgress { phase: "preparing".into(), to_node: to.to_string(), ..Default::default() }
        }
        MigrateEvent::Progress { to, progress: p } => pb::MigrateVmProgress {
            phase: "copying".into(),
            to_node: to.to_string(),
            pass: p.pass,
            dirty_pages: p.dirty_pages,
            rate_bytes_per_sec: p.rate_bytes_per_sec,
            expected_downtime_ms: p.expected_downtime_ms,
            throttle_percent: p.throttle_percent.into(),
            bytes_sent: p.bytes_sent,
            memory_bytes: p.memory_bytes,
            ..Default::default()
        },
        MigrateEvent::Committed { vm, summary } => pb::MigrateVmProgress {
            phase: "committed".into(),
            to_node: vm.node.to_string(),
            pass: summary.passes,
            bytes_sent: summary.bytes_sent,
            paused_ms: summary.paused_ms,
            total_ms: summary.total_ms,
            vm: Some(to_pb(*vm, None, nets)),
            ..Default::default()
        },
    }
}

/// Unary calls on one VM: run here if it lives here, else once on its node,
/// which may take `$work` for it. Handed over yet not ours (the VM moved
/// meanwhile), compute refuses with the node it lives on.
macro_rules! on_owner {
    ($self:ident, $req:ident, $vm:expr, $method:ident, $work:expr, $local:expr) => {{
        let r = $self.compute.resolve($vm).await.map_err(compute_status)?;
        if let Route::Forward(node) = route(r.node, $self.compute.node_id(), is_proxied(&$req)) {
            let mut c = $self.client_for(node, hop_timeout(&$req, $work)).await?;
            return c.$method(mark($req.into_inner())).await;
        }
        let rec = $local.await.map_err(compute_status)?;
        let pid = $self.compute.worker_pid(rec.id);
        Ok(Response::new($self.answer(rec, pid).await))
    }};
}

#[tonic::async_trait]
impl VmService for VmApi {
    async fn create(&self, req: Request<pb::CreateVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let role = crate::guard::caller(&req).map(|c| (c.role(), c.identity.to_string()));
        let mut r = req.into_inner();
        if let Some(spec) = &mut r.spec {
            self.volume_ids(&mut spec.disks).await?;
        }
        let (spec, nets) = spec_from_pb(r.spec)?;
        // Files of the node's own disk are an admin's to hand out, and only
        // under the node's --host-images-dir (checked by compute).
        if let Some((role, who)) = role
            && role != nodeos_auth::Role::Admin
            && let Some((flag, path)) = nodeos_compute::spec::host_paths(&spec).first()
        {
            return Err(Status::permission_denied(format!(
                "{who} may not make a VM of a file on the node ({flag} {path}): only an admin may; use pool images (image:NAME) and volumes (volume:NAME)"
            )));
        }
        let ha = r.ha.map(ha_from_pb).unwrap_or_default();
        let rec = self.compute.create(&r.name, spec, nets, ha).await.map_err(compute_status)?;
        Ok(Response::new(self.answer(rec, None).await))
    }

    async fn set_ha(&self, req: Request<pb::SetHaRequest>) -> Result<Response<pb::Vm>, Status> {
        let r = req.get_ref().clone();
        let ha = r.ha.map(ha_from_pb).unwrap_or_default();
        on_owner!(self, req, &r.vm, set_ha, REQUEST_WORK, self.compute.set_ha(&r.vm, ha))
    }

    async fn start(&self, req: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let vm = req.get_ref().vm.clone();
        on_owner!(self, req, &vm, start, START_WORK, self.compute.start(&vm))
    }

    async fn stop(&self, req: Request<pb::StopVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let r = req.get_ref().clone();
        let timeout =
            if r.timeout_seconds == 0 { STOP_TIMEOUT } else { Duration::from_secs(r.timeout_seconds.into()) };
        on_owner!(self, req, &r.vm, stop, timeout + REQUEST_WORK, self.compute.stop(&r.vm, r.force, timeout))
    }

    async fn pause(&self, req: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let vm = req.get_ref().vm.clone();
        on_owner!(self, req, &vm, pause, REQUEST_WORK, self.compute.pause(&vm))
    }

    async fn resume(&self, req: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let vm = req.get_ref().vm.clone();
        on_owner!(self, req, &vm, resume, REQUEST_WORK, self.compute.resume(&vm))
    }

    async fn delete(&self, req: Request<pb::VmRef>) -> Result<Response<pb::DeleteVmResponse>, Status> {
        let vm = req.get_ref().vm.clone();
        let r = self.compute.resolve(&vm).await.map_err(compute_status)?;
        if let Route::Forward(node) = route(r.node, self.compute.node_id(), is_proxied(&req)) {
            let mut c = self.client_for(node, hop_timeout(&req, REQUEST_WORK)).await?;
            return c.delete(mark(req.into_inner())).await;
        }
        self.compute.delete(&vm).await.map_err(compute_status)?;
        Ok(Response::new(pb::DeleteVmResponse {}))
    }

    async fn get(&self, req: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let vm = req.get_ref().vm.clone();
        let r = self.compute.resolve(&vm).await.map_err(compute_status)?;
        let pid = self.compute.worker_pid(r.id);
        Ok(Response::new(self.answer(r, pid).await))
    }

    async fn list(&self, _req: Request<pb::ListVmsRequest>) -> Result<Response<pb::ListVmsResponse>, Status> {
        let vms = self.compute.list().await.map_err(compute_status)?;
        let nets = self.port_networks(&vms).await;
        Ok(Response::new(pb::ListVmsResponse {
            vms: vms
                .into_iter()
                .map(|r| {
                    let pid = self.compute.worker_pid(r.id);
                    self.observed(to_pb(r, pid, &nets))
                })
                .collect(),
        }))
    }

    type ConsoleStream = ConsoleStream;
    type MigrateStream = MigrateStream;

    async fn migrate(
        &self,
        req: Request<pb::MigrateVmRequest>,
    ) -> Result<Response<Self::MigrateStream>, Status> {
        let m = req.get_ref().clone();
        let r = self.compute.resolve(&m.vm).await.map_err(compute_status)?;
        if let Route::Forward(node) = route(r.node, self.compute.node_id(), is_proxied(&req)) {
            let mut c = self.client_for(node, hop_timeout(&req, MIGRATE_WORK)).await?;
            let remote = c.migrate(mark(req.into_inner())).await?.into_inner();
            return Ok(Response::new(Box::pin(remote)));
        }
        if m.cancel {
            let r = self.compute.cancel_migration(&m.vm).await.map_err(compute_status)?;
            let done = pb::MigrateVmProgress {
                phase: "cancelling".into(),
                vm: Some(self.answer(r, None).await),
                ..Default::default()
            };
            return Ok(Response::new(Box::pin(futures::stream::iter([Ok(done)]))));
        }
        if m.downtime_ms > 60_000 {
            return Err(Status::invalid_argument(format!(
                "--downtime-ms {} is above the 60000 allowed",
                m.downtime_ms
            )));
        }
        let opts = MigrateOptions {
            to: (!m.to.is_empty()).then(|| m.to.clone()),
            downtime: Duration::from_millis(u64::from(if m.downtime_ms == 0 {
                DEFAULT_DOWNTIME_MS
            } else {
                m.downtime_ms
            })),
            bandwidth_mib: (m.bandwidth_mib > 0).then_some(m.bandwidth_mib),
        };
        let nets = self.port_networks([&r]).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let compute = self.compute.clone();
        let vm = m.vm.clone();
        let mut run = tokio::spawn(async move { compute.migrate(&vm, opts, tx).await });
        // The first event, or the refusal, before the stream opens: a bad
        // request is a plain error status.
        let first = tokio::select! {
            ev = rx.recv() => ev,
            done = &mut run => {
                return Err(match done {
                    Ok(Err(e)) => compute_status(e),
                    Ok(Ok(_)) => Status::internal("migration ended without telling"),
                    Err(e) => Status::internal(format!("migration task failed: {e}")),
                });
            }
        };
        let stream = progress_stream(first, rx, run, nets);
        Ok(Response::new(stream))
    }

    async fn console(
        &self,
        req: Request<Streaming<pb::ConsoleInput>>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        let mut input = req.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the first console message must name the VM"))?;
        let r = self.compute.resolve(&first.vm).await.map_err(compute_status)?;
        if r.node != self.compute.node_id() {
            let addr = self.meta.node_address(r.node).unwrap_or_default();
            return Err(Status::failed_precondition(format!(
                "VM {} lives on node {} ({addr}); open its console there",
                r.id, r.node
            )));
        }
        let id = r.id;
        if !first.data.is_empty() {
            self.compute.console_input(id, first.data).await.map_err(compute_status)?;
        }
        // Input: forwarded while the client sends.
        let compute = self.compute.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = input.next().await {
                if !m.data.is_empty() && compute.console_input(id, m.data).await.is_err() {
                    break;
                }
            }
        });
        let path = self.compute.console_path(id);
        Ok(Response::new(Box::pin(follow(path, first.from_start, self.compute.clone(), id))))
    }
}

/// Streams a console log: from its start or its current end, following growth
/// while the VM has a worker, and ending once it has none and all is sent.
fn follow(
    path: PathBuf,
    from_start: bool,
    compute: Compute,
    id: VmId,
) -> impl Stream<Item = Result<pb::ConsoleOutput, Status>> + Send {
    async_stream(move |tx| async move {
        let mut file = loop {
            match tokio::fs::File::open(&path).await {
                Ok(f) => break f,
                Err(_) if compute.worker_pid(id).is_some() => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(_) => return,
            }
        };
        if !from_start {
            let _ = file.seek(std::io::SeekFrom::End(0)).await;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match file.read(&mut buf).await {
                Ok(0) => {
                    if compute.worker_pid(id).is_none() {
                        // One last read after the worker is gone catches its final bytes.
                        if let Ok(n) = file.read(&mut buf).await
                            && n > 0
                        {
                            let _ = tx.send(Ok(pb::ConsoleOutput { data: buf[..n].to_vec() })).await;
                        }
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(n) => {
                    if tx.send(Ok(pb::ConsoleOutput { data: buf[..n].to_vec() })).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(format!("console log: {e}")))).await;
                    return;
                }
            }
        }
    })
}

/// A stream fed by a task through a bounded channel.
fn async_stream<T: Send + 'static, F, Fut>(f: F) -> impl Stream<Item = T> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The progress stream: the first event, the rest as they come, then the
/// migration's own end (an error status if it failed).
fn progress_stream(
    first: Option<MigrateEvent>,
    rx: tokio::sync::mpsc::UnboundedReceiver<MigrateEvent>,
    run: tokio::task::JoinHandle<Result<VmRecord, ComputeError>>,
    nets: PortNetworks,
) -> MigrateStream {
    let head = futures::stream::iter(first.map(|e| Ok(progress_pb(e, &nets))));
    let nets2 = nets.clone();
    let events =
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |e| Ok(progress_pb(e, &nets2)));
    let end = futures::stream::once(async move {
        match run.await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(Err(compute_status(e))),
            Err(e) => Some(Err(Status::internal(format!("migration task failed: {e}")))),
        }
    })
    .filter_map(|x| async move { x });
    Box::pin(head.chain(events).chain(end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeos_types::records::VmState;

    #[test]
    fn cloud_init_crosses_the_edge_both_ways_and_stays_absent_when_absent() {
        let ci = pb::CloudInit {
            user_data: b"#cloud-config\n\xff".to_vec(),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA me".into()],
            hostname: "web-1".into(),
        };
        let given = pb::VmSpec {
            vcpus: 1,
            memory_mib: 64,
            kernel: "/k".into(),
            cloud_init: Some(ci.clone()),
            ..Default::default()
        };
        let (spec, _) = spec_from_pb(Some(given.clone())).unwrap();
        let want = CloudInit {
            user_data: ci.user_data.clone(),
            ssh_authorized_keys: ci.ssh_authorized_keys.clone(),
            hostname: ci.hostname.clone(),
        };
        assert_eq!(spec.cloud_init.as_ref(), Some(&want));
        let mut r = VmRecord {
            id: VmId(1),
            name: "a".into(),
            spec,
            node: NodeId(1),
            state: VmState::Stopped,
            reason: String::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            migration: None,
            ha: Default::default(),
            ha_restarts: Vec::new(),
        };
        let back = to_pb(r.clone(), None, &PortNetworks::new()).spec.unwrap();
        assert_eq!(back.cloud_init, Some(ci));

        let (spec, _) = spec_from_pb(Some(pb::VmSpec { cloud_init: None, ..given })).unwrap();
        assert_eq!(spec.cloud_init, None);
        r.spec = spec;
        assert_eq!(to_pb(r, None, &PortNetworks::new()).spec.unwrap().cloud_init, None);
    }
}
