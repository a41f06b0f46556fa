//! The counters behind `/metrics` (the tutorial's JSON, extended),
//! `/metrics/prometheus` and the dashboard's `sys:metrics` feed, and the
//! delivery-latency histogram.
//!
//! The counters are plain atomics ([`Metrics`], the history store's
//! [`HistoryStats`](crate::broker::history::HistoryStats), the hub's, the
//! per-address table's), bumped where things happen. Which of them are
//! shown, under which names, is declared once in
//! [`crate::figures::COUNTERS`], a layer above the node (it reads the node);
//! this module stays below it, so the node can own its counters.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Process-wide counters. Relaxed atomics: each is an independent tally.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Text frames received from clients.
    pub messages_in: AtomicU64,
    /// Frames written to clients.
    pub messages_out: AtomicU64,
    /// Valid requests received, by type (`protocol::RequestKind::TYPES`).
    pub requests_by_type: [AtomicU64; 11],
    /// Channel publications written to clients (`message` frames).
    pub publications_out: AtomicU64,
    /// WebSocket handshakes completed.
    pub connections_total: AtomicU64,
    /// Error frames sent.
    pub errors_sent: AtomicU64,
    /// Clients removed because they stopped answering pings.
    pub dead_peers: AtomicU64,
    /// Connections closed because a message exceeded the size limit.
    pub oversize_closes: AtomicU64,
    /// Connections refused: missing, invalid or expired token.
    pub auth_failures: AtomicU64,
    /// Publications resent because their acknowledgement was overdue.
    pub redeliveries: AtomicU64,
    /// Client messages refused by the rate limit.
    pub rate_limited: AtomicU64,
    /// Upgrades refused: origin not allowed.
    pub origin_refused: AtomicU64,
    /// Upgrades refused by handshake admission (503 + Retry-After).
    pub handshakes_throttled: AtomicU64,
    /// Upgrades refused: the instance was at `max_connections`.
    pub connections_refused: AtomicU64,
    /// Publications accepted (client and API).
    pub publications: AtomicU64,
    /// Publishes to the bus (channel publish, broadcast, direct) that
    /// failed because the bus was unreachable.
    pub bus_publish_errors: AtomicU64,
    /// Requests to the server HTTP API (`/api/*`).
    pub api_requests: AtomicU64,
    /// Server API requests answered with an error (4xx or 5xx).
    pub api_errors: AtomicU64,
    /// Client publishes refused by `channel_create_rate` (`channel_limit`).
    pub channel_limited: AtomicU64,
    /// Publish → write latency of channel publications.
    pub latency: LatencyHistogram,
    /// Backend proxy calls by kind and outcome (`proxy::Kind`,
    /// `proxy::Outcome`, by index).
    pub proxy_calls: [[AtomicU64; PROXY_OUTCOMES]; PROXY_KINDS],
    /// Backend proxy call latency by kind (every outcome but `busy`).
    pub proxy_latency: [LatencyHistogram; PROXY_KINDS],
}

/// Kinds of backend proxy call: connect, subscribe, publish, rpc, refresh.
pub const PROXY_KINDS: usize = 5;
/// Outcomes of a backend proxy call: ok, refused, disconnect, timeout,
/// failed, busy.
pub const PROXY_OUTCOMES: usize = 6;

/// Upper bounds (µs) of the latency histogram's buckets, log-spaced from
/// 10 µs to 5 s; a last bucket holds everything above.
pub const LATENCY_BUCKETS_US: [u64; 18] = [
    10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000,
];

/// A fixed-bucket histogram of delivery latency in microseconds: from the
/// moment this instance fans a publication out to its subscribers' queues
/// to the moment the frame is handed to each socket (a monotonic clock, so
/// no clock skew between instances). Lock-free: one relaxed increment per
/// observation.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    counts: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    /// Sum of all observations (µs), for Prometheus' `_sum`.
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    /// Record one latency, in µs.
    pub fn observe_us(&self, us: u64) {
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Sum of all observations so far, in µs.
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }

    /// The counts per bucket so far.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot(std::array::from_fn(|i| {
            self.counts[i].load(Ordering::Relaxed)
        }))
    }
}

/// Bucket counts (not cumulative) at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencySnapshot(pub [u64; LATENCY_BUCKETS_US.len() + 1]);

impl LatencySnapshot {
    /// Observations between `earlier` and this snapshot.
    pub fn since(&self, earlier: &LatencySnapshot) -> LatencySnapshot {
        LatencySnapshot(std::array::from_fn(|i| {
            self.0[i].saturating_sub(earlier.0[i])
        }))
    }

    /// Quantile `q` in ms, interpolated linearly inside the bucket that
    /// holds it (as Prometheus' `histogram_quantile` does; the first bucket
    /// starts at 0); `None` without observations. Beyond the last bound it
    /// reports the last bound.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.0.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(f64::MIN_POSITIVE);
        let mut below = 0u64;
        for (i, &c) in self.0.iter().enumerate() {
            if c > 0 && (below + c) as f64 >= rank {
                let Some(&upper) = LATENCY_BUCKETS_US.get(i) else {
                    break; // above the last bound
                };
                let lower = if i == 0 { 0 } else { LATENCY_BUCKETS_US[i - 1] };
                let within = (rank - below as f64) / c as f64;
                let us = lower as f64 + (upper - lower) as f64 * within;
                return Some(us / 1000.0);
            }
            below += c;
        }
        LATENCY_BUCKETS_US.last().map(|&us| us as f64 / 1000.0)
    }
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Resident and virtual memory of this process, in bytes, from
/// `/proc/self/status` (zero where that file does not exist).
#[derive(Debug, Default, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryUsage {
    pub rss: u64,
    pub vm_size: u64,
}

/// CPU time (user + system) this process has used, in seconds, from
/// `/proc/self/stat` (zero where that file does not exist).
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start at
    // ") "; utime and stime are fields 14 and 15, in clock ticks (100/s on
    // Linux).
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Read this process's memory usage.
pub fn memory_usage() -> MemoryUsage {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return MemoryUsage::default();
    };
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |k| k * 1024)
    };
    MemoryUsage {
        rss: kib("VmRSS:"),
        vm_size: kib("VmSize:"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_interpolated_inside_buckets() {
        let h = LatencyHistogram::default();
        let empty = h.snapshot();
        assert_eq!(empty.quantile_ms(0.5), None);
        // 100 observations in (20, 50] µs, one of 7 ms, one of 40 ms.
        for _ in 0..98 {
            h.observe_us(30);
        }
        h.observe_us(7_000);
        h.observe_us(40_000);
        let s = h.snapshot().since(&empty);
        let p50 = s.quantile_ms(0.5).unwrap();
        // Half of the (20, 50] bucket's 98: a bit above its middle, in ms.
        assert!((p50 - (0.020 + 0.030 * 50.0 / 98.0)).abs() < 1e-9, "{p50}");
        let p99 = s.quantile_ms(0.99).unwrap();
        assert!(p99 > 5.0 && p99 <= 10.0, "{p99}");
        assert_eq!(s.quantile_ms(1.0), Some(50.0));
        // Different traffic, different figures: not bucket bounds.
        h.observe_us(150);
        let later = h.snapshot().since(&empty);
        assert_ne!(later.quantile_ms(0.5), s.quantile_ms(0.5));
        assert_eq!(h.sum_us(), 98 * 30 + 7_000 + 40_000 + 150);
    }

    #[test]
    fn beyond_the_last_bound_reports_it() {
        let h = LatencyHistogram::default();
        h.observe_us(60_000_000);
        assert_eq!(h.snapshot().quantile_ms(0.5), Some(5000.0));
    }
}
