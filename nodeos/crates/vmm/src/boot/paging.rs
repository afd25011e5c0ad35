//! Identity page tables for the Linux 64-bit entry: the first 1 GiB mapped
//! with 2 MiB pages. boot.rst requires the kernel (load address +
//! `init_size`), the zero page and the command line to be identity-mapped;
//! all of them are below 1 GiB in nodeos's layout.

use super::{BootError, PD_ADDR, PDPT_ADDR, PML4_ADDR, write};
use crate::memory::GuestMem;

/// End of the identity-mapped range (1 GiB).
pub(super) const IDENTITY_MAPPED_END: u64 = 1 << 30;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
/// Page size: the PD entry maps a 2 MiB page.
const HUGE: u64 = 1 << 7;

/// The three tables, as (guest address, 4 KiB contents).
pub(super) fn tables() -> [(u64, Vec<u8>); 3] {
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT_ADDR | PRESENT | WRITABLE).to_le_bytes());
    let mut pdpt = vec![0u8; 4096];
    pdpt[..8].copy_from_slice(&(PD_ADDR | PRESENT | WRITABLE).to_le_bytes());
    let pd: Vec<u8> =
        (0..512u64).flat_map(|i| ((i << 21) | PRESENT | WRITABLE | HUGE).to_le_bytes()).collect();
    [(PML4_ADDR, pml4), (PDPT_ADDR, pdpt), (PD_ADDR, pd)]
}

/// Writes the tables; CR3 is [`PML4_ADDR`].
pub(super) fn write_tables(mem: &GuestMem) -> Result<(), BootError> {
    for (addr, table) in tables() {
        write(mem, &table, addr, "the identity page tables")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(table: &[u8], i: usize) -> u64 {
        u64::from_le_bytes(table[i * 8..i * 8 + 8].try_into().unwrap())
    }

    #[test]
    fn first_gib_is_identity_mapped_with_2mib_pages() {
        let [(a4, pml4), (a3, pdpt), (a2, pd)] = tables();
        assert_eq!((a4, a3, a2), (0x9000, 0xa000, 0xb000));
        assert_eq!(entry(&pml4, 0), 0xa003);
        assert!((1..512).all(|i| entry(&pml4, i) == 0));
        assert_eq!(entry(&pdpt, 0), 0xb003);
        assert!((1..512).all(|i| entry(&pdpt, i) == 0));
        assert_eq!(entry(&pd, 0), 0x83);
        assert_eq!(entry(&pd, 1), 0x20_0083);
        assert_eq!(entry(&pd, 511), 0x3fe0_0083);
        assert!((0..512).all(|i| entry(&pd, i) & !0xfff == (i as u64) << 21));
    }
}
