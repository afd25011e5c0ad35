//! [`FileStore`]: the extent store on a node's data directory.
//!
//! # Layout
//! ```text
//! <dir>/layers/<layer, 16 hex>/<index, 8 hex>.data   sparse; block i at offset i * 4096
//! <dir>/layers/<layer, 16 hex>/<index, 8 hex>.meta   24-byte BlockMeta records; record i at i * 24
//! <dir>/fences/<volume id, 16 hex>                   the fencing generation, u64 LE
//! ```
//! An extent exists when its `.meta` file does. Meta records past the end of
//! the file, holes and a torn last record all read as [`BlockMeta::ABSENT`]
//! (whose encoding is all zeroes), so a meta file never needs initialising.
//!
//! # Durability
//! `write_blocks` writes data before metas, both into the page cache, and
//! records the files (and any directory it added entries to) as dirty; `flush`
//! fdatasyncs every dirty file and fsyncs those directories. A power loss
//! between a data write and its meta write can leave new bytes under an old
//! meta: the block then fails its checksum and the replica repairs it, which
//! is why metas carry a CRC and stores do not journal. Fences are written to a
//! temporary file that is synced and renamed, so they are durable on return
//! and never torn. `delete_layer` renames the layer away and syncs the parent
//! directory before removing the files, so a layer is never half deleted after
//! a power loss; leftovers of an interrupted removal are cleared on open.
//!
//! # Threads
//! Open file handles are cached (bounded, least recently used closed first)
//! and shared between threads: reads and writes use positioned I/O, so writes
//! to distinct blocks of one extent run concurrently. Handles of dirty files
//! stay open until the next `flush` even when evicted from the cache.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nodeos_types::VolumeId;

use super::{BlockMeta, BlockState, ExtentStore, LayerExtent, StoreUsage};

const BLOCK: usize = 4096;
const META: usize = BlockMeta::ENCODED_LEN;
/// Open extents kept in the cache; each holds two file descriptors.
pub const DEFAULT_HANDLE_LIMIT: usize = 1024;
/// Prefix of a layer directory renamed away for removal.
const TRASH_PREFIX: &str = ".trash-";
/// Suffix of a fence file being replaced.
const FENCE_TMP_SUFFIX: &str = ".tmp";

/// Why a store operation failed; carried inside the [`io::Error`] the trait
/// returns, whose kind is the kind of the underlying error.
#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    #[error("creating directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("punching a hole in {path}")]
    PunchHole {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("syncing {path}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("listing {path}")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("renaming {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("fence file {path} holds {len} bytes, expected 8")]
    FenceCorrupt { path: PathBuf, len: usize },
    #[error("querying free space of {path}")]
    Statvfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    BadRequest(#[from] BadRequest),
}

impl From<FileStoreError> for io::Error {
    fn from(e: FileStoreError) -> io::Error {
        use FileStoreError::*;
        let kind = match &e {
            CreateDir { source, .. }
            | Open { source, .. }
            | Read { source, .. }
            | Write { source, .. }
            | PunchHole { source, .. }
            | Sync { source, .. }
            | List { source, .. }
            | Remove { source, .. }
            | Rename { source, .. }
            | Statvfs { source, .. } => source.kind(),
            FenceCorrupt { .. } => io::ErrorKind::InvalidData,
            BadRequest(_) => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}

/// A request whose shape is wrong; both stores refuse it before changing
/// anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("{count} blocks from block {first} pass the last block index {}", u32::MAX)]
    Range { first: u32, count: usize },
    #[error("data holds {got} bytes, expected {expected} (4096 per block)")]
    DataLength { expected: usize, got: usize },
}

/// Checks that `count` blocks from `first` have `u32` indexes.
pub(super) fn check_range(first: u32, count: usize) -> Result<(), BadRequest> {
    if u64::from(first) + count as u64 > u64::from(u32::MAX) + 1 {
        return Err(BadRequest::Range { first, count });
    }
    Ok(())
}

/// Checks a read or write request: the blocks fit in `u32` indexes, and
/// `data_len` is 4096 bytes per block (reads) or per `Data` meta (writes).
pub(super) fn check_request(
    first: u32,
    metas: &[BlockMeta],
    data_len: usize,
    write: bool,
) -> Result<(), BadRequest> {
    let count = metas.len();
    check_range(first, count)?;
    let blocks = if write { metas.iter().filter(|m| m.state == BlockState::Data).count() } else { count };
    let expected = blocks * BLOCK;
    if data_len != expected {
        return Err(BadRequest::DataLength { expected, got: data_len });
    }
    Ok(())
}

/// The extent store on a node's data directory. See the module docs.
#[derive(Debug)]
pub struct FileStore {
    layers: PathBuf,
    fences: PathBuf,
    cache: Mutex<HandleCache>,
    dirty: Mutex<Dirty>,
    /// Held for the whole of a flush, so a flush that starts while another
    /// is syncing waits for it instead of returning before those syncs end.
    flush_lock: Mutex<()>,
    /// Serialises fence updates so the temporary file has one writer.
    fence_lock: Mutex<()>,
    next_file_id: AtomicU64,
}

/// The open files of one extent, shared by every thread using it.
#[derive(Debug)]
struct ExtentFiles {
    /// Unique per open, so a dirty set keyed by it never mixes up the files
    /// of a deleted layer with those of a layer re-created under the same id.
    id: u64,
    data: File,
    meta: File,
    data_path: PathBuf,
    meta_path: PathBuf,
}

#[derive(Debug)]
struct HandleCache {
    limit: usize,
    tick: u64,
    open: HashMap<LayerExtent, (Arc<ExtentFiles>, u64)>,
}

/// What the next flush must sync.
#[derive(Debug, Default)]
struct Dirty {
    files: HashMap<u64, Arc<ExtentFiles>>,
    dirs: HashSet<PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves nothing half-updated
    // that a later caller could misread (handles and dirty sets stay
    // consistent per operation), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn layer_dir_name(layer: u64) -> String {
    format!("{layer:016x}")
}

/// Parses exactly `digits` lowercase hex digits, the only form the store writes.
fn parse_hex(s: &str, digits: usize) -> Option<u64> {
    if s.len() != digits || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

fn sync_dir(path: &Path) -> Result<(), FileStoreError> {
    let dir = File::open(path).map_err(|source| FileStoreError::Open { path: path.to_owned(), source })?;
    dir.sync_all().map_err(|source| FileStoreError::Sync { path: path.to_owned(), source })
}

/// Creates a directory; true when it did not exist.
fn create_dir(path: &Path) -> Result<bool, FileStoreError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(FileStoreError::CreateDir { path: path.to_owned(), source }),
    }
}

/// Positioned read of as much of `buf` as the file holds; the rest (past the
/// end of the file) is zeroed. Returns how many bytes the file held.
fn read_fill(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<usize, FileStoreError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(FileStoreError::Read { path: path.to_owned(), source }),
        }
    }
    buf[done..].fill(0);
    Ok(done)
}

fn write_all(file: &File, path: &Path, buf: &[u8], offset: u64) -> Result<(), FileStoreError> {
    file.write_all_at(buf, offset).map_err(|source| FileStoreError::Write { path: path.to_owned(), source })
}

/// Makes `len` bytes at `offset` read as zeroes and frees their space when the
/// filesystem can; otherwise writes zeroes.
fn zero_range(file: &File, path: &Path, offset: u64, len: u64) -> Result<(), FileStoreError> {
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let off = i64::try_from(offset).expect("block offsets stay below 2^44");
    let n = i64::try_from(len).expect("a request is far shorter than 2^63 bytes");
    match fallocate(file, flags, off, n) {
        Ok(()) => Ok(()),
        Err(Errno::EOPNOTSUPP | Errno::ENOSYS) => {
            let zeroes = vec![0u8; BLOCK * 64];
            let mut at = 0;
            while at < len {
                let chunk = (len - at).min(zeroes.len() as u64);
                write_all(file, path, &zeroes[..chunk as usize], offset + at)?;
                at += chunk;
            }
            Ok(())
        }
        Err(e) => Err(FileStoreError::PunchHole { path: path.to_owned(), source: e.into() }),
    }
}

/// Removes the entries of `dir` whose names match.
fn remove_matching(dir: &Path, matches: impl Fn(&str) -> bool) -> Result<(), FileStoreError> {
    let entries =
        fs::read_dir(dir).map_err(|source| FileStoreError::List { path: dir.to_owned(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| FileStoreError::List { path: dir.to_owned(), source })?;
        if !entry.file_name().to_str().is_some_and(&matches) {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(FileStoreError::Remove { path, source }),
        }
    }
    Ok(())
}

/// Opens a file for reading and writing, creating it if `create`; true when
/// it was created.
fn open_rw(path: &Path, create: bool) -> Result<(File, bool), FileStoreError> {
    let open = |create_new: bool| OpenOptions::new().read(true).write(true).create_new(create_new).open(path);
    if create {
        match open(true) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(FileStoreError::Open { path: path.to_owned(), source }),
        }
    }
    open(false).map(|f| (f, false)).map_err(|source| FileStoreError::Open { path: path.to_owned(), source })
}

impl ExtentFiles {
    fn sync(&self) -> Result<(), FileStoreError> {
        self.data
            .sync_data()
            .map_err(|source| FileStoreError::Sync { path: self.data_path.clone(), source })?;
        self.meta.sync_data().map_err(|source| FileStoreError::Sync { path: self.meta_path.clone(), source })
    }

    fn read_metas(&self, first: u32, metas: &mut [BlockMeta]) -> Result<(), FileStoreError> {
        let mut raw = vec![0u8; metas.len() * META];
        let held = read_fill(&self.meta, &self.meta_path, &mut raw, u64::from(first) * META as u64)?;
        // A record cut short by the end of the file is one whose write never
        // completed: it reads as absent, not as a mix of its bytes and zeroes.
        let whole = held / META;
        for (i, (meta, rec)) in metas.iter_mut().zip(raw.chunks_exact(META)).enumerate() {
            *meta = if i < whole {
                BlockMeta::decode(rec.try_into().expect("chunks_exact yields META bytes"))
            } else {
                BlockMeta::ABSENT
            };
        }
        Ok(())
    }
}

impl FileStore {
    /// Opens the store in `dir`, creating it if needed, with the default
    /// bound on open extents.
    pub fn open(dir: &Path) -> io::Result<FileStore> {
        Self::open_with_handle_limit(dir, DEFAULT_HANDLE_LIMIT)
    }

    /// Opens the store keeping at most `limit` extents open (at least one).
    pub fn open_with_handle_limit(dir: &Path, limit: usize) -> io::Result<FileStore> {
        fs::create_dir_all(dir)
            .map_err(|source| FileStoreError::CreateDir { path: dir.to_owned(), source })?;
        let layers = dir.join("layers");
        let fences = dir.join("fences");
        let created = create_dir(&layers)? | create_dir(&fences)?;
        if created {
            sync_dir(dir)?;
        }
        let store = FileStore {
            layers,
            fences,
            cache: Mutex::new(HandleCache { limit: limit.max(1), tick: 0, open: HashMap::new() }),
            dirty: Mutex::new(Dirty::default()),
            flush_lock: Mutex::new(()),
            fence_lock: Mutex::new(()),
            next_file_id: AtomicU64::new(0),
        };
        store.clear_leftovers()?;
        Ok(store)
    }

    /// Removes layer directories whose removal was interrupted and fence
    /// files whose replacement was.
    fn clear_leftovers(&self) -> Result<(), FileStoreError> {
        remove_matching(&self.layers, |name| name.starts_with(TRASH_PREFIX))?;
        remove_matching(&self.fences, |name| name.ends_with(FENCE_TMP_SUFFIX))
    }

    fn layer_dir(&self, layer: u64) -> PathBuf {
        self.layers.join(layer_dir_name(layer))
    }

    fn fence_path(&self, volume: VolumeId) -> PathBuf {
        self.fences.join(volume.to_string())
    }

    /// The files of an extent: opened (and cached) when they exist; created
    /// when `create`, otherwise `None` for an extent never written.
    fn files(&self, key: LayerExtent, create: bool) -> Result<Option<Arc<ExtentFiles>>, FileStoreError> {
        // Opens happen under the cache lock so that `delete_layer` (which
        // takes it too) never races a half-done open of the same layer.
        let mut cache = lock(&self.cache);
        cache.tick += 1;
        let tick = cache.tick;
        if let Some((files, used)) = cache.open.get_mut(&key) {
            *used = tick;
            return Ok(Some(files.clone()));
        }
        let dir = self.layer_dir(key.layer);
        let meta_path = dir.join(format!("{:08x}.meta", key.index));
        let data_path = dir.join(format!("{:08x}.data", key.index));
        let mut new_dirs = Vec::new();
        if create && create_dir(&dir)? {
            new_dirs.push(self.layers.clone());
        }
        let meta = match open_rw(&meta_path, create) {
            Ok((meta, created)) => {
                if created {
                    new_dirs.push(dir.clone());
                }
                meta
            }
            Err(FileStoreError::Open { source, .. })
                if !create && source.kind() == io::ErrorKind::NotFound =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        // Created even on a read: a meta whose data file was lost reads as
        // zeroes, which fail the checksums of its `Data` blocks, so the
        // replica repairs them.
        let (data, created) = open_rw(&data_path, true)?;
        if created {
            new_dirs.push(dir.clone());
        }
        let files = Arc::new(ExtentFiles {
            id: self.next_file_id.fetch_add(1, Ordering::Relaxed),
            data,
            meta,
            data_path,
            meta_path,
        });
        if cache.open.len() >= cache.limit {
            let oldest = cache.open.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                // Dropped here unless a writer or the dirty set still holds it.
                cache.open.remove(&oldest);
            }
        }
        cache.open.insert(key, (files.clone(), tick));
        drop(cache);
        if !new_dirs.is_empty() {
            lock(&self.dirty).dirs.extend(new_dirs);
        }
        Ok(Some(files))
    }

    fn write(
        &self,
        key: LayerExtent,
        first: u32,
        metas: &[BlockMeta],
        data: &[u8],
    ) -> Result<(), FileStoreError> {
        check_request(first, metas, data.len(), true)?;
        if metas.is_empty() {
            return Ok(());
        }
        let files = self.files(key, true)?.expect("files are created when asked to");
        let base = u64::from(first) * BLOCK as u64;
        let mut data_at = 0;
        let mut i = 0;
        while i < metas.len() {
            let is_data = metas[i].state == BlockState::Data;
            let run = metas[i..].iter().take_while(|m| (m.state == BlockState::Data) == is_data).count();
            let offset = base + (i * BLOCK) as u64;
            let len = run * BLOCK;
            if is_data {
                write_all(&files.data, &files.data_path, &data[data_at..data_at + len], offset)?;
                data_at += len;
            } else {
                zero_range(&files.data, &files.data_path, offset, len as u64)?;
            }
            i += run;
        }
        let raw: Vec<u8> = metas.iter().flat_map(|m| m.encode()).collect();
        write_all(&files.meta, &files.meta_path, &raw, u64::from(first) * META as u64)?;
        // Marked only after the writes: a flush that takes the dirty set
        // earlier did not start after this write completed, so owes it nothing.
        lock(&self.dirty).files.insert(files.id, files);
        Ok(())
    }

    fn read(
        &self,
        key: LayerExtent,
        first: u32,
        data: &mut [u8],
        metas: &mut [BlockMeta],
    ) -> Result<(), FileStoreError> {
        check_request(first, metas, data.len(), false)?;
        let Some(files) = self.files(key, false)? else {
            metas.fill(BlockMeta::ABSENT);
            data.fill(0);
            return Ok(());
        };
        files.read_metas(first, metas)?;
        read_fill(&files.data, &files.data_path, data, u64::from(first) * BLOCK as u64)?;
        // Only `Data` blocks have bytes: an `Absent` block may sit over bytes
        // whose meta write never landed, and a `Zero` block over zeroes
        // written where holes cannot be punched.
        for (meta, block) in metas.iter().zip(data.chunks_exact_mut(BLOCK)) {
            if meta.state != BlockState::Data {
                block.fill(0);
            }
        }
        Ok(())
    }

    fn sync_dirty(&self) -> Result<(), FileStoreError> {
        let _flushing = lock(&self.flush_lock);
        let (files, dirs) = {
            let mut dirty = lock(&self.dirty);
            (std::mem::take(&mut dirty.files), std::mem::take(&mut dirty.dirs))
        };
        let mut first_err = None;
        let mut failed = Dirty::default();
        for (id, f) in files {
            if let Err(e) = f.sync() {
                first_err.get_or_insert(e);
                failed.files.insert(id, f);
            }
        }
        for dir in dirs {
            match sync_dir(&dir) {
                Ok(()) => {}
                // A deleted layer's directory: its removal is synced already.
                Err(FileStoreError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                    failed.dirs.insert(dir);
                }
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => {
                // Kept for the next flush to try again.
                let mut dirty = lock(&self.dirty);
                dirty.files.extend(failed.files);
                dirty.dirs.extend(failed.dirs);
                Err(e)
            }
        }
    }

    fn read_fence(&self, volume: VolumeId) -> Result<u64, FileStoreError> {
        let path = self.fence_path(volume);
        let raw = match fs::read(&path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(FileStoreError::Read { path, source }),
        };
        let bytes: [u8; 8] =
            raw.as_slice().try_into().map_err(|_| FileStoreError::FenceCorrupt { path, len: raw.len() })?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn write_fence(&self, volume: VolumeId, generation: u64) -> Result<(), FileStoreError> {
        let _fencing = lock(&self.fence_lock);
        let path = self.fence_path(volume);
        let tmp = self.fences.join(format!("{volume}{FENCE_TMP_SUFFIX}"));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|source| FileStoreError::Open { path: tmp.clone(), source })?;
        write_all(&file, &tmp, &generation.to_le_bytes(), 0)?;
        file.sync_data().map_err(|source| FileStoreError::Sync { path: tmp.clone(), source })?;
        drop(file);
        fs::rename(&tmp, &path).map_err(|source| FileStoreError::Rename { from: tmp, to: path, source })?;
        sync_dir(&self.fences)
    }

    fn list(&self) -> Result<Vec<LayerExtent>, FileStoreError> {
        let list_err = |path: &Path| {
            let path = path.to_owned();
            move |source| FileStoreError::List { path, source }
        };
        let mut out = Vec::new();
        for layer_entry in fs::read_dir(&self.layers).map_err(list_err(&self.layers))? {
            let layer_entry = layer_entry.map_err(list_err(&self.layers))?;
            let Some(layer) = layer_entry.file_name().to_str().and_then(|n| parse_hex(n, 16)) else {
                continue;
            };
            let dir = layer_entry.path();
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                // Not a directory, or deleted since it was listed.
                Err(e) if matches!(e.kind(), io::ErrorKind::NotADirectory | io::ErrorKind::NotFound) => {
                    continue;
                }
                Err(source) => return Err(FileStoreError::List { path: dir, source }),
            };
            for entry in entries {
                let entry = entry.map_err(list_err(&dir))?;
                let name = entry.file_name();
                let index = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".meta"))
                    .and_then(|n| parse_hex(n, 8))
                    .and_then(|i| u32::try_from(i).ok());
                // A directory under a meta file's name could never be opened.
                if let Some(index) = index
                    && entry.file_type().is_ok_and(|t| t.is_file())
                {
                    out.push(LayerExtent { layer, index });
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn remove_layer(&self, layer: u64) -> Result<(), FileStoreError> {
        let dir = self.layer_dir(layer);
        let trash = self.layers.join(format!(
            "{TRASH_PREFIX}{}-{:016x}",
            layer_dir_name(layer),
            rand::random::<u64>()
        ));
        {
            // No extent of the layer can be opened while the cache is locked,
            // so every dirty file under `dir` is one of the layer being
            // deleted, and needs no syncing any more. Writes racing the delete
            // may still mark their (now unlinked) files, which a flush syncs
            // harmlessly.
            let mut cache = lock(&self.cache);
            cache.open.retain(|k, _| k.layer != layer);
            lock(&self.dirty).files.retain(|_, f| !f.data_path.starts_with(&dir));
            match fs::rename(&dir, &trash) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(source) => return Err(FileStoreError::Rename { from: dir, to: trash, source }),
            }
        }
        sync_dir(&self.layers)?;
        // Only a stray file could sit where a layer directory belongs.
        let removed = if trash.is_dir() { fs::remove_dir_all(&trash) } else { fs::remove_file(&trash) };
        removed.map_err(|source| FileStoreError::Remove { path: trash, source })
    }

    fn allocated(&self) -> Result<u64, FileStoreError> {
        fn walk(path: &Path, total: &mut u64) -> Result<(), FileStoreError> {
            let entries = match fs::read_dir(path) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(source) => return Err(FileStoreError::List { path: path.to_owned(), source }),
            };
            for entry in entries {
                let entry = entry.map_err(|source| FileStoreError::List { path: path.to_owned(), source })?;
                let meta = match entry.metadata() {
                    Ok(meta) => meta,
                    // Removed since it was listed (a concurrent delete).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(FileStoreError::Read { path: entry.path(), source }),
                };
                *total = total.saturating_add(meta.blocks().saturating_mul(512));
                if meta.is_dir() {
                    walk(&entry.path(), total)?;
                }
            }
            Ok(())
        }
        let mut total = 0;
        walk(&self.layers, &mut total)?;
        Ok(total)
    }

    fn free(&self) -> Result<u64, FileStoreError> {
        let st = nix::sys::statvfs::statvfs(&self.layers)
            .map_err(|e| FileStoreError::Statvfs { path: self.layers.clone(), source: e.into() })?;
        Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }
}

impl ExtentStore for FileStore {
    fn read_blocks(
        &self,
        key: LayerExtent,
        first: u32,
        data: &mut [u8],
        metas: &mut [BlockMeta],
    ) -> io::Result<()> {
        Ok(self.read(key, first, data, metas)?)
    }

    fn read_metas(&self, key: LayerExtent, first: u32, count: u32) -> io::Result<Vec<BlockMeta>> {
        let mut metas = vec![BlockMeta::ABSENT; count as usize];
        check_range(first, metas.len()).map_err(FileStoreError::from)?;
        if let Some(files) = self.files(key, false)? {
            files.read_metas(first, &mut metas)?;
        }
        Ok(metas)
    }

    fn write_blocks(&self, key: LayerExtent, first: u32, metas: &[BlockMeta], data: &[u8]) -> io::Result<()> {
        Ok(self.write(key, first, metas, data)?)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(self.sync_dirty()?)
    }

    fn fence(&self, volume: VolumeId) -> io::Result<u64> {
        Ok(self.read_fence(volume)?)
    }

    fn set_fence(&self, volume: VolumeId, generation: u64) -> io::Result<()> {
        Ok(self.write_fence(volume, generation)?)
    }

    fn extents(&self) -> io::Result<Vec<LayerExtent>> {
        Ok(self.list()?)
    }

    fn delete_layer(&self, layer: u64) -> io::Result<()> {
        Ok(self.remove_layer(layer)?)
    }

    fn usage(&self) -> io::Result<StoreUsage> {
        Ok(StoreUsage { used: self.allocated()?, free: self.free()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(layer: u64, index: u32) -> LayerExtent {
        LayerExtent { layer, index }
    }

    fn data_meta(seq: u64, data: &[u8]) -> BlockMeta {
        BlockMeta { generation: 1, seq, crc: super::super::block_crc(data), state: BlockState::Data }
    }

    /// Writes blocks `first..first + n` of `k`, block i filled with byte i + 1.
    fn write(store: &FileStore, k: LayerExtent, first: u32, n: u32) -> Vec<BlockMeta> {
        let data: Vec<u8> = (first..first + n).flat_map(|i| [i as u8 + 1; BLOCK]).collect();
        let metas: Vec<BlockMeta> = data.chunks(BLOCK).map(|b| data_meta(1, b)).collect();
        store.write_blocks(k, first, &metas, &data).unwrap();
        metas
    }

    fn read(store: &FileStore, k: LayerExtent, first: u32, n: u32) -> (Vec<u8>, Vec<BlockMeta>) {
        let mut data = vec![0; n as usize * BLOCK];
        let mut metas = vec![BlockMeta::ABSENT; n as usize];
        store.read_blocks(k, first, &mut data, &mut metas).unwrap();
        (data, metas)
    }

    fn extent_path(dir: &Path, k: LayerExtent, ext: &str) -> PathBuf {
        dir.join(format!("layers/{:016x}/{:08x}.{ext}", k.layer, k.index))
    }

    #[test]
    fn layout_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let k = key(0xab, 0x12);
        let metas = write(&store, k, 2, 1);
        store.set_fence(VolumeId(0xcd), 7).unwrap();
        store.flush().unwrap();
        let data = fs::read(extent_path(dir.path(), k, "data")).unwrap();
        assert_eq!(data.len(), 3 * BLOCK);
        assert!(data[..2 * BLOCK].iter().all(|b| *b == 0) && data[2 * BLOCK..].iter().all(|b| *b == 3));
        let meta = fs::read(extent_path(dir.path(), k, "meta")).unwrap();
        assert_eq!(meta, [[0; META].as_slice(), &[0; META], &metas[0].encode()].concat());
        assert_eq!(fs::read(dir.path().join("fences/00000000000000cd")).unwrap(), 7u64.to_le_bytes());
    }

    #[test]
    fn torn_and_corrupt_meta_files_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let (torn, rotten, lost) = (key(1, 0), key(1, 1), key(1, 2));
        let metas = write(&store, torn, 0, 3);
        write(&store, rotten, 0, 2);
        write(&store, lost, 0, 1);
        drop(store);

        // A meta file cut inside its second record.
        let meta = OpenOptions::new().write(true).open(extent_path(dir.path(), torn, "meta")).unwrap();
        meta.set_len(META as u64 + 5).unwrap();
        // A record whose state is not one the store writes.
        let meta = OpenOptions::new().write(true).open(extent_path(dir.path(), rotten, "meta")).unwrap();
        meta.write_all_at(&7u32.to_le_bytes(), META as u64 + 20).unwrap();
        // A data file gone.
        fs::remove_file(extent_path(dir.path(), lost, "data")).unwrap();

        let store = FileStore::open(dir.path()).unwrap();
        let (data, got) = read(&store, torn, 0, 3);
        assert_eq!(got, [metas[0], BlockMeta::ABSENT, BlockMeta::ABSENT]);
        assert!(data[BLOCK..].iter().all(|b| *b == 0), "absent blocks read as zeroes");
        let (data, got) = read(&store, rotten, 0, 2);
        assert_eq!(got[1].state, BlockState::Data);
        assert_ne!(
            got[1].crc,
            super::super::block_crc(&data[BLOCK..]),
            "an unknown state fails its checksum"
        );
        let (data, got) = read(&store, lost, 0, 1);
        assert_eq!(got[0].state, BlockState::Data);
        assert_ne!(got[0].crc, super::super::block_crc(&data), "lost data fails its checksum");
        assert_eq!(store.extents().unwrap(), [torn, rotten, lost]);
        // Rewriting repairs.
        let metas = write(&store, torn, 0, 3);
        assert_eq!(read(&store, torn, 0, 3).1, metas);
    }

    #[test]
    fn unexpected_names_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        write(&store, key(5, 1), 0, 1);
        let layers = dir.path().join("layers");
        let layer = layers.join("0000000000000005");
        for d in ["zz", "000000000000000G", "000000000000000A", "+00000000000000a", "00000000000000001"] {
            fs::create_dir(layers.join(d)).unwrap();
            fs::write(layers.join(d).join("00000001.meta"), [0; META]).unwrap();
        }
        fs::write(layers.join("garbage"), b"x").unwrap();
        // A file where a layer directory belongs.
        fs::write(layers.join("0000000000000003"), b"x").unwrap();
        for f in
            ["garbage.meta", "0000001.meta", "00000002.data", "00000003.meta.bak", "0000000A.meta", ".meta"]
        {
            fs::write(layer.join(f), b"x").unwrap();
        }
        fs::create_dir(layer.join("00000004.meta")).unwrap();
        // Not UTF-8.
        fs::write(
            layer.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"\xff.meta")),
            b"x",
        )
        .unwrap();

        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(store.extents().unwrap(), [key(5, 1)]);
        assert!(store.usage().unwrap().used > 0);
        // Writing where a layer directory is a file fails, naming the file.
        let err = store.write_blocks(key(3, 0), 0, &[BlockMeta::ABSENT], &[]).unwrap_err();
        assert!(err.to_string().contains("0000000000000003"), "{err}");
        assert!(store.read_metas(key(3, 0), 0, 1).is_err());
        store.delete_layer(5).unwrap();
        store.delete_layer(3).unwrap();
        assert_eq!(store.extents().unwrap(), []);
    }

    #[test]
    fn corrupt_fence_is_an_error_until_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let volume = VolumeId(9);
        fs::write(dir.path().join("fences").join(volume.to_string()), [1, 2, 3]).unwrap();
        let err = store.fence(volume).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(&volume.to_string()), "{err}");
        store.set_fence(volume, 4).unwrap();
        assert_eq!(store.fence(volume).unwrap(), 4);
    }

    #[test]
    fn open_clears_interrupted_deletes_and_fence_updates() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        write(&store, key(1, 0), 0, 1);
        store.set_fence(VolumeId(1), 2).unwrap();
        drop(store);
        let trash = dir.path().join("layers").join(format!("{TRASH_PREFIX}0000000000000002-1"));
        fs::create_dir(&trash).unwrap();
        fs::write(trash.join("00000000.meta"), [0; META]).unwrap();
        let tmp = dir.path().join("fences").join(format!("{}{FENCE_TMP_SUFFIX}", VolumeId(1)));
        fs::write(&tmp, 3u64.to_le_bytes()).unwrap();

        let store = FileStore::open(dir.path()).unwrap();
        assert!(!trash.exists() && !tmp.exists());
        assert_eq!(store.fence(VolumeId(1)).unwrap(), 2, "an unfinished fence update never counts");
        assert_eq!(store.extents().unwrap(), [key(1, 0)]);
    }

    #[test]
    fn flush_syncs_what_was_written_since() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open_with_handle_limit(dir.path(), 1).unwrap();
        write(&store, key(1, 0), 0, 1);
        write(&store, key(1, 1), 0, 1);
        {
            let dirty = lock(&store.dirty);
            assert_eq!(dirty.files.len(), 2, "an evicted dirty file stays dirty");
            assert!(dirty.dirs.contains(&store.layers) && dirty.dirs.contains(&store.layer_dir(1)));
        }
        store.flush().unwrap();
        let dirty = lock(&store.dirty);
        assert!(dirty.files.is_empty() && dirty.dirs.is_empty());
        assert_eq!(lock(&store.cache).open.len(), 1);
    }
}
