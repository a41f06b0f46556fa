//! The Redis bus (`--bus redis://host:port[/db]`, or a Redis Cluster with
//! `--bus redis+cluster://host:port,host:port[,…]`): channel history in
//! streams, fan-out over Redis pub/sub (sharded pub/sub on a cluster),
//! presence in keys that expire when their instance stops refreshing
//! them, direct messages routed by the instance tag in client ids.
//!
//! # Key and topic layout
//!
//! `P` is `bus_prefix`; `{ch}` is the channel name, in braces so that a
//! channel's keys, and its topic, share a Redis Cluster hash slot (channel
//! names cannot contain braces, so the whole name is the hash tag; a
//! cluster refuses a `bus_prefix` with braces).
//!
//! | key / topic | type | what |
//! |---|---|---|
//! | `P:ch:{ch}:meta` | hash `epoch`, `top` | the stream's epoch and newest offset; written only by a publish, expires the namespace's `history_ttl` after the last one |
//! | `P:ch:{ch}:stream` | stream, ids `0-<offset>` | retained publications: field `b` the JSON body, `x` the expiry (Redis ms); exact `MAXLEN` = the namespace's `history_size` (no key when it is 0); expires `history_ttl` after the last publish |
//! | `P:ch:{ch}:idem:<key>` | string `<epoch> <offset>`, `PX idempotency_window` | a publish's idempotency key and the position it published (set by the publish script) |
//! | `P:gen` | string, no expiry | the epoch the next new stream takes (one key per deployment, rewritten by each stream creation, restored by the heartbeat) |
//! | `P:gen:{<tag>}` (cluster) | string, no expiry | the same, one per hash slot (at most 16,384 keys): `<tag>` is the smallest decimal number hashing to the slot, so the generator of a channel is in the channel's slot; created by the first read of the slot, rewritten by each stream creation in it |
//! | `P:pr:{ch}:members` | hash client id → info JSON | presence |
//! | `P:pr:{ch}:expiry` | zset client id → expiry (Redis ms) | per-member expiry, refreshed by the heartbeat |
//! | topic `P:ch:{ch}` | pub/sub (cluster: sharded, in the channel's slot) | `p <epoch> <offset> <body>` publications and `c <control>` join/leave of the channel; for a user channel `#user:<sub>`, `p - 0 <body>` (no key behind it) |
//! | topic `P:all` | pub/sub (cluster: sharded, in the slot of `P:all`) | `b <body>` broadcasts |
//! | topic `P:inst:<tag>` | pub/sub (cluster: sharded, in the slot of the name) | `d <reply tag> <n> <direct>` messages for clients of the instance tagged `<tag>`, and `a <n> 1\|0` the answers to its own |
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
//!   (every subscribe makes one) writes nothing (on a cluster, but the
//!   slot's generator when it is absent: see "Redis Cluster"): for a
//!   channel without a stream it reports `(G, 0)`, `G` being the current
//!   value of `P:gen`.
//!   The publish that creates a stream takes `G` as its epoch and replaces
//!   `P:gen` with a fresh random value in the same script, so every stream
//!   ever created has an epoch of its own, and a reader that saw `(G, 0)`
//!   recovers everything after it exactly when the stream it finds is the
//!   first one created after its read. (If another channel's stream was
//!   created in between, the epochs differ: live delivery simply moves to
//!   the new epoch, a recovery from `(G, 0)` answers `recovered:false`.)
//!   When Redis loses the keys (restart without persistence, `FLUSHALL`,
//!   eviction, expiry) the next publish starts a new epoch, so a stale
//!   position is never trusted. On a cluster the generator is per hash
//!   slot (`P:gen:{<tag>}`, see "Redis Cluster" below).
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
//!   a new epoch, as above); presence keys carry TTLs too,
//!   and only `P:gen` has none (one small key; on a cluster one per slot,
//!   at most 16,384).
//! * **Presence**: each member has an expiry `presence_ttl` ahead,
//!   refreshed every `presence_ttl / 3` by the instance's heartbeat (which
//!   rewrites the entries, so they also come back after Redis lost them);
//!   `members` drops expired ones. The members of a crashed instance
//!   disappear within `presence_ttl`, each with one `leave` across the
//!   cluster: the script that drops an expired member publishes its leave
//!   in the same step, and every heartbeat runs it for the presence
//!   channels this instance serves. A member reaped while its instance was
//!   only cut off is announced again (`join`) by that instance's next
//!   heartbeat.
//! * **Direct**: nothing is written per client. Each instance draws at
//!   start a random four-character tag whose topic `P:inst:<tag>` has no
//!   subscriber (`PUBSUB NUMSUB`), subscribes it, and starts the random
//!   part of every client id it gives with the tag
//!   ([`crate::ids::client_id`]). A target on this instance is delivered
//!   locally; otherwise the message is published on the topic of the
//!   target id's tag, numbered, with this instance's tag to answer to; the
//!   instance there answers `a <n> 1` (queued) or `a <n> 0` (not here, or
//!   gone). No subscriber on the topic (`PUBLISH` answers 0: the instance
//!   is gone, or the id was made up) → unknown target at once. No answer
//!   within [`RESPONSE_TIMEOUT`] → `bus_unavailable`. A crashed instance's
//!   clients stop resolving at once (no subscriber). Two instances drawing
//!   the same tag in the same instant is the one race (a chance in ~1.7 M
//!   per pair of simultaneous starts); the cost would be directs to one of
//!   them answered `0` by the other.
//!
//! * **Broadcast** (the tutorial's `broadcast`, to every client of every
//!   instance) is accepted once queued in the outbox, in order, and written
//!   with the broadcasts queued meanwhile as one pipeline (`outbox.rs`): a
//!   publisher does not wait a round trip per broadcast. At most once, like
//!   a NATS core publish: refused at once while Redis is known down, and a
//!   batch lost with a failing connection is logged with its size.
//!
//! # Outage
//!
//! A supervisor task owns the pub/sub connection. When it breaks (or a
//! heartbeat write fails) the bus is reported down (`/healthz`, `busUp`) and
//! reconnects with exponential backoff (`broker::retry::Backoff`: 100 ms
//! doubling to 5 s, ±50 % jitter). Meanwhile local clients stay connected;
//! operations that need Redis (publish, broadcast, direct to another
//! instance, presence, history, subscribing a new channel) fail with
//! `Error::Bus`, which the client sees as `bus_unavailable`, and the node
//! counts failed publishes. Once back, the supervisor resubscribes every
//! channel, rewrites the presence entries, then for each
//! locally subscribed channel replays the history after the last delivered
//! position through the handler (sessions drop what they already have by
//! offset), or calls `resync_failed` when the epoch changed or history no
//! longer holds the whole gap. Only then is the instance ready again. At
//! start-up an unreachable Redis is an error within [`CONNECT_TIMEOUT`].
//!
//! # Redis Cluster
//!
//! `redis+cluster://[user:pass@]h1:p1,h2:p2[,…]` (`rediss+cluster://` for
//! TLS) lists seed nodes; the bus uses the `redis` crate's cluster client
//! over RESP3, which routes each command and script by the slot of its
//! first key, follows `MOVED`/`ASK`, refreshes its slot map after a
//! failover, and delivers sharded pub/sub (`SSUBSCRIBE`, Redis ≥ 7) of
//! every node as pushes. What changes:
//!
//! * **Atomic publish, per slot.** Every key of a channel, its topic and
//!   its epoch generator are in the channel's slot, so the publish script
//!   runs on the one master owning it and fans out with `SPUBLISH` on the
//!   channel's topic from inside the script: append and fan-out stay one
//!   step, and publications enter every subscriber connection in offset
//!   order, as on one Redis.
//! * **Epochs.** One generator per slot instead of one per deployment.
//!   The single-node argument holds slot by slot: every stream creation
//!   takes its slot's current generator and replaces it with a fresh random
//!   value in the same script, so every stream has an epoch of its own; a
//!   reader that saw `(G, 0)` for a channel recovers from it exactly when
//!   the stream it finds is the first one created *in that slot* after its
//!   read, which implies it is the first stream of that channel since (a
//!   creation of another channel of the slot in between only makes the
//!   answer `recovered:false`, as a creation anywhere did on one Redis).
//!   The generator of a slot is created by the first read that finds it
//!   absent (`SET` of the reader's fallback value, only when absent: a
//!   bounded write, at most one key per slot); the heartbeat does not
//!   restore it (one Redis's does), the next read or creation does.
//! * **Fan-out.** Every topic is a shard channel: channel topics,
//!   `P:all` (so broadcasts go through one shard) and `P:inst:<id>` (so
//!   `SPUBLISH` answers how many listeners the instance has: 0 means gone,
//!   as `PUBLISH` does on one Redis). The presence scripts publish their
//!   `join`/`leave` with `SPUBLISH` on the channel's topic, in its slot.
//!   Each instance subscribes each topic it needs on the master owning its
//!   slot (one `SSUBSCRIBE` per topic; topics of different slots cannot
//!   share one).
//! * **Failover** (`cluster_supervise.rs`): a node connection that drops,
//!   a server `sunsubscribe` of a topic still wanted (slot moved), or a
//!   failed heartbeat turns the bus unready and starts a recovery: every
//!   topic is subscribed again (routed to the master owning its slot now,
//!   retried with backoff while the cluster fails over), presence is
//!   rewritten, and each local channel's gap is replayed from
//!   its stream as after a single-node reconnection (or `resync_failed`
//!   when history cannot cover it). Other shards' messages keep flowing
//!   meanwhile.
//! * **Acked means replicated** (`replication.rs`): the publish script
//!   goes in one pipeline with `WAIT 1`, so a failover does not lose an
//!   acked publication; a connected replica that does not confirm within a
//!   second makes the publish `bus_unavailable`; a master without a
//!   connected replica acks alone.
//! * **Limits.** The heartbeat's writes go one command at a time
//!   (concurrently, 512 at a time) instead of pipelined, since a pipeline
//!   must stay in one slot.
//!   Lifecycle events (`--events-url`) are not kept on a cluster yet (a
//!   start-up error).
//!
//! # Files
//!
//! * `mod.rs` (here): the key layout, [`connect`], the shared state, and the
//!   [`Broker`] and [`PresenceStore`] impls, each a delegation to one of
//!   the files below.
//! * `supervise.rs`: the two connections, reconnection with backoff,
//!   readiness, the heartbeat, subscribing topics, and the replay after an
//!   outage.
//! * `publish.rs`: publish, control messages, history reads, and decoding
//!   what arrives on the bus.
//! * `presence.rs`: the presence store.
//! * `direct.rs`: direct messages, routed by instance tag, and their answers.
//! * `outbox.rs`: broadcasts, queued in order and written in pipelined batches.
//! * `cluster.rs`: cluster URLs, hash slots, the per-slot generator tags,
//!   and the connection type both modes share.
//! * `cluster_supervise.rs`: the cluster mode's supervisor (pushes,
//!   recovery after a failover).
//! * `replication.rs`: on a cluster, the publish waits for a replica.
//! * `recovery.rs`: the replay after an outage, and a new epoch when a
//!   history was rewritten under its subscribers.
//! * `scripts/*.lua`: the Lua scripts, one a file, each headed by its
//!   `KEYS` and `ARGV`.

mod cluster;
mod cluster_supervise;
mod direct;
mod outbox;
mod presence;
mod publish;
mod recovery;
mod replication;
mod supervise;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::{AsyncConnectionConfig, Script};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::cluster::Conn;
pub(crate) use self::cluster::is_cluster_url;
use self::supervise::{Connected, Subscriptions};
use super::bus_error;
use super::{
    Broker, BrokerHandler, Control, Direct, HistoryOptions, HistoryResult, NewPublication,
    PresenceStore,
};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::protocol::{ClientInfo, StreamPosition};
use crate::sync::RwLockExt;

/// Longest `connect` waits for Redis at start-up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one connection attempt may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest one command may take before the connection counts as broken.
pub(super) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// The error of an operation attempted while Redis is unreachable.
#[derive(Debug, thiserror::Error)]
#[error("redis is unreachable (reconnecting)")]
struct Disconnected;

/// Names of keys and topics under the prefix.
#[derive(Debug, Clone)]
struct Keys {
    /// `bus_prefix`.
    prefix: String,
    /// `P:ch:{` — a channel topic starts with it.
    channel_topic_start: String,
    /// `P:all`, the broadcast topic.
    all: String,
    /// `P:gen`, the epoch the next new stream takes (one key per
    /// deployment, no expiry); in cluster mode the prefix of the per-slot
    /// keys `P:gen:{<slot tag>}`.
    generation: String,
    /// Redis Cluster: sharded pub/sub (`SPUBLISH`) and per-slot epoch
    /// generators.
    cluster: bool,
}

impl Keys {
    fn new(prefix: &str, cluster: bool) -> Keys {
        Keys {
            prefix: prefix.to_string(),
            channel_topic_start: format!("{prefix}:ch:{{"),
            all: format!("{prefix}:all"),
            generation: format!("{prefix}:gen"),
            cluster,
        }
    }
    /// The epoch generator serving `channel`: `P:gen` on one Redis; in a
    /// cluster the generator of the channel's hash slot, `P:gen:{<tag>}`
    /// with a tag that hashes to that slot.
    fn generation(&self, channel: &str) -> String {
        if !self.cluster {
            return self.generation.clone();
        }
        let slot = cluster::key_slot(&self.meta(channel));
        let tag = &cluster::slot_tags()[usize::from(slot)];
        format!("{}:{{{tag}}}", self.generation)
    }
    /// The publish command: `PUBLISH`, or `SPUBLISH` (sharded pub/sub, in
    /// the topic's slot) in a cluster.
    fn publish_cmd(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
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
    /// An idempotency key of `channel`, in the channel's hash slot.
    fn idempotency(&self, channel: &str, key: &str) -> String {
        format!("{}:ch:{{{channel}}}:idem:{key}", self.prefix)
    }
    fn members(&self, channel: &str) -> String {
        format!("{}:pr:{{{channel}}}:members", self.prefix)
    }
    fn expiry(&self, channel: &str) -> String {
        format!("{}:pr:{{{channel}}}:expiry", self.prefix)
    }
    /// The direct topic of the instance tagged `tag`.
    fn instance(&self, tag: &str) -> String {
        format!("{}:inst:{tag}", self.prefix)
    }
}

/// The Lua scripts (run by EVALSHA, reloaded after a Redis restart), one
/// file each under `scripts/`, each headed by its `KEYS` and `ARGV`.
struct Scripts {
    /// Atomic publish: idempotency key, expected offset, epoch, offset,
    /// append, fan-out (`scripts/publish.lua`).
    publish: Script,
    /// History read; writes nothing (`scripts/history.lua`).
    history: Script,
    /// Presence add (`scripts/presence_add.lua`).
    presence_add: Script,
    /// Presence members, dropping expired ones
    /// (`scripts/presence_members.lua`).
    presence_members: Script,
    /// A new epoch for a rewritten history (`scripts/new_epoch.lua`).
    new_epoch: Script,
}

impl Scripts {
    fn load() -> Scripts {
        Scripts {
            publish: Script::new(include_str!("scripts/publish.lua")),
            history: Script::new(include_str!("scripts/history.lua")),
            presence_add: Script::new(include_str!("scripts/presence_add.lua")),
            presence_members: Script::new(include_str!("scripts/presence_members.lua")),
            new_epoch: Script::new(include_str!("scripts/new_epoch.lua")),
        }
    }
}

/// State shared by the broker, the presence store and the supervisor.
struct Inner {
    /// Where connections are opened from: the URL of one Redis (a
    /// cluster's connection is made once by `connect` and heals itself).
    client: Option<redis::Client>,
    /// Timeouts of every connection.
    conn_config: AsyncConnectionConfig,
    /// Key and topic names.
    keys: Keys,
    /// This instance's tag (chosen by `connect`): its direct topic
    /// `P:inst:<tag>` and the start of every client id given here.
    tag: OnceLock<String>,
    /// Directs sent from here awaiting their answer: request number →
    /// whether the target was there.
    pending_directs: Mutex<HashMap<u64, oneshot::Sender<bool>>>,
    /// Numbers the directs sent from here.
    next_direct: AtomicU64,
    /// Broadcasts waiting for the wire (`outbox.rs`).
    outbox: mpsc::Sender<String>,
    /// Namespace options, for replaying history after an outage.
    config: Config,
    /// Expiry of presence entries; refreshed every third.
    presence_ttl: Duration,
    /// Set by `start`; every delivery goes through it.
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// The command connection (multiplexed, or the cluster's); `None`
    /// while disconnected.
    cmd: RwLock<Option<Conn>>,
    /// The pub/sub connection's sink and the subscribed channels. A tokio
    /// lock: SUBSCRIBE round trips are made under it so resubscription
    /// and subscribe calls never interleave.
    subs: tokio::sync::Mutex<Subscriptions>,
    /// Reachable and resubscribed (`Broker::is_ready`).
    ready: AtomicBool,
    /// Channel → local members, rewritten into presence by the heartbeat.
    local_presence: Mutex<HashMap<String, HashMap<Arc<str>, ClientInfo>>>,
    /// Cancelled by `close` (or drop): the supervisor stops.
    shutdown: CancellationToken,
    /// The Lua scripts.
    scripts: Scripts,
    /// Per hash slot, whether its master has a replica to wait for
    /// (cluster mode; `replication.rs`).
    replicas: replication::Replicas,
    /// Publications waiting for their slot's pipeline (cluster mode).
    batches: replication::Batches,
    /// Digests of the last publications delivered here, per channel
    /// (`recovery.rs`).
    delivered: recovery::Delivered,
}

impl Inner {
    /// The command connection, or `Error::Bus` while disconnected.
    fn conn(&self) -> Result<Conn> {
        self.cmd
            .read_unpoisoned()
            .clone()
            .ok_or_else(|| bus_error(Disconnected))
    }

    fn handler(&self) -> Option<&Arc<dyn BrokerHandler>> {
        self.handler.get()
    }

    fn ttl_ms(&self) -> u64 {
        self.presence_ttl.as_millis().max(1) as u64
    }
}

/// The Redis [`Broker`].
pub struct RedisBroker {
    /// Shared with the presence store and the supervisor.
    inner: Arc<Inner>,
    /// The connections made by `connect` and the outbox's receiving end,
    /// taken over by `start`.
    first: Mutex<Option<(Connected, mpsc::Receiver<String>)>>,
    /// The supervisor, awaited by `close`.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The Redis [`PresenceStore`].
pub struct RedisPresence {
    /// Shared with the broker (connection, local members for the heartbeat).
    inner: Arc<Inner>,
}

/// Connect the Redis bus: open and check both connections (within
/// [`CONNECT_TIMEOUT`]); an unreachable Redis is an error. A
/// `redis+cluster://h1:p1,h2:p2` URL connects to a Redis Cluster through
/// its seed nodes (see `cluster.rs`).
pub async fn connect(
    url: &str,
    config: &Config,
) -> Result<(Arc<dyn Broker>, Arc<dyn PresenceStore>)> {
    let cluster = is_cluster_url(url);
    if cluster && config.bus_prefix.contains(['{', '}']) {
        // Braces would make the prefix the keys' hash tag: every channel
        // in one slot.
        return Err(Error::Config(
            "bus_prefix may not contain { or } on a Redis Cluster".into(),
        ));
    }
    let (client, cluster_client, pushes) = if cluster {
        let nodes = cluster::seed_nodes(url)?;
        // Built once here rather than by the first read.
        let _ = cluster::slot_tags();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = redis::cluster::ClusterClient::builder(nodes)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .connection_timeout(DIAL_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .build()
            .map_err(|e| Error::Config(format!("bus: invalid redis cluster URL {url:?}: {e}")))?;
        (None, Some(client), Some(rx))
    } else {
        let client = redis::Client::open(url)
            .map_err(|e| Error::Config(format!("bus: invalid redis URL {url:?}: {e}")))?;
        (Some(client), None, None)
    };
    let (outbox, outbox_rx) = outbox::channel();
    let inner = Arc::new(Inner {
        client,
        conn_config: AsyncConnectionConfig::new()
            .set_connection_timeout(Some(DIAL_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT)),
        keys: Keys::new(&config.bus_prefix, cluster),
        tag: OnceLock::new(),
        pending_directs: Mutex::new(HashMap::new()),
        next_direct: AtomicU64::new(0),
        outbox,
        config: config.clone(),
        presence_ttl: config.presence_ttl,
        handler: OnceLock::new(),
        cmd: RwLock::new(None),
        subs: tokio::sync::Mutex::new(Subscriptions::default()),
        ready: AtomicBool::new(false),
        local_presence: Mutex::new(HashMap::new()),
        shutdown: CancellationToken::new(),
        scripts: Scripts::load(),
        replicas: replication::Replicas::new(cluster),
        batches: replication::Batches::default(),
        delivered: recovery::Delivered::default(),
    });
    let dialled = match (cluster_client, pushes) {
        (Some(client), Some(pushes)) => {
            tokio::time::timeout(CONNECT_TIMEOUT, Inner::dial_cluster(client, pushes)).await
        }
        _ => tokio::time::timeout(CONNECT_TIMEOUT, inner.dial()).await,
    };
    let first = match dialled {
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
    inner.choose_tag(&first.cmd()).await?;
    let broker = RedisBroker {
        inner: inner.clone(),
        first: Mutex::new(Some((first, outbox_rx))),
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
        self.start_supervisor(handler).await
    }

    async fn subscribe(&self, channel: &str) -> Result<()> {
        self.inner.subscribe(channel).await
    }

    async fn unsubscribe(&self, channel: &str) -> Result<()> {
        self.inner.unsubscribe(channel).await
    }

    async fn publish(
        &self,
        channel: &str,
        publication: NewPublication,
        history: HistoryOptions,
    ) -> Result<StreamPosition> {
        self.inner.publish(channel, publication, history).await
    }

    async fn publish_control(&self, control: Control) -> Result<()> {
        self.inner.publish_control(control).await
    }

    async fn direct(&self, direct: Direct) -> Result<bool> {
        self.inner.direct(direct).await
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        newest_first: bool,
        history: HistoryOptions,
    ) -> Result<HistoryResult> {
        self.inner
            .read_history(channel, since, limit, newest_first, history)
            .await
    }

    fn instance_tag(&self) -> Option<String> {
        self.inner.tag.get().cloned()
    }

    fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    async fn close(&self) -> Result<()> {
        self.stop_supervisor().await
    }
}

#[async_trait]
impl PresenceStore for RedisPresence {
    async fn add(&self, channel: &str, info: &ClientInfo) -> Result<()> {
        self.inner.add_member(channel, info).await
    }

    async fn remove(&self, channel: &str, client_id: &str) -> Result<()> {
        self.inner.remove_member(channel, client_id).await
    }

    async fn members(&self, channel: &str) -> Result<Vec<ClientInfo>> {
        self.inner.members(channel).await
    }
}
