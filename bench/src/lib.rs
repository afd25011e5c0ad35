//! Shared benchmark helpers: process guards, the load generator shared by all
//! systems under test, the systems themselves (nodeos, etcd), the two sides
//! of the VMM benchmark (the nodeos VMM through `VmService`, QEMU), and the
//! block benchmark's pieces (fio over NBD, qemu-nbd, loopback TCP, volumes),
//! and the switch benchmark's (network namespaces, the kernel bridge and
//! vxlan peer, the nodeos side's pool and tap ports, iperf3 and ping).

pub mod block;
pub mod etcd;
pub mod load;
pub mod nodeos;
pub mod proc;
pub mod switch;
pub mod system;
pub mod vmm;
