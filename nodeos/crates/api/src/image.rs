//! `ImageService`: guest kernels and initramfs images stored in the pool.
//!
//! Every call can be answered by any node: image records live in meta, and
//! an upload writes its volume's replicas over the network from whichever
//! node received the stream.

use futures::StreamExt;
use nodeos_compute::images::{ImageError, Images, UploadStart};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::image_service_server::ImageService;
use nodeos_proto::v1::upload_image_request::Msg;
use nodeos_types::records::{ImageKind, ImageRecord};
use tonic::{Request, Response, Status, Streaming};

use crate::error::image_status;

/// Largest `UploadImageChunk.data`; the server's message limit leaves room for it.
pub use nodeos_compute::images::MAX_UPLOAD_CHUNK;

#[derive(Debug, Clone)]
pub struct ImageApi {
    images: Images,
}

impl ImageApi {
    pub fn new(images: Images) -> Self {
        ImageApi { images }
    }
}

fn kind_to_pb(k: ImageKind) -> pb::ImageKind {
    match k {
        ImageKind::Kernel => pb::ImageKind::Kernel,
        ImageKind::Initrd => pb::ImageKind::Initrd,
    }
}

fn kind_from_pb(k: i32) -> Result<ImageKind, Status> {
    match pb::ImageKind::try_from(k) {
        Ok(pb::ImageKind::Kernel) => Ok(ImageKind::Kernel),
        Ok(pb::ImageKind::Initrd) => Ok(ImageKind::Initrd),
        _ => Err(Status::invalid_argument(format!("start.kind must be kernel or initrd, got {k}"))),
    }
}

fn to_pb(r: ImageRecord) -> pb::Image {
    pb::Image {
        id: r.id.to_string(),
        name: r.name,
        kind: kind_to_pb(r.kind) as i32,
        size_bytes: r.size_bytes,
        sha256: r.sha256,
        volume_id: r.volume.to_string(),
        format: r.kernel.map(|k| k.format.to_string()).unwrap_or_default(),
        created_at_ms: r.created_at_ms,
    }
}

#[tonic::async_trait]
impl ImageService for ImageApi {
    async fn upload(
        &self,
        req: Request<Streaming<pb::UploadImageRequest>>,
    ) -> Result<Response<pb::Image>, Status> {
        // In its own task, as an import: if the client goes away the server
        // drops this future, but the task still sees the stream fail and
        // cleans up after itself.
        let task = tokio::spawn(upload(self.images.clone(), req.into_inner()));
        let image = task.await.map_err(|e| Status::internal(format!("upload task failed: {e}")))??;
        Ok(Response::new(image))
    }

    async fn list(
        &self,
        _req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let mut all = self.images.list().await.map_err(image_status)?;
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(pb::ListImagesResponse { images: all.into_iter().map(to_pb).collect() }))
    }

    async fn get(&self, req: Request<pb::ImageRef>) -> Result<Response<pb::Image>, Status> {
        let r = self.images.get(&req.get_ref().image).await.map_err(image_status)?;
        Ok(Response::new(to_pb(r)))
    }

    async fn delete(&self, req: Request<pb::ImageRef>) -> Result<Response<pb::Image>, Status> {
        let r = self.images.delete(&req.get_ref().image).await.map_err(image_status)?;
        Ok(Response::new(to_pb(r)))
    }
}

/// One upload: the stream's start checked and its chunks handed to [`Images::upload`].
async fn upload(images: Images, mut input: Streaming<pb::UploadImageRequest>) -> Result<pb::Image, Status> {
    let start = match input.message().await? {
        Some(pb::UploadImageRequest { msg: Some(Msg::Start(s)) }) => s,
        _ => return Err(Status::invalid_argument("the first upload message must be an UploadImageStart")),
    };
    let start = UploadStart {
        kind: kind_from_pb(start.kind)?,
        name: start.name,
        total_bytes: start.total_bytes,
        sha256: start.sha256,
    };
    let chunks = input.map(|m| match m {
        Ok(pb::UploadImageRequest { msg: Some(Msg::Chunk(c)) }) => Ok(c.data),
        Ok(pb::UploadImageRequest { msg: Some(Msg::Start(_)) }) => {
            Err(ImageError::Invalid("only the first upload message may be an UploadImageStart".into()))
        }
        Ok(pb::UploadImageRequest { msg: None }) => {
            Err(ImageError::Invalid("an upload message must carry a chunk".into()))
        }
        Err(s) => Err(ImageError::Invalid(format!("the upload stream broke: {}", s.message()))),
    });
    let r = images.upload(start, chunks).await.map_err(image_status)?;
    Ok(to_pb(r))
}
