//! A rate-limited log of refused connections and handshakes: under attack
//! every refusal would otherwise be a log line. At most one line per
//! [`RefusalLog::EVERY`], carrying the number of refusals left unlogged
//! since the previous one.
//!
//! (Kept apart from any general rate-limited logging helper so that the
//! two can be reconciled later; the API is two calls: [`RefusalLog::allow`]
//! and [`RefusalLog::refused`].)

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Logs refused connections and handshakes at most once per
/// [`RefusalLog::EVERY`], with the number left unlogged since: an attack
/// must not turn into a flood of log lines.
pub struct RefusalLog {
    /// When the last line was written (ms since `epoch`, plus
    /// [`RefusalLog::EVERY`] so that 0 means never).
    last_ms: AtomicU64,
    /// Refusals not logged since that line.
    suppressed: AtomicU64,
    /// The log's clock.
    epoch: Instant,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog::new()
    }
}

impl RefusalLog {
    /// Least time between two lines.
    pub const EVERY: Duration = Duration::from_secs(5);

    pub fn new() -> RefusalLog {
        RefusalLog {
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Whether to log a refusal now: `Some(n)` with `n` refusals left
    /// unlogged before it, or `None` (it is counted as suppressed).
    pub fn allow(&self) -> Option<u64> {
        let every = Self::EVERY.as_millis() as u64;
        let now = self.epoch.elapsed().as_millis() as u64 + every;
        let last = self.last_ms.load(Ordering::Relaxed);
        if now >= last + every
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Log a refusal (rate-limited): `status` is the HTTP status (0 when
    /// the connection was closed at accept), `client` the address.
    pub fn refused(&self, status: u16, why: &str, client: IpAddr) {
        if let Some(suppressed) = self.allow() {
            tracing::info!(status, why, %client, suppressed, "connection refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_at_most_once_per_period() {
        let log = RefusalLog::new();
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), None);
        assert_eq!(log.allow(), None);
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 2);
    }
}
