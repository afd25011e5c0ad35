//! nodeos as a system under test: 3 `nodeos node` processes on loopback that
//! find each other by seeds (`--bootstrap-expect 3`), writes through
//! `MetadataService.Put`.
//!
//! [`Nodeos::spawn_pool`] starts pools of other sizes or with extra daemon
//! flags; [`NodeosCluster`] exposes each node's API, replica (block) and NBD
//! addresses and can kill one node (SIGKILL) while the others go on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use nodeos_proto::v1::metadata_service_client::MetadataServiceClient;
use nodeos_proto::v1::pool_service_client::PoolServiceClient;
use nodeos_proto::v1::{NodeHealth, NodeRole, PoolStatus, PutRequest, StatusRequest};
use rand::Rng;
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};

use crate::load::{Connector, PutConn};
use crate::proc::{ChildGuard, LOOPBACK, free_ports, logs_of};
use crate::system::{Cluster, System};

/// nodeos, run from the binary at `bin`.
#[derive(Debug, Clone)]
pub struct Nodeos {
    pub bin: PathBuf,
}

/// A tonic channel to one node's API.
pub async fn channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await?)
}

#[derive(Debug, Clone)]
pub struct NodeosConnector;

/// One HTTP/2 connection to a node's `MetadataService`.
#[derive(Debug, Clone)]
pub struct NodeosConn(MetadataServiceClient<Channel>);

impl PutConn for NodeosConn {
    async fn put(&self, key: String, value: Vec<u8>) -> anyhow::Result<()> {
        let mut c = self.0.clone();
        let r = c.put(PutRequest { key, value, expect_mod_revision: None }).await?.into_inner();
        if !r.succeeded {
            bail!("put did not succeed");
        }
        Ok(())
    }
}

impl Connector for NodeosConnector {
    type Conn = NodeosConn;
    async fn connect(&self, addr: &str) -> anyhow::Result<NodeosConn> {
        Ok(NodeosConn(MetadataServiceClient::new(channel(addr).await?)))
    }
}

/// How [`Nodeos::spawn_pool`] starts a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Nodes, all seeds of each other; also the `--bootstrap-expect` count.
    pub nodes: usize,
    /// Appended to every node's command line (e.g. `--rereplicate-after 2`).
    pub extra_args: Vec<String>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions { nodes: 3, extra_args: Vec::new() }
    }
}

/// `nodeos node` processes (three unless started by [`Nodeos::spawn_pool`])
/// with their data under one temporary directory.
#[derive(Debug)]
pub struct NodeosCluster {
    // Declared before `dir`: the processes die before their data is removed.
    children: Vec<ChildGuard>,
    addrs: Vec<String>,
    block_addrs: Vec<String>,
    nbd_addrs: Vec<String>,
    /// Nodes killed on purpose by [`NodeosCluster::kill_node`].
    down: Vec<bool>,
    dir: TempDir,
}

impl Nodeos {
    /// Spawns `opts.nodes` fresh nodes (new data dirs, free ports) on
    /// 127.0.0.1 and returns at once.
    pub fn spawn_pool(&self, opts: &PoolOptions) -> anyhow::Result<NodeosCluster> {
        let n = opts.nodes;
        if n == 0 {
            bail!("a pool needs at least one node");
        }
        let dir =
            tempfile::Builder::new().prefix("bench-nodeos-").tempdir().context("creating a temp dir")?;
        let key: String =
            rand::rng().sample_iter(rand::distr::Alphanumeric).take(32).map(char::from).collect();
        let key_file = dir.path().join("pool.key");
        std::fs::write(&key_file, key).context("writing the pool key")?;
        let ports = free_ports(4 * n)?;
        let addr = |p: u16| format!("{LOOPBACK}:{p}");
        let addrs: Vec<String> = ports[..n].iter().copied().map(addr).collect();
        let block_addrs: Vec<String> = ports[n..2 * n].iter().copied().map(addr).collect();
        let nbd_addrs: Vec<String> = ports[2 * n..3 * n].iter().copied().map(addr).collect();
        // Every node on loopback: each its own VXLAN port.
        let vxlan_addrs: Vec<String> = ports[3 * n..].iter().copied().map(addr).collect();
        let seeds = addrs.join(",");
        let expect = n.to_string();
        let mut children = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let mut cmd = Command::new(&self.bin);
            cmd.arg("node")
                .arg("--data-dir")
                .arg(dir.path().join(format!("n{i}")))
                .args(["--pool", "bench", "--pool-key-file"])
                .arg(&key_file)
                .args(["--listen", addr, "--seeds", &seeds, "--bootstrap-expect", &expect])
                // Plaintext like the peers it is measured against (etcd, qemu-nbd).
                .arg("--plaintext-loopback")
                .args(["--block-listen", &block_addrs[i]])
                .args(["--nbd-listen", &nbd_addrs[i]])
                .args(["--vxlan-listen", &vxlan_addrs[i]])
                .args(&opts.extra_args);
            children.push(ChildGuard::spawn(format!("nodeos n{i}"), cmd, &node_log(dir.path(), i))?);
        }
        Ok(NodeosCluster { children, addrs, block_addrs, nbd_addrs, down: vec![false; n], dir })
    }
}

fn node_log(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("n{i}.log"))
}

impl System for Nodeos {
    type Connector = NodeosConnector;
    type Cluster = NodeosCluster;

    fn name(&self) -> &'static str {
        "nodeos"
    }

    fn connector(&self) -> NodeosConnector {
        NodeosConnector
    }

    fn spawn_cluster(&self) -> anyhow::Result<NodeosCluster> {
        self.spawn_pool(&PoolOptions::default())
    }
}

/// The leader's address if `s` shows a formed pool of at least 3 healthy voters.
fn formed_leader(s: &PoolStatus) -> Option<String> {
    if s.pool_id.is_empty() || s.leader_id.is_empty() {
        return None;
    }
    let healthy_voters = s
        .members
        .iter()
        .filter(|m| {
            matches!(m.role(), NodeRole::Leader | NodeRole::Voter) && m.health() == NodeHealth::Healthy
        })
        .count();
    if healthy_voters < 3 {
        return None;
    }
    s.members.iter().find(|m| m.id == s.leader_id && !m.address.is_empty()).map(|m| m.address.clone())
}

impl Cluster for NodeosCluster {
    fn client_addrs(&self) -> Vec<String> {
        self.addrs.clone()
    }

    async fn wait_ready_leader(&mut self, within: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + within;
        let mut last = String::from("no answer yet");
        loop {
            self.check_running()?;
            for addr in &self.addrs {
                let status = async {
                    let mut c = PoolServiceClient::new(channel(addr).await?);
                    anyhow::Ok(c.status(StatusRequest {}).await?.into_inner())
                };
                match tokio::time::timeout(Duration::from_secs(2), status).await {
                    Ok(Ok(s)) => match formed_leader(&s) {
                        Some(leader) => return Ok(leader),
                        None => last = format!("{addr}: {s:?}"),
                    },
                    Ok(Err(e)) => last = format!("{addr}: {e:#}"),
                    Err(_) => last = format!("{addr}: status timed out"),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the nodeos pool did not form within {within:?}; last status {last}\n{}",
                    logs_of(&self.children, 15)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        self.children
            .iter_mut()
            .zip(&self.down)
            .filter(|(_, down)| !**down)
            .try_for_each(|(c, _)| c.check_running())
    }

    fn logs(&self) -> String {
        logs_of(&self.children, 15)
    }
}

impl NodeosCluster {
    /// Each node's replica server address (`--block-listen`), by node index.
    pub fn block_addrs(&self) -> &[String] {
        &self.block_addrs
    }

    /// Each node's NBD server address (`--nbd-listen`), by node index.
    pub fn nbd_addrs(&self) -> &[String] {
        &self.nbd_addrs
    }

    /// Node `i`'s log file (stdout and stderr); it outlives a killed node.
    pub fn log_path(&self, i: usize) -> PathBuf {
        node_log(self.dir.path(), i)
    }

    /// Whether node `i` was killed by [`NodeosCluster::kill_node`].
    pub fn is_down(&self, i: usize) -> bool {
        self.down.get(i).copied().unwrap_or(false)
    }

    /// Kills node `i` with SIGKILL (no shutdown path runs) and reaps it. The
    /// other nodes go on; [`Cluster::check_running`] no longer counts it.
    pub async fn kill_node(&mut self, i: usize) -> anyhow::Result<()> {
        let child = self.children.get_mut(i).with_context(|| format!("no node {i}"))?;
        child.check_running()?;
        let pid = libc::pid_t::try_from(child.pid()).context("a pid out of range")?;
        // SAFETY: kill(2) takes no pointers; the child has not been reaped
        // (checked just above), so `pid` is still this child's.
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("killing node {i}"));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() {
            if tokio::time::Instant::now() >= deadline {
                bail!("node {i} survived SIGKILL for 10 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.down[i] = true;
        Ok(())
    }

    /// Waits until every node not killed is a healthy member of a formed pool
    /// with a leader and has written its node record (which carries its
    /// replica address, so volumes can be placed on it), and returns that
    /// status.
    pub async fn wait_all_healthy(&mut self, within: Duration) -> anyhow::Result<PoolStatus> {
        let deadline = tokio::time::Instant::now() + within;
        let want = self.down.iter().filter(|d| !**d).count();
        let mut last = String::from("no answer yet");
        loop {
            self.check_running()?;
            for (addr, _) in self.addrs.iter().zip(&self.down).filter(|(_, down)| !**down) {
                let status = async {
                    let mut c = PoolServiceClient::new(channel(addr).await?);
                    anyhow::Ok(c.status(StatusRequest {}).await?.into_inner())
                };
                match tokio::time::timeout(Duration::from_secs(2), status).await {
                    Ok(Ok(s)) => {
                        let healthy = s
                            .members
                            .iter()
                            .filter(|m| {
                                m.health() == NodeHealth::Healthy
                                    && m.joined_at_ms > 0
                                    && self.addrs.contains(&m.address)
                            })
                            .count();
                        if !s.pool_id.is_empty() && !s.leader_id.is_empty() && healthy >= want {
                            return Ok(s);
                        }
                        last = format!("{addr}: {healthy} of {want} healthy, leader {:?}", s.leader_id);
                    }
                    Ok(Err(e)) => last = format!("{addr}: {e:#}"),
                    Err(_) => last = format!("{addr}: status timed out"),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the nodeos pool did not get {want} healthy members within {within:?}; last status {last}\n{}",
                    logs_of(&self.children, 15)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
