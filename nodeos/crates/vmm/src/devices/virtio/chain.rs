//! Descriptor chains, checked before a device touches them.
//!
//! A chain comes from the guest, so [`read_chain`] walks the descriptor table
//! itself (rather than trusting an iterator that silently stops on errors) and
//! bounds everything: at most `queue_size` descriptors (a loop is an error, not
//! a hang), every buffer inside guest memory with no address overflow, device-
//! readable buffers before device-writable ones, at most 4 GiB in total, and no
//! indirect tables (not negotiated). Structural errors (a bad head or next
//! index, a loop) end the walk; content errors are recorded and the walk goes
//! on, so a device can still find the final status byte and report the failure.

use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMem;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;
/// A chain may not carry more than 2^32 - 1 bytes (virtio 1.x 2.7.5.2).
pub const MAX_CHAIN_BYTES: u64 = u32::MAX as u64;

/// One buffer, checked to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A validated chain: device-readable buffers, then device-writable ones.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    pub readable_len: u64,
    pub writable_len: u64,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ChainError {
    #[error("head index {head} is outside the queue of {size}")]
    Head { head: u16, size: u16 },
    #[error("descriptor {index} is outside guest memory")]
    DescriptorRead { index: u16 },
    #[error("descriptor {index} links to {next}, outside the queue of {size}")]
    Next { index: u16, next: u16, size: u16 },
    #[error("chain longer than the queue of {size} descriptors (a loop?)")]
    TooLong { size: u16 },
    #[error("descriptor {index} is indirect, which was not negotiated")]
    Indirect { index: u16 },
    #[error("descriptor {index} is device-readable after a device-writable one")]
    Order { index: u16 },
    #[error("descriptor {index}: buffer {addr:#x}+{len:#x} is not in guest memory")]
    Memory { index: u16, addr: u64, len: u32 },
    #[error("chain carries more than {MAX_CHAIN_BYTES} bytes")]
    Length,
    #[error("access past the end of the chain's buffers")]
    Short,
}

impl ChainError {
    /// The avail ring offered a head that is not a descriptor: the queue is
    /// unusable (the head cannot even go back on the used ring).
    pub fn breaks_queue(&self) -> bool {
        matches!(self, Self::Head { .. })
    }
}

/// A chain that failed validation; `status` is the last byte of the final
/// descriptor when that descriptor is device-writable and in guest memory, so
/// a device with a status byte can still report the error there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFault {
    pub error: ChainError,
    pub status: Option<GuestAddress>,
}

impl ChainFault {
    fn structural(error: ChainError) -> Self {
        Self { error, status: None }
    }
}

/// Walks the chain starting at `head` in the table at `desc_table`.
pub fn read_chain(
    mem: &GuestMem,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Chain, ChainFault> {
    if head >= queue_size {
        return Err(ChainFault::structural(ChainError::Head { head, size: queue_size }));
    }
    let mut chain = Chain { head, ..Chain::default() };
    let mut first_error: Option<ChainError> = None;
    let mut seen_writable = false;
    let mut index = head;
    let mut count: u16 = 0;
    let last = loop {
        if count == queue_size {
            return Err(ChainFault::structural(ChainError::TooLong { size: queue_size }));
        }
        count += 1;
        let mut raw = [0u8; DESC_SIZE as usize];
        let at = desc_table.0.checked_add(DESC_SIZE * u64::from(index));
        if at.and_then(|a| mem.read_slice(&mut raw, GuestAddress(a)).ok()).is_none() {
            return Err(ChainFault::structural(ChainError::DescriptorRead { index }));
        }
        let addr = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        let writable = flags & DESC_F_WRITE != 0;

        let mut error = None;
        if flags & DESC_F_INDIRECT != 0 {
            error = Some(ChainError::Indirect { index });
        } else if len > 0 {
            if !writable && seen_writable {
                error = Some(ChainError::Order { index });
            } else if addr.checked_add(u64::from(len)).is_none()
                || !mem.check_range(GuestAddress(addr), len as usize)
            {
                error = Some(ChainError::Memory { index, addr, len });
            } else {
                let segment = Segment { addr: GuestAddress(addr), len };
                let total = if writable { &mut chain.writable_len } else { &mut chain.readable_len };
                *total += u64::from(len);
                if chain.readable_len + chain.writable_len > MAX_CHAIN_BYTES {
                    error = Some(ChainError::Length);
                }
                if writable { &mut chain.writable } else { &mut chain.readable }.push(segment);
            }
            seen_writable |= writable;
        }
        if let Some(e) = error {
            first_error.get_or_insert(e);
        }
        if flags & DESC_F_NEXT == 0 {
            break (addr, len, flags);
        }
        if next >= queue_size {
            return Err(ChainFault::structural(ChainError::Next { index, next, size: queue_size }));
        }
        index = next;
    };
    match first_error {
        None => Ok(chain),
        Some(error) => {
            let (addr, len, flags) = last;
            let status = (flags & DESC_F_WRITE != 0 && flags & DESC_F_INDIRECT == 0 && len > 0)
                .then(|| addr.checked_add(u64::from(len) - 1))
                .flatten()
                .map(GuestAddress)
                .filter(|&a| mem.check_range(a, 1));
            Err(ChainFault { error, status })
        }
    }
}

/// Calls `f(guest address, offset in the caller's buffer, length)` for each piece
/// of the `len` bytes at chain offset `offset` in `segments`.
fn pieces(
    segments: &[Segment],
    mut offset: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, usize, usize) -> bool,
) -> Result<(), ChainError> {
    let mut done = 0usize;
    for s in segments {
        if done == len {
            break;
        }
        let seg_len = u64::from(s.len);
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        let n = ((seg_len - offset) as usize).min(len - done);
        // In range: the segment was checked to be in memory without overflow.
        if !f(GuestAddress(s.addr.0 + offset), done, n) {
            return Err(ChainError::Memory { index: 0, addr: s.addr.0 + offset, len: n as u32 });
        }
        done += n;
        offset = 0;
    }
    if done < len { Err(ChainError::Short) } else { Ok(()) }
}

impl Chain {
    /// Copies `buf.len()` device-readable bytes starting at `offset`.
    pub fn read_at(&self, mem: &GuestMem, offset: u64, buf: &mut [u8]) -> Result<(), ChainError> {
        let len = buf.len();
        pieces(&self.readable, offset, len, |addr, at, n| mem.read_slice(&mut buf[at..at + n], addr).is_ok())
    }

    /// Copies `data` into the device-writable buffers starting at `offset`.
    pub fn write_at(&self, mem: &GuestMem, offset: u64, data: &[u8]) -> Result<(), ChainError> {
        pieces(&self.writable, offset, data.len(), |addr, at, n| {
            mem.write_slice(&data[at..at + n], addr).is_ok()
        })
    }
}

/// The next chain head the driver offers: `Ok(None)` when there is none, an
/// error when the avail ring itself is broken (index too far ahead).
pub fn pop_head(queue: &mut Queue, mem: &GuestMem) -> Result<Option<u16>, virtio_queue::Error> {
    let mut iter = queue.iter(mem)?;
    Ok(iter.next().map(|c| c.head_index()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::{F_INDIRECT, F_NEXT, F_WRITE, GuestQueue};
    use crate::memory;

    const TABLE: u64 = 0x10_0000;

    fn setup() -> (GuestMem, GuestQueue) {
        let (mem, _f) = memory::create(16).unwrap();
        let q = GuestQueue::new(&mem, 8, TABLE);
        (mem, q)
    }

    fn walk(mem: &GuestMem, q: &GuestQueue, head: u16) -> Result<Chain, ChainFault> {
        read_chain(mem, GuestAddress(q.desc), q.size, head)
    }

    #[test]
    fn a_good_chain_and_copies_across_segments() {
        let (mem, mut q) = setup();
        let head = q.add_chain(&mem, &[(0x20_0000, 3, false), (0x20_1000, 5, false), (0x20_2000, 4, true)]);
        mem.write_slice(b"abc", GuestAddress(0x20_0000)).unwrap();
        mem.write_slice(b"defgh", GuestAddress(0x20_1000)).unwrap();
        let c = walk(&mem, &q, head).unwrap();
        assert_eq!((c.readable_len, c.writable_len), (8, 4));
        let mut buf = [0u8; 4];
        c.read_at(&mem, 2, &mut buf).unwrap();
        assert_eq!(&buf, b"cdef");
        assert_eq!(c.read_at(&mem, 6, &mut buf), Err(ChainError::Short));
        c.write_at(&mem, 1, b"xyz").unwrap();
        let mut out = [0u8; 4];
        mem.read_slice(&mut out, GuestAddress(0x20_2000)).unwrap();
        assert_eq!(&out, b"\0xyz");
        assert_eq!(c.write_at(&mem, 2, b"xyz"), Err(ChainError::Short));
    }

    #[test]
    fn loops_and_bad_links_are_structural() {
        let (mem, q) = setup();
        q.write_desc(&mem, 0, 0x20_0000, 16, F_NEXT, 1);
        q.write_desc(&mem, 1, 0x20_1000, 16, F_NEXT, 0);
        assert_eq!(
            walk(&mem, &q, 0).unwrap_err(),
            ChainFault { error: ChainError::TooLong { size: 8 }, status: None }
        );
        q.write_desc(&mem, 1, 0x20_1000, 16, F_NEXT, 8);
        assert!(matches!(walk(&mem, &q, 0).unwrap_err().error, ChainError::Next { index: 1, next: 8, .. }));
        let e = walk(&mem, &q, 9).unwrap_err();
        assert!(e.error.breaks_queue());
        // A table outside memory.
        let e = read_chain(&mem, GuestAddress(u64::MAX - 8), 8, 0).unwrap_err();
        assert_eq!(e.error, ChainError::DescriptorRead { index: 0 });
    }

    #[test]
    fn content_errors_keep_the_status_byte() {
        let (mem, q) = setup();
        // Header fine, data outside memory, status fine.
        q.write_desc(&mem, 0, 0x20_0000, 16, F_NEXT, 1);
        q.write_desc(&mem, 1, 0xffff_ffff_0000, 512, F_NEXT | F_WRITE, 2);
        q.write_desc(&mem, 2, 0x20_3000, 1, F_WRITE, 0);
        let e = walk(&mem, &q, 0).unwrap_err();
        assert!(matches!(e.error, ChainError::Memory { index: 1, .. }));
        assert_eq!(e.status, Some(GuestAddress(0x20_3000)));
        // Address + length wraps.
        q.write_desc(&mem, 1, u64::MAX - 10, 512, F_NEXT | F_WRITE, 2);
        assert!(matches!(walk(&mem, &q, 0).unwrap_err().error, ChainError::Memory { .. }));
        // Readable after writable.
        q.write_desc(&mem, 1, 0x20_1000, 512, F_NEXT | F_WRITE, 2);
        q.write_desc(&mem, 2, 0x20_3000, 1, F_NEXT, 3);
        q.write_desc(&mem, 3, 0x20_4000, 1, F_WRITE, 0);
        let e = walk(&mem, &q, 0).unwrap_err();
        assert_eq!(e.error, ChainError::Order { index: 2 });
        assert_eq!(e.status, Some(GuestAddress(0x20_4000)));
        // A readable last descriptor leaves nowhere to write a status.
        q.write_desc(&mem, 3, 0x20_4000, 1, 0, 0);
        assert_eq!(walk(&mem, &q, 0).unwrap_err().status, None);
        // Indirect tables are not negotiated.
        q.write_desc(&mem, 0, 0x20_0000, 32, F_INDIRECT, 0);
        assert_eq!(walk(&mem, &q, 0).unwrap_err().error, ChainError::Indirect { index: 0 });
    }

    #[test]
    fn chains_past_4_gib_are_refused() {
        let (mem, _) = setup();
        let q = GuestQueue::new(&mem, 256, TABLE);
        // 256 descriptors, each covering all 16 MiB of the guest: 2^32 bytes.
        for i in 0..255 {
            q.write_desc(&mem, i, 0, 16 << 20, F_NEXT, i + 1);
        }
        q.write_desc(&mem, 255, 0, 16 << 20, 0, 0);
        assert_eq!(walk(&mem, &q, 0).unwrap_err().error, ChainError::Length);
        // One descriptor fewer is fine.
        q.write_desc(&mem, 254, 0, 16 << 20, 0, 0);
        assert_eq!(walk(&mem, &q, 0).unwrap().readable_len, 255 << 24);
        // Zero-length descriptors are allowed and carry nothing.
        q.write_desc(&mem, 254, 0, 0, F_WRITE, 0);
        assert_eq!(walk(&mem, &q, 0).unwrap().writable.len(), 0);
    }
}
