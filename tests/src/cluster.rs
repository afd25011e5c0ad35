//! [`Cluster`]: one test's nodes on one [`TestNet`], the faults a test injects,
//! and the invariant checks it runs after every step.
//!
//! Node `i` (0-based) listens on `10.77.<k>.<i+1>:7700`. Data dirs, logs and
//! key files live in a temporary directory removed on drop; when a test ends
//! without [`Cluster::finish`] (an error or a panic), the tail of every node's
//! log is printed. `NODEOS_TESTS_KEEP=1` keeps a failed test's directory
//! (`NODEOS_TESTS_KEEP=all`: every test's) as `<tmp>/nodeos-tests-kept-<test>-<pid>`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nodeos_proto::v1 as pb;
use tempfile::TempDir;
use tokio::task::JoinHandle;

use crate::client::{Client, Credentials, Violation, check_shape, describe, voters_in, wait_until};
use crate::env::{Env, TMP_PREFIX};
use crate::netns::TestNet;
use crate::node::{NodeProc, NodeSpec};
use crate::tracker::Tracker;

/// gRPC port of every node (each has its own address).
pub const API_PORT: u16 = 7700;
/// Pool name used by the tests.
pub const POOL_NAME: &str = "pooltest";
/// How long one key may stay unreadable (RPC errors) while verifying.
const READ_RETRY: Duration = Duration::from_secs(20);

/// What a settled pool must look like, as every alive node answers.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// Exactly these member ids.
    pub members: BTreeSet<String>,
    /// Number of voters (leader included).
    pub voters: usize,
    /// Members that must be reported healthy.
    pub healthy: BTreeSet<String>,
    /// The pool id, when it is already known.
    pub pool_id: Option<String>,
}

/// Nodes of one test on their own network.
#[derive(Debug)]
pub struct Cluster {
    name: String,
    nodes: Vec<NodeProc>,
    net: TestNet,
    tracker: Arc<Tracker>,
    bin: PathBuf,
    key_file: PathBuf,
    /// The admin credential the harness calls the pool with.
    creds: Credentials,
    dir: PathBuf,
    tmp: Option<TempDir>,
    started: Instant,
    passed: bool,
}

/// Writes a fresh random pool key (64 hex characters) to `path`.
fn write_key(path: &Path) -> anyhow::Result<()> {
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(path, hex + "\n").with_context(|| format!("writing {}", path.display()))
}

impl Cluster {
    /// An empty cluster: the network and the pool key, no nodes yet.
    pub fn new(env: &Env, name: &str) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{TMP_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("creating the test's temporary directory")?;
        let dir = tmp.path().to_owned();
        let key_file = dir.join("pool.key");
        write_key(&key_file)?;
        let creds = Credentials::bootstrap(&env.bin, &key_file, &dir.join("cli.json"))?;
        let net = TestNet::new().context("creating the test network")?;
        eprintln!("nodeos-tests: {name}: bridge {} in {}", net.bridge_ip(), dir.display());
        Ok(Cluster {
            name: name.to_owned(),
            nodes: Vec::new(),
            net,
            tracker: Arc::default(),
            bin: env.bin.clone(),
            key_file,
            creds,
            dir,
            tmp: Some(tmp),
            started: Instant::now(),
            passed: false,
        })
    }

    /// A spec for the pool's key and name, beacons on, no seeds.
    pub fn spec(&self) -> NodeSpec {
        NodeSpec {
            pool: POOL_NAME.to_owned(),
            key_file: self.key_file.clone(),
            seeds: Vec::new(),
            beacons: true,
            bootstrap_expect: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            host_images_dir: Some("/".into()),
        }
    }

    /// Writes another random key file (for a node that must be refused).
    pub fn other_key_file(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.dir.join(name);
        write_key(&p)?;
        Ok(p)
    }

    /// Address node `i` has (or will have once added).
    pub fn planned_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.net.ip_of(i).into(), API_PORT)
    }

    /// Adds a node on the network and starts it; its index.
    pub fn add_node(&mut self, spec: &NodeSpec) -> anyhow::Result<usize> {
        let i = self.net.add_slot()?;
        let slot = self.net.slot(i)?.clone();
        let addr = SocketAddr::new(slot.ip.into(), API_PORT);
        let mut node = NodeProc::new(i, &slot.ns, addr, &self.bin, &self.dir, spec);
        node.start()?;
        self.nodes.push(node);
        Ok(i)
    }

    /// The test's network (for namespaces and hosts of the test's own).
    pub fn net_mut(&mut self) -> &mut TestNet {
        &mut self.net
    }

    pub fn net(&self) -> &TestNet {
        &self.net
    }

    /// Adds and starts `n` nodes with the same spec; their indices.
    pub fn add_nodes(&mut self, n: usize, spec: &NodeSpec) -> anyhow::Result<Vec<usize>> {
        (0..n).map(|_| self.add_node(spec)).collect()
    }

    pub fn node(&self, i: usize) -> anyhow::Result<&NodeProc> {
        self.nodes.get(i).with_context(|| format!("no node {i}"))
    }

    fn node_mut(&mut self, i: usize) -> anyhow::Result<&mut NodeProc> {
        self.nodes.get_mut(i).with_context(|| format!("no node {i}"))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Everything the test has observed.
    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// Node `i`'s id (waits until it has written its identity).
    pub async fn id(&mut self, i: usize) -> anyhow::Result<String> {
        self.node_mut(i)?.id().await
    }

    /// Ids of the given nodes.
    pub async fn ids(&mut self, idx: &[usize]) -> anyhow::Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        for &i in idx {
            out.insert(self.id(i).await?);
        }
        Ok(out)
    }

    /// Index of the node with this id, among those whose id is known.
    pub fn index_of(&self, id: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.known_id() == Some(id))
            .with_context(|| format!("node id {id} is not one of this test's nodes"))
    }

    pub fn client(&self, i: usize) -> anyhow::Result<Client> {
        Client::new(self.node(i)?.addr, Some(&self.creds))
    }

    /// An admin credential for the pool of `key_file` (another pool's, for a
    /// node started with another key), made offline by the CLI.
    pub fn credentials_for(&self, key_file: &Path, name: &str) -> anyhow::Result<Credentials> {
        Credentials::bootstrap(&self.bin, key_file, &self.dir.join(format!("{name}.cli.json")))
    }

    /// Node `i`'s own view (as [`Cluster::local_status`]), called with `creds`.
    pub async fn local_status_as(&self, i: usize, creds: &Credentials) -> anyhow::Result<pb::PoolStatus> {
        Client::new(self.node(i)?.addr, Some(creds))?.local_status().await
    }

    /// A connected channel to node `i`'s API, with the test's admin credential.
    pub async fn channel(&self, i: usize) -> anyhow::Result<tonic::transport::Channel> {
        let addr = self.node(i)?.addr;
        crate::client::endpoint(addr, Some(&self.creds))?
            .connect()
            .await
            .with_context(|| format!("connecting to node {i} at {addr}"))
    }

    /// The CLI config file holding the test's admin credential (`--config`).
    pub fn cli_config(&self) -> &Path {
        &self.creds.config
    }

    /// Status via node `i` (the leader's view, relayed), recorded.
    pub async fn status(&self, i: usize) -> anyhow::Result<pb::PoolStatus> {
        let s = self.client(i)?.status().await?;
        self.tracker.observe(&format!("node {i}"), &s)?;
        Ok(s)
    }

    /// Node `i`'s own view, recorded.
    pub async fn local_status(&self, i: usize) -> anyhow::Result<pb::PoolStatus> {
        let s = self.client(i)?.local_status().await?;
        self.tracker.observe(&format!("node {i} (own view)"), &s)?;
        Ok(s)
    }

    /// Fails if a node expected to run has exited.
    pub fn check_running(&mut self, alive: &[usize]) -> anyhow::Result<()> {
        for &i in alive {
            let node = self.node_mut(i)?;
            if let Some(s) = node.exited() {
                bail!("node {i} exited unexpectedly ({s}); log tail:\n{}", node.log_tail(40));
            }
        }
        Ok(())
    }

    /// One round of [`Cluster::wait_pool`]'s check.
    async fn pool_matches(&self, alive: &[usize], want: &Expect) -> anyhow::Result<pb::PoolStatus> {
        let mut first: Option<pb::PoolStatus> = None;
        for &i in alive {
            let s = self.status(i).await?;
            check_shape(&s)?;
            let ids: BTreeSet<String> = s.members.iter().map(|m| m.id.clone()).collect();
            if ids != want.members {
                bail!("via node {i}: members {ids:?}, want {:?}: {}", want.members, describe(&s));
            }
            let voters = voters_in(&s).len();
            if voters != want.voters {
                bail!("via node {i}: {voters} voters, want {}: {}", want.voters, describe(&s));
            }
            for m in &s.members {
                if want.healthy.contains(&m.id) && m.health() != pb::NodeHealth::Healthy {
                    bail!("via node {i}: {} is {:?}, want healthy: {}", m.id, m.health(), describe(&s));
                }
            }
            if let Some(p) = &want.pool_id
                && &s.pool_id != p
            {
                return Err(
                    Violation(format!("via node {i}: pool id {} is not the pool's {p}", s.pool_id)).into()
                );
            }
            // The node's own view must name the same pool: one pool, not two.
            let own = self.local_status(i).await?;
            if own.pool_id != s.pool_id {
                bail!("node {i} itself knows pool {:?}, the leader says {:?}", own.pool_id, s.pool_id);
            }
            match &first {
                None => first = Some(s),
                Some(f) => {
                    if f.pool_id != s.pool_id {
                        bail!("nodes disagree on the pool id: {} vs {}", describe(f), describe(&s));
                    }
                    if f.leader_id != s.leader_id {
                        bail!("nodes disagree on the leader: {} vs {}", describe(f), describe(&s));
                    }
                }
            }
        }
        first.context("wait_pool needs at least one alive node")
    }

    /// Waits until every node in `alive` answers a status that satisfies `want`
    /// (plus: pool id set and the same everywhere, exactly one leader, the same
    /// leader everywhere); that status.
    pub async fn wait_pool(
        &mut self,
        what: &str,
        alive: &[usize],
        want: &Expect,
        timeout: Duration,
    ) -> anyhow::Result<pb::PoolStatus> {
        self.check_running(alive)?;
        let this = &*self;
        let s = wait_until(what, timeout, || this.pool_matches(alive, want)).await?;
        self.check_running(alive)?;
        Ok(s)
    }

    /// Index of the current leader, as node `via` reports it.
    pub async fn leader(&self, via: usize) -> anyhow::Result<usize> {
        let s = self.status(via).await?;
        check_shape(&s)?;
        self.index_of(&s.leader_id)
    }

    /// Put via node `i`, recorded; an error unless acknowledged.
    pub async fn put(&self, i: usize, key: &str, value: &[u8]) -> anyhow::Result<u64> {
        put_recorded(&self.tracker, &self.client(i)?, key, value).await
    }

    /// Put via the nodes in `via` in turn until one acknowledges it.
    pub async fn put_retry(
        &self,
        via: &[usize],
        key: &str,
        value: &[u8],
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        let turn = AtomicUsize::new(0);
        wait_until(&format!("put {key}"), timeout, || {
            let i = via[turn.fetch_add(1, Ordering::Relaxed) % via.len()];
            self.put(i, key, value)
        })
        .await
    }

    /// Linearizable Get via node `i`, retried on RPC errors; the value, if any.
    pub async fn read(&self, i: usize, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        get_retrying(&self.client(i)?, key).await
    }

    /// Runs the CLI, `nodeos --endpoint <node i> -o json ARGS`, from the host
    /// namespace; its JSON output.
    pub async fn cli(&self, i: usize, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let addr = self.node(i)?.addr.to_string();
        let run = tokio::process::Command::new(&self.bin)
            .arg("--config")
            .arg(&self.creds.config)
            .args(["--endpoint", &addr, "--request-timeout", "10", "-o", "json"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .with_context(|| format!("`nodeos {}` did not finish within 30 s", args.join(" ")))?
            .with_context(|| format!("running `nodeos {}`", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "`nodeos --endpoint {addr} {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!("`nodeos {}` printed no JSON: {}", args.join(" "), String::from_utf8_lossy(&out.stdout))
        })
    }

    /// Reads every acknowledged write (linearizable Get) via each node in
    /// `readers`: a missing or different value is a [`Violation`]. Writes of
    /// unknown outcome, if present, must hold a value that was tried. Returns
    /// the number of acknowledged writes checked.
    pub async fn verify_acked(&self, readers: &[usize]) -> anyhow::Result<usize> {
        let acked: Vec<(String, Vec<u8>)> = self.tracker.acked().into_iter().collect();
        let uncertain: Vec<(String, Vec<Vec<u8>>)> = self.tracker.uncertain().into_iter().collect();
        const TASKS: usize = 4;
        for &r in readers {
            let client = self.client(r)?;
            let mut tasks = tokio::task::JoinSet::new();
            for t in 0..TASKS {
                let client = client.clone();
                let acked: Vec<_> = acked.iter().skip(t).step_by(TASKS).cloned().collect();
                let uncertain: Vec<_> = uncertain.iter().skip(t).step_by(TASKS).cloned().collect();
                tasks.spawn(async move {
                    for (k, v) in acked {
                        let got = get_retrying(&client, &k).await?;
                        if got.as_deref() != Some(v.as_slice()) {
                            return Err(anyhow::Error::new(Violation(format!(
                                "acknowledged write {k}={:?} reads back as {:?} via node {r} ({})",
                                String::from_utf8_lossy(&v),
                                got.map(|g| String::from_utf8_lossy(&g).into_owned()),
                                client.addr
                            ))));
                        }
                    }
                    for (k, tried) in uncertain {
                        if let Some(g) = get_retrying(&client, &k).await?
                            && !tried.contains(&g)
                        {
                            return Err(anyhow::Error::new(Violation(format!(
                                "{k} holds {:?}, which no write tried",
                                String::from_utf8_lossy(&g)
                            ))));
                        }
                    }
                    Ok(())
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.context("a verification task panicked")??;
            }
        }
        Ok(acked.len())
    }

    /// The invariants after a step: every node in `alive` runs and answers,
    /// at most one leader per term in every answer seen so far, and every
    /// acknowledged write reads back via every node in `alive`.
    pub async fn check_invariants(&mut self, alive: &[usize]) -> anyhow::Result<()> {
        self.check_running(alive)?;
        for &i in alive {
            let this = &*self;
            wait_until(&format!("node {i} answers status"), Duration::from_secs(30), || async move {
                this.local_status(i).await?;
                this.status(i).await
            })
            .await?;
        }
        let n = self.verify_acked(alive).await?;
        eprintln!(
            "nodeos-tests: {}: invariants hold on nodes {alive:?} ({n} acknowledged writes read back, terms->leaders {:?})",
            self.name,
            self.tracker.leaders()
        );
        Ok(())
    }

    /// Each node's applied revision (from a stale read, served locally).
    pub async fn revisions(&self, nodes: &[usize]) -> anyhow::Result<Vec<u64>> {
        let mut out = Vec::new();
        for &i in nodes {
            out.push(self.client(i)?.get_stale("nodeos-tests/revision-probe").await?.revision);
        }
        Ok(out)
    }

    /// kill -9 (and reap) node `i`.
    pub fn kill9(&mut self, i: usize) -> anyhow::Result<()> {
        eprintln!("nodeos-tests: {}: kill -9 node {i}", self.name);
        self.node_mut(i)?.kill9()
    }

    /// SIGTERM node `i`; fails unless it exits cleanly (status 0).
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        eprintln!("nodeos-tests: {}: SIGTERM node {i}", self.name);
        let node = self.node_mut(i)?;
        let status = node.stop().await?;
        if !status.success() {
            bail!("node {i} exited with {status} after SIGTERM; log tail:\n{}", node.log_tail(30));
        }
        Ok(())
    }

    /// Starts a stopped node again with its data dir.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        eprintln!("nodeos-tests: {}: restarting node {i}", self.name);
        self.node_mut(i)?.start()
    }

    /// Freezes node `i`'s daemon (SIGSTOP) while its VM workers run on: a
    /// node process that hangs, then comes back with a lease long gone.
    pub fn freeze(&self, i: usize) -> anyhow::Result<()> {
        eprintln!("nodeos-tests: {}: SIGSTOP node {i} (its workers run on)", self.name);
        self.node(i)?.signal(nix::sys::signal::Signal::SIGSTOP)
    }

    /// Lets a frozen node's daemon run again (SIGCONT).
    pub fn thaw(&self, i: usize) -> anyhow::Result<()> {
        eprintln!("nodeos-tests: {}: SIGCONT node {i}", self.name);
        self.node(i)?.signal(nix::sys::signal::Signal::SIGCONT)
    }

    /// Takes node `i` off the network.
    pub fn cut(&self, i: usize) -> anyhow::Result<()> {
        eprintln!("nodeos-tests: {}: cutting node {i}'s link", self.name);
        self.net.cut(i)
    }

    /// Puts node `i` back on the network.
    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        eprintln!("nodeos-tests: {}: healing node {i}'s link", self.name);
        self.net.heal(i)
    }

    /// Node `i`'s whole log.
    pub fn log(&self, i: usize) -> anyhow::Result<String> {
        Ok(self.node(i)?.log())
    }

    /// Starts a background writer putting `<prefix><n>` keys via `targets` in
    /// turn, recording every outcome.
    pub fn writer(&self, targets: &[usize], prefix: &str) -> anyhow::Result<Writer> {
        let clients: Vec<Client> = targets.iter().map(|&i| self.client(i)).collect::<anyhow::Result<_>>()?;
        if clients.is_empty() {
            bail!("a writer needs at least one target");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let tracker = self.tracker.clone();
        let prefix = prefix.to_owned();
        let (s, a) = (stop.clone(), acked.clone());
        let handle = tokio::spawn(async move {
            let mut report = WriterReport::default();
            let mut n = 0usize;
            while !s.load(Ordering::Relaxed) {
                let client = &clients[n % clients.len()];
                let key = format!("{prefix}{n:06}");
                let value = format!("{n}-{:08x}", rand::random::<u32>());
                match put_recorded(&tracker, client, &key, value.as_bytes()).await {
                    Ok(_) => {
                        report.acked += 1;
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        report.failed += 1;
                        report.last_error = Some(format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                n += 1;
            }
            report
        });
        Ok(Writer { stop, acked, handle })
    }

    /// Marks the test passed and tears everything down.
    pub fn finish(mut self) {
        self.passed = true;
        eprintln!("nodeos-tests: {}: passed in {:.1} s", self.name, self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let keep = match std::env::var("NODEOS_TESTS_KEEP").as_deref() {
            Ok("all") => true,
            Ok(_) => !self.passed,
            Err(_) => false,
        };
        if !self.passed {
            eprintln!(
                "nodeos-tests: {}: FAILED after {:.1} s; terms->leaders seen {:?}",
                self.name,
                self.started.elapsed().as_secs_f64(),
                self.tracker.leaders()
            );
            for n in &self.nodes {
                eprintln!(
                    "---- node {} ({}, id {}) log tail ----\n{}",
                    n.index,
                    n.addr,
                    n.known_id().unwrap_or("?"),
                    n.log_tail(60)
                );
            }
        }
        // Nodes stop before their files move or vanish (the network goes after this).
        for n in &mut self.nodes {
            n.halt();
        }
        if keep && let Some(tmp) = self.tmp.take() {
            let path = tmp.keep();
            let kept = path.with_file_name(format!("{TMP_PREFIX}kept-{}-{}", self.name, std::process::id()));
            let shown = match std::fs::rename(&path, &kept) {
                Ok(()) => kept,
                Err(_) => path,
            };
            eprintln!("nodeos-tests: {}: kept {} (NODEOS_TESTS_KEEP)", self.name, shown.display());
        }
    }
}

/// One put, recorded in the tracker; an error unless acknowledged.
async fn put_recorded(tracker: &Tracker, client: &Client, key: &str, value: &[u8]) -> anyhow::Result<u64> {
    match client.put(key, value).await {
        Ok(r) if r.succeeded => {
            tracker.record_put(key, value, true);
            Ok(r.revision)
        }
        Ok(r) => {
            // An unconditional put never fails its compare; the pool said it did not apply.
            bail!("put {key} via {} not applied: {r:?}", client.addr)
        }
        Err(e) => {
            tracker.record_put(key, value, false);
            Err(e)
        }
    }
}

/// Linearizable Get, retried on errors for up to [`READ_RETRY`].
async fn get_retrying(client: &Client, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + READ_RETRY;
    loop {
        match client.get(key).await {
            Ok(r) => return Ok(r.kv.map(|kv| kv.value)),
            Err(e) if Instant::now() >= deadline => return Err(e.context("reading back acknowledged writes")),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// What a background writer did.
#[derive(Debug, Default, Clone)]
pub struct WriterReport {
    pub acked: usize,
    pub failed: usize,
    pub last_error: Option<String>,
}

/// A background writer (see [`Cluster::writer`]).
#[derive(Debug)]
pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    handle: JoinHandle<WriterReport>,
}

impl Writer {
    /// Writes acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until `n` writes in all are acknowledged.
    pub async fn wait_acked(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let this = self;
        wait_until(&format!("{n} acknowledged writes"), timeout, || async move {
            let a = this.acked();
            if a >= n { Ok(()) } else { bail!("{a} of {n} writes acknowledged") }
        })
        .await
    }

    /// Stops the writer after its current put; its report.
    pub async fn stop(self) -> anyhow::Result<WriterReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.context("the writer task panicked")
    }
}
