//! Where a virtio-net device's frames go: a connected SOCK_SEQPACKET socket to
//! the node's switch, one message per Ethernet frame, no virtio header.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, sockopt};

/// A frame transport the device's I/O thread polls.
///
/// Contract: the fd from `as_fd` is readable when [`FrameBackend::recv`] has a
/// frame and writable when [`FrameBackend::send`] may succeed; it reports
/// HUP/ERR once the peer is gone. Neither call blocks: `send` sends the whole
/// frame or fails with `WouldBlock` (nothing sent, retry when writable); `recv`
/// returns the frame's full length, which exceeds `buf.len()` when the frame
/// was truncated (the device drops it), or fails with `WouldBlock`.
pub trait FrameBackend: AsFd + Send + Sync {
    fn send(&self, frame: &[u8]) -> io::Result<()>;
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
}

#[derive(Debug, thiserror::Error)]
pub enum NetBackendError {
    #[error("cannot inspect the frame socket")]
    Inspect(#[source] nix::Error),
    #[error("frame socket is {0:?}, expected a SOCK_SEQPACKET socket")]
    SocketType(SockType),
    #[error("cannot create a socket pair")]
    Pair(#[source] nix::Error),
}

/// A connected Unix SOCK_SEQPACKET socket.
#[derive(Debug)]
pub struct SeqpacketBackend {
    fd: OwnedFd,
}

impl SeqpacketBackend {
    /// Takes a connected SOCK_SEQPACKET socket (checked). The socket's own
    /// blocking mode is left alone: every call passes MSG_DONTWAIT.
    pub fn new(fd: OwnedFd) -> Result<Self, NetBackendError> {
        let ty = socket::getsockopt(&fd, sockopt::SockType).map_err(NetBackendError::Inspect)?;
        if ty != SockType::SeqPacket {
            return Err(NetBackendError::SocketType(ty));
        }
        Ok(Self { fd })
    }

    /// A backend and the other end of its socket pair (for the switch side, or tests).
    pub fn pair() -> Result<(Self, OwnedFd), NetBackendError> {
        let (a, b) =
            socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
                .map_err(NetBackendError::Pair)?;
        Ok((Self { fd: a }, b))
    }
}

impl AsFd for SeqpacketBackend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl FrameBackend for SeqpacketBackend {
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // MSG_NOSIGNAL: a vanished peer is an EPIPE, not a SIGPIPE for the worker.
        socket::send(self.fd.as_raw_fd(), frame, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL)
            .map(drop)
            .map_err(io::Error::from)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        socket::recv(self.fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC)
            .map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_and_truncation_reports_the_real_length() {
        let (backend, peer) = SeqpacketBackend::pair().unwrap();
        backend.send(b"hello frame").unwrap();
        let mut buf = [0u8; 64];
        let n = socket::recv(peer.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        assert_eq!(&buf[..n], b"hello frame");

        socket::send(peer.as_raw_fd(), &[7u8; 100], MsgFlags::empty()).unwrap();
        let mut small = [0u8; 10];
        assert_eq!(backend.recv(&mut small).unwrap(), 100);
        assert_eq!(backend.recv(&mut small).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn only_seqpacket_sockets_are_accepted() {
        let (a, _b) =
            socket::socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::empty()).unwrap();
        assert!(matches!(SeqpacketBackend::new(a), Err(NetBackendError::SocketType(SockType::Stream))));
        let (a, _b) =
            socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::empty()).unwrap();
        assert!(SeqpacketBackend::new(a).is_ok());
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_signal() {
        let (backend, peer) = SeqpacketBackend::pair().unwrap();
        drop(peer);
        assert_eq!(backend.send(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
