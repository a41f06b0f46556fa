//! The NATS bus: JetStream for channel history and offsets, core NATS for
//! live delivery, broadcast, join/leave and direct messages, a JetStream
//! key-value bucket for presence.
//!
//! # Layout (`P` = `bus_prefix`, `T(x)` = [`token`] of `x`)
//!
//! | what | where | kept |
//! | --- | --- | --- |
//! | channel history | stream `P-channels`, subjects `P.ch.T(channel)` | per subject: the largest namespace `history_size` (at least 1); `max_age` the longest namespace `history_ttl`; `max_bytes` = `history_max_bytes`, oldest dropped first |
//! | live publications | `P.chl.T(channel).p`, republished by the stream | no |
//! | join / leave | `P.chl.T(channel).e` (core) | no |
//! | user-addressed direct (`#user:<sub>`) | `P.chl.T(#user:<sub>).u` (core; outside the stream) | no |
//! | epoch generation | stream `P-gen`, subject `P.gen` | one message, no expiry |
//! | broadcast | `P.bcast` (core) | no |
//! | direct to a client | request to `P.cl.T(client id)` (core request/reply) | no |
//! | presence | KV bucket `P-presence`, key `T(channel).T(instance)` | `presence_ttl` |
//!
//! [`token`] keeps `[A-Za-z0-9_-]` and writes every other byte as `=XX`, so
//! any channel or client id is one valid subject token and KV key part.
//!
//! # Channel streams: offsets, epochs, order
//!
//! Every stored message is JSON `{epoch, offset, prev, senderId, timestamp,
//! data}`. A publish reads the channel's newest message (direct get, or
//! the per-channel value cached from this instance's last publish), and
//! publishes `offset + 1` in the same epoch with the header
//! `Nats-Expected-Last-Subject-Sequence` set to that message's stream
//! sequence. JetStream refuses it if anything was appended to the subject
//! meanwhile (another instance won); the publisher re-reads and retries.
//! So offsets within an epoch grow by exactly one, whatever the number of
//! publishers. Publishes of one channel on one instance are serialized by
//! a per-channel lock, so they do not contend with each other.
//!
//! A history or position query (every subscribe makes one) **writes
//! nothing**. For a channel whose subject is empty (never used, purged,
//! expired, dropped by `max_bytes`) it reports `(G, 0)`, `G` being the
//! current value of the generation (`P.gen`). The publish that starts a
//! channel's stream first replaces the generation, conditionally on the
//! sequence it read (so each value is taken by one creation only), then
//! writes offset 1 in epoch `G`. So no two streams of a channel share an
//! epoch, and a reader that saw `(G, 0)` recovers everything after it when
//! the channel's stream is the first one created after its read (it reads
//! the generation before its second look at the channel, which makes a
//! stream created and lost in between detectable: that one would have
//! taken `G`). If another channel's creation took `G` first, the epochs
//! differ: live delivery moves to the new epoch, and a recovery from
//! `(G, 0)` answers `recovered:false` — never a silent gap. One narrow
//! case is not covered: a creator that stalls between taking `G` and
//! writing offset 1 for longer than a whole other stream of the channel
//! lives. When the generation itself is lost, reads report a random
//! epoch that is never stored and the next creation starts a new one.
//! Markers (offset 0, no data) written by earlier versions are skipped.
//!
//! Live delivery comes from the stream's **republish** (`P.ch.*` →
//! `P.chl.*.p`): the server republishes each message only once it is
//! stored, in stream order, so refused attempts are never seen and every
//! instance receives a channel's publications in offset order. An instance
//! holds one core subscription `P.chl.T(channel).*` per channel it has
//! local subscribers for (taken at [`Broker::subscribe`], confirmed by the
//! head read that follows it on the connection). Its own publications reach
//! it through the same round trip,
//! exactly once. Each channel's task tracks the last offset it delivered;
//! a duplicate is dropped, and a gap (a message dropped by a slow
//! subscription, or an outage) is filled from history before the newer
//! message is delivered, or reported with [`BrokerHandler::resync_failed`]
//! when history no longer holds it.
//!
//! # History
//!
//! One stream per deployment: `max_msgs_per_subject` is the largest history
//! size of all namespaces (at least 1, so the newest offset survives with
//! history off), `max_age` is the longest history TTL, and `max_bytes` is
//! `history_max_bytes` with discard-old: the oldest publications of the
//! whole deployment go first when the budget is reached. A channel keeps
//! its epoch and offset until its newest message leaves the stream (`ttl`
//! after its last publication, or earlier under byte pressure); the next
//! publication then starts a new epoch. No longer memory is kept (earlier
//! versions kept every message at least an hour): it is not needed for
//! correct recovery — a client recovering across the restart of an idle
//! channel gets `recovered:false`, which is what the server can prove; the
//! only cost is that a client that had seen everything is told so too.
//! Each namespace's own size and TTL are enforced on read (`history`
//! returns at most the newest `size` publications younger than `ttl`, by
//! their timestamp). Short gaps are read by following each message's
//! `prev` sequence with direct gets; longer ones with a short-lived
//! ordered pull consumer on the subject. All instances of a deployment
//! must run the same namespace options: each sets the stream's limits to
//! its own at start-up and after a reconnect (both ways, so the limits of
//! an older, more generous version do not linger).
//!
//! User channels (`#user:<sub>`, the user-addressed `direct`) keep
//! nothing: their messages are core publishes on `.u`, outside the
//! stream, received by the instances subscribed to the channel's live
//! subjects (those holding the user's connections), at most once.
//!
//! # Presence
//!
//! Each instance writes, per channel, one key holding the JSON list of its
//! own local members; `members` reads the newest value of every key
//! `T(channel).*` (an ordered consumer with last-per-subject delivery) and
//! merges them. Writes are grouped: concurrent adds to a channel share one
//! put. The bucket's `max_age` is `presence_ttl` and each instance rewrites
//! its keys every third of it, so the members of a crashed instance vanish
//! within `presence_ttl`; a clean [`Broker::close`] deletes them at once.
//!
//! # Direct
//!
//! Each local client has a core subscription `P.cl.T(id)` (taken in
//! [`Broker::register_client`], which returns only after a round trip
//! proves the server has it; all of them are polled by one task; on
//! unregister it is drained, so requests already in flight get `0`). `direct` is a NATS request to that subject; the instance holding
//! the client answers `1` (queued) or `0` (gone meanwhile). NATS answers
//! "no responders" at once when nobody holds the id: `Ok(false)`, the
//! client gets `unknown_target`. A crashed instance's subscriptions die
//! with its connection, so nothing stale is left behind.
//!
//! # Outage
//!
//! `is_ready` is the connection state. async-nats reconnects by itself
//! (exponential backoff up to 4 s, forever) and re-sends every
//! subscription. Meanwhile each operation fails fast with `Error::Bus`
//! (the node counts them in `/metrics` `busPublishErrors`;
//! [`NatsBroker::failed_publishes`] counts publications and control
//! messages); nothing falls back to local delivery. After a
//! reconnect the broker makes a round trip, re-creates the stream and bucket if the
//! server lost them, rewrites its presence keys, and every channel task
//! replays what history holds after the last offset it delivered
//! (sessions drop duplicates by offset), or calls `resync_failed` when the
//! epoch changed or history no longer reaches back. A server that keeps
//! its JetStream store (`-sd`) loses nothing published before the outage.
//! Unreachable at start-up: [`connect`] fails within the connect timeout
//! (5 s).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::{Event, HeaderMap, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{BoxStream, SelectAll};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    Broker, BrokerHandler, Control, Direct, HistoryOptions, HistoryResult, NewPublication,
    PresenceStore,
};
use crate::config::{Config, random_base36};
use crate::error::{Error, Result};
use crate::node::is_internal_channel;
use crate::protocol::{ClientInfo, Publication, StreamPosition};

/// Tunables of the NATS bus; [`NatsOptions::from_config`] gives the
/// production values, tests shorten them.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Longest the first connection may take before start-up fails.
    pub connect_timeout: Duration,
    /// Longest a JetStream API call, a flush or a direct request may take.
    pub request_timeout: Duration,
    /// Expiry of a crashed instance's presence keys (the bucket's max age).
    pub presence_ttl: Duration,
    /// How often this instance rewrites its presence keys.
    pub presence_refresh: Duration,
}

impl NatsOptions {
    /// The production options for `config`.
    pub fn from_config(config: &Config) -> Self {
        NatsOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            presence_ttl: config.presence_ttl,
            presence_refresh: config.presence_ttl / 3,
        }
    }
}

/// Gap length up to which history is read message by message (direct
/// gets following `prev`) rather than through a consumer.
const WALK_LIMIT: u64 = 16;

/// Attempts of an optimistic publish before it gives up.
const PUBLISH_ATTEMPTS: usize = 64;

/// The epoch written on user-addressed messages, which have none.
const NO_EPOCH: &str = "-";

/// Connect the NATS bus with the production options.
pub async fn connect(
    url: &str,
    config: &Config,
) -> Result<(Arc<dyn Broker>, Arc<dyn PresenceStore>)> {
    let (broker, presence) = connect_with(url, config, NatsOptions::from_config(config)).await?;
    Ok((broker, presence))
}

/// Connect the NATS bus: connect, check JetStream, create (or grow) the
/// channel stream and the presence bucket. Fails, within
/// `connect_timeout` plus one JetStream call, when NATS cannot be reached.
pub async fn connect_with(
    url: &str,
    config: &Config,
    opts: NatsOptions,
) -> Result<(Arc<NatsBroker>, Arc<NatsPresence>)> {
    let (events_tx, events_rx) = mpsc::channel::<Event>(64);
    let options = async_nats::ConnectOptions::new()
        .name(format!("switchboard-{}", config.instance_id))
        .connection_timeout(opts.connect_timeout)
        .request_timeout(Some(opts.request_timeout))
        .event_callback(move |event| {
            let tx = events_tx.clone();
            async move {
                let _ = tx.try_send(event);
            }
        });
    let client = tokio::time::timeout(opts.connect_timeout, options.connect(url))
        .await
        .map_err(|_| bus_err(format!("connecting to NATS at {url} timed out")))?
        .map_err(|e| bus_err(format!("cannot connect to NATS at {url}: {e}")))?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(opts.request_timeout);
    let prefix = config.bus_prefix.clone();
    let mut size = config.default_namespace.history_size;
    let mut ttl = config.default_namespace.history_ttl;
    for ns in config.namespaces.values() {
        size = size.max(ns.history_size);
        ttl = ttl.max(ns.history_ttl);
    }
    let bus = Arc::new(Bus {
        client,
        js,
        stream_name: format!("{prefix}-channels"),
        gen_stream_name: format!("{prefix}-gen"),
        bucket_name: format!("{prefix}-presence"),
        instance_token: token(&config.instance_id),
        // At least 1: with history off the newest message still carries
        // the channel's epoch and offset.
        max_per_subject: i64::try_from(size).unwrap_or(i64::MAX).max(1),
        max_age: ttl,
        max_bytes: i64::try_from(config.history_max_bytes).unwrap_or(i64::MAX),
        prefix,
        config: config.clone(),
        opts,
        failed_publishes: AtomicU64::new(0),
        presence_dirty: Notify::new(),
    });
    bus.ensure_stream().await?;
    bus.ensure_gen_stream().await?;
    bus.ensure_bucket().await?;
    let broker = Arc::new(NatsBroker {
        bus: bus.clone(),
        handler: OnceLock::new(),
        channels: Arc::default(),
        writers: Mutex::default(),
        clients: Mutex::default(),
        direct_tx: OnceLock::new(),
        events: Mutex::new(Some(events_rx)),
        shutdown: CancellationToken::new(),
    });
    let presence = Arc::new(NatsPresence {
        bus,
        local: Mutex::default(),
        shutdown: broker.shutdown.clone(),
    });
    presence.spawn_refresh();
    Ok((broker, presence))
}

fn bus_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::Bus(e.into())
}

/// `s` as one subject token / KV key part: `[A-Za-z0-9_-]` kept, every
/// other byte written `=XX`; the empty string is `=`. Injective.
pub fn token(s: &str) -> String {
    if s.is_empty() {
        return "=".into();
    }
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// A channel message as stored in the stream (and republished).
#[derive(Serialize)]
struct WireOut<'a> {
    epoch: &'a str,
    /// 0 for an epoch marker (written by earlier versions) and for a
    /// user-addressed message.
    offset: u64,
    /// Stream sequence of the channel's previous message (0: none).
    prev: u64,
    #[serde(rename = "senderId", skip_serializing_if = "Option::is_none")]
    sender_id: Option<&'a str>,
    timestamp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
}

/// A channel message as read back.
#[derive(Deserialize)]
struct WireIn {
    epoch: Arc<str>,
    offset: u64,
    #[serde(default)]
    prev: u64,
    #[serde(rename = "senderId", default)]
    sender_id: Option<Arc<str>>,
    #[serde(default)]
    timestamp: u64,
    #[serde(default)]
    data: Option<Arc<RawValue>>,
}

impl WireIn {
    fn parse(payload: &[u8]) -> Option<WireIn> {
        serde_json::from_slice(payload).ok()
    }

    fn publication(self) -> Option<Publication> {
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
struct WireBroadcast {
    #[serde(rename = "senderId")]
    sender_id: Option<Arc<str>>,
    data: Arc<RawValue>,
    timestamp: u64,
}

/// The newest message of a channel subject.
#[derive(Debug, Clone)]
struct Head {
    /// Its stream sequence (what the next publish expects).
    seq: u64,
    epoch: Arc<str>,
    offset: u64,
}

/// What both the broker and the presence store use.
struct Bus {
    /// The connection (reconnects by itself).
    client: async_nats::Client,
    /// JetStream on that connection.
    js: jetstream::Context,
    /// `bus_prefix`: first token of every subject.
    prefix: String,
    /// The channel stream, `P-channels`.
    stream_name: String,
    /// The stream of the epoch generation, `P-gen` (one message).
    gen_stream_name: String,
    /// The presence bucket, `P-presence`.
    bucket_name: String,
    /// This instance's id as a key part.
    instance_token: String,
    /// The stream's `max_msgs_per_subject`.
    max_per_subject: i64,
    /// The stream's `max_age`.
    max_age: Duration,
    /// The stream's `max_bytes` (`history_max_bytes`, oldest dropped).
    max_bytes: i64,
    /// Namespaces (per-channel history options for gap fills).
    config: Config,
    /// Timeouts and presence intervals.
    opts: NatsOptions,
    /// Publications and control messages that could not be sent.
    failed_publishes: AtomicU64,
    /// Asks the presence task to rewrite every key now (after reconnect).
    presence_dirty: Notify,
}

impl Bus {
    fn connected(&self) -> Result<()> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            state => Err(bus_err(format!("NATS is not connected ({state:?})"))),
        }
    }

    /// A round trip on the connection: when it returns, the server has
    /// processed everything sent before it (subscriptions included).
    /// async-nats's `flush` only writes the socket, so this asks a subject
    /// nobody serves and takes the server's "no responders" as the answer.
    async fn sync(&self) -> Result<()> {
        let subject = format!("{}.sync.{}", self.prefix, self.instance_token);
        match self.client.request(subject, Bytes::new()).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Err(e) => Err(bus_err(format!("NATS round trip: {e}"))),
        }
    }

    fn stream_subject(&self, channel: &str) -> String {
        format!("{}.ch.{}", self.prefix, token(channel))
    }

    fn live_subjects(&self, channel: &str) -> String {
        format!("{}.chl.{}.*", self.prefix, token(channel))
    }

    fn event_subject(&self, channel: &str) -> String {
        format!("{}.chl.{}.e", self.prefix, token(channel))
    }

    /// Core subject of a user channel's messages: under the channel's live
    /// subjects (so only the instances holding the user get them), outside
    /// the stream (so nothing is kept).
    fn user_subject(&self, channel: &str) -> String {
        format!("{}.chl.{}.u", self.prefix, token(channel))
    }

    fn gen_subject(&self) -> String {
        format!("{}.gen", self.prefix)
    }

    fn broadcast_subject(&self) -> String {
        format!("{}.bcast", self.prefix)
    }

    fn client_subject(&self, client_id: &str) -> String {
        format!("{}.cl.{}", self.prefix, token(client_id))
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream_name.clone(),
            description: Some("switchboard channel history".into()),
            subjects: vec![format!("{}.ch.*", self.prefix)],
            max_messages_per_subject: self.max_per_subject,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            republish: Some(stream::Republish {
                source: format!("{}.ch.*", self.prefix),
                destination: format!("{}.chl.{{{{wildcard(1)}}}}.p", self.prefix),
                headers_only: false,
            }),
            ..Default::default()
        }
    }

    /// Create the channel stream, or set an existing one to our limits
    /// (both ways: a stream made with larger limits, or by an older
    /// version that kept everything for an hour, is brought down to them).
    async fn ensure_stream(&self) -> Result<()> {
        let wanted = self.stream_config();
        let mut stream = self
            .js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| bus_err(format!("JetStream stream {}: {e}", self.stream_name)))?;
        let info = stream
            .info()
            .await
            .map_err(|e| bus_err(format!("JetStream stream {}: {e}", self.stream_name)))?;
        let have = &info.config;
        if have.max_messages_per_subject != wanted.max_messages_per_subject
            || have.max_age != wanted.max_age
            || have.max_bytes != wanted.max_bytes
            || have.discard != wanted.discard
            || have.republish != wanted.republish
            || !have.allow_direct
        {
            let mut updated = have.clone();
            updated.max_messages_per_subject = wanted.max_messages_per_subject;
            updated.max_age = wanted.max_age;
            updated.max_bytes = wanted.max_bytes;
            updated.discard = wanted.discard;
            updated.republish = wanted.republish;
            updated.allow_direct = true;
            self.js
                .update_stream(updated)
                .await
                .map_err(|e| bus_err(format!("updating stream {}: {e}", self.stream_name)))?;
        }
        Ok(())
    }

    /// Create the generation stream if needed and give it a first value
    /// if it has none.
    async fn ensure_gen_stream(&self) -> Result<()> {
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
            .map_err(|e| bus_err(format!("JetStream stream {}: {e}", self.gen_stream_name)))?;
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
            Err(e) => Err(bus_err(format!("reading the epoch generation: {e}"))),
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
            .map_err(|e| bus_err(format!("writing the epoch generation: {e}")))?;
        match ack.await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Ok(false)
            }
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                self.create_gen_stream().await?;
                Ok(false)
            }
            Err(e) => Err(bus_err(format!("writing the epoch generation: {e}"))),
        }
    }

    /// Create the presence bucket if it does not exist.
    async fn ensure_bucket(&self) -> Result<kv::Store> {
        if let Ok(store) = self.js.get_key_value(&self.bucket_name).await {
            return Ok(store);
        }
        // The bucket's stream, as a KV bucket is laid out (async-nats's
        // `create_key_value` queries account limits in a form NATS 2.9
        // does not answer).
        let config = stream::Config {
            name: format!("KV_{}", self.bucket_name),
            description: Some("switchboard presence".into()),
            subjects: vec![format!("$KV.{}.>", self.bucket_name)],
            max_messages_per_subject: 1,
            max_age: self.opts.presence_ttl,
            storage: stream::StorageType::Memory,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            num_replicas: 1,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| bus_err(format!("JetStream KV bucket {}: {e}", self.bucket_name)))?;
        self.js
            .get_key_value(&self.bucket_name)
            .await
            .map_err(|e| bus_err(format!("JetStream KV bucket {}: {e}", self.bucket_name)))
    }

    /// A handle on stream `name`, without an info round trip.
    async fn stream_named(&self, name: &str) -> Result<stream::Stream<()>> {
        self.js
            .get_stream_no_info(name)
            .await
            .map_err(|e| bus_err(format!("stream {name}: {e}")))
    }

    /// The newest message of `subject`, `None` when it has none.
    async fn head(&self, subject: &str) -> Result<Option<Head>> {
        let stream = self.stream_named(&self.stream_name).await?;
        match stream.direct_get_last_for_subject(subject).await {
            Ok(m) => Ok(WireIn::parse(&m.payload).map(|w| Head {
                seq: m.sequence,
                epoch: w.epoch,
                offset: w.offset,
            })),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(bus_err(format!("reading {subject}: {e}"))),
        }
    }

    /// Append to `subject` if its newest message is still `expected`
    /// (sequence 0: empty). `Ok(None)` when another writer got there first.
    async fn append(&self, subject: &str, expected: u64, body: Vec<u8>) -> Result<Option<u64>> {
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
        let ack = self
            .js
            .publish_with_headers(subject.to_string(), headers, Bytes::from(body))
            .await
            .map_err(|e| bus_err(format!("publishing to {subject}: {e}")))?;
        match ack.await {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Ok(None)
            }
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                // The server lost the stream (restart without its store):
                // re-create it; the caller retries into a new epoch.
                self.ensure_stream().await?;
                Ok(None)
            }
            Err(e) => Err(bus_err(format!("publishing to {subject}: {e}"))),
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
        Err(bus_err("epoch generation: too much contention"))
    }

    /// Publications of `subject` in `head`'s epoch with `lower < offset <=
    /// head.offset`, oldest first, at most `limit`, none older than `ttl`.
    async fn read_range(
        &self,
        subject: &str,
        head: &Head,
        lower: u64,
        limit: usize,
        ttl: Duration,
    ) -> Result<Vec<Publication>> {
        if head.offset <= lower || limit == 0 {
            return Ok(Vec::new());
        }
        let oldest_ms = crate::protocol::now_ms().saturating_sub(ttl.as_millis() as u64);
        let fresh = |p: &Publication| p.timestamp > oldest_ms;
        let wanted = head.offset - lower;
        let mut out = Vec::new();
        if wanted <= WALK_LIMIT {
            // Follow `prev` back from the head, one direct get each.
            let stream = self.stream_named(&self.stream_name).await?;
            let mut seq = head.seq;
            loop {
                let m = match stream.direct_get(seq).await {
                    Ok(m) => m,
                    Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                    Err(e) => return Err(bus_err(format!("reading {subject}: {e}"))),
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
        Ok(out.into_iter().filter(fresh).take(limit).collect())
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
            .filter_map(|(_, payload)| WireIn::parse(&payload))
            .filter(|w| w.epoch == head.epoch && w.offset > lower && w.offset <= head.offset)
            .filter_map(WireIn::publication)
            .collect())
    }

    /// Everything a fresh consumer on `stream_name` filtered by `filter`
    /// delivers now: `(headers, payload)` in stream order.
    async fn consume(
        &self,
        stream_name: &str,
        filter: &str,
        deliver_policy: consumer::DeliverPolicy,
    ) -> Result<Vec<(Option<HeaderMap>, Bytes)>> {
        let err = |e: &dyn std::fmt::Display| bus_err(format!("reading {filter}: {e}"));
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
                out.push((m.message.headers.clone(), m.message.payload.clone()));
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

    /// The history query of [`Broker::history`].
    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
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
                self.read_range(&subject, &head, lower, limit, history.ttl)
                    .await?
            }
        };
        Ok(HistoryResult { publications, top })
    }

    fn history_options(&self, channel: &str) -> HistoryOptions {
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

/// A position a channel task has delivered up to.
#[derive(Debug, Clone)]
struct Delivered {
    epoch: Arc<str>,
    offset: u64,
}

/// One locally subscribed channel.
struct ChannelSub {
    /// Stops the channel's task (and its subscription).
    cancel: CancellationToken,
    /// Asks the task to replay what it missed (after a reconnect).
    resync: Arc<Notify>,
}

/// Channel → its live subscription task.
type Channels = Mutex<HashMap<Arc<str>, ChannelSub>>;

/// The per-channel publish state: the lock serializes this instance's
/// publishes to the channel; the value is the head after the last one.
type Writer = Arc<tokio::sync::Mutex<Option<Head>>>;

/// The NATS [`Broker`].
pub struct NatsBroker {
    /// Connection, names, options.
    bus: Arc<Bus>,
    /// Set once by `start`.
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// Channels with local subscribers → their task (shared with the
    /// reconnect task, which asks each to resync).
    channels: Arc<Channels>,
    /// Channel → publish lock and cached head (see [`Writer`]); idle
    /// entries are swept.
    writers: Mutex<HashMap<Arc<str>, Writer>>,
    /// Local client id → the handle whose drop ends its direct
    /// subscription.
    clients: Mutex<HashMap<Arc<str>, oneshot::Sender<()>>>,
    /// Hands new direct subscriptions to the direct task.
    direct_tx: OnceLock<mpsc::UnboundedSender<BoxStream<'static, async_nats::Message>>>,
    /// Connection events, taken by `start`.
    events: Mutex<Option<mpsc::Receiver<Event>>>,
    /// Stops every task of this broker and its presence store.
    shutdown: CancellationToken,
}

impl NatsBroker {
    /// Publications and control messages that failed (bus unreachable or
    /// refusing); also logged.
    pub fn failed_publishes(&self) -> u64 {
        self.bus.failed_publishes.load(Ordering::Relaxed)
    }

    fn handler(&self) -> Result<&Arc<dyn BrokerHandler>> {
        self.handler
            .get()
            .ok_or_else(|| bus_err("NatsBroker::start was not called"))
    }

    fn writer(&self, channel: &str) -> Writer {
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
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

    fn count_failure(&self, what: &str, e: &Error) {
        self.bus.failed_publishes.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "{what} failed on the NATS bus");
    }

    async fn try_publish(
        &self,
        channel: &str,
        publication: &NewPublication,
    ) -> Result<StreamPosition> {
        self.bus.connected()?;
        let subject = self.bus.stream_subject(channel);
        let writer = self.writer(channel);
        let mut cached = writer.lock().await;
        for _ in 0..PUBLISH_ATTEMPTS {
            let head = match cached.take() {
                Some(h) => Some(h),
                None => self.bus.head(&subject).await?,
            };
            let fresh_epoch;
            let (epoch, offset, expected): (&str, u64, u64) = match &head {
                Some(h) => (&h.epoch, h.offset + 1, h.seq),
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
            .map_err(|e| bus_err(format!("encoding a publication: {e}")))?;
            if let Some(seq) = self.bus.append(&subject, expected, body).await? {
                let epoch: Arc<str> = Arc::from(epoch);
                *cached = Some(Head {
                    seq,
                    epoch: epoch.clone(),
                    offset,
                });
                return Ok(StreamPosition { epoch, offset });
            }
            // Someone else appended: re-read the head and retry.
        }
        Err(bus_err(format!("{channel}: too much publish contention")))
    }

    /// A user-addressed direct message: a core publish on the user
    /// channel's `.u` subject, which only the instances holding the user's
    /// connections subscribe to and which no stream captures. At most
    /// once; nothing is kept.
    async fn publish_to_user(
        &self,
        channel: &str,
        publication: &NewPublication,
    ) -> Result<StreamPosition> {
        self.bus.connected()?;
        let body = serde_json::to_vec(&WireOut {
            epoch: NO_EPOCH,
            offset: 0,
            prev: 0,
            sender_id: publication.sender_id.as_deref(),
            timestamp: publication.timestamp,
            data: Some(&publication.data),
        })
        .map_err(|e| bus_err(format!("encoding a user message: {e}")))?;
        self.bus
            .client
            .publish(self.bus.user_subject(channel), Bytes::from(body))
            .await
            .map_err(|e| bus_err(format!("publishing a user message: {e}")))?;
        Ok(StreamPosition {
            epoch: NO_EPOCH.into(),
            offset: 0,
        })
    }

    /// Ask every channel task to replay what it missed (after a
    /// reconnect).
    fn resync_all(channels: &Channels) {
        let channels = channels.lock().unwrap_or_else(|p| p.into_inner());
        for sub in channels.values() {
            sub.resync.notify_one();
        }
    }
}

#[async_trait]
impl Broker for NatsBroker {
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> Result<()> {
        if self.handler.set(handler.clone()).is_err() {
            return Ok(());
        }
        let bus = self.bus.clone();
        // Broadcasts.
        let mut bcast = bus
            .client
            .subscribe(bus.broadcast_subject())
            .await
            .map_err(|e| bus_err(format!("subscribing to broadcasts: {e}")))?;
        {
            let handler = handler.clone();
            let stop = self.shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        m = bcast.next() => match m {
                            Some(m) => match serde_json::from_slice::<WireBroadcast>(&m.payload) {
                                Ok(b) => handler.on_control(&Control::Broadcast {
                                    sender_id: b.sender_id,
                                    data: b.data,
                                    timestamp: b.timestamp,
                                }),
                                Err(e) => tracing::warn!(error = %e, "undecodable broadcast on the NATS bus"),
                            },
                            None => break,
                        },
                    }
                }
            });
        }
        // Direct messages: one task polls every local client's subscription.
        let (direct_tx, mut direct_rx) = mpsc::unbounded_channel();
        let _ = self.direct_tx.set(direct_tx);
        {
            let handler = handler.clone();
            let stop = self.shutdown.clone();
            let client = bus.client.clone();
            tokio::spawn(async move {
                let mut subs: SelectAll<BoxStream<'static, async_nats::Message>> = SelectAll::new();
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        s = direct_rx.recv() => match s {
                            Some(s) => subs.push(s),
                            None => break,
                        },
                        Some(m) = subs.next(), if !subs.is_empty() => {
                            let delivered = serde_json::from_slice::<Direct>(&m.payload)
                                .map(|d| handler.on_direct(&d))
                                .unwrap_or(false);
                            if let Some(reply) = m.reply {
                                let answer = if delivered { "1" } else { "0" };
                                let _ = client.publish(reply, Bytes::from_static(answer.as_bytes())).await;
                            }
                        }
                    }
                }
            });
        }
        // Connection events: readiness is the connection state; after a
        // reconnect, repair and replay.
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut events) = events {
            let stop = self.shutdown.clone();
            let weak = Arc::downgrade(&bus);
            let (resync_tx, mut resync_rx) = mpsc::channel::<()>(1);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        e = events.recv() => match e {
                            Some(Event::Connected) => {
                                tracing::info!("NATS bus connected");
                                let _ = resync_tx.try_send(());
                            }
                            Some(Event::Disconnected) => tracing::warn!("NATS bus disconnected; reconnecting"),
                            Some(other) => tracing::info!(event = %other, "NATS bus event"),
                            None => break,
                        },
                    }
                }
            });
            // The repair runs in its own task so events keep flowing.
            let stop = self.shutdown.clone();
            let channels = self.channels.clone();
            tokio::spawn(async move {
                while let Some(()) = tokio::select! {
                    _ = stop.cancelled() => None,
                    r = resync_rx.recv() => r,
                } {
                    let Some(bus) = weak.upgrade() else { break };
                    let timeout = bus.opts.request_timeout;
                    if tokio::time::timeout(timeout, bus.sync()).await.is_err() {
                        continue;
                    }
                    if let Err(e) = bus.ensure_stream().await {
                        tracing::warn!(error = %e, "re-creating the NATS channel stream failed");
                    }
                    if let Err(e) = bus.ensure_gen_stream().await {
                        tracing::warn!(error = %e, "re-creating the NATS epoch generation failed");
                    }
                    if let Err(e) = bus.ensure_bucket().await {
                        tracing::warn!(error = %e, "re-creating the NATS presence bucket failed");
                    }
                    bus.presence_dirty.notify_one();
                    NatsBroker::resync_all(&channels);
                }
            });
        }
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<()> {
        let handler = self.handler()?.clone();
        self.bus.connected()?;
        let bus = self.bus.clone();
        let sub = bus
            .client
            .subscribe(bus.live_subjects(channel))
            .await
            .map_err(|e| bus_err(format!("subscribing to {channel}: {e}")))?;
        // The head is read by a request sent after the SUB on the same
        // connection, so the server has the subscription by then: every
        // later publication arrives live. A user channel has no head: a
        // round trip does the same.
        let last = if is_internal_channel(channel) {
            bus.sync().await?;
            None
        } else {
            let head = bus.head(&bus.stream_subject(channel)).await?;
            head.map(|h| Delivered {
                epoch: h.epoch,
                offset: h.offset,
            })
        };
        let channel: Arc<str> = Arc::from(channel);
        let cancel = self.shutdown.child_token();
        let resync = Arc::new(Notify::new());
        let previous = self
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                channel.clone(),
                ChannelSub {
                    cancel: cancel.clone(),
                    resync: resync.clone(),
                },
            );
        if let Some(previous) = previous {
            previous.cancel.cancel();
        }
        tokio::spawn(channel_task(
            bus, handler, channel, sub, last, cancel, resync,
        ));
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<()> {
        let sub = self
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(channel);
        if let Some(sub) = sub {
            sub.cancel.cancel();
        }
        Ok(())
    }

    async fn publish(
        &self,
        channel: &str,
        publication: NewPublication,
        _history: HistoryOptions,
    ) -> Result<StreamPosition> {
        let result = match is_internal_channel(channel) {
            true => self.publish_to_user(channel, &publication).await,
            false => self.try_publish(channel, &publication).await,
        };
        if let Err(e) = &result {
            self.count_failure("a channel publication", e);
        }
        result
    }

    async fn publish_control(&self, control: Control) -> Result<()> {
        let result = async {
            self.bus.connected()?;
            let subject = match &control {
                Control::Broadcast { .. } => self.bus.broadcast_subject(),
                Control::Join { channel, .. } | Control::Leave { channel, .. } => {
                    self.bus.event_subject(channel)
                }
            };
            // Broadcasts go as a plain struct: serde cannot read a raw
            // JSON value back through the internally tagged `Control`.
            let payload = match &control {
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
            .map_err(|e| bus_err(format!("encoding a control message: {e}")))?;
            self.bus
                .client
                .publish(subject, Bytes::from(payload))
                .await
                .map_err(|e| bus_err(format!("publishing a control message: {e}")))
        }
        .await;
        if let Err(e) = &result {
            self.count_failure("a control message", e);
        }
        result
    }

    async fn direct(&self, direct: Direct) -> Result<bool> {
        self.bus.connected()?;
        let subject = self.bus.client_subject(&direct.target_id);
        let payload = serde_json::to_vec(&direct)
            .map_err(|e| bus_err(format!("encoding a direct message: {e}")))?;
        match self.bus.client.request(subject, Bytes::from(payload)).await {
            Ok(reply) => Ok(reply.payload.as_ref() == b"1"),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(false),
            Err(e) => Err(bus_err(format!("direct message: {e}"))),
        }
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        history: HistoryOptions,
    ) -> Result<HistoryResult> {
        self.bus.history(channel, since, limit, history).await
    }

    async fn register_client(&self, info: &ClientInfo) -> Result<()> {
        self.bus.connected()?;
        let direct_tx = self
            .direct_tx
            .get()
            .ok_or_else(|| bus_err("NatsBroker::start was not called"))?;
        let sub: Subscriber = self
            .bus
            .client
            .subscribe(self.bus.client_subject(&info.client_id))
            .await
            .map_err(|e| bus_err(format!("subscribing a client: {e}")))?;
        let (tx, rx) = oneshot::channel::<()>();
        // Until `tx` is dropped (unregister), then drained: the server
        // forgets the subject, and requests already on their way are still
        // answered (`0`: gone) instead of timing out.
        let stream =
            futures_util::stream::unfold((sub, Some(rx)), |(mut sub, mut rx)| async move {
                loop {
                    match rx.as_mut() {
                        Some(r) => tokio::select! {
                            _ = r => {
                                let _ = sub.drain().await;
                                rx = None;
                            }
                            m = sub.next() => return m.map(|m| (m, (sub, rx))),
                        },
                        None => return sub.next().await.map(|m| (m, (sub, None))),
                    }
                }
            });
        if direct_tx.send(stream.boxed()).is_err() {
            return Err(bus_err("the NATS direct task has stopped"));
        }
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(info.client_id.clone(), tx);
        // Reachable from every instance once the server has the SUB.
        self.bus.sync().await
    }

    async fn unregister_client(&self, client_id: &str) -> Result<()> {
        // Dropping the sender ends the stream; dropping the subscriber
        // unsubscribes.
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(client_id);
        Ok(())
    }

    fn is_ready(&self) -> bool {
        self.bus.client.connection_state() == State::Connected
    }

    async fn close(&self) -> Result<()> {
        self.shutdown.cancel();
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let timeout = self.bus.opts.request_timeout;
        let _ = tokio::time::timeout(timeout, self.bus.client.flush()).await;
        Ok(())
    }
}

/// One locally subscribed channel: delivers its publications in offset
/// order, each once, and join/leave events; fills gaps from history.
async fn channel_task(
    bus: Arc<Bus>,
    handler: Arc<dyn BrokerHandler>,
    channel: Arc<str>,
    mut sub: Subscriber,
    mut last: Option<Delivered>,
    cancel: CancellationToken,
    resync: Arc<Notify>,
) {
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            // A user channel keeps nothing to catch up from.
            _ = resync.notified(), if !is_internal_channel(&channel) => {
                catch_up(&bus, &*handler, &channel, &mut last, None).await
            }
            m = sub.next() => {
                let Some(m) = m else { break };
                if m.subject.as_str().ends_with(".u") {
                    // A user-addressed message: no offset, no history.
                    match WireIn::parse(&m.payload).and_then(WireIn::publication) {
                        Some(p) => handler.on_publication(&channel, &Arc::from(NO_EPOCH), &p),
                        None => tracing::warn!(%channel, "undecodable user message on the NATS bus"),
                    }
                    continue;
                }
                if m.subject.as_str().ends_with(".e") {
                    match serde_json::from_slice::<Control>(&m.payload) {
                        Ok(c) => handler.on_control(&c),
                        Err(e) => tracing::warn!(error = %e, "undecodable event on the NATS bus"),
                    }
                    continue;
                }
                let Some(w) = WireIn::parse(&m.payload) else {
                    tracing::warn!(%channel, "undecodable publication on the NATS bus");
                    continue;
                };
                let same_epoch = last.as_ref().is_some_and(|l| l.epoch == w.epoch);
                if w.offset == 0 {
                    // An epoch marker of an earlier version: the channel
                    // (re)starts here.
                    if !same_epoch {
                        last = Some(Delivered { epoch: w.epoch, offset: 0 });
                    }
                    continue;
                }
                let expected = match (&last, same_epoch) {
                    (Some(l), true) => l.offset,
                    _ => 0,
                };
                if w.offset <= expected {
                    continue; // already delivered (a replay overlapped)
                }
                if w.offset > expected + 1 {
                    let from = Delivered { epoch: w.epoch.clone(), offset: expected };
                    let mut at = Some(from);
                    catch_up(&bus, &*handler, &channel, &mut at, Some(w.offset - 1)).await;
                }
                let epoch = w.epoch.clone();
                if let Some(p) = w.publication() {
                    handler.on_publication(&channel, &epoch, &p);
                    last = Some(Delivered { epoch, offset: p.offset });
                }
            }
        }
    }
    let _ = sub.unsubscribe().await;
}

/// Deliver what history holds after `last` (up to `until`, else up to the
/// current top), or call `resync_failed` when it cannot fill the gap.
async fn catch_up(
    bus: &Bus,
    handler: &dyn BrokerHandler,
    channel: &Arc<str>,
    last: &mut Option<Delivered>,
    until: Option<u64>,
) {
    if is_internal_channel(channel) {
        return; // user channels: at most once, no history
    }
    let opts = bus.history_options(channel);
    let since = last.as_ref().map(|l| StreamPosition {
        epoch: l.epoch.clone(),
        offset: l.offset,
    });
    let h = match bus.history(channel, since.as_ref(), usize::MAX, opts).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(%channel, error = %e, "reading history to fill a gap failed");
            handler.resync_failed(channel);
            return;
        }
    };
    let after = since.as_ref().map_or(0, |s| s.offset);
    let end = until.unwrap_or(h.top.offset).min(h.top.offset);
    let complete = match &since {
        Some(s) => {
            s.epoch == h.top.epoch
                && h.publications.len() as u64 >= end.saturating_sub(after)
                && h.publications.first().is_none_or(|p| p.offset == after + 1)
        }
        // Nothing delivered yet, and the channel was empty when this
        // instance subscribed: everything in the epoch is new.
        None => h.publications.first().is_none_or(|p| p.offset == 1),
    };
    for p in h.publications.iter().filter(|p| p.offset <= end) {
        handler.on_publication(channel, &h.top.epoch, p);
    }
    if !complete {
        handler.resync_failed(channel);
    }
    if until.is_none() || !complete {
        *last = Some(Delivered {
            epoch: h.top.epoch.clone(),
            offset: end,
        });
    } else if let Some(p) = h.publications.iter().rfind(|p| p.offset <= end) {
        *last = Some(Delivered {
            epoch: h.top.epoch.clone(),
            offset: p.offset,
        });
    }
}

/// This instance's members of one channel.
#[derive(Default)]
struct LocalChannel {
    /// Client id → info.
    members: BTreeMap<Arc<str>, ClientInfo>,
    /// Bumped on every change.
    version: u64,
    /// Serializes writes of this channel's key; holds the version written.
    written: Arc<tokio::sync::Mutex<u64>>,
}

/// The NATS [`PresenceStore`].
pub struct NatsPresence {
    /// Connection, names, options.
    bus: Arc<Bus>,
    /// Channel → this instance's members, the source of its keys.
    local: Mutex<HashMap<Arc<str>, LocalChannel>>,
    /// Stops the refresh task.
    shutdown: CancellationToken,
}

impl NatsPresence {
    fn key(&self, channel: &str) -> String {
        format!("{}.{}", token(channel), self.bus.instance_token)
    }

    async fn store(&self) -> Result<kv::Store> {
        self.bus
            .js
            .get_key_value(&self.bus.bucket_name)
            .await
            .map_err(|e| bus_err(format!("presence bucket: {e}")))
    }

    /// Write `channel`'s key if it is older than `version` (a concurrent
    /// write may already have covered it).
    async fn sync(&self, channel: &str, version: Option<u64>) -> Result<()> {
        let written = {
            let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            match local.get(channel) {
                Some(c) => c.written.clone(),
                None => return Ok(()),
            }
        };
        let mut written = written.lock().await;
        let (snapshot, current) = {
            let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            match local.get(channel) {
                Some(c) => (c.members.values().cloned().collect::<Vec<_>>(), c.version),
                None => (Vec::new(), u64::MAX),
            }
        };
        if version.is_some_and(|v| *written >= v) {
            return Ok(());
        }
        self.bus.connected()?;
        let store = self.store().await?;
        let key = self.key(channel);
        if snapshot.is_empty() {
            store
                .delete(&key)
                .await
                .map_err(|e| bus_err(format!("presence delete: {e}")))?;
            let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            if local.get(channel).is_some_and(|c| c.members.is_empty()) {
                local.remove(channel);
            }
        } else {
            let value = serde_json::to_vec(&snapshot)
                .map_err(|e| bus_err(format!("encoding presence: {e}")))?;
            store
                .put(&key, Bytes::from(value))
                .await
                .map_err(|e| bus_err(format!("presence put: {e}")))?;
        }
        *written = current;
        Ok(())
    }

    fn change(&self, channel: &str, f: impl FnOnce(&mut BTreeMap<Arc<str>, ClientInfo>)) -> u64 {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let c = local.entry(Arc::from(channel)).or_default();
        f(&mut c.members);
        c.version += 1;
        c.version
    }

    /// Rewrite every key this instance owns, every `presence_refresh` (and
    /// at once after a reconnect), so that they outlive the bucket's max
    /// age only while this instance lives.
    fn spawn_refresh(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let stop = self.shutdown.clone();
        let every = self.bus.opts.presence_refresh;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let dirty = {
                    let Some(me) = weak.upgrade() else { break };
                    let bus = me.bus.clone();
                    drop(me);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => false,
                        _ = bus.presence_dirty.notified() => true,
                    }
                };
                let Some(me) = weak.upgrade() else { break };
                let channels: Vec<Arc<str>> = me
                    .local
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                for channel in channels {
                    if let Err(e) = me.sync(&channel, None).await {
                        tracing::warn!(%channel, error = %e, dirty, "refreshing presence failed");
                        break;
                    }
                }
            }
        });
    }

    /// Remove every key of this instance (clean shutdown).
    pub async fn clear(&self) -> Result<()> {
        let channels: Vec<Arc<str>> = {
            let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            for c in local.values_mut() {
                c.members.clear();
                c.version += 1;
            }
            local.keys().cloned().collect()
        };
        for channel in channels {
            self.sync(&channel, None).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl PresenceStore for NatsPresence {
    async fn add(&self, channel: &str, info: &ClientInfo) -> Result<()> {
        let version = self.change(channel, |m| {
            m.insert(info.client_id.clone(), info.clone());
        });
        self.sync(channel, Some(version)).await
    }

    async fn remove(&self, channel: &str, client_id: &str) -> Result<()> {
        let version = self.change(channel, |m| {
            m.remove(client_id);
        });
        self.sync(channel, Some(version)).await
    }

    async fn members(&self, channel: &str) -> Result<Vec<ClientInfo>> {
        self.bus.connected()?;
        let filter = format!("$KV.{}.{}.*", self.bus.bucket_name, token(channel));
        let entries = self
            .bus
            .consume(
                &format!("KV_{}", self.bus.bucket_name),
                &filter,
                consumer::DeliverPolicy::LastPerSubject,
            )
            .await?;
        let mut members: BTreeMap<Arc<str>, ClientInfo> = BTreeMap::new();
        for (headers, payload) in entries {
            let deleted = headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() != "PUT");
            if deleted || payload.is_empty() {
                continue;
            }
            if let Ok(list) = serde_json::from_slice::<Vec<ClientInfo>>(&payload) {
                for info in list {
                    members.insert(info.client_id.clone(), info);
                }
            }
        }
        Ok(members.into_values().collect())
    }
}
