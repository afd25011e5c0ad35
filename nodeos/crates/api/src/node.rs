//! `NodeService`: power-off and reboot of one node, its maintenance mode, and
//! its removal from the pool (on the leader, see `nodeos_compute::removal`).
//!
//! Only a node that runs as the node image's PID 1 can do it: its daemon is
//! a child of PID 1, started with `NODEOS_INIT=1`, and asks PID 1 with the
//! init signals (SIGUSR2 powers off, SIGTERM reboots). PID 1 then stops the
//! daemon cleanly, unmounts the data disk and calls `reboot(2)`. The signal
//! is sent a moment after the answer, so the caller hears it. A request for
//! another node is handed to that node once.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use nodeos_compute::maintenance::MaintenanceEvent;
use nodeos_meta::MetaHandle;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::node_service_client::NodeServiceClient;
use nodeos_proto::v1::node_service_server::NodeService;
use nodeos_types::NodeId;
use tonic::{Request, Response, Status};
use tracing::{error, info};

use crate::proxy::{Route, hop_timeout, is_proxied, mark, route};

/// How long a node may take to accept a power request.
const POWER_WORK: Duration = Duration::from_secs(5);
/// Time for the answer to leave before PID 1 starts stopping the daemon.
const SIGNAL_DELAY: Duration = Duration::from_millis(200);
/// Set by the image's PID 1 in the environment of the daemon it starts.
pub const INIT_ENV: &str = "NODEOS_INIT";
/// The signals PID 1 takes (busybox and sysvinit use the same).
const POWEROFF_SIGNAL: Signal = Signal::SIGUSR2;
const REBOOT_SIGNAL: Signal = Signal::SIGTERM;
const NOT_INIT: &str = "this node does not run as the image's PID 1; stop it with its service manager";

#[derive(Debug, Clone)]
pub struct NodeApi {
    meta: MetaHandle,
    compute: nodeos_compute::Compute,
    dialer: crate::proxy::Dialer,
}

impl NodeApi {
    /// Hands requests over to other nodes through `dialer` (mutual TLS on a secured pool).
    pub fn with_dialer(mut self, dialer: crate::proxy::Dialer) -> Self {
        self.dialer = dialer;
        self
    }

    pub fn new(meta: MetaHandle, compute: nodeos_compute::Compute) -> Self {
        NodeApi { meta, compute, dialer: crate::proxy::Dialer::default() }
    }

    /// A channel to the node a request names (empty: this one) when another
    /// node answers it; `None` when this node does. A request handed over
    /// once that names another node is refused, never handed on.
    async fn owner_channel(
        &self,
        node_id: &str,
        handed_over: bool,
        timeout: Duration,
    ) -> Result<Option<tonic::transport::Channel>, Status> {
        let me = self.meta.node_id();
        let target = if node_id.is_empty() {
            me
        } else {
            node_id.parse::<NodeId>().map_err(|e| Status::invalid_argument(format!("node_id: {e}")))?
        };
        match route(target, me, handed_over) {
            Route::Here => Ok(None),
            Route::NotHere(_) => Err(Status::failed_precondition(format!(
                "handed over for node {target}, but this is node {me}"
            ))),
            Route::Forward(target) => {
                let addr = self
                    .meta
                    .node_address(target)
                    .ok_or_else(|| Status::not_found(format!("node {target} is not a pool member")))?;
                Ok(Some(self.dialer.channel(target, &addr, timeout).await?))
            }
        }
    }
}

type MaintenanceStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::MaintenanceProgress, Status>> + Send>>;

/// How long a removal may take through a hand-over (it waits up to a minute
/// for volume copies to be rebuilt elsewhere).
const REMOVE_WORK: Duration = Duration::from_secs(120);

/// How long emptying a node may take through a hand-over.
const MAINTENANCE_WORK: Duration = Duration::from_secs(60 * 60);

fn maintenance_pb(ev: MaintenanceEvent) -> pb::MaintenanceProgress {
    let p = |event: &str| pb::MaintenanceProgress { event: event.into(), ..Default::default() };
    match ev {
        MaintenanceEvent::Marked => p("marked"),
        MaintenanceEvent::Moving { vm, name } => {
            pb::MaintenanceProgress { vm_id: vm.to_string(), vm_name: name, ..p("moving") }
        }
        MaintenanceEvent::Moved { vm, name, to, paused_ms } => pb::MaintenanceProgress {
            vm_id: vm.to_string(),
            vm_name: name,
            to_node: to.to_string(),
            paused_ms,
            ..p("moved")
        },
        MaintenanceEvent::NotMoved { vm, name, error } => {
            pb::MaintenanceProgress { vm_id: vm.to_string(), vm_name: name, error, ..p("not_moved") }
        }
        MaintenanceEvent::LeaderMoved { to } => {
            pb::MaintenanceProgress { to_node: to.to_string(), ..p("leader_moved") }
        }
        MaintenanceEvent::Done { moved, stayed } => pb::MaintenanceProgress {
            moved: u32::try_from(moved).unwrap_or(u32::MAX),
            stayed: u32::try_from(stayed).unwrap_or(u32::MAX),
            ..p("done")
        },
    }
}

/// Whether this daemon was started by the image's PID 1.
pub fn under_init() -> bool {
    std::os::unix::process::parent_id() == 1 && std::env::var_os(INIT_ENV).is_some_and(|v| v == "1")
}

fn signal_for(action: pb::PowerAction) -> Result<Signal, Status> {
    match action {
        pb::PowerAction::Poweroff => Ok(POWEROFF_SIGNAL),
        pb::PowerAction::Reboot => Ok(REBOOT_SIGNAL),
        pb::PowerAction::Unspecified => Err(Status::invalid_argument("action must be POWEROFF or REBOOT")),
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    type MaintenanceStream = MaintenanceStream;

    async fn maintenance(
        &self,
        req: Request<pb::MaintenanceRequest>,
    ) -> Result<Response<Self::MaintenanceStream>, Status> {
        use futures::StreamExt;
        let handed_over = is_proxied(&req);
        let timeout = hop_timeout(&req, MAINTENANCE_WORK);
        let r = req.into_inner();
        if let Some(ch) = self.owner_channel(&r.node_id, handed_over, timeout).await? {
            let remote = NodeServiceClient::new(ch).maintenance(mark(r)).await?.into_inner();
            return Ok(Response::new(Box::pin(remote)));
        }
        if !r.enter {
            self.compute.exit_maintenance().await.map_err(crate::vm::compute_status)?;
            let done = pb::MaintenanceProgress { event: "exited".into(), ..Default::default() };
            return Ok(Response::new(Box::pin(futures::stream::iter([Ok(done)]))));
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let compute = self.compute.clone();
        let mut run = tokio::spawn(async move { compute.enter_maintenance(tx).await });
        // The checks' refusal is a plain error status; after them, a stream.
        let first = tokio::select! {
            ev = rx.recv() => ev,
            done = &mut run => {
                return Err(match done {
                    Ok(Err(e)) => crate::vm::compute_status(e),
                    Ok(Ok(())) => Status::internal("maintenance ended without telling"),
                    Err(e) => Status::internal(format!("maintenance task failed: {e}")),
                });
            }
        };
        let head = futures::stream::iter(first.map(|e| Ok(maintenance_pb(e))));
        let rest = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(|e| Ok(maintenance_pb(e)));
        let end = futures::stream::once(async move {
            match run.await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(Err(crate::vm::compute_status(e))),
                Err(e) => Some(Err(Status::internal(format!("maintenance task failed: {e}")))),
            }
        })
        .filter_map(|x| async move { x });
        Ok(Response::new(Box::pin(head.chain(rest).chain(end))))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let handed_over = is_proxied(&req);
        let timeout = hop_timeout(&req, REMOVE_WORK);
        let r = req.into_inner();
        if r.node_id.is_empty() {
            return Err(Status::invalid_argument("name the node to remove"));
        }
        let me = self.meta.node_id();
        match self.meta.leader() {
            Some((leader, _)) if leader == me => {}
            Some(_) if handed_over => {
                return Err(Status::unavailable("leadership moved during the request; retry"));
            }
            Some((leader, addr)) => {
                let ch = self.dialer.channel(leader, &addr, timeout).await?;
                return NodeServiceClient::new(ch).remove(mark(r)).await;
            }
            None => return Err(Status::unavailable("the pool has no leader right now; retry")),
        }
        let done = self.compute.remove_node(&r.node_id).await.map_err(crate::vm::compute_status)?;
        Ok(Response::new(pb::RemoveNodeResponse {
            node_id: done.node.to_string(),
            vms_rehomed: done.vms_rehomed,
            copies_rebuilt: u32::try_from(done.copies).unwrap_or(u32::MAX),
        }))
    }

    async fn power(&self, req: Request<pb::PowerRequest>) -> Result<Response<pb::PowerResponse>, Status> {
        let handed_over = is_proxied(&req);
        let timeout = hop_timeout(&req, POWER_WORK);
        let r = req.into_inner();
        let action = pb::PowerAction::try_from(r.action).map_err(|_| {
            Status::invalid_argument(format!("action {} is not POWEROFF or REBOOT", r.action))
        })?;
        let sig = signal_for(action)?;
        let me = self.meta.node_id();
        if let Some(ch) = self.owner_channel(&r.node_id, handed_over, timeout).await? {
            return NodeServiceClient::new(ch).power(mark(r)).await;
        }
        if !under_init() {
            return Err(Status::failed_precondition(format!("node {me}: {NOT_INIT}")));
        }
        let init = Pid::from_raw(1);
        // Signal 0 checks the permission now, so the answer is not a false yes.
        kill(init, None).map_err(|e| Status::internal(format!("cannot signal PID 1: {e}")))?;
        info!(action = action.as_str_name(), "power request accepted; asking PID 1");
        tokio::spawn(async move {
            tokio::time::sleep(SIGNAL_DELAY).await;
            if let Err(e) = kill(init, sig) {
                error!(error = %e, signal = %sig, "cannot signal PID 1");
            }
        });
        Ok(Response::new(pb::PowerResponse { node_id: me.to_string(), action: action.into() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_map_to_the_init_signals() {
        assert_eq!(signal_for(pb::PowerAction::Poweroff).ok(), Some(Signal::SIGUSR2));
        assert_eq!(signal_for(pb::PowerAction::Reboot).ok(), Some(Signal::SIGTERM));
        assert_eq!(
            signal_for(pb::PowerAction::Unspecified).err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
    }
}
