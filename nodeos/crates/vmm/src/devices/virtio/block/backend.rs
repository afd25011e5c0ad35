//! Where a virtio-blk device's bytes live.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Storage behind a virtio-blk device.
///
/// Contract: offsets and lengths passed in are already checked against
/// [`BlockBackend::capacity_bytes`] by the device. `read_at` fills the whole
/// buffer or fails; `write_at` writes the whole buffer or fails, and is not
/// durable until a later `flush` returns Ok: `flush` makes every write that
/// completed before it durable (the guest's FLUSH / FUA). A read-only backend
/// is never asked to write. Methods take `&self` and may run on the device's
/// I/O thread while other threads hold the backend.
pub trait BlockBackend: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    fn flush(&self) -> std::io::Result<()>;
    fn capacity_bytes(&self) -> u64;
    fn read_only(&self) -> bool;
}

/// A backend whose writes are durable before they complete: what a driver that
/// did not negotiate VIRTIO_BLK_F_FLUSH may assume (it treats the device as
/// having no volatile write cache, so it never asks for a flush).
pub struct WriteThrough(pub std::sync::Arc<dyn BlockBackend>);

impl std::fmt::Debug for WriteThrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteThrough")
    }
}

impl BlockBackend for WriteThrough {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)?;
        self.0.flush()
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn capacity_bytes(&self) -> u64 {
        self.0.capacity_bytes()
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
}

/// A pool volume: the block client runs on its own small runtime and the
/// device's I/O thread waits for each request. Guest sectors are 512 bytes and
/// volume blocks 4 KiB, so unaligned writes read, patch and write whole
/// blocks; that is safe because the device's one I/O thread is the volume's
/// only writer.
///
/// The VM of an incoming live migration opens its writable volumes only when
/// the hand-over gives it the volume's next generation
/// ([`VolumeBackend::deferred`]): until then the source is the only writer,
/// and nothing here may fence or repair the copies it writes.
pub struct VolumeBackend {
    runtime: tokio::runtime::Runtime,
    client: std::sync::RwLock<Option<Client>>,
    /// How to open the client later (a deferred backend).
    cfg: crate::config::VolumeDisk,
    read_only: bool,
}

type Client = nodeos_block::client::VolumeClient<nodeos_block::transport::TcpTransport>;

impl std::fmt::Debug for VolumeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeBackend").field("volume", &self.cfg.layout.volume).finish_non_exhaustive()
    }
}

fn device_io(e: nodeos_block::device::DeviceError) -> std::io::Error {
    std::io::Error::other(e)
}

const VBS: u64 = nodeos_block::device::BLOCK_SIZE as u64;

impl VolumeBackend {
    /// Opens the volume: fences older writers and reconciles its copies.
    pub fn open(cfg: &crate::config::VolumeDisk, read_only: bool) -> Result<Self, BackendError> {
        let b = Self::deferred(cfg, read_only)?;
        b.open_client(cfg.layout.clone())?;
        Ok(b)
    }

    /// A backend whose volume opens at the first [`VolumeBackend::update_layout`]
    /// that hands it the generation (`own`); I/O before that fails.
    pub fn deferred(cfg: &crate::config::VolumeDisk, read_only: bool) -> Result<Self, BackendError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("volume")
            .enable_all()
            .build()
            .map_err(|source| BackendError::Runtime { source })?;
        Ok(VolumeBackend { runtime, client: std::sync::RwLock::new(None), cfg: cfg.clone(), read_only })
    }

    fn open_client(&self, mut layout: nodeos_block::client::VolumeLayout) -> Result<(), BackendError> {
        let key = nodeos_types::auth::PoolKey::from_derived(self.cfg.pool_key);
        let transport = match &self.cfg.tls {
            None => nodeos_block::transport::TcpTransport::new(key),
            Some(t) => {
                let cred =
                    nodeos_auth::Credential { cert_pem: t.cert_pem.clone(), key_pem: t.key_pem.clone() };
                let cfg = nodeos_auth::tls::client_config(&cred, &t.ca_pem)
                    .map_err(|e| BackendError::Tls(e.to_string()))?;
                nodeos_block::transport::TcpTransport::with_tls(key, nodeos_auth::tls::Connector::Fixed(cfg))
            }
        };
        if self.read_only {
            layout.generation = 0;
        }
        let volume = layout.volume.to_string();
        let client = self
            .runtime
            .block_on(Client::open(transport, layout, self.read_only, Some(self.cfg.node)))
            .map_err(|source| BackendError::Volume { volume, source })?;
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = Some(client);
        Ok(())
    }

    fn client(&self) -> std::io::Result<Client> {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| std::io::Error::other("the volume is not handed to this VM yet"))
    }

    pub fn volume(&self) -> nodeos_types::VolumeId {
        self.cfg.layout.volume
    }

    /// See [`nodeos_block::client::VolumeClient::update_layout`]. A deferred
    /// backend opens its volume here, once `own` hands it the generation.
    pub fn update_layout(&self, layout: nodeos_block::client::VolumeLayout, own: bool) -> Result<(), String> {
        let opened = self.client.read().unwrap_or_else(|p| p.into_inner()).clone();
        match opened {
            Some(c) => {
                let _rt = self.runtime.enter();
                c.update_layout(layout, own);
                Ok(())
            }
            None if own || self.read_only => {
                self.open_client(layout).map_err(|e| nodeos_types::error_chain(&e))?;
                tracing::info!(volume = %self.cfg.layout.volume, "volume opened with the generation handed over");
                Ok(())
            }
            // Not ours yet: the layout is taken when it is.
            None => Ok(()),
        }
    }

    fn aligned(offset: u64, len: usize) -> (u64, u64) {
        let start = offset / VBS * VBS;
        let end = (offset + len as u64).div_ceil(VBS) * VBS;
        (start, end)
    }
}

impl BlockBackend for VolumeBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use nodeos_block::device::BlockDevice;
        let (start, end) = Self::aligned(offset, buf.len());
        let len = u32::try_from(end - start).map_err(|_| std::io::Error::other("read too large"))?;
        let data = self.runtime.block_on(self.client()?.read(start, len)).map_err(device_io)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&data[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        use nodeos_block::device::BlockDevice;
        let (start, end) = Self::aligned(offset, buf.len());
        let data = if start == offset && end == offset + buf.len() as u64 {
            buf.to_vec()
        } else {
            let len = u32::try_from(end - start).map_err(|_| std::io::Error::other("write too large"))?;
            let mut whole = self.runtime.block_on(self.client()?.read(start, len)).map_err(device_io)?;
            let at = (offset - start) as usize;
            whole[at..at + buf.len()].copy_from_slice(buf);
            whole
        };
        self.runtime.block_on(self.client()?.write(start, data, false)).map_err(device_io)
    }

    fn flush(&self) -> std::io::Result<()> {
        use nodeos_block::device::BlockDevice;
        self.runtime.block_on(self.client()?.flush()).map_err(device_io)
    }

    fn capacity_bytes(&self) -> u64 {
        match &*self.client.read().unwrap_or_else(|p| p.into_inner()) {
            Some(c) => c.layout().size,
            None => self.cfg.layout.size,
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the worker's TLS credential is not usable: {0}")]
    Tls(String),
    #[error("cannot start the volume client's runtime")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open volume {volume}")]
    Volume {
        volume: String,
        #[source]
        source: nodeos_block::device::DeviceError,
    },
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A disk image file (or block device node) read with pread and written with
/// pwrite; flush is fdatasync. The capacity is fixed when opened.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    capacity: u64,
    read_only: bool,
}

impl FileBackend {
    /// Opens `path` read-write, or read-only when `read_only`.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BackendError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BackendError::Open { path: path.to_owned(), source })?;
        // seek(End) works for block device nodes too, where metadata().len() is 0.
        let capacity = {
            use std::io::Seek;
            let mut f = &file;
            f.seek(std::io::SeekFrom::End(0))
                .map_err(|source| BackendError::Size { path: path.to_owned(), source })?
        };
        Ok(Self { file, capacity, read_only })
    }
}

impl BlockBackend for FileBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.read_only {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {

    #[derive(Default)]
    struct Counting {
        writes: std::sync::atomic::AtomicUsize,
        flushes: std::sync::atomic::AtomicUsize,
    }

    impl BlockBackend for Counting {
        fn read_at(&self, _: &mut [u8], _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
            self.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            self.flushes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn capacity_bytes(&self) -> u64 {
            4096
        }
        fn read_only(&self) -> bool {
            false
        }
    }

    #[test]
    fn write_through_makes_every_write_durable_before_it_completes() {
        use std::sync::atomic::Ordering::SeqCst;
        let inner = std::sync::Arc::new(Counting::default());
        let wt = WriteThrough(inner.clone());
        wt.write_at(&[0; 512], 0).unwrap();
        wt.write_at(&[0; 512], 512).unwrap();
        assert_eq!((inner.writes.load(SeqCst), inner.flushes.load(SeqCst)), (2, 2));
        wt.read_at(&mut [0; 512], 0).unwrap();
        assert_eq!(inner.flushes.load(SeqCst), 2, "reads do not flush");
    }

    use super::*;

    #[test]
    fn file_backend_round_trip_and_read_only() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(8192).unwrap();
        let rw = FileBackend::open(tmp.path(), false).unwrap();
        assert_eq!(rw.capacity_bytes(), 8192);
        rw.write_at(b"hello", 4096).unwrap();
        rw.flush().unwrap();
        let mut b = [0u8; 5];
        rw.read_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"hello");
        assert!(rw.read_at(&mut b, 8190).is_err(), "short read at the end is an error");

        let ro = FileBackend::open(tmp.path(), true).unwrap();
        assert!(ro.read_only());
        assert!(ro.write_at(b"x", 0).is_err());
        ro.flush().unwrap();
        assert!(FileBackend::open(Path::new("/nonexistent/disk"), true).is_err());
    }
}
