//! COM1: a 16550A UART (vm-superio's `Serial`) on the port I/O bus.
//!
//! The guest's output goes byte by byte to a `Write` sink the worker supplies
//! (it fans out to the console log and the live console stream). Input arrives
//! through [`Serial::enqueue_input`]; bytes that do not fit the 64-byte receive
//! FIFO wait in a bounded backlog and move into the FIFO as the guest drains it,
//! so the worker never has to retry.
//!
//! # Saved state
//! [`SerialState`] is the UART's registers and receive FIFO (vm-superio's own
//! `SerialState`, which has no serde) plus the backlog: console input the
//! guest has not read yet survives a migration. The output sink and the IRQ
//! line are the destination's own.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::{NoEvents, SerialState as UartState};
use vm_superio::{Serial as Uart, Trigger};

use super::bus::BusDevice;
use super::interrupt::{InterruptError, IrqLine};
use crate::state::StateError;

/// First port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Number of ports COM1 decodes.
pub const COM1_LEN: u64 = 8;
/// The legacy IRQ line of COM1 (IOAPIC pin / GSI 4).
pub const COM1_IRQ: u32 = 4;
/// Input bytes held beyond the FIFO before new input is refused.
pub const INPUT_BACKLOG: usize = 64 * 1024;
/// The 16550A's receive FIFO, as vm-superio sizes it (its constant is private;
/// a test checks the two agree).
const RX_FIFO: usize = 64;

// The register bits a saved state is checked against; vm-superio keeps its
// own copies private.
/// IER: the four interrupt enables of a 16550A.
const IER_VALID: u8 = 0x0f;
/// IIR as stored (the FIFO bits are added on read): no interrupt, or any mix
/// of THR empty (0x02) and received data (0x04).
const IIR_NONE: u8 = 0x01;
const IIR_THR_EMPTY: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const LSR_DATA_READY: u8 = 0x01;

/// The guest's console output sink.
pub type SerialOut = Box<dyn Write + Send>;

/// vm-superio raises its interrupt through a `Trigger`; ours is an `IrqLine`.
struct IrqTrigger(Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = InterruptError;

    fn trigger(&self) -> Result<(), InterruptError> {
        self.0.trigger()
    }
}

/// COM1's guest-visible state, saved by [`Serial::save`]. The first nine
/// fields mirror vm-superio's `SerialState`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte (offset 0 with LCR.DLAB set).
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte (offset 1 with LCR.DLAB set).
    pub baud_divisor_high: u8,
    /// IER: only the low four bits exist.
    pub interrupt_enable: u8,
    /// IIR without the FIFO bits: 0x01 (none) or a mix of 0x02 (THR empty)
    /// and 0x04 (received data), each pending until the guest acknowledges it.
    pub interrupt_identification: u8,
    pub line_control: u8,
    /// LSR: THR empty and idle always; data ready exactly when `rx_fifo` is not empty.
    pub line_status: u8,
    pub modem_control: u8,
    /// MSR: fixed in this model (DCD, DSR, CTS; no modem lines move).
    pub modem_status: u8,
    pub scratch: u8,
    /// The receive FIFO, oldest byte first, at most 64 bytes.
    pub rx_fifo: Vec<u8>,
    /// Console input behind the FIFO, oldest first, at most [`INPUT_BACKLOG`] bytes.
    pub backlog: Vec<u8>,
}

impl SerialState {
    /// Refuses what this UART could never have been in. Checked in full before
    /// a restore touches anything.
    fn check(&self) -> Result<(), StateError> {
        let err = |reason: String| Err(StateError::new("serial", reason));
        if self.rx_fifo.len() > RX_FIFO {
            return err(format!("rx_fifo holds {} bytes, the FIFO 0..={RX_FIFO}", self.rx_fifo.len()));
        }
        if self.backlog.len() > INPUT_BACKLOG {
            return err(format!("backlog holds {} bytes, allowed 0..={INPUT_BACKLOG}", self.backlog.len()));
        }
        if self.interrupt_enable & !IER_VALID != 0 {
            return err(format!(
                "interrupt_enable {:#04x} has bits outside {IER_VALID:#04x}",
                self.interrupt_enable
            ));
        }
        let iir = self.interrupt_identification;
        if iir != IIR_NONE && (iir == 0 || iir & !(IIR_THR_EMPTY | IIR_RDA) != 0) {
            return err(format!("interrupt_identification {iir:#04x} is not 0x01 or a mix of 0x02 and 0x04"));
        }
        if iir & IIR_RDA != 0 && self.rx_fifo.is_empty() {
            return err("a received-data interrupt is pending with an empty rx_fifo".into());
        }
        // The model never moves the other LSR bits, nor any MSR bit.
        let idle = UartState::default();
        let lsr = idle.line_status | if self.rx_fifo.is_empty() { 0 } else { LSR_DATA_READY };
        if self.line_status != lsr {
            return err(format!(
                "line_status {:#04x} with {} FIFO bytes, expected {lsr:#04x}",
                self.line_status,
                self.rx_fifo.len()
            ));
        }
        if self.modem_status != idle.modem_status {
            return err(format!(
                "modem_status {:#04x}, this UART has {:#04x}",
                self.modem_status, idle.modem_status
            ));
        }
        Ok(())
    }

    fn uart(&self) -> UartState {
        UartState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.rx_fifo.clone(),
        }
    }
}

/// COM1 as the worker holds it: insert it on the port bus at [`COM1_PORT`] and
/// keep a handle to feed console input.
pub struct Serial {
    uart: Uart<IrqTrigger, NoEvents, SerialOut>,
    backlog: VecDeque<u8>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").field("backlog", &self.backlog.len()).finish()
    }
}

impl Serial {
    pub fn new(irq: Arc<dyn IrqLine>, out: SerialOut) -> Self {
        Self { uart: Uart::new(IrqTrigger(irq), out), backlog: VecDeque::new() }
    }

    /// Queues console input for the guest; returns how many bytes were taken
    /// (fewer than `input.len()` only when the backlog is full).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = INPUT_BACKLOG.saturating_sub(self.backlog.len());
        let taken = input.len().min(room);
        self.backlog.extend(&input[..taken]);
        self.refill_fifo();
        taken
    }

    /// Bytes waiting behind the FIFO.
    pub fn pending_input(&self) -> usize {
        self.backlog.len()
    }

    /// The registers, the FIFO and the backlog.
    pub fn save(&self) -> SerialState {
        let uart = self.uart.state();
        SerialState {
            baud_divisor_low: uart.baud_divisor_low,
            baud_divisor_high: uart.baud_divisor_high,
            interrupt_enable: uart.interrupt_enable,
            interrupt_identification: uart.interrupt_identification,
            line_control: uart.line_control,
            line_status: uart.line_status,
            modem_control: uart.modem_control,
            modem_status: uart.modem_status,
            scratch: uart.scratch,
            rx_fifo: uart.in_buffer,
            backlog: self.backlog.iter().copied().collect(),
        }
    }

    /// Loads `state` into this port, keeping its own IRQ line and output sink.
    /// An interrupt pending and enabled in `state` is raised again (what the
    /// UART's level output would do; a duplicate costs the guest one IIR read
    /// that says "none"). On error the port is unchanged.
    pub fn restore(&mut self, state: SerialState) -> Result<(), StateError> {
        state.check()?;
        let irq = self.uart.interrupt_evt().0.clone();
        // Built aside with a placeholder sink, so a failure leaves `self` as it
        // was; the real sink moves over only once nothing can fail.
        let placeholder: SerialOut = Box::new(std::io::sink());
        let mut uart = Uart::from_state(&state.uart(), IrqTrigger(irq), NoEvents, placeholder)
            .map_err(|e| StateError::new("serial", format!("cannot raise the restored interrupt: {e}")))?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        self.backlog = state.backlog.into();
        Ok(())
    }

    fn refill_fifo(&mut self) {
        let room = self.uart.fifo_capacity();
        if room == 0 || self.backlog.is_empty() {
            return;
        }
        let n = room.min(self.backlog.len());
        let chunk: Vec<u8> = self.backlog.iter().take(n).copied().collect();
        match self.uart.enqueue_raw_bytes(&chunk) {
            Ok(taken) => {
                self.backlog.drain(..taken);
            }
            Err(e) => tracing::warn!(error = ?e, "serial input not delivered"),
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers; wider accesses read the first one.
        data.fill(0);
        if offset >= COM1_LEN || data.is_empty() {
            return;
        }
        data[0] = self.uart.read(offset as u8);
        if offset == 0 {
            // The guest just took a byte: make room for the backlog.
            self.refill_fifo();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        if offset >= COM1_LEN {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, byte) {
            // A lost console byte or a failed interrupt is not the guest's fault
            // and must not stop it.
            tracing::debug!(error = ?e, "serial write");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct CountingIrq(AtomicUsize);
    impl IrqLine for CountingIrq {
        fn trigger(&self) -> Result<(), InterruptError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct SharedSink(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const MSR: u64 = 6;
    const SCR: u64 = 7;
    const DLAB: u8 = 0x80;

    fn read(s: &mut Serial, off: u64) -> u8 {
        let mut b = [0u8];
        s.read(off, &mut b);
        b[0]
    }

    #[test]
    fn output_reaches_the_sink_and_thr_empty_interrupts() {
        let irq = Arc::new(CountingIrq::default());
        let sink = SharedSink::default();
        let mut s = Serial::new(irq.clone(), Box::new(sink.clone()));
        s.write(IER, &[0x02]); // THR empty interrupt on
        for b in b"hi\n" {
            s.write(DATA, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
        // Out-of-range offsets and empty accesses are ignored.
        s.write(9, &[1]);
        s.write(DATA, &[]);
        let mut wide = [0xaau8; 4];
        s.read(LSR, &mut wide);
        assert_eq!(&wide[1..], &[0, 0, 0]);
    }

    #[test]
    fn input_beyond_the_fifo_waits_in_the_backlog() {
        let irq = Arc::new(CountingIrq::default());
        let mut s = Serial::new(irq.clone(), Box::new(std::io::sink()));
        s.write(IER, &[0x01]); // received-data interrupt on
        let input: Vec<u8> = (0..200u8).collect();
        assert_eq!(s.enqueue_input(&input), 200);
        assert_eq!(s.pending_input(), 200 - 64);
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
        let mut got = Vec::new();
        while read(&mut s, LSR) & 1 == 1 {
            got.push(read(&mut s, DATA));
        }
        assert_eq!(got, input);
        assert_eq!(s.pending_input(), 0);
    }

    #[test]
    fn a_full_backlog_refuses_input() {
        let mut s = Serial::new(Arc::new(CountingIrq::default()), Box::new(std::io::sink()));
        let big = vec![b'x'; INPUT_BACKLOG + 1000];
        let taken = s.enqueue_input(&big);
        assert_eq!(taken, INPUT_BACKLOG);
        // 64 bytes moved into the FIFO, so exactly that much room is back.
        assert_eq!(s.enqueue_input(&big), 64);
        assert_eq!(s.enqueue_input(&big), 0);
    }

    #[test]
    fn fifo_size_matches_vm_superio() {
        let s = Serial::new(Arc::new(CountingIrq::default()), Box::new(std::io::sink()));
        assert_eq!(s.uart.fifo_capacity(), RX_FIFO);
    }

    /// A port a guest has configured (57600 baud, 7E1, RDA interrupt on,
    /// loop-back off, scratch written) with 100 bytes of unread input.
    fn configured() -> (Serial, Arc<CountingIrq>, SharedSink) {
        let irq = Arc::new(CountingIrq::default());
        let sink = SharedSink::default();
        let mut s = Serial::new(irq.clone(), Box::new(sink.clone()));
        s.write(LCR, &[DLAB | 0x1a]);
        s.write(DATA, &[0x02]);
        s.write(IER, &[0x00]);
        s.write(LCR, &[0x1a]);
        s.write(IER, &[0x01]);
        s.write(MCR, &[0x0b]);
        s.write(SCR, &[0x5a]);
        let input: Vec<u8> = (0..100u8).collect();
        assert_eq!(s.enqueue_input(&input), 100);
        (s, irq, sink)
    }

    /// Everything the guest can read, in an order that also drains the input.
    fn guest_view(s: &mut Serial) -> Vec<u8> {
        let mut v: Vec<u8> = [IER, LCR, MCR, LSR, MSR, SCR, IIR, IIR].iter().map(|&r| read(s, r)).collect();
        let lcr = read(s, LCR);
        s.write(LCR, &[lcr | DLAB]);
        v.extend([read(s, DATA), read(s, IER)]);
        s.write(LCR, &[lcr]);
        while read(s, LSR) & 1 == 1 {
            v.push(read(s, DATA));
        }
        v.push(read(s, IIR));
        v
    }

    #[test]
    fn save_and_restore_carry_registers_fifo_and_backlog() {
        let (mut original, _, old_sink) = configured();
        let state = original.save();
        assert_eq!(state.rx_fifo.len(), 64);
        assert_eq!(state.backlog.len(), 36);
        assert_eq!((state.baud_divisor_low, state.baud_divisor_high), (0x02, 0x00));
        // Through the wire format, as a migration carries it.
        let state: SerialState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();

        let irq = Arc::new(CountingIrq::default());
        let sink = SharedSink::default();
        let mut restored = Serial::new(irq.clone(), Box::new(sink.clone()));
        restored.restore(state.clone()).unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 1, "the pending received-data interrupt is raised again");
        assert_eq!(restored.save(), state);
        assert_eq!(restored.pending_input(), 36);

        let view = guest_view(&mut original);
        assert_eq!(view[..8], [0x01, 0x1a, 0x0b, 0x61, 0xb0, 0x5a, 0xc4, 0xc1]);
        assert_eq!(view[8..10], [0x02, 0x00]);
        assert_eq!(view[10..110], (0..100u8).collect::<Vec<_>>());
        assert_eq!(guest_view(&mut restored), view);
        assert_eq!(restored.save(), original.save());

        // The restored port writes to its own sink.
        restored.write(DATA, b"x");
        assert_eq!(&*sink.0.lock().unwrap(), b"x");
        assert!(old_sink.0.lock().unwrap().is_empty());
    }

    #[test]
    fn restoring_an_idle_state_raises_nothing() {
        let irq = Arc::new(CountingIrq::default());
        let mut s = Serial::new(irq.clone(), Box::new(std::io::sink()));
        s.restore(Serial::new(Arc::new(CountingIrq::default()), Box::new(std::io::sink())).save()).unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 0);
        // THR empty pending and enabled: raised again.
        let mut state = s.save();
        state.interrupt_enable = 0x02;
        state.interrupt_identification = IIR_THR_EMPTY;
        s.restore(state).unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(read(&mut s, IIR), 0xc2);
    }

    #[test]
    fn hostile_states_are_refused_and_change_nothing() {
        let (mut s, irq, sink) = configured();
        let good = s.save();
        let irqs = irq.0.load(Ordering::SeqCst);
        let bad: [fn(&mut SerialState); 9] = [
            |st| st.rx_fifo.push(0),
            |st| st.backlog = vec![0; INPUT_BACKLOG + 1],
            |st| st.interrupt_enable = 0x10,
            |st| st.interrupt_identification = 0x00,
            |st| st.interrupt_identification = 0x08,
            |st| st.line_status = 0x60,
            |st| st.modem_status = 0x00,
            |st| {
                st.rx_fifo.clear();
                st.line_status = 0x60;
            },
            |st| st.line_status |= 0x80,
        ];
        for (i, spoil) in bad.iter().enumerate() {
            let mut state = good.clone();
            spoil(&mut state);
            let e = s.restore(state).expect_err(&format!("case {i} accepted"));
            assert_eq!(e.device, "serial");
            assert_eq!(s.save(), good, "case {i}");
        }
        assert_eq!(irq.0.load(Ordering::SeqCst), irqs);
        s.write(DATA, b"y");
        assert_eq!(&*sink.0.lock().unwrap(), b"y", "the sink is still in place");
    }

    mod reachable {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            /// Every state a guest (and console input) can reach is accepted by
            /// a restore and saved again unchanged: the checks refuse only the
            /// unreachable.
            #[test]
            fn every_reachable_state_round_trips(
                ops in proptest::collection::vec((0u64..8, any::<u8>(), 0u8..3, 0usize..100), 0..200),
            ) {
                let mut s = Serial::new(Arc::new(CountingIrq::default()), Box::new(std::io::sink()));
                for (offset, value, kind, input) in ops {
                    match kind {
                        0 => s.write(offset, &[value]),
                        1 => {
                            read(&mut s, offset);
                        }
                        _ => {
                            s.enqueue_input(&vec![value; input]);
                        }
                    }
                    let state = s.save();
                    let mut fresh = Serial::new(Arc::new(CountingIrq::default()), Box::new(std::io::sink()));
                    prop_assert!(fresh.restore(state.clone()).is_ok(), "refused {state:?}");
                    prop_assert_eq!(fresh.save(), state);
                }
            }
        }
    }
}
