//! nodeos as a system under test: 3 `nodeos node` processes on loopback that
//! find each other by seeds (`--bootstrap-expect 3`), writes through
//! `MetadataService.Put`.

use std::path::PathBuf;
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

/// Three `nodeos node` processes with their data under one temporary directory.
#[derive(Debug)]
pub struct NodeosCluster {
    // Declared before `dir`: the processes die before their data is removed.
    children: Vec<ChildGuard>,
    addrs: Vec<String>,
    _dir: TempDir,
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
        let dir =
            tempfile::Builder::new().prefix("bench-nodeos-").tempdir().context("creating a temp dir")?;
        let key: String =
            rand::rng().sample_iter(rand::distr::Alphanumeric).take(32).map(char::from).collect();
        let key_file = dir.path().join("pool.key");
        std::fs::write(&key_file, key).context("writing the pool key")?;
        let addrs: Vec<String> = free_ports(3)?.into_iter().map(|p| format!("{LOOPBACK}:{p}")).collect();
        let block_ports = free_ports(6)?;
        let seeds = addrs.join(",");
        let mut children = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let mut cmd = Command::new(&self.bin);
            cmd.arg("node")
                .arg("--data-dir")
                .arg(dir.path().join(format!("n{i}")))
                .args(["--pool", "bench", "--pool-key-file"])
                .arg(&key_file)
                .args(["--listen", addr, "--seeds", &seeds, "--bootstrap-expect", "3"])
                .args(["--block-listen", &format!("{LOOPBACK}:{}", block_ports[i])])
                .args(["--nbd-listen", &format!("{LOOPBACK}:{}", block_ports[3 + i])]);
            children.push(ChildGuard::spawn(
                format!("nodeos n{i}"),
                cmd,
                &dir.path().join(format!("n{i}.log")),
            )?);
        }
        Ok(NodeosCluster { children, addrs, _dir: dir })
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
        self.children.iter_mut().try_for_each(ChildGuard::check_running)
    }

    fn logs(&self) -> String {
        logs_of(&self.children, 15)
    }
}
