//! Answering here or handing a request to the node that owns the answer, once.
//!
//! A node answers for the whole pool; when the answer belongs to another node
//! (a VM that lives elsewhere, a port's live counters, a node's power, the
//! leader's view of member health) it calls that node with a [`mark`]ed
//! request, and a node receiving a marked request answers from its own state,
//! so a request is handed over at most once. [`route`] decides, sans-IO.
//!
//! One timeout policy for every hand-over ([`hop_timeout`]): the caller's own
//! deadline when it sent one (`grpc-timeout`), else the time the owner may
//! legitimately take for the work (the caller says how long, e.g. a VM stop's
//! own timeout) plus [`HOP_MARGIN`] for the connection and the round trip.

use std::time::Duration;

use nodeos_types::NodeId;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// Header of a request already handed over once.
pub(crate) const PROXIED: &str = "x-nodeos-proxied";
/// How long connecting to another node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// What a hand-over adds to the owner's own work: connecting and the round trip.
pub const HOP_MARGIN: Duration = Duration::from_secs(3);
/// Longest any hand-over waits, whatever the caller asked.
pub const MAX_HOP: Duration = Duration::from_secs(15 * 60);

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

/// Where a request about something owned by a node is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// This node owns it: answer from local state.
    Here,
    /// Another node owns it: hand the request over, once.
    Forward(NodeId),
    /// Handed over already, yet not ours (the owner moved meanwhile):
    /// answer from what this node knows, or refuse; never hand over again.
    NotHere(NodeId),
}

/// The routing rule: local if `owner` is this node, else handed over unless
/// the request was already handed over once.
pub fn route(owner: NodeId, me: NodeId, proxied: bool) -> Route {
    match (owner == me, proxied) {
        (true, _) => Route::Here,
        (false, false) => Route::Forward(owner),
        (false, true) => Route::NotHere(owner),
    }
}

/// Parses a `grpc-timeout` header value (`<1..8 digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The one timeout policy: how long handing `req` over may take when the
/// owner's own work takes up to `work`. See the module docs.
pub fn hop_timeout<T>(req: &Request<T>, work: Duration) -> Duration {
    let asked = req.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
    asked.map_or_else(|| hop_budget(work), |t| t.min(MAX_HOP))
}

/// The policy for a hand-over no caller's deadline bounds: `work` plus [`HOP_MARGIN`].
pub fn hop_budget(work: Duration) -> Duration {
    work.saturating_add(HOP_MARGIN).min(MAX_HOP)
}

/// How this node dials other nodes' API: mutual TLS with its own
/// credential on a secured pool, plaintext on a loopback one.
#[derive(Debug, Clone, Default)]
pub struct Dialer(Option<nodeos_auth::tls::Connector>);

impl Dialer {
    pub fn tls(connector: nodeos_auth::tls::Connector) -> Self {
        Dialer(Some(connector))
    }

    /// A channel to `node`'s API at `addr` for handed-over requests that may
    /// take up to `timeout` each; an `unavailable` status naming the node when
    /// it does not answer.
    pub async fn channel(&self, node: NodeId, addr: &str, timeout: Duration) -> Result<Channel, Status> {
        let unavailable =
            |why: String| Status::unavailable(format!("node {node} at {addr} does not answer: {why}"));
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| unavailable(causes(&e)))?
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            .timeout(timeout);
        let ch = match &self.0 {
            Some(c) => ep.connect_with_connector(c.clone()).await,
            None => ep.connect().await,
        };
        ch.map_err(|e| unavailable(causes(&e)))
    }
}

/// An error and its causes on one line, each distinct message once (tonic
/// repeats its causes in its messages).
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        let m = c.to_string();
        if !parts.contains(&m) {
            parts.push(m);
        }
        cur = c.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_handed_over_at_most_once() {
        let (me, other) = (NodeId(1), NodeId(2));
        assert_eq!(route(me, me, false), Route::Here);
        assert_eq!(route(me, me, true), Route::Here);
        assert_eq!(route(other, me, false), Route::Forward(other));
        assert_eq!(route(other, me, true), Route::NotHere(other));
        assert!(is_proxied(&mark(())));
        assert!(!is_proxied(&Request::new(())));
    }

    #[test]
    fn grpc_timeouts_parse_strictly() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "5", "5s", "-5S", "123456789S", "1.5S", "5SS"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_callers_deadline_wins_else_the_work_plus_the_margin() {
        let work = Duration::from_secs(30);
        assert_eq!(hop_timeout(&Request::new(()), work), work + HOP_MARGIN);
        let mut r = Request::new(());
        r.metadata_mut().insert("grpc-timeout", tonic::metadata::MetadataValue::from_static("7S"));
        assert_eq!(hop_timeout(&r, work), Duration::from_secs(7));
        r.metadata_mut().insert("grpc-timeout", tonic::metadata::MetadataValue::from_static("9H"));
        assert_eq!(hop_timeout(&r, work), MAX_HOP);
        r.metadata_mut().insert("grpc-timeout", tonic::metadata::MetadataValue::from_static("junk"));
        assert_eq!(hop_timeout(&r, work), work + HOP_MARGIN);
    }
}
