//! `/metrics`, `/metrics/prometheus` and the dashboard's `sys:metrics` feed
//! over real sockets: each shows exactly the figures `figures::COUNTERS`
//! gives it, and a figure in both endpoints has the same value in each, so
//! the three cannot drift apart. The figures in only one of them are the
//! documented exceptions below.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use support::*;
use switchboard::figures::{COUNTERS, Feed, Kind};

/// JSON keys without a Prometheus series (see `src/figures/table.rs`).
const JSON_ONLY: [&str; 5] = [
    "apiErrors",
    "apiRequests",
    "connectionsRefused",
    "instanceId",
    "originRefused",
];

/// Prometheus families without a JSON key.
const PROMETHEUS_ONLY: [&str; 7] = [
    "process_cpu_seconds_total",
    "switchboard_delivery_latency_ms",
    "switchboard_frames_out_total",
    "switchboard_proxy_calls_total",
    "switchboard_proxy_latency_ms",
    "switchboard_requests_total",
    "switchboard_upgrades_refused_total",
];

/// Figures that move between two requests: compared for presence only.
const VOLATILE: [&str; 3] = ["uptime", "memoryUsage.rss", "memoryUsage.vmSize"];

/// `/metrics` flattened: `memoryUsage.rss` for `{"memoryUsage":{"rss":…}}`.
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{prefix}{k}."), v, out);
            }
        }
        _ => {
            out.insert(prefix.trim_end_matches('.').to_owned(), v.clone());
        }
    }
}

/// A Prometheus text: its `# TYPE`s by family, and its samples by series.
struct Exposition {
    types: BTreeMap<String, String>,
    samples: BTreeMap<String, f64>,
}

fn parse(text: &str) -> Exposition {
    let mut types = BTreeMap::new();
    let mut helps = BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let fresh = types.insert(name.to_owned(), kind.to_owned()).is_none();
            assert!(fresh, "# TYPE {name} twice");
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split_once(' ').unwrap().0;
            assert!(helps.insert(name.to_owned()), "# HELP {name} twice");
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value = value.parse().unwrap_or_else(|_| panic!("{line}"));
            assert!(samples.insert(series.to_owned(), value).is_none(), "{line}");
        }
    }
    assert_eq!(helps, types.keys().cloned().collect(), "a HELP per TYPE");
    Exposition { types, samples }
}

/// The family a sample belongs to (a histogram's `_bucket`, `_sum` and
/// `_count` belong to the histogram).
fn family<'a>(series: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    let name = series.split('{').next().unwrap();
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|k| k == "histogram")
        {
            return base;
        }
    }
    name
}

#[tokio::test]
async fn json_and_prometheus_expose_the_same_counters() {
    let server = start().await;
    // Some traffic, so that most counters are not zero.
    let mut a = Client::connect(&server).await;
    a.request(json!({"type":"subscribe","channel":"m"}), 1)
        .await;
    a.request(json!({"type":"publish","channel":"m","data":1}), 2)
        .await;
    a.recv_type("message").await;
    a.send(json!({"type":"nope"})).await;
    a.recv_type("error").await;

    let (status, body) = get(&server, "/metrics").await;
    assert_eq!(status, 200);
    let mut doc = BTreeMap::new();
    flatten("", &serde_json::from_str(&body).unwrap(), &mut doc);
    let (status, text) = get(&server, "/metrics/prometheus").await;
    assert_eq!(status, 200);
    let prom = parse(&text);

    // Each endpoint shows exactly the table's figures.
    let json_keys: BTreeSet<_> = COUNTERS.iter().filter_map(|c| c.json).collect();
    assert_eq!(
        doc.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        json_keys
    );
    let series: BTreeSet<_> = prom
        .samples
        .keys()
        .filter(|s| family(s, &prom.types) == s.split('{').next().unwrap())
        .map(String::as_str)
        .collect();
    let histograms = COUNTERS.iter().filter(|c| c.kind == Kind::Histogram);
    let plain: BTreeSet<_> = COUNTERS
        .iter()
        .filter(|c| c.kind != Kind::Histogram)
        .filter_map(|c| c.prometheus)
        .collect();
    assert_eq!(series, plain);
    for c in COUNTERS {
        let Some(s) = c.prometheus else { continue };
        let name = s.split('{').next().unwrap();
        assert_eq!(prom.types[name], c.kind.as_str(), "{name}");
    }
    for h in histograms {
        let series = h.prometheus.unwrap();
        let count = match series.split_once('{') {
            Some((name, labels)) => format!("{name}_count{{{labels}"),
            None => format!("{series}_count"),
        };
        assert!(prom.samples.contains_key(&count), "{count}");
    }

    // Twins agree; the figures without a twin are the documented ones.
    let mut json_only = BTreeSet::new();
    let mut prometheus_only = BTreeSet::new();
    for c in COUNTERS {
        match (c.json, c.prometheus) {
            (Some(key), Some(series)) => {
                let j = &doc[key];
                let p = prom.samples[series];
                let j = j.as_f64().or(j.as_bool().map(|b| f64::from(u8::from(b))));
                let j = j.unwrap_or_else(|| panic!("{key} is not a number"));
                if !VOLATILE.contains(&key) {
                    assert_eq!(j, p, "{key} = {j} but {series} = {p}");
                }
            }
            (Some(key), None) => {
                json_only.insert(key);
            }
            (None, Some(series)) => {
                prometheus_only.insert(series.split('{').next().unwrap());
            }
            (None, None) => unreachable!("{c:?}"),
        }
    }
    assert_eq!(json_only, BTreeSet::from(JSON_ONLY));
    assert_eq!(prometheus_only, BTreeSet::from(PROMETHEUS_ONLY));
    // The one sum.
    let refused =
        doc["originRefused"].as_f64().unwrap() + doc["connectionsRefused"].as_f64().unwrap();
    assert_eq!(prom.samples["switchboard_upgrades_refused_total"], refused);
    // Traffic shows in both.
    assert!(doc["messagesIn"].as_u64().unwrap() >= 3);
    assert!(doc["errorsSent"].as_u64().unwrap() >= 1);
    assert_eq!(doc["instanceId"], server.node.instance_id());
    assert_eq!(doc["ready"], true);
    server.shutdown().await;
}

#[tokio::test]
async fn the_dashboard_feed_shows_its_figures() {
    let server = start().await;
    let mut a = Client::connect(&server).await;
    a.request(json!({"type":"subscribe","channel":"sys:metrics"}), 1)
        .await;
    let m = a.recv_type("message").await;
    assert_eq!(m["channel"], "sys:metrics");
    let data = m["data"].as_object().unwrap();
    let mut want = BTreeSet::from(["timestamp"]);
    for c in COUNTERS {
        match c.feed {
            Feed::No => {}
            Feed::Now(k) | Feed::Rate(k) => {
                want.insert(k);
            }
            Feed::Quantiles(qs) => want.extend(qs.iter().map(|(k, _)| *k)),
        }
    }
    assert_eq!(
        data.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        want
    );
    // The tutorial-era names the dashboard page reads.
    assert_eq!(data["connections"], 1);
    assert_eq!(data["instanceId"], server.node.instance_id());
    assert!(data["framesInPerSecond"].is_u64());
    assert!(data["deliveriesPerSecond"].is_u64());
    assert!(data["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
    for k in ["deliveryLatencyMsP50", "deliveryLatencyMsP99"] {
        assert!(data[k].is_null() || data[k].is_f64(), "{k}");
    }
    server.shutdown().await;
}
