//! The leader's controller against a real metadata store and in-memory
//! replicas: copies grow to the target as soon as nodes exist, lost copies
//! are rebuilt, new nodes take their share, deleted volumes are reclaimed,
//! and no acknowledged block is lost on the way.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Bed, GIB, block, check_blocks, check_copy, copies_are};
use nodeos_block::device::BlockDevice;
use nodeos_types::NodeId;
use nodeos_volumes::{Takeover, WriterSlot};

const HOUR: Duration = Duration::from_secs(3600);

/// Writes one recognisable block at each offset and gives the slot back.
async fn write_blocks(bed: &Bed, name: &str, offsets: &[u64]) {
    let (client, slot) = WriterSlot::open(&bed.volumes, name, "test", Takeover::Refuse).await.unwrap();
    for &at in offsets {
        client.write(at, block(at), false).await.unwrap();
    }
    client.flush().await.unwrap();
    drop(client);
    slot.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_made_on_a_small_pool_grows_to_its_target_when_nodes_join() {
    let mut bed = Bed::new(2).await;
    let v = bed.create("small", 128 << 20).await;
    assert_eq!(v.replicas, 3, "the record keeps the target, not what the pool allowed");
    assert!(copies_are(&v, 2), "{:?}", v.placement);
    assert_eq!(v.warning, "only 2 of 3 copies: the pool has 2 node(s)");
    let offsets = [0, 4096 * 100, (64 << 20) + 4096];
    write_blocks(&bed, "small", &offsets).await;

    // A pass with nothing to gain changes nothing and keeps the warning.
    let mut ctl = bed.controller(HOUR);
    assert_eq!(ctl.pass().await.unwrap().added, 0);
    assert_eq!(bed.record("small").await.warning, "only 2 of 3 copies: the pool has 2 node(s)");

    bed.add_node(NodeId(3)).await;
    let report = ctl.pass().await.unwrap();
    assert_eq!(report.added, 2, "{report:?}");
    let v = bed.record("small").await;
    assert!(copies_are(&v, 3), "{:?}", v.placement);
    assert_eq!(v.warning, "", "fully protected again");
    assert!(!bed.held(NodeId(3)).is_empty(), "the new copies were filled");

    // The new copies alone hold the data.
    check_copy(&bed, "small", NodeId(3), &offsets).await;
    check_blocks(&bed.volumes, "small", &offsets).await;
    // A second pass has nothing left to do.
    assert_eq!(ctl.pass().await.unwrap().added, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_keeps_writing_while_its_volume_grows() {
    let mut bed = Bed::new(2).await;
    bed.create("busy", 64 << 20).await;
    let (client, slot) = WriterSlot::open(&bed.volumes, "busy", "vm x", Takeover::Refuse).await.unwrap();
    let before: Vec<u64> = (0..32).map(|i| i * 4096).collect();
    for &at in &before {
        client.write(at, block(at), false).await.unwrap();
    }
    bed.add_node(NodeId(3)).await;
    let mut ctl = bed.controller(HOUR);
    assert_eq!(ctl.pass().await.unwrap().added, 1);
    let after: Vec<u64> = (32..64).map(|i| i * 4096).collect();
    for &at in &after {
        client.write(at, block(at), false).await.unwrap();
    }
    client.flush().await.unwrap();
    drop(client);
    slot.release().await.unwrap();
    // The new copy alone has what was written before and after it came.
    let all: Vec<u64> = before.iter().chain(&after).copied().collect();
    check_copy(&bed, "busy", NodeId(3), &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_is_rebuilt_elsewhere_after_the_grace_period_and_not_before() {
    let bed = Bed::new(4).await;
    let v = bed.create("data", 256 << 20).await;
    assert!(copies_are(&v, 3));
    let offsets: Vec<u64> = (0..4).map(|e| e * (64 << 20) + 8192).collect();
    write_blocks(&bed, "data", &offsets).await;
    let victim = v.placement[0][0];
    bed.set_down(victim, true);

    let mut patient = bed.controller(HOUR);
    let report = patient.pass().await.unwrap();
    assert_eq!(report.replaced, 0, "within the grace period nothing moves: {report:?}");
    let v = bed.record("data").await;
    assert!(v.placement.iter().any(|s| s.contains(&victim)));
    assert!(v.warning.contains("degraded"), "{}", v.warning);

    let mut eager = bed.controller(Duration::ZERO);
    let report = eager.pass().await.unwrap();
    assert!(report.replaced > 0, "{report:?}");
    let v = bed.record("data").await;
    assert!(copies_are(&v, 3));
    assert!(v.placement.iter().all(|s| !s.contains(&victim)), "{:?}", v.placement);
    assert_eq!(v.warning, "");
    check_blocks(&bed.volumes, "data", &offsets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_takes_its_share_without_losing_a_block() {
    let mut bed = Bed::new(3).await;
    let v = bed.create("wide", GIB).await;
    assert_eq!(v.placement.len(), 16);
    let offsets: Vec<u64> = (0..16).map(|e| e * (64 << 20) + 4096 * e).collect();
    write_blocks(&bed, "wide", &offsets).await;
    // A volume with a writer is left where it is.
    bed.create("held", 128 << 20).await;
    let (_client, _slot) = WriterSlot::open(&bed.volumes, "held", "vm y", Takeover::Refuse).await.unwrap();
    let held_before = bed.record("held").await.placement;

    bed.add_node(NodeId(4)).await;
    let mut ctl = bed.controller(HOUR);
    let report = ctl.pass().await.unwrap();
    assert!(report.moved >= 11, "{report:?}");
    let v = bed.record("wide").await;
    assert!(copies_are(&v, 3), "no extent keeps a surplus copy: {:?}", v.placement);
    let on4 = v.placement.iter().filter(|s| s.contains(&NodeId(4))).count();
    assert!((11..=13).contains(&on4), "node 4 holds its share: {on4} of 16");
    let loads: BTreeSet<usize> =
        (1..=4).map(|n| v.placement.iter().filter(|s| s.contains(&NodeId(n))).count()).collect();
    assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 2, "{loads:?}");
    assert_eq!(bed.record("held").await.placement, held_before);

    // Whichever node is down, two complete copies of every extent answer.
    for n in 1..=4 {
        bed.set_down(NodeId(n), true);
        check_blocks(&bed.volumes, "wide", &offsets).await;
        bed.set_down(NodeId(n), false);
    }
    // The dropped copies are no longer read: a second pass finds nothing to move.
    assert_eq!(ctl.pass().await.unwrap().moved, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_volume_is_reclaimed_on_every_node_then_forgotten() {
    let bed = Bed::new(3).await;
    let v = bed.create("gone", 64 << 20).await;
    write_blocks(&bed, "gone", &[0, 4096]).await;
    let layer = v.layers[0];
    assert!((1..=3).any(|n| bed.held(NodeId(n)).iter().any(|k| k.layer == layer)));
    bed.volumes.delete("gone", false).await.unwrap();
    let mut ctl = bed.controller(HOUR);
    assert_eq!(ctl.pass().await.unwrap().reclaimed, 1);
    for n in 1..=3 {
        assert!(bed.held(NodeId(n)).iter().all(|k| k.layer != layer), "node {n} still holds the layer");
    }
    assert!(bed.volumes.get("gone").await.is_err());
    assert!(bed.volumes.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_and_its_clone_deleted_together_leave_no_layer_behind() {
    let bed = Bed::new(3).await;
    bed.create("base", 64 << 20).await;
    write_blocks(&bed, "base", &[0]).await;
    bed.volumes.snapshot("base", "s1").await.unwrap();
    bed.volumes.clone_snapshot("base", "s1", "child").await.unwrap();
    write_blocks(&bed, "child", &[4096]).await;
    write_blocks(&bed, "base", &[8192]).await;
    bed.volumes.delete("child", false).await.unwrap();
    bed.volumes.delete_snapshot("base", "s1").await.unwrap();
    bed.volumes.delete("base", false).await.unwrap();
    // Both are reclaimed in one pass; the layer they shared goes with the last.
    let mut ctl = bed.controller(HOUR);
    assert_eq!(ctl.pass().await.unwrap().reclaimed, 2);
    for n in 1..=3 {
        assert!(bed.held(NodeId(n)).is_empty(), "node {n} still holds {:?}", bed.held(NodeId(n)));
    }
}
