//! Where copies go, sans-IO: the placement of new extents, and the changes the
//! leader's controller makes to a volume's placement as nodes come and go.
//!
//! Rules, in the order a controller pass applies them:
//! 1. **Replace**: a copy on a node that left the pool, or that has been
//!    unreachable past the grace period (*lost*), moves to an up node outside
//!    the extent's set.
//! 2. **Grow**: an extent with fewer copies than its volume's target (made
//!    while the pool had fewer nodes, or a replacement that found no node)
//!    gets copies on up nodes outside its set until it has the target.
//! 3. **Spread**: while the pool is whole (every member up), copies move from
//!    the most to the least loaded node until loads differ by at most one.
//!    A move adds the new copy first and drops the old one only once the new
//!    one is proven complete (the controller's job; see [`plan_spread`]).
//!
//! Every choice takes the least loaded candidate first (ties by node id), and
//! `load` (copies per node over every volume) is updated as choices are made,
//! so one pass spreads its own changes too. New copies start empty: the
//! controller fills them by repair, and a writer's client treats them as
//! stale until repaired.

use std::collections::{BTreeSet, HashMap};

use nodeos_types::NodeId;

/// Copies per node, over every volume.
pub type Load = HashMap<NodeId, u64>;

/// Copies per node in `placements`.
pub fn load_of<'a>(placements: impl IntoIterator<Item = &'a [Vec<NodeId>]>) -> Load {
    let mut load = Load::new();
    for p in placements {
        for n in p.iter().flatten() {
            *load.entry(*n).or_default() += 1;
        }
    }
    load
}

/// The least loaded of `candidates` (ties by node id), counted in `load`.
fn least_loaded(candidates: impl IntoIterator<Item = NodeId>, load: &mut Load) -> Option<NodeId> {
    let chosen = candidates.into_iter().min_by_key(|n| (load.get(n).copied().unwrap_or(0), *n))?;
    *load.entry(chosen).or_default() += 1;
    Some(chosen)
}

/// Chooses `replicas` distinct nodes for each of `extents` new extents, the
/// least loaded first; `load` counts copies already placed and is updated.
pub fn place(nodes: &[NodeId], load: &mut Load, extents: usize, replicas: usize) -> Vec<Vec<NodeId>> {
    (0..extents)
        .map(|_| {
            let mut set = Vec::with_capacity(replicas);
            for _ in 0..replicas {
                let free = nodes.iter().copied().filter(|n| !set.contains(n));
                match least_loaded(free, load) {
                    Some(n) => set.push(n),
                    None => break,
                }
            }
            set
        })
        .collect()
}

/// What the leader knows of the pool's nodes in one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    /// Nodes of the pool that serve replicas.
    pub members: BTreeSet<NodeId>,
    /// Members whose replica server answers now.
    pub up: BTreeSet<NodeId>,
    /// Members unreachable past the grace period: their copies are rebuilt elsewhere.
    pub lost: BTreeSet<NodeId>,
}

impl NodeView {
    /// Whether a copy on `node` is gone for good (node lost or left the pool).
    fn gone(&self, node: NodeId) -> bool {
        self.lost.contains(&node) || !self.members.contains(&node)
    }

    /// Every member answers: the time to move copies for balance, not for safety.
    pub fn whole(&self) -> bool {
        !self.members.is_empty() && self.up == self.members
    }
}

/// One change to a volume's placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The copy on `from` (lost, or no longer a member) is rebuilt on `to`.
    Replace { extent: usize, from: NodeId, to: NodeId },
    /// The extent is short of its target: a new copy on `to`.
    Add { extent: usize, to: NodeId },
    /// A surplus copy (the old end of a move) leaves `from`.
    Drop { extent: usize, from: NodeId },
}

impl Change {
    pub fn extent(&self) -> usize {
        match *self {
            Change::Replace { extent, .. } | Change::Add { extent, .. } | Change::Drop { extent, .. } => {
                extent
            }
        }
    }

    /// Whether the change makes a new, empty copy that must be filled.
    pub fn fills(&self) -> bool {
        !matches!(self, Change::Drop { .. })
    }
}

/// Rules 1 and 2 for one volume: replacements of gone copies, then copies up
/// to `target` per extent, on up nodes outside each set. A gone copy with no
/// node to take it stays (its extent keeps the copies it has) and is tried
/// again next pass. `load` is updated (a replaced copy no longer counts).
pub fn plan_repairs(
    placement: &[Vec<NodeId>],
    target: usize,
    view: &NodeView,
    load: &mut Load,
) -> Vec<Change> {
    let mut changes = Vec::new();
    for (extent, set) in placement.iter().enumerate() {
        let mut set = set.clone();
        for i in 0..set.len() {
            let from = set[i];
            if !view.gone(from) {
                continue;
            }
            let free = view.up.iter().copied().filter(|c| !set.contains(c) && !view.gone(*c));
            let Some(to) = least_loaded(free, load) else { continue };
            if let Some(l) = load.get_mut(&from) {
                *l = l.saturating_sub(1);
            }
            set[i] = to;
            changes.push(Change::Replace { extent, from, to });
        }
        while set.len() < target {
            let free = view.up.iter().copied().filter(|c| !set.contains(c) && !view.gone(*c));
            let Some(to) = least_loaded(free, load) else { break };
            set.push(to);
            changes.push(Change::Add { extent, to });
        }
    }
    changes
}

/// A move for balance: a copy of `extent` goes from `from` to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub extent: usize,
    pub from: NodeId,
    pub to: NodeId,
}

/// Rule 3 for one volume: up to `max` moves, each from the most loaded node
/// to the least loaded one outside the extent's set, while the two differ by
/// more than one copy. Only for a whole pool (see [`NodeView::whole`]), and
/// only extents at their target (an extent mid-move has a surplus copy and is
/// left alone). `load` is updated as if the moves were done.
///
/// The controller applies a move as an [`Change::Add`], fills the new copy,
/// proves every copy of the extent equal, and only then applies the
/// [`Change::Drop`]: redundancy never drops below the target during a move.
pub fn plan_spread(
    placement: &[Vec<NodeId>],
    target: usize,
    view: &NodeView,
    load: &mut Load,
    max: usize,
) -> Vec<Move> {
    let mut moves = Vec::new();
    if !view.whole() {
        return moves;
    }
    let mut moved = BTreeSet::new();
    while moves.len() < max {
        let by_load = |n: &NodeId, load: &Load| (load.get(n).copied().unwrap_or(0), *n);
        let Some(from) = view.members.iter().copied().max_by_key(|n| by_load(n, load)) else { break };
        let best = placement
            .iter()
            .enumerate()
            .filter(|(e, set)| set.len() == target && set.contains(&from) && !moved.contains(e))
            .filter_map(|(e, set)| {
                let to = view
                    .members
                    .iter()
                    .copied()
                    .filter(|c| !set.contains(c))
                    .min_by_key(|n| by_load(n, load))?;
                Some((e, to))
            })
            .min_by_key(|(e, to)| (by_load(to, load), *e));
        let Some((extent, to)) = best else { break };
        let high = load.get(&from).copied().unwrap_or(0);
        let low = load.get(&to).copied().unwrap_or(0);
        if high <= low + 1 {
            break;
        }
        *load.entry(from).or_default() -= 1;
        *load.entry(to).or_default() += 1;
        moved.insert(extent);
        moves.push(Move { extent, from, to });
    }
    moves
}

/// Applies `changes` to a placement (in order).
pub fn apply(placement: &mut [Vec<NodeId>], changes: &[Change]) {
    for c in changes {
        let Some(set) = placement.get_mut(c.extent()) else { continue };
        match *c {
            Change::Replace { from, to, .. } => {
                if let Some(slot) = set.iter_mut().find(|n| **n == from) {
                    *slot = to;
                }
            }
            Change::Add { to, .. } => {
                if !set.contains(&to) {
                    set.push(to);
                }
            }
            Change::Drop { from, .. } => set.retain(|n| *n != from),
        }
    }
}

/// The copies an extent holds beyond `target` (the old ends of moves), most
/// loaded node first: what a [`Change::Drop`] takes once every copy is proven equal.
pub fn surplus(set: &[NodeId], target: usize, load: &Load) -> Vec<NodeId> {
    let mut by_load: Vec<NodeId> = set.to_vec();
    by_load.sort_by_key(|n| (std::cmp::Reverse(load.get(n).copied().unwrap_or(0)), std::cmp::Reverse(*n)));
    by_load.truncate(set.len().saturating_sub(target));
    by_load
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ids(r: std::ops::RangeInclusive<u64>) -> Vec<NodeId> {
        r.map(NodeId).collect()
    }

    fn view(members: &[u64], up: &[u64], lost: &[u64]) -> NodeView {
        NodeView {
            members: members.iter().map(|n| NodeId(*n)).collect(),
            up: up.iter().map(|n| NodeId(*n)).collect(),
            lost: lost.iter().map(|n| NodeId(*n)).collect(),
        }
    }

    fn distinct(set: &[NodeId]) -> bool {
        let s: BTreeSet<_> = set.iter().collect();
        s.len() == set.len()
    }

    #[test]
    fn new_extents_spread_over_distinct_nodes() {
        let mut load = Load::new();
        let p = place(&ids(1..=5), &mut load, 10, 3);
        assert!(p.iter().all(|s| s.len() == 3 && distinct(s)));
        assert!(load.values().all(|&c| c == 6), "even spread: {load:?}");
    }

    #[test]
    fn four_nodes_carry_a_volume_evenly() {
        let mut load = Load::new();
        let p = place(&ids(1..=4), &mut load, 16, 3);
        assert_eq!(load.len(), 4, "every node holds copies: {load:?}");
        assert!(load.values().all(|&c| c == 12), "{load:?}");
        assert!(p.iter().all(|s| distinct(s)));
    }

    #[test]
    fn a_small_pool_places_what_it_can() {
        let mut load = Load::new();
        let p = place(&ids(1..=2), &mut load, 3, 3);
        assert!(p.iter().all(|s| s.len() == 2 && distinct(s)));
    }

    #[test]
    fn short_extents_grow_to_the_target_once_nodes_exist() {
        // Made on a 2-node pool; a third node joined.
        let placement = vec![ids(1..=2), ids(1..=2)];
        let v = view(&[1, 2, 3], &[1, 2, 3], &[]);
        let mut load = load_of([placement.as_slice()]);
        let changes = plan_repairs(&placement, 3, &v, &mut load);
        assert_eq!(
            changes,
            vec![Change::Add { extent: 0, to: NodeId(3) }, Change::Add { extent: 1, to: NodeId(3) }]
        );
        let mut p = placement;
        apply(&mut p, &changes);
        assert!(p.iter().all(|s| s.len() == 3 && distinct(s)));
    }

    #[test]
    fn growth_prefers_the_least_loaded_and_skips_down_nodes() {
        let placement = vec![vec![NodeId(1)], vec![NodeId(1)]];
        // Node 2 is loaded by other volumes, node 3 is down, node 4 is idle.
        let v = view(&[1, 2, 3, 4], &[1, 2, 4], &[]);
        let mut load = load_of([placement.as_slice()]);
        load.insert(NodeId(2), 10);
        let changes = plan_repairs(&placement, 3, &v, &mut load);
        assert_eq!(
            changes,
            vec![
                Change::Add { extent: 0, to: NodeId(4) },
                Change::Add { extent: 0, to: NodeId(2) },
                Change::Add { extent: 1, to: NodeId(4) },
                Change::Add { extent: 1, to: NodeId(2) },
            ]
        );
    }

    #[test]
    fn lost_and_departed_copies_are_replaced_outside_the_set() {
        let placement = vec![ids(1..=3), vec![NodeId(2), NodeId(3), NodeId(9)]];
        // 1 is lost; 9 left the pool; 4 and 5 are free.
        let v = view(&[1, 2, 3, 4, 5], &[2, 3, 4, 5], &[1]);
        let mut load = load_of([placement.as_slice()]);
        let changes = plan_repairs(&placement, 3, &v, &mut load);
        assert_eq!(
            changes,
            vec![
                Change::Replace { extent: 0, from: NodeId(1), to: NodeId(4) },
                Change::Replace { extent: 1, from: NodeId(9), to: NodeId(5) },
            ]
        );
    }

    #[test]
    fn a_lost_copy_with_nowhere_to_go_stays() {
        let placement = vec![ids(1..=3)];
        let v = view(&[1, 2, 3], &[2, 3], &[1]);
        let mut load = load_of([placement.as_slice()]);
        assert!(plan_repairs(&placement, 3, &v, &mut load).is_empty());
    }

    #[test]
    fn unreachable_but_not_yet_lost_copies_are_left_alone() {
        let placement = vec![ids(1..=3)];
        let v = view(&[1, 2, 3, 4], &[2, 3, 4], &[]);
        let mut load = load_of([placement.as_slice()]);
        assert!(plan_repairs(&placement, 3, &v, &mut load).is_empty());
    }

    #[test]
    fn a_new_node_takes_its_share_by_moves() {
        // 16 extents on nodes 1-3; node 4 joined empty.
        let placement: Vec<Vec<NodeId>> = (0..16).map(|_| ids(1..=3)).collect();
        let v = view(&[1, 2, 3, 4], &[1, 2, 3, 4], &[]);
        let mut load = load_of([placement.as_slice()]);
        let moves = plan_spread(&placement, 3, &v, &mut load, 100);
        assert_eq!(moves.len(), 12, "{moves:?}");
        assert!(moves.iter().all(|m| m.to == NodeId(4)));
        assert!(load.values().all(|&c| c == 12), "{load:?}");
        let extents: BTreeSet<usize> = moves.iter().map(|m| m.extent).collect();
        assert_eq!(extents.len(), moves.len(), "one move per extent per pass");
    }

    #[test]
    fn spreading_waits_for_a_whole_pool_and_respects_the_cap() {
        let placement: Vec<Vec<NodeId>> = (0..16).map(|_| ids(1..=3)).collect();
        let mut load = load_of([placement.as_slice()]);
        let degraded = view(&[1, 2, 3, 4], &[1, 2, 4], &[]);
        assert!(plan_spread(&placement, 3, &degraded, &mut load, 100).is_empty());
        let whole = view(&[1, 2, 3, 4], &[1, 2, 3, 4], &[]);
        assert_eq!(plan_spread(&placement, 3, &whole, &mut load, 2).len(), 2);
    }

    #[test]
    fn the_surplus_copy_is_the_most_loaded_one() {
        let mut load = Load::new();
        load.insert(NodeId(1), 5);
        load.insert(NodeId(2), 9);
        load.insert(NodeId(3), 5);
        load.insert(NodeId(4), 1);
        assert_eq!(surplus(&ids(1..=4), 3, &load), vec![NodeId(2)]);
        assert!(surplus(&ids(1..=3), 3, &load).is_empty());
    }

    #[test]
    fn a_balanced_pool_does_not_move() {
        let mut load = Load::new();
        let placement = place(&ids(1..=4), &mut load, 7, 3);
        let v = view(&[1, 2, 3, 4], &[1, 2, 3, 4], &[]);
        assert!(plan_spread(&placement, 3, &v, &mut load, 100).is_empty(), "{load:?}");
    }

    proptest! {
        /// Whatever the pool and the failures, repairs never put two copies
        /// of an extent on one node, never pick a node that is down or gone,
        /// and never exceed the target.
        #[test]
        fn repairs_keep_sets_distinct_and_on_live_nodes(
            members in 1u64..8,
            extents in proptest::collection::vec(proptest::collection::btree_set(1u64..10, 0..4), 1..12),
            down in proptest::collection::btree_set(1u64..10, 0..4),
            lost_mask in 0u32..16,
            target in 1usize..4,
        ) {
            let members: Vec<u64> = (1..=members).collect();
            let up: Vec<u64> = members.iter().copied().filter(|n| !down.contains(n)).collect();
            let lost: Vec<u64> = down.iter().copied().filter(|n| lost_mask & (1 << (n % 4)) != 0).collect();
            let v = view(&members, &up, &lost);
            let placement: Vec<Vec<NodeId>> =
                extents.iter().map(|s| s.iter().take(target).map(|n| NodeId(*n)).collect()).collect();
            let mut load = load_of([placement.as_slice()]);
            let changes = plan_repairs(&placement, target, &v, &mut load);
            let mut p = placement.clone();
            apply(&mut p, &changes);
            for (e, set) in p.iter().enumerate() {
                prop_assert!(distinct(set), "extent {} {:?}", e, set);
                prop_assert!(set.len() <= target.max(placement[e].len()));
            }
            for c in &changes {
                let to = match *c { Change::Replace { to, .. } | Change::Add { to, .. } => to, Change::Drop { .. } => continue };
                prop_assert!(v.up.contains(&to) && !v.lost.contains(&to));
            }
        }
    }
}
