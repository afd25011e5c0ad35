//! The virtio-net device: RX queue 0, TX queue 1, control queue 2, one I/O thread.
//!
//! Features offered: VERSION_1, MAC, STATUS (link always up), CTRL_VQ and
//! GUEST_ANNOUNCE: after a live migration [`Net::announce`] sets
//! VIRTIO_NET_S_ANNOUNCE and signals a configuration change, the driver
//! announces the guest's addresses itself (gratuitous ARP, IPv6 neighbour
//! advertisements) and acknowledges with VIRTIO_NET_CTRL_ANNOUNCE_ACK on the
//! control queue, which clears the bit; every other control command is
//! answered VIRTIO_NET_ERR. No offloads and no mergeable buffers, so every
//! buffer starts with the 12-byte `virtio_net_hdr_v1` (all zero on RX except
//! `num_buffers` = 1, as the spec requires without MRG_RXBUF) followed by one
//! plain Ethernet frame.
//!
//! The I/O thread waits on the three doorbells, the backend fd and the stop
//! eventfd. It polls the backend for input only while the guest has RX buffers,
//! and for output only while a send would block; a frame that fits no buffer,
//! or is shorter than 14 / longer than 65550 bytes, is dropped and counted.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::sys::epoll::EpollFlags;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::backend::FrameBackend;
use crate::devices::virtio::chain::{Chain, ChainFault, pop_head, read_chain};
use crate::devices::virtio::device::{ActivateError, Activation, VirtioDevice, VirtioInterrupt, copy_config};
use crate::devices::virtio::io_thread::{IoThread, Poller, borrow_fd, drain};
use crate::devices::virtio::{TYPE_NET, VIRTIO_F_VERSION_1};
use crate::memory::GuestMem;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const CTRL_QUEUE: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
pub const NET_HDR_LEN: usize = 12;
pub const MIN_FRAME: usize = 14;
pub const MAX_FRAME: usize = 65550;
pub const F_MAC: u64 = 1 << 5;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_GUEST_ANNOUNCE: u64 = 1 << 21;
const LINK_UP: u16 = 1;
/// Config `status` bit: the driver should announce the guest's addresses.
const S_ANNOUNCE: u16 = 2;
/// Control command class and command: the driver announced (spec 5.1.6.5.4).
const CTRL_ANNOUNCE: u8 = 3;
const CTRL_ANNOUNCE_ACK: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;
const CONFIG_LEN: usize = 10;

/// What the device did, for the worker's metrics.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames from the backend not delivered (bad size, no fitting buffer, bad chain).
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Guest frames not sent (bad size, bad chain, backend gone).
    pub tx_dropped: AtomicU64,
    /// Descriptor chains rejected by validation.
    pub bad_chains: AtomicU64,
    /// Announcements the driver acknowledged (VIRTIO_NET_CTRL_ANNOUNCE_ACK).
    pub announces_acked: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A virtio-net device with MAC `mac` over `backend`.
pub struct Net {
    mac: [u8; 6],
    backend: Arc<dyn FrameBackend>,
    counters: Arc<NetCounters>,
    thread: Option<IoThread<Vec<Queue>>>,
    sizes: [u16; 3],
    /// VIRTIO_NET_S_ANNOUNCE, shared with the I/O thread, which clears it on the driver's ack.
    announce: Arc<AtomicBool>,
    /// While active: the features the driver accepted and the interrupt to
    /// signal a configuration change with.
    driver: Option<(u64, Arc<VirtioInterrupt>)>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("mac", &self.mac).field("active", &self.thread.is_some()).finish()
    }
}

impl Net {
    pub fn new(mac: [u8; 6], backend: Arc<dyn FrameBackend>) -> Self {
        Self {
            mac,
            backend,
            counters: Arc::default(),
            thread: None,
            sizes: [QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE],
            announce: Arc::default(),
            driver: None,
        }
    }

    /// Asks the driver to announce the guest's addresses (after a live
    /// migration). False, with nothing done, when the device is not active or
    /// its driver did not accept GUEST_ANNOUNCE.
    pub fn announce(&self) -> bool {
        match &self.driver {
            Some((features, interrupt))
                if features & (F_GUEST_ANNOUNCE | F_CTRL_VQ) == F_GUEST_ANNOUNCE | F_CTRL_VQ =>
            {
                self.announce.store(true, Ordering::Release);
                interrupt.config_changed();
                true
            }
            _ => false,
        }
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..6].copy_from_slice(&self.mac);
        let status = if self.announce.load(Ordering::Acquire) { LINK_UP | S_ANNOUNCE } else { LINK_UP };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        // max_virtqueue_pairs (meaningful only with MQ, which is not offered).
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        copy_config(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.reset();
        let Activation { mem, queues, notifiers, interrupt, features } = a;
        if queues.len() != 3 || notifiers.len() != 3 {
            return Err(ActivateError::QueueCount { expected: 3, got: queues.len() });
        }
        let mut queues = queues.into_iter();
        let mut notifiers = notifiers.into_iter();
        let (Some(rx), Some(tx), Some(ctrl), Some(rx_fd), Some(tx_fd), Some(ctrl_fd)) = (
            queues.next(),
            queues.next(),
            queues.next(),
            notifiers.next(),
            notifiers.next(),
            notifiers.next(),
        ) else {
            return Err(ActivateError::QueueCount { expected: 3, got: 0 });
        };
        if !rx.ready() {
            return Err(ActivateError::QueueNotReady { index: RX_QUEUE });
        }
        if !tx.ready() {
            return Err(ActivateError::QueueNotReady { index: TX_QUEUE });
        }
        // The control queue exists only for a driver that accepted CTRL_VQ.
        if features & F_CTRL_VQ != 0 && !ctrl.ready() {
            return Err(ActivateError::QueueNotReady { index: CTRL_QUEUE });
        }
        let mut worker =
            NetWorker::new(mem, rx, tx, self.backend.clone(), self.counters.clone(), interrupt.clone());
        worker.ctrl = Some((ctrl, self.announce.clone()));
        let thread = IoThread::spawn("virtio-net", move |stop| worker.run(&rx_fd, &tx_fd, &ctrl_fd, &stop))
            .map_err(ActivateError::Thread)?;
        self.thread = Some(thread);
        self.driver = Some((features, interrupt));
        Ok(())
    }

    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        self.driver = None;
        self.thread.take()?.stop()
    }

    fn reset(&mut self) {
        // Dropping the I/O thread signals it and joins it.
        self.thread = None;
        self.driver = None;
        self.announce.store(false, Ordering::Release);
    }

    fn announce(&mut self) -> bool {
        Net::announce(self)
    }
}

const TOKEN_CTRL: u64 = 4;
const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_BACKEND: u64 = 2;
const TOKEN_STOP: u64 = 3;

/// The I/O thread's state; owns both queues while the device is active.
struct NetWorker {
    mem: GuestMem,
    rx: Queue,
    tx: Queue,
    backend: Arc<dyn FrameBackend>,
    counters: Arc<NetCounters>,
    interrupt: Arc<VirtioInterrupt>,
    /// The control queue and the announce bit it clears.
    ctrl: Option<(Queue, Arc<AtomicBool>)>,
    /// One frame, for both directions (the thread does one thing at a time).
    frame: Vec<u8>,
    /// The guest has no RX buffer: stop reading the backend until it adds one.
    rx_starved: bool,
    /// The backend refused a frame: wait for it to become writable.
    tx_blocked: bool,
    /// The peer is gone: drop TX frames, stop polling it.
    backend_dead: bool,
    /// The guest broke a queue; nothing more is processed until reset.
    broken: bool,
}

/// What happened to one TX chain.
enum TxStep {
    Done,
    /// Put the chain back and wait for the backend.
    Blocked,
}

impl NetWorker {
    fn new(
        mem: GuestMem,
        rx: Queue,
        tx: Queue,
        backend: Arc<dyn FrameBackend>,
        counters: Arc<NetCounters>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        Self {
            mem,
            rx,
            tx,
            backend,
            counters,
            interrupt,
            ctrl: None,
            frame: vec![0; MAX_FRAME],
            rx_starved: false,
            tx_blocked: false,
            backend_dead: false,
            broken: false,
        }
    }

    /// The queues, in device order, for the transport.
    fn into_queues(self) -> Vec<Queue> {
        let mut q = vec![self.rx, self.tx];
        q.extend(self.ctrl.map(|(c, _)| c));
        q
    }

    fn run(mut self, rx_fd: &EventFd, tx_fd: &EventFd, ctrl_fd: &EventFd, stop: &EventFd) -> Vec<Queue> {
        let backend = self.backend.clone();
        let poller = Poller::new().and_then(|p| {
            p.add(borrow_fd(rx_fd), TOKEN_RX, EpollFlags::EPOLLIN)?;
            p.add(borrow_fd(tx_fd), TOKEN_TX, EpollFlags::EPOLLIN)?;
            p.add(borrow_fd(ctrl_fd), TOKEN_CTRL, EpollFlags::EPOLLIN)?;
            p.add(borrow_fd(stop), TOKEN_STOP, EpollFlags::EPOLLIN)?;
            p.add(backend.as_fd(), TOKEN_BACKEND, EpollFlags::EPOLLIN)?;
            Ok(p)
        });
        let mut poller = match poller {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "virtio-net cannot wait for frames");
                self.interrupt.set_needs_reset();
                return self.into_queues();
            }
        };
        let mut interest = EpollFlags::EPOLLIN;
        let mut polling_backend = true;
        self.process_tx();
        self.process_rx();
        self.process_ctrl();
        loop {
            if polling_backend {
                if self.backend_dead || self.broken {
                    let _ = poller.delete(backend.as_fd());
                    polling_backend = false;
                } else if self.backend_interest() != interest {
                    interest = self.backend_interest();
                    if let Err(e) = poller.modify(backend.as_fd(), TOKEN_BACKEND, interest) {
                        tracing::error!(error = %e, "virtio-net cannot poll its backend");
                        self.backend_dead = true;
                    }
                }
            }
            let events = match poller.wait() {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "virtio-net wait failed");
                    self.interrupt.set_needs_reset();
                    return self.into_queues();
                }
            };
            for (token, flags) in events {
                match token {
                    TOKEN_STOP => return self.into_queues(),
                    TOKEN_CTRL => {
                        drain(ctrl_fd);
                        self.process_ctrl();
                    }
                    TOKEN_RX => {
                        drain(rx_fd);
                        self.rx_starved = false;
                        self.process_rx();
                    }
                    TOKEN_TX => {
                        drain(tx_fd);
                        self.process_tx();
                    }
                    _ => {
                        if flags.contains(EpollFlags::EPOLLIN) {
                            self.process_rx();
                        }
                        if flags.contains(EpollFlags::EPOLLOUT) {
                            self.tx_blocked = false;
                            self.process_tx();
                        }
                        if flags.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
                            self.backend_gone("hang-up");
                        }
                    }
                }
            }
        }
    }

    fn backend_interest(&self) -> EpollFlags {
        let mut f = EpollFlags::empty();
        if self.rx.ready() && !self.rx_starved {
            f |= EpollFlags::EPOLLIN;
        }
        if self.tx_blocked {
            f |= EpollFlags::EPOLLOUT;
        }
        f
    }

    fn backend_gone(&mut self, why: &str) {
        if !self.backend_dead {
            tracing::warn!(reason = why, "virtio-net backend gone; dropping guest frames");
            self.backend_dead = true;
            self.tx_blocked = false;
        }
    }

    fn break_queue(&mut self, why: &dyn std::fmt::Display) {
        tracing::warn!(error = %why, "virtio-net queue broken by the guest");
        self.broken = true;
        self.interrupt.set_needs_reset();
    }

    fn chain(&self, queue: &Queue, head: u16) -> Result<Chain, ChainFault> {
        read_chain(&self.mem, GuestAddress(queue.desc_table()), queue.size(), head)
    }

    /// Answers every command on the control queue: ANNOUNCE_ACK clears the
    /// announce bit and succeeds, anything else fails (VIRTIO_NET_ERR).
    fn process_ctrl(&mut self) {
        let Some((mut queue, announce)) = self.ctrl.take() else { return };
        if self.broken || !queue.ready() {
            self.ctrl = Some((queue, announce));
            return;
        }
        let mut completed = false;
        loop {
            let head = match pop_head(&mut queue, &self.mem) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    self.break_queue(&e);
                    break;
                }
            };
            let chain = match read_chain(&self.mem, GuestAddress(queue.desc_table()), queue.size(), head) {
                Err(fault) if fault.error.breaks_queue() => {
                    self.break_queue(&fault.error);
                    break;
                }
                Err(_) => None,
                Ok(c) => Some(c),
            };
            let mut used = 0;
            if let Some(chain) = chain.filter(|c| c.writable_len >= 1) {
                let mut cmd = [0u8; 2];
                let status = match chain.read_at(&self.mem, 0, &mut cmd) {
                    Ok(()) if cmd == [CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK] => {
                        announce.store(false, Ordering::Release);
                        bump(&self.counters.announces_acked);
                        tracing::info!("the guest announced its addresses");
                        CTRL_OK
                    }
                    Ok(()) => {
                        tracing::debug!(
                            class = cmd[0],
                            command = cmd[1],
                            "virtio-net control command refused"
                        );
                        CTRL_ERR
                    }
                    Err(_) => CTRL_ERR,
                };
                if chain.write_at(&self.mem, 0, &[status]).is_ok() {
                    used = 1;
                }
            } else {
                bump(&self.counters.bad_chains);
            }
            if let Err(e) = queue.add_used(&self.mem, head, used) {
                self.break_queue(&e);
                break;
            }
            completed = true;
        }
        self.ctrl = Some((queue, announce));
        if completed {
            self.interrupt.signal_queue(CTRL_QUEUE);
        }
    }

    /// Sends every frame the guest queued, until the backend pushes back.
    fn process_tx(&mut self) {
        if self.broken || !self.tx.ready() {
            return;
        }
        let mut completed = false;
        loop {
            let head = match pop_head(&mut self.tx, &self.mem) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    self.break_queue(&e);
                    break;
                }
            };
            let step = match self.chain(&self.tx, head) {
                Err(fault) if fault.error.breaks_queue() => {
                    self.break_queue(&fault.error);
                    break;
                }
                Err(fault) => {
                    tracing::debug!(error = %fault.error, "virtio-net bad TX chain");
                    bump(&self.counters.bad_chains);
                    bump(&self.counters.tx_dropped);
                    TxStep::Done
                }
                Ok(chain) => self.send(&chain),
            };
            if let TxStep::Blocked = step {
                self.tx.go_to_previous_position();
                self.tx_blocked = true;
                break;
            }
            if let Err(e) = self.tx.add_used(&self.mem, head, 0) {
                self.break_queue(&e);
                break;
            }
            completed = true;
        }
        if completed {
            self.interrupt.signal_queue(TX_QUEUE);
        }
    }

    fn send(&mut self, chain: &Chain) -> TxStep {
        let c = &self.counters;
        if !chain.writable.is_empty() || chain.readable_len < NET_HDR_LEN as u64 {
            bump(&c.bad_chains);
            bump(&c.tx_dropped);
            return TxStep::Done;
        }
        let len = chain.readable_len - NET_HDR_LEN as u64;
        if !(MIN_FRAME as u64..=MAX_FRAME as u64).contains(&len) {
            bump(&c.tx_dropped);
            return TxStep::Done;
        }
        let frame = &mut self.frame[..len as usize];
        if chain.read_at(&self.mem, NET_HDR_LEN as u64, frame).is_err() {
            bump(&c.bad_chains);
            bump(&c.tx_dropped);
            return TxStep::Done;
        }
        if self.backend_dead {
            bump(&c.tx_dropped);
            return TxStep::Done;
        }
        match self.backend.send(frame) {
            Ok(()) => {
                bump(&c.tx_frames);
                c.tx_bytes.fetch_add(len, Ordering::Relaxed);
                TxStep::Done
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => TxStep::Blocked,
            Err(e) => {
                bump(&c.tx_dropped);
                if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) {
                    self.backend_gone("peer closed");
                } else {
                    tracing::debug!(error = %e, "virtio-net send failed");
                }
                TxStep::Done
            }
        }
    }

    /// Delivers backend frames while the guest has RX buffers.
    fn process_rx(&mut self) {
        if self.broken || !self.rx.ready() || self.backend_dead {
            return;
        }
        let mut completed = false;
        loop {
            match self.rx.avail_idx(&self.mem, Ordering::Acquire) {
                Ok(idx) if idx.0 == self.rx.next_avail() => {
                    self.rx_starved = true;
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    self.break_queue(&e);
                    break;
                }
            }
            let len = match self.backend.recv(&mut self.frame) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "virtio-net receive failed");
                    self.backend_gone("receive error");
                    break;
                }
            };
            if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
                bump(&self.counters.rx_dropped);
                if len == 0 {
                    // Also what a closed peer returns: wait for the next wakeup.
                    break;
                }
                continue;
            }
            let head = match pop_head(&mut self.rx, &self.mem) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    bump(&self.counters.rx_dropped);
                    break;
                }
                Err(e) => {
                    self.break_queue(&e);
                    break;
                }
            };
            let used = match self.chain(&self.rx, head) {
                Err(fault) if fault.error.breaks_queue() => {
                    self.break_queue(&fault.error);
                    break;
                }
                Err(fault) => {
                    tracing::debug!(error = %fault.error, "virtio-net bad RX chain");
                    bump(&self.counters.bad_chains);
                    bump(&self.counters.rx_dropped);
                    0
                }
                Ok(chain) if !chain.readable.is_empty() => {
                    bump(&self.counters.bad_chains);
                    bump(&self.counters.rx_dropped);
                    0
                }
                Ok(chain) if chain.writable_len < (NET_HDR_LEN + len) as u64 => {
                    // Too big for this buffer: drop the frame, keep the buffer.
                    bump(&self.counters.rx_dropped);
                    self.rx.go_to_previous_position();
                    continue;
                }
                Ok(chain) => {
                    let mut hdr = [0u8; NET_HDR_LEN];
                    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
                    let written = chain
                        .write_at(&self.mem, 0, &hdr)
                        .and_then(|()| chain.write_at(&self.mem, NET_HDR_LEN as u64, &self.frame[..len]));
                    if written.is_ok() {
                        bump(&self.counters.rx_frames);
                        self.counters.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                        (NET_HDR_LEN + len) as u32
                    } else {
                        bump(&self.counters.bad_chains);
                        bump(&self.counters.rx_dropped);
                        0
                    }
                }
            };
            if let Err(e) = self.rx.add_used(&self.mem, head, used) {
                self.break_queue(&e);
                break;
            }
            completed = true;
        }
        if completed {
            self.interrupt.signal_queue(RX_QUEUE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::Msix;
    use crate::devices::testing::{FakeMsi, GuestQueue, wait_until};
    use crate::devices::virtio::net::backend::SeqpacketBackend;
    use crate::memory;
    use nix::sys::socket::{self, MsgFlags};
    use std::os::fd::{AsRawFd, OwnedFd};
    use vm_memory::Bytes;

    const RXQ: u64 = 0x10_0000;
    const TXQ: u64 = 0x20_0000;
    const CTRLQ: u64 = 0x30_0000;
    const BUF: u64 = 0x40_0000;

    struct Rig {
        mem: GuestMem,
        rxq: GuestQueue,
        txq: GuestQueue,
        worker: NetWorker,
        peer: OwnedFd,
        msi: Arc<FakeMsi>,
        interrupt: Arc<VirtioInterrupt>,
        backend: Arc<SeqpacketBackend>,
    }

    fn rig() -> Rig {
        let (mem, _f) = memory::create(16).unwrap();
        let rxq = GuestQueue::new(&mem, 16, RXQ);
        let txq = GuestQueue::new(&mem, 16, TXQ);
        let (backend, peer) = SeqpacketBackend::pair().unwrap();
        let backend = Arc::new(backend);
        let msi = FakeMsi::new(3);
        let msix = Arc::new(Msix::new(msi.clone()));
        for v in 0..3u64 {
            msix.write_table(v * 16 + 12, &0u32.to_le_bytes());
        }
        msix.set_control(0x8000);
        let interrupt = Arc::new(VirtioInterrupt::new(msix, 3));
        interrupt.set_queue_vector(RX_QUEUE, 0);
        interrupt.set_queue_vector(TX_QUEUE, 1);
        let worker = NetWorker::new(
            mem.clone(),
            rxq.queue(),
            txq.queue(),
            backend.clone(),
            Arc::default(),
            interrupt.clone(),
        );
        Rig { mem, rxq, txq, worker, peer, msi, interrupt, backend }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    fn peer_recv(peer: &OwnedFd) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70000];
        match socket::recv(peer.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(_) => None,
        }
    }

    fn peer_send(peer: &OwnedFd, data: &[u8]) {
        socket::send(peer.as_raw_fd(), data, MsgFlags::empty()).unwrap();
    }

    impl Rig {
        /// Queues a TX chain: header + frame split over two descriptors.
        fn tx(&mut self, data: &[u8]) -> u16 {
            self.mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(BUF)).unwrap();
            self.mem.write_slice(data, GuestAddress(BUF + 0x1_0000)).unwrap();
            let head = self.txq.add_chain(
                &self.mem,
                &[(BUF, NET_HDR_LEN as u32, false), (BUF + 0x1_0000, data.len() as u32, false)],
            );
            self.txq.publish(&self.mem, head);
            head
        }

        fn rx_buffer(&mut self, addr: u64, len: u32) -> u16 {
            let head = self.rxq.add_chain(&self.mem, &[(addr, len, true)]);
            self.rxq.publish(&self.mem, head);
            head
        }

        fn counter(&self, f: impl Fn(&NetCounters) -> &AtomicU64) -> u64 {
            f(&self.worker.counters).load(Ordering::Relaxed)
        }
    }

    /// The control queue of a driver that did not accept CTRL_VQ.
    fn no_ctrl() -> Queue {
        Queue::new(CTRL_QUEUE_SIZE).unwrap()
    }

    fn doorbell() -> EventFd {
        EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap()
    }

    fn status(net: &Net) -> u16 {
        let mut c = [0u8; 2];
        net.read_config(6, &mut c);
        u16::from_le_bytes(c)
    }

    /// Posts control command `cmd` (header in BUF, ack byte at BUF + 0x100).
    fn ctrl_command(mem: &GuestMem, q: &mut GuestQueue, cmd: [u8; 2]) {
        mem.write_slice(&cmd, GuestAddress(BUF)).unwrap();
        mem.write_slice(&[0xff], GuestAddress(BUF + 0x100)).unwrap();
        let head = q.add_chain(mem, &[(BUF, 2, false), (BUF + 0x100, 1, true)]);
        q.publish(mem, head);
    }

    fn ack_byte(mem: &GuestMem) -> u8 {
        let mut b = [0u8];
        mem.read_slice(&mut b, GuestAddress(BUF + 0x100)).unwrap();
        b[0]
    }

    #[test]
    fn an_announce_holds_the_status_bit_until_the_driver_acknowledges_it() {
        let Rig { mem, rxq, txq, backend, interrupt, msi, worker, .. } = rig();
        drop(worker);
        interrupt.set_config_vector(2);
        let mut ctrlq = GuestQueue::new(&mem, 16, CTRLQ);
        let mut net = Net::new([2, 0, 0, 0, 0, 4], backend);
        assert!(!net.announce(), "an inactive device cannot announce");
        let ctrl_fd = doorbell();
        let activation = Activation {
            mem: mem.clone(),
            queues: vec![rxq.queue(), txq.queue(), ctrlq.queue()],
            notifiers: vec![doorbell(), doorbell(), ctrl_fd.try_clone().unwrap()],
            interrupt: interrupt.clone(),
            features: VIRTIO_F_VERSION_1 | F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE,
        };
        net.activate(activation).unwrap();
        assert_eq!(status(&net), LINK_UP);
        let generation = interrupt.config_generation();
        assert!(net.announce());
        assert_eq!(status(&net), LINK_UP | S_ANNOUNCE);
        assert_eq!(interrupt.config_generation(), generation.wrapping_add(1));
        assert!(msi.wait_for(2, 1), "configuration change signalled");

        // A command the device does not know is refused; the bit stays.
        ctrl_command(&mem, &mut ctrlq, [0, 1]);
        ctrl_fd.write(1).unwrap();
        assert!(wait_until(|| ctrlq.used_idx(&mem) == 1));
        assert_eq!(ack_byte(&mem), CTRL_ERR);
        assert_eq!(status(&net), LINK_UP | S_ANNOUNCE);

        ctrl_command(&mem, &mut ctrlq, [CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK]);
        ctrl_fd.write(1).unwrap();
        assert!(wait_until(|| ctrlq.used_idx(&mem) == 2));
        assert_eq!(ack_byte(&mem), CTRL_OK);
        assert_eq!(ctrlq.used_elem(&mem, 1).1, 1, "one status byte written");
        assert_eq!(status(&net), LINK_UP);
        assert_eq!(net.counters().announces_acked.load(Ordering::Relaxed), 1);

        // The queues come back whole, the control queue's position with them.
        let queues = net.quiesce().unwrap();
        assert_eq!(queues.len(), 3);
        assert_eq!(queues[CTRL_QUEUE].next_avail(), 2);
    }

    #[test]
    fn a_driver_without_guest_announce_is_not_asked() {
        let Rig { mem, rxq, txq, backend, interrupt, msi, worker, .. } = rig();
        drop(worker);
        interrupt.set_config_vector(2);
        let mut net = Net::new([2, 0, 0, 0, 0, 5], backend);
        let activation = Activation {
            mem,
            queues: vec![rxq.queue(), txq.queue(), no_ctrl()],
            notifiers: vec![doorbell(), doorbell(), doorbell()],
            interrupt,
            features: VIRTIO_F_VERSION_1 | F_MAC | F_STATUS,
        };
        net.activate(activation).unwrap();
        assert!(!net.announce());
        assert_eq!(status(&net), LINK_UP);
        assert!(msi.triggers().is_empty());
        // A driver that accepted CTRL_VQ must enable the control queue.
        let Rig { mem, rxq, txq, backend, interrupt, .. } = rig();
        let mut net = Net::new([2, 0, 0, 0, 0, 6], backend);
        let activation = Activation {
            mem,
            queues: vec![rxq.queue(), txq.queue(), no_ctrl()],
            notifiers: vec![doorbell(), doorbell(), doorbell()],
            interrupt,
            features: VIRTIO_F_VERSION_1 | F_CTRL_VQ,
        };
        assert!(matches!(net.activate(activation), Err(ActivateError::QueueNotReady { index: CTRL_QUEUE })));
    }

    #[test]
    fn config_space_and_features() {
        let (backend, _peer) = SeqpacketBackend::pair().unwrap();
        let net = Net::new([2, 0, 0, 0, 0, 1], Arc::new(backend));
        assert_eq!(net.features(), VIRTIO_F_VERSION_1 | F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE);
        let mut c = [0u8; 8];
        net.read_config(0, &mut c);
        assert_eq!(c, [2, 0, 0, 0, 0, 1, 1, 0]);
        let mut past = [0xffu8; 4];
        net.read_config(9, &mut past);
        assert_eq!(past, [0, 0, 0, 0]);
        assert_eq!(net.queue_max_sizes(), &[256, 256, 64]);
    }

    #[test]
    fn tx_frames_reach_the_socket() {
        let mut r = rig();
        let f = frame(60, 1);
        let head = r.tx(&f);
        r.worker.process_tx();
        assert_eq!(peer_recv(&r.peer), Some(f));
        assert_eq!(r.txq.used_idx(&r.mem), 1);
        assert_eq!(r.txq.used_elem(&r.mem, 0), (u32::from(head), 0));
        assert_eq!(r.msi.triggers(), vec![1]);
        assert_eq!(r.counter(|c| &c.tx_frames), 1);
        assert_eq!(r.counter(|c| &c.tx_bytes), 60);
    }

    #[test]
    fn rx_frames_land_after_a_zeroed_header() {
        let mut r = rig();
        let head = r.rx_buffer(BUF, 1526);
        r.mem.write_slice(&[0xaau8; 1526], GuestAddress(BUF)).unwrap();
        let f = frame(100, 9);
        peer_send(&r.peer, &f);
        r.worker.process_rx();
        assert_eq!(r.rxq.used_idx(&r.mem), 1);
        assert_eq!(r.rxq.used_elem(&r.mem, 0), (u32::from(head), 112));
        let mut got = vec![0u8; 112];
        r.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(&got[..10], &[0; 10]);
        assert_eq!(&got[10..12], &[1, 0], "num_buffers = 1");
        assert_eq!(&got[12..], &f[..]);
        assert_eq!(r.msi.triggers(), vec![0]);
        assert_eq!(r.counter(|c| &c.rx_frames), 1);
        // No buffer left: the next frame waits in the socket.
        peer_send(&r.peer, &f);
        r.worker.process_rx();
        assert!(r.worker.rx_starved);
        assert_eq!(r.counter(|c| &c.rx_dropped), 0);
        r.rx_buffer(BUF, 1526);
        r.worker.rx_starved = false;
        r.worker.process_rx();
        assert_eq!(r.rxq.used_idx(&r.mem), 2);
    }

    #[test]
    fn bad_sizes_are_dropped_and_counted() {
        let mut r = rig();
        // TX: runt, oversize (header + 65551 bytes), header only.
        r.tx(&frame(13, 0));
        r.tx(&frame(MAX_FRAME + 1, 0));
        let head = r.txq.add_chain(&r.mem, &[(BUF, NET_HDR_LEN as u32, false)]);
        r.txq.publish(&r.mem, head);
        r.tx(&frame(MAX_FRAME, 0));
        r.worker.process_tx();
        assert_eq!(r.txq.used_idx(&r.mem), 4, "every chain is returned");
        assert_eq!(r.counter(|c| &c.tx_dropped), 3);
        assert_eq!(peer_recv(&r.peer).map(|f| f.len()), Some(MAX_FRAME));
        assert_eq!(peer_recv(&r.peer), None);

        // RX: runt and oversize from the backend are dropped; the buffer stays
        // for the next good frame. A frame too big for the buffer also drops.
        r.rx_buffer(BUF, 2048);
        peer_send(&r.peer, &frame(10, 0));
        peer_send(&r.peer, &frame(MAX_FRAME + 100, 0));
        peer_send(&r.peer, &frame(4000, 0));
        peer_send(&r.peer, &frame(64, 5));
        r.worker.process_rx();
        assert_eq!(r.counter(|c| &c.rx_dropped), 3);
        assert_eq!(r.rxq.used_idx(&r.mem), 1);
        assert_eq!(r.rxq.used_elem(&r.mem, 0).1, 76);
    }

    #[test]
    fn hostile_chains_are_returned_empty() {
        let mut r = rig();
        // TX chain with a device-writable buffer.
        let head = r.txq.add_chain(&r.mem, &[(BUF, 12, false), (BUF + 0x1000, 64, true)]);
        r.txq.publish(&r.mem, head);
        // TX buffer outside guest memory.
        let head = r.txq.add_chain(&r.mem, &[(BUF, 12, false), (0xffff_0000_0000, 64, false)]);
        r.txq.publish(&r.mem, head);
        r.worker.process_tx();
        assert_eq!(r.txq.used_idx(&r.mem), 2);
        assert_eq!(r.counter(|c| &c.bad_chains), 2);
        assert_eq!(peer_recv(&r.peer), None);

        // RX chain that is device-readable, then one outside memory.
        let head = r.rxq.add_chain(&r.mem, &[(BUF, 2048, false)]);
        r.rxq.publish(&r.mem, head);
        let head = r.rxq.add_chain(&r.mem, &[(u64::MAX - 100, 2048, true)]);
        r.rxq.publish(&r.mem, head);
        peer_send(&r.peer, &frame(64, 0));
        peer_send(&r.peer, &frame(64, 0));
        r.worker.process_rx();
        assert_eq!(r.rxq.used_idx(&r.mem), 2);
        assert_eq!(r.rxq.used_elem(&r.mem, 0).1, 0);
        assert_eq!(r.counter(|c| &c.bad_chains), 4);
        assert!(!r.worker.broken);

        // A bad avail index breaks the queue: NEEDS_RESET.
        r.txq.set_avail_idx(&r.mem, 500);
        r.worker.process_tx();
        assert!(r.worker.broken);
        assert!(r.interrupt.needs_reset());
    }

    #[test]
    fn a_full_socket_pauses_tx_until_it_drains() {
        let mut r = rig();
        // Big frames fill the socket buffer after a few.
        let f = frame(60000, 3);
        for _ in 0..12 {
            r.tx(&f);
        }
        r.worker.process_tx();
        assert!(r.worker.tx_blocked);
        let sent = r.txq.used_idx(&r.mem);
        assert!(sent < 12, "the socket pushed back");
        let mut received = 0;
        for _ in 0..100 {
            while peer_recv(&r.peer).is_some() {
                received += 1;
            }
            if r.txq.used_idx(&r.mem) == 12 {
                break;
            }
            r.worker.tx_blocked = false;
            r.worker.process_tx();
        }
        assert_eq!(r.txq.used_idx(&r.mem), 12);
        assert_eq!(received, 12);
        assert_eq!(r.counter(|c| &c.tx_dropped), 0);
    }

    #[test]
    fn the_device_thread_moves_frames_both_ways_and_stops_on_reset() {
        let Rig { mem, mut rxq, mut txq, peer, msi, interrupt, backend, worker, .. } = rig();
        drop(worker);
        let mut net = Net::new([2, 0, 0, 0, 0, 2], backend);
        let rx_fd = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let tx_fd = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let activation = Activation {
            mem: mem.clone(),
            queues: vec![rxq.queue(), txq.queue(), no_ctrl()],
            notifiers: vec![rx_fd.try_clone().unwrap(), tx_fd.try_clone().unwrap(), doorbell()],
            interrupt,
            features: VIRTIO_F_VERSION_1 | F_MAC,
        };
        net.activate(activation).unwrap();

        // RX: a frame arrives before any buffer; the guest adds one and rings.
        peer_send(&peer, &frame(80, 1));
        std::thread::sleep(std::time::Duration::from_millis(20));
        let head = rxq.add_chain(&mem, &[(BUF, 1526, true)]);
        rxq.publish(&mem, head);
        rx_fd.write(1).unwrap();
        assert!(wait_until(|| rxq.used_idx(&mem) == 1));
        assert!(msi.wait_for(0, 1));

        // TX.
        mem.write_slice(&frame(70, 4), GuestAddress(BUF + 0x4000 + 12)).unwrap();
        let head = txq.add_chain(&mem, &[(BUF + 0x4000, 82, false)]);
        txq.publish(&mem, head);
        tx_fd.write(1).unwrap();
        assert!(wait_until(|| txq.used_idx(&mem) == 1));
        assert_eq!(peer_recv(&peer), Some(frame(70, 4)));

        net.reset();
        assert!(net.thread.is_none());
        // The peer going away while active does not spin or crash the thread.
        let Rig { mem, rxq, txq, backend, interrupt, .. } = rig();
        let mut net = Net::new([2, 0, 0, 0, 0, 3], backend);
        let rx_fd = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let tx_fd = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let activation = Activation {
            mem,
            queues: vec![rxq.queue(), txq.queue(), no_ctrl()],
            notifiers: vec![rx_fd, tx_fd, doorbell()],
            interrupt,
            features: VIRTIO_F_VERSION_1,
        };
        net.activate(activation).unwrap();
        drop(net);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        prop_compose! {
            fn descriptor()(
                addr in prop_oneof![3 => BUF..BUF + 0x2_0000, 1 => (16u64 << 20) - 0x100..(16u64 << 20) + 0x100, 1 => any::<u64>()],
                len in prop_oneof![3 => 0u32..2000, 1 => 60000u32..70000, 1 => any::<u32>()],
                flags in 0u16..8,
                next in 0u16..20,
            ) -> (u64, u32, u16, u16) {
                (addr, len, flags, next)
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(100))]

            /// Random TX and RX tables with frames of random sizes from the
            /// backend: every popped chain is returned (or the queue is marked
            /// broken), and the worker neither panics nor spins.
            #[test]
            fn random_tables_and_frames_never_hurt_the_worker(
                tx in proptest::collection::vec(descriptor(), 16),
                rx in proptest::collection::vec(descriptor(), 16),
                tx_heads in proptest::collection::vec(0u16..18, 0..8),
                rx_heads in proptest::collection::vec(0u16..18, 0..8),
                frames in proptest::collection::vec(0usize..3000, 0..6),
            ) {
                let mut r = rig();
                for (i, &(a, l, f, n)) in tx.iter().enumerate() {
                    r.txq.write_desc(&r.mem, i as u16, a, l, f, n);
                }
                for (i, &(a, l, f, n)) in rx.iter().enumerate() {
                    r.rxq.write_desc(&r.mem, i as u16, a, l, f, n);
                }
                for &h in &tx_heads {
                    r.txq.publish(&r.mem, h);
                }
                for &h in &rx_heads {
                    r.rxq.publish(&r.mem, h);
                }
                for &len in &frames {
                    peer_send(&r.peer, &frame(len, 0));
                }
                r.worker.process_tx();
                r.worker.process_rx();
                if !r.worker.broken {
                    let tx_used = usize::from(r.txq.used_idx(&r.mem));
                    if r.worker.tx_blocked {
                        prop_assert!(tx_used < tx_heads.len());
                    } else {
                        prop_assert_eq!(tx_used, tx_heads.len());
                    }
                    prop_assert!(usize::from(r.rxq.used_idx(&r.mem)) <= rx_heads.len());
                    let c = &r.worker.counters;
                    let rx_seen = c.rx_frames.load(Ordering::Relaxed) + c.rx_dropped.load(Ordering::Relaxed);
                    prop_assert!(rx_seen <= frames.len() as u64 + rx_heads.len() as u64);
                } else {
                    prop_assert!(r.interrupt.needs_reset());
                    prop_assert!(tx_heads.iter().chain(&rx_heads).any(|&h| h >= 16));
                }
                while peer_recv(&r.peer).is_some() {}
            }
        }
    }
}
