//! The guest's physical memory map, as the zero page (e820) and PVH
//! (`hvm_memmap_table_entry`) both carry it.
//!
//! ```text
//! [0, 0x9fc00)                      RAM
//! [0x9fc00, 1 MiB)                  reserved: EBDA (MP table), VGA hole, BIOS area
//! [1 MiB, end of low RAM)           RAM (the kernel, the initramfs at the top)
//! [0xfffbc000, 0xfffc0000)          reserved: KVM's identity-map page and TSS
//! [4 GiB, ...)                      RAM above the 32-bit hole, if any
//! ```
//!
//! The PCI window `0xC000_0000..0xFEC0_0000`, the IOAPIC and the LAPIC are
//! left out on purpose, as on a PC: a reserved entry over the window would
//! make Linux refuse the BARs the VMM assigned there, and a gap is where it
//! looks for PCI space.

use nodeos_hv::{KVM_IDENTITY_MAP_ADDR, KVM_PRIVATE_END};
use vm_memory::GuestAddress;

use super::{EBDA_START, HIMEM_START};

/// Entry types (the numbers are the e820 ones, shared by PVH).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// The map for the RAM `ranges` of [`crate::memory::ram_ranges`]: sorted, no
/// overlaps. The first range must start at 0 and reach past 1 MiB.
pub fn build(ranges: &[(GuestAddress, u64)]) -> Vec<E820Entry> {
    let entry = |addr: u64, end: u64, kind| E820Entry { addr, size: end - addr, kind };
    let mut map = Vec::with_capacity(6);
    for &(GuestAddress(start), len) in ranges {
        let end = start + len;
        if start == 0 {
            map.push(entry(0, EBDA_START, E820Kind::Ram));
            map.push(entry(EBDA_START, HIMEM_START, E820Kind::Reserved));
            map.push(entry(HIMEM_START, end, E820Kind::Ram));
        } else {
            map.push(entry(start, end, E820Kind::Ram));
        }
    }
    map.push(entry(KVM_IDENTITY_MAP_ADDR, KVM_PRIVATE_END, E820Kind::Reserved));
    map.sort_by_key(|e| e.addr);
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MMIO32_START, ram_ranges};

    fn check_sorted_disjoint(map: &[E820Entry]) {
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{pair:x?}");
        }
        assert!(map.iter().all(|e| e.size > 0));
    }

    #[test]
    fn small_guest_map() {
        let map = build(&ram_ranges(128).unwrap());
        check_sorted_disjoint(&map);
        assert_eq!(
            map,
            vec![
                E820Entry { addr: 0, size: 0x9fc00, kind: E820Kind::Ram },
                E820Entry { addr: 0x9fc00, size: 0x100000 - 0x9fc00, kind: E820Kind::Reserved },
                E820Entry { addr: 0x100000, size: (128 << 20) - 0x100000, kind: E820Kind::Ram },
                E820Entry { addr: 0xfffb_c000, size: 0x4000, kind: E820Kind::Reserved },
            ]
        );
    }

    #[test]
    fn big_guest_map_has_the_hole_and_high_ram() {
        let map = build(&ram_ranges(8192).unwrap());
        check_sorted_disjoint(&map);
        assert_eq!(map.len(), 5);
        assert_eq!(map[2], E820Entry { addr: 0x100000, size: MMIO32_START - 0x100000, kind: E820Kind::Ram });
        assert_eq!(map[3].kind, E820Kind::Reserved);
        assert_eq!(map[3].addr, KVM_IDENTITY_MAP_ADDR);
        assert_eq!(
            map[4],
            E820Entry { addr: 1 << 32, size: (8192 << 20) - MMIO32_START, kind: E820Kind::Ram }
        );
        let ram: u64 = map.iter().filter(|e| e.kind == E820Kind::Ram).map(|e| e.size).sum();
        assert_eq!(ram, (8192 << 20) - (0x100000 - 0x9fc00), "all RAM but the legacy area");
        // Nothing in the PCI window.
        assert!(map.iter().all(|e| e.addr + e.size <= MMIO32_START || e.addr >= crate::memory::MMIO32_END));
    }
}
