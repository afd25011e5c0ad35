//! `PoolService`: the pool's membership, leadership and member health.
//!
//! Member health and liveness are the leader's view (when each member last
//! acknowledged a raft message, how far its log is behind, and when the
//! leader applied its last lease renewal), so a follower asked for the
//! status hands the request to the leader once and relays the answer. If no
//! leader is reachable it answers from its own view, marking health unknown.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use nodeos_meta::{Consistency, EventKind, MetaHandle};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::pool_service_client::PoolServiceClient;
use nodeos_proto::v1::pool_service_server::PoolService;
use nodeos_types::NodeId;
use nodeos_types::records::{
    NODES_PREFIX, NodeRecord, POOL_KEY, PoolRecord, UPGRADE_KEY, UpgradeRecord, VMS_PREFIX, VmRecord,
};
use tonic::{Request, Response, Status};

use crate::error::{meta_status, watch_status};
use crate::proxy;

/// A member not heard from by the leader for this long is unreachable.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(3);
/// A member this many entries behind the leader is lagging.
const LAGGING_ENTRIES: u64 = 64;
/// How long the leader may take to describe the pool; beyond it this
/// node answers from its own view (status must answer while the leader is gone).
const STATUS_WORK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct PoolApi {
    meta: MetaHandle,
    pool_name: String,
    compute: nodeos_compute::Compute,
    dialer: crate::proxy::Dialer,
}

impl PoolApi {
    /// Hands requests over to other nodes through `dialer` (mutual TLS on a secured pool).
    pub fn with_dialer(mut self, dialer: crate::proxy::Dialer) -> Self {
        self.dialer = dialer;
        self
    }

    pub fn new(meta: MetaHandle, pool_name: String, compute: nodeos_compute::Compute) -> Self {
        PoolApi { meta, pool_name, compute, dialer: crate::proxy::Dialer::default() }
    }

    /// This node's answer, from its own view.
    fn local_status(&self) -> pb::PoolStatus {
        let meta = &self.meta;
        let sm = meta.state_machine();
        let m = meta.metrics();
        let me = meta.node_id();
        let is_leader = m.current_leader == Some(me);
        let pool: Option<PoolRecord> =
            sm.get(POOL_KEY).ok().flatten().and_then(|kv| serde_json::from_slice(&kv.value).ok());
        let records: BTreeMap<NodeId, NodeRecord> = sm
            .range(NODES_PREFIX, 0)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|kv| serde_json::from_slice::<NodeRecord>(&kv.value).ok())
            .map(|r| (r.id, r))
            .collect();
        let baseline = nodeos_types::cpu::baseline(records.values().filter_map(|r| r.cpu.as_ref()));
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut ids: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        ids.extend(records.keys().copied());
        let last_log = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let members = ids
            .into_iter()
            .map(|id| {
                let rec = records.get(&id);
                let in_raft = membership.get_node(&id);
                let (liveness, lease_age) = meta.liveness(id);
                let role = if Some(id) == m.current_leader {
                    pb::NodeRole::Leader
                } else if voters.contains(&id) {
                    pb::NodeRole::Voter
                } else if in_raft.is_some() {
                    pb::NodeRole::Learner
                } else {
                    pb::NodeRole::None
                };
                let matched = if id == me {
                    Some(last_log)
                } else {
                    m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).map(|l| l.index)
                };
                let health = if !is_leader {
                    pb::NodeHealth::Unknown
                } else if id == me {
                    pb::NodeHealth::Healthy
                } else if in_raft.is_none() {
                    pb::NodeHealth::Unknown
                } else if meta.peers().last_ack(id).is_none_or(|t| t.elapsed() > UNREACHABLE_AFTER) {
                    pb::NodeHealth::Unreachable
                } else if matched.unwrap_or(0) + LAGGING_ENTRIES < last_log {
                    pb::NodeHealth::Lagging
                } else {
                    pb::NodeHealth::Healthy
                };
                pb::Node {
                    id: id.to_string(),
                    address: in_raft
                        .map(|n| n.addr.clone())
                        .or_else(|| rec.map(|r| r.address.clone()))
                        .unwrap_or_default(),
                    hostname: rec.map(|r| r.hostname.clone()).unwrap_or_default(),
                    version: rec.map(|r| r.version.clone()).unwrap_or_default(),
                    role: role as i32,
                    health: health as i32,
                    matched_index: matched.unwrap_or(0),
                    joined_at_ms: rec.map(|r| r.joined_at_ms).unwrap_or(0),
                    image_hash: rec.map(|r| r.image_hash.clone()).unwrap_or_default(),
                    liveness: if in_raft.is_some() { liveness.as_str().to_owned() } else { String::new() },
                    lease_age_ms: if in_raft.is_some() { lease_age.as_millis() as u64 } else { 0 },
                    cpu: rec
                        .and_then(|r| r.cpu.as_ref())
                        .map(|c| format!("{}, {}", c.vendor, c.brand))
                        .unwrap_or_default(),
                    cpu_features_beyond_baseline: rec
                        .and_then(|r| r.cpu.as_ref())
                        .zip(baseline.as_ref())
                        .map_or(0, |(c, b)| c.beyond(b)),
                    maintenance: rec.is_some_and(|r| r.maintenance),
                }
            })
            .collect();
        pb::PoolStatus {
            pool_id: pool.as_ref().map(|p| p.id.to_string()).unwrap_or_default(),
            pool_name: pool.map(|p| p.name).unwrap_or_else(|| self.pool_name.clone()),
            leader_id: m.current_leader.map(|l| l.to_string()).unwrap_or_default(),
            term: m.current_term,
            last_applied_index: applied,
            committed_index: if is_leader { applied } else { 0 },
            revision: sm.revision(),
            members,
            answered_by: me.to_string(),
            ..Default::default()
        }
    }

    /// What only `Status` answers, from this node's copy of the records: how
    /// many node failures the HA VMs tolerate, and the rolling upgrade.
    fn add_pool_details(&self, s: &mut pb::PoolStatus) {
        let sm = self.meta.state_machine();
        let decode = |prefix: &str| -> Vec<Vec<u8>> {
            sm.range(prefix, 0).unwrap_or_default().into_iter().map(|kv| kv.value).collect()
        };
        let vms: Vec<VmRecord> =
            decode(VMS_PREFIX).iter().filter_map(|v| serde_json::from_slice(v).ok()).collect();
        let nodes: Vec<NodeRecord> =
            decode(NODES_PREFIX).iter().filter_map(|v| serde_json::from_slice(v).ok()).collect();
        let voters = self.meta.metrics().membership_config.membership().voter_ids().count();
        let ha = nodeos_compute::ha::tolerance(&nodes, &vms, voters);
        s.ha_protected_vms = u32::try_from(ha.protected).unwrap_or(u32::MAX);
        s.ha_failures_to_tolerate = u32::try_from(ha.failures).unwrap_or(u32::MAX);
        s.ha_tolerance_limit = ha.limit;
        s.upgrade = sm
            .get(UPGRADE_KEY)
            .ok()
            .flatten()
            .and_then(|kv| serde_json::from_slice::<UpgradeRecord>(&kv.value).ok())
            .map(upgrade_pb);
    }

    /// The leader's answer if it can be had, else this node's own.
    async fn status_from_leader(&self, proxied: bool) -> pb::PoolStatus {
        let mut local = self.local_status();
        let me = self.meta.node_id();
        if proxied {
            return local;
        }
        if let Some((leader, addr)) = self.meta.leader()
            && leader != me
        {
            match ask_leader(&self.dialer, leader, &addr).await {
                Ok(mut s) => {
                    s.answered_by = format!("{} (via {me})", s.answered_by);
                    return s;
                }
                Err(e) => tracing::debug!(%addr, error = %e.message(), "leader did not answer status"),
            }
        }
        local.answered_by = me.to_string();
        local
    }
}

fn upgrade_pb(u: UpgradeRecord) -> pb::UpgradeStatus {
    pb::UpgradeStatus {
        image_hash: u.image_hash,
        version: u.version,
        state: u.state.as_str().into(),
        reason: u.reason,
        nodes: u
            .nodes
            .into_iter()
            .map(|n| pb::UpgradeNodeStatus {
                node_id: n.id.to_string(),
                phase: n.phase.as_str().into(),
                started_at_ms: n.started_at_ms,
                finished_at_ms: n.finished_at_ms,
            })
            .collect(),
        started_at_ms: u.started_at_ms,
        updated_at_ms: u.updated_at_ms,
    }
}

async fn ask_leader(
    dialer: &crate::proxy::Dialer,
    leader: NodeId,
    addr: &str,
) -> Result<pb::PoolStatus, Status> {
    let timeout = proxy::hop_budget(STATUS_WORK);
    let mut client = PoolServiceClient::new(dialer.channel(leader, addr, timeout).await?);
    Ok(client.status(proxy::mark(pb::StatusRequest {})).await?.into_inner())
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::PoolEvent, Status>> + Send>>;

#[tonic::async_trait]
impl PoolService for PoolApi {
    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::PoolStatus>, Status> {
        let proxied = proxy::is_proxied(&req);
        let mut s = self.status_from_leader(proxied).await;
        // Answered here (not relayed from the leader, which added them).
        if s.answered_by == self.meta.node_id().to_string() {
            self.add_pool_details(&mut s);
        }
        Ok(Response::new(s))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let proxied = proxy::is_proxied(&req);
        let s = self.status_from_leader(proxied).await;
        Ok(Response::new(pb::ListNodesResponse { nodes: s.members }))
    }

    async fn get_node(&self, req: Request<pb::GetNodeRequest>) -> Result<Response<pb::Node>, Status> {
        let proxied = proxy::is_proxied(&req);
        let id: NodeId =
            req.get_ref().id.parse().map_err(|e| Status::invalid_argument(format!("id: {e}")))?;
        // Make sure the answer reflects every committed membership change.
        if !proxied {
            let _ = self.meta.get(POOL_KEY, Consistency::Linearizable).await.map_err(meta_status)?;
        }
        let s = self.status_from_leader(proxied).await;
        s.members
            .into_iter()
            .find(|n| n.id == id.to_string())
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no node {id} in this pool")))
    }

    async fn upgrade(&self, req: Request<pb::UpgradeRequest>) -> Result<Response<pb::UpgradeStatus>, Status> {
        use nodeos_image::hash::{FileDigest, INITRAMFS_FILE, KERNEL_FILE, check_bundle};
        let r = req.into_inner();
        let images = self.compute.images();
        let digest = |name: &'static str, image: String| async move {
            let i = images.get(&image).await.map_err(|e| {
                Status::failed_precondition(format!(
                    "upgrade: {name} image {image:?}: {}",
                    crate::error::chain(&e)
                ))
            })?;
            Ok::<_, Status>(FileDigest { name: name.into(), sha256: i.sha256, size: i.size_bytes })
        };
        let kernel = digest(KERNEL_FILE, r.kernel_image.clone()).await?;
        let initrd = digest(INITRAMFS_FILE, r.initrd_image.clone()).await?;
        let manifest = check_bundle(&r.manifest, &kernel, &initrd)
            .map_err(|e| Status::invalid_argument(format!("upgrade: the bundle does not verify: {e}")))?;
        let started = self
            .compute
            .start_upgrade(nodeos_compute::upgrade::NewUpgrade {
                manifest,
                kernel_image: r.kernel_image,
                initrd_image: r.initrd_image,
            })
            .await
            .map_err(crate::vm::compute_status)?;
        Ok(Response::new(upgrade_pb(started)))
    }

    type WatchStream = EventStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let r = req.into_inner();
        if !r.prefix.is_empty() {
            nodeos_meta::command::validate_key(&r.prefix)
                .map_err(|e| Status::invalid_argument(format!("prefix: {e}")))?;
        }
        let s = self.meta.watch(r.start_revision, r.prefix).map(|ev| match ev {
            Ok(e) => Ok(pb::PoolEvent {
                revision: e.revision,
                kind: match e.kind {
                    EventKind::Put => pb::EventKind::Put,
                    EventKind::Delete => pb::EventKind::Delete,
                } as i32,
                key: e.kv.key,
                value: e.kv.value,
            }),
            Err(w) => Err(watch_status(&w)),
        });
        Ok(Response::new(Box::pin(s)))
    }
}
