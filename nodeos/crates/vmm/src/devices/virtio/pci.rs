//! The modern (virtio 1.x, non-transitional) PCI transport.
//!
//! One 64-bit memory BAR (BAR 0, [`BAR_SIZE`] bytes) holds every region:
//!
//! ```text
//! 0x0000  common configuration (virtio_pci_common_cfg)
//! 0x1000  ISR status (read to clear)
//! 0x2000  device-specific configuration
//! 0x3000  notifications: queue q at 0x3000 + 4 * q (notify_off_multiplier 4)
//! 0x4000  MSI-X table (one vector per queue + one for configuration changes)
//! 0x5000  MSI-X pending bits
//! ```
//!
//! Doorbells: each queue has an eventfd, registered through [`IoEvents`] at its
//! notify address whenever BAR 0 is mapped (and moved with it); a notify write
//! that still reaches the BAR (no ioeventfd) signals the same eventfd.
//!
//! Status machine: FEATURES_OK sticks only if the driver accepted a subset of the
//! offered features that includes VIRTIO_F_VERSION_1; DRIVER_OK activates the
//! device (its enabled queues must lie in guest memory, else NEEDS_RESET);
//! writing 0 resets the device and every queue.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::device::{Activation, InterruptState, VirtioDevice, VirtioInterrupt};
use super::{
    NO_VECTOR, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET, TYPE_BLOCK, TYPE_NET, VIRTIO_F_VERSION_1,
};
use crate::devices::interrupt::{InterruptError, IoEvents, MsiAllocator};
use crate::devices::pci::PciDevice;
use crate::devices::pci::config::{BarKind, BarSpec, PciConfig, PciConfigError, PciIds};
use crate::devices::pci::msix::{MSIX_CONTROL, Msix, MsixState};
use crate::memory::GuestMem;
use crate::state::StateError;

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are 0x1040 + the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem id (as QEMU's virtio devices).
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
pub const BAR_INDEX: usize = 0;
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_CFG: u64 = 0x0000;
pub const ISR_CFG: u64 = 0x1000;
pub const DEVICE_CFG: u64 = 0x2000;
pub const NOTIFY_CFG: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE: u64 = 0x4000;
pub const MSIX_PBA: u64 = 0x5000;
const REGION_LEN: u64 = 0x1000;
/// At most one MSI-X table entry per 16 bytes of its region.
const MAX_VECTORS: usize = (REGION_LEN / 16) as usize;

const VENDOR_CAP_ID: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

// virtio_pci_common_cfg offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("device has {queues} queues; the transport supports 1..={}", MAX_VECTORS - 1)]
    QueueCount { queues: usize },
    #[error("queue {index} has an invalid maximum size {size} (a power of two up to 32768)")]
    QueueSize { index: usize, size: u16 },
    #[error("cannot allocate MSI-X vectors")]
    MsiAllocate(#[source] InterruptError),
    #[error("cannot create a queue doorbell")]
    Doorbell(#[source] std::io::Error),
    #[error("cannot build the PCI configuration space")]
    Config(#[source] PciConfigError),
}

/// A virtio device on PCI. Add it to [`crate::devices::pci::PciRoot`] wrapped in
/// `Arc<Mutex<_>>`; the root maps BAR 0 on the MMIO bus.
pub struct VirtioPciDevice {
    config: PciConfig,
    msix_cap: usize,
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    msix: Arc<Msix>,
    interrupt: Arc<VirtioInterrupt>,
    ioevents: Arc<dyn IoEvents>,
    notifiers: Vec<EventFd>,
    /// Where BAR 0 decodes now (doorbells are registered there).
    bar_base: Option<u64>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    /// Status bits the driver set (NEEDS_RESET lives in `interrupt`).
    status: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    active: bool,
    /// The I/O thread is stopped for a snapshot or migration (`queues` then
    /// hold its positions); [`VirtioPciDevice::resume_io`] restarts it.
    io_paused: bool,
}

/// A virtqueue's registers and ring positions (virtio-queue's `QueueState`,
/// which is not serializable).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegs {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<virtio_queue::QueueState> for QueueRegs {
    fn from(q: virtio_queue::QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<&QueueRegs> for virtio_queue::QueueState {
    fn from(q: &QueueRegs) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

/// A virtio PCI function's transport state: common configuration, queues,
/// interrupts and MSI-X table. Saved with the device's I/O paused. The PCI
/// configuration space (BAR addresses, command register) is the root's to save.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VirtioPciState {
    pub device_type: u16,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub queue_select: u16,
    pub queues: Vec<QueueRegs>,
    pub interrupt: InterruptState,
    pub msix: MsixState,
    /// The driver had the device running (DRIVER_OK accepted).
    pub active: bool,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("type", &self.device.device_type())
            .field("status", &self.status)
            .field("active", &self.active)
            .field("bar_base", &self.bar_base)
            .finish()
    }
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let len = 16 + extra.len();
    let mut cap = vec![VENDOR_CAP_ID, 0, len as u8, cfg_type, BAR_INDEX as u8, 0, 0, 0];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    cap.extend_from_slice(extra);
    cap
}

impl VirtioPciDevice {
    /// Wraps `device`; allocates one MSI-X vector per queue plus one for
    /// configuration changes from `msi`, and one doorbell eventfd per queue.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMem,
        msi: &dyn MsiAllocator,
        ioevents: Arc<dyn IoEvents>,
    ) -> Result<Self, VirtioPciError> {
        let sizes = device.queue_max_sizes().to_vec();
        if sizes.is_empty() || sizes.len() >= MAX_VECTORS {
            return Err(VirtioPciError::QueueCount { queues: sizes.len() });
        }
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| Queue::new(size).map_err(|_| VirtioPciError::QueueSize { index, size }))
            .collect::<Result<Vec<_>, _>>()?;
        let notifiers = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioPciError::Doorbell)?;
        let vectors = msi.allocate(queues.len() as u16 + 1).map_err(VirtioPciError::MsiAllocate)?;
        let msix = Arc::new(Msix::new(vectors));
        let interrupt = Arc::new(VirtioInterrupt::new(msix.clone(), queues.len()));

        let kind = device.device_type();
        let ids = PciIds {
            vendor: VIRTIO_PCI_VENDOR_ID,
            device: VIRTIO_PCI_DEVICE_ID_BASE + kind,
            revision: 1,
            class: match kind {
                TYPE_NET => 0x02_00_00,   // Ethernet controller
                TYPE_BLOCK => 0x01_00_00, // SCSI storage controller, as QEMU
                _ => 0xff_00_00,
            },
            subsystem_vendor: VIRTIO_PCI_VENDOR_ID,
            subsystem: VIRTIO_PCI_SUBSYSTEM_ID,
        };
        let mut config = PciConfig::new(&ids);
        config
            .add_bar(BAR_INDEX, BarSpec { size: BAR_SIZE, kind: BarKind::Memory64, prefetchable: false })
            .map_err(VirtioPciError::Config)?;
        let (body, mask) =
            msix.capability(BAR_INDEX as u8, MSIX_TABLE as u32, BAR_INDEX as u8, MSIX_PBA as u32);
        let msix_cap = config.add_capability(&body, &mask).map_err(VirtioPciError::Config)?;
        let caps = [
            vendor_cap(CAP_COMMON, COMMON_CFG, REGION_LEN, &[]),
            vendor_cap(CAP_ISR, ISR_CFG, REGION_LEN, &[]),
            vendor_cap(CAP_DEVICE, DEVICE_CFG, REGION_LEN, &[]),
            vendor_cap(CAP_NOTIFY, NOTIFY_CFG, REGION_LEN, &NOTIFY_OFF_MULTIPLIER.to_le_bytes()),
        ];
        for cap in caps {
            config.add_capability(&cap, &vec![0; cap.len()]).map_err(VirtioPciError::Config)?;
        }

        Ok(Self {
            config,
            msix_cap,
            device,
            mem,
            msix,
            interrupt,
            ioevents,
            notifiers,
            bar_base: None,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues,
            active: false,
            io_paused: false,
        })
    }

    /// Device status as the driver reads it.
    pub fn status(&self) -> u8 {
        self.status | if self.interrupt.needs_reset() { STATUS_NEEDS_RESET } else { 0 }
    }

    /// The virtio device type (block, net, rng...).
    pub fn device_type(&self) -> u16 {
        self.device.device_type()
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    pub fn msix(&self) -> &Arc<Msix> {
        &self.msix
    }

    /// Guest address of queue `queue`'s doorbell while BAR 0 is mapped.
    pub fn notify_address(&self, queue: usize) -> Option<u64> {
        self.bar_base.map(|b| b + NOTIFY_CFG + u64::from(NOTIFY_OFF_MULTIPLIER) * queue as u64)
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// Stops the device's I/O thread once the request in hand is done, and
    /// keeps its queue positions, so the device can be saved with nothing in
    /// flight. Guest-visible registers do not change; the guest's vCPUs should
    /// be paused first, so nothing new arrives.
    pub fn pause_io(&mut self) {
        if !self.active || self.io_paused {
            return;
        }
        match self.device.quiesce() {
            Some(queues) if queues.len() == self.queues.len() => self.queues = queues,
            // The thread died (it reported why): the positions are lost.
            _ => self.interrupt.set_needs_reset(),
        }
        self.io_paused = true;
    }

    /// Restarts I/O stopped by [`VirtioPciDevice::pause_io`] (or left stopped
    /// by [`VirtioPciDevice::restore`]) from the queue positions held.
    pub fn resume_io(&mut self) {
        if !std::mem::take(&mut self.io_paused) {
            return;
        }
        if self.active && !self.interrupt.needs_reset() {
            self.activate();
        }
    }

    /// Asks the driver to announce the guest's addresses (see
    /// [`VirtioDevice::announce`]); false when the device is not running.
    pub fn announce(&mut self) -> bool {
        self.active && !self.io_paused && self.device.announce()
    }

    /// The transport's state. Pause I/O first, or the queue positions are
    /// those of the last activation.
    pub fn save(&self) -> VirtioPciState {
        VirtioPciState {
            device_type: self.device.device_type(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            queue_select: self.queue_select,
            queues: self.queues.iter().map(|q| QueueRegs::from(q.state())).collect(),
            interrupt: self.interrupt.save(),
            msix: self.msix.save(),
            active: self.active,
        }
    }

    /// Loads a state saved from the same kind of device. I/O stays stopped
    /// until [`VirtioPciDevice::resume_io`]. On error nothing changed.
    pub fn restore(&mut self, s: VirtioPciState) -> Result<(), StateError> {
        let err = |r: String| StateError::new("virtio transport", r);
        let kind = self.device.device_type();
        if s.device_type != kind {
            return Err(err(format!("saved from a device of type {}, this one is {kind}", s.device_type)));
        }
        if s.queues.len() != self.queues.len() {
            return Err(err(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        let known =
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED;
        if s.status & !known != 0 {
            return Err(err(format!("status {:#x} has unknown bits", s.status)));
        }
        if s.driver_features & !self.device.features() != 0 {
            return Err(err(format!(
                "driver features {:#x} beyond those offered {:#x}",
                s.driver_features,
                self.device.features()
            )));
        }
        let active = s.active && s.status & STATUS_DRIVER_OK != 0 && s.status & STATUS_FEATURES_OK != 0;
        let mut queues = Vec::with_capacity(s.queues.len());
        for (index, (regs, mine)) in s.queues.iter().zip(&self.queues).enumerate() {
            if regs.max_size != mine.max_size() {
                return Err(err(format!("queue {index} max size {} != {}", regs.max_size, mine.max_size())));
            }
            let q = Queue::try_from(virtio_queue::QueueState::from(regs))
                .map_err(|e| err(format!("queue {index}: {e}")))?;
            if active && q.ready() && !q.is_valid(&self.mem) {
                return Err(err(format!("queue {index} lies outside guest memory")));
            }
            queues.push(q);
        }
        s.interrupt.check(self.queues.len(), self.msix.count()).map_err(|e| err(e.reason))?;
        // Last fallible step, so a refusal leaves everything as it was.
        self.msix.restore(s.msix)?;
        self.device.reset();
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.queue_select = s.queue_select;
        self.queues = queues;
        self.interrupt.restore(&s.interrupt);
        self.active = active;
        self.io_paused = active;
        Ok(())
    }

    fn reset(&mut self) {
        self.device.reset();
        self.active = false;
        self.io_paused = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt.reset();
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device.features() == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = value & !STATUS_NEEDS_RESET;
        if new & old != old {
            // Drivers must not clear bits other than by a reset.
            tracing::debug!(old, new, "virtio driver cleared status bits; ignored");
            return;
        }
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 && !self.features_acceptable() {
            tracing::debug!(features = self.driver_features, "virtio driver features refused");
            new &= !STATUS_FEATURES_OK;
        }
        self.status = new;
        if new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 {
            if new & STATUS_FEATURES_OK == 0 || new & STATUS_FAILED != 0 {
                self.interrupt.set_needs_reset();
            } else {
                self.activate();
            }
        }
    }

    fn activate(&mut self) {
        for (index, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                tracing::warn!(queue = index, "virtio queue outside guest memory");
                self.interrupt.set_needs_reset();
                return;
            }
        }
        let queues =
            match self.queues.iter().map(|q| Queue::try_from(q.state())).collect::<Result<Vec<_>, _>>() {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio queue state unusable");
                    self.interrupt.set_needs_reset();
                    return;
                }
            };
        let notifiers = match self.notifiers.iter().map(EventFd::try_clone).collect::<Result<Vec<_>, _>>() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot duplicate virtio doorbells");
                self.interrupt.set_needs_reset();
                return;
            }
        };
        // A previous activation (reset skipped by the driver) must be gone first.
        self.device.reset();
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            notifiers,
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
        };
        match self.device.activate(activation) {
            Ok(()) => self.active = true,
            Err(e) => {
                tracing::warn!(error = %e, "virtio device activation failed");
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let features = self.device.features();
        let q = self.selected_queue();
        let qsel = usize::from(self.queue_select);
        let v: u64 = match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select.into(),
            (DEVICE_FEATURE, 4) => match self.device_feature_select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select.into(),
            (DRIVER_FEATURE, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (CONFIG_MSIX_VECTOR, 2) => self.interrupt.config_vector().into(),
            (NUM_QUEUES, 2) => self.queues.len() as u64,
            (DEVICE_STATUS, 1) => self.status().into(),
            (CONFIG_GENERATION, 1) => self.interrupt.config_generation().into(),
            (QUEUE_SELECT, 2) => self.queue_select.into(),
            // Size 0 tells the driver the selected queue does not exist.
            (QUEUE_SIZE, 2) => q.map_or(0, |q| q.size().into()),
            (QUEUE_MSIX_VECTOR, 2) => q.map_or(NO_VECTOR, |_| self.interrupt.queue_vector(qsel)).into(),
            (QUEUE_ENABLE, 2) => q.map_or(0, |q| q.ready().into()),
            (QUEUE_NOTIFY_OFF, 2) => q.map_or(0, |_| self.queue_select.into()),
            (QUEUE_DESC, 8) => q.map_or(0, |q| q.desc_table()),
            (QUEUE_DRIVER, 8) => q.map_or(0, |q| q.avail_ring()),
            (QUEUE_DEVICE, 8) => q.map_or(0, |q| q.used_ring()),
            (o @ (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE), 4) => self.queue_addr(o) & 0xffff_ffff,
            (o @ (0x24 | 0x2c | 0x34), 4) => self.queue_addr(o - 4) >> 32,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data.fill(0);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn queue_addr(&self, field: u64) -> u64 {
        self.selected_queue().map_or(0, |q| match field {
            QUEUE_DESC => q.desc_table(),
            QUEUE_DRIVER => q.avail_ring(),
            _ => q.used_ring(),
        })
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let vectors = self.msix.count();
        let checked_vector = |v: u16| if v == NO_VECTOR || v < vectors { v } else { NO_VECTOR };
        // Queue registers are frozen once the driver said DRIVER_OK.
        let queue_writable = self.status & STATUS_DRIVER_OK == 0;
        let qsel = usize::from(self.queue_select);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v as u32,
            (DRIVER_FEATURE, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | v << 32,
                    _ => {}
                }
            }
            (CONFIG_MSIX_VECTOR, 2) => self.interrupt.set_config_vector(checked_vector(v as u16)),
            (DEVICE_STATUS, 1) => self.write_status(v as u8),
            (QUEUE_SELECT, 2) => self.queue_select = v as u16,
            (QUEUE_MSIX_VECTOR, 2) if qsel < self.queues.len() => {
                self.interrupt.set_queue_vector(qsel, checked_vector(v as u16));
            }
            (QUEUE_SIZE, 2) if queue_writable => {
                if let Some(q) = self.queues.get_mut(qsel) {
                    // An invalid size (not a power of two, too big) is ignored.
                    let _ = q.try_set_size(v as u16);
                }
            }
            (QUEUE_ENABLE, 2) if queue_writable && v == 1 => {
                if let Some(q) = self.queues.get_mut(qsel) {
                    q.set_ready(true);
                }
            }
            (o @ (QUEUE_DESC..=0x37), 4 | 8) if queue_writable && o.is_multiple_of(4) => {
                let Some(q) = self.queues.get_mut(qsel) else { return };
                let (lo, hi) = match (o % 8, data.len()) {
                    (0, 8) => (Some(v as u32), Some((v >> 32) as u32)),
                    (0, _) => (Some(v as u32), None),
                    (_, 4) => (None, Some(v as u32)),
                    _ => return,
                };
                // Misaligned ring addresses are refused by the queue (and logged).
                match o & !7 {
                    QUEUE_DESC => q.set_desc_table_address(lo, hi),
                    QUEUE_DRIVER => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            _ => {}
        }
    }

    fn notify(&self, offset: u64) {
        let multiplier = u64::from(NOTIFY_OFF_MULTIPLIER);
        if !offset.is_multiple_of(multiplier) {
            return;
        }
        if let Some(fd) = self.notifiers.get((offset / multiplier) as usize)
            && let Err(e) = fd.write(1)
        {
            tracing::warn!(error = %e, "virtio doorbell write failed");
        }
    }

    fn register_doorbells(&self, base: u64) {
        for (q, fd) in self.notifiers.iter().enumerate() {
            let addr = base + NOTIFY_CFG + u64::from(NOTIFY_OFF_MULTIPLIER) * q as u64;
            if let Err(e) = self.ioevents.register(addr, fd) {
                // Notifications still arrive as MMIO exits, just slower.
                tracing::warn!(queue = q, addr, error = %e, "virtio ioeventfd not registered");
            }
        }
    }

    fn unregister_doorbells(&self, base: u64) {
        for (q, fd) in self.notifiers.iter().enumerate() {
            let addr = base + NOTIFY_CFG + u64::from(NOTIFY_OFF_MULTIPLIER) * q as u64;
            if let Err(e) = self.ioevents.unregister(addr, fd) {
                tracing::debug!(queue = q, addr, error = %e, "virtio ioeventfd not unregistered");
            }
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_written(&mut self, offset: usize, len: usize) {
        let control = self.msix_cap + MSIX_CONTROL;
        if offset < control + 2 && offset + len > control {
            self.msix.set_control(self.config.read_u16(control));
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != BAR_INDEX {
            data.fill(0xff);
            return;
        }
        let region = offset - offset % REGION_LEN;
        let inner = offset % REGION_LEN;
        match region {
            COMMON_CFG => self.common_read(inner, data),
            ISR_CFG => {
                data.fill(0);
                if inner == 0 && !data.is_empty() {
                    data[0] = self.interrupt.take_isr();
                }
            }
            DEVICE_CFG => self.device.read_config(inner, data),
            MSIX_TABLE if inner < self.msix.table_len() => self.msix.read_table(inner, data),
            MSIX_PBA if inner < self.msix.pba_len() => self.msix.read_pba(inner, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != BAR_INDEX {
            return;
        }
        let region = offset - offset % REGION_LEN;
        let inner = offset % REGION_LEN;
        match region {
            COMMON_CFG => self.common_write(inner, data),
            DEVICE_CFG => self.device.write_config(inner, data),
            NOTIFY_CFG => self.notify(inner),
            MSIX_TABLE if inner < self.msix.table_len() => self.msix.write_table(inner, data),
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        if bar != BAR_INDEX {
            return;
        }
        if let Some(old) = old {
            self.unregister_doorbells(old);
        }
        if let Some(new) = new {
            self.register_doorbells(new);
        }
        self.bar_base = new;
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.device.reset();
        if let Some(base) = self.bar_base.take() {
            self.unregister_doorbells(base);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::Bus;
    use crate::devices::pci::PciRoot;
    use crate::devices::testing::{FakeAllocator, FakeIoEvents};
    use crate::devices::virtio::{ActivateError, STATUS_ACKNOWLEDGE, STATUS_DRIVER};
    use crate::memory::{self, MMIO32_START};
    use std::sync::Mutex;

    /// A device that records activations and resets.
    #[derive(Default)]
    struct Probe {
        log: Arc<Mutex<Vec<String>>>,
        config: [u8; 8],
        /// The queues of the running activation (what an I/O thread would hold).
        queues: Option<Vec<Queue>>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u16 {
            TYPE_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 9
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.log.lock().unwrap().push(format!("config {offset} {data:?}"));
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            let ready: Vec<bool> = a.queues.iter().map(|q| q.ready()).collect();
            self.log.lock().unwrap().push(format!(
                "activate {ready:?} {:#x} {}",
                a.features,
                a.notifiers.len()
            ));
            if !ready[0] {
                return Err(ActivateError::QueueNotReady { index: 0 });
            }
            self.queues = Some(a.queues);
            Ok(())
        }
        fn quiesce(&mut self) -> Option<Vec<Queue>> {
            self.log.lock().unwrap().push("quiesce".into());
            self.queues.take()
        }
        fn reset(&mut self) {
            self.queues = None;
            self.log.lock().unwrap().push("reset".into());
        }
    }

    struct Rig {
        dev: Arc<Mutex<VirtioPciDevice>>,
        mmio: Arc<Bus>,
        alloc: FakeAllocator,
        ioevents: Arc<FakeIoEvents>,
        log: Arc<Mutex<Vec<String>>>,
        base: u64,
        _root: PciRoot,
    }

    impl Rig {
        fn new() -> Self {
            let (mem, _f) = memory::create(16).unwrap();
            let probe = Probe { config: *b"\x01\x02\x03\x04\x05\x06\x07\x08", ..Probe::default() };
            let log = probe.log.clone();
            let alloc = FakeAllocator::default();
            let ioevents = Arc::new(FakeIoEvents::default());
            let dev = VirtioPciDevice::new(Box::new(probe), mem, &alloc, ioevents.clone()).unwrap();
            let dev = Arc::new(Mutex::new(dev));
            let mmio = Arc::new(Bus::new());
            let mut root = PciRoot::new(mmio.clone());
            root.add_device(dev.clone()).unwrap();
            Rig { dev, mmio, alloc, ioevents, log, base: MMIO32_START, _root: root }
        }

        fn r(&self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            assert!(self.mmio.read(self.base + off, &mut b[..len]));
            u64::from_le_bytes(b)
        }

        fn w(&self, off: u64, len: usize, v: u64) {
            assert!(self.mmio.write(self.base + off, &v.to_le_bytes()[..len]));
        }

        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }

        fn negotiate(&self, features: u64) -> u8 {
            self.w(DEVICE_STATUS, 1, 0);
            self.w(DEVICE_STATUS, 1, u64::from(STATUS_ACKNOWLEDGE));
            self.w(DEVICE_STATUS, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
            self.w(DRIVER_FEATURE_SELECT, 4, 0);
            self.w(DRIVER_FEATURE, 4, features & 0xffff_ffff);
            self.w(DRIVER_FEATURE_SELECT, 4, 1);
            self.w(DRIVER_FEATURE, 4, features >> 32);
            self.w(DEVICE_STATUS, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK));
            self.r(DEVICE_STATUS, 1) as u8
        }

        fn setup_queue(&self, q: u64, size: u64, base: u64) {
            self.w(QUEUE_SELECT, 2, q);
            self.w(QUEUE_SIZE, 2, size);
            self.w(QUEUE_DESC, 4, base);
            self.w(QUEUE_DESC + 4, 4, 0);
            self.w(QUEUE_DRIVER, 8, base + 0x1000);
            self.w(QUEUE_DEVICE, 4, base + 0x2000);
            self.w(QUEUE_DEVICE + 4, 4, 0);
            self.w(QUEUE_MSIX_VECTOR, 2, q);
            self.w(QUEUE_ENABLE, 2, 1);
        }
    }

    const OK_FEATURES: u64 = VIRTIO_F_VERSION_1 | 1 << 9;
    const DRIVER_READY: u8 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;

    #[test]
    fn pci_identity_and_capabilities() {
        let rig = Rig::new();
        let d = rig.dev.lock().unwrap();
        let c = d.config();
        assert_eq!(c.read_u16(0), 0x1af4);
        assert_eq!(c.read_u16(2), 0x1042);
        assert_eq!(c.read_u8(8), 1);
        assert_eq!(c.read_u16(0x2e), VIRTIO_PCI_SUBSYSTEM_ID);
        // Walk the capability list.
        let mut found = Vec::new();
        let mut at = usize::from(c.read_u8(0x34));
        while at != 0 {
            let id = c.read_u8(at);
            if id == VENDOR_CAP_ID {
                let ty = c.read_u8(at + 3);
                let bar = c.read_u8(at + 4);
                let off = c.read_u32(at + 8);
                let len = c.read_u32(at + 12);
                found.push((ty, bar, off, len));
                if ty == CAP_NOTIFY {
                    assert_eq!(c.read_u32(at + 16), 4);
                    assert_eq!(c.read_u8(at + 2), 20);
                }
            } else {
                assert_eq!(id, 0x11);
                assert_eq!(c.read_u16(at + 2) & 0x7ff, 2, "3 vectors");
            }
            at = usize::from(c.read_u8(at + 1));
        }
        found.sort_unstable();
        assert_eq!(
            found,
            vec![(1, 0, 0, 0x1000), (2, 0, 0x3000, 0x1000), (3, 0, 0x1000, 0x1000), (4, 0, 0x2000, 0x1000)]
        );
        // Doorbells registered at the pre-assigned BAR.
        assert_eq!(rig.ioevents.addresses(), vec![MMIO32_START + 0x3000, MMIO32_START + 0x3004]);
    }

    #[test]
    fn feature_negotiation() {
        let rig = Rig::new();
        assert_eq!(rig.r(NUM_QUEUES, 2), 2);
        rig.w(DEVICE_FEATURE_SELECT, 4, 0);
        assert_eq!(rig.r(DEVICE_FEATURE, 4), 1 << 9);
        rig.w(DEVICE_FEATURE_SELECT, 4, 1);
        assert_eq!(rig.r(DEVICE_FEATURE, 4), 1);
        rig.w(DEVICE_FEATURE_SELECT, 4, 2);
        assert_eq!(rig.r(DEVICE_FEATURE, 4), 0);
        // Not offered, or without VERSION_1: FEATURES_OK does not stick.
        assert_eq!(rig.negotiate(OK_FEATURES | 1 << 3), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(rig.negotiate(1 << 9), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(rig.negotiate(VIRTIO_F_VERSION_1), DRIVER_READY);
        assert_eq!(rig.negotiate(OK_FEATURES), DRIVER_READY);
        // Features are frozen after FEATURES_OK.
        rig.w(DRIVER_FEATURE_SELECT, 4, 0);
        rig.w(DRIVER_FEATURE, 4, 0);
        assert_eq!(rig.r(DRIVER_FEATURE, 4), 1 << 9);
        // Clearing bits without a reset is ignored.
        rig.w(DEVICE_STATUS, 1, u64::from(STATUS_ACKNOWLEDGE));
        assert_eq!(rig.r(DEVICE_STATUS, 1) as u8, DRIVER_READY);
    }

    #[test]
    fn driver_ok_activates_and_reset_restores_everything() {
        let rig = Rig::new();
        assert_eq!(rig.negotiate(OK_FEATURES), DRIVER_READY);
        rig.setup_queue(0, 8, 0x10_0000);
        assert_eq!(rig.r(QUEUE_SIZE, 2), 8);
        assert_eq!(rig.r(QUEUE_DRIVER, 4), 0x10_1000);
        assert_eq!(rig.r(QUEUE_DRIVER + 4, 4), 0);
        assert_eq!(rig.r(QUEUE_DEVICE, 8), 0x10_2000);
        assert_eq!(rig.r(QUEUE_NOTIFY_OFF, 2), 0);
        rig.w(QUEUE_SELECT, 2, 1);
        assert_eq!(rig.r(QUEUE_SIZE, 2), 8, "max size by default");
        assert_eq!(rig.r(QUEUE_NOTIFY_OFF, 2), 1);
        rig.w(QUEUE_SIZE, 2, 3);
        assert_eq!(rig.r(QUEUE_SIZE, 2), 8, "not a power of two");
        rig.w(QUEUE_SIZE, 2, 64);
        assert_eq!(rig.r(QUEUE_SIZE, 2), 8, "above the maximum");
        rig.w(QUEUE_SELECT, 2, 9);
        assert_eq!(rig.r(QUEUE_SIZE, 2), 0, "no such queue");
        rig.w(QUEUE_ENABLE, 2, 1);
        // Vectors: valid ones stick, others read back NO_VECTOR.
        rig.w(CONFIG_MSIX_VECTOR, 2, 2);
        assert_eq!(rig.r(CONFIG_MSIX_VECTOR, 2), 2);
        rig.w(CONFIG_MSIX_VECTOR, 2, 3);
        assert_eq!(rig.r(CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));

        rig.w(DEVICE_STATUS, 1, u64::from(DRIVER_READY | STATUS_DRIVER_OK));
        assert!(rig.dev.lock().unwrap().is_active());
        let log = rig.log();
        assert_eq!(log.last().unwrap(), &format!("activate [true, false] {OK_FEATURES:#x} 2"));
        // Queue registers are frozen while running.
        rig.w(QUEUE_SELECT, 2, 0);
        rig.w(QUEUE_SIZE, 2, 4);
        assert_eq!(rig.r(QUEUE_SIZE, 2), 8);

        // Device config passes through.
        assert_eq!(rig.r(DEVICE_CFG + 2, 2), 0x0403);
        assert_eq!(rig.r(DEVICE_CFG + 6, 4), 0x0807);
        rig.w(DEVICE_CFG + 1, 1, 9);
        assert!(rig.log().contains(&"config 1 [9]".to_string()));

        // Reset: status 0, queues back to their initial state, vectors unassigned.
        rig.w(DEVICE_STATUS, 1, 0);
        assert_eq!(rig.r(DEVICE_STATUS, 1), 0);
        assert_eq!(rig.log().last().unwrap(), "reset");
        assert!(!rig.dev.lock().unwrap().is_active());
        assert_eq!(rig.r(QUEUE_SIZE, 2), 16);
        assert_eq!(rig.r(QUEUE_ENABLE, 2), 0);
        assert_eq!(rig.r(QUEUE_DESC, 8), 0);
        assert_eq!(rig.r(QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        assert_eq!(rig.r(CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        rig.w(DRIVER_FEATURE_SELECT, 4, 1);
        assert_eq!(rig.r(DRIVER_FEATURE, 4), 0);
    }

    #[test]
    fn activation_failures_set_needs_reset() {
        let rig = Rig::new();
        // DRIVER_OK without FEATURES_OK.
        rig.w(DEVICE_STATUS, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK));
        assert_ne!(rig.r(DEVICE_STATUS, 1) as u8 & STATUS_NEEDS_RESET, 0);
        assert!(!rig.dev.lock().unwrap().is_active());
        // The ISR reports a config change, and clears on read.
        assert_eq!(rig.r(ISR_CFG, 1), 2);
        assert_eq!(rig.r(ISR_CFG, 1), 0);

        // The device refuses (queue 0 not enabled).
        rig.negotiate(OK_FEATURES);
        assert_eq!(rig.r(DEVICE_STATUS, 1) as u8 & STATUS_NEEDS_RESET, 0, "reset cleared it");
        rig.w(DEVICE_STATUS, 1, u64::from(DRIVER_READY | STATUS_DRIVER_OK));
        assert_ne!(rig.r(DEVICE_STATUS, 1) as u8 & STATUS_NEEDS_RESET, 0);

        // A ring outside guest memory is caught before the device sees it.
        rig.negotiate(OK_FEATURES);
        rig.setup_queue(0, 8, 0x7000_0000);
        let before = rig.log().len();
        rig.w(DEVICE_STATUS, 1, u64::from(DRIVER_READY | STATUS_DRIVER_OK));
        assert_ne!(rig.r(DEVICE_STATUS, 1) as u8 & STATUS_NEEDS_RESET, 0);
        assert!(rig.log()[before..].iter().all(|l| !l.starts_with("activate")));
    }

    #[test]
    fn notify_writes_signal_the_doorbell_and_follow_the_bar() {
        let rig = Rig::new();
        let fd1 = rig.dev.lock().unwrap().notifiers[1].try_clone().unwrap();
        rig.w(NOTIFY_CFG + 4, 2, 1);
        assert_eq!(fd1.read().unwrap(), 1);
        rig.w(NOTIFY_CFG + 6, 2, 1); // unaligned: ignored
        rig.w(NOTIFY_CFG + 0x400, 2, 1); // no such queue
        assert!(fd1.read().is_err());

        // Move the BAR through the root: doorbells follow.
        let mut dev = rig.dev.lock().unwrap();
        dev.bar_moved(0, Some(MMIO32_START), Some(0xd000_0000));
        assert_eq!(rig.ioevents.addresses(), vec![0xd000_3000, 0xd000_3004]);
        assert_eq!(dev.notify_address(1), Some(0xd000_3004));
        drop(dev);
        // The root and the MMIO bus hold the device too.
        drop(rig.dev);
        drop(rig._root);
        drop(rig.mmio);
        assert!(rig.ioevents.addresses().is_empty(), "dropping the device unregisters");
    }

    #[test]
    fn msix_through_the_bar_and_config_space() {
        let rig = Rig::new();
        let msi = rig.alloc.msi();
        // Program vector 0 and enable MSI-X via the capability's control word.
        rig.w(MSIX_TABLE, 4, 0xfee0_0000);
        rig.w(MSIX_TABLE + 8, 4, 0x30);
        rig.w(MSIX_TABLE + 12, 4, 0);
        assert_eq!(rig.r(MSIX_TABLE + 8, 4), 0x30);
        let cap = rig.dev.lock().unwrap().msix_cap;
        {
            let mut d = rig.dev.lock().unwrap();
            d.config_mut().write(cap + 2, &0x8000u16.to_le_bytes());
            d.config_written(cap + 2, 2);
        }
        assert!(msi.configured(0).is_some());
        // A queue signal with vector 0 assigned reaches KVM and sets ISR bit 0.
        rig.w(QUEUE_SELECT, 2, 0);
        rig.w(QUEUE_MSIX_VECTOR, 2, 0);
        rig.dev.lock().unwrap().interrupt().signal_queue(0);
        assert_eq!(msi.triggers(), vec![0]);
        assert_eq!(rig.r(ISR_CFG, 1), 1);
        // Vector 1 is masked: pending bit in the PBA.
        rig.w(QUEUE_SELECT, 2, 1);
        rig.w(QUEUE_MSIX_VECTOR, 2, 1);
        rig.dev.lock().unwrap().interrupt().signal_queue(1);
        assert_eq!(rig.r(MSIX_PBA, 8), 0b10);
        // Writes outside the table are ignored.
        rig.w(MSIX_TABLE + 0x800, 4, 1);
        rig.w(MSIX_PBA, 8, 0);
        assert_eq!(rig.r(MSIX_PBA, 8), 0b10);
    }

    #[test]
    fn hostile_register_accesses_do_not_panic() {
        let rig = Rig::new();
        for off in (0..BAR_SIZE).step_by(0x7f) {
            for len in [1usize, 2, 4, 8] {
                if off + len as u64 > BAR_SIZE {
                    continue;
                }
                let _ = rig.r(off, len);
                rig.w(off, len, u64::MAX);
            }
        }
        // The device still works after a reset.
        assert_eq!(rig.negotiate(OK_FEATURES), DRIVER_READY);
    }

    /// The whole path a Linux guest takes: find the device through the config
    /// ports, enable MSI-X, negotiate, set up the queue over MMIO, DRIVER_OK,
    /// submit a read, ring the doorbell, get the interrupt; then reset.
    #[test]
    fn block_request_end_to_end_through_pci() {
        use crate::devices::bus::BusDevice;
        use crate::devices::testing::{GuestQueue, wait_until};
        use crate::devices::virtio::block::{Block, FileBackend};
        use std::io::Write;
        use vm_memory::{Bytes, GuestAddress};

        let (mem, _f) = memory::create(16).unwrap();
        let mut disk = tempfile::NamedTempFile::new().unwrap();
        disk.write_all(&[0x5a; 4096]).unwrap();
        let block = Block::new(Arc::new(FileBackend::open(disk.path(), false).unwrap()), "e2e");
        let alloc = FakeAllocator::default();
        let ioevents = Arc::new(FakeIoEvents::default());
        let dev = VirtioPciDevice::new(Box::new(block), mem.clone(), &alloc, ioevents.clone()).unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mmio = Arc::new(Bus::new());
        let mut root = PciRoot::new(mmio.clone());
        let slot = u32::from(root.add_device(dev.clone()).unwrap());
        let msi = alloc.msi();

        let cfg_read = |root: &mut PciRoot, reg: u32| {
            root.write(0, &(0x8000_0000 | slot << 11 | reg).to_le_bytes());
            let mut b = [0u8; 4];
            root.read(4, &mut b);
            u32::from_le_bytes(b)
        };
        assert_eq!(cfg_read(&mut root, 0), 0x1042_1af4);
        let bar = u64::from(cfg_read(&mut root, 0x10) & !0xf) | u64::from(cfg_read(&mut root, 0x14)) << 32;
        // Find the MSI-X capability and enable it through the data port.
        let mut cap = cfg_read(&mut root, 0x34) & 0xff;
        while cfg_read(&mut root, cap) & 0xff != 0x11 {
            cap = (cfg_read(&mut root, cap) >> 8) & 0xff;
        }
        let r = |off: u64, len: usize| {
            let mut b = [0u8; 8];
            assert!(mmio.read(bar + off, &mut b[..len]));
            u64::from_le_bytes(b)
        };
        let w = |off: u64, len: usize, v: u64| assert!(mmio.write(bar + off, &v.to_le_bytes()[..len]));
        for v in 0..2 {
            w(MSIX_TABLE + 16 * v, 4, 0xfee0_0000);
            w(MSIX_TABLE + 16 * v + 8, 4, 0x40 + v);
            w(MSIX_TABLE + 16 * v + 12, 4, 0);
        }
        root.write(0, &(0x8000_0000 | slot << 11 | cap).to_le_bytes());
        root.write(6, &0x8000u16.to_le_bytes());
        assert!(msi.configured(0).is_some() && msi.configured(1).is_some());

        w(DEVICE_STATUS, 1, 0);
        w(DEVICE_STATUS, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        w(DRIVER_FEATURE_SELECT, 4, 1);
        w(DRIVER_FEATURE, 4, 1);
        w(DEVICE_STATUS, 1, u64::from(DRIVER_READY));
        assert_eq!(r(DEVICE_STATUS, 1) as u8, DRIVER_READY);
        w(CONFIG_MSIX_VECTOR, 2, 1);
        let mut gq = GuestQueue::new(&mem, 16, 0x10_0000);
        w(QUEUE_SELECT, 2, 0);
        w(QUEUE_SIZE, 2, 16);
        w(QUEUE_DESC, 8, gq.desc);
        w(QUEUE_DRIVER, 8, gq.avail);
        w(QUEUE_DEVICE, 8, gq.used);
        w(QUEUE_MSIX_VECTOR, 2, 0);
        assert_eq!(r(QUEUE_MSIX_VECTOR, 2), 0);
        w(QUEUE_ENABLE, 2, 1);
        w(DEVICE_STATUS, 1, u64::from(DRIVER_READY | STATUS_DRIVER_OK));
        assert!(dev.lock().unwrap().is_active());

        // A read of sector 1.
        let mut hdr = [0u8; 16];
        hdr[8] = 1;
        mem.write_slice(&hdr, GuestAddress(0x20_0000)).unwrap();
        let head =
            gq.add_chain(&mem, &[(0x20_0000, 16, false), (0x30_0000, 512, true), (0x40_0000, 1, true)]);
        gq.publish(&mem, head);
        // The doorbell: ioeventfd registered at the notify address, or an MMIO write.
        assert!(ioevents.addresses().contains(&(bar + NOTIFY_CFG)));
        w(NOTIFY_CFG, 2, 0);
        assert!(wait_until(|| gq.used_idx(&mem) == 1));
        assert!(msi.wait_for(0, 1));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40_0000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x30_01ff)).unwrap(), 0x5a);

        w(DEVICE_STATUS, 1, 0);
        assert!(!dev.lock().unwrap().is_active());
        assert_eq!(r(DEVICE_STATUS, 1), 0);
    }
}
