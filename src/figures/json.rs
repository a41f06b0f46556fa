//! `/metrics`: the tutorial's JSON (`connectedClients`, `uptime`,
//! `memoryUsage`, `instanceId`), extended with every figure of
//! [`COUNTERS`] that has a JSON key.

use serde_json::{Map, Value as Json};

use super::COUNTERS;
use super::counter::{Sources, Value};

/// The `/metrics` document: one key per figure (a dotted key nests:
/// `memoryUsage.rss` is `{"memoryUsage": {"rss": …}}`).
pub fn render(sources: &Sources<'_>) -> Json {
    let mut doc = Map::new();
    for c in COUNTERS {
        let (Some(key), Some(value)) = (c.json, c.read(sources)) else {
            continue;
        };
        let Some(value) = to_json(value) else {
            continue;
        };
        let mut path = key.split('.');
        let leaf = path.next_back().unwrap_or(key);
        let mut obj = &mut doc;
        for part in path {
            let entry = obj.entry(part).or_insert_with(|| Json::Object(Map::new()));
            obj = match entry {
                Json::Object(inner) => inner,
                _ => unreachable!("{part} is both a figure and a group"),
            };
        }
        obj.insert(leaf.to_owned(), value);
    }
    Json::Object(doc)
}

/// A figure as JSON; `None` for a histogram, which has no JSON form.
pub(super) fn to_json(value: Value<'_>) -> Option<Json> {
    Some(match value {
        Value::Int(n) => Json::from(n),
        Value::Float(x) => Json::from(x),
        Value::Bool(b) => Json::from(b),
        Value::Text(s) => Json::from(s),
        Value::Histogram(..) => return None,
    })
}
