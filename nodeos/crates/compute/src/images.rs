//! [`Images`]: guest kernels and initramfs images stored in the pool, so that a
//! VM on any node boots from them (`kernel = "image:<id>"`).
//!
//! An image is a record in meta (`images/<id>`, its name in `image-names/`)
//! and a replicated volume of its own (`image-<id>`) whose first `size_bytes`
//! bytes are the image. Both are written once and never change.
//!
//! Upload ([`Images::upload`]): the start is checked (name free, size within
//! its kind's limit); a kernel is received whole into memory (at most
//! [`MAX_KERNEL_BYTES`]), hashed and probed by the VMM's rules before
//! anything is created; an initramfs (at most [`MAX_INITRD_BYTES`]) streams
//! straight into its new volume and is hashed on the way. Either goes into
//! the volume through [`nodeos_volumes::import::Import`], the machinery of
//! `VolumeService.Import`. The record is written last; an upload that fails
//! after its volume was made deletes the volume, so a failed upload leaves
//! no image.
//!
//! A VM's node materialises an image into the VM's directory when it starts
//! it ([`Images::materialise`]): exactly `size_bytes` read from the volume,
//! checked against `sha256`, written under a name that holds the hash, and
//! reused at the next start.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use nodeos_block::device::{BLOCK_SIZE, BlockDevice, DeviceError};
use nodeos_meta::command::{Compare, Op, Txn};
use nodeos_meta::{Command, Consistency, MetaError, MetaHandle};
use nodeos_types::records::{
    IMAGES_PREFIX, ImageKind, ImageRecord, VMS_PREFIX, VmRecord, image_key, image_name_key, image_ref,
};
use nodeos_types::{ImageId, VolumeId, unix_millis};
use nodeos_vmm::boot::probe::{self, KernelError};
use nodeos_volumes::import::{Import, ImportError, ImportPlan, ImportStart, MAX_IMPORT_CHUNK};
use nodeos_volumes::{NewVolume, VolumeError, Volumes};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::spec::article;

/// Largest kernel image: distribution kernels are 10-15 MiB; room for debug builds.
pub const MAX_KERNEL_BYTES: u64 = 64 << 20;
/// Largest initramfs image: the guest unpacks it into its memory, and the
/// loader puts it below 3 GiB.
pub const MAX_INITRD_BYTES: u64 = 1 << 30;
/// Largest chunk of an upload, as of an import.
pub const MAX_UPLOAD_CHUNK: usize = MAX_IMPORT_CHUNK;
const BS: u64 = BLOCK_SIZE as u64;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The upload broke its rules; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("no image {0:?} in this pool")]
    NotFound(String),
    #[error("an image named {0:?} already exists")]
    NameTaken(String),
    #[error("image {image} is used by VM {vms}; delete the VM first")]
    InUse { image: String, vms: String },
    #[error("the kernel is not bootable")]
    NotBootable(#[source] KernelError),
    #[error("start.sha256 is {expected}, but the bytes received hash to {got}")]
    Sha256 { expected: String, got: String },
    #[error("image {name} is {} {found} image, not {} {wanted} image", article(found), article(wanted))]
    Kind { name: String, found: &'static str, wanted: &'static str },
    #[error("the image's volume")]
    Volume(#[source] Box<VolumeError>),
    #[error("writing the image into its volume")]
    Write(#[source] ImportError),
    #[error("reading the image from its volume")]
    Read(#[source] DeviceError),
    #[error("the {size} bytes read back hash to {got}, not to the image's {expected}")]
    Corrupt { size: u64, expected: String, got: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata store")]
    Meta(#[source] Box<MetaError>),
    #[error("stored record {0} does not decode")]
    Record(String),
    #[error("the image record changed while this request ran; retry")]
    Conflict,
}

impl From<MetaError> for ImageError {
    fn from(e: MetaError) -> Self {
        ImageError::Meta(Box::new(e))
    }
}

impl From<VolumeError> for ImageError {
    fn from(e: VolumeError) -> Self {
        ImageError::Volume(Box::new(e))
    }
}

/// What an upload announces before its first chunk.
#[derive(Debug, Clone)]
pub struct UploadStart {
    /// 1..=63 characters of a-z, 0-9, '-' and '_', unique in the pool.
    pub name: String,
    pub kind: ImageKind,
    /// Bytes the chunks carry in all: 1..= the kind's limit.
    pub total_bytes: u64,
    /// SHA-256 the bytes must hash to (64 hex digits); empty = not checked.
    pub sha256: String,
}

/// Largest image of a kind.
pub fn max_bytes(kind: ImageKind) -> u64 {
    match kind {
        ImageKind::Kernel => MAX_KERNEL_BYTES,
        ImageKind::Initrd => MAX_INITRD_BYTES,
    }
}

/// The name of an image's volume.
pub fn volume_name(id: ImageId) -> String {
    format!("image-{id}")
}

/// Whether a VM's kernel or initrd names the image.
pub fn uses(vm: &VmRecord, image: &ImageRecord) -> bool {
    let names =
        |source: &str| image_ref(source).is_some_and(|r| r == image.id.to_string() || r == image.name);
    names(&vm.spec.kernel) || vm.spec.initrd.as_deref().is_some_and(names)
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, ImageError> {
    serde_json::from_slice(value).map_err(|_| ImageError::Record(key.to_owned()))
}

fn check_start(s: &UploadStart) -> Result<(), ImageError> {
    if !crate::spec::valid_name(&s.name) {
        return Err(ImageError::Invalid(format!(
            "start.name must be 1..=63 characters of a-z, 0-9, '-' and '_', got {:?}",
            s.name.chars().take(80).collect::<String>()
        )));
    }
    let max = max_bytes(s.kind);
    if s.total_bytes == 0 || s.total_bytes > max {
        return Err(ImageError::Invalid(format!(
            "start.total_bytes must be 1..={max} ({} MiB) for {} images, got {}",
            max >> 20,
            s.kind.as_str(),
            s.total_bytes
        )));
    }
    if !s.sha256.is_empty() && (s.sha256.len() != 64 || !s.sha256.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(ImageError::Invalid(format!(
            "start.sha256 must be empty or 64 hex digits, got {:?}",
            s.sha256.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

/// The upload's own fault, as its import sees it.
fn stream_fault(e: ImageError) -> ImportError {
    ImportError::Invalid(nodeos_types::error_chain(&e))
}

/// The pool's images, seen from one node.
#[derive(Debug, Clone)]
pub struct Images {
    meta: MetaHandle,
    volumes: Volumes,
}

impl Images {
    pub fn new(meta: MetaHandle, volumes: Volumes) -> Self {
        Images { meta, volumes }
    }

    /// Every image of the pool (linearizable).
    pub async fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let (kvs, _) = self.meta.range(IMAGES_PREFIX, 0, Consistency::Linearizable).await?;
        kvs.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
    }

    /// An image by id or name (linearizable).
    pub async fn get(&self, image: &str) -> Result<ImageRecord, ImageError> {
        Ok(self.get_rev(image).await?.0)
    }

    /// An image by id or name, with its record's mod revision. A name may
    /// look like an id, so an id that names no image is tried as a name too.
    async fn get_rev(&self, image: &str) -> Result<(ImageRecord, u64), ImageError> {
        if let Ok(id) = image.parse::<ImageId>()
            && let (Some(kv), _) = self.meta.get(&image_key(id), Consistency::Linearizable).await?
        {
            return Ok((decode(&kv.key, &kv.value)?, kv.mod_revision));
        }
        let (kv, _) = self.meta.get(&image_name_key(image), Consistency::Linearizable).await?;
        let kv = kv.ok_or_else(|| ImageError::NotFound(image.to_owned()))?;
        let id: ImageId = std::str::from_utf8(&kv.value)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ImageError::Record(kv.key.clone()))?;
        let (kv, _) = self.meta.get(&image_key(id), Consistency::Linearizable).await?;
        let kv = kv.ok_or_else(|| ImageError::NotFound(image.to_owned()))?;
        Ok((decode(&kv.key, &kv.value)?, kv.mod_revision))
    }

    /// Receives an image: `chunks` are its bytes in order (each 1..=4 MiB,
    /// all but the last a multiple of 4096). Returns the new record; on any
    /// failure nothing of the upload is left.
    pub async fn upload<S>(&self, start: UploadStart, chunks: S) -> Result<ImageRecord, ImageError>
    where
        S: Stream<Item = Result<Vec<u8>, ImageError>> + Send,
    {
        check_start(&start)?;
        // Refused now rather than after the bytes; the record's insert decides races.
        match self.get(&start.name).await {
            Ok(_) => return Err(ImageError::NameTaken(start.name)),
            Err(ImageError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let id = ImageId::random();
        let (sha256, kernel, volume) = match start.kind {
            ImageKind::Kernel => {
                let bytes = receive(&start, chunks).await?;
                let sha256 = hex::encode(Sha256::digest(&bytes));
                check_sha(&start, &sha256)?;
                let info = probe::probe(&mut Cursor::new(&bytes)).map_err(ImageError::NotBootable)?;
                let pieces = bytes
                    .chunks(MAX_UPLOAD_CHUNK)
                    .enumerate()
                    .map(|(i, c)| Ok(((i * MAX_UPLOAD_CHUNK) as u64, c.to_vec())));
                let volume = self.fill(id, &start, futures::stream::iter(pieces)).await?;
                (sha256, Some(info), volume)
            }
            ImageKind::Initrd => {
                let mut hasher = Sha256::new();
                let mut offset = 0u64;
                let pieces = chunks.map(|c| {
                    let data = c.map_err(stream_fault)?;
                    hasher.update(&data);
                    let at = offset;
                    offset += next_offset(&data);
                    Ok((at, data))
                });
                let volume = self.fill(id, &start, pieces).await?;
                let sha256 = hex::encode(hasher.finalize());
                if let Err(e) = check_sha(&start, &sha256) {
                    self.drop_volume(id).await;
                    return Err(e);
                }
                (sha256, None, volume)
            }
        };
        let record = ImageRecord {
            id,
            name: start.name,
            kind: start.kind,
            size_bytes: start.total_bytes,
            sha256,
            volume,
            kernel,
            created_at_ms: unix_millis(),
        };
        if let Err(e) = self.insert(&record).await {
            self.drop_volume(id).await;
            return Err(e);
        }
        info!(image = %record.id, name = %record.name, kind = record.kind.as_str(), size = record.size_bytes, sha256 = %record.sha256, "image uploaded");
        Ok(record)
    }

    /// Makes the image's volume and writes `pieces` into it; on failure the
    /// volume is deleted again.
    async fn fill<S>(&self, id: ImageId, start: &UploadStart, pieces: S) -> Result<VolumeId, ImageError>
    where
        S: Stream<Item = Result<(u64, Vec<u8>), ImportError>>,
    {
        let name = volume_name(id);
        let size = start.total_bytes.next_multiple_of(BS);
        let volume =
            self.volumes.create(NewVolume { name: name.clone(), size_bytes: size, replicas: None }).await?.id;
        let written = async {
            // A new volume reads as zeroes: its zero blocks need no write.
            let import =
                ImportStart { volume: name, total_bytes: start.total_bytes, sparse: true, takeover: false };
            Import::start(&self.volumes, import).await?.run(pieces).await
        }
        .await;
        if let Err(e) = written {
            self.drop_volume(id).await;
            return Err(match e {
                ImportError::Invalid(msg) => ImageError::Invalid(msg),
                other => ImageError::Write(other),
            });
        }
        Ok(volume)
    }

    /// Deletes the volume of an image that is not to be (best effort: the
    /// volume's name says whose it was).
    async fn drop_volume(&self, id: ImageId) {
        let name = volume_name(id);
        if let Err(e) = self.volumes.delete(&name, true).await {
            warn!(volume = %name, error = %nodeos_types::error_chain(&e), "the volume of a failed image upload is left behind; `nodeos volume delete` removes it");
        }
    }

    /// Writes a new record and its name, failing if the name is taken.
    async fn insert(&self, r: &ImageRecord) -> Result<(), ImageError> {
        let value = serde_json::to_vec(r).map_err(|_| ImageError::Record(r.id.to_string()))?;
        let name_key = image_name_key(&r.name);
        let txn = Txn {
            compares: vec![Compare::ModRevision { key: name_key.clone(), equals: 0 }],
            success: vec![
                Op::Put { key: image_key(r.id), value },
                Op::Put { key: name_key, value: r.id.to_string().into_bytes() },
            ],
            failure: vec![],
        };
        if !self.meta.write(Command::Txn(txn)).await?.succeeded {
            return Err(ImageError::NameTaken(r.name.clone()));
        }
        Ok(())
    }

    /// The VMs whose kernel or initrd is the image.
    async fn users(&self, image: &ImageRecord) -> Result<Vec<String>, ImageError> {
        let (kvs, _) = self.meta.range(VMS_PREFIX, 0, Consistency::Linearizable).await?;
        let mut names = Vec::new();
        for kv in kvs {
            let vm: VmRecord = decode(&kv.key, &kv.value)?;
            if uses(&vm, image) {
                names.push(vm.name);
            }
        }
        Ok(names)
    }

    /// Deletes an image and its volume; refused while a VM names it.
    pub async fn delete(&self, image: &str) -> Result<ImageRecord, ImageError> {
        let (r, rev) = self.get_rev(image).await?;
        let users = self.users(&r).await?;
        if !users.is_empty() {
            return Err(ImageError::InUse { image: r.name, vms: users.join(", ") });
        }
        let txn = Txn {
            compares: vec![Compare::ModRevision { key: image_key(r.id), equals: rev }],
            success: vec![Op::Delete { key: image_key(r.id) }, Op::Delete { key: image_name_key(&r.name) }],
            failure: vec![],
        };
        if !self.meta.write(Command::Txn(txn)).await?.succeeded {
            return Err(ImageError::Conflict);
        }
        // The record is gone first: nothing can name the volume any more.
        if let Err(e) = self.volumes.delete(&r.volume.to_string(), true).await {
            warn!(image = %r.id, volume = %r.volume, error = %nodeos_types::error_chain(&e), "image deleted, its volume is left behind; `nodeos volume delete` removes it");
        }
        info!(image = %r.id, name = %r.name, "image deleted");
        Ok(r)
    }

    /// The image as a file in `dir`, named `<stem>.<sha256>`: read from its
    /// volume (exactly `size_bytes`) and checked against its hash, unless a
    /// file of that name is already there (written, so checked, before).
    pub async fn materialise(
        &self,
        image: &ImageRecord,
        dir: &Path,
        stem: &str,
    ) -> Result<PathBuf, ImageError> {
        let path = dir.join(format!("{stem}.{}", image.sha256));
        if tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_file() && m.len() == image.size_bytes) {
            return Ok(path);
        }
        // A name of its own: two starts fetching the same image at once must
        // not write into one file (the first rename would publish a file the
        // second still truncates and writes).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let partial = dir.join(format!(".{stem}.{}.{n}.partial", image.sha256));
        let io = |what: String| move |source: std::io::Error| ImageError::Io { what, source };
        let written = async {
            let reader = self.volumes.open_reader(&image.volume.to_string()).await?;
            let mut file = tokio::fs::File::create(&partial)
                .await
                .map_err(io(format!("cannot create {}", partial.display())))?;
            let mut hasher = Sha256::new();
            let mut offset = 0u64;
            while offset < image.size_bytes {
                let want = (image.size_bytes - offset).min(MAX_UPLOAD_CHUNK as u64);
                let len = u32::try_from(want.next_multiple_of(BS)).expect("a piece is at most 4 MiB");
                let mut data = reader.read(offset, len).await.map_err(ImageError::Read)?;
                data.truncate(want as usize);
                hasher.update(&data);
                file.write_all(&data).await.map_err(io(format!("cannot write {}", partial.display())))?;
                offset += want;
            }
            let got = hex::encode(hasher.finalize());
            if got != image.sha256 {
                return Err(ImageError::Corrupt {
                    size: image.size_bytes,
                    expected: image.sha256.clone(),
                    got,
                });
            }
            file.sync_all().await.map_err(io(format!("cannot write {}", partial.display())))?;
            tokio::fs::rename(&partial, &path).await.map_err(io(format!(
                "cannot rename {} to {}",
                partial.display(),
                path.display()
            )))
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
        info!(image = %image.id, name = %image.name, path = %path.display(), "image materialised");
        Ok(path)
    }
}

/// A kernel upload's bytes, whole, checked by the rules of an import stream.
async fn receive<S>(start: &UploadStart, chunks: S) -> Result<Vec<u8>, ImageError>
where
    S: Stream<Item = Result<Vec<u8>, ImageError>>,
{
    let mut plan = ImportPlan::new(start.total_bytes.next_multiple_of(BS), start.total_bytes, false)
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
    let invalid = |e: ImportError| ImageError::Invalid(e.to_string());
    let mut bytes = Vec::with_capacity(usize::try_from(start.total_bytes).unwrap_or(0));
    let mut chunks = std::pin::pin!(chunks);
    let mut offset = 0u64;
    while let Some(data) = chunks.next().await {
        let data = data?;
        bytes.extend_from_slice(&data);
        let at = offset;
        offset += next_offset(&data);
        plan.chunk(at, data).map_err(invalid)?;
    }
    plan.finish().map_err(invalid)?;
    Ok(bytes)
}

/// How far a chunk moves the next one: its length, block-aligned. Every
/// chunk but the last is whole blocks, so this is where the next chunk's
/// bytes belong; after a short chunk the import refuses the next one, saying so.
fn next_offset(chunk: &[u8]) -> u64 {
    (chunk.len() as u64).next_multiple_of(BS)
}

fn check_sha(start: &UploadStart, got: &str) -> Result<(), ImageError> {
    if start.sha256.is_empty() || start.sha256.eq_ignore_ascii_case(got) {
        return Ok(());
    }
    Err(ImageError::Sha256 { expected: start.sha256.to_ascii_lowercase(), got: got.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(kind: ImageKind, total: u64) -> UploadStart {
        UploadStart { name: "k".into(), kind, total_bytes: total, sha256: String::new() }
    }

    #[test]
    fn starts_are_checked_field_by_field() {
        assert!(check_start(&start(ImageKind::Kernel, 1)).is_ok());
        let msg = |s: UploadStart| check_start(&s).unwrap_err().to_string();
        assert!(
            msg(UploadStart { name: "Bad Name".into(), ..start(ImageKind::Kernel, 1) })
                .starts_with("start.name")
        );
        assert_eq!(
            msg(start(ImageKind::Kernel, MAX_KERNEL_BYTES + 1)),
            format!(
                "start.total_bytes must be 1..={MAX_KERNEL_BYTES} (64 MiB) for kernel images, got {}",
                MAX_KERNEL_BYTES + 1
            )
        );
        assert!(msg(start(ImageKind::Initrd, 0)).contains("1..=1073741824 (1024 MiB)"));
        assert!(check_start(&start(ImageKind::Initrd, MAX_INITRD_BYTES)).is_ok());
        let bad_sha = UploadStart { sha256: "abc".into(), ..start(ImageKind::Initrd, 1) };
        assert!(msg(bad_sha).starts_with("start.sha256 must be empty or 64 hex digits"));
    }

    #[tokio::test]
    async fn kernels_are_received_whole_by_the_import_rules() {
        let s = start(ImageKind::Kernel, 5000);
        let ok = futures::stream::iter(vec![Ok(vec![1u8; 4096]), Ok(vec![2u8; 904])]);
        let bytes = receive(&s, ok).await.unwrap();
        assert_eq!((bytes.len(), bytes[4095], bytes[4096]), (5000, 1, 2));
        let short = futures::stream::iter(vec![Ok(vec![1u8; 4096])]);
        assert!(receive(&s, short).await.unwrap_err().to_string().contains("ended after 4096"));
        let odd = futures::stream::iter(vec![Ok(vec![1u8; 100]), Ok(vec![2u8; 4900])]);
        assert!(receive(&s, odd).await.unwrap_err().to_string().contains("except in the last chunk"));
        let long = futures::stream::iter(vec![Ok(vec![1u8; 8192])]);
        assert!(receive(&s, long).await.unwrap_err().to_string().contains("more than start.total_bytes"));
    }

    #[test]
    fn hashes_compare_without_case() {
        let sha = "ab".repeat(32);
        let with = |h: &str| UploadStart { sha256: h.into(), ..start(ImageKind::Initrd, 1) };
        assert!(check_sha(&with(""), &sha).is_ok());
        assert!(check_sha(&with(&sha.to_uppercase()), &sha).is_ok());
        let e = check_sha(&with(&"cd".repeat(32)), &sha).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("start.sha256 is {}, but the bytes received hash to {sha}", "cd".repeat(32))
        );
    }
}
