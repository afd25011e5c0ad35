//! `MetadataService`: the operator's own key space.
//!
//! Client keys are relative: key `a/b` is stored as `custom/a/b`, so no client
//! can read or change the pool's own records through this service.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use nodeos_meta::command::{self, MAX_VALUE_LEN};
use nodeos_meta::{Command, Consistency, KeyValue, MetaHandle};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::metadata_service_server::MetadataService;
use nodeos_types::records::CUSTOM_PREFIX;
use tonic::{Request, Response, Status};

use crate::error::{meta_status, watch_status};

/// Most keys one List returns.
pub const MAX_LIST: usize = 10_000;

#[derive(Debug, Clone)]
pub struct MetadataApi {
    meta: MetaHandle,
}

impl MetadataApi {
    pub fn new(meta: MetaHandle) -> Self {
        MetadataApi { meta }
    }
}

fn full_key(key: &str) -> Result<String, Status> {
    let full = format!("{CUSTOM_PREFIX}{key}");
    if key.is_empty() {
        return Err(Status::invalid_argument("key must not be empty"));
    }
    command::validate_key(&full).map_err(|e| Status::invalid_argument(format!("key: {e}")))?;
    Ok(full)
}

fn full_prefix(prefix: &str) -> Result<String, Status> {
    let full = format!("{CUSTOM_PREFIX}{prefix}");
    if !prefix.is_empty() {
        command::validate_key(&full).map_err(|e| Status::invalid_argument(format!("prefix: {e}")))?;
    }
    Ok(full)
}

fn to_pb(kv: KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: kv.key.strip_prefix(CUSTOM_PREFIX).unwrap_or(&kv.key).to_owned(),
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::MetadataEvent, Status>> + Send>>;

#[tonic::async_trait]
impl MetadataService for MetadataApi {
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let r = req.into_inner();
        let key = full_key(&r.key)?;
        if r.value.len() > MAX_VALUE_LEN {
            return Err(Status::invalid_argument(format!(
                "value is {} bytes; the limit is {MAX_VALUE_LEN}",
                r.value.len()
            )));
        }
        let cmd = match r.expect_mod_revision {
            Some(rev) => Command::put_if(key, r.value, rev),
            None => Command::put(key, r.value),
        };
        let resp = self.meta.write(cmd).await.map_err(meta_status)?;
        Ok(Response::new(pb::PutResponse {
            succeeded: resp.succeeded,
            revision: resp.revision,
            current: if resp.succeeded {
                None
            } else {
                resp.compared.into_iter().next().flatten().map(to_pb)
            },
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let r = req.into_inner();
        let key = full_key(&r.key)?;
        let c = if r.stale_ok { Consistency::Local } else { Consistency::Linearizable };
        let (kv, revision) = self.meta.get(&key, c).await.map_err(meta_status)?;
        Ok(Response::new(pb::GetResponse { kv: kv.map(to_pb), revision }))
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let r = req.into_inner();
        let prefix = full_prefix(&r.prefix)?;
        let limit = match r.limit as usize {
            0 => MAX_LIST,
            n if n > MAX_LIST => {
                return Err(Status::invalid_argument(format!("limit {n} is above the maximum {MAX_LIST}")));
            }
            n => n,
        };
        let (kvs, revision) =
            self.meta.range(&prefix, limit, Consistency::Linearizable).await.map_err(meta_status)?;
        Ok(Response::new(pb::ListResponse { kvs: kvs.into_iter().map(to_pb).collect(), revision }))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = req.into_inner();
        let key = full_key(&r.key)?;
        let cmd = match r.expect_mod_revision {
            Some(rev) => Command::delete_if(key, rev),
            None => Command::delete(key),
        };
        let resp = self.meta.write(cmd).await.map_err(meta_status)?;
        let existed = resp.prev.first().is_some_and(|p| p.is_some());
        Ok(Response::new(pb::DeleteResponse { succeeded: resp.succeeded, existed, revision: resp.revision }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<pb::MetadataWatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = req.into_inner();
        let prefix = full_prefix(&r.prefix)?;
        let s = self.meta.watch(r.start_revision, prefix).map(|ev| match ev {
            Ok(e) => Ok(pb::MetadataEvent {
                revision: e.revision,
                deleted: e.kind == nodeos_meta::EventKind::Delete,
                kv: Some(to_pb(e.kv)),
            }),
            Err(w) => Err(watch_status(&w)),
        });
        Ok(Response::new(Box::pin(s)))
    }
}
