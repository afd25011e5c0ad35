//! What a PCI function implements to sit on [`super::PciRoot`].

use std::sync::{Arc, Mutex};

use super::config::PciConfig;
use crate::devices::bus::BusDevice;

/// A PCI function with memory BARs.
///
/// Contract with the root (which calls every method under the device's mutex):
/// - configuration reads and writes go to [`PciDevice::config`] /
///   [`PciDevice::config_mut`] through the writable masks; after a write the root
///   calls [`PciDevice::config_written`] so the device can react to its own
///   capability registers (e.g. the MSI-X enable bit);
/// - the root owns BAR placement: it pre-assigns addresses, maps each BAR on the
///   MMIO bus while memory decoding is on, follows guest reprogramming, and tells
///   the device through [`PciDevice::bar_moved`] (used to move doorbells);
/// - MMIO accesses reach [`PciDevice::bar_read`] / [`PciDevice::bar_write`] with an
///   offset inside the BAR; the root guarantees the access lies within the BAR.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;

    /// The guest wrote `len` bytes at `offset` (already applied to the config).
    fn config_written(&mut self, _offset: usize, _len: usize) {}

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// BAR `bar` now decodes at `new` instead of `old` (None = not mapped).
    fn bar_moved(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// One mapped BAR as an MMIO bus device: forwards to the function with the BAR index.
pub(crate) struct BarWindow {
    pub(crate) device: SharedPciDevice,
    pub(crate) bar: usize,
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.device.lock().unwrap_or_else(|p| p.into_inner()).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.device.lock().unwrap_or_else(|p| p.into_inner()).bar_write(self.bar, offset, data);
    }
}
