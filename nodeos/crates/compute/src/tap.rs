//! Host tap devices, and the relay that carries a VM NIC's frames between the
//! worker's socket and a tap, until the software switch takes that job.
//!
//! A tap is opened through the tun driver with `IFF_TAP | IFF_NO_PI`: every
//! read or write is exactly one Ethernet frame. The tap is created if missing
//! (and then persists only while open) and brought up.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

/// Largest frame relayed (64 KiB plus an Ethernet header).
const MAX_FRAME: usize = 65550;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} must be 1..=15 bytes")]
    Name(String),
    #[error("cannot open the tun device")]
    Open(#[source] std::io::Error),
    #[error("cannot attach to tap {name}")]
    Attach {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot bring tap {name} up")]
    Up {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the relay")]
    Relay(#[source] std::io::Error),
}

nix::ioctl_write_ptr_bad!(tunsetiff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_write_ptr_bad!(siocsifflags, libc::SIOCSIFFLAGS, libc::ifreq);
nix::ioctl_read_bad!(siocgifflags, libc::SIOCGIFFLAGS, libc::ifreq);

fn ifreq(name: &str) -> Result<libc::ifreq, TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(TapError::Name(name.to_owned()));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// Opens (creating if needed) tap `name`, non-blocking, and sets it up.
pub fn open(name: &str) -> Result<File, TapError> {
    let mut req = ifreq(name)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::Open)?;
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads one ifreq from the pointer, which is valid for the call.
    unsafe { tunsetiff(file.as_raw_fd(), &req) }
        .map_err(|source| TapError::Attach { name: name.to_owned(), source })?;
    set_up(name)?;
    Ok(file)
}

fn set_up(name: &str) -> Result<(), TapError> {
    let up_err = |source| TapError::Up { name: name.to_owned(), source };
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").map_err(up_err)?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS fills the ifreq the pointer refers to, valid for the call.
    unsafe { siocgifflags(sock.as_raw_fd(), &mut req) }.map_err(|e| up_err(e.into()))?;
    // SAFETY: the flags member of the union was just filled by the kernel.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the ifreq, valid for the call.
    unsafe { siocsifflags(sock.as_raw_fd(), &req) }.map_err(|e| up_err(e.into()))?;
    Ok(())
}

/// Counters of one relay, for logs.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    pub to_tap: u64,
    pub to_vm: u64,
    pub dropped: u64,
}

/// Carries frames both ways until either side closes or `stop` fires.
/// `vm_sock` is the node's end of the NIC's SOCK_SEQPACKET pair.
pub async fn relay(tap: File, vm_sock: OwnedFd, tap_name: String) -> Result<RelayStats, TapError> {
    nix::fcntl::fcntl(vm_sock.as_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
        .map_err(|e| TapError::Relay(e.into()))?;
    let tap = register(tap).map_err(TapError::Relay)?;
    let sock = register(vm_sock).map_err(TapError::Relay)?;
    let mut stats = RelayStats::default();
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        tokio::select! {
            r = tap.readable() => {
                let mut guard = r.map_err(TapError::Relay)?;
                match nix::unistd::read(guard.get_inner().as_fd(), &mut buf) {
                    Ok(0) => return Ok(stats),
                    Ok(n) => {
                        // A full VM socket drops the frame, like a full NIC queue.
                        match nix::sys::socket::send(sock.get_ref().as_raw_fd(), &buf[..n], nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
                            Ok(_) => stats.to_vm += 1,
                            Err(nix::errno::Errno::EAGAIN) => stats.dropped += 1,
                            Err(e) => { debug!(tap = %tap_name, error = %e, "VM side closed"); return Ok(stats); }
                        }
                    }
                    Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                    Err(e) => { warn!(tap = %tap_name, error = %e, "tap read failed"); return Ok(stats); }
                }
            }
            r = sock.readable() => {
                let mut guard = r.map_err(TapError::Relay)?;
                match nix::sys::socket::recv(guard.get_inner().as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
                    Ok(0) => return Ok(stats),
                    Ok(n) => match nix::unistd::write(tap.get_ref(), &buf[..n]) {
                        Ok(_) => stats.to_tap += 1,
                        Err(_) => stats.dropped += 1,
                    },
                    Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                    Err(e) => { debug!(tap = %tap_name, error = %e, "VM side closed"); return Ok(stats); }
                }
            }
        }
    }
}

/// Registers an owned descriptor with the reactor.
fn register<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor, which stays open and unchanged until
    // the AsyncFd (which takes ownership of `inner`) drops.
    unsafe { AsyncFd::register(inner) }.map_err(|e| std::io::Error::other(e.to_string()))
}
