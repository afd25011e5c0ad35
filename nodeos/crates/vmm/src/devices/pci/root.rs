//! PCI bus 0 behind configuration mechanism 1 (ports 0xCF8 address, 0xCFC data).
//!
//! Device 0 is a host bridge; devices added with [`PciRoot::add_device`] take
//! device numbers 1, 2, ... (function 0 only). Every memory BAR is pre-assigned
//! from [`MMIO32_START`] upward, naturally aligned, with memory decoding on, so
//! guests without firmware find their devices ready. When the guest reprograms a
//! BAR or flips memory decoding, the root moves the BAR's range on the MMIO bus.
//!
//! [`PciRoot::save`] / [`PciRoot::restore`] carry the configuration side of the
//! bus across a migration: the address latch and every function's
//! configuration space; restoring maps the BARs where the guest left them.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::config::{BAR_COUNT, BAR0, COMMAND, COMMAND_MEMORY, PciConfig, PciConfigState, PciIds};
use super::device::{BarWindow, PciDevice, SharedPciDevice};
use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::memory::{MMIO32_END, MMIO32_START};
use crate::state::StateError;

/// The address port; the data port is at `PCI_CONFIG_PORT + 4`.
pub const PCI_CONFIG_PORT: u64 = 0xcf8;
/// Ports 0xCF8..=0xCFF.
pub const PCI_CONFIG_LEN: u64 = 8;
/// Device numbers on bus 0 (device 0 is the host bridge).
pub const MAX_DEVICES: usize = 32;

const ENABLE: u32 = 1 << 31;
const BUS_SHIFT: u32 = 16;
const DEVICE_SHIFT: u32 = 11;
const FUNCTION_SHIFT: u32 = 8;
const REGISTER_MASK: u32 = 0xfc;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("bus 0 has no free device number (at most {} devices)", MAX_DEVICES - 1)]
    BusFull,
    #[error("no room for a BAR of {size:#x} bytes in the 32-bit MMIO window")]
    BarSpace { size: u64 },
    #[error("cannot map BAR {bar} at {addr:#x}")]
    BarMap {
        bar: usize,
        addr: u64,
        #[source]
        source: BusError,
    },
}

/// The configuration side of bus 0, as the guest left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciRootState {
    /// The 0xCF8 address latch.
    pub address: u32,
    /// Device 0.
    pub host_bridge: PciConfigState,
    /// Devices 1, 2, ... in order.
    pub devices: Vec<PciSlotState>,
}

/// One device's configuration space and where its BARs were on the MMIO bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciSlotState {
    /// The device's configuration space.
    pub config: PciConfigState,
    /// Per BAR ([`BAR_COUNT`] entries), where it was mapped; `None` when
    /// decoding was off or the BAR was left unmapped because it overlapped
    /// another. A guest caught mid-way through moving a BAR can have two BARs
    /// claiming one range; this says which one won, so the restored bus
    /// answers the same way.
    pub mapped: Vec<Option<u64>>,
}

/// The host bridge at 00:00.0: identity only.
struct HostBridge {
    config: PciConfig,
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

struct Slot {
    device: SharedPciDevice,
    /// Where each BAR is on the MMIO bus right now.
    mapped: [Option<u64>; BAR_COUNT],
}

/// Bus 0 and its configuration ports: insert on the port I/O bus at
/// [`PCI_CONFIG_PORT`], length [`PCI_CONFIG_LEN`].
pub struct PciRoot {
    mmio: Arc<Bus>,
    address: u32,
    slots: Vec<Slot>,
    next_bar: u64,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("address", &format_args!("{:#x}", self.address))
            .field("devices", &self.slots.len())
            .field("next_bar", &format_args!("{:#x}", self.next_bar))
            .finish()
    }
}

impl PciRoot {
    /// Host bridge identity: Intel, class "host bridge".
    pub const HOST_BRIDGE: PciIds = PciIds {
        vendor: 0x8086,
        device: 0x0d57,
        revision: 0,
        class: 0x06_00_00,
        subsystem_vendor: 0,
        subsystem: 0,
    };

    /// A bus whose BARs are mapped on `mmio`.
    pub fn new(mmio: Arc<Bus>) -> Self {
        let bridge: SharedPciDevice =
            Arc::new(Mutex::new(HostBridge { config: PciConfig::new(&Self::HOST_BRIDGE) }));
        Self {
            mmio,
            address: 0,
            slots: vec![Slot { device: bridge, mapped: [None; BAR_COUNT] }],
            next_bar: MMIO32_START,
        }
    }

    /// Adds a function at the next device number (returned), assigns its BARs,
    /// enables memory decoding and maps the BARs.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<u8, PciError> {
        if self.slots.len() >= MAX_DEVICES {
            return Err(PciError::BusFull);
        }
        let mut next = self.next_bar;
        {
            let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
            for bar in 0..BAR_COUNT {
                let Some(spec) = dev.config().bar(bar) else { continue };
                let base = next.next_multiple_of(spec.size);
                let end = base.checked_add(spec.size).filter(|&e| e <= MMIO32_END);
                let Some(end) = end else { return Err(PciError::BarSpace { size: spec.size }) };
                dev.config_mut().set_bar_address(bar, base);
                next = end;
            }
            let command = dev.config().command() | COMMAND_MEMORY;
            dev.config_mut().set_command(command);
        }
        self.next_bar = next;
        let number = self.slots.len();
        self.slots.push(Slot { device, mapped: [None; BAR_COUNT] });
        if let Err(e) = self.sync_bars(number) {
            // Leave the bus as it was.
            if let Some(slot) = self.slots.pop() {
                for base in slot.mapped.into_iter().flatten() {
                    let _ = self.mmio.remove(base);
                }
            }
            return Err(e);
        }
        Ok(number as u8)
    }

    /// The function at `device` (0 is the host bridge).
    pub fn device(&self, device: u8) -> Option<SharedPciDevice> {
        self.slots.get(usize::from(device)).map(|s| s.device.clone())
    }

    /// Brings the MMIO bus in line with what slot `number` decodes now.
    fn sync_bars(&mut self, number: usize) -> Result<(), PciError> {
        // Unmapping everything that moves before mapping anything lets BARs
        // trade places.
        let removed = self.unmap_stale(number, |_| true);
        self.map_wanted(number, &removed, |_| true)
    }

    /// First half of a sync: takes off the bus each BAR of slot `number` that
    /// is mapped where it does not decode now, or that `keep` rejects. Returns
    /// where each removed BAR was, for [`PciRoot::map_wanted`].
    fn unmap_stale(&mut self, number: usize, keep: impl Fn(usize) -> bool) -> [Option<u64>; BAR_COUNT] {
        let slot = &mut self.slots[number];
        let dev = slot.device.lock().unwrap_or_else(|p| p.into_inner());
        let mut removed = [None; BAR_COUNT];
        for (bar, (mapped, removed)) in slot.mapped.iter_mut().zip(&mut removed).enumerate() {
            let Some(base) = *mapped else { continue };
            if decoded_at(dev.config(), bar) != Some(base) || !keep(bar) {
                let _ = self.mmio.remove(base);
                *mapped = None;
                *removed = Some(base);
            }
        }
        removed
    }

    /// Second half of a sync, for the BARs `select` picks: maps each one that
    /// decodes but is not on the bus, and tells the device about every BAR
    /// whose place changed since before [`PciRoot::unmap_stale`] (`removed`).
    fn map_wanted(
        &mut self,
        number: usize,
        removed: &[Option<u64>; BAR_COUNT],
        select: impl Fn(usize) -> bool,
    ) -> Result<(), PciError> {
        let slot = &mut self.slots[number];
        let mut dev = slot.device.lock().unwrap_or_else(|p| p.into_inner());
        let mut first_error = None;
        for bar in (0..BAR_COUNT).filter(|&bar| select(bar)) {
            let Some(spec) = dev.config().bar(bar) else { continue };
            let old = removed[bar].or(slot.mapped[bar]);
            if slot.mapped[bar].is_none()
                && let Some(addr) = decoded_at(dev.config(), bar)
            {
                let window = Arc::new(Mutex::new(BarWindow { device: slot.device.clone(), bar }));
                match self.mmio.insert(window, addr, spec.size) {
                    Ok(()) => slot.mapped[bar] = Some(addr),
                    Err(source) => {
                        // A guest may place a BAR over another one (or mid-way through a
                        // 64-bit update); it stays unmapped until the guest fixes it.
                        tracing::debug!(bar, addr, error = %source, "PCI BAR left unmapped");
                        first_error.get_or_insert(PciError::BarMap { bar, addr, source });
                    }
                }
            }
            if old != slot.mapped[bar] {
                dev.bar_moved(bar, old, slot.mapped[bar]);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The address latch and every function's configuration space. The
    /// functions' own state (virtio transport registers, MSI-X table) is not
    /// here: each owner saves it; the virtio transport calls
    /// [`super::Msix::save`] / [`super::Msix::restore`] itself.
    pub fn save(&self) -> PciRootState {
        let config = |slot: &Slot| slot.device.lock().unwrap_or_else(|p| p.into_inner()).config().save();
        let (bridge, devices) = self.slots.split_first().expect("slot 0 is the host bridge, made by new()");
        PciRootState {
            address: self.address,
            host_bridge: config(bridge),
            devices: devices
                .iter()
                .map(|slot| PciSlotState { config: config(slot), mapped: slot.mapped.to_vec() })
                .collect(),
        }
    }

    /// Loads a state saved from a bus built from the same configuration (the
    /// same devices added in the same order), then maps every BAR that
    /// decodes at its restored address, through the same logic that follows
    /// a guest's writes: a BAR whose place changes is moved on the MMIO bus
    /// and its device told through [`PciDevice::bar_moved`] (the virtio
    /// transport moves its doorbells there). A BAR already mapped at its
    /// restored address, such as an untouched pre-assignment, stays, and its
    /// device was told when it was mapped.
    ///
    /// Only configuration space changes, and [`PciDevice::config_written`] is
    /// not called: the devices' own state, including the MSI-X table and its
    /// enable bits, is restored by their owners (the virtio transport calls
    /// [`super::Msix::restore`] itself), in either order.
    ///
    /// Refused, with the bus unchanged, if the device count differs, a
    /// device's configuration space does not fit it (see
    /// [`PciConfig::restore`]), or a BAR is said to be mapped where its
    /// registers do not decode.
    pub fn restore(&mut self, state: PciRootState) -> Result<(), StateError> {
        let err = |reason: String| StateError::new("pci", reason);
        let here = self.slots.len() - 1;
        if state.devices.len() != here {
            return Err(err(format!("{} devices saved, this bus has {here}", state.devices.len())));
        }
        let no_bars = vec![None; BAR_COUNT];
        let saved = std::iter::once((state.host_bridge, no_bars))
            .chain(state.devices.into_iter().map(|d| (d.config, d.mapped)));
        // Every check runs on copies before anything changes.
        let mut configs = Vec::with_capacity(self.slots.len());
        let mut hints = Vec::with_capacity(self.slots.len());
        for (number, (slot, (config, mapped))) in self.slots.iter().zip(saved).enumerate() {
            let mut staged = slot.device.lock().unwrap_or_else(|p| p.into_inner()).config().clone();
            staged.restore(config).map_err(|e| err(format!("device {number}: {}", e.reason)))?;
            if mapped.len() != BAR_COUNT {
                return Err(err(format!(
                    "device {number}: {} BAR placements, a function has {BAR_COUNT}",
                    mapped.len()
                )));
            }
            let mut hint = [None; BAR_COUNT];
            for (bar, at) in mapped.into_iter().enumerate() {
                let decodes = decoded_at(&staged, bar);
                if at.is_some() && at != decodes {
                    return Err(err(format!(
                        "device {number} BAR {bar}: mapped at {} but its registers decode at {}",
                        place(at),
                        place(decodes)
                    )));
                }
                hint[bar] = at;
            }
            configs.push(staged);
            hints.push(hint);
        }

        for (slot, staged) in self.slots.iter().zip(configs) {
            *slot.device.lock().unwrap_or_else(|p| p.into_inner()).config_mut() = staged;
        }
        self.address = state.address;
        // The BARs that were on the source's bus go on first, so a BAR that
        // lost an overlap there loses it here too.
        let removed: Vec<_> = hints
            .iter()
            .enumerate()
            .map(|(number, h)| self.unmap_stale(number, |bar| h[bar].is_some()))
            .collect();
        for (number, h) in hints.iter().enumerate() {
            if let Err(e) = self.map_wanted(number, &removed[number], |bar| h[bar].is_some()) {
                tracing::warn!(device = number, error = %e, "PCI BAR mapped on the source is not mapped here");
            }
        }
        for (number, h) in hints.iter().enumerate() {
            // Failures here repeat the source's, already logged by map_wanted.
            let _ = self.map_wanted(number, &removed[number], |bar| h[bar].is_none());
        }
        Ok(())
    }

    /// (device number, register offset) the address register selects, if it
    /// selects a present function on bus 0.
    fn selected(&self) -> Option<(usize, usize)> {
        let a = self.address;
        if a & ENABLE == 0 || (a >> BUS_SHIFT) & 0xff != 0 || (a >> FUNCTION_SHIFT) & 0x7 != 0 {
            return None;
        }
        let device = ((a >> DEVICE_SHIFT) & 0x1f) as usize;
        (device < self.slots.len()).then_some((device, (a & REGISTER_MASK) as usize))
    }

    fn config_read(&self, byte: usize, data: &mut [u8]) {
        let Some((device, reg)) = self.selected() else {
            data.fill(0xff);
            return;
        };
        let dev = self.slots[device].device.lock().unwrap_or_else(|p| p.into_inner());
        dev.config().read(reg + byte, data);
    }

    fn config_write(&mut self, byte: usize, data: &[u8]) {
        let Some((device, reg)) = self.selected() else { return };
        let offset = reg + byte;
        {
            let mut dev = self.slots[device].device.lock().unwrap_or_else(|p| p.into_inner());
            dev.config_mut().write(offset, data);
            dev.config_written(offset, data.len());
        }
        let touches = |lo: usize, hi: usize| offset < hi && offset + data.len() > lo;
        if touches(COMMAND, COMMAND + 2) || touches(BAR0, BAR0 + 4 * BAR_COUNT) {
            // Failures are logged and leave the BAR unmapped; the guest sees an empty range.
            let _ = self.sync_bars(device);
        }
    }
}

/// Where BAR `bar` of `config` decodes: its programmed address while memory
/// decoding is on. Address 0 means "unassigned" to firmware and to us.
fn decoded_at(config: &PciConfig, bar: usize) -> Option<u64> {
    config.bar_address(bar).filter(|&a| config.memory_enabled() && a != 0)
}

fn place(at: Option<u64>) -> String {
    at.map_or_else(|| "nowhere".to_string(), |a| format!("{a:#x}"))
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        match offset {
            0..4 if offset + len <= 4 => {
                let bytes = self.address.to_le_bytes();
                data.copy_from_slice(&bytes[offset as usize..(offset + len) as usize]);
            }
            4..8 if offset + len <= 8 => self.config_read((offset - 4) as usize, data),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        match offset {
            // Only a full dword sets the address; byte writes to 0xCFB (an old
            // chipset's mechanism select, probed by Linux) are ignored.
            0 if len == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            4..8 if offset + len <= 8 => self.config_write((offset - 4) as usize, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::devices::interrupt::{InterruptError, MsiMessage, MsiVectors};
    use crate::devices::pci::config::{BarKind, BarSpec, COMMAND_BUS_MASTER};
    use crate::devices::pci::msix::{MSIX_CONTROL, Msix, MsixState};
    use crate::devices::testing::FakeMsi;

    type Moves = Arc<Mutex<Vec<(usize, Option<u64>, Option<u64>)>>>;

    /// A function with one 64-bit and one 32-bit BAR that records accesses;
    /// optionally with MSI-X, its table at 0 and PBA at [`PBA`] in BAR 2.
    struct TestFunction {
        config: PciConfig,
        moves: Moves,
        last_write: Option<(usize, u64, Vec<u8>)>,
        /// The MSI-X state and its capability's offset.
        msix: Option<(Arc<Msix>, usize)>,
    }

    const PBA: u64 = 0x800;

    impl PciDevice for TestFunction {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.config
        }
        fn config_written(&mut self, offset: usize, len: usize) {
            if let Some((msix, cap)) = &self.msix
                && offset < cap + MSIX_CONTROL + 2
                && offset + len > cap + MSIX_CONTROL
            {
                msix.set_control(self.config.read_u16(cap + MSIX_CONTROL));
            }
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            match &self.msix {
                Some((msix, _)) if bar == 2 && offset < PBA => msix.read_table(offset, data),
                Some((msix, _)) if bar == 2 => msix.read_pba(offset - PBA, data),
                _ => data.fill((bar as u8) << 4 | offset as u8 & 0xf),
            }
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            if let Some((msix, _)) = &self.msix
                && bar == 2
                && offset < PBA
            {
                msix.write_table(offset, data);
            }
            self.last_write = Some((bar, offset, data.to_vec()));
        }
        fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
            self.moves.lock().unwrap().push((bar, old, new));
        }
    }

    fn function() -> (Arc<Mutex<TestFunction>>, Moves) {
        let ids = PciIds {
            vendor: 0x1af4,
            device: 0x1041,
            revision: 1,
            class: 0x020000,
            subsystem_vendor: 0,
            subsystem: 0,
        };
        let mut config = PciConfig::new(&ids);
        config.add_bar(0, BarSpec { size: 0x8000, kind: BarKind::Memory64, prefetchable: false }).unwrap();
        config.add_bar(2, BarSpec { size: 0x1000, kind: BarKind::Memory32, prefetchable: false }).unwrap();
        let moves = Moves::default();
        let f = TestFunction { config, moves: moves.clone(), last_write: None, msix: None };
        (Arc::new(Mutex::new(f)), moves)
    }

    /// [`function`] with two MSI-X vectors over `vectors`.
    fn msix_function(vectors: Arc<dyn MsiVectors>) -> (Arc<Mutex<TestFunction>>, Moves, Arc<Msix>) {
        let (f, moves) = function();
        let msix = Arc::new(Msix::new(vectors));
        {
            let mut f = f.lock().unwrap();
            let (body, mask) = msix.capability(2, 0, 2, PBA as u32);
            let cap = f.config.add_capability(&body, &mask).unwrap();
            f.msix = Some((msix.clone(), cap));
        }
        (f, moves, msix)
    }

    /// Counts the routing updates the MSI-X layer pushes.
    #[derive(Debug)]
    struct CountingMsi {
        inner: Arc<FakeMsi>,
        routes: AtomicUsize,
    }

    impl CountingMsi {
        fn new(count: u16) -> Arc<Self> {
            Arc::new(Self { inner: FakeMsi::new(count), routes: AtomicUsize::new(0) })
        }
        fn routes(&self) -> usize {
            self.routes.load(Ordering::SeqCst)
        }
    }

    impl MsiVectors for CountingMsi {
        fn count(&self) -> u16 {
            self.inner.count()
        }
        fn configure(&self, vector: u16, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
            self.routes.fetch_add(1, Ordering::SeqCst);
            self.inner.configure(vector, msg)
        }
        fn trigger(&self, vector: u16) -> Result<(), InterruptError> {
            self.inner.trigger(vector)
        }
    }

    fn addr(device: u32, reg: u32) -> u32 {
        ENABLE | device << DEVICE_SHIFT | reg
    }

    fn read32(root: &mut PciRoot, device: u32, reg: u32) -> u32 {
        root.write(0, &addr(device, reg).to_le_bytes());
        let mut b = [0u8; 4];
        root.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(root: &mut PciRoot, device: u32, reg: u32, v: u32) {
        root.write(0, &addr(device, reg).to_le_bytes());
        root.write(4, &v.to_le_bytes());
    }

    fn setup() -> (PciRoot, Arc<Bus>, Arc<Mutex<TestFunction>>, Moves) {
        let mmio = Arc::new(Bus::new());
        let mut root = PciRoot::new(mmio.clone());
        let (f, moves) = function();
        assert_eq!(root.add_device(f.clone()).unwrap(), 1);
        (root, mmio, f, moves)
    }

    #[test]
    fn mechanism_1_reads_ids_and_absent_functions() {
        let (mut root, _mmio, _f, _moves) = setup();
        assert_eq!(read32(&mut root, 0, 0), 0x0d57_8086);
        assert_eq!(read32(&mut root, 0, 8) >> 8, 0x060000);
        assert_eq!(read32(&mut root, 1, 0), 0x1041_1af4);
        assert_eq!(read32(&mut root, 2, 0), 0xffff_ffff);
        assert_eq!(read32(&mut root, 31, 0), 0xffff_ffff);
        // Function 1, bus 1, and a disabled address all read as absent.
        root.write(0, &(addr(1, 0) | 1 << FUNCTION_SHIFT).to_le_bytes());
        let mut b = [0u8; 4];
        root.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        root.write(0, &(addr(1, 0) | 1 << BUS_SHIFT).to_le_bytes());
        root.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        root.write(0, &(addr(1, 0) & !ENABLE).to_le_bytes());
        root.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        // The address register reads back; Linux's byte write to 0xCFB is ignored.
        root.write(0, &0x8000_0000u32.to_le_bytes());
        root.write(3, &[0x01]);
        root.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
    }

    #[test]
    fn byte_and_word_accesses_on_the_data_port() {
        let (mut root, _mmio, _f, _moves) = setup();
        root.write(0, &addr(1, 0).to_le_bytes());
        let mut w = [0u8; 2];
        root.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1041);
        let mut b = [0u8; 1];
        root.read(5, &mut b);
        assert_eq!(b, [0x1a]);
        // A word straddling the end of the data port is not decoded.
        root.read(7, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        // Interrupt line via a byte write at 0xCFC.
        root.write(0, &addr(1, 0x3c).to_le_bytes());
        root.write(4, &[11]);
        assert_eq!(read32(&mut root, 1, 0x3c) & 0xff, 11);
    }

    #[test]
    fn bars_are_preassigned_aligned_and_mapped() {
        let (mut root, mmio, f, moves) = setup();
        let bar0 = read32(&mut root, 1, 0x10);
        assert_eq!(bar0, MMIO32_START as u32 | 0b100);
        assert_eq!(read32(&mut root, 1, 0x14), 0);
        let bar2 = read32(&mut root, 1, 0x18);
        assert_eq!(u64::from(bar2), MMIO32_START + 0x8000);
        assert_ne!(read32(&mut root, 1, 4) & u32::from(COMMAND_MEMORY), 0);
        assert_eq!(
            moves.lock().unwrap().as_slice(),
            &[(0, None, Some(MMIO32_START)), (2, None, Some(MMIO32_START + 0x8000))]
        );

        let mut b = [0u8; 4];
        assert!(mmio.read(MMIO32_START + 0x8003, &mut b));
        assert_eq!(b, [0x23; 4]);
        assert!(mmio.write(MMIO32_START + 0x10, &[1, 2]));
        assert_eq!(f.lock().unwrap().last_write, Some((0, 0x10, vec![1, 2])));

        // A second device continues upward, naturally aligned.
        let (g, _) = function();
        assert_eq!(root.add_device(g).unwrap(), 2);
        assert_eq!(u64::from(read32(&mut root, 2, 0x10) & !0xf), MMIO32_START + 0x10000);
    }

    #[test]
    fn sizing_and_moving_a_bar() {
        let (mut root, mmio, _f, moves) = setup();
        moves.lock().unwrap().clear();
        // Linux: decoding off, probe, restore, decoding on.
        let cmd = read32(&mut root, 1, 4);
        write32(&mut root, 1, 4, cmd & !u32::from(COMMAND_MEMORY));
        assert!(!mmio.read(MMIO32_START, &mut [0u8; 4]));
        write32(&mut root, 1, 0x10, 0xffff_ffff);
        write32(&mut root, 1, 0x14, 0xffff_ffff);
        assert_eq!(read32(&mut root, 1, 0x10), 0xffff_8004);
        assert_eq!(read32(&mut root, 1, 0x14), 0xffff_ffff);
        // Move BAR 0 above 4 GiB.
        write32(&mut root, 1, 0x10, 0x0000_0000);
        write32(&mut root, 1, 0x14, 0x0000_0010);
        write32(&mut root, 1, 4, cmd | u32::from(COMMAND_BUS_MASTER));
        let mut b = [0u8; 1];
        assert!(mmio.read(0x10_0000_0001, &mut b));
        assert_eq!(b, [0x01]);
        assert!(!mmio.read(MMIO32_START, &mut b));
        assert!(mmio.read(MMIO32_START + 0x8000, &mut b));
        let m = moves.lock().unwrap().clone();
        assert_eq!(m[0], (0, Some(MMIO32_START), None));
        assert_eq!(m[1], (2, Some(MMIO32_START + 0x8000), None));
        assert!(m.contains(&(0, None, Some(0x10_0000_0000))));
        assert_eq!(*m.last().unwrap(), (2, None, Some(MMIO32_START + 0x8000)));

        // Moving onto the other BAR fails quietly and leaves it unmapped; moving
        // away again maps it.
        write32(&mut root, 1, 0x14, 0);
        write32(&mut root, 1, 0x10, 0xd000_0000);
        write32(&mut root, 1, 0x18, 0xd000_1000);
        assert!(mmio.read(0xd000_1001, &mut b));
        assert_eq!(b, [0x01], "BAR 0 still answers there");
        write32(&mut root, 1, 0x18, 0xd001_0000);
        assert!(mmio.read(0xd001_0000, &mut b));
        assert_eq!(b, [0x20]);
    }

    #[test]
    fn the_window_runs_out() {
        let mmio = Arc::new(Bus::new());
        let mut root = PciRoot::new(mmio);
        let ids = PciIds { vendor: 1, device: 2, revision: 0, class: 0, subsystem_vendor: 0, subsystem: 0 };
        let mut config = PciConfig::new(&ids);
        config.add_bar(0, BarSpec { size: 1 << 31, kind: BarKind::Memory32, prefetchable: false }).unwrap();
        let f = TestFunction { config, moves: Moves::default(), last_write: None, msix: None };
        assert!(matches!(root.add_device(Arc::new(Mutex::new(f))), Err(PciError::BarSpace { .. })));
        for _ in 1..MAX_DEVICES {
            let f = TestFunction {
                config: PciConfig::new(&ids),
                moves: Moves::default(),
                last_write: None,
                msix: None,
            };
            root.add_device(Arc::new(Mutex::new(f))).unwrap();
        }
        let f = TestFunction {
            config: PciConfig::new(&ids),
            moves: Moves::default(),
            last_write: None,
            msix: None,
        };
        assert!(matches!(root.add_device(Arc::new(Mutex::new(f))), Err(PciError::BusFull)));
    }

    /// One side of a migration: a plain function at 1 and an MSI-X function at 2.
    struct Tree {
        root: PciRoot,
        mmio: Arc<Bus>,
        f1: Arc<Mutex<TestFunction>>,
        moves1: Moves,
        moves2: Moves,
        msix: Arc<Msix>,
        vectors: Arc<CountingMsi>,
    }

    /// Where `add_device` puts the BARs: f1 BAR 0, f1 BAR 2, f2 BAR 0, f2 BAR 2.
    const F1_BAR0: u64 = MMIO32_START;
    const F1_BAR2: u64 = MMIO32_START + 0x8000;
    const F2_BAR0: u64 = MMIO32_START + 0x10000;
    const F2_BAR2: u64 = MMIO32_START + 0x18000;

    fn tree() -> Tree {
        let mmio = Arc::new(Bus::new());
        let mut root = PciRoot::new(mmio.clone());
        let (f1, moves1) = function();
        let vectors = CountingMsi::new(2);
        let (f2, moves2, msix) = msix_function(vectors.clone());
        assert_eq!(root.add_device(f1.clone()).unwrap(), 1);
        assert_eq!(root.add_device(f2).unwrap(), 2);
        moves1.lock().unwrap().clear();
        moves2.lock().unwrap().clear();
        Tree { root, mmio, f1, moves1, moves2, msix, vectors }
    }

    /// What a guest driver leaves behind: f1's BARs moved (BAR 0 above 4 GiB),
    /// f2's BAR 2 moved, MSI-X enabled with entry 0 live and entry 1 masked
    /// and pending, the address latch pointing at f2's interrupt line.
    fn program(t: &mut Tree) {
        let cap = t.msix_cap();
        let root = &mut t.root;
        let cmd = read32(root, 1, 4);
        write32(root, 1, 4, cmd & !u32::from(COMMAND_MEMORY));
        write32(root, 1, 0x10, 0);
        write32(root, 1, 0x14, 0x10);
        write32(root, 1, 0x18, 0xd000_0000);
        write32(root, 1, 4, cmd | u32::from(COMMAND_BUS_MASTER));
        write32(root, 1, 0x3c, 11);
        write32(root, 2, 0x18, 0xd001_0000);
        write32(root, 2, cap as u32, u32::from(1u16 << 15) << 16);
        let entry = |v: u64, data: u32, masked: bool| {
            let base = 0xd001_0000 + 16 * v;
            assert!(t.mmio.write(base, &0xfee0_0000u32.to_le_bytes()));
            assert!(t.mmio.write(base + 8, &data.to_le_bytes()));
            assert!(t.mmio.write(base + 12, &u32::from(masked).to_le_bytes()));
        };
        entry(0, 0x41, false);
        entry(1, 0x42, true);
        t.msix.trigger(1).unwrap();
        write32(root, 2, 0x3c, 9);
    }

    impl Tree {
        fn msix_cap(&self) -> usize {
            let cap = self.root.device(2).unwrap().lock().unwrap().config().read_u8(0x34);
            usize::from(cap)
        }
    }

    fn latch(root: &mut PciRoot) -> u32 {
        let mut b = [0u8; 4];
        root.read(0, &mut b);
        u32::from_le_bytes(b)
    }

    fn config_dump(root: &mut PciRoot) -> Vec<u32> {
        (0..3).flat_map(|d| (0..64).map(move |r| (d, 4 * r))).map(|(d, r)| read32(root, d, r)).collect()
    }

    #[test]
    fn restore_reproduces_config_and_bar_mapping() {
        let mut src = tree();
        program(&mut src);
        let saved = src.root.save();
        let saved_msix = src.msix.save();
        let wire = serde_json::to_string(&(&saved, &saved_msix)).unwrap();

        let mut dst = tree();
        let (state, msix_state): (PciRootState, MsixState) = serde_json::from_str(&wire).unwrap();
        dst.root.restore(state).unwrap();
        dst.msix.restore(msix_state).unwrap();

        assert_eq!(dst.root.save(), saved);
        assert_eq!(latch(&mut dst.root), latch(&mut src.root));
        assert_eq!(config_dump(&mut dst.root), config_dump(&mut src.root));

        // BARs answer at the restored addresses, and only there.
        let mut b = [0u8; 1];
        assert!(dst.mmio.read(0x10_0000_0001, &mut b));
        assert_eq!(b, [0x01]);
        assert!(dst.mmio.read(0xd000_0002, &mut b));
        assert_eq!(b, [0x22]);
        assert!(dst.mmio.write(0x10_0000_0010, &[7]));
        assert_eq!(dst.f1.lock().unwrap().last_write, Some((0, 0x10, vec![7])));
        assert!(dst.mmio.read(F2_BAR0, &mut b), "untouched pre-assignment stays");
        for gone in [F1_BAR0, F1_BAR2, F2_BAR2] {
            assert!(!dst.mmio.read(gone, &mut b), "{gone:#x} still mapped");
        }
        // The devices were told, as on the source (which moved BAR 0 in two steps).
        assert_eq!(
            dst.moves1.lock().unwrap().as_slice(),
            &[(0, Some(F1_BAR0), Some(0x10_0000_0000)), (2, Some(F1_BAR2), Some(0xd000_0000))]
        );
        assert_eq!(dst.moves2.lock().unwrap().as_slice(), &[(2, Some(F2_BAR2), Some(0xd001_0000))]);

        // MSI-X, restored by its owner: entry 0 routed once, entry 1 still pending,
        // the table readable through the restored BAR.
        assert_eq!(dst.vectors.routes(), 1);
        let msg = MsiMessage { addr_lo: 0xfee0_0000, addr_hi: 0, data: 0x41 };
        assert_eq!(dst.vectors.inner.configured(0), Some(msg));
        assert_eq!(dst.vectors.inner.configured(1), None);
        let mut w = [0u8; 4];
        assert!(dst.mmio.read(0xd001_0000 + 16 + 8, &mut w));
        assert_eq!(u32::from_le_bytes(w), 0x42);
        assert!(dst.mmio.read(0xd001_0000 + PBA, &mut w));
        assert_eq!(w, [0b10, 0, 0, 0]);
        // Unmasking entry 1 on the new host delivers its pending interrupt.
        assert!(dst.mmio.write(0xd001_0000 + 16 + 12, &0u32.to_le_bytes()));
        assert_eq!(dst.vectors.inner.triggers(), vec![1]);
        assert_eq!(dst.vectors.routes(), 2);
    }

    #[test]
    fn restore_follows_decoding_turned_off() {
        let mut src = tree();
        let cmd = read32(&mut src.root, 1, 4);
        write32(&mut src.root, 1, 4, cmd & !u32::from(COMMAND_MEMORY));
        let mut dst = tree();
        dst.root.restore(src.root.save()).unwrap();
        let mut b = [0u8; 1];
        assert!(!dst.mmio.read(F1_BAR0, &mut b));
        assert!(!dst.mmio.read(F1_BAR2, &mut b));
        assert!(dst.mmio.read(F2_BAR0, &mut b));
        assert_eq!(
            dst.moves1.lock().unwrap().as_slice(),
            &[(0, Some(F1_BAR0), None), (2, Some(F1_BAR2), None)]
        );
        assert!(dst.moves2.lock().unwrap().is_empty());
    }

    #[test]
    fn restore_keeps_the_winner_of_an_overlap() {
        // The guest moved f1's BAR 2 onto f2's: f2 keeps the range, f1's BAR 2
        // is left unmapped. Mapped in slot order, f1 would win on the destination.
        let mut src = tree();
        write32(&mut src.root, 1, 0x18, F2_BAR2 as u32);
        assert!(src.mmio.write(F2_BAR2 + 4, &[1]));
        assert_eq!(src.f1.lock().unwrap().last_write, None);
        let saved = src.root.save();
        assert_eq!(saved.devices[0].mapped[2], None);

        let mut dst = tree();
        dst.root.restore(saved).unwrap();
        assert!(dst.mmio.write(F2_BAR2 + 4, &[1]));
        assert_eq!(dst.f1.lock().unwrap().last_write, None, "f2 answers, as on the source");
        assert_eq!(dst.moves1.lock().unwrap().as_slice(), &[(2, Some(F1_BAR2), None)]);
        // Moving f1's BAR 2 away maps it again.
        write32(&mut dst.root, 1, 0x18, 0xd000_0000);
        assert!(dst.mmio.write(0xd000_0004, &[1]));
        assert_eq!(dst.f1.lock().unwrap().last_write, Some((2, 4, vec![1])));
    }

    #[test]
    fn restore_refuses_another_tree_and_changes_nothing() {
        let mut src = tree();
        program(&mut src);
        let good = src.root.save();
        let mut dst = tree();
        let before = dst.root.save();
        let refuse = |dst: &mut Tree, edit: &dyn Fn(&mut PciRootState), why: &str| {
            let mut state = good.clone();
            edit(&mut state);
            let e = dst.root.restore(state).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        };
        refuse(&mut dst, &|s| drop(s.devices.pop()), "1 devices saved, this bus has 2");
        refuse(&mut dst, &|s| s.devices.push(s.devices[0].clone()), "3 devices saved");
        refuse(&mut dst, &|s| s.devices[1].config.bytes[0] = 0x86, "device 2: vendor id");
        refuse(&mut dst, &|s| s.host_bridge.bytes[2] = 0, "device 0: device id");
        refuse(&mut dst, &|s| s.devices[0].config.bytes[0x19] |= 0x01, "device 1: BAR 2 address 0xd0000100");
        refuse(
            &mut dst,
            &|s| s.devices[1].config.bytes.truncate(255),
            "device 2: configuration space of 255",
        );
        refuse(&mut dst, &|s| s.devices[0].mapped.truncate(2), "device 1: 2 BAR placements");
        refuse(
            &mut dst,
            &|s| s.devices[0].mapped[2] = Some(0xe000_0000),
            "device 1 BAR 2: mapped at 0xe0000000 but its registers decode at 0xd0000000",
        );
        refuse(&mut dst, &|s| s.devices[0].mapped[1] = Some(0), "device 1 BAR 1: mapped at 0x0");
        assert_eq!(dst.root.save(), before);
        assert!(dst.moves1.lock().unwrap().is_empty() && dst.moves2.lock().unwrap().is_empty());
        let mut b = [0u8; 1];
        for addr in [F1_BAR0, F1_BAR2, F2_BAR0, F2_BAR2] {
            assert!(dst.mmio.read(addr, &mut b), "{addr:#x} unmapped by a refused restore");
        }

        // The MSI-X state is refused the same way, before any route is pushed.
        let mut short = src.msix.save();
        short.entries.pop();
        assert!(dst.msix.restore(short).unwrap_err().to_string().contains("1 table entries"));
        assert_eq!(dst.vectors.routes(), 0);
        dst.root.restore(good).unwrap();
    }
}
