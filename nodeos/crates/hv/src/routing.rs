//! The VM's GSI routing table.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so the table we push must
//! always contain KVM's default routes for the legacy pins (what
//! `kvm_setup_default_irq_routing` installs at irqchip creation: GSI 0-15 to
//! the PIC (master 0-7, slave 8-15) *and* the IOAPIC pin of the same number,
//! GSI 16-23 to the IOAPIC only) plus one MSI route per configured MSI GSI.
//! Losing the defaults would silently disconnect the PIT, the serial port and
//! every other legacy interrupt.

use std::collections::BTreeMap;

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1,
    kvm_irq_routing_irqchip, kvm_irq_routing_msi,
};

use crate::HvError;

/// Number of IOAPIC pins, hence of GSIs with a fixed legacy route.
pub const IOAPIC_PINS: u32 = 24;
/// The first GSI free for MSI routes.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;

/// Where one routing entry sends its GSI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A pin of the PIC master (0), PIC slave (1) or IOAPIC (2).
    Irqchip { chip: u32, pin: u32 },
    /// An MSI message as written by the guest.
    Msi { addr_lo: u32, addr_hi: u32, data: u32 },
}

/// The routing table; the owning `Vm` keeps it under a mutex and pushes it
/// whole after every change.
#[derive(Debug, Default)]
pub(crate) struct GsiRouting {
    msi: BTreeMap<u32, Route>,
}

impl GsiRouting {
    /// Sets (or replaces) the MSI route of `gsi`; returns the previous one.
    pub(crate) fn set_msi(&mut self, gsi: u32, addr_lo: u32, addr_hi: u32, data: u32) -> Option<Route> {
        self.msi.insert(gsi, Route::Msi { addr_lo, addr_hi, data })
    }

    pub(crate) fn remove(&mut self, gsi: u32) -> Option<Route> {
        self.msi.remove(&gsi)
    }

    /// Puts back a route taken out by `set_msi`/`remove` (after KVM refused the new table).
    pub(crate) fn restore(&mut self, gsi: u32, previous: Option<Route>) {
        match previous {
            Some(route) => self.msi.insert(gsi, route),
            None => self.msi.remove(&gsi),
        };
    }

    /// Every entry of the table: the legacy defaults first, then the MSI routes by GSI.
    pub(crate) fn routes(&self) -> Vec<(u32, Route)> {
        let mut out = Vec::with_capacity(40 + self.msi.len());
        for gsi in 0..IOAPIC_PINS {
            if gsi < 16 {
                let chip = if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
                out.push((gsi, Route::Irqchip { chip, pin: gsi % 8 }));
            }
            out.push((gsi, Route::Irqchip { chip: KVM_IRQCHIP_IOAPIC, pin: gsi }));
        }
        out.extend(self.msi.iter().map(|(gsi, route)| (*gsi, *route)));
        out
    }

    /// The table in the form `KVM_SET_GSI_ROUTING` takes.
    pub(crate) fn to_kvm(&self) -> Result<KvmIrqRouting, HvError> {
        let entries: Vec<kvm_irq_routing_entry> =
            self.routes().into_iter().map(|(gsi, route)| kvm_entry(gsi, route)).collect();
        KvmIrqRouting::from_entries(&entries)
            .map_err(|_| HvError::TooManyEntries { what: "GSI routing table", count: entries.len() })
    }
}

fn kvm_entry(gsi: u32, route: Route) -> kvm_irq_routing_entry {
    match route {
        Route::Irqchip { chip, pin } => kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            u: kvm_irq_routing_entry__bindgen_ty_1 {
                irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
            },
            ..Default::default()
        },
        Route::Msi { addr_lo, addr_hi, data } => kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            u: kvm_irq_routing_entry__bindgen_ty_1 {
                msi: kvm_irq_routing_msi {
                    address_lo: addr_lo,
                    address_hi: addr_hi,
                    data,
                    ..Default::default()
                },
            },
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_reproduce_kvm_defaults() {
        let table = GsiRouting::default();
        let routes = table.routes();
        // 16 PIC entries + 24 IOAPIC entries.
        assert_eq!(routes.len(), 40);
        for gsi in 0..24 {
            let of_gsi: Vec<Route> = routes.iter().filter(|(g, _)| *g == gsi).map(|(_, r)| *r).collect();
            assert!(of_gsi.contains(&Route::Irqchip { chip: KVM_IRQCHIP_IOAPIC, pin: gsi }), "gsi {gsi}");
            match gsi {
                0..8 => assert!(of_gsi.contains(&Route::Irqchip { chip: KVM_IRQCHIP_PIC_MASTER, pin: gsi })),
                8..16 => {
                    assert!(of_gsi.contains(&Route::Irqchip { chip: KVM_IRQCHIP_PIC_SLAVE, pin: gsi - 8 }))
                }
                _ => assert_eq!(of_gsi.len(), 1),
            }
        }
    }

    #[test]
    fn msi_routes_are_added_replaced_and_removed() {
        let mut table = GsiRouting::default();
        assert_eq!(table.set_msi(30, 0xfee0_0000, 0, 0x41), None);
        assert_eq!(table.set_msi(24, 0xfee0_1000, 0, 0x42), None);
        let previous = table.set_msi(30, 0xfee0_0000, 0, 0x43);
        assert_eq!(previous, Some(Route::Msi { addr_lo: 0xfee0_0000, addr_hi: 0, data: 0x41 }));
        let routes = table.routes();
        assert_eq!(routes.len(), 42);
        assert_eq!(routes[40], (24, Route::Msi { addr_lo: 0xfee0_1000, addr_hi: 0, data: 0x42 }));
        assert_eq!(routes[41], (30, Route::Msi { addr_lo: 0xfee0_0000, addr_hi: 0, data: 0x43 }));

        table.restore(30, previous);
        assert_eq!(table.routes()[41], (30, Route::Msi { addr_lo: 0xfee0_0000, addr_hi: 0, data: 0x41 }));
        assert!(table.remove(30).is_some());
        assert!(table.remove(30).is_none());
        assert_eq!(table.routes().len(), 41);
    }

    #[test]
    fn kvm_table_carries_types_and_payloads() {
        let mut table = GsiRouting::default();
        table.set_msi(25, 0xfee0_0000, 0x1, 0x4021);
        let kvm = table.to_kvm().unwrap();
        let entries = kvm.as_slice();
        assert_eq!(entries.len(), 41);
        let pic = entries[0];
        assert_eq!((pic.gsi, pic.type_), (0, KVM_IRQ_ROUTING_IRQCHIP));
        // SAFETY: type_ is KVM_IRQ_ROUTING_IRQCHIP, so `irqchip` is the union member written.
        let chip = unsafe { pic.u.irqchip };
        assert_eq!((chip.irqchip, chip.pin), (KVM_IRQCHIP_PIC_MASTER, 0));
        let msi = entries[40];
        assert_eq!((msi.gsi, msi.type_), (25, KVM_IRQ_ROUTING_MSI));
        // SAFETY: type_ is KVM_IRQ_ROUTING_MSI, so `msi` is the union member written.
        let m = unsafe { msi.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_0000, 0x1, 0x4021));
    }
}
