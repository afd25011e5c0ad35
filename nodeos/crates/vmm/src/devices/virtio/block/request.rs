//! One virtio-blk request: parse the header, move the data, write the status.
//!
//! Wire format (virtio 1.x 5.2.6): a 16-byte device-readable header
//! `{ type: le32, reserved: le32, sector: le64 }`, the data (device-readable for
//! OUT, device-writable for IN and GET_ID), and a final device-writable status
//! byte. The data may be split across descriptors at any byte; sectors are 512
//! bytes whatever the advertised block size.

use super::backend::BlockBackend;
use crate::devices::virtio::chain::{Chain, ChainError};
use crate::memory::GuestMem;

pub const SECTOR_SIZE: u64 = 512;
/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = 20;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
const HEADER_LEN: u64 = 16;
/// Data moves through a bounce buffer of at most this many bytes at a time.
pub const CHUNK: usize = 128 * 1024;

/// Why a request failed (the status byte says IOERR or UNSUPP).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request header shorter than {HEADER_LEN} bytes")]
    Header,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("data length {len} is not a multiple of {SECTOR_SIZE}")]
    Alignment { len: u64 },
    #[error("sectors {sector}+{len} bytes are past the capacity of {capacity} bytes")]
    Range { sector: u64, len: u64, capacity: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("GET_ID without a buffer")]
    NoIdBuffer,
    #[error("backend I/O failed")]
    Io(#[source] std::io::Error),
    #[error("guest buffer access failed")]
    Guest(#[source] ChainError),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// What the device puts on the used ring for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The status written, or None when the chain had no place for it.
    pub status: Option<u8>,
    /// Bytes written into the chain's device-writable buffers.
    pub used_len: u32,
    /// Data bytes moved (read or written).
    pub bytes: u64,
}

/// Runs the request carried by `chain` and writes its status byte.
pub fn execute(
    chain: &Chain,
    mem: &GuestMem,
    backend: &dyn BlockBackend,
    id: &[u8; ID_BYTES],
    bounce: &mut Vec<u8>,
) -> Completion {
    let Some(status_at) = chain.writable_len.checked_sub(1) else {
        return Completion { status: None, used_len: 0, bytes: 0 };
    };
    let (status, data_written, bytes) = match run(chain, mem, backend, id, bounce, status_at) {
        Ok((written, bytes)) => (S_OK, written, bytes),
        Err(e) => {
            tracing::debug!(error = %e, "virtio-blk request failed");
            (e.status(), 0, 0)
        }
    };
    if chain.write_at(mem, status_at, &[status]).is_err() {
        return Completion { status: None, used_len: 0, bytes };
    }
    Completion { status: Some(status), used_len: (data_written + 1) as u32, bytes }
}

/// Returns (data bytes written to the guest, data bytes moved).
fn run(
    chain: &Chain,
    mem: &GuestMem,
    backend: &dyn BlockBackend,
    id: &[u8; ID_BYTES],
    bounce: &mut Vec<u8>,
    data_writable: u64,
) -> Result<(u64, u64), RequestError> {
    if chain.readable_len < HEADER_LEN {
        return Err(RequestError::Header);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    chain.read_at(mem, 0, &mut header).map_err(RequestError::Guest)?;
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    match kind {
        T_IN => {
            let len = data_writable;
            let offset = check_range(backend, sector, len)?;
            let mut pos = 0u64;
            while pos < len {
                let n = chunk(len - pos);
                let buf = bounce_buf(bounce, n);
                backend.read_at(buf, offset + pos).map_err(RequestError::Io)?;
                chain.write_at(mem, pos, buf).map_err(RequestError::Guest)?;
                pos += n as u64;
            }
            Ok((len, len))
        }
        T_OUT => {
            if backend.read_only() {
                return Err(RequestError::ReadOnly);
            }
            let len = chain.readable_len - HEADER_LEN;
            let offset = check_range(backend, sector, len)?;
            let mut pos = 0u64;
            while pos < len {
                let n = chunk(len - pos);
                let buf = bounce_buf(bounce, n);
                chain.read_at(mem, HEADER_LEN + pos, buf).map_err(RequestError::Guest)?;
                backend.write_at(buf, offset + pos).map_err(RequestError::Io)?;
                pos += n as u64;
            }
            Ok((0, len))
        }
        T_FLUSH => backend.flush().map(|()| (0, 0)).map_err(RequestError::Io),
        T_GET_ID => {
            let n = (data_writable as usize).min(ID_BYTES);
            if n == 0 {
                return Err(RequestError::NoIdBuffer);
            }
            chain.write_at(mem, 0, &id[..n]).map_err(RequestError::Guest)?;
            Ok((n as u64, 0))
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Checks `len` bytes from `sector` against the disk; returns the byte offset.
fn check_range(backend: &dyn BlockBackend, sector: u64, len: u64) -> Result<u64, RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Alignment { len });
    }
    let capacity = backend.capacity_bytes() / SECTOR_SIZE * SECTOR_SIZE;
    sector
        .checked_mul(SECTOR_SIZE)
        .filter(|&off| off.checked_add(len).is_some_and(|end| end <= capacity))
        .ok_or(RequestError::Range { sector, len, capacity })
}

fn chunk(remaining: u64) -> usize {
    remaining.min(CHUNK as u64) as usize
}

fn bounce_buf(bounce: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if bounce.len() < n {
        bounce.resize(n, 0);
    }
    &mut bounce[..n]
}
