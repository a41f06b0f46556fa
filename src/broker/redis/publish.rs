//! Publish and history on the Redis bus: publications (through
//! `scripts/publish.lua`), control messages (broadcast, join, leave),
//! history reads (through `scripts/history.lua`), and decoding what
//! arrives on the pub/sub connection for the handler.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{Control, HistoryOptions, HistoryResult, Inner, NewPublication, bus_error};
use crate::error::{ClientError, Result};
use crate::ids::random_base36;
use crate::protocol::is_internal_channel;
use crate::protocol::{Publication, StreamPosition};

/// The epoch written on user-addressed messages, which have none.
const NO_EPOCH: &str = "-";

/// A publication on the bus and in the stream, without its offset (the
/// script assigns it).
#[derive(Serialize, Deserialize)]
struct Body {
    /// The publisher's payload, never re-encoded.
    data: Arc<RawValue>,
    /// The publishing client (`None`: the server API).
    #[serde(rename = "senderId")]
    sender_id: Option<Arc<str>>,
    /// When the server accepted it, ms since the Unix epoch.
    timestamp: u64,
}

impl Inner {
    /// `Broker::publish`: through the publish script, or a bare `PUBLISH`
    /// for a user-addressed message.
    pub(super) async fn publish(
        self: &Arc<Self>,
        channel: &str,
        publication: NewPublication,
        history: HistoryOptions,
    ) -> Result<StreamPosition> {
        let mut conn = self.conn()?;
        let body = serde_json::to_string(&Body {
            data: publication.data.clone(),
            sender_id: publication.sender_id.clone(),
            timestamp: publication.timestamp,
        })
        .map_err(bus_error)?;
        if is_internal_channel(channel) {
            // A user-addressed direct message: at most once, no history,
            // no offset, no key; only the instances holding the user's
            // connections listen on the topic.
            let _: u64 = redis::cmd(self.keys.publish_cmd())
                .arg(self.keys.topic(channel))
                .arg(format!("p {NO_EPOCH} 0 {body}"))
                .query_async(&mut conn)
                .await
                .map_err(bus_error)?;
            return Ok(StreamPosition {
                epoch: NO_EPOCH.into(),
                offset: 0,
            });
        }
        let ttl_ms = u64::try_from(history.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let conditions = &publication.conditions;
        let (idempotency_key, keyed) = match &conditions.idempotency_key {
            Some(key) => (self.keys.idempotency(channel, key), "1"),
            None => (self.keys.meta(channel), ""),
        };
        let window_ms = u64::try_from(conditions.idempotency_window.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let expected = conditions
            .expected_offset
            .map_or_else(String::new, |o| o.to_string());
        let keys = [
            self.keys.meta(channel),
            self.keys.stream(channel),
            self.keys.generation(channel),
            idempotency_key,
        ];
        let args = [
            self.keys.topic(channel),
            body,
            history.size.to_string(),
            ttl_ms.to_string(),
            random_base36(8),
            random_base36(8),
            keyed.to_string(),
            window_ms.to_string(),
            expected,
            self.keys.publish_cmd().to_string(),
        ];
        let (epoch, offset, outcome) = self
            .run_publish(&mut conn, keys.into(), args.into())
            .await?;
        let position = StreamPosition {
            epoch: epoch.into(),
            offset,
        };
        match (outcome, conditions.expected_offset) {
            (2, Some(expected)) => Err(ClientError::offset_mismatch(expected, position).into()),
            _ => Ok(position),
        }
    }

    /// `Broker::publish_control`: a broadcast on the broadcast topic
    /// (through the outbox, `outbox.rs`), a join or leave on its channel's
    /// topic (answered by Redis before this returns).
    pub(super) async fn publish_control(&self, control: Control) -> Result<()> {
        // A broadcast travels as a plain struct: serde cannot buffer the
        // raw JSON `data` through the internally tagged `Control`.
        let (topic, payload) = match control {
            Control::Broadcast {
                sender_id,
                data,
                timestamp,
            } => {
                let body = Body {
                    data,
                    sender_id,
                    timestamp,
                };
                let json = serde_json::to_string(&body).map_err(bus_error)?;
                return self.queue_broadcast(format!("b {json}")).await;
            }
            Control::Join { ref channel, .. } | Control::Leave { ref channel, .. } => {
                let json = serde_json::to_string(&control).map_err(bus_error)?;
                (self.keys.topic(channel), format!("c {json}"))
            }
        };
        let mut conn = self.conn()?;
        let _: u64 = redis::cmd(self.keys.publish_cmd())
            .arg(topic)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .map_err(bus_error)?;
        Ok(())
    }

    /// Read history (the shared implementation of `Broker::history` and,
    /// `newest_first`, newest first).
    pub(super) async fn read_history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        newest_first: bool,
        history: HistoryOptions,
    ) -> Result<HistoryResult> {
        let mut conn = self.conn()?;
        let limit: i64 = match limit {
            0 => 0,
            n => i64::try_from(n).unwrap_or(-1),
        };
        let (epoch, top, entries): (String, u64, Vec<(u64, String)>) = self
            .scripts
            .history
            .key(self.keys.meta(channel))
            .key(self.keys.stream(channel))
            .key(self.keys.generation(channel))
            .arg(since.map_or("", |s| &*s.epoch))
            .arg(since.map_or(0, |s| s.offset))
            .arg(limit)
            .arg(random_base36(8))
            .arg(history.size)
            .arg(if newest_first { "1" } else { "" })
            .arg(if self.keys.cluster { "1" } else { "" })
            .invoke_async(&mut conn)
            .await
            .map_err(bus_error)?;
        let mut publications = Vec::with_capacity(entries.len());
        for (offset, body) in entries {
            let body: Body = serde_json::from_str(&body).map_err(bus_error)?;
            publications.push(Publication {
                offset,
                data: body.data,
                sender_id: body.sender_id,
                timestamp: body.timestamp,
            });
        }
        Ok(HistoryResult {
            publications,
            top: StreamPosition {
                epoch: epoch.into(),
                offset: top,
            },
        })
    }

    /// Hand one pub/sub message to the handler. On a cluster, a
    /// publication that skips offsets of the epoch delivered here is not
    /// handed over: its channel is returned, for a replay from history
    /// (which holds it) to fill the gap in order. (A subscription the
    /// cluster client re-made by itself after a failover can deliver again
    /// before this instance has replayed what was missed meanwhile.) A
    /// publication at an offset already delivered here with other content
    /// is not handed over either: its channel is returned, to be checked
    /// against history (`recovery.rs`).
    pub(super) fn dispatch(&self, topic: &str, payload: &[u8]) -> Option<Arc<str>> {
        let handler = self.handler()?;
        let Ok(text) = std::str::from_utf8(payload) else {
            tracing::warn!(%topic, "non-UTF-8 message on the bus ignored");
            return None;
        };
        let Some((kind, rest)) = text.split_once(' ') else {
            tracing::warn!(%topic, "malformed message on the bus ignored");
            return None;
        };
        match kind {
            "p" => {
                let channel = self.keys.channel_of(topic)?;
                let mut parts = rest.splitn(3, ' ');
                let (Some(epoch), Some(offset), Some(body)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    tracing::warn!(%topic, "malformed publication ignored");
                    return None;
                };
                let (Ok(offset), Ok(body)) =
                    (offset.parse::<u64>(), serde_json::from_str::<Body>(body))
                else {
                    tracing::warn!(%topic, "malformed publication ignored");
                    return None;
                };
                // Only where history can fill the gap (a namespace without
                // history is told by the full recovery's resync instead).
                let has_history = || {
                    self.config
                        .namespace_of(channel)
                        .is_some_and(|n| n.history_size > 0)
                };
                if self.keys.cluster && has_history() {
                    let skips = handler
                        .position(channel)
                        .is_some_and(|last| *last.epoch == *epoch && offset > last.offset + 1);
                    if skips {
                        return Some(Arc::from(channel));
                    }
                }
                let publication = Publication {
                    offset,
                    data: body.data,
                    sender_id: body.sender_id,
                    timestamp: body.timestamp,
                };
                let (channel, epoch): (Arc<str>, Arc<str>) = (channel.into(), epoch.into());
                // An offset delivered here with other content: the history
                // was rewritten (`recovery.rs`); checked, not delivered.
                if has_history() && !self.delivered.record(&channel, &epoch, &publication) {
                    return Some(channel);
                }
                handler.on_publication(&channel, &epoch, &publication);
            }
            "b" => match serde_json::from_str::<Body>(rest) {
                Ok(b) => handler.on_control(&Control::Broadcast {
                    sender_id: b.sender_id,
                    data: b.data,
                    timestamp: b.timestamp,
                }),
                Err(e) => tracing::warn!(%topic, error = %e, "malformed broadcast ignored"),
            },
            "c" => match serde_json::from_str::<Control>(rest) {
                Ok(control) => handler.on_control(&control),
                Err(e) => tracing::warn!(%topic, error = %e, "malformed control ignored"),
            },
            "d" => self.on_direct_message(rest),
            "a" => self.on_direct_answer(rest),
            _ => tracing::warn!(%topic, "unknown message kind on the bus ignored"),
        }
        None
    }
}
