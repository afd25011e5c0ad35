//! Self-fencing. A node whose lease renewals stop getting committed (it is cut
//! off from the raft majority, or the majority is gone) may be counted dead by
//! the pool, and its VMs started elsewhere. Before that can happen — a margin
//! before the lease TTL, counted from when the last committed renewal was
//! *sent*, which is before any node applied it — the node pauses every VM it
//! runs. Nothing is rebooted: a switch blip must not kill every VM.
//!
//! When renewals get through again, each VM it paused is resumed if its record
//! still names this node and says it runs; one whose record names another node
//! now (it was restarted elsewhere) is ended without ever running again here.
//! An operator's paused VM stays paused. Safety does not rest on these timings
//! (a frozen process can outlive its lease): a VM started elsewhere takes each
//! volume's next generation, so the replicas refuse this node's writes anyway.

use std::sync::atomic::Ordering;
use std::time::Duration;

use nodeos_meta::{Consistency, LeasePolicy};
use nodeos_types::VmId;
use nodeos_types::records::{VmRecord, VmState, vm_key};
use nodeos_vmm::control::ToWorker;
use tracing::{error, info, warn};

use crate::supervisor::Compute;

/// How often the lease's age is checked.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Longest wait for a worker to pause or resume.
const WORKER_TIMEOUT: Duration = Duration::from_secs(5);

/// Time after the last committed renewal was sent at which a node pauses its
/// VMs: a quarter of the TTL (at least 1 s, at most half) before the TTL.
pub fn fence_after(policy: LeasePolicy) -> Duration {
    let margin = (policy.ttl / 4).max(Duration::from_secs(1)).min(policy.ttl / 2);
    policy.ttl.saturating_sub(margin)
}

/// What to do with a VM this node paused, once its lease is renewed again.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterFence {
    Resume,
    /// Its record names another node now: end it here, unresumed.
    End,
    /// Its record says it is no longer running (stopped, paused by an
    /// operator meanwhile): leave it as it is.
    Leave,
}

/// The decision for a VM paused by self-fencing, from its record now (`None`:
/// the record is gone, the VM was deleted).
pub fn after_fence(record: Option<&VmRecord>, me: nodeos_types::NodeId) -> AfterFence {
    match record {
        None => AfterFence::End,
        Some(r) if r.node != me => AfterFence::End,
        Some(r) if r.state == VmState::Running && r.migration.is_none() => AfterFence::Resume,
        Some(_) => AfterFence::Leave,
    }
}

impl Compute {
    /// Starts self-fencing: `since_renewal` says how long ago this node sent
    /// its last lease renewal that got committed (`None` before the first).
    pub fn spawn_self_fencing<F>(&self, since_renewal: F, policy: LeasePolicy) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> Option<Duration> + Send + Sync + 'static,
    {
        let c = self.clone();
        tokio::spawn(async move { c.self_fencing(since_renewal, policy).await })
    }

    async fn self_fencing<F: Fn() -> Option<Duration>>(self, since_renewal: F, policy: LeasePolicy) {
        let after = fence_after(policy);
        let mut paused: Vec<VmId> = Vec::new();
        let mut fenced = false;
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let age = since_renewal();
            let cut = age.is_some_and(|a| a >= after);
            if cut {
                if !fenced {
                    warn!(
                        lease_age_s = age.map_or(0, |a| a.as_secs()),
                        ttl_s = policy.ttl.as_secs(),
                        "lease not renewed in time: pausing this node's VMs until it is (self-fencing)"
                    );
                    fenced = true;
                }
                // VMs that became live since (an incoming migration) are paused too.
                paused.extend(self.pause_running(&paused).await);
            } else if fenced {
                fenced = false;
                info!(vms = paused.len(), "lease renewed again: settling the VMs self-fencing paused");
                for id in std::mem::take(&mut paused) {
                    self.settle_fenced(id).await;
                }
            }
        }
    }

    /// Pauses every VM with a live worker here that this node's copy of the
    /// records says is running, except those in `done`; returns those paused.
    async fn pause_running(&self, done: &[VmId]) -> Vec<VmId> {
        let workers: Vec<_> = self
            .live_map()
            .iter()
            .filter(|(id, _)| !done.contains(id))
            .map(|(id, l)| (*id, l.process.clone()))
            .collect();
        let mut paused = Vec::new();
        for (id, process) in workers {
            // The local copy: the pool cannot be asked, this node is cut off.
            let running = self.local_record(id).await.is_some_and(|r| r.state == VmState::Running);
            if !running {
                continue;
            }
            match process.request(|seq| ToWorker::Pause { seq }, WORKER_TIMEOUT).await {
                Ok(()) => {
                    warn!(vm = %id, "VM paused by self-fencing");
                    paused.push(id);
                }
                Err(e) => error!(vm = %id, error = %e, "cannot pause a VM for self-fencing"),
            }
        }
        paused
    }

    async fn local_record(&self, id: VmId) -> Option<VmRecord> {
        let (kv, _) = self.inner.records.meta().get(&vm_key(id), Consistency::Local).await.ok()?;
        serde_json::from_slice(&kv?.value).ok()
    }

    /// Resumes, ends or leaves one VM self-fencing paused, by its record now.
    async fn settle_fenced(&self, id: VmId) {
        let record = match self.inner.records.load(id).await {
            Ok((r, _)) => Some(r),
            Err(crate::error::ComputeError::NotFound(_)) => None,
            Err(e) => {
                // Renewals get through, so this is brief: keep it paused and
                // let the next fencing round (or an operator) decide.
                warn!(vm = %id, error = %e, "cannot read a self-fenced VM's record; it stays paused");
                return;
            }
        };
        let Some((process, stopping, _)) = self.live(id) else { return };
        match after_fence(record.as_ref(), self.node_id()) {
            AfterFence::Resume => match process.request(|seq| ToWorker::Resume { seq }, WORKER_TIMEOUT).await
            {
                Ok(()) => info!(vm = %id, "VM resumed after self-fencing"),
                Err(e) => error!(vm = %id, error = %e, "cannot resume a self-fenced VM"),
            },
            AfterFence::End => {
                warn!(
                    vm = %id,
                    now_on = %record.map_or_else(|| "nowhere (deleted)".to_owned(), |r| r.node.to_string()),
                    "a self-fenced VM runs elsewhere now: ending it here, unresumed"
                );
                stopping.store(true, Ordering::SeqCst);
                process.kill();
            }
            AfterFence::Leave => info!(vm = %id, "a self-fenced VM is no longer meant to run; left paused"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeos_types::NodeId;

    #[test]
    fn a_node_fences_a_margin_before_its_lease_runs_out() {
        let at = |ttl: u64| fence_after(LeasePolicy { ttl: Duration::from_secs(ttl) });
        assert_eq!(at(10), Duration::from_millis(7500));
        assert_eq!(at(4), Duration::from_secs(3));
        assert_eq!(at(2), Duration::from_secs(1));
        assert_eq!(at(60), Duration::from_secs(45));
    }

    #[test]
    fn a_fenced_vm_resumes_only_where_its_record_still_runs_it() {
        let me = NodeId(1);
        let mut r = crate::records::new_record(VmId(7), "v", crate::records::test_spec(), me);
        r.state = VmState::Running;
        assert_eq!(after_fence(Some(&r), me), AfterFence::Resume);
        assert_eq!(after_fence(Some(&r), NodeId(2)), AfterFence::End, "restarted elsewhere");
        assert_eq!(after_fence(None, me), AfterFence::End, "deleted");
        r.state = VmState::Paused;
        assert_eq!(after_fence(Some(&r), me), AfterFence::Leave);
        r.state = VmState::Stopped;
        assert_eq!(after_fence(Some(&r), me), AfterFence::Leave);
    }
}
