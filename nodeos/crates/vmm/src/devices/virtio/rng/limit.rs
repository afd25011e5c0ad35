//! How fast a guest may draw random bytes: a token bucket with an injected
//! clock, so the I/O thread and the tests share one sans-IO decider.
//!
//! One token is one byte. The bucket starts full, refills continuously at
//! `bytes_per_sec` and holds at most `burst`. Over any interval of length `T`
//! a guest gets at most `burst + bytes_per_sec * T` bytes.

use std::time::{Duration, Instant};

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// The default sustained rate: 1 MiB/s. Linux's hwrng core reads 32-64 bytes
/// at a time to seed its pool, so a guest that only wants to boot never gets
/// near it, while a guest reading `/dev/hwrng` in a loop costs the host at
/// most about a millisecond of getrandom(2) a second.
pub const DEFAULT_BYTES_PER_SEC: u64 = 1 << 20;
/// The default burst: 1 MiB, sixteen maximal requests back to back.
pub const DEFAULT_BURST: u64 = 1 << 20;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RateLimitError {
    #[error("bytes_per_sec is {0}; it must be at least 1")]
    BytesPerSec(u64),
    #[error("burst is {0}; it must be at least 1")]
    Burst(u64),
}

/// A validated rate: `bytes_per_sec` sustained, `burst` at most at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    bytes_per_sec: u64,
    burst: u64,
}

impl RateLimit {
    /// Both figures must be at least 1. A `burst` below the largest request
    /// only shortens answers: a request gets at most `burst` bytes.
    pub fn new(bytes_per_sec: u64, burst: u64) -> Result<Self, RateLimitError> {
        if bytes_per_sec == 0 {
            return Err(RateLimitError::BytesPerSec(bytes_per_sec));
        }
        if burst == 0 {
            return Err(RateLimitError::Burst(burst));
        }
        Ok(Self { bytes_per_sec, burst })
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    pub fn burst(&self) -> u64 {
        self.burst
    }
}

impl Default for RateLimit {
    /// [`DEFAULT_BYTES_PER_SEC`] with a burst of [`DEFAULT_BURST`].
    fn default() -> Self {
        Self { bytes_per_sec: DEFAULT_BYTES_PER_SEC, burst: DEFAULT_BURST }
    }
}

/// The bucket itself; every call takes the current time from the caller.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    limit: RateLimit,
    tokens: u64,
    /// The part of a token earned but not yet whole, in byte-nanoseconds per
    /// second (a whole token is [`NANOS_PER_SEC`]), so polling often loses nothing.
    partial: u128,
    /// The latest time seen; refills are credited up to here.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Self { limit, tokens: limit.burst, partial: 0, last: now }
    }

    /// Bytes available at `now`.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.tokens
    }

    /// How many of `want` bytes may be served at `now`: `Ok(n)` with
    /// `min(want, burst) <= n <= want` (or 0 when `want` is 0), or `Err(wait)`,
    /// how long until `min(want, burst)` bytes are available. Takes nothing;
    /// the caller [`TokenBucket::consume`]s what it actually served.
    pub fn grant(&mut self, now: Instant, want: u64) -> Result<u64, Duration> {
        if want == 0 {
            return Ok(0);
        }
        self.refill(now);
        let need = want.min(self.limit.burst);
        if self.tokens >= need {
            return Ok(want.min(self.tokens));
        }
        // partial < one token <= the deficit, so this does not underflow.
        let missing = u128::from(need - self.tokens) * NANOS_PER_SEC - self.partial;
        let wait = missing.div_ceil(u128::from(self.limit.bytes_per_sec));
        Err(Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX)))
    }

    /// Takes `n` bytes' worth of tokens (all that is left if fewer).
    pub fn consume(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_sub(n);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        let earned =
            elapsed.saturating_mul(u128::from(self.limit.bytes_per_sec)).saturating_add(self.partial);
        let added = earned / NANOS_PER_SEC;
        if added >= u128::from(self.limit.burst - self.tokens) {
            // A full bucket earns nothing more.
            self.tokens = self.limit.burst;
            self.partial = 0;
        } else {
            // added < burst - tokens, so it fits.
            self.tokens += added as u64;
            self.partial = earned % NANOS_PER_SEC;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn limits_are_validated() {
        assert_eq!(RateLimit::new(0, 10), Err(RateLimitError::BytesPerSec(0)));
        assert_eq!(RateLimit::new(10, 0), Err(RateLimitError::Burst(0)));
        assert!(RateLimitError::Burst(0).to_string().contains("burst"));
        let d = RateLimit::default();
        assert_eq!((d.bytes_per_sec(), d.burst()), (1 << 20, 1 << 20));
    }

    #[test]
    fn a_full_bucket_serves_the_burst_then_waits_for_the_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit::new(1000, 1000).unwrap(), t0);
        assert_eq!(b.grant(t0, 0), Ok(0));
        assert_eq!(b.grant(t0, 600), Ok(600));
        b.consume(600);
        // 200 more bytes take 200 ms at 1000 B/s.
        assert_eq!(b.grant(t0, 600), Err(ms(200)));
        assert_eq!(b.grant(t0 + ms(150), 600), Err(ms(50)));
        assert_eq!(b.grant(t0 + ms(200), 600), Ok(600));
        b.consume(600);
        assert_eq!(b.available(t0 + ms(200)), 0);
        // The bucket never holds more than the burst.
        assert_eq!(b.available(t0 + ms(60_000)), 1000);
    }

    #[test]
    fn requests_larger_than_the_burst_get_at_most_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit::new(100, 50).unwrap(), t0);
        assert_eq!(b.grant(t0, 500), Ok(50));
        b.consume(50);
        assert_eq!(b.grant(t0, 500), Err(ms(500)));
        assert_eq!(b.grant(t0 + ms(500), 500), Ok(50));
        // A short read consumes only what was served.
        b.consume(20);
        assert_eq!(b.available(t0 + ms(500)), 30);
    }

    #[test]
    fn fractions_of_a_token_carry_over() {
        let t0 = Instant::now();
        // One byte every 3 ms (333 B/s), polled every millisecond: each poll
        // earns a third of a byte, which must not be lost.
        let mut b = TokenBucket::new(RateLimit::new(333, 1000).unwrap(), t0);
        b.consume(1000);
        let mut t = t0;
        let mut served = 0u64;
        for _ in 0..1000 {
            t += ms(1);
            if let Ok(n) = b.grant(t, 1) {
                b.consume(n);
                served += n;
            }
        }
        assert_eq!(served, 333);
    }

    #[test]
    fn a_greedy_reader_gets_no_more_than_burst_plus_rate() {
        let t0 = Instant::now();
        let limit = RateLimit::new(1 << 20, 1 << 20).unwrap();
        let mut b = TokenBucket::new(limit, t0);
        let mut t = t0;
        let mut served = 0u64;
        while t < t0 + Duration::from_secs(10) {
            match b.grant(t, 65536) {
                Ok(n) => {
                    b.consume(n);
                    served += n;
                }
                // Come back exactly when told: the fastest a reader can be.
                Err(wait) => t += wait,
            }
        }
        let bound = (1 << 20) + 10 * (1 << 20);
        assert!(served <= bound && served >= bound - 2 * 65536, "{served}");
    }

    #[test]
    fn time_going_backwards_adds_nothing() {
        let t0 = Instant::now() + ms(1000);
        let mut b = TokenBucket::new(RateLimit::new(1000, 1000).unwrap(), t0);
        b.consume(1000);
        assert_eq!(b.available(t0 - ms(500)), 0);
        assert_eq!(b.available(t0 + ms(1)), 1);
    }
}
