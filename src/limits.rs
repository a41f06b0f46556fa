//! Rate limiting: one token bucket type for the per-connection message
//! rate and the instance's handshake admission.

use std::time::Duration;

use tokio::time::Instant;

/// A token bucket: `rate` tokens per second, up to `burst` at once.
#[derive(Debug)]
pub struct TokenBucket {
    /// Tokens available now.
    tokens: f64,
    /// When `tokens` was last refilled.
    refilled: Instant,
    /// Consecutive refusals; the per-connection limit closes a client that
    /// keeps going past its burst.
    pub strikes: u32,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            refilled: Instant::now(),
            strikes: 0,
        }
    }

    fn refill(&mut self, rate: f64, burst: u32) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst));
    }

    /// Take a token; `false` when over the rate.
    pub fn take(&mut self, rate: f64, burst: u32) -> bool {
        self.refill(rate, burst);
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
        Duration::from_secs_f64(((1.0 - self.tokens).max(0.0)) / rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refills_at_the_rate_up_to_the_burst() {
        let mut b = TokenBucket::new(2);
        assert!(b.take(10.0, 2));
        assert!(b.take(10.0, 2));
        assert!(!b.take(10.0, 2));
        assert_eq!(b.strikes, 1);
        assert!(b.wait(10.0) <= Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.take(10.0, 2));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.take(10.0, 2));
        assert!(b.take(10.0, 2));
        assert!(!b.take(10.0, 2), "never more than the burst");
    }
}
