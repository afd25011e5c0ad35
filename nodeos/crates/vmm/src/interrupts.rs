//! KVM-backed implementations of the interrupt traits devices use
//! (`devices::interrupt`): MSI-X vectors as irqfds on routed GSIs, legacy
//! lines as irqfds on IOAPIC pins, doorbells as ioeventfds.
//!
//! Every vector owns one GSI (from [`FIRST_MSI_GSI`] upward) and one eventfd
//! registered as that GSI's irqfd for the vector set's whole life;
//! configuring a vector only changes the GSI's route. Dropping a vector set
//! unregisters its irqfds, removes its routes and returns its GSIs.

use std::sync::{Arc, Mutex};

use nodeos_hv::{FIRST_MSI_GSI, HvError, Vm};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::devices::interrupt::{InterruptError, IoEvents, IrqLine, MsiAllocator, MsiMessage, MsiVectors};

/// Flattens an hv error and its causes into the routing error devices see.
fn routing(e: HvError) -> InterruptError {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    InterruptError::Routing(text)
}

/// The GSIs not used by any vector set.
#[derive(Debug)]
struct GsiPool {
    next: u32,
    end: u32,
    free: Vec<u32>,
}

impl GsiPool {
    fn take(&mut self, count: u16) -> Option<Vec<u32>> {
        let count = usize::from(count);
        let fresh = (self.end - self.next) as usize;
        if self.free.len() + fresh < count {
            return None;
        }
        let mut gsis: Vec<u32> = self.free.drain(..count.min(self.free.len())).collect();
        while gsis.len() < count {
            gsis.push(self.next);
            self.next += 1;
        }
        Some(gsis)
    }
}

/// Hands out MSI vectors backed by KVM GSIs. One per VM.
#[derive(Debug, Clone)]
pub struct KvmMsiAllocator {
    vm: Arc<Vm>,
    pool: Arc<Mutex<GsiPool>>,
}

impl KvmMsiAllocator {
    pub fn new(vm: Arc<Vm>) -> Self {
        let end = vm.msi_gsi_end();
        Self { vm, pool: Arc::new(Mutex::new(GsiPool { next: FIRST_MSI_GSI, end, free: Vec::new() })) }
    }
}

impl KvmMsiAllocator {
    /// [`MsiAllocator::allocate`] with the concrete type.
    pub fn allocate_vectors(&self, count: u16) -> Result<KvmMsiVectors, InterruptError> {
        let gsis =
            self.pool.lock().unwrap_or_else(|p| p.into_inner()).take(count).ok_or_else(|| {
                InterruptError::Routing(format!("no {count} free GSIs left for MSI vectors"))
            })?;
        let mut vectors = KvmMsiVectors { vm: self.vm.clone(), pool: self.pool.clone(), vectors: Vec::new() };
        for gsi in gsis {
            let fd = match EventFd::new(EFD_NONBLOCK) {
                Ok(fd) => fd,
                Err(e) => {
                    vectors.pool().free.push(gsi);
                    return Err(InterruptError::Signal(e));
                }
            };
            if let Err(e) = self.vm.register_irqfd(&fd, gsi) {
                vectors.pool().free.push(gsi);
                return Err(routing(e));
            }
            vectors.vectors.push(Vector { gsi, fd, configured: Mutex::new(None) });
        }
        Ok(vectors)
    }
}

impl MsiAllocator for KvmMsiAllocator {
    fn allocate(&self, count: u16) -> Result<Arc<dyn MsiVectors>, InterruptError> {
        Ok(Arc::new(self.allocate_vectors(count)?))
    }
}

#[derive(Debug)]
struct Vector {
    gsi: u32,
    fd: EventFd,
    /// The message the GSI is routed to, `None` while unrouted (masked or unprogrammed).
    configured: Mutex<Option<MsiMessage>>,
}

/// One device's vectors.
#[derive(Debug)]
pub struct KvmMsiVectors {
    vm: Arc<Vm>,
    pool: Arc<Mutex<GsiPool>>,
    vectors: Vec<Vector>,
}

impl KvmMsiVectors {
    fn pool(&self) -> std::sync::MutexGuard<'_, GsiPool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vector(&self, vector: u16) -> Result<&Vector, InterruptError> {
        self.vectors
            .get(usize::from(vector))
            .ok_or(InterruptError::Vector { vector, count: self.vectors.len() as u16 })
    }

    /// The GSI behind `vector` (for logs and tests).
    pub fn gsi(&self, vector: u16) -> Option<u32> {
        self.vectors.get(usize::from(vector)).map(|v| v.gsi)
    }
}

impl MsiVectors for KvmMsiVectors {
    fn count(&self) -> u16 {
        self.vectors.len() as u16
    }

    fn configure(&self, vector: u16, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        let v = self.vector(vector)?;
        let mut configured = v.configured.lock().unwrap_or_else(|p| p.into_inner());
        if *configured == msg {
            return Ok(());
        }
        match msg {
            Some(m) => self.vm.set_msi_route(v.gsi, m.addr_lo, m.addr_hi, m.data).map_err(routing)?,
            None => self.vm.remove_route(v.gsi).map_err(routing)?,
        }
        *configured = msg;
        Ok(())
    }

    fn trigger(&self, vector: u16) -> Result<(), InterruptError> {
        let v = self.vector(vector)?;
        if v.configured.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
            return Ok(());
        }
        v.fd.write(1).map_err(InterruptError::Signal)
    }
}

impl Drop for KvmMsiVectors {
    fn drop(&mut self) {
        let mut returned = Vec::with_capacity(self.vectors.len());
        for v in &self.vectors {
            let routed = v.configured.lock().unwrap_or_else(|p| p.into_inner()).is_some();
            let cleaned = (!routed || self.vm.remove_route(v.gsi).is_ok())
                && self.vm.unregister_irqfd(&v.fd, v.gsi).is_ok();
            if cleaned {
                returned.push(v.gsi);
            } else {
                // Leak the GSI rather than hand a half-torn-down one to the next device.
                tracing::warn!(gsi = v.gsi, "MSI GSI not released");
            }
        }
        self.pool().free.extend(returned);
    }
}

/// A legacy, edge-triggered interrupt line (COM1 on GSI 4) through an irqfd.
#[derive(Debug)]
pub struct KvmIrqLine {
    vm: Arc<Vm>,
    gsi: u32,
    fd: EventFd,
}

impl KvmIrqLine {
    /// Registers an irqfd on legacy `gsi` (0..24: PIC and IOAPIC pin of that number).
    pub fn new(vm: Arc<Vm>, gsi: u32) -> Result<Self, HvError> {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(HvError::EventFd)?;
        vm.register_irqfd(&fd, gsi)?;
        Ok(Self { vm, gsi, fd })
    }
}

impl IrqLine for KvmIrqLine {
    fn trigger(&self) -> Result<(), InterruptError> {
        self.fd.write(1).map_err(InterruptError::Signal)
    }
}

impl Drop for KvmIrqLine {
    fn drop(&mut self) {
        if let Err(e) = self.vm.unregister_irqfd(&self.fd, self.gsi) {
            tracing::warn!(gsi = self.gsi, error = %e, "irqfd not unregistered");
        }
    }
}

/// Doorbells: MMIO writes that signal an eventfd inside KVM.
#[derive(Debug, Clone)]
pub struct KvmIoEvents {
    vm: Arc<Vm>,
}

impl KvmIoEvents {
    pub fn new(vm: Arc<Vm>) -> Self {
        Self { vm }
    }
}

impl IoEvents for KvmIoEvents {
    fn register(&self, addr: u64, fd: &EventFd) -> Result<(), InterruptError> {
        self.vm.register_ioevent(addr, fd).map_err(routing)
    }

    fn unregister(&self, addr: u64, fd: &EventFd) -> Result<(), InterruptError> {
        self.vm.unregister_ioevent(addr, fd).map_err(routing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeos_hv::testing::hypervisor_or_skip;

    fn vm(test: &str) -> Option<Arc<Vm>> {
        Some(Arc::new(hypervisor_or_skip(test)?.create_vm().unwrap()))
    }

    #[test]
    fn gsi_pool_reuses_freed_gsis_first() {
        let mut pool = GsiPool { next: 24, end: 30, free: Vec::new() };
        assert_eq!(pool.take(3), Some(vec![24, 25, 26]));
        pool.free.extend([25, 24]);
        assert_eq!(pool.take(3), Some(vec![25, 24, 27]));
        assert_eq!(pool.take(3), None, "only 28 and 29 left");
        assert_eq!(pool.take(2), Some(vec![28, 29]));
    }

    #[test]
    fn msi_vectors_route_trigger_and_release_gsis() {
        let Some(vm) = vm("msi_vectors_route_trigger_and_release_gsis") else { return };
        let alloc = KvmMsiAllocator::new(vm.clone());
        let a = alloc.allocate(3).unwrap();
        assert_eq!(a.count(), 3);
        let msg = MsiMessage { addr_lo: 0xfee0_0000, addr_hi: 0, data: 0x41 };
        // Unconfigured: a trigger is a no-op, not an error.
        a.trigger(0).unwrap();
        a.configure(0, Some(msg)).unwrap();
        a.configure(0, Some(msg)).unwrap();
        a.configure(2, Some(MsiMessage { data: 0x42, ..msg })).unwrap();
        a.trigger(0).unwrap();
        a.trigger(2).unwrap();
        a.configure(0, None).unwrap();
        a.trigger(0).unwrap();
        assert!(matches!(a.trigger(3), Err(InterruptError::Vector { vector: 3, count: 3 })));
        assert!(matches!(a.configure(7, None), Err(InterruptError::Vector { vector: 7, count: 3 })));

        let b = alloc.allocate(2).unwrap();
        b.configure(1, Some(msg)).unwrap();
        drop(a);
        // a's GSIs (24..27) come back before fresh ones.
        let c = alloc.allocate(3).unwrap();
        c.configure(0, Some(msg)).unwrap();
        c.trigger(0).unwrap();
        assert!(alloc.allocate(u16::MAX).is_err(), "more GSIs than KVM has");
        drop((b, c));
    }

    #[test]
    fn msi_vectors_take_gsis_from_24_and_give_them_back() {
        let Some(vm) = vm("msi_vectors_take_gsis_from_24_and_give_them_back") else { return };
        let alloc = KvmMsiAllocator::new(vm);
        let a = alloc.allocate_vectors(2).unwrap();
        let b = alloc.allocate_vectors(1).unwrap();
        assert_eq!((a.gsi(0), a.gsi(1), a.gsi(2)), (Some(FIRST_MSI_GSI), Some(FIRST_MSI_GSI + 1), None));
        assert_eq!(b.gsi(0), Some(FIRST_MSI_GSI + 2));
        drop(a);
        let c = alloc.allocate_vectors(3).unwrap();
        let mut gsis: Vec<u32> = (0..3).filter_map(|v| c.gsi(v)).collect();
        gsis.sort();
        assert_eq!(
            gsis,
            vec![FIRST_MSI_GSI, FIRST_MSI_GSI + 1, FIRST_MSI_GSI + 3],
            "freed GSIs reused first"
        );
    }

    #[test]
    fn irq_line_and_ioevents_register_with_kvm() {
        let Some(vm) = vm("irq_line_and_ioevents_register_with_kvm") else { return };
        let line = KvmIrqLine::new(vm.clone(), 4).unwrap();
        line.trigger().unwrap();
        line.trigger().unwrap();
        drop(line);
        KvmIrqLine::new(vm.clone(), 4).unwrap().trigger().unwrap();

        let events = KvmIoEvents::new(vm);
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        events.register(0xc000_1000, &fd).unwrap();
        let err = events.register(0xc000_1000, &fd).unwrap_err();
        assert!(matches!(err, InterruptError::Routing(ref text) if text.contains("0xc0001000")), "{err}");
        events.unregister(0xc000_1000, &fd).unwrap();
        assert!(events.unregister(0xc000_1000, &fd).is_err());
    }
}
