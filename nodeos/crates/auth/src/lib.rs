//! Who may do what in a pool: the pool's certificate authority (derived from
//! the pool key), the identities its certificates carry, the role every RPC
//! needs, and mutual TLS on the API port.

pub mod ca;
pub mod identity;
pub mod rpc;
pub mod tls;

pub use ca::{Credential, PoolCa};
pub use identity::{Identity, Role, Subject};
