//! Everything a guest reaches through port I/O, MMIO and virtqueues.
//!
//! # Layout
//! - `bus.rs`: the port I/O and MMIO buses.
//! - `interrupt.rs`: MSI-X vectors, legacy IRQ lines and ioeventfds as devices see them.
//! - `serial.rs`: COM1 (port 0x3f8, IRQ 4).
//! - `i8042.rs`: the keyboard controller and its PS/2 keyboard (ports 0x60/0x64, IRQ 1), CPU reset.
//! - `platform.rs`: legacy PM1a/debug-exit power-off, POST port; [`platform::PlatformEvents`].
//! - `acpi.rs`: the hardware-reduced ACPI registers: sleep control/status, reset, GED (power button).
//! - `rtc.rs`: the CMOS RTC and NVRAM (ports 0x70/0x71, IRQ 8).
//! - `pci/`: configuration mechanism 1, bus 0, BAR placement, MSI-X.
//! - `virtio/`: the modern virtio PCI transport, virtio-blk and virtio-net.
//!
//! # Wiring (done by the worker)
//! Port I/O bus: serial at [`serial::COM1_PORT`], the platform ports via
//! [`platform::attach`], the RTC, the ACPI registers at [`acpi::ACPI_PORT`], the [`pci::PciRoot`] at [`pci::PCI_CONFIG_PORT`].
//! MMIO bus: PCI BARs, placed and moved by the root. Virtio doorbells are
//! ioeventfds registered by each transport through [`interrupt::IoEvents`].

pub mod acpi;
pub mod bus;
pub mod i8042;
pub mod interrupt;
pub mod pci;
pub mod platform;
pub mod rtc;
pub mod serial;
pub mod virtio;

#[cfg(test)]
pub(crate) mod testing;
