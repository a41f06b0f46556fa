//! Rate-limited log lines, for events a client can cause at will.
//!
//! A client can make the server log something once per connection (a
//! write that timed out, a queue that overflowed, a failed handshake);
//! one that reconnects in a loop would then fill the logs. A [`LogLimit`]
//! lets one line through per interval and counts the ones it held back,
//! which the next line reports as `suppressed`:
//!
//! ```
//! use std::time::Duration;
//! use switchboard::log_limit::LogLimit;
//!
//! static WRITE_TIMEOUTS: LogLimit = LogLimit::new(Duration::from_secs(10));
//!
//! if let Some(suppressed) = WRITE_TIMEOUTS.allow() {
//!     tracing::info!(suppressed, "write timed out, dropping the connection");
//! }
//! ```
//!
//! Held-back events can still go out at `debug` level. It is a pair of
//! atomics, shared by every connection: no lock, no allocation.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets at most one log line through per interval.
#[derive(Debug)]
pub struct LogLimit {
    /// The interval, in milliseconds.
    every_ms: u64,
    /// When the next line may go out (ms on [`clock_ms`]); 0 lets the
    /// first through.
    next_ms: AtomicU64,
    /// Lines held back since the last one let through.
    suppressed: AtomicU64,
}

impl LogLimit {
    /// At most one line per `every` (usable in a `static`).
    pub const fn new(every: Duration) -> Self {
        LogLimit {
            every_ms: every.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were
    /// held back since the last; `None` (and counted) otherwise.
    pub fn allow(&self) -> Option<u64> {
        let now = clock_ms();
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.every_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Milliseconds since the first call (monotonic, process-wide).
fn clock_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_the_others() {
        let limit = LogLimit::new(Duration::from_secs(3600));
        assert_eq!(limit.allow(), Some(0), "the first goes through");
        for _ in 0..5 {
            assert_eq!(limit.allow(), None);
        }
        // The interval has passed (moved by hand rather than waited for).
        limit.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(limit.allow(), Some(5), "the next reports what was held");
        assert_eq!(limit.allow(), None);
    }
}
