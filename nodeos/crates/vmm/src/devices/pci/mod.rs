//! PCI: bus 0 behind configuration mechanism 1, with MSI-X.
//!
//! # Layout
//! - `config.rs`: a type-0 configuration space (writable masks, memory BARs, capabilities).
//! - `device.rs`: the [`PciDevice`] trait a function implements.
//! - `root.rs`: [`PciRoot`], the config ports, the host bridge, BAR assignment and mapping.
//! - `msix.rs`: [`Msix`], the MSI-X capability, table and pending bits.
//!
//! Migration: [`PciRoot::save`] carries the address latch and every function's
//! configuration space ([`PciConfig::save`]); each device saves its own state,
//! and the virtio transport includes its [`Msix::save`].

pub mod config;
pub mod device;
pub mod msix;
pub mod root;

pub use config::{BarKind, BarSpec, PciConfig, PciConfigState, PciIds};
pub use device::{PciDevice, SharedPciDevice};
pub use msix::{Msix, MsixEntryState, MsixState};
pub use root::{PCI_CONFIG_LEN, PCI_CONFIG_PORT, PciError, PciRoot, PciRootState, PciSlotState};
