//! [`Replica`]: one node's rules over its [`ExtentStore`], independent of any
//! transport (the TCP server and the in-process test transport both call
//! [`Replica::handle`]).
//!
//! Rules:
//! - **Fencing**: a write or fence with a generation older than the volume's
//!   fence is refused; a newer one raises the fence (durably) first. The
//!   fence lock is held across check and apply, so once `Fence(g)` has
//!   answered, no write of an older generation is applied here.
//! - **Newest wins**: each block keeps the `(generation, sequence)` of the
//!   write that produced it; a write, zero or repair changes a block only if
//!   it is newer. Copies therefore converge whatever the arrival order, and
//!   a repair can never undo a newer write.
//! - **Checksums**: data arriving with a CRC that does not match is refused
//!   (corrupted in transit); reads verify every data block and report corrupt
//!   ones instead of returning them; a repair may replace a corrupt block
//!   with a good copy of the same version.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use nodeos_types::VolumeId;

use crate::device::BLOCK_SIZE;
use crate::store::{BlockMeta, BlockState, ExtentStore, LayerExtent, block_crc};
use crate::wire::{Answer, MAX_BLOCKS_PER_REQUEST, MAX_METAS_PER_REQUEST, Op, ReplicaError};

const BS: usize = BLOCK_SIZE as usize;
/// Striped locks serialise read-compare-write of the same extent.
const STRIPES: usize = 64;
/// Largest block number accepted (extents up to 64 GiB).
const MAX_BLOCK: u64 = 1 << 24;

#[derive(Debug)]
pub struct Replica {
    store: Arc<dyn ExtentStore>,
    /// Cached fences; the write lock is taken only to raise one.
    fences: RwLock<HashMap<VolumeId, u64>>,
    stripes: Vec<Mutex<()>>,
}

fn io(e: std::io::Error) -> ReplicaError {
    ReplicaError::Io(e.to_string())
}

fn bad(msg: impl Into<String>) -> ReplicaError {
    ReplicaError::BadRequest(msg.into())
}

fn check_span(first: u32, count: u32, max: u32) -> Result<(), ReplicaError> {
    if count == 0 || count > max {
        return Err(bad(format!("block count {count} must be 1..={max}")));
    }
    if u64::from(first) + u64::from(count) > MAX_BLOCK {
        return Err(bad(format!("blocks {first}+{count} pass the largest extent ({MAX_BLOCK} blocks)")));
    }
    Ok(())
}

impl Replica {
    pub fn new(store: Arc<dyn ExtentStore>) -> Self {
        Replica {
            store,
            fences: RwLock::new(HashMap::new()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    pub fn store(&self) -> &Arc<dyn ExtentStore> {
        &self.store
    }

    fn stripe(&self, index: u32) -> std::sync::MutexGuard<'_, ()> {
        // A poisoned stripe only means another request panicked mid-way; the
        // store itself is still consistent block by block.
        self.stripes[index as usize % STRIPES].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached_fence(&self, volume: VolumeId) -> Result<u64, ReplicaError> {
        if let Some(f) = self.fences.read().unwrap_or_else(|p| p.into_inner()).get(&volume) {
            return Ok(*f);
        }
        let f = self.store.fence(volume).map_err(io)?;
        let mut w = self.fences.write().unwrap_or_else(|p| p.into_inner());
        Ok(*w.entry(volume).or_insert(f))
    }

    /// Raises the fence to `generation` if it is newer; answers the fence.
    fn raise_fence(&self, volume: VolumeId, generation: u64) -> Result<u64, ReplicaError> {
        self.cached_fence(volume)?;
        let mut w = self.fences.write().unwrap_or_else(|p| p.into_inner());
        let cur = w.get(&volume).copied().unwrap_or(0);
        if generation > cur {
            self.store.set_fence(volume, generation).map_err(io)?;
            w.insert(volume, generation);
            return Ok(generation);
        }
        Ok(cur)
    }

    /// Runs `apply` while no fence of `volume` can move, after checking
    /// that `generation` is not fenced (raising the fence when it is newer).
    fn fenced<T>(
        &self,
        volume: VolumeId,
        generation: u64,
        apply: impl FnOnce() -> Result<T, ReplicaError>,
    ) -> Result<T, ReplicaError> {
        if generation == 0 {
            return Err(bad("generation 0 never writes"));
        }
        loop {
            let cur = self.cached_fence(volume)?;
            if generation > cur {
                self.raise_fence(volume, generation)?;
                continue;
            }
            let guard = self.fences.read().unwrap_or_else(|p| p.into_inner());
            let cur = guard.get(&volume).copied().unwrap_or(cur);
            if generation < cur {
                return Err(ReplicaError::StaleGeneration { ours: generation, current: cur });
            }
            if generation > cur {
                continue;
            }
            let r = apply();
            drop(guard);
            return r;
        }
    }

    /// Answers one request. Blocking: may read, write and fdatasync files.
    pub fn handle(&self, op: Op) -> Result<Answer, ReplicaError> {
        match op {
            Op::Fence { volume, generation } => {
                Ok(Answer::Fenced { generation: self.raise_fence(volume, generation)? })
            }
            Op::Write { volume, generation, seq, key, first, data, crcs } => {
                let count = u32::try_from(crcs.len()).map_err(|_| bad("too many blocks"))?;
                check_span(first, count, MAX_BLOCKS_PER_REQUEST)?;
                if data.len() != crcs.len() * BS {
                    return Err(bad(format!("{} data bytes for {} blocks", data.len(), crcs.len())));
                }
                for (i, (block, crc)) in data.chunks_exact(BS).zip(&crcs).enumerate() {
                    if block_crc(block) != *crc {
                        return Err(bad(format!("block {} arrived with a bad checksum", first as usize + i)));
                    }
                }
                let metas: Vec<BlockMeta> = crcs
                    .iter()
                    .map(|&crc| BlockMeta { generation, seq, crc, state: BlockState::Data })
                    .collect();
                self.fenced(volume, generation, || self.apply_newer(key, first, &metas, &data, false))
                    .map(|_| Answer::Done)
            }
            Op::WriteZeroes { volume, generation, seq, key, first, count } => {
                check_span(first, count, MAX_METAS_PER_REQUEST)?;
                let metas =
                    vec![BlockMeta { generation, seq, crc: 0, state: BlockState::Zero }; count as usize];
                self.fenced(volume, generation, || self.apply_newer(key, first, &metas, &[], false))
                    .map(|_| Answer::Done)
            }
            Op::Read { chain, index, first, count } => self.read_chain(&chain, index, first, count),
            Op::Flush => self.store.flush().map(|_| Answer::Done).map_err(io),
            Op::Digest { key, blocks } => self.digest(key, blocks),
            Op::ReadMetas { key, first, count } => {
                check_span(first, count, MAX_METAS_PER_REQUEST)?;
                Ok(Answer::Metas(self.store.read_metas(key, first, count).map_err(io)?))
            }
            Op::ReadLayer { key, first, count } => {
                check_span(first, count, MAX_BLOCKS_PER_REQUEST)?;
                self.read_chain(&[key.layer], key.index, first, count)
            }
            Op::Repair { volume, key, first, metas, data } => self.repair(volume, key, first, &metas, &data),
            Op::Verify { key, blocks } => self.verify(key, blocks),
            Op::DeleteLayer { layer } => self.store.delete_layer(layer).map(|_| Answer::Done).map_err(io),
            Op::Usage => Ok(Answer::Usage(self.store.usage().map_err(io)?)),
            Op::Extents => Ok(Answer::Extents(self.store.extents().map_err(io)?)),
        }
    }

    /// Writes each block whose version is newer than the stored one (or, with
    /// `replace_corrupt`, the same version over a corrupt local copy).
    /// `data` holds one block per `Data` meta, in order. Answers how many
    /// blocks changed.
    fn apply_newer(
        &self,
        key: LayerExtent,
        first: u32,
        metas: &[BlockMeta],
        data: &[u8],
        replace_corrupt: bool,
    ) -> Result<u32, ReplicaError> {
        let count = u32::try_from(metas.len()).map_err(|_| bad("too many blocks"))?;
        let _g = self.stripe(key.index);
        let local = self.store.read_metas(key, first, count).map_err(io)?;
        let mut take = vec![false; metas.len()];
        let mut equal_data = Vec::new();
        for (i, (new, old)) in metas.iter().zip(&local).enumerate() {
            if new.version() > old.version() || old.state == BlockState::Absent {
                take[i] = new.state != BlockState::Absent;
            } else if replace_corrupt
                && new.version() == old.version()
                && old.state == BlockState::Data
                && new.state == BlockState::Data
            {
                equal_data.push(i);
            }
        }
        if !equal_data.is_empty() {
            let mut buf = vec![0u8; BS];
            let mut m = [BlockMeta::ABSENT];
            for i in equal_data {
                let block = first + i as u32;
                self.store.read_blocks(key, block, &mut buf, &mut m).map_err(io)?;
                take[i] = block_crc(&buf) != m[0].crc;
            }
        }
        // Offsets of each Data meta's bytes within `data`.
        let mut data_at = Vec::with_capacity(metas.len());
        let mut off = 0usize;
        for m in metas {
            data_at.push(off);
            if m.state == BlockState::Data {
                off += BS;
            }
        }
        let mut applied = 0u32;
        let mut i = 0;
        while i < metas.len() {
            if !take[i] {
                i += 1;
                continue;
            }
            let start = i;
            let mut bytes = Vec::new();
            while i < metas.len() && take[i] {
                if metas[i].state == BlockState::Data {
                    bytes.extend_from_slice(&data[data_at[i]..data_at[i] + BS]);
                }
                i += 1;
            }
            self.store.write_blocks(key, first + start as u32, &metas[start..i], &bytes).map_err(io)?;
            applied += (i - start) as u32;
        }
        Ok(applied)
    }

    fn read_chain(&self, chain: &[u64], index: u32, first: u32, count: u32) -> Result<Answer, ReplicaError> {
        check_span(first, count, MAX_BLOCKS_PER_REQUEST)?;
        if chain.is_empty() || chain.len() > 4096 {
            return Err(bad("a read needs 1..=4096 layers"));
        }
        let n = count as usize;
        let mut metas = vec![BlockMeta::ABSENT; n];
        let mut data = vec![0u8; n * BS];
        let _g = self.stripe(index);
        let mut unresolved: Vec<usize> = (0..n).collect();
        let mut buf = Vec::new();
        for &layer in chain {
            if unresolved.is_empty() {
                break;
            }
            let key = LayerExtent { layer, index };
            let lm = self.store.read_metas(key, first, count).map_err(io)?;
            let hits: Vec<usize> =
                unresolved.iter().copied().filter(|&i| lm[i].state != BlockState::Absent).collect();
            if hits.is_empty() {
                continue;
            }
            if hits.iter().any(|&i| lm[i].state == BlockState::Data) {
                let lo = hits[0];
                let hi = hits[hits.len() - 1] + 1;
                buf.resize((hi - lo) * BS, 0);
                let mut m = vec![BlockMeta::ABSENT; hi - lo];
                self.store.read_blocks(key, first + lo as u32, &mut buf, &mut m).map_err(io)?;
                for &i in &hits {
                    if lm[i].state == BlockState::Data {
                        data[i * BS..(i + 1) * BS].copy_from_slice(&buf[(i - lo) * BS..(i - lo + 1) * BS]);
                    }
                }
            }
            for &i in &hits {
                metas[i] = lm[i];
            }
            unresolved.retain(|i| lm[*i].state == BlockState::Absent);
        }
        let corrupt: Vec<u32> = (0..n)
            .filter(|&i| {
                metas[i].state == BlockState::Data && block_crc(&data[i * BS..(i + 1) * BS]) != metas[i].crc
            })
            .map(|i| first + i as u32)
            .collect();
        if !corrupt.is_empty() {
            return Err(ReplicaError::Corrupt { blocks: corrupt });
        }
        Ok(Answer::Blocks { data, metas })
    }

    fn digest(&self, key: LayerExtent, blocks: u32) -> Result<Answer, ReplicaError> {
        if u64::from(blocks) > MAX_BLOCK {
            return Err(bad(format!("an extent has at most {MAX_BLOCK} blocks")));
        }
        let _g = self.stripe(key.index);
        let mut h = blake3::Hasher::new();
        let mut written = 0u32;
        let mut first = 0u32;
        while first < blocks {
            let count = (blocks - first).min(MAX_METAS_PER_REQUEST);
            for m in self.store.read_metas(key, first, count).map_err(io)? {
                if m.state != BlockState::Absent {
                    written += 1;
                }
                h.update(&m.encode());
            }
            first += count;
        }
        Ok(Answer::Digest { digest: *h.finalize().as_bytes(), written })
    }

    fn verify(&self, key: LayerExtent, blocks: u32) -> Result<Answer, ReplicaError> {
        if u64::from(blocks) > MAX_BLOCK {
            return Err(bad(format!("an extent has at most {MAX_BLOCK} blocks")));
        }
        let mut corrupt = Vec::new();
        let mut first = 0u32;
        let mut buf = Vec::new();
        while first < blocks {
            let count = (blocks - first).min(MAX_BLOCKS_PER_REQUEST);
            let _g = self.stripe(key.index);
            let mut metas = vec![BlockMeta::ABSENT; count as usize];
            buf.resize(count as usize * BS, 0);
            self.store.read_blocks(key, first, &mut buf, &mut metas).map_err(io)?;
            for (i, m) in metas.iter().enumerate() {
                if m.state == BlockState::Data && block_crc(&buf[i * BS..(i + 1) * BS]) != m.crc {
                    corrupt.push(first + i as u32);
                }
            }
            first += count;
        }
        Ok(Answer::Corrupt(corrupt))
    }

    fn repair(
        &self,
        volume: VolumeId,
        key: LayerExtent,
        first: u32,
        metas: &[BlockMeta],
        data: &[u8],
    ) -> Result<Answer, ReplicaError> {
        let count = u32::try_from(metas.len()).map_err(|_| bad("too many blocks"))?;
        check_span(first, count, MAX_BLOCKS_PER_REQUEST)?;
        let data_blocks = metas.iter().filter(|m| m.state == BlockState::Data).count();
        if data.len() != data_blocks * BS {
            return Err(bad(format!("{} data bytes for {data_blocks} data blocks", data.len())));
        }
        let mut off = 0;
        for m in metas.iter().filter(|m| m.state == BlockState::Data) {
            if block_crc(&data[off..off + BS]) != m.crc {
                return Err(bad("a repair block arrived with a bad checksum"));
            }
            off += BS;
        }
        // Blocks of generation g prove a writer of generation g was admitted:
        // a replica that missed that writer's fence catches up on it here.
        if let Some(newest) = metas.iter().map(|m| m.generation).max().filter(|g| *g > 0) {
            self.raise_fence(volume, newest)?;
        }
        Ok(Answer::Applied(self.apply_newer(key, first, metas, data, true)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::MemStore;

    const V: VolumeId = VolumeId(0x77);
    const K: LayerExtent = LayerExtent { layer: 1, index: 0 };

    fn replica() -> (Replica, Arc<MemStore>) {
        let store = Arc::new(MemStore::new());
        (Replica::new(store.clone()), store)
    }

    fn write(generation: u64, seq: u64, first: u32, fill: u8, blocks: usize) -> Op {
        let data = vec![fill; blocks * BS];
        let crcs = data.chunks(BS).map(block_crc).collect();
        Op::Write { volume: V, generation, seq, key: K, first, data, crcs }
    }

    fn read(r: &Replica, first: u32, count: u32) -> (Vec<u8>, Vec<BlockMeta>) {
        match r.handle(Op::Read { chain: vec![K.layer], index: 0, first, count }) {
            Ok(Answer::Blocks { data, metas }) => (data, metas),
            other => panic!("read: {other:?}"),
        }
    }

    #[test]
    fn older_generations_are_refused_after_a_fence() {
        let (r, _) = replica();
        r.handle(write(1, 1, 0, 0xaa, 1)).expect("gen 1 writes");
        assert_eq!(r.handle(Op::Fence { volume: V, generation: 2 }), Ok(Answer::Fenced { generation: 2 }));
        assert_eq!(
            r.handle(write(1, 2, 0, 0xbb, 1)),
            Err(ReplicaError::StaleGeneration { ours: 1, current: 2 })
        );
        assert_eq!(read(&r, 0, 1).0, vec![0xaa; BS], "a refused write changes nothing");
        r.handle(write(2, 1, 0, 0xcc, 1)).expect("gen 2 writes");
        assert_eq!(read(&r, 0, 1).0, vec![0xcc; BS]);
    }

    #[test]
    fn newest_version_wins_whatever_the_arrival_order() {
        let (r, _) = replica();
        r.handle(write(1, 5, 0, 5, 2)).expect("seq 5");
        r.handle(write(1, 3, 1, 3, 2)).expect("seq 3 arrives late");
        let (data, metas) = read(&r, 0, 3);
        assert_eq!(&data[..BS], &[5; BS][..]);
        assert_eq!(&data[BS..2 * BS], &[5; BS][..], "late older write must not win");
        assert_eq!(&data[2 * BS..], &[3; BS][..]);
        assert_eq!(metas[1].seq, 5);
    }

    #[test]
    fn corrupt_blocks_are_reported_not_returned_and_repair_replaces_them() {
        let (r, store) = replica();
        r.handle(write(1, 1, 0, 0x11, 4)).expect("write");
        store.corrupt_block(K, 2);
        assert_eq!(
            r.handle(Op::Read { chain: vec![1], index: 0, first: 0, count: 4 }),
            Err(ReplicaError::Corrupt { blocks: vec![2] })
        );
        assert_eq!(r.handle(Op::Verify { key: K, blocks: 8 }), Ok(Answer::Corrupt(vec![2])));
        let good = vec![0x11; BS];
        let m = BlockMeta { generation: 1, seq: 1, crc: block_crc(&good), state: BlockState::Data };
        assert_eq!(
            r.handle(Op::Repair { volume: V, key: K, first: 2, metas: vec![m], data: good.clone() }),
            Ok(Answer::Applied(1))
        );
        assert_eq!(read(&r, 0, 4).0, vec![0x11; 4 * BS]);
        // A repair of the same version over a good copy changes nothing.
        assert_eq!(
            r.handle(Op::Repair { volume: V, key: K, first: 2, metas: vec![m], data: good }),
            Ok(Answer::Applied(0))
        );
    }

    #[test]
    fn bad_requests_change_nothing() {
        let (r, _) = replica();
        r.handle(write(1, 1, 0, 1, 1)).expect("write");
        let mut w = write(1, 2, 0, 2, 1);
        if let Op::Write { crcs, .. } = &mut w {
            crcs[0] ^= 1;
        }
        assert!(matches!(r.handle(w), Err(ReplicaError::BadRequest(_))));
        assert!(matches!(r.handle(write(0, 2, 0, 2, 1)), Err(ReplicaError::BadRequest(_))));
        assert!(matches!(r.handle(write(1, 2, u32::MAX, 2, 1)), Err(ReplicaError::BadRequest(_))));
        assert!(matches!(
            r.handle(Op::Read { chain: vec![], index: 0, first: 0, count: 1 }),
            Err(ReplicaError::BadRequest(_))
        ));
        assert!(matches!(
            r.handle(Op::Read { chain: vec![1], index: 0, first: 0, count: 100_000 }),
            Err(ReplicaError::BadRequest(_))
        ));
        assert_eq!(read(&r, 0, 1).0, vec![1; BS]);
    }

    #[test]
    fn layers_resolve_top_down_and_zeroes_shadow_older_data() {
        let (r, _) = replica();
        r.handle(write(1, 1, 0, 0xa, 3)).expect("base");
        let top = LayerExtent { layer: 2, index: 0 };
        let data = vec![0xb; BS];
        r.handle(Op::Write {
            volume: V,
            generation: 1,
            seq: 2,
            key: top,
            first: 1,
            crcs: vec![block_crc(&data)],
            data,
        })
        .expect("top");
        r.handle(Op::WriteZeroes { volume: V, generation: 1, seq: 3, key: top, first: 2, count: 1 })
            .expect("zero");
        match r.handle(Op::Read { chain: vec![2, 1], index: 0, first: 0, count: 4 }) {
            Ok(Answer::Blocks { data, metas }) => {
                assert_eq!(&data[..BS], &[0xa; BS][..]);
                assert_eq!(&data[BS..2 * BS], &[0xb; BS][..]);
                assert_eq!(&data[2 * BS..], &[0; 2 * BS][..]);
                assert_eq!(metas[3].state, BlockState::Absent);
                assert_eq!(metas[2].state, BlockState::Zero);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn repair_raises_the_fence_of_a_replica_that_missed_it() {
        let (r, _) = replica();
        let good = vec![9; BS];
        let m = BlockMeta { generation: 4, seq: 1, crc: block_crc(&good), state: BlockState::Data };
        r.handle(Op::Repair { volume: V, key: K, first: 0, metas: vec![m], data: good }).expect("repair");
        assert_eq!(
            r.handle(write(3, 9, 1, 1, 1)),
            Err(ReplicaError::StaleGeneration { ours: 3, current: 4 })
        );
    }

    #[test]
    fn digests_match_only_for_identical_metas() {
        let (a, _) = replica();
        let (b, _) = replica();
        let d = |r: &Replica| r.handle(Op::Digest { key: K, blocks: 64 }).expect("digest");
        assert_eq!(d(&a), d(&b));
        a.handle(write(1, 1, 3, 1, 1)).expect("w");
        assert_ne!(d(&a), d(&b));
        b.handle(write(1, 1, 3, 1, 1)).expect("w");
        assert_eq!(d(&a), d(&b));
    }
}
