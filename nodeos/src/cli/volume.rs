//! `nodeos volume create|list|show|resize|delete|snapshot|clone|release|scrub|import`.

use std::io::{IsTerminal, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::import_request::Msg;
use nodeos_proto::v1::volume_service_client::VolumeServiceClient;
use serde::Serialize;
use tonic::transport::Channel;

use super::output;
use super::{CliError, Ctx, Format, Global};

/// The volume block size: sizes must be multiples of it.
const BLOCK: u64 = 4096;
/// Bytes per import message.
const IMPORT_CHUNK: usize = 1 << 20;
/// Request timeout of an import, whose answer comes only once the whole
/// image is sent and flushed: a week, i.e. none in practice.
const IMPORT_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (thin: it reads as zeroes and takes space as it is written).
    Create {
        name: String,
        /// Size in bytes, or with a K, M, G or T suffix (binary units); a multiple of 4 KiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Copies of each extent (default: as many as the pool allows, up to 3).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3))]
        replicas: Option<u32>,
    },
    /// Every volume of the pool.
    List,
    /// One volume: placement, writer, snapshots and the health of each extent's copies.
    Show { volume: String },
    /// Grow a volume.
    Resize {
        volume: String,
        /// New size (K, M, G or T suffix, binary units); a multiple of 4 KiB, not smaller than now.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume (its space is reclaimed in the background).
    Delete {
        volume: String,
        /// Delete even while a writer holds it (the writer is fenced).
        #[arg(long)]
        force: bool,
    },
    /// Snapshots of a volume.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// A new volume starting as a snapshot of another.
    Clone { volume: String, snapshot: String, name: String },
    /// Break the current writer's hold on a volume (it is fenced and can write no more).
    Release { volume: String },
    /// Verify every copy's checksums now and repair corrupt blocks.
    Scrub { volume: String },
    /// Write a raw image file (or block device) into a volume.
    Import(ImportArgs),
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Freeze the volume's current blocks as a snapshot.
    Create {
        volume: String,
        snapshot: String,
    },
    List {
        volume: String,
    },
    Delete {
        volume: String,
        snapshot: String,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["name", "volume"])))]
pub struct ImportArgs {
    /// Raw image to read.
    pub file: PathBuf,
    /// Import into this volume, creating it (sized to the file, rounded up to 4 KiB) if it does not exist.
    #[arg(long)]
    pub name: Option<String>,
    /// Import into this existing volume (id or name).
    #[arg(long)]
    pub volume: Option<String>,
    /// Take the volume over from its current writer (which is fenced) instead of being refused.
    #[arg(long)]
    pub takeover: bool,
}

impl VolumeCmd {
    /// The global flags this command runs with.
    pub fn global(&self, g: &Global) -> Global {
        let mut g = g.clone();
        if matches!(self, VolumeCmd::Import(_)) {
            g.request_timeout = g.request_timeout.max(IMPORT_TIMEOUT_SECS);
        }
        g
    }
}

/// Parses a size: bytes, or a number with a K, M, G or T suffix (binary
/// units, an optional trailing "iB" or "B"); it must be a positive multiple
/// of 4 KiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("size must be bytes or a number with a K, M, G or T suffix (e.g. 10G), got {s:?}");
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix("ib")).unwrap_or(t);
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| format!("size {s:?} is too large"))?;
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(|| format!("size {s:?} is too large"))?;
    if bytes == 0 {
        return Err("size must be positive".to_owned());
    }
    if !bytes.is_multiple_of(BLOCK) {
        return Err(format!("size must be a multiple of 4 KiB ({BLOCK} bytes), got {bytes}"));
    }
    Ok(bytes)
}

/// Bytes in the largest binary unit that keeps the number at least 1.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if bytes.is_multiple_of(scale) {
        format!("{} {}", bytes / scale, UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / scale as f64, UNITS[unit])
    }
}

fn writer_text(v: &pb::Volume) -> String {
    v.writer.as_ref().map(|w| format!("{} on {}", w.holder, w.node_id)).unwrap_or_default()
}

const LIST_HEADERS: &[&str] = &["ID", "NAME", "SIZE", "REPLICAS", "STATE", "WRITER", "SNAPSHOTS", "WARNING"];

fn list_row(v: &pb::Volume) -> Vec<String> {
    vec![
        v.id.clone(),
        v.name.clone(),
        human(v.size_bytes),
        v.replicas.to_string(),
        v.state.clone(),
        writer_text(v),
        v.snapshots.len().to_string(),
        v.warning.clone(),
    ]
}

/// A volume's fields as FIELD/VALUE rows.
fn field_rows(v: &pb::Volume) -> Vec<Vec<String>> {
    let mut nodes: Vec<&String> = v.placement.iter().flat_map(|p| &p.node_ids).collect();
    nodes.sort();
    nodes.dedup();
    let placement = format!(
        "{} extent(s) of {} on {} node(s): {}",
        v.placement.len(),
        human(v.extent_size_bytes),
        nodes.len(),
        nodes.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
    );
    let snapshots = v.snapshots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
    vec![
        vec!["id".into(), v.id.clone()],
        vec!["name".into(), v.name.clone()],
        vec!["state".into(), v.state.clone()],
        vec!["size".into(), format!("{} ({} bytes)", human(v.size_bytes), v.size_bytes)],
        vec!["replicas".into(), v.replicas.to_string()],
        vec!["placement".into(), placement],
        vec!["generation".into(), v.generation.to_string()],
        vec!["writer".into(), writer_text(v)],
        vec!["origin".into(), v.origin.clone()],
        vec!["warning".into(), v.warning.clone()],
        vec!["snapshots".into(), snapshots],
        vec!["created (unix ms)".into(), v.created_at_ms.to_string()],
    ]
}

/// One volume after a change: its fields, or its JSON.
fn print_volume(format: Format, v: pb::Volume) -> Result<(), CliError> {
    let rows = field_rows(&v);
    output::print(format, &v, &["FIELD", "VALUE"], rows)
}

fn print_detail(format: Format, d: pb::VolumeDetail) -> Result<(), CliError> {
    match format {
        Format::Json => output::print(format, &d, &[], vec![]),
        Format::Table => {
            let volume = d.volume.unwrap_or_default();
            print!("{}", output::table(&["FIELD", "VALUE"], &field_rows(&volume)));
            let rows: Vec<Vec<String>> = d
                .extents
                .iter()
                .flat_map(|e| {
                    e.copies.iter().map(move |c| {
                        vec![
                            e.index.to_string(),
                            c.node_id.clone(),
                            c.address.clone(),
                            c.state.clone(),
                            c.written_blocks.to_string(),
                        ]
                    })
                })
                .collect();
            println!();
            print!("{}", output::table(&["EXTENT", "NODE", "ADDRESS", "COPY", "BLOCKS"], &rows));
            if d.extents.len() < volume.placement.len() {
                println!("(health of the first {} of {} extents)", d.extents.len(), volume.placement.len());
            }
            Ok(())
        }
    }
}

fn print_snapshots(format: Format, snaps: Vec<pb::Snapshot>) -> Result<(), CliError> {
    let rows = snaps.iter().map(|s| vec![s.name.clone(), s.created_at_ms.to_string()]).collect();
    output::print(format, &snaps, &["NAME", "CREATED (UNIX MS)"], rows)
}

pub async fn run(ctx: Ctx, cmd: VolumeCmd) -> Result<(), CliError> {
    let mut c = VolumeServiceClient::new(ctx.channel.clone());
    let vref = |v: String| pb::VolumeRef { volume: v };
    match cmd {
        VolumeCmd::Create { name, size, replicas } => {
            let req = pb::CreateVolumeRequest { name, size_bytes: size, replicas: replicas.unwrap_or(0) };
            print_volume(ctx.output, c.create(req).await?.into_inner())
        }
        VolumeCmd::List => {
            let vols = c.list(pb::ListVolumesRequest {}).await?.into_inner().volumes;
            let rows = vols.iter().map(list_row).collect();
            output::print(ctx.output, &vols, LIST_HEADERS, rows)
        }
        VolumeCmd::Show { volume } => print_detail(ctx.output, c.get(vref(volume)).await?.into_inner()),
        VolumeCmd::Resize { volume, size } => {
            let req = pb::ResizeVolumeRequest { volume, size_bytes: size };
            print_volume(ctx.output, c.resize(req).await?.into_inner())
        }
        VolumeCmd::Delete { volume, force } => {
            let v = c.delete(pb::DeleteVolumeRequest { volume, force }).await?.into_inner();
            match ctx.output {
                Format::Json => print_volume(ctx.output, v),
                Format::Table => {
                    println!("deleting {} ({}); its space is reclaimed in the background", v.name, v.id);
                    Ok(())
                }
            }
        }
        VolumeCmd::Snapshot(SnapshotCmd::Create { volume, snapshot }) => {
            let v = c.create_snapshot(pb::SnapshotRequest { volume, snapshot }).await?.into_inner();
            print_snapshots(ctx.output, v.snapshots)
        }
        VolumeCmd::Snapshot(SnapshotCmd::List { volume }) => {
            print_snapshots(ctx.output, c.list_snapshots(vref(volume)).await?.into_inner().snapshots)
        }
        VolumeCmd::Snapshot(SnapshotCmd::Delete { volume, snapshot }) => {
            let v = c.delete_snapshot(pb::SnapshotRequest { volume, snapshot }).await?.into_inner();
            print_snapshots(ctx.output, v.snapshots)
        }
        VolumeCmd::Clone { volume, snapshot, name } => {
            // Spelled out: `c.clone(..)` would find `Clone::clone` before the RPC.
            let req = pb::CloneVolumeRequest { volume, snapshot, name };
            let v = VolumeServiceClient::clone(&mut c, req).await?.into_inner();
            print_volume(ctx.output, v)
        }
        VolumeCmd::Release { volume } => {
            print_volume(ctx.output, c.release(vref(volume)).await?.into_inner())
        }
        VolumeCmd::Scrub { volume } => {
            let r = c.scrub(vref(volume)).await?.into_inner();
            let row = vec![
                r.extents.to_string(),
                r.corrupt.to_string(),
                r.repaired_blocks.to_string(),
                r.unreachable_node_ids.join(", "),
            ];
            output::print(ctx.output, &r, &["EXTENTS", "CORRUPT", "REPAIRED", "UNREACHABLE"], vec![row])
        }
        VolumeCmd::Import(a) => import(&mut c, ctx.output, a).await,
    }
}

pub fn read_error(path: &Path, e: std::io::Error) -> CliError {
    CliError::Status(format!("cannot read {}: {e}", path.display()))
}

/// `path` opened at its start, and its size (seeking finds the size of block
/// devices too, whose metadata says 0). An empty file is refused: nothing to `verb`.
pub fn open_sized(path: &Path, verb: &str) -> Result<(std::fs::File, u64), CliError> {
    let mut file = std::fs::File::open(path).map_err(|e| read_error(path, e))?;
    let total = file.seek(SeekFrom::End(0)).map_err(|e| read_error(path, e))?;
    file.seek(SeekFrom::Start(0)).map_err(|e| read_error(path, e))?;
    if total == 0 {
        return Err(CliError::Status(format!("{} is empty: nothing to {verb}", path.display())));
    }
    Ok((file, total))
}

/// Streams `file` (`total` bytes from its start) to a client-streaming call:
/// `first`, then `chunk(offset, data)` messages of `chunk_len` bytes, with a
/// progress bar that says `done` once everything is read. The file is read on
/// a blocking thread; a bounded channel paces it to what the server takes.
pub async fn stream_file<Req, Resp, Call, Fut>(
    (file, total, path): (std::fs::File, u64, &Path),
    chunk_len: usize,
    first: Req,
    chunk: impl Fn(u64, Vec<u8>) -> Req + Send + 'static,
    done: &'static str,
    call: Call,
) -> Result<Resp, CliError>
where
    Req: Send + 'static,
    Call: FnOnce(tokio_stream::wrappers::ReceiverStream<Req>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Req>(4);
    tx.send(first).await.map_err(|_| CliError::Status("the stream closed before it started".into()))?;
    let bar = progress_bar(total);
    let reader_bar = bar.clone();
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut src = file.take(total);
        let mut offset = 0u64;
        loop {
            let mut data = Vec::with_capacity(chunk_len);
            let n = (&mut src).take(chunk_len as u64).read_to_end(&mut data)?;
            if n == 0 {
                reader_bar.set_message(done);
                return Ok(());
            }
            // A closed stream means the call ended; its status says why.
            if tx.blocking_send(chunk(offset, data)).is_err() {
                return Ok(());
            }
            reader_bar.inc(n as u64);
            offset += n as u64;
        }
    });
    let result = call(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    let read = reader.await;
    bar.finish_and_clear();
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(read_error(path, e)),
        Err(e) => return Err(CliError::Status(format!("reading {} failed: {e}", path.display()))),
    }
    Ok(result?.into_inner())
}

/// A byte progress bar on standard error, or none when that is not a terminal.
pub fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("the template is a constant known to parse")
        .progress_chars("=> "),
    );
    bar
}

/// Finds or creates the import's target; true when it is new (and so reads
/// as zeroes, which lets the server skip zero blocks).
async fn import_target(
    c: &mut VolumeServiceClient<Channel>,
    a: &ImportArgs,
    file_size: u64,
) -> Result<(String, bool), CliError> {
    let name = match (&a.volume, &a.name) {
        (Some(v), _) => return Ok((v.clone(), false)),
        (None, Some(n)) => n.clone(),
        (None, None) => return Err(CliError::Status("give --name or --volume".into())),
    };
    // ListSnapshots is the cheapest call that says whether a volume exists.
    match c.list_snapshots(pb::VolumeRef { volume: name.clone() }).await {
        Ok(_) => return Ok((name, false)),
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(s.into()),
    }
    let size = file_size.next_multiple_of(BLOCK);
    match c.create(pb::CreateVolumeRequest { name: name.clone(), size_bytes: size, replicas: 0 }).await {
        Ok(v) => {
            let v = v.into_inner();
            eprintln!("created volume {} ({}, {})", v.name, v.id, human(v.size_bytes));
            if !v.warning.is_empty() {
                eprintln!("warning: {}", v.warning);
            }
            Ok((name, true))
        }
        // Created by someone else meanwhile: import into it as into any existing volume.
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok((name, false)),
        Err(s) => Err(s.into()),
    }
}

/// An import's answer with the volume it went into, which the answer itself
/// does not name.
#[derive(Debug, Serialize)]
struct Imported {
    volume: String,
    #[serde(flatten)]
    response: pb::ImportResponse,
}

async fn import(c: &mut VolumeServiceClient<Channel>, format: Format, a: ImportArgs) -> Result<(), CliError> {
    let (file, total) = open_sized(&a.file, "import")?;
    let (volume, sparse) = import_target(c, &a, total).await?;
    let start = pb::ImportStart { volume: volume.clone(), takeover: a.takeover, total_bytes: total, sparse };
    let r = stream_file(
        (file, total, &a.file),
        IMPORT_CHUNK,
        pb::ImportRequest { msg: Some(Msg::Start(start)) },
        |offset, data| pb::ImportRequest { msg: Some(Msg::Chunk(pb::ImportChunk { offset, data })) },
        // What was sent is still in buffers on its way to the replicas.
        "flushing",
        |s| c.import(s),
    )
    .await?;
    let row = vec![volume.clone(), human(r.bytes_written), human(r.bytes_skipped), r.generation.to_string()];
    let imported = Imported { volume, response: r };
    output::print(format, &imported, &["VOLUME", "WRITTEN", "SKIPPED (ZERO)", "GENERATION"], vec![row])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10GB"), Ok(10 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size(" 1G "), Ok(1 << 30));
    }

    #[test]
    fn bad_sizes_are_refused_with_the_rule() {
        assert!(parse_size("12345").unwrap_err().contains("multiple of 4 KiB"));
        assert!(parse_size("1K").unwrap_err().contains("multiple of 4 KiB"));
        assert!(parse_size("0").unwrap_err().contains("positive"));
        assert!(parse_size("0G").unwrap_err().contains("positive"));
        for bad in ["", "G", "ten", "1.5G", "-4K", "10X", "10 G", "0x1000"] {
            assert!(parse_size(bad).unwrap_err().contains("K, M, G or T suffix"), "{bad:?}");
        }
        assert!(parse_size("99999999999T").unwrap_err().contains("too large"));
        assert!(parse_size("999999999999999999999").unwrap_err().contains("too large"));
    }

    #[test]
    fn sizes_print_in_the_largest_whole_unit() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(4096), "4 KiB");
        assert_eq!(human(10 << 30), "10 GiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(5 << 40), "5 TiB");
    }
}
