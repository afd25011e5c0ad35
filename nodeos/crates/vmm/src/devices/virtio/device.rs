//! The contract between the virtio transport and a device model.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::NO_VECTOR;
use crate::devices::pci::Msix;
use crate::memory::GuestMem;

/// ISR bit: a queue has used buffers.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: the configuration changed (or the device needs a reset).
pub const ISR_CONFIG: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {index} was not enabled by the driver")]
    QueueNotReady { index: usize },
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot start the device's I/O thread")]
    Thread(#[source] std::io::Error),
}

/// What a device model implements; the transport owns it and calls it from
/// vCPU threads under the transport's lock.
///
/// Lifecycle: [`VirtioDevice::activate`] once the driver sets DRIVER_OK (the
/// device starts its I/O thread and owns the queues from then on);
/// [`VirtioDevice::reset`] when the driver writes status 0, before any new
/// activation, and when the transport is dropped: it must stop and join the
/// I/O thread and release everything the activation gave it. Reset on an
/// inactive device does nothing.
pub trait VirtioDevice: Send {
    /// Virtio device type (1 net, 2 block).
    fn device_type(&self) -> u16;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers, VIRTIO_F_VERSION_1 included.
    fn features(&self) -> u64;
    /// Reads of the device-specific configuration; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device-specific configuration (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the I/O thread once the request it is serving is done (in-flight
    /// I/O drains; nothing is cut in half) and returns the queues as they
    /// stand, their avail/used positions included, so the transport can save
    /// them or hand them to a later `activate` that continues exactly there.
    /// A chain taken but not answered is put back on the avail ring. `None`
    /// when the device is not active. The device is inactive afterwards.
    fn quiesce(&mut self) -> Option<Vec<Queue>>;
    fn reset(&mut self);
    /// Asks the driver to announce the guest's addresses, after a live
    /// migration; false when the device or its driver cannot (the default).
    fn announce(&mut self) -> bool {
        false
    }
}

/// Copies device configuration bytes at `offset` into `data`; bytes past the
/// end of `config` read as 0.
pub fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
        *b = at.and_then(|a| config.get(a)).copied().unwrap_or(0);
    }
}

/// Everything a device needs to run, handed over on DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    pub mem: GuestMem,
    /// One per queue of `queue_max_sizes`, in order; a queue the driver did not
    /// enable has `ready() == false`. Enabled queues passed `Queue::is_valid`.
    pub queues: Vec<Queue>,
    /// The doorbell of each queue (duplicates of the transport's eventfds, which
    /// are registered as ioeventfds at the queue's notify address).
    pub notifiers: Vec<EventFd>,
    pub interrupt: Arc<VirtioInterrupt>,
    /// The features the driver accepted.
    pub features: u64,
}

/// Interrupt state shared by the transport (register reads and writes) and the
/// device's I/O thread (signals).
/// [`VirtioInterrupt`]'s registers as saved.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InterruptState {
    pub isr: u8,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub needs_reset: bool,
    pub config_generation: u32,
}

impl InterruptState {
    /// Checks a saved state against a device with `queues` queues and
    /// `vectors` MSI-X vectors.
    pub fn check(&self, queues: usize, vectors: u16) -> Result<(), crate::state::StateError> {
        let err = |r: String| crate::state::StateError::new("virtio interrupt", r);
        if self.queue_vectors.len() != queues {
            return Err(err(format!("{} queue vectors for {queues} queues", self.queue_vectors.len())));
        }
        if self.isr & !(ISR_QUEUE | ISR_CONFIG) != 0 {
            return Err(err(format!("ISR {:#x} has unknown bits", self.isr)));
        }
        for v in std::iter::once(&self.config_vector).chain(&self.queue_vectors) {
            if *v != NO_VECTOR && *v >= vectors {
                return Err(err(format!("vector {v} beyond the {vectors} MSI-X vectors")));
            }
        }
        Ok(())
    }
}

pub struct VirtioInterrupt {
    msix: Arc<Msix>,
    isr: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    needs_reset: AtomicBool,
    config_generation: AtomicU32,
}

impl std::fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioInterrupt")
            .field("isr", &self.isr.load(Ordering::Relaxed))
            .field("needs_reset", &self.needs_reset.load(Ordering::Relaxed))
            .finish()
    }
}

impl VirtioInterrupt {
    pub fn new(msix: Arc<Msix>, queues: usize) -> Self {
        Self {
            msix,
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU32::new(0),
        }
    }

    fn raise(&self, isr: u8, vector: u16) {
        self.isr.fetch_or(isr, Ordering::AcqRel);
        // Without a vector there is no INTx fallback here: the driver polls or
        // reads the ISR.
        if vector != NO_VECTOR
            && let Err(e) = self.msix.trigger(vector)
        {
            tracing::warn!(vector, error = %e, "virtio interrupt not delivered");
        }
    }

    /// Queue `queue` has new used buffers.
    pub fn signal_queue(&self, queue: usize) {
        let vector = self.queue_vectors.get(queue).map_or(NO_VECTOR, |v| v.load(Ordering::Acquire));
        self.raise(ISR_QUEUE, vector);
    }

    /// The device configuration changed: bump the generation and tell the driver.
    pub fn config_changed(&self) {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.raise(ISR_CONFIG, self.config_vector.load(Ordering::Acquire));
    }

    /// The device hit an error it cannot recover from without a reset.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            tracing::warn!("virtio device needs reset");
            self.raise(ISR_CONFIG, self.config_vector.load(Ordering::Acquire));
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Read-to-clear ISR status.
    pub fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    pub fn config_generation(&self) -> u8 {
        self.config_generation.load(Ordering::Acquire) as u8
    }

    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    pub fn set_config_vector(&self, v: u16) {
        self.config_vector.store(v, Ordering::Release);
    }

    pub fn queue_vector(&self, queue: usize) -> u16 {
        self.queue_vectors.get(queue).map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    pub fn set_queue_vector(&self, queue: usize, v: u16) {
        if let Some(slot) = self.queue_vectors.get(queue) {
            slot.store(v, Ordering::Release);
        }
    }

    /// Device reset: vectors unassigned, ISR and NEEDS_RESET cleared. The
    /// generation keeps counting so a driver never sees an old value again.
    /// The interrupt registers, for a snapshot or a migration.
    pub fn save(&self) -> InterruptState {
        InterruptState {
            isr: self.isr.load(Ordering::Acquire),
            config_vector: self.config_vector(),
            queue_vectors: self.queue_vectors.iter().map(|v| v.load(Ordering::Acquire)).collect(),
            needs_reset: self.needs_reset(),
            config_generation: self.config_generation.load(Ordering::Acquire),
        }
    }

    /// Loads registers saved by [`VirtioInterrupt::save`]; the caller has
    /// checked the vectors against its MSI-X table ([`InterruptState::check`]).
    /// Raises nothing: a pending ISR bit stays pending for the driver to read.
    pub fn restore(&self, s: &InterruptState) {
        self.isr.store(s.isr, Ordering::Release);
        self.config_vector.store(s.config_vector, Ordering::Release);
        for (slot, v) in self.queue_vectors.iter().zip(&s.queue_vectors) {
            slot.store(*v, Ordering::Release);
        }
        self.needs_reset.store(s.needs_reset, Ordering::Release);
        self.config_generation.store(s.config_generation, Ordering::Release);
    }

    pub fn reset(&self) {
        self.isr.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
    }
}
