//! The boot GDT: null, code, data, TSS; and its descriptors as `kvm_segment`s
//! for KVM_SET_SREGS (the CPU never reloads them from memory until the kernel
//! does, but the kernel's first `lgdt`-less far jump or segment load would).
//!
//! Descriptor layout (Intel SDM vol. 3, 3.4.5): limit[15:0] in bits 15:0,
//! base[23:0] in 39:16, type/S/DPL/P in 47:40, limit[19:16] in 51:48,
//! AVL/L/D/G in 55:52, base[31:24] in 63:56.

use nodeos_hv::kvm_bindings::kvm_segment;

use super::{BootError, GDT_ADDR, IDT_ADDR, write};
use crate::memory::GuestMem;

/// Selectors (index * 8).
pub(super) const CODE_SELECTOR: u16 = 0x08;
pub(super) const DATA_SELECTOR: u16 = 0x10;
pub(super) const TSS_SELECTOR: u16 = 0x18;

/// Flags in descriptor bits 55:52 (G, D/B, L, AVL) and 47:40 (P, DPL, S, type),
/// packed as `0xGDLA_PDST` minus the limit nibble.
const CODE64_FLAGS: u16 = 0xa09b; // G, L; present, code exec/read, accessed
const CODE32_FLAGS: u16 = 0xc09b; // G, D (32-bit); present, code exec/read, accessed
const DATA_FLAGS: u16 = 0xc093; // G, B; present, data read/write, accessed
const TSS64_FLAGS: u16 = 0x808b; // G; present, busy 64-bit TSS
const TSS32_FLAGS: u16 = 0x008b; // present, busy 32-bit TSS

/// One descriptor from flags (as above), base and 20-bit limit.
pub(super) fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The GDT for the Linux 64-bit entry (64-bit code) or PVH (32-bit code).
pub(super) fn table(pvh: bool) -> [u64; 4] {
    if pvh {
        [
            0,
            gdt_entry(CODE32_FLAGS, 0, 0xfffff),
            gdt_entry(DATA_FLAGS, 0, 0xfffff),
            gdt_entry(TSS32_FLAGS, 0, 0x67),
        ]
    } else {
        [
            0,
            gdt_entry(CODE64_FLAGS, 0, 0xfffff),
            gdt_entry(DATA_FLAGS, 0, 0xfffff),
            gdt_entry(TSS64_FLAGS, 0, 0xfffff),
        ]
    }
}

/// The `kvm_segment` the CPU would load from descriptor `entry` at GDT index `index`.
pub(super) fn segment(entry: u64, index: u16) -> kvm_segment {
    let granular = (entry >> 55) & 1 == 1;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: u8::from(granular),
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the GDT at [`GDT_ADDR`] and an empty IDT entry at [`IDT_ADDR`].
pub(super) fn write_tables(mem: &GuestMem, pvh: bool) -> Result<(), BootError> {
    let bytes: Vec<u8> = table(pvh).iter().flat_map(|e| e.to_le_bytes()).collect();
    write(mem, &bytes, GDT_ADDR, "the GDT")?;
    write(mem, &0u64.to_le_bytes(), IDT_ADDR, "the IDT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_have_the_classic_encodings() {
        assert_eq!(table(false), [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff]);
        assert_eq!(table(true), [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0067]);
        assert_eq!(gdt_entry(0x4092, 0x1234_5678, 0xabcde), 0x124a_9234_5678_bcde);
    }

    #[test]
    fn code64_segment_is_long_mode_ring0() {
        let cs = segment(table(false)[1], 1);
        assert_eq!((cs.selector, cs.base, cs.limit), (CODE_SELECTOR, 0, 0xffff_ffff));
        assert_eq!((cs.type_, cs.s, cs.dpl, cs.present), (0xb, 1, 0, 1));
        assert_eq!((cs.l, cs.db, cs.g, cs.unusable), (1, 0, 1, 0));
    }

    #[test]
    fn pvh_segments_are_flat_32_bit() {
        let t = table(true);
        let cs = segment(t[1], 1);
        assert_eq!(
            (cs.selector, cs.base, cs.limit, cs.l, cs.db, cs.type_),
            (CODE_SELECTOR, 0, 0xffff_ffff, 0, 1, 0xb)
        );
        let ds = segment(t[2], 2);
        assert_eq!((ds.selector, ds.limit, ds.db, ds.type_, ds.s), (DATA_SELECTOR, 0xffff_ffff, 1, 0x3, 1));
        let tr = segment(t[3], 3);
        assert_eq!((tr.selector, tr.limit, tr.type_, tr.s, tr.g), (TSS_SELECTOR, 0x67, 0xb, 0, 0));
        assert_eq!(segment(0, 0).unusable, 1);
    }
}
