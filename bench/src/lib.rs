//! Shared benchmark helpers: process guards, the load generator shared by all
//! systems under test, and the systems themselves (nodeos, etcd).

pub mod etcd;
pub mod load;
pub mod nodeos;
pub mod proc;
pub mod system;
