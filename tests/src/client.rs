//! [`Client`]: the public gRPC API of one node, from the host namespace, and
//! [`wait_until`], the polling loop every test step waits with.

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::metadata_service_client::MetadataServiceClient;
use nodeos_proto::v1::pool_service_client::PoolServiceClient;
use tonic::transport::{Channel, Endpoint};

/// Connect timeout of every call.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of every call: below the node's own 10 s wait for a leader, so a
/// call into a pool without a leader fails fast and the caller retries.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Header the nodes put on a status request they hand to the leader: a node
/// receiving it answers from its own view. Used here to see each node's own
/// term, leader and revision rather than the leader's relayed answer.
const PROXIED: &str = "x-nodeos-proxied";

/// An invariant broken: fails the test at once, never retried by [`wait_until`].
#[derive(Debug)]
pub struct Violation(pub String);

impl Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "INVARIANT VIOLATED: {}", self.0)
    }
}

impl std::error::Error for Violation {}

/// Polls `f` every 250 ms until it returns `Ok`, for at most `timeout`.
/// An `Err` means "not yet" (the last one is reported on timeout), except a
/// [`Violation`], which ends the wait at once.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => {
                if start.elapsed() >= Duration::from_millis(500) {
                    eprintln!("nodeos-tests: {what}: after {:.1} s", start.elapsed().as_secs_f64());
                }
                return Ok(v);
            }
            Err(e) if e.is::<Violation>() => return Err(e.context(format!("while waiting for: {what}"))),
            Err(e) => {
                if start.elapsed() >= timeout {
                    return Err(e.context(format!("timed out after {timeout:?} waiting for: {what}")));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// An admin credential for one test's pool, made offline from its pool key
/// by the CLI (`nodeos auth bootstrap --offline`) into a config file.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The CLI config file holding it (`--config`).
    pub config: std::path::PathBuf,
    tls: tonic::transport::ClientTlsConfig,
}

impl Credentials {
    /// Runs `bin auth bootstrap --offline` for the pool of `key_file`, into `config`.
    pub fn bootstrap(
        bin: &std::path::Path,
        key_file: &std::path::Path,
        config: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let out = std::process::Command::new(bin)
            .arg("--config")
            .arg(config)
            .args(["-o", "json", "auth", "bootstrap", "--offline", "--name", "tests", "--pool-key-file"])
            .arg(key_file)
            .output()
            .context("running nodeos auth bootstrap")?;
        if !out.status.success() {
            bail!("nodeos auth bootstrap failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Self::load(config)
    }

    /// The current context of the CLI config file `config`.
    pub fn load(config: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read(config).with_context(|| format!("reading {}", config.display()))?;
        let v: serde_json::Value = serde_json::from_slice(&text).context("the CLI config is not JSON")?;
        let cur = v["current_context"].as_str().context("no current context")?;
        Self::from_context(config, &v["contexts"][cur])
    }

    /// A credential file written by `nodeos auth issue --out FILE` (one context).
    pub fn from_file(file: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let v: serde_json::Value =
            serde_json::from_slice(&text).context("the credential file is not JSON")?;
        Self::from_context(file, &v)
    }

    fn from_context(config: &std::path::Path, ctx: &serde_json::Value) -> anyhow::Result<Self> {
        let field =
            |k: &str| ctx[k].as_str().map(str::to_owned).with_context(|| format!("no {k} in the credential"));
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(field("ca_pem")?))
            .identity(tonic::transport::Identity::from_pem(field("cert_pem")?, field("key_pem")?))
            .domain_name("nodeos");
        Ok(Credentials { config: config.to_owned(), tls })
    }
}

/// The endpoint of a node's API at `addr`, over mutual TLS when `creds`.
pub fn endpoint(addr: SocketAddr, creds: Option<&Credentials>) -> anyhow::Result<Endpoint> {
    let ep =
        Endpoint::from_shared(format!("http://{addr}")).with_context(|| format!("endpoint for {addr}"))?;
    Ok(match creds {
        Some(c) => Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(c.tls.clone())
            .context("TLS configuration")?,
        None => ep,
    })
}

/// One node's public API. Cheap to clone; connects lazily and reconnects
/// after the node restarts.
#[derive(Debug, Clone)]
pub struct Client {
    pub addr: SocketAddr,
    channel: Channel,
}

impl Client {
    /// `creds`: mutual TLS with them; `None`: plaintext.
    pub fn new(addr: SocketAddr, creds: Option<&Credentials>) -> anyhow::Result<Self> {
        let channel =
            endpoint(addr, creds)?.connect_timeout(CONNECT_TIMEOUT).timeout(CALL_TIMEOUT).connect_lazy();
        Ok(Client { addr, channel })
    }

    fn pool(&self) -> PoolServiceClient<Channel> {
        PoolServiceClient::new(self.channel.clone())
    }

    fn meta(&self) -> MetadataServiceClient<Channel> {
        MetadataServiceClient::new(self.channel.clone())
    }

    /// `PoolService.Status` as any client sees it (relayed from the leader).
    pub async fn status(&self) -> anyhow::Result<pb::PoolStatus> {
        let r = self.pool().status(pb::StatusRequest {}).await;
        Ok(r.with_context(|| format!("Status from {}", self.addr))?.into_inner())
    }

    /// The answering node's own view (not relayed): its term, leader, revision.
    pub async fn local_status(&self) -> anyhow::Result<pb::PoolStatus> {
        let mut req = tonic::Request::new(pb::StatusRequest {});
        req.metadata_mut().insert(PROXIED, tonic::metadata::MetadataValue::from_static("1"));
        let r = self.pool().status(req).await;
        Ok(r.with_context(|| format!("local Status from {}", self.addr))?.into_inner())
    }

    pub async fn put(&self, key: &str, value: &[u8]) -> anyhow::Result<pb::PutResponse> {
        let req = pb::PutRequest { key: key.to_owned(), value: value.to_vec(), expect_mod_revision: None };
        let r = self.meta().put(req).await;
        Ok(r.with_context(|| format!("Put {key} via {}", self.addr))?.into_inner())
    }

    /// Linearizable Get.
    pub async fn get(&self, key: &str) -> anyhow::Result<pb::GetResponse> {
        self.get_with(key, false).await
    }

    /// Get from the node's own state (no leader round trip); its `revision`
    /// is the node's applied revision.
    pub async fn get_stale(&self, key: &str) -> anyhow::Result<pb::GetResponse> {
        self.get_with(key, true).await
    }

    async fn get_with(&self, key: &str, stale_ok: bool) -> anyhow::Result<pb::GetResponse> {
        let r = self.meta().get(pb::GetRequest { key: key.to_owned(), stale_ok }).await;
        Ok(r.with_context(|| format!("Get {key} (stale_ok {stale_ok}) via {}", self.addr))?.into_inner())
    }

    pub async fn list(&self, prefix: &str) -> anyhow::Result<pb::ListResponse> {
        let r = self.meta().list(pb::ListRequest { prefix: prefix.to_owned(), limit: 0 }).await;
        Ok(r.with_context(|| format!("List {prefix} via {}", self.addr))?.into_inner())
    }
}

/// Members marked leader.
pub fn leaders_in(s: &pb::PoolStatus) -> Vec<&pb::Node> {
    s.members.iter().filter(|m| m.role() == pb::NodeRole::Leader).collect()
}

/// Members that vote (leader included).
pub fn voters_in(s: &pb::PoolStatus) -> Vec<&pb::Node> {
    s.members.iter().filter(|m| matches!(m.role(), pb::NodeRole::Leader | pb::NodeRole::Voter)).collect()
}

/// One line per member, for error messages.
pub fn describe(s: &pb::PoolStatus) -> String {
    let mut out = format!(
        "pool {:?} leader {:?} term {} revision {} answered_by {:?}:",
        s.pool_id, s.leader_id, s.term, s.revision, s.answered_by
    );
    for m in &s.members {
        out.push_str(&format!(" [{} {:?} {:?} {}]", m.id, m.role(), m.health(), m.address));
    }
    out
}

/// Fails unless `s` shows a pool with exactly one leader, matching `leader_id`.
pub fn check_shape(s: &pb::PoolStatus) -> anyhow::Result<()> {
    let leaders = leaders_in(s);
    if leaders.len() > 1 {
        return Err(Violation(format!("two leaders in one answer: {}", describe(s))).into());
    }
    if s.pool_id.is_empty() {
        bail!("no pool id yet: {}", describe(s));
    }
    if s.leader_id.is_empty() || leaders.len() != 1 {
        bail!("no leader: {}", describe(s));
    }
    if leaders[0].id != s.leader_id {
        return Err(Violation(format!("leader_id is not the member marked leader: {}", describe(s))).into());
    }
    Ok(())
}
