//! How often formation acts: the length of a round, how long a peer call may
//! take, when a node waiting to be admitted asks again, and how often a
//! repeated refusal is logged. Sans-IO: callers pass the current instant.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Discovery round while the node is not a pool member yet.
pub const FORMING_ROUND: Duration = Duration::from_millis(250);
/// Upkeep round once it is.
pub const ROUND: Duration = Duration::from_secs(1);
/// Longest wait for a hello answer: a round never lasts much longer than
/// [`FORMING_ROUND`] plus this.
pub const HELLO_TIMEOUT: Duration = Duration::from_millis(900);
/// Longest wait for a join answer, which may include the leader's
/// membership change.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Least time between two join requests of a node waiting to be admitted:
/// an accepted join takes a moment to replicate, and asking again meanwhile
/// changes nothing.
pub const JOIN_EVERY: Duration = Duration::from_secs(2);
/// Wait between two attempts to open the beacon socket (the interface may
/// not have its address yet).
pub const BIND_RETRY: Duration = Duration::from_secs(2);
/// Log a repeated refusal from the same peer at most this often.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(30);
/// Peers whose last refusal is remembered; beyond this, refusals from new
/// peers go unlogged until older ones age out, so a flood of bad datagrams
/// from many source addresses cannot grow memory or the log without bound.
pub const MAX_REFUSALS: usize = 256;

/// How long this node sleeps between two rounds.
pub fn round(member: bool) -> Duration {
    if member { ROUND } else { FORMING_ROUND }
}

/// Lets a repeated action run at most once per period.
#[derive(Debug, Clone)]
pub struct Pacer {
    every: Duration,
    last: Option<Instant>,
}

impl Pacer {
    pub fn new(every: Duration) -> Self {
        Pacer { every, last: None }
    }

    /// Whether the action may run at `now`; if it may, it counts as run.
    pub fn ready(&mut self, now: Instant) -> bool {
        if self.last.is_some_and(|t| now.saturating_duration_since(t) < self.every) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// Which refusals are due to be logged: the first from a peer, then at most
/// one per period from the same peer.
#[derive(Debug)]
pub struct RefusalLog {
    every: Duration,
    limit: usize,
    last: HashMap<String, Instant>,
}

impl RefusalLog {
    pub fn new(every: Duration, limit: usize) -> Self {
        RefusalLog { every, limit, last: HashMap::new() }
    }

    /// Whether a refusal from `peer` should be logged at `now`; if so, it
    /// counts as logged.
    pub fn due(&mut self, peer: &str, now: Instant) -> bool {
        let recent = |t: &Instant| now.saturating_duration_since(*t) < self.every;
        if let Some(t) = self.last.get(peer) {
            if recent(t) {
                return false;
            }
        } else if self.last.len() >= self.limit {
            self.last.retain(|_, t| recent(t));
            if self.last.len() >= self.limit {
                return false;
            }
        }
        self.last.insert(peer.to_owned(), now);
        true
    }

    /// Peers remembered now.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_round_slower_than_forming_nodes() {
        assert!(round(true) > round(false));
        assert_eq!(round(false), FORMING_ROUND);
    }

    #[test]
    fn a_pacer_lets_one_action_through_per_period() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(2));
        assert!(p.ready(t0));
        assert!(!p.ready(t0));
        assert!(!p.ready(t0 + Duration::from_millis(1999)));
        assert!(p.ready(t0 + Duration::from_secs(2)));
        // The period counts from the last run, not from the first.
        assert!(!p.ready(t0 + Duration::from_secs(3)));
        assert!(p.ready(t0 + Duration::from_secs(4)));
    }

    #[test]
    fn a_pacer_does_not_panic_on_an_earlier_instant() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(2));
        assert!(p.ready(t0 + Duration::from_secs(5)));
        assert!(!p.ready(t0));
    }

    #[test]
    fn refusals_are_logged_once_per_period_per_peer() {
        let t0 = Instant::now();
        let every = Duration::from_secs(30);
        let mut log = RefusalLog::new(every, 8);
        assert!(log.due("a:1", t0));
        assert!(log.due("b:1", t0));
        assert!(!log.due("a:1", t0 + Duration::from_secs(29)));
        assert!(log.due("a:1", t0 + every));
        assert!(!log.due("a:1", t0 + every + Duration::from_secs(1)));
    }

    #[test]
    fn a_flood_of_peers_stays_bounded_and_quiet() {
        let t0 = Instant::now();
        let every = Duration::from_secs(30);
        let mut log = RefusalLog::new(every, 4);
        let logged = (0..1000).filter(|i| log.due(&format!("10.0.0.{i}:7799"), t0)).count();
        assert_eq!(logged, 4);
        assert_eq!(log.len(), 4);
        // Once the remembered ones age out, new peers are logged again.
        assert!(log.due("10.9.9.9:7799", t0 + every));
        assert!(log.len() <= 4);
    }
}
