//! The relay that carries a VM NIC's frames between the worker's socket and
//! a host tap, for NICs attached to a tap rather than to a network's port.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

/// Largest frame relayed (64 KiB plus an Ethernet header).
const MAX_FRAME: usize = 65550;

pub use nodeos_switch::tap::{TapError, open};

/// Why a relay could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the NIC relay")]
pub struct RelayError(#[source] std::io::Error);

/// Counters of one relay, for logs.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    pub to_tap: u64,
    pub to_vm: u64,
    pub dropped: u64,
}

/// Carries frames both ways until either side closes or `stop` fires.
/// `vm_sock` is the node's end of the NIC's SOCK_SEQPACKET pair.
pub async fn relay(tap: File, vm_sock: OwnedFd, tap_name: String) -> Result<RelayStats, RelayError> {
    nix::fcntl::fcntl(vm_sock.as_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
        .map_err(|e| RelayError(e.into()))?;
    let tap = register(tap).map_err(RelayError)?;
    let sock = register(vm_sock).map_err(RelayError)?;
    let mut stats = RelayStats::default();
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        tokio::select! {
            r = tap.readable() => {
                let mut guard = r.map_err(RelayError)?;
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
                let mut guard = r.map_err(RelayError)?;
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
