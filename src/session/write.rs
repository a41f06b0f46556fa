//! Writing to the socket: the queued frames with one flush, replies, the
//! close frame; every wait bounded by `write_timeout` and giving way to
//! the queue's close requests.

use std::ops::ControlFlow;
use std::pin::Pin;

use futures_util::{Sink, SinkExt, Stream, StreamExt};

use super::{CLOSE_HANDSHAKE_TIMEOUT, Session};
use crate::bounded_write::{self, Deadline, Op, Until, Wrote};
use crate::metrics::Metrics;
use crate::protocol::Text;
use crate::queue::{CloseReason, Outbound};
use crate::ws::{CloseFrame, Message, SendShared};

impl<S, E> Session<S>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    /// Write everything queued, with one flush; close if asked to. The
    /// batch may wait on the socket for `write_timeout` in all, or
    /// [`CLOSE_GRACE`](crate::bounded_write::CLOSE_GRACE) once a close is
    /// requested; an abort drops the connection at once.
    pub(super) async fn write_queued(&mut self) -> ControlFlow<()> {
        let (items, close) = self.client.queue.take();
        if let Some(reason) = close.as_ref().filter(|r| r.code.is_none()) {
            // A dead peer: nothing more is written.
            self.send_close(reason).await;
            return ControlFlow::Break(());
        }
        let mut deadline = Deadline::new(self.node.config().write_timeout);
        let mut redeliver_due = false;
        let mut redeliver_check = false;
        let mut refresh_due = false;
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
                    let latency = d.fanned_out.elapsed().as_micros();
                    (self.node.metrics().latency)
                        .observe_us(latency.try_into().unwrap_or(u64::MAX));
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
                Outbound::Refresh => {
                    refresh_due = true;
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
        if refresh_due && close.is_none() {
            Box::pin(self.refresh_by_proxy()).await?;
        }
        match close {
            Some(reason) => {
                self.send_close(&reason).await;
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
    pub(super) async fn send_close(&mut self, reason: &CloseReason) {
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
    pub(super) async fn send(&mut self, frame: Text) -> ControlFlow<()> {
        self.feed(Message::Text(frame)).await?;
        Metrics::inc(&self.node.metrics().messages_out);
        ControlFlow::Continue(())
    }

    /// Hand a frame to the socket layer, which writes out its buffer first
    /// when that holds 64 KiB: bounded by `write_timeout`, and a close
    /// request ends it.
    pub(super) async fn feed(&mut self, msg: Message) -> ControlFlow<()> {
        let mut deadline = Deadline::new(self.node.config().write_timeout);
        self.wait(Op::Ready, &mut deadline, Until::Close).await?;
        match Pin::new(&mut self.ws).start_send(msg) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }

    /// Write out the replies, bounded like [`feed`](Self::feed).
    pub(super) async fn flush(&mut self) -> ControlFlow<()> {
        let mut deadline = Deadline::new(self.node.config().write_timeout);
        self.wait(Op::Flush, &mut deadline, Until::Close).await
    }
}
