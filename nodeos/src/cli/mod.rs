//! The command line: every command is a client of a node's gRPC API.
//!
//! # Layout
//! - `mod.rs`: global flags, connecting, the one-line error report.
//! - `output.rs`: table and JSON rendering.
//! - `pool.rs`, `node.rs`, `meta.rs`, `vm.rs`, `volume.rs`, `image.rs`, `pxe.rs`: one file per
//!   command group.
//! - `network.rs`: `network`, `port`, `security-group` and `switch`, the groups of
//!   the network service.

pub mod auth;
pub mod config;
pub mod image;
pub mod meta;
pub mod network;
pub mod node;
pub mod output;
pub mod pool;
pub mod pxe;
pub mod upgrade;
pub mod vm;
pub mod volume;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tonic::transport::{Channel, Endpoint};

/// Where the demo's first node listens.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7700";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Node API to talk to (host:port; several comma-separated, tried in turn).
    /// Default: the context's endpoints, else 127.0.0.1:7700.
    #[arg(long, global = true, env = "NODEOS_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Context of the config file to use for this command (default: its current context).
    #[arg(long, global = true, env = "NODEOS_CONTEXT")]
    pub context: Option<String>,
    /// Config file with contexts (default: $NODEOS_CONFIG, else ~/.config/nodeos/config.json).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Seconds to wait for an answer.
    #[arg(long = "request-timeout", global = true, default_value_t = 60)]
    pub request_timeout: u64,
}

/// A connected client context.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub channel: Channel,
    pub output: Format,
}

/// Errors a command reports in one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "cannot reach nodeos at {endpoint}: {why}; is a node running there? (set --endpoint or NODEOS_ENDPOINT)"
    )]
    Unreachable { endpoint: String, why: String },
    #[error("{0}")]
    Status(String),
    #[error("{0}")]
    Output(String),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        let code = match s.code() {
            tonic::Code::InvalidArgument => "invalid argument",
            tonic::Code::NotFound => "not found",
            tonic::Code::AlreadyExists => "already exists",
            tonic::Code::ResourceExhausted => "too large",
            tonic::Code::Aborted => "conflict",
            tonic::Code::Unavailable => "unavailable",
            tonic::Code::FailedPrecondition => "refused",
            tonic::Code::OutOfRange => "out of range",
            tonic::Code::DeadlineExceeded => "timed out",
            tonic::Code::PermissionDenied => "denied",
            tonic::Code::Unauthenticated => "not authenticated",
            _ => "error",
        };
        CliError::Status(format!("{code}: {}", s.message()))
    }
}

type CmdFuture = Pin<Box<dyn Future<Output = Result<(), CliError>>>>;

/// Connects to the endpoint and runs one command, printing a one-line error on failure.
pub fn run(g: &Global, cmd: impl FnOnce(Ctx) -> CmdFuture) -> ExitCode {
    run_local(|| async {
        let target = Target::resolve(g)?;
        let channel = target.connect(Duration::from_secs(g.request_timeout)).await?;
        cmd(Ctx { channel, output: g.output }).await.map_err(|e| target.explain(e))
    })
}

/// Runs a command that makes its own connections (or none), with the same
/// one-line error report as [`run`].
pub fn run_local<F: Future<Output = Result<(), CliError>>>(cmd: impl FnOnce() -> F) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(cmd()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                CliError::Unreachable { .. } => ExitCode::from(3),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// `--endpoint a:1,b:2`: the endpoints in order.
pub fn endpoint_list(flag: &str) -> Vec<String> {
    flag.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Where a command goes and how: the endpoints in order, and the TLS client
/// of the context (none: plaintext, for a pool on loopback).
pub struct Target {
    pub endpoints: Vec<String>,
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Target {
    pub fn resolve(g: &Global) -> Result<Target, CliError> {
        let path = config::path(g.config.as_deref())?;
        let picked = config::Config::load(&path)?.pick(g.context.as_deref())?;
        let given: Option<Vec<String>> = g
            .endpoint
            .as_ref()
            .map(|e| e.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect());
        Ok(match picked {
            None => {
                Target { endpoints: given.unwrap_or_else(|| vec![DEFAULT_ENDPOINT.to_owned()]), tls: None }
            }
            Some((name, ctx)) => {
                let cred = nodeos_auth::Credential { cert_pem: ctx.cert_pem, key_pem: ctx.key_pem };
                let tls = nodeos_auth::tls::client_config(&cred, &ctx.ca_pem)
                    .map_err(|e| CliError::Status(format!("context {name}: {e}")))?;
                let endpoints = given.unwrap_or(ctx.endpoints);
                Target { endpoints, tls: Some(tls) }
            }
        })
    }

    /// The first endpoint that answers, in order.
    pub async fn connect(&self, timeout: Duration) -> Result<Channel, CliError> {
        let mut last = None;
        for e in &self.endpoints {
            match connect(e, timeout, self.tls.clone()).await {
                Ok(c) => return Ok(c),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| CliError::Unreachable {
            endpoint: "(none)".into(),
            why: "no endpoint given".into(),
        }))
    }

    /// A hint added to errors that say the two ends do not speak the same protocol.
    fn explain(&self, e: CliError) -> CliError {
        match e {
            CliError::Status(m)
                if self.tls.is_none()
                    && (m.contains("h2 protocol error")
                        || m.contains("connection reset")
                        || m.contains("broken pipe")) =>
            {
                CliError::Status(format!(
                    "{m} (the node likely speaks mutual TLS: get a credential with `nodeos auth bootstrap --pool-key-file FILE`, or pick a context with --context)"
                ))
            }
            other => other,
        }
    }
}

async fn connect(
    endpoint: &str,
    timeout: Duration,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> Result<Channel, CliError> {
    let unreachable = |why: String| CliError::Unreachable { endpoint: endpoint.to_owned(), why };
    let url = if endpoint.contains("://") { endpoint.to_owned() } else { format!("http://{endpoint}") };
    let ep = Endpoint::from_shared(url)
        .map_err(|e| unreachable(format!("not a valid address ({e})")))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(timeout);
    let r = match tls {
        Some(cfg) => ep.connect_with_connector(nodeos_auth::tls::Connector::Fixed(cfg)).await,
        None => ep.connect().await,
    };
    r.map_err(|e| {
        let mut why = e.to_string();
        let mut cur = std::error::Error::source(&e);
        while let Some(c) = cur {
            why = c.to_string();
            cur = c.source();
        }
        unreachable(why)
    })
}
