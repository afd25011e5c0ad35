//! Maintenance mode: a node hands its work to the rest of the pool so it can
//! be serviced (rebooted, upgraded) with no VM downtime.
//!
//! Entering checks first, and refuses with the reason, when servicing the
//! node would break the pool: raft would lose its majority of voters, or an
//! extent of a volume would keep fewer than two reachable copies elsewhere.
//! Then it marks the node (`NodeRecord.maintenance`: no new VMs start here,
//! no new volume copies are placed here), live-migrates every running VM
//! away, a few at a time and bandwidth-capped, and moves raft leadership to
//! another voter. A VM that cannot move is reported and stays; entering
//! again retries. Exiting clears the mark.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use nodeos_meta::command::{Compare, Op, Txn};
use nodeos_meta::{Command, Consistency};
use nodeos_types::records::{NodeRecord, VmState, node_key};
use nodeos_types::{NodeId, VmId};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::error::ComputeError;
use crate::migration::{MigrateOptions, PeerReply, PeerRequest};
use crate::supervisor::Compute;

/// VMs moved at once.
const PARALLEL_MOVES: usize = 2;
/// Bandwidth cap of each move, MiB/s, so the pool's other traffic goes on.
const MOVE_BANDWIDTH_MIB: u32 = 512;
/// How long a voter may take to answer the health probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long leadership may take to move.
const LEADER_MOVE: Duration = Duration::from_secs(15);

/// What the caller hears while the node empties.
#[derive(Debug, Clone)]
pub enum MaintenanceEvent {
    /// The checks passed; the node is marked.
    Marked,
    Moving {
        vm: VmId,
        name: String,
    },
    Moved {
        vm: VmId,
        name: String,
        to: NodeId,
        paused_ms: u64,
    },
    NotMoved {
        vm: VmId,
        name: String,
        error: String,
    },
    /// Raft leadership left this node for `to`.
    LeaderMoved {
        to: NodeId,
    },
    /// Every running VM left; `stayed` could not.
    Done {
        moved: usize,
        stayed: usize,
    },
}

impl Compute {
    /// This node's record and its revision.
    async fn my_node(&self) -> Result<(NodeRecord, u64), ComputeError> {
        let meta = self.inner.records.meta();
        let (kv, _) = meta.get(&node_key(self.inner.cfg.node_id), Consistency::Linearizable).await?;
        let kv =
            kv.ok_or_else(|| ComputeError::Migration("this node has no record in the pool yet".into()))?;
        let n = serde_json::from_slice(&kv.value).map_err(|_| ComputeError::Record(kv.key.clone()))?;
        Ok((n, kv.mod_revision))
    }

    /// Whether this node is in maintenance (no new VMs start here). A node
    /// without a record yet (still joining) is not.
    pub async fn in_maintenance(&self) -> Result<bool, ComputeError> {
        let meta = self.inner.records.meta();
        let (kv, _) = meta.get(&node_key(self.inner.cfg.node_id), Consistency::Linearizable).await?;
        Ok(kv
            .and_then(|kv| serde_json::from_slice::<NodeRecord>(&kv.value).ok())
            .is_some_and(|n| n.maintenance))
    }

    async fn set_maintenance(&self, on: bool) -> Result<NodeRecord, ComputeError> {
        for _ in 0..10 {
            let (mut n, rev) = self.my_node().await?;
            if n.maintenance == on {
                return Ok(n);
            }
            n.maintenance = on;
            let key = node_key(n.id);
            let value = serde_json::to_vec(&n).map_err(|_| ComputeError::Record(key.clone()))?;
            let txn = Txn {
                compares: vec![Compare::ModRevision { key: key.clone(), equals: rev }],
                success: vec![Op::Put { key, value }],
                failure: vec![],
            };
            if self.inner.records.meta().write(Command::Txn(txn)).await?.succeeded {
                info!(node = %n.id, maintenance = on, "maintenance mode changed");
                return Ok(n);
            }
        }
        Err(ComputeError::Migration("this node's record keeps changing; try again".into()))
    }

    /// Voters other than this one that answer now.
    async fn answering(&self, nodes: impl IntoIterator<Item = NodeId>) -> BTreeSet<NodeId> {
        let probes = nodes.into_iter().map(|n| async move {
            self.call_peer_with(n, &PeerRequest::Ping, PROBE_TIMEOUT).await.ok().map(|_| n)
        });
        futures::future::join_all(probes).await.into_iter().flatten().collect()
    }

    /// Why this node cannot be serviced now, if it cannot.
    async fn maintenance_blockers(&self) -> Result<Vec<String>, ComputeError> {
        let me = self.inner.cfg.node_id;
        let meta = self.inner.records.meta();
        let voters: BTreeSet<NodeId> =
            meta.raft().metrics().borrow().membership_config.membership().voter_ids().collect();
        let nodes = self.inner.records.nodes().await?;
        let others: Vec<NodeId> = nodes.iter().map(|n| n.id).filter(|n| *n != me).collect();
        let up = self.answering(others).await;
        let in_maintenance: BTreeSet<NodeId> = nodes.iter().filter(|n| n.maintenance).map(|n| n.id).collect();
        let mut why = Vec::new();
        if voters.contains(&me) {
            let majority = voters.len() / 2 + 1;
            let left = voters.iter().filter(|v| **v != me && up.contains(v)).count();
            if left < majority {
                why.push(format!(
                    "raft would keep {left} of {} voters answering without this node; it needs {majority}",
                    voters.len()
                ));
            }
        }
        for v in self.inner.volumes.list().await? {
            for (e, set) in v.placement.iter().enumerate() {
                if !set.contains(&me) {
                    continue;
                }
                let elsewhere =
                    set.iter().filter(|n| **n != me && up.contains(n) && !in_maintenance.contains(n)).count();
                if elsewhere < 2 {
                    why.push(format!(
                        "volume {} extent {e} would keep {elsewhere} reachable cop{} elsewhere; at least 2 are needed",
                        v.name,
                        if elsewhere == 1 { "y" } else { "ies" }
                    ));
                    break;
                }
            }
        }
        Ok(why)
    }

    /// Puts this node in maintenance and empties it (see the module docs).
    pub async fn enter_maintenance(
        &self,
        events: mpsc::UnboundedSender<MaintenanceEvent>,
    ) -> Result<(), ComputeError> {
        let blockers = self.maintenance_blockers().await?;
        if !blockers.is_empty() {
            return Err(ComputeError::Migration(format!(
                "node {} cannot enter maintenance: {}",
                self.inner.cfg.node_id,
                blockers.join("; ")
            )));
        }
        self.set_maintenance(true).await?;
        let _ = events.send(MaintenanceEvent::Marked);
        let vms = self.running_here().await?;
        let results: Vec<bool> = futures::stream::iter(vms)
            .map(|v| {
                let events = events.clone();
                async move {
                    let _ = events.send(MaintenanceEvent::Moving { vm: v.id, name: v.name.clone() });
                    let opts = MigrateOptions {
                        to: None,
                        downtime: Duration::from_millis(300),
                        bandwidth_mib: Some(MOVE_BANDWIDTH_MIB),
                    };
                    let (tx, mut rx) = mpsc::unbounded_channel();
                    let moved = self.migrate(&v.id.to_string(), opts, tx).await;
                    let mut paused_ms = 0;
                    while let Ok(ev) = rx.try_recv() {
                        if let crate::migration::MigrateEvent::Committed { summary, .. } = ev {
                            paused_ms = summary.paused_ms;
                        }
                    }
                    match moved {
                        Ok(r) => {
                            let _ = events.send(MaintenanceEvent::Moved {
                                vm: v.id,
                                name: v.name,
                                to: r.node,
                                paused_ms,
                            });
                            true
                        }
                        Err(e) => {
                            let error = nodeos_types::error_chain(&e);
                            warn!(vm = %v.id, error = %error, "VM not moved off the node in maintenance");
                            let _ = events.send(MaintenanceEvent::NotMoved { vm: v.id, name: v.name, error });
                            false
                        }
                    }
                }
            })
            .buffer_unordered(PARALLEL_MOVES)
            .collect()
            .await;
        self.move_leadership(&events).await;
        let moved = results.iter().filter(|m| **m).count();
        let _ = events.send(MaintenanceEvent::Done { moved, stayed: results.len() - moved });
        Ok(())
    }

    /// The VMs whose records say they run on this node (linearizable).
    pub(crate) async fn running_here(&self) -> Result<Vec<nodeos_types::records::VmRecord>, ComputeError> {
        let me = self.inner.cfg.node_id;
        let vms = self.inner.records.list().await?;
        Ok(vms.into_iter().filter(|v| v.node == me && v.state == VmState::Running).collect())
    }

    /// Asks another voter to take leadership if this node leads.
    async fn move_leadership(&self, events: &mpsc::UnboundedSender<MaintenanceEvent>) {
        let me = self.inner.cfg.node_id;
        let meta = self.inner.records.meta();
        let (leader, voters) = {
            let m = meta.raft().metrics().borrow().clone();
            (m.current_leader, m.membership_config.membership().voter_ids().collect::<Vec<_>>())
        };
        if leader != Some(me) {
            return;
        }
        for v in voters.into_iter().filter(|v| *v != me) {
            if self.call_peer_with(v, &PeerRequest::Elect, PROBE_TIMEOUT).await.is_err() {
                continue;
            }
            let mut rx = meta.raft().metrics();
            let moved =
                tokio::time::timeout(LEADER_MOVE, rx.wait_for(|m| m.current_leader.is_some_and(|l| l != me)))
                    .await;
            if let Ok(Ok(m)) = moved
                && let Some(to) = m.current_leader
            {
                info!(to = %to, "raft leadership moved off the node in maintenance");
                let _ = events.send(MaintenanceEvent::LeaderMoved { to });
                return;
            }
        }
        warn!("raft leadership could not be moved off the node in maintenance");
    }

    /// Returns this node to service.
    pub async fn exit_maintenance(&self) -> Result<NodeRecord, ComputeError> {
        self.set_maintenance(false).await
    }

    /// Serves the health probe and the election request of the peer protocol.
    pub(crate) async fn serve_node_request(
        &self,
        req: &PeerRequest,
    ) -> Option<Result<PeerReply, ComputeError>> {
        match req {
            PeerRequest::Ping => Some(Ok(PeerReply::Done)),
            PeerRequest::Elect => Some(
                self.inner
                    .records
                    .meta()
                    .raft()
                    .trigger()
                    .elect()
                    .await
                    .map(|()| PeerReply::Done)
                    .map_err(|e| ComputeError::Migration(format!("cannot start an election: {e}"))),
            ),
            _ => None,
        }
    }
}
