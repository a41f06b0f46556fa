//! Reconnection backoff shared by the buses (and the lifecycle events'
//! delivery retries): one [`Backoff`] with the
//! bounds each bus chooses, so every reconnect loop grows its delay the
//! same way.
//!
//! A bus keeps an attempt counter (0 for the first retry, reset to 0 once
//! the connection is back) and asks for the delay of that attempt:
//! [`Backoff::delay`] doubles from `min` up to `max`, and
//! [`Backoff::jittered`] spreads that delay by ±50 % so that instances
//! that lost the bus together do not all come back in the same instant.

use std::time::Duration;

/// Exponential reconnection delays between two bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    /// Delay of the first retry; doubled per failed attempt.
    pub(crate) min: Duration,
    /// Longest delay (before jitter).
    pub(crate) max: Duration,
}

impl Backoff {
    /// Delays from `min`, doubling per attempt, capped at `max`.
    pub(crate) const fn new(min: Duration, max: Duration) -> Self {
        Self { min, max }
    }

    /// The delay of retry number `attempt` (0-based), without jitter:
    /// `min · 2^attempt`, capped at `max`.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        self.min
            .saturating_mul(1u32 << attempt.min(10))
            .min(self.max)
    }

    /// [`delay`](Self::delay) with ±50 % jitter: uniformly between half
    /// and one and a half times it.
    pub(crate) fn jittered(&self, attempt: u32) -> Duration {
        self.delay(attempt).mul_f64(0.5 + fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

    #[test]
    fn delay_doubles_and_is_capped() {
        assert_eq!(B.delay(0), Duration::from_millis(100));
        assert_eq!(B.delay(1), Duration::from_millis(200));
        assert_eq!(B.delay(5), Duration::from_millis(3200));
        assert_eq!(B.delay(6), Duration::from_secs(5));
        assert_eq!(B.delay(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..20 {
            let d = B.jittered(attempt);
            assert!(d >= B.min / 2 && d <= B.max.mul_f64(1.5), "{d:?}");
        }
    }
}
