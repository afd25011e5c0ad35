//! A type-0 PCI configuration space: 256 bytes, a writable-bit mask per byte,
//! memory BARs and a capability list.
//!
//! Every guest write goes through the mask, so read-only fields (ids, class, the
//! BAR type bits, capability ids and links) cannot change. A BAR's low bits
//! below its size are not writable either, which makes the standard size probe
//! work by itself: writing all ones reads back the size mask.

/// Bytes of configuration space (no PCIe extended space).
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Base address registers in a type-0 header.
pub const BAR_COUNT: usize = 6;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const CLASS_PROG_IF: usize = 0x09;
pub const CACHE_LINE_SIZE: usize = 0x0c;
pub const LATENCY_TIMER: usize = 0x0d;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

/// Command register: I/O space decoding.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus mastering (DMA and MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_PARITY: u16 = 1 << 6;
const COMMAND_SERR: u16 = 1 << 8;
/// Command register: legacy INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const COMMAND_WRITABLE: u16 =
    COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_PARITY | COMMAND_SERR | COMMAND_INTX_DISABLE;
const STATUS_CAPABILITIES: u16 = 1 << 4;

const BAR_MEM_64: u32 = 0b10 << 1;
const BAR_MEM_PREFETCH: u32 = 1 << 3;
const BAR_MEM_FLAGS: u32 = 0xf;
/// Capabilities start right after the header.
const FIRST_CAPABILITY: usize = 0x40;

/// Identity of a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// `class << 16 | subclass << 8 | prog_if`.
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Memory32,
    Memory64,
}

/// A memory BAR as the device declares it; its address is chosen by the VMM
/// (and maybe moved by the guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    /// A power of two, at least 4 KiB.
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciConfigError {
    #[error("BAR {index} does not exist (0..{BAR_COUNT}, a 64-bit BAR takes two slots)")]
    BarIndex { index: usize },
    #[error("BAR size {size:#x} is not a power of two in 4 KiB..=2 GiB (32-bit) or ..=2^40 (64-bit)")]
    BarSize { size: u64 },
    #[error("BAR {index} is already declared")]
    BarTaken { index: usize },
    #[error("capability of {len} bytes does not fit in configuration space")]
    CapabilitySpace { len: usize },
    #[error(
        "capability body of {len} bytes and mask of {mask} bytes are not a valid pair (at least 2 bytes)"
    )]
    CapabilityShape { len: usize, mask: usize },
}

/// One function's configuration space.
#[derive(Clone)]
pub struct PciConfig {
    data: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<BarSpec>; BAR_COUNT],
    /// Where the next capability goes, and the byte that must point at it.
    next_capability: usize,
    last_link: usize,
}

impl std::fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfig")
            .field("vendor", &format_args!("{:#06x}", self.read_u16(VENDOR_ID)))
            .field("device", &format_args!("{:#06x}", self.read_u16(DEVICE_ID)))
            .field("bars", &self.bars)
            .finish()
    }
}

impl PciConfig {
    pub fn new(ids: &PciIds) -> Self {
        let mut c = Self {
            data: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
            bars: [None; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_link: CAPABILITIES_POINTER,
        };
        c.set_u16(VENDOR_ID, ids.vendor);
        c.set_u16(DEVICE_ID, ids.device);
        c.data[REVISION_ID] = ids.revision;
        c.data[CLASS_PROG_IF] = ids.class as u8;
        c.data[CLASS_PROG_IF + 1] = (ids.class >> 8) as u8;
        c.data[CLASS_PROG_IF + 2] = (ids.class >> 16) as u8;
        c.data[HEADER_TYPE] = 0;
        c.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.set_u16(SUBSYSTEM_ID, ids.subsystem);
        c.set_wmask_u16(COMMAND, COMMAND_WRITABLE);
        c.wmask[CACHE_LINE_SIZE] = 0xff;
        c.wmask[LATENCY_TIMER] = 0xff;
        c.wmask[INTERRUPT_LINE] = 0xff;
        // No INTx pin: devices here interrupt through MSI-X only.
        c.data[INTERRUPT_PIN] = 0;
        c
    }

    /// Declares memory BAR `index` (and `index + 1` for a 64-bit BAR).
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), PciConfigError> {
        let slots = match spec.kind {
            BarKind::Memory32 => 1,
            BarKind::Memory64 => 2,
        };
        if index + slots > BAR_COUNT {
            return Err(PciConfigError::BarIndex { index });
        }
        let max = match spec.kind {
            BarKind::Memory32 => 1 << 31,
            BarKind::Memory64 => 1 << 40,
        };
        if !spec.size.is_power_of_two() || !(0x1000..=max).contains(&spec.size) {
            return Err(PciConfigError::BarSize { size: spec.size });
        }
        if (index..index + slots).any(|i| self.bars[i].is_some() || self.is_upper_half(i)) {
            return Err(PciConfigError::BarTaken { index });
        }
        let mut flags = 0u32;
        if spec.kind == BarKind::Memory64 {
            flags |= BAR_MEM_64;
        }
        if spec.prefetchable {
            flags |= BAR_MEM_PREFETCH;
        }
        let mask = !(spec.size - 1);
        let reg = BAR0 + 4 * index;
        self.set_u32(reg, flags);
        self.set_wmask_u32(reg, mask as u32 & !BAR_MEM_FLAGS);
        if spec.kind == BarKind::Memory64 {
            self.set_u32(reg + 4, 0);
            self.set_wmask_u32(reg + 4, (mask >> 32) as u32);
        }
        self.bars[index] = Some(spec);
        Ok(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index > 0 && matches!(self.bars[index - 1], Some(BarSpec { kind: BarKind::Memory64, .. }))
    }

    /// The declared BAR at `index` (None for the upper half of a 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// The address programmed in BAR `index`, whether decoding is on or not.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bar(index)?;
        let reg = BAR0 + 4 * index;
        let low = u64::from(self.read_u32(reg) & !BAR_MEM_FLAGS);
        Some(match spec.kind {
            BarKind::Memory32 => low,
            BarKind::Memory64 => low | u64::from(self.read_u32(reg + 4)) << 32,
        })
    }

    /// Programs BAR `index` as firmware would (the VMM's pre-assignment).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(spec) = self.bar(index) else { return };
        let reg = BAR0 + 4 * index;
        let flags = self.read_u32(reg) & BAR_MEM_FLAGS;
        let addr = addr & !(spec.size - 1);
        self.set_u32(reg, (addr as u32 & !BAR_MEM_FLAGS) | flags);
        if spec.kind == BarKind::Memory64 {
            self.set_u32(reg + 4, (addr >> 32) as u32);
        }
    }

    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    pub fn set_command(&mut self, command: u16) {
        self.set_u16(COMMAND, command & COMMAND_WRITABLE);
    }

    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    /// Appends a capability. `body[0]` is its id, `body[1]` (the link) is filled
    /// in here; `wmask` marks the bits the guest may change (its first two bytes
    /// are ignored). Returns the capability's offset.
    pub fn add_capability(&mut self, body: &[u8], wmask: &[u8]) -> Result<usize, PciConfigError> {
        if body.len() < 2 || wmask.len() != body.len() {
            return Err(PciConfigError::CapabilityShape { len: body.len(), mask: wmask.len() });
        }
        let at = self.next_capability;
        if at + body.len() > CONFIG_SPACE_SIZE {
            return Err(PciConfigError::CapabilitySpace { len: body.len() });
        }
        self.data[at..at + body.len()].copy_from_slice(body);
        self.wmask[at..at + body.len()].copy_from_slice(wmask);
        self.data[at + 1] = 0;
        self.wmask[at] = 0;
        self.wmask[at + 1] = 0;
        self.data[self.last_link] = at as u8;
        self.last_link = at + 1;
        self.next_capability = (at + body.len()).next_multiple_of(4);
        let status = self.read_u16(STATUS) | STATUS_CAPABILITIES;
        self.set_u16(STATUS, status);
        Ok(at)
    }

    /// A guest read of `data.len()` bytes at `offset`; outside the space reads all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        match offset.checked_add(data.len()) {
            Some(end) if end <= CONFIG_SPACE_SIZE => data.copy_from_slice(&self.data[offset..end]),
            _ => data.fill(0xff),
        }
    }

    /// A guest write: only the bits in the writable mask change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let Some(end) = offset.checked_add(data.len()).filter(|&e| e <= CONFIG_SPACE_SIZE) else {
            return;
        };
        for (i, &v) in (offset..end).zip(data) {
            let m = self.wmask[i];
            self.data[i] = (self.data[i] & !m) | (v & m);
        }
    }

    pub fn read_u8(&self, offset: usize) -> u8 {
        self.data.get(offset).copied().unwrap_or(0xff)
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Sets bytes regardless of the writable mask (device side).
    pub fn set_bytes(&mut self, offset: usize, bytes: &[u8]) {
        if let Some(end) = offset.checked_add(bytes.len()).filter(|&e| e <= CONFIG_SPACE_SIZE) {
            self.data[offset..end].copy_from_slice(bytes);
        }
    }

    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    fn set_wmask_u16(&mut self, offset: usize, v: u16) {
        self.wmask[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_wmask_u32(&mut self, offset: usize, v: u32) {
        self.wmask[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x010000,
            subsystem_vendor: 0x1af4,
            subsystem: 2,
        }
    }

    #[test]
    fn ids_and_read_only_fields() {
        let mut c = PciConfig::new(&ids());
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.read_u32(REVISION_ID) >> 8, 0x010000);
        c.write(VENDOR_ID, &[0, 0, 0, 0]);
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), COMMAND_WRITABLE);
        // Out of range: all ones, writes dropped, no panic.
        let mut b = [0u8; 4];
        c.read(254, &mut b);
        assert_eq!(b, [0xff; 4]);
        c.write(usize::MAX, &[1]);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        let mut c = PciConfig::new(&ids());
        c.add_bar(0, BarSpec { size: 0x8000, kind: BarKind::Memory64, prefetchable: false }).unwrap();
        c.add_bar(2, BarSpec { size: 0x1000, kind: BarKind::Memory32, prefetchable: true }).unwrap();
        assert_eq!(
            c.add_bar(1, BarSpec { size: 0x1000, kind: BarKind::Memory32, prefetchable: false }),
            Err(PciConfigError::BarTaken { index: 1 })
        );
        assert!(
            c.add_bar(5, BarSpec { size: 0x1000, kind: BarKind::Memory64, prefetchable: false }).is_err()
        );
        assert!(
            c.add_bar(4, BarSpec { size: 0x1800, kind: BarKind::Memory32, prefetchable: false }).is_err()
        );

        c.set_bar_address(0, 0xc000_8000);
        assert_eq!(c.bar_address(0), Some(0xc000_8000));
        assert_eq!(c.read_u32(BAR0), 0xc000_8004);

        c.write(BAR0, &[0xff; 4]);
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(c.read_u32(BAR0), 0xffff_8004);
        assert_eq!(c.read_u32(BAR0 + 4), 0xffff_ffff);
        c.write(BAR0 + 8, &[0xff; 4]);
        assert_eq!(c.read_u32(BAR0 + 8), 0xffff_f008);
        // Unused BARs and the ROM BAR read 0 after a probe.
        c.write(BAR0 + 12, &[0xff; 4]);
        assert_eq!(c.read_u32(BAR0 + 12), 0);
        c.write(0x30, &[0xff; 4]);
        assert_eq!(c.read_u32(0x30), 0);

        c.write(BAR0, &0x1234_5678u32.to_le_bytes());
        c.write(BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0x1_1234_0000));
        assert_eq!(c.bar_address(1), None);
    }

    #[test]
    fn capabilities_are_linked() {
        let mut c = PciConfig::new(&ids());
        let a = c.add_capability(&[0x11, 0xee, 1, 2], &[0xff, 0xff, 0, 0xc0]).unwrap();
        let b = c.add_capability(&[0x09, 0, 16, 1, 0, 0], &[0; 6]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x44);
        assert_eq!(c.read_u8(CAPABILITIES_POINTER), 0x40);
        assert_eq!(c.read_u8(a + 1), b as u8);
        assert_eq!(c.read_u8(b + 1), 0);
        assert_ne!(c.read_u16(STATUS) & STATUS_CAPABILITIES, 0);
        c.write(a, &[0, 0, 0xff, 0xff]);
        assert_eq!(c.read_u32(a), 0xc201_4411);
        assert!(c.add_capability(&[0; 200], &[0; 200]).is_err());
        assert!(c.add_capability(&[0], &[0]).is_err());
    }
}
