//! `VolumeService`: the pool's block volumes, their snapshots and clones, and
//! importing images into them.
//!
//! Every call can be answered by any node: volume records live in meta and
//! change by compare-and-swap, and an import writes to the replicas over the
//! network from whichever node received the stream.

use futures::StreamExt;
use nodeos_compute::images::Images;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::import_request::Msg;
use nodeos_proto::v1::volume_service_server::VolumeService;
use nodeos_types::records::{SnapshotRecord, VolumeRecord, VolumeState, VolumeWriter};
use nodeos_volumes::health::{self, CopyHealth, ExtentHealth, ScrubReport};
use nodeos_volumes::import::{Import, ImportError, ImportStart};
use nodeos_volumes::{NewVolume, Volumes};
use tonic::{Request, Response, Status, Streaming};

use crate::error::{image_status, import_status, volume_status};

/// Largest `ImportChunk.data`; the server's message limit leaves room for it.
pub use nodeos_volumes::import::MAX_IMPORT_CHUNK;

#[derive(Debug, Clone)]
pub struct VolumeApi {
    volumes: Volumes,
    /// Images own their volumes: deleting one goes through its image.
    images: Images,
}

impl VolumeApi {
    pub fn new(volumes: Volumes, images: Images) -> Self {
        VolumeApi { volumes, images }
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
        let extents = health::health(&self.volumes, &rec).await;
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
        let (target, _) = self.volumes.get(&r.volume).await.map_err(volume_status)?;
        let images = self.images.list().await.map_err(image_status)?;
        if let Some(image) = images.iter().find(|i| i.volume == target.id) {
            return Err(Status::failed_precondition(format!(
                "volume {} holds image {}; `nodeos image delete {}` deletes both",
                target.name, image.name, image.name
            )));
        }
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
            health::scrub_volume(&self.volumes, &req.get_ref().volume).await.map_err(volume_status)?;
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

/// One import: the stream's messages fed to an [`Import`], which always
/// gives the writer slot back.
async fn import(
    volumes: Volumes,
    mut input: Streaming<pb::ImportRequest>,
) -> Result<pb::ImportResponse, Status> {
    let start = match input.message().await? {
        Some(pb::ImportRequest { msg: Some(Msg::Start(s)) }) => s,
        _ => return Err(Status::invalid_argument("the first import message must be an ImportStart")),
    };
    let start = ImportStart {
        volume: start.volume,
        total_bytes: start.total_bytes,
        sparse: start.sparse,
        takeover: start.takeover,
    };
    let job = Import::start(&volumes, start).await.map_err(import_status)?;
    let chunks = input.map(|m| match m {
        Ok(pb::ImportRequest { msg: Some(Msg::Chunk(c)) }) => Ok((c.offset, c.data)),
        Ok(pb::ImportRequest { msg: Some(Msg::Start(_)) }) => {
            Err(ImportError::Invalid("only the first import message may be an ImportStart".into()))
        }
        Ok(pb::ImportRequest { msg: None }) => {
            Err(ImportError::Invalid("an import message must carry a chunk".into()))
        }
        Err(s) => Err(ImportError::Invalid(format!("the import stream broke: {}", s.message()))),
    });
    let summary = job.run(chunks).await.map_err(import_status)?;
    Ok(pb::ImportResponse {
        bytes_written: summary.written,
        bytes_skipped: summary.skipped,
        generation: summary.generation,
    })
}
