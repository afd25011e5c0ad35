//! `PxeService`: the pool's PXE settings, and each node's serving state.
//!
//! The settings are one record (`pxe`), written by `Configure`; every node's PXE agent follows
//! it. `Status` answers for this node from its agent, and for the others by handing the request
//! to each of them once, concurrently; a node that does not answer is listed as unreachable.

use std::time::Duration;

use futures::future::join_all;
use nodeos_meta::command::Command;
use nodeos_meta::{Consistency, MetaHandle};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::pxe_service_client::PxeServiceClient;
use nodeos_proto::v1::pxe_service_server::PxeService;
use nodeos_pxe::agent::{NodePxeStatus, PxeHandle};
use nodeos_types::NodeId;
use nodeos_types::records::{NODES_PREFIX, NodeRecord, PXE_KEY, PxeSettingsRecord};
use tonic::{Request, Response, Status};

use crate::error::meta_status;
use crate::proxy::{hop_timeout, is_proxied, mark};

/// How long a node may take to report its PXE server.
const STATUS_WORK: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct PxeApi {
    meta: MetaHandle,
    agent: PxeHandle,
    dialer: crate::proxy::Dialer,
}

impl PxeApi {
    /// Hands requests over to other nodes through `dialer` (mutual TLS on a secured pool).
    pub fn with_dialer(mut self, dialer: crate::proxy::Dialer) -> Self {
        self.dialer = dialer;
        self
    }

    pub fn new(meta: MetaHandle, agent: PxeHandle) -> Self {
        PxeApi { meta, agent, dialer: crate::proxy::Dialer::default() }
    }

    async fn settings(&self) -> Result<PxeSettingsRecord, Status> {
        let (kv, _) = self.meta.get(PXE_KEY, Consistency::Local).await.map_err(meta_status)?;
        match kv {
            None => Ok(PxeSettingsRecord::default()),
            Some(kv) => serde_json::from_slice(&kv.value)
                .map_err(|e| Status::internal(format!("the pxe record does not decode: {e}"))),
        }
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, Status> {
        let (kvs, _) = self.meta.range(NODES_PREFIX, 0, Consistency::Local).await.map_err(meta_status)?;
        Ok(kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect())
    }

    async fn local(&self) -> Result<pb::PxeNodeStatus, Status> {
        let me = self.meta.node_id();
        let s = self.agent.status().await.ok_or_else(|| Status::unavailable("the PXE agent has stopped"))?;
        Ok(node_status_to_pb(me, s))
    }

    async fn remote(&self, node: &NodeRecord, timeout: Duration) -> pb::PxeNodeStatus {
        let unreachable = |detail: String| pb::PxeNodeStatus {
            node_id: node.id.to_string(),
            state: "unreachable".into(),
            detail,
            ..Default::default()
        };
        let ch = match self.dialer.channel(node.id, &node.address, timeout).await {
            Ok(ch) => ch,
            Err(e) => return unreachable(e.message().to_owned()),
        };
        let req = pb::PxeStatusRequest { node_id: node.id.to_string() };
        match PxeServiceClient::new(ch).status(mark(req)).await {
            Ok(r) => {
                r.into_inner().nodes.into_iter().next().unwrap_or_else(|| unreachable("empty answer".into()))
            }
            Err(e) => unreachable(format!("{}: {}", node.address, e.message())),
        }
    }
}

fn node_status_to_pb(id: NodeId, s: NodePxeStatus) -> pb::PxeNodeStatus {
    pb::PxeNodeStatus {
        node_id: id.to_string(),
        state: s.state.name().into(),
        detail: s.state.detail().into(),
        interface: s.interface,
        address: s.address,
        image_hash: s.image_hash,
        counters: Some(pb::PxeCounters {
            offers: s.stats.offers,
            acks: s.stats.acks,
            ignored: s.stats.ignored,
            malformed: s.stats.malformed,
            unsupported_clients: s.stats.unsupported_clients,
            tftp_transfers: s.stats.tftp_transfers,
            tftp_errors: s.stats.tftp_errors,
            http_requests: s.stats.http_requests,
            http_errors: s.stats.http_errors,
            bytes_sent: s.stats.bytes_sent,
        }),
    }
}

fn settings_to_pb(s: PxeSettingsRecord) -> pb::PxeSettings {
    // The port served, so a client never has to know the default.
    let http_port = u32::from(s.http_port());
    pb::PxeSettings {
        http_port,
        enabled: s.enabled,
        interface: s.interface,
        node_ids: s.nodes.iter().map(ToString::to_string).collect(),
        append: s.append,
    }
}

fn settings_from_pb(p: pb::PxeSettings) -> Result<PxeSettingsRecord, Status> {
    let mut nodes = Vec::new();
    for (i, n) in p.node_ids.iter().enumerate() {
        nodes.push(
            n.parse::<NodeId>().map_err(|e| Status::invalid_argument(format!("node_ids[{i}] {n:?}: {e}")))?,
        );
    }
    nodes.sort();
    nodes.dedup();
    let http_port = u16::try_from(p.http_port).map_err(|_| {
        Status::invalid_argument(format!("http_port {} is not a port (0..=65535)", p.http_port))
    })?;
    let s = PxeSettingsRecord {
        enabled: p.enabled,
        interface: p.interface.trim().to_owned(),
        nodes,
        append: p.append.trim().to_owned(),
        http_port,
    };
    s.validate().map_err(Status::invalid_argument)?;
    Ok(s)
}

#[tonic::async_trait]
impl PxeService for PxeApi {
    async fn configure(&self, req: Request<pb::PxeSettings>) -> Result<Response<pb::PxeSettings>, Status> {
        let s = settings_from_pb(req.into_inner())?;
        let members = self.nodes().await?;
        if let Some(n) = s.nodes.iter().find(|n| !members.iter().any(|m| m.id == **n)) {
            return Err(Status::not_found(format!("node_ids: node {n} is not a pool member")));
        }
        let value = serde_json::to_vec(&s).map_err(|e| Status::internal(e.to_string()))?;
        self.meta.write(Command::put(PXE_KEY.to_owned(), value)).await.map_err(meta_status)?;
        Ok(Response::new(settings_to_pb(s)))
    }

    async fn status(&self, req: Request<pb::PxeStatusRequest>) -> Result<Response<pb::PxeStatus>, Status> {
        let me = self.meta.node_id();
        let handed_over = is_proxied(&req);
        let timeout = hop_timeout(&req, STATUS_WORK);
        let want = match req.get_ref().node_id.as_str() {
            "" => None,
            s => Some(
                s.parse::<NodeId>().map_err(|e| Status::invalid_argument(format!("node_id {s:?}: {e}")))?,
            ),
        };
        let settings = Some(settings_to_pb(self.settings().await?));
        if want == Some(me) || handed_over {
            if want.is_some_and(|w| w != me) {
                return Err(Status::failed_precondition(format!(
                    "this is node {me}, not the node asked for"
                )));
            }
            return Ok(Response::new(pb::PxeStatus { settings, nodes: vec![self.local().await?] }));
        }
        let mut members = self.nodes().await?;
        if let Some(w) = want {
            members.retain(|m| m.id == w);
            if members.is_empty() {
                return Err(Status::not_found(format!("no node {w} in this pool")));
            }
        }
        members.sort_by_key(|m| m.id);
        let nodes = join_all(members.iter().map(|m| async move {
            if m.id == me {
                self.local().await.unwrap_or_else(|e| pb::PxeNodeStatus {
                    node_id: me.to_string(),
                    state: "failed".into(),
                    detail: e.message().to_owned(),
                    ..Default::default()
                })
            } else {
                self.remote(m, timeout).await
            }
        }))
        .await;
        Ok(Response::new(pb::PxeStatus { settings, nodes }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_and_normalised() {
        let s = settings_from_pb(pb::PxeSettings {
            enabled: true,
            interface: " eth0 ".into(),
            node_ids: vec!["0000000000000002".into(), "0000000000000001".into(), "0000000000000002".into()],
            append: "nodeos.dns=10.0.0.53".into(),
            http_port: 8080,
        })
        .unwrap();
        assert_eq!(s.interface, "eth0");
        assert_eq!(s.nodes, vec![NodeId(1), NodeId(2)]);
        assert_eq!(settings_to_pb(s.clone()).node_ids, vec!["0000000000000001", "0000000000000002"]);
        for (bad, field) in [
            (pb::PxeSettings { node_ids: vec!["xyz".into()], ..Default::default() }, "node_ids[0]"),
            (pb::PxeSettings { http_port: 70_000, ..Default::default() }, "http_port 70000"),
            (pb::PxeSettings { append: "nodeos.key=x".into(), ..Default::default() }, "append word"),
        ] {
            let e = settings_from_pb(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(field), "{}", e.message());
        }
    }
}
