//! etcd as a system under test: a 3-member static bootstrap on loopback
//! (`--initial-cluster-state new`, default fsync and timeouts), writes through
//! the v3 KV `Put`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use etcd_client::{Client, ConnectOptions, KvClient};
use tempfile::TempDir;

use crate::load::{Connector, PutConn};
use crate::proc::{ChildGuard, LOOPBACK, free_ports, logs_of};
use crate::system::{Cluster, System};

/// etcd, run from the binary at `bin`.
#[derive(Debug, Clone)]
pub struct Etcd {
    pub bin: PathBuf,
}

impl Etcd {
    /// `$ETCD_BIN`, else `etcd` on `$PATH`, else `/usr/bin/etcd`.
    pub fn find() -> Option<Etcd> {
        if let Some(p) = std::env::var_os("ETCD_BIN") {
            let p = PathBuf::from(p);
            return p.is_file().then_some(Etcd { bin: p });
        }
        let on_path = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).map(|d| d.join("etcd")).collect::<Vec<_>>())
            .unwrap_or_default();
        on_path
            .into_iter()
            .chain([PathBuf::from("/usr/bin/etcd")])
            .find(|p| p.is_file())
            .map(|bin| Etcd { bin })
    }

    pub fn version(&self) -> String {
        Command::new(&self.bin)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_owned))
            .unwrap_or_else(|| "etcd (unknown version)".into())
    }
}

/// A fresh client to one member.
pub async fn client(addr: &str) -> anyhow::Result<Client> {
    let opts = ConnectOptions::new().with_connect_timeout(Duration::from_millis(500));
    Ok(Client::connect([format!("http://{addr}")], Some(opts)).await?)
}

#[derive(Debug, Clone)]
pub struct EtcdConnector;

/// One HTTP/2 connection to a member's KV service.
#[derive(Clone)]
pub struct EtcdConn(KvClient);

impl fmt::Debug for EtcdConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EtcdConn")
    }
}

impl PutConn for EtcdConn {
    async fn put(&self, key: String, value: Vec<u8>) -> anyhow::Result<()> {
        let mut c = self.0.clone();
        c.put(key, value, None).await?;
        Ok(())
    }
}

impl Connector for EtcdConnector {
    type Conn = EtcdConn;
    async fn connect(&self, addr: &str) -> anyhow::Result<EtcdConn> {
        Ok(EtcdConn(client(addr).await?.kv_client()))
    }
}

/// Three etcd members with their data under one temporary directory.
#[derive(Debug)]
pub struct EtcdCluster {
    // Declared before `dir`: the processes die before their data is removed.
    children: Vec<ChildGuard>,
    addrs: Vec<String>,
    _dir: TempDir,
}

fn url(port: u16) -> String {
    format!("http://{LOOPBACK}:{port}")
}

fn member_cmd(
    bin: &Path,
    dir: &Path,
    i: usize,
    client: u16,
    peer: u16,
    cluster: &str,
    token: &str,
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--name")
        .arg(format!("e{i}"))
        .arg("--data-dir")
        .arg(dir.join(format!("e{i}")))
        .args(["--listen-client-urls", &url(client), "--advertise-client-urls", &url(client)])
        .args(["--listen-peer-urls", &url(peer), "--initial-advertise-peer-urls", &url(peer)])
        .args(["--initial-cluster", cluster, "--initial-cluster-token", token])
        .args(["--initial-cluster-state", "new", "--logger", "zap", "--log-outputs", "stderr"]);
    cmd
}

impl System for Etcd {
    type Connector = EtcdConnector;
    type Cluster = EtcdCluster;

    fn name(&self) -> &'static str {
        "etcd"
    }

    fn connector(&self) -> EtcdConnector {
        EtcdConnector
    }

    fn spawn_cluster(&self) -> anyhow::Result<EtcdCluster> {
        let dir = tempfile::Builder::new().prefix("bench-etcd-").tempdir().context("creating a temp dir")?;
        let ports = free_ports(6)?;
        let (clients, peers) = ports.split_at(3);
        let cluster =
            peers.iter().enumerate().map(|(i, p)| format!("e{i}={}", url(*p))).collect::<Vec<_>>().join(",");
        let token = dir.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut children = Vec::new();
        for i in 0..3 {
            let cmd = member_cmd(&self.bin, dir.path(), i, clients[i], peers[i], &cluster, &token);
            children.push(ChildGuard::spawn(
                format!("etcd e{i}"),
                cmd,
                &dir.path().join(format!("e{i}.log")),
            )?);
        }
        let addrs = clients.iter().map(|p| format!("{LOOPBACK}:{p}")).collect();
        Ok(EtcdCluster { children, addrs, _dir: dir })
    }
}

impl Cluster for EtcdCluster {
    fn client_addrs(&self) -> Vec<String> {
        self.addrs.clone()
    }

    async fn wait_ready_leader(&mut self, within: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + within;
        let mut last = String::from("no answer yet");
        loop {
            self.check_running()?;
            // (member id, leader id) as each member sees it.
            let mut seen = Vec::new();
            for addr in &self.addrs {
                let status = async {
                    let mut c = client(addr).await?;
                    anyhow::Ok(c.status().await?)
                };
                match tokio::time::timeout(Duration::from_secs(2), status).await {
                    Ok(Ok(s)) => {
                        let me = s.header().map(|h| h.member_id()).unwrap_or(0);
                        seen.push((addr.clone(), me, s.leader()));
                    }
                    Ok(Err(e)) => last = format!("{addr}: {e:#}"),
                    Err(_) => last = format!("{addr}: status timed out"),
                }
            }
            if seen.len() == 3 {
                let leader = seen[0].2;
                if leader != 0
                    && seen.iter().all(|s| s.2 == leader)
                    && let Some((addr, ..)) = seen.iter().find(|s| s.1 == leader)
                {
                    return Ok(addr.clone());
                }
                last = format!("members disagree on the leader: {seen:?}");
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "etcd did not become healthy within {within:?}; last: {last}\n{}",
                    logs_of(&self.children, 15)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        self.children.iter_mut().try_for_each(ChildGuard::check_running)
    }

    fn logs(&self) -> String {
        logs_of(&self.children, 15)
    }
}
