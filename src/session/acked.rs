//! Acknowledged delivery: what the client has acknowledged per channel,
//! the deadline the keep-alive sweeper watches, and redelivery from
//! history when an acknowledgement is overdue.

use std::ops::ControlFlow;
use std::sync::Arc;

use futures_util::{Sink, Stream};

use super::Session;
use crate::error::close;
use crate::metrics::Metrics;
use crate::protocol::{self, StreamPosition};
use crate::queue::CloseReason;
use crate::ws::{Message, SendShared};

/// What the client has acknowledged in one acked channel.
pub(super) struct AckState {
    /// Every publication up to this offset (in `SubState::epoch`) is
    /// acknowledged.
    pub(super) acked: u64,
    /// Since when something written is waiting for an acknowledgement.
    pub(super) pending_since: Option<tokio::time::Instant>,
}

impl<S, E> Session<S>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    /// Tell the sweeper when the oldest pending acknowledgement is due.
    pub(super) fn arm_ack_deadline(&self) {
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
    pub(super) async fn redeliver(&mut self) -> ControlFlow<()> {
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
            let history = match self.node.channel(&channel) {
                Ok(ch) => {
                    self.node
                        .history(ch, Some(&from), Some(missing as usize), false)
                        .await
                }
                Err(e) => Err(e.into()),
            };
            let complete = history.as_ref().is_ok_and(|h| h.covers(&from, Some(last)));
            let history = match history {
                Ok(h) if complete => h,
                _ => {
                    let reason = CloseReason::new(
                        close::SERVICE_RESTART,
                        "resubscribe: unacknowledged publications left the history",
                    );
                    Box::pin(self.send_close(&reason)).await;
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
}
