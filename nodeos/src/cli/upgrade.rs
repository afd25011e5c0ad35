//! `nodeos pool upgrade --image DIR|URL`: checks the bundle here, stores its
//! kernel and initramfs as pool images, starts the rolling upgrade, and
//! follows it (a line per node step) until it is done or fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodeos_image::hash::{FileDigest, INITRAMFS_FILE, KERNEL_FILE, MANIFEST_FILE, check_bundle};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::image_service_client::ImageServiceClient;
use nodeos_proto::v1::pool_service_client::PoolServiceClient;
use tonic::transport::Channel;

use super::image::{Kind, UploadArgs, upload};
use super::{CliError, Ctx, Format, output};

/// How often the upgrade's progress is read.
const POLL: Duration = Duration::from_secs(2);

/// One line for `pool status`: the state, then each node's phase.
pub fn summary(u: &pb::UpgradeStatus) -> String {
    let short = |h: &str| h.chars().take(12).collect::<String>();
    let nodes: Vec<String> = u.nodes.iter().map(|n| format!("{} {}", short(&n.node_id), n.phase)).collect();
    let mut s =
        format!("to image {} ({}): {}; {}", short(&u.image_hash), u.version, u.state, nodes.join(", "));
    if !u.reason.is_empty() {
        s.push_str(&format!(" ({})", u.reason));
    }
    s
}

fn bad(what: impl std::fmt::Display) -> CliError {
    CliError::Status(format!("upgrade: {what}"))
}

/// The bundle's files: `image` itself, or fetched from its URL into `tmp`.
async fn bundle_dir(image: &str, tmp: &Path) -> Result<PathBuf, CliError> {
    if image.starts_with("https://") {
        return Err(bad("https:// bundles are not fetched yet; download it and pass the directory"));
    }
    if !image.starts_with("http://") {
        return Ok(PathBuf::from(image));
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
    let base = image.trim_end_matches('/');
    for name in [MANIFEST_FILE, KERNEL_FILE, INITRAMFS_FILE] {
        let url = format!("{base}/{name}");
        let uri: hyper::Uri = url.parse().map_err(|e| bad(format!("{url}: {e}")))?;
        let resp = client.get(uri).await.map_err(|e| bad(format!("fetching {url}: {e}")))?;
        if !resp.status().is_success() {
            return Err(bad(format!("fetching {url}: HTTP {}", resp.status())));
        }
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|e| bad(format!("fetching {url}: {e}")))?
            .to_bytes();
        std::fs::write(tmp.join(name), &body).map_err(|e| bad(format!("saving {name}: {e}")))?;
    }
    Ok(tmp.to_owned())
}

/// A pool image holding `file` (its sha256 known) under `name`: the one
/// stored by an earlier run if its bytes are the same, else uploaded now.
async fn stored(
    images: &mut ImageServiceClient<Channel>,
    file: PathBuf,
    name: String,
    kind: Kind,
    sha256: &str,
) -> Result<String, CliError> {
    if let Ok(i) = images.get(pb::ImageRef { image: name.clone() }).await {
        let i = i.into_inner();
        if i.sha256 == sha256 {
            return Ok(i.id);
        }
        return Err(bad(format!("the pool image {name:?} exists with other bytes; delete it first")));
    }
    let args = UploadArgs { file, name, kind, sha256: Some(sha256.to_owned()) };
    Ok(upload(images, args).await?.id)
}

pub async fn run(
    ctx: &Ctx,
    pool: &mut PoolServiceClient<Channel>,
    image: &str,
    no_wait: bool,
) -> Result<(), CliError> {
    let tmp = tempfile::tempdir().map_err(|e| bad(format!("a temporary directory: {e}")))?;
    let dir = bundle_dir(image, tmp.path()).await?;
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| bad(format!("{}: {e}", dir.join(name).display())))
    };
    let manifest_bytes = read(MANIFEST_FILE)?;
    let kernel = FileDigest::of(KERNEL_FILE, &read(KERNEL_FILE)?);
    let initrd = FileDigest::of(INITRAMFS_FILE, &read(INITRAMFS_FILE)?);
    let manifest = check_bundle(&manifest_bytes, &kernel, &initrd)
        .map_err(|e| bad(format!("the bundle in {} does not verify: {e}", dir.display())))?;
    let short: String = manifest.image_hash.chars().take(12).collect();
    eprintln!(
        "upgrade: image {} (nodeos {}) verified; storing it in the pool",
        manifest.image_hash, manifest.nodeos_version
    );
    let mut images = ImageServiceClient::new(ctx.channel.clone());
    let kernel_image = stored(
        &mut images,
        dir.join(KERNEL_FILE),
        format!("nodeos-{short}-vmlinuz"),
        Kind::Kernel,
        &kernel.sha256,
    )
    .await?;
    let initrd_image = stored(
        &mut images,
        dir.join(INITRAMFS_FILE),
        format!("nodeos-{short}-initramfs"),
        Kind::Initrd,
        &initrd.sha256,
    )
    .await?;
    let req = pb::UpgradeRequest { manifest: manifest_bytes, kernel_image, initrd_image };
    let mut last = pool.upgrade(req).await?.into_inner();
    eprintln!("upgrade: started: {}", summary(&last));
    if no_wait {
        return print(ctx.output, &last);
    }
    loop {
        tokio::time::sleep(POLL).await;
        // The leader may be the node rebooting: a failed read is retried.
        let Ok(s) = pool.status(pb::StatusRequest {}).await else { continue };
        let Some(u) = s.into_inner().upgrade.filter(|u| u.image_hash == last.image_hash) else { continue };
        for n in &u.nodes {
            let before = last.nodes.iter().find(|m| m.node_id == n.node_id).map(|m| m.phase.as_str());
            if before != Some(n.phase.as_str()) {
                eprintln!("upgrade: node {}: {}", n.node_id, n.phase);
            }
        }
        if u.reason != last.reason && !u.reason.is_empty() {
            eprintln!("upgrade: {}", u.reason);
        }
        last = u;
        match last.state.as_str() {
            "done" => return print(ctx.output, &last),
            "failed" => return Err(bad(format!("stopped: {}", last.reason))),
            _ => {}
        }
    }
}

fn print(format: Format, u: &pb::UpgradeStatus) -> Result<(), CliError> {
    let rows = u
        .nodes
        .iter()
        .map(|n| {
            let took = n.finished_at_ms.saturating_sub(n.started_at_ms);
            vec![
                n.node_id.clone(),
                n.phase.clone(),
                if n.finished_at_ms > 0 && n.started_at_ms > 0 {
                    format!("{:.1} s", took as f64 / 1000.0)
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    output::print(format, u, &["NODE", "PHASE", "TOOK"], rows)
}
