//! Every figure an instance shows, declared once: [`COUNTERS`] ([`table`])
//! names each counter of [`crate::metrics`] (and the hub's, the history
//! store's, the per-address table's) with its JSON key, Prometheus series,
//! type, help text, source and dashboard key; [`json`] renders `/metrics`,
//! [`crate::prometheus`] renders `/metrics/prometheus` and [`feed`] samples
//! the `sys:metrics` channel from it, so the three cannot drift apart
//! (`tests/metrics.rs`). It reads the node, so it sits above it; the
//! counters themselves stay in `metrics`, below the node.
//!
//! # Files
//!
//! * `table.rs`: [`COUNTERS`], joined from its parts.
//! * `proxy.rs`: the backend proxies' part of it and their constructors.
//! * `counter.rs`: what one entry declares ([`Counter`]) and reads.
//! * `json.rs`, `feed.rs`: the `/metrics` JSON and the `sys:metrics` feed.
//! * `tests.rs`: the table's own consistency.

pub mod counter;
pub mod feed;
pub mod json;
pub mod proxy;
pub mod table;
#[cfg(test)]
mod tests;

pub use counter::{Counter, Feed, Kind, Source, Sources, Value};
pub use table::COUNTERS;
