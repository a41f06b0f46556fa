//! Direct messages on the NATS bus: a request to one client's core
//! subject `P.cl.T(id)`, answered by the instance holding it, and
//! user-addressed messages (`#user:<sub>`), core publishes on the user
//! channel's `.u` subject that nothing stores.

use std::sync::Arc;

use async_nats::Subscriber;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{BoxStream, SelectAll};
use tokio::sync::{mpsc, oneshot};

use super::publish::WireOut;
use super::{NatsBroker, bus_error};
use crate::broker::{BrokerHandler, Direct, NewPublication};
use crate::error::Result;
use crate::protocol::{ClientInfo, StreamPosition};
use crate::sync::MutexExt;

/// The epoch written on user-addressed messages, which have none.
pub(super) const NO_EPOCH: &str = "-";

impl NatsBroker {
    /// Direct messages: one task polls every local client's subscription
    /// and answers each request.
    pub(super) fn listen_direct(&self, handler: &Arc<dyn BrokerHandler>) {
        let (direct_tx, mut direct_rx) = mpsc::unbounded_channel();
        let _ = self.direct_tx.set(direct_tx);
        let handler = handler.clone();
        let stop = self.shutdown.clone();
        let client = self.bus.client.clone();
        tokio::spawn(async move {
            let mut subs: SelectAll<BoxStream<'static, async_nats::Message>> = SelectAll::new();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    s = direct_rx.recv() => match s {
                        Some(s) => subs.push(s),
                        None => break,
                    },
                    Some(m) = subs.next(), if !subs.is_empty() => {
                        let delivered = serde_json::from_slice::<Direct>(&m.payload)
                            .map(|d| handler.on_direct(&d))
                            .unwrap_or(false);
                        if let Some(reply) = m.reply {
                            let answer = if delivered { "1" } else { "0" };
                            let _ = client.publish(reply, Bytes::from_static(answer.as_bytes())).await;
                        }
                    }
                }
            }
        });
    }

    /// Ask the instance holding `direct.target_id` to queue it (the body of
    /// [`Broker::direct`](crate::broker::Broker::direct)).
    pub(super) async fn send_direct(&self, direct: Direct) -> Result<bool> {
        self.bus.connected()?;
        let subject = self.bus.client_subject(&direct.target_id);
        let payload = serde_json::to_vec(&direct)
            .map_err(|e| bus_error(format!("encoding a direct message: {e}")))?;
        match self.bus.client.request(subject, Bytes::from(payload)).await {
            Ok(reply) => Ok(reply.payload.as_ref() == b"1"),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(false),
            Err(e) => Err(bus_error(format!("direct message: {e}"))),
        }
    }

    /// Take the client's direct subscription; returns once the server has it.
    pub(super) async fn register_direct(&self, info: &ClientInfo) -> Result<()> {
        self.bus.connected()?;
        let direct_tx = self
            .direct_tx
            .get()
            .ok_or_else(|| bus_error("NatsBroker::start was not called"))?;
        let sub: Subscriber = self
            .bus
            .client
            .subscribe(self.bus.client_subject(&info.client_id))
            .await
            .map_err(|e| bus_error(format!("subscribing a client: {e}")))?;
        let (tx, rx) = oneshot::channel::<()>();
        // Until `tx` is dropped (unregister), then drained: the server
        // forgets the subject, and requests already on their way are still
        // answered (`0`: gone) instead of timing out.
        let stream =
            futures_util::stream::unfold((sub, Some(rx)), |(mut sub, mut rx)| async move {
                loop {
                    match rx.as_mut() {
                        Some(r) => tokio::select! {
                            _ = r => {
                                let _ = sub.drain().await;
                                rx = None;
                            }
                            m = sub.next() => return m.map(|m| (m, (sub, rx))),
                        },
                        None => return sub.next().await.map(|m| (m, (sub, None))),
                    }
                }
            });
        if direct_tx.send(stream.boxed()).is_err() {
            return Err(bus_error("the NATS direct task has stopped"));
        }
        self.clients
            .lock_unpoisoned()
            .insert(info.client_id.clone(), tx);
        // Reachable from every instance once the server has the SUB.
        self.bus.sync().await
    }

    /// End the client's direct subscription.
    pub(super) fn unregister_direct(&self, client_id: &str) {
        // Dropping the sender ends the stream; dropping the subscriber
        // unsubscribes.
        self.clients.lock_unpoisoned().remove(client_id);
    }

    /// A user-addressed direct message: a core publish on the user
    /// channel's `.u` subject, which only the instances holding the user's
    /// connections subscribe to and which no stream captures. At most
    /// once; nothing is kept.
    pub(super) async fn publish_to_user(
        &self,
        channel: &str,
        publication: &NewPublication,
    ) -> Result<StreamPosition> {
        self.bus.connected()?;
        let body = serde_json::to_vec(&WireOut {
            epoch: NO_EPOCH,
            offset: 0,
            prev: 0,
            sender_id: publication.sender_id.as_deref(),
            timestamp: publication.timestamp,
            data: Some(&publication.data),
        })
        .map_err(|e| bus_error(format!("encoding a user message: {e}")))?;
        self.bus
            .client
            .publish(self.bus.user_subject(channel), Bytes::from(body))
            .await
            .map_err(|e| bus_error(format!("publishing a user message: {e}")))?;
        Ok(StreamPosition {
            epoch: NO_EPOCH.into(),
            offset: 0,
        })
    }
}
