//! Diagnostic: drive an already running node or member with the bench-meta load
//! generator and print a latency histogram.
//!
//! `cargo run --release -p nodeos-bench --example put_load -- nodeos|etcd 127.0.0.1:PORT CLIENTS SECS`

use std::time::Duration;

use anyhow::{Context, bail};
use nodeos_bench::etcd::EtcdConnector;
use nodeos_bench::load::{Connector, PutConn, value};
use nodeos_bench::nodeos::NodeosConnector;
use tokio::time::Instant;

async fn drive<C: Connector>(c: C, addr: &str, clients: usize, secs: u64) -> anyhow::Result<Vec<Duration>> {
    let conns = {
        let mut v = Vec::new();
        for _ in 0..clients.clamp(1, 4) {
            v.push(c.connect(addr).await?);
        }
        v
    };
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let conn = conns[i % conns.len()].clone();
        tasks.push(tokio::spawn(async move {
            let val = value();
            let mut lats = Vec::new();
            let mut seq = 0u64;
            while Instant::now() < end {
                seq += 1;
                let t0 = Instant::now();
                conn.put(format!("diag/{i}/{seq}"), val.clone()).await?;
                lats.push(t0.elapsed());
            }
            anyhow::Ok(lats)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.context("task panicked")??);
    }
    Ok(all)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, system, addr, clients, secs] = &args[..] else {
        bail!("usage: put_load nodeos|etcd ADDR CLIENTS SECS");
    };
    let clients: usize = clients.parse()?;
    let secs: u64 = secs.parse()?;
    let mut lats = match system.as_str() {
        "nodeos" => drive(NodeosConnector, addr, clients, secs).await?,
        "etcd" => drive(EtcdConnector, addr, clients, secs).await?,
        other => bail!("unknown system {other}"),
    };
    lats.sort_unstable();
    let n = lats.len();
    let mean: Duration = lats.iter().sum::<Duration>() / n.max(1) as u32;
    println!("{n} puts, {:.0}/s, mean {mean:?}", n as f64 / secs as f64);
    let bounds_ms =
        [0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, f64::INFINITY];
    let mut lo = 0.0;
    for b in bounds_ms {
        let c = lats.iter().filter(|d| (lo..b).contains(&(d.as_secs_f64() * 1e3))).count();
        println!("[{lo:>5} ms, {b:>5} ms) {c:>7} {:>5.1}%", 100.0 * c as f64 / n.max(1) as f64);
        lo = b;
    }
    Ok(())
}
