//! The supervisor of the Redis bus in cluster mode: one self-healing
//! cluster connection (the crate's), whose pushes it dispatches, and a
//! recovery after every sign that a subscription may have been lost.
//!
//! A node connection that drops (the crate pushes `Disconnection`), a
//! server-sent `sunsubscribe` of a topic this instance still wants (its
//! slot moved to another master), or a failed heartbeat starts a recovery:
//! the bus turns unready, every topic is subscribed again (`SSUBSCRIBE`,
//! routed to the master that owns its slot now; retried with the bus's
//! backoff while the cluster fails over), the presence entries are
//! rewritten, and each local channel's gap is replayed from its stream
//! (`Inner::replay`, the same as after a single-node reconnection). Only
//! then is the bus ready again. Messages of the other shards keep being
//! dispatched while a recovery runs.
//!
//! The cluster client also re-makes subscriptions by itself after it
//! refreshed its slot map, possibly before this instance has replayed what
//! was published meanwhile; a live publication that skips offsets of the
//! epoch delivered here is therefore not delivered but replayed from
//! history with the gap before it (`Inner::dispatch`, `fill_gaps`), so
//! subscribers always get a channel in offset order without a hole.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::Inner;
use super::bus_error;
use super::cluster::Conn;
use super::supervise::{BACKOFF, Connected, Sink};
use crate::error::Result;

/// What one push means to the supervisor.
enum Push<'a> {
    /// A message on `topic`.
    Message(&'a str, &'a [u8]),
    /// A subscription may be gone.
    Lost(String),
    /// Nothing to do (subscription confirmations).
    Ignore,
}

impl Inner {
    /// Connect to the cluster through its seed nodes and check it.
    pub(super) async fn dial_cluster(
        client: ClusterClient,
        pushes: UnboundedReceiver<PushInfo>,
    ) -> Result<Connected> {
        let conn = client.get_async_connection().await.map_err(bus_error)?;
        let mut c = conn.clone();
        // Routed to every master: each must answer.
        let _: Value = redis::cmd("PING")
            .query_async(&mut c)
            .await
            .map_err(bus_error)?;
        Ok(Connected::Cluster { conn, pushes })
    }

    /// The cluster supervisor: dispatch pushes, beat, recover, fill gaps.
    /// One piece of work runs at a time (a full recovery, or a replay of
    /// the channels whose live delivery skipped offsets) while pushes keep
    /// being dispatched; what is found meanwhile is done after it.
    pub(super) async fn supervise_cluster(
        self: Arc<Self>,
        conn: ClusterConnection,
        mut pushes: UnboundedReceiver<PushInfo>,
    ) {
        let this: &Inner = &self;
        let beat = (self.presence_ttl / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(beat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The running work; it answers whether a full recovery is due.
        // The first install runs as a recovery that is not after an outage.
        let mut work: Option<Pin<Box<dyn Future<Output = bool> + Send + '_>>> =
            Some(Box::pin(this.recover(conn.clone(), false)));
        // A full recovery is due (a loss was seen).
        let mut full = false;
        // Channels whose live delivery skipped offsets (bounded by the
        // channels subscribed here).
        let mut gaps: HashSet<Arc<str>> = HashSet::new();
        loop {
            tokio::select! {
                push = pushes.recv() => {
                    let Some(push) = push else { return };
                    match self.classify(&push) {
                        Push::Message(topic, payload) => {
                            if let Some(channel) = self.dispatch(topic, payload) {
                                gaps.insert(channel);
                            }
                        }
                        Push::Lost(why) => {
                            if !full {
                                tracing::warn!(reason = %why, "redis cluster subscriptions may be lost; resubscribing");
                            }
                            self.ready.store(false, Ordering::Relaxed);
                            full = true;
                        }
                        Push::Ignore => {}
                    }
                }
                again = async { work.as_mut().expect("guarded").await }, if work.is_some() => {
                    work = None;
                    full |= again;
                }
                _ = tick.tick(), if work.is_none() => {
                    let beat = async { self.heartbeat().await?; self.refresh_replicas().await };
                    if let Err(e) = beat.await {
                        tracing::warn!(error = %e, "redis cluster heartbeat failed; resubscribing");
                        self.ready.store(false, Ordering::Relaxed);
                        full = true;
                    }
                }
                () = self.shutdown.cancelled() => return,
            }
            if work.is_none() {
                if std::mem::take(&mut full) {
                    // The full recovery replays every channel.
                    gaps.clear();
                    work = Some(Box::pin(this.recover(conn.clone(), true)));
                } else if !gaps.is_empty() {
                    let channels: Vec<Arc<str>> = gaps.drain().collect();
                    work = Some(Box::pin(this.fill_gaps(channels)));
                }
            }
        }
    }

    /// Replay `channels` from history after the position delivered here;
    /// `true` when that failed (a full recovery is then due).
    async fn fill_gaps(&self, channels: Vec<Arc<str>>) -> bool {
        let Some(handler) = self.handler().cloned() else {
            return false;
        };
        for channel in channels {
            let last = handler.position(&channel);
            if let Err(e) = self.replay_channel(&*handler, &channel, last).await {
                tracing::warn!(%channel, error = %e, "redis cluster gap replay failed; resubscribing");
                return true;
            }
        }
        false
    }

    /// What `push` means: a message, a possible loss, or nothing.
    fn classify<'a>(&self, push: &'a PushInfo) -> Push<'a> {
        let bytes = |i: usize| match push.data.get(i) {
            Some(Value::BulkString(b)) => Some(b.as_slice()),
            _ => None,
        };
        match &push.kind {
            PushKind::SMessage | PushKind::Message => {
                match (bytes(0).map(std::str::from_utf8), bytes(1)) {
                    (Some(Ok(topic)), Some(payload)) => Push::Message(topic, payload),
                    _ => {
                        tracing::warn!("malformed push message on the bus ignored");
                        Push::Ignore
                    }
                }
            }
            PushKind::Disconnection => Push::Lost("a cluster node connection dropped".into()),
            PushKind::SUnsubscribe | PushKind::Unsubscribe => {
                let Some(topic) = bytes(0).and_then(|b| std::str::from_utf8(b).ok()) else {
                    return Push::Ignore;
                };
                if self.still_wanted(topic) {
                    Push::Lost(format!(
                        "the server unsubscribed {topic:?} (its slot moved)"
                    ))
                } else {
                    Push::Ignore // the confirmation of our own unsubscribe
                }
            }
            _ => Push::Ignore,
        }
    }

    /// Whether this instance still wants `topic` (when the subscription
    /// state is busy, assume so: a needless recovery only replays).
    fn still_wanted(&self, topic: &str) -> bool {
        if topic == self.keys.all || topic == self.own_topic() {
            return true;
        }
        let Some(channel) = self.keys.channel_of(topic) else {
            return false;
        };
        match self.subs.try_lock() {
            Ok(subs) => subs.channels.contains_key(channel),
            Err(_) => true,
        }
    }

    /// Subscribe every topic again, rewrite the entries, replay the gaps
    /// (after an outage) and turn ready; retried with backoff until it
    /// succeeds or the bus closes.
    async fn recover(&self, conn: ClusterConnection, after_outage: bool) -> bool {
        let mut attempt: u32 = 0;
        loop {
            let installed = self
                .install(
                    Conn::Cluster(conn.clone()),
                    Sink::Cluster(conn.clone()),
                    after_outage,
                )
                .await;
            match installed {
                Ok(()) => {
                    if let Err(e) = self.refresh_replicas().await {
                        tracing::warn!(error = %e, "redis cluster: replicas not read (publications wait for one)");
                    }
                    if after_outage {
                        tracing::info!("redis cluster bus resubscribed and replayed");
                    }
                    return false;
                }
                Err(e) => {
                    self.ready.store(false, Ordering::Relaxed);
                    let delay = BACKOFF.jittered(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?delay, "redis cluster bus unreachable");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.shutdown.cancelled() => return false,
                    }
                }
            }
        }
    }
}
