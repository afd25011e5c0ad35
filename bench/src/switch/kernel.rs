//! The peer: the same topology from Linux kernel parts. In each node
//! namespace a bridge `br0` joins a vxlan device `vx0` (VNI 100, UDP 4789,
//! no learning, every frame head-end replicated to the other node by an
//! all-zeros FDB entry — the kernel's way to do what nodeos does) and the
//! node end `cl0` of a veth pair whose other end, `eth0` in the client
//! namespace, has [`CLIENT_IPS`] and MTU 1450 (1500 minus the VXLAN
//! overhead, as nodeos hands out to its ports).

use super::topo::{FABRIC_IPS, Topology};
use super::{Ends, ip, run};

/// The clients' addresses on this side (a /24), by node index.
pub const CLIENT_IPS: [&str; 2] = ["10.89.0.1", "10.89.0.2"];
/// The tenant MTU on both sides.
pub const MTU: &str = "1450";

/// Adds vxlan device `vx0` with `vni` on UDP 4789 to namespace `ns`, sending
/// from `local`, with learning off (forwarding comes from FDB entries).
pub fn add_vxlan(ns: &str, vni: &str, local: &str) -> anyhow::Result<()> {
    ip(&[
        "-n",
        ns,
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        vni,
        "dstport",
        "4789",
        "local",
        local,
        "nolearning",
    ])
    .map(|_| ())
}

/// The kernel side, torn down on drop.
#[derive(Debug)]
pub struct KernelSide {
    pub topo: Topology,
}

impl KernelSide {
    /// Builds the side in namespaces of its own.
    pub fn build() -> anyhow::Result<Self> {
        let topo = Topology::new('k')?;
        for i in 0..2 {
            let (n, c) = (topo.node(i), topo.client(i));
            ip(&["-n", n, "link", "add", "br0", "type", "bridge"])?;
            add_vxlan(n, "100", FABRIC_IPS[i])?;
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    n,
                    "bridge",
                    "fdb",
                    "append",
                    "00:00:00:00:00:00",
                    "dev",
                    "vx0",
                    "dst",
                    FABRIC_IPS[1 - i],
                ],
            )?;
            ip(&["-n", n, "link", "set", "vx0", "mtu", MTU, "master", "br0", "up"])?;
            ip(&["-n", n, "link", "add", "cl0", "type", "veth", "peer", "name", "eth0", "netns", c])?;
            ip(&["-n", n, "link", "set", "cl0", "master", "br0", "up"])?;
            ip(&["-n", n, "link", "set", "br0", "up"])?;
            ip(&["-n", c, "link", "set", "eth0", "mtu", MTU, "up"])?;
            ip(&["-n", c, "addr", "add", &format!("{}/24", CLIENT_IPS[i]), "dev", "eth0"])?;
        }
        Ok(KernelSide { topo })
    }

    pub fn ends(&self) -> Ends {
        Ends {
            side: "linux",
            nodes: [self.topo.node(0).to_owned(), self.topo.node(1).to_owned()],
            clients: [self.topo.client(0).to_owned(), self.topo.client(1).to_owned()],
            ips: CLIENT_IPS.map(str::to_owned),
        }
    }
}
