//! The supervisor of the Redis bus in cluster mode: one self-healing
//! cluster connection (the crate's), whose pushes it dispatches, and a
//! recovery after every sign that a subscription may have been lost.
//!
//! A node connection that drops (the crate pushes `Disconnection`), a
//! server-sent `sunsubscribe` of a topic this instance still wants (its
//! slot moved to another master), or a failed heartbeat starts a recovery:
//! the bus turns unready, every topic is subscribed again (`SSUBSCRIBE`,
//! routed to the master that owns its slot now; retried with the bus's
//! backoff while the cluster fails over), the directory and presence are
//! rewritten, and each local channel's gap is replayed from its stream
//! (`Inner::replay`, the same as after a single-node reconnection). Only
//! then is the bus ready again. Messages of the other shards keep being
//! dispatched while a recovery runs.

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

    /// The cluster supervisor: dispatch pushes, beat, recover.
    pub(super) async fn supervise_cluster(
        self: Arc<Self>,
        conn: ClusterConnection,
        mut pushes: UnboundedReceiver<PushInfo>,
    ) {
        let beat = (self.presence_ttl / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(beat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first install runs as a recovery that is not after an outage.
        let mut recovering: Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> =
            Some(Box::pin(self.recover(conn.clone(), false)));
        // Another loss was seen while recovering: recover once more after.
        let mut again = false;
        loop {
            let lost = tokio::select! {
                push = pushes.recv() => {
                    let Some(push) = push else { return };
                    match self.classify(&push) {
                        Push::Message(topic, payload) => {
                            self.dispatch(topic, payload);
                            None
                        }
                        Push::Lost(why) => Some(why),
                        Push::Ignore => None,
                    }
                }
                () = async { recovering.as_mut().expect("guarded").await }, if recovering.is_some() => {
                    recovering = None;
                    if std::mem::take(&mut again) {
                        recovering = Some(Box::pin(self.recover(conn.clone(), true)));
                    }
                    None
                }
                _ = tick.tick(), if recovering.is_none() => {
                    self.heartbeat().await.err().map(|e| format!("heartbeat failed: {e}"))
                }
                () = self.shutdown.cancelled() => return,
            };
            if let Some(why) = lost {
                if recovering.is_some() {
                    again = true;
                } else {
                    tracing::warn!(reason = %why, "redis cluster subscriptions may be lost; resubscribing");
                    self.ready.store(false, Ordering::Relaxed);
                    recovering = Some(Box::pin(self.recover(conn.clone(), true)));
                }
            }
        }
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
        if topic == self.keys.all || topic == self.keys.own {
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
    async fn recover(&self, conn: ClusterConnection, after_outage: bool) {
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
                    if after_outage {
                        tracing::info!("redis cluster bus resubscribed and replayed");
                    }
                    return;
                }
                Err(e) => {
                    self.ready.store(false, Ordering::Relaxed);
                    let delay = BACKOFF.jittered(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?delay, "redis cluster bus unreachable");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}
