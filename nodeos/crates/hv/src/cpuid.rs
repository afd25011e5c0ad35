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
//! 3. leaf 0xD (XSAVE): the XCR0 features offered are those with a state
//!    component subleaf of non-zero size, with their architectural companions
//!    (both MPX registers, all three AVX-512 parts, both AMX parts, AVX only
//!    with SSE); the area sizes (0xD.0 EBX/ECX, 0xD.1 EBX) are recomputed from
//!    the subleaves for all of them. [`xcr0_offered`] is the XCR0 the guest
//!    starts with (see `Vcpu::set_xcr0`): with it, the sizes describe the
//!    area an OS enables, which is what Linux checks at boot.
//!
//! Then the policy's masks clear bits: that is the hook for hiding features
//! (for a migration-compatible CPU model, or to work around a guest bug).
//! Masks cannot add features KVM does not support.

use kvm_bindings::kvm_cpuid_entry2;
use nodeos_types::cpu::{CpuModel, CpuReg as CpuModelReg, FEATURE_WORDS, FeatureWord};
use serde::{Deserialize, Serialize};

/// Leaf 1 ECX: the TSC-deadline mode of the LAPIC timer.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: a hypervisor is present.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: the logical processor count in EBX[23:16] is valid.
pub const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0xD: the XSAVE state components.
pub const LEAF_XSAVE: u32 = 0xd;
/// The legacy region (x87 + SSE, 512 bytes) and the XSAVE header (64 bytes).
const XSAVE_LEGACY_AND_HEADER: u32 = 576;
/// XCR0 bits: x87, SSE, AVX, MPX (2), AVX-512 (3), PKRU, AMX (2).
const XCR0_X87: u64 = 1;
const XCR0_SSE: u64 = 1 << 1;
const XCR0_AVX: u64 = 1 << 2;
const XCR0_MPX: u64 = 0b11 << 3;
const XCR0_AVX512: u64 = 0b111 << 5;
const XCR0_AMX: u64 = 0b11 << 17;
/// Leaf 0xD.1 EAX: XSAVEC and XSAVES, the instructions of the compacted format.
const LEAF_XSAVE1_EAX_COMPACTED: u32 = (1 << 1) | (1 << 3);

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
    fix_xsave(&mut entries);
    entries
}

/// The XCR0 value enabling every XSAVE feature `entries` offer (0xD.0 EDX:EAX), x87 included.
pub fn xcr0_offered(entries: &[kvm_cpuid_entry2]) -> u64 {
    find(entries, LEAF_XSAVE, 0).map_or(XCR0_X87, |e| u64::from(e.eax) | u64::from(e.edx) << 32 | XCR0_X87)
}

/// Makes leaf 0xD agree with itself: only features whose state component is
/// described, with their companions, and sizes computed from the subleaves.
/// Runs after the policy, so that hiding a feature also shrinks the area.
fn fix_xsave(entries: &mut [kvm_cpuid_entry2]) {
    let Some(i0) = entries.iter().position(|e| e.function == LEAF_XSAVE && e.index == 0) else { return };
    // (size, offset, aligned-in-compacted-format) of state component `bit`.
    let component = |entries: &[kvm_cpuid_entry2], bit: u32| {
        find(entries, LEAF_XSAVE, bit).filter(|e| e.eax != 0).map(|e| (e.eax, e.ebx, e.ecx & 0b10 != 0))
    };
    let mut xcr0 = xcr0_offered(entries);
    for bit in 2..64 {
        if xcr0 & (1 << bit) != 0 && component(entries, bit).is_none() {
            xcr0 &= !(1 << bit);
        }
    }
    for group in [XCR0_MPX, XCR0_AVX512, XCR0_AMX] {
        if xcr0 & group != group {
            xcr0 &= !group;
        }
    }
    if xcr0 & XCR0_SSE == 0 {
        xcr0 &= !(XCR0_AVX | XCR0_AVX512);
    }
    if xcr0 & XCR0_AVX == 0 {
        xcr0 &= !XCR0_AVX512;
    }
    let standard = (2..64)
        .filter(|bit| xcr0 & (1 << bit) != 0)
        .filter_map(|bit| component(entries, bit))
        .map(|(size, offset, _)| offset.saturating_add(size))
        .fold(XSAVE_LEGACY_AND_HEADER, u32::max);
    // IA32_XSS starts at 0, so the compacted area holds the XCR0 features alone.
    let compacted = (2..64)
        .filter(|bit| xcr0 & (1 << bit) != 0)
        .filter_map(|bit| component(entries, bit))
        .fold(XSAVE_LEGACY_AND_HEADER, |end, (size, _, aligned)| {
            if aligned { end.next_multiple_of(64) } else { end }.saturating_add(size)
        });
    let e0 = &mut entries[i0];
    e0.eax = xcr0 as u32;
    e0.edx = (xcr0 >> 32) as u32;
    e0.ebx = standard;
    e0.ecx = standard;
    if let Some(e1) = entries.iter_mut().find(|e| e.function == LEAF_XSAVE && e.index == 1)
        && e1.eax & LEAF_XSAVE1_EAX_COMPACTED != 0
    {
        e1.ebx = compacted;
    }
}

/// Bits of the feature words that [`build`] sets per VM (the hypervisor bit,
/// TSC-deadline from the capability, HTT from the vCPU count): never masked
/// by a baseline, never part of a node's model.
fn managed_bits(word: FeatureWord) -> u32 {
    match (word.leaf, word.reg) {
        (1, CpuModelReg::Ecx) => LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE,
        (1, CpuModelReg::Edx) => LEAF1_EDX_HTT,
        _ => 0,
    }
}

fn model_reg(reg: CpuModelReg) -> CpuidReg {
    match reg {
        CpuModelReg::Eax => CpuidReg::Eax,
        CpuModelReg::Ebx => CpuidReg::Ebx,
        CpuModelReg::Ecx => CpuidReg::Ecx,
        CpuModelReg::Edx => CpuidReg::Edx,
    }
}

fn reg_of(e: &kvm_cpuid_entry2, reg: CpuidReg) -> u32 {
    match reg {
        CpuidReg::Eax => e.eax,
        CpuidReg::Ebx => e.ebx,
        CpuidReg::Ecx => e.ecx,
        CpuidReg::Edx => e.edx,
    }
}

/// What KVM offers VMs on this node (`supported`: `KVM_GET_SUPPORTED_CPUID`).
pub fn cpu_model(supported: &[kvm_cpuid_entry2]) -> CpuModel {
    let bytes = |regs: [u32; 4]| regs.iter().flat_map(|r| r.to_le_bytes()).collect::<Vec<u8>>();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).trim_matches(char::from(0)).trim().to_owned();
    let vendor = find(supported, 0, 0).map_or_else(String::new, |e| {
        let mut b = bytes([e.ebx, e.edx, e.ecx, 0]);
        b.truncate(12);
        text(b)
    });
    let brand = (0x8000_0002..=0x8000_0004)
        .filter_map(|leaf| find(supported, leaf, 0))
        .flat_map(|e| bytes([e.eax, e.ebx, e.ecx, e.edx]))
        .collect();
    let features = FEATURE_WORDS
        .iter()
        .map(|w| {
            let bits = find(supported, w.leaf, w.subleaf).map_or(0, |e| reg_of(e, model_reg(w.reg)));
            (*w, bits & !managed_bits(*w))
        })
        .collect();
    CpuModel { vendor, brand: text(brand), features }
}

impl CpuidPolicy {
    /// The policy hiding from `supported` every feature the pool `baseline`
    /// lacks, so a VM sees the same CPU on every node.
    pub fn for_baseline(supported: &[kvm_cpuid_entry2], baseline: &CpuModel) -> Self {
        let mine = cpu_model(supported);
        let mut policy = CpuidPolicy::default();
        for w in FEATURE_WORDS {
            let clear = mine.word(*w) & !baseline.word(*w) & !managed_bits(*w);
            if clear != 0 {
                policy = policy.hide(w.leaf, Some(w.subleaf), model_reg(w.reg), clear);
            }
        }
        policy
    }
}

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| e.function == function && e.index == index)
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

    fn leaf(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *find(entries, function, index).expect("leaf present")
    }

    #[test]
    fn leaf1_gets_apic_id_count_and_hypervisor_bit() {
        let params = CpuidParams { apic_id: 3, vcpu_count: 4, tsc_deadline_timer: true };
        let out = build(&synthetic(), &params, &CpuidPolicy::default());
        let l1 = leaf(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "low half (clflush size) kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ecx & 0x0020_0001, 0x0020_0001, "other features untouched");
        assert_eq!(leaf(&out, 0x4000_0000, 0), leaf(&synthetic(), 0x4000_0000, 0));
        assert_eq!(out.len(), synthetic().len());
    }

    #[test]
    fn tsc_deadline_cleared_without_the_capability_and_htt_for_one_vcpu() {
        let params = CpuidParams { apic_id: 0, vcpu_count: 1, tsc_deadline_timer: false };
        let out = build(&synthetic(), &params, &CpuidPolicy::default());
        let l1 = leaf(&out, 1, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ebx >> 24, 0);
    }

    #[test]
    fn extended_topology_describes_one_package() {
        let params = CpuidParams { apic_id: 5, vcpu_count: 6, tsc_deadline_timer: false };
        let out = build(&synthetic(), &params, &CpuidPolicy::default());
        let smt = leaf(&out, 0xb, 0);
        let core = leaf(&out, 0xb, 1);
        let end = leaf(&out, 0xb, 2);
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
        let l1 = leaf(&out, 1, 0);
        assert_eq!(l1.ecx & (LEAF1_ECX_TSC_DEADLINE | LEAF1_ECX_HYPERVISOR), 0);
        assert_eq!(leaf(&out, 7, 0).ebx, 0x0000_0208);
    }

    /// x87|SSE|AVX|PKRU, plus AVX-512 without its ZMM_Hi256 subleaf, MPX with one half.
    fn xsave_leaves(compacted: bool) -> Vec<kvm_cpuid_entry2> {
        let xcr0: u32 = 0x207 | (1 << 3) | (0b101 << 5);
        vec![
            entry(LEAF_XSAVE, 0, xcr0, 576, 2696, 0),
            entry(LEAF_XSAVE, 1, if compacted { 0b1011 } else { 0b0001 }, 576, 0, 0),
            entry(LEAF_XSAVE, 2, 256, 576, 0, 0),
            entry(LEAF_XSAVE, 3, 64, 960, 0, 0),
            entry(LEAF_XSAVE, 5, 64, 1088, 2, 0),
            entry(LEAF_XSAVE, 7, 1024, 1664, 2, 0),
            entry(LEAF_XSAVE, 9, 8, 2688, 2, 0),
        ]
    }

    #[test]
    fn xsave_leaf_offers_whole_features_and_sizes_them() {
        let params = CpuidParams { apic_id: 0, vcpu_count: 1, tsc_deadline_timer: false };
        let out = build(&xsave_leaves(false), &params, &CpuidPolicy::default());
        let l0 = find(&out, LEAF_XSAVE, 0).unwrap();
        // MPX (one half missing) and AVX-512 (a part without a subleaf) are gone.
        assert_eq!(l0.eax, 0x207);
        assert_eq!(xcr0_offered(&out), 0x207);
        // Standard format: PKRU ends the area at 2688 + 8.
        assert_eq!((l0.ebx, l0.ecx), (2696, 2696));
        assert_eq!(find(&out, LEAF_XSAVE, 1).unwrap().ebx, 576, "no XSAVEC/XSAVES: 0xD.1 EBX untouched");

        let out = build(&xsave_leaves(true), &params, &CpuidPolicy::default());
        // Compacted: 576 + AVX 256 = 832, PKRU 64-byte aligned at 832 → 840.
        assert_eq!(find(&out, LEAF_XSAVE, 1).unwrap().ebx, 840);
    }

    #[test]
    fn hiding_an_xsave_feature_shrinks_the_area() {
        let params = CpuidParams { apic_id: 0, vcpu_count: 1, tsc_deadline_timer: false };
        let policy = CpuidPolicy::default().hide(LEAF_XSAVE, Some(0), CpuidReg::Eax, 1 << 9);
        let out = build(&xsave_leaves(true), &params, &policy);
        let l0 = find(&out, LEAF_XSAVE, 0).unwrap();
        assert_eq!((l0.eax, l0.ebx), (0x7, 832));
        assert_eq!(find(&out, LEAF_XSAVE, 1).unwrap().ebx, 832);
        // Hiding SSE takes AVX with it.
        let policy = CpuidPolicy::default().hide(LEAF_XSAVE, Some(0), CpuidReg::Eax, 1 << 1);
        let out = build(&xsave_leaves(false), &params, &policy);
        assert_eq!(find(&out, LEAF_XSAVE, 0).unwrap().eax, 0x201);
        assert_eq!(xcr0_offered(&[]), 1, "no XSAVE leaf: x87 only");
    }

    #[test]
    fn policy_serializes() {
        let policy = CpuidPolicy::default().hide(7, Some(0), CpuidReg::Ebx, 1 << 5);
        let text = serde_json::to_string(&policy).unwrap();
        assert_eq!(serde_json::from_str::<CpuidPolicy>(&text).unwrap(), policy);
    }

    #[test]
    fn a_baseline_hides_what_other_nodes_lack_and_leaves_per_vm_bits_alone() {
        // Leaf 0 "AuthenticAMD"; leaf 1 ECX: SSE3 | AVX (28) | hypervisor; leaf 7 EBX: AVX2 (5) | BMI2 (8).
        let amd = [u32::from_le_bytes(*b"Auth"), u32::from_le_bytes(*b"enti"), u32::from_le_bytes(*b"cAMD")];
        let supported = vec![
            entry(0, 0, 0xd, amd[0], amd[2], amd[1]),
            entry(1, 0, 0, 0, 1 | (1 << 28) | LEAF1_ECX_HYPERVISOR, 1),
            entry(7, 0, 0, (1 << 5) | (1 << 8), 0, 0),
        ];
        let mine = cpu_model(&supported);
        assert_eq!(mine.vendor, "AuthenticAMD");
        let ecx1 = FEATURE_WORDS[0];
        assert_eq!(mine.word(ecx1), 1 | (1 << 28), "the hypervisor bit is per VM, not a node feature");
        // Another node without AVX2 and AVX.
        let mut other = mine.clone();
        for (w, bits) in &mut other.features {
            if w.leaf == 7 && w.subleaf == 0 && w.reg == CpuModelReg::Ebx {
                *bits &= !(1 << 5);
            }
            if *w == ecx1 {
                *bits &= !(1 << 28);
            }
        }
        let base = nodeos_types::cpu::baseline([&mine, &other]).unwrap();
        let policy = CpuidPolicy::for_baseline(&supported, &base);
        let params = CpuidParams { apic_id: 0, vcpu_count: 2, tsc_deadline_timer: true };
        let out = build(&supported, &params, &policy);
        let l1 = find(&out, 1, 0).unwrap();
        assert_eq!(l1.ecx & (1 << 28), 0, "AVX hidden");
        assert_ne!(l1.ecx & 1, 0, "SSE3 kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(find(&out, 7, 0).unwrap().ebx, 1 << 8, "AVX2 hidden, BMI2 kept");
        // On a node that is the baseline, nothing is hidden.
        assert_eq!(CpuidPolicy::for_baseline(&supported, &mine), CpuidPolicy::default());
    }
}
