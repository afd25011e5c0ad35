//! The VM worker: one process per VM (`nodeos vm-worker`), holding guest
//! memory, vCPU threads and device emulation.
//!
//! # Layout
//! - `config.rs`: [`config::WorkerConfig`], what a worker runs, and its validation.
//! - `control.rs`: the node <-> worker control protocol.
//! - `vm.rs`: [`vm::Vm`], one VM assembled from its config; `vcpu.rs`: vCPU threads,
//!   pause/resume, the VM's end signal; `worker.rs`: the worker process's main.
//! - `seccomp.rs`: the system-call filter every worker thread runs under.
//! - `state.rs`: saved device state (snapshot, migration) and [`state::StateError`].
//! - `migration/`: live migration: the authenticated stream, dirty tracking,
//!   the pre-copy decider, the sender and the receiver.
//! - `memory.rs`: the guest physical address map and guest memory (a shared memfd).
//! - `boot/`: x86-64 direct boot: Linux bzImage / ELF vmlinux (boot params, e820,
//!   command line, initramfs), PVH ELF (start info, memory map), GDT, identity page
//!   tables, MP table, initial vCPU registers.
//! - `interrupts.rs`: the KVM side of device interrupts and doorbells (MSI routes,
//!   irqfds, ioeventfds).
//! - `devices/`: the I/O and MMIO buses and everything on them: `bus.rs`, `interrupt.rs`
//!   (MSI routing seen by devices), `serial.rs`, `pci/` (config mechanism 1, root
//!   bus, MSI-X), `virtio/` (PCI transport, `block/`, `net/`).
//!
//! A guest can only reach the worker through vCPU exits and virtqueues; every
//! value it controls (port data, MMIO offsets, descriptor chains) is checked, and
//! a bad one is a device error reported to the guest, never a worker crash.

pub mod boot;
pub mod config;
pub mod control;
pub mod devices;
pub mod interrupts;
pub mod jail;
pub mod memory;
pub mod migration;
pub mod seccomp;
pub mod state;
pub mod vcpu;
pub mod vm;
pub mod worker;
