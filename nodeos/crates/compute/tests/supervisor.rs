//! The VM supervisor against a real metadata store (`nodeos_meta::testing`),
//! a replica server on loopback for volumes and images, and a fake worker
//! that speaks the real control protocol on the real control socket: VM
//! lifecycle, refusals, crashes, images, and the records that follow them.
//! No root, no KVM.

#![allow(clippy::unwrap_used)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, recv, send};
use nodeos_block::replica::Replica;
use nodeos_block::store::mem::MemStore;
use nodeos_block::transport::TcpTransport;
use nodeos_compute::images::UploadStart;
use nodeos_compute::process::{Launched, Launcher, ProcessError};
use nodeos_compute::{Compute, ComputeConfig, ComputeError, NicNetwork};
use nodeos_meta::testing::{TestPool, node_record, test_key};
use nodeos_meta::{Command, MetaHandle};
use nodeos_network::Networks;
use nodeos_switch::switch::SwitchHandle;
use nodeos_types::records::{CloudInit, DiskSpec, ImageKind, NicSpec, NodeRecord, VmSpec, VmState, vm_key};
use nodeos_types::{NodeId, VmId};
use nodeos_vmm::boot::testdata::BzImageSpec;
use nodeos_vmm::config::{DiskConfig, WorkerConfig};
use nodeos_vmm::control::{self, FromWorker, StopReason, ToWorker, WorkerEvent};
use nodeos_volumes::Volumes;
use tempfile::TempDir;
use tokio::sync::oneshot;

/// What the fake worker does.
#[derive(Debug, Clone, Default)]
struct Script {
    /// Refuse the start with this message.
    refuse_start: Option<String>,
    /// Ignore shutdown requests (a guest that does not power off).
    deaf: bool,
}

/// Signal the fake dies of when told to (0: alive). SIGKILL from `kill`.
type Death = Arc<AtomicI32>;

#[derive(Debug, Default)]
struct FakeLauncher {
    script: Mutex<Script>,
    /// The deaths of every worker launched, in order: a test can crash one.
    deaths: Mutex<Vec<Death>>,
    /// Requests every worker received, by kind.
    seen: Arc<Mutex<Vec<String>>>,
    /// The config of every worker started, in order.
    configs: Arc<Mutex<Vec<WorkerConfig>>>,
}

impl FakeLauncher {
    fn set(&self, script: Script) {
        *self.script.lock().unwrap() = script;
    }

    /// Makes the newest worker die of `signal` without a word.
    fn crash_last(&self, signal: i32) {
        self.deaths.lock().unwrap().last().unwrap().store(signal, Ordering::SeqCst);
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn last_config(&self) -> WorkerConfig {
        self.configs.lock().unwrap().last().cloned().expect("a worker was started")
    }
}

fn say(fd: &OwnedFd, msg: &FromWorker) {
    let bytes = control::encode(msg).unwrap();
    let _ = send(fd.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL);
}

impl Launcher for FakeLauncher {
    fn launch(&self, control: OwnedFd, _log: std::fs::File) -> Result<Launched, ProcessError> {
        let script = self.script.lock().unwrap().clone();
        let death: Death = Arc::default();
        self.deaths.lock().unwrap().push(death.clone());
        let seen = self.seen.clone();
        let configs = self.configs.clone();
        let (tx, exit) = oneshot::channel();
        let dies = death.clone();
        std::thread::spawn(move || {
            let status = run_fake(&control, &script, &dies, &seen, &configs);
            drop(control);
            let _ = tx.send(Ok(status));
        });
        let kill = Box::new(move || death.store(9, Ordering::SeqCst));
        Ok(Launched { pid: 4242, kill, exit })
    }
}

/// The fake worker's life: answers requests until told to die or to stop.
fn run_fake(
    fd: &OwnedFd,
    script: &Script,
    death: &Death,
    seen: &Mutex<Vec<String>>,
    configs: &Mutex<Vec<WorkerConfig>>,
) -> ExitStatus {
    let mut buf = vec![0u8; control::MAX_MESSAGE + 1];
    loop {
        let sig = death.load(Ordering::SeqCst);
        if sig != 0 {
            return ExitStatus::from_raw(sig);
        }
        let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(fd), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(20u16)).unwrap_or(0) == 0 {
            continue;
        }
        let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) | Err(_) => return ExitStatus::from_raw(0),
            Ok(n) => n,
        };
        let msg: ToWorker = control::decode(&buf[..n]).unwrap();
        let kind = format!("{msg:?}").split([' ', '{']).next().unwrap_or("").to_owned();
        seen.lock().unwrap().push(kind);
        let seq = msg.seq();
        match msg {
            ToWorker::Start { config, .. } => {
                configs.lock().unwrap().push(*config);
                if let Some(why) = &script.refuse_start {
                    say(fd, &FromWorker::Failed { seq, error: why.clone() });
                    return ExitStatus::from_raw(1 << 8);
                }
                say(fd, &FromWorker::Ack { seq });
                say(fd, &FromWorker::Event(WorkerEvent::Running { rss_kib: 1024 }));
            }
            ToWorker::Pause { .. } => {
                say(fd, &FromWorker::Ack { seq });
                say(fd, &FromWorker::Event(WorkerEvent::Paused));
            }
            ToWorker::MigrateOut { .. }
            | ToWorker::MigrationCommitted { .. }
            | ToWorker::MigrationAbort { .. } => {
                say(fd, &FromWorker::Failed { seq, error: "this fake worker does not migrate".into() });
            }
            ToWorker::RequestShutdown { .. } => {
                say(fd, &FromWorker::Ack { seq });
                if !script.deaf {
                    say(fd, &FromWorker::Event(WorkerEvent::Stopped { reason: StopReason::GuestShutdown }));
                    return ExitStatus::from_raw(0);
                }
            }
            ToWorker::Kill { .. } => {
                say(fd, &FromWorker::Ack { seq });
                say(fd, &FromWorker::Event(WorkerEvent::Stopped { reason: StopReason::Killed }));
                return ExitStatus::from_raw(0);
            }
            ToWorker::Resume { .. } | ToWorker::ConsoleInput { .. } | ToWorker::VolumeLayout { .. } => {
                say(fd, &FromWorker::Ack { seq });
            }
        }
    }
}

struct Bed {
    pool: TestPool,
    compute: Compute,
    launcher: Arc<FakeLauncher>,
    networks: Networks,
    kernel: String,
    _dir: TempDir,
}

const ME: NodeId = NodeId(1);

async fn compute_on(meta: MetaHandle, launcher: Arc<FakeLauncher>, dir: &TempDir) -> Compute {
    let switch = SwitchHandle::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    Compute::new(
        ComputeConfig {
            node_id: ME,
            state_dir: dir.path().join("vms"),
            pool_key: test_key(),
            migration_address: std::net::Ipv4Addr::LOCALHOST.into(),
            image_reboot: None,
            worker_tls: None,
            tls: None,
            host_paths: nodeos_compute::spec::HostPaths::Under("/".into()),
        },
        meta.clone(),
        Volumes::new(meta.clone(), TcpTransport::new(test_key())),
        Networks::new(meta),
        switch,
        launcher,
    )
}

/// A replica server on loopback over an in-memory store, recorded as the
/// replica server of node `ME`: volumes and images of the test pool live there.
async fn serve_replicas(pool: &TestPool) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let replica = Arc::new(Replica::new(Arc::new(MemStore::new())));
    tokio::spawn(nodeos_block::server::serve(
        listener,
        replica,
        ME,
        test_key(),
        None,
        std::future::pending(),
    ));
    pool.put_node(&NodeRecord { block_address: address, ..node_record(ME) }).await.unwrap();
}

impl Bed {
    async fn new() -> Bed {
        let pool = TestPool::single().await.unwrap();
        serve_replicas(&pool).await;
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, BzImageSpec::default().build()).unwrap();
        let launcher = Arc::new(FakeLauncher::default());
        let compute = compute_on(pool.first(), launcher.clone(), &dir).await;
        let networks = Networks::new(pool.first());
        Bed { kernel: kernel.display().to_string(), pool, compute, launcher, networks, _dir: dir }
    }

    fn spec(&self) -> VmSpec {
        VmSpec {
            vcpus: 1,
            memory_mib: 64,
            kernel: self.kernel.clone(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            disks: vec![],
            nics: vec![],
            cloud_init: None,
        }
    }

    async fn state(&self, vm: &str) -> (VmState, String) {
        let r = self.compute.resolve(vm).await.unwrap();
        (r.state, r.reason)
    }

    /// Waits until the VM's record reaches `state`.
    async fn wait_state(&self, vm: &str, state: VmState) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, why) = self.state(vm).await;
            if s == state {
                return why;
            }
            assert!(Instant::now() < deadline, "{vm} stayed {s:?} ({why}), wanted {state:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_lives_through_start_pause_resume_stop_and_delete() {
    let bed = Bed::new().await;
    let r =
        bed.compute.create("web", bed.spec(), vec![], Default::default()).await.expect("the VM is recorded");
    assert_eq!((r.state, r.node), (VmState::Stopped, ME));
    assert_eq!(bed.compute.resolve(&r.id.to_string()).await.unwrap().name, "web");

    let r = bed.compute.start("web").await.unwrap();
    assert_eq!(r.state, VmState::Running);
    assert_eq!(bed.compute.worker_pid(r.id), Some(4242));
    assert!(matches!(bed.compute.start("web").await, Err(ComputeError::State { op: "start", .. })));
    assert!(matches!(bed.compute.resume("web").await, Err(ComputeError::State { op: "resume", .. })));
    assert!(matches!(bed.compute.delete("web").await, Err(ComputeError::State { op: "delete", .. })));

    assert_eq!(bed.compute.pause("web").await.unwrap().state, VmState::Paused);
    assert!(matches!(bed.compute.pause("web").await, Err(ComputeError::State { .. })));
    assert_eq!(bed.compute.resume("web").await.unwrap().state, VmState::Running);
    bed.compute.console_input(r.id, b"ls\n".to_vec()).await.unwrap();

    let r = bed.compute.stop("web", false, Duration::from_secs(5)).await.unwrap();
    assert_eq!((r.state, r.reason.as_str()), (VmState::Stopped, "the guest powered off"));
    assert_eq!(bed.compute.worker_pid(r.id), None);
    let seen = bed.launcher.seen();
    for kind in ["Start", "Pause", "Resume", "ConsoleInput", "RequestShutdown"] {
        assert!(seen.iter().any(|s| s == kind), "{kind} not sent: {seen:?}");
    }
    assert!(matches!(
        bed.compute.stop("web", false, Duration::from_secs(1)).await,
        Err(ComputeError::State { .. })
    ));

    bed.compute.delete("web").await.unwrap();
    assert!(matches!(bed.compute.resolve("web").await, Err(ComputeError::NotFound(_))));
    assert!(matches!(bed.compute.resolve(&r.id.to_string()).await, Err(ComputeError::NotFound(_))));
    // The name is free again.
    bed.compute.create("web", bed.spec(), vec![], Default::default()).await.expect("the VM is recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_ignores_the_shutdown_request_is_killed_after_the_timeout() {
    let bed = Bed::new().await;
    bed.launcher.set(Script { deaf: true, ..Script::default() });
    bed.compute.create("deaf", bed.spec(), vec![], Default::default()).await.expect("the VM is recorded");
    bed.compute.start("deaf").await.unwrap();
    let t0 = Instant::now();
    let r = bed.compute.stop("deaf", false, Duration::from_millis(300)).await.unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(r.state, VmState::Stopped, "asked to stop, so not a crash: {}", r.reason);
    assert!(r.reason.contains("signal 9"), "{}", r.reason);
    // Forced stops do not ask at all.
    bed.compute.start("deaf").await.unwrap();
    let r = bed.compute.stop("deaf", true, Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.state, VmState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_unasked_leaves_the_vm_crashed_with_the_reason_and_never_restarts_it() {
    let bed = Bed::new().await;
    bed.compute.create("frail", bed.spec(), vec![], Default::default()).await.expect("the VM is recorded");
    bed.compute.start("frail").await.unwrap();
    bed.launcher.crash_last(11);
    let why = bed.wait_state("frail", VmState::Crashed).await;
    assert_eq!(why, "worker killed by signal 11 (SIGSEGV)");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(bed.launcher.deaths.lock().unwrap().len(), 1, "no silent restart");
    // A crashed VM can be started again by the operator.
    assert_eq!(bed.compute.start("frail").await.unwrap().state, VmState::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_leaves_the_vm_stopped_with_the_workers_words() {
    let bed = Bed::new().await;
    bed.launcher
        .set(Script { refuse_start: Some("kernel does not load: bad magic".into()), ..Script::default() });
    bed.compute.create("bad", bed.spec(), vec![], Default::default()).await.expect("the VM is recorded");
    let e = bed.compute.start("bad").await.unwrap_err();
    assert!(matches!(e, ComputeError::Worker(ProcessError::Refused(_))), "{e:?}");
    let (state, why) = bed.state("bad").await;
    assert_eq!(state, VmState::Stopped);
    assert_eq!(why, "start failed: kernel does not load: bad magic");
    assert_eq!(bed.compute.worker_pid(bed.compute.resolve("bad").await.unwrap().id), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_and_names_are_refused_before_anything_is_recorded() {
    let bed = Bed::new().await;
    bed.compute.create("one", bed.spec(), vec![], Default::default()).await.expect("the VM is recorded");
    assert!(matches!(
        bed.compute.create("one", bed.spec(), vec![], Default::default()).await,
        Err(ComputeError::NameTaken(_))
    ));
    let mut s = bed.spec();
    s.vcpus = 0;
    assert!(matches!(
        bed.compute.create("two", s, vec![], Default::default()).await,
        Err(ComputeError::Spec(_))
    ));
    let mut s = bed.spec();
    s.kernel = "/no/such/kernel".into();
    assert!(
        bed.compute
            .create("two", s, vec![], Default::default())
            .await
            .unwrap_err()
            .to_string()
            .contains("kernel")
    );
    // A network NIC that names no NIC, or an unknown network, records nothing.
    let nic = |nic: usize, network: &str| NicNetwork {
        nic,
        network: network.into(),
        ip: None,
        security_groups: vec![],
        port_security: true,
    };
    assert!(matches!(
        bed.compute.create("two", bed.spec(), vec![nic(0, "lan")], Default::default()).await,
        Err(ComputeError::NicNetwork(0))
    ));
    let mut s = bed.spec();
    s.nics.push(NicSpec { mac: "02:00:00:00:00:01".into(), tap: String::new(), port: None });
    assert!(matches!(
        bed.compute.create("two", s, vec![nic(0, "nowhere")], Default::default()).await,
        Err(ComputeError::Network(_))
    ));
    assert!(bed.networks.list_ports().await.unwrap().is_empty(), "no port left behind");
    let names: Vec<String> = bed.compute.list().await.unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, vec!["one".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_of_other_nodes_are_theirs_to_change() {
    let bed = Bed::new().await;
    let mut r =
        bed.compute.create("far", bed.spec(), vec![], Default::default()).await.expect("the VM is recorded");
    r.node = NodeId(2);
    bed.pool.first().write(Command::put(vm_key(r.id), serde_json::to_vec(&r).unwrap())).await.unwrap();
    for e in [
        bed.compute.start("far").await.unwrap_err(),
        bed.compute.stop("far", true, Duration::from_secs(1)).await.unwrap_err(),
        bed.compute.pause("far").await.unwrap_err(),
        bed.compute.delete("far").await.unwrap_err(),
    ] {
        assert!(matches!(e, ComputeError::Elsewhere { node: NodeId(2), .. }), "{e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_that_ran_when_the_node_stopped_are_marked_crashed_on_restart() {
    let bed = Bed::new().await;
    let running = bed
        .compute
        .create("was-running", bed.spec(), vec![], Default::default())
        .await
        .expect("the VM is recorded");
    bed.compute
        .create("was-stopped", bed.spec(), vec![], Default::default())
        .await
        .expect("the VM is recorded");
    let mut elsewhere = bed
        .compute
        .create("elsewhere", bed.spec(), vec![], Default::default())
        .await
        .expect("the VM is recorded");
    // As the records were when the previous node process died.
    let meta = bed.pool.first();
    for (mut r, node) in [(running.clone(), ME), (elsewhere.clone(), NodeId(2))] {
        r.state = VmState::Running;
        r.node = node;
        meta.write(Command::put(vm_key(r.id), serde_json::to_vec(&r).unwrap())).await.unwrap();
    }
    elsewhere.node = NodeId(2);
    // A new supervisor on the same node: the node restarted.
    let dir = tempfile::tempdir().unwrap();
    let again = compute_on(meta, Arc::new(FakeLauncher::default()), &dir).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = again.resolve("was-running").await.unwrap();
        if r.state == VmState::Crashed {
            assert!(r.reason.contains("node restarted"), "{}", r.reason);
            break;
        }
        assert!(Instant::now() < deadline, "never marked crashed: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(again.resolve("was-stopped").await.unwrap().state, VmState::Stopped);
    assert_eq!(
        again.resolve("elsewhere").await.unwrap().state,
        VmState::Running,
        "another node's VM is its own"
    );
    let _: VmId = elsewhere.id;
}

/// Every file of a FAT image, by its (long) name, and the image's label.
fn fat_files(image: Vec<u8>) -> (String, Vec<(String, Vec<u8>)>) {
    use std::io::Read;
    let fs = fatfs::FileSystem::new(std::io::Cursor::new(image), fatfs::FsOptions::new()).unwrap();
    let files = fs
        .root_dir()
        .iter()
        .map(|e| {
            let e = e.unwrap();
            let mut bytes = Vec::new();
            e.to_file().read_to_end(&mut bytes).unwrap();
            (e.file_name(), bytes)
        })
        .collect();
    (fs.volume_label(), files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_cloud_init_gets_its_seed_as_the_last_read_only_disk() {
    let bed = Bed::new().await;
    let root = bed._dir.path().join("root.img");
    std::fs::write(&root, vec![0u8; 4096]).unwrap();
    let mut s = bed.spec();
    s.disks.push(DiskSpec { path: root.display().to_string(), volume: None, read_only: false });
    s.cloud_init = Some(CloudInit {
        user_data: b"#cloud-config\nruncmd: [[touch, /ok]]\n".to_vec(),
        ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 me@laptop".into()],
        hostname: "web-1".into(),
    });
    let r = bed.compute.create("cloudy", s, vec![], Default::default()).await.expect("the VM is recorded");
    bed.compute.start("cloudy").await.unwrap();

    let cfg = bed.launcher.last_config();
    assert_eq!(cfg.disks.len(), 2, "{:?}", cfg.disks);
    assert_eq!(cfg.disks[0], DiskConfig { path: root.clone(), read_only: false, volume: None });
    let seed = &cfg.disks[1];
    assert_eq!(seed, &DiskConfig { path: bed.compute.seed_path(r.id), read_only: true, volume: None });
    assert!(seed.path.starts_with(bed._dir.path().join("vms").join(r.id.to_string())), "{:?}", seed.path);
    let image = std::fs::read(&seed.path).unwrap();
    let (label, files) = fat_files(image.clone());
    assert_eq!(label, "CIDATA");
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["meta-data", "user-data"]);
    let meta = String::from_utf8(files[0].1.clone()).unwrap();
    assert!(meta.contains(&format!("instance-id: \"{}\"\n", r.id)), "{meta}");
    assert!(meta.contains("local-hostname: \"web-1\"\n"), "{meta}");
    assert!(meta.contains("public-keys:\n  - \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 me@laptop\"\n"), "{meta}");
    assert_eq!(files[1].1, b"#cloud-config\nruncmd: [[touch, /ok]]\n");

    // A restart builds the same bytes; delete takes the seed with the VM.
    bed.compute.stop("cloudy", true, Duration::from_secs(5)).await.unwrap();
    bed.compute.start("cloudy").await.unwrap();
    assert_eq!(std::fs::read(&seed.path).unwrap(), image, "the seed is the same disk at every start");
    bed.compute.stop("cloudy", true, Duration::from_secs(5)).await.unwrap();
    bed.compute.delete("cloudy").await.unwrap();
    assert!(!seed.path.exists(), "the seed outlived its VM");

    // Without cloud-init there is no seed disk.
    bed.compute.create("plain", bed.spec(), vec![], Default::default()).await.expect("the VM is recorded");
    bed.compute.start("plain").await.unwrap();
    assert!(bed.launcher.last_config().disks.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cloud_init_is_refused_naming_the_field_and_records_nothing() {
    let bed = Bed::new().await;
    let bad = [
        (CloudInit { user_data: vec![b'x'; 64 * 1024 + 1], ..CloudInit::default() }, "--user-data"),
        (CloudInit { hostname: "bad_host".into(), ..CloudInit::default() }, "--hostname"),
        (
            CloudInit { ssh_authorized_keys: vec!["ssh-ed25519 AAAA\nx".into()], ..CloudInit::default() },
            "--ssh-key: the 1st key",
        ),
    ];
    for (ci, field) in bad {
        let mut s = bed.spec();
        s.cloud_init = Some(ci);
        let e = bed.compute.create("bad", s, vec![], Default::default()).await.unwrap_err();
        assert!(matches!(e, ComputeError::Spec(_)), "{e:?}");
        assert!(e.to_string().starts_with(field), "{field}: {e}");
    }
    assert!(bed.compute.list().await.unwrap().is_empty(), "refused creates left records");
}

/// Uploads `bytes` as an image in chunks of 1 MiB.
async fn upload(bed: &Bed, name: &str, kind: ImageKind, bytes: &[u8]) -> nodeos_types::records::ImageRecord {
    let start =
        UploadStart { name: name.into(), kind, total_bytes: bytes.len() as u64, sha256: String::new() };
    let chunks: Vec<_> = bytes.chunks(1 << 20).map(|c| Ok(c.to_vec())).collect();
    bed.compute.images().upload(start, futures::stream::iter(chunks)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_booting_pool_images_gets_their_exact_bytes_in_its_directory() {
    use sha2::Digest;
    let bed = Bed::new().await;
    let mut kernel = BzImageSpec::default().build();
    kernel.extend_from_slice(&[0x5a; 1234]); // not a whole number of blocks
    let mut initrd: Vec<u8> = (0..(3 << 20) + 17).map(|i: u32| (i * 7 % 251) as u8).collect();
    initrd[(1 << 20)..(2 << 20)].fill(0); // zero blocks the upload skips
    let k = upload(&bed, "k", ImageKind::Kernel, &kernel).await;
    let i = upload(&bed, "i", ImageKind::Initrd, &initrd).await;
    assert_eq!(
        (k.size_bytes, k.sha256.clone()),
        (kernel.len() as u64, hex::encode(sha2::Sha256::digest(&kernel)))
    );
    assert_eq!(i.size_bytes, initrd.len() as u64);

    let mut s = bed.spec();
    s.kernel = "image:k".into();
    s.initrd = Some(format!("image:{}", i.id));
    let r = bed.compute.create("imaged", s, vec![], Default::default()).await.expect("the VM is recorded");
    // The record names the images by id, whatever they were asked by.
    assert_eq!(
        (r.spec.kernel.clone(), r.spec.initrd.clone()),
        (format!("image:{}", k.id), Some(format!("image:{}", i.id)))
    );
    bed.compute.start("imaged").await.unwrap();
    let cfg = bed.launcher.last_config();
    let vm_dir = bed._dir.path().join("vms").join(r.id.to_string());
    assert_eq!(cfg.kernel, vm_dir.join(format!("kernel.{}", k.sha256)));
    assert_eq!(cfg.initrd, Some(vm_dir.join(format!("initrd.{}", i.sha256))));
    assert_eq!(std::fs::read(&cfg.kernel).unwrap(), kernel, "the kernel's exact bytes");
    assert_eq!(std::fs::read(cfg.initrd.as_ref().unwrap()).unwrap(), initrd, "the initrd's exact bytes");

    // An image a VM names cannot be deleted; the VM gone, it can.
    let e = bed.compute.images().delete("k").await.unwrap_err();
    assert_eq!(e.to_string(), "image k is used by VM imaged; delete the VM first");
    bed.compute.stop("imaged", true, Duration::from_secs(5)).await.unwrap();

    // A start after the image's bytes changed under it is refused, naming the image.
    let copy = bed._dir.path().join("kernel-copy");
    std::fs::rename(&cfg.kernel, &copy).unwrap();
    let volume = nodeos_volumes::import::Import::start(
        &Volumes::new(bed.pool.first(), TcpTransport::new(test_key())),
        nodeos_volumes::import::ImportStart {
            volume: k.volume.to_string(),
            total_bytes: 4096,
            sparse: false,
            takeover: false,
        },
    )
    .await
    .unwrap();
    volume.run(futures::stream::iter(vec![Ok((0, vec![0xff; 4096]))])).await.unwrap();
    let e = bed.compute.start("imaged").await.unwrap_err();
    let why = nodeos_types::error_chain(&e);
    assert!(why.starts_with("kernel image k: the "), "{why}");
    assert!(why.contains(&format!("not to the image's {}", k.sha256)), "{why}");
    assert!(!cfg.kernel.exists(), "a corrupt copy is not kept");

    bed.compute.delete("imaged").await.unwrap();
    bed.compute.images().delete("k").await.unwrap();
    bed.compute.images().delete("i").await.unwrap();
    assert!(bed.compute.images().list().await.unwrap().is_empty());
    let e = bed
        .compute
        .create("gone", VmSpec { kernel: "image:k".into(), ..bed.spec() }, vec![], Default::default())
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "--kernel image \"k\": no such image in this pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_gets_the_pools_cpu_baseline_the_intersection_of_every_nodes_cpu() {
    use nodeos_types::cpu::{CpuModel, FEATURE_WORDS};
    let bed = Bed::new().await;
    bed.compute.create("plain", bed.spec(), vec![], Default::default()).await.expect("the VM is recorded");
    bed.compute.start("plain").await.unwrap();
    assert_eq!(bed.launcher.last_config().cpu_baseline, None, "no node recorded its CPU");

    let cpu = |bits: u32| CpuModel {
        vendor: "AuthenticAMD".into(),
        brand: "test".into(),
        features: FEATURE_WORDS.iter().map(|w| (*w, bits)).collect(),
    };
    let key = nodeos_types::records::node_key(ME);
    let (kv, _) = bed.pool.first().get(&key, nodeos_meta::Consistency::Linearizable).await.unwrap();
    let mut me: NodeRecord = serde_json::from_slice(&kv.expect("my record").value).unwrap();
    me.cpu = Some(cpu(0b1110));
    bed.pool.put_node(&me).await.unwrap();
    // Another node with fewer features; a node without KVM does not narrow the baseline.
    bed.pool.put_node(&NodeRecord { cpu: Some(cpu(0b0111)), ..node_record(NodeId(ME.0 + 1)) }).await.unwrap();
    bed.pool.put_node(&node_record(NodeId(ME.0 + 2))).await.unwrap();
    bed.compute.create("narrowed", bed.spec(), vec![], Default::default()).await.expect("the VM is recorded");
    bed.compute.start("narrowed").await.unwrap();
    let base = bed.launcher.last_config().cpu_baseline.expect("a baseline");
    assert!(FEATURE_WORDS.iter().all(|w| base.word(*w) == 0b0110), "{base:?}");
}
