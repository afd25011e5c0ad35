//! openraft's network over the `PeerService` gRPC API, and the peer client that
//! discovery, join and request forwarding share.
//!
//! [`PeerClient`] owns one lazily connected tonic channel per peer address and
//! remembers, per node, when a peer last answered: the leader's view of member
//! health comes from there (heartbeats are append-entries calls).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodeos_proto::v1::peer_service_client::PeerServiceClient;
use nodeos_types::NodeId;
use nodeos_types::auth::PoolKey;
use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use nodeos_auth::tls::Connector;

use crate::TypeConfig;
use crate::peer::{self, EnvelopeError, method};

/// Largest peer message, both ways (snapshots are sent in chunks below this).
pub const MAX_PEER_MESSAGE: usize = 64 * 1024 * 1024;
/// Connect timeout for a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer address {address:?} is not a valid host:port")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("peer at {address} did not answer {method}")]
    Transport {
        address: String,
        method: &'static str,
        #[source]
        source: tonic::Status,
    },
    #[error("peer at {address} refused {method}: pool key mismatch (it holds another pool key)")]
    KeyRefused { address: String, method: &'static str },
    /// Nothing was delivered (the in-process pools of `testing`: a node down or cut off).
    #[error("peer at {address} is unreachable; {method} was not delivered")]
    Unreachable { address: String, method: &'static str },
    #[error("peer at {address} timed out on {method}")]
    Timeout { address: String, method: &'static str },
    #[error("answer from peer at {address} to {method} is not valid")]
    Envelope {
        address: String,
        method: &'static str,
        #[source]
        source: EnvelopeError,
    },
}

/// Cloneable client for every peer call.
#[derive(Clone, Debug)]
pub struct PeerClient {
    me: NodeId,
    key: PoolKey,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    last_ack: Arc<Mutex<HashMap<NodeId, Instant>>>,
    /// Mutual TLS with this node's certificate; `None`: plaintext (loopback pools).
    tls: Option<Connector>,
}

impl PeerClient {
    pub fn new(me: NodeId, key: PoolKey) -> Self {
        PeerClient { me, key, channels: Arc::default(), last_ack: Arc::default(), tls: None }
    }

    /// Peer calls go over mutual TLS made by `connector` (the envelope's MAC
    /// stays inside it).
    pub fn with_tls(mut self, connector: Connector) -> Self {
        self.tls = Some(connector);
        self
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    /// When `node` last answered any peer call from this node.
    pub fn last_ack(&self, node: NodeId) -> Option<Instant> {
        self.last_ack.lock().ok().and_then(|m| m.get(&node).copied())
    }

    fn channel(&self, address: &str) -> Result<Channel, PeerError> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|source| PeerError::Address { address: address.to_owned(), source })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let ch = match &self.tls {
            Some(c) => ep.connect_with_connector_lazy(c.clone()),
            None => ep.connect_lazy(),
        };
        map.insert(address.to_owned(), ch.clone());
        Ok(ch)
    }

    fn forget(&self, address: &str) {
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).remove(address);
    }

    /// Sends one sealed request and opens the sealed answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        address: &str,
        method: &'static str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let env = peer::seal(&self.key, self.me, method, req).map_err(|source| PeerError::Envelope {
            address: address.to_owned(),
            method,
            source,
        })?;
        let mut client = PeerServiceClient::new(self.channel(address)?)
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE);
        let fut = async {
            match method {
                method::APPEND => client.append_entries(env).await,
                method::VOTE => client.vote(env).await,
                method::SNAPSHOT => client.install_snapshot(env).await,
                method::HELLO => client.hello(env).await,
                method::JOIN => client.join(env).await,
                method::MIGRATION => client.migration(env).await,
                _ => client.forward(env).await,
            }
        };
        let answer = match tokio::time::timeout(timeout, fut).await {
            Err(_) => {
                // The connection may be stuck in TCP retransmission backoff (a healed
                // link): drop it so the next call connects afresh.
                self.forget(address);
                return Err(PeerError::Timeout { address: address.to_owned(), method });
            }
            Ok(Err(status))
                if status.code() == tonic::Code::Unauthenticated || foreign_certificate(&status) =>
            {
                return Err(PeerError::KeyRefused { address: address.to_owned(), method });
            }
            Ok(Err(source)) => {
                return Err(PeerError::Transport { address: address.to_owned(), method, source });
            }
            Ok(Ok(a)) => a.into_inner(),
        };
        let (sender, resp): (NodeId, Resp) = peer::open(&self.key, method, &answer)
            .map_err(|source| PeerError::Envelope { address: address.to_owned(), method, source })?;
        if let Ok(mut m) = self.last_ack.lock() {
            m.insert(sender, Instant::now());
        }
        Ok(resp)
    }
}

/// Whether a call failed in the TLS handshake over a certificate: the other
/// end's is not of this pool's CA, or it refused ours (another pool key).
fn foreign_certificate(status: &tonic::Status) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = cur {
        let text = e.to_string();
        if text.contains("invalid peer certificate") || text.contains("received fatal alert") {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Hands openraft one [`RaftPeer`] per target.
#[derive(Clone, Debug)]
pub struct PeerNetworkFactory {
    client: PeerClient,
}

impl PeerNetworkFactory {
    pub fn new(client: PeerClient) -> Self {
        PeerNetworkFactory { client }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetworkFactory {
    type Network = RaftPeer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        RaftPeer { client: self.client.clone(), target, address: node.addr.clone() }
    }
}

/// openraft's connection to one target node.
#[derive(Debug)]
pub struct RaftPeer {
    client: PeerClient,
    target: NodeId,
    address: String,
}

impl RaftPeer {
    async fn rpc<Req, Resp, E>(
        &self,
        method: &'static str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let answer: Result<Resp, RaftError<NodeId, E>> =
            self.client.call(&self.address, method, req, option.hard_ttl()).await.map_err(|e| match e {
                PeerError::Envelope { .. } | PeerError::KeyRefused { .. } => {
                    RPCError::Network(NetworkError::new(&e))
                }
                _ => RPCError::Unreachable(Unreachable::new(&e)),
            })?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for RaftPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(method::APPEND, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc(method::SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(method::VOTE, &rpc, &option).await
    }

    /// After an unreachable error: retry soon, then back off to one second, so a
    /// restarted peer is caught up quickly without hammering a dead one.
    fn backoff(&self) -> Backoff {
        Backoff::new((1u32..).map(|n| Duration::from_millis(100 * u64::from(n.min(10)))))
    }
}
