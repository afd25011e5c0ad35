//! [`BlockDevice`]: what a front end (NBD export, virtio-blk, import) sees of a
//! volume, whatever replicates it underneath.
//!
//! Contract, matching virtio-blk and NBD:
//! - Offsets and lengths are in bytes and must be multiples of
//!   [`BlockDevice::block_size`]; `offset + len` must not pass [`BlockDevice::size`].
//!   A request that breaks either rule fails with [`DeviceError::Misaligned`] or
//!   [`DeviceError::OutOfRange`] and changes nothing.
//! - A completed write is visible to every later read. It is durable (survives
//!   power loss of every replica) only once a later [`BlockDevice::flush`] has
//!   completed, or at once when written with `fua`.
//! - `trim` may discard the range (reads then return zeroes); `write_zeroes`
//!   guarantees zeroes.
//! - Writes that overlap and are in flight at the same time land in an
//!   unspecified order, as on any disk.

use std::future::Future;

/// The block size every nodeos volume uses.
pub const BLOCK_SIZE: u32 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("{len} bytes at offset {offset} pass the end of the {size}-byte device")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("offset {offset} and length {len} must be multiples of {block} bytes")]
    Misaligned { offset: u64, len: u64, block: u32 },
    #[error("the device is read-only")]
    ReadOnly,
    /// A newer writer opened the volume; this handle may never write again.
    #[error("volume was opened by a newer writer (generation {current} > ours {ours})")]
    Fenced { ours: u64, current: u64 },
    /// Not enough replicas answered (the request may be retried).
    #[error("not enough replicas: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Io(String),
}

/// A block device: a volume seen by one opener.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes (a multiple of the block size).
    fn size(&self) -> u64;
    fn block_size(&self) -> u32 {
        BLOCK_SIZE
    }
    fn read_only(&self) -> bool;
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Vec<u8>, DeviceError>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), DeviceError>> + Send;
    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), DeviceError>> + Send;
}

/// Checks a request against the device's size and block size.
pub fn check_range(offset: u64, len: u64, size: u64, block: u32) -> Result<(), DeviceError> {
    if !offset.is_multiple_of(u64::from(block)) || !len.is_multiple_of(u64::from(block)) {
        return Err(DeviceError::Misaligned { offset, len, block });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DeviceError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        assert_eq!(check_range(0, 4096, 8192, 4096), Ok(()));
        assert_eq!(check_range(4096, 4096, 8192, 4096), Ok(()));
        assert!(matches!(check_range(4096, 8192, 8192, 4096), Err(DeviceError::OutOfRange { .. })));
        // Overflowing offset + len is out of range, not a wrap-around.
        assert!(matches!(
            check_range(u64::MAX - 4095, 4096, 8192, 4096),
            Err(DeviceError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(u64::MAX - 4095, 8192, u64::MAX, 4096),
            Err(DeviceError::OutOfRange { .. })
        ));
        assert!(matches!(check_range(512, 4096, 8192, 4096), Err(DeviceError::Misaligned { .. })));
        assert!(matches!(check_range(0, 100, 8192, 4096), Err(DeviceError::Misaligned { .. })));
    }
}
