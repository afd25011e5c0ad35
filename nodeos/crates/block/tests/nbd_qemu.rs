//! Interop of the NBD export with real clients: qemu-io, qemu-img (qemu's
//! NBD client) and fio's `nbd` engine (libnbd), each against an in-memory
//! device served over loopback TCP.
//!
//! A test whose tool is not installed prints `SKIPPED: <test>: <tool> not
//! installed` straight to stderr (past the test harness's capture) and
//! returns.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, ensure};
use nodeos_block::device::{BlockDevice, DeviceError, check_range};
use nodeos_block::nbd::{ExportError, ExportInfo, ExportResolver, serve};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::oneshot;

const MIB: usize = 1 << 20;

/// An export's bytes, shared by every connection that opens it.
type Disk = Arc<Mutex<Vec<u8>>>;

#[derive(Debug)]
struct MemDevice {
    disk: Disk,
    read_only: bool,
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.disk.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        check_range(offset, len.into(), self.size(), self.block_size())?;
        Ok(self.disk.lock().unwrap()[offset as usize..][..len as usize].to_vec())
    }
    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), DeviceError> {
        check_range(offset, data.len() as u64, self.size(), self.block_size())?;
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.disk.lock().unwrap()[offset as usize..][..data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.write_zeroes(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(offset, len, self.size(), self.block_size())?;
        self.disk.lock().unwrap()[offset as usize..][..len as usize].fill(0);
        Ok(())
    }
}

#[derive(Debug, Default)]
struct MemResolver {
    exports: HashMap<String, (Disk, bool)>,
}

impl MemResolver {
    fn with(mut self, name: &str, size: usize, read_only: bool) -> Self {
        self.exports.insert(name.into(), (Arc::new(Mutex::new(vec![0; size])), read_only));
        self
    }
}

impl ExportResolver for MemResolver {
    type Device = MemDevice;
    async fn list(&self) -> Vec<String> {
        self.exports.keys().cloned().collect()
    }
    async fn describe(&self, name: &str) -> Result<ExportInfo, ExportError> {
        Ok(ExportInfo::of(&self.open(name).await?))
    }
    async fn open(&self, name: &str) -> Result<MemDevice, ExportError> {
        let (disk, read_only) = self
            .exports
            .get(name)
            .ok_or_else(|| ExportError::Unknown(format!("no volume named {name:?}")))?;
        Ok(MemDevice { disk: disk.clone(), read_only: *read_only })
    }
}

struct Server {
    addr: SocketAddr,
    resolver: Arc<MemResolver>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(resolver: MemResolver) -> Self {
        let resolver = Arc::new(resolver);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, resolver.clone(), async {
            let _ = stopped.await;
        }));
        Self { addr, resolver, stop, task }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    fn bytes(&self, export: &str, offset: usize, len: usize) -> Vec<u8> {
        self.resolver.exports[export].0.lock().unwrap()[offset..offset + len].to_vec()
    }

    async fn shutdown(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// True if `tool` runs; otherwise says loudly that `test` is skipped.
fn have(tool: &str, test: &str) -> bool {
    let found = std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        nodeos_types::testing::skip(test, &format!("{tool} not installed"));
    }
    found
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn run(program: &str, args: &[&str]) -> anyhow::Result<Run> {
    let out =
        Command::new(program).args(args).output().await.with_context(|| format!("spawning {program}"))?;
    let run = Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    println!("$ {program} {}\n{}{}", args.join(" "), run.stdout, run.stderr);
    Ok(run)
}

/// Runs a command that must succeed and print nothing that looks like a
/// failure (qemu-io reports a failed pattern check on stdout).
async fn run_ok(program: &str, args: &[&str]) -> anyhow::Result<Run> {
    let r = run(program, args).await?;
    ensure!(r.ok, "{program} failed:\n{}{}", r.stdout, r.stderr);
    for bad in ["Pattern verification failed", "failed", "error", "Error"] {
        ensure!(!r.stdout.contains(bad) && !r.stderr.contains(bad), "{program} reported {bad:?}");
    }
    Ok(r)
}

fn qemu_io_args<'a>(uri: &'a str, commands: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["-f", "raw", uri];
    for c in commands {
        args.extend(["-c", c]);
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_reads_and_writes() -> anyhow::Result<()> {
    if !have("qemu-io", "qemu_io_reads_and_writes") {
        return Ok(());
    }
    let server = Server::start(MemResolver::default().with("vol", 64 * MIB, false)).await;
    let uri = server.uri("vol");
    run_ok(
        "qemu-io",
        &qemu_io_args(
            &uri,
            &[
                "write -P 0xab 0 64k",
                "read -P 0xab 0 64k",
                // Smaller than the advertised minimum block: qemu must do
                // read-modify-write in 4 KiB units.
                "write -P 0x11 66048 512",
                "read -P 0x11 66048 512",
                "read -P 0 65536 512",
                "read -P 0 66560 3584",
                "write -z 128k 64k",
                "read -P 0 128k 64k",
                "write -P 0x22 192k 64k",
                "discard 192k 64k",
                "write -f -P 0x33 256k 4k",
                "aio_write -P 0xcd 1M 128k",
                "aio_write -P 0xce 2M 128k",
                "aio_write -P 0xcf 3M 1M",
                "aio_flush",
                "read -P 0xcd 1M 128k",
                "read -P 0xce 2M 128k",
                "read -P 0xcf 3M 1M",
                "flush",
            ],
        ),
    )
    .await?;
    assert_eq!(server.bytes("vol", 0, 65536), vec![0xab; 65536]);
    assert_eq!(server.bytes("vol", 65536, 512), vec![0; 512]);
    assert_eq!(server.bytes("vol", 66048, 512), vec![0x11; 512]);
    assert_eq!(server.bytes("vol", 256 << 10, 4096), vec![0x33; 4096]);
    assert_eq!(server.bytes("vol", 3 * MIB, MIB), vec![0xcf; MIB]);
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_convert_and_compare() -> anyhow::Result<()> {
    if !have("qemu-img", "qemu_img_info_convert_and_compare")
        || !have("qemu-io", "qemu_img_info_convert_and_compare")
    {
        return Ok(());
    }
    let server = Server::start(MemResolver::default().with("conv", 64 * MIB, false)).await;
    let uri = server.uri("conv");
    let info = run_ok("qemu-img", &["info", "--output=json", &uri]).await?;
    ensure!(info.stdout.contains("\"virtual-size\": 67108864"), "size not reported: {}", info.stdout);

    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src.qcow2");
    let src = src.to_str().context("temp path is UTF-8")?;
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", src, "48M"]).await?;
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            src,
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0xa5 5M 3M",
            "-c",
            "write -P 0x3c 40000k 4k",
            "-c",
            "write -P 0x01 47M 1M",
        ],
    )
    .await?;
    // Junk where the source has a hole, so convert must really zero it.
    run_ok("qemu-io", &qemu_io_args(&uri, &["write -P 0xee 2M 1M"])).await?;
    run_ok("qemu-img", &["convert", "-n", "-f", "qcow2", "-O", "raw", src, &uri]).await?;
    run_ok("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", src, &uri]).await?;
    assert_eq!(server.bytes("conv", 2 * MIB, MIB), vec![0; MIB]);
    assert_eq!(server.bytes("conv", 5 * MIB, 3 * MIB), vec![0xa5; 3 * MIB]);

    // And a deliberate difference is noticed.
    run_ok("qemu-io", &qemu_io_args(&uri, &["write -P 0x77 10M 4k"])).await?;
    let differs = run("qemu-img", &["compare", "-q", "-f", "qcow2", "-F", "raw", src, &uri]).await?;
    ensure!(!differs.ok, "compare missed a difference");
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_bench_pipelines_writes() -> anyhow::Result<()> {
    if !have("qemu-img", "qemu_img_bench_pipelines_writes")
        || !have("qemu-io", "qemu_img_bench_pipelines_writes")
    {
        return Ok(());
    }
    let server = Server::start(MemResolver::default().with("bench", 64 * MIB, false)).await;
    let uri = server.uri("bench");
    run_ok(
        "qemu-img",
        &[
            "bench",
            "-f",
            "raw",
            "-w",
            "-d",
            "32",
            "-c",
            "4096",
            "-s",
            "4096",
            "--pattern=92",
            "--flush-interval=256",
            &uri,
        ],
    )
    .await?;
    run_ok("qemu-io", &qemu_io_args(&uri, &["read -P 92 0 16M", "read -P 0 16M 48M"])).await?;
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_sees_errors_and_read_only_exports() -> anyhow::Result<()> {
    if !have("qemu-io", "qemu_sees_errors_and_read_only_exports") {
        return Ok(());
    }
    let server = Server::start(MemResolver::default().with("ro", 16 * MIB, true)).await;
    server.resolver.exports["ro"].0.lock().unwrap()[..4096].fill(0x42);

    let missing = run("qemu-io", &qemu_io_args(&server.uri("missing"), &["read 0 4k"])).await?;
    ensure!(!missing.ok, "opening a missing export succeeded");
    ensure!(missing.stderr.contains("no volume named"), "server message not shown: {}", missing.stderr);

    let mut args = vec!["-r"];
    let uri = server.uri("ro");
    args.extend(qemu_io_args(&uri, &["read -P 0x42 0 4k", "read -P 0 4k 4k"]));
    run_ok("qemu-io", &args).await?;

    let write = run("qemu-io", &qemu_io_args(&uri, &["write 0 4k"])).await?;
    ensure!(!write.ok, "qemu opened a read-only export for writing");
    assert_eq!(server.bytes("ro", 0, 4096), vec![0x42; 4096]);
    server.shutdown().await;
    Ok(())
}

/// Runs fio against `uri`; fails unless every job reports no error. With
/// `verified`, also requires that every byte written was read back (fio's
/// verify pass), so the check cannot pass vacuously.
async fn fio(uri: &str, name: &str, verified: bool, extra: &[&str]) -> anyhow::Result<()> {
    let uri_arg = format!("--uri={uri}");
    let mut args =
        vec!["--name", name, "--ioengine=nbd", uri_arg.as_str(), "--iodepth=32", "--output-format=json"];
    args.extend(extra);
    // fio writes verify-state files into its working directory: keep them out of the tree.
    let scratch = tempfile::tempdir().context("fio scratch dir")?;
    let out =
        Command::new("fio").args(&args).current_dir(scratch.path()).output().await.context("spawning fio")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "fio {name} failed:\n{stdout}{stderr}");
    let json = stdout.find('{').map(|at| &stdout[at..]).context("fio printed no JSON")?;
    let report: serde_json::Value = serde_json::from_str(json).context("parsing fio's JSON")?;
    let jobs = report["jobs"].as_array().context("fio JSON has no jobs")?;
    ensure!(!jobs.is_empty(), "fio ran no jobs");
    for job in jobs {
        let (read, written) = (job["read"]["io_bytes"].as_u64(), job["write"]["io_bytes"].as_u64());
        println!(
            "fio {name}: error {} read {read:?} B ({} IOPS) written {written:?} B ({} IOPS)",
            job["error"], job["read"]["iops"], job["write"]["iops"]
        );
        ensure!(job["error"] == 0, "fio {name} reported error {}", job["error"]);
        ensure!(written.unwrap_or(0) > 0, "fio {name} wrote nothing");
        if verified {
            ensure!(read == written, "fio {name} verified {read:?} of {written:?} bytes");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_nbd_engine_verifies_at_queue_depth_32() -> anyhow::Result<()> {
    if !have("fio", "fio_nbd_engine_verifies_at_queue_depth_32") {
        return Ok(());
    }
    let server = Server::start(MemResolver::default().with("fio", 64 * MIB, false)).await;
    let uri = server.uri("fio");
    fio(
        &uri,
        "randwrite-verify",
        true,
        &["--rw=randwrite", "--bs=4k", "--size=16m", "--verify=crc32c", "--verify_fatal=1"],
    )
    .await?;
    fio(
        &uri,
        "mixed-sizes-verify",
        true,
        &[
            "--rw=randwrite",
            "--bsrange=4k-1m",
            "--size=32m",
            "--offset=32m",
            "--verify=md5",
            "--verify_fatal=1",
        ],
    )
    .await?;
    // Two jobs: two connections to the same export at once.
    fio(
        &uri,
        "randrw",
        false,
        &[
            "--rw=randrw",
            "--bs=16k",
            "--size=32m",
            "--numjobs=2",
            "--offset_increment=32m",
            "--time_based",
            "--runtime=2",
        ],
    )
    .await?;
    server.shutdown().await;
    Ok(())
}
