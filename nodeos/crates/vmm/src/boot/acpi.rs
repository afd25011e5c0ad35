//! The ACPI tables of a VM: a hardware-reduced platform (no SCI, no PM1
//! blocks, no FACS), as a guest without firmware needs it to find its CPUs,
//! its legacy devices and its power button, and to power off.
//!
//! ```text
//! 0xE0000  RSDP (revision 2) → XSDT → FADT → DSDT
//!                                   → MADT
//! ```
//! The RSDP sits where Linux scans for it (0xE0000..0x100000, reserved in the
//! e820 map) and is also handed over directly (`acpi_rsdp_addr` in the zero
//! page, `rsdp_paddr` in the PVH start info).
//!
//! - FADT: hardware-reduced, sleep control/status and reset registers on the
//!   ports of [`crate::devices::acpi`], power button as a control-method
//!   device, `IAPC_BOOT_ARCH` saying legacy devices and an 8042 are present,
//!   the CMOS century register.
//! - MADT: one enabled local APIC per vCPU (APIC id = processor UID = vCPU
//!   index), the IOAPIC (id = vCPU count + 1, as in the MP table), LINT1 NMI on
//!   every CPU. ISA IRQs map to the IOAPIC pin of the same number (KVM's
//!   default routing), so no source overrides.
//! - DSDT: `\_S5`; under `\_SB`: the PCI host bridge with its `_CRS` windows
//!   (so Linux keeps the BARs the VMM placed), COM1, the i8042 keyboard, the
//!   CMOS RTC, the power button, the Generic Event Device and one processor
//!   device per vCPU.

use acpi_tables::Aml;
use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Field, FieldAccessType, FieldEntry,
    FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Method, Name, Notify, OpRegion, OpRegionSpace,
    Package, Path, ResourceTemplate, Scope, Store,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;

use super::{BootError, write};
use crate::devices::acpi::{
    ACPI_PORT, GED_IRQ, GED_OFFSET, GED_POWER_BUTTON, RESET_OFFSET, RESET_VALUE, S5_SLEEP_TYPE,
    SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET,
};
use crate::devices::i8042::{I8042_IRQ, I8042_PORT};
use crate::devices::pci::PCI_CONFIG_PORT;
use crate::devices::rtc::{RTC_IRQ, RTC_PORT};
use crate::devices::serial::{COM1_IRQ, COM1_PORT};
use crate::memory::{GuestMem, IOAPIC_START, LAPIC_START, MMIO32_END, MMIO32_START};

/// Where the RSDP goes: the start of the BIOS area Linux scans.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// End (exclusive) of the area the tables may use.
pub const ACPI_AREA_END: u64 = 0x10_0000;
const OEM_ID: [u8; 6] = *b"NODEOS";
const OEM_TABLE_ID: [u8; 8] = *b"NODEOSVM";
const OEM_REVISION: u32 = 1;
/// CMOS register holding the century (FADT `CENTURY`).
const CMOS_CENTURY: u8 = 0x32;
/// `IAPC_BOOT_ARCH`: legacy (ISA) devices, an 8042, no VGA.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// MADT flags: PCAT_COMPAT (a dual 8259 is present, KVM emulates one).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT Local APIC NMI structure: type 4, length 6.
const MADT_LAPIC_NMI: u8 = 4;
const ALL_PROCESSORS: u8 = 0xff;
/// The notification a power button device gets when pressed (ACPI 6.5 §4.8.3.1.1).
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

/// One table, placed: guest address and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// Builds every table for `vcpus` vCPUs, placed from [`RSDP_ADDR`]; the RSDP first.
pub fn build(vcpus: u8, ioapic_id: u8) -> Result<Vec<Placed>, BootError> {
    let dsdt = sdt(*b"DSDT", 6, &dsdt_body(vcpus));
    let madt = madt(vcpus, ioapic_id);
    let mut next = (RSDP_ADDR + Rsdp::len() as u64).next_multiple_of(64);
    let mut place = |bytes: Vec<u8>| {
        let addr = next;
        next = (addr + bytes.len() as u64).next_multiple_of(16);
        Placed { addr, bytes }
    };
    let dsdt = place(dsdt);
    let fadt = place(bytes(&fadt(dsdt.addr)));
    let madt = place(madt);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt.addr);
    xsdt.add_entry(madt.addr);
    let xsdt = place(bytes(&xsdt));
    let rsdp = Placed { addr: RSDP_ADDR, bytes: bytes(&Rsdp::new(OEM_ID, xsdt.addr)) };
    let tables = vec![rsdp, xsdt, fadt, madt, dsdt];
    let end = tables.iter().map(|t| t.addr + t.bytes.len() as u64).max().unwrap_or(RSDP_ADDR);
    if end > ACPI_AREA_END {
        return Err(BootError::AcpiTooLarge { end });
    }
    Ok(tables)
}

/// Writes the tables of [`build`] into guest memory.
pub fn write_tables(mem: &GuestMem, vcpus: u8, ioapic_id: u8) -> Result<(), BootError> {
    for t in build(vcpus, ioapic_id)? {
        write(mem, &t.bytes, t.addr, "the ACPI tables")?;
    }
    Ok(())
}

fn bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// A table with the standard header around `body`, checksummed.
fn sdt(signature: [u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Sdt::new(signature, 36, revision, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(body);
    t.as_slice().to_vec()
}

fn io_register(port: u64) -> GAS {
    GAS::new(GasSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

fn fadt(dsdt: u64) -> acpi_tables::fadt::FADT {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        // The power button is the PNP0C0C device, there is no sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    f.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT).into();
    f.century = CMOS_CENTURY;
    f.reset_reg = io_register(ACPI_PORT + RESET_OFFSET);
    f.reset_value = RESET_VALUE;
    f.sleep_control_reg = io_register(ACPI_PORT + SLEEP_CONTROL_OFFSET);
    f.sleep_status_reg = io_register(ACPI_PORT + SLEEP_STATUS_OFFSET);
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"NODEOS\0\0").into();
    f.finalize()
}

fn madt(vcpus: u8, ioapic_id: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..vcpus {
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    IoApic::new(ioapic_id, IOAPIC_START as u32, 0).to_aml_bytes(&mut body);
    // type, length, ACPI processor UID (all), flags (conforming), LINT#.
    body.extend_from_slice(&[MADT_LAPIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    sdt(*b"APIC", 5, &body)
}

/// AML already serialized, to nest into a parent (the builders borrow their children).
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn raw(aml: &dyn Aml) -> Raw {
    Raw(bytes(aml))
}

fn refs(children: &[Raw]) -> Vec<&dyn Aml> {
    children.iter().map(|c| c as &dyn Aml).collect()
}

fn name(n: &str, value: &dyn Aml) -> Raw {
    raw(&Name::new(n.into(), value))
}

fn hid(eisa_id: &str) -> Raw {
    name("_HID", &EISAName::new(eisa_id))
}

fn device(n: &str, children: &[Raw]) -> Raw {
    raw(&Device::new(n.into(), refs(children)))
}

/// `Name(_CRS, ResourceTemplate() { ... })`.
fn crs(resources: &[Raw]) -> Raw {
    name("_CRS", &ResourceTemplate::new(refs(resources)))
}

/// An edge-triggered, active-high ISA interrupt, as the legacy devices raise them.
fn isa_irq(gsi: u32) -> Raw {
    raw(&Interrupt::new(true, true, false, false, gsi))
}

fn io_port(port: u64, len: u8) -> Raw {
    raw(&aml::IO::new(port as u16, port as u16, 1, len))
}

fn dsdt_body(vcpus: u8) -> Vec<u8> {
    let mut out = Vec::new();
    // \_S5: the sleep type the guest writes to power off.
    Name::new("_S5_".into(), &Package::new(vec![&S5_SLEEP_TYPE, &0u8])).to_aml_bytes(&mut out);

    let pci = device(
        "PCI0",
        &[
            hid("PNP0A03"),
            name("_UID", &0u8),
            name("_SEG", &0u8),
            name("_BBN", &0u8),
            name("_ADR", &0u8),
            crs(&[
                raw(&AddressSpace::new_bus_number(0u16, 0u16)),
                io_port(PCI_CONFIG_PORT, 8),
                raw(&AddressSpace::new_io(0u16, (PCI_CONFIG_PORT - 1) as u16, None)),
                raw(&AddressSpace::new_io(0x0d00u16, 0xffffu16, None)),
                raw(&AddressSpace::new_memory(
                    AddressSpaceCacheable::NotCacheable,
                    true,
                    MMIO32_START as u32,
                    (MMIO32_END - 1) as u32,
                    None,
                )),
            ]),
        ],
    );
    let com1 = device(
        "COM1",
        &[hid("PNP0501"), name("_UID", &1u8), crs(&[io_port(COM1_PORT, 8), isa_irq(COM1_IRQ)])],
    );
    let kbd = device(
        "PS2K",
        &[hid("PNP0303"), crs(&[io_port(I8042_PORT, 1), io_port(I8042_PORT + 4, 1), isa_irq(I8042_IRQ)])],
    );
    let rtc = device("RTC_", &[hid("PNP0B00"), crs(&[io_port(RTC_PORT, 2), isa_irq(RTC_IRQ)])]);
    let pwrb = device("PWRB", &[hid("PNP0C0C"), name("_UID", &0u8)]);

    // The GED: its interrupt runs _EVT, which reads (and so clears) the pending
    // events and notifies the power button when its bit is set.
    let ged_port = ACPI_PORT + GED_OFFSET;
    let gdat: Path = "GDAT".into();
    let button: Path = "\\_SB_.PWRB".into();
    let evt = raw(&Method::new(
        "_EVT".into(),
        1,
        true,
        vec![
            &Store::new(&Local(0), &gdat),
            &If::new(
                &aml::And::new(&aml::ZERO, &Local(0), &GED_POWER_BUTTON),
                vec![&Notify::new(&button, &NOTIFY_BUTTON_PRESSED)],
            ),
        ],
    ));
    let ged = device(
        "GED_",
        &[
            name("_HID", &"ACPI0013"),
            name("_UID", &0u8),
            crs(&[isa_irq(GED_IRQ)]),
            raw(&OpRegion::new("GDST".into(), OpRegionSpace::SystemIO, &ged_port, &1u8)),
            raw(&Field::new(
                "GDST".into(),
                FieldAccessType::Byte,
                FieldLockRule::NoLock,
                FieldUpdateRule::WriteAsZeroes,
                vec![FieldEntry::Named(*b"GDAT", 8)],
            )),
            evt,
        ],
    );

    let mut children = vec![pci, com1, kbd, rtc, pwrb, ged];
    children.extend(
        (0..vcpus).map(|i| device(&format!("C{i:03X}"), &[name("_HID", &"ACPI0007"), name("_UID", &i)])),
    );
    Scope::new("\\_SB_".into(), refs(&children)).to_aml_bytes(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::process::Command;
    use std::ptr::NonNull;
    use std::sync::Arc;

    use acpi::fadt::Fadt;
    use acpi::madt::{Madt, MadtEntry};
    use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};

    use super::*;

    /// The first MiB of guest physical memory, holding only the tables.
    fn low_memory(vcpus: u8) -> Arc<Vec<u8>> {
        let mut mem = vec![0u8; ACPI_AREA_END as usize];
        for t in build(vcpus, vcpus + 1).unwrap() {
            mem[t.addr as usize..t.addr as usize + t.bytes.len()].copy_from_slice(&t.bytes);
        }
        Arc::new(mem)
    }

    /// "Maps" guest physical addresses to the test's copy of low memory.
    #[derive(Clone)]
    struct Mem(Arc<Vec<u8>>);

    impl AcpiHandler for Mem {
        unsafe fn map_physical_region<T>(&self, addr: usize, size: usize) -> PhysicalMapping<Self, T> {
            assert!(addr + size <= self.0.len(), "the parser reads {addr:#x}+{size:#x}, outside the tables");
            let ptr = NonNull::new(self.0.as_ptr().wrapping_add(addr) as *mut T).unwrap();
            // SAFETY: the range is inside the buffer, which the handler (stored in
            // the mapping) keeps alive; the parser only reads through it.
            unsafe { PhysicalMapping::new(addr, ptr, size, size, self.clone()) }
        }

        fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
    }

    fn tables(vcpus: u8) -> AcpiTables<Mem> {
        // SAFETY: `Mem` maps exactly the bytes `build` placed.
        unsafe { AcpiTables::from_rsdp(Mem(low_memory(vcpus)), RSDP_ADDR as usize) }.unwrap()
    }

    #[test]
    fn every_table_sums_to_zero_and_fits_its_area() {
        for vcpus in [1, 2, 4, 254] {
            let placed = build(vcpus, vcpus + 1).unwrap();
            let mut spans: Vec<_> = placed.iter().map(|t| (t.addr, t.addr + t.bytes.len() as u64)).collect();
            spans.sort();
            assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "tables overlap: {spans:x?}");
            assert!(spans.iter().all(|&(a, e)| a >= RSDP_ADDR && e <= ACPI_AREA_END));
            let sum = |b: &[u8]| b.iter().fold(0u8, |s, x| s.wrapping_add(*x));
            let rsdp = &placed[0].bytes;
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(sum(&rsdp[..20]), 0, "RSDP 1.0 checksum");
            assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
            for t in &placed[1..] {
                let len = u32::from_le_bytes(t.bytes[4..8].try_into().unwrap()) as usize;
                assert_eq!(len, t.bytes.len(), "{:?} length field", &t.bytes[..4]);
                assert_eq!(sum(&t.bytes), 0, "{:?} checksum", String::from_utf8_lossy(&t.bytes[..4]));
            }
        }
    }

    #[test]
    fn the_acpi_crate_finds_a_hardware_reduced_fadt() {
        let tables = tables(2);
        let fadt = tables.find_table::<Fadt>().unwrap();
        let (flags, arch) = ({ fadt.flags }, { fadt.iapc_boot_arch });
        assert!(flags.system_is_hw_reduced_acpi());
        assert!(flags.power_button_is_control_method());
        assert!(flags.supports_system_reset_via_fadt());
        assert!(arch.legacy_devices_are_accessible() && arch.motherboard_implements_8042());
        assert!(arch.dont_probe_vga() && !arch.dont_enable_msi());
        let io = |r: acpi::address::GenericAddress| (r.address_space, r.bit_width, r.address);
        let sleep = fadt.sleep_control_register().unwrap().unwrap();
        assert_eq!(io(sleep), (acpi::address::AddressSpace::SystemIo, 8, ACPI_PORT + SLEEP_CONTROL_OFFSET));
        let status = fadt.sleep_status_register().unwrap().unwrap();
        assert_eq!(io(status).2, ACPI_PORT + SLEEP_STATUS_OFFSET);
        assert_eq!(io(fadt.reset_register().unwrap()).2, ACPI_PORT + RESET_OFFSET);
        assert_eq!({ fadt.reset_value }, RESET_VALUE);
        assert_eq!({ fadt.century }, CMOS_CENTURY);
        let dsdt = tables.dsdt().unwrap();
        assert_eq!(dsdt.address, fadt.dsdt_address().unwrap() + 36, "the AML follows the DSDT's header");
    }

    #[test]
    fn madt_lists_every_vcpu_the_ioapic_and_the_nmi_line() {
        for vcpus in [1u8, 2, 4, 254] {
            let tables = tables(vcpus);
            let madt = tables.find_table::<Madt>().unwrap();
            assert_eq!({ madt.get().local_apic_address }, LAPIC_START as u32);
            let (mut cpus, mut ioapics, mut nmis) = (Vec::new(), Vec::new(), Vec::new());
            for e in madt.get().entries() {
                match e {
                    MadtEntry::LocalApic(l) => cpus.push((l.processor_id, l.apic_id, { l.flags })),
                    MadtEntry::IoApic(i) => ioapics
                        .push((i.io_apic_id, { i.io_apic_address }, { i.global_system_interrupt_base })),
                    MadtEntry::LocalApicNmi(n) => nmis.push((n.processor_id, n.nmi_line)),
                    other => panic!("unexpected MADT entry {other:?}"),
                }
            }
            assert_eq!(cpus, (0..vcpus).map(|i| (i, i, 1)).collect::<Vec<_>>());
            assert_eq!(ioapics, vec![(vcpus + 1, IOAPIC_START as u32, 0)]);
            assert_eq!(nmis, vec![(ALL_PROCESSORS, 1)]);
        }
    }

    // The DSDT run by a real AML interpreter: ACPICA's `acpiexec` (Debian package
    // `acpica-tools`), the reference implementation and the interpreter Linux embeds. The
    // Rust ones cannot build on the pinned stable toolchain: `acpi` 6.x and 7.0.0-pre1
    // declare `#![feature(allocator_api)]` / `#![feature(allocator_ext)]`, `aml` 0.16
    // `#![feature(decl_macro)]` (E0554 on stable).

    /// Runs `acpiexec` in batch mode on the DSDT for `vcpus` vCPUs, with the hardware-reduced
    /// FADT the VMM gives (`-r`). Operation regions read `io_fill` (`-fv`); `trace_regions`
    /// logs every region access with its address (`-x`, ACPI_LV_OPREGION). `None` (and a loud
    /// skip) when acpiexec is not installed.
    fn acpiexec(
        test: &str,
        vcpus: u8,
        io_fill: u8,
        trace_regions: bool,
        commands: &[String],
    ) -> Option<String> {
        let dir = tempfile::tempdir().unwrap();
        let dsdt = dir.path().join("dsdt.aml");
        let placed = build(vcpus, vcpus + 1).unwrap();
        std::fs::write(&dsdt, &placed.iter().find(|t| t.bytes.starts_with(b"DSDT")).unwrap().bytes).unwrap();
        let mut cmd = Command::new("acpiexec");
        cmd.args(["-r", "-fv", &io_fill.to_string()]);
        if trace_regions {
            cmd.args(["-x", "0x800"]);
        }
        let out = match cmd.arg("-b").arg(commands.join("; ")).arg(&dsdt).output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                nodeos_types::testing::skip(test, "no acpiexec (Debian package acpica-tools)");
                return None;
            }
            Err(e) => panic!("cannot run acpiexec: {e}"),
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "acpiexec failed: {}\n{text}\n{stderr}", out.status);
        assert!(text.contains("1 ACPI AML tables successfully acquired and loaded"), "{text}\n{stderr}");
        for bad in ["ACPI Error", "ACPI Exception", "ACPI Warning"] {
            assert!(!text.contains(bad) && !stderr.contains(bad), "{bad} from acpiexec:\n{text}\n{stderr}");
        }
        Some(text)
    }

    /// The lines acpiexec printed for one command, after its first line `marker`
    /// (`Evaluating \PATH` for evaluate/execute, `Device: \PATH` for resources).
    fn section<'a>(out: &'a str, marker: &str) -> Vec<&'a str> {
        let starts = |l: &str| l.starts_with("Evaluating \\") || l.starts_with("Device: \\");
        let mut lines = out.lines().skip_while(|l| *l != marker);
        assert!(lines.next().is_some(), "acpiexec printed no `{marker}`:\n{out}");
        lines.take_while(|l| !starts(l)).collect()
    }

    /// `evaluate PATH`: the integers of the result (one, or a package's).
    fn integers(out: &str, path: &str) -> Vec<u64> {
        section(out, &format!("Evaluating {path}"))
            .iter()
            .filter_map(|l| l.trim().strip_prefix("[Integer] = "))
            .map(|v| u64::from_str_radix(v, 16).unwrap())
            .collect()
    }

    /// `evaluate PATH` of a string: `[String] Length 08 = "ACPI0007"`.
    fn string(out: &str, path: &str) -> String {
        let sec = section(out, &format!("Evaluating {path}"));
        let line = sec.iter().find_map(|l| l.trim().strip_prefix("[String] "));
        let value = line.and_then(|l| l.split_once(" = ")).map(|(_, v)| v.trim_matches('"'));
        value.unwrap_or_else(|| panic!("{path} is no string: {sec:?}")).to_owned()
    }

    /// An EISA id as the guest's OS turns the integer `_HID` into text ("PNP0A03").
    fn eisa_id(v: u64) -> String {
        let v = u32::try_from(v).unwrap().swap_bytes();
        let letter = |shift: u32| char::from(b'@' + ((v >> shift) & 0x1f) as u8);
        format!("{}{}{}{:04X}", letter(26), letter(21), letter(16), v & 0xffff)
    }

    /// One resource of a `_CRS` as ACPICA's resource manager decoded it.
    #[derive(Debug)]
    struct Resource {
        kind: String,
        fields: BTreeMap<String, String>,
    }

    impl Resource {
        fn field(&self, key: &str) -> &str {
            self.fields.get(key).unwrap_or_else(|| panic!("no {key} in {self:?}"))
        }

        fn hex(&self, key: &str) -> u64 {
            u64::from_str_radix(self.field(key), 16).unwrap()
        }
    }

    /// `resources PATH`: the decoded `_CRS`, as `[NN] Kind` blocks of `Key : Value` lines.
    fn resources(out: &str, path: &str) -> Vec<Resource> {
        let mut list: Vec<Resource> = Vec::new();
        for line in section(out, &format!("Device: {path}")) {
            if line.starts_with("Resource Conversion Comparison") {
                break;
            }
            if let Some((_, kind)) = line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
                list.push(Resource { kind: kind.to_owned(), fields: BTreeMap::new() });
            } else if let (Some(r), Some((k, v))) = (list.last_mut(), line.split_once(" : ")) {
                r.fields.insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
        assert!(list.last().is_some_and(|r| r.kind == "EndTag Resource"), "{path}: {list:?}");
        list
    }

    /// Fixed I/O ports: (first port, length).
    fn io_ports(list: &[Resource]) -> Vec<(u64, u64)> {
        let io = list.iter().filter(|r| r.kind == "I/O Resource");
        io.map(|r| {
            assert_eq!(r.hex("Address Minimum"), r.hex("Address Maximum"), "a fixed port: {r:?}");
            (r.hex("Address Minimum"), r.hex("Address Length"))
        })
        .collect()
    }

    /// Interrupts: (GSI, triggering, polarity).
    fn irqs(list: &[Resource]) -> Vec<(u64, String, String)> {
        let irqs = list.iter().filter(|r| r.kind == "Extended IRQ Resource");
        irqs.map(|r| {
            assert_eq!(r.field("Interrupt Count"), "01");
            (r.hex("Dword00"), r.field("Triggering").to_owned(), r.field("Polarity").to_owned())
        })
        .collect()
    }

    /// Address space windows the bridge decodes: (resource type, first, last).
    fn windows(list: &[Resource]) -> Vec<(String, u64, u64)> {
        let spaces = list.iter().filter(|r| r.kind.ends_with("Address Space Resource"));
        spaces
            .map(|r| {
                assert_eq!(r.hex("Address Length"), r.hex("Address Maximum") - r.hex("Address Minimum") + 1);
                (r.field("Resource Type").to_owned(), r.hex("Address Minimum"), r.hex("Address Maximum"))
            })
            .collect()
    }

    fn edge_high(gsi: u32) -> (u64, String, String) {
        (gsi.into(), "Edge".into(), "ActiveHigh".into())
    }

    #[test]
    fn acpica_evaluates_s5_and_the_pci_host_bridge() {
        let test = "acpica_evaluates_s5_and_the_pci_host_bridge";
        let commands =
            ["evaluate \\_S5", "evaluate \\_SB.PCI0._HID", "resources \\_SB.PCI0"].map(String::from);
        let Some(out) = acpiexec(test, 1, 0, false, &commands) else { return };

        let s5 = section(&out, "Evaluating \\_S5");
        assert!(s5.iter().any(|l| l.contains("[Package] Contains 2 Elements")), "{s5:?}");
        assert_eq!(
            integers(&out, "\\_S5"),
            vec![S5_SLEEP_TYPE.into(), 0],
            "the type AcpiPlatform powers off on"
        );

        let hid = integers(&out, "\\_SB.PCI0._HID");
        assert_eq!(hid.iter().map(|&v| eisa_id(v)).collect::<Vec<_>>(), vec!["PNP0A03"]);

        let crs = resources(&out, "\\_SB.PCI0");
        assert_eq!(io_ports(&crs), vec![(PCI_CONFIG_PORT, 8)], "the config ports 0xCF8..=0xCFF");
        let w = |kind: &str, first: u64, last: u64| (kind.to_owned(), first, last);
        assert_eq!(
            windows(&crs),
            vec![
                w("Bus Number Range", 0, 0),
                w("I/O Range", 0, PCI_CONFIG_PORT - 1),
                w("I/O Range", 0xd00, 0xffff),
                w("Memory Range", MMIO32_START, MMIO32_END - 1),
            ],
            "bus 0, the I/O space but the config ports, the BAR window"
        );
        let mmio = crs.iter().find(|r| r.kind == "32-Bit DWORD Address Space Resource").unwrap();
        assert_eq!(mmio.field("Consumer/Producer"), "ResourceProducer");
        assert_eq!(mmio.field("Caching"), "NonCacheable");
        assert_eq!(mmio.field("Write Protect"), "ReadWrite");
    }

    #[test]
    fn acpica_finds_the_legacy_devices_with_their_ports_and_irqs() {
        let test = "acpica_finds_the_legacy_devices_with_their_ports_and_irqs";
        let devices = ["COM1", "PS2K", "RTC", "GED"];
        let mut commands: Vec<String> = devices
            .iter()
            .flat_map(|d| [format!("evaluate \\_SB.{d}._HID"), format!("resources \\_SB.{d}")])
            .collect();
        // The power button has no resources (acpiexec's `resources` prints nothing then).
        commands.extend(["evaluate \\_SB.PWRB._HID", "evaluate \\_SB.PWRB._CRS"].map(String::from));
        let Some(out) = acpiexec(test, 1, 0, false, &commands) else { return };
        let eisa = |d: &str| {
            integers(&out, &format!("\\_SB.{d}._HID")).iter().map(|&v| eisa_id(v)).collect::<Vec<_>>()
        };
        let crs = |d: &str| resources(&out, &format!("\\_SB.{d}"));

        assert_eq!(eisa("COM1"), vec!["PNP0501"]);
        assert_eq!(io_ports(&crs("COM1")), vec![(COM1_PORT, 8)]);
        assert_eq!(irqs(&crs("COM1")), vec![edge_high(COM1_IRQ)]);

        assert_eq!(eisa("PS2K"), vec!["PNP0303"]);
        assert_eq!(io_ports(&crs("PS2K")), vec![(I8042_PORT, 1), (I8042_PORT + 4, 1)]);
        assert_eq!(irqs(&crs("PS2K")), vec![edge_high(I8042_IRQ)]);

        assert_eq!(eisa("RTC"), vec!["PNP0B00"]);
        assert_eq!(io_ports(&crs("RTC")), vec![(RTC_PORT, 2)]);
        assert_eq!(irqs(&crs("RTC")), vec![edge_high(RTC_IRQ)]);

        assert_eq!(eisa("PWRB"), vec!["PNP0C0C"]);
        let pwrb_crs = section(&out, "Evaluating \\_SB.PWRB._CRS");
        assert!(pwrb_crs.iter().any(|l| l.contains("AE_NOT_FOUND")), "{pwrb_crs:?}");

        assert_eq!(string(&out, "\\_SB.GED._HID"), "ACPI0013");
        assert_eq!(io_ports(&crs("GED")), vec![]);
        assert_eq!(irqs(&crs("GED")), vec![edge_high(GED_IRQ)]);
    }

    #[test]
    fn acpica_finds_one_processor_device_per_vcpu() {
        let test = "acpica_finds_one_processor_device_per_vcpu";
        for vcpus in [1u8, 2, 4] {
            let cpu = |i: u8| format!("\\_SB.C{i:03X}");
            let mut commands: Vec<String> = (0..vcpus)
                .flat_map(|i| [format!("evaluate {}._HID", cpu(i)), format!("evaluate {}._UID", cpu(i))])
                .collect();
            commands.push(format!("evaluate {}._HID", cpu(vcpus)));
            let Some(out) = acpiexec(test, vcpus, 0, false, &commands) else { return };
            for i in 0..vcpus {
                assert_eq!(string(&out, &format!("{}._HID", cpu(i))), "ACPI0007");
                assert_eq!(
                    integers(&out, &format!("{}._UID", cpu(i))),
                    vec![u64::from(i)],
                    "UID = MADT processor UID"
                );
            }
            let past = section(&out, &format!("Evaluating {}._HID", cpu(vcpus)));
            assert!(past.iter().any(|l| l.contains("AE_NOT_FOUND")), "{vcpus} vCPUs: {past:?}");
            // ACPICA's count of every device in the table: the six platform ones and the CPUs.
            let load = out.lines().find(|l| l.starts_with("Table [DSDT")).unwrap();
            let words: Vec<&str> = load.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "Devices,").unwrap();
            assert_eq!(words[at - 1], (6 + vcpus).to_string(), "{load}");
        }
    }

    #[test]
    fn acpica_runs_the_ged_event_method_and_notifies_the_power_button() {
        let test = "acpica_runs_the_ged_event_method_and_notifies_the_power_button";
        let read = format!(
            "Operation Region request on SystemIO at {:#x}, BitWidth 0x8, RegionLength 0x1",
            ACPI_PORT + GED_OFFSET
        );
        let notify = "Received a Device Notify on [PWRB]";
        // What the GED register reads: the power button's bit, nothing pending, other bits only.
        for (pending, notified) in [(GED_POWER_BUTTON, true), (0, false), (!GED_POWER_BUTTON, false)] {
            let commands = [format!("execute \\_SB.GED._EVT {GED_IRQ}")];
            let Some(out) = acpiexec(test, 1, pending, true, &commands) else { return };
            let evt = section(&out, "Evaluating \\_SB.GED._EVT");
            let reads = evt.iter().filter(|l| l.contains(&read)).count();
            assert_eq!(reads, 1, "_EVT reads the GED register once ({pending:#x}): {evt:#?}");
            let notes: Vec<_> = evt.iter().filter(|l| l.contains(notify)).collect();
            if notified {
                assert_eq!(notes.len(), 1, "{evt:#?}");
                assert!(notes[0].contains(&format!("Value {NOTIFY_BUTTON_PRESSED:#x}")), "{notes:?}");
            } else {
                assert_eq!(notes, Vec::<&&str>::new(), "pending {pending:#x}");
            }
            assert!(
                evt.iter().any(|l| l.starts_with("No object was returned")),
                "_EVT ran to its end: {evt:#?}"
            );
        }
    }
}
