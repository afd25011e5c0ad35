//! `AuthService` (credentials) and `AuditService` (the audit trail).
//!
//! Credentials are certificates the pool's CA signs; the pool records each
//! one it issues at `auth/credentials/<serial>` and each revoked serial at
//! `auth/revoked/<serial>` (what the guard checks on every call).

use std::sync::Arc;
use std::time::Duration;

use nodeos_auth::{PoolCa, Role, Subject};
use nodeos_meta::{Command, Consistency, MetaHandle, Op, Txn};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::audit_service_server::AuditService;
use nodeos_proto::v1::auth_service_server::AuthService;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::error::meta_status;
use crate::guard::{AUDIT_PREFIX, AuditRecord, Caller, REVOKED_PREFIX, Via, caller, now_ms};

/// Where the record of each issued credential lives.
pub const CREDENTIALS_PREFIX: &str = "auth/credentials/";
/// Entries `audit list` returns when not told.
const DEFAULT_AUDIT_LIMIT: usize = 1000;

/// An issued credential as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub subject: Subject,
    pub serial: String,
    pub issued_ms: i64,
    pub not_after_ms: i64,
    pub issued_by: String,
    #[serde(default)]
    pub revoked: Option<(i64, String)>,
}

impl CredentialRecord {
    fn pb(&self) -> pb::Credential {
        let (revoked_ms, revoked_by) = self.revoked.clone().unwrap_or_default();
        pb::Credential {
            name: self.subject.name.clone(),
            role: self.subject.role.to_string(),
            tenant: self.subject.tenant.clone().unwrap_or_default(),
            serial: self.serial.clone(),
            issued_ms: self.issued_ms,
            not_after_ms: self.not_after_ms,
            issued_by: self.issued_by.clone(),
            revoked: self.revoked.is_some(),
            revoked_ms,
            revoked_by,
        }
    }
}

/// The node's signing CA and the CA certificates clients should trust.
#[derive(Debug, Clone)]
pub struct Signer {
    pub ca: Arc<PoolCa>,
    pub trusted_pem: String,
}

#[derive(Debug, Clone)]
pub struct AuthApi {
    meta: MetaHandle,
    signer: Option<Signer>,
}

impl AuthApi {
    /// `signer`: `None` on a plaintext (loopback) node, which issues nothing.
    pub fn new(meta: MetaHandle, signer: Option<Signer>) -> Self {
        AuthApi { meta, signer }
    }

    async fn records(&self) -> Result<Vec<(CredentialRecord, u64)>, Status> {
        let (kvs, _) = self
            .meta
            .range(CREDENTIALS_PREFIX, usize::MAX, Consistency::Linearizable)
            .await
            .map_err(meta_status)?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok().map(|r| (r, kv.mod_revision)))
            .collect())
    }
}

fn who(c: Option<&Caller>) -> String {
    c.map_or_else(|| "(unknown)".to_owned(), |c| c.identity.to_string())
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let c = caller(&req).ok_or_else(|| Status::unauthenticated("no caller on this request"))?;
        let s = &c.identity.subject;
        Ok(Response::new(pb::WhoAmIResponse {
            name: s.name.clone(),
            role: s.role.to_string(),
            tenant: s.tenant.clone().unwrap_or_default(),
            serial: c.identity.serial.clone(),
            not_after_ms: c.identity.not_after_s.saturating_mul(1000),
            node_id: self.meta.node_id().to_string(),
            transport: match c.via {
                Via::MutualTls => "mutual TLS".into(),
                Via::Loopback => "plaintext loopback".into(),
            },
        }))
    }

    async fn issue(&self, req: Request<pb::IssueRequest>) -> Result<Response<pb::IssueResponse>, Status> {
        let by = who(caller(&req));
        let r = req.into_inner();
        let signer = self.signer.as_ref().ok_or_else(|| {
            Status::failed_precondition("this node serves plaintext on loopback and has no CA to sign with")
        })?;
        Subject::check_label("name", &r.name).map_err(Status::invalid_argument)?;
        let role: Role = r.role.parse().map_err(Status::invalid_argument)?;
        if matches!(role, Role::Node | Role::Worker) {
            return Err(Status::invalid_argument(
                "node and worker credentials are made by the nodes themselves",
            ));
        }
        let tenant = (!r.tenant.is_empty()).then_some(r.tenant);
        if let Some(t) = &tenant {
            Subject::check_label("tenant", t).map_err(Status::invalid_argument)?;
        }
        let subject = Subject { name: r.name, role, tenant };
        let ttl = Duration::from_secs(r.ttl_seconds);
        let cert_pem = signer
            .ca
            .sign_request(&r.csr_pem, &subject, ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let der = nodeos_auth::tls::certs("issued certificate", &cert_pem)
            .map_err(|e| Status::internal(e.to_string()))?;
        let first = der.first().ok_or_else(|| Status::internal("no certificate made"))?;
        let id = nodeos_auth::identity::identity(first).map_err(|e| Status::internal(e.to_string()))?;
        let rec = CredentialRecord {
            subject,
            serial: id.serial.clone(),
            issued_ms: now_ms(),
            not_after_ms: id.not_after_s.saturating_mul(1000),
            issued_by: by,
            revoked: None,
        };
        let value = serde_json::to_vec(&rec).map_err(|e| Status::internal(e.to_string()))?;
        let key = format!("{CREDENTIALS_PREFIX}{}", rec.serial);
        if !self.meta.write(Command::put_if(key, value, 0)).await.map_err(meta_status)?.succeeded {
            return Err(Status::aborted("a credential with this serial exists; retry"));
        }
        Ok(Response::new(pb::IssueResponse {
            credential: Some(rec.pb()),
            cert_pem,
            ca_pem: signer.trusted_pem.clone(),
        }))
    }

    async fn list(
        &self,
        _req: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        let mut all: Vec<CredentialRecord> = self.records().await?.into_iter().map(|(r, _)| r).collect();
        all.sort_by(|a, b| (a.issued_ms, &a.serial).cmp(&(b.issued_ms, &b.serial)));
        Ok(Response::new(pb::ListCredentialsResponse {
            credentials: all.iter().map(CredentialRecord::pb).collect(),
        }))
    }

    async fn revoke(&self, req: Request<pb::RevokeRequest>) -> Result<Response<pb::RevokeResponse>, Status> {
        let by = who(caller(&req));
        let r = req.into_inner();
        let want = r.credential.trim().to_ascii_lowercase();
        if want.is_empty() {
            return Err(Status::invalid_argument("name a credential: its serial or its holder's name"));
        }
        let records = self.records().await?;
        let hits: Vec<_> = records
            .into_iter()
            .filter(|(rec, _)| rec.revoked.is_none())
            .filter(|(rec, _)| rec.serial == want || rec.subject.name.to_ascii_lowercase() == want)
            .collect();
        // A serial the pool never recorded (a bootstrap credential) is still revocable.
        let unknown_serial =
            hits.is_empty() && want.len() == 32 && want.bytes().all(|b| b.is_ascii_hexdigit());
        if hits.is_empty() && !unknown_serial {
            return Err(Status::not_found(format!(
                "no unrevoked credential with serial or name {:?}",
                r.credential
            )));
        }
        let at = now_ms();
        let mut txn = Txn::default();
        let mut revoked = Vec::new();
        for (mut rec, rev) in hits {
            rec.revoked = Some((at, by.clone()));
            let key = format!("{CREDENTIALS_PREFIX}{}", rec.serial);
            txn.compares.push(nodeos_meta::Compare::ModRevision { key: key.clone(), equals: rev });
            let value = serde_json::to_vec(&rec).map_err(|e| Status::internal(e.to_string()))?;
            txn.success.push(Op::Put { key, value });
            txn.success.push(Op::Put {
                key: format!("{REVOKED_PREFIX}{}", rec.serial),
                value: by.clone().into_bytes(),
            });
            revoked.push(rec.pb());
        }
        if unknown_serial {
            txn.success
                .push(Op::Put { key: format!("{REVOKED_PREFIX}{want}"), value: by.clone().into_bytes() });
            revoked.push(pb::Credential {
                serial: want,
                revoked: true,
                revoked_ms: at,
                revoked_by: by,
                ..Default::default()
            });
        }
        if txn.success.len() > nodeos_meta::command::MAX_TXN_OPS {
            return Err(Status::invalid_argument("too many credentials at once: revoke them by serial"));
        }
        if self.meta.write(Command::Txn(txn)).await.map_err(meta_status)?.succeeded {
            Ok(Response::new(pb::RevokeResponse { revoked }))
        } else {
            Err(Status::aborted("the credentials changed meanwhile; retry"))
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditApi {
    meta: MetaHandle,
}

impl AuditApi {
    pub fn new(meta: MetaHandle) -> Self {
        AuditApi { meta }
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let r = req.into_inner();
        let limit = if r.limit == 0 { DEFAULT_AUDIT_LIMIT } else { r.limit as usize };
        let (kvs, _) = self
            .meta
            .range(AUDIT_PREFIX, usize::MAX, Consistency::Linearizable)
            .await
            .map_err(meta_status)?;
        let entries: Vec<pb::AuditEntry> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<AuditRecord>(&kv.value).ok())
            .filter(|a| a.time_ms >= r.since_ms)
            .map(|a| pb::AuditEntry {
                time_ms: a.time_ms,
                subject: a.subject,
                role: a.role,
                tenant: a.tenant,
                rpc: a.rpc,
                target: a.target,
                outcome: a.outcome,
                node_id: a.node_id,
                serial: a.serial,
            })
            .collect();
        let skip = entries.len().saturating_sub(limit);
        Ok(Response::new(pb::ListAuditResponse { entries: entries.into_iter().skip(skip).collect() }))
    }
}
