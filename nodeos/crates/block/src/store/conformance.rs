//! The [`ExtentStore`] contract as tests, run against every implementation.
//!
//! Each check takes an `open` function that opens one and the same store
//! (empty on the first call); calling it again models a restart of the
//! process over the store's medium. The `conformance!` invocation at the
//! bottom runs every check against [`MemStore`], [`FileStore`] and a
//! [`FileStore`] that keeps a single extent open (so every call goes through
//! handle eviction). A property test compares random operation sequences
//! against a plain model.

use std::collections::BTreeMap;
use std::io;

use nodeos_types::VolumeId;
use proptest::prelude::*;

use super::device::DeviceStore;
use super::file::FileStore;
use super::mem::MemStore;
use super::{BlockMeta, BlockState, ExtentStore, LayerExtent, block_crc};

const BLOCK: usize = 4096;

type Open<'a> = &'a dyn Fn() -> Box<dyn ExtentStore>;

fn key(layer: u64, index: u32) -> LayerExtent {
    LayerExtent { layer, index }
}

/// A block whose bytes depend on `seed`, so that misplaced blocks show.
fn block(seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while out.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn data_meta(generation: u64, seq: u64, data: &[u8]) -> BlockMeta {
    BlockMeta { generation, seq, crc: block_crc(data), state: BlockState::Data }
}

fn zero_meta(generation: u64, seq: u64) -> BlockMeta {
    BlockMeta { generation, seq, crc: 0, state: BlockState::Zero }
}

/// Writes `seeds.len()` data blocks from `first`, block i holding `block(seeds[i])`.
fn write_data(store: &dyn ExtentStore, k: LayerExtent, first: u32, seq: u64, seeds: &[u64]) {
    let data: Vec<u8> = seeds.iter().flat_map(|s| block(*s)).collect();
    let metas: Vec<BlockMeta> = data.chunks(BLOCK).map(|b| data_meta(1, seq, b)).collect();
    store.write_blocks(k, first, &metas, &data).unwrap();
}

fn read(store: &dyn ExtentStore, k: LayerExtent, first: u32, count: u32) -> (Vec<u8>, Vec<BlockMeta>) {
    let mut data = vec![0xa5; count as usize * BLOCK];
    let mut metas = vec![data_meta(9, 9, &[1]); count as usize];
    store.read_blocks(k, first, &mut data, &mut metas).unwrap();
    assert_eq!(store.read_metas(k, first, count).unwrap(), metas, "read_metas agrees with read_blocks");
    (data, metas)
}

/// Checks one block: its meta, and its data (zeroes unless `Data`).
fn assert_block(store: &dyn ExtentStore, k: LayerExtent, index: u32, want: BlockMeta, seed: Option<u64>) {
    let (data, metas) = read(store, k, index, 1);
    assert_eq!(metas[0], want, "meta of {k:?} block {index}");
    match seed {
        Some(seed) => assert!(data == block(seed), "data of {k:?} block {index}"),
        None => assert!(data.iter().all(|b| *b == 0), "{k:?} block {index} reads as zeroes"),
    }
}

pub(super) fn round_trip(open: Open) {
    let store = open();
    let k = key(7, 3);
    write_data(&*store, k, 10, 1, &[1, 2, 3, 4]);
    let (data, metas) = read(&*store, k, 10, 4);
    for (i, seed) in [1, 2, 3, 4].into_iter().enumerate() {
        assert!(data[i * BLOCK..][..BLOCK] == block(seed), "block {i}");
        assert_eq!(metas[i], data_meta(1, 1, &block(seed)));
    }
    // A read spanning written and unwritten blocks.
    let (data, metas) = read(&*store, k, 8, 8);
    assert_eq!(metas[0], BlockMeta::ABSENT);
    assert_eq!(metas[1], BlockMeta::ABSENT);
    assert!(data[..2 * BLOCK].iter().all(|b| *b == 0));
    assert!(data[2 * BLOCK..][..BLOCK] == block(1));
    assert!(data[6 * BLOCK..].iter().all(|b| *b == 0));
    assert_eq!(metas[6..], [BlockMeta::ABSENT; 2]);
}

pub(super) fn absent_reads_as_zeroes(open: Open) {
    let store = open();
    // An extent never written, in a layer never written.
    let (data, metas) = read(&*store, key(1, 0), 0, 16);
    assert!(data.iter().all(|b| *b == 0));
    assert!(metas.iter().all(|m| *m == BlockMeta::ABSENT));
    assert!(store.extents().unwrap().is_empty(), "reads create no extents");
    // An extent never written next to one that was.
    write_data(&*store, key(1, 1), 5, 1, &[5]);
    assert_block(&*store, key(1, 0), 5, BlockMeta::ABSENT, None);
    // Far past the last written block.
    assert_block(&*store, key(1, 1), 100_000, BlockMeta::ABSENT, None);
    assert_eq!(store.read_metas(key(1, 1), 0, 0).unwrap(), []);
    store.read_blocks(key(1, 1), 0, &mut [], &mut []).unwrap();
}

pub(super) fn zero_blocks_read_as_zeroes(open: Open) {
    let store = open();
    let k = key(2, 0);
    write_data(&*store, k, 0, 1, &[1, 2, 3, 4, 5, 6]);
    // Data, Zero, Zero, Data, Zero, Absent: the data slice holds two blocks.
    let metas = [
        data_meta(1, 2, &block(11)),
        zero_meta(1, 2),
        zero_meta(1, 2),
        data_meta(1, 2, &block(14)),
        zero_meta(1, 2),
        BlockMeta::ABSENT,
    ];
    let data = [block(11), block(14)].concat();
    store.write_blocks(k, 0, &metas, &data).unwrap();
    for (i, seed) in [Some(11), None, None, Some(14), None, None].into_iter().enumerate() {
        assert_block(&*store, k, i as u32, metas[i], seed);
    }
    // A write of zeroes only, onto data and onto nothing.
    store.write_blocks(k, 3, &[zero_meta(1, 3), zero_meta(1, 3)], &[]).unwrap();
    assert_block(&*store, k, 3, zero_meta(1, 3), None);
    assert_block(&*store, k, 4, zero_meta(1, 3), None);
}

pub(super) fn overlapping_writes(open: Open) {
    let store = open();
    let k = key(3, 1);
    write_data(&*store, k, 0, 1, &[100, 101, 102, 103, 104, 105, 106, 107]);
    write_data(&*store, k, 4, 2, &[204, 205, 206, 207, 208, 209, 210, 211]);
    write_data(&*store, k, 2, 3, &[302]);
    store.write_blocks(k, 6, &[zero_meta(1, 4)], &[]).unwrap();
    let want = [(100, 1), (101, 1), (302, 3), (103, 1), (204, 2), (205, 2), (0, 4), (207, 2), (208, 2)];
    for (i, (seed, seq)) in want.into_iter().enumerate() {
        let i = i as u32;
        if seq == 4 {
            assert_block(&*store, k, i, zero_meta(1, 4), None);
        } else {
            assert_block(&*store, k, i, data_meta(1, seq, &block(seed)), Some(seed));
        }
    }
    let (_, metas) = read(&*store, k, 0, 13);
    assert_eq!(metas[11].seq, 2);
    assert_eq!(metas[12], BlockMeta::ABSENT);
}

pub(super) fn many_layers_and_extents(open: Open) {
    let store = open();
    let mut keys = Vec::new();
    // Written out of order, with layer ids and indexes at both ends of their range.
    for layer in [u64::MAX, 5, 1, 0x1_0000_0000, 0] {
        for index in [9, 0, u32::MAX, 1, 300] {
            let k = key(layer, index);
            write_data(&*store, k, index % 64, 1, &[layer ^ u64::from(index)]);
            keys.push(k);
        }
    }
    keys.sort();
    assert_eq!(store.extents().unwrap(), keys, "extents are sorted and complete");
    for k in &keys {
        let seed = k.layer ^ u64::from(k.index);
        assert_block(&*store, *k, k.index % 64, data_meta(1, 1, &block(seed)), Some(seed));
    }
    // Rewriting an extent does not list it twice.
    write_data(&*store, keys[3], 0, 2, &[1]);
    assert_eq!(store.extents().unwrap(), keys);
}

pub(super) fn delete_layer_removes_and_reclaims(open: Open) {
    let store = open();
    let empty = store.usage().unwrap().used;
    for index in 0..4 {
        write_data(&*store, key(1, index), 0, 1, &[1, 2, 3, 4, 5, 6, 7, 8]);
        write_data(&*store, key(2, index), 0, 1, &[1, 2, 3, 4, 5, 6, 7, 8]);
    }
    write_data(&*store, key(3, 0), 0, 1, &[1]);
    store.set_fence(VolumeId(1), 4).unwrap();
    let before = store.usage().unwrap().used;
    assert!(before >= empty + 8 * 8 * BLOCK as u64, "used {before} counts 64 data blocks");

    store.delete_layer(1).unwrap();
    let after = store.usage().unwrap().used;
    assert!(after < before - 3 * 8 * BLOCK as u64, "deleting 32 blocks freed only {} bytes", before - after);
    let left: Vec<_> = (0..4).map(|i| key(2, i)).chain([key(3, 0)]).collect();
    assert_eq!(store.extents().unwrap(), left);
    assert_block(&*store, key(1, 0), 0, BlockMeta::ABSENT, None);
    assert_block(&*store, key(2, 0), 0, data_meta(1, 1, &block(1)), Some(1));
    assert_eq!(store.fence(VolumeId(1)).unwrap(), 4, "fences belong to volumes, not layers");

    // Deleting again, or a layer never written, is not an error.
    store.delete_layer(1).unwrap();
    store.delete_layer(99).unwrap();
    // A deleted layer id can be written again, from scratch.
    write_data(&*store, key(1, 2), 1, 2, &[9]);
    assert_eq!(store.extents().unwrap()[0], key(1, 2));
    assert_block(&*store, key(1, 2), 0, BlockMeta::ABSENT, None);
    assert_block(&*store, key(1, 2), 1, data_meta(1, 2, &block(9)), Some(9));

    store.flush().unwrap();
    for layer in [1, 2, 3] {
        store.delete_layer(layer).unwrap();
    }
    assert_eq!(store.extents().unwrap(), []);
    assert_eq!(store.usage().unwrap().used, empty);
}

pub(super) fn zeroing_reclaims(open: Open) {
    let store = open();
    let k = key(4, 4);
    write_data(&*store, k, 0, 1, &(0..32).collect::<Vec<_>>());
    let full = store.usage().unwrap();
    assert!(full.free > 0);
    let zeroes = vec![zero_meta(1, 2); 32];
    store.write_blocks(k, 0, &zeroes, &[]).unwrap();
    let zeroed = store.usage().unwrap().used;
    assert!(zeroed + 16 * BLOCK as u64 <= full.used, "zeroing 32 blocks: used {} -> {zeroed}", full.used);
}

pub(super) fn fences(open: Open) {
    let store = open();
    assert_eq!(store.fence(VolumeId(1)).unwrap(), 0, "no fence reads as 0");
    store.set_fence(VolumeId(1), 3).unwrap();
    store.set_fence(VolumeId(u64::MAX), u64::MAX).unwrap();
    assert_eq!(store.fence(VolumeId(1)).unwrap(), 3);
    assert_eq!(store.fence(VolumeId(2)).unwrap(), 0);
    assert_eq!(store.fence(VolumeId(u64::MAX)).unwrap(), u64::MAX);
    store.set_fence(VolumeId(1), 5).unwrap();
    assert_eq!(store.fence(VolumeId(1)).unwrap(), 5);
    drop(store);
    let store = open();
    assert_eq!(store.fence(VolumeId(1)).unwrap(), 5, "fences survive a restart");
    assert_eq!(store.fence(VolumeId(u64::MAX)).unwrap(), u64::MAX);
    assert!(store.extents().unwrap().is_empty(), "fences are not extents");
}

pub(super) fn survives_restart(open: Open) {
    let store = open();
    write_data(&*store, key(1, 1), 0, 1, &[1, 2]);
    store.flush().unwrap();
    // Not flushed: still there after the process dies.
    write_data(&*store, key(1, 1), 1, 2, &[3]);
    store.write_blocks(key(1, 2), 4, &[zero_meta(1, 3)], &[]).unwrap();
    write_data(&*store, key(2, 0), 0, 1, &[4]);
    store.delete_layer(2).unwrap();
    drop(store);

    let store = open();
    assert_eq!(store.extents().unwrap(), [key(1, 1), key(1, 2)]);
    assert_block(&*store, key(1, 1), 0, data_meta(1, 1, &block(1)), Some(1));
    assert_block(&*store, key(1, 1), 1, data_meta(1, 2, &block(3)), Some(3));
    assert_block(&*store, key(1, 2), 4, zero_meta(1, 3), None);
    // And writable again.
    write_data(&*store, key(1, 1), 2, 4, &[5]);
    store.flush().unwrap();
    assert_block(&*store, key(1, 1), 2, data_meta(1, 4, &block(5)), Some(5));
}

pub(super) fn concurrent_writes(open: Open) {
    const THREADS: u64 = 4;
    const BLOCKS: u32 = 48;
    let store = open();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let store = &*store;
            s.spawn(move || {
                // Interleaved blocks of one shared extent, plus an extent of its own.
                for i in (t as u32..BLOCKS).step_by(THREADS as usize) {
                    write_data(store, key(1, 0), i, 1, &[u64::from(i)]);
                    write_data(store, key(2, t as u32), i, 1, &[t * 1000 + u64::from(i)]);
                    if i % 8 == t as u32 {
                        store.flush().unwrap();
                    }
                }
            });
        }
    });
    store.flush().unwrap();
    for i in 0..BLOCKS {
        let seed = u64::from(i);
        assert_block(&*store, key(1, 0), i, data_meta(1, 1, &block(seed)), Some(seed));
    }
    for t in 0..THREADS {
        let (_, metas) = read(&*store, key(2, t as u32), 0, BLOCKS);
        for (i, meta) in metas.iter().enumerate() {
            let mine = i as u64 % THREADS == t;
            assert_eq!(
                meta.state,
                if mine { BlockState::Data } else { BlockState::Absent },
                "thread {t} block {i}"
            );
        }
    }
}

pub(super) fn bad_requests_change_nothing(open: Open) {
    let store = open();
    let k = key(1, 0);
    write_data(&*store, k, 0, 1, &[1, 2]);
    let two = [data_meta(1, 2, &block(3)), data_meta(1, 2, &block(4))];
    let kind = |r: io::Result<()>| r.expect_err("a bad request fails").kind();
    // Data for one block where two are needed, too much data, data for a Zero block.
    assert_eq!(kind(store.write_blocks(k, 0, &two, &block(3))), io::ErrorKind::InvalidInput);
    assert_eq!(
        kind(store.write_blocks(k, 0, &two, &[block(3), block(3), block(3)].concat())),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(kind(store.write_blocks(k, 0, &[zero_meta(1, 2)], &block(3))), io::ErrorKind::InvalidInput);
    // Blocks past index u32::MAX.
    assert_eq!(
        kind(store.write_blocks(k, u32::MAX, &[zero_meta(1, 2); 2], &[])),
        io::ErrorKind::InvalidInput
    );
    // Reads whose buffers disagree.
    let mut metas = [BlockMeta::ABSENT; 2];
    assert_eq!(kind(store.read_blocks(k, 0, &mut [0; BLOCK], &mut metas)), io::ErrorKind::InvalidInput);
    assert_eq!(
        kind(store.read_blocks(k, u32::MAX, &mut [0; 2 * BLOCK], &mut metas)),
        io::ErrorKind::InvalidInput
    );
    assert!(store.read_metas(k, u32::MAX, 2).is_err());
    // An empty write is fine and changes nothing either.
    store.write_blocks(key(5, 5), 0, &[], &[]).unwrap();

    assert_eq!(store.extents().unwrap(), [k]);
    assert_block(&*store, k, 0, data_meta(1, 1, &block(1)), Some(1));
    assert_block(&*store, k, 1, data_meta(1, 1, &block(2)), Some(2));
    assert_block(&*store, k, u32::MAX, BlockMeta::ABSENT, None);
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod mem_store {
            use super::*;
            $(
                #[test]
                fn $check() {
                    let store = MemStore::new();
                    super::$check(&|| Box::new(store.clone()));
                }
            )*
        }

        mod file_store {
            use super::*;
            $(
                #[test]
                fn $check() {
                    let dir = tempfile::tempdir().unwrap();
                    super::$check(&|| Box::new(FileStore::open(dir.path()).unwrap()));
                }
            )*
        }

        mod file_store_one_handle {
            use super::*;
            $(
                #[test]
                fn $check() {
                    let dir = tempfile::tempdir().unwrap();
                    super::$check(&|| Box::new(FileStore::open_with_handle_limit(dir.path(), 1).unwrap()));
                }
            )*
        }
    };
}

conformance!(
    round_trip,
    absent_reads_as_zeroes,
    zero_blocks_read_as_zeroes,
    overlapping_writes,
    many_layers_and_extents,
    delete_layer_removes_and_reclaims,
    zeroing_reclaims,
    fences,
    survives_restart,
    concurrent_writes,
    bad_requests_change_nothing,
);

/// One step of a random workload over two layers of two small extents.
#[derive(Debug, Clone)]
enum Op {
    /// Blocks from `first`, each `Some(seed)` for data or `None` for zeroes.
    Write {
        layer: u64,
        index: u32,
        first: u32,
        blocks: Vec<Option<u8>>,
    },
    Delete {
        layer: u64,
    },
    Flush,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..2u64, 0..2u32, 0..12u32, prop::collection::vec(prop::option::weighted(0.8, any::<u8>()), 1..5))
            .prop_map(|(layer, index, first, blocks)| Op::Write { layer, index, first, blocks }),
        1 => (0..2u64).prop_map(|layer| Op::Delete { layer }),
        1 => Just(Op::Flush),
        1 => Just(Op::Restart),
    ]
}

/// Runs `ops` against the store and a map of what each block should hold,
/// checking every block of every extent after each step.
fn matches_model(open: Open, ops: &[Op]) {
    let mut store = open();
    let mut model: BTreeMap<LayerExtent, BTreeMap<u32, BlockMeta>> = BTreeMap::new();
    for (seq, op) in (1..).zip(ops) {
        match op {
            Op::Write { layer, index, first, blocks } => {
                let data: Vec<u8> = blocks.iter().flatten().flat_map(|s| block(u64::from(*s))).collect();
                let metas: Vec<BlockMeta> = blocks
                    .iter()
                    .map(|b| b.map_or(zero_meta(1, seq), |s| data_meta(1, seq, &block(u64::from(s)))))
                    .collect();
                let k = key(*layer, *index);
                store.write_blocks(k, *first, &metas, &data).unwrap();
                model.entry(k).or_default().extend((*first..).zip(metas));
            }
            Op::Delete { layer } => {
                store.delete_layer(*layer).unwrap();
                model.retain(|k, _| k.layer != *layer);
            }
            Op::Flush => store.flush().unwrap(),
            Op::Restart => {
                drop(store);
                store = open();
            }
        }
        assert_eq!(store.extents().unwrap(), model.keys().copied().collect::<Vec<_>>());
        for layer in 0..2 {
            for index in 0..2 {
                let k = key(layer, index);
                let (data, metas) = read(&*store, k, 0, 16);
                for (i, (meta, got)) in metas.iter().zip(data.chunks(BLOCK)).enumerate() {
                    let want = model.get(&k).and_then(|m| m.get(&(i as u32))).copied();
                    let want = want.unwrap_or(BlockMeta::ABSENT);
                    assert_eq!(*meta, want, "{k:?} block {i} after {op:?}");
                    if want.state == BlockState::Data {
                        assert_eq!(block_crc(got), want.crc, "{k:?} block {i} data after {op:?}");
                    } else {
                        assert!(got.iter().all(|b| *b == 0), "{k:?} block {i} zeroes after {op:?}");
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn mem_store_matches_model(ops in prop::collection::vec(op(), 1..24)) {
        let store = MemStore::new();
        matches_model(&|| Box::new(store.clone()), &ops);
    }

    #[test]
    fn file_store_matches_model(ops in prop::collection::vec(op(), 1..24)) {
        let dir = tempfile::tempdir().unwrap();
        matches_model(&|| Box::new(FileStore::open_with_handle_limit(dir.path(), 2).unwrap()), &ops);
    }

    #[test]
    fn device_store_matches_model(ops in prop::collection::vec(op(), 1..24)) {
        let (_dev, path) = device_file();
        matches_model(&|| Box::new(DeviceStore::open(&path, true).unwrap()), &ops);
    }
}

/// A 32 MiB file standing in for a block device.
fn device_file() -> (tempfile::NamedTempFile, std::path::PathBuf) {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(32 << 20).unwrap();
    let p = f.path().to_path_buf();
    (f, p)
}

/// The device store gives space back per 1 MiB chunk when a layer is
/// deleted, not per zeroed block, so `zeroing_reclaims` does not apply.
macro_rules! device_conformance {
    ($($check:ident),* $(,)?) => {
        mod device_store {
            use super::*;
            $(
                #[test]
                fn $check() {
                    let (_dev, path) = device_file();
                    super::$check(&|| Box::new(DeviceStore::open(&path, true).unwrap()));
                }
            )*
        }
    };
}

device_conformance!(
    round_trip,
    absent_reads_as_zeroes,
    zero_blocks_read_as_zeroes,
    overlapping_writes,
    many_layers_and_extents,
    delete_layer_removes_and_reclaims,
    fences,
    survives_restart,
    concurrent_writes,
    bad_requests_change_nothing,
);
