//! The discovery beacon: one UDP datagram per second to a multicast group on
//! the fabric interface, saying "node X of pool P answers at ADDR".
//!
//! Wire format (version 1): `b"NDOSB"`, a version byte, a postcard
//! [`Beacon`], then a 32-byte keyed MAC over everything before it. Datagrams
//! that are too large, malformed or fail the MAC are dropped and counted; a
//! valid beacon only names an address to probe, it grants nothing by itself.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use nodeos_types::auth::PoolKey;
use nodeos_types::{NodeId, unix_millis};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

/// Multicast group of nodeos beacons (organisation-local scope).
pub const BEACON_GROUP: Ipv4Addr = Ipv4Addr::new(239, 192, 77, 77);
/// Default beacon UDP port.
pub const BEACON_PORT: u16 = 7799;
const MAGIC: &[u8; 5] = b"NDOSB";
const VERSION: u8 = 1;
/// Largest beacon datagram accepted.
pub const MAX_BEACON: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beacon {
    pub pool_name: String,
    pub node: NodeId,
    /// gRPC address of the sender.
    pub address: String,
    pub sent_at_ms: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BeaconError {
    #[error("beacon of {0} bytes is outside 38..={MAX_BEACON}")]
    Size(usize),
    #[error("not a nodeos beacon (bad magic)")]
    Magic,
    #[error("beacon version {0} is not {VERSION}")]
    Version(u8),
    #[error(
        "pool key mismatch: the beacon does not verify with this pool key (another pool, or a wrong pool key)"
    )]
    Mac,
    #[error("beacon body does not decode")]
    Decode,
    #[error("beacon does not encode")]
    Encode,
}

pub fn encode(key: &PoolKey, b: &Beacon) -> Result<Vec<u8>, BeaconError> {
    let mut out = MAGIC.to_vec();
    out.push(VERSION);
    let body = postcard::to_stdvec(b).map_err(|_| BeaconError::Encode)?;
    out.extend_from_slice(&body);
    let mac = key.mac(&[b"beacon", &out]);
    out.extend_from_slice(&mac);
    if out.len() > MAX_BEACON {
        return Err(BeaconError::Size(out.len()));
    }
    Ok(out)
}

pub fn decode(key: &PoolKey, buf: &[u8]) -> Result<Beacon, BeaconError> {
    if buf.len() < MAGIC.len() + 1 + 32 || buf.len() > MAX_BEACON {
        return Err(BeaconError::Size(buf.len()));
    }
    if &buf[..MAGIC.len()] != MAGIC {
        return Err(BeaconError::Magic);
    }
    if buf[MAGIC.len()] != VERSION {
        return Err(BeaconError::Version(buf[MAGIC.len()]));
    }
    let (signed, mac) = buf.split_at(buf.len() - 32);
    if !key.verify(&[b"beacon", signed], mac) {
        return Err(BeaconError::Mac);
    }
    postcard::from_bytes(&signed[MAGIC.len() + 1..]).map_err(|_| BeaconError::Decode)
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("discovery interface {0:?} not found or has no IPv4 address yet")]
    NoAddress(String),
    #[error("cannot list interface addresses")]
    Ifaddrs(#[source] nix::Error),
    #[error("cannot set up the beacon socket on {iface}")]
    Socket {
        iface: String,
        #[source]
        source: std::io::Error,
    },
}

/// First IPv4 address of an interface.
pub fn iface_ipv4(iface: &str) -> Result<Ipv4Addr, SocketError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(SocketError::Ifaddrs)?;
    for a in addrs {
        if a.interface_name != iface {
            continue;
        }
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            return Ok(sin.ip());
        }
    }
    Err(SocketError::NoAddress(iface.to_owned()))
}

/// A UDP socket that sends to and receives from the beacon group on one interface.
pub fn bind(iface: &str, port: u16) -> Result<(tokio::net::UdpSocket, SocketAddr), SocketError> {
    let ip = iface_ipv4(iface)?;
    let err = |source| SocketError::Socket { iface: iface.to_owned(), source };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.set_reuse_port(true).map_err(err)?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into()).map_err(err)?;
    s.join_multicast_v4(&BEACON_GROUP, &ip).map_err(err)?;
    s.set_multicast_if_v4(&ip).map_err(err)?;
    s.set_multicast_ttl_v4(1).map_err(err)?;
    s.set_multicast_loop_v4(false).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    let sock = tokio::net::UdpSocket::from_std(s.into()).map_err(err)?;
    Ok((sock, SocketAddr::V4(SocketAddrV4::new(BEACON_GROUP, port))))
}

/// A beacon for this node, now.
pub fn make(pool_name: &str, node: NodeId, address: &str) -> Beacon {
    Beacon { pool_name: pool_name.to_owned(), node, address: address.to_owned(), sent_at_ms: unix_millis() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> PoolKey {
        PoolKey::from_secret(s.as_bytes()).expect("valid key")
    }

    #[test]
    fn beacon_round_trips_and_wrong_key_is_refused() {
        let k = key("beacon-test-key-0001");
        let b = make("lab", NodeId(42), "10.0.0.1:7700");
        let wire = encode(&k, &b).expect("encodes");
        assert_eq!(decode(&k, &wire), Ok(b));
        assert_eq!(decode(&key("beacon-test-key-0002"), &wire), Err(BeaconError::Mac));
    }

    #[test]
    fn malformed_beacons_are_refused_without_panic() {
        let k = key("beacon-test-key-0001");
        let wire = encode(&k, &make("lab", NodeId(42), "10.0.0.1:7700")).expect("encodes");
        assert_eq!(decode(&k, &wire[..10]), Err(BeaconError::Size(10)));
        let mut bad = wire.clone();
        bad[0] = b'X';
        assert_eq!(decode(&k, &bad), Err(BeaconError::Magic));
        let mut bad = wire.clone();
        bad[5] = 9;
        assert_eq!(decode(&k, &bad), Err(BeaconError::Version(9)));
        let mut bad = wire.clone();
        let n = bad.len();
        bad[n - 40] ^= 1;
        assert_eq!(decode(&k, &bad), Err(BeaconError::Mac));
        assert!(decode(&k, &vec![0u8; 4096]).is_err());
        // Random garbage of every length never panics.
        for len in 0..600 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let _ = decode(&k, &junk);
        }
    }
}
