//! Bringing the copies of one layer extent to the newest version of every
//! block: used by a volume's writer for replicas that missed writes, and by
//! the leader's controllers for re-replication and scrub.
//!
//! The plan is pure ([`plan`]): given every reachable copy's block metas (and,
//! when scrubbing, its corrupt blocks), each block's newest good version is
//! copied to every copy that lacks it. Execution reads runs of blocks from a
//! holder and sends them as `Repair` ops, which replicas apply only where the
//! block is newer, so a repair racing a writer can never undo a newer write.

use std::collections::{BTreeMap, HashSet};

use futures::StreamExt;
use nodeos_types::{NodeId, VolumeId};

use crate::device::BLOCK_SIZE;
use crate::store::{BlockMeta, BlockState, LayerExtent};
use crate::transport::{CallError, ReplicaRef, Transport};
use crate::wire::{Answer, MAX_BLOCKS_PER_REQUEST, MAX_METAS_PER_REQUEST, Op};

/// Runs copied at the same time while repairing one extent.
const PARALLEL_RUNS: usize = 16;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    pub blocks_copied: u64,
    pub bytes_copied: u64,
    /// Blocks found corrupt (scrub), summed over copies.
    pub corrupt: u64,
    pub unreachable: Vec<NodeId>,
}

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("no copy of extent {index} of layer {layer:016x} is reachable")]
    NoCopy { layer: u64, index: u32 },
    #[error("copying blocks")]
    Copy(#[source] CallError),
}

/// One copy job: blocks `first..first+count` from `source` to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub source: usize,
    pub target: usize,
    pub first: u32,
    pub count: u32,
}

/// Plans the copies that make every copy hold each block's newest good
/// version. `metas[c]` are copy c's metas; `corrupt[c]` its corrupt blocks.
pub fn plan(metas: &[Vec<BlockMeta>], corrupt: &[HashSet<u32>]) -> Vec<Run> {
    let blocks = metas.iter().map(Vec::len).min().unwrap_or(0);
    // (target, source) -> blocks, in order.
    let mut wanted: BTreeMap<(usize, usize), Vec<u32>> = BTreeMap::new();
    for b in 0..blocks {
        let good = |c: usize| !corrupt.get(c).is_some_and(|s| s.contains(&(b as u32)));
        // Ties go to the lowest copy, so plans are deterministic.
        let Some(best) = (0..metas.len()).rev().filter(|&c| good(c)).max_by_key(|&c| metas[c][b].version())
        else {
            continue;
        };
        let newest = metas[best][b];
        if newest.state == BlockState::Absent {
            continue;
        }
        for (c, copy) in metas.iter().enumerate() {
            if c != best && (!good(c) || copy[b].version() < newest.version()) {
                wanted.entry((c, best)).or_default().push(b as u32);
            }
        }
    }
    let mut runs = Vec::new();
    for ((target, source), blocks) in wanted {
        let mut i = 0;
        while i < blocks.len() {
            let first = blocks[i];
            let mut count = 1;
            while i + (count as usize) < blocks.len()
                && blocks[i + count as usize] == first + count
                && count < MAX_BLOCKS_PER_REQUEST
            {
                count += 1;
            }
            runs.push(Run { source, target, first, count });
            i += count as usize;
        }
    }
    runs
}

async fn read_metas<T: Transport>(
    t: &T,
    to: &ReplicaRef,
    key: LayerExtent,
    blocks: u32,
) -> Result<Vec<BlockMeta>, CallError> {
    let mut out = Vec::with_capacity(blocks as usize);
    let mut first = 0;
    while first < blocks {
        let count = (blocks - first).min(MAX_METAS_PER_REQUEST);
        match t.call(to, Op::ReadMetas { key, first, count }).await? {
            Answer::Metas(m) if m.len() == count as usize => out.extend(m),
            other => {
                return Err(CallError::Unreachable {
                    node: to.node,
                    reason: format!("unexpected answer to ReadMetas: {}", answer_name(&other)),
                });
            }
        }
        first += count;
    }
    Ok(out)
}

pub fn answer_name(a: &Answer) -> &'static str {
    match a {
        Answer::Done => "Done",
        Answer::Fenced { .. } => "Fenced",
        Answer::Blocks { .. } => "Blocks",
        Answer::Metas(_) => "Metas",
        Answer::Digest { .. } => "Digest",
        Answer::Applied(_) => "Applied",
        Answer::Corrupt(_) => "Corrupt",
        Answer::Usage(_) => "Usage",
        Answer::Extents(_) => "Extents",
    }
}

/// Whether every copy of a layer extent answers the same digest of its block
/// versions (an unreachable copy counts as disagreeing).
pub async fn digests_agree<T: Transport>(t: &T, reps: &[ReplicaRef], key: LayerExtent, blocks: u32) -> bool {
    let mut first: Option<[u8; 32]> = None;
    for r in reps {
        match t.call(r, Op::Digest { key, blocks }).await {
            Ok(Answer::Digest { digest, .. }) => match first {
                None => first = Some(digest),
                Some(f) if f == digest => {}
                Some(_) => return false,
            },
            _ => return false,
        }
    }
    true
}

/// Repairs one layer extent of `blocks` blocks across `replicas`. With
/// `verify`, every copy's checksums are checked first and corrupt blocks
/// are replaced from good copies (scrub).
pub async fn repair_extent<T: Transport>(
    t: &T,
    volume: VolumeId,
    key: LayerExtent,
    blocks: u32,
    replicas: &[ReplicaRef],
    verify: bool,
) -> Result<RepairReport, RepairError> {
    let mut report = RepairReport::default();
    let mut reachable = Vec::new();
    let mut metas = Vec::new();
    let mut corrupt = Vec::new();
    for r in replicas {
        let m = match read_metas(t, r, key, blocks).await {
            Ok(m) => m,
            Err(_) => {
                report.unreachable.push(r.node);
                continue;
            }
        };
        let bad: HashSet<u32> = if verify {
            match t.call(r, Op::Verify { key, blocks }).await {
                Ok(Answer::Corrupt(b)) => b.into_iter().collect(),
                _ => {
                    report.unreachable.push(r.node);
                    continue;
                }
            }
        } else {
            HashSet::new()
        };
        report.corrupt += bad.len() as u64;
        reachable.push(r.clone());
        metas.push(m);
        corrupt.push(bad);
    }
    if reachable.is_empty() {
        return Err(RepairError::NoCopy { layer: key.layer, index: key.index });
    }
    let runs = plan(&metas, &corrupt);
    let results: Vec<Result<u64, CallError>> = futures::stream::iter(runs)
        .map(|run| copy_run(t, volume, key, &reachable, run))
        .buffer_unordered(PARALLEL_RUNS)
        .collect()
        .await;
    for r in results {
        let n = r.map_err(RepairError::Copy)?;
        report.blocks_copied += n;
        report.bytes_copied += n * u64::from(BLOCK_SIZE);
    }
    Ok(report)
}

async fn copy_run<T: Transport>(
    t: &T,
    volume: VolumeId,
    key: LayerExtent,
    replicas: &[ReplicaRef],
    run: Run,
) -> Result<u64, CallError> {
    let (data, metas) =
        match t.call(&replicas[run.source], Op::ReadLayer { key, first: run.first, count: run.count }).await?
        {
            Answer::Blocks { data, metas }
                if metas.len() == run.count as usize && data.len() == metas.len() * BLOCK_SIZE as usize =>
            {
                (data, metas)
            }
            other => {
                return Err(CallError::Unreachable {
                    node: replicas[run.source].node,
                    reason: format!("unexpected answer to ReadLayer: {}", answer_name(&other)),
                });
            }
        };
    let bs = BLOCK_SIZE as usize;
    let mut payload = Vec::with_capacity(data.len());
    for (i, m) in metas.iter().enumerate() {
        if m.state == BlockState::Data {
            payload.extend_from_slice(&data[i * bs..(i + 1) * bs]);
        }
    }
    let op = Op::Repair { volume, key, first: run.first, metas, data: payload };
    match t.call(&replicas[run.target], op).await? {
        Answer::Applied(n) => Ok(u64::from(n)),
        other => Err(CallError::Unreachable {
            node: replicas[run.target].node,
            reason: format!("unexpected answer to Repair: {}", answer_name(&other)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(generation: u64, seq: u64) -> BlockMeta {
        BlockMeta { generation, seq, crc: 1, state: BlockState::Data }
    }

    #[test]
    fn plan_copies_each_block_from_its_newest_copy() {
        let a = vec![m(1, 1), m(1, 5), BlockMeta::ABSENT, m(2, 1)];
        let b = vec![m(1, 1), m(1, 3), BlockMeta::ABSENT, BlockMeta::ABSENT];
        let c = vec![BlockMeta::ABSENT, m(1, 5), BlockMeta::ABSENT, m(2, 1)];
        let runs = plan(&[a, b, c], &[HashSet::new(), HashSet::new(), HashSet::new()]);
        assert_eq!(
            runs,
            vec![
                Run { source: 0, target: 1, first: 1, count: 1 },
                Run { source: 0, target: 1, first: 3, count: 1 },
                Run { source: 0, target: 2, first: 0, count: 1 },
            ]
        );
    }

    #[test]
    fn plan_replaces_corrupt_copies_and_never_copies_from_them() {
        let a = vec![m(1, 1), m(1, 1)];
        let b = vec![m(1, 1), m(1, 1)];
        let corrupt = [HashSet::from([1]), HashSet::new()];
        assert_eq!(plan(&[a, b], &corrupt), vec![Run { source: 1, target: 0, first: 1, count: 1 }]);
    }

    #[test]
    fn plan_merges_contiguous_blocks_up_to_the_request_limit() {
        let n = MAX_BLOCKS_PER_REQUEST as usize + 10;
        let a = vec![m(1, 1); n];
        let b = vec![BlockMeta::ABSENT; n];
        let runs = plan(&[a, b], &[HashSet::new(), HashSet::new()]);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].count, MAX_BLOCKS_PER_REQUEST);
        assert_eq!(runs[1].first, MAX_BLOCKS_PER_REQUEST);
    }

    #[test]
    fn identical_copies_need_nothing() {
        let a = vec![m(1, 1), BlockMeta::ABSENT];
        assert!(
            plan(&[a.clone(), a.clone(), a], &[HashSet::new(), HashSet::new(), HashSet::new()]).is_empty()
        );
    }
}
