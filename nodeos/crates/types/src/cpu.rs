//! A node's CPU as VMs see it, and the pool's CPU baseline.
//!
//! Each node records the feature words KVM supports on it ([`CpuModel`], from
//! `KVM_GET_SUPPORTED_CPUID`). The pool baseline is their intersection: every
//! VM sees only features every member has, so what a guest sees is the same on
//! every node and a guest that probed its CPU on one node still runs on
//! another (live migration needs exactly that).

use serde::{Deserialize, Serialize};

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CpuReg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One feature word: the bits of `reg` in CPUID leaf `leaf`, subleaf `subleaf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FeatureWord {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: CpuReg,
}

/// The feature words a baseline covers: the flags of leaves 1, 7, 0xD (the
/// XSAVE state components and instructions) and 0x80000001, and the
/// extended-feature words 0x80000007 EDX and 0x80000008 EBX. Identification
/// fields (family, APIC ids, sizes) are not features and stay per node.
pub const FEATURE_WORDS: &[FeatureWord] = &[
    FeatureWord { leaf: 1, subleaf: 0, reg: CpuReg::Ecx },
    FeatureWord { leaf: 1, subleaf: 0, reg: CpuReg::Edx },
    FeatureWord { leaf: 7, subleaf: 0, reg: CpuReg::Ebx },
    FeatureWord { leaf: 7, subleaf: 0, reg: CpuReg::Ecx },
    FeatureWord { leaf: 7, subleaf: 0, reg: CpuReg::Edx },
    FeatureWord { leaf: 7, subleaf: 1, reg: CpuReg::Eax },
    FeatureWord { leaf: 0xd, subleaf: 0, reg: CpuReg::Eax },
    FeatureWord { leaf: 0xd, subleaf: 0, reg: CpuReg::Edx },
    FeatureWord { leaf: 0xd, subleaf: 1, reg: CpuReg::Eax },
    FeatureWord { leaf: 0x8000_0001, subleaf: 0, reg: CpuReg::Ecx },
    FeatureWord { leaf: 0x8000_0001, subleaf: 0, reg: CpuReg::Edx },
    FeatureWord { leaf: 0x8000_0007, subleaf: 0, reg: CpuReg::Edx },
    FeatureWord { leaf: 0x8000_0008, subleaf: 0, reg: CpuReg::Ebx },
];

/// What a node's KVM offers VMs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    /// CPUID vendor string (`GenuineIntel`, `AuthenticAMD`).
    pub vendor: String,
    /// The processor brand string, for people.
    pub brand: String,
    /// The bits set in each of [`FEATURE_WORDS`] (a word the CPU lacks is 0).
    pub features: Vec<(FeatureWord, u32)>,
}

impl CpuModel {
    /// The bits of `word`, 0 when absent.
    pub fn word(&self, word: FeatureWord) -> u32 {
        self.features.iter().find(|(w, _)| *w == word).map_or(0, |(_, bits)| *bits)
    }

    /// Feature bits this model has beyond `baseline`.
    pub fn beyond(&self, baseline: &CpuModel) -> u32 {
        FEATURE_WORDS.iter().map(|w| (self.word(*w) & !baseline.word(*w)).count_ones()).sum()
    }
}

/// The pool baseline of `models`: each feature word is the intersection of
/// theirs. The vendor and brand are the common ones, or `mixed` when they
/// differ (a pool of mixed vendors runs, but a VM started on one vendor's CPU
/// may not be able to move to the other's). `None` without models.
pub fn baseline<'a>(models: impl IntoIterator<Item = &'a CpuModel>) -> Option<CpuModel> {
    let mut models = models.into_iter();
    let first = models.next()?;
    let mut base = CpuModel {
        vendor: first.vendor.clone(),
        brand: first.brand.clone(),
        features: FEATURE_WORDS.iter().map(|w| (*w, first.word(*w))).collect(),
    };
    for m in models {
        if m.vendor != base.vendor {
            base.vendor = "mixed".into();
        }
        if m.brand != base.brand {
            base.brand = "mixed".into();
        }
        for (w, bits) in &mut base.features {
            *bits &= m.word(*w);
        }
    }
    Some(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(vendor: &str, words: &[(usize, u32)]) -> CpuModel {
        CpuModel {
            vendor: vendor.into(),
            brand: format!("{vendor} cpu"),
            features: words.iter().map(|&(i, bits)| (FEATURE_WORDS[i], bits)).collect(),
        }
    }

    #[test]
    fn the_baseline_is_the_intersection_of_every_word() {
        let a = model("AuthenticAMD", &[(0, 0b1111), (2, 0xff00)]);
        let b = model("AuthenticAMD", &[(0, 0b0111), (2, 0x0ff0), (3, 1)]);
        let base = baseline([&a, &b]).unwrap();
        assert_eq!(base.word(FEATURE_WORDS[0]), 0b0111);
        assert_eq!(base.word(FEATURE_WORDS[2]), 0x0f00);
        // A word one node lacks is absent from the baseline.
        assert_eq!(base.word(FEATURE_WORDS[3]), 0);
        assert_eq!(base.vendor, "AuthenticAMD");
        assert_eq!(base.features.len(), FEATURE_WORDS.len());
        assert_eq!(a.beyond(&base), 1 + 4);
        assert_eq!(b.beyond(&base), 4 + 1);
        // A baseline of one is the node itself; of none, nothing.
        assert_eq!(baseline([&a]).unwrap().beyond(&a), 0);
        assert!(baseline([]).is_none());
    }

    #[test]
    fn mixed_vendors_are_named() {
        let base = baseline([&model("GenuineIntel", &[]), &model("AuthenticAMD", &[])]).unwrap();
        assert_eq!((base.vendor.as_str(), base.brand.as_str()), ("mixed", "mixed"));
    }

    #[test]
    fn an_old_record_without_a_word_reads_as_zero() {
        let m: CpuModel = serde_json::from_str(r#"{"vendor":"v","brand":"b","features":[]}"#).unwrap();
        assert_eq!(m.word(FEATURE_WORDS[0]), 0);
    }
}
