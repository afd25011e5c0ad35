//! The VM-wide KVM state a snapshot or a live migration carries: the
//! in-kernel PIC pair and IOAPIC, the PIT and the KVM clock ([`VmState`]).
//! Per-vCPU state (registers, LAPIC, MSRs, ...) is [`crate::VcpuState`].
//!
//! # Save and restore contract
//! Save on the source with every vCPU out of `KVM_RUN` for good (pending I/O
//! completed, see `vcpu.rs`) and the devices quiet (no irqfd writes, no
//! [`Vm::set_irq_line`]), so that no interrupt lands in one saved state and
//! not in another:
//! 1. [`Vm::save_state`] first: the KVM clock keeps running while the VM is
//!    paused, so reading it as the vCPUs stop records the guest time at which
//!    the guest stopped.
//! 2. `Vcpu::save_state` for every vCPU, and guest memory.
//!
//! Restore on the destination, into a VM none of whose vCPUs has run:
//! 1. `Hypervisor::create_vm` (it creates the PIC, IOAPIC and PIT in their
//!    reset state), [`Vm::add_guest_memory`] with the memory contents.
//! 2. [`Vm::restore_state`]: the three irqchips, the PIT, then the clock.
//!    vCPUs may already exist; none may have run.
//! 3. [`Vm::create_vcpu`] and `Vcpu::restore_state` for every vCPU.
//! 4. Optionally [`Vm::set_clock`]`(state.clock_ns + downtime)`, the last
//!    step before the vCPUs first run. The clock must be final before any
//!    vCPU runs: KVM publishes it to the guest (kvmclock) on guest entry, and
//!    setting it afterwards makes guest time jump under a running guest.
//! 5. Run the vCPUs.
//!
//! A restore that fails part way leaves the VM partly restored: discard it.
//!
//! # Clock flags
//! `KVM_SET_CLOCK` is always given `flags = 0` and the wanted clock value:
//! - `KVM_CLOCK_TSC_STABLE` and `KVM_CLOCK_HOST_TSC` are outputs of
//!   `KVM_GET_CLOCK`. Kernels before 5.16 refuse any flag on `KVM_SET_CLOCK`
//!   (EINVAL) although their `KVM_GET_CLOCK` reports `TSC_STABLE` whenever
//!   KVM's master clock is in use; newer ones accept and ignore both. Any
//!   other bit is refused everywhere. So no flag from a read is passed back.
//! - `KVM_CLOCK_REALTIME` makes KVM add the host wall-clock time elapsed
//!   since `realtime` to `clock`. It needs a `realtime` that `KVM_GET_CLOCK`
//!   vouched for (it reports the flag only when the host clocksource is the
//!   TSC and KVM's master clock is in use; a nested host may never report
//!   it), wall clocks in step across the two hosts, and kernel 5.16. With a
//!   zero `realtime` KVM adds the whole epoch. The VMM measures the downtime
//!   itself instead and sets `clock_ns + downtime`.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_ioapic_state,
    kvm_irqchip, kvm_pic_state, kvm_pit_state2,
};
use serde::{Deserialize, Serialize};

use crate::{HvError, Vm};

/// Where every x86 IOAPIC lives; KVM's cannot move.
pub const IOAPIC_BASE_ADDRESS: u64 = 0xfec0_0000;

/// One in-kernel interrupt controller, as `KVM_GET_IRQCHIP` names it.
struct Irqchip {
    id: u32,
    /// For errors of the ioctls.
    name: &'static str,
    /// The `VmState` field holding it, and what its chip id must be.
    field: &'static str,
    allowed: &'static str,
}

/// In the order of [`VmState::irqchips`].
const IRQCHIPS: [Irqchip; 3] = [
    Irqchip {
        id: KVM_IRQCHIP_PIC_MASTER,
        name: "PIC master",
        field: "pic_master.chip_id",
        allowed: "must be 0 (KVM_IRQCHIP_PIC_MASTER)",
    },
    Irqchip {
        id: KVM_IRQCHIP_PIC_SLAVE,
        name: "PIC slave",
        field: "pic_slave.chip_id",
        allowed: "must be 1 (KVM_IRQCHIP_PIC_SLAVE)",
    },
    Irqchip {
        id: KVM_IRQCHIP_IOAPIC,
        name: "IOAPIC",
        field: "ioapic.chip_id",
        allowed: "must be 2 (KVM_IRQCHIP_IOAPIC)",
    },
];

/// The VM-wide KVM state: what [`Vm::save_state`] reads and
/// [`Vm::restore_state`] writes back (see the module docs for when).
///
/// The kvm structs serialize as their raw bytes (kvm-bindings `serde`
/// feature), like [`crate::VcpuState`]. Deserializing zero-pads or truncates
/// bytes of the wrong length without an error, so a length mismatch cannot
/// be detected here: the snapshot format's version must rule it out.
/// `restore_state` checks what it can (chip ids, IOAPIC address).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Chip id `KVM_IRQCHIP_PIC_MASTER` (0): IRQs 0-7.
    pub pic_master: kvm_irqchip,
    /// Chip id `KVM_IRQCHIP_PIC_SLAVE` (1): IRQs 8-15, cascaded on IRQ 2.
    pub pic_slave: kvm_irqchip,
    /// Chip id `KVM_IRQCHIP_IOAPIC` (2): pins 0-23, redirection table.
    pub ioapic: kvm_irqchip,
    /// The i8254. Its `count_load_time`s are host monotonic timestamps:
    /// meaningless on another host, and `KVM_SET_PIT2` replaces them with
    /// "now", so a restored counter restarts its current period.
    pub pit: kvm_pit_state2,
    /// The KVM clock (kvmclock's nanoseconds) when saved. Add the time the VM
    /// spent paused before restoring, or set it later with [`Vm::set_clock`].
    pub clock_ns: u64,
}

impl VmState {
    /// The master PIC's registers (IRR, IMR, ISR, ...).
    pub fn pic_master_regs(&self) -> kvm_pic_state {
        pic_regs(&self.pic_master)
    }

    /// The slave PIC's registers.
    pub fn pic_slave_regs(&self) -> kvm_pic_state {
        pic_regs(&self.pic_slave)
    }

    /// The IOAPIC's registers (IRR, redirection table, ...).
    pub fn ioapic_regs(&self) -> kvm_ioapic_state {
        // SAFETY: every member of the `chip` union is plain integers (any bit
        // pattern is a valid value), and the whole 512-byte union is always
        // initialized: the struct came from KVM, from `Default` or from
        // deserializing its full byte length. Which member KVM meant is the
        // chip id, checked by `check`; a wrong one gives garbage, not UB.
        unsafe { self.ioapic.chip.ioapic }
    }

    /// The three irqchips in the order of `IRQCHIPS`.
    fn irqchips(&self) -> [&kvm_irqchip; 3] {
        [&self.pic_master, &self.pic_slave, &self.ioapic]
    }

    /// Refuses a state KVM would take but that cannot be ours, before any
    /// of it reaches KVM.
    fn check(&self) -> Result<(), HvError> {
        // KVM picks the chip by the id inside the struct: a swapped id would
        // load one chip's bytes into another.
        for (state, chip) in self.irqchips().into_iter().zip(&IRQCHIPS) {
            if state.chip_id != chip.id {
                return Err(HvError::InvalidVmState {
                    field: chip.field,
                    found: u64::from(state.chip_id),
                    allowed: chip.allowed,
                });
            }
        }
        // KVM would take another base and move the IOAPIC's MMIO window away
        // from where the guest's ACPI tables say it is.
        let base = self.ioapic_regs().base_address;
        if base != IOAPIC_BASE_ADDRESS {
            return Err(HvError::InvalidVmState {
                field: "ioapic.base_address",
                found: base,
                allowed: "must be 0xfec00000",
            });
        }
        Ok(())
    }
}

fn pic_regs(chip: &kvm_irqchip) -> kvm_pic_state {
    // SAFETY: as in `VmState::ioapic_regs`: plain-integer union members over
    // a fully initialized union; the chip id says which one KVM meant.
    unsafe { chip.chip.pic }
}

impl Vm {
    /// Reads the PIC pair, the IOAPIC, the PIT and the KVM clock. Call it with
    /// every vCPU stopped and the devices quiet, before saving the vCPUs (see
    /// the module docs of `state.rs`).
    pub fn save_state(&self) -> Result<VmState, HvError> {
        let [pic_master, pic_slave, ioapic] = IRQCHIPS.map(|chip| {
            let mut state = kvm_irqchip { chip_id: chip.id, ..Default::default() };
            self.fd()
                .get_irqchip(&mut state)
                .map(|()| state)
                .map_err(|source| HvError::GetIrqchip { chip: chip.name, source })
        });
        Ok(VmState {
            pic_master: pic_master?,
            pic_slave: pic_slave?,
            ioapic: ioapic?,
            pit: self.fd().get_pit2().map_err(HvError::GetPit)?,
            clock_ns: self.get_clock()?,
        })
    }

    /// Writes `state` into this VM: the PIC pair and IOAPIC, the PIT, then
    /// the clock (to `state.clock_ns`).
    ///
    /// The VM must be fresh from `Hypervisor::create_vm` with no vCPU having
    /// run; the vCPUs' own state follows (see the module docs of `state.rs`).
    /// The state is checked before anything reaches KVM
    /// ([`HvError::InvalidVmState`]); a KVM failure after that leaves the VM
    /// partly restored, and the caller discards it.
    pub fn restore_state(&self, state: &VmState) -> Result<(), HvError> {
        state.check()?;
        for (chip_state, chip) in state.irqchips().into_iter().zip(&IRQCHIPS) {
            self.fd()
                .set_irqchip(chip_state)
                .map_err(|source| HvError::SetIrqchip { chip: chip.name, source })?;
        }
        self.fd().set_pit2(&state.pit).map_err(HvError::SetPit)?;
        self.set_clock(state.clock_ns)
    }

    /// The KVM clock now, in nanoseconds: the guest's kvmclock time. It runs
    /// whether or not the vCPUs do.
    pub fn get_clock(&self) -> Result<u64, HvError> {
        self.fd().get_clock().map(|clock| clock.clock).map_err(HvError::GetClock)
    }

    /// Sets the KVM clock to `clock_ns` from now on (flags 0: see "Clock
    /// flags" in the module docs of `state.rs`). Call it before any vCPU
    /// runs; the last call before the first run is what the guest sees.
    pub fn set_clock(&self, clock_ns: u64) -> Result<(), HvError> {
        let data = kvm_clock_data { clock: clock_ns, flags: 0, ..Default::default() };
        self.fd().set_clock(&data).map_err(|source| HvError::SetClock { clock_ns, source })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::testing::hypervisor_or_skip;
    use crate::vcpu::tests::{real_mode_vcpu, run_to_halt};

    /// The raw bytes of a kvm struct, through its serde impl.
    fn bytes<T: Serialize>(value: &T) -> String {
        serde_json::to_string(value).unwrap()
    }

    /// The PIT without its host timestamps, which KVM rewrites on every set.
    fn pit_without_load_times(pit: &kvm_pit_state2) -> kvm_pit_state2 {
        let mut pit = *pit;
        for channel in &mut pit.channels {
            channel.count_load_time = 0;
        }
        pit
    }

    /// Programs PIT channel 2 (the speaker: it raises no IRQ, so nothing
    /// changes behind the test's back) to mode 3, count 0x1234, then halts.
    const PROGRAM_PIT_CHANNEL_2: [u8; 13] = [
        0xb0, 0xb6, // mov al, 0xb6 (channel 2, lo/hi byte, mode 3)
        0xe6, 0x43, // out 0x43, al
        0xb0, 0x34, // mov al, 0x34
        0xe6, 0x42, // out 0x42, al
        0xb0, 0x12, // mov al, 0x12
        0xe6, 0x42, // out 0x42, al
        0xf4, // hlt
    ];

    #[test]
    fn vm_state_round_trips_into_a_fresh_vm() {
        let Some(hv) = hypervisor_or_skip("vm_state_round_trips_into_a_fresh_vm") else { return };
        let vm = hv.create_vm().unwrap();
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        vm.add_guest_memory(mem.clone(), false).unwrap();
        run_to_halt(real_mode_vcpu(&vm, 0, &mem, &PROGRAM_PIT_CHANNEL_2));
        // IRQ 4 (master PIC pin 4, IOAPIC pin 4) and IRQ 9 (slave PIC pin 1,
        // IOAPIC pin 9) held high. The reset IOAPIC masks every pin and the
        // guest has interrupts off, so both stay pending in IRR.
        vm.set_irq_line(4, true).unwrap();
        vm.set_irq_line(9, true).unwrap();

        let saved = vm.save_state().unwrap();
        assert_eq!(saved.pic_master_regs().irr & 1 << 4, 1 << 4);
        assert_eq!(saved.pic_slave_regs().irr & 1 << 1, 1 << 1);
        assert_eq!(saved.ioapic_regs().irr & (1 << 4 | 1 << 9), 1 << 4 | 1 << 9);
        assert_eq!(saved.ioapic_regs().base_address, IOAPIC_BASE_ADDRESS);
        let channel = saved.pit.channels[2];
        assert_eq!((channel.count, channel.mode), (0x1234, 3));

        let json = serde_json::to_string(&saved).unwrap();
        let carried: VmState = serde_json::from_str(&json).unwrap();
        let fresh = hv.create_vm().unwrap();
        let before = fresh.save_state().unwrap();
        assert_eq!(before.ioapic_regs().irr, 0, "a fresh VM starts with nothing pending");
        assert_ne!(bytes(&before.pit), bytes(&saved.pit));
        fresh.restore_state(&carried).unwrap();

        let again = fresh.save_state().unwrap();
        assert_eq!(bytes(&again.pic_master), bytes(&saved.pic_master));
        assert_eq!(bytes(&again.pic_slave), bytes(&saved.pic_slave));
        assert_eq!(bytes(&again.ioapic), bytes(&saved.ioapic));
        assert_eq!(pit_without_load_times(&again.pit), pit_without_load_times(&saved.pit));
        assert_eq!(again.ioapic_regs().irr & 1 << 4, 1 << 4, "the line level survived");

        // The restored line is still high: lowering it clears IRR as it would
        // have on the source.
        fresh.set_irq_line(4, false).unwrap();
        assert_eq!(fresh.save_state().unwrap().ioapic_regs().irr & 1 << 4, 0);
    }

    #[test]
    fn restore_refuses_a_foreign_state_before_touching_kvm() {
        let Some(hv) = hypervisor_or_skip("restore_refuses_a_foreign_state_before_touching_kvm") else {
            return;
        };
        let source = hv.create_vm().unwrap();
        source.set_irq_line(4, true).unwrap();
        let saved = source.save_state().unwrap();
        let vm = hv.create_vm().unwrap();

        let mut swapped = saved.clone();
        swapped.pic_slave.chip_id = KVM_IRQCHIP_IOAPIC;
        let err = vm.restore_state(&swapped).unwrap_err();
        assert!(matches!(err, HvError::InvalidVmState { field: "pic_slave.chip_id", found: 2, .. }), "{err}");

        let mut moved = saved.clone();
        // Writing a union field is safe; the chip id says `ioapic` is the one.
        moved.ioapic.chip.ioapic.base_address = 0xfed0_0000;
        let err = vm.restore_state(&moved).unwrap_err();
        assert!(matches!(err, HvError::InvalidVmState { field: "ioapic.base_address", .. }), "{err}");
        assert_eq!(err.to_string(), "VM state: ioapic.base_address is 0xfed00000, must be 0xfec00000");

        // Nothing reached KVM: IRQ 4 is not pending here.
        assert_eq!(vm.save_state().unwrap().ioapic_regs().irr, 0);
        vm.restore_state(&saved).unwrap();
        assert_eq!(vm.save_state().unwrap().ioapic_regs().irr, 1 << 4);
    }

    #[test]
    fn clock_is_restored_with_the_downtime_added() {
        let Some(hv) = hypervisor_or_skip("clock_is_restored_with_the_downtime_added") else { return };
        const SECOND: u64 = 1_000_000_000;
        let vm = hv.create_vm().unwrap();
        let mut state = vm.save_state().unwrap();

        let fresh = hv.create_vm().unwrap();
        let target = state.clock_ns + SECOND;
        state.clock_ns = target;
        fresh.restore_state(&state).unwrap();
        let now = fresh.get_clock().unwrap();
        assert!((target..target + 10 * SECOND).contains(&now), "clock {now}, set to {target}");

        // A later set wins, forwards or back.
        fresh.set_clock(5 * SECOND).unwrap();
        let now = fresh.get_clock().unwrap();
        assert!((5 * SECOND..15 * SECOND).contains(&now), "clock {now}");
        assert!(fresh.get_clock().unwrap() >= now, "monotonic");
    }
}
