//! One VM, assembled from its [`WorkerConfig`]: KVM VM, guest memory, devices,
//! kernel, vCPUs. The worker's main thread owns it.
//!
//! Build order: KVM VM (with in-kernel irqchip and PIT) → guest memory and its
//! slots → kernel and boot structures → buses and devices (serial, platform
//! ports, PCI root with one virtio-blk per disk and one virtio-net per NIC) →
//! vCPUs with their boot state → vCPU threads. Any failure drops what was made
//! so far; nothing outlives the process.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use nodeos_hv::{CpuidPolicy, HvError, Hypervisor};
use tracing::{info, warn};

use crate::boot::{self, BootConfig, BootError};
use crate::config::{ConfigError, WorkerConfig};
use crate::control::StopReason;
use crate::devices::acpi::{ACPI_LEN, ACPI_PORT, AcpiPlatform, GED_IRQ};
use crate::devices::bus::{Bus, BusError};
use crate::devices::i8042::I8042_IRQ;
use crate::devices::interrupt::{IoEvents, IrqLine, MsiAllocator};
use crate::devices::pci::{PCI_CONFIG_LEN, PCI_CONFIG_PORT, PciError, PciRoot};
use crate::devices::platform::{self, PlatformEvents, PlatformRequest};
use crate::devices::rtc::{self, RTC_IRQ, Rtc, RtcConfig, RtcError};
use crate::devices::serial::{COM1_IRQ, COM1_LEN, COM1_PORT, Serial};
use crate::devices::virtio::block::{Block, BlockBackend, FileBackend, VolumeBackend};
use crate::devices::virtio::net::{Net, SeqpacketBackend};
use crate::devices::virtio::rng::{RateLimit, Rng};
use crate::devices::virtio::{VirtioPciDevice, VirtioPciError};
use crate::interrupts::{KvmIoEvents, KvmIrqLine, KvmMsiAllocator};
use crate::memory::{self, GuestMem, MemoryError};
use crate::vcpu::{EndSignal, VcpuError, VcpuSet};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid VM configuration")]
    Config(#[source] ConfigError),
    #[error("cannot open the console log {0}")]
    Console(String, #[source] std::io::Error),
    #[error("KVM")]
    Hv(#[from] HvError),
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error("loading the kernel")]
    Boot(#[from] BootError),
    #[error("placing a device")]
    Bus(#[from] BusError),
    #[error("PCI")]
    Pci(#[from] PciError),
    #[error("disk {index} ({path})")]
    Disk {
        index: usize,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("NIC {index}")]
    Nic {
        index: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("virtio-rng")]
    Rng(#[source] VirtioPciError),
    #[error("NIC {index} has no socket from the node")]
    NicSocket { index: usize },
    #[error("platform events")]
    Platform(#[source] std::io::Error),
    #[error("CMOS RTC")]
    Rtc(#[from] RtcError),
    #[error("vCPUs")]
    Vcpu(#[from] VcpuError),
}

/// A built, running VM.
pub struct Vm {
    /// Volume disks, to hand them layout changes from the pool.
    volumes: Vec<Arc<VolumeBackend>>,
    // Field order is drop order: vCPUs stop before devices and memory go.
    vcpus: VcpuSet,
    serial: Arc<Mutex<Serial>>,
    acpi: Arc<Mutex<AcpiPlatform>>,
    _rtc: Arc<Mutex<Rtc>>,
    _pci: Arc<Mutex<PciRoot>>,
    _pio: Arc<Bus>,
    _mmio: Arc<Bus>,
    _mem: Arc<GuestMem>,
    _mem_file: std::fs::File,
    _kvm_vm: Arc<nodeos_hv::Vm>,
    end: EndSignal,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").finish_non_exhaustive()
    }
}

impl Vm {
    /// Gives a volume disk its new layout from the pool.
    pub fn update_volume(&self, layout: nodeos_block::client::VolumeLayout, own: bool) -> Result<(), String> {
        let v = self
            .volumes
            .iter()
            .find(|b| b.volume() == layout.volume)
            .ok_or_else(|| format!("no disk on volume {}", layout.volume))?;
        v.update_layout(layout, own);
        Ok(())
    }

    pub fn build(
        cfg: &WorkerConfig,
        nic_fds: Vec<OwnedFd>,
        console: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, VmError> {
        let hv = Hypervisor::new()?;
        let kvm_vm = Arc::new(hv.create_vm()?);
        let (mem, mem_file) = memory::create(cfg.memory_mib)?;
        let mem = Arc::new(mem);
        kvm_vm.add_guest_memory(mem.clone(), false)?;
        let mut setup = boot::load_kernel(
            &mem,
            &BootConfig {
                kernel: cfg.kernel.clone(),
                initrd: cfg.initrd.clone(),
                cmdline: cfg.cmdline.clone(),
                vcpus: cfg.vcpus,
                memory_mib: cfg.memory_mib,
            },
        )?;
        info!(entry = format_args!("{:#x}", setup.entry.0), protocol = ?setup.protocol, "kernel loaded");
        if let Some(base) = &cfg.cpu_baseline {
            setup.cpuid_policy = CpuidPolicy::for_baseline(hv.supported_cpuid(), base);
            info!(hidden = setup.cpuid_policy.masks.len(), "CPU features beyond the pool baseline hidden");
        }

        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let irq4: Arc<dyn IrqLine> = Arc::new(KvmIrqLine::new(kvm_vm.clone(), COM1_IRQ)?);
        let serial = Arc::new(Mutex::new(Serial::new(irq4, console)));
        pio.insert(serial.clone(), COM1_PORT, COM1_LEN)?;
        let events = PlatformEvents::new().map_err(VmError::Platform)?;
        let keyboard = platform::attach(&pio, &events)?;
        let irq1: Arc<dyn IrqLine> = Arc::new(KvmIrqLine::new(kvm_vm.clone(), I8042_IRQ)?);
        keyboard.lock().unwrap_or_else(|p| p.into_inner()).set_irq(irq1);
        let irq8: Arc<dyn IrqLine> = Arc::new(KvmIrqLine::new(kvm_vm.clone(), RTC_IRQ)?);
        let rtc_config = RtcConfig::from_memory_mib(cfg.memory_mib, u32::from(cfg.vcpus));
        let rtc = rtc::attach(&pio, Rtc::new(rtc_config, Some(irq8))?)?;
        let ged: Arc<dyn IrqLine> = Arc::new(KvmIrqLine::new(kvm_vm.clone(), GED_IRQ)?);
        let acpi = Arc::new(Mutex::new(AcpiPlatform::new(events.clone(), Some(ged))));
        pio.insert(acpi.clone(), ACPI_PORT, ACPI_LEN)?;

        let msi = KvmMsiAllocator::new(kvm_vm.clone());
        let ioevents: Arc<dyn IoEvents> = Arc::new(KvmIoEvents::new(kvm_vm.clone()));
        let mut root = PciRoot::new(mmio.clone());
        let mut volumes = Vec::new();
        for (index, d) in cfg.disks.iter().enumerate() {
            let path = match &d.volume {
                Some(v) => format!("volume {}", v.layout.volume),
                None => d.path.display().to_string(),
            };
            let disk_err = |source: Box<dyn std::error::Error + Send + Sync>| VmError::Disk {
                index,
                path: path.clone(),
                source,
            };
            let backend: Arc<dyn BlockBackend> = match &d.volume {
                Some(v) => {
                    let b = Arc::new(VolumeBackend::open(v, d.read_only).map_err(|e| disk_err(Box::new(e)))?);
                    volumes.push(b.clone());
                    b
                }
                None => Arc::new(FileBackend::open(&d.path, d.read_only).map_err(|e| disk_err(Box::new(e)))?),
            };
            let serial_no = format!("nodeos-disk{index}");
            let blk = Block::new(backend, &serial_no);
            let dev = VirtioPciDevice::new(
                Box::new(blk),
                (*mem).clone(),
                &msi as &dyn MsiAllocator,
                ioevents.clone(),
            )
            .map_err(|e| disk_err(Box::new(e)))?;
            root.add_device(Arc::new(Mutex::new(dev)))?;
        }
        let mut fds: Vec<Option<OwnedFd>> = nic_fds.into_iter().map(Some).collect();
        for (index, n) in cfg.nics.iter().enumerate() {
            let fd = fds.get_mut(n.fd_index).and_then(Option::take).ok_or(VmError::NicSocket { index })?;
            let nic_err = |source: Box<dyn std::error::Error + Send + Sync>| VmError::Nic { index, source };
            let backend = SeqpacketBackend::new(fd).map_err(|e| nic_err(Box::new(e)))?;
            let net = Net::new(n.mac, Arc::new(backend));
            let dev = VirtioPciDevice::new(
                Box::new(net),
                (*mem).clone(),
                &msi as &dyn MsiAllocator,
                ioevents.clone(),
            )
            .map_err(|e| nic_err(Box::new(e)))?;
            root.add_device(Arc::new(Mutex::new(dev)))?;
        }
        // Every VM gets an entropy source, so no guest waits at its first getrandom().
        let rng = VirtioPciDevice::new(
            Box::new(Rng::new(RateLimit::default())),
            (*mem).clone(),
            &msi as &dyn MsiAllocator,
            ioevents.clone(),
        )
        .map_err(VmError::Rng)?;
        root.add_device(Arc::new(Mutex::new(rng)))?;
        let root = Arc::new(Mutex::new(root));
        pio.insert(root.clone(), PCI_CONFIG_PORT, PCI_CONFIG_LEN)?;

        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let vcpu = kvm_vm.create_vcpu(u32::from(id))?;
            boot::setup_vcpu(&vcpu, &setup, id)?;
            vcpus.push(vcpu);
        }
        let end = EndSignal::default();
        watch_platform(events, end.clone());
        let vcpus = VcpuSet::start(vcpus, pio.clone(), mmio.clone(), end.clone())?;
        Ok(Vm {
            volumes,
            vcpus,
            serial,
            acpi,
            _rtc: rtc,
            _pci: root,
            _pio: pio,
            _mmio: mmio,
            _mem: mem,
            _mem_file: mem_file,
            _kvm_vm: kvm_vm,
            end,
        })
    }

    /// The VM's end signal, to wait on outside the VM's lock.
    pub fn end_signal(vm: &Arc<Mutex<Vm>>) -> EndSignal {
        vm.lock().unwrap_or_else(|p| p.into_inner()).end.clone()
    }

    pub fn request_end(vm: &Arc<Mutex<Vm>>, reason: StopReason) {
        Self::end_signal(vm).set(reason);
    }

    pub fn pause(&mut self) -> Result<(), VcpuError> {
        self.vcpus.pause()
    }

    pub fn resume(&mut self) -> Result<(), VcpuError> {
        self.vcpus.resume();
        Ok(())
    }

    /// Asks the guest to shut down by pressing its ACPI power button (a GED
    /// event notifying the PNP0C0C device). A guest that ignores it is killed
    /// by the node after its timeout.
    pub fn request_shutdown(&self) {
        self.acpi.lock().unwrap_or_else(|p| p.into_inner()).press_power_button();
        info!("graceful shutdown requested: ACPI power button pressed");
    }

    pub fn console_input(&self, bytes: &[u8]) {
        let taken = self.serial.lock().unwrap_or_else(|p| p.into_inner()).enqueue_input(bytes);
        if taken < bytes.len() {
            warn!(dropped = bytes.len() - taken, "console input backlog full");
        }
    }

    /// Stops the vCPUs; devices and memory go when the VM drops.
    pub fn shutdown(&mut self) {
        self.vcpus.stop();
    }
}

/// Turns the platform ports' requests into the VM's end.
fn watch_platform(events: Arc<PlatformEvents>, end: EndSignal) {
    let spawned = std::thread::Builder::new().name("platform".into()).spawn(move || {
        loop {
            // SAFETY: the eventfd lives in `events`, which this thread owns for the whole loop.
            let fd = unsafe {
                std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(events.eventfd()))
            };
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(500u16)).is_err() {
                continue;
            }
            match events.take() {
                Some(PlatformRequest::Shutdown) => return end.set(StopReason::GuestShutdown),
                Some(PlatformRequest::Reset) => return end.set(StopReason::GuestReset),
                None if end.get().is_some() => return,
                None => {}
            }
        }
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the platform thread; guest power-off will not be seen");
    }
}
