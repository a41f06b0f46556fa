//! [`COUNTERS`]: every figure the server exposes, declared once. `/metrics`
//! ([`super::json`]), `/metrics/prometheus` ([`crate::prometheus`]) and the
//! dashboard's `sys:metrics` feed ([`super::feed`]) are rendered from it, so
//! a figure added here appears in each of them that it names, and the
//! three cannot drift apart.
//!
//! Exceptions, on purpose: `instanceId` is text (JSON and the feed only);
//! `originRefused` and `connectionsRefused` are one sum in Prometheus
//! (`switchboard_upgrades_refused_total`); `apiRequests` and `apiErrors`
//! have no Prometheus series yet; the per-request-type and per-frame-kind
//! counts, the latency histograms, the backend proxies' figures and the CPU
//! time are Prometheus only.
//! `tests/metrics.rs` holds both endpoints to this list.

use std::sync::atomic::Ordering::Relaxed;

use std::sync::atomic::AtomicU64;

use crate::admission::AddrTable;
use crate::events::EventStats;
use crate::hub::Hub;
use crate::node::Node;

use super::counter::{Counter, Feed, Kind, Source, Value};
use super::proxy;

const SLOW_CONSUMER_ACTIONS: &str = "Actions taken on full client queues, by policy.";
const REQUESTS: &str = "Valid client requests received, by type.";
const FRAMES_OUT: &str = "Frames written to clients, by kind.";

/// A lifecycle-event figure (0 while events are off).
fn events(node: &Node, f: fn(&EventStats) -> &AtomicU64) -> Value<'_> {
    Value::Int(node.events().map_or(0, |e| f(e.stats()).load(Relaxed)))
}

/// Every figure, in the order of `/metrics/prometheus` (the JSON sorts its
/// keys): the backend proxies' figures ([`proxy::FIGURES`]) sit between
/// [`BEFORE_PROXIES`] and [`AFTER_PROXIES`].
pub const COUNTERS: &[Counter] = &joined::<
    { BEFORE_PROXIES.len() + proxy::FIGURES.len() + AFTER_PROXIES.len() },
>([BEFORE_PROXIES, proxy::FIGURES, AFTER_PROXIES]);

/// `parts`, one after the other, as one array (a const slice cannot be
/// spliced into another's literal). `N` is their total length.
const fn joined<const N: usize>(parts: [&[Counter]; 3]) -> [Counter; N] {
    let mut out = [parts[0][0]; N];
    let mut i = 0;
    let mut p = 0;
    while p < parts.len() {
        let mut j = 0;
        while j < parts[p].len() {
            out[i] = parts[p][j];
            i += 1;
            j += 1;
        }
        p += 1;
    }
    assert!(i == N, "N is the parts' total length");
    out
}

/// The figures before the backend proxies': connections, requests,
/// frames, queues, the bus, history, lifecycle events, latency.
const BEFORE_PROXIES: &[Counter] = &[
    Counter {
        json: Some("handshakesThrottled"),
        prometheus: Some("switchboard_handshakes_throttled_total"),
        kind: Kind::Counter,
        help: "Upgrades refused by handshake admission (503 + Retry-After).",
        source: Source::Metrics(|m| &m.handshakes_throttled),
        feed: Feed::No,
    },
    Counter {
        json: Some("connectionsTotal"),
        prometheus: Some("switchboard_connections_total"),
        kind: Kind::Counter,
        help: "WebSocket connections accepted.",
        source: Source::Metrics(|m| &m.connections_total),
        feed: Feed::No,
    },
    Counter {
        json: Some("messagesIn"),
        prometheus: Some("switchboard_messages_in_total"),
        kind: Kind::Counter,
        help: "Frames received from clients.",
        source: Source::Metrics(|m| &m.messages_in),
        feed: Feed::Rate("framesInPerSecond"),
    },
    Counter {
        json: Some("messagesOut"),
        prometheus: Some("switchboard_messages_out_total"),
        kind: Kind::Counter,
        help: "Frames written to clients.",
        source: Source::Metrics(|m| &m.messages_out),
        feed: Feed::No,
    },
    Counter {
        json: Some("deliveriesQueued"),
        prometheus: Some("switchboard_deliveries_queued_total"),
        kind: Kind::Counter,
        help: "Frames queued for clients by fan-out.",
        source: Source::Hub(Hub::delivered),
        feed: Feed::Rate("deliveriesPerSecond"),
    },
    Counter {
        json: Some("publications"),
        prometheus: Some("switchboard_publications_total"),
        kind: Kind::Counter,
        help: "Channel publications accepted.",
        source: Source::Metrics(|m| &m.publications),
        feed: Feed::No,
    },
    Counter {
        json: Some("errorsSent"),
        prometheus: Some("switchboard_errors_sent_total"),
        kind: Kind::Counter,
        help: "Error frames sent to clients.",
        source: Source::Metrics(|m| &m.errors_sent),
        feed: Feed::No,
    },
    Counter {
        json: Some("deadPeers"),
        prometheus: Some("switchboard_dead_peers_total"),
        kind: Kind::Counter,
        help: "Clients removed for not answering pings.",
        source: Source::Metrics(|m| &m.dead_peers),
        feed: Feed::No,
    },
    Counter {
        json: Some("oversizeCloses"),
        prometheus: Some("switchboard_oversize_closes_total"),
        kind: Kind::Counter,
        help: "Connections closed with 1009.",
        source: Source::Metrics(|m| &m.oversize_closes),
        feed: Feed::No,
    },
    Counter {
        json: Some("rateLimited"),
        prometheus: Some("switchboard_rate_limited_total"),
        kind: Kind::Counter,
        help: "Client messages refused by the rate limit.",
        source: Source::Metrics(|m| &m.rate_limited),
        feed: Feed::No,
    },
    Counter {
        json: Some("authFailures"),
        prometheus: Some("switchboard_auth_failures_total"),
        kind: Kind::Counter,
        help: "Connections refused for a missing, invalid or expired token.",
        source: Source::Metrics(|m| &m.auth_failures),
        feed: Feed::No,
    },
    Counter {
        json: Some("redeliveries"),
        prometheus: Some("switchboard_redeliveries_total"),
        kind: Kind::Counter,
        help: "Publications resent for an overdue acknowledgement.",
        source: Source::Metrics(|m| &m.redeliveries),
        feed: Feed::No,
    },
    Counter {
        json: Some("busPublishErrors"),
        prometheus: Some("switchboard_bus_publish_errors_total"),
        kind: Kind::Counter,
        help: "Publishes the bus refused (unreachable).",
        source: Source::Metrics(|m| &m.bus_publish_errors),
        feed: Feed::No,
    },
    Counter {
        json: Some("historyEvictions"),
        prometheus: Some("switchboard_history_evictions_total"),
        kind: Kind::Counter,
        help: "Channel streams evicted to keep history within its budget.",
        source: Source::History(|h| &h.evictions),
        feed: Feed::No,
    },
    Counter {
        json: Some("channelLimited"),
        prometheus: Some("switchboard_channel_limited_total"),
        kind: Kind::Counter,
        help: "Client publishes refused by the channel creation limit.",
        source: Source::Metrics(|m| &m.channel_limited),
        feed: Feed::No,
    },
    // Lifecycle events (issue 17): zero while events_url is unset.
    Counter {
        json: Some("eventsEmitted"),
        prometheus: Some("switchboard_events_emitted_total"),
        kind: Kind::Counter,
        help: "Lifecycle events written to the bus (durable).",
        source: Source::Node(|n| events(n, |s| &s.emitted)),
        feed: Feed::No,
    },
    Counter {
        json: Some("eventsFailed"),
        prometheus: Some("switchboard_events_failed_total"),
        kind: Kind::Counter,
        help: "Connection changes whose lifecycle events could not be written to the bus.",
        source: Source::Node(|n| events(n, |s| &s.failed)),
        feed: Feed::No,
    },
    Counter {
        json: Some("eventsDelivered"),
        prometheus: Some("switchboard_events_delivered_total"),
        kind: Kind::Counter,
        help: "Lifecycle events acknowledged by the backend (2xx), delivered by this instance.",
        source: Source::Node(|n| events(n, |s| &s.delivered)),
        feed: Feed::No,
    },
    Counter {
        json: Some("eventsRetried"),
        prometheus: Some("switchboard_events_retried_total"),
        kind: Kind::Counter,
        help: "Failed lifecycle-event deliveries (batches), retried with backoff.",
        source: Source::Node(|n| events(n, |s| &s.retried)),
        feed: Feed::No,
    },
    Counter {
        json: Some("eventsDeadLettered"),
        prometheus: Some("switchboard_events_dead_lettered_total"),
        kind: Kind::Counter,
        help: "Lifecycle events dead-lettered after events_max_age.",
        source: Source::Node(|n| events(n, |s| &s.dead_lettered)),
        feed: Feed::No,
    },
    Counter {
        json: Some("eventsDropped"),
        prometheus: Some("switchboard_events_dropped_total"),
        kind: Kind::Counter,
        help: "Lifecycle events dropped from a full event log (memory bus).",
        source: Source::Node(|n| events(n, |s| &s.dropped)),
        feed: Feed::No,
    },
    Counter {
        json: Some("eventsDeliveryMs"),
        prometheus: Some("switchboard_events_delivery_ms_total"),
        kind: Kind::Counter,
        help: "Sum over delivered lifecycle events of the time from emission to acknowledgement, in ms.",
        source: Source::Node(|n| events(n, |s| &s.delivery_ms)),
        feed: Feed::No,
    },
    // JSON only: Prometheus has the sum, `switchboard_upgrades_refused_total`.
    Counter {
        json: Some("originRefused"),
        prometheus: None,
        kind: Kind::Counter,
        help: "Upgrades refused: origin not allowed.",
        source: Source::Metrics(|m| &m.origin_refused),
        feed: Feed::No,
    },
    // JSON only: Prometheus has the sum, `switchboard_upgrades_refused_total`.
    Counter {
        json: Some("connectionsRefused"),
        prometheus: None,
        kind: Kind::Counter,
        help: "Upgrades refused: the instance was at max_connections.",
        source: Source::Metrics(|m| &m.connections_refused),
        feed: Feed::No,
    },
    // Prometheus only: `originRefused` + `connectionsRefused`.
    Counter {
        json: None,
        prometheus: Some("switchboard_upgrades_refused_total"),
        kind: Kind::Counter,
        help: "Upgrades refused (origin or connection limit).",
        source: Source::Derived(|s| {
            let m = s.metrics();
            m.origin_refused.load(Relaxed) + m.connections_refused.load(Relaxed)
        }),
        feed: Feed::No,
    },
    Counter {
        json: Some("slowConsumers"),
        prometheus: Some(r#"switchboard_slow_consumer_actions_total{action="disconnect"}"#),
        kind: Kind::Counter,
        help: SLOW_CONSUMER_ACTIONS,
        source: Source::Hub(Hub::slow_consumers),
        feed: Feed::No,
    },
    Counter {
        json: Some("droppedOldest"),
        prometheus: Some(r#"switchboard_slow_consumer_actions_total{action="drop_oldest"}"#),
        kind: Kind::Counter,
        help: SLOW_CONSUMER_ACTIONS,
        source: Source::Hub(Hub::dropped),
        feed: Feed::No,
    },
    Counter {
        json: Some("conflated"),
        prometheus: Some(r#"switchboard_slow_consumer_actions_total{action="conflate_latest"}"#),
        kind: Kind::Counter,
        help: SLOW_CONSUMER_ACTIONS,
        source: Source::Hub(Hub::conflated),
        feed: Feed::No,
    },
    Counter {
        json: Some("relayDropped"),
        prometheus: Some("switchboard_relay_dropped_total"),
        kind: Kind::Counter,
        help: "Client broadcast/direct frames dropped for a recipient that was behind.",
        source: Source::Hub(Hub::relay_dropped),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some(r#"switchboard_requests_total{type="broadcast"}"#),
        kind: Kind::Counter,
        help: REQUESTS,
        source: Source::Requests(0),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some(r#"switchboard_requests_total{type="direct"}"#),
        kind: Kind::Counter,
        help: REQUESTS,
        source: Source::Requests(1),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some(r#"switchboard_requests_total{type="subscribe"}"#),
        kind: Kind::Counter,
        help: REQUESTS,
        source: Source::Requests(2),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some(r#"switchboard_requests_total{type="unsubscribe"}"#),
        kind: Kind::Counter,
        help: REQUESTS,
        source: Source::Requests(3),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some(r#"switchboard_requests_total{type="publish"}"#),
        kind: Kind::Counter,
        help: REQUESTS,
        source: Source::Requests(4),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some(r#"switchboard_requests_total{type="presence"}"#),
        kind: Kind::Counter,
        help: REQUESTS,
        source: Source::Requests(5),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some(r#"switchboard_requests_total{type="history"}"#),
        kind: Kind::Counter,
        help: REQUESTS,
        source: Source::Requests(6),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some(r#"switchboard_requests_total{type="ping"}"#),
        kind: Kind::Counter,
        help: REQUESTS,
        source: Source::Requests(7),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some(r#"switchboard_requests_total{type="auth"}"#),
        kind: Kind::Counter,
        help: REQUESTS,
        source: Source::Requests(8),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some(r#"switchboard_requests_total{type="ack"}"#),
        kind: Kind::Counter,
        help: REQUESTS,
        source: Source::Requests(9),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some(r#"switchboard_requests_total{type="rpc"}"#),
        kind: Kind::Counter,
        help: REQUESTS,
        source: Source::Requests(10),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some(r#"switchboard_frames_out_total{kind="message"}"#),
        kind: Kind::Counter,
        help: FRAMES_OUT,
        source: Source::Metrics(|m| &m.publications_out),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some(r#"switchboard_frames_out_total{kind="other"}"#),
        kind: Kind::Counter,
        help: FRAMES_OUT,
        source: Source::Derived(|s| {
            let m = s.metrics();
            m.messages_out
                .load(Relaxed)
                .saturating_sub(m.publications_out.load(Relaxed))
        }),
        feed: Feed::No,
    },
    Counter {
        json: Some("connectedClients"),
        prometheus: Some("switchboard_connections"),
        kind: Kind::Gauge,
        help: "WebSocket connections open now.",
        source: Source::Hub(|h| h.len() as u64),
        feed: Feed::Now("connections"),
    },
    Counter {
        json: Some("sseConnections"),
        prometheus: Some("switchboard_sse_connections"),
        kind: Kind::Gauge,
        help: "Of the connections open now, those over Server-Sent Events.",
        source: Source::Derived(|s| s.node().sse_inboxes().len() as u64),
        feed: Feed::No,
    },
    Counter {
        json: Some("ready"),
        prometheus: Some("switchboard_ready"),
        kind: Kind::Gauge,
        help: "1 when ready (/readyz: not draining; with ready_requires_bus, bus reachable too).",
        source: Source::Node(|n| Value::Bool(n.is_ready())),
        feed: Feed::No,
    },
    Counter {
        json: Some("busUp"),
        prometheus: Some("switchboard_bus_up"),
        kind: Kind::Gauge,
        help: "1 while the bus is reachable (always 1 on the memory bus).",
        source: Source::Node(|n| Value::Bool(n.bus_up())),
        feed: Feed::No,
    },
    Counter {
        json: Some("busReceivedMessages"),
        prometheus: Some("switchboard_bus_received_messages_total"),
        kind: Kind::Counter,
        help: "Messages received from the bus, every subscription (Pub/Sub only; 0 elsewhere).",
        source: Source::Node(|n| Value::Int(n.bus_traffic().messages)),
        feed: Feed::No,
    },
    Counter {
        json: Some("busReceivedBytes"),
        prometheus: Some("switchboard_bus_received_bytes_total"),
        kind: Kind::Counter,
        help: "Payload bytes of the messages received from the bus (Pub/Sub only; 0 elsewhere).",
        source: Source::Node(|n| Value::Int(n.bus_traffic().bytes)),
        feed: Feed::No,
    },
    Counter {
        json: Some("busSubscriptions"),
        prometheus: Some("switchboard_bus_subscriptions"),
        kind: Kind::Gauge,
        help: "Bus subscriptions read now (Pub/Sub: the control topic and the open channel shards; 0 elsewhere).",
        source: Source::Node(|n| Value::Int(n.bus_traffic().subscriptions)),
        feed: Feed::No,
    },
    Counter {
        json: Some("historyBytes"),
        prometheus: Some("switchboard_history_bytes"),
        kind: Kind::Gauge,
        help: "Retained channel history, in bytes as counted against history_max_bytes.",
        source: Source::History(|h| &h.bytes),
        feed: Feed::No,
    },
    Counter {
        json: Some("historyChannels"),
        prometheus: Some("switchboard_history_channels"),
        kind: Kind::Gauge,
        help: "Channels with retained publications.",
        source: Source::History(|h| &h.channels),
        feed: Feed::No,
    },
    Counter {
        json: Some("historyStreams"),
        prometheus: Some("switchboard_history_streams"),
        kind: Kind::Gauge,
        help: "Channel streams held (empty ones included), bounded by history_max_channels.",
        source: Source::History(|h| &h.streams),
        feed: Feed::No,
    },
    Counter {
        json: Some("uptime"),
        prometheus: Some("switchboard_uptime_seconds"),
        kind: Kind::Gauge,
        help: "Seconds since start.",
        source: Source::Node(|n| Value::Float(n.uptime())),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some("switchboard_delivery_latency_ms"),
        kind: Kind::Histogram,
        help: "Channel publication: fan-out on this instance to socket write, in ms (10 us resolution).",
        source: Source::Histogram(|m| &m.latency),
        feed: Feed::Quantiles(&[
            ("deliveryLatencyMsP50", 0.5),
            ("deliveryLatencyMsP99", 0.99),
        ]),
    },
];

/// The figures after the backend proxies': the process (memory, CPU),
/// the per-address table, the instance id, the server API.
const AFTER_PROXIES: &[Counter] = &[
    Counter {
        json: Some("memoryUsage.rss"),
        prometheus: Some("process_resident_memory_bytes"),
        kind: Kind::Gauge,
        help: "Resident memory.",
        source: Source::Memory(|u| u.rss),
        feed: Feed::No,
    },
    Counter {
        json: Some("memoryUsage.vmSize"),
        prometheus: Some("process_virtual_memory_bytes"),
        kind: Kind::Gauge,
        help: "Virtual memory.",
        source: Source::Memory(|u| u.vm_size),
        feed: Feed::No,
    },
    Counter {
        json: None,
        prometheus: Some("process_cpu_seconds_total"),
        kind: Kind::Counter,
        help: "User and system CPU time.",
        source: Source::CpuSeconds,
        feed: Feed::No,
    },
    Counter {
        json: Some("connectionsRefusedPerAddress"),
        prometheus: Some("switchboard_connections_refused_per_address_total"),
        kind: Kind::Counter,
        help: "Connections refused for their client address (max_connections_per_ip, or the address table full).",
        source: Source::Addrs(AddrTable::refused_connections),
        feed: Feed::No,
    },
    Counter {
        json: Some("handshakesThrottledPerAddress"),
        prometheus: Some("switchboard_handshakes_throttled_per_address_total"),
        kind: Kind::Counter,
        help: "Upgrades refused by the per-address handshake admission (429).",
        source: Source::Addrs(AddrTable::throttled),
        feed: Feed::No,
    },
    Counter {
        json: Some("clientAddresses"),
        prometheus: Some("switchboard_client_addresses"),
        kind: Kind::Gauge,
        help: "Client addresses remembered by the per-address limits.",
        source: Source::Addrs(|a| a.len() as u64),
        feed: Feed::No,
    },
    // JSON only: a string.
    Counter {
        json: Some("instanceId"),
        prometheus: None,
        kind: Kind::Gauge,
        help: "This instance's id (--instance-id, GAE_INSTANCE, SWITCHBOARD_INSTANCE_ID, or random).",
        source: Source::Node(|n| Value::Text(n.instance_id())),
        feed: Feed::Now("instanceId"),
    },
    // JSON only, so far.
    Counter {
        json: Some("apiRequests"),
        prometheus: None,
        kind: Kind::Counter,
        help: "Requests to the server HTTP API (/api/*).",
        source: Source::Metrics(|m| &m.api_requests),
        feed: Feed::No,
    },
    // JSON only, so far.
    Counter {
        json: Some("apiErrors"),
        prometheus: None,
        kind: Kind::Counter,
        help: "Server API requests answered with an error (4xx or 5xx).",
        source: Source::Metrics(|m| &m.api_errors),
        feed: Feed::No,
    },
];
