//! The pool's volumes as NBD exports (see `nbd.rs`): export `NAME` opens the
//! volume for writing (a new generation; refused while another writer holds
//! it), `NAME:ro` reads it without taking the writer slot, `NAME@SNAPSHOT` is
//! a read-only view of a snapshot. The writer slot is
//! released when the NBD client disconnects.

use nodeos_types::VolumeId;
use nodeos_types::records::VolumeState;
use tracing::warn;

use crate::client::VolumeClient;
use crate::device::{BlockDevice, DeviceError};
use crate::nbd::{ExportError, ExportInfo, ExportResolver};
use crate::transport::TcpTransport;
use crate::volumes::{VolumeError, Volumes};

/// Resolves NBD export names to volumes.
#[derive(Debug, Clone)]
pub struct VolumeExports {
    volumes: Volumes,
}

impl VolumeExports {
    pub fn new(volumes: Volumes) -> Self {
        VolumeExports { volumes }
    }
}

/// An open volume served to one NBD client.
#[derive(Debug)]
pub struct ExportedVolume {
    client: VolumeClient<TcpTransport>,
    /// Writer slot to give back on disconnect: (volumes, id, generation).
    writer: Option<(Volumes, VolumeId, u64)>,
}

impl Drop for ExportedVolume {
    fn drop(&mut self) {
        if let Some((volumes, id, generation)) = self.writer.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                if let Err(e) = volumes.close_writer(id, generation).await {
                    warn!(volume = %id, error = %nodeos_types::error_chain(&e), "cannot release the writer slot");
                }
            });
        }
    }
}

fn export_error(e: VolumeError) -> ExportError {
    match e {
        VolumeError::NotFound(_) | VolumeError::NoSnapshot { .. } => ExportError::Unknown(e.to_string()),
        VolumeError::InUse { .. } | VolumeError::Device(DeviceError::Fenced { .. }) => {
            ExportError::Refused(e.to_string())
        }
        other => ExportError::Unknown(nodeos_types::error_chain(&other)),
    }
}

impl VolumeExports {
    async fn open_export(&self, name: &str, describe_only: bool) -> Result<ExportedVolume, VolumeError> {
        if let Some(vol) = name.strip_suffix(":ro") {
            let client = self.volumes.open(vol, "nbd", true, false).await?;
            return Ok(ExportedVolume { client, writer: None });
        }
        if let Some((vol, snap)) = name.split_once('@') {
            let client = self.volumes.open_snapshot(vol, snap).await?;
            return Ok(ExportedVolume { client, writer: None });
        }
        if describe_only {
            let client = self.volumes.open(name, "nbd", true, false).await?;
            return Ok(ExportedVolume { client, writer: None });
        }
        let client = self.volumes.open(name, "nbd", false, false).await?;
        let l = client.layout();
        Ok(ExportedVolume { writer: Some((self.volumes.clone(), l.volume, l.generation)), client })
    }
}

impl ExportResolver for VolumeExports {
    type Device = ExportedVolume;

    async fn list(&self) -> Vec<String> {
        let mut names = Vec::new();
        if let Ok(vols) = self.volumes.list().await {
            for v in vols.into_iter().filter(|v| v.state == VolumeState::Available) {
                names.extend(v.snapshots.iter().map(|s| format!("{}@{}", v.name, s.name)));
                names.push(v.name);
            }
        }
        names.sort();
        names
    }

    async fn describe(&self, name: &str) -> Result<ExportInfo, ExportError> {
        if name.contains('@') {
            let dev = self.open_export(name, true).await.map_err(export_error)?;
            return Ok(ExportInfo::of(&dev));
        }
        let (vol, read_only) = match name.strip_suffix(":ro") {
            Some(v) => (v, true),
            None => (name, false),
        };
        let (r, _) = self.volumes.get(vol).await.map_err(export_error)?;
        if read_only {
            return Ok(ExportInfo { size: r.size_bytes, block_size: crate::device::BLOCK_SIZE, read_only });
        }
        Ok(ExportInfo { size: r.size_bytes, block_size: crate::device::BLOCK_SIZE, read_only: false })
    }

    async fn open(&self, name: &str) -> Result<ExportedVolume, ExportError> {
        self.open_export(name, false).await.map_err(export_error)
    }
}

impl BlockDevice for ExportedVolume {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn read_only(&self) -> bool {
        self.client.read_only()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        self.client.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.client.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.client.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.client.trim(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.client.write_zeroes(offset, len).await
    }
}
