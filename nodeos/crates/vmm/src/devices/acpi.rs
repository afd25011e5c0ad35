//! The registers of a hardware-reduced ACPI platform (ACPI 6.5 §4.1), at
//! I/O ports [`ACPI_PORT`]`..+`[`ACPI_LEN`]:
//!
//! - `+0` sleep control (FADT `SLEEP_CONTROL_REG`): writing `SLP_EN` (bit 5)
//!   with sleep type [`S5_SLEEP_TYPE`] in bits 2..=4 powers the VM off. Other
//!   sleep states are not offered (the DSDT has `\_S5` only).
//! - `+1` sleep status (`SLEEP_STATUS_REG`): reads 0; `WAK_STS` never rises.
//! - `+2` reset (FADT `RESET_REG`): writing [`RESET_VALUE`] resets the VM.
//! - `+3` GED events: the Generic Event Device's pending events, one bit each
//!   ([`GED_POWER_BUTTON`]); reading returns and clears them. The GED raises
//!   GSI [`GED_IRQ`] when an event arrives; its `_EVT` method in the DSDT reads
//!   this register and notifies the power button device, which the guest's
//!   ACPI button driver turns into a power-off.
//!
//! Guest requests go to [`PlatformEvents`], like the legacy power-off ports.
//!
//! # Saved state
//! Only the GED's pending events ([`AcpiState`]): the sleep control
//! and reset registers act on a write and keep nothing (Linux writes
//! `SLP_TYP | SLP_EN` in one go and never reads it back), and sleep status
//! always reads 0. The GED line and the platform events are the
//! destination's own.

use std::sync::Arc;

use super::bus::BusDevice;
use super::interrupt::IrqLine;
use super::platform::{PlatformEvents, PlatformRequest};
use crate::state::StateError;

pub const ACPI_PORT: u64 = 0x600;
pub const ACPI_LEN: u64 = 4;
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
pub const SLEEP_STATUS_OFFSET: u64 = 1;
pub const RESET_OFFSET: u64 = 2;
pub const GED_OFFSET: u64 = 3;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 1;
/// The sleep type of `\_S5` in the DSDT, written into the sleep control register.
pub const S5_SLEEP_TYPE: u8 = 5;
/// GSI of the Generic Event Device: free of the ISA devices (1 keyboard,
/// 4 COM1, 8 RTC) and, on a hardware-reduced platform, of any SCI.
pub const GED_IRQ: u32 = 9;
/// GED event bit: the power button was pressed.
pub const GED_POWER_BUTTON: u8 = 1;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;
/// Every GED event bit the DSDT's `_EVT` handles.
const GED_EVENTS: u8 = GED_POWER_BUTTON;

/// The ACPI registers' state, saved by [`AcpiPlatform::save`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiState {
    /// GED events raised and not yet read by the guest ([`GED_POWER_BUTTON`]).
    pub ged_pending: u8,
}

/// The sleep, reset and GED registers.
pub struct AcpiPlatform {
    events: Arc<PlatformEvents>,
    ged_irq: Option<Arc<dyn IrqLine>>,
    ged_pending: u8,
}

impl std::fmt::Debug for AcpiPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiPlatform").field("ged_pending", &self.ged_pending).finish_non_exhaustive()
    }
}

impl AcpiPlatform {
    pub fn new(events: Arc<PlatformEvents>, ged_irq: Option<Arc<dyn IrqLine>>) -> Self {
        Self { events, ged_irq, ged_pending: 0 }
    }

    /// Presses the power button: the guest's cue for an orderly shutdown.
    /// A guest without ACPI, or that ignores the button, does nothing.
    pub fn press_power_button(&mut self) {
        self.ged_pending |= GED_POWER_BUTTON;
        self.raise_ged();
    }

    /// The pending GED events.
    pub fn save(&self) -> AcpiState {
        AcpiState { ged_pending: self.ged_pending }
    }

    /// Loads `state`, keeping this device's GED line and platform events.
    /// Pending events raise the GED again: its `_EVT` reads and clears the
    /// register, so an extra interrupt finds nothing and does nothing, while
    /// one lost in the move would leave a power-button press unanswered. On
    /// error the device is unchanged.
    pub fn restore(&mut self, state: AcpiState) -> Result<(), StateError> {
        if state.ged_pending & !GED_EVENTS != 0 {
            return Err(StateError::new(
                "acpi",
                format!("ged_pending {:#04x} has bits outside {GED_EVENTS:#04x}", state.ged_pending),
            ));
        }
        self.ged_pending = state.ged_pending;
        if self.ged_pending != 0 {
            self.raise_ged();
        }
        Ok(())
    }

    fn raise_ged(&self) {
        if let Some(irq) = &self.ged_irq
            && let Err(e) = irq.trigger()
        {
            tracing::warn!(error = %e, "cannot raise the GED interrupt");
        }
    }
}

impl BusDevice for AcpiPlatform {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == GED_OFFSET && data.len() == 1 {
            data[0] = std::mem::take(&mut self.ged_pending);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            SLEEP_CONTROL_OFFSET
                if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE =>
            {
                self.events.request(PlatformRequest::Shutdown)
            }
            RESET_OFFSET if *value == RESET_VALUE => self.events.request(PlatformRequest::Reset),
            // Other sleep states, sleep status (WAK_STS clears), GED: nothing to do.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::devices::bus::Bus;
    use crate::devices::interrupt::InterruptError;

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl IrqLine for Count {
        fn trigger(&self) -> Result<(), InterruptError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    fn platform() -> (Bus, Arc<PlatformEvents>, Arc<Count>, Arc<Mutex<AcpiPlatform>>) {
        let bus = Bus::new();
        let events = PlatformEvents::new().unwrap();
        let irq = Arc::new(Count::default());
        let dev = Arc::new(Mutex::new(AcpiPlatform::new(events.clone(), Some(irq.clone()))));
        bus.insert(dev.clone(), ACPI_PORT, ACPI_LEN).unwrap();
        (bus, events, irq, dev)
    }

    #[test]
    fn s5_powers_off_and_other_sleep_states_do_nothing() {
        let (bus, events, _, _) = platform();
        // Linux: SLP_TYP << 2 | SLP_EN, one byte.
        for typ in [0u8, 1, 3, 4, 7] {
            assert!(bus.write(ACPI_PORT, &[typ << 2 | SLP_EN]));
        }
        assert!(bus.write(ACPI_PORT, &[S5_SLEEP_TYPE << 2]), "without SLP_EN");
        assert!(bus.write(ACPI_PORT, &[S5_SLEEP_TYPE << 2 | SLP_EN, 0]), "a word write is not the register");
        assert_eq!(events.take(), None);
        assert!(bus.write(ACPI_PORT, &[S5_SLEEP_TYPE << 2 | SLP_EN]));
        assert_eq!(events.take(), Some(PlatformRequest::Shutdown));
    }

    #[test]
    fn reset_register_resets_on_its_value_only() {
        let (bus, events, _, _) = platform();
        assert!(bus.write(ACPI_PORT + RESET_OFFSET, &[0]));
        assert!(bus.write(ACPI_PORT + RESET_OFFSET, &[0xfe]));
        assert_eq!(events.take(), None);
        assert!(bus.write(ACPI_PORT + RESET_OFFSET, &[RESET_VALUE]));
        assert_eq!(events.take(), Some(PlatformRequest::Reset));
    }

    #[test]
    fn power_button_raises_the_ged_and_the_event_reads_once() {
        let (bus, events, irq, dev) = platform();
        let mut b = [0xffu8];
        bus.read(ACPI_PORT + GED_OFFSET, &mut b);
        assert_eq!(b, [0], "nothing pending");
        dev.lock().unwrap().press_power_button();
        assert_eq!(irq.0.load(Ordering::Relaxed), 1);
        bus.read(ACPI_PORT + GED_OFFSET, &mut b);
        assert_eq!(b, [GED_POWER_BUTTON]);
        bus.read(ACPI_PORT + GED_OFFSET, &mut b);
        assert_eq!(b, [0], "read clears");
        bus.read(ACPI_PORT + SLEEP_STATUS_OFFSET, &mut b);
        assert_eq!(b, [0]);
        assert_eq!(events.take(), None, "the button is a request to the guest, not to the VMM");
    }

    /// What the guest reads from each register (GED last, as it clears).
    fn guest_view(bus: &Bus) -> [u8; 4] {
        let mut v = [0u8; 4];
        for (i, offset) in
            [SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET, RESET_OFFSET, GED_OFFSET].into_iter().enumerate()
        {
            let mut b = [0xffu8];
            bus.read(ACPI_PORT + offset, &mut b);
            v[i] = b[0];
        }
        v
    }

    #[test]
    fn save_and_restore_carry_a_pending_power_button() {
        let (bus, events, _, dev) = platform();
        // A sleep type the platform does not offer: written, kept nowhere.
        assert!(bus.write(ACPI_PORT, &[3 << SLP_TYP_SHIFT | SLP_EN]));
        dev.lock().unwrap().press_power_button();
        let state = dev.lock().unwrap().save();
        assert_eq!(state, AcpiState { ged_pending: GED_POWER_BUTTON });
        let state: AcpiState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();

        let (bus2, events2, irq2, dev2) = platform();
        dev2.lock().unwrap().restore(state.clone()).unwrap();
        assert_eq!(irq2.0.load(Ordering::Relaxed), 1, "the pending event raises the GED again");
        assert_eq!(dev2.lock().unwrap().save(), state);
        let view = guest_view(&bus);
        assert_eq!(view, [0, 0, 0, GED_POWER_BUTTON]);
        assert_eq!(guest_view(&bus2), view);
        assert_eq!(dev2.lock().unwrap().save(), dev.lock().unwrap().save());
        assert_eq!((events.take(), events2.take()), (None, None));
        // The restored registers still act on writes, through its own events.
        assert!(bus2.write(ACPI_PORT, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT | SLP_EN]));
        assert_eq!((events.take(), events2.take()), (None, Some(PlatformRequest::Shutdown)));
    }

    #[test]
    fn restoring_nothing_pending_raises_nothing() {
        let (_, _, irq, dev) = platform();
        dev.lock().unwrap().restore(AcpiState { ged_pending: 0 }).unwrap();
        assert_eq!(irq.0.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn unknown_ged_events_are_refused_and_change_nothing() {
        let (bus, _, irq, dev) = platform();
        dev.lock().unwrap().press_power_button();
        for bad in [0x02, 0x80, 0xff] {
            let e = dev.lock().unwrap().restore(AcpiState { ged_pending: bad }).unwrap_err();
            assert_eq!(e.device, "acpi");
        }
        assert_eq!(irq.0.load(Ordering::Relaxed), 1);
        assert_eq!(guest_view(&bus), [0, 0, 0, GED_POWER_BUTTON]);
    }
}
