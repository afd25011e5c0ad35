//! `nodeos pxe enable|disable|status`: the pool boots new machines from its own image.

use clap::Subcommand;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::pxe_service_client::PxeServiceClient;
use serde::Serialize;

use super::output;
use super::{CliError, Ctx, Format};

#[derive(Debug, Subcommand)]
pub enum PxeCmd {
    /// Serve PXE (proxy DHCP, TFTP, HTTP) from the pool's nodes, so machines that boot from the
    /// network boot this pool's image and join it. Another DHCP server on the fabric hands out
    /// the addresses.
    Enable {
        /// Interface to serve on [default: the one holding each node's advertised address].
        #[arg(long)]
        interface: Option<String>,
        /// Only these nodes serve (ids, comma separated) [default: every node].
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Extra kernel arguments for the machines booted, e.g. "nodeos.dns=10.0.0.53".
        #[arg(long, allow_hyphen_values = true)]
        append: Option<String>,
        /// TCP port of the HTTP server [default: 7780].
        #[arg(long)]
        http_port: Option<u16>,
    },
    /// Stop serving PXE on every node.
    Disable,
    /// The settings and each node's serving state and counters.
    Status {
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Debug, Serialize)]
struct SettingsView {
    enabled: bool,
    interface: String,
    nodes: Vec<String>,
    append: String,
    http_port: u32,
}

impl From<pb::PxeSettings> for SettingsView {
    fn from(s: pb::PxeSettings) -> Self {
        SettingsView {
            enabled: s.enabled,
            interface: s.interface,
            nodes: s.node_ids,
            append: s.append,
            http_port: if s.http_port == 0 { 7780 } else { s.http_port },
        }
    }
}

#[derive(Debug, Serialize)]
struct NodeView {
    node_id: String,
    state: String,
    detail: String,
    interface: String,
    address: String,
    image_hash: String,
    offers: u64,
    acks: u64,
    ignored: u64,
    malformed: u64,
    unsupported_clients: u64,
    tftp_transfers: u64,
    tftp_errors: u64,
    http_requests: u64,
    http_errors: u64,
    bytes_sent: u64,
}

impl From<pb::PxeNodeStatus> for NodeView {
    fn from(n: pb::PxeNodeStatus) -> Self {
        let c = n.counters.unwrap_or_default();
        NodeView {
            node_id: n.node_id,
            state: n.state,
            detail: n.detail,
            interface: n.interface,
            address: n.address,
            image_hash: n.image_hash,
            offers: c.offers,
            acks: c.acks,
            ignored: c.ignored,
            malformed: c.malformed,
            unsupported_clients: c.unsupported_clients,
            tftp_transfers: c.tftp_transfers,
            tftp_errors: c.tftp_errors,
            http_requests: c.http_requests,
            http_errors: c.http_errors,
            bytes_sent: c.bytes_sent,
        }
    }
}

#[derive(Debug, Serialize)]
struct StatusView {
    settings: SettingsView,
    nodes: Vec<NodeView>,
}

fn short(hash: &str) -> String {
    hash.get(..12).unwrap_or(hash).to_owned()
}

async fn configure(ctx: &Ctx, s: pb::PxeSettings) -> Result<(), CliError> {
    let stored =
        SettingsView::from(PxeServiceClient::new(ctx.channel.clone()).configure(s).await?.into_inner());
    let rows = vec![vec![
        if stored.enabled { "enabled" } else { "disabled" }.to_owned(),
        if stored.interface.is_empty() { "(advertised address's)".into() } else { stored.interface.clone() },
        if stored.nodes.is_empty() { "all".into() } else { stored.nodes.join(",") },
        stored.http_port.to_string(),
        stored.append.clone(),
    ]];
    output::print(ctx.output, &stored, &["PXE", "INTERFACE", "NODES", "HTTP", "APPEND"], rows)
}

pub async fn run(ctx: Ctx, cmd: PxeCmd) -> Result<(), CliError> {
    match cmd {
        PxeCmd::Enable { interface, nodes, append, http_port } => {
            let s = pb::PxeSettings {
                enabled: true,
                interface: interface.unwrap_or_default(),
                node_ids: nodes,
                append: append.unwrap_or_default(),
                http_port: http_port.map(u32::from).unwrap_or_default(),
            };
            configure(&ctx, s).await
        }
        PxeCmd::Disable => configure(&ctx, pb::PxeSettings::default()).await,
        PxeCmd::Status { node } => {
            let r = PxeServiceClient::new(ctx.channel.clone())
                .status(pb::PxeStatusRequest { node_id: node.unwrap_or_default() })
                .await?
                .into_inner();
            let view = StatusView {
                settings: r.settings.unwrap_or_default().into(),
                nodes: r.nodes.into_iter().map(NodeView::from).collect(),
            };
            if ctx.output == Format::Table {
                let s = &view.settings;
                println!(
                    "PXE {}{}",
                    if s.enabled { "enabled" } else { "disabled" },
                    if s.enabled {
                        format!(
                            " on {} of {} nodes, HTTP port {}{}",
                            if s.interface.is_empty() {
                                "the advertised address's interface"
                            } else {
                                &s.interface
                            },
                            if s.nodes.is_empty() { "all".to_owned() } else { s.nodes.join(",") },
                            s.http_port,
                            if s.append.is_empty() {
                                String::new()
                            } else {
                                format!(", append {:?}", s.append)
                            }
                        )
                    } else {
                        String::new()
                    }
                );
            }
            let rows = view
                .nodes
                .iter()
                .map(|n| {
                    vec![
                        n.node_id.clone(),
                        n.state.clone(),
                        n.interface.clone(),
                        n.address.clone(),
                        short(&n.image_hash),
                        format!("{}/{}", n.offers, n.acks),
                        n.tftp_transfers.to_string(),
                        n.http_requests.to_string(),
                        n.bytes_sent.to_string(),
                        n.detail.clone(),
                    ]
                })
                .collect();
            output::print(
                ctx.output,
                &view,
                &[
                    "NODE",
                    "STATE",
                    "IFACE",
                    "ADDRESS",
                    "IMAGE",
                    "OFFERS/ACKS",
                    "TFTP",
                    "HTTP",
                    "BYTES",
                    "DETAIL",
                ],
                rows,
            )
        }
    }
}
