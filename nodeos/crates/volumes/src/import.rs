//! An image streamed into a volume: [`Import`] takes the volume's writer slot,
//! checks every chunk against the stream's own announcement ([`ImportPlan`],
//! sans-IO), keeps a few writes in flight so the replicas stay busy while the
//! next chunk arrives, flushes, and always gives the slot back: on success,
//! on a bad chunk, and when the sender goes away.
//!
//! The API's `VolumeService.Import` feeds it with [`Import::run`], and so does
//! compute's image upload; any other front end (a local file, an HTTP fetch)
//! can too.

use futures::{Stream, StreamExt};
use nodeos_block::client::VolumeClient;
use nodeos_block::device::{BLOCK_SIZE, BlockDevice, DeviceError};
use nodeos_block::transport::{TcpTransport, Transport};
use nodeos_types::VolumeId;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::volumes::{VolumeError, Volumes};
use crate::writer::{Takeover, WriterSlot};

/// Largest chunk of an import.
pub const MAX_IMPORT_CHUNK: usize = 4 << 20;
/// Who an import shows as in the volume's writer slot.
pub const IMPORT_HOLDER: &str = "import";
/// Writes of one import in flight at once.
const IMPORT_WINDOW: usize = 4;
const BS: u64 = BLOCK_SIZE as u64;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The stream broke its own rules; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("writing the image into the volume")]
    Write(#[source] DeviceError),
    #[error("an import write task ended abnormally: {0}")]
    Task(String),
}

/// What an import announces before its first chunk.
#[derive(Debug, Clone)]
pub struct ImportStart {
    /// Volume name or id.
    pub volume: String,
    /// Bytes the chunks will carry in all.
    pub total_bytes: u64,
    /// Leave zero blocks out (the volume is thin: they read as zeroes).
    pub sparse: bool,
    /// Take the writer slot from whoever holds it (that writer is fenced).
    pub takeover: bool,
}

/// What a finished import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportSummary {
    pub volume: VolumeId,
    pub written: u64,
    pub skipped: u64,
    /// The generation the import wrote with.
    pub generation: u64,
}

/// One import in progress. Finish it with [`Import::finish`] or
/// [`Import::abort`]; dropped otherwise, its writes stop and its slot is
/// given back in the background.
#[derive(Debug)]
pub struct Import<T: Transport + Clone = TcpTransport> {
    plan: ImportPlan,
    client: VolumeClient<T>,
    slot: WriterSlot<T>,
    writes: JoinSet<Result<(), DeviceError>>,
}

impl<T: Transport + Clone> Import<T> {
    /// Checks the announcement against the volume, then takes its writer slot.
    pub async fn start(volumes: &Volumes<T>, start: ImportStart) -> Result<Self, ImportError> {
        if start.volume.is_empty() {
            return Err(ImportError::Invalid("start.volume must name the volume to import into".into()));
        }
        // Checked before opening: a refused import must not fence the writer
        // it would take over from. Volumes only grow, so the size still holds.
        let (rec, _) = volumes.get(&start.volume).await?;
        let plan = ImportPlan::new(rec.size_bytes, start.total_bytes, start.sparse)?;
        let takeover = if start.takeover { Takeover::Force } else { Takeover::Refuse };
        let (client, slot) = WriterSlot::open(volumes, &start.volume, IMPORT_HOLDER, takeover).await?;
        Ok(Import { plan, client, slot, writes: JoinSet::new() })
    }

    /// Checks one chunk and issues its writes, waiting while the window is full.
    pub async fn chunk(&mut self, offset: u64, data: Vec<u8>) -> Result<(), ImportError> {
        for (at, bytes) in self.plan.chunk(offset, data)? {
            while self.writes.len() >= IMPORT_WINDOW {
                self.wait_one().await?;
            }
            let c = self.client.clone();
            self.writes.spawn(async move { c.write(at, bytes, false).await });
        }
        Ok(())
    }

    /// Feeds every chunk of `chunks` (offset, bytes) in order, then finishes;
    /// the first error (a bad chunk, or one the stream yields) aborts the
    /// import instead. Either way the slot is given back before this returns.
    pub async fn run<S>(mut self, chunks: S) -> Result<ImportSummary, ImportError>
    where
        S: Stream<Item = Result<(u64, Vec<u8>), ImportError>>,
    {
        let fed = async {
            let mut chunks = std::pin::pin!(chunks);
            while let Some(chunk) = chunks.next().await {
                let (offset, data) = chunk?;
                self.chunk(offset, data).await?;
            }
            Ok(())
        }
        .await;
        match fed {
            Ok(()) => self.finish().await,
            Err(e) => Err(self.abort(e).await),
        }
    }

    async fn wait_one(&mut self) -> Result<(), ImportError> {
        match self.writes.join_next().await {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(ImportError::Write(e)),
            Some(Err(e)) => Err(ImportError::Task(e.to_string())),
        }
    }

    /// Waits for every write, checks that the stream carried all it
    /// announced, flushes, and gives the slot back. On any failure the
    /// import is aborted (slot given back) and the error returned.
    pub async fn finish(mut self) -> Result<ImportSummary, ImportError> {
        let done = async {
            while !self.writes.is_empty() {
                self.wait_one().await?;
            }
            self.plan.finish()?;
            self.client.flush().await.map_err(ImportError::Write)
        }
        .await;
        if let Err(e) = done {
            return Err(self.abort(e).await);
        }
        let summary = ImportSummary {
            volume: self.slot.volume(),
            written: self.plan.written,
            skipped: self.plan.skipped,
            generation: self.slot.generation(),
        };
        self.give_back().await;
        info!(volume = %summary.volume, generation = summary.generation, written = summary.written, skipped = summary.skipped, "image imported");
        Ok(summary)
    }

    /// Stops the import after `why`: no write of it lands after the slot is
    /// given back (running writes are stopped and waited for first). Answers `why`.
    pub async fn abort(mut self, why: ImportError) -> ImportError {
        self.writes.shutdown().await;
        let (volume, generation) = (self.slot.volume(), self.slot.generation());
        self.give_back().await;
        warn!(volume = %volume, generation, error = %nodeos_types::error_chain(&why), "import failed");
        why
    }

    async fn give_back(self) {
        let Import { client, slot, .. } = self;
        drop(client);
        let (volume, generation) = (slot.volume(), slot.generation());
        if let Err(e) = slot.release().await {
            warn!(
                volume = %volume,
                generation,
                error = %nodeos_types::error_chain(&e),
                "import could not give the writer slot back; `nodeos volume release` frees it"
            );
        }
    }
}

/// The rules of an import stream, sans-IO: checks each chunk and turns it
/// into the writes to issue.
#[derive(Debug)]
pub struct ImportPlan {
    size: u64,
    total: u64,
    sparse: bool,
    /// Lowest offset the next chunk may start at.
    next: u64,
    received: u64,
    /// A chunk ended off a block boundary: it had to be the last.
    ended_short: bool,
    /// Bytes written so far (zero blocks of a sparse import are skipped).
    pub written: u64,
    /// Zero bytes a sparse import left out.
    pub skipped: u64,
}

impl ImportPlan {
    pub fn new(size: u64, total: u64, sparse: bool) -> Result<Self, ImportError> {
        if total > size {
            return Err(ImportError::Invalid(format!(
                "start.total_bytes must be at most the volume's size of {size} bytes, got {total}; resize the volume first"
            )));
        }
        Ok(ImportPlan {
            size,
            total,
            sparse,
            next: 0,
            received: 0,
            ended_short: false,
            written: 0,
            skipped: 0,
        })
    }

    /// Checks one chunk and returns the writes it becomes (block-aligned,
    /// zero blocks left out when sparse).
    pub fn chunk(&mut self, offset: u64, mut data: Vec<u8>) -> Result<Vec<(u64, Vec<u8>)>, ImportError> {
        let len = data.len() as u64;
        if data.is_empty() || data.len() > MAX_IMPORT_CHUNK {
            return Err(ImportError::Invalid(format!(
                "chunk.data must be 1..={MAX_IMPORT_CHUNK} bytes, got {len}"
            )));
        }
        if !offset.is_multiple_of(BS) {
            return Err(ImportError::Invalid(format!(
                "chunk.offset must be a multiple of {BS}, got {offset}"
            )));
        }
        if self.ended_short {
            return Err(ImportError::Invalid(format!(
                "chunk.data must be a multiple of {BS} bytes except in the last chunk; a chunk after a short one arrived at offset {offset}"
            )));
        }
        if offset < self.next {
            return Err(ImportError::Invalid(format!(
                "chunk.offset must be at least {} (chunks come in ascending order without overlap), got {offset}",
                self.next
            )));
        }
        if self.received + len > self.total {
            return Err(ImportError::Invalid(format!(
                "the chunks carry more than start.total_bytes ({}): {} bytes so far",
                self.total,
                self.received + len
            )));
        }
        let padded = len.next_multiple_of(BS);
        if offset.checked_add(padded).is_none_or(|end| end > self.size) {
            return Err(ImportError::Invalid(format!(
                "chunk.offset + its length must be at most the volume's size of {} bytes, got {offset} + {len}",
                self.size
            )));
        }
        self.ended_short = padded != len;
        data.resize(padded as usize, 0);
        self.received += len;
        self.next = offset + padded;
        if !self.sparse {
            self.written += padded;
            return Ok(vec![(offset, data)]);
        }
        // Runs of consecutive non-zero blocks, each one write.
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut run: Option<(usize, usize)> = None;
        for (i, block) in data.chunks_exact(BS as usize).enumerate() {
            let at = i * BS as usize;
            if block.iter().all(|&b| b == 0) {
                self.skipped += BS;
                if let Some((s, e)) = run.take() {
                    writes.push((offset + s as u64, data[s..e].to_vec()));
                }
            } else {
                self.written += BS;
                run = Some(run.map_or((at, at + BS as usize), |(s, _)| (s, at + BS as usize)));
            }
        }
        if let Some((s, e)) = run {
            writes.push((offset + s as u64, data[s..e].to_vec()));
        }
        Ok(writes)
    }

    /// Checks that the stream carried everything it announced.
    pub fn finish(&self) -> Result<(), ImportError> {
        if self.received != self.total {
            return Err(ImportError::Invalid(format!(
                "the stream ended after {} of start.total_bytes ({}) bytes",
                self.received, self.total
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K4: usize = 4096;

    #[test]
    fn dense_import_pads_the_last_chunk() {
        let mut p = ImportPlan::new(16 * 4096, 2 * 4096 + 10, false).unwrap();
        let w = p.chunk(0, vec![1; 2 * K4]).unwrap();
        assert_eq!(w, vec![(0, vec![1; 2 * K4])]);
        let w = p.chunk(2 * 4096, vec![2; 10]).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].0, 2 * 4096);
        assert_eq!(w[0].1.len(), K4);
        assert_eq!(&w[0].1[..10], &[2; 10]);
        assert!(w[0].1[10..].iter().all(|&b| b == 0));
        p.finish().unwrap();
        assert_eq!((p.written, p.skipped), (3 * 4096, 0));
    }

    #[test]
    fn sparse_import_skips_zero_blocks_and_joins_runs() {
        let mut p = ImportPlan::new(16 * 4096, 6 * 4096, true).unwrap();
        let mut data = vec![0u8; 6 * K4];
        data[K4..3 * K4].fill(7);
        data[5 * K4 + 1] = 1;
        let w = p.chunk(4096, data).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].0, w[0].1.len()), (2 * 4096, 2 * K4));
        assert_eq!((w[1].0, w[1].1.len()), (6 * 4096, K4));
        assert_eq!((p.written, p.skipped), (3 * 4096, 3 * 4096));
        assert!(p.chunk(7 * 4096, vec![0; K4]).is_err(), "more than total_bytes");
    }

    #[test]
    fn bad_chunks_are_refused_with_the_field_named() {
        assert!(ImportPlan::new(4096, 4097, false).unwrap_err().to_string().contains("start.total_bytes"));
        let mut p = ImportPlan::new(8 * 4096, 8 * 4096, false).unwrap();
        let msg = |r: Result<_, ImportError>| r.unwrap_err().to_string();
        assert!(msg(p.chunk(0, vec![])).contains("chunk.data must be 1..=4194304"));
        assert!(msg(p.chunk(0, vec![0; MAX_IMPORT_CHUNK + 1])).contains("chunk.data"));
        assert!(msg(p.chunk(512, vec![1; K4])).contains("chunk.offset must be a multiple of 4096"));
        assert!(msg(p.chunk(8 * 4096, vec![1; K4])).contains("volume's size"));
        p.chunk(4096, vec![1; K4]).unwrap();
        assert!(msg(p.chunk(0, vec![1; K4])).contains("ascending"));
        p.chunk(2 * 4096, vec![1; 100]).unwrap();
        assert!(msg(p.chunk(3 * 4096, vec![1; K4])).contains("except in the last chunk"));
        assert!(p.finish().unwrap_err().to_string().contains("ended after"));
    }
}
