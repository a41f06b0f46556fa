//! The Google Cloud Pub/Sub bus (`--bus pubsub://PROJECT_ID`).
//!
//! Pub/Sub is a message bus: no storage that can be read by offset, no
//! global sequencer. This module gives everything Switchboard needs that
//! Pub/Sub *can* give, and says exactly where it stops.
//!
//! # Layout on Pub/Sub
//!
//! * A control topic, `config.pubsub_topic` (created at start if missing),
//!   shared by every instance and read by every instance: broadcast,
//!   direct messages, the presence gossip (ordering keys `s:<sender>` and
//!   `m:<instance>`).
//! * `config.pubsub_shards` channel topics, `<topic>-c<k>` (see
//!   [`shards`]): everything about a channel travels on the topic of its
//!   shard under the ordering key `c:<channel>` (publication requests, the
//!   sequencer's claims and numbered copies, join/leave, history fetches).
//!   An instance subscribes to a shard only while it needs it.
//! * One subscription per instance and topic it reads:
//!   `config.pubsub_subscription` for the control topic, `<it>-c<k>` for a
//!   shard; message ordering on, a 10 s ack deadline, 10 min message
//!   retention and a 1 day inactivity expiry (so a crashed instance's
//!   subscriptions go away by themselves). A stale subscription of the same
//!   name (its backlog belongs to a crashed incarnation) is deleted when
//!   opened, and this instance reads a fresh one of a new name instead,
//!   `<name>-r<boot><n>` (see [`stall`]); they are deleted on clean shutdown
//!   ([`Broker::close`]), a shard's also when the instance leaves it, and
//!   those a crashed incarnation left by the next one of the same id.
//! * Every message is one JSON [`Wire`] envelope in `data`: the source
//!   instance id, a boot id (random per process start) and a per-boot
//!   counter, which together name the message for de-duplication, and the
//!   body.
//! * `PUBSUB_EMULATOR_HOST` is honoured; `pubsub://PROJECT?emulator=HOST:PORT`
//!   overrides it (several emulators in one test process). Without an
//!   emulator the client authenticates with Application Default
//!   Credentials; missing credentials are a start-up error.
//!
//! # What this bus guarantees
//!
//! * **A sequencer per channel: one numbering everywhere.** Pub/Sub has no
//!   global sequencer, so one instance numbers each channel (see
//!   [`sequencer`]): a publish goes on the channel's shard as a request;
//!   the channel's sequencer assigns `(epoch, offset)` in its stream and
//!   publishes the numbered copy (same ordering key); every instance
//!   reading the shard stores the numbered copies in its history (the
//!   bounded `broker::history` store, under the sequencer's positions) and
//!   hands them to its subscribers. Epochs are `<sequencer id>.<random>`.
//!   The instance whose own publish finds the channel without a live
//!   sequencer claims it on the channel's log and keeps it while it lives
//!   (a joining instance takes nothing), advertising it on the control
//!   topic; when it dies (silent for `presence_ttl`, restarted) or cannot
//!   continue (a send failed), the next publish claims the channel in a
//!   new epoch. The cost: one more bus hop per publish (the request, then
//!   the copy).
//! * **Only what an instance needs.** Channels are spread over
//!   `pubsub_shards` topics; an instance reads a shard while a local
//!   client subscribes to one of its channels, while it publishes to or
//!   reads the history of one (for the call), and while it sequences one;
//!   it leaves a shard nothing has needed for `presence_ttl` (see
//!   [`shards`]). Serving 1 of 100 busy channels with 32 shards, it
//!   receives the traffic of about three channels, not a hundred.
//! * **Own messages: the round trip, exactly once.** An instance does not
//!   deliver its own messages at publish time: everything (publications,
//!   broadcast, join/leave) reaches the local clients through the
//!   instance's own subscription, like everyone else's. Pub/Sub delivers at
//!   least once; each instance drops repeats by message name (a window of
//!   the last [`DEDUPE_WINDOW`] / [`DEDUPE_MAX`] messages), and a numbered
//!   copy at or below the stream's top is a repeat, so every instance
//!   handles each publication once. [`publish`](Broker::publish) returns
//!   when the numbered copy of its request has come back and been accepted
//!   (or fails after [`ROUND_TRIP_TIMEOUT`]: a sequencer that died with the
//!   request, or one superseded while its copy travelled, whose copy every
//!   instance refuses — an error, never a false ack; a retry reaches the
//!   new sequencer). Since a session handles one request at a time, one
//!   client publishes at most one message per round trip; many clients
//!   publish concurrently.
//! * **Per-channel order and offsets: the same on every instance.** The
//!   sequencer numbers requests in the order of the channel's log, which
//!   Pub/Sub delivers identically to every subscription, and sends its
//!   copies in order; each publisher's own order is kept (a session waits
//!   for each publish). A subscriber that subscribed before a channel's
//!   first publication holds a placeholder epoch of its instance, which
//!   the sequencer's stream does not continue (`recovered:false` if it
//!   leaves before the first publication and comes back).
//! * **Recovery on any instance, while history holds.** An instance holds
//!   the numbered copies of the channels of the shards it reads; one new
//!   to a channel (it just started reading the shard) fills its history
//!   from the channel's sequencer before answering a read (see [`fetch`]),
//!   so a client that moves to another instance resumes exactly
//!   (`recovered:true`, nothing missing, nothing twice). Where the
//!   instance cannot prove the range complete it answers
//!   `recovered:false`, never a partial replay: the position is in an
//!   epoch ended by a change of sequencer, or the sequencer did not answer
//!   in time, or the range was trimmed.
//! * **Idempotency keys and expected offsets** are not checked by the
//!   sequencer: both are refused (`unsupported`).
//! * **Direct.** A local target is served without the bus. Otherwise the
//!   client directory (below) names the instance holding the target: the
//!   message goes over the control topic addressed to it and `direct` returns
//!   `true` at once. A target the directory does not know (it may have
//!   connected a few milliseconds ago) is asked for over the control topic with an
//!   acknowledgement request; no acknowledgement within
//!   [`DIRECT_ACK_WAIT`] is `unknown_target`. A target that leaves while a
//!   message is in flight loses it, as on one instance.
//! * **Presence and the client directory: gossip.** Each instance announces
//!   every change of its own clients and channel memberships as a versioned
//!   delta, and its complete state (a snapshot, also the heartbeat) every
//!   `presence_ttl / 3`, and when a new instance says hello. Receivers keep
//!   a per-instance view in memory, ordered by the sender's version (a late
//!   delta or snapshot never undoes a newer one). A presence add/remove
//!   returns once every live instance has acknowledged it (at most
//!   [`PRESENCE_ACK_WAIT`]), so `members` on any live instance shows it from
//!   then on; a directory change returns once it came back to its own
//!   instance. An instance not heard from for `presence_ttl` is forgotten:
//!   its members leave every presence list and its clients stop resolving
//!   as direct targets. A clean shutdown says goodbye, which forgets it at
//!   once. A snapshot is one message, so an instance's state must stay
//!   under Pub/Sub's 10 MB message limit (about 100 000 memberships); the
//!   acks make a presence change cost O(instances) messages.
//!
//! # Outage
//!
//! A failed publish returns `Error::Bus` (after the client's short retry),
//! is counted ([`PubSubBroker::publish_failures`]) and marks the bus
//! down; `busUp` follows [`Broker::is_ready`]: the receive stream is up
//! and the last publish succeeded. The receive loop reconnects with
//! backoff (`broker::retry::Backoff`: 100 ms doubling to 2 s, no jitter),
//! recreates the topic and subscription if they are gone (each subscription separately), and says hello
//! again. Local clients keep being served meanwhile (new connections are
//! refused: they cannot be registered).
//!
//! * If the subscription survived (a network partition), Pub/Sub kept the
//!   messages: they arrive after the reconnection, in order, no gap.
//! * If it had to be recreated (an emulator restart, expiry), messages may
//!   have been lost: for a shard, the local history and channel logs of its
//!   channels are forgotten (the next copies start the streams again where
//!   they are, so no recovery spans the hole), the channels this instance
//!   sequenced there are claimed again in a new epoch by their next
//!   request, and the subscribers of its local channels are asked to
//!   reconnect ([`BrokerHandler::resync_failed`]); they get
//!   `recovered:false` rather than a silent gap. A numbered copy that skips
//!   offsets of its epoch (publications lost on the way here, e.g. the
//!   emulator redelivering out of order after a partition) or starts a new
//!   epoch (a change of sequencer) does the same for its channel: it is
//!   stored but not handed on, so no subscriber is moved past what it
//!   lacks.
//! * A subscription that exists but whose streaming pull does not open
//!   in time is replaced by a fresh one of a new name (see [`stall`]):
//!   treated as recreated, as above.
//! * A shard whose stream stays down for [`STALL_NOTICE`] has the
//!   subscribers of its local channels asked to reconnect, and refuses
//!   subscribes to its channels until it is back: a subscriber is never
//!   left waiting in silence on an instance cut off the bus.
//! * In both cases the local history after each subscribed channel's last
//!   delivered position ([`BrokerHandler::positions`]) is replayed (sessions
//!   drop what they already have).
//!
//! # Where things are
//!
//! * `wire.rs`: the `Wire` envelope and its bodies;
//! * `mod.rs` (here): the state shared
//!   by everything (`Inner`), [`connect`], and the [`Broker`] and
//!   [`PresenceStore`] impls, which delegate;
//! * `supervise.rs`: the client, topics and subscriptions, the streaming
//!   pulls, the receive loops (de-duplication, dispatch), acknowledgements,
//!   reconnection with backoff, readiness and shutdown;
//! * `stall.rs`: replacing a subscription whose stream does not open,
//!   and telling the subscribers of a shard whose stream stays down;
//! * `shards.rs`: which shard a channel travels on, opening a shard when
//!   needed and leaving it when not;
//! * `fetch.rs`: filling an instance's history from the channel's
//!   sequencer;
//! * `publish.rs`: sending on the topics (the route, ordering keys, failure counting),
//!   publication requests and their round trip, control messages, and the
//!   dispatch of channel messages;
//! * `claims.rs`: claiming a channel (when, by whom), claims and releases
//!   read from the log;
//! * `sequencer.rs`: the per-channel logs (claims, numbered copies, which
//!   are accepted), numbering as a sequencer, claiming a channel without
//!   one;
//! * `presence.rs`: the gossip of memberships, of the client directory and
//!   of who sequences what, its acknowledgements, the heartbeat and the
//!   expiry of silent instances;
//! * `direct.rs`: direct messages (the directory lookup and the ask).

mod claims;
mod direct;
mod fetch;
mod presence;
mod publish;
mod sequencer;
mod shards;
mod stall;
mod supervise;
#[cfg(test)]
mod tests;
mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use gcloud_gax::grpc::{Code, Status};
use gcloud_gax::retry::RetrySetting;
use gcloud_pubsub::client::Client;
use gcloud_pubsub::publisher::{Publisher, PublisherConfig};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::bus_error;
use super::history::Store;
use super::{
    Broker, BrokerHandler, BusTraffic, Control, Direct, HistoryOptions, HistoryResult,
    NewPublication, PresenceStore,
};
use crate::config::Config;
use crate::error::{ClientError, Error, ErrorCode, Result};
use crate::protocol::{ClientInfo, StreamPosition};
use crate::sync::MutexExt;
use fetch::Fetches;
use presence::{Local, PendingAcks, Remote};
use sequencer::Sequencer;
use shards::Shard;
use supervise::{Seen, connect_inner};
use wire::{Body, Wire};

/// Longest the start-up may take to reach Pub/Sub (connect, topic,
/// subscription, first stream).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a publish waits for its own message to come back.
pub const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a direct message to a target the directory does not know waits
/// for the holder's acknowledgement before it is `unknown_target`.
pub const DIRECT_ACK_WAIT: Duration = Duration::from_millis(1000);
/// Longest a presence change waits for the other live instances to
/// acknowledge it.
pub const PRESENCE_ACK_WAIT: Duration = Duration::from_millis(1000);
/// How long a message name is remembered for de-duplication.
pub const DEDUPE_WINDOW: Duration = Duration::from_secs(600);
/// At most this many message names are remembered.
pub const DEDUPE_MAX: usize = 200_000;
pub use super::history::STREAM_IDLE_EXPIRY;
pub use stall::STALL_NOTICE;

/// Longest a single admin or publish RPC may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the opening of the streaming pull may take: the stream's
/// first answer can be slow (the emulator under load has taken more than
/// 5 s), and a start-up that gives up on it fails the whole instance.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// What can go wrong talking to Pub/Sub; wrapped in [`Error::Bus`].
#[derive(Debug, thiserror::Error)]
pub enum PubSubError {
    /// An RPC failed.
    #[error("pub/sub {op}: {status}")]
    Rpc {
        op: &'static str,
        status: Box<Status>,
    },
    /// The client could not be built (connection, credentials).
    #[error("pub/sub client: {0}")]
    Client(String),
    /// Something did not answer in time.
    #[error("pub/sub {0}: timed out")]
    Timeout(&'static str),
    /// The broker was closed.
    #[error("pub/sub bus closed")]
    Closed,
    /// This instance's control stream is down (it cannot hear its own
    /// announcements), or was re-established on a new subscription that
    /// does not hold what was sent before.
    #[error("pub/sub control stream down")]
    ControlDown,
    /// A message could not be encoded.
    #[error("pub/sub message encoding: {0}")]
    Codec(#[from] serde_json::Error),
}

fn rpc(op: &'static str) -> impl FnOnce(Status) -> Error {
    move |status| {
        bus_error(PubSubError::Rpc {
            op,
            status: Box::new(status),
        })
    }
}

/// A few quick retries on transient codes: an outage is reported within
/// a fraction of a second instead of hidden behind long retries.
fn retry() -> RetrySetting {
    RetrySetting {
        from_millis: 20,
        max_delay: Some(Duration::from_millis(200)),
        factor: 2,
        take: 2,
        codes: vec![Code::Unavailable, Code::Unknown, Code::Aborted],
    }
}

/// Publishing: direct RPCs, no batching delay, the short retry.
fn publisher_config() -> PublisherConfig {
    PublisherConfig {
        workers: 1,
        flush_interval: Duration::from_secs(3600),
        bundle_size: 1,
        retry_setting: Some(retry()),
    }
}

/// Which topic (and subscription) a message travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Route {
    /// The control topic: broadcast, direct, presence gossip.
    Control,
    /// A channel shard (see [`shards`]).
    Shard(u16),
}

/// Ack ids of messages received on a subscription.
type Acks = (Route, Vec<String>);

/// State shared by the broker, the presence store and the background tasks.
struct Inner {
    /// This instance's id.
    me: Arc<str>,
    /// Random per process start.
    boot: Arc<str>,
    /// Admin operations (topic, subscription).
    client: Client,
    /// Publishing on the control topic (direct RPCs, no batching delay).
    publisher: Publisher,
    /// This instance's subscription to the control topic (renamed when
    /// it stalls, see [`stall`]).
    subscription: stall::Named,
    /// Control topic id, for recreating it.
    topic_id: String,
    /// The channel shards (see [`shards`]).
    shards: Vec<Shard>,
    /// Shards this instance reads now (for metrics).
    shards_open: AtomicU64,
    /// Messages received from Pub/Sub, every subscription (for metrics and
    /// the traffic measurement).
    received: AtomicU64,
    /// Their bytes (`data` only).
    received_bytes: AtomicU64,
    /// History fetches from sequencers in flight (see [`fetch`]).
    fetches: Mutex<Fetches>,
    /// Expiry of a silent instance; heartbeats every third of it.
    presence_ttl: Duration,
    /// Set once by `start`.
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// Per-boot message counter.
    seq: AtomicU64,
    /// When this process started: until the other instances' snapshots
    /// have come, it may not know every sequencer (see [`sequencer`]).
    started: tokio::time::Instant,
    /// The per-channel logs and, for the channels this instance numbers,
    /// the copies to send (see [`sequencer`]).
    sequencer: Mutex<Sequencer>,
    /// Channel logs kept at most (`history_max_channels`).
    max_logs: usize,
    /// Channel → the numbered copies received: the memory bus's bounded
    /// store (expiry, `history_max_bytes`, `history_max_channels`) under
    /// the sequencers' positions; its own epochs `<instance id>.<hash>` are
    /// only the placeholders answered for channels it holds nothing of.
    streams: Arc<Store>,
    /// Channels whose local stream is behind what their sequencers
    /// advertised: since when, and the targets then (see [`stall`]).
    lags: Mutex<stall::Lags>,
    /// Channels with local subscribers (the only ones handed to the node;
    /// their shards stay open).
    subscribed: Mutex<HashSet<Arc<str>>>,
    /// Own publications waiting for their round trip, by message id.
    pending: Mutex<HashMap<u64, oneshot::Sender<StreamPosition>>>,
    /// Own membership announcements waiting for their round trip.
    waiters: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    /// Presence changes waiting for the other live instances' acks: the
    /// instances still to answer, and whom to tell.
    member_acks: Mutex<HashMap<u64, PendingAcks>>,
    /// Direct messages waiting for the holder's acknowledgement.
    direct_acks: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    /// De-duplication window.
    seen: Mutex<Seen>,
    /// Own clients and memberships.
    local: Mutex<Local>,
    /// Instance id → what it announced.
    remotes: Mutex<HashMap<Arc<str>, Remote>>,
    /// The receive stream is established.
    stream_up: AtomicBool,
    /// The last publish succeeded.
    publish_ok: AtomicBool,
    /// Failed publishes so far.
    publish_failures: AtomicU64,
    /// Ends every background task.
    shutdown: CancellationToken,
    /// Acknowledgements for the ack task, per subscription.
    acks: mpsc::UnboundedSender<Acks>,
    /// The ack task's receiver, taken by `start`.
    acks_rx: Mutex<Option<mpsc::UnboundedReceiver<Acks>>>,
}

impl Inner {
    fn handler(&self) -> Option<&Arc<dyn BrokerHandler>> {
        self.handler.get()
    }

    fn next_id(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Cancels the background tasks when the last handle goes away.
struct Guard(CancellationToken);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// The Pub/Sub [`Broker`].
pub struct PubSubBroker {
    /// Shared state.
    inner: Arc<Inner>,
    /// Ends the background tasks with the last handle.
    _guard: Arc<Guard>,
}

/// The Pub/Sub [`PresenceStore`] (gossip, see the module docs).
pub struct PubSubPresence {
    /// Shared state.
    inner: Arc<Inner>,
    /// Ends the background tasks with the last handle.
    _guard: Arc<Guard>,
}

impl PubSubBroker {
    /// Publishes that failed so far (for metrics).
    pub fn publish_failures(&self) -> u64 {
        self.inner.publish_failures.load(Ordering::Relaxed)
    }

    /// Channel shards this instance reads now.
    pub fn shards_open(&self) -> u64 {
        self.inner.shards_open.load(Ordering::Relaxed)
    }
}

/// Connect the Pub/Sub bus for `project` (`PROJECT[?emulator=HOST:PORT]`):
/// build the client and make sure the topic and a fresh subscription
/// exist, within [`CONNECT_TIMEOUT`].
pub async fn connect(
    project: &str,
    config: &Config,
) -> Result<(Arc<dyn Broker>, Arc<dyn PresenceStore>)> {
    let (broker, presence) = connect_typed(project, config).await?;
    Ok((broker, presence))
}

/// [`connect`] with the concrete types (tests read the counters).
pub async fn connect_typed(
    project: &str,
    config: &Config,
) -> Result<(Arc<PubSubBroker>, Arc<PubSubPresence>)> {
    // Google's auth crate signs service-account JWTs with jsonwebtoken,
    // which needs its crypto provider chosen (see auth::init_crypto).
    crate::auth::init_crypto();
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_inner(project, config)).await {
        Ok(r) => r,
        Err(_) => Err(bus_error(PubSubError::Timeout("connect"))),
    }
}

#[async_trait]
impl Broker for PubSubBroker {
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> Result<()> {
        self.inner.start(handler).await
    }

    async fn subscribe(&self, channel: &str) -> Result<()> {
        self.inner.subscribe(channel).await
    }

    async fn unsubscribe(&self, channel: &str) -> Result<()> {
        self.inner.subscribed.lock_unpoisoned().remove(channel);
        Ok(())
    }

    async fn publish(
        &self,
        channel: &str,
        publication: NewPublication,
        history: HistoryOptions,
    ) -> Result<StreamPosition> {
        // The sequencer does not check keys or expected offsets (yet).
        if publication.conditions.idempotency_key.is_some()
            || publication.conditions.expected_offset.is_some()
        {
            return Err(ClientError::new(
                ErrorCode::Unsupported,
                "idempotencyKey and expectedOffset are not available on the Pub/Sub bus",
            )
            .into());
        }
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

    fn history_stats(&self) -> Option<Arc<crate::broker::history::HistoryStats>> {
        Some(self.inner.streams.stats().clone())
    }

    async fn register_client(&self, info: &ClientInfo) -> Result<()> {
        self.inner.member_change(None, info, true).await
    }

    async fn unregister_client(&self, client_id: &str) -> Result<()> {
        let info = ClientInfo {
            client_id: client_id.into(),
            user_id: None,
            name: None,
        };
        self.inner.member_change(None, &info, false).await
    }

    fn traffic(&self) -> Option<BusTraffic> {
        Some(BusTraffic {
            messages: self.inner.received.load(Ordering::Relaxed),
            bytes: self.inner.received_bytes.load(Ordering::Relaxed),
            subscriptions: 1 + self.inner.shards_open.load(Ordering::Relaxed),
        })
    }

    fn is_ready(&self) -> bool {
        self.inner.stream_up.load(Ordering::Relaxed)
            && self.inner.publish_ok.load(Ordering::Relaxed)
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[async_trait]
impl PresenceStore for PubSubPresence {
    async fn add(&self, channel: &str, info: &ClientInfo) -> Result<()> {
        self.inner.member_change(Some(channel), info, true).await
    }

    async fn remove(&self, channel: &str, client_id: &str) -> Result<()> {
        let info = ClientInfo {
            client_id: client_id.into(),
            user_id: None,
            name: None,
        };
        self.inner.member_change(Some(channel), &info, false).await
    }

    async fn members(&self, channel: &str) -> Result<Vec<ClientInfo>> {
        self.inner.members(channel)
    }
}
