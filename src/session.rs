//! One WebSocket connection, from welcome to cleanup.
//!
//! A single task per connection does everything: it reads and handles
//! client frames, and when the connection's [`OutQueue`](crate::queue)
//! signals, it takes every queued frame and writes them with one flush.
//! Replies to the client's own requests are written directly, in order.
//! Every wait on the socket is bounded by `write_timeout` and gives way to
//! the queue's close requests ([`crate::bounded_write`]), so a client that
//! stops reading cannot hold its session (and its place in the hub and in
//! presence) in a write.
//!
//! The session is generic over any `Sink`/`Stream` of WebSocket messages,
//! so the protocol logic can be driven by in-memory channels in tests.
//!
//! Channel publications carry their epoch and offset; the session keeps,
//! per subscribed channel, the last offset it wrote, and drops anything at
//! or below it. That is how recovery on resubscribe never delivers a
//! publication twice: the live messages that were queued while the history
//! was being read are filtered against the recovered top.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::auth::{Action, Identity};
use crate::bounded_write::{self, Deadline, Op, Until, Wrote};
use crate::error::{ClientError, ErrorCode, close};
use crate::hub::ClientHandle;
use crate::limits::TokenBucket;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::protocol::{self, RequestKind, StreamPosition, Text};
use crate::queue::{CloseReason, Outbound};
use crate::ws::{CloseFrame, Message, SendShared};

/// What the connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The Switchboard protocol (`/`, `/ws`).
    Protocol,
    /// The diagnostic echo endpoint: every message is sent back unchanged.
    Echo,
}

/// How long the server waits for the client's answer to its close frame.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Per-channel delivery state of this connection.
struct SubState {
    /// Epoch of the last publication written.
    epoch: Arc<str>,
    /// Offset of the last publication written; anything at or below it in
    /// the same epoch is a duplicate.
    last: u64,
    /// Acknowledgement state, in namespaces with acked delivery.
    ack: Option<AckState>,
}

/// The connection's subscriptions: no allocation (one pointer in the
/// task) until the first subscribe, since the tutorial's clients never
/// subscribe and an idle connection's task size is its cost.
#[derive(Default)]
// The box is the point: 8 bytes in the task instead of the map's 48.
#[allow(clippy::box_collection)]
struct Subs(Option<Box<HashMap<Arc<str>, SubState>>>);

impl Subs {
    fn get_mut(&mut self, channel: &str) -> Option<&mut SubState> {
        self.0.as_mut()?.get_mut(channel)
    }

    fn contains_key(&self, channel: &str) -> bool {
        self.0.as_ref().is_some_and(|m| m.contains_key(channel))
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    fn insert(&mut self, channel: Arc<str>, state: SubState) {
        self.0.get_or_insert_default().insert(channel, state);
    }

    /// Remove a subscription; the map is freed with the last one.
    fn remove_entry(&mut self, channel: &str) -> Option<(Arc<str>, SubState)> {
        let map = self.0.as_mut()?;
        let entry = map.remove_entry(channel);
        if map.is_empty() {
            self.0 = None;
        }
        entry
    }

    fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &SubState)> {
        self.0.iter().flat_map(|m| m.iter())
    }

    fn values(&self) -> impl Iterator<Item = &SubState> {
        self.iter().map(|(_, s)| s)
    }

    fn into_keys(self) -> impl Iterator<Item = Arc<str>> {
        self.0.into_iter().flat_map(|m| m.into_keys())
    }
}

/// What the client has acknowledged in one acked channel.
struct AckState {
    /// Every publication up to this offset (in `SubState::epoch`) is
    /// acknowledged.
    acked: u64,
    /// Since when something written is waiting for an acknowledgement.
    pending_since: Option<tokio::time::Instant>,
}

/// One registered connection: everything its task keeps between frames.
pub struct Session<S> {
    /// The verified token's user and grants; `None` for anonymous.
    identity: Option<Box<Identity>>,
    node: Node,
    /// Per-connection message rate limit.
    rate: TokenBucket,
    ws: S,
    client: Arc<ClientHandle>,
    mode: Mode,
    /// Subscribed channels.
    subs: Subs,
    /// Channels this connection may still create (`channel_create_rate`).
    creates: crate::create_limit::CreateLimit,
}

/// Whether a read error means "message over the size limit".
fn is_too_big(err: &(dyn std::error::Error + 'static)) -> bool {
    err.downcast_ref::<crate::ws::Error>()
        .is_some_and(crate::ws::Error::is_too_big)
}

fn to_arc(raw: &RawValue) -> Arc<RawValue> {
    Arc::from(raw.to_owned())
}

/// Send a close frame on a connection that never became a session.
async fn refuse<S>(ws: &mut S, code: u16, reason: &str)
where
    S: Sink<Message> + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: reason.chars().take(100).collect::<String>().into(),
    };
    let _ = tokio::time::timeout(
        CLOSE_HANDSHAKE_TIMEOUT,
        ws.send(Message::Close(Some(frame))),
    )
    .await;
}

/// Who the connection is, before it is registered: the URL token, or,
/// when auth is required, a first `auth` frame within `auth_timeout`.
/// `Err` is the close code and reason to refuse the connection with.
async fn authenticate<S, E>(
    node: &Node,
    ws: &mut S,
    url_token: Option<String>,
) -> Result<Option<(Identity, Option<Text>)>, (u16, String)>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin,
    E: std::error::Error + 'static,
{
    let refused = |e: ClientError| {
        let code = match e.code {
            ErrorCode::TokenExpired => close::TOKEN_EXPIRED,
            _ => close::UNAUTHORIZED,
        };
        (code, format!("{}: {}", e.code, e.message))
    };
    let Some(auth) = node.authenticator() else {
        return Ok(None);
    };
    if let Some(token) = url_token {
        return auth
            .verify(&token)
            .map(|i| Some((i, None)))
            .map_err(refused);
    }
    if !node.config().auth_required {
        return Ok(None);
    }
    let first = tokio::time::timeout(node.config().auth_timeout, ws.next()).await;
    let Ok(Some(Ok(Message::Text(text)))) = first else {
        return Err((close::UNAUTHORIZED, "authentication required".into()));
    };
    match protocol::parse_request(&text) {
        Ok(protocol::Request {
            id,
            kind: RequestKind::Auth { token },
        }) => {
            let identity = auth.verify(&token).map_err(refused)?;
            let reply = protocol::authenticated(&identity.user_id, identity.expires_at, id);
            Ok(Some((identity, Some(reply))))
        }
        _ => Err((
            close::UNAUTHORIZED,
            "authentication required: send {\"type\":\"auth\",\"token\":…} first".into(),
        )),
    }
}

/// Serve one upgraded connection until it ends, then clean up.
/// `url_token` is the `?token=` of the upgrade request, if any.
pub async fn serve<S, E>(
    node: Node,
    ws: S,
    mode: Mode,
    shutdown: CancellationToken,
    url_token: Option<String>,
) where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    if let Some(session) = open(node, ws, mode, url_token).await {
        session.live(shutdown).await;
    }
}

/// Authenticate, register and greet a new connection; `None` when it was
/// refused (and told why) or is already gone.
///
/// Set-up is split from [`Session::live`] because a connection's task
/// holds its future for as long as the connection lives, so that future's
/// size is idle memory per connection: the server runs `open` boxed and
/// then only `live`, whose state is little more than the [`Session`]
/// (see `ws::WebSocketUpgrade::on_upgrade`).
pub async fn open<S, E>(
    node: Node,
    mut ws: S,
    mode: Mode,
    url_token: Option<String>,
) -> Option<Session<S>>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    let mut identity = None;
    let mut auth_reply = None;
    let client = match mode {
        Mode::Protocol => {
            match authenticate(&node, &mut ws, url_token).await {
                Ok(Some((id, reply))) => {
                    identity = Some(Box::new(id));
                    auth_reply = reply;
                }
                Ok(None) => {}
                Err((code, reason)) => {
                    Metrics::inc(&node.metrics().auth_failures);
                    tracing::info!(code, %reason, "connection refused");
                    refuse(&mut ws, code, &reason).await;
                    return None;
                }
            }
            match node.connect(identity.as_deref()).await {
                Ok(c) => c,
                Err(crate::error::Error::Client(e)) => {
                    refuse(&mut ws, close::TOO_MANY_USER_CONNECTIONS, &e.message).await;
                    return None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register a new connection");
                    refuse(&mut ws, close::INTERNAL, "bus unavailable").await;
                    return None;
                }
            }
        }
        Mode::Echo => node.hub().detached(),
    };
    let mut session = Session {
        identity,
        rate: TokenBucket::new(node.config().rate_burst, node.hub().clock_ms()),
        node,
        ws,
        client,
        mode,
        subs: Subs::default(),
        creates: crate::create_limit::CreateLimit::default(),
    };
    tracing::debug!(client = %session.client.id(), ?mode, "connected");
    if mode == Mode::Protocol && session.greet(auth_reply).await.is_break() {
        session.finish().await;
        return None;
    }
    Some(session)
}

/// What woke the connection's task.
enum Event<M> {
    /// The outbound queue has something (or a close).
    Queue,
    /// A frame from the client, or the end of the stream.
    Frame(Option<M>),
    /// The server is shutting down (echo endpoint only).
    Shutdown,
}

type ShutdownWatch = Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>;

/// A connection's long-lived future ([`Session::live`]), written by hand
/// because its size is what an idle connection's task costs: while
/// waiting it holds the [`Session`] and nothing else; each event is then
/// handled by a boxed future that owns the session until it is done, so
/// no handler's state is ever part of the idle task. (The same loop as an
/// `async fn` kept every handler's largest state in the task: 680 bytes
/// against about 260.)
pub struct Live<S> {
    state: LiveState<S>,
}

/// The boxed handling of one event: gives the session back, or `None`
/// when the connection has ended.
type Step<S> = Pin<Box<dyn Future<Output = Option<(Session<S>, Option<ShutdownWatch>)>> + Send>>;

enum LiveState<S> {
    /// Waiting for the next event.
    Idle(Session<S>, Option<ShutdownWatch>),
    /// Handling one.
    Busy(Step<S>),
    /// Ended.
    Done,
}

impl<S, E> Future for Live<S>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                LiveState::Idle(session, shutdown) => {
                    let event = ready!(session.poll_event(shutdown, cx));
                    let LiveState::Idle(session, shutdown) =
                        std::mem::replace(&mut this.state, LiveState::Done)
                    else {
                        unreachable!("matched above")
                    };
                    this.state = LiveState::Busy(Box::pin(session.step(event, shutdown)));
                }
                LiveState::Busy(step) => match ready!(step.as_mut().poll(cx)) {
                    Some((session, shutdown)) => this.state = LiveState::Idle(session, shutdown),
                    None => {
                        this.state = LiveState::Done;
                        return Poll::Ready(());
                    }
                },
                LiveState::Done => return Poll::Ready(()),
            }
        }
    }
}

impl<S, E> Session<S>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    /// Unregister the connection once it has ended.
    async fn finish(self) {
        let channels: Vec<Arc<str>> = self.subs.into_keys().collect();
        if self.mode == Mode::Protocol {
            self.node.disconnect(&self.client, channels).await;
        }
        tracing::debug!(client = %self.client.id(), "disconnected");
    }

    /// Serve the registered connection until it ends, then unregister it.
    pub fn live(self, shutdown: CancellationToken) -> Live<S> {
        // Protocol clients are closed by the server's drainer, spread over
        // the drain period (`server::drain_clients`); the echo endpoint's
        // are not in the hub, so they watch the shutdown themselves.
        let shutdown = (self.mode == Mode::Echo).then(|| Box::pin(shutdown.cancelled_owned()));
        Live {
            state: LiveState::Idle(self, shutdown),
        }
    }

    /// The welcome (and the `authenticated` reply to a first-frame auth).
    async fn greet(&mut self, auth_reply: Option<Text>) -> ControlFlow<()> {
        let welcome = protocol::connected(self.client.id(), self.node.instance_id());
        self.send(welcome).await?;
        if let Some(reply) = auth_reply {
            self.send(reply).await?;
        }
        self.flush().await
    }

    /// Wait for the next event: the outbound queue, a frame, or (echo
    /// endpoint) the shutdown.
    fn poll_event(
        &mut self,
        shutdown: &mut Option<ShutdownWatch>,
        cx: &mut Context<'_>,
    ) -> Poll<Event<Result<Message, E>>> {
        if let Some(s) = shutdown.as_mut() {
            if s.as_mut().poll(cx).is_ready() {
                *shutdown = None;
                return Poll::Ready(Event::Shutdown);
            }
        }
        if self.client.queue.poll_notified(cx).is_ready() {
            return Poll::Ready(Event::Queue);
        }
        self.ws.poll_next_unpin(cx).map(Event::Frame)
    }

    /// Handle one event, owning the session meanwhile; `None` once the
    /// connection has ended and been cleaned up.
    async fn step(
        mut self,
        event: Event<Result<Message, E>>,
        shutdown: Option<ShutdownWatch>,
    ) -> Option<(Self, Option<ShutdownWatch>)> {
        if self.on_event(event).await.is_break() {
            self.finish().await;
            return None;
        }
        Some((self, shutdown))
    }

    async fn on_event(&mut self, event: Event<Result<Message, E>>) -> ControlFlow<()> {
        match event {
            Event::Queue => self.write_queued().await,
            Event::Shutdown => {
                self.client
                    .queue
                    .close(CloseReason::new(close::GOING_AWAY, "server shutting down"));
                ControlFlow::Continue(())
            }
            Event::Frame(None) => ControlFlow::Break(()),
            Event::Frame(Some(Err(e))) => {
                if is_too_big(&e) {
                    Metrics::inc(&self.node.metrics().oversize_closes);
                    let limit = match self.mode {
                        Mode::Protocol => self.node.config().max_message_size,
                        Mode::Echo => self.node.config().echo_max_message_size,
                    };
                    let reason = CloseReason::new(
                        close::TOO_BIG,
                        format!("message larger than {limit} bytes"),
                    );
                    self.close(&reason).await;
                } else {
                    tracing::debug!(client = %self.client.id(), error = %e, "read error");
                }
                ControlFlow::Break(())
            }
            Event::Frame(Some(Ok(m))) => {
                self.node.hub().touch(&self.client);
                Box::pin(self.on_message(m)).await
            }
        }
    }

    /// Write everything queued, with one flush; close if asked to. The
    /// batch may wait on the socket for `write_timeout` in all, or
    /// [`CLOSE_GRACE`](crate::bounded_write::CLOSE_GRACE) once a close is
    /// requested; an abort drops the connection at once.
    async fn write_queued(&mut self) -> ControlFlow<()> {
        let (items, close) = self.client.queue.take();
        if let Some(reason) = close.as_ref().filter(|r| r.code.is_none()) {
            // A dead peer: nothing more is written.
            self.close(reason).await;
            return ControlFlow::Break(());
        }
        let mut deadline = Deadline::new(self.node.config().write_timeout);
        let mut redeliver_due = false;
        let mut redeliver_check = false;
        for item in items {
            let msg = match item {
                Outbound::Frame(text) => Message::Text(text),
                Outbound::Publication(d) => {
                    let Some(state) = self.subs.get_mut(&d.channel) else {
                        continue; // unsubscribed meanwhile
                    };
                    if state.epoch == d.epoch && d.offset <= state.last {
                        continue; // already delivered (recovery overlap)
                    }
                    if state.epoch != d.epoch {
                        if let Some(ack) = &mut state.ack {
                            ack.acked = 0; // a new stream: nothing of it is acknowledged
                        }
                        state.epoch = d.epoch.clone();
                    }
                    state.last = d.offset;
                    if let Some(ack) = &mut state.ack {
                        ack.pending_since
                            .get_or_insert_with(tokio::time::Instant::now);
                        redeliver_check = true;
                    }
                    Metrics::inc(&self.node.metrics().publications_out);
                    let latency = protocol::now_ms().saturating_sub(d.timestamp);
                    self.node.metrics().latency.observe(latency);
                    // Shared: compressed at most once for all recipients.
                    self.wait(Op::Ready, &mut deadline, Until::Abort).await?;
                    if self.ws.start_send_shared(&d.frame, &d.deflated).is_err() {
                        return ControlFlow::Break(());
                    }
                    Metrics::inc(&self.node.metrics().messages_out);
                    continue;
                }
                Outbound::Ping => Message::Ping(Default::default()),
                Outbound::Redeliver => {
                    redeliver_due = true;
                    continue;
                }
            };
            self.wait(Op::Ready, &mut deadline, Until::Abort).await?;
            if Pin::new(&mut self.ws).start_send(msg).is_err() {
                return ControlFlow::Break(());
            }
            Metrics::inc(&self.node.metrics().messages_out);
        }
        self.wait(Op::Flush, &mut deadline, Until::Abort).await?;
        if redeliver_due && close.is_none() {
            Box::pin(self.redeliver()).await?;
        }
        if redeliver_check || redeliver_due {
            self.arm_ack_deadline();
        }
        match close {
            Some(reason) => {
                self.close(&reason).await;
                ControlFlow::Break(())
            }
            None => ControlFlow::Continue(()),
        }
    }

    /// Wait on the socket for `op`, bounded (see [`crate::bounded_write`]);
    /// `Break` when the connection is to end: the write timed out, the
    /// socket failed, or a close request came meanwhile (then acted on:
    /// what is queued and the close frame, within the close grace).
    async fn wait(&mut self, op: Op, deadline: &mut Deadline, until: Until) -> ControlFlow<()> {
        let wrote =
            bounded_write::wait(&mut self.ws, op, &self.client.queue, deadline, until).await;
        match wrote {
            Wrote::Done => return ControlFlow::Continue(()),
            Wrote::Failed => {}
            Wrote::TimedOut => bounded_write::log_timeout(self.client.id()),
            Wrote::Closing => {
                let _ = Box::pin(self.write_queued()).await;
            }
        }
        ControlFlow::Break(())
    }

    /// Send a close frame (unless the reason says to just drop the
    /// connection) and wait briefly for the client's answer.
    async fn close(&mut self, reason: &CloseReason) {
        let Some(code) = reason.code else {
            tracing::debug!(client = %self.client.id(), reason = %reason.reason, "dropping connection");
            return;
        };
        let frame = CloseFrame {
            code,
            reason: reason.reason.as_ref().into(),
        };
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, async {
            if self.ws.send(Message::Close(Some(frame))).await.is_err() {
                return;
            }
            // Read until the peer answers the close (or goes away).
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    /// Write a reply frame (buffered until [`flush`](Self::flush)).
    async fn send(&mut self, frame: Text) -> ControlFlow<()> {
        self.feed(Message::Text(frame)).await?;
        Metrics::inc(&self.node.metrics().messages_out);
        ControlFlow::Continue(())
    }

    /// Hand a frame to the socket layer, which writes out its buffer first
    /// when that holds 64 KiB: bounded by `write_timeout`, and a close
    /// request ends it.
    async fn feed(&mut self, msg: Message) -> ControlFlow<()> {
        let mut deadline = Deadline::new(self.node.config().write_timeout);
        self.wait(Op::Ready, &mut deadline, Until::Close).await?;
        match Pin::new(&mut self.ws).start_send(msg) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }

    /// Write out the replies, bounded like [`feed`](Self::feed).
    async fn flush(&mut self) -> ControlFlow<()> {
        let mut deadline = Deadline::new(self.node.config().write_timeout);
        self.wait(Op::Flush, &mut deadline, Until::Close).await
    }

    /// Apply the rate limit to a data frame: `Some(flow)` when the frame
    /// is refused (an error reply, or a close on sustained abuse).
    async fn over_rate(&mut self) -> Option<ControlFlow<()>> {
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
            Box::pin(self.close(&reason)).await;
            return Some(ControlFlow::Break(()));
        }
        let err = ClientError::new(
            ErrorCode::RateLimited,
            format!("over {rate} messages per second; this message was dropped"),
        );
        Some(self.send_error(None, &err).await)
    }

    async fn on_message(&mut self, msg: Message) -> ControlFlow<()> {
        if matches!(msg, Message::Text(_) | Message::Binary(_)) {
            if let Some(flow) = self.over_rate().await {
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
                let Some((channel, _)) = self.subs.remove_entry(channel.as_str()) else {
                    self.node.channel_options(&channel)?;
                    return Err(ClientError::new(
                        ErrorCode::NotSubscribed,
                        format!("not subscribed to {channel:?}"),
                    )
                    .into());
                };
                self.node.unsubscribe(&self.client, &channel).await?;
                self.send(protocol::unsubscribed(&channel, id)).await
            }
            RequestKind::Publish { channel, data } => {
                self.permit(Action::Publish, &channel)?;
                if !self.node.channel_options(&channel)?.client_publish {
                    return Err(ClientError::new(
                        ErrorCode::PublishNotAllowed,
                        format!("clients may not publish to {channel:?}"),
                    )
                    .into());
                }
                let per_minute = self.node.config().channel_create_rate;
                let now = self.node.hub().clock_ms();
                if !self.creates.may_create(now, per_minute)
                    && !self.node.channel_exists(&channel).await?
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
                let pos = self.node.publish(me, &channel, to_arc(data)).await?;
                if pos.offset == 1 {
                    self.creates.created(self.node.hub().clock_ms(), per_minute);
                }
                self.send(protocol::ack(id, Some((&channel, pos.offset))))
                    .await
            }
            RequestKind::Presence { channel } => {
                self.permit(Action::Subscribe, &channel)?;
                let members = self.node.presence(&channel).await?;
                self.send(protocol::presence(&channel, &members, id)).await
            }
            RequestKind::History {
                channel,
                since,
                limit,
            } => {
                self.permit(Action::Subscribe, &channel)?;
                let h = self.node.history(&channel, since.as_ref(), limit).await?;
                self.send(protocol::history(&channel, &h.publications, &h.top, id))
                    .await
            }
            RequestKind::Ping => self.send(protocol::pong(id)).await,
            RequestKind::Auth { token } => self.refresh(id, &token).await?,
            RequestKind::Ack { channel, offset } => {
                let Some(state) = self.subs.get_mut(channel.as_str()) else {
                    self.node.channel_options(&channel)?;
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
        self.node.hub().set_expiry(&self.client, fresh.expires_at);
        // Narrower grants take effect now: what the new token no longer
        // grants is unsubscribed (told before the `authenticated` reply).
        let revoked = crate::relay::revoked(&self.node, &fresh, self.subs.iter().map(|(c, _)| c));
        let reply = protocol::authenticated(&fresh.user_id, fresh.expires_at, id);
        self.identity = Some(Box::new(fresh));
        for channel in &revoked {
            self.subs.remove_entry(channel);
            if let Err(e) = self.node.unsubscribe(&self.client, channel).await {
                tracing::warn!(client = %self.client.id(), %channel, error = %e, "unsubscribing a revoked channel failed");
            }
            if self
                .send(protocol::unsubscribed(channel, None))
                .await
                .is_break()
            {
                return Ok(ControlFlow::Break(()));
            }
        }
        if !revoked.is_empty() {
            self.arm_ack_deadline();
        }
        Ok(self.send(reply).await)
    }

    /// Tell the sweeper when the oldest pending acknowledgement is due.
    fn arm_ack_deadline(&self) {
        let timeout = self.node.config().ack_timeout;
        let oldest = self
            .subs
            .values()
            .filter_map(|s| s.ack.as_ref().and_then(|a| a.pending_since))
            .min();
        let hub = self.node.hub();
        let due = oldest.map(|since| {
            let wait = (since + timeout).saturating_duration_since(tokio::time::Instant::now());
            hub.clock_ms() + wait.as_millis() as u64
        });
        hub.set_ack_deadline(&self.client, due);
    }

    /// Resend, from history, every written but unacknowledged publication
    /// whose acknowledgement is overdue. When history no longer holds them
    /// the client is asked to reconnect (1012) and recover: it learns of
    /// the gap from `recovered:false` instead of never hearing of it.
    async fn redeliver(&mut self) -> ControlFlow<()> {
        let timeout = self.node.config().ack_timeout;
        let now = tokio::time::Instant::now();
        let due: Vec<(Arc<str>, StreamPosition, u64)> = self
            .subs
            .iter()
            .filter_map(|(ch, s)| {
                let ack = s.ack.as_ref()?;
                let since = ack.pending_since?;
                (now.duration_since(since) >= timeout && ack.acked < s.last).then(|| {
                    let from = StreamPosition {
                        epoch: s.epoch.clone(),
                        offset: ack.acked,
                    };
                    (ch.clone(), from, s.last)
                })
            })
            .collect();
        for (channel, from, last) in due {
            let missing = last - from.offset;
            let history = self
                .node
                .history(&channel, Some(&from), Some(missing as usize))
                .await;
            let complete = history.as_ref().is_ok_and(|h| {
                h.top.epoch == from.epoch
                    && h.publications.first().map(|p| p.offset) == Some(from.offset + 1)
                    && h.publications.len() as u64 >= missing
            });
            let history = match history {
                Ok(h) if complete => h,
                _ => {
                    let reason = CloseReason::new(
                        close::SERVICE_RESTART,
                        "resubscribe: unacknowledged publications left the history",
                    );
                    Box::pin(self.close(&reason)).await;
                    return ControlFlow::Break(());
                }
            };
            for publication in history.publications.iter().filter(|p| p.offset <= last) {
                Metrics::inc(&self.node.metrics().redeliveries);
                self.send(protocol::message(&channel, &from.epoch, publication))
                    .await?;
            }
            if let Some(ack) = self.subs.get_mut(&channel).and_then(|s| s.ack.as_mut()) {
                ack.pending_since = Some(now);
            }
        }
        self.flush().await
    }

    /// Whether this connection may do `action` in `channel`: its namespace
    /// admits anonymous connections, or the token grants it.
    fn permit(&self, action: Action, channel: &str) -> crate::Result<()> {
        let opts = self.node.channel_options(channel)?;
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
        self.permit(Action::Subscribe, &channel)?;
        if self.subs.contains_key(channel.as_str()) {
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
        let channel: Arc<str> = channel.into();
        // Join the hub first: from here on live publications are queued,
        // and the history read below overlaps them rather than missing any.
        if let Err(e) = self.node.subscribe(&self.client, &channel).await {
            let _ = self.node.unsubscribe(&self.client, &channel).await;
            return Err(e);
        }
        let outcome = match &since {
            Some(since) => self.node.recover(&channel, since).await,
            None => self
                .node
                .position(&channel)
                .await
                .map(|top| (Vec::new(), top, false)),
        };
        let (missed, top, recovered) = match outcome {
            Ok(o) => o,
            Err(e) => {
                let _ = self.node.unsubscribe(&self.client, &channel).await;
                return Err(e);
            }
        };
        let acked = self.node.channel_options(&channel)?.acked;
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

#[cfg(test)]
mod tests {
    //! The protocol logic driven through in-memory channels instead of a
    //! socket (axum's testing-websockets pattern).

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures_channel::mpsc;
    use serde_json::{Value, json};

    use super::*;
    use crate::config::Config;

    /// A fake socket: frames in through one channel, out through another.
    struct ChannelSocket {
        incoming: mpsc::UnboundedReceiver<Result<Message, std::io::Error>>,
        outgoing: mpsc::UnboundedSender<Message>,
    }

    impl Stream for ChannelSocket {
        type Item = Result<Message, std::io::Error>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            Pin::new(&mut self.incoming).poll_next(cx)
        }
    }

    impl Sink<Message> for ChannelSocket {
        type Error = mpsc::SendError;
        fn poll_ready(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.outgoing).poll_ready(cx)
        }
        fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            Pin::new(&mut self.outgoing).start_send(item)
        }
        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.outgoing).poll_flush(cx)
        }
        fn poll_close(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.outgoing).poll_close(cx)
        }
    }

    impl SendShared for ChannelSocket {}

    async fn next_json(rx: &mut mpsc::UnboundedReceiver<Message>) -> Value {
        match rx.next().await {
            Some(Message::Text(t)) => serde_json::from_str(&t).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn protocol_over_channels() {
        let node = Node::new(Config::default()).await.unwrap();
        let (to_server, incoming) = mpsc::unbounded();
        let (outgoing, mut from_server) = mpsc::unbounded();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            node.clone(),
            ChannelSocket { incoming, outgoing },
            Mode::Protocol,
            shutdown.clone(),
            None,
        ));
        let welcome = next_json(&mut from_server).await;
        assert_eq!(welcome["type"], "connected");
        assert_eq!(node.hub().len(), 1);

        let send = |v: Value| {
            to_server
                .unbounded_send(Ok(Message::Text(v.to_string().into())))
                .unwrap()
        };
        send(json!({"type":"subscribe","channel":"c","id":1}));
        let r = next_json(&mut from_server).await;
        assert_eq!(r["type"], "subscribed");
        send(json!({"type":"publish","channel":"c","data":[1],"id":2}));
        // The ack is written directly, the message comes through the queue.
        let mut got: Vec<Value> = vec![
            next_json(&mut from_server).await,
            next_json(&mut from_server).await,
        ];
        got.sort_by_key(|v| v["type"].as_str().unwrap().to_string());
        assert_eq!(got[0]["type"], "ack");
        assert_eq!(got[1]["type"], "message");
        assert_eq!(got[1]["data"], json!([1]));
        send(json!({"type":"nope","id":3}));
        let e = next_json(&mut from_server).await;
        assert_eq!(
            (e["code"].as_str(), e["ref"].as_u64()),
            (Some("unknown_type"), Some(3))
        );

        // Shutdown: the drainer's 1012 close frame, then the session
        // cleans up.
        shutdown.cancel();
        crate::server::drain_clients(node.clone()).await;
        match from_server.next().await {
            Some(Message::Close(Some(f))) => assert_eq!(f.code, close::SERVICE_RESTART),
            other => panic!("expected a close frame, got {other:?}"),
        }
        drop(to_server);
        task.await.unwrap();
        assert_eq!(node.hub().len(), 0);
        assert_eq!(node.hub().subscriber_count("c"), 0);
    }
}
#[cfg(test)]
mod size_budget {
    //! An idle connection costs, above all, its task: Tokio allocates the
    //! future inside a cell of header (32 bytes), scheduler and id (16),
    //! stage tag (8) and trailer (48), rounded up to 128 bytes on x86-64
    //! and aarch64. A connection future of at most 152 bytes makes that a
    //! 256-byte cell; 160 bytes would make it 384 (BENCHMARKS.md, idle).
    //! These are layout budgets, checked deterministically, not timings.
    use std::mem::size_of;

    use super::Live;
    use crate::hub::ClientHandle;
    use crate::ws::WebSocket;

    #[test]
    fn the_idle_connection_task_fits_a_256_byte_cell() {
        // What server::upgrade spawns: the session, tracked for shutdown
        // (the set-up future and the tracker token fit in its niches).
        type Task = tokio_util::task::task_tracker::TrackedFuture<Live<WebSocket>>;
        assert!(
            size_of::<Task>() <= 152,
            "connection task future is {} bytes",
            size_of::<Task>()
        );
    }

    #[test]
    fn the_client_handle_fits_a_160_byte_allocation() {
        // Arc's two counters + the handle: mimalloc's 160-byte size class.
        assert!(
            size_of::<ClientHandle>() + 16 <= 160,
            "ClientHandle is {} bytes",
            size_of::<ClientHandle>()
        );
    }
}
