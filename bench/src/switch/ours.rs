//! The nodeos side: one `nodeos node` per node namespace (a two-node pool
//! found by seeds, tunnels on the fabric addresses), then through the CLI a
//! security group allowing everything (`ingress any` plus the egress rules a
//! new group gets; the stateful filter still runs on every packet, as in
//! production), a network, and on each node a tap port,
//! whose tap is moved into that node's client namespace and given the
//! port's address statically (DHCP is tested elsewhere).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use rand::Rng;
use serde_json::Value;
use tokio::time::Instant;

use super::kernel::MTU;
use super::topo::{FABRIC_IPS, Topology};
use super::{Ends, exec_in, ip, text};
use crate::proc::{ChildGuard, logs_of};

/// Every node's gRPC port (on its fabric address).
pub const API_PORT: u16 = 7700;
/// The network's address block.
pub const CIDR: &str = "10.90.0.0/24";
/// Name of the network and of the security group.
const NAME: &str = "bench";
const FORM_LIMIT: Duration = Duration::from_secs(60);
const TAP_LIMIT: Duration = Duration::from_secs(15);

/// A tap port, as `port create` reported it.
#[derive(Debug, Clone)]
pub struct Port {
    pub id: String,
    /// Without prefix length.
    pub ip: String,
    pub mac: String,
    pub tap: String,
}

/// Two node processes and their ports; the processes die, then the
/// namespaces go, when dropped.
#[derive(Debug)]
pub struct OurSide {
    // Declared before `topo`: the processes die before their namespaces.
    children: Vec<ChildGuard>,
    bin: PathBuf,
    /// The CLI config holding an admin credential for the pool.
    config: PathBuf,
    logs: [PathBuf; 2],
    /// Node ids, by node index.
    pub node_ids: [String; 2],
    /// Tap ports, by node index.
    pub ports: Vec<Port>,
    /// From spawning the nodes to a formed pool.
    pub formed_in: Duration,
    pub topo: Topology,
}

fn api(i: usize) -> String {
    format!("{}:{API_PORT}", FABRIC_IPS[i])
}

impl OurSide {
    /// Starts the pool and makes the ports; data and logs go under `dir`.
    pub async fn build(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        let topo = Topology::new('o')?;
        let key: String =
            rand::rng().sample_iter(rand::distr::Alphanumeric).take(32).map(char::from).collect();
        let key_file = dir.join("pool.key");
        std::fs::write(&key_file, key).context("writing the pool key")?;
        // The nodes speak mutual TLS on the fabric: an admin credential from the key.
        let config = dir.join("cli.json");
        let made = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .args(["auth", "bootstrap", "--offline", "--pool-key-file"])
            .arg(&key_file)
            .output()
            .context("running nodeos auth bootstrap")?;
        anyhow::ensure!(
            made.status.success(),
            "nodeos auth bootstrap: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        let logs = [dir.join("nodeos-n0.log"), dir.join("nodeos-n1.log")];
        let t = Instant::now();
        let mut children = Vec::new();
        for i in 0..2 {
            let ip = FABRIC_IPS[i];
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", topo.node(i)])
                .arg(bin)
                .args(["node", "--data-dir"])
                .arg(dir.join(format!("n{i}")))
                .args(["--pool", "benchswitch", "--pool-key-file"])
                .arg(&key_file)
                .args(["--listen", &api(i), "--seeds", &api(1 - i), "--bootstrap-expect", "2"])
                .args(["--block-listen", &format!("{ip}:7800"), "--nbd-listen", "127.0.0.1:10809"])
                .args(["--vxlan-listen", &format!("{ip}:4789")])
                .env("NO_COLOR", "1")
                .env("RUST_BACKTRACE", "1");
            children.push(ChildGuard::spawn(format!("nodeos n{i}"), cmd, &logs[i])?);
        }
        let mut side = OurSide {
            config,
            children,
            bin: bin.to_owned(),
            logs,
            node_ids: Default::default(),
            ports: Vec::new(),
            formed_in: Duration::ZERO,
            topo,
        };
        side.node_ids = side.wait_formed().await?;
        side.formed_in = t.elapsed();

        side.cli(0, &["security-group", "create", NAME, "--rule", "ingress any"]).await?;
        side.cli(0, &["network", "create", NAME, "--cidr", CIDR]).await?;
        for i in 0..2 {
            let port = side.tap_port(i).await?;
            side.ports.push(port);
        }
        Ok(side)
    }

    /// Runs `nodeos --endpoint <node i> -o json ARGS` in node `i`'s
    /// namespace; its JSON output.
    pub async fn cli(&self, i: usize, args: &[&str]) -> anyhow::Result<Value> {
        let endpoint = api(i);
        let config = self.config.to_str().context("the config path is not UTF-8")?;
        let mut all =
            vec!["--config", config, "--endpoint", &endpoint, "--request-timeout", "10", "-o", "json"];
        all.extend_from_slice(args);
        let bin = self.bin.to_str().context("the nodeos path is not UTF-8")?;
        let out = exec_in(self.topo.node(i), bin, &all, Duration::from_secs(30)).await?;
        if !out.status.success() {
            bail!(
                "`nodeos --endpoint {endpoint} {}` failed ({}): {}",
                args.join(" "),
                out.status,
                text(&out)
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("`nodeos {}` printed no JSON: {}", args.join(" "), text(&out)))
    }

    /// Fails with the log tail if a node process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        self.children.iter_mut().try_for_each(ChildGuard::check_running)
    }

    /// The node processes' pids, by node index.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(ChildGuard::pid).collect()
    }

    /// Node `i`'s log (stdout and stderr).
    pub fn log_path(&self, i: usize) -> &Path {
        &self.logs[i]
    }

    pub fn ends(&self) -> Ends {
        Ends {
            side: "nodeos",
            nodes: [self.topo.node(0).to_owned(), self.topo.node(1).to_owned()],
            clients: [self.topo.client(0).to_owned(), self.topo.client(1).to_owned()],
            ips: [self.ports[0].ip.clone(), self.ports[1].ip.clone()],
        }
    }

    /// Waits until node 0's `pool status` shows a leader and both nodes
    /// healthy with their node records written; the node ids.
    async fn wait_formed(&mut self) -> anyhow::Result<[String; 2]> {
        let deadline = Instant::now() + FORM_LIMIT;
        loop {
            self.check_running()?;
            let last = match self.cli(0, &["pool", "status"]).await {
                Ok(s) => match formed(&s) {
                    Some(ids) => return Ok(ids),
                    None => s.to_string(),
                },
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "the nodeos pool did not form within {FORM_LIMIT:?}; last status: {last}\n{}",
                    logs_of(&self.children, 15)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Makes node `i`'s tap port and moves its tap into client namespace `i`.
    async fn tap_port(&mut self, i: usize) -> anyhow::Result<Port> {
        let tap = format!("tb{i}");
        let node_id = self.node_ids[i].clone();
        let p = self
            .cli(
                i,
                &[
                    "port",
                    "create",
                    "--network",
                    NAME,
                    "--node",
                    &node_id,
                    "--tap",
                    &tap,
                    "--security-group",
                    NAME,
                ],
            )
            .await?;
        let field = |k: &str| {
            p[k].as_str().map(str::to_owned).with_context(|| format!("`port create` JSON has no {k}: {p}"))
        };
        let port = Port {
            id: field("id")?,
            ip: field("ip")?.split('/').next().unwrap_or_default().to_owned(),
            mac: field("mac")?.to_ascii_lowercase(),
            tap: tap.clone(),
        };
        let (n, c) = (self.topo.node(i).to_owned(), self.topo.client(i).to_owned());
        let deadline = Instant::now() + TAP_LIMIT;
        while ip(&["-n", &n, "link", "show", &tap]).is_err() {
            self.check_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "tap {tap} of port {} did not appear on node {i} within {TAP_LIMIT:?}\n{}",
                    port.id,
                    logs_of(&self.children, 15)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ip(&["-n", &n, "link", "set", &tap, "netns", &c])?;
        ip(&["-n", &c, "link", "set", &tap, "mtu", MTU, "up"])?;
        ip(&["-n", &c, "addr", "add", &format!("{}/24", port.ip), "dev", &tap])?;
        let link: Value = serde_json::from_str(&ip(&["-n", &c, "-j", "link", "show", &tap])?)
            .context("parsing `ip -j link show`")?;
        let mac = link[0]["address"].as_str().unwrap_or_default().to_ascii_lowercase();
        ensure!(
            mac == port.mac,
            "tap {tap} has MAC {mac}, its port {} has {}: the switch would drop its frames",
            port.id,
            port.mac
        );
        Ok(port)
    }
}

/// Both node ids (by node index, matched on their API addresses) if `s`
/// (`pool status` JSON) shows a leader and both nodes healthy and joined.
fn formed(s: &Value) -> Option<[String; 2]> {
    if s["leader_id"].as_str().unwrap_or_default().is_empty() {
        return None;
    }
    let members = s["members"].as_array()?;
    let id = |i: usize| {
        members
            .iter()
            .find(|m| {
                m["address"].as_str() == Some(&api(i))
                    && m["health"].as_str() == Some("healthy")
                    && m["joined_at_ms"].as_u64().unwrap_or(0) > 0
            })
            .and_then(|m| m["id"].as_str().map(str::to_owned))
    };
    Some([id(0)?, id(1)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_is_formed_once_both_nodes_are_healthy_and_joined() {
        let member = |id: &str, i: usize, health: &str, joined: u64| serde_json::json!({"id": id, "address": api(i), "health": health, "joined_at_ms": joined});
        let status =
            |leader: &str, members: Vec<Value>| serde_json::json!({"leader_id": leader, "members": members});
        let both = vec![member("b", 1, "healthy", 5), member("a", 0, "healthy", 7)];
        assert_eq!(formed(&status("a", both.clone())), Some(["a".to_owned(), "b".to_owned()]));
        assert_eq!(formed(&status("", both)), None);
        assert_eq!(
            formed(&status("a", vec![member("a", 0, "healthy", 7), member("b", 1, "healthy", 0)])),
            None
        );
        assert_eq!(
            formed(&status("a", vec![member("a", 0, "healthy", 7), member("b", 1, "unreachable", 3)])),
            None
        );
        assert_eq!(formed(&status("a", vec![member("a", 0, "healthy", 7)])), None);
    }
}
