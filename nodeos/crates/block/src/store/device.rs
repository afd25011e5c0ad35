//! [`DeviceStore`]: the extent store on a raw block device (or any file used
//! as one), for nodes that give replicas a whole disk.
//!
//! # On-disk format, version 1 (all integers little-endian)
//! | offset | size | content |
//! |---|---|---|
//! | 0 | 4 KiB | superblock: magic `NODEOSDV`, version, chunk count, region offsets, CRC32C |
//! | 4 KiB | 64 KiB | fences: 4096 slots of (volume id, generation); volume 0 = free |
//! | table | 32 B × chunks | chunk table: (in use, layer, extent index, chunk in extent) |
//! | metas | 6 KiB × chunks | 256 block metas (24 bytes each) per chunk |
//! | data | 1 MiB × chunks | 256 blocks of 4 KiB per chunk, 1 MiB aligned |
//!
//! Space is allocated in 1 MiB chunks on first write, so thin volumes stay
//! thin; a chunk is given back when its layer is deleted. A chunk's metas
//! are zero whenever it is free (format zeroes them; delete zeroes them and
//! syncs before freeing), so a chunk allocated again never shows an earlier
//! owner's blocks, even if the table entry reaches the disk before its
//! first metas do. `used` counts allocated chunks: zeroing blocks inside a
//! chunk does not give space back (only the file store punches holes).
//!
//! A device without the magic is never formatted implicitly: opening it
//! fails unless the caller asks for a format.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nodeos_types::VolumeId;

use super::file::check_request;
use super::{BlockMeta, BlockState, ExtentStore, LayerExtent, StoreUsage};

const MAGIC: [u8; 8] = *b"NODEOSDV";
const VERSION: u32 = 1;
const BLOCK: u64 = 4096;
const CHUNK_BLOCKS: u64 = 256;
const CHUNK: u64 = CHUNK_BLOCKS * BLOCK;
const META: u64 = BlockMeta::ENCODED_LEN as u64;
const CHUNK_METAS: u64 = CHUNK_BLOCKS * META;
const ENTRY: u64 = 32;
const FENCE_OFF: u64 = 4096;
const FENCE_SLOTS: u64 = 4096;
const FENCE_LEN: u64 = FENCE_SLOTS * 16;

#[derive(Debug, thiserror::Error)]
pub enum DeviceStoreError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no nodeos block store (format it explicitly to use it)")]
    NotFormatted { path: PathBuf },
    #[error("{path}: superblock is corrupt or of unknown version {version}")]
    Superblock { path: PathBuf, version: u32 },
    #[error("{path} is {size} bytes; a block store needs at least {min}")]
    TooSmall { path: PathBuf, size: u64, min: u64 },
    #[error("{path}: no free chunk left ({chunks} chunks of 1 MiB)")]
    Full { path: PathBuf, chunks: u64 },
    #[error("{path}: all {FENCE_SLOTS} fence slots are in use")]
    FencesFull { path: PathBuf },
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl From<DeviceStoreError> for io::Error {
    fn from(e: DeviceStoreError) -> io::Error {
        let kind = match &e {
            DeviceStoreError::Full { .. } | DeviceStoreError::FencesFull { .. } => io::ErrorKind::StorageFull,
            DeviceStoreError::Open { source, .. } | DeviceStoreError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// Where the regions are, from the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    chunks: u64,
    table: u64,
    metas: u64,
    data: u64,
}

impl Geometry {
    /// The largest layout that fits `size` bytes.
    fn for_size(size: u64) -> Option<Geometry> {
        let fixed = FENCE_OFF + FENCE_LEN;
        let per_chunk = CHUNK + CHUNK_METAS + ENTRY;
        // One extra chunk of slack absorbs the 1 MiB alignment of the data region.
        let chunks = (size.checked_sub(fixed)? / per_chunk).checked_sub(1)?;
        if chunks == 0 {
            return None;
        }
        let table = fixed;
        let metas = table + chunks * ENTRY;
        let data = (metas + chunks * CHUNK_METAS).div_ceil(CHUNK) * CHUNK;
        (data + chunks * CHUNK <= size).then_some(Geometry { chunks, table, metas, data })
    }

    fn encode(&self) -> [u8; 4096] {
        let mut b = [0u8; 4096];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        for (i, v) in [self.chunks, self.table, self.metas, self.data].iter().enumerate() {
            b[16 + i * 8..24 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..48]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; 4096]) -> Result<Geometry, u32> {
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(b[48..52].try_into().expect("4 bytes"));
        if version != VERSION || crc != crc32c::crc32c(&b[..48]) {
            return Err(version);
        }
        let at = |i: usize| u64::from_le_bytes(b[16 + i * 8..24 + i * 8].try_into().expect("8 bytes"));
        Ok(Geometry { chunks: at(0), table: at(1), metas: at(2), data: at(3) })
    }
}

/// A chunk's owner: the extent and which 1 MiB of it.
type Owner = (LayerExtent, u32);

#[derive(Debug, Default)]
struct Alloc {
    by_owner: HashMap<Owner, u64>,
    free: BTreeSet<u64>,
    fences: HashMap<VolumeId, (u64, u64)>,
    free_fence_slots: BTreeSet<u64>,
}

/// The extent store on a block device. See the module docs.
#[derive(Debug)]
pub struct DeviceStore {
    path: PathBuf,
    dev: File,
    geo: Geometry,
    alloc: Mutex<Alloc>,
}

impl DeviceStore {
    /// Opens a formatted device; with `format`, an unformatted one is
    /// formatted first (a formatted one is never reformatted).
    pub fn open(path: &Path, format: bool) -> Result<DeviceStore, DeviceStoreError> {
        let shown = path.to_path_buf();
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| DeviceStoreError::Open { path: shown.clone(), source })?;
        let io = |what: &'static str| {
            let path = shown.clone();
            move |source| DeviceStoreError::Io { path, what, source }
        };
        let mut sb = [0u8; 4096];
        let size = device_size(&dev).map_err(io("reading the device size"))?;
        if size >= 4096 {
            dev.read_exact_at(&mut sb, 0).map_err(io("reading the superblock"))?;
        }
        let geo = if sb[..8] == MAGIC {
            Geometry::decode(&sb)
                .map_err(|version| DeviceStoreError::Superblock { path: shown.clone(), version })?
        } else if format {
            let min = FENCE_OFF + FENCE_LEN + 4 * (CHUNK + CHUNK_METAS + ENTRY);
            let geo = Geometry::for_size(size).ok_or_else(|| DeviceStoreError::TooSmall {
                path: shown.clone(),
                size,
                min,
            })?;
            write_zeroes(&dev, FENCE_OFF, geo.data - FENCE_OFF).map_err(io("formatting"))?;
            dev.sync_data().map_err(io("formatting"))?;
            // The superblock last: a format cut short leaves no magic.
            dev.write_all_at(&geo.encode(), 0).map_err(io("writing the superblock"))?;
            dev.sync_data().map_err(io("writing the superblock"))?;
            geo
        } else {
            return Err(DeviceStoreError::NotFormatted { path: shown });
        };
        let mut alloc = Alloc::default();
        let mut table = vec![0u8; (geo.chunks * ENTRY) as usize];
        dev.read_exact_at(&mut table, geo.table).map_err(io("reading the chunk table"))?;
        for (c, e) in table.chunks_exact(ENTRY as usize).enumerate() {
            if e[0] == 1 {
                let layer = u64::from_le_bytes(e[8..16].try_into().expect("8 bytes"));
                let index = u32::from_le_bytes(e[16..20].try_into().expect("4 bytes"));
                let part = u32::from_le_bytes(e[20..24].try_into().expect("4 bytes"));
                alloc.by_owner.insert((LayerExtent { layer, index }, part), c as u64);
            } else {
                alloc.free.insert(c as u64);
            }
        }
        let mut fences = vec![0u8; FENCE_LEN as usize];
        dev.read_exact_at(&mut fences, FENCE_OFF).map_err(io("reading the fences"))?;
        for (slot, f) in fences.chunks_exact(16).enumerate() {
            let volume = u64::from_le_bytes(f[0..8].try_into().expect("8 bytes"));
            let generation = u64::from_le_bytes(f[8..16].try_into().expect("8 bytes"));
            if volume == 0 {
                alloc.free_fence_slots.insert(slot as u64);
            } else {
                alloc.fences.insert(VolumeId(volume), (slot as u64, generation));
            }
        }
        Ok(DeviceStore { path: shown, dev, geo, alloc: Mutex::new(alloc) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Alloc> {
        self.alloc.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, what: &'static str) -> impl FnOnce(io::Error) -> io::Error + '_ {
        move |source| DeviceStoreError::Io { path: self.path.clone(), what, source }.into()
    }

    fn chunk_of(&self, key: LayerExtent, block: u64) -> Option<u64> {
        let part = u32::try_from(block / CHUNK_BLOCKS).ok()?;
        self.lock().by_owner.get(&(key, part)).copied()
    }

    /// The chunk holding `block` of `key`, allocated (and recorded) if new.
    fn chunk_for_write(&self, key: LayerExtent, block: u64) -> io::Result<u64> {
        let part =
            u32::try_from(block / CHUNK_BLOCKS).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut a = self.lock();
        if let Some(c) = a.by_owner.get(&(key, part)) {
            return Ok(*c);
        }
        let c = a.free.pop_first().ok_or_else(|| {
            io::Error::from(DeviceStoreError::Full { path: self.path.clone(), chunks: self.geo.chunks })
        })?;
        let mut e = [0u8; ENTRY as usize];
        e[0] = 1;
        e[8..16].copy_from_slice(&key.layer.to_le_bytes());
        e[16..20].copy_from_slice(&key.index.to_le_bytes());
        e[20..24].copy_from_slice(&part.to_le_bytes());
        if let Err(err) = self.dev.write_all_at(&e, self.geo.table + c * ENTRY) {
            a.free.insert(c);
            return Err(self.err("recording a chunk")(err));
        }
        a.by_owner.insert((key, part), c);
        Ok(c)
    }

    fn meta_at(&self, chunk: u64, block: u64) -> u64 {
        self.geo.metas + chunk * CHUNK_METAS + (block % CHUNK_BLOCKS) * META
    }

    fn data_at(&self, chunk: u64, block: u64) -> u64 {
        self.geo.data + chunk * CHUNK + (block % CHUNK_BLOCKS) * BLOCK
    }
}

fn device_size(f: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    // Block devices report 0 in metadata; seeking to the end works for both.
    let mut f = f;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

fn write_zeroes(f: &File, mut off: u64, mut len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; CHUNK as usize];
    while len > 0 {
        let n = len.min(CHUNK);
        f.write_all_at(&zeroes[..n as usize], off)?;
        off += n;
        len -= n;
    }
    Ok(())
}

impl ExtentStore for DeviceStore {
    fn read_blocks(
        &self,
        key: LayerExtent,
        first: u32,
        data: &mut [u8],
        metas: &mut [BlockMeta],
    ) -> io::Result<()> {
        check_request(first, metas, data.len(), false)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        for (i, m) in metas.iter_mut().enumerate() {
            let block = u64::from(first) + i as u64;
            let buf = &mut data[i * BLOCK as usize..(i + 1) * BLOCK as usize];
            let Some(c) = self.chunk_of(key, block) else {
                *m = BlockMeta::ABSENT;
                buf.fill(0);
                continue;
            };
            let mut raw = [0u8; BlockMeta::ENCODED_LEN];
            self.dev
                .read_exact_at(&mut raw, self.meta_at(c, block))
                .map_err(self.err("reading a block meta"))?;
            *m = BlockMeta::decode(&raw);
            if m.state == BlockState::Data {
                self.dev.read_exact_at(buf, self.data_at(c, block)).map_err(self.err("reading a block"))?;
            } else {
                buf.fill(0);
            }
        }
        Ok(())
    }

    fn read_metas(&self, key: LayerExtent, first: u32, count: u32) -> io::Result<Vec<BlockMeta>> {
        super::file::check_range(first, count as usize)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut out = Vec::with_capacity(count as usize);
        let mut block = u64::from(first);
        let end = block + u64::from(count);
        while block < end {
            let run = (CHUNK_BLOCKS - block % CHUNK_BLOCKS).min(end - block);
            match self.chunk_of(key, block) {
                None => out.extend(std::iter::repeat_n(BlockMeta::ABSENT, run as usize)),
                Some(c) => {
                    let mut raw = vec![0u8; (run * META) as usize];
                    self.dev
                        .read_exact_at(&mut raw, self.meta_at(c, block))
                        .map_err(self.err("reading metas"))?;
                    out.extend(
                        raw.chunks_exact(META as usize)
                            .map(|r| BlockMeta::decode(r.try_into().expect("24 bytes"))),
                    );
                }
            }
            block += run;
        }
        Ok(out)
    }

    fn write_blocks(&self, key: LayerExtent, first: u32, metas: &[BlockMeta], data: &[u8]) -> io::Result<()> {
        check_request(first, metas, data.len(), true)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut at = 0usize;
        for (i, m) in metas.iter().enumerate() {
            let block = u64::from(first) + i as u64;
            let c = self.chunk_for_write(key, block)?;
            if m.state == BlockState::Data {
                self.dev
                    .write_all_at(&data[at..at + BLOCK as usize], self.data_at(c, block))
                    .map_err(self.err("writing a block"))?;
                at += BLOCK as usize;
            }
            // Data before its meta: a torn write shows as a checksum mismatch,
            // never as another block's bytes under this one's meta.
            self.dev
                .write_all_at(&m.encode(), self.meta_at(c, block))
                .map_err(self.err("writing a block meta"))?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.dev.sync_data().map_err(self.err("syncing"))
    }

    fn fence(&self, volume: VolumeId) -> io::Result<u64> {
        Ok(self.lock().fences.get(&volume).map(|(_, g)| *g).unwrap_or(0))
    }

    fn set_fence(&self, volume: VolumeId, generation: u64) -> io::Result<()> {
        if volume.0 == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "volume 0 has no fence"));
        }
        let mut a = self.lock();
        let slot = match a.fences.get(&volume) {
            Some((slot, _)) => *slot,
            None => a
                .free_fence_slots
                .pop_first()
                .ok_or_else(|| io::Error::from(DeviceStoreError::FencesFull { path: self.path.clone() }))?,
        };
        let mut rec = [0u8; 16];
        rec[0..8].copy_from_slice(&volume.0.to_le_bytes());
        rec[8..16].copy_from_slice(&generation.to_le_bytes());
        let written = self.dev.write_all_at(&rec, FENCE_OFF + slot * 16).and_then(|()| self.dev.sync_data());
        if let Err(e) = written {
            if !a.fences.contains_key(&volume) {
                a.free_fence_slots.insert(slot);
            }
            return Err(self.err("writing a fence")(e));
        }
        a.fences.insert(volume, (slot, generation));
        Ok(())
    }

    fn extents(&self) -> io::Result<Vec<LayerExtent>> {
        let mut v: Vec<LayerExtent> = self.lock().by_owner.keys().map(|(k, _)| *k).collect();
        v.sort();
        v.dedup();
        Ok(v)
    }

    fn delete_layer(&self, layer: u64) -> io::Result<()> {
        let mut a = self.lock();
        let chunks: Vec<(Owner, u64)> =
            a.by_owner.iter().filter(|((k, _), _)| k.layer == layer).map(|(o, c)| (*o, *c)).collect();
        if chunks.is_empty() {
            return Ok(());
        }
        // Metas zeroed and synced before the chunks are freed (module docs).
        let zeroes = vec![0u8; CHUNK_METAS as usize];
        for (_, c) in &chunks {
            self.dev
                .write_all_at(&zeroes, self.geo.metas + c * CHUNK_METAS)
                .map_err(self.err("clearing metas"))?;
        }
        self.dev.sync_data().map_err(self.err("clearing metas"))?;
        for (owner, c) in &chunks {
            self.dev
                .write_all_at(&[0u8; ENTRY as usize], self.geo.table + c * ENTRY)
                .map_err(self.err("freeing a chunk"))?;
            a.by_owner.remove(owner);
            a.free.insert(*c);
        }
        self.dev.sync_data().map_err(self.err("freeing chunks"))
    }

    fn usage(&self) -> io::Result<StoreUsage> {
        let a = self.lock();
        Ok(StoreUsage { used: a.by_owner.len() as u64 * CHUNK, free: a.free.len() as u64 * CHUNK })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(mib: u64) -> (tempfile::NamedTempFile, PathBuf) {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        f.as_file().set_len(mib << 20).expect("size");
        let p = f.path().to_path_buf();
        (f, p)
    }

    #[test]
    fn an_unformatted_device_is_never_formatted_implicitly() {
        let (_f, p) = device(16);
        std::fs::write(&p, b"somebody's filesystem").expect("write");
        assert!(matches!(DeviceStore::open(&p, false), Err(DeviceStoreError::NotFormatted { .. })));
        assert_eq!(&std::fs::read(&p).expect("read")[..10], b"somebody's", "refused open changed nothing");
    }

    #[test]
    fn format_then_reopen_keeps_data_and_refuses_a_corrupt_superblock() {
        let (_f, p) = device(16);
        let s = DeviceStore::open(&p, true).expect("format");
        let k = LayerExtent { layer: 3, index: 1 };
        let data = vec![7u8; 4096];
        let m = BlockMeta { generation: 1, seq: 1, crc: crc32c::crc32c(&data), state: BlockState::Data };
        s.write_blocks(k, 300, &[m], &data).expect("write");
        s.set_fence(VolumeId(9), 4).expect("fence");
        s.flush().expect("flush");
        drop(s);
        let s = DeviceStore::open(&p, true).expect("reopen (format never reformats)");
        assert_eq!(s.read_metas(k, 300, 1).expect("metas"), vec![m]);
        assert_eq!(s.fence(VolumeId(9)).expect("fence"), 4);
        assert_eq!(s.usage().expect("usage").used, CHUNK);
        drop(s);
        let f = OpenOptions::new().write(true).open(&p).expect("open");
        f.write_all_at(&[0xff; 4], 20).expect("corrupt");
        assert!(matches!(DeviceStore::open(&p, true), Err(DeviceStoreError::Superblock { .. })));
    }

    #[test]
    fn too_small_and_full_devices_fail_clearly() {
        let (_f, p) = device(1);
        assert!(matches!(DeviceStore::open(&p, true), Err(DeviceStoreError::TooSmall { .. })));
        let (_g, p) = device(8);
        let s = DeviceStore::open(&p, true).expect("format");
        let chunks = s.geo.chunks;
        let z = BlockMeta { generation: 1, seq: 1, crc: 0, state: BlockState::Zero };
        for c in 0..chunks {
            s.write_blocks(LayerExtent { layer: 1, index: 0 }, (c * CHUNK_BLOCKS) as u32, &[z], &[])
                .expect("fits");
        }
        let err = s.write_blocks(LayerExtent { layer: 2, index: 0 }, 0, &[z], &[]).expect_err("full");
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        s.delete_layer(1).expect("delete");
        s.write_blocks(LayerExtent { layer: 2, index: 0 }, 0, &[z], &[]).expect("space came back");
    }

    #[test]
    fn geometry_fits_the_device() {
        for mib in [2u64, 5, 64, 1000, 1 << 20] {
            if let Some(g) = Geometry::for_size(mib << 20) {
                assert!(g.data + g.chunks * CHUNK <= mib << 20, "{mib} MiB");
                assert!(g.metas + g.chunks * CHUNK_METAS <= g.data);
                assert_eq!(g.data % CHUNK, 0);
                assert_eq!(Geometry::decode(&g.encode()), Ok(g));
            }
        }
    }
}
