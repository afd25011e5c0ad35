//! A device's I/O thread and the epoll set it waits on.
//!
//! The thread is spawned on activation with a stop eventfd; [`IoThread::stop`]
//! (also run on drop) signals it and joins, so a reset never leaves a thread or
//! its file descriptors behind. Everything the thread owns (queues, eventfd
//! duplicates, the epoll fd) is dropped when its closure returns.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::thread::JoinHandle;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// A running I/O thread.
#[derive(Debug)]
pub struct IoThread {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts `body` on a thread named `name`; `body` gets a duplicate of the stop
    /// eventfd and must return soon after it becomes readable.
    pub fn spawn<F>(name: &str, body: F) -> std::io::Result<Self>
    where
        F: FnOnce(EventFd) + Send + 'static,
    {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let theirs = stop.try_clone()?;
        let handle = std::thread::Builder::new().name(name.to_owned()).spawn(move || body(theirs))?;
        Ok(Self { stop, handle: Some(handle) })
    }

    /// Signals the thread and waits for it to finish (idempotent).
    pub fn stop(&mut self) {
        let Some(handle) = self.handle.take() else { return };
        if let Err(e) = self.stop.write(1) {
            // Without the signal join could hang forever; leak the thread instead.
            tracing::error!(error = %e, "cannot signal a device I/O thread to stop");
            return;
        }
        if handle.join().is_err() {
            tracing::error!("device I/O thread panicked");
        }
    }

    pub fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }
}

impl Drop for IoThread {
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
