//! Host tap devices: the switch's tap and uplink ports, and VM NICs attached
//! to a host tap directly.
//!
//! A tap is opened through the tun driver with `IFF_TAP | IFF_NO_PI`: every
//! read or write is exactly one Ethernet frame. The tap is created if missing
//! (it then lives while the descriptor is open) and brought up.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::frame::Mac;

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
    #[error("cannot configure tap {name} ({what})")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

nix::ioctl_write_ptr_bad!(tunsetiff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_write_ptr_bad!(siocsifflags, libc::SIOCSIFFLAGS, libc::ifreq);
nix::ioctl_read_bad!(siocgifflags, libc::SIOCGIFFLAGS, libc::ifreq);
nix::ioctl_write_ptr_bad!(siocsifhwaddr, libc::SIOCSIFHWADDR, libc::ifreq);
nix::ioctl_write_ptr_bad!(siocsifmtu, libc::SIOCSIFMTU, libc::ifreq);

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
    open_with(name, None, None)
}

/// Opens tap `name` like [`open`], first giving it a MAC address and an MTU.
pub fn open_with(name: &str, mac: Option<Mac>, mtu: Option<u16>) -> Result<File, TapError> {
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
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").map_err(cfg_err(name, "control socket"))?;
    if let Some(mac) = mac {
        let mut req = ifreq(name)?;
        // SAFETY: sockaddr is plain old data; all-zero is a valid value.
        let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
        hw.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in hw.sa_data.iter_mut().zip(mac.0) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = hw;
        // SAFETY: SIOCSIFHWADDR reads the ifreq, valid for the call.
        unsafe { siocsifhwaddr(sock.as_raw_fd(), &req) }
            .map_err(|e| cfg_err(name, "MAC address")(e.into()))?;
    }
    if let Some(mtu) = mtu {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        // SAFETY: SIOCSIFMTU reads the ifreq, valid for the call.
        unsafe { siocsifmtu(sock.as_raw_fd(), &req) }.map_err(|e| cfg_err(name, "MTU")(e.into()))?;
    }
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS fills the ifreq the pointer refers to, valid for the call.
    unsafe { siocgifflags(sock.as_raw_fd(), &mut req) }.map_err(|e| cfg_err(name, "flags")(e.into()))?;
    // SAFETY: the flags member of the union was just filled by the kernel.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the ifreq, valid for the call.
    unsafe { siocsifflags(sock.as_raw_fd(), &req) }.map_err(|e| cfg_err(name, "up")(e.into()))?;
    Ok(file)
}

fn cfg_err(name: &str, what: &'static str) -> impl Fn(std::io::Error) -> TapError {
    let name = name.to_owned();
    move |source| TapError::Configure { name: name.clone(), what, source }
}
