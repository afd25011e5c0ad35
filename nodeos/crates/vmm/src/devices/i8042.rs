//! The i8042 keyboard controller and the PS/2 keyboard behind it, complete
//! enough for Linux's `i8042` and `atkbd` drivers to probe them, plus the two
//! jobs the VMM needs: the CPU reset line and host-typed Ctrl-Alt-Del.
//!
//! # Ports
//! - `0x60` data: reading takes the output buffer; writing is either the
//!   parameter of the last controller command or a byte for the keyboard.
//! - `0x64` status on read, controller command on write.
//! - `0x61..=0x63` read as 0 and drop writes (on KVM the in-kernel PIT owns
//!   0x61 anyway, so those never reach us).
//!
//! # Model
//! Two sources feed the one-byte output buffer the guest reads at 0x60, in
//! this priority order, each time the buffer is empty:
//! 1. a controller-made byte (a reply to 0x20, 0xAA, ...; a 0xD2/0xD3 write;
//!    an aux timeout), one slot; a newer one replaces an unread one, as on
//!    hardware;
//! 2. the keyboard's own queue (its replies and host-typed keys), held back
//!    while the keyboard interface is disabled (CTR bit 4) and, with CTR bit 6
//!    (XLATE), passed through the set 2 → set 1 translation on the way.
//!
//! No mouse is attached. The controller side of the aux port works
//! (0xA7/0xA8/0xA9, the 0xD3 loop-back), and a byte for the mouse (0xD4) is
//! answered at once with 0xFE, the aux flag and the timeout bit: what a
//! controller reports when no device clocks the byte in.
//!
//! Loading a byte into the empty buffer pulses IRQ 1 (keyboard port, including
//! controller replies) when CTR bit 0 is set, or IRQ 12 (aux port) when CTR
//! bit 1 is set and an aux line was given; the line is an edge (a KVM irqfd),
//! so a byte is signalled once when it becomes readable. Commands complete at
//! once: the input-buffer-full status bit is never set.
//!
//! The keyboard discards what it still had to send whenever it receives a
//! command, as PS/2 keyboards do, so a reply is never stuck behind typed keys.
//! Typed keys are dropped while scanning is off (0xF5 until 0xF4 or 0xFF).
//!
//! # Reset
//! 0xFE (any 0xF0..=0xFF pulse with bit 0 low) on the command port, or 0xD1
//! with bit 0 clear, pulses the CPU reset line: recorded as
//! [`PlatformRequest::Reset`]. The A20 gate bit of the output port is stored
//! but not modelled: guest memory is never wrapped at 1 MiB.
//!
//! # Saved state
//! [`I8042State`] holds the controller RAM, the output port, the output buffer
//! and the reply waiting for it, a half-done command, the status bits that are
//! history (last write a command, last byte read, a translated break prefix),
//! and the keyboard's queue, scancode set, LEDs and modes. The interrupt lines
//! and the platform events are the destination's own.
//!
//! # Linux's probe, for reference
//! `i8042_controller_check` reads 0x64/0x60 until OBF is clear (at most 16
//! bytes, else "No controller found"); `i8042_controller_init` reads the CTR
//! (0x20) until two reads agree, sets KBDDIS, clears KBDINT, keeps XLATE as
//! found and writes it back (0x60); `i8042_setup_kbd` writes the CTR again with
//! KBDINT set. Without a PNP0F13 (mouse) node in ACPI, Linux skips the aux
//! port. `atkbd` then sends 0xF2 (expects 0xFA 0xAB 0x83, or 0xAB 0x41 when
//! translated), 0xF5, 0xED 0x00, 0xF3 0x00 and 0xF4, each acknowledged with
//! 0xFA and each reply byte delivered through IRQ 1.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::bus::{Bus, BusDevice, BusError};
use super::interrupt::IrqLine;
use super::platform::{PlatformEvents, PlatformRequest};
use crate::state::StateError;

/// First port of the controller: the data port.
pub const I8042_PORT: u64 = 0x60;
/// The keyboard's ISA interrupt.
pub const I8042_IRQ: u32 = 1;
/// 0x60 (data) .. 0x64 (status / command); 0x61..0x63 read as 0 too.
pub const I8042_LEN: u64 = 5;
/// Offset of the status / command port from [`I8042_PORT`].
const COMMAND: u64 = 4;

/// Bytes of controller RAM (commands 0x20..=0x3F / 0x60..=0x7F).
const RAM_SIZE: usize = 32;

/// Bound on bytes the keyboard holds for the guest: a guest that never reads
/// keeps it bounded. (A real keyboard holds 16; Linux's flush reads at most 16
/// before it calls the controller missing, so more than one unread
/// Ctrl-Alt-Del before the driver loads costs the guest its keyboard.)
const KEYBOARD_BUFFER: usize = 64;

/// The controller configuration byte (CTR, byte 0 of controller RAM) as PC
/// firmware leaves it for a keyboard and no mouse: keyboard interrupt on,
/// system flag set (self-test passed), aux port disabled, translation on (what
/// DOS-era software, Windows and most BIOSes expect; Linux keeps the XLATE bit
/// it finds and handles both).
pub const INITIAL_CTR: u8 = CTR_KBDINT | CTR_SYS | CTR_AUXDIS | CTR_XLATE;

// Controller configuration byte.
const CTR_KBDINT: u8 = 0x01;
const CTR_AUXINT: u8 = 0x02;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

// Status register.
const STR_OBF: u8 = 0x01;
const STR_SYS: u8 = 0x04;
const STR_CMD: u8 = 0x08;
/// Keyboard not inhibited (the key lock switch is open).
const STR_UNLOCKED: u8 = 0x10;
const STR_AUXDATA: u8 = 0x20;
const STR_TIMEOUT: u8 = 0x40;

// Output port (0xD0/0xD1): bit 0 is the CPU reset line (active low), bit 1 the
// A20 gate, bits 4/5 mirror "output buffer full" for IRQ 1/12.
const OUT_RESET: u8 = 0x01;
const OUT_KBD_OBF: u8 = 0x10;
const OUT_AUX_OBF: u8 = 0x20;
/// Reset deasserted, A20 on, clock and data lines idle high.
const INITIAL_OUTPUT_PORT: u8 = 0xcf;
/// Input port (0xC0): bit 7 = keyboard not inhibited; no jumpers.
const INPUT_PORT: u8 = 0x80;

// Keyboard protocol bytes.
const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_ECHO: u8 = 0xee;
/// MF2 keyboard identity, as sent after 0xF2.
const KBD_ID: [u8; 2] = [0xab, 0x83];
/// Set 2 break prefix, folded into bit 7 by the translation.
const BREAK_PREFIX: u8 = 0xf0;

/// Ctrl, Alt, Del pressed, then released in reverse order, in each scancode set.
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CTRL_ALT_DEL_SET2: [u8; 11] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];
const CTRL_ALT_DEL_SET3: [u8; 9] = [0x11, 0x19, 0x64, 0xf0, 0x64, 0xf0, 0x19, 0xf0, 0x11];

/// The 8042's set 2 → set 1 translation of codes 0x00..=0x7F (the IBM table,
/// also in QEMU's `ps2.c`). Of the codes above, only 0x83 (F7) and 0x84
/// (SysRq) translate; the rest pass unchanged, which is why the identify reply
/// 0xAB 0x83 reads 0xAB 0x41 and "scancode set 2" reads 0x41 when translating.
const SET2_TO_SET1: [u8; 128] = [
    0xff, 0x43, 0x41, 0x3f, 0x3d, 0x3b, 0x3c, 0x58, 0x64, 0x44, 0x42, 0x40, 0x3e, 0x0f, 0x29, 0x59, //
    0x65, 0x38, 0x2a, 0x70, 0x1d, 0x10, 0x02, 0x5a, 0x66, 0x71, 0x2c, 0x1f, 0x1e, 0x11, 0x03, 0x5b, //
    0x67, 0x2e, 0x2d, 0x20, 0x12, 0x05, 0x04, 0x5c, 0x68, 0x39, 0x2f, 0x21, 0x14, 0x13, 0x06, 0x5d, //
    0x69, 0x31, 0x30, 0x23, 0x22, 0x15, 0x07, 0x5e, 0x6a, 0x72, 0x32, 0x24, 0x16, 0x08, 0x09, 0x5f, //
    0x6b, 0x33, 0x25, 0x17, 0x18, 0x0b, 0x0a, 0x60, 0x6c, 0x34, 0x35, 0x26, 0x27, 0x19, 0x0c, 0x61, //
    0x6d, 0x73, 0x28, 0x74, 0x1a, 0x0d, 0x62, 0x6e, 0x3a, 0x36, 0x1c, 0x1b, 0x75, 0x2b, 0x63, 0x76, //
    0x55, 0x56, 0x77, 0x78, 0x79, 0x7a, 0x0e, 0x7b, 0x7c, 0x4f, 0x7d, 0x4b, 0x47, 0x7e, 0x7f, 0x6f, //
    0x52, 0x53, 0x50, 0x4c, 0x4d, 0x48, 0x01, 0x45, 0x57, 0x4e, 0x51, 0x4a, 0x37, 0x49, 0x46, 0x54, //
];

/// One set 2 byte as the controller hands it on with translation on.
fn translate(code: u8) -> u8 {
    match code {
        0x00..=0x7f => SET2_TO_SET1[usize::from(code & 0x7f)],
        0x83 => 0x41,
        0x84 => 0x54,
        _ => code,
    }
}

/// Which port a byte in the output buffer belongs to: decides status bit 5
/// and which interrupt it raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    Keyboard,
    Aux,
}

#[derive(Debug, Clone, Copy)]
struct Byte {
    value: u8,
    port: Port,
    /// The controller gave up sending to the device (status bit 6).
    timeout: bool,
}

impl Byte {
    fn keyboard(value: u8) -> Self {
        Self { value, port: Port::Keyboard, timeout: false }
    }
}

/// What the next byte written to 0x60 means after a controller command.
#[derive(Debug, Clone, Copy)]
enum Param {
    /// Controller RAM byte (0 is the CTR).
    Ram(usize),
    OutputPort,
    /// Into the output buffer as if from the keyboard (0xD2).
    KeyboardOutput,
    /// Into the output buffer as if from the aux device (0xD3).
    AuxOutput,
    /// To the aux device (0xD4).
    AuxDevice,
}

/// What the next byte the keyboard receives means after one of its commands.
#[derive(Debug, Clone, Copy)]
enum KeyboardParam {
    Leds,
    Typematic,
    ScanSet,
}

/// The PS/2 keyboard on the controller's first port: answers the host's
/// commands and sends scancodes in its current set. It knows nothing of the
/// translation, which is the controller's.
#[derive(Debug)]
struct Keyboard {
    /// Bytes not yet handed to the controller, oldest first.
    queue: VecDeque<u8>,
    expect: Option<KeyboardParam>,
    scanning: bool,
    set: u8,
    leds: u8,
    /// The last byte handed to the controller, for 0xFE (resend).
    last: u8,
}

impl Keyboard {
    fn new() -> Self {
        Self { queue: VecDeque::new(), expect: None, scanning: true, set: 2, leds: 0, last: 0 }
    }

    /// Set Default (0xF6), also part of 0xF5 and 0xFF. The typematic rate is
    /// not stored: the host never holds a key down.
    fn defaults(&mut self) {
        self.set = 2;
    }

    fn send(&mut self, byte: u8) {
        if self.queue.len() < KEYBOARD_BUFFER {
            self.queue.push_back(byte);
        } else {
            tracing::debug!(byte, "i8042: keyboard buffer full, reply dropped");
        }
    }

    fn pop(&mut self) -> Option<u8> {
        let byte = self.queue.pop_front()?;
        self.last = byte;
        Some(byte)
    }

    /// A byte from the host over the keyboard line.
    fn receive(&mut self, byte: u8) {
        match self.expect.take() {
            // Parameters are 7-bit; a byte with bit 7 set is a new command.
            Some(param) if byte & 0x80 == 0 => self.parameter(param, byte),
            _ => self.command(byte),
        }
    }

    fn parameter(&mut self, param: KeyboardParam, byte: u8) {
        match param {
            KeyboardParam::Leds => {
                self.leds = byte & 0x07;
                self.send(KBD_ACK);
            }
            KeyboardParam::Typematic => self.send(KBD_ACK),
            KeyboardParam::ScanSet => match byte {
                0 => {
                    self.send(KBD_ACK);
                    self.send(self.set);
                }
                1..=3 => {
                    self.set = byte;
                    self.send(KBD_ACK);
                }
                _ => self.send(KBD_RESEND),
            },
        }
    }

    fn command(&mut self, byte: u8) {
        // A command cancels whatever the keyboard still had to send.
        self.queue.clear();
        match byte {
            0xed => {
                self.send(KBD_ACK);
                self.expect = Some(KeyboardParam::Leds);
            }
            0xee => self.send(KBD_ECHO),
            0xf0 => {
                self.send(KBD_ACK);
                self.expect = Some(KeyboardParam::ScanSet);
            }
            0xf2 => {
                self.send(KBD_ACK);
                for byte in KBD_ID {
                    self.send(byte);
                }
            }
            0xf3 => {
                self.send(KBD_ACK);
                self.expect = Some(KeyboardParam::Typematic);
            }
            0xf4 => {
                self.scanning = true;
                self.send(KBD_ACK);
            }
            0xf5 => {
                self.scanning = false;
                self.defaults();
                self.send(KBD_ACK);
            }
            0xf6 => {
                self.defaults();
                self.send(KBD_ACK);
            }
            // Set 3 "all keys typematic / make-break / ..." (Linux sends 0xFA
            // after choosing set 3): accepted; every key makes and breaks.
            0xf7..=0xfa => self.send(KBD_ACK),
            0xfe => self.send(self.last),
            0xff => {
                self.defaults();
                self.leds = 0;
                self.scanning = true;
                self.send(KBD_ACK);
                self.send(KBD_BAT_OK);
            }
            // Includes the set 3 per-key commands 0xFB..=0xFD, which take a
            // key list we do not model.
            _ => self.send(KBD_RESEND),
        }
    }

    /// Queues `codes` as pressed keys, all or nothing.
    fn type_keys(&mut self, codes: &[u8]) -> bool {
        if !self.scanning || self.queue.len() + codes.len() > KEYBOARD_BUFFER {
            return false;
        }
        self.queue.extend(codes);
        true
    }

    fn ctrl_alt_del(&self) -> &'static [u8] {
        match self.set {
            1 => &CTRL_ALT_DEL_SET1,
            3 => &CTRL_ALT_DEL_SET3,
            _ => &CTRL_ALT_DEL_SET2,
        }
    }
}

/// A byte in the output buffer, or waiting for it, as saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042Byte {
    pub value: u8,
    /// From the aux port (status bit 5, IRQ 12) rather than the keyboard port.
    pub aux: bool,
    /// Status bit 6: the controller gave up sending to the aux device. Only
    /// aux bytes carry it.
    pub timeout: bool,
}

impl From<Byte> for I8042Byte {
    fn from(b: Byte) -> Self {
        Self { value: b.value, aux: b.port == Port::Aux, timeout: b.timeout }
    }
}

impl From<I8042Byte> for Byte {
    fn from(b: I8042Byte) -> Self {
        Self { value: b.value, port: if b.aux { Port::Aux } else { Port::Keyboard }, timeout: b.timeout }
    }
}

/// What the next byte written to 0x60 means, as saved: a controller command
/// waiting for its parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum I8042Param {
    /// Controller RAM byte `index` (0x60..=0x7F), 0..32.
    Ram { index: u8 },
    /// The output port (0xD1).
    OutputPort,
    /// Into the output buffer from the keyboard port (0xD2).
    KeyboardOutput,
    /// Into the output buffer from the aux port (0xD3).
    AuxOutput,
    /// To the aux device (0xD4).
    AuxDevice,
}

impl From<Param> for I8042Param {
    fn from(p: Param) -> Self {
        match p {
            // RAM indices come from a command's low five bits.
            Param::Ram(index) => Self::Ram { index: (index % RAM_SIZE) as u8 },
            Param::OutputPort => Self::OutputPort,
            Param::KeyboardOutput => Self::KeyboardOutput,
            Param::AuxOutput => Self::AuxOutput,
            Param::AuxDevice => Self::AuxDevice,
        }
    }
}

impl From<I8042Param> for Param {
    /// For a checked state only: the RAM index is in range.
    fn from(p: I8042Param) -> Self {
        match p {
            I8042Param::Ram { index } => Param::Ram(usize::from(index)),
            I8042Param::OutputPort => Param::OutputPort,
            I8042Param::KeyboardOutput => Param::KeyboardOutput,
            I8042Param::AuxOutput => Param::AuxOutput,
            I8042Param::AuxDevice => Param::AuxDevice,
        }
    }
}

/// What the next byte the keyboard receives means, as saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KeyboardParamState {
    /// After 0xED.
    Leds,
    /// After 0xF3.
    Typematic,
    /// After 0xF0.
    ScanSet,
}

impl From<KeyboardParam> for KeyboardParamState {
    fn from(p: KeyboardParam) -> Self {
        match p {
            KeyboardParam::Leds => Self::Leds,
            KeyboardParam::Typematic => Self::Typematic,
            KeyboardParam::ScanSet => Self::ScanSet,
        }
    }
}

impl From<KeyboardParamState> for KeyboardParam {
    fn from(p: KeyboardParamState) -> Self {
        match p {
            KeyboardParamState::Leds => Self::Leds,
            KeyboardParamState::Typematic => Self::Typematic,
            KeyboardParamState::ScanSet => Self::ScanSet,
        }
    }
}

/// The PS/2 keyboard's state, as saved.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyboardState {
    /// Bytes not yet handed to the controller, oldest first; at most 64.
    pub queue: Vec<u8>,
    /// A command waiting for its parameter.
    pub expect: Option<KeyboardParamState>,
    /// Scanning on (0xF4) or off (0xF5).
    pub scanning: bool,
    /// The scancode set, 1..=3.
    pub scancode_set: u8,
    /// LED bits (scroll, num, caps lock), 0..=7.
    pub leds: u8,
    /// The last byte handed to the controller, sent again on 0xFE.
    pub last: u8,
}

/// The i8042 and its keyboard as saved by [`I8042::save`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// Controller RAM, exactly 32 bytes; byte 0 is the CTR.
    pub ram: Vec<u8>,
    /// The output port (0xD0/0xD1) as last written.
    pub output_port: u8,
    /// The output buffer the guest reads at 0x60 (`None`: OBF clear).
    pub output: Option<I8042Byte>,
    /// A controller-made byte waiting for the output buffer; only while it is full.
    pub reply: Option<I8042Byte>,
    /// A controller command waiting for its parameter.
    pub expect: Option<I8042Param>,
    /// Status bit 3: the last write went to the command port.
    pub last_was_command: bool,
    /// What 0x60 reads while the buffer is empty.
    pub last_read: u8,
    /// A translated break prefix waits for its code (only with XLATE on).
    pub break_pending: bool,
    pub keyboard: KeyboardState,
}

impl I8042State {
    /// Refuses what this controller could never have been in. Checked in
    /// full before a restore touches anything.
    fn check(&self) -> Result<(), StateError> {
        let err = |reason: String| Err(StateError::new("i8042", reason));
        if self.ram.len() != RAM_SIZE {
            return err(format!("ram holds {} bytes, the controller has {RAM_SIZE}", self.ram.len()));
        }
        let ctr = self.ram[0];
        if let Some(I8042Param::Ram { index }) = self.expect
            && usize::from(index) >= RAM_SIZE
        {
            return err(format!("expect: RAM index {index} is outside 0..{RAM_SIZE}"));
        }
        for (name, byte) in [("output", self.output), ("reply", self.reply)] {
            if let Some(b) = byte
                && b.timeout
                && !b.aux
            {
                return err(format!("{name}: a timeout on a keyboard byte"));
            }
        }
        // A byte waits only behind a full buffer, and the keyboard's bytes
        // move in whenever the buffer is empty and its interface enabled.
        if self.output.is_none() && self.reply.is_some() {
            return err("reply waits while the output buffer is empty".into());
        }
        if self.output.is_none() && ctr & CTR_KBDDIS == 0 && !self.keyboard.queue.is_empty() {
            return err(
                "keyboard bytes wait while the output buffer is empty and the interface enabled".into()
            );
        }
        if self.break_pending && ctr & CTR_XLATE == 0 {
            return err("break_pending without translation".into());
        }
        let kbd = &self.keyboard;
        if kbd.queue.len() > KEYBOARD_BUFFER {
            return err(format!(
                "keyboard queue holds {} bytes, allowed 0..={KEYBOARD_BUFFER}",
                kbd.queue.len()
            ));
        }
        if !(1..=3).contains(&kbd.scancode_set) {
            return err(format!("scancode_set {} is outside 1..=3", kbd.scancode_set));
        }
        if kbd.leds > 7 {
            return err(format!("leds {:#x} is outside 0..=7", kbd.leds));
        }
        Ok(())
    }
}

/// The i8042 keyboard controller with its keyboard. vCPU threads drive it
/// through the port bus; the VM's owner types into it (Ctrl-Alt-Del).
pub struct I8042 {
    events: Arc<PlatformEvents>,
    /// Controller RAM; byte 0 is the CTR.
    ram: [u8; RAM_SIZE],
    output_port: u8,
    /// The output buffer the guest reads at 0x60; `None` = OBF clear.
    output: Option<Byte>,
    /// A controller-made byte waiting for the output buffer.
    reply: Option<Byte>,
    expect: Option<Param>,
    /// Status bit 3: the last write went to the command port.
    last_was_command: bool,
    /// What 0x60 reads when the buffer is empty: the last byte, as on hardware.
    last_read: u8,
    /// A translated set 2 break prefix (0xF0) waits for its code.
    break_pending: bool,
    keyboard: Keyboard,
    irq: Option<Arc<dyn IrqLine>>,
    aux_irq: Option<Arc<dyn IrqLine>>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("ctr", &format_args!("{:#04x}", self.ram[0]))
            .field("output", &self.output)
            .field("keyboard", &self.keyboard)
            .finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller as firmware leaves it: CTR [`INITIAL_CTR`], keyboard
    /// scanning in set 2, nothing to read.
    pub fn new(events: Arc<PlatformEvents>) -> Self {
        let mut ram = [0; RAM_SIZE];
        ram[0] = INITIAL_CTR;
        Self {
            events,
            ram,
            output_port: INITIAL_OUTPUT_PORT,
            output: None,
            reply: None,
            expect: None,
            last_was_command: false,
            last_read: 0,
            break_pending: false,
            keyboard: Keyboard::new(),
            irq: None,
            aux_irq: None,
        }
    }

    /// The keyboard interrupt (IRQ 1).
    pub fn set_irq(&mut self, irq: Arc<dyn IrqLine>) {
        self.irq = Some(irq);
    }

    /// The aux (mouse) interrupt (IRQ 12). Optional: without it, aux bytes
    /// (only the 0xD3 loop-back and 0xD4 timeouts, as there is no mouse) are
    /// readable by polling only, and a guest probing the aux port without ACPI
    /// hints (Linux with `i8042.nopnp`) spends 250 ms on its IRQ test.
    pub fn set_aux_irq(&mut self, irq: Arc<dyn IrqLine>) {
        self.aux_irq = Some(irq);
    }

    /// The controller's and the keyboard's state.
    pub fn save(&self) -> I8042State {
        let kbd = &self.keyboard;
        I8042State {
            ram: self.ram.to_vec(),
            output_port: self.output_port,
            output: self.output.map(I8042Byte::from),
            reply: self.reply.map(I8042Byte::from),
            expect: self.expect.map(I8042Param::from),
            last_was_command: self.last_was_command,
            last_read: self.last_read,
            break_pending: self.break_pending,
            keyboard: KeyboardState {
                queue: kbd.queue.iter().copied().collect(),
                expect: kbd.expect.map(KeyboardParamState::from),
                scanning: kbd.scanning,
                scancode_set: kbd.set,
                leds: kbd.leds,
                last: kbd.last,
            },
        }
    }

    /// Loads `state`, keeping this controller's interrupt lines and platform
    /// events. A byte waiting in the output buffer with its port's interrupt
    /// enabled raises that interrupt again: the 8042's output is a level
    /// ("buffer full and enabled") that our edge line only samples, and the
    /// guest's handler checks OBF, so a repeat is harmless where a lost one
    /// would stall the keyboard. On error the controller is unchanged.
    pub fn restore(&mut self, state: I8042State) -> Result<(), StateError> {
        state.check()?;
        self.ram = <[u8; RAM_SIZE]>::try_from(state.ram.as_slice())
            .map_err(|_| StateError::new("i8042", "ram: wrong length"))?;
        self.output_port = state.output_port;
        self.output = state.output.map(Byte::from);
        self.reply = state.reply.map(Byte::from);
        self.expect = state.expect.map(Param::from);
        self.last_was_command = state.last_was_command;
        self.last_read = state.last_read;
        self.break_pending = state.break_pending;
        let kbd = state.keyboard;
        self.keyboard = Keyboard {
            queue: kbd.queue.into(),
            expect: kbd.expect.map(KeyboardParam::from),
            scanning: kbd.scanning,
            set: kbd.scancode_set,
            leds: kbd.leds,
            last: kbd.last,
        };
        if let Some(byte) = self.output {
            self.raise(byte.port);
        }
        Ok(())
    }

    /// Types Ctrl-Alt-Del (press, then release), the guest's cue to shut down,
    /// in the keyboard's current scancode set, translated by the controller if
    /// the guest left XLATE on. Returns false, typing nothing, when the guest
    /// has turned scanning off or left too many earlier bytes unread.
    pub fn ctrl_alt_del(&mut self) -> bool {
        let keys = self.keyboard.ctrl_alt_del();
        if !self.keyboard.type_keys(keys) {
            return false;
        }
        self.load();
        true
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn status(&self) -> u8 {
        let mut status = STR_UNLOCKED;
        if let Some(byte) = self.output {
            status |= STR_OBF;
            if byte.port == Port::Aux {
                status |= STR_AUXDATA;
            }
            if byte.timeout {
                status |= STR_TIMEOUT;
            }
        }
        if self.ctr() & CTR_SYS != 0 {
            status |= STR_SYS;
        }
        if self.last_was_command {
            status |= STR_CMD;
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        if let Some(byte) = self.output.take() {
            self.last_read = byte.value;
            // The next byte, if any, becomes readable and interrupts again.
            self.load();
        }
        self.last_read
    }

    /// Fills the empty output buffer from the highest-priority source and
    /// raises that port's interrupt.
    fn load(&mut self) {
        if self.output.is_some() {
            return;
        }
        let Some(byte) = self.reply.take().or_else(|| self.next_keyboard_byte()) else {
            return;
        };
        self.output = Some(byte);
        self.raise(byte.port);
    }

    /// The keyboard's next byte as the controller passes it on, if the
    /// keyboard interface is enabled.
    fn next_keyboard_byte(&mut self) -> Option<Byte> {
        if self.ctr() & CTR_KBDDIS != 0 {
            return None;
        }
        loop {
            let code = self.keyboard.pop()?;
            if self.ctr() & CTR_XLATE == 0 {
                return Some(Byte::keyboard(code));
            }
            if code == BREAK_PREFIX {
                self.break_pending = true;
                continue;
            }
            let released = if std::mem::take(&mut self.break_pending) { 0x80 } else { 0 };
            return Some(Byte::keyboard(translate(code) | released));
        }
    }

    fn raise(&self, port: Port) {
        let (enable, line) = match port {
            Port::Keyboard => (CTR_KBDINT, &self.irq),
            Port::Aux => (CTR_AUXINT, &self.aux_irq),
        };
        if self.ctr() & enable != 0
            && let Some(line) = line
            && let Err(e) = line.trigger()
        {
            tracing::warn!(error = %e, ?port, "cannot raise the i8042 interrupt");
        }
    }

    fn write_ctr(&mut self, ctr: u8) {
        let old = std::mem::replace(&mut self.ram[0], ctr);
        if (old ^ ctr) & CTR_XLATE != 0 {
            self.break_pending = false;
        }
        // The 8042's interrupt output follows "buffer full and enabled": a
        // byte already waiting interrupts as soon as its port's bit is set.
        if let Some(byte) = self.output {
            let enable = match byte.port {
                Port::Keyboard => CTR_KBDINT,
                Port::Aux => CTR_AUXINT,
            };
            if old & enable == 0 && ctr & enable != 0 {
                self.raise(byte.port);
            }
        }
        // Enabling the keyboard interface releases what it held.
        self.load();
    }

    fn reply(&mut self, value: u8) {
        self.reply = Some(Byte::keyboard(value));
        self.load();
    }

    fn command(&mut self, cmd: u8) {
        // A new command abandons one still waiting for its parameter.
        self.expect = None;
        match cmd {
            0x20..=0x3f => self.reply(self.ram[usize::from(cmd & 0x1f)]),
            0x60..=0x7f => self.expect = Some(Param::Ram(usize::from(cmd & 0x1f))),
            // Password installed? No.
            0xa4 => self.reply(0xf1),
            0xa7 => self.write_ctr(self.ctr() | CTR_AUXDIS),
            0xa8 => self.write_ctr(self.ctr() & !CTR_AUXDIS),
            // Interface tests: 0 = no error. The aux lines are fine; there is
            // just nothing at their end.
            0xa9 | 0xab => self.reply(0x00),
            0xaa => {
                self.ram[0] |= CTR_SYS;
                self.reply(0x55);
            }
            0xad => self.write_ctr(self.ctr() | CTR_KBDDIS),
            0xae => self.write_ctr(self.ctr() & !CTR_KBDDIS),
            0xc0 => self.reply(INPUT_PORT),
            0xd0 => {
                let mut port = self.output_port & !(OUT_KBD_OBF | OUT_AUX_OBF);
                match self.output.map(|b| b.port) {
                    Some(Port::Keyboard) => port |= OUT_KBD_OBF,
                    Some(Port::Aux) => port |= OUT_AUX_OBF,
                    None => {}
                }
                self.reply(port);
            }
            0xd1 => self.expect = Some(Param::OutputPort),
            0xd2 => self.expect = Some(Param::KeyboardOutput),
            0xd3 => self.expect = Some(Param::AuxOutput),
            0xd4 => self.expect = Some(Param::AuxDevice),
            // Pulse output port lines low for ~6 µs; bit 0 is the reset line.
            0xf0..=0xff if cmd & OUT_RESET == 0 => self.events.request(PlatformRequest::Reset),
            _ => tracing::debug!(cmd, "i8042: command ignored"),
        }
    }

    fn parameter(&mut self, param: Param, byte: u8) {
        match param {
            Param::Ram(0) => self.write_ctr(byte),
            Param::Ram(index) => {
                if let Some(slot) = self.ram.get_mut(index) {
                    *slot = byte;
                }
            }
            Param::OutputPort => {
                self.output_port = byte;
                if byte & OUT_RESET == 0 {
                    self.events.request(PlatformRequest::Reset);
                }
            }
            // Written by the controller itself, so never translated.
            Param::KeyboardOutput => self.reply(byte),
            Param::AuxOutput => {
                self.reply = Some(Byte { value: byte, port: Port::Aux, timeout: false });
                self.load();
            }
            Param::AuxDevice => {
                self.reply = Some(Byte { value: KBD_RESEND, port: Port::Aux, timeout: true });
                self.load();
            }
        }
    }

    fn write_data(&mut self, byte: u8) {
        match self.expect.take() {
            Some(param) => self.parameter(param, byte),
            None => {
                // Writing to the keyboard re-enables its interface (as QEMU's
                // 8042 does), so the reply can come back.
                self.ram[0] &= !CTR_KBDDIS;
                self.keyboard.receive(byte);
                self.load();
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            0 => self.read_data(),
            COMMAND => self.status(),
            _ => return,
        };
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            0 => {
                self.last_was_command = false;
                self.write_data(byte);
            }
            COMMAND => {
                self.last_was_command = true;
                self.command(byte);
            }
            _ => {}
        }
    }
}

/// Puts the controller on the port I/O bus at [`I8042_PORT`]. Returns it, so
/// the caller can wire its interrupts and type into it.
pub fn attach(pio: &Bus, events: &Arc<PlatformEvents>) -> Result<Arc<Mutex<I8042>>, BusError> {
    let i8042 = Arc::new(Mutex::new(I8042::new(events.clone())));
    pio.insert(i8042.clone(), I8042_PORT, I8042_LEN)?;
    Ok(i8042)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::interrupt::InterruptError;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, Default)]
    struct CountingIrq(AtomicUsize);

    impl CountingIrq {
        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl IrqLine for CountingIrq {
        fn trigger(&self) -> Result<(), InterruptError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// The guest's view: the bus, plus the controller and its interrupt lines.
    struct Guest {
        bus: Bus,
        events: Arc<PlatformEvents>,
        i8042: Arc<Mutex<I8042>>,
        irq1: Arc<CountingIrq>,
        irq12: Arc<CountingIrq>,
    }

    impl Guest {
        fn new() -> Self {
            let bus = Bus::new();
            let events = PlatformEvents::new().unwrap();
            let i8042 = attach(&bus, &events).unwrap();
            let irq1 = Arc::new(CountingIrq::default());
            let irq12 = Arc::new(CountingIrq::default());
            i8042.lock().unwrap().set_irq(irq1.clone());
            i8042.lock().unwrap().set_aux_irq(irq12.clone());
            Self { bus, events, i8042, irq1, irq12 }
        }

        fn status(&self) -> u8 {
            let mut b = [0xff];
            assert!(self.bus.read(0x64, &mut b));
            b[0]
        }

        fn data(&self) -> u8 {
            let mut b = [0xff];
            assert!(self.bus.read(0x60, &mut b));
            b[0]
        }

        fn command(&self, cmd: u8) {
            assert!(self.bus.write(0x64, &[cmd]));
        }

        fn write(&self, byte: u8) {
            assert!(self.bus.write(0x60, &[byte]));
        }

        /// Linux's `i8042_flush`: reads while OBF is set, at most `limit` bytes.
        fn flush(&self, limit: usize) -> Vec<u8> {
            let mut got = Vec::new();
            while self.status() & STR_OBF != 0 {
                assert!(got.len() < limit, "still bytes after {got:x?}");
                got.push(self.data());
            }
            got
        }

        /// Linux's `__i8042_command` with one reply byte (polls, never waits).
        fn ask(&self, cmd: u8) -> u8 {
            self.command(cmd);
            assert_ne!(self.status() & STR_OBF, 0, "no reply to {cmd:#x}");
            self.data()
        }

        fn write_ctr(&self, ctr: u8) {
            self.command(0x60);
            self.write(ctr);
        }

        /// A keyboard command and its parameters, then everything it answered.
        fn keyboard(&self, bytes: &[u8]) -> Vec<u8> {
            bytes.iter().for_each(|&b| self.write(b));
            self.flush(16)
        }
    }

    /// Replays Linux 6.1's controller probe; returns the CTR it found.
    fn linux_controller_init(g: &Guest) -> u8 {
        // i8042_controller_check
        g.flush(16);
        // i8042_controller_selftest (i8042.reset=1)
        assert_eq!(g.ask(0xaa), 0x55);
        // i8042_controller_init: two reads that agree.
        let ctr = g.ask(0x20);
        assert_eq!(g.ask(0x20), ctr);
        assert_ne!(g.status() & STR_UNLOCKED, 0, "Linux would warn: keylock active");
        let init = (ctr | CTR_KBDDIS) & !CTR_KBDINT;
        g.write_ctr(init);
        assert_eq!(g.ask(0x20), init);
        g.flush(16);
        assert_eq!(g.ask(0xab), 0x00);
        // i8042_enable_kbd_port
        g.write_ctr((init & !CTR_KBDDIS) | CTR_KBDINT);
        ctr
    }

    #[test]
    fn idle_controller_reads_as_found_by_firmware() {
        let g = Guest::new();
        assert_eq!(g.status(), STR_SYS | STR_UNLOCKED);
        assert_eq!(g.ask(0x20), INITIAL_CTR);
        // The status says the last write was a command; a data write clears it.
        assert_ne!(g.status() & STR_CMD, 0);
        g.write(0xf4);
        assert_eq!(g.status() & STR_CMD, 0);
        assert_eq!(g.flush(16), [KBD_ACK]);
        // An empty buffer reads the last byte again; the neighbours read 0.
        assert_eq!(g.data(), KBD_ACK);
        for port in 0x61..=0x63 {
            let mut b = [0xff];
            assert!(g.bus.read(port, &mut b));
            assert_eq!(b, [0]);
        }
        assert_eq!(g.events.take(), None);
    }

    #[test]
    fn linux_probes_a_translating_controller() {
        let g = Guest::new();
        let ctr = linux_controller_init(&g);
        assert_ne!(ctr & CTR_XLATE, 0);
        let irqs = g.irq1.count();
        // atkbd_probe: the identify reply goes through the translation.
        assert_eq!(g.keyboard(&[0xf2]), [KBD_ACK, 0xab, 0x41]);
        assert_eq!(g.irq1.count(), irqs + 3, "one interrupt per reply byte");
        // atkbd_deactivate, atkbd_reset_state, atkbd_activate.
        assert_eq!(g.keyboard(&[0xf5]), [KBD_ACK]);
        assert_eq!(g.keyboard(&[0xed, 0x00]), [KBD_ACK, KBD_ACK]);
        assert_eq!(g.keyboard(&[0xf3, 0x00]), [KBD_ACK, KBD_ACK]);
        assert_eq!(g.keyboard(&[0xf4]), [KBD_ACK]);
        // Asking for the scancode set: set 2 reads 0x41 through the translation.
        assert_eq!(g.keyboard(&[0xf0, 0x00]), [KBD_ACK, KBD_ACK, 0x41]);
        assert_eq!(g.irq12.count(), 0);
        assert_eq!(g.events.take(), None);
    }

    #[test]
    fn linux_probes_a_direct_controller() {
        let g = Guest::new();
        g.write_ctr(INITIAL_CTR & !CTR_XLATE);
        let ctr = linux_controller_init(&g);
        assert_eq!(ctr & CTR_XLATE, 0);
        assert_eq!(g.keyboard(&[0xf2]), [KBD_ACK, 0xab, 0x83]);
        assert_eq!(g.keyboard(&[0xf0, 0x00]), [KBD_ACK, KBD_ACK, 0x02]);
        // atkbd.set=3: select it and read it back.
        assert_eq!(g.keyboard(&[0xf0, 0x03]), [KBD_ACK, KBD_ACK]);
        assert_eq!(g.keyboard(&[0xf0, 0x00]), [KBD_ACK, KBD_ACK, 0x03]);
        assert_eq!(g.keyboard(&[0xfa]), [KBD_ACK]);
        assert_eq!(g.keyboard(&[0xf0, 0x04]), [KBD_ACK, KBD_RESEND]);
    }

    #[test]
    fn keyboard_reset_echo_resend_and_unknown_commands() {
        let g = Guest::new();
        assert_eq!(g.keyboard(&[0xff]), [KBD_ACK, KBD_BAT_OK]);
        assert_eq!(g.keyboard(&[0xee]), [KBD_ECHO]);
        assert_eq!(g.keyboard(&[0xfe]), [KBD_ECHO]);
        assert_eq!(g.keyboard(&[0x01]), [KBD_RESEND]);
        assert_eq!(g.keyboard(&[0xfb]), [KBD_RESEND]);
        assert_eq!(g.keyboard(&[0xf6]), [KBD_ACK]);
        // LEDs, then a command where the parameter should be: the command wins.
        assert_eq!(g.keyboard(&[0xed, 0x07]), [KBD_ACK, KBD_ACK]);
        assert_eq!(g.i8042.lock().unwrap().keyboard.leds, 7);
        assert_eq!(g.keyboard(&[0xed, 0xf2]), [KBD_ACK, KBD_ACK, 0xab, 0x41]);
        assert_eq!(g.events.take(), None, "keyboard commands never reset the CPU");
    }

    #[test]
    fn a_command_cancels_what_the_keyboard_still_had_to_send() {
        let g = Guest::new();
        assert!(g.i8042.lock().unwrap().ctrl_alt_del());
        g.write(0xf2);
        // The first key byte was already in the controller; the rest is gone.
        assert_eq!(g.flush(16), [0x1d, KBD_ACK, 0xab, 0x41]);
    }

    #[test]
    fn reset_requests() {
        let g = Guest::new();
        // A data byte 0xFE is a keyboard resend, not a reset.
        g.command(0xaa);
        g.write(0xfe);
        assert_eq!(g.events.take(), None);
        g.command(0xfe);
        assert_eq!(g.events.eventfd().read().unwrap(), 1);
        assert_eq!(g.events.take(), Some(PlatformRequest::Reset));
        // Pulses that leave the reset line alone (0xFF is a classic no-op).
        g.command(0xff);
        g.command(0xfd);
        assert_eq!(g.events.take(), None);
        g.command(0xf0);
        assert_eq!(g.events.take(), Some(PlatformRequest::Reset));
        // The output port: A20 on, reset line high, then low.
        g.command(0xd1);
        g.write(0xdf);
        assert_eq!(g.events.take(), None);
        g.flush(16);
        // Bits 4/5 report the output buffer, empty when the port is read.
        assert_eq!(g.ask(0xd0), 0xcf);
        g.command(0xd1);
        g.write(0xde);
        assert_eq!(g.events.take(), Some(PlatformRequest::Reset));
    }

    #[test]
    fn controller_ram_and_test_commands() {
        let g = Guest::new();
        for i in 1..32u8 {
            g.command(0x60 + i);
            g.write(i * 3);
        }
        for i in 1..32u8 {
            assert_eq!(g.ask(0x20 + i), i * 3);
        }
        assert_eq!(g.ask(0x20), INITIAL_CTR, "other RAM bytes leave the CTR alone");
        assert_eq!(g.ask(0xab), 0x00);
        assert_eq!(g.ask(0xa9), 0x00);
        assert_eq!(g.ask(0xc0), INPUT_PORT);
        // Unknown commands answer nothing and leave the next data byte to the keyboard.
        g.command(0x60);
        g.command(0x05);
        assert_eq!(g.status() & STR_OBF, 0);
        g.write(0xee);
        assert_eq!(g.flush(16), [KBD_ECHO]);
        assert_eq!(g.ask(0x20), INITIAL_CTR);
        // The self-test sets the system flag.
        g.write_ctr(INITIAL_CTR & !CTR_SYS);
        assert_eq!(g.status() & STR_SYS, 0);
        assert_eq!(g.ask(0xaa), 0x55);
        assert_ne!(g.status() & STR_SYS, 0);
        assert_ne!(g.ask(0x20) & CTR_SYS, 0);
    }

    #[test]
    fn keyboard_output_buffer_write_is_not_translated() {
        let g = Guest::new();
        let before = g.irq1.count();
        g.command(0xd2);
        g.write(0x14);
        assert_eq!(g.status() & (STR_OBF | STR_AUXDATA), STR_OBF);
        assert_eq!(g.data(), 0x14);
        assert_eq!(g.irq1.count(), before + 1);
    }

    #[test]
    fn aux_port_without_a_mouse() {
        let g = Guest::new();
        // i8042_toggle_aux
        g.command(0xa8);
        assert_eq!(g.ask(0x20) & CTR_AUXDIS, 0);
        g.command(0xa7);
        assert_ne!(g.ask(0x20) & CTR_AUXDIS, 0);
        // The loop-back answers from the aux port, even while it is disabled.
        g.command(0xd3);
        g.write(0x5a);
        assert_eq!(g.status() & (STR_OBF | STR_AUXDATA), STR_OBF | STR_AUXDATA);
        assert_eq!(g.data(), 0x5a);
        assert_eq!(g.irq12.count(), 0, "aux interrupt is off");
        // i8042_set_mux_mode: a plain loop-back is not a multiplexer.
        g.write_ctr(INITIAL_CTR & !CTR_AUXDIS | CTR_AUXINT);
        for byte in [0xf0, 0x56, 0xa4] {
            g.command(0xd3);
            g.write(byte);
            assert_ne!(g.status() & STR_AUXDATA, 0);
            assert_eq!(g.data(), byte);
        }
        assert_eq!(g.irq12.count(), 3);
        // A byte for the mouse times out at once.
        let irq1 = g.irq1.count();
        g.command(0xd4);
        g.write(0xf2);
        assert_eq!(g.status() & (STR_OBF | STR_AUXDATA | STR_TIMEOUT), STR_OBF | STR_AUXDATA | STR_TIMEOUT);
        assert_eq!(g.data(), KBD_RESEND);
        assert_eq!(g.status() & (STR_OBF | STR_TIMEOUT), 0);
        assert_eq!(g.irq12.count(), 4);
        assert_eq!(g.irq1.count(), irq1, "aux bytes never raise IRQ 1");
        // ...and was not taken for a keyboard command.
        assert!(g.flush(16).is_empty());
    }

    #[test]
    fn ctrl_alt_del_translated() {
        let g = Guest::new();
        linux_controller_init(&g);
        let irqs = g.irq1.count();
        assert!(g.i8042.lock().unwrap().ctrl_alt_del());
        assert_eq!(g.flush(16), [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
        assert_eq!(g.irq1.count(), irqs + 8);
        assert_eq!(g.events.take(), None, "typing is not a platform request");
    }

    #[test]
    fn ctrl_alt_del_untranslated_in_each_set() {
        let g = Guest::new();
        g.write_ctr(INITIAL_CTR & !CTR_XLATE);
        linux_controller_init(&g);
        let irqs = g.irq1.count();
        assert!(g.i8042.lock().unwrap().ctrl_alt_del());
        assert_eq!(g.flush(16), CTRL_ALT_DEL_SET2);
        assert_eq!(g.irq1.count(), irqs + CTRL_ALT_DEL_SET2.len());
        g.keyboard(&[0xf0, 0x01]);
        assert!(g.i8042.lock().unwrap().ctrl_alt_del());
        assert_eq!(g.flush(16), CTRL_ALT_DEL_SET1);
        g.keyboard(&[0xf0, 0x03]);
        assert!(g.i8042.lock().unwrap().ctrl_alt_del());
        assert_eq!(g.flush(16), CTRL_ALT_DEL_SET3);
    }

    #[test]
    fn typed_keys_are_bounded_and_need_scanning() {
        let g = Guest::new();
        let mut k = g.i8042.lock().unwrap();
        // One byte moves into the controller; the keyboard holds the rest.
        let typed = (0..100).filter(|_| k.ctrl_alt_del()).count();
        assert_eq!(typed, KEYBOARD_BUFFER / CTRL_ALT_DEL_SET2.len());
        drop(k);
        let mut got = Vec::new();
        while g.status() & STR_OBF != 0 {
            got.push(g.data());
        }
        assert_eq!(got.len(), typed * 8);
        assert!(got.chunks(8).all(|c| c == [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]));
        // Scanning off: nothing is typed.
        assert_eq!(g.keyboard(&[0xf5]), [KBD_ACK]);
        assert!(!g.i8042.lock().unwrap().ctrl_alt_del());
        assert_eq!(g.status() & STR_OBF, 0);
        assert_eq!(g.keyboard(&[0xf4]), [KBD_ACK]);
        assert!(g.i8042.lock().unwrap().ctrl_alt_del());
    }

    #[test]
    fn a_disabled_keyboard_interface_holds_keys_and_interrupts() {
        let g = Guest::new();
        g.command(0xad);
        g.write_ctr((INITIAL_CTR | CTR_KBDDIS) & !CTR_KBDINT);
        let irqs = g.irq1.count();
        assert!(g.i8042.lock().unwrap().ctrl_alt_del());
        assert_eq!(g.status() & STR_OBF, 0, "held by the keyboard");
        // Enabling the interface with the interrupt off: readable, no interrupt.
        g.command(0xae);
        assert_ne!(g.status() & STR_OBF, 0);
        assert_eq!(g.irq1.count(), irqs);
        // Turning the interrupt on while a byte waits raises it.
        g.write_ctr(INITIAL_CTR);
        assert_eq!(g.irq1.count(), irqs + 1);
        assert_eq!(g.flush(16).len(), 8);
        assert_eq!(g.irq1.count(), irqs + 8);
    }

    #[test]
    fn controller_replies_interrupt_only_when_enabled() {
        let g = Guest::new();
        assert_eq!(g.ask(0x20), INITIAL_CTR);
        assert_eq!(g.irq1.count(), 1);
        g.write_ctr(INITIAL_CTR & !CTR_KBDINT);
        assert_eq!(g.ask(0x20), INITIAL_CTR & !CTR_KBDINT);
        assert_eq!(g.ask(0xaa), 0x55);
        assert_eq!(g.irq1.count(), 1);
        assert_eq!(g.irq12.count(), 0);
    }

    #[test]
    fn translation_table_matches_known_keys() {
        // Esc, A, Enter, Space, F7, SysRq, KP 0, F11, and pass-through replies.
        for (set2, set1) in [
            (0x76, 0x01),
            (0x1c, 0x1e),
            (0x5a, 0x1c),
            (0x29, 0x39),
            (0x83, 0x41),
            (0x84, 0x54),
            (0x70, 0x52),
            (0x78, 0x57),
            (0xfa, 0xfa),
            (0xab, 0xab),
            (0xaa, 0xaa),
        ] {
            assert_eq!(translate(set2), set1, "set 2 code {set2:#x}");
        }
    }

    /// A controller Linux has probed, with the keyboard in set 3, LEDs on,
    /// RAM written, Ctrl-Alt-Del typed (one byte in the buffer, the rest in
    /// the keyboard) and an output-port command waiting for its byte.
    fn busy_guest() -> Guest {
        let g = Guest::new();
        g.write_ctr(INITIAL_CTR & !CTR_XLATE);
        linux_controller_init(&g);
        assert_eq!(g.keyboard(&[0xf0, 0x03]), [KBD_ACK, KBD_ACK]);
        assert_eq!(g.keyboard(&[0xed, 0x05]), [KBD_ACK, KBD_ACK]);
        g.command(0x65);
        g.write(0x42);
        assert!(g.i8042.lock().unwrap().ctrl_alt_del());
        g.command(0xd1);
        g
    }

    /// Everything the guest reads, finishing the pending command and
    /// draining the buffer.
    fn guest_view(g: &Guest) -> Vec<u8> {
        let mut v = vec![g.status()];
        g.write(0xdd);
        v.push(g.status());
        v.extend(g.flush(16));
        v.push(g.data());
        for cmd in [0x20, 0x25, 0xd0] {
            v.push(g.ask(cmd));
        }
        v.extend(g.keyboard(&[0xf0, 0x00]));
        v.extend(g.keyboard(&[0xfe]));
        v
    }

    #[test]
    fn save_and_restore_carry_controller_and_keyboard() {
        let original = busy_guest();
        let state = original.i8042.lock().unwrap().save();
        assert_eq!(state.output, Some(I8042Byte { value: CTRL_ALT_DEL_SET3[0], aux: false, timeout: false }));
        assert_eq!(state.keyboard.queue, CTRL_ALT_DEL_SET3[1..]);
        assert_eq!(state.expect, Some(I8042Param::OutputPort));
        assert_eq!((state.keyboard.scancode_set, state.keyboard.leds, state.ram[5]), (3, 5, 0x42));
        let state: I8042State = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();

        let restored = Guest::new();
        restored.i8042.lock().unwrap().restore(state.clone()).unwrap();
        assert_eq!(restored.irq1.count(), 1, "the waiting byte interrupts again");
        assert_eq!(restored.irq12.count(), 0);
        assert_eq!(restored.i8042.lock().unwrap().save(), state);

        let view = guest_view(&original);
        assert_eq!(view[0], STR_OBF | STR_SYS | STR_CMD | STR_UNLOCKED);
        assert_eq!(view[2..11], CTRL_ALT_DEL_SET3);
        assert_eq!(view[12..15], [INITIAL_CTR & !CTR_XLATE, 0x42, 0xcd]);
        assert_eq!(view[15..], [KBD_ACK, KBD_ACK, 0x03, 0x03]);
        assert_eq!(guest_view(&restored), view);
        assert_eq!(restored.i8042.lock().unwrap().save(), original.i8042.lock().unwrap().save());
        assert_eq!(restored.events.take(), None);
    }

    #[test]
    fn restore_raises_an_aux_byte_on_irq12_only_when_enabled() {
        let g = Guest::new();
        g.write_ctr(INITIAL_CTR & !CTR_AUXDIS | CTR_AUXINT);
        g.command(0xd4);
        g.write(0xf2);
        let state = g.i8042.lock().unwrap().save();
        assert_eq!(state.output, Some(I8042Byte { value: KBD_RESEND, aux: true, timeout: true }));
        let restored = Guest::new();
        restored.i8042.lock().unwrap().restore(state.clone()).unwrap();
        assert_eq!((restored.irq1.count(), restored.irq12.count()), (0, 1));
        assert_eq!(restored.status(), g.status());
        let mut quiet = state;
        quiet.ram[0] &= !CTR_AUXINT;
        let restored = Guest::new();
        restored.i8042.lock().unwrap().restore(quiet).unwrap();
        assert_eq!((restored.irq1.count(), restored.irq12.count()), (0, 0));
        assert_eq!(restored.data(), KBD_RESEND);
    }

    #[test]
    fn hostile_states_are_refused_and_change_nothing() {
        let g = busy_guest();
        let good = g.i8042.lock().unwrap().save();
        let irqs = g.irq1.count();
        let bad: [fn(&mut I8042State); 11] = [
            |st| st.ram.push(0),
            |st| {
                st.ram.pop();
            },
            |st| st.expect = Some(I8042Param::Ram { index: 32 }),
            |st| st.keyboard.queue = vec![0; KEYBOARD_BUFFER + 1],
            |st| st.keyboard.scancode_set = 0,
            |st| st.keyboard.scancode_set = 4,
            |st| st.keyboard.leds = 8,
            |st| st.output.as_mut().unwrap().timeout = true,
            |st| {
                st.reply = st.output.take();
                st.keyboard.queue.clear();
            },
            |st| st.output = None,
            |st| st.break_pending = true,
        ];
        for (i, spoil) in bad.iter().enumerate() {
            let mut state = good.clone();
            spoil(&mut state);
            let e = g.i8042.lock().unwrap().restore(state).expect_err(&format!("case {i} accepted"));
            assert_eq!(e.device, "i8042");
            assert_eq!(g.i8042.lock().unwrap().save(), good, "case {i}");
        }
        assert_eq!(g.irq1.count(), irqs);
        // An empty buffer with a disabled interface may hold keyboard bytes.
        let mut held = good.clone();
        held.output = None;
        held.ram[0] |= CTR_KBDDIS;
        g.i8042.lock().unwrap().restore(held).unwrap();
        assert_eq!(g.status() & STR_OBF, 0);
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        fn access() -> impl Strategy<Value = (u64, bool, u8)> {
            (0x5fu64..0x66, any::<bool>(), prop_oneof![any::<u8>(), 0xd0u8..=0xd4, 0xf0u8..=0xff])
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            /// Any sequence of accesses and typing leaves a controller that
            /// never reports a busy input buffer and drains in bounded reads.
            #[test]
            fn never_panics_and_stays_bounded(
                ops in proptest::collection::vec(access(), 0..300),
                typing in proptest::collection::vec(any::<bool>(), 300),
            ) {
                let g = Guest::new();
                for (&(port, write, byte), &typed) in ops.iter().zip(&typing) {
                    let mut b = [byte];
                    if write {
                        g.bus.write(port, &b);
                    } else {
                        g.bus.read(port, &mut b);
                    }
                    if typed {
                        g.i8042.lock().unwrap().ctrl_alt_del();
                    }
                    prop_assert_eq!(g.status() & 0x02, 0);
                }
                // Release anything held, then drain.
                g.write_ctr(INITIAL_CTR);
                let mut reads = 0;
                while g.status() & STR_OBF != 0 {
                    g.data();
                    reads += 1;
                    prop_assert!(reads <= KEYBOARD_BUFFER + 2, "output never drains");
                }
            }

            /// Every state a guest can reach is accepted by a restore and
            /// reproduced exactly: the checks refuse only the unreachable.
            #[test]
            fn every_reachable_state_round_trips(
                ops in proptest::collection::vec(access(), 0..300),
                typing in proptest::collection::vec(any::<bool>(), 300),
            ) {
                let g = Guest::new();
                for (&(port, write, byte), &typed) in ops.iter().zip(&typing) {
                    let mut b = [byte];
                    if write {
                        g.bus.write(port, &b);
                    } else {
                        g.bus.read(port, &mut b);
                    }
                    if typed {
                        g.i8042.lock().unwrap().ctrl_alt_del();
                    }
                    let state = g.i8042.lock().unwrap().save();
                    let mut fresh = I8042::new(g.events.clone());
                    prop_assert!(fresh.restore(state.clone()).is_ok(), "refused {state:?}");
                    prop_assert_eq!(fresh.save(), state);
                }
            }
        }
    }
}
