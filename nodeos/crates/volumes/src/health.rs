//! What the API offers on demand about a volume's copies: their health (do
//! the copies of each extent hold the same block versions?) and a scrub
//! (verify every copy's checksums now, replace bad blocks from good copies).

use std::collections::{HashMap, HashSet};

use nodeos_block::repair;
use nodeos_block::store::LayerExtent;
use nodeos_block::transport::Transport;
use nodeos_block::wire::{Answer, Op};
use nodeos_types::NodeId;
use nodeos_types::records::VolumeRecord;
use serde::Serialize;
use tracing::{info, warn};

use crate::volumes::{VolumeError, Volumes};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScrubReport {
    pub extents: u64,
    pub corrupt: u64,
    pub repaired_blocks: u64,
    pub unreachable: Vec<NodeId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CopyState {
    /// Same block versions as the majority of copies.
    InSync,
    /// Differs from the majority (missing writes; being repaired).
    Differs,
    Unreachable,
}

impl CopyState {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyState::InSync => "in-sync",
            CopyState::Differs => "differs",
            CopyState::Unreachable => "unreachable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopyHealth {
    pub node: NodeId,
    pub address: String,
    pub state: CopyState,
    pub written_blocks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtentHealth {
    pub index: u32,
    pub copies: Vec<CopyHealth>,
}

/// Most extents `health` inspects (larger volumes show their first ones).
pub const HEALTH_EXTENTS: usize = 256;

/// Compares the copies of each extent (every layer's block versions).
pub async fn health<T: Transport + Clone>(v: &Volumes<T>, r: &VolumeRecord) -> Vec<ExtentHealth> {
    let Ok(layout) = v.layout(r).await else {
        return Vec::new();
    };
    let blocks = layout.extent_blocks();
    let mut out = Vec::new();
    for (e, reps) in layout.extents.iter().enumerate().take(HEALTH_EXTENTS) {
        let mut sums: Vec<Option<(Vec<[u8; 32]>, u64)>> = Vec::new();
        for rep in reps {
            let mut digests = Vec::new();
            let mut written = 0u64;
            for &layer in &layout.layers {
                match v
                    .transport()
                    .call(rep, Op::Digest { key: LayerExtent { layer, index: e as u32 }, blocks })
                    .await
                {
                    Ok(Answer::Digest { digest, written: w }) => {
                        digests.push(digest);
                        written += u64::from(w);
                    }
                    _ => break,
                }
            }
            sums.push((digests.len() == layout.layers.len()).then_some((digests, written)));
        }
        let mut counts: HashMap<&Vec<[u8; 32]>, usize> = HashMap::new();
        for (d, _) in sums.iter().flatten() {
            *counts.entry(d).or_default() += 1;
        }
        let majority = counts.iter().max_by_key(|(_, c)| **c).map(|(d, _)| (*d).clone());
        let copies = reps
            .iter()
            .zip(&sums)
            .map(|(rep, s)| CopyHealth {
                node: rep.node,
                address: rep.address.clone(),
                state: match s {
                    None => CopyState::Unreachable,
                    Some((d, _)) if Some(d) == majority.as_ref() => CopyState::InSync,
                    Some(_) => CopyState::Differs,
                },
                written_blocks: s.as_ref().map(|(_, w)| *w).unwrap_or(0),
            })
            .collect();
        out.push(ExtentHealth { index: e as u32, copies });
    }
    out
}

/// Verifies every copy's checksums and replaces corrupt or missing blocks
/// from good copies.
pub async fn scrub_volume<T: Transport + Clone>(
    v: &Volumes<T>,
    volume: &str,
) -> Result<ScrubReport, VolumeError> {
    let (r, _) = v.get(volume).await?;
    let layout = v.layout(&r).await?;
    let mut report = ScrubReport::default();
    let mut unreachable = HashSet::new();
    for (e, reps) in layout.extents.iter().enumerate() {
        report.extents += 1;
        for &layer in &layout.layers {
            let key = LayerExtent { layer, index: e as u32 };
            match repair::repair_extent(v.transport(), r.id, key, layout.extent_blocks(), reps, true).await {
                Ok(rep) => {
                    report.corrupt += rep.corrupt;
                    report.repaired_blocks += rep.blocks_copied;
                    unreachable.extend(rep.unreachable);
                }
                Err(err) => {
                    warn!(volume = %r.id, extent = e, error = %nodeos_types::error_chain(&err), "scrub could not repair");
                    unreachable.extend(reps.iter().map(|r| r.node));
                }
            }
        }
    }
    report.unreachable = unreachable.into_iter().collect();
    report.unreachable.sort();
    if report.corrupt > 0 {
        warn!(volume = %r.id, corrupt = report.corrupt, repaired = report.repaired_blocks, "scrub found corrupt blocks");
    } else {
        info!(volume = %r.id, repaired = report.repaired_blocks, "scrub clean");
    }
    Ok(report)
}
