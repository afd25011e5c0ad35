//! The peers: `qemu-nbd` serving a local raw file (the fio side), and
//! loopback TCP throughput (the re-replication side) measured by `iperf3`
//! or, without it, by a tokio sender and receiver in this process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::wait_exit;
use crate::proc::{ChildGuard, LOOPBACK, free_ports, wait_tcp};

/// `qemu-nbd` exporting one raw file; killed on drop.
#[derive(Debug)]
pub struct QemuNbd {
    _child: ChildGuard,
    pub addr: String,
    /// The full command line, for the report.
    pub command: String,
}

impl QemuNbd {
    /// Serves `file` as export `name` on a free loopback port with qemu-nbd's
    /// default cache mode (writeback), many clients one after another.
    pub async fn start(bin: &Path, file: &Path, name: &str, log: &Path) -> anyhow::Result<Self> {
        let port = free_ports(1)?[0];
        let args: Vec<String> = vec![
            "-f".into(),
            "raw".into(),
            "-x".into(),
            name.into(),
            "-b".into(),
            LOOPBACK.to_string(),
            "-p".into(),
            port.to_string(),
            "--persistent".into(),
            file.display().to_string(),
        ];
        let command = format!("{} {}", bin.display(), args.join(" "));
        let mut cmd = Command::new(bin);
        cmd.args(&args);
        let mut child = ChildGuard::spawn("qemu-nbd", cmd, log)?;
        let addr = format!("{LOOPBACK}:{port}");
        if let Err(e) = wait_tcp(&addr, Duration::from_secs(10)).await {
            child.check_running()?;
            return Err(e);
        }
        Ok(QemuNbd { _child: child, addr, command })
    }
}

/// Creates a raw image of `bytes` with qemu-img (sparse, like a fresh volume).
pub fn make_raw_image(qemu_img: &Path, path: &Path, bytes: u64) -> anyhow::Result<()> {
    let out = Command::new(qemu_img)
        .args(["create", "-q", "-f", "raw"])
        .arg(path)
        .arg(bytes.to_string())
        .output()
        .context("running qemu-img create")?;
    if !out.status.success() {
        bail!("qemu-img create failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The first line a program prints for `arg` (its version).
pub fn version_of(bin: &Path, arg: &str) -> String {
    match Command::new(bin).arg(arg).output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_owned()
        }
        Err(e) => format!("version unknown: {e}"),
    }
}

/// One loopback TCP transfer.
#[derive(Debug, Clone)]
pub struct TcpRun {
    /// How it was measured.
    pub how: String,
    pub bytes: u64,
    pub secs: f64,
}

impl TcpRun {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / 1048576.0 / self.secs
    }
}

/// One stream through 127.0.0.1 for `secs` with `iperf3` (1 MiB writes),
/// received bytes over the receiver's time.
pub async fn iperf3(bin: &Path, secs: u64, dir: &Path) -> anyhow::Result<TcpRun> {
    let port = free_ports(1)?[0].to_string();
    let mut server = Command::new(bin);
    // --forceflush: the banner waited for below reaches the log file at once.
    server.args(["-s", "--forceflush", "-B", &LOOPBACK.to_string(), "-p", &port]);
    let slog = dir.join("iperf3-server.log");
    let mut server = ChildGuard::spawn("iperf3 -s", server, &slog)?;
    // A bare connect would count as a (failed) test on the server; wait for its banner instead.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&slog).is_ok_and(|s| s.contains("Server listening")) {
        server.check_running()?;
        if Instant::now() >= deadline {
            bail!("iperf3 -s did not start listening; log:\n{}", server.log_tail(10));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let args = ["-c", &LOOPBACK.to_string(), "-p", &port, "-t", &secs.to_string(), "-l", "1M", "-J"]
        .map(String::from);
    let how = format!("{} {}", bin.display(), args.join(" "));
    let mut client = Command::new(bin);
    client.args(&args);
    let clog = dir.join("iperf3-client.json");
    let mut client = ChildGuard::spawn("iperf3 -c", client, &clog)?;
    let st = wait_exit(&mut client, Duration::from_secs(secs + 30)).await?;
    let text = std::fs::read_to_string(&clog).with_context(|| format!("reading {}", clog.display()))?;
    if !st.success() {
        bail!("iperf3 -c failed ({st}): {}", text.trim());
    }
    let v: Value = serde_json::from_str(&text).context("iperf3's report is not JSON")?;
    let sum = &v["end"]["sum_received"];
    let bytes = sum["bytes"].as_u64().context("iperf3: no end.sum_received.bytes")?;
    let secs = sum["seconds"].as_f64().context("iperf3: no end.sum_received.seconds")?;
    if bytes == 0 || secs <= 0.0 {
        bail!("iperf3 moved nothing: {}", text.trim());
    }
    Ok(TcpRun { how, bytes, secs })
}

/// `bytes` through one 127.0.0.1 connection in 1 MiB writes, timed from
/// the connect to the receiver seeing end of stream.
pub async fn tokio_copy(bytes: u64) -> anyhow::Result<TcpRun> {
    const CHUNK: usize = 1 << 20;
    let listener = TcpListener::bind((LOOPBACK, 0)).await.context("binding 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(got);
            }
            got += n as u64;
        }
    });
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).await.context("connecting to the receiver")?;
    let buf = vec![0xa5u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let got = receiver.await.context("the receiver task")??;
    let secs = t0.elapsed().as_secs_f64();
    if got != bytes {
        bail!("the receiver got {got} of {bytes} bytes");
    }
    Ok(TcpRun { how: format!("tokio: {bytes} bytes over one connection in 1 MiB writes"), bytes, secs })
}

/// iperf3 when installed (and `BENCH_TCP_PEER` is not `tokio`), else the tokio copy.
pub async fn loopback_tcp(
    iperf3_bin: Option<PathBuf>,
    bytes: u64,
    secs: u64,
    dir: &Path,
) -> anyhow::Result<TcpRun> {
    match iperf3_bin {
        Some(bin) if std::env::var("BENCH_TCP_PEER").as_deref() != Ok("tokio") => {
            iperf3(&bin, secs, dir).await
        }
        _ => tokio_copy(bytes).await,
    }
}
