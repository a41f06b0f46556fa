//! The node: what one Switchboard instance is. It owns the [`Hub`] (local
//! connections) and the backend ([`Broker`], [`PresenceStore`]) and offers
//! the operations the sessions and the HTTP handlers need.
//!
//! [`Node`] is a cheap handle (`Arc` inside); clone it into every task.
//!
//! # Files
//!
//! * `mod.rs`: [`Node`]'s state, start-up, registration of connections,
//!   subscribe, unsubscribe and publish.
//! * `messaging.rs`: messages that are not a channel's publications:
//!   broadcast, direct to a client or to a user, the API's disconnect.
//! * `reads.rs`: the channel reads: history, latest, position, recovery,
//!   presence.
//! * `interest.rs`: the bus's subscription to a channel, kept in step
//!   with the local subscribers.
//! * `inbound.rs`: `Inbound`, the handler the broker delivers to (what
//!   arrives from the bus goes through it to the hub).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::value::RawValue;

use crate::broker::{
    Broker, Control, Direct, HistoryOptions, MAX_IDEMPOTENCY_KEY, NewPublication, PresenceStore,
    PublishConditions,
};
use crate::config::{Config, NamespaceOptions};
use crate::error::{ClientError, Error, ErrorCode, Result};
use crate::events::{Change, Events, Op};
use crate::hub::{ClientHandle, Hub};
use crate::ids::random_base36;
use crate::inbox::{Delivered, Inboxes};
use crate::metrics::Metrics;
use crate::protocol::{self, ClientInfo, StreamPosition};
use crate::queue::Limits;

use crate::protocol::USER_CHANNEL_PREFIX;

mod inbound;
mod interest;
mod messaging;
mod reads;
use inbound::Inbound;

/// The `disconnect` event's code for a connection dropped without a
/// close frame (RFC 6455's "abnormal closure", never sent on the wire).
const DROPPED: u16 = 1006;

fn user_channel(user_id: &str) -> Arc<str> {
    format!("{USER_CHANNEL_PREFIX}{user_id}").into()
}

/// A channel resolved for one request: its checked name and its
/// namespace's options. Made once per request by [`Node::channel`] and
/// handed to every node operation the request needs, so the namespace is
/// looked up once, not once per step.
#[derive(Clone, Copy)]
pub struct Channel<'a> {
    /// The channel's name, as the request gave it (already validated).
    pub name: &'a str,
    /// The options of the channel's namespace.
    pub opts: &'a NamespaceOptions,
}

/// A handle to the node; clones share everything.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

struct Shared {
    /// The validated configuration, fixed for the node's life.
    config: Config,
    /// Local connections and the channel index.
    hub: Arc<Hub>,
    /// The bus between instances and the channel history.
    broker: Arc<dyn Broker>,
    /// Channel membership across instances.
    presence: Arc<dyn PresenceStore>,
    /// Counters behind `/metrics`.
    metrics: Metrics,
    /// For `uptime` in `/metrics`.
    started: Instant,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    draining: AtomicBool,
    /// Verifies tokens; `None` when auth is not configured.
    auth: Option<crate::auth::Authenticator>,
    /// The backend proxies (each off without its URL).
    proxy: crate::proxy::Proxy,
    /// Lifecycle events; `None` unless `events_url` is set.
    events: Option<Events>,
    /// The inboxes of this instance's SSE connections.
    sse: Arc<Inboxes>,
    /// Starts the random part of every client id given here
    /// ([`Broker::instance_tag`]): how other instances route to them.
    tag: String,
    /// The channels the bus is subscribed to here (see [`interest`]).
    interest: interest::Interest,
}

impl Node {
    /// Build the node for `config`, connecting the configured bus. Fails
    /// when the bus cannot be reached: there is no silent local fallback.
    pub async fn new(config: Config) -> Result<Node> {
        let (broker, presence) = crate::broker::connect(&config).await?;
        Node::with_backends(config, broker, presence).await
    }

    /// Build a node on the given backends (tests, custom buses).
    pub async fn with_backends(
        config: Config,
        broker: Arc<dyn Broker>,
        presence: Arc<dyn PresenceStore>,
    ) -> Result<Node> {
        let auth = crate::auth::Authenticator::from_config(&config.auth)?;
        let proxy = crate::proxy::Proxy::new(&config.proxy)?;
        let events = Events::start(&config).await?;
        let hub = Arc::new(Hub::new(Limits {
            max_messages: config.queue_max_messages,
            max_bytes: config.queue_max_bytes,
        }));
        let sse = Arc::new(Inboxes::default());
        broker
            .start(Arc::new(Inbound {
                hub: hub.clone(),
                channel_echo: config.channel_echo,
                config: config.clone(),
                sse: sse.clone(),
            }))
            .await?;
        let tag = broker
            .instance_tag()
            .unwrap_or_else(|| random_base36(crate::ids::TAG_LEN));
        Ok(Node {
            shared: Arc::new(Shared {
                tag,
                config,
                hub,
                broker,
                presence,
                metrics: Metrics::default(),
                started: Instant::now(),
                draining: AtomicBool::new(false),
                auth,
                proxy,
                events,
                sse,
                interest: Default::default(),
            }),
        })
    }

    /// The inboxes of this instance's SSE connections.
    pub fn sse_inboxes(&self) -> &Arc<Inboxes> {
        &self.shared.sse
    }

    /// Frames posted to `POST /sse/send` for the SSE connection whose
    /// session id is `session` (`<clientId>.<secret>`): queued here when
    /// this instance holds it, else sent over the bus to the one that
    /// does. Across the bus the holder cannot answer the POST: a full
    /// inbox there is reported on the stream (`rate_limited`).
    pub async fn sse_send(&self, session: &str, frames: Vec<Box<RawValue>>) -> Result<Delivered> {
        let Some((client_id, secret)) = crate::inbox::split_session(session) else {
            return Ok(Delivered::Unknown);
        };
        if self.shared.sse.holds(client_id) {
            let texts: Vec<protocol::Text> = frames
                .iter()
                .map(|f| String::from(f.get()).into())
                .collect();
            return Ok(self.shared.sse.deliver(client_id, secret, &texts));
        }
        let r = self
            .shared
            .broker
            .direct(Direct {
                target_id: client_id.into(),
                sender_id: None,
                data: Arc::from(RawValue::NULL.to_owned()),
                timestamp: protocol::now_ms(),
                disconnect: None,
                sse: Some(crate::broker::SseFrames {
                    secret: secret.to_owned(),
                    frames,
                }),
            })
            .await;
        Ok(match self.count_bus_error(r)? {
            true => Delivered::Queued,
            false => Delivered::Unknown,
        })
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    pub fn hub(&self) -> &Hub {
        &self.shared.hub
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// What the in-process channel history holds (memory and Pub/Sub
    /// buses); zeros for buses that keep history elsewhere.
    pub fn history_stats(&self) -> Arc<crate::broker::history::HistoryStats> {
        self.shared.broker.history_stats().unwrap_or_default()
    }

    /// What this instance received from the bus (zeros for buses that
    /// do not count it).
    pub fn bus_traffic(&self) -> crate::broker::BusTraffic {
        self.shared.broker.traffic().unwrap_or_default()
    }

    pub fn instance_id(&self) -> &str {
        &self.shared.config.instance_id
    }

    /// Seconds since the node started.
    pub fn uptime(&self) -> f64 {
        self.shared.started.elapsed().as_secs_f64()
    }

    /// Ready for traffic (`/readyz`): not draining, and, only with
    /// `ready_requires_bus`, the bus reachable. A bus outage alone leaves the
    /// instance ready: the bus is shared, so it would turn every instance
    /// unready at once and leave the load balancer with no backend; what
    /// needs the bus answers `bus_unavailable` meanwhile.
    pub fn is_ready(&self) -> bool {
        !self.shared.draining.load(Ordering::Relaxed)
            && (!self.shared.config.ready_requires_bus || self.bus_up())
    }

    /// Whether the bus is reachable now (`/healthz`, `busUp`).
    pub fn bus_up(&self) -> bool {
        self.shared.broker.is_ready()
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }

    /// Turn unready: shutdown has begun.
    pub fn start_draining(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
    }

    /// Lifecycle events, when `events_url` is set.
    pub fn events(&self) -> Option<&Events> {
        self.shared.events.as_ref()
    }

    /// Report a connection's change to the lifecycle events (if on).
    async fn lifecycle(&self, client: &ClientHandle, op: Op<'_>) {
        if let Some(events) = &self.shared.events {
            let change = Change {
                op,
                client_id: client.id(),
                user_id: client.user_id().map(|u| &**u),
            };
            events.record(change).await;
        }
    }

    /// The token verifier, when auth is configured.
    pub fn authenticator(&self) -> Option<&crate::auth::Authenticator> {
        self.shared.auth.as_ref()
    }

    /// The backend proxies.
    pub fn proxy(&self) -> &crate::proxy::Proxy {
        &self.shared.proxy
    }

    /// Call `kind`'s backend proxy (see [`crate::proxy::Proxy::call`]).
    pub async fn proxy_call<T: serde::de::DeserializeOwned>(
        &self,
        kind: crate::proxy::Kind,
        body: &crate::proxy::Request<'_>,
    ) -> std::result::Result<crate::proxy::Answer<T>, ClientError> {
        self.shared
            .proxy
            .call(&self.shared.metrics, kind, body)
            .await
    }

    /// A new client id (before registration, for the connect proxy).
    pub fn new_client_id(&self) -> Arc<str> {
        crate::ids::client_id(protocol::now_ms(), &self.shared.tag)
    }

    /// Register a new connection (of `identity`'s user, if any) and give it
    /// an id. Fails when the user is at `max_connections_per_user`, or when
    /// the bus cannot record the client (direct messages would not find it).
    /// `name` is the display name the client asked for (`?name=`); it is
    /// used only without a token: an authenticated connection is named by
    /// its token's `name` claim.
    pub async fn register(
        &self,
        identity: Option<&crate::auth::Identity>,
        name: Option<&str>,
    ) -> Result<Arc<ClientHandle>> {
        self.register_as(self.new_client_id(), identity, name).await
    }

    /// [`register`](Self::register) under an id from
    /// [`new_client_id`](Self::new_client_id).
    pub async fn register_as(
        &self,
        id: Arc<str>,
        identity: Option<&crate::auth::Identity>,
        name: Option<&str>,
    ) -> Result<Arc<ClientHandle>> {
        if let Some(identity) = identity {
            let max = self.shared.config.max_connections_per_user;
            if self.shared.hub.user_connections(&identity.user_id) >= max {
                return Err(ClientError::new(
                    ErrorCode::PermissionDenied,
                    format!("user already has {max} connections"),
                )
                .into());
            }
        }
        let info = ClientInfo {
            client_id: id,
            user_id: identity.map(|i| i.user_id.clone()),
            name: match identity {
                Some(identity) => identity.name.clone(),
                None => name.and_then(protocol::display_name),
            },
        };
        self.shared.broker.register_client(&info).await?;
        Metrics::inc(&self.shared.metrics.connections_total);
        let handle = self.shared.hub.add(info);
        self.shared
            .hub
            .set_expiry(&handle, identity.and_then(|i| i.expires_at));
        if let Some(user) = handle.user_id() {
            let channel = user_channel(user);
            self.shared.hub.subscribe(&channel, &handle);
            if let Err(e) = self.sync_interest(&channel).await {
                self.shared.hub.unsubscribe(&channel, handle.id());
                self.shared.hub.remove(handle.id());
                return Err(e);
            }
        }
        self.lifecycle(&handle, Op::Connect).await;
        Ok(handle)
    }

    /// Forget a connection: leave each of its channels, then the hub.
    pub async fn unregister(&self, client: &Arc<ClientHandle>, channels: Vec<Arc<str>>) {
        // What the `disconnect` event reports: the server's close, else
        // the client's own end.
        let (code, reason) = match client.queue.close_reason() {
            Some(r) => (r.code.unwrap_or(DROPPED), r.reason),
            None => (crate::error::close::NORMAL, "closed by the client".into()),
        };
        for channel in channels {
            if let Err(e) = self.leave(client, &channel).await {
                tracing::warn!(client = %client.id(), %channel, error = %e, "cleanup of a subscription failed");
            }
        }
        if let Some(user) = client.user_id() {
            let channel = user_channel(user);
            if self.shared.hub.unsubscribe(&channel, client.id()) {
                if let Err(e) = self.sync_interest(&channel).await {
                    tracing::warn!(client = %client.id(), error = %e, "leaving the user channel failed");
                }
            }
        }
        self.shared.hub.remove(client.id());
        self.lifecycle(
            client,
            Op::Disconnect {
                code,
                reason: &reason,
            },
        )
        .await;
        if let Err(e) = self.shared.broker.unregister_client(client.id()).await {
            tracing::warn!(client = %client.id(), error = %e, "unregistering from the bus failed");
        }
    }

    /// Resolve `channel` for a request: check its name and find its
    /// namespace's options (an error when the namespace is not configured).
    pub fn channel<'a>(&'a self, channel: &'a str) -> Result<Channel<'a>, ClientError> {
        protocol::validate_channel(channel)?;
        match self.shared.config.namespace_of(channel) {
            Some(opts) => Ok(Channel {
                name: channel,
                opts,
            }),
            None => Err(ClientError::new(
                ErrorCode::UnknownNamespace,
                format!("the namespace of {channel:?} is not configured"),
            )),
        }
    }

    fn history_options(opts: &NamespaceOptions) -> HistoryOptions {
        HistoryOptions {
            size: opts.history_size,
            ttl: opts.history_ttl,
        }
    }

    /// Count a publish the bus refused (`busPublishErrors` in `/metrics`).
    fn count_bus_error<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(Error::Bus(_)) = &r {
            Metrics::inc(&self.shared.metrics.bus_publish_errors);
        }
        r
    }

    /// Subscribe a local client: the hub index and the bus (first local
    /// subscriber). The caller then fixes the client's position (history,
    /// or the channel's top) and makes it visible with
    /// [`announce`](Node::announce).
    pub async fn subscribe(&self, client: &Arc<ClientHandle>, channel: &Arc<str>) -> Result<()> {
        // Every subscriber waits until the bus holds the channel (the first
        // one's subscribe may still be on its way, or may fail).
        self.shared.hub.subscribe(channel, client);
        if let Err(e) = self.sync_interest(channel).await {
            self.shared.hub.unsubscribe(channel, client.id());
            return Err(e);
        }
        Ok(())
    }

    /// Undo [`subscribe`](Node::subscribe) alone (a subscription that
    /// failed before it was announced).
    pub async fn withdraw(&self, client: &Arc<ClientHandle>, channel: &Arc<str>) -> Result<()> {
        if self.shared.hub.unsubscribe(channel, client.id()) {
            self.sync_interest(channel).await?;
        }
        Ok(())
    }

    /// Make a subscribed client known: the `subscribe` lifecycle event,
    /// presence and the `join` event. Called once its position is fixed,
    /// so that a publication made after a member shows in presence reaches
    /// that member. `opts` are the channel's, from [`Node::channel`].
    pub async fn announce(
        &self,
        client: &Arc<ClientHandle>,
        channel: &Arc<str>,
        opts: &NamespaceOptions,
    ) -> Result<()> {
        self.lifecycle(client, Op::Subscribe(channel)).await;
        if opts.presence {
            self.shared.presence.add(channel, &client.info()).await?;
            if opts.join_leave {
                self.shared
                    .broker
                    .publish_control(Control::Join {
                        channel: channel.clone(),
                        info: client.info(),
                    })
                    .await?;
            }
        }
        Ok(())
    }

    /// Undo [`subscribe`](Node::subscribe) and [`announce`](Node::announce),
    /// sending `leave`.
    pub async fn unsubscribe(
        &self,
        client: &Arc<ClientHandle>,
        channel: &Arc<str>,
        opts: &NamespaceOptions,
    ) -> Result<()> {
        self.withdraw(client, channel).await?;
        self.lifecycle(client, Op::Unsubscribe(channel)).await;
        if opts.presence {
            self.shared.presence.remove(channel, client.id()).await?;
            if opts.join_leave {
                self.shared
                    .broker
                    .publish_control(Control::Leave {
                        channel: channel.clone(),
                        info: client.info(),
                    })
                    .await?;
            }
        }
        Ok(())
    }

    /// [`unsubscribe`](Node::unsubscribe) from a channel the client holds,
    /// resolving it first: the cleanup paths (close, revoked grants).
    pub(crate) async fn leave(&self, client: &Arc<ClientHandle>, channel: &Arc<str>) -> Result<()> {
        let ch = self.channel(channel)?;
        self.unsubscribe(client, channel, ch.opts).await
    }

    /// Publish into a channel; returns the publication's position.
    pub async fn publish(
        &self,
        sender_id: Option<Arc<str>>,
        channel: Channel<'_>,
        data: Arc<RawValue>,
        mut conditions: PublishConditions,
    ) -> Result<StreamPosition> {
        if let Some(key) = &conditions.idempotency_key {
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
                return Err(ClientError::new(
                    ErrorCode::InvalidIdempotencyKey,
                    format!("an idempotency key is 1-{MAX_IDEMPOTENCY_KEY} bytes"),
                )
                .into());
            }
        }
        conditions.idempotency_window = channel.opts.idempotency_window;
        let r = self
            .shared
            .broker
            .publish(
                channel.name,
                NewPublication {
                    data,
                    sender_id,
                    timestamp: protocol::now_ms(),
                    conditions,
                },
                Self::history_options(channel.opts),
            )
            .await;
        let position = self.count_bus_error(r)?;
        Metrics::inc(&self.shared.metrics.publications);
        Ok(position)
    }

    /// Release the bus (and stop delivering events).
    pub async fn close(&self) -> Result<()> {
        if let Some(events) = &self.shared.events {
            events.close();
        }
        self.shared.broker.close().await
    }
}
