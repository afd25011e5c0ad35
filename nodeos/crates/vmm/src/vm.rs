//! One VM, assembled from its [`WorkerConfig`]: KVM VM, guest memory, devices,
//! kernel, vCPUs. The worker's main thread owns it.
//!
//! Build order: KVM VM (with in-kernel irqchip and PIT) → guest memory and its
//! slots → kernel and boot structures → buses and devices (serial, platform
//! ports, PCI root with one virtio-blk per disk and one virtio-net per NIC) →
//! vCPUs with their boot state → vCPU threads. Any failure drops what was made
//! so far; nothing outlives the process.
//!
//! An incoming live migration builds the same machine without the kernel and
//! the boot state ([`Vm::build_incoming`]): its memory arrives over the wire,
//! [`Vm::restore_state`] loads what the source saved with [`Vm::save_state`],
//! and [`Vm::start_incoming`] runs it with its clocks advanced by the pause.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use nodeos_hv::{CpuidPolicy, HvError, Hypervisor, Vcpu, VcpuState};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::boot::{self, BootConfig, BootError, BootSetup};
use crate::config::{ConfigError, WorkerConfig};
use crate::control::StopReason;
use crate::devices::acpi::{ACPI_LEN, ACPI_PORT, AcpiPlatform, AcpiState, GED_IRQ};
use crate::devices::bus::{Bus, BusError};
use crate::devices::i8042::{I8042, I8042_IRQ, I8042State};
use crate::devices::interrupt::{IoEvents, IrqLine, MsiAllocator};
use crate::devices::pci::{PCI_CONFIG_LEN, PCI_CONFIG_PORT, PciError, PciRoot, PciRootState};
use crate::devices::platform::{self, PlatformEvents, PlatformRequest};
use crate::devices::rtc::{self, RTC_IRQ, Rtc, RtcConfig, RtcError, RtcState};
use crate::devices::serial::{COM1_IRQ, COM1_LEN, COM1_PORT, Serial, SerialState};
use crate::devices::virtio::block::{Block, BlockBackend, FileBackend, VolumeBackend};
use crate::devices::virtio::net::{FrameBackend, Net, SeqpacketBackend};
use crate::devices::virtio::pci::VirtioPciState;
use crate::devices::virtio::rng::{RateLimit, Rng};
use crate::devices::virtio::{VirtioPciDevice, VirtioPciError};
use crate::interrupts::{KvmIoEvents, KvmIrqLine, KvmMsiAllocator};
use crate::memory::{self, GuestMem, MemoryError};
use crate::state::StateError;
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
    #[error("vCPU {id}")]
    VcpuState {
        id: u32,
        #[source]
        source: HvError,
    },
    #[error("the vCPUs are {found}; this needs them {needed}")]
    VcpusNot { found: &'static str, needed: &'static str },
    #[error("saved state does not fit this VM")]
    State(#[from] StateError),
}

/// The shape of a VM as a migration checks it: the destination must have
/// built the same machine, or the saved state means nothing there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub memory_mib: u64,
    pub vcpus: u8,
    /// Device type of each virtio function, in PCI slot order.
    pub virtio: Vec<u16>,
    /// MAC of each NIC.
    pub nics: Vec<[u8; 6]>,
}

/// Everything of a paused VM but its memory: what a migration sends after the
/// last memory pass.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub layout: Layout,
    pub vcpus: Vec<VcpuState>,
    pub kvm: nodeos_hv::VmState,
    pub serial: SerialState,
    pub i8042: I8042State,
    pub rtc: RtcState,
    pub acpi: AcpiState,
    pub pci: PciRootState,
    pub virtio: Vec<VirtioPciState>,
    /// Wall-clock time of the pause, Unix nanoseconds: the destination
    /// advances the guest's clocks by the time since.
    pub paused_at_unix_ns: u64,
    /// The vCPUs' TSC rate, kHz (the TSC is advanced at this rate).
    pub tsc_khz: u32,
}

/// The vCPUs: threads running them, or the vCPUs themselves while the VM is
/// saved, restored, or waiting for an incoming migration to commit.
#[derive(Debug)]
enum Vcpus {
    Running(VcpuSet),
    Stopped(Vec<Vcpu>),
}

impl Vcpus {
    fn name(&self) -> &'static str {
        match self {
            Vcpus::Running(_) => "running",
            Vcpus::Stopped(_) => "stopped",
        }
    }
}

/// Clock hand-over of an incoming migration, kept from the restore to the start.
#[derive(Debug, Clone, Copy)]
struct IncomingClock {
    clock_ns: u64,
    paused_at_unix_ns: u64,
    tsc_khz: u32,
}

/// Longest pause credited to the guest's clocks: a clock skew between hosts
/// must not throw the guest's time far ahead.
const MAX_CLOCK_ADVANCE_NS: u64 = 3600 * 1_000_000_000;
/// IA32_TSC.
const MSR_TSC: u32 = 0x10;

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A built VM: running, or (incoming migration) waiting for its state.
pub struct Vm {
    /// Volume disks, to hand them layout changes from the pool.
    volumes: Vec<Arc<VolumeBackend>>,
    // Field order is drop order: vCPUs stop before devices and memory go.
    vcpus: Vcpus,
    serial: Arc<Mutex<Serial>>,
    acpi: Arc<Mutex<AcpiPlatform>>,
    keyboard: Arc<Mutex<I8042>>,
    rtc: Arc<Mutex<Rtc>>,
    pci: Arc<Mutex<PciRoot>>,
    /// The virtio functions, in PCI slot order (disks, NICs, rng).
    virtio: Vec<Arc<Mutex<VirtioPciDevice>>>,
    /// Each NIC's frame socket and MAC, to announce the VM after a migration.
    nic_backends: Vec<(Arc<dyn FrameBackend>, [u8; 6])>,
    layout: Layout,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: Arc<GuestMem>,
    _mem_file: std::fs::File,
    kvm_vm: Arc<nodeos_hv::Vm>,
    end: EndSignal,
    /// From [`Vm::restore_state`] to [`Vm::start_incoming`]: the clocks at the
    /// source's pause and each vCPU's TSC then.
    incoming: Option<(IncomingClock, Vec<u64>)>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("layout", &self.layout)
            .field("vcpus", &self.vcpus.name())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vm {
    /// Gives a volume disk its new layout from the pool.
    pub fn update_volume(&self, layout: nodeos_block::client::VolumeLayout, own: bool) -> Result<(), String> {
        let v = self
            .volumes
            .iter()
            .find(|b| b.volume() == layout.volume)
            .ok_or_else(|| format!("no disk on volume {}", layout.volume))?;
        v.update_layout(layout, own)
    }

    /// Builds the VM, loads its kernel and starts its vCPUs.
    pub fn build(
        cfg: &WorkerConfig,
        nic_fds: Vec<OwnedFd>,
        console: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, VmError> {
        let mut vm = Self::assemble(cfg, nic_fds, console, true)?;
        vm.start_vcpus()?;
        Ok(vm)
    }

    /// Builds the VM of an incoming migration: the same machine with empty
    /// memory, and vCPUs that wait for [`Vm::restore_state`] and [`Vm::start_incoming`].
    pub fn build_incoming(
        cfg: &WorkerConfig,
        nic_fds: Vec<OwnedFd>,
        console: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, VmError> {
        Self::assemble(cfg, nic_fds, console, false)
    }

    fn load(hv: &Hypervisor, cfg: &WorkerConfig, mem: &GuestMem) -> Result<BootSetup, VmError> {
        let mut setup = boot::load_kernel(
            mem,
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
        Ok(setup)
    }

    fn assemble(
        cfg: &WorkerConfig,
        nic_fds: Vec<OwnedFd>,
        console: Box<dyn std::io::Write + Send>,
        boot: bool,
    ) -> Result<Self, VmError> {
        let hv = Hypervisor::new()?;
        let kvm_vm = Arc::new(hv.create_vm()?);
        let (mem, mem_file) = memory::create(cfg.memory_mib)?;
        let mem = Arc::new(mem);
        kvm_vm.add_guest_memory(mem.clone(), false)?;
        let setup = if boot { Some(Self::load(&hv, cfg, &mem)?) } else { None };

        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let irq4: Arc<dyn IrqLine> = Arc::new(KvmIrqLine::new(kvm_vm.clone(), COM1_IRQ)?);
        let serial = Arc::new(Mutex::new(Serial::new(irq4, console)));
        pio.insert(serial.clone(), COM1_PORT, COM1_LEN)?;
        let events = PlatformEvents::new().map_err(VmError::Platform)?;
        let keyboard = platform::attach(&pio, &events)?;
        let irq1: Arc<dyn IrqLine> = Arc::new(KvmIrqLine::new(kvm_vm.clone(), I8042_IRQ)?);
        lock(&keyboard).set_irq(irq1);
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
        let mut virtio = Vec::new();
        let mut nic_backends: Vec<(Arc<dyn FrameBackend>, [u8; 6])> = Vec::new();
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
                    // An incoming VM writes its volumes only once they are handed over.
                    let opened = if boot || d.read_only {
                        VolumeBackend::open(v, d.read_only)
                    } else {
                        VolumeBackend::deferred(v, d.read_only)
                    };
                    let b = Arc::new(opened.map_err(|e| disk_err(Box::new(e)))?);
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
            let dev = Arc::new(Mutex::new(dev));
            root.add_device(dev.clone())?;
            virtio.push(dev);
        }
        let mut fds: Vec<Option<OwnedFd>> = nic_fds.into_iter().map(Some).collect();
        for (index, n) in cfg.nics.iter().enumerate() {
            let fd = fds.get_mut(n.fd_index).and_then(Option::take).ok_or(VmError::NicSocket { index })?;
            let nic_err = |source: Box<dyn std::error::Error + Send + Sync>| VmError::Nic { index, source };
            let backend: Arc<dyn FrameBackend> =
                Arc::new(SeqpacketBackend::new(fd).map_err(|e| nic_err(Box::new(e)))?);
            nic_backends.push((backend.clone(), n.mac));
            let net = Net::new(n.mac, backend);
            let dev = VirtioPciDevice::new(
                Box::new(net),
                (*mem).clone(),
                &msi as &dyn MsiAllocator,
                ioevents.clone(),
            )
            .map_err(|e| nic_err(Box::new(e)))?;
            let dev = Arc::new(Mutex::new(dev));
            root.add_device(dev.clone())?;
            virtio.push(dev);
        }
        // Every VM gets an entropy source, so no guest waits at its first getrandom().
        let rng = VirtioPciDevice::new(
            Box::new(Rng::new(RateLimit::default())),
            (*mem).clone(),
            &msi as &dyn MsiAllocator,
            ioevents.clone(),
        )
        .map_err(VmError::Rng)?;
        let rng = Arc::new(Mutex::new(rng));
        root.add_device(rng.clone())?;
        virtio.push(rng);
        let root = Arc::new(Mutex::new(root));
        pio.insert(root.clone(), PCI_CONFIG_PORT, PCI_CONFIG_LEN)?;

        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let vcpu = kvm_vm.create_vcpu(u32::from(id))?;
            if let Some(setup) = &setup {
                boot::setup_vcpu(&vcpu, setup, id)?;
            }
            vcpus.push(vcpu);
        }
        let end = EndSignal::default();
        watch_platform(events, end.clone());
        let layout = Layout {
            memory_mib: cfg.memory_mib,
            vcpus: cfg.vcpus,
            virtio: virtio.iter().map(|d| lock(d).device_type()).collect(),
            nics: cfg.nics.iter().map(|n| n.mac).collect(),
        };
        Ok(Vm {
            volumes,
            vcpus: Vcpus::Stopped(vcpus),
            serial,
            acpi,
            keyboard,
            rtc,
            pci: root,
            virtio,
            nic_backends,
            layout,
            pio,
            mmio,
            mem,
            _mem_file: mem_file,
            kvm_vm,
            end,
            incoming: None,
        })
    }

    fn start_vcpus(&mut self) -> Result<(), VmError> {
        let vcpus = match std::mem::replace(&mut self.vcpus, Vcpus::Stopped(Vec::new())) {
            Vcpus::Stopped(v) => v,
            running => {
                self.vcpus = running;
                return Err(VmError::VcpusNot { found: "running", needed: "stopped" });
            }
        };
        self.vcpus =
            Vcpus::Running(VcpuSet::start(vcpus, self.pio.clone(), self.mmio.clone(), self.end.clone())?);
        Ok(())
    }

    fn stop_vcpus(&mut self) {
        if let Vcpus::Running(set) = &mut self.vcpus {
            let vcpus = set.stop();
            self.vcpus = Vcpus::Stopped(vcpus);
        }
    }

    /// The machine's shape, for a migration's check.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Guest memory and the KVM VM, for a migration's dirty tracking and page reads.
    pub fn memory(&self) -> (Arc<nodeos_hv::Vm>, Arc<GuestMem>) {
        (self.kvm_vm.clone(), self.mem.clone())
    }

    /// The VM's end signal, to wait on outside the VM's lock.
    pub fn end_signal(vm: &Arc<Mutex<Vm>>) -> EndSignal {
        lock(vm).end.clone()
    }

    pub fn request_end(vm: &Arc<Mutex<Vm>>, reason: StopReason) {
        Self::end_signal(vm).set(reason);
    }

    /// Parks the vCPUs (an operator's pause, or a migration's throttle).
    pub fn pause(&mut self) -> Result<(), VcpuError> {
        match &self.vcpus {
            Vcpus::Running(set) => set.pause(),
            Vcpus::Stopped(_) => Ok(()),
        }
    }

    /// Unparks paused vCPUs; for an incoming migration's VM waiting for its
    /// hand-over, this is the start ([`Vm::start_incoming`]).
    pub fn resume(&mut self) -> Result<(), VmError> {
        if self.incoming.is_some() {
            return self.start_incoming();
        }
        if let Vcpus::Running(set) = &self.vcpus {
            set.resume();
        }
        Ok(())
    }

    /// Stops everything that changes the VM (vCPU threads end and hand their
    /// vCPUs back; device I/O drains and stops) so that its state can be saved.
    /// Undone by [`Vm::unfreeze`].
    pub fn freeze(&mut self) {
        self.stop_vcpus();
        for d in &self.virtio {
            lock(d).pause_io();
        }
    }

    /// Resumes a VM stopped by [`Vm::freeze`] (a migration that did not commit).
    pub fn unfreeze(&mut self) -> Result<(), VmError> {
        for d in &self.virtio {
            lock(d).resume_io();
        }
        self.start_vcpus()
    }

    /// The frozen VM's state, memory aside.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let Vcpus::Stopped(vcpus) = &self.vcpus else {
            return Err(VmError::VcpusNot { found: "running", needed: "stopped" });
        };
        let paused_at_unix_ns = unix_ns();
        let mut saved = Vec::with_capacity(vcpus.len());
        for v in vcpus {
            let state = v.save_state().map_err(|source| VmError::VcpuState { id: v.id(), source })?;
            info!("saved {}", state.summary());
            saved.push(state);
        }
        let tsc_khz = match vcpus.first() {
            Some(v) => v.tsc_khz().map_err(|source| VmError::VcpuState { id: v.id(), source })?,
            None => 0,
        };
        Ok(VmState {
            layout: self.layout.clone(),
            vcpus: saved,
            kvm: self.kvm_vm.save_state()?,
            serial: lock(&self.serial).save(),
            i8042: lock(&self.keyboard).save(),
            rtc: lock(&self.rtc).save(),
            acpi: lock(&self.acpi).save(),
            pci: lock(&self.pci).save(),
            virtio: self.virtio.iter().map(|d| lock(d).save()).collect(),
            paused_at_unix_ns,
            tsc_khz,
        })
    }

    /// Loads a state saved by [`Vm::save_state`] on a VM of the same layout
    /// whose vCPUs never ran (an incoming migration). The vCPUs stay stopped
    /// until [`Vm::start_incoming`].
    pub fn restore_state(&mut self, s: VmState) -> Result<(), VmError> {
        let wrong = |r: String| VmError::State(StateError::new("VM", r));
        if s.layout != self.layout {
            return Err(wrong(format!("saved from {:?}, this VM is {:?}", s.layout, self.layout)));
        }
        if s.virtio.len() != self.virtio.len() {
            return Err(wrong(format!(
                "{} virtio functions saved, {} here",
                s.virtio.len(),
                self.virtio.len()
            )));
        }
        let Vcpus::Stopped(vcpus) = &self.vcpus else {
            return Err(VmError::VcpusNot { found: "running", needed: "stopped" });
        };
        if s.vcpus.len() != vcpus.len() || s.vcpus.iter().zip(vcpus).any(|(a, b)| a.id != b.id()) {
            return Err(wrong(format!("{} vCPUs saved for {} here", s.vcpus.len(), vcpus.len())));
        }
        // VM-wide interrupt controllers and timers first, then the vCPUs (their
        // LAPICs), then the devices, whose restores may raise interrupts.
        self.kvm_vm.restore_state(&s.kvm)?;
        let mut tsc = Vec::with_capacity(vcpus.len());
        for (v, state) in vcpus.iter().zip(&s.vcpus) {
            v.restore_state(state).map_err(|source| VmError::VcpuState { id: v.id(), source })?;
            info!("restored {}", state.summary());
            tsc.push(state.msrs.iter().find(|m| m.index == MSR_TSC).map_or(0, |m| m.data));
        }
        lock(&self.pci).restore(s.pci)?;
        for (d, state) in self.virtio.iter().zip(s.virtio) {
            lock(d).restore(state)?;
        }
        lock(&self.serial).restore(s.serial)?;
        lock(&self.keyboard).restore(s.i8042)?;
        lock(&self.rtc).restore(s.rtc)?;
        lock(&self.acpi).restore(s.acpi)?;
        let clock = IncomingClock {
            clock_ns: s.kvm.clock_ns,
            paused_at_unix_ns: s.paused_at_unix_ns,
            tsc_khz: s.tsc_khz,
        };
        self.incoming = Some((clock, tsc));
        Ok(())
    }

    /// Runs a VM restored by [`Vm::restore_state`]: its KVM clock and TSCs
    /// advance by the time since the source paused (so guest time does not
    /// fall behind), device I/O resumes, the vCPUs start, and every NIC
    /// announces its MAC so switches learn where the VM is now.
    pub fn start_incoming(&mut self) -> Result<(), VmError> {
        let Some((clock, tsc)) = self.incoming.take() else {
            return Err(VmError::State(StateError::new("VM", "no state restored")));
        };
        let elapsed = unix_ns().saturating_sub(clock.paused_at_unix_ns).min(MAX_CLOCK_ADVANCE_NS);
        self.kvm_vm.set_clock(clock.clock_ns.saturating_add(elapsed))?;
        if let Vcpus::Stopped(vcpus) = &self.vcpus {
            let ticks =
                u64::try_from(u128::from(elapsed) * u128::from(clock.tsc_khz) / 1_000_000).unwrap_or(0);
            for (v, t) in vcpus.iter().zip(tsc) {
                let value = t.saturating_add(ticks);
                v.set_msrs(&[nodeos_hv::MsrEntry { index: MSR_TSC, data: value }])
                    .map_err(|source| VmError::VcpuState { id: v.id(), source })?;
            }
        }
        info!(paused_ms = elapsed / 1_000_000, "guest clocks advanced by the migration pause");
        self.unfreeze()?;
        self.announce();
        Ok(())
    }

    /// Sends a RARP frame from each NIC's MAC (as a physical NIC that moved
    /// would, and as switches and bridges expect), so the pool's switches and
    /// outside hosts learn the VM's new port before the guest says anything;
    /// then asks each NIC's driver that can (VIRTIO_NET_F_GUEST_ANNOUNCE) to
    /// announce the guest's own addresses (gratuitous ARP, IPv6 neighbour
    /// advertisements), which refreshes the other hosts' neighbour caches too.
    fn announce(&self) {
        for (backend, mac) in &self.nic_backends {
            let frame = rarp_announce(*mac);
            for _ in 0..3 {
                if let Err(e) = backend.send(&frame) {
                    warn!(error = %e, "cannot announce a NIC after migration");
                    break;
                }
            }
        }
        let asked = self.virtio.iter().filter(|d| lock(d).announce()).count();
        if asked > 0 {
            info!(nics = asked, "guest drivers asked to announce their addresses");
        }
    }

    /// Asks the guest to shut down by pressing its ACPI power button (a GED
    /// event notifying the PNP0C0C device). A guest that ignores it is killed
    /// by the node after its timeout.
    pub fn request_shutdown(&self) {
        lock(&self.acpi).press_power_button();
        info!("graceful shutdown requested: ACPI power button pressed");
    }

    pub fn console_input(&self, bytes: &[u8]) {
        let taken = lock(&self.serial).enqueue_input(bytes);
        if taken < bytes.len() {
            warn!(dropped = bytes.len() - taken, "console input backlog full");
        }
    }

    /// Stops the vCPUs; devices and memory go when the VM drops.
    pub fn shutdown(&mut self) {
        self.stop_vcpus();
    }
}

/// A RARP "request reverse" from `mac` (RFC 903), padded to the Ethernet minimum.
pub fn rarp_announce(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    // htype Ethernet, ptype IPv4, hlen 6, plen 4, op 3 (request reverse).
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 3]);
    f[22..28].copy_from_slice(&mac);
    f[32..38].copy_from_slice(&mac);
    f
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
