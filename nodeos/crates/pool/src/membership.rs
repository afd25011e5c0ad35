//! What a pool member decides for the pool, sans-IO: whether a node asking to
//! join is admitted here, handed to the leader or refused; which learners
//! become voters; and what this node's own record should say. Callers pass
//! what the raft store reports and act on the answer.

use std::collections::{BTreeMap, BTreeSet};

use nodeos_meta::peer::JoinRequest;
use nodeos_types::NodeId;
use nodeos_types::records::NodeRecord;

use crate::discovery::{AddressError, check_address};
use crate::formation::FormationConfig;

/// A learner within this many entries of the leader's log counts as caught up.
pub const CAUGHT_UP_LAG: u64 = 64;
/// Capacity is reported in these steps so that small changes in free space
/// do not rewrite the node record every round.
pub const CAPACITY_STEP: u64 = 64 << 20;

/// Why a join request is refused. The joiner sees the message and retries.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum JoinRefused {
    #[error("pool name {asked:?} does not match this pool {ours:?}")]
    PoolName { asked: String, ours: String },
    #[error("node id 0 is not a valid node id")]
    NodeId,
    #[error("the joining node's address {address:?} is not usable")]
    Address {
        address: String,
        #[source]
        source: AddressError,
    },
    #[error("this node is not a pool member yet")]
    NotMember,
    #[error("the pool has no leader right now; retry")]
    NoLeader,
    #[error("the join was handed to node {0} as the leader, but it no longer leads; retry")]
    LeaderMoved(NodeId),
}

/// What to do with a join request that is not refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// This node does not lead: the leader decides.
    Forward { leader: NodeId, address: String },
    /// The node is in the membership already (a retried join): nothing to change.
    AlreadyMember,
    /// Add it as a learner; promotion follows once it has caught up.
    AddLearner,
}

/// A join is handed to the leader at most once: a node that received it
/// handed over (`handed_over`) and does not lead refuses it instead of
/// handing it on, so two nodes with stale views of the leader cannot pass it
/// back and forth.
pub fn forward_once(admission: Admission, handed_over: bool, me: NodeId) -> Result<Admission, JoinRefused> {
    match admission {
        Admission::Forward { .. } if handed_over => Err(JoinRefused::LeaderMoved(me)),
        other => Ok(other),
    }
}

/// Decides a join request on node `me`. `leader` is the current leader and
/// its address as this node knows them; `in_membership` whether the joiner
/// is in the raft membership already (only consulted on the leader).
pub fn admit(
    req: &JoinRequest,
    pool_name: &str,
    me: NodeId,
    is_member: bool,
    leader: Option<(NodeId, String)>,
    in_membership: bool,
) -> Result<Admission, JoinRefused> {
    if req.pool_name != pool_name {
        return Err(JoinRefused::PoolName { asked: req.pool_name.clone(), ours: pool_name.to_owned() });
    }
    // openraft takes id 0 for "no node", and an address raft cannot dial
    // would leave a learner in the membership that never catches up.
    if req.node.id == NodeId(0) {
        return Err(JoinRefused::NodeId);
    }
    check_address(&req.node.address)
        .map_err(|source| JoinRefused::Address { address: req.node.address.clone(), source })?;
    if !is_member {
        return Err(JoinRefused::NotMember);
    }
    let Some((leader, address)) = leader else {
        return Err(JoinRefused::NoLeader);
    };
    if leader != me {
        return Ok(Admission::Forward { leader, address });
    }
    if in_membership { Ok(Admission::AlreadyMember) } else { Ok(Admission::AddLearner) }
}

/// Learners to promote now: caught-up ones, lowest ids first, no more than
/// bring the pool to [`crate::MAX_VOTERS`] voters. `matched` is the leader's
/// replication progress (the last log index each node is known to hold),
/// `last_index` the leader's own last log index.
pub fn promotions(
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
    matched: &BTreeMap<NodeId, Option<u64>>,
    last_index: Option<u64>,
) -> BTreeSet<NodeId> {
    let room = crate::MAX_VOTERS.saturating_sub(voters.len());
    let last = last_index.unwrap_or(0);
    learners
        .iter()
        .filter(|id| !voters.contains(id))
        .filter(|id| {
            matched.get(id).copied().flatten().is_some_and(|i| i.saturating_add(CAUGHT_UP_LAG) >= last)
        })
        .take(room)
        .copied()
        .collect()
}

/// This node's record as it should read now, or `None` when `old` already
/// does. `capacity` is what the replica store reports; `now_ms` stamps a
/// first join.
pub fn node_record(
    cfg: &FormationConfig,
    me: NodeId,
    capacity: u64,
    old: Option<&NodeRecord>,
    now_ms: u64,
) -> Option<NodeRecord> {
    let want = NodeRecord {
        id: me,
        address: cfg.address.clone(),
        hostname: cfg.hostname.clone(),
        version: cfg.version.clone(),
        image_hash: cfg.image_hash.clone(),
        joined_at_ms: old.map_or(now_ms, |o| o.joined_at_ms),
        block_address: cfg.block_address.clone(),
        block_capacity: capacity / CAPACITY_STEP * CAPACITY_STEP,
        vxlan_address: cfg.vxlan_address.clone(),
        cpu: cfg.cpu.clone(),
        memory_mib: cfg.memory_mib,
        // The operator's switch, not the node's: kept across rewrites.
        maintenance: old.is_some_and(|o| o.maintenance),
        removing: old.is_some_and(|o| o.removing),
    };
    (old != Some(&want)).then_some(want)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use nodeos_meta::peer::PeerInfo;
    use proptest::prelude::*;

    use super::*;
    use crate::formation::CapacityProbe;

    fn req(pool: &str, id: u64, address: &str) -> JoinRequest {
        JoinRequest {
            pool_name: pool.into(),
            node: PeerInfo { id: NodeId(id), address: address.into() },
            hostname: "h".into(),
            version: "v".into(),
        }
    }

    fn leader(id: u64) -> Option<(NodeId, String)> {
        Some((NodeId(id), format!("n{id}:7700")))
    }

    #[test]
    fn the_leader_adds_a_new_node_as_learner_once() {
        let r = req("lab", 9, "n9:7700");
        assert_eq!(admit(&r, "lab", NodeId(1), true, leader(1), false), Ok(Admission::AddLearner));
        assert_eq!(admit(&r, "lab", NodeId(1), true, leader(1), true), Ok(Admission::AlreadyMember));
    }

    #[test]
    fn a_follower_hands_the_request_to_the_leader() {
        let r = req("lab", 9, "n9:7700");
        assert_eq!(
            admit(&r, "lab", NodeId(2), true, leader(1), false),
            Ok(Admission::Forward { leader: NodeId(1), address: "n1:7700".into() })
        );
        // Whether the joiner is a member is the leader's call, not the follower's.
        assert_eq!(
            admit(&r, "lab", NodeId(2), true, leader(1), true),
            Ok(Admission::Forward { leader: NodeId(1), address: "n1:7700".into() })
        );
    }

    #[test]
    fn joins_are_refused_with_the_reason() {
        let ok = req("lab", 9, "n9:7700");
        assert_eq!(
            admit(&req("other", 9, "n9:7700"), "lab", NodeId(1), true, leader(1), false),
            Err(JoinRefused::PoolName { asked: "other".into(), ours: "lab".into() })
        );
        assert_eq!(
            admit(&req("lab", 0, "n0:7700"), "lab", NodeId(1), true, leader(1), false),
            Err(JoinRefused::NodeId)
        );
        assert_eq!(
            admit(&req("lab", 9, "n9"), "lab", NodeId(1), true, leader(1), false),
            Err(JoinRefused::Address { address: "n9".into(), source: AddressError::NoPort })
        );
        assert_eq!(admit(&ok, "lab", NodeId(1), false, None, false), Err(JoinRefused::NotMember));
        assert_eq!(admit(&ok, "lab", NodeId(1), true, None, false), Err(JoinRefused::NoLeader));
        // The messages travel to the joiner as text and must say what is wrong.
        let e = admit(&req("other", 9, "n9:7700"), "lab", NodeId(1), true, leader(1), false)
            .expect_err("another pool's name is refused");
        assert_eq!(e.to_string(), r#"pool name "other" does not match this pool "lab""#);
        assert_eq!(JoinRefused::NoLeader.to_string(), "the pool has no leader right now; retry");
    }

    fn ids(v: &[u64]) -> BTreeSet<NodeId> {
        v.iter().copied().map(NodeId).collect()
    }

    fn matched(v: &[(u64, Option<u64>)]) -> BTreeMap<NodeId, Option<u64>> {
        v.iter().map(|(id, i)| (NodeId(*id), *i)).collect()
    }

    #[test]
    fn caught_up_learners_are_promoted_up_to_five_voters() {
        let m = matched(&[(4, Some(1000)), (5, Some(990)), (6, Some(1000))]);
        assert_eq!(promotions(&ids(&[1, 2, 3]), &ids(&[4, 5, 6]), &m, Some(1000)), ids(&[4, 5]));
        assert_eq!(promotions(&ids(&[1, 2, 3, 4]), &ids(&[5, 6]), &m, Some(1000)), ids(&[5]));
        assert_eq!(promotions(&ids(&[1, 2, 3, 4, 5]), &ids(&[6]), &m, Some(1000)), ids(&[]));
    }

    #[test]
    fn lagging_or_unheard_learners_wait() {
        let last = Some(1000);
        let m = matched(&[(4, Some(1000 - CAUGHT_UP_LAG - 1)), (5, None), (6, Some(1000 - CAUGHT_UP_LAG))]);
        assert_eq!(promotions(&ids(&[1, 2, 3]), &ids(&[4, 5, 6, 7]), &m, last), ids(&[6]));
        // An empty log: any learner that answered is caught up.
        let m = matched(&[(4, Some(0))]);
        assert_eq!(promotions(&ids(&[1]), &ids(&[4]), &m, None), ids(&[4]));
    }

    proptest! {
        #[test]
        fn promotion_never_exceeds_five_voters(
            voters in proptest::collection::btree_set(1u64..20, 1..8),
            learners in proptest::collection::btree_set(1u64..20, 0..10),
            progress in proptest::collection::btree_map(1u64..20, proptest::option::of(0u64..200), 0..20),
            last in proptest::option::of(0u64..200),
        ) {
            let voters = ids(&voters.into_iter().collect::<Vec<_>>());
            let learners: BTreeSet<NodeId> = learners.into_iter().map(NodeId).filter(|l| !voters.contains(l)).collect();
            let progress: BTreeMap<NodeId, Option<u64>> = progress.into_iter().map(|(k, v)| (NodeId(k), v)).collect();
            let p = promotions(&voters, &learners, &progress, last);
            prop_assert!(p.is_subset(&learners));
            prop_assert!(voters.len() + p.len() <= crate::MAX_VOTERS.max(voters.len()));
            for id in &p {
                prop_assert!(progress[id].is_some_and(|i| i + CAUGHT_UP_LAG >= last.unwrap_or(0)));
            }
            // Lowest ids first: nothing left out is lower than something taken and just as ready.
            let ready = |l: &NodeId| progress.get(l).copied().flatten().is_some_and(|i| i + CAUGHT_UP_LAG >= last.unwrap_or(0));
            if let Some(max) = p.iter().max() {
                let skipped_lower = learners.iter().filter(|l| *l < max && !p.contains(l)).any(ready);
                prop_assert!(!skipped_lower);
            }
            // And nothing ready is left out while there is room.
            if voters.len() + p.len() < crate::MAX_VOTERS {
                prop_assert!(learners.iter().filter(|l| !p.contains(l)).all(|l| !ready(l)));
            }
        }
    }

    fn cfg() -> FormationConfig {
        FormationConfig {
            pool_name: "lab".into(),
            address: "10.0.0.1:7700".into(),
            hostname: "node-a".into(),
            version: "1.0".into(),
            image_hash: "abc".into(),
            seeds: vec![],
            bootstrap_expect: 3,
            discovery_iface: None,
            beacon_port: 7799,
            block_address: "10.0.0.1:7701".into(),
            vxlan_address: "10.0.0.1:4789".into(),
            block_capacity: CapacityProbe(Arc::new(|| 0)),
            cpu: None,
            memory_mib: 0,
        }
    }

    #[test]
    fn the_node_record_is_written_once_and_when_it_changes() {
        let c = cfg();
        let first = node_record(&c, NodeId(1), 5 * CAPACITY_STEP + 123, None, 1000).expect("no record yet");
        assert_eq!(first.joined_at_ms, 1000);
        assert_eq!(first.block_capacity, 5 * CAPACITY_STEP);
        assert_eq!(first.address, "10.0.0.1:7700");
        // Unchanged, or changed by less than a step: nothing to write.
        assert_eq!(node_record(&c, NodeId(1), 5 * CAPACITY_STEP + 999, Some(&first), 2000), None);
        // A new address is written, and the first join time kept.
        let mut moved = cfg();
        moved.address = "10.0.0.9:7700".into();
        let next =
            node_record(&moved, NodeId(1), 5 * CAPACITY_STEP, Some(&first), 2000).expect("address moved");
        assert_eq!(next.joined_at_ms, 1000);
        assert_eq!(next.address, "10.0.0.9:7700");
        // So is a capacity a whole step lower.
        assert!(node_record(&c, NodeId(1), 4 * CAPACITY_STEP, Some(&first), 2000).is_some());
    }

    #[test]
    fn a_join_is_handed_over_at_most_once() {
        let fwd = Admission::Forward { leader: NodeId(1), address: "n1:7700".into() };
        assert_eq!(forward_once(fwd.clone(), false, NodeId(2)), Ok(fwd.clone()));
        assert_eq!(forward_once(fwd, true, NodeId(2)), Err(JoinRefused::LeaderMoved(NodeId(2))));
        assert_eq!(forward_once(Admission::AddLearner, true, NodeId(1)), Ok(Admission::AddLearner));
        assert_eq!(forward_once(Admission::AlreadyMember, true, NodeId(1)), Ok(Admission::AlreadyMember));
    }
}
