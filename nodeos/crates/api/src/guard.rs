//! The door of the API port: who calls, whether the role allows the RPC,
//! and the audit trail of every call that changes the pool.
//!
//! For each request, before any handler runs:
//! 1. the RPC's row in [`nodeos_auth::rpc::TABLE`]; no row: denied;
//! 2. the caller, from the client certificate the TLS handshake verified
//!    (plaintext on loopback: the local operator, admin); a revoked or
//!    expired credential is refused (`UNAUTHENTICATED`);
//! 3. a node of the pool may call the peer protocol, and public RPCs only as
//!    a hand-over (`x-nodeos-proxied`) of a call the first node admitted;
//! 4. the role allows the RPC, or `PERMISSION_DENIED` naming both;
//! 5. the caller goes into the request's extensions ([`Caller`]) for the
//!    handlers, and calls that change the pool are recorded in the audit
//!    trail (allowed or denied) before the answer leaves.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use nodeos_auth::identity::{Identity, Role, Subject, identity};
use nodeos_auth::rpc::{self, Effect};
use nodeos_meta::{Command, Consistency, MetaHandle, Op, Txn};
use nodeos_types::NodeId;
use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// Where the audit trail lives in meta.
pub const AUDIT_PREFIX: &str = "audit/";
/// Where a revoked credential's serial is written.
pub const REVOKED_PREFIX: &str = "auth/revoked/";
/// Entries the pool keeps; the leader trims the oldest beyond this.
pub const AUDIT_KEEP: usize = 10_000;
/// Calls whose request is a stream: their target is not read.
const STREAMED_IN: &[&str] = &["ImageService/Upload", "VolumeService/Import", "VmService/Console"];
/// Largest unary request read to find its target.
const MAX_TARGET_BODY: usize = 4 * 1024 * 1024 + 64 * 1024;

/// How a caller reached this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A client certificate of the pool's CA.
    MutualTls,
    /// Plaintext on loopback (development): whoever can reach 127.0.0.1.
    Loopback,
}

/// The caller of a request, as the guard admitted it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub via: Via,
    /// A node handing over a call another node admitted.
    pub handed_over: bool,
}

impl Caller {
    pub fn role(&self) -> Role {
        self.identity.subject.role
    }
}

/// The caller the guard put on `req`. Every request served on the API port
/// has one; a handler called otherwise (tests) sees none.
pub fn caller<T>(req: &tonic::Request<T>) -> Option<&Caller> {
    req.extensions().get::<Caller>()
}

/// One audit entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub time_ms: i64,
    pub subject: String,
    pub role: String,
    pub tenant: String,
    pub rpc: String,
    pub target: String,
    pub outcome: String,
    pub node_id: String,
    pub serial: String,
}

struct Inner {
    meta: MetaHandle,
    me: NodeId,
    plaintext: bool,
    seq: AtomicU64,
}

/// The guard's state; one per node.
#[derive(Clone)]
pub struct Guard {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard").field("plaintext", &self.inner.plaintext).finish_non_exhaustive()
    }
}

impl Guard {
    /// `plaintext`: the port speaks plain TCP on loopback, every caller is the
    /// local operator.
    pub fn new(meta: MetaHandle, plaintext: bool) -> Self {
        let me = meta.node_id();
        Guard { inner: Arc::new(Inner { meta, me, plaintext, seq: AtomicU64::new(0) }) }
    }

    /// Who is calling, from what the connection carries; an error status when
    /// no admissible credential.
    fn admit(&self, req: &http::Request<Body>) -> Result<Caller, Status> {
        if self.inner.plaintext {
            let identity = Identity {
                subject: Subject { name: "loopback".into(), role: Role::Admin, tenant: None },
                serial: String::new(),
                not_after_s: i64::MAX,
            };
            let handed_over = req.headers().contains_key(crate::proxy::PROXIED);
            return Ok(Caller { identity, via: Via::Loopback, handed_over });
        }
        let certs = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.peer_certs())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "no client certificate: call with a credential of the pool (nodeos auth)",
                )
            })?;
        let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let identity = identity(leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
        if identity.not_after_s < now_ms() / 1000 {
            return Err(Status::unauthenticated(format!("the credential of {identity} has expired")));
        }
        if identity.subject.role != Role::Node && self.revoked(&identity.serial) {
            return Err(Status::unauthenticated(format!(
                "the credential of {identity} (serial {}) was revoked",
                identity.serial
            )));
        }
        let handed_over =
            identity.subject.role == Role::Node && req.headers().contains_key(crate::proxy::PROXIED);
        Ok(Caller { identity, via: Via::MutualTls, handed_over })
    }

    fn revoked(&self, serial: &str) -> bool {
        let key = format!("{REVOKED_PREFIX}{serial}");
        // This node's copy: a revocation is refused here once this node applied it.
        match self.inner.meta.state_machine().get(&key) {
            Ok(v) => v.is_some(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the revocation list; refusing the call");
                true
            }
        }
    }

    /// Records one audit entry; logged, not fatal, when meta refuses it.
    pub async fn record(&self, caller: Option<&Caller>, path: &str, target: String, outcome: String) {
        let (subject, role, tenant, serial) = match caller {
            Some(c) => (
                c.identity.subject.name.clone(),
                c.role().to_string(),
                c.identity.subject.tenant.clone().unwrap_or_default(),
                c.identity.serial.clone(),
            ),
            None => ("(unauthenticated)".into(), String::new(), String::new(), String::new()),
        };
        let rec = AuditRecord {
            time_ms: now_ms(),
            subject,
            role,
            tenant,
            rpc: rpc::short(path).to_owned(),
            target,
            outcome,
            node_id: self.inner.me.to_string(),
            serial,
        };
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let key = format!("{AUDIT_PREFIX}{:013}-{}-{seq:08}", rec.time_ms.max(0), self.inner.me);
        let value = match serde_json::to_vec(&rec) {
            Ok(v) => v,
            Err(e) => return tracing::error!(error = %e, "cannot encode an audit entry"),
        };
        if let Err(e) = self.inner.meta.write(Command::put(key, value)).await {
            tracing::error!(rpc = %rec.rpc, subject = %rec.subject, outcome = %rec.outcome, error = %e, "audit entry not recorded");
        }
    }

    /// Keeps the last [`AUDIT_KEEP`] entries; run by the leader now and then.
    pub async fn trim(&self) -> Result<usize, nodeos_meta::MetaError> {
        let (all, _) = self.inner.meta.range(AUDIT_PREFIX, usize::MAX, Consistency::Local).await?;
        let excess = all.len().saturating_sub(AUDIT_KEEP);
        for chunk in all[..excess].chunks(nodeos_meta::command::MAX_TXN_OPS) {
            let keys = chunk.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>();
            let txn =
                Txn { success: keys.into_iter().map(|key| Op::Delete { key }).collect(), ..Txn::default() };
            self.inner.meta.write(Command::Txn(txn)).await?;
        }
        Ok(excess)
    }
}

/// Now, in unix milliseconds, as the audit trail and credentials record it.
pub(crate) fn now_ms() -> i64 {
    i64::try_from(nodeos_types::unix_millis()).unwrap_or(i64::MAX)
}

/// Trims the audit trail every few minutes while this node leads.
pub async fn trim_while_leading(guard: Guard) {
    loop {
        tokio::time::sleep(Duration::from_secs(120)).await;
        if guard.inner.meta.is_leader()
            && let Err(e) = guard.trim().await
        {
            tracing::warn!(error = %e, "cannot trim the audit trail; retrying later");
        }
    }
}

/// The tower layer putting a [`Guard`] in front of every service.
#[derive(Debug, Clone)]
pub struct GuardLayer(pub Guard);

impl<S> tower::Layer<S> for GuardLayer {
    type Service = GuardService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GuardService { guard: self.0.clone(), inner }
    }
}

#[derive(Debug, Clone)]
pub struct GuardService<S> {
    guard: Guard,
    inner: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for GuardService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The clone that was made ready is the one to call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let guard = self.guard.clone();
        Box::pin(async move {
            let path = req.uri().path().to_owned();
            let Some((needed, effect)) = rpc::lookup(&path) else {
                let why = format!(
                    "{} is not an RPC of this pool's API, or has no role declared: denied",
                    rpc::short(&path)
                );
                return Ok(Status::permission_denied(why).into_http());
            };
            let caller = match guard.admit(&req) {
                Ok(c) => c,
                Err(s) => {
                    if effect == Effect::Changes {
                        guard.record(None, &path, String::new(), outcome_of(&s)).await;
                    }
                    return Ok(s.into_http());
                }
            };
            let role = caller.role();
            let allowed = match (role, needed) {
                // A node speaks the peer protocol, and hands over calls another node admitted.
                (Role::Node, Role::Node) => true,
                (Role::Node, _) => caller.handed_over,
                (_, _) => caller.via == Via::Loopback || role.allows(needed),
            };
            // A hand-over was audited where it arrived.
            let audited = effect == Effect::Changes && !caller.handed_over;
            let mut target = String::new();
            if audited && !STREAMED_IN.contains(&rpc::short(&path)) {
                let (parts, body) = req.into_parts();
                let bytes = match http_body_util::Limited::new(body, MAX_TARGET_BODY).collect().await {
                    Ok(c) => c.to_bytes(),
                    Err(e) => {
                        return Ok(
                            Status::invalid_argument(format!("cannot read the request: {e}")).into_http()
                        );
                    }
                };
                target = target_of(&bytes);
                req = http::Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)));
            }
            if !allowed {
                let s = if role == Role::Node {
                    Status::permission_denied(format!(
                        "node {} may call {} only handing over an operator's call",
                        caller.identity.subject.name,
                        rpc::short(&path)
                    ))
                } else {
                    Status::permission_denied(format!(
                        "{} may not call {}: it needs the {needed} role",
                        caller.identity,
                        rpc::short(&path)
                    ))
                };
                if audited {
                    guard.record(Some(&caller), &path, target, outcome_of(&s)).await;
                }
                return Ok(s.into_http());
            }
            req.extensions_mut().insert(caller.clone());
            let resp = inner.call(req).await?;
            if audited {
                let outcome = match Status::from_header_map(resp.headers()) {
                    Some(s) if s.code() != tonic::Code::Ok => outcome_of(&s),
                    _ => "ok".to_owned(),
                };
                guard.record(Some(&caller), &path, target, outcome).await;
            }
            Ok(resp)
        })
    }
}

/// `PERMISSION_DENIED: why`: the gRPC code's canonical name and the message.
fn outcome_of(s: &Status) -> String {
    let mut code = String::new();
    for (i, ch) in format!("{:?}", s.code()).chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            code.push('_');
        }
        code.push(ch.to_ascii_uppercase());
    }
    format!("{code}: {}", s.message())
}

/// What a unary request names: its lowest-numbered non-empty text field
/// (a name or an id in every request of this API), from the gRPC frame.
fn target_of(frame: &[u8]) -> String {
    // 1 byte compressed flag, 4 bytes length, the message.
    let Some(msg) = frame.get(5..) else { return String::new() };
    let mut best: Option<(u64, &str)> = None;
    let mut at = 0usize;
    while at < msg.len() {
        let Some((key, n)) = varint(&msg[at..]) else { break };
        at += n;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => match varint(&msg[at..]) {
                Some((_, n)) => at += n,
                None => break,
            },
            1 => at += 8,
            5 => at += 4,
            2 => {
                let Some((len, n)) = varint(&msg[at..]) else { break };
                at += n;
                let Some(end) = usize::try_from(len).ok().and_then(|l| at.checked_add(l)) else { break };
                let Some(bytes) = msg.get(at..end) else { break };
                at = end;
                if let Ok(s) = std::str::from_utf8(bytes)
                    && !s.is_empty()
                    && s.chars().all(|c| !c.is_control())
                    && best.is_none_or(|(f, _)| field < f)
                {
                    best = Some((field, s));
                }
            }
            _ => break,
        }
    }
    best.map(|(_, s)| s.chars().take(128).collect()).unwrap_or_default()
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().take(10).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_the_first_text_field_of_the_request() {
        use prost::Message;
        let m = nodeos_proto::v1::VmRef { vm: "web-1".into() };
        let mut frame = vec![0u8, 0, 0, 0, 0];
        m.encode(&mut frame).expect("encode");
        assert_eq!(target_of(&frame), "web-1");
        assert_eq!(target_of(&[0, 0, 0, 0, 3, 0xff, 0xff, 0xff]), "");
        assert_eq!(target_of(&[]), "");
    }
}
