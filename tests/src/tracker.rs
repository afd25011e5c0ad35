//! [`Tracker`]: what the test has observed, checked against the pool's
//! invariants.
//!
//! - At most one leader per term, across every answer from every node, for the
//!   whole test (raft election safety).
//! - Every acknowledged write stays readable with its value; a write whose
//!   outcome is unknown (an error) may or may not be there, but if it is, it
//!   has one of the values tried.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use nodeos_proto::v1 as pb;

use crate::client::{Violation, describe, leaders_in};

#[derive(Debug, Default)]
struct State {
    /// term -> (leader id, which answer showed it first).
    leaders: BTreeMap<u64, (String, String)>,
    acked: BTreeMap<String, Vec<u8>>,
    /// Keys whose last write has an unknown outcome -> every value tried.
    uncertain: BTreeMap<String, Vec<Vec<u8>>>,
}

/// Observations of one test, shared with background writers.
#[derive(Debug, Default)]
pub struct Tracker {
    state: Mutex<State>,
}

impl Tracker {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the (term, leader) pair of an answer; a second leader for a
    /// term already seen is a [`Violation`].
    pub fn observe(&self, via: &str, s: &pb::PoolStatus) -> Result<(), Violation> {
        if leaders_in(s).len() > 1 {
            return Err(Violation(format!("answer via {via} shows two leaders: {}", describe(s))));
        }
        if s.leader_id.is_empty() || s.term == 0 {
            return Ok(());
        }
        let mut st = self.state();
        let seen = st.leaders.entry(s.term).or_insert_with(|| (s.leader_id.clone(), via.to_owned()));
        if seen.0 != s.leader_id {
            return Err(Violation(format!(
                "term {} has two leaders: {} (seen via {}) and {} (via {via}: {})",
                s.term,
                seen.0,
                seen.1,
                s.leader_id,
                describe(s)
            )));
        }
        Ok(())
    }

    /// Records a write attempt: `acked` when the pool acknowledged it,
    /// otherwise its outcome is unknown.
    pub fn record_put(&self, key: &str, value: &[u8], acked: bool) {
        let mut st = self.state();
        if acked {
            st.uncertain.remove(key);
            st.acked.insert(key.to_owned(), value.to_vec());
        } else {
            let mut tried = st.uncertain.remove(key).unwrap_or_default();
            if let Some(prev) = st.acked.remove(key) {
                tried.push(prev);
            }
            tried.push(value.to_vec());
            st.uncertain.insert(key.to_owned(), tried);
        }
    }

    /// Every acknowledged write, by key.
    pub fn acked(&self) -> BTreeMap<String, Vec<u8>> {
        self.state().acked.clone()
    }

    pub fn acked_count(&self) -> usize {
        self.state().acked.len()
    }

    /// Writes with an unknown outcome, with every value tried.
    pub fn uncertain(&self) -> BTreeMap<String, Vec<Vec<u8>>> {
        self.state().uncertain.clone()
    }

    /// Terms and their leaders seen so far.
    pub fn leaders(&self) -> BTreeMap<u64, String> {
        self.state().leaders.iter().map(|(t, (l, _))| (*t, l.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(term: u64, leader: &str) -> pb::PoolStatus {
        pb::PoolStatus {
            term,
            leader_id: leader.into(),
            members: vec![pb::Node {
                id: leader.into(),
                role: pb::NodeRole::Leader as i32,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_second_leader_in_a_term_is_a_violation() {
        let t = Tracker::default();
        assert!(t.observe("a", &status(1, "x")).is_ok());
        assert!(t.observe("b", &status(1, "x")).is_ok());
        assert!(t.observe("b", &status(2, "y")).is_ok());
        assert!(t.observe("c", &status(1, "y")).is_err());
    }

    #[test]
    fn failed_writes_make_a_key_uncertain() {
        let t = Tracker::default();
        t.record_put("k", b"1", true);
        t.record_put("k", b"2", false);
        assert!(t.acked().is_empty());
        assert_eq!(t.uncertain()["k"], vec![b"1".to_vec(), b"2".to_vec()]);
        t.record_put("k", b"3", true);
        assert_eq!(t.acked()["k"], b"3".to_vec());
        assert!(t.uncertain().is_empty());
    }
}
