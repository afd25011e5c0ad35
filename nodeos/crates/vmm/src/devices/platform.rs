//! The handful of legacy ports a PC guest touches besides the UART.
//!
//! - `0x60..=0x64` i8042: a keyboard controller reduced to two jobs: writing
//!   0xFE to the command port 0x64 pulses the CPU reset line (a reboot request),
//!   and the host can type Ctrl-Alt-Del (scancode set 2, as a PC keyboard sends
//!   it) into its output buffer, raising IRQ 1: the graceful-shutdown request.
//!   Status bit 0 says a byte waits at 0x60.
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

pub const I8042_PORT: u64 = 0x60;
/// 0x60 (data) .. 0x64 (status / command); 0x61..0x63 read as 0 too.
pub const I8042_LEN: u64 = 5;
const I8042_COMMAND: u64 = 4;
const I8042_RESET_CPU: u8 = 0xfe;
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

/// Ctrl, Alt, Del pressed then released, in scancode set 2.
const CTRL_ALT_DEL: [u8; 11] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];
const I8042_STATUS_OUTPUT_FULL: u8 = 0x01;
/// Bound on bytes waiting for the guest (a guest that never reads stays bounded).
const I8042_BUFFER: usize = 64;

/// The i8042 keyboard controller: reset line and a keyboard output buffer.
pub struct I8042 {
    events: Arc<PlatformEvents>,
    output: std::collections::VecDeque<u8>,
    irq: Option<Arc<dyn super::interrupt::IrqLine>>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").field("pending", &self.output.len()).finish()
    }
}

impl I8042 {
    /// The keyboard interrupt (IRQ 1) raised when bytes arrive.
    pub fn set_irq(&mut self, irq: Arc<dyn super::interrupt::IrqLine>) {
        self.irq = Some(irq);
    }

    /// Types Ctrl-Alt-Del: the guest's cue to shut down. Returns false (and
    /// types nothing) when the guest has left earlier keys unread.
    pub fn ctrl_alt_del(&mut self) -> bool {
        if self.output.len() + CTRL_ALT_DEL.len() > I8042_BUFFER {
            return false;
        }
        self.output.extend(CTRL_ALT_DEL);
        if let Some(irq) = &self.irq
            && let Err(e) = irq.trigger()
        {
            tracing::warn!(error = %e, "cannot raise the keyboard interrupt");
        }
        true
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            0 => {
                data[0] = self.output.pop_front().unwrap_or(0);
                // More keys: interrupt again, as the controller would.
                if !self.output.is_empty()
                    && let Some(irq) = &self.irq
                {
                    let _ = irq.trigger();
                }
            }
            I8042_COMMAND if !self.output.is_empty() => data[0] = I8042_STATUS_OUTPUT_FULL,
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND && data.first() == Some(&I8042_RESET_CPU) {
            self.events.request(PlatformRequest::Reset);
        }
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

/// Puts every platform port on the port I/O bus.
/// Returns the keyboard controller, through which the host types.
pub fn attach(pio: &Bus, events: &Arc<PlatformEvents>) -> Result<Arc<std::sync::Mutex<I8042>>, BusError> {
    use std::sync::Mutex;
    let i8042 = Arc::new(Mutex::new(I8042 { events: events.clone(), output: Default::default(), irq: None }));
    pio.insert(i8042.clone(), I8042_PORT, I8042_LEN)?;
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
    fn ctrl_alt_del_is_typed_into_the_output_buffer() {
        let bus = Bus::new();
        let events = PlatformEvents::new().unwrap();
        let kbd = attach(&bus, &events).unwrap();
        assert!(kbd.lock().unwrap().ctrl_alt_del());
        let mut got = Vec::new();
        let mut b = [0u8];
        loop {
            bus.read(0x64, &mut b);
            if b[0] & 1 == 0 {
                break;
            }
            bus.read(0x60, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, CTRL_ALT_DEL);
        // A guest that never reads cannot make the buffer grow without bound.
        let mut k = kbd.lock().unwrap();
        let typed = (0..100).filter(|_| k.ctrl_alt_del()).count();
        assert_eq!(typed, I8042_BUFFER / CTRL_ALT_DEL.len());
        assert_eq!(events.take(), None, "typing is not a platform request");
    }

    #[test]
    fn i8042_reads_zero_and_0xfe_resets() {
        let (bus, events) = bus();
        let mut b = [0xffu8];
        assert!(bus.read(0x64, &mut b));
        assert_eq!(b, [0]);
        assert!(bus.write(0x64, &[0xaa]));
        assert!(bus.write(0x60, &[0xfe]));
        assert_eq!(events.take(), None);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(events.eventfd().read().unwrap(), 1);
        assert_eq!(events.take(), Some(PlatformRequest::Reset));
        assert_eq!(events.take(), None);
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
