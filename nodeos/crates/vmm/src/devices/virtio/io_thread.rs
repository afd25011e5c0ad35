//! A device's I/O thread and the epoll set it waits on.
//!
//! The thread is spawned on activation with a stop eventfd; [`IoThread::stop`]
//! (also run on drop) signals it and joins, so a reset never leaves a thread or
//! its file descriptors behind. The closure returns what the device needs
//! back (its queues, so a pause for migration can read their indices and a
//! resume can continue from them); everything else it owns (eventfd
//! duplicates, the epoll fd) is dropped when it returns.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::thread::JoinHandle;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// A running I/O thread whose body returns a `T` when stopped.
#[derive(Debug)]
pub struct IoThread<T: Send + 'static = ()> {
    stop: EventFd,
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> IoThread<T> {
    /// Starts `body` on a thread named `name`; `body` gets a duplicate of the stop
    /// eventfd and must return soon after it becomes readable, having finished
    /// the request it was serving (a stop never cuts a request in half).
    pub fn spawn<F>(name: &str, body: F) -> std::io::Result<Self>
    where
        F: FnOnce(EventFd) -> T + Send + 'static,
    {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let theirs = stop.try_clone()?;
        let handle = std::thread::Builder::new().name(name.to_owned()).spawn(move || body(theirs))?;
        Ok(Self { stop, handle: Some(handle) })
    }

    /// Signals the thread and waits for it to finish (idempotent); returns
    /// what its body returned (`None` if it was already stopped, could not be
    /// signalled, or panicked).
    pub fn stop(&mut self) -> Option<T> {
        let handle = self.handle.take()?;
        if let Err(e) = self.stop.write(1) {
            // Without the signal join could hang forever; leak the thread instead.
            tracing::error!(error = %e, "cannot signal a device I/O thread to stop");
            return None;
        }
        match handle.join() {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::error!("device I/O thread panicked");
                None
            }
        }
    }

    pub fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }
}

impl<T: Send + 'static> Drop for IoThread<T> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Borrows the descriptor of an fd owner that does not implement `AsFd`
/// (vmm-sys-util's `EventFd`).
pub(crate) fn borrow_fd<T: AsRawFd>(owner: &T) -> BorrowedFd<'_> {
    // SAFETY: `owner` keeps the descriptor open for at least the borrow's lifetime.
    unsafe { BorrowedFd::borrow_raw(owner.as_raw_fd()) }
}

/// Level-triggered epoll over a few fds, each with a caller-chosen token.
#[derive(Debug)]
pub(crate) struct Poller {
    epoll: Epoll,
    events: Vec<EpollEvent>,
}

impl Poller {
    pub(crate) fn new() -> nix::Result<Self> {
        Ok(Self { epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?, events: vec![EpollEvent::empty(); 8] })
    }

    pub(crate) fn add(&self, fd: BorrowedFd<'_>, token: u64, flags: EpollFlags) -> nix::Result<()> {
        self.epoll.add(fd, EpollEvent::new(flags, token))
    }

    pub(crate) fn modify(&self, fd: BorrowedFd<'_>, token: u64, flags: EpollFlags) -> nix::Result<()> {
        self.epoll.modify(fd, &mut EpollEvent::new(flags, token))
    }

    pub(crate) fn delete(&self, fd: BorrowedFd<'_>) -> nix::Result<()> {
        self.epoll.delete(fd)
    }

    /// Blocks until something is ready; returns (token, flags) pairs.
    pub(crate) fn wait(&mut self) -> nix::Result<Vec<(u64, EpollFlags)>> {
        let n = loop {
            match self.epoll.wait(&mut self.events, EpollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r?,
            }
        };
        Ok(self.events[..n].iter().map(|e| (e.data(), e.events())).collect())
    }
}

/// Empties a non-blocking eventfd (a doorbell); a spurious wakeup reads nothing.
pub(crate) fn drain(fd: &EventFd) {
    let _ = fd.read();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn stop_signals_and_joins_the_thread() {
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let mut t = IoThread::spawn("test-io", move |stop| {
            let mut p = Poller::new().unwrap();
            p.add(borrow_fd(&stop), 7, EpollFlags::EPOLLIN).unwrap();
            let ev = p.wait().unwrap();
            assert_eq!(ev[0].0, 7);
            flag.store(true, Ordering::SeqCst);
        })
        .unwrap();
        assert!(t.is_running());
        t.stop();
        assert!(ran.load(Ordering::SeqCst));
        assert!(!t.is_running());
        t.stop();
    }
}
