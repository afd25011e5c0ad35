//! The worker's jail, entered in two steps around building the VM:
//!
//! 1. [`private_mounts`], first thing in the worker while it has one thread:
//!    a mount namespace of its own, every mount private, so nothing it mounts
//!    reaches the node; and a PID namespace of its own, which the process
//!    enters by forking: the child, PID 1 of the new namespace, goes on as the
//!    worker; the parent (the process the node started) gives up its
//!    privileges, waits for it and ends as it ended (a signal re-raised).
//! 2. [`confine`], once the VM is built (memory mapped, kernel loaded, disks,
//!    console and sockets open): the root becomes an empty read-only tmpfs
//!    (`pivot_root`, the old root detached), then the worker takes a uid and
//!    gid of its own and gives up every capability. The seccomp filter comes
//!    right after.
//!
//! A worker that does not run as root (a node started unprivileged) is
//! already unprivileged: both steps do nothing and say so.

use std::ffi::CString;

/// First uid (and gid) of the range workers run as; each VM maps to one.
pub const UID_BASE: u32 = 0x6e00_0000;
/// Size of that range.
pub const UID_SPAN: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{step}: {source}")]
    Sys {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("capabilities remain after dropping root (effective {effective:#x}, permitted {permitted:#x})")]
    CapsRemain { effective: u64, permitted: u64 },
}

fn sys(step: &'static str) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Sys { step, source }
}

fn check(step: &'static str, rc: libc::c_int) -> Result<(), JailError> {
    if rc < 0 { Err(JailError::Sys { step, source: std::io::Error::last_os_error() }) } else { Ok(()) }
}

fn cstr(s: &str) -> CString {
    // Only literals of this module come here; none holds a NUL.
    CString::new(s).unwrap_or_default()
}

/// Proof that the worker has a mount namespace of its own.
#[derive(Debug)]
pub struct PrivateMounts(());

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Step 1; `None` when not root. Must run while the worker has one thread
/// (a mount namespace cannot be unshared by a process sharing its fs, and
/// only a single-threaded process forks safely). Returns in the child only.
pub fn private_mounts() -> Result<Option<PrivateMounts>, JailError> {
    if !is_root() {
        return Ok(None);
    }
    // SAFETY: plain system calls on no memory of ours but literal strings.
    unsafe {
        check("unshare(CLONE_NEWNS | CLONE_NEWPID)", libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID))?;
        let root = cstr("/");
        check(
            "making every mount private",
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
        )?;
    }
    // SAFETY: fork in a process with one thread; the parent only makes the
    // async-signal-safe calls of `reap` and never returns.
    match unsafe { libc::fork() } {
        -1 => Err(JailError::Sys {
            step: "fork into the PID namespace",
            source: std::io::Error::last_os_error(),
        }),
        0 => {
            // The VM dies with the process the node started. (Its parent is
            // outside the namespace, so getppid() says 0 here. Should the
            // parent be gone before this line, the node has ended the worker
            // and closes its end of the control socket: the first read ends it.)
            // SAFETY: a plain system call.
            check("PR_SET_PDEATHSIG", unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
            })?;
            Ok(Some(PrivateMounts(())))
        }
        child => reap(child),
    }
}

/// The parent's whole life after the fork: no privileges, then wait for the
/// worker and end as it ended (a signal re-raised).
fn reap(child: libc::pid_t) -> ! {
    let id = UID_BASE - 1;
    // SAFETY: async-signal-safe system calls only; `status` is ours.
    unsafe {
        // Go on even if dropping privileges fails: the worker needs its parent.
        let _ = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        let _ = libc::setgroups(0, std::ptr::null());
        let _ = libc::setresgid(id, id, id);
        let _ = libc::setresuid(id, id, id);
        let mut status = 0;
        loop {
            let r = libc::waitpid(child, &mut status, 0);
            if r == child {
                break;
            }
            if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                libc::_exit(1);
            }
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(libc::WEXITSTATUS(status))
    }
}

/// The uid and gid the worker of `vm_id` runs as.
pub fn uid_for(vm_id: &str) -> u32 {
    let h = blake3::hash(vm_id.as_bytes());
    let b = h.as_bytes();
    UID_BASE + u32::from_le_bytes([b[0], b[1], b[2], b[3]]) % UID_SPAN
}

/// Step 2: an empty root, the worker's own uid and gid, no capabilities.
/// Returns the uid taken.
pub fn confine(_mounts: &PrivateMounts, vm_id: &str) -> Result<u32, JailError> {
    empty_root()?;
    let id = uid_for(vm_id);
    // SAFETY: plain system calls; glibc applies set*id to every thread of the process.
    unsafe {
        check(
            "clearing ambient capabilities",
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
        )?;
        check("setgroups", libc::setgroups(0, std::ptr::null()))?;
        check("setresgid", libc::setresgid(id, id, id))?;
        check("setresuid", libc::setresuid(id, id, id))?;
    }
    let (effective, permitted) = capabilities()?;
    if effective != 0 || permitted != 0 {
        return Err(JailError::CapsRemain { effective, permitted });
    }
    Ok(id)
}

/// The root becomes an empty read-only tmpfs; the old one is detached.
fn empty_root() -> Result<(), JailError> {
    let base =
        ["/tmp", "/run", "/mnt"].into_iter().find(|d| std::path::Path::new(d).is_dir()).ok_or_else(|| {
            JailError::Sys {
                step: "a directory to mount the new root on",
                source: std::io::ErrorKind::NotFound.into(),
            }
        })?;
    let (new, tmpfs, opts) = (cstr(base), cstr("tmpfs"), cstr("size=16k,mode=0755"));
    // SAFETY: system calls on NUL-terminated strings that outlive them.
    unsafe {
        check(
            "mounting the new root",
            libc::mount(
                tmpfs.as_ptr(),
                new.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                opts.as_ptr().cast(),
            ),
        )?;
    }
    let old = format!("{base}/old");
    std::fs::create_dir(&old).map_err(sys("making the old root's mount point"))?;
    let old_c = cstr(&old);
    let (slash, old_in_new, dot) = (cstr("/"), cstr("/old"), cstr("."));
    // SAFETY: as above.
    let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, new.as_ptr(), old_c.as_ptr()) };
    if pivoted == 0 {
        // SAFETY: as above.
        unsafe {
            check("chdir /", libc::chdir(slash.as_ptr()))?;
            check("detaching the old root", libc::umount2(old_in_new.as_ptr(), libc::MNT_DETACH))?;
        }
        std::fs::remove_dir("/old").map_err(sys("removing the old root's mount point"))?;
    } else {
        let e = std::io::Error::last_os_error();
        // The node image runs from its initramfs, which pivot_root cannot leave
        // (EINVAL): chroot instead. Without CAP_SYS_CHROOT (dropped next) and
        // with every open refused by seccomp, there is no way back out.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(JailError::Sys { step: "pivot_root", source: e });
        }
        std::fs::remove_dir(&old).map_err(sys("removing the old root's mount point"))?;
        // SAFETY: as above.
        unsafe {
            check("chdir to the new root", libc::chdir(new.as_ptr()))?;
            check("chroot", libc::chroot(dot.as_ptr()))?;
            check("chdir /", libc::chdir(slash.as_ptr()))?;
        }
    }
    // SAFETY: as above.
    unsafe {
        check(
            "making the new root read-only",
            libc::mount(
                std::ptr::null(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
        )?;
    }
    Ok(())
}

/// This thread's effective and permitted capability sets.
fn capabilities() -> Result<(u64, u64), JailError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut h = Header { version: VERSION_3, pid: 0 };
    let mut d = [Data::default(); 2];
    // SAFETY: capget writes two Data records (version 3) into `d`, which has room for them.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) };
    check("capget", rc as libc::c_int)?;
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((join(d[0].effective, d[1].effective), join(d[0].permitted, d[1].permitted)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vm_maps_to_a_uid_in_the_range() {
        for vm in ["a", "0123456789abcdef", "web-1"] {
            let u = uid_for(vm);
            assert!((UID_BASE..UID_BASE + UID_SPAN).contains(&u));
            assert_eq!(u, uid_for(vm));
        }
        assert_ne!(uid_for("a"), uid_for("b"));
    }
}
