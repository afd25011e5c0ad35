//! VMs end to end through the public gRPC API: a one-node pool in its own
//! network namespace runs the repository's test guest under KVM, with a
//! virtio-blk disk on a host file and a virtio-net NIC on a tap in that
//! namespace. Needs root and /dev/kvm; without them it prints `SKIPPED: ...`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::vm_service_client::VmServiceClient;
use nodeos_tests::cluster::Cluster;
use nodeos_tests::{NodeSpec, require, wait_until};
use tonic::Code;
use tonic::transport::Channel;

const GUEST_RUN: Duration = Duration::from_secs(180);

fn guest_elf() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build/nodeos-test-guest.elf");
    assert!(p.is_file(), "the test guest is not built ({}): run `make guest` (make test does)", p.display());
    p
}

fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    nodeos_types::testing::skip(test, "no /dev/kvm");
    false
}

fn spec(kernel: &Path, cmdline: &str, memory_mib: u64) -> pb::VmSpec {
    pb::VmSpec {
        vcpus: 1,
        memory_mib,
        kernel: kernel.display().to_string(),
        initrd: String::new(),
        cmdline: cmdline.to_owned(),
        disks: vec![],
        nics: vec![],
        cloud_init: None,
    }
}

async fn one_node_pool(test: &str) -> anyhow::Result<Option<(Cluster, VmServiceClient<Channel>)>> {
    let Some(env) = require(test)? else { return Ok(None) };
    if !kvm_or_skip(test) {
        return Ok(None);
    }
    let mut c = Cluster::new(&env, test)?;
    let spec = NodeSpec { bootstrap_expect: Some(1), beacons: false, ..c.spec() };
    let i = c.add_node(&spec)?;
    let cref = &c;
    wait_until("a one-node pool", Duration::from_secs(60), || async move {
        let s = cref.status(i).await?;
        ensure!(!s.pool_id.is_empty() && !s.leader_id.is_empty(), "not formed yet");
        Ok(())
    })
    .await?;
    let vms = VmServiceClient::new(c.channel(i).await.context("connecting to the VM API")?);
    Ok(Some((c, vms)))
}

/// Console output of a VM until `until` appears (or the stream ends).
async fn console_until(vms: &mut VmServiceClient<Channel>, vm: &str, until: &str) -> anyhow::Result<String> {
    let first = pb::ConsoleInput { vm: vm.to_owned(), from_start: true, data: vec![] };
    let mut out = vms.console(futures::stream::iter(vec![first])).await?.into_inner();
    let mut text = String::new();
    let read = async {
        while let Some(chunk) = out.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk?.data));
            if text.contains(until) {
                break;
            }
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(GUEST_RUN, read).await {
        Ok(r) => r?,
        Err(_) => bail!("no {until:?} on the console within {GUEST_RUN:?}; console so far:\n{text}"),
    }
    Ok(text)
}

async fn wait_state(vms: &mut VmServiceClient<Channel>, vm: &str, state: &str) -> anyhow::Result<pb::Vm> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = vms.get(pb::VmRef { vm: vm.to_owned() }).await?.into_inner();
        if v.state == state {
            return Ok(v);
        }
        ensure!(tokio::time::Instant::now() < deadline, "VM {vm} is {} ({}), not {state}", v.state, v.reason);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a task is a kernel worker thread of the process (PF_USER_WORKER or
/// PF_KTHREAD in the flags of /proc/PID/task/TID/stat).
fn kernel_worker(task: &Path) -> anyhow::Result<bool> {
    const PF_USER_WORKER: u64 = 0x0000_4000;
    const PF_KTHREAD: u64 = 0x0020_0000;
    let stat = std::fs::read_to_string(task.join("stat"))?;
    // Fields after the command, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let flags: u64 =
        rest.split_whitespace().nth(6).and_then(|f| f.parse().ok()).context("no flags in stat")?;
    Ok(flags & (PF_USER_WORKER | PF_KTHREAD) != 0)
}

/// Every thread of a running worker: a uid and gid other than root's, no
/// capabilities, no new privileges, seccomp filtering; the process in a mount
/// namespace of its own. Read from /proc, as any operator would.
fn check_jailed(pid: u32) -> anyhow::Result<()> {
    let own_ns = std::fs::read_link("/proc/self/ns/mnt")?;
    // The worker confines itself right after it acknowledges the start.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let tasks = loop {
        let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))?.collect::<Result<_, _>>()?;
        let mut statuses: Vec<(String, String)> = Vec::new();
        for t in &tasks {
            // Threads the kernel runs for the process (KVM's NX huge page
            // recovery worker) run no code of the worker's: skipped.
            if kernel_worker(&t.path())? {
                continue;
            }
            statuses.push((
                t.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(t.path().join("status"))?,
            ));
        }
        let confined =
            statuses.iter().all(|(_, st)| st.lines().any(|l| l.starts_with("Seccomp:") && l.ends_with('2')));
        if confined || std::time::Instant::now() > deadline {
            break statuses;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(!tasks.is_empty(), "worker {pid} has no threads");
    for (tid, st) in &tasks {
        let field = |name: &str| {
            st.lines()
                .find(|l| l.starts_with(name))
                .map(|l| l[name.len()..].trim().to_owned())
                .unwrap_or_default()
        };
        for (name, value) in [("Uid:", field("Uid:")), ("Gid:", field("Gid:"))] {
            ensure!(
                !value.split_whitespace().any(|id| id == "0"),
                "worker {pid} thread {tid} ({}): {name} {value}",
                field("Name:")
            );
        }
        ensure!(
            field("CapEff:") == "0000000000000000",
            "worker {pid} thread {tid}: CapEff {}",
            field("CapEff:")
        );
        ensure!(
            field("CapPrm:") == "0000000000000000",
            "worker {pid} thread {tid}: CapPrm {}",
            field("CapPrm:")
        );
        ensure!(
            field("NoNewPrivs:") == "1",
            "worker {pid} thread {tid}: NoNewPrivs {}",
            field("NoNewPrivs:")
        );
        ensure!(field("Seccomp:") == "2", "worker {pid} thread {tid}: Seccomp {}", field("Seccomp:"));
    }
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))?;
    ensure!(ns != own_ns, "worker {pid} shares the node's mount namespace ({ns:?})");
    let own_pid_ns = std::fs::read_link("/proc/self/ns/pid")?;
    let pid_ns = std::fs::read_link(format!("/proc/{pid}/ns/pid"))?;
    ensure!(pid_ns != own_pid_ns, "worker {pid} shares the node's PID namespace ({pid_ns:?})");
    // In its own namespace it is PID 1.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap_or_default().to_owned();
    ensure!(nspid.split_whitespace().last() == Some("1"), "worker {pid}: {nspid}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_guest_does_block_and_net_io_through_the_api() -> anyhow::Result<()> {
    let test = "test_guest_does_block_and_net_io_through_the_api";
    let Some((c, mut vms)) = one_node_pool(test).await? else { return Ok(()) };
    let ns = c.node(0)?.ns.clone();
    let scratch = tempfile::tempdir()?;
    let disk = scratch.path().join("disk.img");
    std::fs::File::create(&disk)?.set_len(8 << 20)?;
    let mut s = spec(&guest_elf(), "mode=all net_frames=2 net_expect=2 net_wait_ms=120000 blk_seed=0x77", 64);
    s.disks.push(pb::DiskSpec { path: disk.display().to_string(), read_only: false, volume: String::new() });
    s.nics.push(pb::NicSpec { mac: "52:54:00:12:34:56".into(), tap: "vmtap0".into(), ..Default::default() });
    let vm =
        vms.create(pb::CreateVmRequest { ha: None, name: "io".into(), spec: Some(s) }).await?.into_inner();
    ensure!(vm.state == "stopped", "a created VM is stopped, got {}", vm.state);

    // The tap exists once the VM starts; the peer waits for it.
    let peer = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ns, "python3"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tap_peer.py"))
        .args(["vmtap0", "--frames", "2", "--timeout", "170"])
        .output();
    let peer = tokio::spawn(peer);
    let started = vms.start(pb::VmRef { vm: "io".into() }).await?.into_inner();
    ensure!(started.state == "running" && started.worker_pid != 0, "started VM: {started:?}");
    check_jailed(started.worker_pid)?;

    let console = console_until(&mut vms, "io", "NODEOS-GUEST: done").await?;
    let peer = peer.await??;
    let peer_out = String::from_utf8_lossy(&peer.stdout).into_owned();
    ensure!(console.contains("NODEOS-GUEST: boot ok"), "no boot line:\n{console}");
    ensure!(console.contains("NODEOS-GUEST: blk ok sectors=64"), "block check failed:\n{console}");
    ensure!(console.contains("NODEOS-GUEST: net ok"), "net check failed:\n{console}\npeer: {peer_out}");
    ensure!(
        peer.status.success() && peer_out.contains("TAP-PEER: ok guest_mac=52:54:00:12:34:56"),
        "tap peer: {peer_out}"
    );

    // What the guest wrote is in the host file, block for block.
    let verify = std::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/verify_blk.py"))
        .arg(&disk)
        .args(["--sectors", "64", "--seed", "0x77"])
        .output()?;
    ensure!(verify.status.success(), "disk image check: {}", String::from_utf8_lossy(&verify.stdout));

    let v = wait_state(&mut vms, "io", "stopped").await?;
    ensure!(v.reason.contains("powered off"), "reason: {}", v.reason);
    vms.delete(pb::VmRef { vm: "io".into() }).await?;
    let gone = vms.get(pb::VmRef { vm: "io".into() }).await.expect_err("deleted");
    ensure!(gone.code() == Code::NotFound, "{gone:?}");
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_is_a_crash_and_bad_requests_change_nothing() -> anyhow::Result<()> {
    let test = "killed_worker_is_a_crash_and_bad_requests_change_nothing";
    let Some((c, mut vms)) = one_node_pool(test).await? else { return Ok(()) };
    let guest = guest_elf();

    // Bad input: clear errors, nothing recorded.
    let bad = [
        (spec(Path::new("/nonexistent/kernel"), "", 64), "kernel"),
        (pb::VmSpec { vcpus: 0, ..spec(&guest, "", 64) }, "vcpus"),
        (spec(&guest, "", 64 * 1024 * 1024), "--memory"),
        (
            spec(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml").as_path(), "", 64),
            "is not bootable: it is neither an ELF64 image nor a bzImage",
        ),
        (spec(&guest, &"x".repeat(2048), 64), "--cmdline is 2048 bytes"),
        (
            pb::VmSpec {
                cloud_init: Some(pb::CloudInit {
                    user_data: vec![b'x'; 64 * 1024 + 1],
                    ..Default::default()
                }),
                ..spec(&guest, "", 64)
            },
            "--user-data is 65537 bytes; the NoCloud limit is 65536",
        ),
        (
            pb::VmSpec {
                cloud_init: Some(pb::CloudInit {
                    ssh_authorized_keys: vec!["ssh-ed25519 AAAA\nroot".into()],
                    ..Default::default()
                }),
                ..spec(&guest, "", 64)
            },
            "--ssh-key: the 1st key",
        ),
    ];
    for (s, want) in bad {
        let e = vms
            .create(pb::CreateVmRequest { ha: None, name: "bad".into(), spec: Some(s) })
            .await
            .expect_err("refused");
        ensure!(e.code() == Code::InvalidArgument && e.message().contains(want), "{want}: {e:?}");
    }
    let e = vms.get(pb::VmRef { vm: "nosuchvm".into() }).await.expect_err("unknown");
    ensure!(e.code() == Code::NotFound, "{e:?}");
    let e = vms.start(pb::VmRef { vm: "00000000000000ab".into() }).await.expect_err("unknown id");
    ensure!(e.code() == Code::NotFound, "{e:?}");
    ensure!(
        vms.list(pb::ListVmsRequest {}).await?.into_inner().vms.is_empty(),
        "refused creates left records"
    );

    // A kernel that stops loading after the VM was created (create reads its
    // headers): the start fails with the loader's reason, and no worker is
    // left behind.
    let scratch = tempfile::tempdir()?;
    let broken = scratch.path().join("broken.elf");
    std::fs::copy(&guest, &broken)?;
    vms.create(pb::CreateVmRequest { ha: None, name: "broken".into(), spec: Some(spec(&broken, "", 32)) })
        .await?;
    std::fs::write(&broken, b"\x7fELF\x02\x01\x01 this is not a kernel")?;
    let e = vms.start(pb::VmRef { vm: "broken".into() }).await.expect_err("unloadable kernel");
    ensure!(e.code() == Code::FailedPrecondition && e.message().contains("kernel"), "{e:?}");
    let v = vms.get(pb::VmRef { vm: "broken".into() }).await?.into_inner();
    ensure!(v.state == "stopped" && v.worker_pid == 0 && v.reason.contains("start failed"), "{v:?}");
    vms.delete(pb::VmRef { vm: "broken".into() }).await?;

    // A VM that runs until stopped (two vCPUs: the second waits for a SIPI the
    // test guest never sends); double start is refused.
    let two = pb::VmSpec { vcpus: 2, ..spec(&guest, "mode=dirty dirty_mib=1", 32) };
    vms.create(pb::CreateVmRequest { ha: None, name: "spin".into(), spec: Some(two) }).await?;
    let running = vms.start(pb::VmRef { vm: "spin".into() }).await?.into_inner();
    let e = vms.start(pb::VmRef { vm: "spin".into() }).await.expect_err("double start");
    ensure!(e.code() == Code::FailedPrecondition && e.message().contains("running"), "{e:?}");
    let e = vms
        .create(pb::CreateVmRequest { ha: None, name: "spin".into(), spec: Some(spec(&guest, "", 32)) })
        .await
        .expect_err("dup");
    ensure!(e.code() == Code::AlreadyExists, "{e:?}");
    console_until(&mut vms, "spin", "NODEOS-GUEST: dirty pass=").await?;

    // Pause and resume.
    let p = vms.pause(pb::VmRef { vm: "spin".into() }).await?.into_inner();
    ensure!(p.state == "paused", "{p:?}");
    let r = vms.resume(pb::VmRef { vm: "spin".into() }).await?.into_inner();
    ensure!(r.state == "running", "{r:?}");

    // kill -9 of the worker: the VM is crashed, the node carries on.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(running.worker_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .context("killing the worker")?;
    let v = wait_state(&mut vms, "spin", "crashed").await?;
    ensure!(v.reason.contains("signal 9"), "reason: {}", v.reason);
    ensure!(v.worker_pid == 0, "{v:?}");
    let s = c.status(0).await?;
    ensure!(!s.leader_id.is_empty(), "the node lost its pool after a worker died");

    // A crashed VM starts again on request, and a forced stop stops it.
    vms.start(pb::VmRef { vm: "spin".into() }).await?;
    let st = vms
        .stop(pb::StopVmRequest { vm: "spin".into(), force: true, timeout_seconds: 0 })
        .await?
        .into_inner();
    ensure!(st.state == "stopped", "{st:?}");

    // A graceful stop types Ctrl-Alt-Del; the test guest powers off on it,
    // well before the 120 s after which the node would kill it.
    vms.start(pb::VmRef { vm: "spin".into() }).await?;
    let asked = std::time::Instant::now();
    let st = vms
        .stop(pb::StopVmRequest { vm: "spin".into(), force: false, timeout_seconds: 120 })
        .await?
        .into_inner();
    ensure!(st.state == "stopped" && st.reason.contains("powered off"), "graceful stop: {st:?}");
    ensure!(asked.elapsed() < Duration::from_secs(100), "the guest was killed, not shut down");
    let console = console_until(&mut vms, "spin", "power button: powering off").await?;
    ensure!(console.contains("NODEOS-GUEST: done"), "{console}");
    vms.delete(pb::VmRef { vm: "spin".into() }).await?;
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_files_for_vms_are_refused_unless_under_the_nodes_host_images_dir() -> anyhow::Result<()> {
    let test = "host_files_for_vms_are_refused_unless_under_the_nodes_host_images_dir";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let allowed = tempfile::tempdir()?;
    let guest = guest_elf();
    let inside = allowed.path().join("guest.elf");
    std::fs::copy(&guest, &inside)?;
    // Node 0 takes no host files; node 1 only those under `allowed`.
    let off = NodeSpec { bootstrap_expect: Some(2), host_images_dir: None, ..c.spec() };
    let under = NodeSpec { host_images_dir: Some(allowed.path().to_owned()), ..off.clone() };
    let a = c.add_node(&off)?;
    let b = c.add_node(&under)?;
    let ids = c.ids(&[a, b]).await?;
    let want = nodeos_tests::Expect { members: ids.clone(), voters: 2, healthy: ids, pool_id: None };
    c.wait_pool("pool formed", &[a, b], &want, Duration::from_secs(60)).await?;
    let refused = |via: usize, args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let c = &c;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            c.cli(via, &args).await.map(|v| v.to_string()).map_err(|e| format!("{e:#}"))
        }
    };
    let g = guest.display().to_string();
    let e = refused(a, &["vm", "create", "x", "--kernel", &g]).await.expect_err("no host files on node 0");
    ensure!(e.contains("this node takes no host files for VMs") && e.contains("--host-images-dir"), "{e}");
    let e = refused(b, &["vm", "create", "x", "--kernel", &g]).await.expect_err("outside the directory");
    ensure!(e.contains("is outside this node's host images directory"), "{e}");
    let k = inside.display().to_string();
    let escape = format!("{}/../../etc/passwd", allowed.path().display());
    let e =
        refused(b, &["vm", "create", "x", "--kernel", &k, "--disk", &escape]).await.expect_err("an escape");
    ensure!(e.contains("is outside"), "{e}");
    let e =
        refused(b, &["vm", "create", "x", "--kernel", &k, "--disk", "/dev/sda"]).await.expect_err("a device");
    ensure!(e.contains("is a device"), "{e}");
    let vms = c.cli(a, &["vm", "list"]).await?;
    ensure!(vms.as_array().is_some_and(Vec::is_empty), "a refused VM was recorded: {vms}");
    // Under the directory it is taken.
    let made = c.cli(b, &["vm", "create", "ok", "--memory", "32", "--kernel", &k]).await?;
    ensure!(made["state"] == "stopped", "{made}");
    c.finish();
    Ok(())
}
