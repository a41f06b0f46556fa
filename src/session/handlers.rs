//! The client's requests: the rate limit, parsing, and one handler per
//! request type (broadcast, direct, subscribe with recovery, unsubscribe,
//! publish, presence, history, ping, token refresh, ack), with the
//! permission checks.

use std::ops::ControlFlow;
use std::sync::Arc;

use futures_util::{Sink, Stream};
use serde_json::value::RawValue;

use super::{AckState, Mode, Session, SubState};
use crate::auth::Action;
use crate::broker::PublishConditions;
use crate::error::{ClientError, ErrorCode, close};
use crate::metrics::Metrics;
use crate::node::Channel;
use crate::protocol::{self, RequestKind, StreamPosition};
use crate::queue::CloseReason;
use crate::ws::{Message, SendShared};

fn to_arc(raw: &RawValue) -> Arc<RawValue> {
    Arc::from(raw.to_owned())
}

impl<S, E> Session<S>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    /// Apply the rate limit to a data frame: `Some(flow)` when the frame
    /// is refused (an error reply naming the request, or a close on
    /// sustained abuse).
    async fn over_rate(&mut self, msg: &Message) -> Option<ControlFlow<()>> {
        let cfg = self.node.config();
        let (rate, burst) = (cfg.rate_limit, cfg.rate_burst);
        if self.mode == Mode::Echo
            || rate == 0.0
            || self.rate.take(self.node.hub().clock_ms(), rate, burst)
        {
            return None;
        }
        Metrics::inc(&self.node.metrics().rate_limited);
        if self.rate.strikes > burst {
            let reason = CloseReason::new(close::RATE_LIMITED, "rate limit exceeded");
            Box::pin(self.send_close(&reason)).await;
            return Some(ControlFlow::Break(()));
        }
        let err = ClientError::new(
            ErrorCode::RateLimited,
            format!("over {rate} messages per second; this message was dropped"),
        );
        // Read only for its `id` (a frame that gets here is one of at most
        // `rate_burst` before the close): a request waiting for its answer
        // fails at once instead of at its timeout.
        let id = match msg {
            Message::Text(text) => protocol::request_id(text),
            _ => None,
        };
        Some(self.send_error(id, &err).await)
    }

    pub(super) async fn on_message(&mut self, msg: Message) -> ControlFlow<()> {
        if matches!(msg, Message::Text(_) | Message::Binary(_)) {
            if let Some(flow) = self.over_rate(&msg).await {
                flow?;
                return self.flush().await;
            }
        }
        match msg {
            Message::Text(text) => {
                Metrics::inc(&self.node.metrics().messages_in);
                match self.mode {
                    Mode::Echo => self.send(text).await?,
                    Mode::Protocol => self.on_text(&text).await?,
                }
            }
            Message::Binary(data) => {
                Metrics::inc(&self.node.metrics().messages_in);
                match self.mode {
                    Mode::Echo => {
                        self.feed(Message::Binary(data)).await?;
                    }
                    Mode::Protocol => {
                        let err = ClientError::new(
                            ErrorCode::BinaryNotSupported,
                            "binary frames are not part of the protocol; send JSON text",
                        );
                        self.send_error(None, &err).await?;
                    }
                }
            }
            // Pings are answered by the WebSocket layer; pongs only count as
            // a sign of life (done by the caller). After a close frame the
            // next read ends the stream once the answer is sent.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) => {}
        }
        self.flush().await
    }

    async fn send_error(&mut self, id: Option<&RawValue>, err: &ClientError) -> ControlFlow<()> {
        Metrics::inc(&self.node.metrics().errors_sent);
        self.send(protocol::error(err, id)).await
    }

    async fn on_text(&mut self, text: &str) -> ControlFlow<()> {
        let request = match protocol::parse_request(text) {
            Ok(r) => r,
            Err(e) => return self.send_error(e.id, &e.error).await,
        };
        let id = request.id;
        match self.handle(id, request.kind).await {
            Ok(flow) => flow,
            Err(e) => self.send_error(id, &e.to_client()).await,
        }
    }

    /// Serve one request; an `Err` becomes an `error` frame.
    async fn handle(
        &mut self,
        id: Option<&RawValue>,
        kind: RequestKind<'_>,
    ) -> crate::Result<ControlFlow<()>> {
        let me = Some(self.client.id().clone());
        Metrics::inc(&self.node.metrics().requests_by_type[kind.index()]);
        Ok(match kind {
            RequestKind::Broadcast { data } => {
                crate::relay::check_broadcast(&self.node)?;
                self.node.broadcast(me, to_arc(data)).await?;
                match id {
                    Some(_) => self.send(protocol::ack(id, None)).await,
                    None => ControlFlow::Continue(()),
                }
            }
            RequestKind::Direct {
                target_id,
                user: true,
                data,
            } => {
                crate::relay::check_direct(&self.node, self.identity.as_deref(), Some(&target_id))?;
                self.node.direct_user(me, &target_id, to_arc(data)).await?;
                match id {
                    Some(_) => self.send(protocol::ack(id, None)).await,
                    None => ControlFlow::Continue(()),
                }
            }
            RequestKind::Direct {
                target_id, data, ..
            } => {
                crate::relay::check_direct(&self.node, self.identity.as_deref(), None)?;
                self.node.direct(me, &target_id, to_arc(data)).await?;
                match id {
                    Some(_) => self.send(protocol::ack(id, None)).await,
                    None => ControlFlow::Continue(()),
                }
            }
            RequestKind::Subscribe { channel, since } => self.subscribe(id, channel, since).await?,
            RequestKind::Unsubscribe { channel } => {
                let ch = self.node.channel(&channel)?;
                let Some((channel, _)) = self.subs.remove_entry(channel.as_str()) else {
                    return Err(ClientError::new(
                        ErrorCode::NotSubscribed,
                        format!("not subscribed to {channel:?}"),
                    )
                    .into());
                };
                self.node
                    .unsubscribe(&self.client, &channel, ch.opts)
                    .await?;
                self.send(protocol::unsubscribed(&channel, id)).await
            }
            RequestKind::Publish {
                channel,
                data,
                idempotency_key,
                expected_offset,
            } => {
                let ch = self.node.channel(&channel)?;
                let proxied = ch.opts.publish_proxy;
                if !proxied {
                    self.permit(Action::Publish, ch)?;
                }
                if !ch.opts.client_publish {
                    return Err(ClientError::new(
                        ErrorCode::PublishNotAllowed,
                        format!("clients may not publish to {channel:?}"),
                    )
                    .into());
                }
                let per_minute = self.node.config().channel_create_rate;
                let now = self.node.hub().clock_ms();
                if !self.creates.may_create(now, per_minute)
                    && !self.node.channel_exists(ch).await?
                {
                    Metrics::inc(&self.node.metrics().channel_limited);
                    return Err(ClientError::new(
                        ErrorCode::ChannelLimit,
                        format!(
                            "{channel:?} does not exist and this connection may create at most {per_minute} channels per minute"
                        ),
                    )
                    .into());
                }
                let mut data = to_arc(data);
                if proxied {
                    let asked = self.proxy_request(crate::proxy::Kind::Publish);
                    match super::proxied::publish(&self.node, asked, &channel, data, id).await? {
                        Ok(allowed) => data = allowed,
                        Err(denial) => return Ok(self.deny(denial).await),
                    }
                }
                let ch = self.node.channel(&channel)?;
                let conditions = PublishConditions {
                    idempotency_key: idempotency_key.map(Arc::from),
                    expected_offset,
                    ..Default::default()
                };
                let pos = self.node.publish(me, ch, data, conditions).await?;
                if pos.offset == 1 {
                    self.creates.created(self.node.hub().clock_ms(), per_minute);
                }
                self.send(protocol::ack(id, Some((&channel, pos.offset))))
                    .await
            }
            RequestKind::Presence { channel } => {
                let ch = self.node.channel(&channel)?;
                self.permit(Action::Subscribe, ch)?;
                let members = self.node.presence(ch).await?;
                self.send(protocol::presence(&channel, &members, id)).await
            }
            RequestKind::History {
                channel,
                since,
                limit,
                reverse,
            } => {
                let ch = self.node.channel(&channel)?;
                self.permit(Action::Subscribe, ch)?;
                let h = self
                    .node
                    .history(ch, since.as_ref(), limit, reverse)
                    .await?;
                self.send(protocol::history(&channel, &h.publications, &h.top, id))
                    .await
            }
            RequestKind::Ping => self.send(protocol::pong(id)).await,
            RequestKind::Rpc { method, data } => self.rpc(id, &method, data).await?,
            RequestKind::Auth { token } => self.refresh(id, &token).await?,
            RequestKind::Ack { channel, offset } => {
                let Some(state) = self.subs.get_mut(channel.as_str()) else {
                    self.node.channel(&channel)?;
                    return Err(ClientError::new(
                        ErrorCode::NotSubscribed,
                        format!("not subscribed to {channel:?}"),
                    )
                    .into());
                };
                if let Some(ack) = &mut state.ack {
                    ack.acked = ack.acked.max(offset.min(state.last));
                    ack.pending_since = (ack.acked < state.last).then(tokio::time::Instant::now);
                    self.arm_ack_deadline();
                }
                ControlFlow::Continue(())
            }
        })
    }

    /// A token presented during the session: extends it (same user only).
    async fn refresh(
        &mut self,
        id: Option<&RawValue>,
        token: &str,
    ) -> crate::Result<ControlFlow<()>> {
        let Some(auth) = self.node.authenticator() else {
            return Err(ClientError::new(ErrorCode::InvalidToken, "auth is not configured").into());
        };
        let fresh = auth.verify(token)?;
        match &self.identity {
            Some(current) if current.user_id == fresh.user_id => {}
            Some(_) => {
                return Err(ClientError::new(
                    ErrorCode::InvalidToken,
                    "a refreshed token must be for the same user",
                )
                .into());
            }
            None => {
                return Err(ClientError::new(
                    ErrorCode::InvalidToken,
                    "this connection is anonymous; reconnect with ?token= to authenticate",
                )
                .into());
            }
        }
        // Narrower grants take effect now: what the new token no longer
        // grants is unsubscribed (told before the `authenticated` reply).
        let reply = protocol::authenticated(&fresh.user_id, fresh.expires_at, id);
        if self.adopt(fresh).await.is_break() {
            return Ok(ControlFlow::Break(()));
        }
        Ok(self.send(reply).await)
    }

    /// Take fresh credentials of the same user (a token, or the refresh
    /// proxy's answer): their expiry, and their grants, unsubscribing
    /// (with an `unsubscribed` frame each) what they no longer grant.
    pub(super) async fn adopt(&mut self, fresh: crate::auth::Identity) -> ControlFlow<()> {
        self.node.hub().set_expiry(&self.client, fresh.expires_at);
        let revoked = crate::relay::revoked(&self.node, &fresh, self.subs.iter().map(|(c, _)| c));
        self.identity = Some(Box::new(fresh));
        for channel in &revoked {
            self.subs.remove_entry(channel);
            if let Err(e) = self.node.leave(&self.client, channel).await {
                tracing::warn!(client = %self.client.id(), %channel, error = %e, "unsubscribing a revoked channel failed");
            }
            self.send(protocol::unsubscribed(channel, None)).await?;
        }
        if !revoked.is_empty() {
            self.arm_ack_deadline();
        }
        ControlFlow::Continue(())
    }

    /// Whether this connection may do `action` in `channel`: its namespace
    /// admits anonymous connections, or the token grants it.
    fn permit(&self, action: Action, channel: Channel<'_>) -> crate::Result<()> {
        let Channel {
            name: channel,
            opts,
        } = channel;
        if opts.anonymous
            || self
                .identity
                .as_ref()
                .is_some_and(|i| i.grants(action, channel))
        {
            return Ok(());
        }
        let what = match action {
            Action::Subscribe => "subscribe to",
            Action::Publish => "publish to",
            Action::Direct => "send direct messages in",
        };
        Err(ClientError::new(
            ErrorCode::PermissionDenied,
            format!("not allowed to {what} {channel:?}"),
        )
        .into())
    }

    async fn subscribe(
        &mut self,
        id: Option<&RawValue>,
        channel: String,
        since: Option<StreamPosition>,
    ) -> crate::Result<ControlFlow<()>> {
        self.subscribe_as(id, channel, since, false).await
    }

    /// Subscribe; `by_backend`: the connect proxy chose the channel, so
    /// neither the grants nor the subscribe proxy are asked.
    pub(super) async fn subscribe_as(
        &mut self,
        id: Option<&RawValue>,
        channel: String,
        since: Option<StreamPosition>,
        by_backend: bool,
    ) -> crate::Result<ControlFlow<()>> {
        // An `Arc` from the start: the name is kept in `subs` and the hub.
        let channel: Arc<str> = channel.into();
        let ch = self.node.channel(&channel)?;
        let ask_backend = ch.opts.subscribe_proxy && !by_backend;
        if !ask_backend && !by_backend {
            self.permit(Action::Subscribe, ch)?;
        }
        if self.subs.contains_key(&channel) {
            return Err(ClientError::new(
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to {channel:?}"),
            )
            .into());
        }
        let max = self.node.config().max_subscriptions;
        if self.subs.len() >= max {
            return Err(ClientError::new(
                ErrorCode::TooManySubscriptions,
                format!("a connection may subscribe to at most {max} channels"),
            )
            .into());
        }
        if ask_backend {
            let asked = self.proxy_request(crate::proxy::Kind::Subscribe);
            if let Some(denial) = super::proxied::subscribe(&self.node, asked, &channel, id).await?
            {
                return Ok(self.deny(denial).await);
            }
        }
        let ch = self.node.channel(&channel)?;
        // Join the hub first: from here on live publications are queued,
        // and the history read below overlaps them rather than missing any.
        self.node.subscribe(&self.client, &channel).await?;
        let outcome = match &since {
            Some(since) => self.node.recover(ch, since).await,
            None if ch.opts.cache => self.node.latest(ch).await.map(|(l, top)| (l, top, false)),
            None => self
                .node
                .position(ch)
                .await
                .map(|top| (Vec::new(), top, false)),
        };
        // A last-value channel shows the newest publication when there is
        // no recovery to make (no `since` above, or one history cannot
        // serve here).
        let outcome = match outcome {
            Ok((_, _, false)) if ch.opts.cache && since.is_some() => {
                self.node.latest(ch).await.map(|(l, top)| (l, top, false))
            }
            other => other,
        };
        let (missed, top, recovered) = match outcome {
            Ok(o) => o,
            Err(e) => {
                let _ = self.node.withdraw(&self.client, &channel).await;
                return Err(e);
            }
        };
        // Shown in presence only now: whoever sees this client there and
        // then publishes is after its position, so it gets that message.
        if let Err(e) = self.node.announce(&self.client, &channel, ch.opts).await {
            let _ = self.node.unsubscribe(&self.client, &channel, ch.opts).await;
            return Err(e);
        }
        self.node.hub().note_position(&channel, &top);
        let acked = ch.opts.acked;
        self.subs.insert(
            channel.clone(),
            SubState {
                epoch: top.epoch.clone(),
                last: top.offset,
                ack: acked.then(|| AckState {
                    // Recovered publications (sent below) are not yet
                    // acknowledged; without `since` the client starts at top.
                    acked: if recovered {
                        since.as_ref().map_or(top.offset, |s| s.offset)
                    } else {
                        top.offset
                    },
                    pending_since: None,
                }),
            },
        );
        if acked && recovered && !missed.is_empty() {
            if let Some(ack) = self.subs.get_mut(&channel).and_then(|s| s.ack.as_mut()) {
                ack.pending_since = Some(tokio::time::Instant::now());
            }
            self.arm_ack_deadline();
        }
        for publication in &missed {
            let frame = protocol::message(&channel, &top.epoch, publication);
            if self.send(frame).await.is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        let recovered = since.is_some().then_some(recovered);
        Ok(self
            .send(protocol::subscribed(&channel, &top, recovered, acked, id))
            .await)
    }
}
