//! The bootstrap rule, as a pure function of what a node has seen.
//!
//! [`decide`] answers, each round, whether this node is formed, should ask a
//! pool member to admit it, should initialise a new pool, or must wait. Its
//! input is a snapshot that [`crate::discovery::Discovery`] builds from
//! answers, hellos, names and beacons, so the rule itself needs no clock and no
//! network.

use std::collections::{BTreeMap, BTreeSet};

use nodeos_types::NodeId;

/// What discovery knows about one other node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub address: String,
    /// The node answered one of our hellos recently, with our pool key (not just
    /// named by a third node, nor only heard greeting us).
    pub verified: bool,
    /// Its last answer said it belongs to an initialised raft group.
    pub member: bool,
    /// The leader its last answer named.
    pub leader: Option<NodeId>,
    /// Only its beacon was heard: no node holding the pool key has vouched for it.
    pub beacon_only: bool,
}

/// What a node should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Already in a pool: nothing to form.
    Formed,
    /// Ask this pool member to admit us.
    Join { via: NodeId, address: String },
    /// Initialise raft with these voters (this node among them).
    Bootstrap { voters: BTreeMap<NodeId, String> },
    /// Not enough information yet.
    Wait(WaitReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// Fewer candidates than `bootstrap_expect`.
    TooFew { seen: usize, expect: usize },
    /// Another node with a lower id will initialise the pool.
    LowerIdDecides(NodeId),
    /// The candidate set changed recently.
    Settling,
    /// A node claims to be a pool member and has not been verified yet.
    Verifying,
    /// A node that greeted us or that a peer named has not answered us
    /// recently: it may already belong to a pool.
    Unverified(NodeId),
    /// More nodes were heard of than discovery keeps, so what it knows is
    /// incomplete.
    TooMany { limit: usize },
}

/// Applies the rule. `stable_rounds` is how many consecutive rounds the
/// verified candidate set has been the same.
pub fn decide(
    me: NodeId,
    my_address: &str,
    is_member: bool,
    seen: &BTreeMap<NodeId, Seen>,
    expect: usize,
    stable_rounds: u32,
) -> Decision {
    if is_member {
        return Decision::Formed;
    }
    if let Some((via, s)) = join_target(me, seen) {
        return Decision::Join { via, address: s.address.clone() };
    }
    // Someone says a pool exists but has not proven our key recently: never found a second one.
    if seen.iter().any(|(id, s)| s.member && *id != me) {
        return Decision::Wait(WaitReason::Verifying);
    }
    let mut voters: BTreeMap<NodeId, String> = seen
        .iter()
        .filter(|(id, s)| s.verified && **id != me)
        .map(|(id, s)| (*id, s.address.clone()))
        .collect();
    voters.insert(me, my_address.to_owned());
    if voters.len() < expect.max(1) {
        return Decision::Wait(WaitReason::TooFew { seen: voters.len(), expect });
    }
    // Every node heard of counts, verified or not: a lower id we only heard
    // about may be about to initialise.
    if let Some(lower) = seen.keys().copied().filter(|id| *id < me).min() {
        return Decision::Wait(WaitReason::LowerIdDecides(lower));
    }
    // A higher id that a key holder vouched for may have initialised a pool
    // before it heard of us, with voters we count as ours: only its own answer
    // says whether it did. Beacons alone vouch for nothing, so an unreachable
    // beacon sender cannot hold the pool back.
    if let Some(id) =
        seen.iter().find(|(id, s)| **id != me && !s.verified && !s.beacon_only).map(|(id, _)| *id)
    {
        return Decision::Wait(WaitReason::Unverified(id));
    }
    if stable_rounds < crate::STABLE_ROUNDS {
        return Decision::Wait(WaitReason::Settling);
    }
    // An even or large voter set only slows the pool down: found it with the
    // lowest ids (this node among them) and let the others join as learners.
    let voters = voters.into_iter().take(crate::MAX_VOTERS).collect();
    Decision::Bootstrap { voters }
}

/// The verified member to ask for admission: the leader itself when one
/// answered us, else a member that knows the leader (it hands the request on),
/// else any member; the lowest id within each.
pub fn join_target(me: NodeId, seen: &BTreeMap<NodeId, Seen>) -> Option<(NodeId, &Seen)> {
    let members = || seen.iter().filter(|(id, s)| **id != me && s.verified && s.member);
    let leaders: BTreeSet<NodeId> = members().filter_map(|(_, s)| s.leader).collect();
    members()
        .find(|(id, _)| leaders.contains(id))
        .or_else(|| members().find(|(_, s)| s.leader.is_some()))
        .or_else(|| members().next())
        .map(|(id, s)| (*id, s))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn seen(ids: &[(u64, bool, bool)]) -> BTreeMap<NodeId, Seen> {
        ids.iter()
            .map(|&(id, verified, member)| {
                (
                    NodeId(id),
                    Seen {
                        address: format!("n{id}:7700"),
                        verified,
                        member,
                        leader: None,
                        beacon_only: false,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn lowest_id_bootstraps_once_enough_nodes_are_stable() {
        let s = seen(&[(2, true, false), (3, true, false)]);
        assert_eq!(decide(NodeId(1), "n1:7700", false, &s, 3, 0), Decision::Wait(WaitReason::Settling));
        let Decision::Bootstrap { voters } = decide(NodeId(1), "n1:7700", false, &s, 3, crate::STABLE_ROUNDS)
        else {
            panic!("expected bootstrap");
        };
        assert_eq!(voters.keys().map(|k| k.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn bootstrap_takes_at_most_five_voters() {
        let s =
            seen(&[(2, true, false), (3, true, false), (4, true, false), (5, true, false), (6, true, false)]);
        let Decision::Bootstrap { voters } = decide(NodeId(1), "n1:7700", false, &s, 3, crate::STABLE_ROUNDS)
        else {
            panic!("expected bootstrap");
        };
        assert_eq!(voters.keys().map(|k| k.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn higher_ids_wait_for_the_lowest() {
        let s = seen(&[(1, true, false), (3, true, false)]);
        assert_eq!(
            decide(NodeId(2), "n2:7700", false, &s, 3, 5),
            Decision::Wait(WaitReason::LowerIdDecides(NodeId(1)))
        );
    }

    #[test]
    fn an_unverified_lower_id_still_holds_bootstrap_back() {
        let s = seen(&[(1, false, false), (3, true, false), (4, true, false)]);
        assert_eq!(
            decide(NodeId(2), "n2:7700", false, &s, 3, 5),
            Decision::Wait(WaitReason::LowerIdDecides(NodeId(1)))
        );
        // Even one only heard by beacon.
        let mut s = seen(&[(3, true, false), (4, true, false)]);
        s.insert(
            NodeId(1),
            Seen {
                address: "n1:7700".into(),
                verified: false,
                member: false,
                leader: None,
                beacon_only: true,
            },
        );
        assert_eq!(
            decide(NodeId(2), "n2:7700", false, &s, 3, 5),
            Decision::Wait(WaitReason::LowerIdDecides(NodeId(1)))
        );
    }

    #[test]
    fn a_vouched_higher_id_must_answer_before_bootstrap() {
        // Node 9 was named by a peer (or greeted us) but has not answered: it
        // may have initialised a pool with node 2 or 3 already.
        let s = seen(&[(2, true, false), (3, true, false), (9, false, false)]);
        assert_eq!(
            decide(NodeId(1), "n1:7700", false, &s, 3, 5),
            Decision::Wait(WaitReason::Unverified(NodeId(9)))
        );
        // Once it answers as a non-member, it is a candidate like the others.
        let s = seen(&[(2, true, false), (3, true, false), (9, true, false)]);
        assert!(matches!(decide(NodeId(1), "n1:7700", false, &s, 3, 5), Decision::Bootstrap { .. }));
    }

    #[test]
    fn a_higher_id_heard_only_by_beacon_does_not_hold_bootstrap_back() {
        let mut s = seen(&[(2, true, false), (3, true, false)]);
        s.insert(
            NodeId(9),
            Seen {
                address: "n9:7700".into(),
                verified: false,
                member: false,
                leader: None,
                beacon_only: true,
            },
        );
        let Decision::Bootstrap { voters } = decide(NodeId(1), "n1:7700", false, &s, 3, 5) else {
            panic!("expected bootstrap");
        };
        assert!(!voters.contains_key(&NodeId(9)));
    }

    #[test]
    fn too_few_nodes_waits() {
        let s = seen(&[(2, true, false), (3, false, false)]);
        assert_eq!(
            decide(NodeId(1), "n1:7700", false, &s, 3, 5),
            Decision::Wait(WaitReason::TooFew { seen: 2, expect: 3 })
        );
        // bootstrap_expect 0 means 1: a node never waits for fewer than itself.
        assert_eq!(
            decide(NodeId(1), "n1:7700", false, &BTreeMap::new(), 0, crate::STABLE_ROUNDS),
            Decision::Bootstrap { voters: [(NodeId(1), "n1:7700".to_owned())].into() }
        );
    }

    #[test]
    fn an_existing_pool_is_joined_never_duplicated() {
        let s = seen(&[(5, true, true), (6, true, false), (7, true, false)]);
        assert_eq!(
            decide(NodeId(1), "n1:7700", false, &s, 3, 5),
            Decision::Join { via: NodeId(5), address: "n5:7700".into() }
        );
        // An unverified claim of membership is not trusted, and not ignored either.
        let s = seen(&[(5, false, true), (6, true, false), (7, true, false)]);
        assert_eq!(decide(NodeId(1), "n1:7700", false, &s, 3, 5), Decision::Wait(WaitReason::Verifying));
    }

    #[test]
    fn joins_go_to_the_leader_else_to_a_member_that_knows_it() {
        let mut s = seen(&[(4, true, true), (5, true, true), (6, true, true)]);
        // Nobody names a leader: the lowest member.
        assert_eq!(join_target(NodeId(1), &s).map(|(id, _)| id), Some(NodeId(4)));
        // Node 6 knows the leader is node 8, which has not answered us: ask node 6.
        s.get_mut(&NodeId(6)).expect("inserted above").leader = Some(NodeId(8));
        assert_eq!(join_target(NodeId(1), &s).map(|(id, _)| id), Some(NodeId(6)));
        // Node 5 is the leader, by its own word or another's: ask it directly.
        s.get_mut(&NodeId(4)).expect("inserted above").leader = Some(NodeId(5));
        assert_eq!(
            decide(NodeId(1), "n1:7700", false, &s, 3, 5),
            Decision::Join { via: NodeId(5), address: "n5:7700".into() }
        );
        // Unverified members are never asked.
        let s = seen(&[(4, false, true)]);
        assert_eq!(join_target(NodeId(1), &s), None);
    }

    #[test]
    fn members_never_bootstrap() {
        let s = seen(&[(2, true, false), (3, true, false)]);
        assert_eq!(decide(NodeId(1), "n1:7700", true, &s, 3, 5), Decision::Formed);
    }

    #[test]
    fn single_node_pool_with_expect_one() {
        assert!(matches!(
            decide(NodeId(9), "n9:7700", false, &BTreeMap::new(), 1, crate::STABLE_ROUNDS),
            Decision::Bootstrap { .. }
        ));
    }

    /// What one node may know about another, consistent with how discovery
    /// fills [`Seen`] in.
    fn any_seen() -> impl Strategy<Value = Seen> {
        prop_oneof![
            Just((false, false, None, true)),
            Just((false, false, None, false)),
            (any::<bool>(), any::<bool>(), proptest::option::of(1u64..12)).prop_map(|(v, m, l)| (
                v,
                m,
                l.map(NodeId),
                false
            )),
        ]
        .prop_map(|(verified, member, leader, beacon_only)| Seen {
            address: String::new(),
            verified,
            member,
            leader,
            beacon_only,
        })
    }

    fn any_view() -> impl Strategy<Value = BTreeMap<NodeId, Seen>> {
        proptest::collection::btree_map((1u64..12).prop_map(NodeId), any_seen(), 0..9)
    }

    proptest! {
        #[test]
        fn every_decision_keeps_the_rule(
            me in (1u64..12).prop_map(NodeId),
            member in any::<bool>(),
            mut view in any_view(),
            expect in 0usize..7,
            stable in 0u32..6,
        ) {
            view.remove(&me);
            match decide(me, "me:7700", member, &view, expect, stable) {
                Decision::Formed => prop_assert!(member),
                Decision::Join { via, .. } => {
                    prop_assert!(!member);
                    let s = &view[&via];
                    prop_assert!(s.verified && s.member);
                }
                Decision::Bootstrap { voters } => {
                    prop_assert!(!member);
                    prop_assert!(stable >= crate::STABLE_ROUNDS);
                    // Nobody it heard of is a member or lower; everyone vouched for answered.
                    prop_assert!(view.iter().all(|(id, s)| !s.member && *id > me && (s.verified || s.beacon_only)));
                    prop_assert_eq!(voters.keys().next(), Some(&me));
                    prop_assert!(voters.len() <= crate::MAX_VOTERS);
                    prop_assert!(voters.len() >= expect.clamp(1, crate::MAX_VOTERS));
                    prop_assert!(voters.keys().all(|id| *id == me || view[id].verified));
                }
                Decision::Wait(_) => prop_assert!(!member),
            }
        }

        /// Two nodes, whatever each has seen, never both initialise a pool
        /// with the same voters; and when a node answered the other (so the
        /// other greeted it and it recorded that), neither is a voter of the
        /// other's pool.
        #[test]
        fn two_bootstraps_never_share_their_founders(
            a in (1u64..12).prop_map(NodeId),
            b in (1u64..12).prop_map(NodeId),
            mut va in any_view(),
            mut vb in any_view(),
            expect in 1usize..5,
            greeted in any::<bool>(),
        ) {
            prop_assume!(a != b);
            va.remove(&a);
            vb.remove(&b);
            let greeting = Seen { address: String::new(), verified: false, member: false, leader: None, beacon_only: false };
            if greeted {
                // Answering a hello records the greeter first.
                if va.get(&b).is_some_and(|s| s.verified) {
                    vb.entry(a).or_insert_with(|| greeting.clone());
                }
                if vb.get(&a).is_some_and(|s| s.verified) {
                    va.entry(b).or_insert(greeting);
                }
            }
            let da = decide(a, "a:7700", false, &va, expect, crate::STABLE_ROUNDS);
            let db = decide(b, "b:7700", false, &vb, expect, crate::STABLE_ROUNDS);
            if let (Decision::Bootstrap { voters: pa }, Decision::Bootstrap { voters: pb }) = (da, db)
                && greeted
            {
                prop_assert!(!pa.contains_key(&b) && !pb.contains_key(&a));
            }
        }
    }
}
