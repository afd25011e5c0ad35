//! Rolling image upgrade: every node of the pool moves to another node image,
//! one at a time, with no VM restarted.
//!
//! `nodeos pool upgrade --image DIR` checks the bundle, stores its kernel and
//! initramfs as pool images and starts the upgrade ([`Compute::start_upgrade`]
//! checks again and writes the [`UpgradeRecord`]). From then on the leader's
//! controller drives the record, so a new leader carries on where the old one
//! stopped. For each node in turn (the leader of the start last):
//!
//! 1. **Health gate**: every member is alive and no other node is in
//!    maintenance; it waits up to [`GATE_WAIT`], then fails.
//! 2. **Drain and stage** (`PeerRequest::UpgradeStage` to the node): it enters
//!    maintenance (its VMs live-migrate off, leadership moves away), fetches
//!    the two images into its data directory, checks them against the
//!    manifest's sha256s, and asks the image's PID 1 to reboot into them
//!    (`kexec`, with its own `nodeos.*` boot parameters and the new image's hash).
//! 3. **Rejoin**: the node's record reports the new image hash and its lease
//!    is alive again, within [`REBOOT_WAIT`].
//! 4. **Maintenance exit** (`PeerRequest::MaintenanceExit`), and the next node.
//!
//! The first node that fails stops the upgrade, saying why; the nodes before
//! it run the new image, the rest the old (the peer protocol takes both).

use std::time::Duration;

use nodeos_meta::command::{Compare, Op, Txn};
use nodeos_meta::{Command, Consistency, Liveness};
use nodeos_types::records::{ImageKind, UPGRADE_KEY, UpgradeNode, UpgradePhase, UpgradeRecord, UpgradeState};
use nodeos_types::{ImageId, NodeId, unix_millis};
use tracing::{debug, info, warn};

use crate::error::ComputeError;
use crate::migration::PeerRequest;
use crate::supervisor::Compute;

/// How often the leader looks at the upgrade.
const TICK: Duration = Duration::from_secs(2);
/// How long the health gate may stay closed before the upgrade fails.
const GATE_WAIT: Duration = Duration::from_secs(300);
/// How long a node may take to drain and stage the image.
const STAGE_CALL: Duration = Duration::from_secs(30 * 60);
/// How long a node may take to reboot into the new image and rejoin.
const REBOOT_WAIT: Duration = Duration::from_secs(600);
/// How long a node may take to leave maintenance.
const EXIT_CALL: Duration = Duration::from_secs(30);
/// Where a node stages the image it reboots into, under its data directory.
pub const STAGE_DIR: &str = "upgrade";
/// The staged boot: kernel, initramfs and command line for PID 1 (JSON).
pub const STAGED_FILE: &str = "next.json";

/// The request to start an upgrade.
#[derive(Debug, Clone)]
pub struct NewUpgrade {
    /// The bundle's manifest, as checked by the client.
    pub manifest: nodeos_image::hash::BundleManifest,
    pub kernel_image: String,
    pub initrd_image: String,
}

/// What a node stages for PID 1: the files and the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StagedBoot {
    pub kernel: std::path::PathBuf,
    pub initrd: std::path::PathBuf,
    pub cmdline: String,
    pub image_hash: String,
}

/// The kernel command line a node reboots into the image `image_hash` with:
/// the image's default line and hash first, then the words of the line it
/// runs with now (`current`) but for the old image's hash and `initrd=`.
pub fn next_cmdline(default: &str, image_hash: &str, current: &str) -> String {
    let defaults: Vec<&str> = default.split_whitespace().collect();
    let kept: Vec<&str> = current
        .split_whitespace()
        .filter(|w| {
            !w.starts_with("nodeos.image=") && !w.starts_with("initrd=") && !w.starts_with("BOOT_IMAGE=")
        })
        .filter(|w| !defaults.contains(w))
        .collect();
    nodeos_image::hash::kernel_args(default, image_hash, &kept.join(" "))
}

/// The next step of an upgrade, from its record and what is known of its
/// nodes (`hash_of`: the image hash a node's record reports, `alive`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do (not running).
    Idle,
    /// Every node runs the image.
    Finish,
    /// Open the gate for node `index` (pending).
    Gate(usize),
    /// (Re)ask node `index` to drain and stage (draining).
    Stage(usize),
    /// Wait for node `index` to come back (rebooting).
    AwaitRejoin(usize),
    /// Node `index` is back with the image: take it out of maintenance.
    Exit(usize),
}

pub fn next_step(r: &UpgradeRecord) -> Step {
    if r.state != UpgradeState::Running {
        return Step::Idle;
    }
    let Some((i, n)) = r.nodes.iter().enumerate().find(|(_, n)| n.phase != UpgradePhase::Done) else {
        return Step::Finish;
    };
    match n.phase {
        UpgradePhase::Pending => Step::Gate(i),
        UpgradePhase::Draining => Step::Stage(i),
        UpgradePhase::Rebooting => Step::AwaitRejoin(i),
        UpgradePhase::Rejoined => Step::Exit(i),
        UpgradePhase::Done | UpgradePhase::Failed => Step::Idle,
    }
}

impl Compute {
    async fn load_upgrade(&self) -> Result<Option<(UpgradeRecord, u64)>, ComputeError> {
        self.load_upgrade_at(Consistency::Linearizable).await
    }

    async fn load_upgrade_at(&self, c: Consistency) -> Result<Option<(UpgradeRecord, u64)>, ComputeError> {
        let (kv, _) = self.inner.records.meta().get(UPGRADE_KEY, c).await?;
        kv.map(|kv| {
            serde_json::from_slice(&kv.value)
                .map(|r| (r, kv.mod_revision))
                .map_err(|_| ComputeError::Record(UPGRADE_KEY.into()))
        })
        .transpose()
    }

    /// Writes the upgrade record if it is still at `rev` (0: absent).
    async fn save_upgrade(&self, r: &mut UpgradeRecord, rev: u64) -> Result<bool, ComputeError> {
        r.updated_at_ms = unix_millis();
        let value = serde_json::to_vec(r).map_err(|_| ComputeError::Record(UPGRADE_KEY.into()))?;
        // Revision 0: the record must be absent.
        let compare = Compare::ModRevision { key: UPGRADE_KEY.into(), equals: rev };
        let txn = Txn {
            compares: vec![compare],
            success: vec![Op::Put { key: UPGRADE_KEY.into(), value }],
            failure: vec![],
        };
        Ok(self.inner.records.meta().write(Command::Txn(txn)).await?.succeeded)
    }

    /// The upgrade under way or last run, if any.
    pub async fn upgrade_status(&self) -> Result<Option<UpgradeRecord>, ComputeError> {
        Ok(self.load_upgrade().await?.map(|(r, _)| r))
    }

    /// Starts a rolling upgrade to the image the manifest names, whose kernel
    /// and initramfs are the pool images named. Refused, nothing changed,
    /// while another runs, or when the images are not the manifest's files.
    pub async fn start_upgrade(&self, req: NewUpgrade) -> Result<UpgradeRecord, ComputeError> {
        let bad = |m: String| ComputeError::Upgrade(m);
        let images = &self.inner.images;
        let get = |name: String, kind: ImageKind| async move {
            let i = images.get(&name).await.map_err(|e| {
                bad(format!("{} image {name:?}: {}", kind.as_str(), nodeos_types::error_chain(&e)))
            })?;
            if i.kind != kind {
                return Err(bad(format!("image {name:?} is a {}, not a {}", i.kind.as_str(), kind.as_str())));
            }
            Ok(i)
        };
        let kernel = get(req.kernel_image, ImageKind::Kernel).await?;
        let initrd = get(req.initrd_image, ImageKind::Initrd).await?;
        let digest = |name: &str, i: &nodeos_types::records::ImageRecord| nodeos_image::hash::FileDigest {
            name: name.into(),
            sha256: i.sha256.clone(),
            size: i.size_bytes,
        };
        let got = nodeos_image::hash::image_hash(
            &digest(nodeos_image::hash::KERNEL_FILE, &kernel),
            &digest(nodeos_image::hash::INITRAMFS_FILE, &initrd),
            &req.manifest.cmdline,
        );
        if got != req.manifest.image_hash {
            return Err(bad(format!(
                "the manifest says image {}, but the stored kernel and initramfs make image {got}",
                req.manifest.image_hash
            )));
        }
        let previous = self.load_upgrade().await?;
        if let Some((p, _)) = &previous
            && p.state == UpgradeState::Running
        {
            return Err(bad(format!("an upgrade to image {} is under way", p.image_hash)));
        }
        let meta = self.inner.records.meta();
        let leader = meta.leader().map(|(l, _)| l);
        let records = self.inner.records.nodes().await?;
        let mut nodes: Vec<NodeId> = records.iter().map(|n| n.id).collect();
        // The leader last: it moves leadership once, not at every step.
        nodes.sort_by_key(|n| (Some(*n) == leader, *n));
        let mut r = UpgradeRecord {
            image_hash: got,
            version: req.manifest.nodeos_version,
            cmdline: req.manifest.cmdline,
            kernel_image: kernel.id,
            initrd_image: initrd.id,
            state: UpgradeState::Running,
            reason: String::new(),
            nodes: nodes
                .into_iter()
                .map(|id| UpgradeNode {
                    id,
                    phase: UpgradePhase::Pending,
                    started_at_ms: 0,
                    finished_at_ms: 0,
                })
                .collect(),
            started_at_ms: unix_millis(),
            updated_at_ms: 0,
        };
        // Nodes that run the image already have nothing to do.
        for n in &mut r.nodes {
            if records.iter().any(|rec| rec.id == n.id && rec.image_hash == r.image_hash) {
                n.phase = UpgradePhase::Done;
            }
        }
        let rev = previous.map_or(0, |(_, rev)| rev);
        if !self.save_upgrade(&mut r, rev).await? {
            return Err(bad("another upgrade was started meanwhile".into()));
        }
        warn!(image = %r.image_hash, nodes = r.nodes.len(), "rolling upgrade started");
        Ok(r)
    }

    /// Starts the upgrade controller (it acts only while this node leads).
    pub fn spawn_upgrade_controller(&self) -> tokio::task::JoinHandle<()> {
        let c = self.clone();
        tokio::spawn(async move {
            let mut gate_closed_since: Option<tokio::time::Instant> = None;
            loop {
                tokio::time::sleep(TICK).await;
                if !c.inner.records.meta().is_leader() {
                    gate_closed_since = None;
                    continue;
                }
                if let Err(e) = c.upgrade_round(&mut gate_closed_since).await {
                    debug!(error = %nodeos_types::error_chain(&e), "upgrade round skipped");
                }
            }
        })
    }

    async fn upgrade_round(&self, gate: &mut Option<tokio::time::Instant>) -> Result<(), ComputeError> {
        // Most of the time no upgrade runs: the leader's own copy says so
        // without a read round.
        let running = self.load_upgrade_at(Consistency::Local).await?;
        if running.is_none_or(|(r, _)| r.state != UpgradeState::Running) {
            return Ok(());
        }
        let Some((mut r, rev)) = self.load_upgrade().await? else { return Ok(()) };
        let meta = self.inner.records.meta();
        let nodes = self.inner.records.nodes().await?;
        let alive = |id: NodeId| meta.liveness(id).0 == Liveness::Alive;
        let runs_image = |id: NodeId| nodes.iter().any(|n| n.id == id && n.image_hash == r.image_hash);
        match next_step(&r) {
            Step::Idle => Ok(()),
            Step::Finish => {
                r.state = UpgradeState::Done;
                r.reason = String::new();
                if self.save_upgrade(&mut r, rev).await? {
                    warn!(image = %r.image_hash, "rolling upgrade done: every node runs the image");
                }
                Ok(())
            }
            Step::Gate(i) => {
                let id = r.nodes[i].id;
                let mut why = Vec::new();
                for n in &nodes {
                    if !alive(n.id) {
                        why.push(format!("node {} is {}", n.id, meta.liveness(n.id).0.as_str()));
                    }
                    if n.maintenance && n.id != id {
                        why.push(format!("node {} is in maintenance", n.id));
                    }
                }
                if !why.is_empty() {
                    let since = *gate.get_or_insert_with(tokio::time::Instant::now);
                    let reason = format!("waiting before node {id}: {}", why.join("; "));
                    if since.elapsed() > GATE_WAIT {
                        return self
                            .fail_upgrade(
                                r,
                                rev,
                                i,
                                format!("health gate closed for {} s: {reason}", GATE_WAIT.as_secs()),
                            )
                            .await;
                    }
                    if r.reason != reason {
                        r.reason = reason;
                        self.save_upgrade(&mut r, rev).await?;
                    }
                    return Ok(());
                }
                *gate = None;
                r.reason = String::new();
                r.nodes[i].phase = UpgradePhase::Draining;
                r.nodes[i].started_at_ms = unix_millis();
                if self.save_upgrade(&mut r, rev).await? {
                    info!(node = %id, image = %r.image_hash, "upgrade: draining the node");
                }
                Ok(())
            }
            Step::Stage(i) => {
                let id = r.nodes[i].id;
                if runs_image(id) && alive(id) {
                    r.nodes[i].phase = UpgradePhase::Rejoined;
                    self.save_upgrade(&mut r, rev).await?;
                    return Ok(());
                }
                if !alive(id) {
                    // Staged and gone already (a leader that drained itself
                    // went down before it could say so): wait for it.
                    r.nodes[i].phase = UpgradePhase::Rebooting;
                    self.save_upgrade(&mut r, rev).await?;
                    return Ok(());
                }
                let req = PeerRequest::UpgradeStage {
                    image_hash: r.image_hash.clone(),
                    cmdline: r.cmdline.clone(),
                    kernel_image: r.kernel_image,
                    initrd_image: r.initrd_image,
                };
                let staged = if id == self.inner.cfg.node_id {
                    self.stage_upgrade(&req).await
                } else {
                    self.call_peer_with(id, &req, STAGE_CALL).await.map(|_| ())
                };
                match staged {
                    Ok(()) => {
                        // Read again: leadership may have moved during the drain.
                        let Some((mut now, rev)) = self.load_upgrade().await? else { return Ok(()) };
                        if now.nodes.get(i).map(|n| n.phase) == Some(UpgradePhase::Draining) {
                            now.nodes[i].phase = UpgradePhase::Rebooting;
                            self.save_upgrade(&mut now, rev).await?;
                        }
                        info!(node = %id, "upgrade: the node reboots into the image");
                        Ok(())
                    }
                    Err(e) => {
                        let why = format!(
                            "node {id} did not drain and stage the image: {}",
                            nodeos_types::error_chain(&e)
                        );
                        self.fail_upgrade(r, rev, i, why).await
                    }
                }
            }
            Step::AwaitRejoin(i) => {
                let id = r.nodes[i].id;
                if runs_image(id) && alive(id) {
                    r.nodes[i].phase = UpgradePhase::Rejoined;
                    if self.save_upgrade(&mut r, rev).await? {
                        info!(node = %id, image = %r.image_hash, "upgrade: the node is back with the image");
                    }
                    return Ok(());
                }
                let waited = unix_millis().saturating_sub(r.nodes[i].started_at_ms);
                if waited > u64::try_from(REBOOT_WAIT.as_millis()).unwrap_or(u64::MAX) {
                    let now = nodes
                        .iter()
                        .find(|n| n.id == id)
                        .map_or("none", |n| n.image_hash.as_str())
                        .to_owned();
                    let why = format!(
                        "node {id} did not come back with image {} within {} s (it reports image {now:?}, lease {})",
                        r.image_hash,
                        REBOOT_WAIT.as_secs(),
                        meta.liveness(id).0.as_str()
                    );
                    return self.fail_upgrade(r, rev, i, why).await;
                }
                Ok(())
            }
            Step::Exit(i) => {
                let id = r.nodes[i].id;
                let exited = if id == self.inner.cfg.node_id {
                    self.exit_maintenance().await.map(|_| ())
                } else {
                    self.call_peer_with(id, &PeerRequest::MaintenanceExit, EXIT_CALL).await.map(|_| ())
                };
                match exited {
                    Ok(()) => {
                        r.nodes[i].phase = UpgradePhase::Done;
                        r.nodes[i].finished_at_ms = unix_millis();
                        if self.save_upgrade(&mut r, rev).await? {
                            let took = r.nodes[i].finished_at_ms.saturating_sub(r.nodes[i].started_at_ms);
                            warn!(node = %id, took_ms = took, "upgrade: node done");
                        }
                        Ok(())
                    }
                    Err(e) => {
                        debug!(node = %id, error = %nodeos_types::error_chain(&e), "upgrade: maintenance exit not answered yet");
                        Ok(())
                    }
                }
            }
        }
    }

    async fn fail_upgrade(
        &self,
        mut r: UpgradeRecord,
        rev: u64,
        i: usize,
        why: String,
    ) -> Result<(), ComputeError> {
        warn!(node = %r.nodes[i].id, reason = %why, "rolling upgrade stopped");
        r.nodes[i].phase = UpgradePhase::Failed;
        r.nodes[i].finished_at_ms = unix_millis();
        r.state = UpgradeState::Failed;
        r.reason = why;
        self.save_upgrade(&mut r, rev).await?;
        Ok(())
    }

    /// This node's part of an upgrade: into maintenance (VMs off), the image
    /// staged and checked, then the reboot into it asked of PID 1 a moment
    /// after the answer.
    pub(crate) async fn stage_upgrade(&self, req: &PeerRequest) -> Result<(), ComputeError> {
        let PeerRequest::UpgradeStage { image_hash, cmdline, kernel_image, initrd_image } = req else {
            return Err(ComputeError::Upgrade("not an upgrade request".into()));
        };
        let Some(reboot) = self.inner.cfg.image_reboot.clone() else {
            return Err(ComputeError::Upgrade(
                "this node does not run the node image as PID 1, so it cannot reboot into another image"
                    .into(),
            ));
        };
        // One staging at a time: a new leader may ask again while the old
        // one's request still runs. Staged already: nothing more to do.
        let _one = reboot.staging.lock().await;
        if reboot.staged.lock().unwrap_or_else(|p| p.into_inner()).as_deref() == Some(image_hash.as_str()) {
            return Ok(());
        }
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        if !self.in_maintenance().await? {
            self.enter_maintenance(tx).await?;
        }
        let still: Vec<String> = self.running_here().await?.into_iter().map(|v| v.name).collect();
        if !still.is_empty() {
            return Err(ComputeError::Upgrade(format!(
                "VMs still run here after the drain: {}",
                still.join(", ")
            )));
        }
        let dir = reboot.data_dir.join(STAGE_DIR);
        std::fs::create_dir_all(&dir)
            .map_err(crate::error::io(format!("cannot create {}", dir.display())))?;
        let fetch = |id: ImageId, stem: &'static str| {
            let dir = dir.clone();
            async move {
                let image = self.inner.images.get(&id.to_string()).await.map_err(|e| {
                    ComputeError::Image { what: format!("upgrade {stem}"), source: Box::new(e) }
                })?;
                self.inner
                    .images
                    .materialise(&image, &dir, stem)
                    .await
                    .map_err(|e| ComputeError::Image { what: format!("upgrade {stem}"), source: Box::new(e) })
            }
        };
        let kernel = fetch(*kernel_image, "vmlinuz").await?;
        let initrd = fetch(*initrd_image, "initramfs").await?;
        let current = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let staged = StagedBoot {
            kernel,
            initrd,
            cmdline: next_cmdline(cmdline, image_hash, current.trim()),
            image_hash: image_hash.clone(),
        };
        let path = dir.join(STAGED_FILE);
        let text = serde_json::to_vec_pretty(&staged)
            .map_err(|_| ComputeError::Record(path.display().to_string()))?;
        std::fs::write(&path, text).map_err(crate::error::io(format!("cannot write {}", path.display())))?;
        *reboot.staged.lock().unwrap_or_else(|p| p.into_inner()) = Some(image_hash.clone());
        warn!(image = %image_hash, cmdline = %staged.cmdline, "upgrade staged; rebooting into it");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            (reboot.reboot)();
        });
        Ok(())
    }
}

/// How this node reboots into a staged image (only under the image's PID 1).
#[derive(Clone)]
pub struct ImageReboot {
    /// The node's data directory (the staged files go under it).
    pub data_dir: std::path::PathBuf,
    /// Asks PID 1 to reboot into [`STAGED_FILE`].
    pub reboot: std::sync::Arc<dyn Fn() + Send + Sync>,
    /// Held while an image is staged.
    pub staging: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The image staged and handed to PID 1, if any.
    pub staged: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl ImageReboot {
    pub fn new(data_dir: std::path::PathBuf, reboot: std::sync::Arc<dyn Fn() + Send + Sync>) -> Self {
        ImageReboot { data_dir, reboot, staging: Default::default(), staged: Default::default() }
    }
}

impl std::fmt::Debug for ImageReboot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageReboot").field("data_dir", &self.data_dir).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(phases: &[UpgradePhase], state: UpgradeState) -> UpgradeRecord {
        UpgradeRecord {
            image_hash: "b".into(),
            version: "0.1.0".into(),
            cmdline: "quiet".into(),
            kernel_image: ImageId(1),
            initrd_image: ImageId(2),
            state,
            reason: String::new(),
            nodes: phases
                .iter()
                .enumerate()
                .map(|(i, p)| UpgradeNode {
                    id: NodeId(i as u64 + 1),
                    phase: *p,
                    started_at_ms: 0,
                    finished_at_ms: 0,
                })
                .collect(),
            started_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn nodes_go_one_at_a_time_in_order() {
        use UpgradePhase::*;
        let run = UpgradeState::Running;
        assert_eq!(next_step(&record(&[Pending, Pending], run)), Step::Gate(0));
        assert_eq!(next_step(&record(&[Done, Pending], run)), Step::Gate(1));
        assert_eq!(next_step(&record(&[Draining, Pending], run)), Step::Stage(0));
        assert_eq!(next_step(&record(&[Done, Rebooting], run)), Step::AwaitRejoin(1));
        assert_eq!(next_step(&record(&[Rejoined, Pending], run)), Step::Exit(0));
        assert_eq!(next_step(&record(&[Done, Done], run)), Step::Finish);
        assert_eq!(next_step(&record(&[Done, Failed], UpgradeState::Failed)), Step::Idle);
        assert_eq!(next_step(&record(&[Done, Done], UpgradeState::Done)), Step::Idle);
    }

    #[test]
    fn the_next_boot_keeps_the_nodes_parameters_under_the_new_image() {
        let now =
            "console=ttyS0,115200 panic=-1 nodeos.pool=p nodeos.key=k nodeos.image=aaa initrd=initramfs.img";
        let next = next_cmdline("console=ttyS0,115200 quiet", "bbb", now);
        assert_eq!(
            next,
            "console=ttyS0,115200 quiet nodeos.image=bbb panic=-1 nodeos.pool=p nodeos.key=k initrd=initramfs.img"
        );
    }
}
