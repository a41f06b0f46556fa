//! `/metrics/prometheus`: the counters in the Prometheus text exposition
//! format (version 0.0.4).
//!
//! Written by hand rather than through a metrics facade: every figure
//! already lives in a plain atomic owned by the part of the server that
//! counts it ([`Metrics`](crate::metrics::Metrics), the hub), so rendering
//! them is a few lines and adds no global recorder to the hot path.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use crate::metrics::{LATENCY_BUCKETS_MS, cpu_seconds, memory_usage};
use crate::node::Node;

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Render every metric of `node`.
pub fn render(node: &Node) -> String {
    let m = node.metrics();
    let hub = node.hub();
    let mut out = String::with_capacity(4096);
    let history = node.history_stats();
    let counters: [(&str, &str, u64); 16] = [
        (
            "switchboard_handshakes_throttled_total",
            "Upgrades refused by handshake admission (503 + Retry-After).",
            m.handshakes_throttled.load(Relaxed),
        ),
        (
            "switchboard_connections_total",
            "WebSocket connections accepted.",
            m.connections_total.load(Relaxed),
        ),
        (
            "switchboard_messages_in_total",
            "Frames received from clients.",
            m.messages_in.load(Relaxed),
        ),
        (
            "switchboard_messages_out_total",
            "Frames written to clients.",
            m.messages_out.load(Relaxed),
        ),
        (
            "switchboard_deliveries_queued_total",
            "Frames queued for clients by fan-out.",
            hub.delivered(),
        ),
        (
            "switchboard_publications_total",
            "Channel publications accepted.",
            m.publications.load(Relaxed),
        ),
        (
            "switchboard_errors_sent_total",
            "Error frames sent to clients.",
            m.errors_sent.load(Relaxed),
        ),
        (
            "switchboard_dead_peers_total",
            "Clients removed for not answering pings.",
            m.dead_peers.load(Relaxed),
        ),
        (
            "switchboard_oversize_closes_total",
            "Connections closed with 1009.",
            m.oversize_closes.load(Relaxed),
        ),
        (
            "switchboard_rate_limited_total",
            "Client messages refused by the rate limit.",
            m.rate_limited.load(Relaxed),
        ),
        (
            "switchboard_auth_failures_total",
            "Connections refused for a missing, invalid or expired token.",
            m.auth_failures.load(Relaxed),
        ),
        (
            "switchboard_redeliveries_total",
            "Publications resent for an overdue acknowledgement.",
            m.redeliveries.load(Relaxed),
        ),
        (
            "switchboard_bus_publish_errors_total",
            "Publishes the bus refused (unreachable).",
            m.bus_publish_errors.load(Relaxed),
        ),
        (
            "switchboard_history_evictions_total",
            "Channel streams evicted to keep history within its budget.",
            history.evictions.load(Relaxed),
        ),
        (
            "switchboard_channel_limited_total",
            "Client publishes refused by the channel creation limit.",
            m.channel_limited.load(Relaxed),
        ),
        (
            "switchboard_upgrades_refused_total",
            "Upgrades refused (origin or connection limit).",
            m.origin_refused.load(Relaxed) + m.connections_refused.load(Relaxed),
        ),
    ];
    for (name, help, value) in counters {
        metric(&mut out, name, "counter", help, value);
    }
    let _ = writeln!(
        out,
        "# HELP switchboard_slow_consumer_actions_total Actions taken on full client queues, by policy.\n\
         # TYPE switchboard_slow_consumer_actions_total counter\n\
         switchboard_slow_consumer_actions_total{{action=\"disconnect\"}} {}\n\
         switchboard_slow_consumer_actions_total{{action=\"drop_oldest\"}} {}\n\
         switchboard_slow_consumer_actions_total{{action=\"conflate_latest\"}} {}",
        hub.slow_consumers(),
        hub.dropped(),
        hub.conflated()
    );
    metric(
        &mut out,
        "switchboard_relay_dropped_total",
        "counter",
        "Client broadcast/direct frames dropped for a recipient that was behind.",
        hub.relay_dropped(),
    );
    let _ = writeln!(
        out,
        "# HELP switchboard_requests_total Valid client requests received, by type.\n\
         # TYPE switchboard_requests_total counter"
    );
    for (i, ty) in crate::protocol::RequestKind::TYPES.iter().enumerate() {
        let n = m.requests_by_type[i].load(Relaxed);
        let _ = writeln!(out, "switchboard_requests_total{{type=\"{ty}\"}} {n}");
    }
    let publications_out = m.publications_out.load(Relaxed);
    let _ = writeln!(
        out,
        "# HELP switchboard_frames_out_total Frames written to clients, by kind.\n\
         # TYPE switchboard_frames_out_total counter\n\
         switchboard_frames_out_total{{kind=\"message\"}} {publications_out}\n\
         switchboard_frames_out_total{{kind=\"other\"}} {}",
        m.messages_out
            .load(Relaxed)
            .saturating_sub(publications_out)
    );
    metric(
        &mut out,
        "switchboard_connections",
        "gauge",
        "WebSocket connections open now.",
        hub.len(),
    );
    metric(
        &mut out,
        "switchboard_ready",
        "gauge",
        "1 when ready (not draining, bus reachable).",
        u8::from(node.is_ready()),
    );
    let history_gauges: [(&str, &str, u64); 3] = [
        (
            "switchboard_history_bytes",
            "Retained channel history, in bytes as counted against history_max_bytes.",
            history.bytes.load(Relaxed),
        ),
        (
            "switchboard_history_channels",
            "Channels with retained publications.",
            history.channels.load(Relaxed),
        ),
        (
            "switchboard_history_streams",
            "Channel streams held (empty ones included), bounded by history_max_channels.",
            history.streams.load(Relaxed),
        ),
    ];
    for (name, help, value) in history_gauges {
        metric(&mut out, name, "gauge", help, value);
    }
    metric(
        &mut out,
        "switchboard_uptime_seconds",
        "gauge",
        "Seconds since start.",
        node.uptime(),
    );

    // Publish → write latency.
    let snap = m.latency.snapshot();
    let _ = writeln!(
        out,
        "# HELP switchboard_delivery_latency_ms Channel publication: publish to write, in ms.\n\
         # TYPE switchboard_delivery_latency_ms histogram"
    );
    let mut cumulative = 0;
    for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
        cumulative += snap.0[i];
        let _ = writeln!(
            out,
            "switchboard_delivery_latency_ms_bucket{{le=\"{le}\"}} {cumulative}"
        );
    }
    cumulative += snap.0[LATENCY_BUCKETS_MS.len()];
    let _ = writeln!(
        out,
        "switchboard_delivery_latency_ms_bucket{{le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(
        out,
        "switchboard_delivery_latency_ms_sum {}",
        m.latency.sum_ms()
    );
    let _ = writeln!(out, "switchboard_delivery_latency_ms_count {cumulative}");

    metric(
        &mut out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory.",
        memory_usage().rss,
    );
    metric(
        &mut out,
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory.",
        memory_usage().vm_size,
    );
    metric(
        &mut out,
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time.",
        cpu_seconds(),
    );
    out
}
