//! Connection and supervision: the client (emulator or Application Default
//! Credentials), the topics and this instance's subscriptions (created,
//! replaced when stale, recreated when gone, deleted on close), the
//! streaming pull with its hello, the receive loop (decoding,
//! de-duplication, dispatch to publish, direct and presence), batched
//! acknowledgements, reconnection with backoff, and readiness.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gcloud_gax::conn::Environment;
use gcloud_gax::grpc::Code;
use gcloud_googleapis::pubsub::v1::{AcknowledgeRequest, ExpirationPolicy, StreamingPullRequest};
use gcloud_pubsub::client::{Client, ClientConfig};
use gcloud_pubsub::subscription::{Subscription, SubscriptionConfig};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::presence::Remote;
use super::shards::{Shard, shard_of};
use super::{
    Acks, Body, DEDUPE_MAX, DEDUPE_WINDOW, Guard, Inner, PubSubBroker, PubSubError, PubSubPresence,
    RPC_TIMEOUT, Route, STREAM_OPEN_TIMEOUT, Wire, bus_error, publisher_config, retry, rpc,
};
use crate::broker::BrokerHandler;
use crate::broker::history::{HistoryLimits, Store};
use crate::broker::retry::Backoff;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::ids::random_base36;
use crate::protocol::Publication;
use crate::sync::MutexExt;

/// The receive stream of a streaming pull.
pub(super) type PullStream =
    gcloud_gax::grpc::Streaming<gcloud_googleapis::pubsub::v1::StreamingPullResponse>;

/// Reconnection delays: 100 ms doubling per failed attempt to 2 s (no
/// jitter).
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// `PROJECT[?emulator=HOST:PORT]` → project and emulator override.
pub(super) fn parse_project(spec: &str) -> (String, Option<String>) {
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

/// Recently handled message names.
#[derive(Default)]
pub(super) struct Seen {
    /// Names with their arrival, oldest first.
    order: VecDeque<(Instant, (Arc<str>, u64))>,
    /// The same names, for lookup.
    set: HashSet<(Arc<str>, u64)>,
}

impl Seen {
    /// Remember `key`; false if it was already seen.
    pub(super) fn insert(&mut self, key: (Arc<str>, u64), now: Instant) -> bool {
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

/// [`connect`](super::connect) without its timeout: the client, the
/// shared state, the topic and a fresh subscription.
pub(super) async fn connect_inner(
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
            .map_err(|e| bus_error(PubSubError::Client(format!("credentials: {e}"))))?,
    };
    let client = Client::new(cc)
        .await
        .map_err(|e| bus_error(PubSubError::Client(e.to_string())))?;
    let topic = client.topic(&config.pubsub_topic);
    let publisher = topic.new_publisher(Some(publisher_config()));
    let subscription = super::stall::Named::new(&client, config.pubsub_subscription.clone());
    let shards = (0..config.pubsub_shards)
        .map(|k| {
            Shard::new(
                &client,
                &config.pubsub_topic,
                &config.pubsub_subscription,
                k,
            )
        })
        .collect();
    let shutdown = CancellationToken::new();
    let (acks, acks_rx) = mpsc::unbounded_channel();
    let inner = Arc::new(Inner {
        me: config.instance_id.as_str().into(),
        boot: random_base36(super::stall::BOOT_LEN).into(),
        client,
        publisher,
        subscription,
        topic_id: config.pubsub_topic.clone(),
        shards,
        shards_open: AtomicU64::new(0),
        received: AtomicU64::new(0),
        received_bytes: AtomicU64::new(0),
        fetches: Mutex::default(),
        presence_ttl: config.presence_ttl,
        handler: OnceLock::new(),
        seq: AtomicU64::new(0),
        started: Instant::now(),
        sequencer: Mutex::default(),
        max_logs: config.history_max_channels.max(1),
        streams: Store::new(
            HistoryLimits::from_config(config),
            &format!("{}.", config.instance_id),
        ),
        lags: Mutex::default(),
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
    inner.ensure_subscription(Route::Control, true).await?;
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

impl Inner {
    /// The subscription read for `route` now.
    pub(super) fn subscription_of(&self, route: Route) -> Subscription {
        self.named(route).get()
    }

    /// The topic id of `route`.
    pub(super) fn topic_of(&self, route: Route) -> &str {
        match route {
            Route::Control => &self.topic_id,
            Route::Shard(k) => &self.shards[k as usize].topic_id,
        }
    }

    pub(super) async fn ensure_topic(&self, route: Route) -> Result<()> {
        let topic = self.client.topic(self.topic_of(route));
        match topic.create(None, Some(retry())).await {
            Ok(()) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(rpc("create topic")(s)),
        }
    }

    /// Make sure the topic of `route` and this instance's subscription to
    /// it exist. With `fresh`, a subscription left by an earlier
    /// incarnation (it crashed) is replaced by one of a new name: the
    /// emulator may keep the crashed reader's stream attached to the old
    /// name, even across a delete and create (see [`stall`](super::stall)).
    /// Returns whether the subscription was (re)created.
    pub(super) async fn ensure_subscription(&self, route: Route, fresh: bool) -> Result<bool> {
        self.ensure_topic(route).await?;
        self.sweep_leftover_renames(route);
        let mut subscription = self.subscription_of(route);
        let exists = subscription
            .exists(Some(retry()))
            .await
            .map_err(rpc("get subscription"))?;
        if exists && !fresh {
            return Ok(false);
        }
        if exists {
            self.rename(route, "left by an earlier incarnation");
            subscription = self.subscription_of(route);
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
        let fqtn = self.client.fully_qualified_topic_name(self.topic_of(route));
        match subscription.create(&fqtn, cfg, Some(retry())).await {
            Ok(()) => Ok(true),
            Err(s) if s.code() == Code::AlreadyExists => Ok(false),
            Err(s) => Err(rpc("create subscription")(s)),
        }
    }

    /// Delete this instance's subscription of `route`.
    pub(super) async fn delete_subscription(&self, route: Route) -> Result<()> {
        let subscription = self.subscription_of(route);
        match tokio::time::timeout(RPC_TIMEOUT, subscription.delete(Some(retry()))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(s)) if s.code() == Code::NotFound => Ok(()),
            Ok(Err(s)) => Err(rpc("delete subscription")(s)),
            Err(_) => Err(bus_error(PubSubError::Timeout("delete subscription"))),
        }
    }

    /// Open the streaming pull of `route` with a first message. The server
    /// answers the stream's headers only with its first message, so that
    /// message (which comes back through our own subscription) is also what
    /// proves the round trip works: on the control topic a hello, which
    /// every other instance answers with a snapshot; on a shard a ping. A
    /// first message that fails to go out (the emulator just restarted) is
    /// sent again, with backoff, while the stream waits for it.
    pub(super) async fn open_stream(&self, route: Route) -> Result<PullStream> {
        let deadline = Instant::now() + STREAM_OPEN_TIMEOUT;
        let first = async {
            // The subscription exists: the message waits there for the stream.
            let mut attempt = 0u32;
            loop {
                let body = match route {
                    Route::Control => Body::Hello,
                    Route::Shard(shard) => Body::Ping { shard },
                };
                match self.send(format!("m:{}", self.me), body).await {
                    Ok(_) => return Ok(()),
                    Err(e) if Instant::now() + BACKOFF.delay(attempt) >= deadline => return Err(e),
                    Err(e) => {
                        tracing::debug!(?route, error = %e, "first message not sent; again");
                        tokio::time::sleep(BACKOFF.delay(attempt)).await;
                        attempt += 1;
                    }
                }
            }
        };
        let (stream, first) = tokio::join!(self.open_stream_only(route), first);
        first?;
        stream
    }

    async fn open_stream_only(&self, route: Route) -> Result<PullStream> {
        let subscription = self.subscription_of(route);
        let req = StreamingPullRequest {
            subscription: subscription.fully_qualified_name().to_string(),
            stream_ack_deadline_seconds: 10,
            max_outstanding_messages: 10_000,
            client_id: self.boot.to_string(),
            ..Default::default()
        };
        let subc = subscription.get_client();
        let resp = tokio::time::timeout(
            STREAM_OPEN_TIMEOUT,
            subc.streaming_pull(req, Duration::from_secs(10), Some(retry())),
        )
        .await
        .map_err(|_| bus_error(PubSubError::Timeout("streaming pull")))?
        .map_err(rpc("streaming pull"))?;
        Ok(resp.into_inner())
    }

    /// Everything that must happen once the stream of `route` is
    /// re-established (`lost`: its subscription had to be recreated).
    fn on_stream_up(self: &Arc<Self>, route: Route, lost: bool) {
        let Route::Shard(k) = route else {
            if lost {
                // A new subscription does not hold what was sent before it:
                // whoever waits for such a round trip is told now.
                self.waiters.lock_unpoisoned().clear();
            }
            self.stream_up.store(true, Ordering::Relaxed);
            self.publish_ok.store(true, Ordering::Relaxed);
            let inner = self.clone();
            tokio::spawn(async move {
                let _ = inner.announce().await;
            });
            return;
        };
        let count = self.shards.len() as u16;
        let in_shard = |c: &str| shard_of(c, count) == k;
        if lost {
            // Messages may have been lost with the old subscription: new
            // epochs, and the subscribers reconnect to recover honestly.
            self.forget_shard(k);
            if let Some(h) = self.handler() {
                let channels: Vec<Arc<str>> = self
                    .subscribed
                    .lock_unpoisoned()
                    .iter()
                    .filter(|c| in_shard(c))
                    .cloned()
                    .collect();
                for ch in channels {
                    h.resync_failed(&ch);
                }
            }
        } else if let Some(h) = self.handler() {
            // Replay what the local history holds after each position.
            for (channel, pos) in h.positions() {
                if !in_shard(&channel) {
                    continue;
                }
                let replay: Vec<(Arc<str>, Publication)> = match &pos {
                    Some(p) => self.streams.replay_after(&channel, p),
                    None => Vec::new(),
                };
                for (epoch, p) in replay {
                    h.on_publication(&channel, &epoch, &p);
                }
            }
        }
        self.shards[k as usize].state.lock_unpoisoned().set_up(true);
    }

    /// `Broker::start`: open the control stream, then run the receive, ack
    /// and heartbeat loops and the history sweeper (shards open on
    /// demand).
    pub(super) async fn start(self: &Arc<Self>, handler: Arc<dyn BrokerHandler>) -> Result<()> {
        let _ = self.handler.set(handler);
        let (stream, _) = self.open_or_replace(Route::Control).await?;
        self.on_stream_up(Route::Control, false);
        if let Some(rx) = self.acks_rx.lock_unpoisoned().take() {
            tokio::spawn(self.clone().ack_loop(rx));
        }
        let stop = self.shutdown.child_token();
        tokio::spawn(self.clone().receive_loop(Route::Control, stream, stop));
        tokio::spawn(self.clone().heartbeat_loop());
        self.streams.spawn_sweeper();
        Ok(())
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
        if !self
            .seen
            .lock_unpoisoned()
            .insert((wire.boot.clone(), wire.id), now)
        {
            return;
        }
        let own = wire.src == self.me && wire.boot == self.boot;
        if !own {
            let changed = {
                let mut remotes = self.remotes.lock_unpoisoned();
                let r = remotes
                    .entry(wire.src.clone())
                    .or_insert_with(|| Remote::new(wire.boot.clone()));
                let changed = if r.boot != wire.boot {
                    // Restarted: the old process's members are gone.
                    let gone = if r.mourned {
                        Vec::new()
                    } else {
                        r.events(false)
                    };
                    *r = Remote::new(wire.boot.clone());
                    gone
                } else if r.mourned {
                    // Back from silence (a partition): its members are back.
                    r.mourned = false;
                    r.events(true)
                } else {
                    Vec::new()
                };
                r.heard = now;
                changed
            };
            self.tell_local(&changed);
        }
        let Some(handler) = self.handler().cloned() else {
            return;
        };
        // Each part handles its own messages.
        match wire.body {
            Body::Pub { .. }
            | Body::Seq { .. }
            | Body::Claim { .. }
            | Body::Release { .. }
            | Body::Fetch { .. }
            | Body::Backfill { .. }
            | Body::Ping { .. }
            | Body::Broadcast { .. }
            | Body::JoinLeave { .. } => self.receive_published(wire, own, &handler),
            Body::Direct { .. } | Body::DirectAck { .. } => {
                self.receive_direct(wire, own, &handler)
            }
            Body::Member { .. }
            | Body::MemberAck { .. }
            | Body::Snapshot { .. }
            | Body::Sequences { .. }
            | Body::Hello
            | Body::Bye => self.receive_gossip(wire, own),
        }
    }

    /// Read the stream of `route` until it fails or `stop` is cancelled.
    async fn read(
        self: &Arc<Self>,
        route: Route,
        mut stream: PullStream,
        stop: &CancellationToken,
    ) {
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                m = stream.message() => m,
            };
            match next {
                Ok(Some(resp)) => {
                    let mut ack_ids = Vec::with_capacity(resp.received_messages.len());
                    for rm in resp.received_messages {
                        if let Some(m) = rm.message {
                            self.received.fetch_add(1, Ordering::Relaxed);
                            self.received_bytes
                                .fetch_add(m.data.len() as u64, Ordering::Relaxed);
                            self.handle(&m.data);
                        }
                        ack_ids.push(rm.ack_id);
                    }
                    let _ = self.acks.send((route, ack_ids));
                }
                Ok(None) => {
                    tracing::warn!(?route, "pub/sub stream ended; reconnecting");
                    return;
                }
                Err(status) => {
                    tracing::warn!(?route, %status, "pub/sub stream failed; reconnecting");
                    return;
                }
            }
        }
    }

    fn set_up(&self, route: Route, up: bool) {
        match route {
            Route::Control => self.stream_up.store(up, Ordering::Relaxed),
            Route::Shard(k) => self.shards[k as usize].state.lock_unpoisoned().set_up(up),
        }
    }

    /// The receive loop of `route`: read, and on failure reconnect with
    /// backoff, until `stop`.
    pub(super) async fn receive_loop(
        self: Arc<Self>,
        route: Route,
        first: PullStream,
        stop: CancellationToken,
    ) {
        self.read(route, first, &self.kick_token(route, &stop))
            .await;
        let mut attempt = 0u32;
        while !stop.is_cancelled() {
            self.set_up(route, false);
            // To be replaced (kicked, or told of a long outage): at once.
            let replace = self.take_renew(route);
            if !replace {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(BACKOFF.delay(attempt)) => {}
                }
                attempt = attempt.saturating_add(1);
            }
            let lost = match self.ensure_subscription(route, replace).await {
                Ok(lost) => lost || replace,
                Err(e) => {
                    tracing::debug!(?route, error = %e, "pub/sub still unreachable");
                    continue;
                }
            };
            if stop.is_cancelled() {
                return;
            }
            match self.open_or_replace(route).await {
                Ok((stream, _)) if self.stall_unreplaced(route) => {
                    // It came back after its subscribers were told: the
                    // old subscription may hold a channel back (see
                    // `stall`); replaced at the top of the loop.
                    drop(stream);
                }
                Ok((stream, replaced)) => {
                    let lost = lost || replaced;
                    tracing::info!(?route, recreated = lost, "pub/sub stream re-established");
                    self.on_stream_up(route, lost);
                    attempt = 0;
                    self.read(route, stream, &self.kick_token(route, &stop))
                        .await;
                }
                Err(e) => {
                    tracing::debug!(?route, error = %e, "pub/sub stream not re-established")
                }
            }
        }
    }

    /// Acknowledge in batches, off the receive path.
    async fn ack_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Acks>) {
        loop {
            let first = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                ids = rx.recv() => match ids { Some(ids) => ids, None => return },
            };
            let mut by_route: HashMap<Route, Vec<String>> = HashMap::new();
            by_route.entry(first.0).or_default().extend(first.1);
            while let Ok((route, more)) = rx.try_recv() {
                by_route.entry(route).or_default().extend(more);
            }
            for (route, ids) in by_route {
                if ids.is_empty() {
                    continue;
                }
                let subscription = self.subscription_of(route);
                let req = AcknowledgeRequest {
                    subscription: subscription.fully_qualified_name().to_string(),
                    ack_ids: ids,
                };
                let subc = subscription.get_client();
                // A lost ack only means a redelivery, which is de-duplicated.
                let _ =
                    tokio::time::timeout(RPC_TIMEOUT, subc.acknowledge(req, Some(retry()))).await;
            }
        }
    }

    /// `Broker::close`: say goodbye, stop the tasks, delete the
    /// subscriptions.
    pub(super) async fn close(&self) -> Result<()> {
        let _ = self.send(format!("m:{}", self.me), Body::Bye).await;
        self.shutdown.cancel();
        self.stream_up.store(false, Ordering::Relaxed);
        let open: Vec<u16> = (0..self.shards.len() as u16)
            .filter(|k| self.shards[*k as usize].state.lock_unpoisoned().open)
            .collect();
        let shards = open
            .into_iter()
            .map(|k| self.delete_subscription(Route::Shard(k)));
        for r in futures_util::future::join_all(shards).await {
            if let Err(e) = r {
                tracing::debug!(error = %e, "pub/sub shard subscription not deleted (it expires by itself)");
            }
        }
        self.delete_subscription(Route::Control).await
    }
}
