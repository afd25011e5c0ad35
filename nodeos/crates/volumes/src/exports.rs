//! The pool's volumes as NBD exports (see `nodeos_block::nbd`): export `NAME`
//! opens the volume for writing (a [`WriterSlot`]; refused while another
//! writer holds it), `NAME:ro` reads it without taking the writer slot,
//! `NAME@SNAPSHOT` is a read-only view of a snapshot. The writer slot is given
//! back when the NBD client disconnects (the export drops).

use nodeos_block::client::VolumeClient;
use nodeos_block::device::{BLOCK_SIZE, BlockDevice, DeviceError};
use nodeos_block::nbd::{ExportError, ExportInfo, ExportResolver};
use nodeos_block::transport::{TcpTransport, Transport};
use nodeos_types::records::VolumeState;

use crate::volumes::{VolumeError, Volumes};
use crate::writer::{Takeover, WriterSlot};

/// Who an NBD export shows as in the volume's writer slot.
pub const NBD_HOLDER: &str = "nbd";

/// Resolves NBD export names to volumes.
#[derive(Debug, Clone)]
pub struct VolumeExports<T = TcpTransport> {
    volumes: Volumes<T>,
}

impl<T: Transport + Clone> VolumeExports<T> {
    pub fn new(volumes: Volumes<T>) -> Self {
        VolumeExports { volumes }
    }
}

/// An open volume served to one NBD client; dropping it gives its writer
/// slot back.
#[derive(Debug)]
pub struct ExportedVolume<T: Transport + Clone = TcpTransport> {
    client: VolumeClient<T>,
    _writer: Option<WriterSlot<T>>,
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

impl<T: Transport + Clone> VolumeExports<T> {
    async fn open_export(&self, name: &str, describe_only: bool) -> Result<ExportedVolume<T>, VolumeError> {
        if let Some(vol) = name.strip_suffix(":ro") {
            let client = self.volumes.open_reader(vol).await?;
            return Ok(ExportedVolume { client, _writer: None });
        }
        if let Some((vol, snap)) = name.split_once('@') {
            let client = self.volumes.open_snapshot(vol, snap).await?;
            return Ok(ExportedVolume { client, _writer: None });
        }
        if describe_only {
            let client = self.volumes.open_reader(name).await?;
            return Ok(ExportedVolume { client, _writer: None });
        }
        let (client, slot) = WriterSlot::open(&self.volumes, name, NBD_HOLDER, Takeover::Refuse).await?;
        Ok(ExportedVolume { client, _writer: Some(slot) })
    }
}

impl<T: Transport + Clone> ExportResolver for VolumeExports<T> {
    type Device = ExportedVolume<T>;

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
        Ok(ExportInfo { size: r.size_bytes, block_size: BLOCK_SIZE, read_only })
    }

    async fn open(&self, name: &str) -> Result<ExportedVolume<T>, ExportError> {
        self.open_export(name, false).await.map_err(export_error)
    }
}

impl<T: Transport + Clone> BlockDevice for ExportedVolume<T> {
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
