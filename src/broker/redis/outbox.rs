//! The broadcast outbox: broadcasts are queued here in the order they are
//! accepted and written by one task in pipelined batches (every broadcast
//! queued while the previous batch was on the wire goes in the next one:
//! one round trip for many, in order). A publisher therefore does not wait
//! a Redis round trip per broadcast, and the subscribers' instances receive
//! them in bursts, which the sessions write in coalesced frames like the
//! local path does. Same contract as a NATS core publish: accepted once
//! queued; refused at once (`bus_unavailable`) while Redis is known to be
//! down; a batch whose write fails is logged with its size (the connection
//! is then breaking and the supervisor reconnects).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Inner, bus_error};
use crate::error::Result;

/// Broadcasts that may wait for the wire; a publisher beyond it waits for
/// room (back-pressure, never a drop).
pub(super) const OUTBOX_CAPACITY: usize = 4096;
/// Most broadcasts in one pipeline.
const BATCH_MAX: usize = 256;

/// The queue's two ends: the sender in [`Inner`], the receiver taken by the
/// writer task at start.
pub(super) fn channel() -> (mpsc::Sender<String>, mpsc::Receiver<String>) {
    mpsc::channel(OUTBOX_CAPACITY)
}

impl Inner {
    /// Queue one broadcast payload (`b <json>`) for the broadcast topic.
    pub(super) async fn queue_broadcast(&self, payload: String) -> Result<()> {
        self.conn()?; // down: refused now, not lost later
        self.outbox
            .send(payload)
            .await
            .map_err(|_| bus_error("the redis bus is closed"))
    }

    /// The writer task: take everything queued (up to [`BATCH_MAX`]) and
    /// write it as one pipeline; at shutdown, write what is still queued,
    /// then end.
    pub(super) async fn write_broadcasts(self: Arc<Self>, mut rx: mpsc::Receiver<String>) {
        let mut batch = Vec::with_capacity(BATCH_MAX);
        loop {
            // What is queued goes out first; at shutdown, the rest of the
            // queue is written before the task ends.
            let n = tokio::select! {
                biased;
                n = rx.recv_many(&mut batch, BATCH_MAX) => n,
                _ = self.shutdown.cancelled() => {
                    rx.close();
                    rx.recv_many(&mut batch, BATCH_MAX).await
                }
            };
            if n == 0 {
                return;
            }
            let mut pipe = redis::pipe();
            for payload in batch.drain(..) {
                pipe.cmd(self.keys.publish_cmd())
                    .arg(&self.keys.all)
                    .arg(payload)
                    .ignore();
            }
            let written = match self.conn() {
                Ok(mut conn) => pipe.exec_async(&mut conn).await.map_err(bus_error),
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                tracing::warn!(broadcasts = n, error = %e, "redis: broadcasts lost with a failed write");
            }
        }
    }
}
