//! The Google Cloud Pub/Sub bus (`--bus pubsub://PROJECT_ID`).
//!
//! Pub/Sub is a message bus: no storage that can be read by offset, no
//! global sequencer. This module gives everything Switchboard needs that
//! Pub/Sub *can* give, and says exactly where it stops.
//!
//! # Layout on Pub/Sub
//!
//! * One topic, `config.pubsub_topic` (created at start if missing), shared
//!   by every instance.
//! * One subscription per instance, `config.pubsub_subscription`, with
//!   message ordering on, a 10 s ack deadline, 10 min message retention and
//!   a 1 day inactivity expiry (so a crashed instance's subscription goes
//!   away by itself). A stale subscription of the same name is deleted and
//!   recreated at start (its backlog belongs to a previous incarnation); it
//!   is deleted on clean shutdown ([`Broker::close`]).
//! * Every message is one JSON [`Wire`] envelope in `data`: the source
//!   instance id, a boot id (random per process start) and a per-boot
//!   counter, which together name the message for de-duplication, and the
//!   body. Ordering keys: `c:<channel>` for channel publications and their
//!   join/leave, `s:<sender>` for broadcast and direct (per-sender order),
//!   `m:<instance>` for membership announcements.
//! * `PUBSUB_EMULATOR_HOST` is honoured; `pubsub://PROJECT?emulator=HOST:PORT`
//!   overrides it (several emulators in one test process). Without an
//!   emulator the client authenticates with Application Default
//!   Credentials; missing credentials are a start-up error.
//!
//! # What this bus guarantees
//!
//! * **Own messages: the round trip, exactly once.** An instance does not
//!   deliver its own messages at publish time: everything (publications,
//!   broadcast, join/leave) reaches the local clients through the
//!   instance's own subscription, like everyone else's. Pub/Sub delivers at
//!   least once; each instance drops repeats by message name (a window of
//!   the last [`DEDUPE_WINDOW`] / [`DEDUPE_MAX`] messages), so every
//!   instance, the publisher's included, handles each message once.
//!   [`publish`](Broker::publish) returns when the publication has come back
//!   (or fails after [`ROUND_TRIP_TIMEOUT`]): the cost is one bus round trip
//!   per publish, the gain is that every instance sees a channel in the
//!   same order. Since a session handles one request at a time, one client
//!   publishes at most one message per round trip (about 20/s on the
//!   emulator, whose streaming pull delivers on a ~50 ms cadence); many
//!   clients publish concurrently.
//! * **Per-channel order: the same on every instance.** Channel messages
//!   carry the ordering key `c:<channel>`, so Pub/Sub delivers them to every
//!   subscription in the order it received them: concurrent publishers on
//!   different instances are interleaved identically everywhere, and each
//!   publisher's own order is kept (a session waits for each publish).
//! * **Offsets are per instance; epochs name the instance.** There is no
//!   global sequencer, so offsets cannot be both contiguous and identical
//!   everywhere (an instance that starts later has not seen the beginning).
//!   Each instance numbers a channel's publications 1, 2, 3, … in the order
//!   it receives them, in a stream whose epoch is `<instance id>.<random>`.
//!   Within that epoch offsets are contiguous and are the ones this
//!   instance's clients see (and the publisher's ack carries). Every
//!   instance records every channel (every subscription receives the whole
//!   topic), not only those with local subscribers; only subscribed
//!   channels are encoded and handed to the node. Two instances that have
//!   both seen a channel from its first publication have equal offsets but
//!   never equal epochs.
//! * **History and recovery are local to each instance.** A client that
//!   reconnects to the *same* instance recovers what it missed (if the
//!   history still holds it, as on the memory bus). On a *different*
//!   instance its epoch is unknown: `recovered:false`, never a partial or
//!   foreign replay; the client continues with that instance's numbering.
//! * **Direct.** A local target is served without the bus. Otherwise the
//!   client directory (below) names the instance holding the target: the
//!   message goes over the topic addressed to it and `direct` returns
//!   `true` at once. A target the directory does not know (it may have
//!   connected a few milliseconds ago) is asked for over the topic with an
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
//! is counted ([`PubSubBroker::publish_failures`]) and turns the instance
//! unready; `/readyz` follows [`Broker::is_ready`]: the receive stream is up
//! and the last publish succeeded. The receive loop reconnects with
//! backoff (100 ms doubling to 2 s), recreates the topic and subscription
//! if they are gone, and says hello again. Local clients keep being served
//! meanwhile (new connections are refused: they cannot be registered).
//!
//! * If the subscription survived (a network partition), Pub/Sub kept the
//!   messages: they arrive after the reconnection, in order, no gap.
//! * If it had to be recreated (an emulator restart, expiry), messages may
//!   have been lost: every local stream starts a new epoch and the
//!   subscribers of every local channel are asked to reconnect
//!   ([`BrokerHandler::resync_failed`]); they get `recovered:false` rather
//!   than a silent gap.
//! * In both cases the local history after each subscribed channel's last
//!   delivered position ([`BrokerHandler::positions`]) is replayed (sessions
//!   drop what they already have).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use gcloud_gax::conn::Environment;
use gcloud_gax::grpc::{Code, Status};
use gcloud_gax::retry::RetrySetting;
use gcloud_googleapis::pubsub::v1::{
    AcknowledgeRequest, ExpirationPolicy, PubsubMessage, StreamingPullRequest,
};
use gcloud_pubsub::client::{Client, ClientConfig};
use gcloud_pubsub::publisher::{Publisher, PublisherConfig};
use gcloud_pubsub::subscription::{Subscription, SubscriptionConfig};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::history::{HistoryLimits, Store};
use super::{
    Broker, BrokerHandler, Control, Direct, HistoryOptions, HistoryResult, NewPublication,
    PresenceStore,
};
use crate::config::{Config, random_base36};
use crate::error::{Error, Result};
use crate::protocol::{ClientInfo, Publication, StreamPosition};

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
/// The receive stream of a streaming pull.
type PullStream = gcloud_gax::grpc::Streaming<gcloud_googleapis::pubsub::v1::StreamingPullResponse>;

/// Reconnection backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Longest a single admin or publish RPC may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// A message could not be encoded.
    #[error("pub/sub message encoding: {0}")]
    Codec(#[from] serde_json::Error),
}

fn bus(e: PubSubError) -> Error {
    Error::Bus(Box::new(e))
}

fn rpc(op: &'static str) -> impl FnOnce(Status) -> Error {
    move |status| {
        bus(PubSubError::Rpc {
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

/// `PROJECT[?emulator=HOST:PORT]` → project and emulator override.
fn parse_project(spec: &str) -> (String, Option<String>) {
    match spec.split_once('?') {
        Some((project, query)) => {
            let emulator = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("emulator="))
                .map(str::to_string);
            (project.to_string(), emulator)
        }
        None => (spec.to_string(), None),
    }
}

/// The envelope of every message on the topic (JSON in `data`).
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    /// Source instance id.
    src: Arc<str>,
    /// Source boot id: tells a restarted instance from its predecessor.
    boot: Arc<str>,
    /// Per-boot counter; `(boot, id)` names the message for de-duplication
    /// and lets the source match its own publications coming back.
    id: u64,
    /// What the message says.
    body: Body,
}

/// Message bodies. Externally tagged, so that raw JSON payloads survive.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Body {
    /// A channel publication, with the history options of its namespace.
    Pub {
        channel: Arc<str>,
        data: Arc<RawValue>,
        sender_id: Option<Arc<str>>,
        timestamp: u64,
        size: usize,
        ttl_ms: u64,
    },
    /// The tutorial's broadcast.
    Broadcast {
        sender_id: Option<Arc<str>>,
        data: Arc<RawValue>,
        timestamp: u64,
    },
    /// Presence join/leave events (`join` false: leave).
    JoinLeave {
        join: bool,
        channel: Arc<str>,
        info: ClientInfo,
    },
    /// A direct message; `to` is the holding instance when the directory
    /// knew it; `ack` asks the holder to acknowledge.
    Direct {
        direct: Direct,
        to: Option<Arc<str>>,
        ack: bool,
    },
    /// The holder of a direct target acknowledges `(to_boot, of)`.
    DirectAck { to_boot: Arc<str>, of: u64 },
    /// One membership change of the source: a client (channel `None`) or a
    /// channel member came (`present`) or went.
    Member {
        ver: u64,
        channel: Option<Arc<str>>,
        info: ClientInfo,
        present: bool,
        ack: bool,
    },
    /// An instance applied the membership change `(to_boot, of)`.
    MemberAck { to_boot: Arc<str>, of: u64 },
    /// The source's complete state at version `ver`; also its heartbeat.
    Snapshot {
        ver: u64,
        clients: Vec<Arc<str>>,
        members: Vec<(Arc<str>, Vec<ClientInfo>)>,
    },
    /// A new (or reconnected) instance: everyone announce yourselves.
    Hello,
    /// Clean shutdown: forget the source now.
    Bye,
}

/// This instance's own clients and memberships, versioned for gossip.
#[derive(Default)]
struct Local {
    /// Bumped by every change; a snapshot at `ver` reflects all changes
    /// up to it.
    ver: u64,
    /// Clients connected here.
    clients: HashSet<Arc<str>>,
    /// Channel → members connected here.
    members: HashMap<Arc<str>, HashMap<Arc<str>, ClientInfo>>,
}

/// One versioned entry of a remote view: `None` is a removal (tombstone).
#[derive(Debug, Clone)]
struct Entry {
    ver: u64,
    info: Option<ClientInfo>,
}

/// What this instance knows of another one.
struct Remote {
    /// The boot the view belongs to; a new boot resets it.
    boot: Arc<str>,
    /// Last message from it; older than `presence_ttl`: forgotten.
    heard: Instant,
    /// Version of the last snapshot applied; older deltas are ignored.
    snap_ver: u64,
    /// Its clients (directory).
    clients: HashMap<Arc<str>, Entry>,
    /// Channel → its members.
    members: HashMap<Arc<str>, HashMap<Arc<str>, Entry>>,
}

impl Remote {
    fn new(boot: Arc<str>) -> Self {
        Remote {
            boot,
            heard: Instant::now(),
            snap_ver: 0,
            clients: HashMap::new(),
            members: HashMap::new(),
        }
    }

    fn apply_delta(
        &mut self,
        ver: u64,
        channel: Option<Arc<str>>,
        info: ClientInfo,
        present: bool,
    ) {
        if ver <= self.snap_ver {
            return;
        }
        let map = match channel {
            None => &mut self.clients,
            Some(ch) => self.members.entry(ch).or_default(),
        };
        let id = info.client_id.clone();
        if map.get(&id).is_some_and(|e| e.ver >= ver) {
            return;
        }
        let info = present.then_some(info);
        map.insert(id, Entry { ver, info });
    }

    fn apply_snapshot(
        &mut self,
        ver: u64,
        clients: Vec<Arc<str>>,
        members: Vec<(Arc<str>, Vec<ClientInfo>)>,
    ) {
        if ver <= self.snap_ver {
            return;
        }
        // Keep only what is newer than the snapshot, then add its content.
        self.clients.retain(|_, e| e.ver > ver);
        for id in clients {
            self.clients.entry(id.clone()).or_insert(Entry {
                ver,
                info: Some(ClientInfo {
                    client_id: id,
                    user_id: None,
                }),
            });
        }
        for m in self.members.values_mut() {
            m.retain(|_, e| e.ver > ver);
        }
        for (channel, infos) in members {
            let m = self.members.entry(channel).or_default();
            for info in infos {
                m.entry(info.client_id.clone()).or_insert(Entry {
                    ver,
                    info: Some(info),
                });
            }
        }
        self.members.retain(|_, m| !m.is_empty());
        self.snap_ver = ver;
    }
}

/// Recently handled message names.
#[derive(Default)]
struct Seen {
    /// Names with their arrival, oldest first.
    order: VecDeque<(Instant, (Arc<str>, u64))>,
    /// The same names, for lookup.
    set: HashSet<(Arc<str>, u64)>,
}

impl Seen {
    /// Remember `key`; false if it was already seen.
    fn insert(&mut self, key: (Arc<str>, u64), now: Instant) -> bool {
        while self.order.len() >= DEDUPE_MAX
            || self
                .order
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > DEDUPE_WINDOW)
        {
            if let Some((_, k)) = self.order.pop_front() {
                self.set.remove(&k);
            }
        }
        if !self.set.insert(key.clone()) {
            return false;
        }
        self.order.push_back((now, key));
        true
    }
}

/// A presence change's missing acknowledgements: the instances still to
/// answer, and whom to tell when none is left.
type PendingAcks = (HashSet<Arc<str>>, Option<oneshot::Sender<()>>);

/// State shared by the broker, the presence store and the background tasks.
struct Inner {
    /// This instance's id.
    me: Arc<str>,
    /// Random per process start.
    boot: Arc<str>,
    /// Admin operations (topic, subscription).
    client: Client,
    /// Publishing (direct RPCs, no batching delay).
    publisher: Publisher,
    /// This instance's subscription.
    subscription: Subscription,
    /// Topic id, for recreating it.
    topic_id: String,
    /// Expiry of a silent instance; heartbeats every third of it.
    presence_ttl: Duration,
    /// Set once by `start`.
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// Per-boot message counter.
    seq: AtomicU64,
    /// Channel → this instance's stream: the memory bus's bounded store
    /// (expiry, `history_max_bytes`, `history_max_channels`), its epochs
    /// `<instance id>.<hash>` so that another instance's offsets are never
    /// mistaken for this one's.
    streams: Arc<Store>,
    /// Channels with local subscribers (the only ones handed to the node).
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
    /// Acknowledgements for the ack task.
    acks: mpsc::UnboundedSender<Vec<String>>,
    /// The ack task's receiver, taken by `start`.
    acks_rx: Mutex<Option<mpsc::UnboundedReceiver<Vec<String>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn handler(&self) -> Option<&Arc<dyn BrokerHandler>> {
        self.handler.get()
    }

    fn next_id(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Publish `body` under `key`; returns the message id. Failures are
    /// counted and turn the instance unready.
    async fn send(&self, key: String, body: Body) -> Result<u64> {
        let id = self.next_id();
        self.send_as(id, key, body).await?;
        Ok(id)
    }

    async fn send_as(&self, id: u64, key: String, body: Body) -> Result<()> {
        let wire = Wire {
            src: self.me.clone(),
            boot: self.boot.clone(),
            id,
            body,
        };
        let data = serde_json::to_vec(&wire).map_err(|e| bus(e.into()))?;
        let msg = PubsubMessage {
            data,
            ordering_key: key,
            ..Default::default()
        };
        let mut result = self.publish_once(msg.clone()).await;
        if let Err(PubSubError::Rpc { status, .. }) = &result {
            if status.code() == Code::NotFound {
                // The topic is gone (emulator restart): recreate, retry once.
                let _ = self.ensure_topic().await;
                result = self.publish_once(msg).await;
            }
        }
        match result {
            Ok(()) => {
                self.publish_ok.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.publish_failures.fetch_add(1, Ordering::Relaxed);
                self.publish_ok.store(false, Ordering::Relaxed);
                Err(bus(e))
            }
        }
    }

    async fn publish_once(&self, msg: PubsubMessage) -> std::result::Result<(), PubSubError> {
        match tokio::time::timeout(
            RPC_TIMEOUT,
            self.publisher.publish_immediately(vec![msg], Some(retry())),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(PubSubError::Rpc {
                op: "publish",
                status: Box::new(status),
            }),
            Err(_) => Err(PubSubError::Timeout("publish")),
        }
    }

    async fn ensure_topic(&self) -> Result<()> {
        let topic = self.client.topic(&self.topic_id);
        match topic.create(None, Some(retry())).await {
            Ok(()) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(rpc("create topic")(s)),
        }
    }

    /// Make sure the topic and this instance's subscription exist. With
    /// `fresh`, a subscription left by an earlier incarnation is replaced.
    /// Returns whether the subscription was (re)created.
    async fn ensure_subscription(&self, fresh: bool) -> Result<bool> {
        self.ensure_topic().await?;
        let exists = self
            .subscription
            .exists(Some(retry()))
            .await
            .map_err(rpc("get subscription"))?;
        if exists && !fresh {
            return Ok(false);
        }
        if exists {
            match self.subscription.delete(Some(retry())).await {
                Ok(()) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(rpc("delete stale subscription")(s)),
            }
        }
        let cfg = SubscriptionConfig {
            ack_deadline_seconds: 10,
            enable_message_ordering: true,
            message_retention_duration: Some(Duration::from_secs(600)),
            expiration_policy: Some(ExpirationPolicy {
                ttl: Duration::from_secs(86_400).try_into().ok(),
            }),
            ..Default::default()
        };
        let fqtn = self.client.fully_qualified_topic_name(&self.topic_id);
        match self.subscription.create(&fqtn, cfg, Some(retry())).await {
            Ok(()) => Ok(true),
            Err(s) if s.code() == Code::AlreadyExists => Ok(false),
            Err(s) => Err(rpc("create subscription")(s)),
        }
    }

    /// Open the streaming pull and say hello. The server answers the
    /// stream's headers only with its first message, so the hello (which
    /// comes back through our own subscription) is also what proves the
    /// round trip works; every other instance answers it with a snapshot.
    async fn open_stream(&self) -> Result<PullStream> {
        let hello = async {
            // The subscription exists: the hello waits there for the stream.
            self.send(format!("m:{}", self.me), Body::Hello).await
        };
        let (stream, hello) = tokio::join!(self.open_stream_only(), hello);
        hello?;
        stream
    }

    async fn open_stream_only(&self) -> Result<PullStream> {
        let req = StreamingPullRequest {
            subscription: self.subscription.fully_qualified_name().to_string(),
            stream_ack_deadline_seconds: 10,
            max_outstanding_messages: 10_000,
            client_id: self.boot.to_string(),
            ..Default::default()
        };
        let subc = self.subscription.get_client();
        let resp = tokio::time::timeout(
            RPC_TIMEOUT,
            subc.streaming_pull(req, Duration::from_secs(10), Some(retry())),
        )
        .await
        .map_err(|_| bus(PubSubError::Timeout("streaming pull")))?
        .map_err(rpc("streaming pull"))?;
        Ok(resp.into_inner())
    }

    /// Everything that must happen once the stream is (re)established.
    fn on_stream_up(self: &Arc<Self>, lost: bool) {
        if lost {
            // Messages may have been lost with the old subscription: new
            // epochs, and the subscribers reconnect to recover honestly.
            self.streams.clear();
            if let Some(h) = self.handler() {
                let channels: Vec<Arc<str>> = lock(&self.subscribed).iter().cloned().collect();
                for ch in channels {
                    h.resync_failed(&ch);
                }
            }
        } else if let Some(h) = self.handler() {
            // Replay what the local history holds after each position.
            for (channel, pos) in h.positions() {
                let replay: Vec<(Arc<str>, Publication)> = match &pos {
                    Some(p) => self.streams.replay_after(&channel, p),
                    None => Vec::new(),
                };
                for (epoch, p) in replay {
                    h.on_publication(&channel, &epoch, &p);
                }
            }
        }
        self.stream_up.store(true, Ordering::Relaxed);
        self.publish_ok.store(true, Ordering::Relaxed);
        let inner = self.clone();
        tokio::spawn(async move {
            let _ = inner.announce().await;
        });
    }

    /// Publish this instance's complete state (the heartbeat).
    async fn announce(&self) -> Result<()> {
        let body = {
            let local = lock(&self.local);
            Body::Snapshot {
                ver: local.ver,
                clients: local.clients.iter().cloned().collect(),
                members: local
                    .members
                    .iter()
                    .map(|(ch, m)| (ch.clone(), m.values().cloned().collect()))
                    .collect(),
            }
        };
        self.send(format!("m:{}", self.me), body).await.map(|_| ())
    }

    /// Record a change of our own state and announce it.
    async fn member_change(
        &self,
        channel: Option<&str>,
        info: &ClientInfo,
        present: bool,
    ) -> Result<()> {
        let ver = {
            let mut local = lock(&self.local);
            match channel {
                None if present => {
                    local.clients.insert(info.client_id.clone());
                }
                None => {
                    local.clients.remove(&info.client_id);
                }
                Some(ch) if present => {
                    local
                        .members
                        .entry(Arc::from(ch))
                        .or_default()
                        .insert(info.client_id.clone(), info.clone());
                }
                Some(ch) => {
                    if let Some(m) = local.members.get_mut(ch) {
                        m.remove(&info.client_id);
                        if m.is_empty() {
                            local.members.remove(ch);
                        }
                    }
                }
            }
            local.ver += 1;
            local.ver
        };
        let key = format!("m:{}", self.me);
        if channel.is_none() {
            // The directory: back through our own subscription is enough
            // (a direct to a target not known yet asks everyone).
            let body = Body::Member {
                ver,
                channel: None,
                info: info.clone(),
                present,
                ack: false,
            };
            return self.send_and_wait(key, body).await;
        }
        // Presence: wait until every live instance has applied it, so that
        // `members` anywhere shows it once this returns. An instance that
        // does not answer within PRESENCE_ACK_WAIT (dying, not yet expired)
        // gets it later.
        let live: HashSet<Arc<str>> = {
            let now = Instant::now();
            lock(&self.remotes)
                .iter()
                .filter(|(_, r)| self.alive(r, now))
                .map(|(id, _)| id.clone())
                .collect()
        };
        let body = Body::Member {
            ver,
            channel: channel.map(Arc::from),
            info: info.clone(),
            present,
            ack: !live.is_empty(),
        };
        if live.is_empty() {
            return self.send(key, body).await.map(|_| ());
        }
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.member_acks).insert(id, (live, Some(tx)));
        if let Err(e) = self.send_as(id, key, body).await {
            lock(&self.member_acks).remove(&id);
            return Err(e);
        }
        let _ = tokio::time::timeout(PRESENCE_ACK_WAIT, rx).await;
        lock(&self.member_acks).remove(&id);
        Ok(())
    }

    /// Publish `body` and wait until it has come back through our own
    /// subscription: Pub/Sub has then fanned it out to every subscription,
    /// so the other instances get it at about the same moment.
    async fn send_and_wait(&self, key: String, body: Body) -> Result<()> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(id, tx);
        if let Err(e) = self.send_as(id, key, body).await {
            lock(&self.waiters).remove(&id);
            return Err(e);
        }
        match tokio::time::timeout(ROUND_TRIP_TIMEOUT, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(bus(PubSubError::Closed)),
            Err(_) => {
                lock(&self.waiters).remove(&id);
                Err(bus(PubSubError::Timeout("own announcement round trip")))
            }
        }
    }

    /// Whether a remote view is still alive.
    fn alive(&self, r: &Remote, now: Instant) -> bool {
        now.duration_since(r.heard) < self.presence_ttl
    }

    /// The live instance (other than this one) holding `client_id`.
    fn locate(&self, client_id: &str) -> Option<Arc<str>> {
        let now = Instant::now();
        let remotes = lock(&self.remotes);
        remotes
            .iter()
            .filter(|(_, r)| self.alive(r, now))
            .find(|(_, r)| r.clients.get(client_id).is_some_and(|e| e.info.is_some()))
            .map(|(id, _)| id.clone())
    }

    /// Handle one message from the subscription (in arrival order).
    fn handle(self: &Arc<Self>, data: &[u8]) {
        let wire: Wire = match serde_json::from_slice(data) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable pub/sub message dropped");
                return;
            }
        };
        let now = Instant::now();
        if !lock(&self.seen).insert((wire.boot.clone(), wire.id), now) {
            return;
        }
        let own = wire.src == self.me && wire.boot == self.boot;
        if !own {
            let mut remotes = lock(&self.remotes);
            let r = remotes
                .entry(wire.src.clone())
                .or_insert_with(|| Remote::new(wire.boot.clone()));
            if r.boot != wire.boot {
                *r = Remote::new(wire.boot.clone());
            }
            r.heard = now;
        }
        let Some(handler) = self.handler().cloned() else {
            return;
        };
        match wire.body {
            Body::Pub {
                channel,
                data,
                sender_id,
                timestamp,
                size,
                ttl_ms,
            } => {
                let subscribed = lock(&self.subscribed).contains(&channel);
                let new = NewPublication {
                    data,
                    sender_id,
                    timestamp,
                };
                let history = HistoryOptions {
                    size,
                    ttl: Duration::from_millis(ttl_ms),
                };
                // Delivered under the stream's lock: the local order is
                // the stream's order even against a concurrent replay.
                let position = self
                    .streams
                    .publish(&channel, new, history, |ch, epoch, p| {
                        if subscribed {
                            handler.on_publication(ch, epoch, p);
                        }
                    });
                if own {
                    if let Some(tx) = lock(&self.pending).remove(&wire.id) {
                        let _ = tx.send(position);
                    }
                }
            }
            Body::Broadcast {
                sender_id,
                data,
                timestamp,
            } => handler.on_control(&Control::Broadcast {
                sender_id,
                data,
                timestamp,
            }),
            Body::JoinLeave {
                join,
                channel,
                info,
            } => {
                if lock(&self.subscribed).contains(&channel) {
                    let c = match join {
                        true => Control::Join { channel, info },
                        false => Control::Leave { channel, info },
                    };
                    handler.on_control(&c);
                }
            }
            Body::Direct { direct, to, ack } => {
                // Our own were tried locally before they were sent.
                if own || to.as_ref().is_some_and(|to| *to != self.me) {
                    return;
                }
                if handler.on_direct(&direct) && ack {
                    let inner = self.clone();
                    let key = format!("s:{}", self.me);
                    let body = Body::DirectAck {
                        to_boot: wire.boot.clone(),
                        of: wire.id,
                    };
                    tokio::spawn(async move {
                        let _ = inner.send(key, body).await;
                    });
                }
            }
            Body::DirectAck { to_boot, of } => {
                if to_boot == self.boot {
                    if let Some(tx) = lock(&self.direct_acks).remove(&of) {
                        let _ = tx.send(());
                    }
                }
            }
            Body::Member {
                ver,
                channel,
                info,
                present,
                ack,
            } => {
                if own {
                    if let Some(tx) = lock(&self.waiters).remove(&wire.id) {
                        let _ = tx.send(());
                    }
                    return;
                }
                if let Some(r) = lock(&self.remotes).get_mut(&wire.src) {
                    r.apply_delta(ver, channel, info, present);
                }
                if ack {
                    let inner = self.clone();
                    let key = format!("m:{}", self.me);
                    let body = Body::MemberAck {
                        to_boot: wire.boot.clone(),
                        of: wire.id,
                    };
                    tokio::spawn(async move {
                        let _ = inner.send(key, body).await;
                    });
                }
            }
            Body::MemberAck { to_boot, of } => {
                if to_boot == self.boot {
                    let mut acks = lock(&self.member_acks);
                    if let Some((left, tx)) = acks.get_mut(&of) {
                        left.remove(&wire.src);
                        if left.is_empty() {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(());
                            }
                        }
                    }
                }
            }
            Body::Snapshot {
                ver,
                clients,
                members,
            } => {
                if !own {
                    if let Some(r) = lock(&self.remotes).get_mut(&wire.src) {
                        r.apply_snapshot(ver, clients, members);
                    }
                }
            }
            Body::Hello => {
                if !own {
                    let inner = self.clone();
                    tokio::spawn(async move {
                        let _ = inner.announce().await;
                    });
                }
            }
            Body::Bye => {
                if !own {
                    lock(&self.remotes).remove(&wire.src);
                }
            }
        }
    }

    /// Read the stream until it fails or the broker shuts down.
    async fn read(
        self: &Arc<Self>,
        mut stream: gcloud_gax::grpc::Streaming<
            gcloud_googleapis::pubsub::v1::StreamingPullResponse,
        >,
    ) {
        loop {
            let next = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                m = stream.message() => m,
            };
            match next {
                Ok(Some(resp)) => {
                    let mut ack_ids = Vec::with_capacity(resp.received_messages.len());
                    for rm in resp.received_messages {
                        if let Some(m) = rm.message {
                            self.handle(&m.data);
                        }
                        ack_ids.push(rm.ack_id);
                    }
                    let _ = self.acks.send(ack_ids);
                }
                Ok(None) => {
                    tracing::warn!("pub/sub stream ended; reconnecting");
                    return;
                }
                Err(status) => {
                    tracing::warn!(%status, "pub/sub stream failed; reconnecting");
                    return;
                }
            }
        }
    }

    /// The receive loop: read, and on failure reconnect with backoff.
    async fn receive_loop(self: Arc<Self>, first: PullStream) {
        self.read(first).await;
        let mut backoff = BACKOFF_MIN;
        while !self.shutdown.is_cancelled() {
            self.stream_up.store(false, Ordering::Relaxed);
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            let lost = match self.ensure_subscription(false).await {
                Ok(lost) => lost,
                Err(e) => {
                    tracing::debug!(error = %e, "pub/sub still unreachable");
                    continue;
                }
            };
            match self.open_stream().await {
                Ok(stream) => {
                    tracing::info!(recreated = lost, "pub/sub stream re-established");
                    self.on_stream_up(lost);
                    backoff = BACKOFF_MIN;
                    self.read(stream).await;
                }
                Err(e) => tracing::debug!(error = %e, "pub/sub stream not re-established"),
            }
        }
    }

    /// Acknowledge in batches, off the receive path.
    async fn ack_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Vec<String>>) {
        loop {
            let mut ids = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                ids = rx.recv() => match ids { Some(ids) => ids, None => return },
            };
            while let Ok(more) = rx.try_recv() {
                ids.extend(more);
            }
            if ids.is_empty() {
                continue;
            }
            let req = AcknowledgeRequest {
                subscription: self.subscription.fully_qualified_name().to_string(),
                ack_ids: ids,
            };
            let subc = self.subscription.get_client();
            // A lost ack only means a redelivery, which is de-duplicated.
            let _ = tokio::time::timeout(RPC_TIMEOUT, subc.acknowledge(req, Some(retry()))).await;
        }
    }

    /// Heartbeat: announce, forget silent instances, drop idle streams.
    async fn heartbeat_loop(self: Arc<Self>) {
        let period = (self.presence_ttl / 3).max(Duration::from_millis(50));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.announce().await {
                tracing::debug!(error = %e, "pub/sub heartbeat failed");
            }
            let now = Instant::now();
            lock(&self.remotes).retain(|_, r| now.duration_since(r.heard) < self.presence_ttl * 4);
        }
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
        Err(_) => Err(bus(PubSubError::Timeout("connect"))),
    }
}

async fn connect_inner(
    project: &str,
    config: &Config,
) -> Result<(Arc<PubSubBroker>, Arc<PubSubPresence>)> {
    let (project, emulator) = parse_project(project);
    if project.is_empty() {
        return Err(Error::Config(
            "pubsub://PROJECT_ID: the project id is empty".into(),
        ));
    }
    let mut cc = ClientConfig::default();
    if let Some(host) = emulator {
        cc.environment = Environment::Emulator(host);
    }
    cc.project_id = Some(project.clone());
    cc.pool_size = 2;
    cc.connection_option.connect_timeout = Some(Duration::from_secs(5));
    let cc = match cc.environment {
        Environment::Emulator(_) => cc,
        Environment::GoogleCloud(_) => cc
            .with_auth()
            .await
            .map_err(|e| bus(PubSubError::Client(format!("credentials: {e}"))))?,
    };
    let client = Client::new(cc)
        .await
        .map_err(|e| bus(PubSubError::Client(e.to_string())))?;
    let topic = client.topic(&config.pubsub_topic);
    let publisher = topic.new_publisher(Some(PublisherConfig {
        workers: 1,
        flush_interval: Duration::from_secs(3600),
        bundle_size: 1,
        retry_setting: Some(retry()),
    }));
    let subscription = client.subscription(&config.pubsub_subscription);
    let shutdown = CancellationToken::new();
    let (acks, acks_rx) = mpsc::unbounded_channel();
    let inner = Arc::new(Inner {
        me: config.instance_id.as_str().into(),
        boot: random_base36(12).into(),
        client,
        publisher,
        subscription,
        topic_id: config.pubsub_topic.clone(),
        presence_ttl: config.presence_ttl,
        handler: OnceLock::new(),
        seq: AtomicU64::new(0),
        streams: Store::new(
            HistoryLimits::from_config(config),
            &format!("{}.", config.instance_id),
        ),
        subscribed: Mutex::default(),
        pending: Mutex::default(),
        waiters: Mutex::default(),
        member_acks: Mutex::default(),
        direct_acks: Mutex::default(),
        seen: Mutex::default(),
        local: Mutex::default(),
        remotes: Mutex::default(),
        stream_up: AtomicBool::new(false),
        publish_ok: AtomicBool::new(true),
        publish_failures: AtomicU64::new(0),
        shutdown: shutdown.clone(),
        acks,
        acks_rx: Mutex::new(Some(acks_rx)),
    });
    inner.ensure_subscription(true).await?;
    let guard = Arc::new(Guard(shutdown));
    Ok((
        Arc::new(PubSubBroker {
            inner: inner.clone(),
            _guard: guard.clone(),
        }),
        Arc::new(PubSubPresence {
            inner,
            _guard: guard,
        }),
    ))
}

#[async_trait]
impl Broker for PubSubBroker {
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> Result<()> {
        let inner = &self.inner;
        let _ = inner.handler.set(handler);
        let stream = inner.open_stream().await?;
        inner.on_stream_up(false);
        if let Some(rx) = lock(&inner.acks_rx).take() {
            tokio::spawn(inner.clone().ack_loop(rx));
        }
        tokio::spawn(inner.clone().receive_loop(stream));
        tokio::spawn(inner.clone().heartbeat_loop());
        inner.streams.spawn_sweeper();
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<()> {
        lock(&self.inner.subscribed).insert(Arc::from(channel));
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<()> {
        lock(&self.inner.subscribed).remove(channel);
        Ok(())
    }

    async fn publish(
        &self,
        channel: &str,
        publication: NewPublication,
        history: HistoryOptions,
    ) -> Result<StreamPosition> {
        let inner = &self.inner;
        let id = inner.next_id();
        let (tx, rx) = oneshot::channel();
        lock(&inner.pending).insert(id, tx);
        let body = Body::Pub {
            channel: Arc::from(channel),
            data: publication.data,
            sender_id: publication.sender_id,
            timestamp: publication.timestamp,
            size: history.size,
            ttl_ms: history.ttl.as_millis() as u64,
        };
        if let Err(e) = inner.send_as(id, format!("c:{channel}"), body).await {
            lock(&inner.pending).remove(&id);
            return Err(e);
        }
        match tokio::time::timeout(ROUND_TRIP_TIMEOUT, rx).await {
            Ok(Ok(pos)) => Ok(pos),
            Ok(Err(_)) => Err(bus(PubSubError::Closed)),
            Err(_) => {
                lock(&inner.pending).remove(&id);
                Err(bus(PubSubError::Timeout("own publication round trip")))
            }
        }
    }

    async fn publish_control(&self, control: Control) -> Result<()> {
        let (key, body) = match control {
            Control::Broadcast {
                sender_id,
                data,
                timestamp,
            } => (
                format!("s:{}", sender_id.as_deref().unwrap_or(&self.inner.me)),
                Body::Broadcast {
                    sender_id,
                    data,
                    timestamp,
                },
            ),
            Control::Join { channel, info } => (
                format!("c:{channel}"),
                Body::JoinLeave {
                    join: true,
                    channel,
                    info,
                },
            ),
            Control::Leave { channel, info } => (
                format!("c:{channel}"),
                Body::JoinLeave {
                    join: false,
                    channel,
                    info,
                },
            ),
        };
        self.inner.send(key, body).await.map(|_| ())
    }

    async fn direct(&self, direct: Direct) -> Result<bool> {
        let inner = &self.inner;
        if let Some(h) = inner.handler() {
            if h.on_direct(&direct) {
                return Ok(true);
            }
        }
        let key = format!("s:{}", direct.sender_id.as_deref().unwrap_or(&inner.me));
        if let Some(to) = inner.locate(&direct.target_id) {
            let body = Body::Direct {
                direct,
                to: Some(to),
                ack: false,
            };
            inner.send(key, body).await?;
            return Ok(true);
        }
        // Unknown here: ask everyone, and wait for the holder's ack.
        let id = inner.next_id();
        let (tx, rx) = oneshot::channel();
        lock(&inner.direct_acks).insert(id, tx);
        let body = Body::Direct {
            direct,
            to: None,
            ack: true,
        };
        if let Err(e) = inner.send_as(id, key, body).await {
            lock(&inner.direct_acks).remove(&id);
            return Err(e);
        }
        let acked = matches!(tokio::time::timeout(DIRECT_ACK_WAIT, rx).await, Ok(Ok(())));
        lock(&inner.direct_acks).remove(&id);
        Ok(acked)
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        history: HistoryOptions,
    ) -> Result<HistoryResult> {
        Ok(self.inner.streams.read(channel, since, limit, history))
    }

    fn history_stats(&self) -> Option<Arc<crate::metrics::HistoryStats>> {
        Some(self.inner.streams.stats().clone())
    }

    async fn register_client(&self, info: &ClientInfo) -> Result<()> {
        self.inner.member_change(None, info, true).await
    }

    async fn unregister_client(&self, client_id: &str) -> Result<()> {
        let info = ClientInfo {
            client_id: client_id.into(),
            user_id: None,
        };
        self.inner.member_change(None, &info, false).await
    }

    fn is_ready(&self) -> bool {
        self.inner.stream_up.load(Ordering::Relaxed)
            && self.inner.publish_ok.load(Ordering::Relaxed)
    }

    async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        let _ = inner.send(format!("m:{}", inner.me), Body::Bye).await;
        inner.shutdown.cancel();
        inner.stream_up.store(false, Ordering::Relaxed);
        match tokio::time::timeout(RPC_TIMEOUT, inner.subscription.delete(Some(retry()))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(s)) if s.code() == Code::NotFound => Ok(()),
            Ok(Err(s)) => Err(rpc("delete subscription")(s)),
            Err(_) => Err(bus(PubSubError::Timeout("delete subscription"))),
        }
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
        };
        self.inner.member_change(Some(channel), &info, false).await
    }

    async fn members(&self, channel: &str) -> Result<Vec<ClientInfo>> {
        let inner = &self.inner;
        let mut out: HashMap<Arc<str>, ClientInfo> = lock(&inner.local)
            .members
            .get(channel)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let now = Instant::now();
        for r in lock(&inner.remotes).values() {
            if !inner.alive(r, now) {
                continue;
            }
            if let Some(m) = r.members.get(channel) {
                for (id, e) in m {
                    if let Some(info) = &e.info {
                        out.insert(id.clone(), info.clone());
                    }
                }
            }
        }
        let mut members: Vec<ClientInfo> = out.into_values().collect();
        members.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        Ok(members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> ClientInfo {
        ClientInfo {
            client_id: id.into(),
            user_id: None,
        }
    }

    fn present(r: &Remote, ch: &str) -> Vec<String> {
        let mut v: Vec<String> = r
            .members
            .get(ch)
            .map(|m| {
                m.iter()
                    .filter(|(_, e)| e.info.is_some())
                    .map(|(k, _)| k.to_string())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn project_spec_parses_the_emulator_override() {
        assert_eq!(parse_project("p"), ("p".into(), None));
        assert_eq!(
            parse_project("p?emulator=127.0.0.1:9"),
            ("p".into(), Some("127.0.0.1:9".into()))
        );
    }

    #[test]
    fn late_deltas_and_snapshots_never_undo_newer_ones() {
        let mut r = Remote::new("b".into());
        // add(1), remove(2) arrive reversed: the member stays removed.
        r.apply_delta(2, Some("c".into()), info("x"), false);
        r.apply_delta(1, Some("c".into()), info("x"), true);
        assert!(present(&r, "c").is_empty());
        // A snapshot at 3 with y; a late delta at 3 or older is ignored.
        r.apply_snapshot(3, vec![], vec![("c".into(), vec![info("y")])]);
        r.apply_delta(3, Some("c".into()), info("y"), false);
        assert_eq!(present(&r, "c"), vec!["y"]);
        // A newer delta that arrived before an older snapshot wins.
        r.apply_delta(5, Some("c".into()), info("z"), true);
        r.apply_snapshot(4, vec![], vec![("c".into(), vec![info("y")])]);
        assert_eq!(present(&r, "c"), vec!["y", "z"]);
        // A stale snapshot is ignored.
        r.apply_snapshot(2, vec![], vec![]);
        assert_eq!(present(&r, "c"), vec!["y", "z"]);
        // A snapshot drops what it no longer lists (up to its version).
        r.apply_snapshot(6, vec![], vec![("c".into(), vec![info("z")])]);
        assert_eq!(present(&r, "c"), vec!["z"]);
    }

    #[test]
    fn dedupe_remembers_names() {
        let mut s = Seen::default();
        let now = Instant::now();
        assert!(s.insert(("b".into(), 1), now));
        assert!(!s.insert(("b".into(), 1), now));
        assert!(s.insert(("c".into(), 1), now));
    }

    #[test]
    fn wire_keeps_raw_payloads() {
        let w = Wire {
            src: "i".into(),
            boot: "b".into(),
            id: 7,
            body: Body::Pub {
                channel: "ch".into(),
                data: serde_json::from_str::<Box<RawValue>>(r#"{"a": [1, 2]}"#)
                    .unwrap()
                    .into(),
                sender_id: None,
                timestamp: 1,
                size: 10,
                ttl_ms: 1000,
            },
        };
        let bytes = serde_json::to_vec(&w).unwrap();
        let back: Wire = serde_json::from_slice(&bytes).unwrap();
        match back.body {
            Body::Pub { data, .. } => assert_eq!(data.get(), r#"{"a": [1, 2]}"#),
            other => panic!("{other:?}"),
        }
    }
}
