//! What the benchmark needs of a system under test: a way to start a fresh
//! 3-member cluster on loopback, to find its leader, and to connect clients.

use std::future::Future;
use std::time::Duration;

use crate::load::Connector;

/// A running 3-member cluster. Dropping it kills every member and removes its
/// data directories.
pub trait Cluster: Send {
    /// Client (API) addresses of the members, `127.0.0.1:port`.
    fn client_addrs(&self) -> Vec<String>;
    /// Waits until all 3 members are in and healthy, then returns the client
    /// address of the current leader.
    fn wait_ready_leader(&mut self, within: Duration) -> impl Future<Output = anyhow::Result<String>> + Send;
    /// Fails (with the members' log tails) if a member has exited.
    fn check_running(&mut self) -> anyhow::Result<()>;
    /// The last lines of every member's log.
    fn logs(&self) -> String;
}

/// A system under test.
pub trait System {
    type Connector: Connector;
    type Cluster: Cluster;
    /// Short name for tables.
    fn name(&self) -> &'static str;
    fn connector(&self) -> Self::Connector;
    /// Spawns 3 fresh members (new data dirs, free ports) and returns at once.
    fn spawn_cluster(&self) -> anyhow::Result<Self::Cluster>;
}
