//! `VolumeService`: the pool's block volumes, their snapshots and clones, and
//! importing images into them.
//!
//! Every call can be answered by any node: volume records live in meta and
//! change by compare-and-swap, and an import writes to the replicas over the
//! network from whichever node received the stream.

use nodeos_block::controller::{self, CopyHealth, ExtentHealth, ScrubReport};
use nodeos_block::device::{BLOCK_SIZE, BlockDevice};
use nodeos_block::volumes::{NewVolume, Volumes};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::import_request::Msg;
use nodeos_proto::v1::volume_service_server::VolumeService;
use nodeos_types::records::{SnapshotRecord, VolumeRecord, VolumeState, VolumeWriter};
use tokio::task::JoinSet;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::error::{device_status, volume_status};

/// Largest `ImportChunk.data`; the server's message limit leaves room for it.
pub const MAX_IMPORT_CHUNK: usize = 4 << 20;
/// Who an import shows as in the volume's writer slot.
pub const IMPORT_HOLDER: &str = "import";
/// Writes of one import in flight at once, so the replicas stay busy while
/// the next chunk crosses the network.
const IMPORT_WINDOW: usize = 4;
const BS: u64 = BLOCK_SIZE as u64;

#[derive(Debug, Clone)]
pub struct VolumeApi {
    volumes: Volumes,
}

impl VolumeApi {
    pub fn new(volumes: Volumes) -> Self {
        VolumeApi { volumes }
    }
}

fn state_str(s: VolumeState) -> &'static str {
    match s {
        VolumeState::Available => "available",
        VolumeState::Deleting => "deleting",
    }
}

fn snapshot_to_pb(s: &SnapshotRecord) -> pb::Snapshot {
    pb::Snapshot { name: s.name.clone(), created_at_ms: s.created_at_ms }
}

fn writer_to_pb(w: VolumeWriter) -> pb::VolumeWriter {
    pb::VolumeWriter { node_id: w.node.to_string(), holder: w.holder, since_ms: w.since_ms }
}

/// The record as the API shows it; `placement` only when asked, because a
/// large volume's placement dwarfs the rest of the record.
fn to_pb(r: VolumeRecord, placement: bool) -> pb::Volume {
    pb::Volume {
        id: r.id.to_string(),
        placement: if placement {
            r.placement
                .iter()
                .map(|set| pb::ExtentPlacement { node_ids: set.iter().map(|n| n.to_string()).collect() })
                .collect()
        } else {
            Vec::new()
        },
        snapshots: r.snapshots.iter().map(snapshot_to_pb).collect(),
        name: r.name,
        size_bytes: r.size_bytes,
        extent_size_bytes: r.extent_size,
        replicas: r.replicas.into(),
        generation: r.generation,
        writer: r.writer.map(writer_to_pb),
        origin: r.origin.unwrap_or_default(),
        state: state_str(r.state).to_owned(),
        warning: r.warning,
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
    }
}

fn copy_to_pb(c: CopyHealth) -> pb::CopyHealth {
    pb::CopyHealth {
        node_id: c.node.to_string(),
        address: c.address,
        state: c.state.as_str().to_owned(),
        written_blocks: c.written_blocks,
    }
}

fn extent_to_pb(e: ExtentHealth) -> pb::ExtentHealth {
    pb::ExtentHealth { index: e.index, copies: e.copies.into_iter().map(copy_to_pb).collect() }
}

fn scrub_to_pb(r: ScrubReport) -> pb::ScrubReport {
    pb::ScrubReport {
        extents: r.extents,
        corrupt: r.corrupt,
        repaired_blocks: r.repaired_blocks,
        unreachable_node_ids: r.unreachable.iter().map(|n| n.to_string()).collect(),
    }
}

#[tonic::async_trait]
impl VolumeService for VolumeApi {
    async fn create(&self, req: Request<pb::CreateVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let replicas = (r.replicas != 0).then_some(r.replicas);
        let rec = self
            .volumes
            .create(NewVolume { name: r.name, size_bytes: r.size_bytes, replicas })
            .await
            .map_err(volume_status)?;
        Ok(Response::new(to_pb(rec, true)))
    }

    async fn list(
        &self,
        _req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let mut all = self.volumes.list().await.map_err(volume_status)?;
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: all.into_iter().map(|r| to_pb(r, false)).collect(),
        }))
    }

    async fn get(&self, req: Request<pb::VolumeRef>) -> Result<Response<pb::VolumeDetail>, Status> {
        let (rec, _) = self.volumes.get(&req.get_ref().volume).await.map_err(volume_status)?;
        let extents = controller::health(&self.volumes, &rec).await;
        Ok(Response::new(pb::VolumeDetail {
            volume: Some(to_pb(rec, true)),
            extents: extents.into_iter().map(extent_to_pb).collect(),
        }))
    }

    async fn resize(&self, req: Request<pb::ResizeVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let rec = self.volumes.resize(&r.volume, r.size_bytes).await.map_err(volume_status)?;
        Ok(Response::new(to_pb(rec, true)))
    }

    async fn delete(&self, req: Request<pb::DeleteVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let rec = self.volumes.delete(&r.volume, r.force).await.map_err(volume_status)?;
        Ok(Response::new(to_pb(rec, true)))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let rec = self.volumes.snapshot(&r.volume, &r.snapshot).await.map_err(volume_status)?;
        Ok(Response::new(to_pb(rec, true)))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let (rec, _) = self.volumes.get(&req.get_ref().volume).await.map_err(volume_status)?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: rec.snapshots.iter().map(snapshot_to_pb).collect(),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let rec = self.volumes.delete_snapshot(&r.volume, &r.snapshot).await.map_err(volume_status)?;
        Ok(Response::new(to_pb(rec, true)))
    }

    async fn clone(&self, req: Request<pb::CloneVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let rec =
            self.volumes.clone_snapshot(&r.volume, &r.snapshot, &r.name).await.map_err(volume_status)?;
        Ok(Response::new(to_pb(rec, true)))
    }

    async fn release(&self, req: Request<pb::VolumeRef>) -> Result<Response<pb::Volume>, Status> {
        let rec = self.volumes.release(&req.get_ref().volume).await.map_err(volume_status)?;
        Ok(Response::new(to_pb(rec, true)))
    }

    async fn scrub(&self, req: Request<pb::VolumeRef>) -> Result<Response<pb::ScrubReport>, Status> {
        let report =
            controller::scrub_volume(&self.volumes, &req.get_ref().volume).await.map_err(volume_status)?;
        Ok(Response::new(scrub_to_pb(report)))
    }

    async fn import(
        &self,
        req: Request<Streaming<pb::ImportRequest>>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        // The import runs in its own task: if the client goes away, the
        // server drops this future, but the task still sees the stream fail
        // and gives the writer slot back.
        let task = tokio::spawn(import(self.volumes.clone(), req.into_inner()));
        let resp = task.await.map_err(|e| Status::internal(format!("import task failed: {e}")))??;
        Ok(Response::new(resp))
    }
}

/// One import: takes the writer slot, writes the stream, flushes, and always
/// gives the slot back.
async fn import(
    volumes: Volumes,
    mut input: Streaming<pb::ImportRequest>,
) -> Result<pb::ImportResponse, Status> {
    let start = match input.message().await? {
        Some(pb::ImportRequest { msg: Some(Msg::Start(s)) }) => s,
        _ => return Err(Status::invalid_argument("the first import message must be an ImportStart")),
    };
    if start.volume.is_empty() {
        return Err(Status::invalid_argument("start.volume must name the volume to import into"));
    }
    // Checked before opening: a refused import must not fence the writer
    // it would take over from. Volumes only grow, so the size still holds.
    let (rec, _) = volumes.get(&start.volume).await.map_err(volume_status)?;
    let mut plan = ImportPlan::new(rec.size_bytes, start.total_bytes, start.sparse)?;
    let client =
        volumes.open(&start.volume, IMPORT_HOLDER, false, start.takeover).await.map_err(volume_status)?;
    let generation = client.generation();
    let id = client.layout().volume;
    let mut writes = JoinSet::new();
    let result = async {
        while let Some(m) = input.message().await? {
            let chunk = match m.msg {
                Some(Msg::Chunk(c)) => c,
                Some(Msg::Start(_)) => {
                    return Err(Status::invalid_argument(
                        "only the first import message may be an ImportStart",
                    ));
                }
                None => return Err(Status::invalid_argument("an import message must carry a chunk")),
            };
            for (offset, data) in plan.chunk(chunk.offset, chunk.data)? {
                while writes.len() >= IMPORT_WINDOW {
                    wait_one(&mut writes).await?;
                }
                let c = client.clone();
                writes.spawn(async move { c.write(offset, data, false).await });
            }
        }
        while !writes.is_empty() {
            wait_one(&mut writes).await?;
        }
        plan.finish()?;
        client.flush().await.map_err(|e| device_status(&e))
    }
    .await;
    // No write of this import may land after the slot is given back: the
    // writes still running after a failure are stopped and waited for first.
    writes.shutdown().await;
    drop(client);
    if let Err(e) = volumes.close_writer(id, generation).await {
        warn!(
            volume = %id,
            generation,
            error = %nodeos_types::error_chain(&e),
            "import could not give the writer slot back; `nodeos volume release` frees it"
        );
    }
    match result {
        Ok(()) => {
            info!(volume = %id, generation, written = plan.written, skipped = plan.skipped, "image imported");
            Ok(pb::ImportResponse { bytes_written: plan.written, bytes_skipped: plan.skipped, generation })
        }
        Err(e) => {
            warn!(volume = %id, generation, error = %e.message(), "import failed");
            Err(e)
        }
    }
}

/// Waits for one in-flight write; the set must not be empty.
async fn wait_one(writes: &mut JoinSet<Result<(), nodeos_block::device::DeviceError>>) -> Result<(), Status> {
    match writes.join_next().await {
        Some(Ok(Ok(()))) | None => Ok(()),
        Some(Ok(Err(e))) => Err(device_status(&e)),
        Some(Err(e)) => Err(Status::internal(format!("import write task failed: {e}"))),
    }
}

/// The rules of an import stream, sans-IO: checks each chunk and turns it
/// into the writes to issue.
#[derive(Debug)]
struct ImportPlan {
    size: u64,
    total: u64,
    sparse: bool,
    /// Lowest offset the next chunk may start at.
    next: u64,
    received: u64,
    /// A chunk ended off a block boundary: it had to be the last.
    ended_short: bool,
    written: u64,
    skipped: u64,
}

impl ImportPlan {
    fn new(size: u64, total: u64, sparse: bool) -> Result<Self, Status> {
        if total > size {
            return Err(Status::invalid_argument(format!(
                "start.total_bytes must be at most the volume's size of {size} bytes, got {total}; resize the volume first"
            )));
        }
        Ok(ImportPlan {
            size,
            total,
            sparse,
            next: 0,
            received: 0,
            ended_short: false,
            written: 0,
            skipped: 0,
        })
    }

    /// Checks one chunk and returns the writes it becomes (block-aligned,
    /// zero blocks left out when sparse).
    fn chunk(&mut self, offset: u64, mut data: Vec<u8>) -> Result<Vec<(u64, Vec<u8>)>, Status> {
        let len = data.len() as u64;
        if data.is_empty() || data.len() > MAX_IMPORT_CHUNK {
            return Err(Status::invalid_argument(format!(
                "chunk.data must be 1..={MAX_IMPORT_CHUNK} bytes, got {len}"
            )));
        }
        if !offset.is_multiple_of(BS) {
            return Err(Status::invalid_argument(format!(
                "chunk.offset must be a multiple of {BS}, got {offset}"
            )));
        }
        if self.ended_short {
            return Err(Status::invalid_argument(format!(
                "chunk.data must be a multiple of {BS} bytes except in the last chunk; a chunk after a short one arrived at offset {offset}"
            )));
        }
        if offset < self.next {
            return Err(Status::invalid_argument(format!(
                "chunk.offset must be at least {} (chunks come in ascending order without overlap), got {offset}",
                self.next
            )));
        }
        if self.received + len > self.total {
            return Err(Status::invalid_argument(format!(
                "the chunks carry more than start.total_bytes ({}): {} bytes so far",
                self.total,
                self.received + len
            )));
        }
        let padded = len.next_multiple_of(BS);
        if offset.checked_add(padded).is_none_or(|end| end > self.size) {
            return Err(Status::invalid_argument(format!(
                "chunk.offset + its length must be at most the volume's size of {} bytes, got {offset} + {len}",
                self.size
            )));
        }
        self.ended_short = padded != len;
        data.resize(padded as usize, 0);
        self.received += len;
        self.next = offset + padded;
        if !self.sparse {
            self.written += padded;
            return Ok(vec![(offset, data)]);
        }
        // Runs of consecutive non-zero blocks, each one write.
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut run: Option<(usize, usize)> = None;
        for (i, block) in data.chunks_exact(BS as usize).enumerate() {
            let at = i * BS as usize;
            if block.iter().all(|&b| b == 0) {
                self.skipped += BS;
                if let Some((s, e)) = run.take() {
                    writes.push((offset + s as u64, data[s..e].to_vec()));
                }
            } else {
                self.written += BS;
                run = Some(run.map_or((at, at + BS as usize), |(s, _)| (s, at + BS as usize)));
            }
        }
        if let Some((s, e)) = run {
            writes.push((offset + s as u64, data[s..e].to_vec()));
        }
        Ok(writes)
    }

    /// Checks that the stream carried everything it announced.
    fn finish(&self) -> Result<(), Status> {
        if self.received != self.total {
            return Err(Status::invalid_argument(format!(
                "the stream ended after {} of start.total_bytes ({}) bytes",
                self.received, self.total
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K4: usize = 4096;

    #[test]
    fn dense_import_pads_the_last_chunk() {
        let mut p = ImportPlan::new(16 * 4096, 2 * 4096 + 10, false).unwrap();
        let w = p.chunk(0, vec![1; 2 * K4]).unwrap();
        assert_eq!(w, vec![(0, vec![1; 2 * K4])]);
        let w = p.chunk(2 * 4096, vec![2; 10]).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].0, 2 * 4096);
        assert_eq!(w[0].1.len(), K4);
        assert_eq!(&w[0].1[..10], &[2; 10]);
        assert!(w[0].1[10..].iter().all(|&b| b == 0));
        p.finish().unwrap();
        assert_eq!((p.written, p.skipped), (3 * 4096, 0));
    }

    #[test]
    fn sparse_import_skips_zero_blocks_and_joins_runs() {
        let mut p = ImportPlan::new(16 * 4096, 6 * 4096, true).unwrap();
        let mut data = vec![0u8; 6 * K4];
        data[K4..3 * K4].fill(7);
        data[5 * K4 + 1] = 1;
        let w = p.chunk(4096, data).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].0, w[0].1.len()), (2 * 4096, 2 * K4));
        assert_eq!((w[1].0, w[1].1.len()), (6 * 4096, K4));
        assert_eq!((p.written, p.skipped), (3 * 4096, 3 * 4096));
        assert!(p.chunk(7 * 4096, vec![0; K4]).is_err(), "more than total_bytes");
    }

    #[test]
    fn bad_chunks_are_refused_with_the_field_named() {
        assert!(ImportPlan::new(4096, 4097, false).unwrap_err().message().contains("start.total_bytes"));
        let mut p = ImportPlan::new(8 * 4096, 8 * 4096, false).unwrap();
        let msg = |r: Result<_, Status>| r.unwrap_err().message().to_owned();
        assert!(msg(p.chunk(0, vec![])).contains("chunk.data must be 1..=4194304"));
        assert!(msg(p.chunk(0, vec![0; MAX_IMPORT_CHUNK + 1])).contains("chunk.data"));
        assert!(msg(p.chunk(512, vec![1; K4])).contains("chunk.offset must be a multiple of 4096"));
        assert!(msg(p.chunk(8 * 4096, vec![1; K4])).contains("volume's size"));
        p.chunk(4096, vec![1; K4]).unwrap();
        assert!(msg(p.chunk(0, vec![1; K4])).contains("ascending"));
        p.chunk(2 * 4096, vec![1; 100]).unwrap();
        assert!(msg(p.chunk(3 * 4096, vec![1; K4])).contains("except in the last chunk"));
        assert!(p.finish().unwrap_err().message().contains("ended after"));
    }
}
