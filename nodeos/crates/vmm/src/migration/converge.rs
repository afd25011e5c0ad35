//! When pre-copy stops: the sans-IO decider the sender consults after every
//! pass.
//!
//! After pass `n` it knows how many pages are dirty now and how fast the link
//! moved the last pass. If sending the dirty pages would take no longer than
//! the downtime budget, the VM is paused for the final pass. Otherwise
//! another pass runs; when passes stop shrinking (the guest dirties memory
//! about as fast as the link drains it), the vCPUs are throttled harder, step
//! by step (auto-converge). Past the pass limit or the time limit the
//! migration is aborted, and the VM keeps running where it is.

use std::time::Duration;

/// Limits of one migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Budget {
    /// Longest pause the guest may see.
    pub downtime: Duration,
    /// Most pre-copy passes before giving up.
    pub max_passes: u32,
    /// Longest whole migration before giving up.
    pub max_time: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Self { downtime: Duration::from_millis(300), max_passes: 30, max_time: Duration::from_secs(600) }
    }
}

/// What the sender does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send the dirty pages and ask again.
    Pass,
    /// Pause the VM and send the rest: expected to take about this long.
    StopAndCopy { expected: Duration },
    /// Abort: the VM stays where it is.
    Abort(String),
}

/// Throttle steps, in percent of each vCPU's time taken away.
const THROTTLE_START: u8 = 20;
const THROTTLE_STEP: u8 = 20;
const THROTTLE_MAX: u8 = 99;
/// A pass that leaves more than this share of what it sent dirty again made no headway.
const NO_HEADWAY: f64 = 0.5;

/// The decider's memory between passes.
#[derive(Debug, Clone)]
pub struct Convergence {
    budget: Budget,
    passes: u32,
    /// Consecutive passes without headway.
    stalled: u32,
    throttle: u8,
}

/// What one pass measured.
#[derive(Debug, Clone, Copy)]
pub struct PassReport {
    /// Pages the pass sent (zero pages count, they cost little).
    pub pages_sent: u64,
    /// Bytes the pass put on the wire.
    pub bytes_sent: u64,
    /// How long the pass took.
    pub took: Duration,
    /// Pages dirty now, to send next.
    pub dirty_pages: u64,
    /// Time since the migration started.
    pub elapsed: Duration,
}

impl Convergence {
    pub fn new(budget: Budget) -> Self {
        Self { budget, passes: 0, stalled: 0, throttle: 0 }
    }

    /// vCPU throttle now in force, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    pub fn passes(&self) -> u32 {
        self.passes
    }

    /// Link rate seen in a pass, bytes per second (at least 1 MiB/s, so a
    /// pass too short to measure does not make every estimate infinite).
    pub fn rate(report: &PassReport) -> f64 {
        let secs = report.took.as_secs_f64().max(1e-3);
        (report.bytes_sent as f64 / secs).max(1024.0 * 1024.0)
    }

    /// How long sending `pages` would take at the pass's rate.
    pub fn estimate(report: &PassReport, pages: u64) -> Duration {
        Duration::from_secs_f64(pages as f64 * 4096.0 / Self::rate(report))
    }

    /// Decides after a pass.
    pub fn after_pass(&mut self, r: &PassReport) -> Next {
        self.passes += 1;
        let expected = Self::estimate(r, r.dirty_pages);
        if expected <= self.budget.downtime {
            return Next::StopAndCopy { expected };
        }
        if self.passes >= self.budget.max_passes {
            return Next::Abort(format!(
                "did not converge in {} passes: {} pages still dirty, about {} ms to send, budget {} ms",
                self.passes,
                r.dirty_pages,
                expected.as_millis(),
                self.budget.downtime.as_millis()
            ));
        }
        if r.elapsed >= self.budget.max_time {
            return Next::Abort(format!(
                "did not converge in {} s: {} pages still dirty",
                self.budget.max_time.as_secs(),
                r.dirty_pages
            ));
        }
        let headway = r.pages_sent > 0 && (r.dirty_pages as f64) < (r.pages_sent as f64) * NO_HEADWAY;
        if headway {
            self.stalled = 0;
        } else {
            self.stalled += 1;
            // Two stalled passes in a row: the guest outruns the link.
            if self.stalled >= 2 {
                self.throttle = match self.throttle {
                    0 => THROTTLE_START,
                    t => t.saturating_add(THROTTLE_STEP).min(THROTTLE_MAX),
                };
                self.stalled = 0;
            }
        }
        Next::Pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(sent: u64, dirty: u64, ms: u64, elapsed_s: u64) -> PassReport {
        PassReport {
            pages_sent: sent,
            bytes_sent: sent * 4096,
            took: Duration::from_millis(ms),
            dirty_pages: dirty,
            elapsed: Duration::from_secs(elapsed_s),
        }
    }

    #[test]
    fn a_small_dirty_set_stops_at_once() {
        let mut c = Convergence::new(Budget::default());
        // 65536 pages in 1 s = 256 MiB/s; 100 pages take ~1.5 ms.
        match c.after_pass(&report(65536, 100, 1000, 1)) {
            Next::StopAndCopy { expected } => assert!(expected < Duration::from_millis(5)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_shrinking_set_keeps_passing_without_throttle() {
        let mut c = Convergence::new(Budget::default());
        assert_eq!(c.after_pass(&report(65536, 30000, 1000, 1)), Next::Pass);
        assert_eq!(c.after_pass(&report(30000, 20000, 500, 2)), Next::Pass);
        assert_eq!(c.throttle(), 0);
    }

    #[test]
    fn a_guest_that_outruns_the_link_is_throttled_harder_and_harder_then_aborted() {
        let mut c = Convergence::new(Budget { max_passes: 12, ..Budget::default() });
        let mut throttles = vec![];
        for i in 0..11 {
            assert_eq!(c.after_pass(&report(50000, 50000, 1000, i)), Next::Pass);
            throttles.push(c.throttle());
        }
        assert_eq!(throttles, vec![0, 20, 20, 40, 40, 60, 60, 80, 80, 99, 99]);
        match c.after_pass(&report(50000, 50000, 1000, 12)) {
            Next::Abort(why) => assert!(why.contains("12 passes"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_time_limit_aborts() {
        let mut c = Convergence::new(Budget { max_time: Duration::from_secs(5), ..Budget::default() });
        assert!(matches!(c.after_pass(&report(50000, 50000, 1000, 6)), Next::Abort(_)));
    }

    #[test]
    fn a_tiny_pass_does_not_make_estimates_infinite() {
        let r = report(0, 10, 0, 0);
        assert!(Convergence::estimate(&r, 10) < Duration::from_millis(50));
    }
}
