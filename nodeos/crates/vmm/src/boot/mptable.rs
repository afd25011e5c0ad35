//! The Intel MultiProcessor table (MP spec 1.4, chapter 4), which tells a
//! guest without ACPI where its CPUs, IOAPIC and ISA interrupts are.
//!
//! The floating pointer goes at the start of the EBDA (0x9fc00, inside the
//! "last KiB of base memory" Linux scans), the configuration table right
//! after it. Entries: one processor per vCPU (APIC id = vCPU index, vCPU 0
//! the bootstrap processor), one ISA bus, the IOAPIC at 0xFEC00000 (id =
//! vCPU count + 1, so it collides with no LAPIC), ISA IRQ 0-15 → IOAPIC pin
//! 0-15 (identity, as KVM's default GSI routing), LINT0 ExtINT on the BSP and
//! LINT1 NMI on every CPU.

use super::{BootError, EBDA_START, write};
use crate::memory::{GuestMem, IOAPIC_START, LAPIC_START};

/// MP spec revision 1.4.
const SPEC_REV: u8 = 4;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
/// Processor entries are 20 bytes; bus, IOAPIC and interrupt entries 8.
const PROCESSOR_LEN: usize = 20;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6 (bits 11:8 of the CPU signature).
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1 EDX feature flags: FPU (bit 0) and APIC (bit 9).
const CPU_FEATURES: u32 = 0x201;
const ISA_BUS_ID: u8 = 0;
pub(super) const ISA_IRQS: u8 = 16;

/// Where the floating pointer is; the configuration table follows it.
pub(super) const MPTABLE_ADDR: u64 = EBDA_START;

/// Bytes summing to zero (mod 256) with `bytes`.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

/// The IOAPIC's id: the one after the last CPU's (the ACPI MADT says the same).
pub(super) fn ioapic_id(vcpus: u8) -> u8 {
    vcpus.saturating_add(1)
}

/// The floating pointer and the configuration table, contiguous, for a guest
/// of `vcpus` vCPUs placed at [`MPTABLE_ADDR`].
pub(super) fn build(vcpus: u8) -> Vec<u8> {
    let ioapic_id = ioapic_id(vcpus);
    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        let mut e = [0u8; PROCESSOR_LEN];
        e[0] = ENTRY_PROCESSOR;
        e[1] = cpu; // local APIC id
        e[2] = LAPIC_VERSION;
        e[3] = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        e[4..8].copy_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e[8..12].copy_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.push(e.to_vec());
    }
    let mut bus = vec![ENTRY_BUS, ISA_BUS_ID];
    bus.extend_from_slice(b"ISA   ");
    entries.push(bus);
    let mut ioapic = vec![ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1 /* enabled */];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.push(ioapic);
    for irq in 0..ISA_IRQS {
        // type, interrupt type, flags (0: conforms to the bus: ISA = edge, active high), bus, bus IRQ, IOAPIC, pin
        entries.push(vec![ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
    }
    // type, interrupt type, flags, bus, bus IRQ, destination LAPIC (0xff: all), LINTIN#
    entries.push(vec![ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, ISA_BUS_ID, 0, 0, 0]);
    entries.push(vec![ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);

    let body: Vec<u8> = entries.concat();
    let table_len = HEADER_LEN + body.len();
    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(SPEC_REV);
    header.push(0); // checksum, below
    header.extend_from_slice(b"NODEOS  "); // OEM id, 8 bytes
    header.extend_from_slice(b"NODEOS-VM   "); // product id, 12 bytes
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    header.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0); // reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    let mut table = header;
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    let mut fp = [0u8; FLOATING_POINTER_LEN];
    fp[..4].copy_from_slice(b"_MP_");
    let table_addr = MPTABLE_ADDR + FLOATING_POINTER_LEN as u64;
    fp[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = SPEC_REV;
    // fp[11] = 0: feature byte 1, a configuration table is present (no default configuration).
    fp[10] = checksum(&fp);

    let mut out = fp.to_vec();
    out.extend_from_slice(&table);
    out
}

/// Writes the MP table at [`MPTABLE_ADDR`]. With the most vCPUs it runs past
/// 0xa0000, still inside the reserved legacy area below 1 MiB.
pub(super) fn write_table(mem: &GuestMem, vcpus: u8) -> Result<(), BootError> {
    write(mem, &build(vcpus), MPTABLE_ADDR, "the MP table")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::{HIMEM_START, MAX_VCPUS};

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    /// Parses the table the way a guest does and returns (processor entries, other entries).
    fn parse(bytes: &[u8]) -> (Vec<[u8; 20]>, Vec<[u8; 8]>) {
        let fp = &bytes[..16];
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(fp), 0, "floating pointer checksum");
        assert_eq!((fp[8], fp[9], fp[11]), (1, 4, 0));
        let table_addr = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;
        assert_eq!(table_addr, MPTABLE_ADDR + 16);
        let table = &bytes[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(&table[..len]), 0, "configuration table checksum");
        assert_eq!(table[6], 4);
        assert_eq!(u32::from_le_bytes(table[36..40].try_into().unwrap()), 0xfee0_0000);
        let count = u16::from_le_bytes([table[34], table[35]]) as usize;
        let (mut cpus, mut others) = (Vec::new(), Vec::new());
        let mut at = 44;
        for _ in 0..count {
            if table[at] == 0 {
                cpus.push(table[at..at + 20].try_into().unwrap());
                at += 20;
            } else {
                others.push(table[at..at + 8].try_into().unwrap());
                at += 8;
            }
        }
        assert_eq!(at, len, "entries fill the table exactly");
        (cpus, others)
    }

    fn check(vcpus: u8) {
        let bytes = build(vcpus);
        let (cpus, others) = parse(&bytes);
        assert_eq!(cpus.len(), vcpus as usize);
        for (i, cpu) in cpus.iter().enumerate() {
            assert_eq!(cpu[1] as usize, i, "APIC id");
            assert_eq!(cpu[3], if i == 0 { 3 } else { 1 }, "enabled, BSP only for vCPU 0");
        }
        let ioapic_id = vcpus + 1;
        let buses: Vec<_> = others.iter().filter(|e| e[0] == 1).collect();
        assert_eq!(buses.len(), 1);
        assert_eq!(&buses[0][2..8], b"ISA   ");
        let ioapics: Vec<_> = others.iter().filter(|e| e[0] == 2).collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!((ioapics[0][1], ioapics[0][3]), (ioapic_id, 1));
        assert_eq!(u32::from_le_bytes(ioapics[0][4..8].try_into().unwrap()), 0xfec0_0000);
        let irqs: Vec<_> = others.iter().filter(|e| e[0] == 3).collect();
        assert_eq!(irqs.len(), 16);
        for (i, e) in irqs.iter().enumerate() {
            assert_eq!((e[1], e[4], e[5], e[6], e[7]), (0, 0, i as u8, ioapic_id, i as u8));
        }
        let lints: Vec<_> = others.iter().filter(|e| e[0] == 4).collect();
        assert_eq!(lints.len(), 2);
        assert_eq!((lints[0][1], lints[0][6], lints[0][7]), (3, 0, 0), "ExtINT on LINT0 of the BSP");
        assert_eq!((lints[1][1], lints[1][6], lints[1][7]), (1, 0xff, 1), "NMI on LINT1 of all");
    }

    #[test]
    fn one_and_four_vcpus() {
        check(1);
        check(4);
    }

    #[test]
    fn largest_table_stays_below_1mib() {
        check(MAX_VCPUS);
        assert!(MPTABLE_ADDR + build(MAX_VCPUS).len() as u64 <= HIMEM_START);
    }
}
