//! Lifecycle events (webhooks): `connect`, `disconnect`, `subscribe`,
//! `unsubscribe`, `channel_occupied`, `channel_vacated`, `user_online`,
//! `user_offline`, POSTed in signed batches to `events_url`, at least once
//! and in order per subject. Off unless `events_url` is set.
//!
//! Where it sits: the [`Node`](crate::node::Node) owns an [`Events`] and
//! reports each connection's change to it ([`Events::record`]: one call in
//! `register`, `unregister`, `subscribe`, `unsubscribe`). Nothing is
//! buffered in the instance: the change is written to the bus's event
//! [`Store`](store::Store) before the call returns, and only then counts
//! as emitted (`eventsEmitted`); a write that fails is logged and counted
//! (`eventsFailed`) and the connection carries on. A background task
//! (`deliver.rs`) on the instance that holds the cluster-wide delivery
//! lease reads the log in order, POSTs batches of at most [`MAX_BATCH`],
//! and advances the durable cursor after a 2xx; it also settles the grace
//! period and reaps dead instances.
//!
//! Files: `store.rs` (the trait and what it exchanges), `memory.rs` (the
//! memory bus: in this process, lost with it), `redis.rs` and
//! `scripts/*.lua` (Redis Streams, shared by the cluster), `deliver.rs`
//! (the lease holder's loop, signatures, retries, dead letters). The NATS
//! and Pub/Sub buses refuse `events_url` at start-up (config error).

mod deliver;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use store::{Change, Op, UserPresence};

use crate::config::{BusConfig, Config};
use crate::error::{Error, Result};
use crate::log_limit::LogLimit;
use store::Store;

/// Most events in one delivery.
pub const MAX_BATCH: usize = 100;
/// Most undelivered events the log keeps (Redis: approximate `MAXLEN`);
/// beyond it the oldest are dropped (`eventsDropped`).
pub const MAX_LOG: usize = 1_000_000;
/// Most events the dead-letter log keeps; beyond it the oldest go.
pub const MAX_DEAD: usize = 100_000;
/// Most dead-lettered events one replay request moves back.
pub const MAX_REPLAY: usize = 10_000;

/// An event type, as `type` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Connect,
    Disconnect,
    Subscribe,
    Unsubscribe,
    ChannelOccupied,
    ChannelVacated,
    UserOnline,
    UserOffline,
}

/// One event, as delivered (`docs/backend.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Unique across the cluster and its restarts.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// `client:<id>`, `channel:<name>` or `user:<id>`.
    pub subject: String,
    /// 1, 2, 3… per subject, cluster-wide.
    pub seq: u64,
    /// When it happened, unix ms.
    pub time: u64,
    /// The instance that emitted it (for a crashed instance's clients: the
    /// one that found it dead).
    pub instance_id: String,
    pub client_id: Option<String>,
    pub user_id: Option<String>,
    pub channel: Option<String>,
    /// `disconnect` only: the close code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// `disconnect` only: the close reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Event {
    fn new(
        id: String,
        kind: Kind,
        subject: String,
        seq: u64,
        time: u64,
        instance_id: &str,
    ) -> Event {
        Event {
            id,
            kind,
            subject,
            seq,
            time,
            instance_id: instance_id.to_string(),
            client_id: None,
            user_id: None,
            channel: None,
            code: None,
            reason: None,
        }
    }
}

/// The events' figures (in `figures::COUNTERS`).
#[derive(Debug, Default)]
pub struct EventStats {
    /// Events written to the bus.
    pub emitted: AtomicU64,
    /// Changes whose events could not be written (bus unreachable).
    pub failed: AtomicU64,
    /// Events acknowledged by the backend (by this instance).
    pub delivered: AtomicU64,
    /// Failed delivery attempts (batches).
    pub retried: AtomicU64,
    /// Events dead-lettered after `events_max_age`.
    pub dead_lettered: AtomicU64,
    /// Events dropped from a full log (see [`MAX_LOG`], [`MAX_DEAD`]).
    pub dropped: AtomicU64,
    /// Sum over delivered events of (acknowledged − emitted), in ms.
    pub delivery_ms: AtomicU64,
}

impl EventStats {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// The node's handle on lifecycle events; clones share everything.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    /// The bus side: log, members, lease.
    store: Arc<dyn Store>,
    /// The figures.
    stats: Arc<EventStats>,
    /// Stops the delivery task (`close`, or drop).
    shutdown: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Failed writes of events, logged at most once per 10 s.
static FAILED_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

impl Events {
    /// Connect the configured bus's event store and start delivering; `None`
    /// when `events_url` is not set. An unreachable bus is an error.
    pub async fn start(config: &Config) -> Result<Option<Events>> {
        let Some(ev) = &config.events else {
            return Ok(None);
        };
        let stats = Arc::new(EventStats::default());
        let grace_ms = ev.grace.as_millis() as u64;
        let store: Arc<dyn Store> = match &config.bus {
            BusConfig::Memory => Arc::new(memory::MemoryStore::new(
                &config.instance_id,
                grace_ms,
                stats.clone(),
            )),
            #[cfg(feature = "redis")]
            BusConfig::Redis { url } => Arc::new(redis::RedisStore::connect(url, config).await?),
            _ => {
                return Err(Error::Config(
                    "events_url needs the memory or the redis bus".into(),
                ));
            }
        };
        let shutdown = CancellationToken::new();
        let delivery =
            deliver::Delivery::new(ev, config.proxy.timeout, store.clone(), stats.clone())?;
        tokio::spawn(delivery.run(shutdown.clone(), config.presence_ttl));
        Ok(Some(Events {
            inner: Arc::new(Inner {
                store,
                stats,
                shutdown,
            }),
        }))
    }

    /// Write `change`'s events to the bus. A failure is logged and counted
    /// (`eventsFailed`); the caller carries on.
    pub async fn record(&self, change: Change<'_>) {
        match self
            .inner
            .store
            .record(change, crate::protocol::now_ms())
            .await
        {
            Ok(n) => EventStats::add(&self.inner.stats.emitted, n),
            Err(e) => {
                EventStats::inc(&self.inner.stats.failed);
                if let Some(suppressed) = FAILED_LOG.allow() {
                    tracing::warn!(client = %change.client_id, error = %e, suppressed, "lifecycle events could not be written");
                }
            }
        }
    }

    /// The figures.
    pub fn stats(&self) -> &EventStats {
        &self.inner.stats
    }

    /// A user's presence across the cluster and its subject's `seq`.
    pub async fn user(&self, user_id: &str) -> Result<UserPresence> {
        self.inner.store.user(user_id).await
    }

    /// Move up to `max` (at most [`MAX_REPLAY`]) dead-lettered events back
    /// into the log; returns how many moved and how many are left.
    pub async fn replay(&self, max: usize) -> Result<(u64, u64)> {
        let moved = self
            .inner
            .store
            .replay(max.min(MAX_REPLAY), crate::protocol::now_ms())
            .await?;
        Ok((moved, self.inner.store.dead_count().await?))
    }

    /// Stop delivering (shutdown); what is undelivered stays on the bus.
    pub fn close(&self) {
        self.inner.shutdown.cancel();
    }
}
