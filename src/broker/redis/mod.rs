//! The Redis bus (`--bus redis://host:port[/db]`): channel history in
//! streams, fan-out over Redis pub/sub, presence and the client directory
//! in keys that expire when their instance stops refreshing them.
//!
//! # Key and topic layout
//!
//! `P` is `bus_prefix`; `{ch}` is the channel name, in braces so that a
//! channel's keys share a Redis Cluster hash slot.
//!
//! | key / topic | type | what |
//! |---|---|---|
//! | `P:ch:{ch}:meta` | hash `epoch`, `top` | the stream's epoch and newest offset; written only by a publish, expires the namespace's `history_ttl` after the last one |
//! | `P:ch:{ch}:stream` | stream, ids `0-<offset>` | retained publications: field `b` the JSON body, `x` the expiry (Redis ms); exact `MAXLEN` = the namespace's `history_size` (no key when it is 0); expires `history_ttl` after the last publish |
//! | `P:gen` | string, no expiry | the epoch the next new stream takes (one key per deployment, rewritten by each stream creation, restored by the heartbeat) |
//! | `P:pr:{ch}:members` | hash client id → info JSON | presence |
//! | `P:pr:{ch}:expiry` | zset client id → expiry (Redis ms) | per-member expiry, refreshed by the heartbeat |
//! | `P:client:<client id>` | string → instance id, `PX presence_ttl` | the direct-message directory |
//! | topic `P:ch:{ch}` | pub/sub | `p <epoch> <offset> <body>` publications and `c <control>` join/leave of the channel; for a user channel `#user:<sub>`, `p - 0 <body>` (no key behind it) |
//! | topic `P:all` | pub/sub | `b <body>` broadcasts |
//! | topic `P:inst:<instance id>` | pub/sub | `d <direct>` messages for clients of that instance |
//!
//! # Guarantees
//!
//! * **Publish** is one Lua script: create the epoch if the meta is gone,
//!   `HINCRBY top`, `XADD` (exact `MAXLEN`), `PEXPIRE`, `PUBLISH`. Redis runs scripts
//!   one at a time, so offsets grow by exactly one and the publications of
//!   a channel enter every subscriber connection in offset order. Each
//!   instance holds one pub/sub connection, `SUBSCRIBE`d to the topics of
//!   the channels it has local subscribers for: a publication crosses the
//!   bus once and reaches each interested instance once. The own instance
//!   gets its publications through the same round trip (no local
//!   shortcut), so every instance delivers the same order, exactly once.
//! * **History and recovery**: the stream keeps the last `history_size`
//!   publications, each until its expiry (filtered on read with Redis
//!   `TIME`, so clocks of instances do not matter; a read also returns at
//!   most the newest `history_size`, should a namespace have shrunk). A
//!   client can recover on any instance.
//! * **Epochs, and nothing written by reads.** A history or position read
//!   (every subscribe makes one) writes nothing: for a channel without a
//!   stream it reports `(G, 0)`, `G` being the current value of `P:gen`.
//!   The publish that creates a stream takes `G` as its epoch and replaces
//!   `P:gen` with a fresh random value in the same script, so every stream
//!   ever created has an epoch of its own, and a reader that saw `(G, 0)`
//!   recovers everything after it exactly when the stream it finds is the
//!   first one created after its read. (If another channel's stream was
//!   created in between, the epochs differ: live delivery simply moves to
//!   the new epoch, a recovery from `(G, 0)` answers `recovered:false`.)
//!   When Redis loses the keys (restart without persistence, `FLUSHALL`,
//!   eviction, expiry) the next publish starts a new epoch, so a stale
//!   position is never trusted. `P:gen` lives in its own hash slot: the
//!   scripts are not Redis-Cluster-safe (the bus speaks to one Redis
//!   endpoint, e.g. Memorystore Basic/Standard).
//! * **What history keeps, and for how long.** A channel's keys expire
//!   `history_ttl` after its last publication, the meta key included:
//!   once every publication has expired, nothing of the channel is left.
//!   Remembering the epoch longer (this bus did, for an hour) is not needed
//!   for correct recovery: a client recovering across the restart of an
//!   idle channel gets `recovered:false`, which is true to what the server
//!   can prove; the only cost is that a client that had seen everything is
//!   told so too. A namespace with `history_size = 0` keeps the meta key
//!   only (offsets keep advancing) for `history_ttl`; user channels
//!   (`#user:<sub>`, user-addressed `direct`) keep nothing at all: their
//!   messages are a bare `PUBLISH`, at most once.
//! * **Memory bound.** One instance cannot enforce an instance-wide byte
//!   budget (`history_max_bytes`) on a Redis shared by many: the bound
//!   there is the operator's `maxmemory` with a `volatile-ttl` or
//!   `volatile-lru` policy. Every history key carries a TTL, so these
//!   policies can evict them (a channel whose keys are evicted restarts in
//!   a new epoch, as above); presence and directory keys carry TTLs too,
//!   and only `P:gen` has none (one small key).
//! * **Presence**: each member has an expiry `presence_ttl` ahead,
//!   refreshed every `presence_ttl / 3` by the instance's heartbeat (which
//!   rewrites the entries, so they also come back after Redis lost them);
//!   `members` drops expired ones. The members of a crashed instance
//!   disappear within `presence_ttl`. No `leave` event is sent for them
//!   (nobody is left to send it).
//! * **Direct**: a target on this instance is delivered locally; otherwise
//!   `P:client:<id>` names its instance and the message is published on that
//!   instance's topic. No entry, or no listener on the topic (`PUBLISH`
//!   answers 0 receivers: the instance is gone) → unknown target. A crashed
//!   instance's clients stop resolving at once (no listener) and their
//!   entries expire within `presence_ttl`.
//!
//! # Outage
//!
//! A supervisor task owns the pub/sub connection. When it breaks (or a
//! heartbeat write fails) the instance turns unready (`/readyz` 503) and
//! reconnects with exponential backoff (100 ms doubling to 5 s, ±50 %
//! jitter). Meanwhile local clients stay connected; operations that need
//! Redis (publish, broadcast, direct to another instance, presence,
//! history, subscribing a new channel) fail with `Error::Bus`, which the
//! client sees as `bus_unavailable`, and the node counts failed publishes.
//! Once back, the supervisor resubscribes every channel, rewrites the
//! directory and presence entries, then for each locally subscribed channel
//! replays the history after the last delivered position through the
//! handler (sessions drop what they already have by offset), or calls
//! `resync_failed` when the epoch changed or history no longer holds the
//! whole gap. Only then is the instance ready again. At start-up an
//! unreachable Redis is an error within [`CONNECT_TIMEOUT`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, Script};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::{
    Broker, BrokerHandler, Control, Direct, HistoryOptions, HistoryResult, NewPublication,
    PresenceStore,
};
use crate::config::{Config, random_base36};
use crate::error::{Error, Result};
use crate::node::is_internal_channel;
use crate::protocol::{ClientInfo, Publication, StreamPosition};

/// Longest `connect` waits for Redis at start-up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one connection attempt may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest one command may take before the connection counts as broken.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// First reconnection delay; doubled per failed attempt.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnection delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The epoch written on user-addressed messages, which have none.
const NO_EPOCH: &str = "-";

/// Atomic publish: epoch, offset, append, fan-out
/// (`scripts/publish.lua`, headed by its `KEYS` and `ARGV`).
const PUBLISH_LUA: &str = include_str!("scripts/publish.lua");

/// History read; writes nothing
/// (`scripts/history.lua`, headed by its `KEYS` and `ARGV`).
const HISTORY_LUA: &str = include_str!("scripts/history.lua");

/// Presence add
/// (`scripts/presence_add.lua`, headed by its `KEYS` and `ARGV`).
const PRESENCE_ADD_LUA: &str = include_str!("scripts/presence_add.lua");

/// Presence members, dropping expired ones
/// (`scripts/presence_members.lua`, headed by its `KEYS` and `ARGV`).
const PRESENCE_MEMBERS_LUA: &str = include_str!("scripts/presence_members.lua");

/// A failed Redis operation as the crate's typed bus error.
fn bus_err(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Bus(Box::new(e))
}

/// The error of an operation attempted while Redis is unreachable.
#[derive(Debug, thiserror::Error)]
#[error("redis is unreachable (reconnecting)")]
struct Disconnected;

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

/// Names of keys and topics under the prefix.
#[derive(Debug, Clone)]
struct Keys {
    /// `bus_prefix`.
    prefix: String,
    /// `P:ch:{` — a channel topic starts with it.
    channel_topic_start: String,
    /// `P:all`, the broadcast topic.
    all: String,
    /// `P:inst:<this instance>`, this instance's direct topic.
    own: String,
    /// `P:gen`, the epoch the next new stream takes (one key per
    /// deployment, no expiry).
    generation: String,
}

impl Keys {
    fn new(prefix: &str, instance_id: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
            channel_topic_start: format!("{prefix}:ch:{{"),
            all: format!("{prefix}:all"),
            own: format!("{prefix}:inst:{instance_id}"),
            generation: format!("{prefix}:gen"),
        }
    }
    fn topic(&self, channel: &str) -> String {
        format!("{}{channel}}}", self.channel_topic_start)
    }
    fn channel_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic
            .strip_prefix(self.channel_topic_start.as_str())?
            .strip_suffix('}')
    }
    fn meta(&self, channel: &str) -> String {
        format!("{}:ch:{{{channel}}}:meta", self.prefix)
    }
    fn stream(&self, channel: &str) -> String {
        format!("{}:ch:{{{channel}}}:stream", self.prefix)
    }
    fn members(&self, channel: &str) -> String {
        format!("{}:pr:{{{channel}}}:members", self.prefix)
    }
    fn expiry(&self, channel: &str) -> String {
        format!("{}:pr:{{{channel}}}:expiry", self.prefix)
    }
    fn client(&self, client_id: &str) -> String {
        format!("{}:client:{client_id}", self.prefix)
    }
    fn instance(&self, instance_id: &str) -> String {
        format!("{}:inst:{instance_id}", self.prefix)
    }
}

/// The pub/sub side: the subscribing half of the connection and the
/// channels to keep subscribed across reconnections.
#[derive(Default)]
struct Subscriptions {
    /// The live connection's command half; `None` while disconnected.
    sink: Option<PubSubSink>,
    /// Channel → `subscribe` calls minus `unsubscribe` calls. Counting
    /// (instead of a set) makes an unsubscribe that overtakes the next
    /// subscribe of the same channel harmless.
    channels: HashMap<String, usize>,
}

/// State shared by the broker, the presence store and the supervisor.
struct Inner {
    /// Where connections are opened from (the URL).
    client: redis::Client,
    /// Timeouts of every connection.
    conn_config: AsyncConnectionConfig,
    /// Key and topic names.
    keys: Keys,
    /// This instance, as written in the client directory.
    instance_id: String,
    /// Namespace options, for replaying history after an outage.
    config: Config,
    /// Expiry of presence and directory entries; refreshed every third.
    presence_ttl: Duration,
    /// Set by `start`; every delivery goes through it.
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// The command connection (multiplexed); `None` while disconnected.
    cmd: RwLock<Option<MultiplexedConnection>>,
    /// The pub/sub connection's sink and the subscribed channels. A tokio
    /// lock: SUBSCRIBE round trips are made under it so resubscription
    /// and subscribe calls never interleave.
    subs: tokio::sync::Mutex<Subscriptions>,
    /// Reachable and resubscribed (drives `/readyz`).
    ready: AtomicBool,
    /// Clients connected here, rewritten into the directory by the heartbeat.
    local_clients: Mutex<HashMap<Arc<str>, ()>>,
    /// Channel → local members, rewritten into presence by the heartbeat.
    local_presence: Mutex<HashMap<String, HashMap<Arc<str>, ClientInfo>>>,
    /// Cancelled by `close` (or drop): the supervisor stops.
    shutdown: CancellationToken,
    /// The publish script (EVALSHA, reloaded after a Redis restart).
    publish: Script,
    /// The history script.
    history: Script,
    /// The presence-add script.
    presence_add: Script,
    /// The presence-members script.
    presence_members: Script,
}

/// Both connections of one attempt.
struct Connected {
    /// Commands and scripts (multiplexed, cloned per call).
    cmd: MultiplexedConnection,
    /// SUBSCRIBE / UNSUBSCRIBE on the pub/sub connection.
    sink: PubSubSink,
    /// What the pub/sub connection receives; ends when it breaks.
    stream: PubSubStream,
}

impl Inner {
    /// Open both connections and check them, within [`DIAL_TIMEOUT`] each.
    async fn dial(&self) -> Result<Connected> {
        let cmd = tokio::time::timeout(
            DIAL_TIMEOUT,
            self.client
                .get_multiplexed_async_connection_with_config(&self.conn_config),
        )
        .await
        .map_err(bus_err)?
        .map_err(bus_err)?;
        let pubsub = tokio::time::timeout(DIAL_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(bus_err)?
            .map_err(bus_err)?;
        let (sink, stream) = pubsub.split();
        let mut c = cmd.clone();
        let _: String =
            tokio::time::timeout(RESPONSE_TIMEOUT, redis::cmd("PING").query_async(&mut c))
                .await
                .map_err(bus_err)?
                .map_err(bus_err)?;
        Ok(Connected { cmd, sink, stream })
    }

    /// The command connection, or `Error::Bus` while disconnected.
    fn conn(&self) -> Result<MultiplexedConnection> {
        self.cmd
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| bus_err(Disconnected))
    }

    fn handler(&self) -> Option<&Arc<dyn BrokerHandler>> {
        self.handler.get()
    }

    fn ttl_ms(&self) -> u64 {
        self.presence_ttl.as_millis().max(1) as u64
    }

    /// Hand one pub/sub message to the handler.
    fn dispatch(&self, topic: &str, payload: &[u8]) {
        let Some(handler) = self.handler() else {
            return;
        };
        let Ok(text) = std::str::from_utf8(payload) else {
            tracing::warn!(%topic, "non-UTF-8 message on the bus ignored");
            return;
        };
        let Some((kind, rest)) = text.split_once(' ') else {
            tracing::warn!(%topic, "malformed message on the bus ignored");
            return;
        };
        match kind {
            "p" => {
                let Some(channel) = self.keys.channel_of(topic) else {
                    return;
                };
                let mut parts = rest.splitn(3, ' ');
                let (Some(epoch), Some(offset), Some(body)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    tracing::warn!(%topic, "malformed publication ignored");
                    return;
                };
                let (Ok(offset), Ok(body)) =
                    (offset.parse::<u64>(), serde_json::from_str::<Body>(body))
                else {
                    tracing::warn!(%topic, "malformed publication ignored");
                    return;
                };
                let publication = Publication {
                    offset,
                    data: body.data,
                    sender_id: body.sender_id,
                    timestamp: body.timestamp,
                };
                handler.on_publication(&Arc::from(channel), &Arc::from(epoch), &publication);
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
            "d" => match serde_json::from_str::<Direct>(rest) {
                Ok(direct) => {
                    handler.on_direct(&direct);
                }
                Err(e) => tracing::warn!(%topic, error = %e, "malformed direct ignored"),
            },
            _ => tracing::warn!(%topic, "unknown message kind on the bus ignored"),
        }
    }

    /// Rewrite this instance's directory and presence entries with a fresh
    /// expiry. Also what restores them after Redis lost its data.
    async fn heartbeat(&self) -> Result<()> {
        let mut conn = self.conn()?;
        let ttl = self.ttl_ms();
        let clients: Vec<Arc<str>> = self
            .local_clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let presence: Vec<(String, Vec<ClientInfo>)> = self
            .local_presence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(ch, m)| (ch.clone(), m.values().cloned().collect()))
            .collect();
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .map_err(bus_err)?;
        let expire_at = secs * 1000 + micros / 1000 + ttl;
        // Chunks keep each pipeline (and the memory it needs) bounded.
        let mut pipe = redis::pipe();
        let mut queued = 0usize;
        // The generation (the epoch reads report for absent streams) comes
        // back within a beat after Redis lost it.
        pipe.cmd("SET")
            .arg(&self.keys.generation)
            .arg(random_base36(8))
            .arg("NX")
            .ignore();
        for id in &clients {
            pipe.cmd("SET")
                .arg(self.keys.client(id))
                .arg(&self.instance_id)
                .arg("PX")
                .arg(ttl)
                .ignore();
            queued += 1;
            if queued >= 512 {
                pipe.exec_async(&mut conn).await.map_err(bus_err)?;
                pipe = redis::pipe();
                queued = 0;
            }
        }
        for (channel, members) in &presence {
            let (mkey, ekey) = (self.keys.members(channel), self.keys.expiry(channel));
            for info in members {
                let json = serde_json::to_string(info).map_err(bus_err)?;
                pipe.cmd("HSET")
                    .arg(&mkey)
                    .arg(&*info.client_id)
                    .arg(json)
                    .ignore();
                pipe.cmd("ZADD")
                    .arg(&ekey)
                    .arg(expire_at)
                    .arg(&*info.client_id)
                    .ignore();
                queued += 1;
            }
            pipe.cmd("PEXPIRE").arg(&mkey).arg(ttl).ignore();
            pipe.cmd("PEXPIRE").arg(&ekey).arg(ttl).ignore();
            if queued >= 512 {
                pipe.exec_async(&mut conn).await.map_err(bus_err)?;
                pipe = redis::pipe();
                queued = 0;
            }
        }
        pipe.exec_async(&mut conn).await.map_err(bus_err)
    }

    /// Read history (the shared implementation of `Broker::history`).
    async fn read_history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        history: HistoryOptions,
    ) -> Result<HistoryResult> {
        let mut conn = self.conn()?;
        let limit: i64 = match limit {
            0 => 0,
            n => i64::try_from(n).unwrap_or(-1),
        };
        let (epoch, top, entries): (String, u64, Vec<(u64, String)>) = self
            .history
            .key(self.keys.meta(channel))
            .key(self.keys.stream(channel))
            .key(&self.keys.generation)
            .arg(since.map_or("", |s| &*s.epoch))
            .arg(since.map_or(0, |s| s.offset))
            .arg(limit)
            .arg(random_base36(8))
            .arg(history.size)
            .invoke_async(&mut conn)
            .await
            .map_err(bus_err)?;
        let mut publications = Vec::with_capacity(entries.len());
        for (offset, body) in entries {
            let body: Body = serde_json::from_str(&body).map_err(bus_err)?;
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

    /// After a reconnection: fill each local channel's gap from history, or
    /// ask its subscribers to resync.
    async fn replay(&self) -> Result<()> {
        let Some(handler) = self.handler().cloned() else {
            return Ok(());
        };
        for (channel, last) in handler.positions() {
            let Some(opts) = self.config.namespace_of(&channel) else {
                continue;
            };
            let opts = HistoryOptions {
                size: opts.history_size,
                ttl: opts.history_ttl,
            };
            let h = self
                .read_history(&channel, last.as_ref(), usize::MAX, opts)
                .await?;
            match &last {
                // Nothing delivered since the subscription: hand over what
                // is retained; sessions drop what they already have.
                None => {
                    for p in &h.publications {
                        handler.on_publication(&channel, &h.top.epoch, p);
                    }
                }
                Some(last) => {
                    let missed = h.top.offset.saturating_sub(last.offset);
                    let complete = last.epoch == h.top.epoch
                        && last.offset <= h.top.offset
                        && h.publications.len() as u64 == missed
                        && h.publications
                            .first()
                            .is_none_or(|p| p.offset == last.offset + 1);
                    if complete {
                        if missed > 0 {
                            tracing::info!(%channel, missed, "replaying publications missed during a bus outage");
                        }
                        for p in &h.publications {
                            handler.on_publication(&channel, &h.top.epoch, p);
                        }
                    } else {
                        handler.resync_failed(&channel);
                    }
                }
            }
        }
        Ok(())
    }

    /// Make a fresh connection the current one: resubscribe, rewrite the
    /// entries, replay gaps (after an outage), turn ready.
    async fn install(
        &self,
        cmd: MultiplexedConnection,
        mut sink: PubSubSink,
        after_outage: bool,
    ) -> Result<()> {
        *self.cmd.write().unwrap_or_else(|p| p.into_inner()) = Some(cmd);
        {
            let mut subs = self.subs.lock().await;
            let mut topics = vec![self.keys.all.clone(), self.keys.own.clone()];
            topics.extend(subs.channels.keys().map(|c| self.keys.topic(c)));
            tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(&topics))
                .await
                .map_err(bus_err)?
                .map_err(bus_err)?;
            subs.sink = Some(sink);
        }
        self.heartbeat().await?;
        if after_outage {
            self.replay().await?;
        }
        self.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Forget the broken connection: unready, nothing to send through.
    async fn teardown(&self) {
        self.ready.store(false, Ordering::Relaxed);
        *self.cmd.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.subs.lock().await.sink = None;
    }

    /// The supervisor: run the connection, and reconnect it when it breaks.
    async fn supervise(self: Arc<Self>, first: Connected) {
        let mut next = Some(first);
        let mut after_outage = false;
        let mut attempt: u32 = 0;
        let beat = (self.presence_ttl / 3).max(Duration::from_millis(100));
        loop {
            let connected = match next.take() {
                Some(c) => Ok(c),
                None => self.dial().await,
            };
            let result = match connected {
                Ok(c) => match self.install(c.cmd, c.sink, after_outage).await {
                    Ok(()) => Ok(c.stream),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            let mut stream = match result {
                Ok(stream) => {
                    if after_outage {
                        tracing::info!("redis bus reconnected");
                    }
                    attempt = 0;
                    stream
                }
                Err(e) => {
                    self.teardown().await;
                    after_outage = true;
                    let delay = backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?delay, "redis bus unreachable");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = self.shutdown.cancelled() => return,
                    }
                }
            };
            let mut tick = tokio::time::interval(beat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate; install just beat
            let lost = loop {
                tokio::select! {
                    msg = stream.next() => match msg {
                        Some(msg) => self.dispatch(msg.get_channel_name(), msg.get_payload_bytes()),
                        None => break "the pub/sub connection closed".to_string(),
                    },
                    _ = tick.tick() => {
                        if let Err(e) = self.heartbeat().await {
                            break format!("heartbeat failed: {e}");
                        }
                    }
                    _ = self.shutdown.cancelled() => return,
                }
            };
            tracing::warn!(reason = %lost, "redis bus connection lost; reconnecting");
            self.teardown().await;
            after_outage = true;
        }
    }
}

/// Exponential backoff with ±50 % jitter.
fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1u32 << attempt.min(10))
        .min(BACKOFF_MAX);
    base.mul_f64(0.5 + fastrand::f64())
}

/// The Redis [`Broker`].
pub struct RedisBroker {
    /// Shared with the presence store and the supervisor.
    inner: Arc<Inner>,
    /// The connections made by `connect`, taken over by `start`.
    first: Mutex<Option<Connected>>,
    /// The supervisor, awaited by `close`.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The Redis [`PresenceStore`].
pub struct RedisPresence {
    /// Shared with the broker (connection, local members for the heartbeat).
    inner: Arc<Inner>,
}

/// Connect the Redis bus: open and check both connections (within
/// [`CONNECT_TIMEOUT`]); an unreachable Redis is an error.
pub async fn connect(
    url: &str,
    config: &Config,
) -> Result<(Arc<dyn Broker>, Arc<dyn PresenceStore>)> {
    let client = redis::Client::open(url)
        .map_err(|e| Error::Config(format!("bus: invalid redis URL {url:?}: {e}")))?;
    let inner = Arc::new(Inner {
        client,
        conn_config: AsyncConnectionConfig::new()
            .set_connection_timeout(Some(DIAL_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT)),
        keys: Keys::new(&config.bus_prefix, &config.instance_id),
        instance_id: config.instance_id.clone(),
        config: config.clone(),
        presence_ttl: config.presence_ttl,
        handler: OnceLock::new(),
        cmd: RwLock::new(None),
        subs: tokio::sync::Mutex::new(Subscriptions::default()),
        ready: AtomicBool::new(false),
        local_clients: Mutex::new(HashMap::new()),
        local_presence: Mutex::new(HashMap::new()),
        shutdown: CancellationToken::new(),
        publish: Script::new(PUBLISH_LUA),
        history: Script::new(HISTORY_LUA),
        presence_add: Script::new(PRESENCE_ADD_LUA),
        presence_members: Script::new(PRESENCE_MEMBERS_LUA),
    });
    let first = match tokio::time::timeout(CONNECT_TIMEOUT, inner.dial()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(Error::Bus(
                format!("cannot connect to redis at {url}: {e}").into(),
            ));
        }
        Err(_) => {
            return Err(Error::Bus(
                format!("cannot connect to redis at {url}: no answer within {CONNECT_TIMEOUT:?}")
                    .into(),
            ));
        }
    };
    let broker = RedisBroker {
        inner: inner.clone(),
        first: Mutex::new(Some(first)),
        task: Mutex::new(None),
    };
    Ok((Arc::new(broker), Arc::new(RedisPresence { inner })))
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.inner.shutdown.cancel();
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> Result<()> {
        let _ = self.inner.handler.set(handler);
        let Some(first) = self.first.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(()); // started already
        };
        // The supervisor subscribes the broadcast and own topics, then
        // turns ready.
        let task = tokio::spawn(self.inner.clone().supervise(first));
        *self.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        // `install` turns ready; wait for it (bounded) so a started node is
        // ready at once.
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        while !self.inner.ready.load(Ordering::Relaxed) {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Bus("redis bus did not become ready".into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<()> {
        let mut subs = self.inner.subs.lock().await;
        if let Some(n) = subs.channels.get_mut(channel) {
            *n += 1;
            return Ok(());
        }
        let topic = self.inner.keys.topic(channel);
        let sink = subs.sink.as_mut().ok_or_else(|| bus_err(Disconnected))?;
        tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(&topic))
            .await
            .map_err(bus_err)?
            .map_err(bus_err)?;
        subs.channels.insert(channel.to_string(), 1);
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<()> {
        let mut subs = self.inner.subs.lock().await;
        match subs.channels.get_mut(channel) {
            Some(n) if *n > 1 => {
                *n -= 1;
                return Ok(());
            }
            Some(_) => {
                subs.channels.remove(channel);
            }
            None => return Ok(()),
        }
        let topic = self.inner.keys.topic(channel);
        if let Some(sink) = subs.sink.as_mut() {
            // A failure leaves a stray subscription on a connection that is
            // breaking anyway; the next one will not have it.
            match tokio::time::timeout(RESPONSE_TIMEOUT, sink.unsubscribe(&topic)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(%channel, error = %e, "redis UNSUBSCRIBE failed"),
                Err(_) => tracing::warn!(%channel, "redis UNSUBSCRIBE timed out"),
            }
        }
        Ok(())
    }

    async fn publish(
        &self,
        channel: &str,
        publication: NewPublication,
        history: HistoryOptions,
    ) -> Result<StreamPosition> {
        let mut conn = self.inner.conn()?;
        let body = serde_json::to_string(&Body {
            data: publication.data,
            sender_id: publication.sender_id,
            timestamp: publication.timestamp,
        })
        .map_err(bus_err)?;
        if is_internal_channel(channel) {
            // A user-addressed direct message: at most once, no history,
            // no offset, no key; only the instances holding the user's
            // connections listen on the topic.
            let _: u64 = redis::cmd("PUBLISH")
                .arg(self.inner.keys.topic(channel))
                .arg(format!("p {NO_EPOCH} 0 {body}"))
                .query_async(&mut conn)
                .await
                .map_err(bus_err)?;
            return Ok(StreamPosition {
                epoch: NO_EPOCH.into(),
                offset: 0,
            });
        }
        let ttl_ms = u64::try_from(history.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let (epoch, offset): (String, u64) = self
            .inner
            .publish
            .key(self.inner.keys.meta(channel))
            .key(self.inner.keys.stream(channel))
            .key(&self.inner.keys.generation)
            .arg(self.inner.keys.topic(channel))
            .arg(body)
            .arg(history.size)
            .arg(ttl_ms)
            .arg(random_base36(8))
            .arg(random_base36(8))
            .invoke_async(&mut conn)
            .await
            .map_err(bus_err)?;
        Ok(StreamPosition {
            epoch: epoch.into(),
            offset,
        })
    }

    async fn publish_control(&self, control: Control) -> Result<()> {
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
                let json = serde_json::to_string(&body).map_err(bus_err)?;
                (self.inner.keys.all.clone(), format!("b {json}"))
            }
            Control::Join { ref channel, .. } | Control::Leave { ref channel, .. } => {
                let json = serde_json::to_string(&control).map_err(bus_err)?;
                (self.inner.keys.topic(channel), format!("c {json}"))
            }
        };
        let mut conn = self.inner.conn()?;
        let _: u64 = redis::cmd("PUBLISH")
            .arg(topic)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .map_err(bus_err)?;
        Ok(())
    }

    async fn direct(&self, direct: Direct) -> Result<bool> {
        if let Some(handler) = self.inner.handler() {
            if handler.on_direct(&direct) {
                return Ok(true);
            }
        }
        let mut conn = self.inner.conn()?;
        let instance: Option<String> = redis::cmd("GET")
            .arg(self.inner.keys.client(&direct.target_id))
            .query_async(&mut conn)
            .await
            .map_err(bus_err)?;
        let Some(instance) = instance else {
            return Ok(false);
        };
        if instance == self.inner.instance_id {
            return Ok(false); // it was here, and is gone
        }
        let payload = format!("d {}", serde_json::to_string(&direct).map_err(bus_err)?);
        let receivers: u64 = redis::cmd("PUBLISH")
            .arg(self.inner.keys.instance(&instance))
            .arg(payload)
            .query_async(&mut conn)
            .await
            .map_err(bus_err)?;
        Ok(receivers > 0)
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        history: HistoryOptions,
    ) -> Result<HistoryResult> {
        self.inner
            .read_history(channel, since, limit, history)
            .await
    }

    async fn register_client(&self, info: &ClientInfo) -> Result<()> {
        self.inner
            .local_clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(info.client_id.clone(), ());
        // While disconnected the client is still served locally; the
        // heartbeat after reconnection writes its entry.
        let Ok(mut conn) = self.inner.conn() else {
            return Ok(());
        };
        let r: redis::RedisResult<()> = redis::cmd("SET")
            .arg(self.inner.keys.client(&info.client_id))
            .arg(&self.inner.instance_id)
            .arg("PX")
            .arg(self.inner.ttl_ms())
            .query_async(&mut conn)
            .await;
        if let Err(e) = r {
            tracing::warn!(client = %info.client_id, error = %e, "directory write failed; the heartbeat will retry");
        }
        Ok(())
    }

    async fn unregister_client(&self, client_id: &str) -> Result<()> {
        self.inner
            .local_clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(client_id);
        let mut conn = self.inner.conn()?;
        let _: u64 = redis::cmd("DEL")
            .arg(self.inner.keys.client(client_id))
            .query_async(&mut conn)
            .await
            .map_err(bus_err)?;
        Ok(())
    }

    fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    async fn close(&self) -> Result<()> {
        self.inner.shutdown.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.inner.ready.store(false, Ordering::Relaxed);
        Ok(())
    }
}

#[async_trait]
impl PresenceStore for RedisPresence {
    async fn add(&self, channel: &str, info: &ClientInfo) -> Result<()> {
        self.inner
            .local_presence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(channel.to_string())
            .or_default()
            .insert(info.client_id.clone(), info.clone());
        let mut conn = self.inner.conn()?;
        let json = serde_json::to_string(info).map_err(bus_err)?;
        let _: i64 = self
            .inner
            .presence_add
            .key(self.inner.keys.members(channel))
            .key(self.inner.keys.expiry(channel))
            .arg(&*info.client_id)
            .arg(json)
            .arg(self.inner.ttl_ms())
            .invoke_async(&mut conn)
            .await
            .map_err(bus_err)?;
        Ok(())
    }

    async fn remove(&self, channel: &str, client_id: &str) -> Result<()> {
        {
            let mut local = self
                .inner
                .local_presence
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(members) = local.get_mut(channel) {
                members.remove(client_id);
                if members.is_empty() {
                    local.remove(channel);
                }
            }
        }
        let mut conn = self.inner.conn()?;
        redis::pipe()
            .cmd("HDEL")
            .arg(self.inner.keys.members(channel))
            .arg(client_id)
            .ignore()
            .cmd("ZREM")
            .arg(self.inner.keys.expiry(channel))
            .arg(client_id)
            .ignore()
            .exec_async(&mut conn)
            .await
            .map_err(bus_err)
    }

    async fn members(&self, channel: &str) -> Result<Vec<ClientInfo>> {
        let mut conn = self.inner.conn()?;
        let raw: Vec<String> = self
            .inner
            .presence_members
            .key(self.inner.keys.members(channel))
            .key(self.inner.keys.expiry(channel))
            .invoke_async(&mut conn)
            .await
            .map_err(bus_err)?;
        let mut members = raw
            .iter()
            .map(|s| serde_json::from_str::<ClientInfo>(s).map_err(bus_err))
            .collect::<Result<Vec<_>>>()?;
        members.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        Ok(members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_channel_names() {
        let k = Keys::new("p", "i1");
        let t = k.topic("chat:room/1");
        assert_eq!(t, "p:ch:{chat:room/1}");
        assert_eq!(k.channel_of(&t), Some("chat:room/1"));
        assert_eq!(k.channel_of("p:all"), None);
        assert_eq!(k.meta("c"), "p:ch:{c}:meta");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..20 {
            let d = backoff(attempt);
            assert!(
                d >= BACKOFF_MIN / 2 && d <= BACKOFF_MAX.mul_f64(1.5),
                "{d:?}"
            );
        }
    }
}
