//! A test bed for the control plane: a real (single-node, in-process) raft
//! store from `nodeos_meta::testing`, and replica nodes in memory behind a
//! `MemTransport` with fault knobs. No root, no sockets.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nodeos_block::device::BlockDevice;
use nodeos_block::replica::Replica;
use nodeos_block::store::mem::MemStore;
use nodeos_block::store::{ExtentStore, LayerExtent};
use nodeos_block::transport::MemTransport;
use nodeos_meta::Command;
use nodeos_meta::testing::{TestPool, node_record};
use nodeos_types::NodeId;
use nodeos_types::records::{VolumeRecord, node_key};
use nodeos_volumes::{Controller, ControllerConfig, NewVolume, Volumes};

pub struct Bed {
    pub pool: TestPool,
    pub transport: MemTransport,
    pub volumes: Volumes<MemTransport>,
    pub stores: BTreeMap<NodeId, Arc<MemStore>>,
}

pub const GIB: u64 = 1 << 30;

impl Bed {
    /// Replica nodes 1..=n, each a member of the pool with 1 TiB of room.
    pub async fn new(n: u64) -> Bed {
        let pool = TestPool::single().await.unwrap();
        let transport = MemTransport::new(7);
        let volumes = Volumes::new(pool.first(), transport.clone());
        let mut bed = Bed { pool, transport, volumes, stores: BTreeMap::new() };
        for i in 1..=n {
            bed.add_node(NodeId(i)).await;
        }
        bed
    }

    /// A replica node joins: its store, and its record in the pool.
    pub async fn add_node(&mut self, id: NodeId) {
        let store = Arc::new(MemStore::new());
        self.transport.add(id, Arc::new(Replica::new(store.clone())));
        self.stores.insert(id, store);
        self.pool.put_node(&node_record(id)).await.unwrap();
    }

    /// A node leaves the pool (its record goes).
    pub async fn remove_node(&mut self, id: NodeId) {
        self.pool.first().write(Command::delete(node_key(id))).await.unwrap();
    }

    pub fn set_down(&self, id: NodeId, down: bool) {
        self.transport.set_down(id, down);
    }

    pub fn controller(&self, rereplicate_after: Duration) -> Controller<MemTransport> {
        Controller::new(
            self.volumes.clone(),
            ControllerConfig { rereplicate_after, spread_moves: 64, ..ControllerConfig::default() },
        )
    }

    pub async fn create(&self, name: &str, size: u64) -> VolumeRecord {
        self.volumes.create(NewVolume { name: name.into(), size_bytes: size, replicas: None }).await.unwrap()
    }

    pub async fn record(&self, name: &str) -> VolumeRecord {
        self.volumes.get(name).await.unwrap().0
    }

    /// Extents of any layer that node `id` holds blocks of.
    pub fn held(&self, id: NodeId) -> Vec<LayerExtent> {
        self.stores[&id].extents().unwrap()
    }
}

/// A recognisable 4 KiB block for offset `at`.
pub fn block(at: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (at / 4096) as u8 ^ (i as u8);
    }
    b[0] = 0xA5;
    b
}

/// Reads `offsets` back through a fresh reader and checks each block.
pub async fn check_blocks(volumes: &Volumes<MemTransport>, name: &str, offsets: &[u64]) {
    let reader = volumes.open_reader(name).await.unwrap();
    for &at in offsets {
        assert_eq!(reader.read(at, 4096).await.unwrap(), block(at), "block at {at}");
    }
}

/// Reads `offsets` from node `node`'s copies alone (a one-copy layout, so
/// no other copy can answer): proves that copy complete.
pub async fn check_copy(bed: &Bed, name: &str, node: NodeId, offsets: &[u64]) {
    let r = bed.record(name).await;
    let nodes = bed.volumes.nodes().await.unwrap();
    let mut layout = nodeos_volumes::volumes::layout_of(&r, &nodes).unwrap();
    for set in &mut layout.extents {
        set.retain(|x| x.node == node);
        assert_eq!(set.len(), 1, "node {node} holds a copy of every extent");
    }
    layout.generation = 0;
    let reader =
        nodeos_block::client::VolumeClient::open(bed.transport.clone(), layout, true, None).await.unwrap();
    for &at in offsets {
        assert_eq!(reader.read(at, 4096).await.unwrap(), block(at), "block at {at} on node {node}");
    }
}

/// Every extent's copy set has `n` distinct nodes.
pub fn copies_are(r: &VolumeRecord, n: usize) -> bool {
    r.placement.iter().all(|s| {
        let mut d = s.clone();
        d.sort();
        d.dedup();
        d.len() == n && s.len() == n
    })
}
