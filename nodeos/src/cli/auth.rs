//! `nodeos auth ...` (credentials) and `nodeos audit list` (the audit trail).
//!
//! `auth bootstrap` needs no credential, only the pool key file: the pool's
//! CA is derived from that key, so its holder signs itself a short-lived
//! admin certificate here, and with it asks a node to issue (and record) the
//! admin credential it keeps in the config file.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use nodeos_auth::{PoolCa, Role, Subject};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::audit_service_client::AuditServiceClient;
use nodeos_proto::v1::auth_service_client::AuthServiceClient;
use nodeos_types::auth::PoolKey;

use super::config::{self, Config, Context};
use super::output;
use super::{CliError, Ctx, Format, Global, Target};

/// Lifetime of the certificate `auth bootstrap` signs itself to ask for the real one.
const BOOTSTRAP_TTL: Duration = Duration::from_secs(120);

#[derive(Debug, Subcommand)]
pub enum AuthCmd {
    /// Make the first admin credential, with the pool key file; saved as a
    /// context of the config file (and made current).
    Bootstrap {
        /// The pool key file the nodes were started with.
        #[arg(long, env = "NODEOS_POOL_KEY_FILE")]
        pool_key_file: PathBuf,
        /// Name in the credential.
        #[arg(long, default_value = "admin")]
        name: String,
        /// Context name in the config file (default: the name).
        #[arg(long = "save-as")]
        save_as: Option<String>,
        /// Lifetime, e.g. 90d, 12h (at most 5 years).
        #[arg(long, default_value = "365d", value_parser = parse_ttl)]
        ttl: Duration,
        /// Sign the credential here, without asking a node (for a pool not up
        /// yet). The pool does not record it: `auth list` does not show it, but
        /// `auth revoke SERIAL` still revokes it. Endpoints: --endpoint.
        #[arg(long)]
        offline: bool,
    },
    /// Issue a credential: a context file to hand its holder (`nodeos config import FILE`).
    Issue {
        #[arg(long)]
        name: String,
        /// admin, operator or reader.
        #[arg(long)]
        role: Role,
        /// Limit it to one tenant's resources.
        #[arg(long)]
        tenant: Option<String>,
        /// Lifetime, e.g. 30d, 12h (at most 5 years).
        #[arg(long, default_value = "30d", value_parser = parse_ttl)]
        ttl: Duration,
        /// A certificate request made by the holder (`openssl req -new ...`): the key then never
        /// leaves them, and the file written holds no key.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// Where to write the credential file (mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Every credential the pool issued.
    List,
    /// Revoke credentials: by serial, or every credential of a name.
    Revoke { credential: String },
    /// Who this CLI is to the pool.
    Whoami,
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Calls that changed the pool or tried to, oldest first.
    List {
        /// Only the last DURATION (e.g. 10m, 2h, 7d).
        #[arg(long, value_parser = parse_ttl)]
        since: Option<Duration>,
        /// At most this many, the newest.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

/// `90d`, `12h`, `30m`, `45s`, or seconds.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 30d, 12h, 45m or 90s"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "y" => 365 * 86400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h, d or y")),
    };
    n.checked_mul(mult).map(Duration::from_secs).ok_or_else(|| format!("{s:?} is too long"))
}

fn rows(creds: &[pb::Credential]) -> Vec<Vec<String>> {
    creds
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.role.clone(),
                if c.tenant.is_empty() { "-".into() } else { c.tenant.clone() },
                c.serial.clone(),
                expires(c.not_after_ms),
                if c.revoked { format!("revoked by {}", c.revoked_by) } else { "valid".into() },
            ]
        })
        .collect()
}

fn expires(ms: i64) -> String {
    let now = i64::try_from(nodeos_types::unix_millis()).unwrap_or(i64::MAX);
    let d = (ms - now) / 1000;
    if d <= 0 {
        "expired".into()
    } else if d >= 2 * 86400 {
        format!("in {} d", d / 86400)
    } else {
        format!("in {} h", d / 3600)
    }
}

const HEADERS: [&str; 6] = ["NAME", "ROLE", "TENANT", "SERIAL", "EXPIRES", "STATE"];

pub async fn run(ctx: Ctx, cmd: AuthCmd) -> Result<(), CliError> {
    let mut client = AuthServiceClient::new(ctx.channel.clone());
    match cmd {
        AuthCmd::Bootstrap { .. } => Err(CliError::Status("bootstrap runs without a connection".into())),
        AuthCmd::Issue { name, role, tenant, ttl, csr, out } => {
            let (csr_pem, key_pem) = match csr {
                Some(p) => (
                    std::fs::read_to_string(&p)
                        .map_err(|e| CliError::Status(format!("cannot read {}: {e}", p.display())))?,
                    String::new(),
                ),
                None => nodeos_auth::ca::new_request(&name).map_err(|e| CliError::Status(e.to_string()))?,
            };
            let r = client
                .issue(pb::IssueRequest {
                    name,
                    role: role.to_string(),
                    tenant: tenant.unwrap_or_default(),
                    ttl_seconds: ttl.as_secs(),
                    csr_pem,
                })
                .await?
                .into_inner();
            let endpoints = endpoints_of(&ctx).await;
            let file = Context { endpoints, ca_pem: r.ca_pem, cert_pem: r.cert_pem, key_pem };
            write_private(&out, &file)?;
            let cred = r.credential.unwrap_or_default();
            output::print(ctx.output, &cred, &HEADERS, rows(std::slice::from_ref(&cred)))?;
            if ctx.output == Format::Table {
                println!(
                    "credential written to {} (hand it over privately; `nodeos config import` it)",
                    out.display()
                );
            }
            Ok(())
        }
        AuthCmd::List => {
            let r = client.list(pb::ListCredentialsRequest {}).await?.into_inner();
            output::print(ctx.output, &r.credentials, &HEADERS, rows(&r.credentials))
        }
        AuthCmd::Revoke { credential } => {
            let r = client.revoke(pb::RevokeRequest { credential }).await?.into_inner();
            output::print(ctx.output, &r.revoked, &HEADERS, rows(&r.revoked))
        }
        AuthCmd::Whoami => {
            let r = client.who_am_i(pb::WhoAmIRequest {}).await?.into_inner();
            let row = vec![
                r.name.clone(),
                r.role.clone(),
                if r.tenant.is_empty() { "-".into() } else { r.tenant.clone() },
                r.transport.clone(),
                r.node_id.clone(),
            ];
            output::print(ctx.output, &r, &["NAME", "ROLE", "TENANT", "TRANSPORT", "NODE"], vec![row])
        }
    }
}

/// The API addresses of the pool's members, for a credential file; empty when unknown.
async fn endpoints_of(ctx: &Ctx) -> Vec<String> {
    use nodeos_proto::v1::pool_service_client::PoolServiceClient;
    match PoolServiceClient::new(ctx.channel.clone()).status(pb::StatusRequest {}).await {
        Ok(s) => s.into_inner().members.into_iter().map(|m| m.address).filter(|a| !a.is_empty()).collect(),
        Err(_) => Vec::new(),
    }
}

fn write_private(path: &std::path::Path, ctx: &Context) -> Result<(), CliError> {
    let text = serde_json::to_vec_pretty(ctx).map_err(|e| CliError::Output(e.to_string()))?;
    config::write_private(path, &text, false)
}

/// `nodeos auth bootstrap`: see the module docs.
pub async fn bootstrap(g: &Global, cmd: AuthCmd) -> Result<(), CliError> {
    let AuthCmd::Bootstrap { pool_key_file, name, save_as, ttl, offline } = cmd else {
        return Err(CliError::Status("not a bootstrap".into()));
    };
    let key = PoolKey::from_file(&pool_key_file).map_err(|e| CliError::Status(format!("{e:#}")))?;
    Subject::check_label("name", &name).map_err(CliError::Status)?;
    let ca = PoolCa::derive(&key, nodeos_auth::ca::FIRST_GENERATION)
        .map_err(|e| CliError::Status(e.to_string()))?;
    let endpoints =
        g.endpoint.as_deref().map_or_else(|| vec![super::DEFAULT_ENDPOINT.to_owned()], super::endpoint_list);
    let context = save_as.unwrap_or_else(|| name.clone());
    if offline {
        let subject = Subject { name, role: Role::Admin, tenant: None };
        let cred = ca.issue_client(&subject, ttl).map_err(|e| CliError::Status(e.to_string()))?;
        let id = nodeos_auth::tls::certs("credential", &cred.cert_pem)
            .ok()
            .and_then(|d| d.first().and_then(|c| nodeos_auth::identity::identity(c).ok()))
            .ok_or_else(|| CliError::Status("the credential made cannot be read back".into()))?;
        let ctx = Context {
            endpoints,
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: cred.cert_pem,
            key_pem: cred.key_pem,
        };
        save_context(g, &context, ctx)?;
        let shown = pb::Credential {
            name: id.subject.name,
            role: id.subject.role.to_string(),
            serial: id.serial,
            not_after_ms: id.not_after_s.saturating_mul(1000),
            issued_by: "pool key (offline)".into(),
            ..Default::default()
        };
        return output::print(g.output, &shown, &HEADERS, rows(std::slice::from_ref(&shown)));
    }
    let temp = ca
        .issue_client(
            &Subject { name: format!("{name}-bootstrap"), role: Role::Admin, tenant: None },
            BOOTSTRAP_TTL,
        )
        .map_err(|e| CliError::Status(e.to_string()))?;
    let tls =
        nodeos_auth::tls::client_config(&temp, ca.cert_pem()).map_err(|e| CliError::Status(e.to_string()))?;
    let target = Target { endpoints: endpoints.clone(), tls: Some(tls) };
    let channel = target.connect(Duration::from_secs(g.request_timeout)).await?;
    let (csr_pem, key_pem) =
        nodeos_auth::ca::new_request(&name).map_err(|e| CliError::Status(e.to_string()))?;
    let r = AuthServiceClient::new(channel.clone())
        .issue(pb::IssueRequest {
            name: name.clone(),
            role: Role::Admin.to_string(),
            tenant: String::new(),
            ttl_seconds: ttl.as_secs(),
            csr_pem,
        })
        .await?
        .into_inner();
    let ctx = Ctx { channel, output: g.output };
    let mut all = endpoints;
    for e in endpoints_of(&ctx).await {
        if !all.contains(&e) {
            all.push(e);
        }
    }
    save_context(g, &context, Context { endpoints: all, ca_pem: r.ca_pem, cert_pem: r.cert_pem, key_pem })?;
    let cred = r.credential.unwrap_or_default();
    output::print(g.output, &cred, &HEADERS, rows(std::slice::from_ref(&cred)))
}

/// Saves `ctx` as context `name` of the config file and makes it current.
fn save_context(g: &Global, name: &str, ctx: Context) -> Result<(), CliError> {
    let path = config::path(g.config.as_deref())?;
    let mut cfg = Config::load(&path)?;
    cfg.contexts.insert(name.to_owned(), ctx);
    cfg.current_context = Some(name.to_owned());
    cfg.save(&path)?;
    if g.output == Format::Table {
        eprintln!("saved as context {name} in {} (now current)", path.display());
    }
    Ok(())
}

pub async fn run_audit(ctx: Ctx, cmd: AuditCmd) -> Result<(), CliError> {
    let AuditCmd::List { since, limit } = cmd;
    let since_ms = since.map_or(0, |d| {
        i64::try_from(
            nodeos_types::unix_millis().saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
        .unwrap_or(0)
    });
    let r = AuditServiceClient::new(ctx.channel.clone())
        .list(pb::ListAuditRequest { since_ms, limit })
        .await?
        .into_inner();
    let rows = r
        .entries
        .iter()
        .map(|e| {
            vec![
                output::time_ms(u64::try_from(e.time_ms).unwrap_or(0)),
                e.subject.clone(),
                e.role.clone(),
                e.rpc.clone(),
                e.target.clone(),
                e.outcome.clone(),
            ]
        })
        .collect();
    output::print(ctx.output, &r.entries, &["WHEN", "WHO", "ROLE", "CALL", "TARGET", "OUTCOME"], rows)
}
