//! What one entry of the [`COUNTERS`](super::COUNTERS) table declares: a
//! figure's name in each exposition, its type, its help text, and where
//! its value is read from; and [`Sources`], what a rendering reads from.

use std::cell::OnceCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::admission::AddrTable;
use crate::hub::Hub;
use crate::node::Node;

use crate::broker::history::HistoryStats;
use crate::metrics::{
    LatencyHistogram, LatencySnapshot, MemoryUsage, Metrics, cpu_seconds, memory_usage,
};

/// One figure the server exposes, declared once in
/// [`COUNTERS`](super::COUNTERS) and rendered from there by `/metrics`,
/// `/metrics/prometheus` and the dashboard's `sys:metrics` feed.
#[derive(Debug, Clone, Copy)]
pub struct Counter {
    /// Key in the `/metrics` JSON; a dot nests (`memoryUsage.rss`).
    /// `None`: not in the JSON.
    pub json: Option<&'static str>,
    /// Series in `/metrics/prometheus`, labels included
    /// (`switchboard_requests_total{type="ping"}`). The series of one family
    /// follow each other in the table and share `kind` and `help`, which
    /// are written once. `None`: not in the Prometheus text.
    pub prometheus: Option<&'static str>,
    /// Its Prometheus type.
    pub kind: Kind,
    /// What it counts: the Prometheus `# HELP` line.
    pub help: &'static str,
    /// Where its value is read from.
    pub source: Source,
    /// What the dashboard's `sys:metrics` feed shows of it.
    pub feed: Feed,
}

/// A figure's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever goes up (until a restart).
    Counter,
    /// A level, up or down.
    Gauge,
    /// Bucketed observations ([`Source::Histogram`]).
    Histogram,
}

impl Kind {
    /// The name in a `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Where a figure's value comes from. Every variant reads what the part of
/// the server that counts already keeps (plain atomics, mostly): the table
/// is read only when rendering, never on the message path.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A [`Metrics`] atomic.
    Metrics(fn(&Metrics) -> &AtomicU64),
    /// One request type's count in [`Metrics::requests_by_type`], by its
    /// index in `protocol::RequestKind::TYPES`.
    Requests(usize),
    /// A tally or gauge of the [`Hub`].
    Hub(fn(&Hub) -> u64),
    /// A gauge of the in-process history store ([`HistoryStats`]).
    History(fn(&HistoryStats) -> &AtomicU64),
    /// The per-address table ([`AddrTable`]); the dashboard feed has none.
    Addrs(fn(&AddrTable) -> u64),
    /// This process's memory (`/proc/self/status`, read once per
    /// rendering).
    Memory(fn(&MemoryUsage) -> u64),
    /// This process's CPU time (`/proc/self/stat`).
    CpuSeconds,
    /// The node itself: uptime, readiness, instance id.
    Node(for<'a> fn(&'a Node) -> Value<'a>),
    /// Worked out from other figures (read one after the other, not as one
    /// atomic snapshot).
    Derived(fn(&Sources<'_>) -> u64),
    /// A latency histogram of [`Metrics`] (publish → write, proxy calls).
    Histogram(fn(&Metrics) -> &LatencyHistogram),
}

/// A figure's value at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Int(u64),
    Float(f64),
    /// JSON `true`/`false`; Prometheus `1`/`0`.
    Bool(bool),
    /// JSON only: Prometheus values are numbers.
    Text(&'a str),
    /// Bucket counts and the sum of all observations (µs).
    Histogram(LatencySnapshot, u64),
}

/// What the dashboard's `sys:metrics` feed shows of a figure (it samples
/// once a second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Feed {
    /// Nothing.
    No,
    /// Its value now, under this key.
    Now(&'static str),
    /// Its increase since the previous sample, under this key.
    Rate(&'static str),
    /// Quantiles (each under its key) of the observations since the
    /// previous sample; for a histogram.
    Quantiles(&'static [(&'static str, f64)]),
}

/// What one rendering reads figures from. Gathered per request (or per
/// dashboard sample): the history store's handle is taken once, and
/// `/proc/self/status` is read at most once.
pub struct Sources<'a> {
    node: &'a Node,
    /// `None` for the dashboard feed, which shows nothing per address.
    addrs: Option<&'a AddrTable>,
    history: Arc<HistoryStats>,
    memory: OnceCell<MemoryUsage>,
}

impl<'a> Sources<'a> {
    pub fn new(node: &'a Node, addrs: Option<&'a AddrTable>) -> Self {
        Sources {
            node,
            addrs,
            history: node.history_stats(),
            memory: OnceCell::new(),
        }
    }

    pub fn node(&self) -> &'a Node {
        self.node
    }

    pub fn metrics(&self) -> &'a Metrics {
        self.node.metrics()
    }
}

impl Counter {
    /// Its value now; `None` for a per-address figure when `sources` has no
    /// per-address table.
    pub fn read<'s>(&self, sources: &'s Sources<'_>) -> Option<Value<'s>> {
        let value = match self.source {
            Source::Metrics(f) => Value::Int(f(sources.metrics()).load(Relaxed)),
            Source::Requests(i) => Value::Int(sources.metrics().requests_by_type[i].load(Relaxed)),
            Source::Hub(f) => Value::Int(f(sources.node.hub())),
            Source::History(f) => Value::Int(f(&sources.history).load(Relaxed)),
            Source::Addrs(f) => Value::Int(f(sources.addrs?)),
            Source::Memory(f) => Value::Int(f(sources.memory.get_or_init(memory_usage))),
            Source::CpuSeconds => Value::Float(cpu_seconds()),
            Source::Node(f) => f(sources.node),
            Source::Derived(f) => Value::Int(f(sources)),
            Source::Histogram(f) => {
                let h = f(sources.metrics());
                Value::Histogram(h.snapshot(), h.sum_us())
            }
        };
        Some(value)
    }
}
