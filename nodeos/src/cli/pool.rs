//! `nodeos pool status|watch`.

use clap::Subcommand;
use futures::StreamExt;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::pool_service_client::PoolServiceClient;
use serde::Serialize;

use super::node::{NODE_HEADERS, NodeView, node_rows};
use super::output;
use super::{CliError, Ctx, Format};

#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Pool id, leader, term and every member with role, health and address.
    Status,
    /// Stream pool events (membership and metadata changes).
    Watch {
        /// Only keys under this prefix (for example nodes/).
        #[arg(long, default_value = "")]
        prefix: String,
        /// Start at this revision (0: from now on).
        #[arg(long, default_value_t = 0)]
        from_revision: u64,
    },
}

#[derive(Debug, Serialize)]
pub struct StatusView {
    pub pool_id: String,
    pub pool_name: String,
    pub leader: String,
    pub term: u64,
    pub last_applied_index: u64,
    pub committed_index: u64,
    pub revision: u64,
    pub answered_by: String,
    pub members: Vec<NodeView>,
}

impl From<pb::PoolStatus> for StatusView {
    fn from(s: pb::PoolStatus) -> Self {
        StatusView {
            pool_id: s.pool_id,
            pool_name: s.pool_name,
            leader: s.leader_id,
            term: s.term,
            last_applied_index: s.last_applied_index,
            committed_index: s.committed_index,
            revision: s.revision,
            answered_by: s.answered_by,
            members: s.members.into_iter().map(NodeView::from).collect(),
        }
    }
}

pub async fn run(ctx: Ctx, cmd: PoolCmd) -> Result<(), CliError> {
    let mut client = PoolServiceClient::new(ctx.channel.clone());
    match cmd {
        PoolCmd::Status => {
            let s = StatusView::from(client.status(pb::StatusRequest {}).await?.into_inner());
            match ctx.output {
                Format::Json => output::print(ctx.output, &s, &[], vec![])?,
                Format::Table => {
                    let none = |v: &str| if v.is_empty() { "-".to_owned() } else { v.to_owned() };
                    println!("pool      {} ({})", none(&s.pool_name), none(&s.pool_id));
                    println!("leader    {}   term {}", none(&s.leader), s.term);
                    println!(
                        "log       applied {}   committed {}   revision {}",
                        s.last_applied_index, s.committed_index, s.revision
                    );
                    println!("answered  {}", s.answered_by);
                    println!();
                    print!("{}", output::table(NODE_HEADERS, &node_rows(&s.members)));
                }
            }
        }
        PoolCmd::Watch { prefix, from_revision } => {
            let mut stream =
                client.watch(pb::WatchRequest { start_revision: from_revision, prefix }).await?.into_inner();
            while let Some(ev) = stream.next().await {
                let ev = ev?;
                let kind = if ev.kind == pb::EventKind::Delete as i32 { "delete" } else { "put" };
                let value = String::from_utf8_lossy(&ev.value).into_owned();
                match ctx.output {
                    Format::Json => {
                        let j = serde_json::json!({"revision": ev.revision, "kind": kind, "key": ev.key, "value": value});
                        println!("{j}");
                    }
                    Format::Table => println!("{:>8}  {:<6}  {}  {}", ev.revision, kind, ev.key, value),
                }
            }
        }
    }
    Ok(())
}
