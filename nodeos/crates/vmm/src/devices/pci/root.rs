//! PCI bus 0 behind configuration mechanism 1 (ports 0xCF8 address, 0xCFC data).
//!
//! Device 0 is a host bridge; devices added with [`PciRoot::add_device`] take
//! device numbers 1, 2, ... (function 0 only). Every memory BAR is pre-assigned
//! from [`MMIO32_START`] upward, naturally aligned, with memory decoding on, so
//! guests without firmware find their devices ready. When the guest reprograms a
//! BAR or flips memory decoding, the root moves the BAR's range on the MMIO bus.

use std::sync::{Arc, Mutex};

use super::config::{BAR_COUNT, BAR0, COMMAND, COMMAND_MEMORY, PciConfig, PciIds};
use super::device::{BarWindow, PciDevice, SharedPciDevice};
use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::memory::{MMIO32_END, MMIO32_START};

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
        let slot = &mut self.slots[number];
        let mut dev = slot.device.lock().unwrap_or_else(|p| p.into_inner());
        let decoding = dev.config().memory_enabled();
        let mut first_error = None;
        for bar in 0..BAR_COUNT {
            let Some(spec) = dev.config().bar(bar) else { continue };
            // Address 0 means "unassigned" to firmware and to us.
            let wanted = dev.config().bar_address(bar).filter(|&a| decoding && a != 0);
            let old = slot.mapped[bar];
            if wanted == old {
                continue;
            }
            if let Some(base) = old {
                let _ = self.mmio.remove(base);
            }
            slot.mapped[bar] = None;
            if let Some(addr) = wanted {
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
    use super::*;
    use crate::devices::pci::config::{BarKind, BarSpec, COMMAND_BUS_MASTER};

    type Moves = Arc<Mutex<Vec<(usize, Option<u64>, Option<u64>)>>>;

    /// A function with one 64-bit and one 32-bit BAR that records accesses.
    struct TestFunction {
        config: PciConfig,
        moves: Moves,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for TestFunction {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.config
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8 & 0xf);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
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
        (Arc::new(Mutex::new(TestFunction { config, moves: moves.clone(), last_write: None })), moves)
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
        let f = TestFunction { config, moves: Moves::default(), last_write: None };
        assert!(matches!(root.add_device(Arc::new(Mutex::new(f))), Err(PciError::BarSpace { .. })));
        for _ in 1..MAX_DEVICES {
            let f = TestFunction { config: PciConfig::new(&ids), moves: Moves::default(), last_write: None };
            root.add_device(Arc::new(Mutex::new(f))).unwrap();
        }
        let f = TestFunction { config: PciConfig::new(&ids), moves: Moves::default(), last_write: None };
        assert!(matches!(root.add_device(Arc::new(Mutex::new(f))), Err(PciError::BusFull)));
    }
}
