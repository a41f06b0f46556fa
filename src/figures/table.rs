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
//! counts, the latency histogram and the CPU time are Prometheus only.
//! `tests/metrics.rs` holds both endpoints to this list.

use std::sync::atomic::Ordering::Relaxed;

use crate::admission::AddrTable;
use crate::hub::Hub;

use super::counter::{Counter, Feed, Kind, Source, Value};

const SLOW_CONSUMER_ACTIONS: &str = "Actions taken on full client queues, by policy.";
const REQUESTS: &str = "Valid client requests received, by type.";
const FRAMES_OUT: &str = "Frames written to clients, by kind.";

/// Every figure, in the order of `/metrics/prometheus` (the JSON sorts its
/// keys).
pub const COUNTERS: &[Counter] = &[
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
        feed: Feed::Rate("messagesPerSecond"),
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
        feed: Feed::No,
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
        help: "1 when ready (not draining, bus reachable).",
        source: Source::Node(|n| Value::Bool(n.is_ready())),
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
        help: "Channel publication: publish to write, in ms.",
        source: Source::Latency,
        feed: Feed::Quantiles(&[
            ("deliveryLatencyMsP50", 0.5),
            ("deliveryLatencyMsP99", 0.99),
        ]),
    },
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// The family of a Prometheus series: its name without labels.
    fn family(series: &str) -> &str {
        series.split('{').next().unwrap_or(series)
    }

    #[test]
    fn names_are_unique() {
        let mut json = HashSet::new();
        let mut prometheus = HashSet::new();
        let mut feed = HashSet::new();
        for c in COUNTERS {
            assert!(c.json.is_some() || c.prometheus.is_some(), "{c:?}");
            if let Some(k) = c.json {
                assert!(json.insert(k), "JSON key {k} twice");
            }
            if let Some(s) = c.prometheus {
                assert!(prometheus.insert(s), "series {s} twice");
            }
            let keys = match c.feed {
                Feed::No => vec![],
                Feed::Now(k) | Feed::Rate(k) => vec![k],
                Feed::Quantiles(qs) => qs.iter().map(|(k, _)| *k).collect(),
            };
            for k in keys {
                assert!(feed.insert(k), "feed key {k} twice");
            }
        }
        assert!(!feed.contains("timestamp"), "the feed adds its own");
    }

    #[test]
    fn families_are_contiguous_and_agree() {
        let mut seen = HashSet::new();
        let mut last: Option<&Counter> = None;
        for c in COUNTERS.iter().filter(|c| c.prometheus.is_some()) {
            let name = family(c.prometheus.unwrap());
            match last {
                Some(l) if family(l.prometheus.unwrap()) == name => {
                    assert_eq!((l.kind, l.help), (c.kind, c.help), "{name}");
                }
                _ => assert!(seen.insert(name), "family {name} split"),
            }
            last = Some(c);
        }
    }

    #[test]
    fn sources_fit_the_expositions() {
        for c in COUNTERS {
            match c.source {
                Source::Latency => {
                    assert_eq!(c.kind, Kind::Histogram);
                    assert_eq!(c.json, None, "a histogram has no JSON form");
                    assert!(matches!(c.feed, Feed::Quantiles(_)));
                }
                Source::Addrs(_) => assert_eq!(c.feed, Feed::No, "the feed has no address table"),
                _ => {
                    assert_ne!(c.kind, Kind::Histogram);
                    assert!(!matches!(c.feed, Feed::Quantiles(_)));
                }
            }
        }
    }

    #[test]
    fn request_series_follow_the_request_types() {
        let types = crate::protocol::RequestKind::TYPES;
        let series: Vec<_> = COUNTERS
            .iter()
            .filter_map(|c| match c.source {
                Source::Requests(i) => Some((i, c.prometheus)),
                _ => None,
            })
            .collect();
        assert_eq!(series.len(), types.len());
        for (n, (i, name)) in series.into_iter().enumerate() {
            assert_eq!(n, i);
            let want = format!("switchboard_requests_total{{type=\"{}\"}}", types[i]);
            assert_eq!(name, Some(want.as_str()));
        }
    }
}
