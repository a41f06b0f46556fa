//! Backends: the narrow traits the [`Node`](crate::node::Node) needs from
//! a bus, and the guarantees each implementation must give.
//!
//! * [`Broker`] carries channel publications (with their history), and
//!   control messages (broadcast, direct, join, leave) between instances.
//! * [`PresenceStore`] keeps who is subscribed to a channel, across
//!   instances.
//!
//! Incoming traffic reaches the node through [`BrokerHandler`]. The
//! in-memory implementation ([`memory`]) is the default and serves one
//! instance.
//!
//! Shared by the external buses: `bus_error` turns any failure into the
//! typed `Error::Bus`, and `retry::Backoff` gives the reconnection delays
//! (each bus with its own bounds; NATS leaves reconnection to async-nats).

pub mod history;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "pubsub")]
pub mod pubsub;
#[cfg(feature = "redis")]
pub mod redis;
pub(crate) mod retry;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::{BusConfig, Config};
use crate::error::{Error, Result};
use crate::protocol::{ClientInfo, Publication, StreamPosition};

/// History options of the channel a publication goes to (from its
/// namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryOptions {
    /// Publications to keep; 0 keeps none (offsets still advance).
    pub size: usize,
    /// How long each is kept.
    pub ttl: Duration,
}

/// What a publisher hands to [`Broker::publish`]; the broker assigns the
/// offset.
#[derive(Debug, Clone)]
pub struct NewPublication {
    pub data: Arc<RawValue>,
    pub sender_id: Option<Arc<str>>,
    pub timestamp: u64,
    /// Idempotency key and expected offset, both optional.
    pub conditions: PublishConditions,
}

/// Conditions a publish carries (see the guarantees on [`Broker`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishConditions {
    /// A repeat of this key in the channel within `idempotency_window`
    /// publishes nothing and answers the first publication's position
    /// (1–[`MAX_IDEMPOTENCY_KEY`] bytes, checked by the node).
    pub idempotency_key: Option<Arc<str>>,
    /// How long a key is remembered (the namespace's window).
    pub idempotency_window: Duration,
    /// Append only if the channel's top offset is this one at that moment;
    /// otherwise nothing is published and the answer is `offset_mismatch`
    /// with the current top.
    pub expected_offset: Option<u64>,
}

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The answer to a history query.
#[derive(Debug, Clone)]
pub struct HistoryResult {
    /// Retained publications after the requested offset, oldest first
    /// (newest first with `newest_first`).
    pub publications: Vec<Publication>,
    /// The stream's current top (epoch and newest offset).
    pub top: StreamPosition,
}

impl HistoryResult {
    /// Whether these publications are every one after `since` up to
    /// `until` (the top without it), in `since`'s epoch: nothing trimmed,
    /// expired, or of another incarnation of the stream. The one answer to
    /// "does history cover the gap?", for recovery, acked redelivery and a
    /// bus's repair after an outage. Offsets of one epoch are contiguous,
    /// so the count and the first offset prove it.
    pub fn covers(&self, since: &StreamPosition, until: Option<u64>) -> bool {
        if since.epoch != self.top.epoch || since.offset > self.top.offset {
            return false;
        }
        let end = until.map_or(self.top.offset, |u| u.min(self.top.offset));
        let need = end.saturating_sub(since.offset);
        need == 0
            || self
                .publications
                .first()
                .is_some_and(|p| p.offset == since.offset + 1)
                && self.publications.iter().filter(|p| p.offset <= end).count() as u64 == need
    }
}

/// What an instance received from the bus ([`Broker::traffic`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusTraffic {
    /// Messages received, every subscription.
    pub messages: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Bus subscriptions read now (Pub/Sub: the control topic and the
    /// open channel shards).
    pub subscriptions: u64,
}

/// Messages that every instance must see, but that are not part of a
/// channel's ordered, offset-numbered stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Control {
    /// The tutorial's broadcast: to every client except the sender.
    Broadcast {
        sender_id: Option<Arc<str>>,
        data: Arc<RawValue>,
        timestamp: u64,
    },
    /// A client joined a channel (presence on).
    Join { channel: Arc<str>, info: ClientInfo },
    /// A client left a channel.
    Leave { channel: Arc<str>, info: ClientInfo },
}

/// A message for one client, wherever it is connected.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Direct {
    pub target_id: Arc<str>,
    pub sender_id: Option<Arc<str>>,
    pub data: Arc<RawValue>,
    pub timestamp: u64,
    /// Set when this is not a message but an order to close the target's
    /// connection (the server API's disconnect); `data` is then ignored.
    /// Travels inside the same envelope, so every bus routes it like a
    /// direct message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect: Option<DisconnectOrder>,
    /// Set when this is not a message but frames a client posted to
    /// `POST /sse/send` for its SSE connection (the target); `data` is
    /// then ignored. Routed like a direct message, so the POST may land
    /// on any instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sse: Option<SseFrames>,
}

/// Client frames for an SSE connection, and the secret half of its
/// session id, which the holding instance checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SseFrames {
    pub secret: String,
    pub frames: Vec<Box<RawValue>>,
}

/// Close a client's connection with this code and reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisconnectOrder {
    pub code: u16,
    pub reason: String,
}

/// Where a broker delivers what arrives from the bus. Implemented by the
/// node; every method is non-blocking (it only queues frames).
pub trait BrokerHandler: Send + Sync + 'static {
    /// Channels with local subscribers and the newest position delivered
    /// here. After an outage a broker resubscribes these channels and
    /// replays, through `on_publication`, what history holds after each
    /// position (sessions drop duplicates by offset). Where history cannot
    /// fill the gap it calls `resync_failed`.
    fn positions(&self) -> Vec<(Arc<str>, Option<StreamPosition>)>;
    /// The newest position known here of `channel` (delivered, or read by a
    /// subscriber's subscribe), as in [`positions`](Self::positions); `None`
    /// without local subscribers. A bus that tracks delivery per channel
    /// starts from it, so a stream lost before any live delivery is still
    /// seen as a gap.
    fn position(&self, channel: &str) -> Option<StreamPosition>;
    /// The gap in `channel` cannot be filled: its local subscribers are
    /// asked to reconnect (close 1012), and recover what they can.
    fn resync_failed(&self, channel: &str);
    /// A publication in `channel`, to every local subscriber.
    fn on_publication(&self, channel: &Arc<str>, epoch: &Arc<str>, publication: &Publication);
    /// A control message, to the local clients it concerns.
    fn on_control(&self, control: &Control);
    /// A direct message; returns whether the target is connected here.
    fn on_direct(&self, direct: &Direct) -> bool;
}

/// The bus between instances, and the channel history.
///
/// # Guarantees every implementation gives
///
/// * **Atomic publish.** [`publish`](Broker::publish) appends to the
///   channel's history and hands the publication to the subscribed
///   instances as one step per channel: offsets within an epoch grow by
///   exactly one per publication, and every instance's handler receives a
///   channel's publications in offset order.
/// * **Own instance included.** Publications and control messages reach the
///   handler of this instance too, exactly once; no instance gets its own
///   message twice.
/// * **Epochs.** When a channel's stream is lost (restart of a memory
///   broker, expiry, a flushed store) the next publication starts a new
///   epoch, so a client never trusts a stale offset.
/// * **Failure is loud.** An operation that cannot reach the bus returns
///   `Error::Bus`; nothing falls back to local-only delivery.
/// * **Idempotent publish.** A publication with an idempotency key whose
///   key was already published in the channel within its window appends
///   nothing and returns the first publication's position. Across
///   instances on Redis (a key in the channel's hash slot, set by the
///   publish script) and NATS (JetStream `Nats-Msg-Id`, window =
///   the stream's `duplicate_window`); per instance on the memory bus.
/// * **Conditional publish.** With an expected offset the append happens
///   only if the channel's top offset is that one, atomically with the
///   append (the channel lock, the Lua script, JetStream's
///   `Nats-Expected-Last-Subject-Sequence`); otherwise `publish` returns
///   the client error `offset_mismatch` carrying the current top, and
///   nothing is published. A duplicate key is answered before the check.
///   A bus that cannot give these (Pub/Sub) refuses both with
///   `unsupported`.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Attach the handler and connect. Called once, before anything else;
    /// an unreachable bus is an error here.
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> Result<()>;

    /// This instance now has a local subscriber to `channel` (the first).
    async fn subscribe(&self, channel: &str) -> Result<()>;

    /// This instance has no local subscriber to `channel` any more.
    async fn unsubscribe(&self, channel: &str) -> Result<()>;

    /// Append to history and deliver, atomically per channel; returns the
    /// publication's position.
    async fn publish(
        &self,
        channel: &str,
        publication: NewPublication,
        history: HistoryOptions,
    ) -> Result<StreamPosition>;

    /// Deliver a control message to every instance, this one included.
    async fn publish_control(&self, control: Control) -> Result<()>;

    /// Deliver a direct message to the instance holding the target client.
    /// `Ok(false)` when no instance does.
    async fn direct(&self, direct: Direct) -> Result<bool>;

    /// Publications of `channel` after `since` (all retained ones without
    /// it), at most `limit`, oldest first — or with `newest_first` the
    /// newest `limit` of them, newest first — and the current top. A
    /// `since` in another epoch returns no publications and the current
    /// top.
    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        newest_first: bool,
        history: HistoryOptions,
    ) -> Result<HistoryResult>;

    /// This instance's tag: the start of the random part of every client id
    /// it gives ([`crate::ids::client_id`]), by which the other instances
    /// route a direct message here without any per-client record on the
    /// bus. A bus that routes by tag picks one no live instance holds;
    /// `None` (the default) lets the node draw a random one.
    fn instance_tag(&self) -> Option<String> {
        None
    }

    /// A client connected to this instance; direct messages must be able to
    /// find it from any instance from now on.
    async fn register_client(&self, _info: &ClientInfo) -> Result<()> {
        Ok(())
    }

    /// The client left this instance.
    async fn unregister_client(&self, _client_id: &str) -> Result<()> {
        Ok(())
    }

    /// What the in-process history holds (`/metrics`); `None` for buses
    /// that keep history elsewhere.
    fn history_stats(&self) -> Option<Arc<crate::broker::history::HistoryStats>> {
        None
    }

    /// What this instance received from the bus so far (`/metrics`);
    /// `None` for buses that do not count it.
    fn traffic(&self) -> Option<BusTraffic> {
        None
    }

    /// Whether the bus is reachable now (`/healthz`, `busUp`; `/readyz` only
    /// with `ready_requires_bus`).
    fn is_ready(&self) -> bool {
        true
    }

    /// Release the bus (clean shutdown).
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Who is subscribed to which channel, across instances.
///
/// Guarantees: `add` then `members` on any instance shows the member;
/// members of an instance that stops without `remove` disappear after the
/// implementation's documented expiry (never, for the memory store, which
/// dies with its instance).
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    async fn add(&self, channel: &str, info: &ClientInfo) -> Result<()>;
    async fn remove(&self, channel: &str, client_id: &str) -> Result<()>;
    async fn members(&self, channel: &str) -> Result<Vec<ClientInfo>>;
}

/// The backends for the configured bus. Connects (and fails) here, at
/// start-up: a configured bus that cannot be reached is an error, never a
/// silent fall-back to local-only delivery.
pub async fn connect(config: &Config) -> Result<(Arc<dyn Broker>, Arc<dyn PresenceStore>)> {
    match &config.bus {
        BusConfig::Memory => Ok((
            Arc::new(memory::MemoryBroker::with_limits(
                history::HistoryLimits::from_config(config),
            )),
            Arc::new(memory::MemoryPresence::new()),
        )),
        #[cfg(feature = "redis")]
        BusConfig::Redis { url } => redis::connect(url, config).await,
        #[cfg(feature = "nats")]
        BusConfig::Nats { url } => nats::connect(url, config).await,
        #[cfg(feature = "pubsub")]
        BusConfig::PubSub { project } => pubsub::connect(project, config).await,
        #[allow(unreachable_patterns)]
        other => Err(Error::Config(format!(
            "bus {other:?} is not compiled into this build (cargo features redis, nats, pubsub)"
        ))),
    }
}

/// A failed bus operation as the crate's typed [`Error::Bus`]: the one
/// constructor every external bus uses. Takes any error (or a message);
/// clients see only a fixed message, the cause goes to the log.
#[cfg(any(feature = "redis", feature = "nats", feature = "pubsub"))]
pub(crate) fn bus_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::Bus(e.into())
}
