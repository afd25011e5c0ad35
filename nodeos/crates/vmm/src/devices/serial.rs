//! COM1: a 16550A UART (vm-superio's `Serial`) on the port I/O bus.
//!
//! The guest's output goes byte by byte to a `Write` sink the worker supplies
//! (it fans out to the console log and the live console stream). Input arrives
//! through [`Serial::enqueue_input`]; bytes that do not fit the 64-byte receive
//! FIFO wait in a bounded backlog and move into the FIFO as the guest drains it,
//! so the worker never has to retry.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial as Uart, Trigger};

use super::bus::BusDevice;
use super::interrupt::{InterruptError, IrqLine};

/// First port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Number of ports COM1 decodes.
pub const COM1_LEN: u64 = 8;
/// The legacy IRQ line of COM1 (IOAPIC pin / GSI 4).
pub const COM1_IRQ: u32 = 4;
/// Input bytes held beyond the FIFO before new input is refused.
pub const INPUT_BACKLOG: usize = 64 * 1024;

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
    const LSR: u64 = 5;

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
}
