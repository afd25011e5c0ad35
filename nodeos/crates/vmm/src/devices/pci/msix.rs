//! MSI-X: the capability, the vector table and the pending-bit array.
//!
//! The table and PBA live in a BAR of the owning device, which forwards the
//! accesses here. The guest programs each entry's message and mask bit; this
//! module keeps the KVM routing (through [`MsiVectors::configure`]) equal to the
//! entries that can fire: MSI-X enabled, function not masked, entry not masked.
//! A trigger of a vector that cannot fire sets its pending bit; the interrupt
//! is delivered when the vector becomes able to fire.
//!
//! [`Msix::save`] / [`Msix::restore`] carry the table, the pending bits and the
//! enable/function-mask state across a migration; they are called by the
//! owning device with the rest of its state (the virtio transport does), not
//! by the PCI root, which saves only configuration space.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::devices::interrupt::{InterruptError, MsiMessage, MsiVectors};
use crate::state::StateError;

pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Length of the capability structure in config space.
pub const MSIX_CAP_LEN: usize = 12;
/// Offset of the message control word inside the capability.
pub const MSIX_CONTROL: usize = 2;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn word(&self, i: usize) -> u32 {
        [self.addr_lo, self.addr_hi, self.data, self.control][i]
    }

    fn set_word(&mut self, i: usize, v: u32) {
        match i {
            0 => self.addr_lo = v & !0x3, // dword aligned
            1 => self.addr_hi = v,
            2 => self.data = v,
            _ => self.control = v & ENTRY_MASKED,
        }
    }
}

/// One saved table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntryState {
    /// Message address, low dword (dword aligned).
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    /// The vector control's mask bit (its other bits are reserved, read 0).
    pub masked: bool,
}

/// The MSI-X state of one device: table, pending bits, and the enable and
/// function-mask bits of the message control word (which the device's
/// configuration space also holds; both are saved from the same source).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// One per vector, in table order.
    pub entries: Vec<MsixEntryState>,
    /// The pending bit of each vector.
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_masked: bool,
}

struct State {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    /// What KVM was last told for each vector.
    routed: Vec<Option<MsiMessage>>,
    enabled: bool,
    function_masked: bool,
}

/// A device's MSI-X state, shared by the vCPU side (table accesses) and the
/// device's I/O thread (triggers).
pub struct Msix {
    state: Mutex<State>,
    vectors: Arc<dyn MsiVectors>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("Msix")
            .field("vectors", &s.entries.len())
            .field("enabled", &s.enabled)
            .field("function_masked", &s.function_masked)
            .finish()
    }
}

impl Msix {
    /// MSI-X over `vectors`; every entry starts masked, MSI-X disabled.
    pub fn new(vectors: Arc<dyn MsiVectors>) -> Self {
        let n = usize::from(vectors.count());
        let masked = Entry { control: ENTRY_MASKED, ..Entry::default() };
        Self {
            state: Mutex::new(State {
                entries: vec![masked; n],
                pending: vec![false; n],
                routed: vec![None; n],
                enabled: false,
                function_masked: false,
            }),
            vectors,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn count(&self) -> u16 {
        self.lock().entries.len() as u16
    }

    /// Bytes the table occupies in its BAR.
    pub fn table_len(&self) -> u64 {
        u64::from(self.count()) * MSIX_ENTRY_SIZE
    }

    /// Bytes the PBA occupies in its BAR (whole qwords).
    pub fn pba_len(&self) -> u64 {
        u64::from(self.count()).div_ceil(64) * 8
    }

    /// The capability body and its writable mask, for `PciConfig::add_capability`.
    pub fn capability(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> ([u8; 12], [u8; 12]) {
        let control = self.count().saturating_sub(1) & 0x7ff;
        let mut body = [0u8; MSIX_CAP_LEN];
        body[0] = MSIX_CAP_ID;
        body[2..4].copy_from_slice(&control.to_le_bytes());
        body[4..8].copy_from_slice(&(table_offset | u32::from(table_bar & 0x7)).to_le_bytes());
        body[8..12].copy_from_slice(&(pba_offset | u32::from(pba_bar & 0x7)).to_le_bytes());
        let mut mask = [0u8; MSIX_CAP_LEN];
        mask[3] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
        (body, mask)
    }

    /// The guest wrote the message control word.
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        s.enabled = control & CONTROL_ENABLE != 0;
        s.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        for v in 0..s.entries.len() {
            self.sync(&mut s, v);
        }
    }

    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    pub fn is_pending(&self, vector: u16) -> bool {
        self.lock().pending.get(usize::from(vector)).copied().unwrap_or(false)
    }

    /// Makes KVM's routing of vector `v` match its entry, and delivers a pending
    /// interrupt once the vector can fire.
    fn sync(&self, s: &mut State, v: usize) {
        let e = s.entries[v];
        let live = s.enabled && !s.function_masked && e.control & ENTRY_MASKED == 0;
        let want = live.then_some(MsiMessage { addr_lo: e.addr_lo, addr_hi: e.addr_hi, data: e.data });
        if want != s.routed[v] {
            match self.vectors.configure(v as u16, want) {
                Ok(()) => s.routed[v] = want,
                Err(e) => {
                    tracing::warn!(vector = v, error = %e, "MSI-X routing update failed");
                    s.routed[v] = None;
                }
            }
        }
        if s.routed[v].is_some() && s.pending[v] {
            s.pending[v] = false;
            if let Err(e) = self.vectors.trigger(v as u16) {
                tracing::warn!(vector = v, error = %e, "pending MSI-X interrupt not delivered");
            }
        }
    }

    /// Raises `vector`, or records it as pending if it cannot fire now.
    pub fn trigger(&self, vector: u16) -> Result<(), InterruptError> {
        let mut s = self.lock();
        let v = usize::from(vector);
        if v >= s.entries.len() {
            return Err(InterruptError::Vector { vector, count: s.entries.len() as u16 });
        }
        if s.routed[v].is_some() {
            self.vectors.trigger(vector)
        } else {
            s.pending[v] = true;
            Ok(())
        }
    }

    /// A guest read in the table; only aligned dword and qword accesses are defined.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len();
        if !((len == 4 || len == 8) && offset.is_multiple_of(len as u64)) {
            return;
        }
        let s = self.lock();
        for (k, chunk) in data.chunks_mut(4).enumerate() {
            let dword = offset / 4 + k as u64;
            let (entry, word) = ((dword / 4) as usize, (dword % 4) as usize);
            if let Some(e) = s.entries.get(entry) {
                chunk.copy_from_slice(&e.word(word).to_le_bytes());
            }
        }
    }

    /// A guest write in the table.
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let len = data.len();
        if !((len == 4 || len == 8) && offset.is_multiple_of(len as u64)) {
            return;
        }
        let mut s = self.lock();
        let mut touched = None;
        for (k, chunk) in data.chunks(4).enumerate() {
            let dword = offset / 4 + k as u64;
            let (entry, word) = ((dword / 4) as usize, (dword % 4) as usize);
            let Some(e) = s.entries.get_mut(entry) else { continue };
            e.set_word(word, u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
            touched = Some(entry);
        }
        if let Some(v) = touched {
            self.sync(&mut s, v);
        }
    }

    /// The table, pending bits and control bits, for a snapshot or a migration.
    pub fn save(&self) -> MsixState {
        let s = self.lock();
        MsixState {
            entries: s
                .entries
                .iter()
                .map(|e| MsixEntryState {
                    addr_lo: e.addr_lo,
                    addr_hi: e.addr_hi,
                    data: e.data,
                    masked: e.control & ENTRY_MASKED != 0,
                })
                .collect(),
            pending: s.pending.clone(),
            enabled: s.enabled,
            function_masked: s.function_masked,
        }
    }

    /// Loads a state saved from a device with the same number of vectors, then
    /// makes KVM's routing match it: every entry that can fire (MSI-X enabled,
    /// function and entry unmasked) is routed through [`MsiVectors::configure`]
    /// on this host's vectors, every other one unrouted. A pending bit of a
    /// vector that can fire is delivered and cleared, as a device does when a
    /// vector gets unmasked; the others stay pending. Because of that delivery,
    /// restore after the vCPUs' local APIC state, which would otherwise
    /// overwrite the interrupt.
    ///
    /// Refused, with nothing changed, if the entry or pending-bit count differs
    /// from this device's vector count or a message address is not dword
    /// aligned. A routing failure is logged and leaves the vector unrouted, as
    /// for a guest write (its interrupts pend until the next update).
    pub fn restore(&self, state: MsixState) -> Result<(), StateError> {
        let err = |reason: String| StateError::new("msix", reason);
        let mut s = self.lock();
        let count = s.entries.len();
        if state.entries.len() != count {
            return Err(err(format!(
                "{} table entries, this device has {count} vectors",
                state.entries.len()
            )));
        }
        if state.pending.len() != count {
            return Err(err(format!(
                "{} pending bits, this device has {count} vectors",
                state.pending.len()
            )));
        }
        if let Some((v, e)) = state.entries.iter().enumerate().find(|(_, e)| e.addr_lo & 0x3 != 0) {
            return Err(err(format!("entry {v}: message address {:#x} is not dword aligned", e.addr_lo)));
        }
        s.entries = state
            .entries
            .iter()
            .map(|e| Entry {
                addr_lo: e.addr_lo,
                addr_hi: e.addr_hi,
                data: e.data,
                control: if e.masked { ENTRY_MASKED } else { 0 },
            })
            .collect();
        s.pending = state.pending;
        s.enabled = state.enabled;
        s.function_masked = state.function_masked;
        // `routed` is what this host's vectors were told, so syncing pushes
        // exactly the difference: on a freshly built device, every live entry.
        for v in 0..count {
            self.sync(&mut s, v);
        }
        Ok(())
    }

    /// A guest read in the PBA (read-only).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let byte = offset + i as u64;
            *b = (0..8).fold(0u8, |acc, bit| {
                let v = (byte * 8 + bit) as usize;
                acc | (u8::from(s.pending.get(v).copied().unwrap_or(false)) << bit)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::FakeMsi;

    fn entry(msix: &Msix, v: u64, addr: u32, data: u32, masked: bool) {
        msix.write_table(v * 16, &addr.to_le_bytes());
        msix.write_table(v * 16 + 4, &0u32.to_le_bytes());
        msix.write_table(v * 16 + 8, &data.to_le_bytes());
        msix.write_table(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    fn pba(msix: &Msix) -> u64 {
        let mut b = [0u8; 8];
        msix.read_pba(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn capability_layout() {
        let fake = FakeMsi::new(3);
        let msix = Msix::new(fake);
        let (body, mask) = msix.capability(0, 0x4000, 0, 0x5000);
        assert_eq!(body[0], MSIX_CAP_ID);
        assert_eq!(u16::from_le_bytes([body[2], body[3]]), 2);
        assert_eq!(u32::from_le_bytes([body[4], body[5], body[6], body[7]]), 0x4000);
        assert_eq!(u32::from_le_bytes([body[8], body[9], body[10], body[11]]), 0x5000);
        assert_eq!(mask[3], 0xc0);
        assert_eq!(msix.table_len(), 48);
        assert_eq!(msix.pba_len(), 8);
    }

    #[test]
    fn entries_route_only_when_enabled_and_unmasked() {
        let fake = FakeMsi::new(2);
        let msix = Msix::new(fake.clone());
        entry(&msix, 0, 0xfee0_0000, 0x41, false);
        assert!(fake.configured(0).is_none(), "MSI-X still disabled");
        msix.set_control(CONTROL_ENABLE);
        assert_eq!(fake.configured(0), Some(MsiMessage { addr_lo: 0xfee0_0000, addr_hi: 0, data: 0x41 }));
        assert!(fake.configured(1).is_none(), "entry 1 is masked from reset");
        msix.trigger(0).unwrap();
        assert_eq!(fake.triggers(), vec![0]);

        // Reads see what was written; the reserved control bits read 0.
        msix.write_table(12, &0xffff_fffeu32.to_le_bytes());
        let mut b = [0u8; 8];
        msix.read_table(8, &mut b);
        assert_eq!(b, [0x41, 0, 0, 0, 0, 0, 0, 0]);
        // Odd sizes and offsets are ignored, out-of-table reads are 0.
        msix.write_table(1, &[1, 2, 3, 4]);
        msix.write_table(0, &[1, 2]);
        let mut w = [0xffu8; 4];
        msix.read_table(0x1000, &mut w);
        assert_eq!(w, [0; 4]);
        assert!(msix.trigger(7).is_err());
    }

    #[test]
    fn masked_triggers_are_pending_until_unmasked() {
        let fake = FakeMsi::new(2);
        let msix = Msix::new(fake.clone());
        msix.set_control(CONTROL_ENABLE);
        entry(&msix, 1, 0xfee0_0000, 0x42, true);
        msix.trigger(1).unwrap();
        assert!(fake.triggers().is_empty());
        assert!(msix.is_pending(1));
        assert_eq!(pba(&msix), 0b10);
        // Unmask with a qword write of the data + control words.
        let mut q = [0u8; 8];
        q[..4].copy_from_slice(&0x42u32.to_le_bytes());
        msix.write_table(16 + 8, &q);
        assert_eq!(fake.triggers(), vec![1]);
        assert_eq!(pba(&msix), 0);

        // Function mask: routing is withdrawn, triggers pend, unmask delivers.
        msix.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(fake.configured(1).is_none());
        msix.trigger(1).unwrap();
        assert_eq!(pba(&msix), 0b10);
        msix.set_control(CONTROL_ENABLE);
        assert_eq!(fake.triggers(), vec![1, 1]);
        assert!(fake.configured(1).is_some());

        // Masking an entry withdraws its routing.
        msix.write_table(16 + 12, &1u32.to_le_bytes());
        assert!(fake.configured(1).is_none());
    }

    #[test]
    fn restore_routes_the_live_entries_on_the_new_vectors() {
        let fake = FakeMsi::new(3);
        let msix = Msix::new(fake.clone());
        msix.set_control(CONTROL_ENABLE);
        entry(&msix, 0, 0xfee0_0000, 0x41, false);
        entry(&msix, 1, 0xfee0_1000, 0x42, true);
        msix.write_table(2 * 16 + 4, &7u32.to_le_bytes());
        msix.trigger(1).unwrap();
        let state = msix.save();
        assert!(state.enabled && !state.function_masked);
        assert_eq!(state.pending, vec![false, true, false]);
        let wire = serde_json::to_string(&state).unwrap();

        let dest = FakeMsi::new(3);
        let restored = Msix::new(dest.clone());
        restored.restore(serde_json::from_str(&wire).unwrap()).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(dest.configured(0), Some(MsiMessage { addr_lo: 0xfee0_0000, addr_hi: 0, data: 0x41 }));
        assert!(dest.configured(1).is_none(), "masked");
        assert!(dest.configured(2).is_none(), "masked from reset, only its address changed");
        assert!(dest.triggers().is_empty());
        assert_eq!(pba(&restored), 0b10);
        let mut b = [0u8; 8];
        restored.read_table(2 * 16, &mut b);
        assert_eq!(b, [0, 0, 0, 0, 7, 0, 0, 0]);
        // The restored device keeps working: unmasking delivers the pending interrupt.
        restored.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(dest.triggers(), vec![1]);
        restored.trigger(0).unwrap();
        assert_eq!(dest.triggers(), vec![1, 0]);
    }

    #[test]
    fn restore_delivers_pending_bits_only_of_vectors_that_can_fire() {
        let live = MsixEntryState { addr_lo: 0xfee0_0000, addr_hi: 0, data: 0x41, masked: false };
        let state = MsixState {
            entries: vec![live, MsixEntryState { masked: true, ..live }],
            pending: vec![true, true],
            enabled: true,
            function_masked: false,
        };
        let dest = FakeMsi::new(2);
        let msix = Msix::new(dest.clone());
        msix.restore(state.clone()).unwrap();
        assert_eq!(dest.triggers(), vec![0]);
        assert_eq!(pba(&msix), 0b10);

        // Function masked: nothing routed, everything stays pending until unmasked.
        let dest = FakeMsi::new(2);
        let msix = Msix::new(dest.clone());
        msix.restore(MsixState { function_masked: true, ..state }).unwrap();
        assert!(dest.configured(0).is_none() && dest.triggers().is_empty());
        assert_eq!(pba(&msix), 0b11);
        msix.set_control(CONTROL_ENABLE);
        assert!(dest.configured(0).is_some());
        assert_eq!(dest.triggers(), vec![0]);
    }

    #[test]
    fn restore_refuses_another_vector_count_and_changes_nothing() {
        let fake = FakeMsi::new(2);
        let msix = Msix::new(fake.clone());
        let before = msix.save();
        let live = MsixEntryState { addr_lo: 0xfee0_0000, addr_hi: 0, data: 0x41, masked: false };
        let good = MsixState {
            entries: vec![live; 2],
            pending: vec![false; 2],
            enabled: true,
            function_masked: false,
        };
        let refuse = |state: MsixState, why: &str| {
            let e = msix.restore(state).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        };
        refuse(MsixState { entries: vec![live; 3], ..good.clone() }, "3 table entries, this device has 2");
        refuse(MsixState { entries: vec![], ..good.clone() }, "0 table entries");
        refuse(MsixState { pending: vec![false; 64], ..good.clone() }, "64 pending bits");
        let mut odd = good.clone();
        odd.entries[1].addr_lo = 0xfee0_0002;
        refuse(odd, "entry 1: message address 0xfee00002 is not dword aligned");
        assert_eq!(msix.save(), before);
        assert!(fake.configured(0).is_none() && fake.configured(1).is_none());
        msix.restore(good).unwrap();
        assert!(fake.configured(1).is_some());
    }
}
