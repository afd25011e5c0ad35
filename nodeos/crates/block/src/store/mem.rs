//! [`MemStore`]: an extent store in memory, for deterministic multi-replica
//! tests, with fault knobs.
//!
//! The store keeps two states: `live`, what reads see, and `durable`, a copy
//! of `live` taken at the last `flush` (fences are written to both at once,
//! since `set_fence` is durable on return). [`MemStore::crash`] puts `live`
//! back to `durable`, as a power loss would. Block data is shared between the
//! two (`Arc`), so a flush copies metas and pointers, never data.
//!
//! Clones share one store: a test "restarts" a replica by building it again
//! over a clone, which keeps everything written (as a killed process would
//! find its files in the page cache).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use nodeos_types::VolumeId;

use super::file::{BadRequest, check_range, check_request};
use super::{BlockMeta, BlockState, ExtentStore, LayerExtent, StoreUsage};

const BLOCK: usize = 4096;
/// Space one block's meta takes, counted in `used` like the file store's
/// meta records.
const META: u64 = BlockMeta::ENCODED_LEN as u64;

/// Why a [`MemStore`] call failed; carried inside the [`io::Error`] the trait
/// returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemStoreError {
    /// A failure injected with [`MemStore::fail_next_writes`].
    #[error("injected write failure")]
    InjectedWriteFailure,
    #[error("write needs {needed} more bytes, {free} free")]
    Full { needed: u64, free: u64 },
    #[error(transparent)]
    BadRequest(#[from] BadRequest),
}

impl From<MemStoreError> for io::Error {
    fn from(e: MemStoreError) -> io::Error {
        let kind = match e {
            MemStoreError::InjectedWriteFailure => io::ErrorKind::Other,
            MemStoreError::Full { .. } => io::ErrorKind::StorageFull,
            MemStoreError::BadRequest(_) => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}

/// One stored block: `data` is `Some` exactly when the meta is `Data`.
#[derive(Debug, Clone)]
struct Block {
    meta: BlockMeta,
    data: Option<Arc<[u8]>>,
}

impl Block {
    fn size(&self) -> u64 {
        META + if self.data.is_some() { BLOCK as u64 } else { 0 }
    }
}

#[derive(Debug, Clone, Default)]
struct State {
    /// An extent is present once written, even if only with `Absent` metas,
    /// as a file store's extent is once its files exist.
    extents: BTreeMap<LayerExtent, BTreeMap<u32, Block>>,
    fences: HashMap<VolumeId, u64>,
    /// Sum of [`Block::size`] over every block.
    used: u64,
}

#[derive(Debug)]
struct Inner {
    live: State,
    durable: State,
    failing_writes: u32,
    capacity: u64,
}

/// An extent store in memory. See the module docs.
#[derive(Debug, Clone)]
pub struct MemStore {
    inner: Arc<Mutex<Inner>>,
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStore {
    /// An empty store with no capacity limit.
    pub fn new() -> MemStore {
        MemStore {
            inner: Arc::new(Mutex::new(Inner {
                live: State::default(),
                durable: State::default(),
                failing_writes: 0,
                capacity: u64::MAX,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every operation updates the state in one step after its checks, so
        // a panicking test thread cannot leave it half-changed.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Power loss: forgets every write and layer deletion since the last
    /// flush.
    pub fn crash(&self) {
        let mut inner = self.lock();
        inner.live = inner.durable.clone();
    }

    /// Bit rot: flips every byte of a stored `Data` block, leaving its meta
    /// (and so its checksum) as it was. The flushed copy rots too when it
    /// holds the same write, since both stand for the one copy on the medium.
    /// Returns false when the block holds no data.
    pub fn corrupt_block(&self, key: LayerExtent, block: u32) -> bool {
        let mut inner = self.lock();
        let Some(stored) = inner.live.extents.get_mut(&key).and_then(|e| e.get_mut(&block)) else {
            return false;
        };
        let Some(data) = &stored.data else { return false };
        let meta = stored.meta;
        let rotten: Arc<[u8]> = data.iter().map(|b| !b).collect();
        stored.data = Some(rotten.clone());
        if let Some(durable) = inner.durable.extents.get_mut(&key).and_then(|e| e.get_mut(&block))
            && durable.meta == meta
            && durable.data.is_some()
        {
            durable.data = Some(rotten);
        }
        true
    }

    /// Makes the next `n` calls of `write_blocks` fail without changing
    /// anything.
    pub fn fail_next_writes(&self, n: u32) {
        self.lock().failing_writes = n;
    }

    /// The size of the medium: `usage().free` is what `used` leaves of it,
    /// and writes that would pass it fail with `StorageFull`.
    pub fn set_capacity(&self, bytes: u64) {
        self.lock().capacity = bytes;
    }
}

impl ExtentStore for MemStore {
    fn read_blocks(
        &self,
        key: LayerExtent,
        first: u32,
        data: &mut [u8],
        metas: &mut [BlockMeta],
    ) -> io::Result<()> {
        check_request(first, metas, data.len(), false).map_err(MemStoreError::from)?;
        let inner = self.lock();
        let extent = inner.live.extents.get(&key);
        for (n, (meta, out)) in metas.iter_mut().zip(data.chunks_exact_mut(BLOCK)).enumerate() {
            // Cannot overflow: `check_request` bounds the last index.
            let i = first + n as u32;
            match extent.and_then(|e| e.get(&i)) {
                Some(Block { meta: m, data: Some(d) }) => {
                    *meta = *m;
                    out.copy_from_slice(d);
                }
                Some(Block { meta: m, data: None }) => {
                    *meta = *m;
                    out.fill(0);
                }
                None => {
                    *meta = BlockMeta::ABSENT;
                    out.fill(0);
                }
            }
        }
        Ok(())
    }

    fn read_metas(&self, key: LayerExtent, first: u32, count: u32) -> io::Result<Vec<BlockMeta>> {
        check_range(first, count as usize).map_err(MemStoreError::from)?;
        let inner = self.lock();
        let extent = inner.live.extents.get(&key);
        Ok((0..count)
            .map(|i| first + i)
            .map(|i| extent.and_then(|e| e.get(&i)).map_or(BlockMeta::ABSENT, |b| b.meta))
            .collect())
    }

    fn write_blocks(&self, key: LayerExtent, first: u32, metas: &[BlockMeta], data: &[u8]) -> io::Result<()> {
        check_request(first, metas, data.len(), true).map_err(MemStoreError::from)?;
        let mut inner = self.lock();
        if inner.failing_writes > 0 {
            inner.failing_writes -= 1;
            return Err(MemStoreError::InjectedWriteFailure.into());
        }
        if metas.is_empty() {
            return Ok(());
        }
        let mut chunks = data.chunks_exact(BLOCK);
        let blocks: Vec<(u32, Block)> = metas
            .iter()
            .enumerate()
            .map(|(n, meta)| {
                let data = (meta.state == BlockState::Data).then(|| {
                    Arc::from(chunks.next().expect("check_request counted one chunk per Data meta"))
                });
                (first + n as u32, Block { meta: *meta, data })
            })
            .collect();
        let extent = inner.live.extents.get(&key);
        let old: u64 =
            blocks.iter().filter_map(|(i, _)| extent.and_then(|e| e.get(i))).map(Block::size).sum();
        let new: u64 = blocks.iter().map(|(_, b)| b.size()).sum();
        let used = inner.live.used - old + new;
        if new > old && used > inner.capacity {
            let free = inner.capacity.saturating_sub(inner.live.used);
            return Err(MemStoreError::Full { needed: new - old, free }.into());
        }
        inner.live.used = used;
        inner.live.extents.entry(key).or_default().extend(blocks);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut inner = self.lock();
        inner.durable = inner.live.clone();
        Ok(())
    }

    fn fence(&self, volume: VolumeId) -> io::Result<u64> {
        Ok(self.lock().live.fences.get(&volume).copied().unwrap_or(0))
    }

    fn set_fence(&self, volume: VolumeId, generation: u64) -> io::Result<()> {
        let mut inner = self.lock();
        inner.live.fences.insert(volume, generation);
        inner.durable.fences.insert(volume, generation);
        Ok(())
    }

    fn extents(&self) -> io::Result<Vec<LayerExtent>> {
        Ok(self.lock().live.extents.keys().copied().collect())
    }

    fn delete_layer(&self, layer: u64) -> io::Result<()> {
        let mut inner = self.lock();
        let state = &mut inner.live;
        let mut freed = 0;
        state.extents.retain(|k, blocks| {
            if k.layer != layer {
                return true;
            }
            freed += blocks.values().map(Block::size).sum::<u64>();
            false
        });
        state.used -= freed;
        Ok(())
    }

    fn usage(&self) -> io::Result<StoreUsage> {
        let inner = self.lock();
        Ok(StoreUsage { used: inner.live.used, free: inner.capacity.saturating_sub(inner.live.used) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::block_crc;

    fn key(layer: u64, index: u32) -> LayerExtent {
        LayerExtent { layer, index }
    }

    /// Writes one block of `byte`s with sequence number `seq`.
    fn write(store: &MemStore, k: LayerExtent, block: u32, seq: u64, byte: u8) -> BlockMeta {
        let data = [byte; BLOCK];
        let meta = BlockMeta { generation: 1, seq, crc: block_crc(&data), state: BlockState::Data };
        store.write_blocks(k, block, &[meta], &data).unwrap();
        meta
    }

    fn read(store: &MemStore, k: LayerExtent, block: u32) -> (Vec<u8>, BlockMeta) {
        let mut data = vec![0; BLOCK];
        let mut metas = [BlockMeta::ABSENT];
        store.read_blocks(k, block, &mut data, &mut metas).unwrap();
        (data, metas[0])
    }

    #[test]
    fn crash_loses_exactly_the_unflushed_writes() {
        let store = MemStore::new();
        let flushed = write(&store, key(1, 0), 0, 1, 0xaa);
        let kept = write(&store, key(1, 0), 1, 2, 0xbb);
        write(&store, key(2, 0), 0, 3, 0xcc);
        store.set_fence(VolumeId(1), 3).unwrap();
        store.flush().unwrap();

        write(&store, key(1, 0), 0, 4, 0x11);
        write(&store, key(3, 0), 0, 5, 0x22);
        store.write_blocks(key(1, 0), 1, &[BlockMeta::ABSENT], &[]).unwrap();
        store.delete_layer(2).unwrap();
        store.set_fence(VolumeId(1), 6).unwrap();
        store.set_fence(VolumeId(2), 1).unwrap();
        let unflushed_usage = store.usage().unwrap();

        store.crash();
        assert_eq!(read(&store, key(1, 0), 0), (vec![0xaa; BLOCK], flushed));
        assert_eq!(read(&store, key(1, 0), 1), (vec![0xbb; BLOCK], kept));
        assert_eq!(
            store.extents().unwrap(),
            [key(1, 0), key(2, 0)],
            "the new extent is gone, the deleted one back"
        );
        assert_eq!(read(&store, key(2, 0), 0).0, vec![0xcc; BLOCK]);
        assert_eq!(store.fence(VolumeId(1)).unwrap(), 6, "fences are durable when set");
        assert_eq!(store.fence(VolumeId(2)).unwrap(), 1);
        assert_eq!(store.usage().unwrap().used, 3 * (BLOCK as u64 + META));
        assert_ne!(store.usage().unwrap(), unflushed_usage);

        // A second crash with nothing written since changes nothing.
        store.crash();
        assert_eq!(read(&store, key(1, 0), 0), (vec![0xaa; BLOCK], flushed));
    }

    #[test]
    fn corrupt_block_changes_data_not_meta() {
        let store = MemStore::new();
        let k = key(1, 0);
        let meta = write(&store, k, 0, 1, 0x0f);
        store.flush().unwrap();
        let clone = store.clone();
        assert!(clone.corrupt_block(k, 0));
        let (data, got) = read(&store, k, 0);
        assert_eq!(got, meta);
        assert_eq!(data, vec![0xf0; BLOCK]);
        assert_ne!(block_crc(&data), meta.crc);
        // The rot is on the medium: a crash does not undo it.
        store.crash();
        assert_eq!(read(&store, k, 0).0, vec![0xf0; BLOCK]);
        // Nothing to rot in blocks without data.
        store.write_blocks(k, 1, &[BlockMeta { state: BlockState::Zero, ..meta }], &[]).unwrap();
        assert!(!store.corrupt_block(k, 1));
        assert!(!store.corrupt_block(k, 2));
        assert!(!store.corrupt_block(key(9, 9), 0));
        // A rewrite heals.
        let meta = write(&store, k, 0, 2, 0x0f);
        assert_eq!(read(&store, k, 0), (vec![0x0f; BLOCK], meta));
    }

    #[test]
    fn failed_writes_change_nothing() {
        let store = MemStore::new();
        let k = key(1, 0);
        let meta = write(&store, k, 0, 1, 1);
        store.fail_next_writes(2);
        let data = [2; BLOCK];
        let new = BlockMeta { seq: 2, crc: block_crc(&data), ..meta };
        for k in [k, key(2, 0)] {
            let err = store.write_blocks(k, 0, &[new], &data).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::Other);
        }
        assert_eq!(read(&store, k, 0), (vec![1; BLOCK], meta));
        assert_eq!(store.extents().unwrap(), [k]);
        store.write_blocks(k, 0, &[new], &data).unwrap();
        assert_eq!(read(&store, k, 0), (vec![2; BLOCK], new));
    }

    #[test]
    fn capacity_bounds_writes() {
        let store = MemStore::new();
        let block = BLOCK as u64 + META;
        store.set_capacity(2 * block + META + 10);
        write(&store, key(1, 0), 0, 1, 1);
        write(&store, key(1, 0), 1, 1, 1);
        assert_eq!(store.usage().unwrap(), StoreUsage { used: 2 * block, free: META + 10 });
        let data = [3; BLOCK];
        let meta = BlockMeta { generation: 1, seq: 2, crc: block_crc(&data), state: BlockState::Data };
        let err = store.write_blocks(key(1, 0), 2, &[meta], &data).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert_eq!(store.extents().unwrap(), [key(1, 0)]);
        // Overwriting in place and zeroing need no more space.
        store.write_blocks(key(1, 0), 0, &[meta], &data).unwrap();
        store
            .write_blocks(key(1, 0), 1, &[BlockMeta { state: BlockState::Zero, crc: 0, ..meta }], &[])
            .unwrap();
        assert_eq!(store.usage().unwrap().used, block + META);
        store.write_blocks(key(1, 0), 2, &[meta], &data).unwrap();
        store.set_capacity(0);
        assert_eq!(store.usage().unwrap().free, 0);
        store.delete_layer(1).unwrap();
        assert_eq!(store.usage().unwrap().used, 0);
    }
}
