//! Connection and supervision of the Redis bus: opening both connections,
//! the supervisor that reconnects with backoff and drives readiness, the
//! heartbeat that rewrites this instance's presence entries,
//! the channel topics the pub/sub connection is subscribed to, and the
//! replay of what was missed during an outage.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, PushInfo};
use tokio::sync::mpsc::UnboundedReceiver;

use super::cluster::Conn;
use super::{
    BrokerHandler, CONNECT_TIMEOUT, DIAL_TIMEOUT, Disconnected, Inner, RESPONSE_TIMEOUT,
    RedisBroker, bus_error,
};
use crate::broker::retry::Backoff;
use crate::error::{Error, Result};
use crate::ids::random_base36;
use crate::protocol::ClientInfo;
use crate::sync::{MutexExt, RwLockExt};

/// Reconnection delays: 100 ms doubling per failed attempt to 5 s, with
/// ±50 % jitter.
pub(super) const BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// Commands per pipeline (or concurrent calls in a cluster) of the
/// heartbeat: bounds what one round trip holds.
const BATCH: usize = 512;

/// The pub/sub side: the subscribing half of the connection and the
/// channels to keep subscribed across reconnections.
#[derive(Default)]
pub(super) struct Subscriptions {
    /// The live connection's command half; `None` while disconnected.
    pub(super) sink: Option<Sink>,
    /// Channel → `subscribe` calls minus `unsubscribe` calls. Counting
    /// (instead of a set) makes an unsubscribe that overtakes the next
    /// subscribe of the same channel harmless.
    pub(super) channels: HashMap<String, usize>,
}

/// Where SUBSCRIBE / UNSUBSCRIBE go.
pub(super) enum Sink {
    /// One Redis: the pub/sub connection's command half.
    Single(PubSubSink),
    /// A cluster: `SSUBSCRIBE`, each topic routed to the master of its slot.
    Cluster(ClusterConnection),
}

/// Topics subscribed at once in a cluster (one `SSUBSCRIBE` each: topics
/// of different slots cannot share one).
const SUBSCRIBE_BATCH: usize = 256;

impl Sink {
    /// Subscribe `topics` (bounded by [`RESPONSE_TIMEOUT`] per batch).
    pub(super) async fn subscribe(&mut self, topics: &[String]) -> Result<()> {
        match self {
            Sink::Single(sink) => tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(topics))
                .await
                .map_err(bus_error)?
                .map_err(bus_error),
            Sink::Cluster(conn) => {
                for batch in topics.chunks(SUBSCRIBE_BATCH) {
                    let calls = batch.iter().map(|topic| {
                        let mut c = conn.clone();
                        async move { c.ssubscribe(topic).await }
                    });
                    tokio::time::timeout(
                        RESPONSE_TIMEOUT,
                        futures_util::future::try_join_all(calls),
                    )
                    .await
                    .map_err(bus_error)?
                    .map_err(bus_error)?;
                }
                Ok(())
            }
        }
    }

    /// Unsubscribe one topic.
    async fn unsubscribe(&mut self, topic: &str) -> redis::RedisResult<()> {
        match self {
            Sink::Single(sink) => sink.unsubscribe(topic).await,
            Sink::Cluster(conn) => conn.sunsubscribe(topic).await,
        }
    }
}

/// `s` as a JSON string (what the presence scripts splice into the
/// `join`/`leave` messages they publish).
fn json_string(s: &str) -> Result<String> {
    serde_json::to_string(s).map_err(bus_error)
}

/// The connections of one attempt.
pub(super) enum Connected {
    /// One Redis: a command and a pub/sub connection.
    Single {
        /// Commands and scripts (multiplexed, cloned per call).
        cmd: Conn,
        /// SUBSCRIBE / UNSUBSCRIBE on the pub/sub connection.
        sink: PubSubSink,
        /// What the pub/sub connection receives; ends when it breaks.
        stream: PubSubStream,
    },
    /// A cluster: one self-healing connection for commands and sharded
    /// pub/sub (see `cluster.rs`).
    Cluster {
        /// Commands, scripts and SSUBSCRIBE, routed per slot.
        conn: ClusterConnection,
        /// Every node's pushes: messages, and `Disconnection` notices.
        pushes: UnboundedReceiver<PushInfo>,
    },
}

impl Connected {
    /// The command connection (what `connect` draws the instance tag with).
    pub(super) fn cmd(&self) -> Conn {
        match self {
            Connected::Single { cmd, .. } => cmd.clone(),
            Connected::Cluster { conn, .. } => Conn::Cluster(conn.clone()),
        }
    }
}

impl RedisBroker {
    /// `Broker::start`: hand the first connections to the supervisor and
    /// wait (within [`CONNECT_TIMEOUT`]) until it is ready.
    pub(super) async fn start_supervisor(&self, handler: Arc<dyn BrokerHandler>) -> Result<()> {
        let _ = self.inner.handler.set(handler);
        let Some((first, outbox)) = self.first.lock_unpoisoned().take() else {
            return Ok(()); // started already
        };
        tokio::spawn(self.inner.clone().write_broadcasts(outbox));
        // The supervisor subscribes the broadcast and own topics, then
        // turns ready.
        let task = tokio::spawn(self.inner.clone().supervise(first));
        *self.task.lock_unpoisoned() = Some(task);
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

    /// `Broker::close`: stop the supervisor, wait for it, turn unready.
    pub(super) async fn stop_supervisor(&self) -> Result<()> {
        self.inner.shutdown.cancel();
        let task = self.task.lock_unpoisoned().take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.inner.ready.store(false, Ordering::Relaxed);
        Ok(())
    }
}

impl Inner {
    /// Open both connections and check them, within [`DIAL_TIMEOUT`] each.
    pub(super) async fn dial(&self) -> Result<Connected> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| bus_error("a cluster connection is made once"))?;
        let cmd = tokio::time::timeout(
            DIAL_TIMEOUT,
            client.get_multiplexed_async_connection_with_config(&self.conn_config),
        )
        .await
        .map_err(bus_error)?
        .map_err(bus_error)?;
        let pubsub = tokio::time::timeout(DIAL_TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(bus_error)?
            .map_err(bus_error)?;
        let (sink, stream) = pubsub.split();
        let mut c = cmd.clone();
        let _: String =
            tokio::time::timeout(RESPONSE_TIMEOUT, redis::cmd("PING").query_async(&mut c))
                .await
                .map_err(bus_error)?
                .map_err(bus_error)?;
        Ok(Connected::Single {
            cmd: Conn::Single(cmd),
            sink,
            stream,
        })
    }

    /// `Broker::subscribe`: subscribe the channel's topic on its first
    /// call, count the others.
    pub(super) async fn subscribe(&self, channel: &str) -> Result<()> {
        let mut subs = self.subs.lock().await;
        if let Some(n) = subs.channels.get_mut(channel) {
            *n += 1;
            return Ok(());
        }
        let topic = self.keys.topic(channel);
        let sink = subs.sink.as_mut().ok_or_else(|| bus_error(Disconnected))?;
        sink.subscribe(&[topic]).await?;
        subs.channels.insert(channel.to_string(), 1);
        Ok(())
    }

    /// `Broker::unsubscribe`: count down; at zero, unsubscribe the
    /// channel's topic.
    pub(super) async fn unsubscribe(&self, channel: &str) -> Result<()> {
        let mut subs = self.subs.lock().await;
        match subs.channels.get_mut(channel) {
            Some(n) if *n > 1 => {
                *n -= 1;
                return Ok(());
            }
            Some(_) => {
                subs.channels.remove(channel);
                self.delivered.forget(channel);
            }
            None => return Ok(()),
        }
        let topic = self.keys.topic(channel);
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

    /// Rewrite this instance's presence entries with a fresh expiry. Also
    /// what restores them after Redis lost its data.
    pub(super) async fn heartbeat(&self) -> Result<()> {
        let mut conn = self.conn()?;
        {
            let subs = self.subs.lock().await;
            self.delivered.retain(|c| subs.channels.contains_key(c));
        }
        let ttl = self.ttl_ms();
        let presence: Vec<(String, Vec<ClientInfo>)> = self
            .local_presence
            .lock_unpoisoned()
            .iter()
            .map(|(ch, m)| (ch.clone(), m.values().cloned().collect()))
            .collect();
        let mut cmds = Vec::with_capacity(1);
        // The generation (the epoch reads report for absent streams) comes
        // back within a beat after Redis lost it. (A cluster has one per
        // slot, created by the first read of the slot: see `mod.rs`.)
        if !self.keys.cluster {
            let mut set = redis::cmd("SET");
            set.arg(&self.keys.generation)
                .arg(random_base36(8))
                .arg("NX");
            cmds.push(set);
        }
        self.run_batch(&mut conn, cmds, None, &[]).await?;
        // Members are refreshed through the add script, which announces a
        // `join` for one that is gone from the hash (reaped while this
        // instance was cut off, or lost with Redis's data).
        let mut calls = Vec::new();
        for (channel, members) in &presence {
            let (mkey, ekey) = (self.keys.members(channel), self.keys.expiry(channel));
            let (topic, name) = (self.keys.topic(channel), json_string(channel)?);
            for info in members {
                let json = serde_json::to_string(info).map_err(bus_error)?;
                let mut call = self.scripts.presence_add.prepare_invoke();
                call.key(&mkey)
                    .key(&ekey)
                    .arg(&*info.client_id)
                    .arg(json)
                    .arg(ttl)
                    .arg(&topic)
                    .arg(&name)
                    .arg(self.keys.publish_cmd());
                calls.push(call);
            }
        }
        self.run_batch(
            &mut conn,
            Vec::new(),
            Some(&self.scripts.presence_add),
            &calls,
        )
        .await?;
        self.reap_presence(&mut conn).await
    }

    /// Run `cmds`, then the calls `calls` of `script`, ignoring answers:
    /// on one Redis pipelined in chunks of [`BATCH`]; in a cluster each on
    /// its own (commands of different slots cannot share a pipeline), a
    /// chunk at a time concurrently.
    async fn run_batch(
        &self,
        conn: &mut Conn,
        cmds: Vec<Cmd>,
        script: Option<&redis::Script>,
        calls: &[redis::ScriptInvocation<'_>],
    ) -> Result<()> {
        if let Conn::Cluster(cluster) = conn {
            for chunk in cmds.chunks(BATCH) {
                let each = chunk.iter().map(|c| {
                    let mut conn = cluster.clone();
                    async move { c.exec_async(&mut conn).await }
                });
                futures_util::future::try_join_all(each)
                    .await
                    .map_err(bus_error)?;
            }
            for chunk in calls.chunks(BATCH) {
                let each = chunk.iter().map(|call| {
                    let mut conn = cluster.clone();
                    async move { call.invoke_async::<redis::Value>(&mut conn).await }
                });
                futures_util::future::try_join_all(each)
                    .await
                    .map_err(bus_error)?;
            }
            return Ok(());
        }
        for chunk in cmds.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for c in chunk {
                pipe.add_command(c.clone()).ignore();
            }
            pipe.exec_async(&mut *conn).await.map_err(bus_error)?;
        }
        for chunk in calls.chunks(BATCH) {
            let mut pipe = redis::pipe();
            if let Some(script) = script {
                pipe.load_script(script).ignore();
            }
            for call in chunk {
                pipe.invoke_script(call).ignore();
            }
            pipe.exec_async(&mut *conn).await.map_err(bus_error)?;
        }
        Ok(())
    }

    /// Drop the expired members of every presence channel this instance
    /// serves, announcing each one's `leave` (see `presence.rs`).
    async fn reap_presence(&self, conn: &mut Conn) -> Result<()> {
        let channels: Vec<String> = {
            let subs = self.subs.lock().await;
            subs.channels
                .keys()
                .filter(|ch| self.config.namespace_of(ch).is_some_and(|n| n.presence))
                .cloned()
                .collect()
        };
        let mut calls = Vec::with_capacity(channels.len());
        for channel in &channels {
            let mut call = self.scripts.presence_members.prepare_invoke();
            call.key(self.keys.members(channel))
                .key(self.keys.expiry(channel))
                .arg(self.keys.topic(channel))
                .arg(json_string(channel)?)
                .arg("reap")
                .arg(self.keys.publish_cmd());
            calls.push(call);
        }
        self.run_batch(
            conn,
            Vec::new(),
            Some(&self.scripts.presence_members),
            &calls,
        )
        .await
    }

    /// Make a fresh connection the current one: resubscribe, rewrite the
    /// entries, replay gaps (after an outage), turn ready.
    pub(super) async fn install(
        &self,
        cmd: Conn,
        mut sink: Sink,
        after_outage: bool,
    ) -> Result<()> {
        *self.cmd.write_unpoisoned() = Some(cmd);
        {
            let mut subs = self.subs.lock().await;
            let mut topics = vec![self.keys.all.clone(), self.own_topic()];
            topics.extend(subs.channels.keys().map(|c| self.keys.topic(c)));
            sink.subscribe(&topics).await?;
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
    pub(super) async fn teardown(&self) {
        self.ready.store(false, Ordering::Relaxed);
        *self.cmd.write_unpoisoned() = None;
        self.subs.lock().await.sink = None;
    }

    /// The supervisor: run the connection, and reconnect it when it breaks.
    async fn supervise(self: Arc<Self>, first: Connected) {
        let first = match first {
            Connected::Cluster { conn, pushes } => {
                return self.supervise_cluster(conn, pushes).await;
            }
            single => single,
        };
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
                Ok(Connected::Single { cmd, sink, stream }) => {
                    match self.install(cmd, Sink::Single(sink), after_outage).await {
                        Ok(()) => Ok(stream),
                        Err(e) => Err(e),
                    }
                }
                Ok(Connected::Cluster { .. }) => {
                    Err(bus_error("a cluster connection is made once"))
                }
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
                    let delay = BACKOFF.jittered(attempt);
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
                        Some(msg) => {
                            // A channel returned holds an offset delivered
                            // here with other content (`recovery.rs`).
                            if let Some(channel) = self.dispatch(msg.get_channel_name(), msg.get_payload_bytes()) {
                                if let Err(e) = self.verify(&channel).await {
                                    break format!("replay failed: {e}");
                                }
                            }
                        }
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
