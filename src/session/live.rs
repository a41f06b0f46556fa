//! The connection's long-lived future, [`Live`]: waits for the next event
//! (the outbound queue, a client frame, or the shutdown) holding only the
//! [`Session`], and handles each in a boxed step.

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::{Sink, Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{Mode, Session};
use crate::error::close;
use crate::metrics::Metrics;
use crate::queue::CloseReason;
use crate::ws::{Message, SendShared};

/// Whether a read error means "message over the size limit".
fn is_too_big(err: &(dyn std::error::Error + 'static)) -> bool {
    err.downcast_ref::<crate::ws::Error>()
        .is_some_and(crate::ws::Error::is_too_big)
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
                    self.send_close(&reason).await;
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
}
