//! VM records in the pool's metadata, and the sans-IO verdicts the
//! supervisor applies to them.
//!
//! A VM's record (`vms/<id>`) and its name index (`vms-by-name/<name>`) are
//! created together by a transaction that fails if the name is taken; the
//! record is then changed only by the node that owns the VM, under that VM's
//! lock, so puts need no compare-and-swap.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nodeos_meta::command::{Compare, Op, Txn};
use nodeos_meta::{Command, Consistency, MetaHandle};
use nodeos_types::records::{NODES_PREFIX, NodeRecord, VMS_PREFIX, VmRecord, VmState, vm_key, vm_name_key};
use nodeos_types::{NodeId, VmId, unix_millis};
use nodeos_vmm::control::StopReason;

use crate::error::ComputeError;

/// The pool's VM records, seen from one node.
#[derive(Debug, Clone)]
pub struct VmRecords {
    meta: MetaHandle,
}

impl VmRecords {
    pub fn new(meta: MetaHandle) -> Self {
        VmRecords { meta }
    }

    pub fn meta(&self) -> &MetaHandle {
        &self.meta
    }

    /// Every VM of the pool (linearizable).
    pub async fn list(&self) -> Result<Vec<VmRecord>, ComputeError> {
        self.list_at(Consistency::Linearizable).await
    }

    /// Every VM of the pool, read with consistency `c` (`Local`: this node's copy).
    pub async fn list_at(&self, c: Consistency) -> Result<Vec<VmRecord>, ComputeError> {
        let (kvs, _) = self.meta.range(VMS_PREFIX, 0, c).await?;
        kvs.into_iter()
            .map(|kv| serde_json::from_slice(&kv.value).map_err(|_| ComputeError::Record(kv.key)))
            .collect()
    }

    /// Every node of the pool (linearizable).
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, ComputeError> {
        let (kvs, _) = self.meta.range(NODES_PREFIX, 0, Consistency::Linearizable).await?;
        kvs.into_iter()
            .map(|kv| {
                serde_json::from_slice::<NodeRecord>(&kv.value).map_err(|_| ComputeError::Record(kv.key))
            })
            .collect()
    }

    /// The pool's CPU baseline: the intersection of what KVM offers on every
    /// node that recorded its CPU (linearizable); `None` when none did.
    pub async fn cpu_baseline(&self) -> Result<Option<nodeos_types::cpu::CpuModel>, ComputeError> {
        let (kvs, _) = self.meta.range(NODES_PREFIX, 0, Consistency::Linearizable).await?;
        let nodes = kvs
            .into_iter()
            .map(|kv| {
                serde_json::from_slice::<NodeRecord>(&kv.value).map_err(|_| ComputeError::Record(kv.key))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(nodeos_types::cpu::baseline(nodes.iter().filter_map(|n| n.cpu.as_ref())))
    }

    /// A VM by id or name (linearizable). A name may look like an id, so an
    /// id that names no VM is tried as a name too.
    pub async fn resolve(&self, vm: &str) -> Result<VmRecord, ComputeError> {
        if let Ok(id) = vm.parse::<VmId>()
            && let Some(r) = self.by_id(id).await?
        {
            return Ok(r);
        }
        let (kv, _) = self.meta.get(&vm_name_key(vm), Consistency::Linearizable).await?;
        let kv = kv.ok_or_else(|| ComputeError::NotFound(vm.to_owned()))?;
        let id: VmId = std::str::from_utf8(&kv.value)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ComputeError::Record(kv.key.clone()))?;
        self.by_id(id).await?.ok_or_else(|| ComputeError::NotFound(vm.to_owned()))
    }

    /// A VM's record and its revision, for a compare-and-swap (linearizable).
    pub async fn load(&self, id: VmId) -> Result<(VmRecord, u64), ComputeError> {
        let (kv, _) = self.meta.get(&vm_key(id), Consistency::Linearizable).await?;
        let kv = kv.ok_or_else(|| ComputeError::NotFound(id.to_string()))?;
        let r = serde_json::from_slice(&kv.value).map_err(|_| ComputeError::Record(kv.key.clone()))?;
        Ok((r, kv.mod_revision))
    }

    /// Writes `r` and `extra` only if the record is still at revision `rev`:
    /// the one compare-and-swap that hands a VM over in a live migration.
    /// `Ok(false)`: the record changed meanwhile; nothing was written.
    pub async fn swap(&self, r: &mut VmRecord, rev: u64, extra: Vec<Op>) -> Result<bool, ComputeError> {
        r.updated_at_ms = unix_millis();
        let v = serde_json::to_vec(r).map_err(|_| ComputeError::Record(r.id.to_string()))?;
        let mut success = vec![Op::Put { key: vm_key(r.id), value: v }];
        success.extend(extra);
        let txn = Txn {
            compares: vec![Compare::ModRevision { key: vm_key(r.id), equals: rev }],
            success,
            failure: vec![],
        };
        Ok(self.meta.write(Command::Txn(txn)).await?.succeeded)
    }

    async fn by_id(&self, id: VmId) -> Result<Option<VmRecord>, ComputeError> {
        let (kv, _) = self.meta.get(&vm_key(id), Consistency::Linearizable).await?;
        kv.map(|kv| serde_json::from_slice(&kv.value).map_err(|_| ComputeError::Record(kv.key))).transpose()
    }

    /// Writes the record, stamped with the time.
    pub async fn save(&self, r: &mut VmRecord) -> Result<(), ComputeError> {
        r.updated_at_ms = unix_millis();
        let v = serde_json::to_vec(r).map_err(|_| ComputeError::Record(r.id.to_string()))?;
        self.meta.write(Command::put(vm_key(r.id), v)).await?;
        Ok(())
    }

    /// Writes a new record and its name, failing if the name is taken.
    pub async fn insert(&self, r: &VmRecord) -> Result<(), ComputeError> {
        let v = serde_json::to_vec(r).map_err(|_| ComputeError::Record(r.id.to_string()))?;
        let txn = Txn {
            compares: vec![Compare::ModRevision { key: vm_name_key(&r.name), equals: 0 }],
            success: vec![
                Op::Put { key: vm_name_key(&r.name), value: r.id.to_string().into_bytes() },
                Op::Put { key: vm_key(r.id), value: v },
            ],
            failure: vec![],
        };
        if !self.meta.write(Command::Txn(txn)).await?.succeeded {
            return Err(ComputeError::NameTaken(r.name.clone()));
        }
        Ok(())
    }

    /// Removes the record and its name.
    pub async fn remove(&self, r: &VmRecord) -> Result<(), ComputeError> {
        let txn = Txn {
            compares: vec![],
            success: vec![Op::Delete { key: vm_key(r.id) }, Op::Delete { key: vm_name_key(&r.name) }],
            failure: vec![],
        };
        self.meta.write(Command::Txn(txn)).await?;
        Ok(())
    }
}

/// Whether a VM of node `me` whose worker is not live here lost it with the
/// node process (the record still says it runs): it must be marked crashed.
pub fn lost_with_node(r: &VmRecord, me: NodeId, live: bool) -> bool {
    r.node == me
        && !live
        && matches!(r.state, VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping)
}

/// How a worker's end is recorded: the last stop reason it reported, its exit
/// status, and whether the node asked it to stop.
pub fn verdict(
    reason: Option<StopReason>,
    status: &std::io::Result<ExitStatus>,
    asked: bool,
) -> (VmState, String) {
    let clean = status.as_ref().is_ok_and(|s| s.success());
    match reason {
        Some(StopReason::GuestShutdown) if clean => (VmState::Stopped, "the guest powered off".to_owned()),
        Some(StopReason::GuestReset) if clean => (VmState::Stopped, "the guest reset itself".to_owned()),
        Some(StopReason::Killed) if clean => (VmState::Stopped, "stopped".to_owned()),
        Some(StopReason::Migrated) if clean => (VmState::Stopped, "moved to another node".to_owned()),
        Some(StopReason::GuestCrash) => {
            (VmState::Crashed, format!("guest crashed; {}", describe_exit(status)))
        }
        _ if asked => (VmState::Stopped, format!("stopped ({})", describe_exit(status))),
        _ => (VmState::Crashed, describe_exit(status)),
    }
}

/// The panic a worker logged last (its `vm-worker panicked` line), if it panicked.
pub fn worker_panic(log: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().take(20).find(|l| l.starts_with(nodeos_vmm::worker::PANIC_MARK))?;
    Some(line.chars().take(500).collect())
}

/// An exit status as an operator reads it.
pub fn describe_exit(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            // A worker's panic ends it with 134 (it may be PID 1 of its own
            // namespace, where raising SIGABRT at itself does nothing).
            (Some(134), _) => "worker aborted (SIGABRT, exit code 134)".into(),
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

/// A minimal spec for unit tests: 1 vCPU, 64 MiB, kernel `/k`, no devices.
#[cfg(test)]
pub(crate) fn test_spec() -> nodeos_types::records::VmSpec {
    nodeos_types::records::VmSpec {
        vcpus: 1,
        memory_mib: 64,
        kernel: "/k".into(),
        initrd: None,
        cmdline: String::new(),
        disks: vec![],
        nics: vec![],
        cloud_init: None,
    }
}

/// A fresh record of a stopped VM on `node`.
pub fn new_record(id: VmId, name: &str, spec: nodeos_types::records::VmSpec, node: NodeId) -> VmRecord {
    let now = unix_millis();
    VmRecord {
        id,
        name: name.to_owned(),
        spec,
        node,
        state: VmState::Stopped,
        reason: "created".into(),
        created_at_ms: now,
        updated_at_ms: now,
        migration: None,
        ha: nodeos_types::records::VmHa::default(),
        ha_restarts: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> std::io::Result<ExitStatus> {
        Ok(ExitStatus::from_raw(code << 8))
    }

    fn signalled(sig: i32) -> std::io::Result<ExitStatus> {
        Ok(ExitStatus::from_raw(sig))
    }

    #[test]
    fn a_clean_exit_after_a_reason_is_a_stop_with_that_reason() {
        assert_eq!(
            verdict(Some(StopReason::GuestShutdown), &exited(0), false),
            (VmState::Stopped, "the guest powered off".into())
        );
        assert_eq!(verdict(Some(StopReason::GuestReset), &exited(0), false).1, "the guest reset itself");
        assert_eq!(verdict(Some(StopReason::Killed), &exited(0), true), (VmState::Stopped, "stopped".into()));
    }

    #[test]
    fn an_unasked_death_is_a_crash_and_says_how() {
        assert_eq!(
            verdict(None, &signalled(9), false),
            (VmState::Crashed, "worker killed by signal 9 (SIGKILL)".into())
        );
        assert_eq!(verdict(None, &exited(3), false), (VmState::Crashed, "worker exited with code 3".into()));
        // A reason with an unclean exit does not hide the crash.
        assert_eq!(verdict(Some(StopReason::GuestShutdown), &exited(1), false).0, VmState::Crashed);
        let (state, why) = verdict(Some(StopReason::GuestCrash), &exited(0), false);
        assert_eq!(state, VmState::Crashed);
        assert!(why.starts_with("guest crashed"), "{why}");
        assert!(verdict(None, &Err(std::io::Error::other("gone")), false).1.contains("unknown"));
    }

    #[test]
    fn a_kill_the_node_asked_for_is_a_stop() {
        assert_eq!(
            verdict(None, &signalled(9), true),
            (VmState::Stopped, "stopped (worker killed by signal 9 (SIGKILL))".into())
        );
    }

    #[test]
    fn a_workers_panic_is_found_in_its_log() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let log = dir.path().join("worker.log");
        assert_eq!(worker_panic(&log), None, "no log");
        std::fs::write(&log, "INFO building VM\nINFO VM running\n").expect("the log written");
        assert_eq!(worker_panic(&log), None);
        let line = format!("{} in thread control at src/worker.rs:1: boom", nodeos_vmm::worker::PANIC_MARK);
        std::fs::write(&log, format!("INFO building VM\n{line}\n")).expect("the log written");
        assert_eq!(worker_panic(&log), Some(line));
    }

    #[test]
    fn only_running_vms_of_this_node_without_a_worker_are_lost() {
        let me = NodeId(1);
        let mut r = new_record(VmId(7), "a", test_spec(), me);
        for (state, lost) in [
            (VmState::Stopped, false),
            (VmState::Crashed, false),
            (VmState::Starting, true),
            (VmState::Running, true),
            (VmState::Paused, true),
            (VmState::Stopping, true),
        ] {
            r.state = state;
            assert_eq!(lost_with_node(&r, me, false), lost, "{state:?}");
            assert!(!lost_with_node(&r, me, true), "a live worker is not lost");
            assert!(!lost_with_node(&r, NodeId(2), false), "another node's VM");
        }
    }
}
