//! `/metrics/prometheus`: the counters in the Prometheus text exposition
//! format (version 0.0.4).
//!
//! Written by hand rather than through a metrics facade: every figure
//! already lives in a plain atomic owned by the part of the server that
//! counts it ([`Metrics`](crate::metrics::Metrics), the hub), so rendering
//! them is a few lines and adds no global recorder to the hot path. Which
//! figures, under which names, is [`COUNTERS`]: the series there, in its
//! order.

use std::fmt::Write;

use crate::figures::{COUNTERS, Sources, Value};
use crate::metrics::{LATENCY_BUCKETS_US, LatencySnapshot};

/// Render every figure of [`COUNTERS`] that names a Prometheus series.
pub fn render(sources: &Sources<'_>) -> String {
    let mut out = String::with_capacity(4096);
    let mut family = "";
    for c in COUNTERS {
        let (Some(series), Some(value)) = (c.prometheus, c.read(sources)) else {
            continue;
        };
        // Prometheus values are numbers: text is JSON only.
        if let Value::Text(_) = value {
            continue;
        }
        // `# HELP` and `# TYPE` once per family: the series of one follow
        // each other.
        let name = series.split('{').next().unwrap_or(series);
        if name != family {
            family = name;
            let (help, kind) = (c.help, c.kind.as_str());
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
        match value {
            Value::Int(n) => sample(&mut out, series, n),
            Value::Float(x) => sample(&mut out, series, x),
            Value::Bool(b) => sample(&mut out, series, u8::from(b)),
            Value::Histogram(snap, sum_us) => histogram(&mut out, series, &snap, sum_us),
            Value::Text(_) => {}
        }
    }
    out
}

/// One sample line.
fn sample(out: &mut String, series: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{series} {value}");
}

/// The `_bucket` (cumulative), `_sum` and `_count` lines of histogram
/// `series` (a name, with its labels if any), in ms (the bounds and the
/// sum are kept in µs: `le="0.01"` is 10 µs).
fn histogram(out: &mut String, series: &str, snap: &LatencySnapshot, sum_us: u64) {
    let ms = |us: u64| us as f64 / 1000.0;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.trim_end_matches('}')),
        None => (series, ""),
    };
    let (braced, sep) = match labels {
        "" => (String::new(), ""),
        l => (format!("{{{l}}}"), ","),
    };
    let mut cumulative = 0;
    for (i, &le) in LATENCY_BUCKETS_US.iter().enumerate() {
        cumulative += snap.0[i];
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}",
            ms(le)
        );
    }
    cumulative += snap.0[LATENCY_BUCKETS_US.len()];
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(out, "{name}_sum{braced} {}", ms(sum_us));
    let _ = writeln!(out, "{name}_count{braced} {cumulative}");
}
