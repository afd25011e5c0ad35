//! `nodeos node list|show|poweroff|reboot|maintenance|remove` (and the daemon's flags, see `crate::node`).

use clap::{Args, Subcommand};
use nodeos_proto::text::enum_name;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::node_service_client::NodeServiceClient;
use nodeos_proto::v1::pool_service_client::PoolServiceClient;

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
    /// Maintenance mode: `enter NODE` live-migrates every VM off the node and
    /// keeps new VMs and volume copies away; `exit NODE` returns it to service.
    ///
    /// Example: `nodeos node maintenance enter 5ebb116227aa03fe`, service the
    /// node, then `nodeos node maintenance exit 5ebb116227aa03fe`.
    Maintenance {
        #[arg(value_parser = ["enter", "exit"])]
        action: String,
        /// Node id.
        node: String,
    },
    /// Remove a dead or decommissioned node from the pool for good: its VMs
    /// move to live nodes, its volume copies are rebuilt elsewhere, it leaves
    /// raft, and its id is refused from then on. Refused, nothing changed,
    /// while it would lose data or leave the pool without a voter.
    ///
    /// Example: `nodeos node remove 5ebb116227aa03fe`.
    Remove {
        /// Node id or hostname.
        node: String,
    },
}

/// Follows a maintenance stream, a line per step on standard error, then prints the node.
async fn maintenance(ctx: Ctx, action: &str, node: String) -> Result<(), CliError> {
    use futures::StreamExt;
    let req = pb::MaintenanceRequest { node_id: node.clone(), enter: action == "enter" };
    let mut stream = NodeServiceClient::new(ctx.channel.clone()).maintenance(req).await?.into_inner();
    let mut stayed = 0;
    while let Some(p) = stream.next().await {
        let p = p?;
        match p.event.as_str() {
            "marked" => eprintln!("node {node} in maintenance: no new VMs or volume copies are placed there"),
            "moving" => eprintln!("moving {} ({})...", p.vm_name, p.vm_id),
            "moved" => eprintln!("moved {} to node {} (paused {} ms)", p.vm_name, p.to_node, p.paused_ms),
            "not_moved" => eprintln!("NOT moved {}: {}", p.vm_name, p.error),
            "leader_moved" => eprintln!("raft leadership moved to node {}", p.to_node),
            "done" => {
                stayed = p.stayed;
                eprintln!("{} VM(s) moved, {} stayed", p.moved, p.stayed);
            }
            "exited" => eprintln!("node {node} is back in service"),
            _ => {}
        }
    }
    let n = PoolServiceClient::new(ctx.channel.clone())
        .get_node(pb::GetNodeRequest { id: node })
        .await?
        .into_inner();
    output::print(ctx.output, &n, NODE_HEADERS, node_rows(std::slice::from_ref(&n)))?;
    if stayed > 0 {
        return Err(CliError::Status(format!(
            "{stayed} VM(s) could not leave the node; enter maintenance again to retry"
        )));
    }
    Ok(())
}

async fn power(ctx: Ctx, node: Option<String>, action: pb::PowerAction) -> Result<(), CliError> {
    let r = NodeServiceClient::new(ctx.channel.clone())
        .power(pb::PowerRequest { node_id: node.unwrap_or_default(), action: action.into() })
        .await?
        .into_inner();
    // What the node says it does, as the JSON shows it.
    let doing = match pb::PowerAction::try_from(r.action) {
        Ok(pb::PowerAction::Reboot) => "rebooting",
        Ok(pb::PowerAction::Poweroff) => "powering off",
        _ => "unknown",
    };
    let rows = vec![vec![r.node_id.clone(), doing.to_owned()]];
    output::print(ctx.output, &r, &["NODE", "ACTION"], rows)
}

pub const NODE_HEADERS: &[&str] =
    &["ID", "ROLE", "HEALTH", "LIVENESS", "SERVICE", "ADDRESS", "HOSTNAME", "VERSION", "MATCHED"];

/// "alive (0.4 s)": the liveness and the time since the last lease renewal.
fn liveness(n: &pb::Node) -> String {
    if n.liveness.is_empty() {
        return "-".into();
    }
    format!("{} ({:.1} s)", n.liveness, n.lease_age_ms as f64 / 1000.0)
}

pub fn node_rows(nodes: &[pb::Node]) -> Vec<Vec<String>> {
    nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                enum_name::<pb::NodeRole>(n.role),
                enum_name::<pb::NodeHealth>(n.health),
                liveness(n),
                if n.maintenance { "maintenance".into() } else { "in service".into() },
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
        NodeAction::Maintenance { action, node } => maintenance(ctx, &action, node).await,
        NodeAction::Remove { node } => {
            let r = NodeServiceClient::new(ctx.channel.clone())
                .remove(pb::RemoveNodeRequest { node_id: node })
                .await?
                .into_inner();
            let rows = vec![
                vec!["removed".into(), r.node_id.clone()],
                vec![
                    "vms re-homed".into(),
                    if r.vms_rehomed.is_empty() { "-".into() } else { r.vms_rehomed.join(", ") },
                ],
                vec!["copies rebuilt".into(), r.copies_rebuilt.to_string()],
            ];
            output::print(ctx.output, &r, &["FIELD", "VALUE"], rows)
        }
        NodeAction::List => {
            let nodes = client.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
            let rows = node_rows(&nodes);
            output::print(ctx.output, &nodes, NODE_HEADERS, rows)
        }
        NodeAction::Show { id } => {
            let n = client.get_node(pb::GetNodeRequest { id }).await?.into_inner();
            match ctx.output {
                Format::Json => output::print(ctx.output, &n, &[], vec![]),
                Format::Table => {
                    let rows = vec![
                        vec!["id".into(), n.id.clone()],
                        vec!["role".into(), enum_name::<pb::NodeRole>(n.role)],
                        vec!["health".into(), enum_name::<pb::NodeHealth>(n.health)],
                        vec!["liveness".into(), liveness(&n)],
                        vec!["maintenance".into(), if n.maintenance { "yes".into() } else { "no".into() }],
                        vec!["address".into(), n.address.clone()],
                        vec!["hostname".into(), n.hostname.clone()],
                        vec!["version".into(), n.version.clone()],
                        vec!["matched index".into(), n.matched_index.to_string()],
                        vec!["joined at (unix ms)".into(), n.joined_at_ms.to_string()],
                        vec![
                            "image hash".into(),
                            if n.image_hash.is_empty() { "-".into() } else { n.image_hash.clone() },
                        ],
                        vec![
                            "cpu".into(),
                            if n.cpu.is_empty() { "- (no KVM)".into() } else { n.cpu.clone() },
                        ],
                        vec![
                            "cpu features hidden by the pool baseline".into(),
                            n.cpu_features_beyond_baseline.to_string(),
                        ],
                    ];
                    output::print(ctx.output, &n, &["FIELD", "VALUE"], rows)
                }
            }
        }
    }
}
