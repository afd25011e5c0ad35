//! A test bed for the network records: a real (in-process) raft store from
//! `nodeos_meta::testing` with node records in it, and helpers that check a
//! refused request left every key as it was.

#![allow(dead_code, clippy::unwrap_used)]

use std::fmt::Debug;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use nodeos_meta::testing::{TestPool, node_record};
use nodeos_meta::{Consistency, MetaHandle};
use nodeos_network::networks::{NewNetwork, NewPort};
use nodeos_network::{NetworkError, Networks};
use nodeos_types::NodeId;
use nodeos_types::records::{NetworkRecord, NodeRecord, PortKind, PortRecord};

pub struct Bed {
    pub pool: TestPool,
    pub nets: Networks,
}

/// Every key of the store with its value and mod revision.
pub type Dump = Vec<(String, Vec<u8>, u64)>;

impl Bed {
    /// A one-node store holding the records of nodes 1..=nodes.
    pub async fn new(nodes: u64) -> Bed {
        Self::with_pool(TestPool::single().await.unwrap(), nodes).await
    }

    pub async fn with_pool(pool: TestPool, nodes: u64) -> Bed {
        let nets = Networks::new(pool.first());
        let bed = Bed { pool, nets };
        for i in 1..=nodes {
            bed.add_node(NodeId(i)).await;
        }
        bed
    }

    /// Three raft nodes whose messages are each delayed by up to `max_delay`,
    /// so that requests through different nodes interleave in varied ways.
    pub async fn racy(nodes: u64, max_delay: Duration) -> Bed {
        let bed = Self::with_pool(TestPool::new(3).await.unwrap(), nodes).await;
        bed.pool.router().set_max_delay(max_delay);
        bed
    }

    /// [`Networks`] through each raft node of the pool, in id order.
    pub fn through_each_node(&self) -> Vec<Networks> {
        self.pool.ids().into_iter().map(|id| Networks::new(self.pool.handle(id))).collect()
    }

    pub fn meta(&self) -> MetaHandle {
        self.pool.first()
    }

    pub async fn add_node(&self, id: NodeId) {
        let rec = NodeRecord { block_address: String::new(), block_capacity: 0, ..node_record(id) };
        self.pool.put_node(&rec).await.unwrap();
    }

    pub async fn dump(&self) -> Dump {
        let (kvs, _) = self.meta().range("", 0, Consistency::Linearizable).await.unwrap();
        kvs.into_iter().map(|kv| (kv.key, kv.value, kv.mod_revision)).collect()
    }

    /// Keys under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let (kvs, _) = self.meta().range(prefix, 0, Consistency::Linearizable).await.unwrap();
        kvs.into_iter().map(|kv| kv.key).collect()
    }

    pub async fn value(&self, key: &str) -> Option<String> {
        let (kv, _) = self.meta().get(key, Consistency::Linearizable).await.unwrap();
        kv.map(|kv| String::from_utf8(kv.value).unwrap())
    }

    pub async fn revision(&self, key: &str) -> u64 {
        let (kv, _) = self.meta().get(key, Consistency::Linearizable).await.unwrap();
        kv.map_or(0, |kv| kv.mod_revision)
    }

    /// Runs `request`, which must fail, and checks it changed no key.
    pub async fn refused<T: Debug>(
        &self,
        request: impl Future<Output = Result<T, NetworkError>>,
    ) -> NetworkError {
        let before = self.dump().await;
        let e = request.await.expect_err("the request is refused");
        assert_eq!(self.dump().await, before, "refused with {e:?}, yet the records changed");
        e
    }

    pub async fn network(&self, name: &str, cidr: &str) -> NetworkRecord {
        self.nets.create_network(new_network(name, cidr)).await.unwrap()
    }

    pub async fn tap(&self, network: &str, node: u64, ifname: &str) -> PortRecord {
        self.nets.create_port(tap_port(network, node, ifname)).await.unwrap()
    }
}

pub fn new_network(name: &str, cidr: &str) -> NewNetwork {
    NewNetwork { name: name.into(), cidr: Some(cidr.parse().unwrap()), ..NewNetwork::default() }
}

pub fn tap_port(network: &str, node: u64, ifname: &str) -> NewPort {
    NewPort {
        network: network.into(),
        node: NodeId(node),
        kind: PortKind::Tap { ifname: ifname.into() },
        mac: None,
        ip: None,
        security_groups: vec![],
        port_security: true,
    }
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
