//! A type-0 PCI configuration space: 256 bytes, a writable-bit mask per byte,
//! memory BARs and a capability list.
//!
//! Every guest write goes through the mask, so read-only fields (ids, class, the
//! BAR type bits, capability ids and links) cannot change. A BAR's low bits
//! below its size are not writable either, which makes the standard size probe
//! work by itself: writing all ones reads back the size mask.
//!
//! [`PciConfig::save`] / [`PciConfig::restore`] carry the space across a
//! migration (the convention is in `crate::state`). The bytes are the whole
//! state: a BAR's programmed address and an unfinished size probe both live in
//! the BAR register itself, and the masks, BAR declarations and capability
//! layout come from the device's construction, identical on both hosts.

use serde::{Deserialize, Serialize};

use crate::state::StateError;

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
const EXPANSION_ROM: usize = 0x30;
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

/// A function's configuration space as the guest left it: command, BAR
/// addresses, capability registers such as the MSI-X control word, interrupt
/// line, and the read-only fields, which a restore checks against the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    /// The whole space, byte for byte ([`CONFIG_SPACE_SIZE`] bytes).
    pub bytes: Vec<u8>,
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

    /// The space as the guest sees it, for a snapshot or a migration.
    pub fn save(&self) -> PciConfigState {
        PciConfigState { bytes: self.data.to_vec() }
    }

    /// Loads a space saved from a device built the same way. Refused, with
    /// nothing changed, if the length is wrong, a BAR's type bits or alignment
    /// do not fit this device's BAR, or any read-only byte (ids, class, BAR
    /// size bits, capability structure) differs: the state is from a different
    /// device. Only the bytes change; who decodes where is the root's business
    /// (`PciRoot::restore` maps the BARs).
    pub fn restore(&mut self, state: PciConfigState) -> Result<(), StateError> {
        self.check(&state)?;
        self.apply(&state);
        Ok(())
    }

    fn check(&self, state: &PciConfigState) -> Result<(), StateError> {
        let err = |reason: String| StateError::new("pci config", reason);
        let saved = state.bytes.as_slice();
        if saved.len() != CONFIG_SPACE_SIZE {
            return Err(err(format!(
                "configuration space of {} bytes, this device has {CONFIG_SPACE_SIZE}",
                saved.len()
            )));
        }
        let dword = |at: usize| u32::from_le_bytes([saved[at], saved[at + 1], saved[at + 2], saved[at + 3]]);
        // BARs first, so a misplaced BAR is named as such rather than as a
        // read-only byte (its low bits below the size are read-only).
        for (index, spec) in self.bars.iter().enumerate() {
            let Some(spec) = spec else { continue };
            let reg = BAR0 + 4 * index;
            let flags = dword(reg) & BAR_MEM_FLAGS;
            let want = self.read_u32(reg) & BAR_MEM_FLAGS;
            if flags != want {
                return Err(err(format!(
                    "BAR {index} type bits {flags:#x} are not those of this device's {:?} BAR ({want:#x}): \
                     a different device",
                    spec.kind
                )));
            }
            let low = u64::from(dword(reg) & !BAR_MEM_FLAGS);
            let addr = match spec.kind {
                BarKind::Memory32 => low,
                BarKind::Memory64 => low | u64::from(dword(reg + 4)) << 32,
            };
            if addr & (spec.size - 1) != 0 {
                return Err(err(format!(
                    "BAR {index} address {addr:#x} is not aligned to its size {:#x}",
                    spec.size
                )));
            }
        }
        for (offset, ((&s, &d), &m)) in saved.iter().zip(&self.data).zip(&self.wmask).enumerate() {
            if (s ^ d) & !m != 0 {
                return Err(err(format!(
                    "{} (byte {offset:#x}) is read-only and differs: saved {s:#04x}, this device {d:#04x}; \
                     a different device",
                    field_name(offset)
                )));
            }
        }
        Ok(())
    }

    fn apply(&mut self, state: &PciConfigState) {
        // A checked state differs only in writable bits; the copy goes through
        // the mask anyway so a caller that skipped the check cannot break the
        // read-only fields.
        for ((d, &s), &m) in self.data.iter_mut().zip(&state.bytes).zip(&self.wmask) {
            *d = (*d & !m) | (s & m);
        }
    }

    fn set_wmask_u16(&mut self, offset: usize, v: u16) {
        self.wmask[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_wmask_u32(&mut self, offset: usize, v: u32) {
        self.wmask[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }
}

/// The header field at `offset`, for error messages.
fn field_name(offset: usize) -> &'static str {
    match offset {
        VENDOR_ID..DEVICE_ID => "vendor id",
        DEVICE_ID..COMMAND => "device id",
        COMMAND..STATUS => "command",
        STATUS..REVISION_ID => "status",
        REVISION_ID => "revision id",
        CLASS_PROG_IF..CACHE_LINE_SIZE => "class code",
        CACHE_LINE_SIZE => "cache line size",
        LATENCY_TIMER => "latency timer",
        HEADER_TYPE => "header type",
        0x0f => "BIST",
        BAR0..0x28 => "BAR register",
        0x28..SUBSYSTEM_VENDOR_ID => "CardBus CIS pointer",
        SUBSYSTEM_VENDOR_ID..SUBSYSTEM_ID => "subsystem vendor id",
        SUBSYSTEM_ID..EXPANSION_ROM => "subsystem id",
        EXPANSION_ROM..CAPABILITIES_POINTER => "expansion ROM BAR",
        CAPABILITIES_POINTER => "capabilities pointer",
        INTERRUPT_LINE => "interrupt line",
        INTERRUPT_PIN => "interrupt pin",
        0x3e => "min grant",
        0x3f => "max latency",
        FIRST_CAPABILITY.. => "capability",
        _ => "reserved header byte",
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

    /// A function with a 64-bit BAR, a 32-bit BAR and a capability with one
    /// writable byte, as a device constructor would build it.
    fn device() -> PciConfig {
        let mut c = PciConfig::new(&ids());
        c.add_bar(0, BarSpec { size: 0x8000, kind: BarKind::Memory64, prefetchable: false }).unwrap();
        c.add_bar(2, BarSpec { size: 0x1000, kind: BarKind::Memory32, prefetchable: true }).unwrap();
        c.add_capability(&[0x11, 0, 7, 0], &[0, 0, 0, 0xc0]).unwrap();
        c
    }

    #[test]
    fn save_and_restore_carry_what_the_guest_wrote() {
        let mut c = device();
        c.write(COMMAND, &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes());
        c.write(BAR0, &0x0000_0000u32.to_le_bytes());
        c.write(BAR0 + 4, &0x10u32.to_le_bytes());
        // BAR 2 caught mid-probe: it must still read back its size mask.
        c.write(BAR0 + 8, &[0xff; 4]);
        c.write(INTERRUPT_LINE, &[11]);
        c.write(0x43, &[0xc0]);
        let state = c.save();
        assert_eq!(state.bytes.len(), CONFIG_SPACE_SIZE);
        let wire = serde_json::to_string(&state).unwrap();

        let mut d = device();
        d.restore(serde_json::from_str(&wire).unwrap()).unwrap();
        assert_eq!(d.save(), state);
        assert_eq!(d.bar_address(0), Some(0x10_0000_0000));
        assert_eq!(d.read_u32(BAR0 + 8), 0xffff_f008);
        assert_eq!(d.command(), COMMAND_MEMORY | COMMAND_BUS_MASTER);
        assert_eq!(d.read_u8(INTERRUPT_LINE), 11);
        assert_eq!(d.read_u8(0x43), 0xc0);
        // Masks came from construction and still hold.
        d.write(VENDOR_ID, &[0; 2]);
        assert_eq!(d.read_u16(VENDOR_ID), 0x1af4);
    }

    #[test]
    fn restore_refuses_another_device_or_a_misplaced_bar() {
        let mut source = device();
        source.write(BAR0 + 8, &0xd000_0000u32.to_le_bytes());
        let good = source.save();
        let mut d = device();
        d.write(INTERRUPT_LINE, &[5]);
        let before = d.save();
        let refuse = |d: &mut PciConfig, edit: &dyn Fn(&mut Vec<u8>), why: &str| {
            let mut state = good.clone();
            edit(&mut state.bytes);
            let e = d.restore(state).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        };
        refuse(&mut d, &|b| b.truncate(64), "of 64 bytes");
        refuse(&mut d, &|b| b.resize(4096, 0), "of 4096 bytes");
        refuse(&mut d, &|b| b[VENDOR_ID] = 0xf5, "vendor id (byte 0x0)");
        refuse(&mut d, &|b| b[DEVICE_ID] ^= 1, "device id");
        refuse(&mut d, &|b| b[CLASS_PROG_IF + 2] = 2, "class code");
        // A 32-bit BAR address inside the BAR's size, and a 64-bit one.
        refuse(
            &mut d,
            &|b| b[BAR0 + 9] |= 0x08,
            "BAR 2 address 0xd0000800 is not aligned to its size 0x1000",
        );
        refuse(&mut d, &|b| b[BAR0] |= 0x10, "BAR 0 address 0x10 is not aligned");
        // Kind bits: a 32-bit BAR where this device has a 64-bit one.
        refuse(&mut d, &|b| b[BAR0] &= !0x4, "BAR 0 type bits 0x0");
        refuse(&mut d, &|b| b[BAR0 + 8] &= !0x8, "BAR 2 type bits");
        // A BAR this device does not have.
        refuse(&mut d, &|b| b[BAR0 + 12] = 0x10, "BAR register (byte 0x1c)");
        // Capability structure: id, link, read-only body.
        refuse(&mut d, &|b| b[0x40] = 0x05, "capability (byte 0x40)");
        refuse(&mut d, &|b| b[0x42] = 8, "capability (byte 0x42)");
        refuse(&mut d, &|b| b[CAPABILITIES_POINTER] = 0x50, "capabilities pointer");
        refuse(&mut d, &|b| b[INTERRUPT_PIN] = 1, "interrupt pin");
        assert_eq!(d.save(), before, "a refused restore changes nothing");
        d.restore(good.clone()).unwrap();
        assert_eq!(d.save(), good);
    }
}
