//! `nodeos pxe enable|disable|status`: the pool boots new machines from its own image.

use clap::Subcommand;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::pxe_service_client::PxeServiceClient;

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

fn short(hash: &str) -> String {
    hash.get(..12).unwrap_or(hash).to_owned()
}

async fn configure(ctx: &Ctx, s: pb::PxeSettings) -> Result<(), CliError> {
    let stored = PxeServiceClient::new(ctx.channel.clone()).configure(s).await?.into_inner();
    let rows = vec![vec![
        if stored.enabled { "enabled" } else { "disabled" }.to_owned(),
        if stored.interface.is_empty() { "(advertised address's)".into() } else { stored.interface.clone() },
        if stored.node_ids.is_empty() { "all".into() } else { stored.node_ids.join(",") },
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
            if ctx.output == Format::Table {
                let none = pb::PxeSettings::default();
                let s = r.settings.as_ref().unwrap_or(&none);
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
                            if s.node_ids.is_empty() { "all".to_owned() } else { s.node_ids.join(",") },
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
            let rows = r
                .nodes
                .iter()
                .map(|n| {
                    let c = n.counters.unwrap_or_default();
                    vec![
                        n.node_id.clone(),
                        n.state.clone(),
                        n.interface.clone(),
                        n.address.clone(),
                        short(&n.image_hash),
                        format!("{}/{}", c.offers, c.acks),
                        c.tftp_transfers.to_string(),
                        c.http_requests.to_string(),
                        c.bytes_sent.to_string(),
                        n.detail.clone(),
                    ]
                })
                .collect();
            output::print(
                ctx.output,
                &r,
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
