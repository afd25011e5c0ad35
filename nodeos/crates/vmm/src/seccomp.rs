//! The worker's system-call filter, applied to every thread once the VM is
//! built (guest memory mapped, kernel loaded, disks and console opened, sockets
//! received).
//!
//! After that point a worker needs only what running the guest takes: KVM
//! ioctls, reading and writing the descriptors it already holds, eventfds and
//! epoll, memory for threads, signals for vCPU kicks, and its own exit. It can
//! no longer open a file, create a socket, execute a program, change its
//! credentials or trace anything: a compromised worker reaches the disks and
//! sockets it was handed and nothing else of the node.
//!
//! Calls outside the list fail with EPERM (rather than killing the worker), so
//! an overlooked call in a rare path degrades one operation instead of turning
//! into a crash the operator sees as a guest failure.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the system-call filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("compiling the system-call filter")]
    Compile(#[source] seccompiler::BackendError),
    #[error("installing the system-call filter")]
    Apply(#[source] seccompiler::Error),
}

/// System calls a running worker may make.
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_prctl,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What a worker with volume disks also needs: its block client makes TCP
/// connections to replica servers (new ones when a replica moves or comes
/// back). Only IPv4/IPv6 sockets can be created; files still cannot be opened.
const ALLOWED_FOR_VOLUMES: &[i64] = &[
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// The compiled filter; `volumes` admits the block client's TCP connections.
pub fn filter(volumes: bool) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        ALLOWED.iter().map(|&n| (n, vec![])).collect();
    if volumes {
        for &n in ALLOWED_FOR_VOLUMES {
            rules.insert(n, vec![]);
        }
        let family = |f: i32| -> Result<seccompiler::SeccompRule, SeccompError> {
            let c = seccompiler::SeccompCondition::new(
                0,
                seccompiler::SeccompCmpArgLen::Dword,
                seccompiler::SeccompCmpOp::Eq,
                f as u64,
            )
            .map_err(SeccompError::Build)?;
            seccompiler::SeccompRule::new(vec![c]).map_err(SeccompError::Build)
        };
        rules.insert(libc::SYS_socket, vec![family(libc::AF_INET)?, family(libc::AF_INET6)?]);
    }
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(SeccompError::Build)?;
    BpfProgram::try_from(f).map_err(SeccompError::Compile)
}

/// Installs the filter on every thread of the process (and, by inheritance,
/// on every thread started later).
pub fn apply_to_process(volumes: bool) -> Result<(), SeccompError> {
    let prog = filter(volumes)?;
    seccompiler::apply_filter_all_threads(&prog).map_err(SeccompError::Apply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filtered_thread_cannot_open_files_or_sockets_but_can_do_io() {
        let prog = filter(false).unwrap();
        let (r, w) = std::io::pipe().unwrap();
        // Filters are per thread unless synchronised: only this thread is confined.
        let outcome = std::thread::spawn(move || {
            seccompiler::apply_filter(&prog).unwrap();
            let open = std::fs::File::open("/etc/hostname").map_err(|e| e.raw_os_error());
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.raw_os_error());
            let mut w = w;
            let wrote = std::io::Write::write(&mut w, b"x").is_ok();
            (open.err(), sock.err(), wrote)
        })
        .join()
        .unwrap();
        assert_eq!(outcome.0, Some(Some(libc::EPERM)), "open must be refused");
        assert_eq!(outcome.1, Some(Some(libc::EPERM)), "socket must be refused");
        assert!(outcome.2, "writes to held descriptors still work");
        drop(r);
    }
}
