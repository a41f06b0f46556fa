//! The NATS bus: JetStream for channel history and offsets, core NATS for
//! live delivery, broadcast, join/leave and direct messages, a JetStream
//! key-value bucket for presence.
//!
//! # Files
//!
//! This file holds [`connect`], the shared state (`Bus`: connection,
//! names, limits, subjects) and the [`Broker`] / [`PresenceStore`] impls,
//! which delegate to:
//!
//! * `supervise.rs`: the channel stream and its limits, the
//!   connection-event task and the repair after a reconnect, the live
//!   subscriptions (per-channel tasks that fill gaps from history, the
//!   broadcast subscription), shutdown;
//! * `publish.rs`: the stored message format, the conditional publish,
//!   the epoch generation stream, history reads, control messages;
//! * `presence.rs`: the presence bucket and this instance's keys;
//! * `ghosts.rs`: leaves for the members of a crashed instance;
//! * `direct.rs`: requests to one client, user-addressed messages.
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
//! | direct to a client | request to `P.inst.<tag>`, the tag starting the client id (core request/reply) | no |
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
//! # Idempotent and conditional publish
//!
//! An `idempotencyKey` travels as the JetStream `Nats-Msg-Id`
//! `T(channel).T(key)`; the stream's `duplicate_window` is the longest
//! namespace `idempotency_window` (at most `max_age`, which JetStream
//! requires), so a shorter namespace window is not enforced shorter on
//! NATS. JetStream checks the id before the expected sequence, so a
//! repeat is answered with the first message's sequence, whose stored
//! epoch and offset are the reply; when that message has left the stream
//! the reply is `duplicate`. An `expectedOffset` is compared with the head
//! read fresh from the server (a cached head that disagrees is re-read)
//! and the append carries that head's sequence as
//! `Nats-Expected-Last-Subject-Sequence`: a writer that lost the race
//! re-reads and answers `offset_mismatch`. With a key and a mismatching
//! offset the append expects sequence `u64::MAX`, which asks for the
//! duplicate check and can never be stored.
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
//! An expired key leaves no trace on NATS 2.9 (no delete marker, no watch
//! event), so each instance finds them itself (`ghosts.rs`): after each
//! refresh pass it reads the keys of the `join_leave` channels it has
//! local members in, and a key read before and absent now (expired; a
//! deleted key leaves a marker) gets a `leave` for each of its members
//! that no other key holds, told to this instance's own subscribers only:
//! every subscriber hears it once, within about `presence_ttl` plus a
//! third of it. If the key comes back (its instance was cut off, not
//! crashed; remembered `4 × presence_ttl`) those members get a `join`.
//!
//! # Direct
//!
//! Nothing is registered per client. Each instance draws a random
//! four-character tag at start that no live instance answers for, and
//! holds one core subscription, `P.inst.<tag>`; every client id it gives
//! starts its random part with that tag ([`crate::ids::client_id`]). A
//! `direct` is a NATS request to the subject of the target id's tag; the
//! instance holding the client answers `1` (queued) or `0` (not here, or
//! gone meanwhile). NATS answers "no responders" at once when no instance
//! has the tag (the instance is gone, or the id was made up): `Ok(false)`,
//! the client gets `unknown_target`. A crashed instance's subscription dies
//! with its connection, so nothing stale is left behind. Two instances
//! drawing the same tag in the same instant is the one race (a chance in
//! ~1.7 M per pair of simultaneous starts); the cost would be directs to
//! one of them answered `0` by the other.
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

mod direct;
mod ghosts;
mod presence;
mod publish;
mod supervise;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::Event;
use async_nats::connection::State;
use async_nats::jetstream;
use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::bus_error;
use super::{
    Broker, BrokerHandler, Control, Direct, HistoryOptions, HistoryResult, NewPublication,
    PresenceStore,
};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::protocol::is_internal_channel;
use crate::protocol::{ClientInfo, StreamPosition};
use ghosts::Ghosts;
use presence::LocalChannel;
use publish::Writer;
use supervise::Channels;

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
        .map_err(|_| bus_error(format!("connecting to NATS at {url} timed out")))?
        .map_err(|e| bus_error(format!("cannot connect to NATS at {url}: {e}")))?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(opts.request_timeout);
    let prefix = config.bus_prefix.clone();
    let mut size = config.default_namespace.history_size;
    let mut ttl = config.default_namespace.history_ttl;
    let mut window = config.default_namespace.idempotency_window;
    for ns in config.namespaces.values() {
        size = size.max(ns.history_size);
        ttl = ttl.max(ns.history_ttl);
        window = window.max(ns.idempotency_window);
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
        // JetStream refuses a window longer than `max_age`.
        duplicate_window: window.min(ttl),
        max_bytes: i64::try_from(config.history_max_bytes).unwrap_or(i64::MAX),
        prefix,
        config: config.clone(),
        opts,
        failed_publishes: AtomicU64::new(0),
        presence_dirty: Notify::new(),
        ghosts: Ghosts::default(),
    });
    bus.ensure_stream().await?;
    bus.ensure_gen_stream().await?;
    bus.ensure_bucket().await?;
    let broker = Arc::new(NatsBroker {
        bus: bus.clone(),
        handler: OnceLock::new(),
        channels: Arc::default(),
        writers: Mutex::default(),
        tag: OnceLock::new(),
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
    /// The stream's `duplicate_window`: the longest namespace
    /// `idempotency_window`, at most `max_age`.
    duplicate_window: Duration,
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
    /// Other instances' presence keys as last read, to tell the local
    /// subscribers the members of a crashed instance left.
    ghosts: Ghosts,
}

impl Bus {
    fn connected(&self) -> Result<()> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            state => Err(bus_error(format!("NATS is not connected ({state:?})"))),
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
            Err(e) => Err(bus_error(format!("NATS round trip: {e}"))),
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

    /// The direct subject of the instance tagged `tag` (base36, a valid
    /// subject token as it is).
    fn instance_subject(&self, tag: &str) -> String {
        format!("{}.inst.{tag}", self.prefix)
    }
}

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
    /// This instance's tag, chosen by `start` (`listen_direct`): the
    /// direct subject `P.inst.<tag>`, and the start of every client id
    /// given here.
    tag: OnceLock<String>,
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
            .ok_or_else(|| bus_error("NatsBroker::start was not called"))
    }
}

#[async_trait]
impl Broker for NatsBroker {
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> Result<()> {
        if self.handler.set(handler.clone()).is_err() {
            return Ok(());
        }
        self.bus.ghosts.set_handler(handler.clone());
        self.listen_broadcasts(&handler).await?;
        self.listen_direct(&handler).await?;
        self.watch_connection();
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<()> {
        self.subscribe_channel(channel).await
    }

    async fn unsubscribe(&self, channel: &str) -> Result<()> {
        self.unsubscribe_channel(channel);
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
        if let Err(e @ Error::Bus(_)) = &result {
            self.count_failure("a channel publication", e);
        }
        result
    }

    async fn publish_control(&self, control: Control) -> Result<()> {
        let result = self.send_control(&control).await;
        if let Err(e) = &result {
            self.count_failure("a control message", e);
        }
        result
    }

    async fn direct(&self, direct: Direct) -> Result<bool> {
        self.send_direct(direct).await
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        newest_first: bool,
        history: HistoryOptions,
    ) -> Result<HistoryResult> {
        self.bus
            .history(channel, since, limit, newest_first, history)
            .await
    }

    fn instance_tag(&self) -> Option<String> {
        self.tag.get().cloned()
    }

    fn is_ready(&self) -> bool {
        self.bus.client.connection_state() == State::Connected
    }

    async fn close(&self) -> Result<()> {
        self.shut_down().await;
        Ok(())
    }
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
        self.read_members(channel).await
    }
}
