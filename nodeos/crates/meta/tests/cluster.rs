//! Multi-node behaviour of the metadata store: in-process clusters over the
//! in-memory network in `common`, with real sled stores.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Cluster, fast_config};
use nodeos_meta::{Command, KeyValue};
use nodeos_types::NodeId;
use openraft::{ServerState, SnapshotPolicy};

const T: Duration = Duration::from_secs(10);

fn put(key: impl Into<String>, value: &str) -> Command {
    Command::put(key, value.as_bytes().to_vec())
}

fn value(kv: Option<KeyValue>) -> Option<String> {
    kv.map(|kv| String::from_utf8(kv.value).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_one_leader_and_replicate_writes() {
    let cluster = Cluster::new(3, fast_config()).await;
    let all = cluster.ids();
    let leader = cluster.wait_leader(&all, T).await;
    let leaders = all
        .iter()
        .filter(|id| cluster.node(**id).raft.metrics().borrow().state == ServerState::Leader)
        .count();
    assert_eq!(leaders, 1);

    for i in 1..=20u64 {
        let resp = cluster.write(&all, put(format!("k/{i:02}"), &i.to_string())).await;
        assert!(resp.succeeded);
        assert_eq!(resp.revision, i);
    }
    let revision = cluster.wait_converged(&all, T).await;
    assert_eq!(revision, 20);
    for id in &all {
        let kvs = cluster.node(*id).sm.range("k/", 0).unwrap();
        assert_eq!(kvs.len(), 20, "node {id}");
    }

    // Same again through a lossy, slow network: every write is acknowledged and
    // every node ends with the same data.
    cluster.router.set_drop_rate(0.1);
    cluster.router.set_max_delay(Duration::from_millis(5));
    for i in 1..=20u64 {
        let resp = cluster.write(&all, put(format!("lossy/{i:02}"), "v")).await;
        assert!(resp.succeeded);
    }
    cluster.router.set_drop_rate(0.0);
    cluster.router.set_max_delay(Duration::ZERO);
    cluster.wait_converged(&all, T).await;
    assert_eq!(cluster.node(leader).sm.range("lossy/", 0).unwrap().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_is_replaced_and_converges_after_healing() {
    let cluster = Cluster::new(3, fast_config()).await;
    let all = cluster.ids();
    let old = cluster.wait_leader(&all, T).await;
    let mut acked = Vec::new();
    for i in 0..10 {
        let key = format!("before/{i}");
        cluster.write(&all, put(key.clone(), "v")).await;
        acked.push(key);
    }

    cluster.router.isolate(old);
    let rest: Vec<NodeId> = all.iter().copied().filter(|id| *id != old).collect();
    let new = cluster.wait_leader(&rest, T).await;
    assert_ne!(new, old);

    // The old leader cannot get anything acknowledged on its own.
    let stale = tokio::time::timeout(
        Duration::from_millis(500),
        cluster.node(old).raft.client_write(put("minority", "lost")),
    )
    .await;
    assert!(!matches!(stale, Ok(Ok(_))), "isolated leader acknowledged a write");

    // Every write acknowledged before is readable on the new leader.
    cluster.node(new).raft.ensure_linearizable().await.expect("new leader confirms leadership");
    for key in &acked {
        assert!(cluster.node(new).sm.get(key).unwrap().is_some(), "{key} lost on {new}");
    }
    for i in 0..10 {
        let key = format!("after/{i}");
        assert!(cluster.write(&rest, put(key.clone(), "v")).await.succeeded);
        acked.push(key);
    }

    cluster.router.heal(old);
    cluster.wait_converged(&all, T).await;
    for id in &all {
        let sm = &cluster.node(*id).sm;
        for key in &acked {
            assert!(sm.get(key).unwrap().is_some(), "{key} missing on {id}");
        }
        assert_eq!(sm.get("minority").unwrap(), None, "minority write applied on {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_down_while_the_log_was_purged_catches_up_by_snapshot() {
    let mut config = fast_config();
    config.snapshot_policy = SnapshotPolicy::LogsSinceLast(20);
    config.max_in_snapshot_log_to_keep = 0;
    config.purge_batch_size = 1;
    let mut cluster = Cluster::new(3, config).await;
    let all = cluster.ids();
    let leader = cluster.wait_leader(&all, T).await;
    for i in 0..5 {
        cluster.write(&all, put(format!("early/{i}"), "v")).await;
    }
    cluster.wait_converged(&all, T).await;

    let down = *all.iter().find(|id| **id != leader).unwrap();
    let down_applied = cluster.node(down).sm.last_applied().unwrap().index;
    let down_revision = cluster.node(down).sm.revision();
    cluster.stop(down).await;
    let up: Vec<NodeId> = all.iter().copied().filter(|id| *id != down).collect();

    for i in 0..60 {
        cluster.write(&up, put(format!("late/{i:02}"), &i.to_string())).await;
    }
    cluster.write(&up, Command::delete("early/0")).await;
    let leader = cluster.wait_leader(&up, T).await;
    cluster
        .node(leader)
        .raft
        .wait(Some(T))
        .metrics(
            |m| m.purged.as_ref().is_some_and(|p| p.index > down_applied + 20),
            "leader purged past the stopped node's log",
        )
        .await
        .expect("log purged");

    cluster.start(down).await;
    cluster.wait_converged(&all, T).await;
    let node = cluster.node(down);
    let snapshot = node.raft.metrics().borrow().snapshot;
    assert!(snapshot.is_some_and(|s| s.index > down_applied), "caught up without a snapshot: {snapshot:?}");
    // Installing a snapshot restarts the event history at its revision.
    assert!(node.sm.compacted_revision() > down_revision);
    assert_eq!(node.sm.get("early/0").unwrap(), None);
    assert_eq!(value(node.sm.get("late/59").unwrap()).as_deref(), Some("59"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_rejoins_with_its_data() {
    let mut cluster = Cluster::new(3, fast_config()).await;
    let all = cluster.ids();
    let leader = cluster.wait_leader(&all, T).await;
    for i in 0..10 {
        cluster.write(&all, put(format!("a/{i}"), "v")).await;
    }
    cluster.wait_converged(&all, T).await;

    let restarted = *all.iter().find(|id| **id != leader).unwrap();
    let applied = cluster.node(restarted).sm.last_applied();
    let data = cluster.node(restarted).sm.range("", 0).unwrap();
    cluster.stop(restarted).await;
    let up: Vec<NodeId> = all.iter().copied().filter(|id| *id != restarted).collect();
    for i in 0..10 {
        cluster.write(&up, put(format!("b/{i}"), "v")).await;
    }

    // Back from its own directory, still cut off: it has what it had.
    cluster.router.isolate(restarted);
    cluster.start(restarted).await;
    let sm = &cluster.node(restarted).sm;
    assert!(sm.last_applied() >= applied);
    assert_eq!(sm.range("a/", 0).unwrap(), data);
    assert!(sm.range("b/", 0).unwrap().is_empty());

    cluster.router.heal(restarted);
    cluster.wait_converged(&all, T).await;
    assert_eq!(cluster.node(restarted).sm.range("b/", 0).unwrap().len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compare_and_swap_has_exactly_one_winner() {
    let cluster = Cluster::new(3, fast_config()).await;
    let all = cluster.ids();
    let created = cluster.write(&all, put("lock", "nobody")).await;
    let leader = cluster.wait_leader(&all, T).await;
    let raft = cluster.node(leader).raft.clone();

    const WRITERS: usize = 8;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|i| {
            let raft = raft.clone();
            tokio::spawn(async move {
                let cmd = Command::put_if("lock", format!("writer {i}").into_bytes(), created.revision);
                (i, raft.client_write(cmd).await.expect("write committed").data)
            })
        })
        .collect();
    let mut winners = BTreeSet::new();
    for task in tasks {
        let (i, resp) = task.await.unwrap();
        if resp.succeeded {
            winners.insert(i);
        } else {
            // The loser saw the winner's value in its compare.
            let seen = resp.compared[0].as_ref().expect("lock exists");
            assert!(seen.mod_revision > created.revision);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let winner = winners.into_iter().next().unwrap();
    cluster.wait_converged(&all, T).await;
    for id in &all {
        let lock = cluster.node(*id).sm.get("lock").unwrap().unwrap();
        assert_eq!(String::from_utf8(lock.value).unwrap(), format!("writer {winner}"));
        assert_eq!(lock.version, 2);
        assert_eq!(lock.mod_revision, created.revision + 1);
    }
}
