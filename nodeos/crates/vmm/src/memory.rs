//! The guest physical address map and guest memory.
//!
//! ```text
//! 0x0000_0000 ..  RAM (boot structures in the first MiB, kernel from 1 MiB)
//! 0xC000_0000 ..  32-bit MMIO window: PCI BARs (allocated upward)
//! 0xFEC0_0000     IOAPIC
//! 0xFEE0_0000     local APIC
//! 0x1_0000_0000 .. RAM above 3 GiB of guest memory, if any
//! ```
//!
//! Guest memory is one memfd mapped shared, so that snapshot and live migration
//! can read it from another mapping, and a later restore can map it again.
//! Every write the VMM makes through it (devices filling buffers, used rings)
//! sets a bit in a per-page bitmap, because KVM's dirty log only sees the
//! guest's own writes and a live migration needs both.

use std::fs::File;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Guest memory as every part of the worker sees it: writes by the VMM are
/// recorded in the regions' [`AtomicBitmap`]s (see `migration::dirty`).
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// End of low RAM: the 32-bit MMIO window starts here.
pub const MMIO32_START: u64 = 0xC000_0000;
/// End of the PCI BAR window (the IOAPIC follows).
pub const MMIO32_END: u64 = 0xFEC0_0000;
pub const IOAPIC_START: u64 = 0xFEC0_0000;
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// Where RAM continues above the 32-bit hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Smallest guest accepted, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest guest accepted, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {mib} MiB is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB")]
    Size { mib: u64 },
    #[error("cannot create the guest memory file")]
    Memfd(#[source] nix::Error),
    #[error("cannot size the guest memory file to {bytes} bytes")]
    Truncate {
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// The RAM ranges (guest address, length) for a guest of `mib` MiB.
pub fn ram_ranges(mib: u64) -> Result<Vec<(GuestAddress, u64)>, MemoryError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(MemoryError::Size { mib });
    }
    let bytes = mib << 20;
    Ok(if bytes <= MMIO32_START {
        vec![(GuestAddress(0), bytes)]
    } else {
        vec![(GuestAddress(0), MMIO32_START), (GuestAddress(HIGH_RAM_START), bytes - MMIO32_START)]
    })
}

/// Creates guest memory of `mib` MiB backed by one shared memfd; returns the
/// memory and the file (kept for snapshot and migration).
pub fn create(mib: u64) -> Result<(GuestMem, File), MemoryError> {
    let ranges = ram_ranges(mib)?;
    let fd = nix::sys::memfd::memfd_create(c"nodeos-guest-ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(MemoryError::Memfd)?;
    let file = File::from(fd);
    let bytes = mib << 20;
    file.set_len(bytes).map_err(|source| MemoryError::Truncate { bytes, source })?;
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (addr, len) in ranges {
        let dup = file.try_clone().map_err(|source| MemoryError::Truncate { bytes, source })?;
        regions.push((addr, len as usize, Some(FileOffset::new(dup, offset))));
        offset += len;
    }
    let mem = GuestMem::from_ranges_with_files(regions).map_err(MemoryError::Map)?;
    Ok((mem, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_guests_are_one_low_range_big_ones_split_around_the_hole() {
        assert_eq!(ram_ranges(128).unwrap(), vec![(GuestAddress(0), 128 << 20)]);
        let big = ram_ranges(4096).unwrap();
        assert_eq!(
            big,
            vec![
                (GuestAddress(0), MMIO32_START),
                (GuestAddress(HIGH_RAM_START), (4096 << 20) - MMIO32_START)
            ]
        );
        assert!(ram_ranges(1).is_err());
        assert!(ram_ranges(MAX_MEMORY_MIB + 1).is_err());
    }

    #[test]
    fn memory_is_shared_through_the_file() {
        let (mem, file) = create(16).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(mem.num_regions(), 1);
    }
}
