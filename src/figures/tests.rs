//! The table's own consistency: unique names, contiguous families, sources
//! that fit their expositions, the request series.

use std::collections::HashSet;

use super::counter::{Counter, Feed, Kind, Source};
use super::table::COUNTERS;

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
            Source::Histogram(_) => {
                assert_eq!(c.kind, Kind::Histogram);
                assert_eq!(c.json, None, "a histogram has no JSON form");
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
