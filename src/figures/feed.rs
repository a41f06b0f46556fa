//! The dashboard's `sys:metrics` figures, sampled once a second from the
//! [`COUNTERS`] that name a [`Feed`] key (published by
//! `assets::publish_metrics`).

use serde_json::{Map, Value as Json};

use super::COUNTERS;
use super::counter::{Feed, Sources, Value};
use super::json::to_json;
use crate::node::Node;

/// The feed's state between samples: the previous value of each rate and
/// histogram, by position in [`COUNTERS`].
pub struct FeedSampler {
    last: Vec<Option<Value<'static>>>,
}

impl FeedSampler {
    /// Rates start from zero (the first sample counts since start-up);
    /// histogram windows from now.
    pub fn new(node: &Node) -> Self {
        let sources = Sources::new(node, None);
        let last = COUNTERS
            .iter()
            .map(|c| match (c.feed, c.read(&sources)) {
                (Feed::Rate(_), _) => Some(Value::Int(0)),
                (Feed::Quantiles(_), Some(Value::Histogram(snap, sum))) => {
                    Some(Value::Histogram(snap, sum))
                }
                _ => None,
            })
            .collect();
        FeedSampler { last }
    }

    /// The figures now (plus `timestamp`, in ms); each rate and histogram
    /// window runs from the previous sample.
    pub fn sample(&mut self, node: &Node) -> Json {
        let sources = Sources::new(node, None);
        let mut figures = Map::new();
        for (c, last) in COUNTERS.iter().zip(&mut self.last) {
            if c.feed == Feed::No {
                continue;
            }
            let Some(value) = c.read(&sources) else {
                continue;
            };
            match (c.feed, value, *last) {
                (Feed::Now(key), value, _) => {
                    if let Some(v) = to_json(value) {
                        figures.insert(key.into(), v);
                    }
                }
                (Feed::Rate(key), Value::Int(now), Some(Value::Int(before))) => {
                    figures.insert(key.into(), now.saturating_sub(before).into());
                    *last = Some(Value::Int(now));
                }
                (
                    Feed::Quantiles(qs),
                    Value::Histogram(now, sum),
                    Some(Value::Histogram(before, _)),
                ) => {
                    let window = now.since(&before);
                    for &(key, q) in qs {
                        figures.insert(key.into(), window.quantile_ms(q).into());
                    }
                    *last = Some(Value::Histogram(now, sum));
                }
                _ => {}
            }
        }
        figures.insert("timestamp".into(), crate::protocol::now_ms().into());
        Json::Object(figures)
    }
}
