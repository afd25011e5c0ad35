//! Shared benchmark helpers: process guards, the load generator shared by all
//! systems under test, the systems themselves (nodeos, etcd), the two sides
//! of the VMM benchmark (the nodeos VMM through `VmService`, QEMU), and the
//! block benchmark's pieces (fio over NBD, qemu-nbd, loopback TCP, volumes),
//! and the switch benchmark's (network namespaces, the kernel bridge and
//! vxlan peer, the nodeos side's pool and tap ports, iperf3 and ping).

pub mod block;
pub mod etcd;
pub mod load;
pub mod migrate;
pub mod nodeos;
pub mod proc;
pub mod switch;
pub mod system;
pub mod vmm;

/// A ratio as the `ratio <metric> <ours/peer>` lines print it: two decimals,
/// four below 0.1, `n/a` when a side measured nothing.
pub fn fmt_ratio(r: f64) -> String {
    if !r.is_finite() {
        "n/a".into()
    } else if r.abs() >= 0.1 {
        format!("{r:.2}")
    } else {
        format!("{r:.4}")
    }
}
