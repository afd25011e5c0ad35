//! Handing a request to another node's public API, once.
//!
//! A node answers for the whole pool; when the answer belongs to another node
//! (the leader's view of member health, a VM that lives elsewhere) it calls that
//! node with [`mark`]ed requests, and a node receiving a marked request answers
//! from its own state, so a request is handed over at most once.

use std::time::Duration;

use tonic::Request;
use tonic::transport::{Channel, Endpoint};

/// Header of a request already handed over once.
const PROXIED: &str = "x-nodeos-proxied";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether `req` was handed over by another node.
pub fn is_proxied<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(PROXIED)
}

/// Wraps `msg` in a request marked as handed over.
pub fn mark<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(PROXIED, tonic::metadata::MetadataValue::from_static("1"));
    r
}

/// Connects to another node's API at `addr`, with `timeout` per request.
pub async fn connect(addr: &str, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(timeout)
        .connect()
        .await
}
