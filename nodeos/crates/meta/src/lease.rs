//! Node leases: every member renews its lease through the raft log about once
//! a second ([`crate::Command::Renew`]), and every node notes, on its own
//! monotonic clock, when it applied each member's last renewal. The leader's
//! notes are the pool's view of liveness (a follower's trail them by its apply
//! lag); a node that cannot get its own renewal committed knows it is cut off.
//!
//! Nothing about a lease is stored: after a restart the notes start again,
//! and a member not yet seen counts from the moment the book was made, so no
//! node is declared dead before a whole TTL has passed on this node's clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a member renews its lease.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// Default time without a renewal after which a member is dead.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// What the pool believes of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Renewed within the last few renewal periods.
    Alive,
    /// Renewals are late; the member may be gone.
    Suspect,
    /// No renewal for a whole TTL.
    Dead,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspect => "suspect",
            Liveness::Dead => "dead",
        }
    }
}

/// When a member turns suspect, then dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasePolicy {
    pub ttl: Duration,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        Self { ttl: DEFAULT_TTL }
    }
}

impl LeasePolicy {
    /// Three missed renewals, or a third of the TTL if that is longer.
    pub fn suspect_after(&self) -> Duration {
        (RENEW_EVERY * 3).max(self.ttl / 3).min(self.ttl)
    }

    /// The liveness of a member whose last renewal was applied `age` ago.
    pub fn classify(&self, age: Duration) -> Liveness {
        if age >= self.ttl {
            Liveness::Dead
        } else if age > self.suspect_after() {
            Liveness::Suspect
        } else {
            Liveness::Alive
        }
    }
}

/// When this node applied each member's last renewal.
#[derive(Debug)]
pub struct LeaseBook {
    started: Instant,
    seen: Mutex<HashMap<u64, Instant>>,
}

impl Default for LeaseBook {
    fn default() -> Self {
        Self { started: Instant::now(), seen: Mutex::default() }
    }
}

impl LeaseBook {
    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `node` renewed its lease (its renewal was applied here now).
    pub fn renewed(&self, node: u64) {
        self.renewed_at(node, Instant::now());
    }

    fn renewed_at(&self, node: u64, at: Instant) {
        let mut seen = self.seen();
        let last = seen.entry(node).or_insert(at);
        *last = (*last).max(at);
    }

    /// Time since `node`'s last renewal was applied here (since the book was
    /// made, for a node not seen yet).
    pub fn age(&self, node: u64) -> Duration {
        self.age_at(node, Instant::now())
    }

    fn age_at(&self, node: u64, now: Instant) -> Duration {
        let last = self.seen().get(&node).copied().unwrap_or(self.started);
        now.saturating_duration_since(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_turns_suspect_then_dead_as_renewals_stop() {
        let p = LeasePolicy::default();
        assert_eq!(p.suspect_after(), Duration::from_secs(10) / 3);
        assert_eq!(p.classify(Duration::from_millis(900)), Liveness::Alive);
        assert_eq!(p.classify(Duration::from_secs(3)), Liveness::Alive);
        assert_eq!(p.classify(Duration::from_secs(4)), Liveness::Suspect);
        assert_eq!(p.classify(Duration::from_secs(10)), Liveness::Dead);
        // A short TTL still leaves three renewal periods before suspicion.
        let short = LeasePolicy { ttl: Duration::from_secs(4) };
        assert_eq!(short.classify(Duration::from_millis(2500)), Liveness::Alive);
        assert_eq!(short.classify(Duration::from_millis(3500)), Liveness::Suspect);
        let tiny = LeasePolicy { ttl: Duration::from_secs(2) };
        assert_eq!(tiny.suspect_after(), Duration::from_secs(2));
        assert_eq!(tiny.classify(Duration::from_secs(2)), Liveness::Dead);
    }

    #[test]
    fn ages_count_from_the_last_renewal_or_from_the_start() {
        let book = LeaseBook::default();
        let t0 = book.started;
        assert_eq!(book.age_at(7, t0 + Duration::from_secs(5)), Duration::from_secs(5));
        book.renewed_at(7, t0 + Duration::from_secs(4));
        assert_eq!(book.age_at(7, t0 + Duration::from_secs(5)), Duration::from_secs(1));
        // A renewal applied out of order never moves the note back.
        book.renewed_at(7, t0 + Duration::from_secs(2));
        assert_eq!(book.age_at(7, t0 + Duration::from_secs(5)), Duration::from_secs(1));
        assert_eq!(book.age_at(8, t0), Duration::ZERO);
    }
}
