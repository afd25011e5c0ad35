//! Node removal (`nodeos node remove`), on the raft leader: for a dead node,
//! or one decommissioned (its VMs moved off, powered off or about to be).
//!
//! 1. **Checks** ([`blockers`]), nothing changed when one fails: not the
//!    leader itself, not the last voter, no VM running there while the node
//!    lives, no VM made of that node's files or taps, and every volume extent
//!    with a copy there has another copy on a live node.
//! 2. **Mark** the node record `removing`: nothing new is placed there, and the
//!    volume controller rebuilds its copies elsewhere at once.
//! 3. **Re-home** its VMs (stopped or crashed; on a dead node, any): each
//!    record names a live node with room, crashed if it was meant to run, its
//!    ports moved in the same compare-and-swap.
//! 4. **Wait** until no extent keeps a copy there (bounded; a second run
//!    carries on from where the first stopped). An extent whose every other
//!    live node holds a copy already drops this one instead: it stays short
//!    of its target (with the volume's warning) until the pool grows.
//! 5. **Raft**: out of the membership (voter and node); then the node record
//!    goes and a `removed-nodes/<id>` record stays, so the id is refused
//!    from then on (peer requests and joins).

use std::collections::BTreeSet;
use std::time::Duration;

use nodeos_meta::Liveness;
use nodeos_meta::command::{Compare, Op, Txn};
use nodeos_meta::{Command, Consistency};
use nodeos_types::records::{
    NodeRecord, RemovedNode, VmRecord, VmState, VolumeRecord, VolumeState, node_key, removed_node_key,
};
use nodeos_types::{NodeId, unix_millis};
use tracing::{info, warn};

use crate::error::ComputeError;
use crate::ha::{self, check_movable};
use crate::supervisor::Compute;

/// How long one removal waits for the node's volume copies to be rebuilt elsewhere.
const COPIES_WAIT: Duration = Duration::from_secs(60);

/// What a removal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub node: NodeId,
    /// VMs (names) whose record now names another node.
    pub vms_rehomed: Vec<String>,
    /// Extent copies that were on the node when the removal started.
    pub copies: usize,
}

/// What a removal check looks at.
#[derive(Debug)]
pub struct Pool<'a> {
    pub leader: NodeId,
    pub voters: &'a BTreeSet<NodeId>,
    /// Nodes whose lease is alive now.
    pub alive: &'a BTreeSet<NodeId>,
    pub vms: &'a [VmRecord],
    pub volumes: &'a [VolumeRecord],
}

/// Every reason `target` cannot be removed now (empty: it can).
pub fn blockers(target: NodeId, pool: &Pool<'_>) -> Vec<String> {
    let mut why = Vec::new();
    if target == pool.leader {
        why.push(format!(
            "node {target} leads the pool: move leadership away first (`nodeos node maintenance enter {target}` does)"
        ));
    }
    if pool.voters.contains(&target) && pool.voters.len() == 1 {
        why.push(format!("node {target} is the pool's last raft voter"));
    }
    let dead = !pool.alive.contains(&target);
    for v in pool.vms.iter().filter(|v| v.node == target) {
        if !dead && !matches!(v.state, VmState::Stopped | VmState::Crashed) {
            why.push(format!(
                "VM {} is {} there: move it (`nodeos node maintenance enter {target}`) or stop it first",
                v.name,
                v.state.as_str()
            ));
        } else if let Err(e) = check_movable(&v.spec) {
            let e = e.to_string().replace("--ha restart: ", "");
            why.push(format!("VM {} cannot live on another node ({e}): delete it first", v.name));
        }
    }
    for r in pool.volumes.iter().filter(|r| r.state == VolumeState::Available) {
        for (e, set) in r.placement.iter().enumerate().filter(|(_, s)| s.contains(&target)) {
            let others: Vec<NodeId> = set.iter().copied().filter(|n| *n != target).collect();
            if others.is_empty() {
                why.push(format!(
                    "extent {e} of volume {} has its only copy on node {target}: removing the node loses it",
                    r.name
                ));
            } else if !others.iter().any(|n| pool.alive.contains(n)) {
                why.push(format!(
                    "extent {e} of volume {}: its other copies are on nodes that are not alive ({})",
                    r.name,
                    others.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    why
}

/// Extent copies placed on `node` (of volumes in use: a deleting volume's
/// copies go with it).
fn copies_on(node: NodeId, volumes: &[VolumeRecord]) -> usize {
    volumes
        .iter()
        .filter(|r| r.state == VolumeState::Available)
        .flat_map(|r| r.placement.iter())
        .filter(|s| s.contains(&node))
        .count()
}

/// Extents with a copy on `node` that no other node can take (every node in
/// `takers` holds one already): their copy on `node` is dropped, not rebuilt.
fn stranded<'a>(
    placement: &'a [Vec<NodeId>],
    node: NodeId,
    takers: &'a BTreeSet<NodeId>,
) -> impl Iterator<Item = usize> + 'a {
    placement
        .iter()
        .enumerate()
        .filter(move |(_, set)| set.contains(&node) && takers.iter().all(|t| set.contains(t)))
        .map(|(e, _)| e)
}

impl Compute {
    /// Removes `node` (id, hex id or hostname) from the pool. See the module docs.
    pub async fn remove_node(&self, node: &str) -> Result<Removed, ComputeError> {
        let meta = self.inner.records.meta();
        if !meta.is_leader() {
            return Err(ComputeError::Removal("only the raft leader removes nodes; ask again".into()));
        }
        let nodes = self.inner.records.nodes().await?;
        let membership = meta.metrics().membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let known: BTreeSet<NodeId> =
            nodes.iter().map(|n| n.id).chain(membership.nodes().map(|(id, _)| *id)).collect();
        let target = known
            .iter()
            .copied()
            .find(|id| id.to_string() == node || format!("{:x}", id.0) == node)
            .or_else(|| nodes.iter().find(|n| n.hostname == node).map(|n| n.id))
            .ok_or_else(|| ComputeError::Removal(format!("no node {node:?} in this pool")))?;
        let alive: BTreeSet<NodeId> =
            known.iter().copied().filter(|id| meta.liveness(*id).0 == Liveness::Alive).collect();
        let vms = self.inner.records.list().await?;
        let volumes = self.inner.volumes.list().await.map_err(|e| ComputeError::Volume(Box::new(e)))?;
        let pool = Pool {
            leader: self.inner.cfg.node_id,
            voters: &voters,
            alive: &alive,
            vms: &vms,
            volumes: &volumes,
        };
        let why = blockers(target, &pool);
        if !why.is_empty() {
            return Err(ComputeError::Removal(format!(
                "node {target} cannot be removed: {}",
                why.join("; ")
            )));
        }
        let copies = copies_on(target, &volumes);
        let record = nodes.iter().find(|n| n.id == target).cloned();
        warn!(node = %target, alive = alive.contains(&target), copies, "removing a node from the pool");
        if let Some(r) = &record {
            self.mark_removing(r).await?;
        }
        let mut vms_rehomed = Vec::new();
        let views = ha::views(&nodes, &vms, |n| meta.liveness(n).0);
        for v in vms.iter().filter(|v| v.node == target) {
            if let Some(to) = self.rehome(v, target, &views).await? {
                info!(vm = %v.id, name = %v.name, from = %target, to = %to, "VM re-homed off a node being removed");
                vms_rehomed.push(v.name.clone());
            }
        }
        self.wait_copies_gone(target).await?;
        meta.remove_member(target).await?;
        let tomb = RemovedNode {
            id: target,
            hostname: record.as_ref().map(|r| r.hostname.clone()).unwrap_or_default(),
            removed_at_ms: unix_millis(),
        };
        let value = serde_json::to_vec(&tomb).map_err(|_| ComputeError::Record(removed_node_key(target)))?;
        let txn = Txn {
            compares: vec![],
            success: vec![
                Op::Delete { key: node_key(target) },
                Op::Put { key: removed_node_key(target), value },
            ],
            failure: vec![],
        };
        meta.write(Command::Txn(txn)).await?;
        warn!(node = %target, vms = vms_rehomed.len(), copies, "node removed from the pool; its id is refused from now on");
        Ok(Removed { node: target, vms_rehomed, copies })
    }

    /// Sets `removing` on a node's record (compare-and-swap, retried).
    async fn mark_removing(&self, r: &NodeRecord) -> Result<(), ComputeError> {
        let meta = self.inner.records.meta();
        for _ in 0..10 {
            let (kv, _) = meta.get(&node_key(r.id), Consistency::Linearizable).await?;
            let Some(kv) = kv else { return Ok(()) };
            let mut n: NodeRecord =
                serde_json::from_slice(&kv.value).map_err(|_| ComputeError::Record(kv.key.clone()))?;
            if n.removing {
                return Ok(());
            }
            n.removing = true;
            let value = serde_json::to_vec(&n).map_err(|_| ComputeError::Record(kv.key.clone()))?;
            let txn = Txn {
                compares: vec![Compare::ModRevision { key: kv.key.clone(), equals: kv.mod_revision }],
                success: vec![Op::Put { key: kv.key, value }],
                failure: vec![],
            };
            if meta.write(Command::Txn(txn)).await?.succeeded {
                return Ok(());
            }
        }
        Err(ComputeError::Removal(format!("node {}'s record keeps changing; try again", r.id)))
    }

    /// Hands a VM of the node being removed to a live node: one
    /// compare-and-swap on its record that moves its ports too. A VM meant
    /// to run arrives crashed (an HA VM is then started by the controller).
    async fn rehome(
        &self,
        v: &VmRecord,
        from: NodeId,
        views: &[ha::NodeView],
    ) -> Result<Option<NodeId>, ComputeError> {
        let to = ha::place(v.spec.memory_mib, views, &[from])
            .or_else(|| ha::place(0, views, &[from]))
            .ok_or_else(|| {
                ComputeError::Removal(format!("no live node in service can take VM {}", v.name))
            })?;
        let (mut r, rev) = self.inner.records.load(v.id).await?;
        if r.node != from {
            return Ok(None);
        }
        if r.state != VmState::Stopped {
            r.state = VmState::Crashed;
        }
        r.reason = format!("its node {from} was removed from the pool");
        if self.hand_over(&mut r, rev, to).await? {
            Ok(Some(to))
        } else {
            Err(ComputeError::Removal(format!("VM {} changed during the removal; try again", v.name)))
        }
    }

    /// Drops `node`'s copy from the stranded extents of one volume
    /// (compare-and-swap; a conflict drops nothing and is settled by the
    /// next round). How many copies it dropped.
    async fn drop_stranded(
        &self,
        id: nodeos_types::VolumeId,
        node: NodeId,
        takers: &BTreeSet<NodeId>,
    ) -> Result<usize, ComputeError> {
        let volumes = &self.inner.volumes;
        let (mut r, rev) =
            volumes.get(&id.to_string()).await.map_err(|e| ComputeError::Volume(Box::new(e)))?;
        let extents: Vec<usize> = stranded(&r.placement, node, takers).collect();
        for e in &extents {
            r.placement[*e].retain(|n| *n != node);
        }
        r.updated_at_ms = unix_millis();
        match volumes.put_if(&r, rev).await {
            Ok(_) => {
                info!(volume = %r.name, extents = extents.len(), node = %node, "copies on a node being removed dropped: no other node can take them");
                Ok(extents.len())
            }
            Err(nodeos_volumes::VolumeError::Conflict) => Ok(0),
            Err(e) => Err(ComputeError::Volume(Box::new(e))),
        }
    }

    /// Waits until every copy has left `node`: rebuilt on another node by the
    /// volume controller, or, in an extent with no live node left to take
    /// it, dropped here (the extent keeps its other copies, short of its
    /// target until the pool grows).
    async fn wait_copies_gone(&self, node: NodeId) -> Result<(), ComputeError> {
        let deadline = tokio::time::Instant::now() + COPIES_WAIT;
        loop {
            let volumes = self.inner.volumes.list().await.map_err(|e| ComputeError::Volume(Box::new(e)))?;
            let nodes = self.inner.records.nodes().await?;
            let meta = self.inner.records.meta();
            let takers: BTreeSet<NodeId> = nodes
                .iter()
                .filter(|n| n.id != node && !n.removing && !n.block_address.is_empty())
                .filter(|n| meta.liveness(n.id).0 == Liveness::Alive)
                .map(|n| n.id)
                .collect();
            let mut dropped = 0;
            for r in volumes.iter().filter(|r| r.state == VolumeState::Available) {
                if stranded(&r.placement, node, &takers).next().is_some() {
                    dropped += self.drop_stranded(r.id, node, &takers).await?;
                }
            }
            let left = copies_on(node, &volumes).saturating_sub(dropped);
            if left == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ComputeError::Removal(format!(
                    "{left} volume extent copies are still placed on node {node} after {} s; they are being rebuilt elsewhere: run the removal again",
                    COPIES_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeos_types::records::DiskSpec;
    use nodeos_types::{VmId, VolumeId};

    fn vm(node: u64, state: VmState, file_disk: bool) -> VmRecord {
        let mut r =
            crate::records::new_record(VmId(node * 10), "v", crate::records::test_spec(), NodeId(node));
        r.state = state;
        if file_disk {
            r.spec.disks = vec![DiskSpec { path: "/srv/d.img".into(), read_only: false, volume: None }];
        }
        r
    }

    fn volume(name: &str, placement: Vec<Vec<u64>>) -> VolumeRecord {
        VolumeRecord {
            id: VolumeId(7),
            name: name.into(),
            size_bytes: 1 << 20,
            extent_size: 1 << 20,
            replicas: 2,
            placement: placement.into_iter().map(|s| s.into_iter().map(NodeId).collect()).collect(),
            layers: vec![1],
            generation: 1,
            writer: None,
            snapshots: vec![],
            origin: None,
            state: VolumeState::Available,
            warning: String::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn check(target: u64, alive: &[u64], vms: &[VmRecord], volumes: &[VolumeRecord]) -> Vec<String> {
        let voters: BTreeSet<NodeId> = [1, 2, 3].map(NodeId).into();
        let alive: BTreeSet<NodeId> = alive.iter().copied().map(NodeId).collect();
        blockers(NodeId(target), &Pool { leader: NodeId(1), voters: &voters, alive: &alive, vms, volumes })
    }

    #[test]
    fn copies_no_other_node_can_take_are_dropped_not_rebuilt() {
        let takers: BTreeSet<NodeId> = [NodeId(1), NodeId(2)].into();
        let placement: Vec<Vec<NodeId>> = vec![
            vec![NodeId(1), NodeId(2), NodeId(3)],
            vec![NodeId(1), NodeId(3)],
            vec![NodeId(1), NodeId(2)],
        ];
        assert_eq!(stranded(&placement, NodeId(3), &takers).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn a_dead_node_with_copies_elsewhere_and_movable_vms_can_go() {
        let vms = [vm(3, VmState::Running, false), vm(3, VmState::Stopped, false)];
        let vols = [volume("a", vec![vec![1, 3], vec![2, 3]])];
        assert_eq!(check(3, &[1, 2], &vms, &vols), Vec::<String>::new());
    }

    #[test]
    fn removals_that_would_lose_something_are_refused_with_the_reason() {
        let none: [VmRecord; 0] = [];
        let no_vols: [VolumeRecord; 0] = [];
        assert!(check(1, &[1, 2, 3], &none, &no_vols)[0].contains("leads the pool"));
        let only: BTreeSet<NodeId> = [NodeId(2)].into();
        let alive: BTreeSet<NodeId> = [NodeId(1), NodeId(2)].into();
        let why = blockers(
            NodeId(2),
            &Pool { leader: NodeId(1), voters: &only, alive: &alive, vms: &none, volumes: &no_vols },
        );
        assert!(why[0].contains("last raft voter"), "{why:?}");
        // A live node still running a VM.
        let why = check(3, &[1, 2, 3], &[vm(3, VmState::Running, false)], &no_vols);
        assert!(why[0].contains("is running there"), "{why:?}");
        // A VM made of the node's own files.
        let why = check(3, &[1, 2], &[vm(3, VmState::Stopped, true)], &no_vols);
        assert!(why[0].contains("cannot live on another node"), "{why:?}");
        // The only copy, or the other copies down too.
        let why = check(3, &[1, 2], &none, &[volume("solo", vec![vec![3]])]);
        assert!(why[0].contains("only copy on node"), "{why:?}");
        let why = check(3, &[1], &none, &[volume("pair", vec![vec![2, 3]])]);
        assert!(why[0].contains("not alive"), "{why:?}");
    }
}
