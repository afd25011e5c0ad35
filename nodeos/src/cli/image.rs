//! `nodeos image upload|list|show|delete`: guest kernels and initramfs images
//! in the pool, which `vm create --kernel image:NAME --initrd image:NAME` boots.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use nodeos_proto::text::enum_name;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::image_service_client::ImageServiceClient;
use nodeos_proto::v1::upload_image_request::Msg;
use sha2::{Digest, Sha256};

use super::output;
use super::volume::{human, open_sized, progress_bar, read_error, stream_file};
use super::{CliError, Ctx, Format, Global};

/// Bytes per upload message (a multiple of 4096, as every chunk but the last must be).
const UPLOAD_CHUNK: usize = 1 << 20;
/// Request timeout of an upload, whose answer comes once every byte is in
/// and checked: a week, i.e. none in practice.
const UPLOAD_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Upload a guest kernel (at most 64 MiB) or initramfs (at most 1 GiB) into the pool.
    Upload(UploadArgs),
    /// Every image of the pool.
    List,
    /// One image (id or name).
    Show { image: String },
    /// Delete an image and its volume; refused while a VM names it.
    Delete { image: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// A kernel the VMM boots directly: a bzImage (boot protocol 2.10+) or an x86-64 ELF vmlinux.
    Kernel,
    /// An initramfs: any bytes.
    Initrd,
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// The file to upload.
    pub file: PathBuf,
    /// The image's name in the pool (a-z, 0-9, '-', '_').
    #[arg(long)]
    pub name: String,
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// SHA-256 the file must have (64 hex digits), e.g. from the distribution's
    /// SHA256SUMS; default: the file's own, read before sending, so the pool
    /// checks the bytes that arrive.
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
}

impl ImageCmd {
    /// The global flags this command runs with.
    pub fn global(&self, g: &Global) -> Global {
        let mut g = g.clone();
        if matches!(self, ImageCmd::Upload(_)) {
            g.request_timeout = g.request_timeout.max(UPLOAD_TIMEOUT_SECS);
        }
        g
    }
}

const LIST_HEADERS: &[&str] = &["ID", "NAME", "KIND", "SIZE", "SHA256", "FORMAT"];

fn list_row(i: &pb::Image) -> Vec<String> {
    vec![
        i.id.clone(),
        i.name.clone(),
        enum_name::<pb::ImageKind>(i.kind),
        human(i.size_bytes),
        i.sha256.chars().take(16).collect(),
        i.format.clone(),
    ]
}

fn print_image(format: Format, i: pb::Image) -> Result<(), CliError> {
    let rows = vec![
        vec!["id".into(), i.id.clone()],
        vec!["name".into(), i.name.clone()],
        vec!["kind".into(), enum_name::<pb::ImageKind>(i.kind)],
        vec!["size".into(), format!("{} ({} bytes)", human(i.size_bytes), i.size_bytes)],
        vec!["sha256".into(), i.sha256.clone()],
        vec!["format".into(), i.format.clone()],
        vec!["volume".into(), i.volume_id.clone()],
        vec!["created (unix ms)".into(), i.created_at_ms.to_string()],
        vec!["boot it with".into(), format!("--{} image:{}", enum_name::<pb::ImageKind>(i.kind), i.name)],
    ];
    output::print(format, &i, &["FIELD", "VALUE"], rows)
}

pub async fn run(ctx: Ctx, cmd: ImageCmd) -> Result<(), CliError> {
    let mut c = ImageServiceClient::new(ctx.channel.clone());
    let iref = |i: String| pb::ImageRef { image: i };
    match cmd {
        ImageCmd::Upload(a) => {
            let image = upload(&mut c, a).await?;
            print_image(ctx.output, image)
        }
        ImageCmd::List => {
            let images = c.list(pb::ListImagesRequest {}).await?.into_inner().images;
            let rows = images.iter().map(list_row).collect();
            output::print(ctx.output, &images, LIST_HEADERS, rows)
        }
        ImageCmd::Show { image } => print_image(ctx.output, c.get(iref(image)).await?.into_inner()),
        ImageCmd::Delete { image } => {
            let i = c.delete(iref(image)).await?.into_inner();
            match ctx.output {
                Format::Json => print_image(ctx.output, i),
                Format::Table => {
                    println!("deleted image {} ({}) and its volume", i.name, i.id);
                    Ok(())
                }
            }
        }
    }
}

/// The SHA-256 of the file's first `total` bytes, with a progress bar.
fn file_sha256(file: &mut std::fs::File, path: &Path, total: u64) -> Result<String, CliError> {
    let bar = progress_bar(total);
    bar.set_message("hashing");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; UPLOAD_CHUNK];
    let mut src = (&mut *file).take(total);
    loop {
        let n = src.read(&mut buf).map_err(|e| read_error(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    file.seek(SeekFrom::Start(0)).map_err(|e| read_error(path, e))?;
    Ok(hex::encode(hasher.finalize()))
}

pub(crate) async fn upload(
    c: &mut ImageServiceClient<tonic::transport::Channel>,
    a: UploadArgs,
) -> Result<pb::Image, CliError> {
    let (mut file, total) = open_sized(&a.file, "upload")?;
    let sha256 = match a.sha256 {
        Some(s) => s,
        None => file_sha256(&mut file, &a.file, total)?,
    };
    let kind = match a.kind {
        Kind::Kernel => pb::ImageKind::Kernel,
        Kind::Initrd => pb::ImageKind::Initrd,
    };
    let start = pb::UploadImageStart { name: a.name, kind: kind as i32, total_bytes: total, sha256 };
    stream_file(
        (file, total, &a.file),
        UPLOAD_CHUNK,
        pb::UploadImageRequest { msg: Some(Msg::Start(start)) },
        |_, data| pb::UploadImageRequest { msg: Some(Msg::Chunk(pb::UploadImageChunk { data })) },
        "checking",
        |s| c.upload(s),
    )
    .await
}
