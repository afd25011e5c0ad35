//! The handful of legacy ports a PC guest touches besides the UART.
//!
//! - `0x60..=0x64`: the i8042 keyboard controller lives in [`super::i8042`];
//!   [`attach`] places it, and its CPU reset line is a [`PlatformRequest::Reset`].
//! - `0x604` (16-bit): ACPI PM1a control; writing 0x2000 (SLP_EN, sleep type 0 = S5)
//!   asks for power-off. `0xf4`: debug exit; any write asks for power-off.
//! - `0x80`: POST codes, accepted and ignored.
//!
//! A request is recorded in [`PlatformEvents`] and its eventfd is signalled; the
//! worker waits on that fd and ends the VM. The first request wins until taken.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::bus::{Bus, BusDevice, BusError};
// The keyboard controller moved to its own file; callers that reach it through
// `platform` (the worker's `Vm`) keep compiling.
pub use super::i8042::I8042;

pub const PM1A_CONTROL_PORT: u64 = 0x604;
const PM1A_SLEEP_S5: u16 = 0x2000;
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
pub const POST_PORT: u64 = 0x80;

/// What the guest asked the platform for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformRequest {
    Shutdown,
    Reset,
}

impl PlatformRequest {
    fn code(self) -> u8 {
        match self {
            Self::Shutdown => 1,
            Self::Reset => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Shutdown),
            2 => Some(Self::Reset),
            _ => None,
        }
    }
}

/// Shared between the platform ports (vCPU threads) and the worker's main loop.
#[derive(Debug)]
pub struct PlatformEvents {
    fd: EventFd,
    reason: AtomicU8,
}

impl PlatformEvents {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self { fd: EventFd::new(EFD_NONBLOCK)?, reason: AtomicU8::new(0) }))
    }

    /// Readable once a request is pending; poll it, then call [`Self::take`].
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }

    /// Records `req` unless one is already pending, and wakes the worker.
    pub fn request(&self, req: PlatformRequest) {
        let _ = self.reason.compare_exchange(0, req.code(), Ordering::AcqRel, Ordering::Acquire);
        if let Err(e) = self.fd.write(1) {
            tracing::error!(error = %e, "cannot signal a platform request");
        }
    }

    /// The pending request, clearing it and the eventfd.
    pub fn take(&self) -> Option<PlatformRequest> {
        let _ = self.fd.read();
        PlatformRequest::from_code(self.reason.swap(0, Ordering::AcqRel))
    }
}

/// Power-off ports: the ACPI PM1a control register and the debug exit port.
#[derive(Debug)]
pub struct PowerOff {
    events: Arc<PlatformEvents>,
    acpi: bool,
}

impl BusDevice for PowerOff {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let shutdown = if self.acpi {
            offset == 0 && data.len() == 2 && u16::from_le_bytes([data[0], data[1]]) == PM1A_SLEEP_S5
        } else {
            true
        };
        if shutdown {
            self.events.request(PlatformRequest::Shutdown);
        }
    }
}

/// Port 0x80: firmware and kernels write progress codes here (and use it as a delay).
#[derive(Debug, Default)]
pub struct PostCode;

impl BusDevice for PostCode {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Puts every platform port, the i8042 included, on the port I/O bus.
/// Returns the keyboard controller, through which the host types.
pub fn attach(pio: &Bus, events: &Arc<PlatformEvents>) -> Result<Arc<std::sync::Mutex<I8042>>, BusError> {
    use std::sync::Mutex;
    let i8042 = super::i8042::attach(pio, events)?;
    pio.insert(Arc::new(Mutex::new(PowerOff { events: events.clone(), acpi: true })), PM1A_CONTROL_PORT, 2)?;
    pio.insert(Arc::new(Mutex::new(PowerOff { events: events.clone(), acpi: false })), DEBUG_EXIT_PORT, 1)?;
    pio.insert(Arc::new(Mutex::new(PostCode)), POST_PORT, 1)?;
    Ok(i8042)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> (Bus, Arc<PlatformEvents>) {
        let bus = Bus::new();
        let events = PlatformEvents::new().unwrap();
        attach(&bus, &events).unwrap();
        (bus, events)
    }

    #[test]
    fn power_off_ports() {
        let (bus, events) = bus();
        assert!(bus.write(0x604, &[0x00, 0x20]));
        assert_eq!(events.take(), Some(PlatformRequest::Shutdown));
        // Other sleep values, byte writes: nothing.
        assert!(bus.write(0x604, &[0x00, 0x34]));
        assert!(bus.write(0x604, &[0x20]));
        assert_eq!(events.take(), None);
        assert!(bus.write(0xf4, &[0]));
        assert_eq!(events.take(), Some(PlatformRequest::Shutdown));
    }

    #[test]
    fn the_first_request_wins_and_post_codes_are_ignored() {
        let (bus, events) = bus();
        assert!(bus.write(0x80, &[0x42]));
        assert_eq!(events.take(), None);
        assert!(bus.write(0xf4, &[1]));
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(events.take(), Some(PlatformRequest::Shutdown));
        // Unclaimed neighbours read as all ones.
        let mut b = [0u8];
        assert!(!bus.read(0x65, &mut b));
        assert_eq!(b, [0xff]);
    }
}
