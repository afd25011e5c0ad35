//! High availability: VMs marked `ha restart` are restarted by the pool when
//! their node is dead (elsewhere) or when they crashed (where they are).
//!
//! The controller runs on every node and acts only on the raft leader, once a
//! second. It reads the VM and node records and the leader's lease notes, and
//! restarts what needs it, highest priority first, at most [`MAX_IN_FLIGHT`]
//! at a time (a whole pool coming back does not start everything at once).
//! A failed start is retried after a backoff that doubles up to a minute; a VM
//! the pool restarted [`FLAP_LIMIT`] times within [`FLAP_WINDOW`] is left as
//! it is (flap guard) until an operator starts it.
//!
//! Safety rests on fencing, not on timing. Moving a VM off a dead node is one
//! compare-and-swap on its record that also moves its switch ports (frames
//! from the old node's tunnel for those MACs are dropped from then on); the
//! start on the new node takes each volume's next generation, so the replicas
//! refuse the old worker's writes should it still run. The old node, when it
//! is heard from again, finds the record naming another node and ends its copy
//! unresumed (self-fencing paused it before its lease ran out).
//!
//! The planning here is sans-IO: [`need`], [`place`], [`flapping`] and
//! [`tolerance`] take records and give verdicts.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nodeos_meta::Liveness;
use nodeos_types::records::{HA_HISTORY, NodeRecord, VmRecord, VmState};
use nodeos_types::{NodeId, VmId, unix_millis};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::error::ComputeError;
use crate::migration::{PeerReply, PeerRequest};
use crate::supervisor::Compute;

/// How often the leader looks for VMs to restart.
const TICK: Duration = Duration::from_secs(1);
/// HA starts under way at once, pool-wide.
pub const MAX_IN_FLIGHT: usize = 2;
/// First wait after a failed restart; doubles per failure up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Flap guard: no more than this many HA restarts of one VM ...
pub const FLAP_LIMIT: usize = 3;
/// ... within this long.
pub const FLAP_WINDOW: Duration = Duration::from_secs(600);
/// How long the node asked to start a VM may take to answer.
const START_CALL: Duration = Duration::from_secs(60);
/// Memory a node keeps for itself, MiB: not counted as room for VMs.
pub const NODE_RESERVE_MIB: u64 = 512;

/// What a VM needs from the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Its node is dead: restart it on another node.
    Move,
    /// It crashed on a live node that can run it: start it there again.
    InPlace,
}

/// What the controller knows of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeView {
    pub id: NodeId,
    pub liveness: Liveness,
    /// Runs VMs: has KVM and is not in maintenance.
    pub usable: bool,
    /// Free memory for VMs, MiB (`None`: the node does not report its memory).
    pub free_mib: Option<u64>,
}

/// Whether `r` needs restarting, given what is known of its node (`None`:
/// the node is not a member any more, as good as dead).
pub fn need(r: &VmRecord, node: Option<&NodeView>) -> Option<Need> {
    if !r.ha.restart {
        return None;
    }
    let liveness = node.map_or(Liveness::Dead, |n| n.liveness);
    match (r.state, liveness) {
        // Meant to run, and its node is gone: nobody else will restart it.
        (VmState::Running | VmState::Starting | VmState::Crashed, Liveness::Dead) => Some(Need::Move),
        (VmState::Crashed, Liveness::Alive) if node.is_some_and(|n| n.usable) => Some(Need::InPlace),
        (VmState::Crashed, Liveness::Alive) => Some(Need::Move),
        // A suspect node may come back: wait until it is alive or dead. An
        // operator's stopped or paused VM, or one being stopped, stays so.
        _ => None,
    }
}

/// True when the pool restarted the VM [`FLAP_LIMIT`] times within
/// [`FLAP_WINDOW`] before `now_ms`.
pub fn flapping(restarts: &[u64], now_ms: u64) -> bool {
    let window = u64::try_from(FLAP_WINDOW.as_millis()).unwrap_or(u64::MAX);
    restarts.iter().filter(|t| now_ms.saturating_sub(**t) < window).count() >= FLAP_LIMIT
}

/// The node a VM of `memory_mib` restarts on: an alive, usable node other
/// than those in `exclude` with room for it, the one with the most room.
pub fn place(memory_mib: u64, nodes: &[NodeView], exclude: &[NodeId]) -> Option<NodeId> {
    nodes
        .iter()
        .filter(|n| n.liveness == Liveness::Alive && n.usable && !exclude.contains(&n.id))
        .filter(|n| n.free_mib.is_none_or(|f| f >= memory_mib))
        .max_by_key(|n| (n.free_mib.unwrap_or(u64::MAX), std::cmp::Reverse(n.id)))
        .map(|n| n.id)
}

/// Memory the VMs of `vms` hold or are about to hold on `node`, MiB.
pub fn used_mib(node: NodeId, vms: &[VmRecord]) -> u64 {
    vms.iter()
        .filter(|v| v.node == node && !matches!(v.state, VmState::Stopped | VmState::Crashed))
        .chain(vms.iter().filter(|v| v.migration.as_ref().is_some_and(|m| m.to == node)))
        .map(|v| v.spec.memory_mib)
        .sum()
}

/// Free memory of `n` for VMs, MiB (`None`: it does not report its memory).
pub fn free_mib(n: &NodeRecord, vms: &[VmRecord]) -> Option<u64> {
    (n.memory_mib > 0)
        .then(|| n.memory_mib.saturating_sub(NODE_RESERVE_MIB).saturating_sub(used_mib(n.id, vms)))
}

/// The pool's node views: liveness from `liveness`, room from the records.
pub fn views(nodes: &[NodeRecord], vms: &[VmRecord], liveness: impl Fn(NodeId) -> Liveness) -> Vec<NodeView> {
    nodes
        .iter()
        .map(|n| NodeView {
            id: n.id,
            liveness: liveness(n.id),
            usable: !n.maintenance && !n.removing && n.cpu.is_some(),
            free_mib: free_mib(n, vms),
        })
        .collect()
}

/// How many node failures the pool's HA VMs survive, and what limits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tolerance {
    /// VMs marked `ha restart` that run.
    pub protected: usize,
    pub failures: usize,
    /// What stops it from being one more.
    pub limit: String,
}

/// Subsets of nodes checked at most; past it only the worst case by HA load is.
const SUBSETS_CHECKED: usize = 4096;

/// Failures to tolerate (XAPI's term): the largest `k` such that whichever
/// `k` usable nodes fail, every running HA VM of theirs fits on the others
/// (first fit, largest first, into their free memory), the raft voters keep a
/// majority, and a node is left. Nodes that are not usable run nothing of
/// theirs and take nothing.
pub fn tolerance(nodes: &[NodeRecord], vms: &[VmRecord], voters: usize) -> Tolerance {
    let protected: Vec<&VmRecord> = vms
        .iter()
        .filter(|v| v.ha.restart && matches!(v.state, VmState::Running | VmState::Starting))
        .collect();
    let usable: Vec<&NodeRecord> =
        nodes.iter().filter(|n| !n.maintenance && !n.removing && n.cpu.is_some()).collect();
    let quorum = voters.saturating_sub(1) / 2;
    let mut failures = 0;
    let limit = loop {
        let k = failures + 1;
        if k > quorum {
            break format!("raft: {voters} voters keep a majority through {quorum} failures");
        }
        if k >= usable.len() {
            break format!("{} nodes can run VMs", usable.len());
        }
        if let Some(lost) = unplaceable(&usable, &protected, vms, k) {
            let who = if k == 1 { format!("node {lost} fails") } else { format!("nodes {lost} fail") };
            break format!("capacity: if {who}, its HA VMs do not fit on the others");
        }
        failures = k;
    };
    Tolerance { protected: protected.len(), failures, limit }
}

/// A set of `k` usable nodes whose HA VMs would not fit on the others, named.
fn unplaceable(
    usable: &[&NodeRecord],
    protected: &[&VmRecord],
    vms: &[VmRecord],
    k: usize,
) -> Option<String> {
    let fits = |failed: &[usize]| {
        let failed_ids: Vec<NodeId> = failed.iter().map(|i| usable[*i].id).collect();
        let mut room: Vec<u64> = usable
            .iter()
            .filter(|n| !failed_ids.contains(&n.id))
            .map(|n| free_mib(n, vms).unwrap_or(u64::MAX))
            .collect();
        let mut load: Vec<u64> =
            protected.iter().filter(|v| failed_ids.contains(&v.node)).map(|v| v.spec.memory_mib).collect();
        load.sort_unstable_by(|a, b| b.cmp(a));
        load.into_iter().all(|m| match room.iter_mut().find(|r| **r >= m) {
            Some(r) => {
                *r -= m;
                true
            }
            None => false,
        })
    };
    let name =
        |failed: &[usize]| failed.iter().map(|i| usable[*i].id.to_string()).collect::<Vec<_>>().join(", ");
    let mut checked = 0;
    let mut subset: Vec<usize> = (0..k).collect();
    loop {
        if !fits(&subset) {
            return Some(name(&subset));
        }
        checked += 1;
        if checked >= SUBSETS_CHECKED {
            break;
        }
        // Next k-combination of 0..n in lexicographic order.
        let n = usable.len();
        let i = (0..k).rev().find(|&i| subset[i] < n - k + i)?;
        subset[i] += 1;
        for j in i + 1..k {
            subset[j] = subset[j - 1] + 1;
        }
    }
    // Too many subsets to check them all: the k nodes with the most HA memory.
    let mut by_load: Vec<usize> = (0..usable.len()).collect();
    let ha_load = |i: usize| {
        protected.iter().filter(|v| v.node == usable[i].id).map(|v| v.spec.memory_mib).sum::<u64>()
    };
    by_load.sort_by_key(|i| std::cmp::Reverse(ha_load(*i)));
    by_load.truncate(k);
    (!fits(&by_load)).then(|| name(&by_load))
}

/// An HA start under way: its task, the node asked, the VM's memory (MiB).
type InFlight = (JoinHandle<Result<(), String>>, NodeId, u64);

/// The controller's memory between rounds (lost with leadership, on purpose:
/// a new leader starts from the records).
#[derive(Debug, Default)]
struct Controller {
    /// HA starts under way: the node asked, and the VM's memory.
    in_flight: HashMap<VmId, InFlight>,
    /// Failed attempts and when the next may run.
    backoff: HashMap<VmId, (u32, Instant)>,
    /// VMs whose "cannot restart" was logged, so it is said once.
    said: HashSet<VmId>,
}

impl Controller {
    /// Collects finished starts: a success clears the VM's backoff, a failure
    /// doubles it.
    async fn harvest(&mut self) {
        let done: Vec<VmId> =
            self.in_flight.iter().filter(|(_, (h, _, _))| h.is_finished()).map(|(id, _)| *id).collect();
        for id in done {
            let Some((h, node, _)) = self.in_flight.remove(&id) else { continue };
            match h.await {
                Ok(Ok(())) => {
                    info!(vm = %id, node = %node, "HA restart done: the VM runs");
                    self.backoff.remove(&id);
                    self.said.remove(&id);
                }
                Ok(Err(e)) => self.failed(id, node, &e),
                Err(e) => self.failed(id, node, &e.to_string()),
            }
        }
    }

    fn failed(&mut self, id: VmId, node: NodeId, error: &str) {
        let (n, _) = self.backoff.get(&id).copied().unwrap_or((0, Instant::now()));
        let wait = BACKOFF_FIRST.saturating_mul(1 << n.min(8)).min(BACKOFF_MAX);
        warn!(vm = %id, node = %node, error, retry_in_s = wait.as_secs(), "HA restart failed");
        self.backoff.insert(id, (n + 1, Instant::now() + wait));
    }

    fn due(&self, id: VmId) -> bool {
        self.backoff.get(&id).is_none_or(|(_, at)| Instant::now() >= *at)
    }

    /// Says once per episode why a VM is not restarted.
    fn say(&mut self, id: VmId, why: &str) {
        if self.said.insert(id) {
            warn!(vm = %id, "HA restart held back: {why}");
        }
    }
}

impl Compute {
    /// Starts the HA controller (it acts only while this node leads the pool).
    pub fn spawn_ha_controller(&self) -> JoinHandle<()> {
        let c = self.clone();
        tokio::spawn(async move { c.ha_controller().await })
    }

    async fn ha_controller(self) {
        let mut ctl = Controller::default();
        loop {
            tokio::time::sleep(TICK).await;
            ctl.harvest().await;
            if !self.inner.records.meta().is_leader() {
                // A new leader starts from the records; starts under way finish.
                ctl.backoff.clear();
                ctl.said.clear();
                continue;
            }
            if let Err(e) = self.ha_round(&mut ctl).await {
                debug!(error = %nodeos_types::error_chain(&e), "HA round skipped");
            }
        }
    }

    async fn ha_round(&self, ctl: &mut Controller) -> Result<(), ComputeError> {
        // The leader's own copy: no read round every second. Every action
        // re-reads its VM linearizably (the move's compare-and-swap, the
        // start's checks), so a copy a moment old costs a refused attempt.
        let vms = self.inner.records.list_at(nodeos_meta::Consistency::Local).await?;
        if !vms.iter().any(|v| v.ha.restart) {
            return Ok(());
        }
        let nodes = self.inner.records.nodes().await?;
        let meta = self.inner.records.meta();
        let mut views = views(&nodes, &vms, |n| meta.liveness(n).0);
        // Room already promised to starts under way.
        for (id, (_, node, mem)) in &ctl.in_flight {
            let started = vms.iter().any(|v| v.id == *id && v.node == *node && v.state == VmState::Running);
            if let Some(f) = views.iter_mut().find(|v| v.id == *node).and_then(|v| v.free_mib.as_mut())
                && !started
            {
                *f = f.saturating_sub(*mem);
            }
        }
        let mut wanted: Vec<(&VmRecord, Need)> = vms
            .iter()
            .filter(|v| !ctl.in_flight.contains_key(&v.id))
            .filter_map(|v| need(v, views.iter().find(|n| n.id == v.node)).map(|n| (v, n)))
            .collect();
        wanted.sort_by(|(a, _), (b, _)| b.ha.priority.cmp(&a.ha.priority).then_with(|| a.name.cmp(&b.name)));
        let now = unix_millis();
        for (v, need) in wanted {
            if ctl.in_flight.len() >= MAX_IN_FLIGHT {
                break;
            }
            if !ctl.due(v.id) {
                continue;
            }
            if flapping(&v.ha_restarts, now) {
                ctl.say(
                    v.id,
                    &format!(
                        "restarted {FLAP_LIMIT} times in {} min (flap guard); `nodeos vm start {}` starts it again",
                        FLAP_WINDOW.as_secs() / 60,
                        v.name
                    ),
                );
                continue;
            }
            let node = match need {
                Need::InPlace => v.node,
                Need::Move => {
                    // Never onto the node an interrupted migration was sending
                    // it to: that node may hold a half-received copy.
                    let mut exclude = vec![v.node];
                    exclude.extend(v.migration.as_ref().map(|m| m.to));
                    let Some(to) = place(v.spec.memory_mib, &views, &exclude) else {
                        ctl.say(v.id, &format!("no alive node has {} MiB free for it", v.spec.memory_mib));
                        continue;
                    };
                    let usable = views.iter().find(|n| n.id == v.node).is_some_and(|n| n.usable);
                    match self.ha_move(v.id, to, usable).await {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => {
                            ctl.failed(v.id, to, &nodeos_types::error_chain(&e));
                            continue;
                        }
                    }
                    to
                }
            };
            if let Some(f) = views.iter_mut().find(|n| n.id == node).and_then(|n| n.free_mib.as_mut()) {
                *f = f.saturating_sub(v.spec.memory_mib);
            }
            info!(vm = %v.id, name = %v.name, node = %node, priority = v.ha.priority, ?need, "HA restart: starting the VM");
            let (c, id) = (self.clone(), v.id);
            let h = tokio::spawn(async move { c.ha_start_on(node, id).await });
            ctl.in_flight.insert(v.id, (h, node, v.spec.memory_mib));
        }
        Ok(())
    }

    /// Hands a VM of a dead node to `to`: one compare-and-swap on its record
    /// (it names `to`, crashed, to be started there) that moves its ports too.
    /// `Ok(false)`: the record changed meanwhile, or no longer needs moving.
    async fn ha_move(&self, id: VmId, to: NodeId, usable: bool) -> Result<bool, ComputeError> {
        let (mut r, rev) = self.inner.records.load(id).await?;
        let meta = self.inner.records.meta();
        let (liveness, age) = meta.liveness(r.node);
        let from = r.node;
        let view = NodeView { id: from, liveness, usable, free_mib: None };
        if need(&r, Some(&view)) != Some(Need::Move) {
            return Ok(false);
        }
        r.state = VmState::Crashed;
        r.reason = if liveness == Liveness::Dead {
            format!(
                "HA: node {from} is dead (no lease renewal for {} s); restarting on node {to}",
                age.as_secs()
            )
        } else {
            format!("HA: node {from} cannot run it; restarting on node {to}")
        };
        let moved = self.hand_over(&mut r, rev, to).await?;
        if moved {
            warn!(vm = %id, from = %from, to = %to, "HA: VM handed to another node");
        }
        Ok(moved)
    }

    /// Asks `node` (this one or a peer) to start a VM the pool restarts.
    async fn ha_start_on(&self, node: NodeId, id: VmId) -> Result<(), String> {
        if node == self.inner.cfg.node_id {
            return self.ha_start(id).await.map(|_| ()).map_err(|e| nodeos_types::error_chain(&e));
        }
        match self.call_peer_with(node, &PeerRequest::HaStart { vm: id }, START_CALL).await {
            Ok(PeerReply::Done) => Ok(()),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(nodeos_types::error_chain(&e)),
        }
    }

    /// Starts a VM of this node the pool restarts: only if it is still marked
    /// `ha restart` and crashed (an operator may have stopped it meanwhile).
    pub(crate) async fn ha_start(&self, id: VmId) -> Result<VmRecord, ComputeError> {
        self.start_as(&id.to_string(), crate::supervisor::StartedBy::Ha).await
    }

    /// Sets a VM's HA setting (on the VM's node, under its lock). Restarting
    /// elsewhere needs a VM made of pool resources only.
    pub async fn set_ha(&self, vm: &str, ha: nodeos_types::records::VmHa) -> Result<VmRecord, ComputeError> {
        check_ha(&ha)?;
        let id = self.resolve(vm).await?.id;
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let mut r = self.resolve(&id.to_string()).await?;
        self.here(&r)?;
        if ha.restart {
            check_movable(&r.spec)?;
        }
        if r.ha != ha {
            r.ha = ha;
            self.inner.records.save(&mut r).await?;
            info!(vm = %r.id, restart = ha.restart, priority = ha.priority, "VM HA setting changed");
        }
        Ok(r)
    }
}

/// Refuses `--ha restart` for a VM the pool could not start on another node:
/// one with a host tap or a disk file of its node.
pub fn check_movable(spec: &nodeos_types::records::VmSpec) -> Result<(), ComputeError> {
    if let Some((i, n)) = spec.nics.iter().enumerate().find(|(_, n)| n.port.is_none()) {
        return Err(ComputeError::Ha(format!(
            "--ha restart: nics[{i}] is the host tap {:?}; a VM the pool restarts on another node has NICs on pool networks only",
            n.tap
        )));
    }
    if let Some((i, d)) = spec.disks.iter().enumerate().find(|(_, d)| d.volume.is_none()) {
        return Err(ComputeError::Ha(format!(
            "--ha restart: disks[{i}] is the file {:?} of its node; a VM the pool restarts on another node has pool volumes only",
            d.path
        )));
    }
    Ok(())
}

/// Checks an HA setting's range.
pub fn check_ha(ha: &nodeos_types::records::VmHa) -> Result<(), ComputeError> {
    let range = nodeos_types::records::VmHa::PRIORITY_RANGE;
    if !range.contains(&ha.priority) {
        return Err(ComputeError::Ha(format!(
            "--ha-priority {} is out of range {}..={}",
            ha.priority,
            range.start(),
            range.end()
        )));
    }
    Ok(())
}

/// Records an HA restart in `r`'s history (the last [`HA_HISTORY`] kept).
pub(crate) fn note_restart(r: &mut VmRecord, now_ms: u64) {
    r.ha_restarts.push(now_ms);
    let extra = r.ha_restarts.len().saturating_sub(HA_HISTORY);
    r.ha_restarts.drain(..extra);
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeos_types::records::VmHa;

    fn vm(id: u64, node: u64, state: VmState, mem: u64, ha: bool) -> VmRecord {
        let mut r = crate::records::new_record(
            VmId(id),
            &format!("v{id}"),
            crate::records::test_spec(),
            NodeId(node),
        );
        r.state = state;
        r.spec.memory_mib = mem;
        r.ha = VmHa { restart: ha, priority: 0 };
        r
    }

    fn view(id: u64, liveness: Liveness, free: u64) -> NodeView {
        NodeView { id: NodeId(id), liveness, usable: true, free_mib: Some(free) }
    }

    fn node(id: u64, memory_mib: u64) -> NodeRecord {
        NodeRecord {
            id: NodeId(id),
            address: String::new(),
            hostname: String::new(),
            version: String::new(),
            image_hash: String::new(),
            joined_at_ms: 0,
            block_address: String::new(),
            block_capacity: 0,
            vxlan_address: String::new(),
            cpu: Some(nodeos_types::cpu::CpuModel::default()),
            memory_mib,
            maintenance: false,
            removing: false,
        }
    }

    #[test]
    fn only_ha_vms_meant_to_run_are_restarted() {
        let dead = view(1, Liveness::Dead, 0);
        let alive = view(1, Liveness::Alive, 1000);
        let suspect = view(1, Liveness::Suspect, 1000);
        assert_eq!(need(&vm(1, 1, VmState::Running, 64, true), Some(&dead)), Some(Need::Move));
        assert_eq!(need(&vm(1, 1, VmState::Running, 64, true), None), Some(Need::Move), "removed node");
        assert_eq!(need(&vm(1, 1, VmState::Crashed, 64, true), Some(&dead)), Some(Need::Move));
        assert_eq!(need(&vm(1, 1, VmState::Crashed, 64, true), Some(&alive)), Some(Need::InPlace));
        let maint = NodeView { usable: false, ..alive };
        assert_eq!(need(&vm(1, 1, VmState::Crashed, 64, true), Some(&maint)), Some(Need::Move));
        assert_eq!(need(&vm(1, 1, VmState::Running, 64, true), Some(&suspect)), None, "wait for a verdict");
        assert_eq!(need(&vm(1, 1, VmState::Running, 64, true), Some(&alive)), None);
        assert_eq!(need(&vm(1, 1, VmState::Running, 64, false), Some(&dead)), None, "not HA");
        assert_eq!(need(&vm(1, 1, VmState::Stopped, 64, true), Some(&dead)), None, "stopped by an operator");
        assert_eq!(need(&vm(1, 1, VmState::Paused, 64, true), Some(&dead)), None, "paused by an operator");
        assert_eq!(need(&vm(1, 1, VmState::Stopping, 64, true), Some(&dead)), None);
    }

    #[test]
    fn a_vm_goes_to_the_alive_node_with_the_most_room() {
        let nodes = [
            view(1, Liveness::Dead, 9000),
            view(2, Liveness::Alive, 300),
            view(3, Liveness::Alive, 500),
            view(4, Liveness::Suspect, 9000),
            NodeView { usable: false, ..view(5, Liveness::Alive, 9000) },
        ];
        assert_eq!(place(256, &nodes, &[NodeId(1)]), Some(NodeId(3)));
        assert_eq!(place(256, &nodes, &[NodeId(3)]), Some(NodeId(2)));
        assert_eq!(place(400, &nodes, &[NodeId(3)]), None, "no room");
        assert_eq!(place(600, &nodes, &[]), None);
    }

    #[test]
    fn the_flap_guard_counts_restarts_within_the_window() {
        let now = 10_000_000;
        let min = 60_000;
        assert!(!flapping(&[], now));
        assert!(!flapping(&[now - 3 * min, now - min], now));
        assert!(flapping(&[now - 3 * min, now - 2 * min, now - min], now));
        assert!(!flapping(&[now - 11 * min, now - 2 * min, now - min], now), "one is older than the window");
        let mut r = vm(1, 1, VmState::Crashed, 64, true);
        for t in 0..20 {
            note_restart(&mut r, t);
        }
        assert_eq!(r.ha_restarts, (12..20).collect::<Vec<_>>());
    }

    #[test]
    fn failures_to_tolerate_follow_capacity_and_quorum() {
        // Three nodes with 2048 MiB (1536 for VMs each), one 1024 MiB HA VM each.
        let nodes = [node(1, 2048), node(2, 2048), node(3, 2048)];
        let vms = [
            vm(1, 1, VmState::Running, 1024, true),
            vm(2, 2, VmState::Running, 1024, true),
            vm(3, 3, VmState::Running, 256, true),
        ];
        let t = tolerance(&nodes, &vms, 3);
        assert_eq!((t.protected, t.failures), (3, 1), "{t:?}");
        assert!(t.limit.starts_with("raft"), "{t:?}");
        // Five voters: quorum would allow two, capacity does not.
        let t = tolerance(&nodes, &vms, 5);
        assert_eq!(t.failures, 1, "{t:?}");
        assert!(t.limit.starts_with("capacity"), "{t:?}");
        // A fourth 1024 MiB VM leaves no room for node 1's two if it fails.
        let mut more = vms.to_vec();
        more.push(vm(4, 1, VmState::Running, 1024, true));
        let big = [node(1, 4096), node(2, 2048), node(3, 2048)];
        let t = tolerance(&big, &more, 3);
        assert_eq!(t.failures, 0, "{t:?}");
        assert_eq!(
            t.limit,
            format!("capacity: if node {} fails, its HA VMs do not fit on the others", NodeId(1))
        );
        // VMs without HA count only as used room.
        let t = tolerance(&nodes, &[vm(1, 1, VmState::Running, 1024, false)], 3);
        assert_eq!((t.protected, t.failures), (0, 1));
        let t = tolerance(&nodes[..1], &vms, 1);
        assert_eq!(t.failures, 0);
    }
}
