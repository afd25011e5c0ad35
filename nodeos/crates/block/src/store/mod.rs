//! [`ExtentStore`]: a node's local copy of the extents it replicates.
//!
//! The store is keyed by [`LayerExtent`] (layer id + extent index). Layer ids
//! are unique in the pool, so a store never needs to know which volume a
//! layer belongs to except for fencing. Each 4 KiB block of an extent has a
//! [`BlockMeta`]: the generation and sequence number of the write that put it
//! there, its CRC32C and whether it holds data or zeroes. A block never written
//! reads as zeroes with [`BlockMeta::ABSENT`].
//!
//! # Contract (checked by `store::conformance` against every implementation)
//! - `write_blocks` stores data and metas for `metas.len()` consecutive
//!   blocks; blocks whose meta is `ZERO` have no data in `data` (the data
//!   slice holds only the `DATA` blocks, in order). After it returns, reads
//!   see the new blocks; they are durable only after `flush` returns.
//! - `flush` makes every earlier `write_blocks`, `set_fence` and
//!   `delete_layer` durable (power loss of the node).
//! - `set_fence` is durable when it returns.
//! - `read_blocks` returns the stored bytes and metas as they are on the
//!   medium: it does **not** verify checksums (the replica does, so that a
//!   corrupted block can be reported and repaired).
//! - A store survives its process being killed: everything written before
//!   the kill is readable after reopening (page cache), and flushed data
//!   survives power loss.
//! - Implementations are safe to call from several threads; writes to
//!   distinct blocks may run concurrently.

pub mod device;
pub mod file;
pub mod mem;

#[cfg(test)]
mod conformance;

use nodeos_types::VolumeId;
use serde::{Deserialize, Serialize};

/// One extent of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LayerExtent {
    pub layer: u64,
    pub index: u32,
}

/// What a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[repr(u32)]
pub enum BlockState {
    /// Never written in this layer (a read falls through to older layers).
    #[default]
    Absent = 0,
    /// 4096 bytes of data whose CRC32C is `crc`.
    Data = 1,
    /// Zeroes (trimmed or written as zeroes); shadows older layers.
    Zero = 2,
}

/// Per-block metadata, 24 bytes on disk: gen (u64 LE), seq (u64 LE), crc
/// (u32 LE), state (u32 LE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BlockMeta {
    /// Volume generation of the writer that wrote the block.
    pub generation: u64,
    /// That writer's sequence number for the write.
    pub seq: u64,
    /// CRC32C of the 4096 data bytes (0 unless `state` is `Data`).
    pub crc: u32,
    pub state: BlockState,
}

impl BlockMeta {
    pub const ABSENT: BlockMeta = BlockMeta { generation: 0, seq: 0, crc: 0, state: BlockState::Absent };
    pub const ENCODED_LEN: usize = 24;

    /// Order of writes: a block with a greater `(gen, seq)` is newer.
    pub fn version(&self) -> (u64, u64) {
        (self.generation, self.seq)
    }

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0u8; Self::ENCODED_LEN];
        b[0..8].copy_from_slice(&self.generation.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.crc.to_le_bytes());
        b[20..24].copy_from_slice(&(self.state as u32).to_le_bytes());
        b
    }

    /// Decodes 24 bytes; an unknown state reads as a corrupt block (`Data`
    /// with a checksum that cannot match), never as a panic.
    pub fn decode(b: &[u8; Self::ENCODED_LEN]) -> BlockMeta {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
        let state = match u32::from_le_bytes(b[20..24].try_into().expect("4 bytes")) {
            0 => BlockState::Absent,
            1 => BlockState::Data,
            2 => BlockState::Zero,
            _ => {
                return BlockMeta {
                    generation: u64_at(0),
                    seq: u64_at(8),
                    crc: !crc32c::crc32c(&[0; 4096]),
                    state: BlockState::Data,
                };
            }
        };
        BlockMeta { generation: u64_at(0), seq: u64_at(8), crc, state }
    }
}

/// Space a store uses and may still use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StoreUsage {
    /// Bytes allocated to extent data and metadata.
    pub used: u64,
    /// Bytes still free on the medium.
    pub free: u64,
}

/// A node's local extent store. See the module docs for the contract.
pub trait ExtentStore: Send + Sync + std::fmt::Debug + 'static {
    /// Reads `metas.len()` blocks from `first`: all 4096-byte blocks go into
    /// `data` (length `metas.len() * 4096`), zeroes for `Absent`/`Zero`.
    fn read_blocks(
        &self,
        key: LayerExtent,
        first: u32,
        data: &mut [u8],
        metas: &mut [BlockMeta],
    ) -> std::io::Result<()>;
    /// Only the metas of `count` blocks from `first`.
    fn read_metas(&self, key: LayerExtent, first: u32, count: u32) -> std::io::Result<Vec<BlockMeta>>;
    /// See the module docs: `data` holds 4096 bytes for each `Data` meta, in order.
    fn write_blocks(
        &self,
        key: LayerExtent,
        first: u32,
        metas: &[BlockMeta],
        data: &[u8],
    ) -> std::io::Result<()>;
    fn flush(&self) -> std::io::Result<()>;
    /// The fencing generation recorded for a volume (0 when none).
    fn fence(&self, volume: VolumeId) -> std::io::Result<u64>;
    fn set_fence(&self, volume: VolumeId, generation: u64) -> std::io::Result<()>;
    /// Every extent the store holds, sorted.
    fn extents(&self) -> std::io::Result<Vec<LayerExtent>>;
    /// Removes every extent of a layer and reclaims its space.
    fn delete_layer(&self, layer: u64) -> std::io::Result<()>;
    fn usage(&self) -> std::io::Result<StoreUsage>;
}

/// CRC32C of one block, as stored in [`BlockMeta::crc`].
pub fn block_crc(block: &[u8]) -> u32 {
    crc32c::crc32c(block)
}
