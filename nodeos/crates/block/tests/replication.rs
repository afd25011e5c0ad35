//! In-process multi-replica tests: three replicas over in-memory stores,
//! reached through a transport that drops, delays and reorders on demand.
//! Every test checks the block layer's promises through the client API: no
//! acknowledged write is lost, a fenced writer changes nothing, copies
//! converge after faults heal.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nodeos_block::client::{VolumeClient, VolumeLayout};
use nodeos_block::device::{BlockDevice, DeviceError};
use nodeos_block::replica::Replica;
use nodeos_block::store::mem::MemStore;
use nodeos_block::store::{ExtentStore, LayerExtent};
use nodeos_block::transport::{Faults, MemTransport, ReplicaRef, Transport};
use nodeos_block::wire::{Answer, Op};
use nodeos_types::{NodeId, VolumeId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: usize = 4096;
const EXTENT: u64 = 64 * 4096;

struct Pool {
    transport: MemTransport,
    stores: Vec<Arc<MemStore>>,
    nodes: Vec<ReplicaRef>,
}

fn pool(seed: u64) -> Pool {
    let transport = MemTransport::new(seed);
    let mut stores = Vec::new();
    let mut nodes = Vec::new();
    for i in 1..=3u64 {
        let store = Arc::new(MemStore::new());
        transport.add(NodeId(i), Arc::new(Replica::new(store.clone())));
        stores.push(store);
        nodes.push(ReplicaRef { node: NodeId(i), address: format!("mem-{i}") });
    }
    Pool { transport, stores, nodes }
}

fn layout(p: &Pool, extents: usize, generation: u64) -> VolumeLayout {
    VolumeLayout {
        volume: VolumeId(0xabc),
        size: EXTENT * extents as u64,
        extent_size: EXTENT,
        layers: vec![7],
        extents: vec![p.nodes.clone(); extents],
        generation,
    }
}

async fn open(p: &Pool, extents: usize, generation: u64) -> VolumeClient<MemTransport> {
    VolumeClient::open(p.transport.clone(), layout(p, extents, generation), false, None)
        .await
        .expect("open volume")
}

fn pattern(seed: u64, blocks: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..blocks * BS).map(|_| rng.random()).collect()
}

async fn wait_converged(c: &VolumeClient<MemTransport>) {
    for _ in 0..200 {
        if c.stale_copies().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("copies still stale: {:?}", c.stale_copies());
}

/// Every copy of every extent has the same block metas.
async fn assert_copies_identical(p: &Pool, extents: u32) {
    for e in 0..extents {
        let mut digests = Vec::new();
        for r in &p.nodes {
            let key = LayerExtent { layer: 7, index: e };
            match p.transport.call(r, Op::Digest { key, blocks: (EXTENT / 4096) as u32 }).await {
                Ok(Answer::Digest { digest, .. }) => digests.push(digest),
                other => panic!("digest from {}: {other:?}", r.node),
            }
        }
        assert!(digests.windows(2).all(|w| w[0] == w[1]), "extent {e} copies differ");
    }
}

#[tokio::test]
async fn writes_reach_every_copy_and_read_back() {
    let p = pool(1);
    let c = open(&p, 2, 1).await;
    let data = pattern(1, 80); // crosses the extent boundary
    c.write(4096 * 10, data.clone(), false).await.expect("write");
    c.flush().await.expect("flush");
    assert_eq!(c.read(4096 * 10, data.len() as u32).await.expect("read"), data);
    assert_copies_identical(&p, 2).await;
    // Never-written blocks read as zeroes.
    assert_eq!(c.read(0, 4096 * 10).await.expect("read"), vec![0; 4096 * 10]);
}

#[tokio::test]
async fn a_lost_copy_does_not_stop_writes_and_is_repaired_when_it_returns() {
    let p = pool(2);
    let c = open(&p, 1, 1).await;
    c.write(0, pattern(1, 8), false).await.expect("write with all copies");
    p.transport.set_down(NodeId(3), true);
    let newer = pattern(2, 8);
    c.write(0, newer.clone(), false).await.expect("write with one copy down");
    c.flush().await.expect("flush on a quorum");
    assert_eq!(c.stale_copies(), vec![(0, NodeId(3))]);
    p.transport.set_down(NodeId(3), false);
    wait_converged(&c).await;
    assert_copies_identical(&p, 1).await;
    // The repaired copy alone serves the newest data.
    p.transport.set_down(NodeId(1), true);
    p.transport.set_down(NodeId(2), true);
    let reader = VolumeClient::open(p.transport.clone(), layout(&p, 1, 0), true, None).await;
    assert!(reader.is_err(), "one copy of three is not a quorum for a reader either");
    p.transport.set_down(NodeId(1), false);
    let reader = VolumeClient::open(p.transport.clone(), layout(&p, 1, 0), true, Some(NodeId(3)))
        .await
        .expect("reader");
    assert_eq!(reader.read(0, newer.len() as u32).await.expect("read"), newer);
}

#[tokio::test]
async fn writes_fail_without_a_quorum_and_change_nothing_acknowledged() {
    let p = pool(3);
    let c = open(&p, 1, 1).await;
    let good = pattern(5, 4);
    c.write(0, good.clone(), false).await.expect("write");
    p.transport.set_down(NodeId(2), true);
    p.transport.set_down(NodeId(3), true);
    let err = c.write(0, pattern(6, 4), false).await.expect_err("no quorum");
    assert!(matches!(err, DeviceError::Unavailable(_)), "{err:?}");
    p.transport.set_down(NodeId(2), false);
    p.transport.set_down(NodeId(3), false);
    // The unacknowledged write may or may not be visible; the volume must
    // read one of the two versions, never a mix within a block.
    let got = c.read(0, good.len() as u32).await.expect("read");
    for (i, block) in got.chunks(BS).enumerate() {
        let newer = pattern(6, 4);
        assert!(block == &good[i * BS..(i + 1) * BS] || block == &newer[i * BS..(i + 1) * BS]);
    }
}

#[tokio::test]
async fn a_newer_writer_fences_the_old_one() {
    let p = pool(4);
    let old = open(&p, 1, 1).await;
    old.write(0, pattern(1, 1), false).await.expect("old writes");
    let new = open(&p, 1, 2).await;
    let err = old.write(4096, pattern(2, 1), false).await.expect_err("old writer is fenced");
    assert_eq!(err, DeviceError::Fenced { ours: 1, current: 2 });
    // Fenced for good, even for reads and flushes.
    assert!(matches!(old.flush().await, Err(DeviceError::Fenced { .. })));
    new.write(0, pattern(3, 2), false).await.expect("new writes");
    assert_eq!(new.read(0, 2 * 4096).await.expect("read"), pattern(3, 2));
    // An old generation cannot even open.
    let again = VolumeClient::open(p.transport.clone(), layout(&p, 1, 1), false, None).await;
    assert!(matches!(again, Err(DeviceError::Fenced { ours: 1, current: 2 })), "{again:?}");
}

#[tokio::test]
async fn no_acknowledged_write_is_lost_under_drops_delays_and_reordering() {
    let p = pool(5);
    let c = open(&p, 4, 1).await;
    p.transport.set_faults(Faults {
        drop_request_pct: 10,
        drop_reply_pct: 10,
        max_delay: Duration::from_millis(3),
        ..Faults::default()
    });
    let mut rng = StdRng::seed_from_u64(99);
    let blocks = (EXTENT * 4 / 4096) as usize;
    let mut model: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut acked = 0;
    for i in 0..300u64 {
        let b = rng.random_range(0..blocks - 4);
        let n = rng.random_range(1..=4usize);
        let data = pattern(1000 + i, n);
        // Writes to different blocks run concurrently in real use; here we
        // also overlap one write with a read of the same region.
        match c.write((b * BS) as u64, data.clone(), false).await {
            Ok(()) => {
                acked += 1;
                for k in 0..n {
                    model.insert(b + k, data[k * BS..(k + 1) * BS].to_vec());
                }
            }
            Err(DeviceError::Unavailable(_)) => {
                // Unknown outcome: forget what we knew about these blocks.
                for k in 0..n {
                    model.remove(&(b + k));
                }
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(acked > 200, "too few writes succeeded ({acked}) for the test to mean anything");
    p.transport.set_faults(Faults::default());
    c.flush().await.expect("flush after faults");
    wait_converged(&c).await;
    for (b, want) in &model {
        assert_eq!(&c.read((*b * BS) as u64, BS as u32).await.expect("read"), want, "block {b}");
    }
    assert_copies_identical(&p, 4).await;
}

#[tokio::test]
async fn flushed_writes_survive_power_loss_of_every_copy() {
    let p = pool(6);
    let c = open(&p, 1, 1).await;
    let durable = pattern(1, 4);
    c.write(0, durable.clone(), false).await.expect("write");
    c.flush().await.expect("flush");
    c.write(8 * 4096, pattern(2, 4), false).await.expect("unflushed write");
    for s in &p.stores {
        s.crash();
    }
    drop(c);
    let c = open(&p, 1, 2).await;
    assert_eq!(c.read(0, durable.len() as u32).await.expect("read"), durable);
    // A crash between write and flush may lose the unflushed write.
    let rest = c.read(8 * 4096, 4 * 4096).await.expect("read");
    assert!(rest == vec![0; 4 * 4096] || rest == pattern(2, 4));
}

#[tokio::test]
async fn a_crash_of_one_copy_between_write_and_flush_loses_nothing() {
    let p = pool(7);
    let c = open(&p, 1, 1).await;
    let data = pattern(3, 16);
    c.write(0, data.clone(), false).await.expect("write");
    p.stores[0].crash(); // node 1 loses its page cache before any flush
    c.flush().await.expect("flush on the other two");
    p.stores[1].crash();
    p.stores[2].crash();
    // Node 1 never had it durably; nodes 2 and 3 did.
    drop(c);
    let c = open(&p, 1, 2).await;
    assert_eq!(c.read(0, data.len() as u32).await.expect("read"), data);
    wait_converged(&c).await;
    assert_copies_identical(&p, 1).await;
}

#[tokio::test]
async fn corrupt_blocks_are_read_from_another_copy_and_repaired() {
    let p = pool(8);
    let c = open(&p, 1, 1).await;
    let data = pattern(4, 8);
    c.write(0, data.clone(), false).await.expect("write");
    for s in &p.stores[..2] {
        assert!(s.corrupt_block(LayerExtent { layer: 7, index: 0 }, 3));
    }
    for _ in 0..3 {
        assert_eq!(c.read(0, data.len() as u32).await.expect("read"), data);
    }
    wait_converged(&c).await;
    for s in &p.stores {
        let mut buf = vec![0; BS];
        let mut m = [Default::default()];
        s.read_blocks(LayerExtent { layer: 7, index: 0 }, 3, &mut buf, &mut m).expect("read store");
        assert_eq!(buf, data[3 * BS..4 * BS], "every copy repaired");
    }
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let p = pool(9);
    let c = open(&p, 1, 1).await;
    c.write(0, pattern(1, 1), false).await.expect("write");
    assert!(matches!(c.write(512, vec![1; 4096], false).await, Err(DeviceError::Misaligned { .. })));
    assert!(matches!(c.write(0, vec![1; 100], false).await, Err(DeviceError::Misaligned { .. })));
    assert!(matches!(c.write(EXTENT, vec![1; 4096], false).await, Err(DeviceError::OutOfRange { .. })));
    assert!(matches!(c.read(EXTENT - 4096, 8192).await, Err(DeviceError::OutOfRange { .. })));
    assert!(matches!(c.write_zeroes(u64::MAX - 4095, 4096).await, Err(DeviceError::OutOfRange { .. })));
    assert_eq!(c.read(0, 4096).await.expect("read"), pattern(1, 1));
    let ro = VolumeClient::open(p.transport.clone(), layout(&p, 1, 0), true, None).await.expect("reader");
    assert_eq!(ro.write(0, vec![0; 4096], false).await, Err(DeviceError::ReadOnly));
    assert!(VolumeClient::open(p.transport.clone(), layout(&p, 1, 0), false, None).await.is_err());
}

#[tokio::test]
async fn zeroes_and_trim_replace_data_on_every_copy() {
    let p = pool(10);
    let c = open(&p, 2, 1).await;
    c.write(0, pattern(1, 100), false).await.expect("write");
    c.trim(4096 * 10, 4096 * 70).await.expect("trim across extents");
    let got = c.read(0, 4096 * 100).await.expect("read");
    assert_eq!(&got[..10 * BS], &pattern(1, 100)[..10 * BS]);
    assert!(got[10 * BS..80 * BS].iter().all(|b| *b == 0));
    assert_eq!(&got[80 * BS..], &pattern(1, 100)[80 * BS..]);
    assert_copies_identical(&p, 2).await;
}

#[tokio::test]
async fn a_new_copy_from_re_replication_is_filled_before_it_is_read() {
    let p = pool(11);
    let extra = Arc::new(MemStore::new());
    p.transport.add(NodeId(4), Arc::new(Replica::new(extra.clone())));
    let c = open(&p, 1, 1).await;
    let data = pattern(8, 64);
    c.write(0, data.clone(), false).await.expect("write");
    // Node 3 is lost; the pool swaps node 4 in.
    p.transport.set_down(NodeId(3), true);
    let mut l = layout(&p, 1, 1);
    l.extents[0][2] = ReplicaRef { node: NodeId(4), address: "mem-4".into() };
    c.update_layout(l, false);
    assert_eq!(c.stale_copies(), vec![(0, NodeId(4))]);
    wait_converged(&c).await;
    p.transport.set_down(NodeId(1), true);
    p.transport.set_down(NodeId(2), true);
    let mut buf = vec![0; data.len()];
    let mut metas = vec![Default::default(); 64];
    extra.read_blocks(LayerExtent { layer: 7, index: 0 }, 0, &mut buf, &mut metas).expect("read");
    assert_eq!(buf, data);
}

#[tokio::test]
async fn a_snapshot_seals_the_top_layer_and_the_writer_moves_on() {
    let p = pool(12);
    let c = open(&p, 1, 1).await;
    let before = pattern(1, 2);
    c.write(0, before.clone(), false).await.expect("write before the snapshot");
    // The pool seals layer 7: generation 2 for this same writer, recorded on
    // the replicas; the layout with the new top layer arrives a bit later.
    for r in &p.nodes {
        p.transport.call(r, Op::Fence { volume: VolumeId(0xabc), generation: 2 }).await.expect("fence");
    }
    let mut sealed = layout(&p, 1, 2);
    sealed.layers = vec![7, 8];
    let later = c.clone();
    let update = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        later.update_layout(sealed, true);
    });
    let after = pattern(2, 2);
    c.write(0, after.clone(), false).await.expect("the writer adopts its new generation");
    update.await.expect("update");
    assert_eq!(c.read(0, 2 * 4096).await.expect("read"), after);
    // The snapshot layer kept exactly the data from before.
    let snap =
        VolumeClient::open(p.transport.clone(), layout(&p, 1, 0), true, None).await.expect("snapshot view");
    assert_eq!(snap.read(0, 2 * 4096).await.expect("read snapshot"), before);
}

#[tokio::test]
async fn another_writer_s_generation_is_not_adopted() {
    let p = pool(13);
    let c = open(&p, 1, 1).await;
    let _other = open(&p, 1, 2).await;
    let mut l = layout(&p, 1, 2);
    l.layers = vec![7];
    c.update_layout(l, false);
    assert_eq!(c.write(0, pattern(1, 1), false).await, Err(DeviceError::Fenced { ours: 1, current: 2 }));
}
