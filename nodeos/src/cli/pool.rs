//! `nodeos pool status|watch`.

use clap::Subcommand;
use futures::StreamExt;
use nodeos_proto::text::{bytes_text, enum_name};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::pool_service_client::PoolServiceClient;

use super::node::{NODE_HEADERS, node_rows};
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
    /// Upgrade every node to another node image, one at a time, with no VM
    /// restarted: each node is drained (its VMs live-migrate off), reboots
    /// into the image, rejoins and returns to service. Stops, saying why, at
    /// the first node that fails.
    ///
    /// Example: `nodeos pool upgrade --image target/image` (a `make image`
    /// bundle), or `--image http://host/bundle/`.
    Upgrade {
        /// The bundle: a directory, or an http:// URL of one (manifest.json,
        /// vmlinuz, initramfs.img).
        #[arg(long)]
        image: String,
        /// Start it and return instead of following it to the end.
        #[arg(long)]
        no_wait: bool,
    },
}

impl PoolCmd {
    /// The global flags this command runs with: an upgrade uploads the image.
    pub fn global(&self, g: &super::Global) -> super::Global {
        let mut g = g.clone();
        if matches!(self, PoolCmd::Upgrade { .. }) {
            g.request_timeout = g.request_timeout.max(UPGRADE_TIMEOUT_SECS);
        }
        g
    }
}

/// Longest an upgrade's upload or a status call may take.
const UPGRADE_TIMEOUT_SECS: u64 = 3600;

pub async fn run(ctx: Ctx, cmd: PoolCmd) -> Result<(), CliError> {
    let mut client = PoolServiceClient::new(ctx.channel.clone());
    match cmd {
        PoolCmd::Status => {
            let s = client.status(pb::StatusRequest {}).await?.into_inner();
            match ctx.output {
                Format::Json => output::print(ctx.output, &s, &[], vec![])?,
                Format::Table => {
                    let none = |v: &str| if v.is_empty() { "-".to_owned() } else { v.to_owned() };
                    println!("pool      {} ({})", none(&s.pool_name), none(&s.pool_id));
                    println!("leader    {}   term {}", none(&s.leader_id), s.term);
                    println!(
                        "log       applied {}   committed {}   revision {}",
                        s.last_applied_index, s.committed_index, s.revision
                    );
                    println!(
                        "ha        {} protected VMs; tolerates {} node failure{} ({})",
                        s.ha_protected_vms,
                        s.ha_failures_to_tolerate,
                        if s.ha_failures_to_tolerate == 1 { "" } else { "s" },
                        s.ha_tolerance_limit
                    );
                    if let Some(u) = &s.upgrade {
                        println!("upgrade   {}", super::upgrade::summary(u));
                    }
                    println!("answered  {}", s.answered_by);
                    println!();
                    print!("{}", output::table(NODE_HEADERS, &node_rows(&s.members)));
                }
            }
        }
        PoolCmd::Upgrade { image, no_wait } => {
            super::upgrade::run(&ctx, &mut client, &image, no_wait).await?
        }
        PoolCmd::Watch { prefix, from_revision } => {
            let mut stream =
                client.watch(pb::WatchRequest { start_revision: from_revision, prefix }).await?.into_inner();
            while let Some(ev) = stream.next().await {
                let ev = ev?;
                match ctx.output {
                    Format::Json => output::print_line(&ev)?,
                    Format::Table => println!(
                        "{:>8}  {:<6}  {}  {}",
                        ev.revision,
                        enum_name::<pb::EventKind>(ev.kind),
                        ev.key,
                        bytes_text(&ev.value)
                    ),
                }
            }
        }
    }
    Ok(())
}
