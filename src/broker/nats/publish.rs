//! Publishing and reading channel history on the NATS bus: the stored
//! message format, the conditional append that gives each publication the
//! next offset of its epoch, the epoch generation stream (`P-gen`) that a
//! new channel stream takes its epoch from, history reads (direct gets
//! following `prev`, or a short-lived pull consumer), and control messages
//! (broadcast, join/leave) on core NATS. The layout and the reasons are in
//! the module docs of [`super`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{Bus, NatsBroker, bus_error, token};
use crate::broker::{Control, HistoryOptions, HistoryResult, NewPublication, PublishConditions};
use crate::error::{ClientError, Error, ErrorCode, Result};
use crate::ids::random_base36;
use crate::protocol::{Publication, StreamPosition};
use crate::sync::MutexExt;

/// Gap length up to which history is read message by message (direct
/// gets following `prev`) rather than through a consumer.
const WALK_LIMIT: u64 = 16;

/// Attempts of an optimistic publish before it gives up.
const PUBLISH_ATTEMPTS: usize = 64;

/// A channel message as stored in the stream (and republished).
#[derive(Serialize)]
pub(super) struct WireOut<'a> {
    pub(super) epoch: &'a str,
    /// 0 for an epoch marker (written by earlier versions) and for a
    /// user-addressed message.
    pub(super) offset: u64,
    /// Stream sequence of the channel's previous message (0: none).
    pub(super) prev: u64,
    #[serde(rename = "senderId", skip_serializing_if = "Option::is_none")]
    pub(super) sender_id: Option<&'a str>,
    pub(super) timestamp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) data: Option<&'a RawValue>,
}

/// A channel message as read back.
#[derive(Deserialize)]
pub(super) struct WireIn {
    pub(super) epoch: Arc<str>,
    pub(super) offset: u64,
    #[serde(default)]
    pub(super) prev: u64,
    #[serde(rename = "senderId", default)]
    pub(super) sender_id: Option<Arc<str>>,
    #[serde(default)]
    pub(super) timestamp: u64,
    #[serde(default)]
    pub(super) data: Option<Arc<RawValue>>,
}

impl WireIn {
    pub(super) fn parse(payload: &[u8]) -> Option<WireIn> {
        serde_json::from_slice(payload).ok()
    }

    pub(super) fn publication(self) -> Option<Publication> {
        Some(Publication {
            offset: self.offset,
            data: self.data?,
            sender_id: self.sender_id,
            timestamp: self.timestamp,
        })
    }
}

/// A broadcast on `P.bcast`.
#[derive(Serialize, Deserialize)]
pub(super) struct WireBroadcast {
    #[serde(rename = "senderId")]
    pub(super) sender_id: Option<Arc<str>>,
    pub(super) data: Arc<RawValue>,
    pub(super) timestamp: u64,
}

/// The newest message of a channel subject.
#[derive(Debug, Clone)]
pub(super) struct Head {
    /// Its stream sequence (what the next publish expects).
    pub(super) seq: u64,
    pub(super) epoch: Arc<str>,
    pub(super) offset: u64,
}

/// The per-channel publish state: the lock serializes this instance's
/// publishes to the channel; the value is the head after the last one.
pub(super) type Writer = Arc<tokio::sync::Mutex<Option<Head>>>;

impl Bus {
    /// Create the generation stream if needed and give it a first value
    /// if it has none.
    pub(super) async fn ensure_gen_stream(&self) -> Result<()> {
        self.create_gen_stream().await?;
        if self.generation().await?.is_none() {
            // Refused when another instance got there first: fine.
            let _ = self.rotate_generation(0).await?;
        }
        Ok(())
    }

    /// Create the generation stream: one subject, one message, no expiry,
    /// no byte limit that channel traffic could push it out of.
    async fn create_gen_stream(&self) -> Result<()> {
        let config = stream::Config {
            name: self.gen_stream_name.clone(),
            description: Some("switchboard: the epoch the next new channel stream takes".into()),
            subjects: vec![self.gen_subject()],
            max_messages_per_subject: 1,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| bus_error(format!("JetStream stream {}: {e}", self.gen_stream_name)))?;
        Ok(())
    }

    /// The current generation and its stream sequence; `None` when the
    /// server lost it.
    async fn generation(&self) -> Result<Option<(Arc<str>, u64)>> {
        let stream = self.stream_named(&self.gen_stream_name).await?;
        match stream.direct_get_last_for_subject(self.gen_subject()).await {
            Ok(m) => Ok(std::str::from_utf8(&m.payload)
                .ok()
                .map(|g| (Arc::from(g), m.sequence))),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(bus_error(format!("reading the epoch generation: {e}"))),
        }
    }

    /// Replace the generation at sequence `expected` (0: none) with a
    /// fresh one; `false` when another instance replaced it first.
    async fn rotate_generation(&self, expected: u64) -> Result<bool> {
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
        let ack = self
            .js
            .publish_with_headers(self.gen_subject(), headers, Bytes::from(random_base36(8)))
            .await
            .map_err(|e| bus_error(format!("writing the epoch generation: {e}")))?;
        match ack.await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Ok(false)
            }
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                self.create_gen_stream().await?;
                Ok(false)
            }
            Err(e) => Err(bus_error(format!("writing the epoch generation: {e}"))),
        }
    }

    /// A handle on stream `name`, without an info round trip.
    async fn stream_named(&self, name: &str) -> Result<stream::Stream<()>> {
        self.js
            .get_stream_no_info(name)
            .await
            .map_err(|e| bus_error(format!("stream {name}: {e}")))
    }

    /// The newest message of `subject`, `None` when it has none.
    pub(super) async fn head(&self, subject: &str) -> Result<Option<Head>> {
        let stream = self.stream_named(&self.stream_name).await?;
        match stream.direct_get_last_for_subject(subject).await {
            Ok(m) => Ok(WireIn::parse(&m.payload).map(|w| Head {
                seq: m.sequence,
                epoch: w.epoch,
                offset: w.offset,
            })),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(bus_error(format!("reading {subject}: {e}"))),
        }
    }

    /// Append to `subject` if its newest message is still `expected`
    /// (sequence 0: empty), under JetStream message id `msg_id` if given.
    /// `Ok(None)` when another writer got there first; otherwise the
    /// stored sequence and whether JetStream found the id a duplicate
    /// (then the sequence is the first message's, and nothing was added:
    /// de-duplication is checked before the expected sequence).
    async fn append(
        &self,
        subject: &str,
        expected: u64,
        body: Vec<u8>,
        msg_id: Option<&str>,
    ) -> Result<Option<(u64, bool)>> {
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
        if let Some(id) = msg_id {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        }
        let ack = self
            .js
            .publish_with_headers(subject.to_string(), headers, Bytes::from(body))
            .await
            .map_err(|e| bus_error(format!("publishing to {subject}: {e}")))?;
        match ack.await {
            Ok(ack) => Ok(Some((ack.sequence, ack.duplicate))),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Ok(None)
            }
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                // The server lost the stream (restart without its store):
                // re-create it; the caller retries into a new epoch.
                self.ensure_stream().await?;
                Ok(None)
            }
            Err(e) => Err(bus_error(format!("publishing to {subject}: {e}"))),
        }
    }

    /// The position of the message at `seq` (the first publication of a
    /// duplicate idempotency key), if the stream still holds it.
    async fn position_at(&self, subject: &str, seq: u64) -> Result<Option<StreamPosition>> {
        let stream = self.stream_named(&self.stream_name).await?;
        match stream.direct_get(seq).await {
            Ok(m) if m.subject.as_str() == subject => {
                Ok(WireIn::parse(&m.payload).map(|w| StreamPosition {
                    epoch: w.epoch,
                    offset: w.offset,
                }))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(bus_error(format!("reading {subject}: {e}"))),
        }
    }

    /// The epoch of a new channel stream: the current generation, which
    /// this call replaces (conditionally, so each generation is taken by
    /// one creation only); a fresh random one when the server lost it.
    async fn take_epoch(&self) -> Result<Arc<str>> {
        for _ in 0..PUBLISH_ATTEMPTS {
            let current = self.generation().await?;
            let expected = current.as_ref().map_or(0, |g| g.1);
            if self.rotate_generation(expected).await? {
                return Ok(current.map_or_else(|| Arc::from(random_base36(8)), |g| g.0));
            }
        }
        Err(bus_error("epoch generation: too much contention"))
    }

    /// Publications of `subject` in `head`'s epoch with `lower < offset <=
    /// head.offset`, none older than `ttl`: the oldest `limit`, oldest
    /// first, or with `newest_first` the newest `limit`, newest first.
    async fn read_range(
        &self,
        subject: &str,
        head: &Head,
        lower: u64,
        limit: usize,
        newest_first: bool,
        ttl: Duration,
    ) -> Result<Vec<Publication>> {
        if head.offset <= lower || limit == 0 {
            return Ok(Vec::new());
        }
        let oldest_ms = crate::protocol::now_ms().saturating_sub(ttl.as_millis() as u64);
        let fresh = |p: &Publication| p.timestamp > oldest_ms;
        let wanted = head.offset - lower;
        let walk = if newest_first {
            wanted.min(limit as u64)
        } else {
            wanted
        };
        let mut out = Vec::new();
        if walk <= WALK_LIMIT {
            // Follow `prev` back from the head, one direct get each.
            let stream = self.stream_named(&self.stream_name).await?;
            let mut seq = head.seq;
            while (out.len() as u64) < walk {
                let m = match stream.direct_get(seq).await {
                    Ok(m) => m,
                    Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                    Err(e) => return Err(bus_error(format!("reading {subject}: {e}"))),
                };
                let Some(w) = WireIn::parse(&m.payload) else {
                    break;
                };
                if w.epoch != head.epoch || w.offset <= lower || m.subject.as_str() != subject {
                    break;
                }
                let prev = w.prev;
                if let Some(p) = w.publication() {
                    out.push(p);
                }
                if prev == 0 {
                    break;
                }
                seq = prev;
            }
            out.reverse();
        } else {
            out = self.read_subject(subject, head, lower).await?;
        }
        out.retain(fresh);
        if newest_first {
            out.reverse();
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Every retained publication of `subject` in `head`'s epoch after
    /// `lower`, through a short-lived pull consumer.
    async fn read_subject(
        &self,
        subject: &str,
        head: &Head,
        lower: u64,
    ) -> Result<Vec<Publication>> {
        let messages = self
            .consume(&self.stream_name, subject, consumer::DeliverPolicy::All)
            .await?;
        Ok(messages
            .into_iter()
            .filter_map(|m| WireIn::parse(&m.payload))
            .filter(|w| w.epoch == head.epoch && w.offset > lower && w.offset <= head.offset)
            .filter_map(WireIn::publication)
            .collect())
    }

    /// Everything a fresh consumer on `stream_name` filtered by `filter`
    /// delivers now, in stream order.
    pub(super) async fn consume(
        &self,
        stream_name: &str,
        filter: &str,
        deliver_policy: consumer::DeliverPolicy,
    ) -> Result<Vec<async_nats::Message>> {
        let err = |e: &dyn std::fmt::Display| bus_error(format!("reading {filter}: {e}"));
        let stream = self.stream_named(stream_name).await?;
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: filter.to_string(),
                deliver_policy,
                ack_policy: consumer::AckPolicy::None,
                memory_storage: true,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|e| err(&e))?;
        let pending = consumer.cached_info().num_pending as usize;
        let name = consumer.cached_info().name.clone();
        let mut out = Vec::with_capacity(pending);
        if pending > 0 {
            let mut batch = consumer
                .batch()
                .max_messages(pending)
                .expires(self.opts.request_timeout)
                .messages()
                .await
                .map_err(|e| err(&e))?;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| err(&e))?;
                out.push(m.message);
                if out.len() >= pending {
                    break;
                }
            }
        }
        // The consumer would expire by itself; delete it now, off the path.
        tokio::spawn(async move {
            let _ = stream.delete_consumer(&name).await;
        });
        Ok(out)
    }

    /// The history query of [`Broker::history`](crate::broker::Broker::history)
    /// oldest or (`newest_first`) newest first.
    pub(super) async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        newest_first: bool,
        history: HistoryOptions,
    ) -> Result<HistoryResult> {
        self.connected()?;
        let subject = self.stream_subject(channel);
        let head = match self.head(&subject).await? {
            Some(h) => h,
            None => {
                // Nothing is written for an empty channel: it reports the
                // generation, the epoch its first publication will take.
                // Read before the second look at the channel (see the
                // module docs for why the order matters).
                let generation = self.generation().await?;
                match self.head(&subject).await? {
                    Some(h) => h,
                    None => {
                        let epoch = generation.map_or_else(|| Arc::from(random_base36(8)), |g| g.0);
                        return Ok(HistoryResult {
                            publications: Vec::new(),
                            top: StreamPosition { epoch, offset: 0 },
                        });
                    }
                }
            }
        };
        let top = StreamPosition {
            epoch: head.epoch.clone(),
            offset: head.offset,
        };
        let publications = match since {
            Some(since) if since.epoch != head.epoch => Vec::new(),
            _ => {
                let after = since.map_or(0, |p| p.offset);
                let lower = after.max(head.offset.saturating_sub(history.size as u64));
                self.read_range(&subject, &head, lower, limit, newest_first, history.ttl)
                    .await?
            }
        };
        Ok(HistoryResult { publications, top })
    }

    pub(super) fn history_options(&self, channel: &str) -> HistoryOptions {
        let ns = self
            .config
            .namespace_of(channel)
            .unwrap_or(&self.config.default_namespace);
        HistoryOptions {
            size: ns.history_size,
            ttl: ns.history_ttl,
        }
    }
}

impl NatsBroker {
    fn writer(&self, channel: &str) -> Writer {
        let mut writers = self.writers.lock_unpoisoned();
        if let Some(w) = writers.get(channel) {
            return w.clone();
        }
        if writers.len() >= 4096 {
            // Forget the cached heads nobody is using (a cache miss costs
            // one direct get).
            writers.retain(|_, w| Arc::strong_count(w) > 1);
        }
        let w = Writer::default();
        writers.insert(Arc::from(channel), w.clone());
        w
    }

    pub(super) fn count_failure(&self, what: &str, e: &Error) {
        self.bus.failed_publishes.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "{what} failed on the NATS bus");
    }

    pub(super) async fn try_publish(
        &self,
        channel: &str,
        publication: &NewPublication,
    ) -> Result<StreamPosition> {
        self.bus.connected()?;
        let subject = self.bus.stream_subject(channel);
        let conditions = &publication.conditions;
        let msg_id = conditions
            .idempotency_key
            .as_deref()
            .map(|key| format!("{}.{}", token(channel), token(key)));
        let writer = self.writer(channel);
        let mut cached = writer.lock().await;
        for _ in 0..PUBLISH_ATTEMPTS {
            let (head, fresh) = match cached.take() {
                Some(h) => (Some(h), false),
                None => (self.bus.head(&subject).await?, true),
            };
            let top = head.as_ref().map_or(0, |h| h.offset);
            let mismatch = conditions.expected_offset.is_some_and(|e| e != top);
            if mismatch && !fresh {
                continue; // the cached head may be stale: look again
            }
            if mismatch && msg_id.is_none() {
                *cached = head;
                return Err(self.mismatch(channel, conditions).await);
            }
            // With a key, a mismatch still asks JetStream whether the key
            // is a duplicate (checked before the expected sequence, which
            // no message has here, so nothing is stored).
            let fresh_epoch;
            let (epoch, offset, expected): (&str, u64, u64) = match &head {
                Some(h) => (&h.epoch, h.offset + 1, h.seq),
                None if mismatch => ("", 1, 0),
                None => {
                    fresh_epoch = self.bus.take_epoch().await?;
                    (&fresh_epoch, 1, 0)
                }
            };
            let body = serde_json::to_vec(&WireOut {
                epoch,
                offset,
                prev: expected,
                sender_id: publication.sender_id.as_deref(),
                timestamp: publication.timestamp,
                data: Some(&publication.data),
            })
            .map_err(|e| bus_error(format!("encoding a publication: {e}")))?;
            let expect_seq = if mismatch { u64::MAX } else { expected };
            match self
                .bus
                .append(&subject, expect_seq, body, msg_id.as_deref())
                .await?
            {
                Some((seq, true)) => {
                    return match self.bus.position_at(&subject, seq).await? {
                        Some(first) => Ok(first),
                        None => Err(ClientError::new(
                            ErrorCode::Duplicate,
                            "already published under this idempotency key; its offset has left the history",
                        )
                        .into()),
                    };
                }
                Some((seq, false)) => {
                    let epoch: Arc<str> = Arc::from(epoch);
                    *cached = Some(Head {
                        seq,
                        epoch: epoch.clone(),
                        offset,
                    });
                    return Ok(StreamPosition { epoch, offset });
                }
                None if mismatch => return Err(self.mismatch(channel, conditions).await),
                // Someone else appended: re-read the head and retry.
                None => {}
            }
        }
        Err(bus_error(format!("{channel}: too much publish contention")))
    }

    /// The `offset_mismatch` of a conditional publish, with the channel's
    /// current top as a history read reports it.
    async fn mismatch(&self, channel: &str, conditions: &PublishConditions) -> Error {
        let opts = self.bus.history_options(channel);
        match self.bus.history(channel, None, 0, false, opts).await {
            Ok(h) => {
                ClientError::offset_mismatch(conditions.expected_offset.unwrap_or_default(), h.top)
                    .into()
            }
            Err(e) => e,
        }
    }

    /// Send a broadcast, join or leave on core NATS (the body of
    /// [`Broker::publish_control`](crate::broker::Broker::publish_control);
    /// the caller counts failures).
    pub(super) async fn send_control(&self, control: &Control) -> Result<()> {
        self.bus.connected()?;
        let subject = match control {
            Control::Broadcast { .. } => self.bus.broadcast_subject(),
            Control::Join { channel, .. } | Control::Leave { channel, .. } => {
                self.bus.event_subject(channel)
            }
        };
        // Broadcasts go as a plain struct: serde cannot read a raw
        // JSON value back through the internally tagged `Control`.
        let payload = match control {
            Control::Broadcast {
                sender_id,
                data,
                timestamp,
            } => serde_json::to_vec(&WireBroadcast {
                sender_id: sender_id.clone(),
                data: data.clone(),
                timestamp: *timestamp,
            }),
            other => serde_json::to_vec(other),
        }
        .map_err(|e| bus_error(format!("encoding a control message: {e}")))?;
        self.bus
            .client
            .publish(subject, Bytes::from(payload))
            .await
            .map_err(|e| bus_error(format!("publishing a control message: {e}")))
    }
}
