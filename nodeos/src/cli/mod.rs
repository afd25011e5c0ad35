//! The command line: every command is a client of a node's gRPC API.
//!
//! # Layout
//! - `mod.rs`: global flags, connecting, the one-line error report.
//! - `output.rs`: table and JSON rendering.
//! - `pool.rs`, `node.rs`, `meta.rs`, `vm.rs`, `volume.rs`, `image.rs`, `pxe.rs`: one file per
//!   command group.
//! - `network.rs`: `network`, `port`, `security-group` and `switch`, the groups of
//!   the network service.

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
    /// Node API to talk to (host:port).
    #[arg(long, global = true, env = "NODEOS_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
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
            _ => "error",
        };
        CliError::Status(format!("{code}: {}", s.message()))
    }
}

type CmdFuture = Pin<Box<dyn Future<Output = Result<(), CliError>>>>;

/// Connects to the endpoint and runs one command, printing a one-line error on failure.
pub fn run(g: &Global, cmd: impl FnOnce(Ctx) -> CmdFuture) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let channel = connect(&g.endpoint, Duration::from_secs(g.request_timeout)).await?;
        cmd(Ctx { channel, output: g.output }).await
    });
    match result {
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

async fn connect(endpoint: &str, timeout: Duration) -> Result<Channel, CliError> {
    let unreachable = |why: String| CliError::Unreachable { endpoint: endpoint.to_owned(), why };
    let url = if endpoint.contains("://") { endpoint.to_owned() } else { format!("http://{endpoint}") };
    let ep = Endpoint::from_shared(url)
        .map_err(|e| unreachable(format!("not a valid address ({e})")))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(timeout);
    ep.connect().await.map_err(|e| {
        let mut why = e.to_string();
        let mut cur = std::error::Error::source(&e);
        while let Some(c) = cur {
            why = c.to_string();
            cur = c.source();
        }
        unreachable(why)
    })
}
