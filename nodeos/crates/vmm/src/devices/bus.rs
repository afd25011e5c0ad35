//! The port I/O bus and the MMIO bus: address ranges to devices.
//!
//! vCPU threads look up the device for each exit under a read lock and call it
//! under its own mutex; ranges change only when the guest moves a PCI BAR.
//! Accesses to unclaimed addresses read as all ones and drop writes, like an
//! empty bus on real hardware.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the base of the range it was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("range {base:#x}+{len:#x} is empty or wraps around")]
    Range { base: u64, len: u64 },
    #[error("no device at {0:#x}")]
    NotFound(u64),
}

#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, (u64, SharedDevice)>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.ranges.read().map(|r| r.len()).unwrap_or(0);
        f.debug_struct("Bus").field("ranges", &n).finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::Range { base, len });
        }
        let mut r = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        let end = base + len;
        if let Some((b, (l, _))) = r.range(..end).next_back()
            && b + l > base
        {
            return Err(BusError::Overlap { base, len });
        }
        r.insert(base, (len, device));
        Ok(())
    }

    /// Removes the range starting exactly at `base`.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut r = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        r.remove(&base).map(|(_, d)| d).ok_or(BusError::NotFound(base))
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, SharedDevice)> {
        let r = self.ranges.read().unwrap_or_else(|p| p.into_inner());
        let (base, (len, dev)) = r.range(..=addr).next_back()?;
        let off = addr - base;
        // The whole access must fall inside the range.
        (off.checked_add(size as u64)? <= *len).then(|| (off, dev.clone()))
    }

    /// Reads from the device at `addr`; false (and all ones) if none claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock().unwrap_or_else(|p| p.into_inner()).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; false if none claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock().unwrap_or_else(|p| p.into_inner()).write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<u8>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn accesses_route_by_range_and_stay_inside_it() {
        let bus = Bus::new();
        let dev: SharedDevice = Arc::new(Mutex::new(Reg(vec![0; 16])));
        bus.insert(dev.clone(), 0x100, 16).unwrap();
        assert_eq!(bus.insert(dev.clone(), 0x10f, 4), Err(BusError::Overlap { base: 0x10f, len: 4 }));
        assert_eq!(bus.insert(dev.clone(), 0xf8, 9), Err(BusError::Overlap { base: 0xf8, len: 9 }));
        assert!(bus.write(0x104, &[1, 2, 3, 4]));
        let mut b = [0u8; 4];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [1, 2, 3, 4]);
        // Straddling the end of the range is unclaimed.
        assert!(!bus.read(0x10e, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(u64::MAX - 1, &[0; 4]));
        assert!(bus.insert(dev, u64::MAX, 2).is_err());
        bus.remove(0x100).unwrap();
        assert!(!bus.read(0x104, &mut b));
    }
}
