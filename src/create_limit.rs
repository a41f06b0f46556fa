//! The per-connection limit on creating channels (`channel_create_rate`).
//!
//! A client `publish` that brings a channel's stream into existence (its
//! ack carries offset 1: a new epoch) uses up one creation; a connection
//! may make `channel_create_rate` of them per minute, all at once or spread
//! out. Once it has used them up, a client publish first reads the
//! channel's top (a read that creates nothing) and is refused with
//! `channel_limit` when the channel does not exist yet; publishing into
//! existing channels goes on, and the connection stays open. The server
//! API is not limited.
//!
//! It costs an ordinary client nothing: the state is 4 bytes in the
//! connection's task (it fits in padding: the idle task does not grow), and
//! while creations are left no read is added. The algorithm is GCRA (the
//! "virtual scheduling" form of a token bucket): one theoretical arrival
//! time instead of a token count and a timestamp.

/// The whole window: `rate` creations per minute, burst `rate`.
const WINDOW_MS: u64 = 60_000;

/// The connection's creation budget: the theoretical arrival time of the
/// next creation, in the hub's milliseconds, truncated to 32 bits. It is
/// never more than [`WINDOW_MS`] ahead of the clock, so the truncation is
/// undone by comparing with the clock (a time "ahead" by more than the
/// window is in the past).
#[derive(Debug, Default, Clone, Copy)]
pub struct CreateLimit(u32);

/// Milliseconds between creations at `per_minute` (at least 1).
fn interval(per_minute: u32) -> u64 {
    (WINDOW_MS / u64::from(per_minute)).max(1)
}

impl CreateLimit {
    /// How far the theoretical arrival time is ahead of `now_ms` (0 when
    /// it is in the past).
    fn ahead(&self, now_ms: u64) -> u64 {
        if self.0 == 0 {
            return 0; // never created (0 as a real time: once in 49 days, harmless)
        }
        let ahead = self.0.wrapping_sub(now_ms as u32);
        match u64::from(ahead) {
            a if a <= WINDOW_MS => a,
            _ => 0,
        }
    }

    /// Whether the connection may create a channel now (`per_minute` 0:
    /// always).
    pub fn may_create(&self, now_ms: u64, per_minute: u32) -> bool {
        per_minute == 0 || self.ahead(now_ms) + interval(per_minute) <= WINDOW_MS
    }

    /// The connection created a channel: use up one creation (even past
    /// the limit: a creation that raced the check is counted, not undone).
    pub fn created(&mut self, now_ms: u64, per_minute: u32) {
        if per_minute == 0 {
            return;
        }
        let ahead = (self.ahead(now_ms) + interval(per_minute)).min(WINDOW_MS);
        self.0 = (now_ms + ahead) as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minutes_worth_then_one_per_interval() {
        let mut l = CreateLimit::default();
        let t0 = 5_000_000_000; // past 32 bits of milliseconds
        for _ in 0..3 {
            assert!(l.may_create(t0, 3));
            l.created(t0, 3);
        }
        assert!(!l.may_create(t0, 3));
        assert!(!l.may_create(t0 + 19_000, 3));
        assert!(l.may_create(t0 + 20_000, 3), "one per 20 s at 3/min");
        l.created(t0 + 20_000, 3);
        assert!(!l.may_create(t0 + 20_001, 3));
        assert!(l.may_create(t0 + 10_000_000, 3));
        for _ in 0..3 {
            assert!(l.may_create(t0 + 10_000_000, 3));
            l.created(t0 + 10_000_000, 3);
        }
        assert!(
            !l.may_create(t0 + 10_000_000, 3),
            "full again after a pause"
        );
    }

    #[test]
    fn zero_is_off() {
        let mut l = CreateLimit::default();
        for _ in 0..1000 {
            l.created(0, 0);
            assert!(l.may_create(0, 0));
        }
    }
}
