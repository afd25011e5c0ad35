//! The in-process pool other crates test against: its handles behave as a
//! node's do (forwarding, linearizable reads, watches) and its faults bite.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use nodeos_meta::testing::TestPool;
use nodeos_meta::{Command, Consistency};
use nodeos_types::NodeId;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_pool_writes_reads_and_watches() {
    let pool = TestPool::single().await.unwrap();
    let meta = pool.first();
    assert!(meta.is_leader());
    let mut events = Box::pin(meta.watch(0, "k/".into()));
    let r = meta.write(Command::put("k/a", b"1".to_vec())).await.unwrap();
    assert!(r.succeeded);
    let (kv, _) = meta.get("k/a", Consistency::Linearizable).await.unwrap();
    assert_eq!(kv.unwrap().value, b"1");
    let ev = tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(ev.kv.key, "k/a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_forward_writes_and_read_linearizably() {
    let pool = TestPool::new(3).await.unwrap();
    let leader = pool.leader().await.unwrap().node_id();
    let follower = pool.ids().into_iter().find(|id| *id != leader).unwrap();
    let f = pool.handle(follower);
    assert!(!f.is_leader());
    assert!(f.write(Command::put("k/x", b"from a follower".to_vec())).await.unwrap().succeeded);
    // Every node reads it linearizably, at once.
    for id in pool.ids() {
        let (kv, _) = pool.handle(id).get("k/x", Consistency::Linearizable).await.unwrap();
        assert_eq!(kv.unwrap().value, b"from a follower", "node {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_is_replaced_and_cannot_write() {
    let pool = TestPool::new(3).await.unwrap();
    let old = pool.leader().await.unwrap().node_id();
    pool.router().isolate(old);
    let rest: Vec<NodeId> = pool.ids().into_iter().filter(|id| *id != old).collect();
    let new = pool.wait_leader(&rest).await.unwrap();
    assert_ne!(new, old);
    assert!(pool.handle(new).write(Command::put("k/after", b"1".to_vec())).await.unwrap().succeeded);
    // The cut-off node cannot commit: its write fails (it never claims success).
    let cut = tokio::time::timeout(
        Duration::from_secs(3),
        pool.handle(old).write(Command::put("k/lost", b"1".to_vec())),
    )
    .await;
    assert!(!matches!(cut, Ok(Ok(_))), "an isolated node must not commit a write: {cut:?}");
    pool.router().heal(old);
    let (kv, _) = pool.handle(old).get("k/after", Consistency::Linearizable).await.unwrap();
    assert!(kv.is_some());
}
