//! `PeerService`: the node-to-node API (raft, hello, join, forwarding, live
//! migration between nodes).
//!
//! Every request must open with this node's pool key (see `nodeos_meta::peer`);
//! one that does not is refused with `UNAUTHENTICATED` and logged, and nothing
//! in it is looked at. Every answer is sealed the same way. A node removed
//! from the pool is refused (`PERMISSION_DENIED`, saying so), whatever it asks.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use nodeos_meta::openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use nodeos_meta::peer::{
    self, EnvelopeError, ForwardError, Forwarded, ForwardedReply, Hello, JoinReply, JoinRequest, method,
};
use nodeos_meta::{MetaHandle, TypeConfig};
use nodeos_pool::Formation;
use nodeos_pool::pace::RefusalLog;
use nodeos_proto::v1::Envelope;
use nodeos_proto::v1::peer_service_server::PeerService;
use nodeos_types::NodeId;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};
use tracing::warn;

/// Log a refused sender at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(30);
/// Senders remembered for that; beyond it refusals go unlogged until some age out.
const REFUSAL_LOG_PEERS: usize = 256;

#[derive(Debug)]
pub struct PeerApi {
    meta: MetaHandle,
    formation: Formation,
    compute: nodeos_compute::Compute,
    /// Keyed by the sender's IP address: every new connection has a new port.
    refusals: Mutex<RefusalLog>,
}

impl PeerApi {
    pub fn new(meta: MetaHandle, formation: Formation, compute: nodeos_compute::Compute) -> Self {
        PeerApi {
            meta,
            formation,
            compute,
            refusals: Mutex::new(RefusalLog::new(REFUSAL_LOG_EVERY, REFUSAL_LOG_PEERS)),
        }
    }

    fn open<T: DeserializeOwned>(
        &self,
        method: &'static str,
        req: &Request<Envelope>,
    ) -> Result<(NodeId, T), Status> {
        peer::open(self.meta.peers().key(), method, req.get_ref())
            .map_err(|e| {
                let from = req.remote_addr().map(|a| a.ip().to_string()).unwrap_or_else(|| "?".into());
                let due = self.refusals.lock().unwrap_or_else(|p| p.into_inner()).due(&from, Instant::now());
                if due {
                    warn!(peer = %from, %method, error = %e, "refused a peer request");
                }
                match e {
                    EnvelopeError::BadMac { .. } => Status::unauthenticated(
                        "pool key mismatch: this node belongs to another pool or holds another pool key",
                    ),
                    other => Status::invalid_argument(other.to_string()),
                }
            })
            .and_then(|(sender, msg)| self.refuse_removed(sender).map(|()| (sender, msg)))
    }

    /// Refuses a node removed from the pool (`removed-nodes/<id>` in this
    /// node's copy of the records), whatever it asks.
    fn refuse_removed(&self, node: NodeId) -> Result<(), Status> {
        let key = nodeos_types::records::removed_node_key(node);
        let Ok(Some(kv)) = self.meta.state_machine().get(&key) else { return Ok(()) };
        let when = serde_json::from_slice::<nodeos_types::records::RemovedNode>(&kv.value)
            .map_or(0, |r| r.removed_at_ms);
        Err(Status::permission_denied(format!(
            "node {node} was removed from this pool (at unix ms {when}); \
             to join again, wipe its data directory so it starts as a new node"
        )))
    }

    fn seal<T: Serialize>(&self, method: &'static str, msg: &T) -> Result<Response<Envelope>, Status> {
        peer::seal(self.meta.peers().key(), self.meta.node_id(), method, msg)
            .map(Response::new)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

#[tonic::async_trait]
impl PeerService for PeerApi {
    async fn append_entries(&self, req: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let (_, rpc): (_, AppendEntriesRequest<TypeConfig>) = self.open(method::APPEND, &req)?;
        let r = self.meta.raft().append_entries(rpc).await;
        self.seal(method::APPEND, &r)
    }

    async fn vote(&self, req: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let (_, rpc): (_, VoteRequest<NodeId>) = self.open(method::VOTE, &req)?;
        let r = self.meta.raft().vote(rpc).await;
        self.seal(method::VOTE, &r)
    }

    async fn install_snapshot(&self, req: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let (_, rpc): (_, InstallSnapshotRequest<TypeConfig>) = self.open(method::SNAPSHOT, &req)?;
        let r = self.meta.raft().install_snapshot(rpc).await;
        self.seal(method::SNAPSHOT, &r)
    }

    async fn hello(&self, req: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let (sender, hello): (_, Hello) = self.open(method::HELLO, &req)?;
        if sender != hello.node.id {
            return Err(Status::invalid_argument("hello names another node than its sender"));
        }
        let reply = self.formation.hello_reply(&hello);
        self.seal(method::HELLO, &reply)
    }

    async fn join(&self, req: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let (sender, join): (_, JoinRequest) = self.open(method::JOIN, &req)?;
        self.refuse_removed(join.node.id)?;
        // A joiner seals its own request; another member's seal means the
        // request was handed over already.
        let handed_over = sender != join.node.id;
        let r: Result<JoinReply, String> = self.formation.serve_join(join, handed_over).await;
        self.seal(method::JOIN, &r)
    }

    async fn migration(&self, req: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let (sender, m): (_, nodeos_compute::migration::PeerRequest) = self.open(method::MIGRATION, &req)?;
        let r = self.compute.serve_migration(sender, m).await;
        self.seal(method::MIGRATION, &r)
    }

    async fn forward(&self, req: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let (_, fwd): (_, Forwarded) = self.open(method::FORWARD, &req)?;
        let r: Result<ForwardedReply, ForwardError> = self.meta.serve_forwarded(fwd).await;
        self.seal(method::FORWARD, &r)
    }
}
