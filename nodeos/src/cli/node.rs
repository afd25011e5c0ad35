//! `nodeos node list|show|poweroff|reboot` (and the daemon's flags, see `crate::node`).

use clap::{Args, Subcommand};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::node_service_client::NodeServiceClient;
use nodeos_proto::v1::pool_service_client::PoolServiceClient;
use serde::Serialize;

use super::output;
use super::{CliError, Ctx, Format};
use crate::node::DaemonArgs;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeCmd {
    #[command(subcommand)]
    pub action: Option<NodeAction>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// Every node of the pool.
    List,
    /// One node by id.
    Show { id: String },
    /// Power off a node that runs the node image: its daemon stops cleanly first.
    Poweroff {
        /// Node id (default: the node at --endpoint).
        #[arg(long)]
        node: Option<String>,
    },
    /// Reboot a node that runs the node image: its daemon stops cleanly first.
    Reboot {
        /// Node id (default: the node at --endpoint).
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Debug, Serialize)]
pub struct PowerView {
    pub node_id: String,
    pub action: String,
}

async fn power(ctx: Ctx, node: Option<String>, action: pb::PowerAction) -> Result<(), CliError> {
    let r = NodeServiceClient::new(ctx.channel.clone())
        .power(pb::PowerRequest { node_id: node.unwrap_or_default(), action: action.into() })
        .await?
        .into_inner();
    let view = PowerView { node_id: r.node_id, action: trim_enum(action.as_str_name(), "POWER_ACTION_") };
    let doing = if action == pb::PowerAction::Reboot { "rebooting" } else { "powering off" };
    let rows = vec![vec![view.node_id.clone(), doing.to_owned()]];
    output::print(ctx.output, &view, &["NODE", "ACTION"], rows)
}

#[derive(Debug, Serialize)]
pub struct NodeView {
    pub id: String,
    pub role: String,
    pub health: String,
    pub address: String,
    pub hostname: String,
    pub version: String,
    pub matched_index: u64,
    pub joined_at_ms: u64,
    pub image_hash: String,
}

fn trim_enum(s: &str, prefix: &str) -> String {
    s.strip_prefix(prefix).unwrap_or(s).to_ascii_lowercase()
}

impl From<pb::Node> for NodeView {
    fn from(n: pb::Node) -> Self {
        let role = pb::NodeRole::try_from(n.role).unwrap_or(pb::NodeRole::Unspecified);
        let health = pb::NodeHealth::try_from(n.health).unwrap_or(pb::NodeHealth::Unspecified);
        NodeView {
            id: n.id,
            role: trim_enum(role.as_str_name(), "NODE_ROLE_"),
            health: trim_enum(health.as_str_name(), "NODE_HEALTH_"),
            address: n.address,
            hostname: n.hostname,
            version: n.version,
            matched_index: n.matched_index,
            joined_at_ms: n.joined_at_ms,
            image_hash: n.image_hash,
        }
    }
}

pub const NODE_HEADERS: &[&str] = &["ID", "ROLE", "HEALTH", "ADDRESS", "HOSTNAME", "VERSION", "MATCHED"];

pub fn node_rows(nodes: &[NodeView]) -> Vec<Vec<String>> {
    nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.role.clone(),
                n.health.clone(),
                n.address.clone(),
                n.hostname.clone(),
                n.version.clone(),
                n.matched_index.to_string(),
            ]
        })
        .collect()
}

pub async fn run(ctx: Ctx, action: NodeAction) -> Result<(), CliError> {
    let mut client = PoolServiceClient::new(ctx.channel.clone());
    match action {
        NodeAction::Poweroff { node } => power(ctx, node, pb::PowerAction::Poweroff).await,
        NodeAction::Reboot { node } => power(ctx, node, pb::PowerAction::Reboot).await,
        NodeAction::List => {
            let nodes: Vec<NodeView> = client
                .list_nodes(pb::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes
                .into_iter()
                .map(NodeView::from)
                .collect();
            let rows = node_rows(&nodes);
            output::print(ctx.output, &nodes, NODE_HEADERS, rows)
        }
        NodeAction::Show { id } => {
            let n = NodeView::from(client.get_node(pb::GetNodeRequest { id }).await?.into_inner());
            match ctx.output {
                Format::Json => output::print(ctx.output, &n, &[], vec![]),
                Format::Table => {
                    let rows = vec![
                        vec!["id".into(), n.id.clone()],
                        vec!["role".into(), n.role.clone()],
                        vec!["health".into(), n.health.clone()],
                        vec!["address".into(), n.address.clone()],
                        vec!["hostname".into(), n.hostname.clone()],
                        vec!["version".into(), n.version.clone()],
                        vec!["matched index".into(), n.matched_index.to_string()],
                        vec!["joined at (unix ms)".into(), n.joined_at_ms.to_string()],
                        vec![
                            "image hash".into(),
                            if n.image_hash.is_empty() { "-".into() } else { n.image_hash.clone() },
                        ],
                    ];
                    output::print(ctx.output, &n, &["FIELD", "VALUE"], rows)
                }
            }
        }
    }
}
