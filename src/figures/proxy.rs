//! The backend proxies' figures in [`COUNTERS`](super::COUNTERS): a
//! count per kind and outcome, and a latency histogram per kind, each
//! entry one line there through these two constructors. Prometheus only.

use std::sync::atomic::AtomicU64;

use super::counter::{Counter, Feed, Kind, Source};
use crate::metrics::{LatencyHistogram, Metrics};

/// `switchboard_proxy_calls_total{kind,outcome}`.
pub const fn calls(series: &'static str, source: fn(&Metrics) -> &AtomicU64) -> Counter {
    Counter {
        json: None,
        prometheus: Some(series),
        kind: Kind::Counter,
        help: "Backend proxy calls, by kind and outcome (ok, refused, disconnect, timeout, failed, busy).",
        source: Source::Metrics(source),
        feed: Feed::No,
    }
}

/// `switchboard_proxy_latency_ms{kind}`.
pub const fn latency(series: &'static str, source: fn(&Metrics) -> &LatencyHistogram) -> Counter {
    Counter {
        json: None,
        prometheus: Some(series),
        kind: Kind::Histogram,
        help: "Backend proxy calls: request to answer (or failure), in ms, by kind.",
        source: Source::Histogram(source),
        feed: Feed::No,
    }
}
