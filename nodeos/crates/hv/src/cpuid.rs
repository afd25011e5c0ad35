//! The CPUID a vCPU sees: what `KVM_GET_SUPPORTED_CPUID` offers, edited the
//! way VMMs do, then filtered by a [`CpuidPolicy`].
//!
//! Fixed edits (always applied, in this order):
//! 1. leaf 1: EBX[31:24] = initial APIC id, EBX[23:16] = logical processor
//!    count, EDX[28] (HTT) set when there is more than one vCPU; ECX[31]
//!    (hypervisor present) set; ECX[24] (TSC-deadline timer) set exactly when
//!    KVM has `KVM_CAP_TSC_DEADLINE_TIMER` (KVM emulates it in the in-kernel
//!    LAPIC but does not report it in the supported CPUID).
//! 2. leaves 0xB and 0x1F (extended topology): one thread per core, all vCPUs
//!    cores of one package; EDX = x2APIC id on every subleaf.
//!
//! Then the policy's masks clear bits: that is the hook for hiding features
//! (for a migration-compatible CPU model, or to work around a guest bug).
//! Masks cannot add features KVM does not support.

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

/// Leaf 1 ECX: the TSC-deadline mode of the LAPIC timer.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: a hypervisor is present.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: the logical processor count in EBX[23:16] is valid.
pub const LEAF1_EDX_HTT: u32 = 1 << 28;

/// A register of a CPUID entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuidReg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Bits to clear in one register of one leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidMask {
    pub leaf: u32,
    /// `None`: every subleaf of `leaf`.
    pub subleaf: Option<u32>,
    pub reg: CpuidReg,
    /// The bits that read as zero in the guest.
    pub clear: u32,
}

/// Features to hide from the guest, applied after the fixed edits.
///
/// The default hides nothing beyond what KVM itself does not support.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidPolicy {
    pub masks: Vec<CpuidMask>,
}

impl CpuidPolicy {
    /// Adds a mask clearing `bits` of `reg` in `leaf` (all subleaves if `subleaf` is `None`).
    pub fn hide(mut self, leaf: u32, subleaf: Option<u32>, reg: CpuidReg, bits: u32) -> Self {
        self.masks.push(CpuidMask { leaf, subleaf, reg, clear: bits });
        self
    }

    /// Clears the masked bits in `entries`.
    pub fn apply(&self, entries: &mut [kvm_cpuid_entry2]) {
        for mask in &self.masks {
            for e in entries.iter_mut().filter(|e| e.function == mask.leaf) {
                if mask.subleaf.is_some_and(|s| s != e.index) {
                    continue;
                }
                *reg_mut(e, mask.reg) &= !mask.clear;
            }
        }
    }
}

/// Who the vCPU is and what the host can do, for the fixed edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidParams {
    /// Initial (x2)APIC id; nodeos uses the vCPU index.
    pub apic_id: u32,
    /// vCPUs in the VM, at least 1.
    pub vcpu_count: u32,
    /// KVM has `KVM_CAP_TSC_DEADLINE_TIMER`.
    pub tsc_deadline_timer: bool,
}

/// The CPUID for one vCPU: `supported` edited for `params`, then filtered by `policy`.
pub fn build(
    supported: &[kvm_cpuid_entry2],
    params: &CpuidParams,
    policy: &CpuidPolicy,
) -> Vec<kvm_cpuid_entry2> {
    let mut entries = supported.to_vec();
    let count = params.vcpu_count.max(1);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((params.apic_id & 0xff) << 24) | (count.min(255) << 16);
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if params.tsc_deadline_timer {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                }
            }
            0xb | 0x1f => {
                e.edx = params.apic_id;
                match e.index {
                    // SMT level: one thread per core, so no APIC id bits for it.
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    // Core level: all vCPUs in one package.
                    1 => {
                        e.eax = ceil_log2(count);
                        e.ebx = count;
                        e.ecx = 1 | (2 << 8);
                    }
                    // No further levels: level type 0 (invalid).
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n & 0xff;
                    }
                }
            }
            _ => {}
        }
    }
    policy.apply(&mut entries);
    entries
}

fn ceil_log2(n: u32) -> u32 {
    if n <= 1 { 0 } else { 32 - (n - 1).leading_zeros() }
}

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: CpuidReg) -> &mut u32 {
    match reg {
        CpuidReg::Eax => &mut e.eax,
        CpuidReg::Ebx => &mut e.ebx,
        CpuidReg::Ecx => &mut e.ecx,
        CpuidReg::Edx => &mut e.edx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        let flags = if function == 0xb { KVM_CPUID_FLAG_SIGNIFCANT_INDEX } else { 0 };
        kvm_cpuid_entry2 { function, index, flags, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn synthetic() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            // family 6; EBX: clflush size 8 in [15:8], brand 0; ECX: SSE3 | x2APIC | TSC-deadline(set: must go);
            // EDX: FPU | APIC | HTT
            entry(
                1,
                0,
                0x0006_06a6,
                0x0000_0800,
                0x0020_0001 | LEAF1_ECX_TSC_DEADLINE,
                0x1 | (1 << 9) | LEAF1_EDX_HTT,
            ),
            entry(7, 0, 0, 0x0000_0209, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 4, 16, 0x201, 7),
            entry(0xb, 2, 0, 0, 2, 7),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries.iter().find(|e| e.function == function && e.index == index).expect("leaf present")
    }

    #[test]
    fn leaf1_gets_apic_id_count_and_hypervisor_bit() {
        let params = CpuidParams { apic_id: 3, vcpu_count: 4, tsc_deadline_timer: true };
        let out = build(&synthetic(), &params, &CpuidPolicy::default());
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "low half (clflush size) kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ecx & 0x0020_0001, 0x0020_0001, "other features untouched");
        assert_eq!(find(&out, 0x4000_0000, 0), find(&synthetic(), 0x4000_0000, 0));
        assert_eq!(out.len(), synthetic().len());
    }

    #[test]
    fn tsc_deadline_cleared_without_the_capability_and_htt_for_one_vcpu() {
        let params = CpuidParams { apic_id: 0, vcpu_count: 1, tsc_deadline_timer: false };
        let out = build(&synthetic(), &params, &CpuidPolicy::default());
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ebx >> 24, 0);
    }

    #[test]
    fn extended_topology_describes_one_package() {
        let params = CpuidParams { apic_id: 5, vcpu_count: 6, tsc_deadline_timer: false };
        let out = build(&synthetic(), &params, &CpuidPolicy::default());
        let smt = find(&out, 0xb, 0);
        let core = find(&out, 0xb, 1);
        let end = find(&out, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        assert_eq!((end.eax, end.ebx, end.ecx & 0xff00, end.edx), (0, 0, 0, 5));
        assert_eq!(ceil_log2(1), 0);
        assert_eq!(ceil_log2(2), 1);
        assert_eq!(ceil_log2(4), 2);
        assert_eq!(ceil_log2(5), 3);
    }

    #[test]
    fn policy_masks_clear_bits_after_the_fixed_edits() {
        let params = CpuidParams { apic_id: 0, vcpu_count: 1, tsc_deadline_timer: true };
        let policy = CpuidPolicy::default()
            // hide TSC-deadline even though KVM has it, and the hypervisor bit
            .hide(1, None, CpuidReg::Ecx, LEAF1_ECX_TSC_DEADLINE | LEAF1_ECX_HYPERVISOR)
            // leaf 7 subleaf 0 EBX bit 0 (FSGSBASE)
            .hide(7, Some(0), CpuidReg::Ebx, 1)
            // a subleaf that does not exist: no effect
            .hide(7, Some(1), CpuidReg::Ebx, 0xffff_ffff);
        let out = build(&synthetic(), &params, &policy);
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ecx & (LEAF1_ECX_TSC_DEADLINE | LEAF1_ECX_HYPERVISOR), 0);
        assert_eq!(find(&out, 7, 0).ebx, 0x0000_0208);
    }

    #[test]
    fn policy_serializes() {
        let policy = CpuidPolicy::default().hide(7, Some(0), CpuidReg::Ebx, 1 << 5);
        let text = serde_json::to_string(&policy).unwrap();
        assert_eq!(serde_json::from_str::<CpuidPolicy>(&text).unwrap(), policy);
    }
}
