//! Rate limiting: one token bucket type for the per-connection message
//! rate and the handshake admission (the instance's, and each address's
//! in [`crate::admission`]).

use std::time::Duration;

/// A token bucket: `rate` tokens per second, up to `burst` at once.
///
/// 16 bytes: it lives in every connection's task (see `session::Live`),
/// so the clock is the caller's millisecond counter rather than a
/// 16-byte `Instant`. Storing the truncated millisecond of the last
/// refill loses nothing over time: what one refill rounds down, the next
/// one counts.
#[derive(Debug)]
pub struct TokenBucket {
    /// Tokens available now.
    tokens: f32,
    /// Consecutive refusals; the per-connection limit closes a client that
    /// keeps going past its burst.
    pub strikes: u32,
    /// When `tokens` was last refilled, in the caller's milliseconds.
    refilled_ms: u64,
}

impl TokenBucket {
    /// A full bucket, at `now_ms` on the caller's clock.
    pub fn new(burst: u32, now_ms: u64) -> Self {
        TokenBucket {
            tokens: burst as f32,
            strikes: 0,
            refilled_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64, rate: f64, burst: u32) {
        let elapsed_ms = now_ms.saturating_sub(self.refilled_ms);
        if elapsed_ms == 0 {
            return;
        }
        self.refilled_ms = now_ms;
        let earned = elapsed_ms as f64 * rate / 1000.0;
        self.tokens = (f64::from(self.tokens) + earned).min(f64::from(burst)) as f32;
    }

    /// Whether the bucket would be full at `now_ms` (it then remembers
    /// nothing a new bucket would not).
    pub fn is_full(&self, now_ms: u64, rate: f64, burst: u32) -> bool {
        let elapsed_ms = now_ms.saturating_sub(self.refilled_ms);
        f64::from(self.tokens) + elapsed_ms as f64 * rate / 1000.0 >= f64::from(burst)
    }

    /// Take a token at `now_ms`; `false` when over the rate.
    pub fn take(&mut self, now_ms: u64, rate: f64, burst: u32) -> bool {
        self.refill(now_ms, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            true
        } else {
            self.strikes += 1;
            false
        }
    }

    /// How long until a token is available (after a refused `take`).
    pub fn wait(&self, rate: f64) -> Duration {
        if rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(((1.0 - f64::from(self.tokens)).max(0.0)) / rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_at_the_rate_up_to_the_burst() {
        let mut b = TokenBucket::new(2, 1);
        assert!(b.take(1, 10.0, 2));
        assert!(b.take(1, 10.0, 2));
        assert!(!b.take(1, 10.0, 2));
        assert_eq!(b.strikes, 1);
        assert!(b.wait(10.0) <= Duration::from_millis(100));
        assert!(b.take(101, 10.0, 2));
        assert!(b.take(10_101, 10.0, 2));
        assert!(b.take(10_101, 10.0, 2));
        assert!(!b.take(10_101, 10.0, 2), "never more than the burst");
    }

    #[test]
    fn frequent_refills_lose_nothing_to_rounding() {
        // 1,000 tokens/s, asked for every 0.3 ms on a clock that only
        // moves in whole milliseconds: over 3 s the bucket still earns a
        // token per millisecond (2,999 after the first).
        let mut b = TokenBucket::new(1, 1);
        assert!(b.take(1, 1000.0, 1));
        let mut granted = 0;
        for tick in 0..10_000u64 {
            let now_ms = 1 + (tick * 3) / 10; // a call every 0.3 ms
            if b.take(now_ms, 1000.0, 1) {
                granted += 1;
            }
        }
        assert_eq!(granted, 2999, "3 s of calls at 1,000/s");
    }
}
