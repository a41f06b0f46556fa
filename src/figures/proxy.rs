//! The backend proxies' figures, [`FIGURES`], one part of
//! [`COUNTERS`](super::COUNTERS): a count per kind and outcome, and a
//! latency histogram per kind, each entry one line through these two
//! constructors. Prometheus only.

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

/// The backend proxies' figures (issue 17), in their place in
/// [`COUNTERS`](super::COUNTERS)' order.
pub const FIGURES: &[Counter] = &[
    calls(
        r#"switchboard_proxy_calls_total{kind="connect",outcome="ok"}"#,
        |m| &m.proxy_calls[0][0],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="connect",outcome="refused"}"#,
        |m| &m.proxy_calls[0][1],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="connect",outcome="disconnect"}"#,
        |m| &m.proxy_calls[0][2],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="connect",outcome="timeout"}"#,
        |m| &m.proxy_calls[0][3],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="connect",outcome="failed"}"#,
        |m| &m.proxy_calls[0][4],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="connect",outcome="busy"}"#,
        |m| &m.proxy_calls[0][5],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="subscribe",outcome="ok"}"#,
        |m| &m.proxy_calls[1][0],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="subscribe",outcome="refused"}"#,
        |m| &m.proxy_calls[1][1],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="subscribe",outcome="disconnect"}"#,
        |m| &m.proxy_calls[1][2],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="subscribe",outcome="timeout"}"#,
        |m| &m.proxy_calls[1][3],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="subscribe",outcome="failed"}"#,
        |m| &m.proxy_calls[1][4],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="subscribe",outcome="busy"}"#,
        |m| &m.proxy_calls[1][5],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="publish",outcome="ok"}"#,
        |m| &m.proxy_calls[2][0],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="publish",outcome="refused"}"#,
        |m| &m.proxy_calls[2][1],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="publish",outcome="disconnect"}"#,
        |m| &m.proxy_calls[2][2],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="publish",outcome="timeout"}"#,
        |m| &m.proxy_calls[2][3],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="publish",outcome="failed"}"#,
        |m| &m.proxy_calls[2][4],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="publish",outcome="busy"}"#,
        |m| &m.proxy_calls[2][5],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="rpc",outcome="ok"}"#,
        |m| &m.proxy_calls[3][0],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="rpc",outcome="refused"}"#,
        |m| &m.proxy_calls[3][1],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="rpc",outcome="disconnect"}"#,
        |m| &m.proxy_calls[3][2],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="rpc",outcome="timeout"}"#,
        |m| &m.proxy_calls[3][3],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="rpc",outcome="failed"}"#,
        |m| &m.proxy_calls[3][4],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="rpc",outcome="busy"}"#,
        |m| &m.proxy_calls[3][5],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="refresh",outcome="ok"}"#,
        |m| &m.proxy_calls[4][0],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="refresh",outcome="refused"}"#,
        |m| &m.proxy_calls[4][1],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="refresh",outcome="disconnect"}"#,
        |m| &m.proxy_calls[4][2],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="refresh",outcome="timeout"}"#,
        |m| &m.proxy_calls[4][3],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="refresh",outcome="failed"}"#,
        |m| &m.proxy_calls[4][4],
    ),
    calls(
        r#"switchboard_proxy_calls_total{kind="refresh",outcome="busy"}"#,
        |m| &m.proxy_calls[4][5],
    ),
    latency(r#"switchboard_proxy_latency_ms{kind="connect"}"#, |m| {
        &m.proxy_latency[0]
    }),
    latency(r#"switchboard_proxy_latency_ms{kind="subscribe"}"#, |m| {
        &m.proxy_latency[1]
    }),
    latency(r#"switchboard_proxy_latency_ms{kind="publish"}"#, |m| {
        &m.proxy_latency[2]
    }),
    latency(r#"switchboard_proxy_latency_ms{kind="rpc"}"#, |m| {
        &m.proxy_latency[3]
    }),
    latency(r#"switchboard_proxy_latency_ms{kind="refresh"}"#, |m| {
        &m.proxy_latency[4]
    }),
];
