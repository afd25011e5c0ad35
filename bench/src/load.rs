//! The load generator shared by every system under test.
//!
//! A system provides a [`Connector`] (one call = one new client connection) and
//! its connections implement [`PutConn`]; everything else (tasks, keys, values,
//! timing, statistics) is this module's and therefore identical for all systems.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rand::Rng;
use tokio::time::Instant;

/// Size of every written value.
pub const VALUE_LEN: usize = 256;

/// Longest a single put may take during a load phase before it counts as an error.
const PUT_TIMEOUT: Duration = Duration::from_secs(5);

/// One client connection able to do a replicated, durable put.
pub trait PutConn: Clone + Send + Sync + 'static {
    /// Writes `value` at `key`; Ok only once the write is committed.
    fn put(&self, key: String, value: Vec<u8>) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Opens client connections to one server address (`127.0.0.1:port`).
pub trait Connector: Clone + Send + Sync + 'static {
    type Conn: PutConn;
    fn connect(&self, addr: &str) -> impl Future<Output = anyhow::Result<Self::Conn>> + Send;
}

/// Shape of one load phase.
#[derive(Debug, Clone)]
pub struct Phase {
    /// Name used in keys, e.g. `c64`.
    pub name: String,
    /// Concurrent clients, each with one request in flight.
    pub clients: usize,
    /// Client connections the clients are spread over (round robin).
    pub connections: usize,
    pub warmup: Duration,
    pub measure: Duration,
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    pub ops: usize,
    pub errors: usize,
    pub writes_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// A random value of [`VALUE_LEN`] bytes.
pub fn value() -> Vec<u8> {
    let mut v = vec![0u8; VALUE_LEN];
    rand::rng().fill(&mut v[..]);
    v
}

/// The `q` quantile (0..=1) of sorted samples, nearest rank.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct TaskOut {
    latencies: Vec<Duration>,
    errors: usize,
    last_error: Option<String>,
}

/// Runs `phase` against `addr`: `phase.clients` tasks over `phase.connections`
/// connections, each putting distinct keys back to back. Requests started
/// during the warmup are not counted; the measurement window runs from the end
/// of the warmup until the last counted request has completed.
pub async fn run_phase<C: Connector>(
    connector: &C,
    addr: &str,
    phase: &Phase,
) -> anyhow::Result<PhaseResult> {
    let mut conns = Vec::with_capacity(phase.connections);
    for _ in 0..phase.connections.max(1) {
        conns.push(connector.connect(addr).await.with_context(|| format!("connecting to {addr}"))?);
    }
    let value = Arc::new(value());
    let start = Instant::now();
    let warm_end = start + phase.warmup;
    let end = warm_end + phase.measure;
    let mut tasks = Vec::with_capacity(phase.clients);
    for i in 0..phase.clients {
        let conn = conns[i % conns.len()].clone();
        let value = value.clone();
        let prefix = format!("bench/{}/{i}/", phase.name);
        tasks.push(tokio::spawn(async move {
            let mut out = TaskOut { latencies: Vec::with_capacity(8192), errors: 0, last_error: None };
            let mut seq: u64 = 0;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                seq += 1;
                let key = format!("{prefix}{seq}");
                let r = tokio::time::timeout(PUT_TIMEOUT, conn.put(key, value.to_vec())).await;
                let lat = t0.elapsed();
                let ok = match r {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        out.last_error = Some(format!("{e:#}"));
                        false
                    }
                    Err(_) => {
                        out.last_error = Some(format!("put timed out after {PUT_TIMEOUT:?}"));
                        false
                    }
                };
                if t0 < warm_end {
                    continue;
                }
                if ok {
                    out.latencies.push(lat);
                } else {
                    out.errors += 1;
                    // Do not spin on a failing server.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            out
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut last_error = None;
    for t in tasks {
        let out = t.await.context("a load task panicked")?;
        latencies.extend(out.latencies);
        errors += out.errors;
        last_error = out.last_error.or(last_error);
    }
    let window = Instant::now().saturating_duration_since(warm_end);
    if latencies.is_empty() {
        bail!("no write succeeded in phase {} ({errors} errors; last: {last_error:?})", phase.name);
    }
    if errors > 0 {
        eprintln!(
            "warning: {errors} failed puts in phase {} against {addr}; last error: {}",
            phase.name,
            last_error.unwrap_or_default()
        );
    }
    latencies.sort_unstable();
    Ok(PhaseResult {
        ops: latencies.len(),
        errors,
        writes_per_s: latencies.len() as f64 / window.as_secs_f64(),
        p50_ms: ms(quantile(&latencies, 0.50)),
        p99_ms: ms(quantile(&latencies, 0.99)),
        max_ms: ms(latencies[latencies.len() - 1]),
    })
}

/// Time from `spawned` until the first put on any of `addrs` commits.
///
/// One probe per address runs concurrently: wait for the port to accept TCP,
/// connect, then retry puts (each bounded by 2 s, 20 ms apart, reconnecting
/// after a failure) until one succeeds. The first success anywhere ends it.
pub async fn first_commit<C: Connector>(
    connector: &C,
    addrs: &[String],
    spawned: Instant,
    within: Duration,
) -> anyhow::Result<Duration> {
    let mut probes = tokio::task::JoinSet::new();
    let value = value();
    for (i, addr) in addrs.iter().enumerate() {
        let connector = connector.clone();
        let value = value.clone();
        let addr = addr.clone();
        probes.spawn(async move {
            let _ = crate::proc::wait_tcp(&addr, within).await;
            let mut conn = None;
            for attempt in 1u64.. {
                if conn.is_none() {
                    conn = connector.connect(&addr).await.ok();
                }
                if let Some(c) = &conn {
                    let key = format!("bench/formation/{i}/{attempt}");
                    match tokio::time::timeout(Duration::from_secs(2), c.put(key, value.clone())).await {
                        Ok(Ok(())) => break,
                        _ => conn = None,
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Instant::now()
        });
    }
    // Dropping the JoinSet on return aborts the probes still running.
    match tokio::time::timeout_at(spawned + within, probes.join_next()).await {
        Ok(Some(Ok(at))) => Ok(at.saturating_duration_since(spawned)),
        Ok(Some(Err(e))) => bail!("a formation probe failed: {e}"),
        Ok(None) => bail!("no address to probe"),
        Err(_) => bail!("no write committed within {within:?} of process start"),
    }
}
