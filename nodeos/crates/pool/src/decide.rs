//! The bootstrap rule, as a pure function of what a node has seen.

use std::collections::BTreeMap;

use nodeos_types::NodeId;

/// What discovery knows about one other node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub address: String,
    /// The node answered a hello with our pool key (not just named by a third node).
    pub verified: bool,
    /// It belongs to an initialised raft group.
    pub member: bool,
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
    if let Some((id, s)) = seen.iter().find(|(id, s)| s.verified && s.member && **id != me) {
        return Decision::Join { via: *id, address: s.address.clone() };
    }
    // Someone says a pool exists but has not proven our key yet: never found a second one.
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
    if stable_rounds < crate::STABLE_ROUNDS {
        return Decision::Wait(WaitReason::Settling);
    }
    // An even or large voter set only slows the pool down: found it with the
    // lowest ids (this node among them) and let the others join as learners.
    let voters = voters.into_iter().take(crate::MAX_VOTERS).collect();
    Decision::Bootstrap { voters }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(ids: &[(u64, bool, bool)]) -> BTreeMap<NodeId, Seen> {
        ids.iter()
            .map(|&(id, verified, member)| {
                (NodeId(id), Seen { address: format!("n{id}:7700"), verified, member })
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
    }

    #[test]
    fn too_few_nodes_waits() {
        let s = seen(&[(2, true, false), (3, false, false)]);
        assert_eq!(
            decide(NodeId(1), "n1:7700", false, &s, 3, 5),
            Decision::Wait(WaitReason::TooFew { seen: 2, expect: 3 })
        );
    }

    #[test]
    fn an_existing_pool_is_joined_never_duplicated() {
        let s = seen(&[(5, true, true), (6, true, false), (7, true, false)]);
        assert_eq!(
            decide(NodeId(1), "n1:7700", false, &s, 3, 5),
            Decision::Join { via: NodeId(5), address: "n5:7700".into() }
        );
        // An unverified claim of membership is not trusted.
        let s = seen(&[(5, false, true), (6, true, false), (7, true, false)]);
        assert!(matches!(decide(NodeId(1), "n1:7700", false, &s, 3, 5), Decision::Wait(_)));
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
}
