//! `nodeos meta put|get|list|delete|watch`: the operator's key space.

use clap::Subcommand;
use futures::StreamExt;
use nodeos_proto::text::bytes_text;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::metadata_service_client::MetadataServiceClient;

use super::output;
use super::{CliError, Ctx, Format};

#[derive(Debug, Subcommand)]
pub enum MetaCmd {
    /// Set a key (optionally only if its mod revision is as expected; 0 = absent).
    Put {
        key: String,
        /// The value (or give --from-file).
        #[arg(required_unless_present = "from_file", conflicts_with = "from_file")]
        value: Option<String>,
        /// Read the value from this file ("-" for standard input).
        #[arg(long)]
        from_file: Option<std::path::PathBuf>,
        #[arg(long)]
        expect_revision: Option<u64>,
    },
    /// Read a key (linearizable unless --stale).
    Get {
        key: String,
        #[arg(long)]
        stale: bool,
    },
    /// Keys under a prefix.
    List {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Delete a key.
    Delete {
        key: String,
        #[arg(long)]
        expect_revision: Option<u64>,
    },
    /// Stream changes under a prefix.
    Watch {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 0)]
        from_revision: u64,
    },
}

const KV_HEADERS: &[&str] = &["KEY", "MOD_REV", "VERSION", "VALUE"];

fn kv_row(k: &pb::KeyValue) -> Vec<String> {
    vec![k.key.clone(), k.mod_revision.to_string(), k.version.to_string(), bytes_text(&k.value).into_owned()]
}

pub async fn run(ctx: Ctx, cmd: MetaCmd) -> Result<(), CliError> {
    let mut c = MetadataServiceClient::new(ctx.channel.clone());
    match cmd {
        MetaCmd::Put { key, value, from_file, expect_revision } => {
            let value = match (value, from_file) {
                (Some(v), _) => v.into_bytes(),
                (None, Some(p)) if p.as_os_str() == "-" => {
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                        .map_err(|e| CliError::Status(format!("cannot read standard input: {e}")))?;
                    buf
                }
                (None, Some(p)) => std::fs::read(&p)
                    .map_err(|e| CliError::Status(format!("cannot read {}: {e}", p.display())))?,
                (None, None) => return Err(CliError::Status("give a value or --from-file".into())),
            };
            let r = c
                .put(pb::PutRequest { key, value, expect_mod_revision: expect_revision })
                .await?
                .into_inner();
            if !r.succeeded {
                let cur = r.current.map(|k| k.mod_revision).unwrap_or(0);
                return Err(CliError::Status(format!(
                    "compare failed: the key's mod revision is {cur}, not {}",
                    expect_revision.unwrap_or(0)
                )));
            }
            let rows = vec![vec![r.revision.to_string()]];
            output::print(ctx.output, &r, &["REVISION"], rows)
        }
        MetaCmd::Get { key, stale } => {
            let r = c.get(pb::GetRequest { key: key.clone(), stale_ok: stale }).await?.into_inner();
            let Some(kv) = r.kv else {
                return Err(CliError::Status(format!("not found: key {key:?}")));
            };
            match ctx.output {
                Format::Table => {
                    println!("{}", bytes_text(&kv.value));
                    Ok(())
                }
                Format::Json => output::print(ctx.output, &kv, &[], vec![]),
            }
        }
        MetaCmd::List { prefix, limit } => {
            let r = c.list(pb::ListRequest { prefix, limit }).await?.into_inner();
            let rows = r.kvs.iter().map(kv_row).collect();
            output::print(ctx.output, &r.kvs, KV_HEADERS, rows)
        }
        MetaCmd::Delete { key, expect_revision } => {
            let r = c
                .delete(pb::DeleteRequest { key: key.clone(), expect_mod_revision: expect_revision })
                .await?
                .into_inner();
            if !r.succeeded {
                return Err(CliError::Status(format!("compare failed for key {key:?}")));
            }
            let rows = vec![vec![r.revision.to_string(), r.existed.to_string()]];
            output::print(ctx.output, &r, &["REVISION", "EXISTED"], rows)
        }
        MetaCmd::Watch { prefix, from_revision } => {
            let mut s = c
                .watch(pb::MetadataWatchRequest { prefix, start_revision: from_revision })
                .await?
                .into_inner();
            while let Some(ev) = s.next().await {
                let ev = ev?;
                match ctx.output {
                    Format::Json => output::print_line(&ev)?,
                    Format::Table => {
                        let kind = if ev.deleted { "delete" } else { "put" };
                        let (k, v) = ev
                            .kv
                            .as_ref()
                            .map(|k| (k.key.as_str(), bytes_text(&k.value)))
                            .unwrap_or_default();
                        println!("{:>8}  {:<6}  {}  {}", ev.revision, kind, k, v);
                    }
                }
            }
            Ok(())
        }
    }
}
