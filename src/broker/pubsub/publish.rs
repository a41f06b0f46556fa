//! Publishing and history: everything this instance says goes out through
//! [`Inner::send`] / [`Inner::send_as`] (one JSON [`Wire`] envelope, an
//! ordering key: `c:<channel>`, `s:<sender>` or `m:<instance>`; failures are
//! counted and mark the bus down). A channel publication waits for
//! its round trip and takes its position from this instance's history: the
//! bounded `broker::history` [`Store`](super::super::history::Store) in
//! [`Inner::streams`], filled on receipt by [`Inner::receive_published`],
//! read by `Broker::history` and replayed after a reconnection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gcloud_gax::grpc::Code;
use gcloud_googleapis::pubsub::v1::PubsubMessage;
use tokio::sync::oneshot;

use super::sequencer::Request;
use super::{
    Body, Inner, PubSubError, ROUND_TRIP_TIMEOUT, RPC_TIMEOUT, Route, Wire, bus_error, retry,
};
use crate::broker::{BrokerHandler, Control, HistoryOptions, NewPublication};
use crate::error::Result;
use crate::protocol::{Publication, StreamPosition};
use crate::sync::MutexExt;

impl Inner {
    /// Publish `body` under `key`; returns the message id. Failures are
    /// counted and mark the bus down.
    pub(super) async fn send(&self, key: String, body: Body) -> Result<u64> {
        let id = self.next_id();
        self.send_as(id, key, body).await?;
        Ok(id)
    }

    pub(super) async fn send_as(&self, id: u64, key: String, body: Body) -> Result<()> {
        self.send_batch(&key, vec![(id, body)]).await
    }

    /// Publish several messages under `key` in one RPC, in order (the
    /// sequencer's numbered copies), on the topic of the first one's
    /// route (every message under one key has the same). Failures are
    /// counted and mark the bus down.
    pub(super) async fn send_batch(&self, key: &str, batch: Vec<(u64, Body)>) -> Result<()> {
        let route = match batch.first().map(|(_, b)| b) {
            Some(Body::Ping { shard }) => Route::Shard(*shard),
            Some(b) => match b.channel() {
                Some(channel) => Route::Shard(self.shard_for(channel)),
                None => Route::Control,
            },
            None => return Ok(()),
        };
        let mut msgs = Vec::with_capacity(batch.len());
        for (id, body) in batch {
            let wire = Wire {
                src: self.me.clone(),
                boot: self.boot.clone(),
                id,
                body,
            };
            let data = serde_json::to_vec(&wire).map_err(|e| bus_error(PubSubError::from(e)))?;
            msgs.push(PubsubMessage {
                data,
                ordering_key: key.to_string(),
                ..Default::default()
            });
        }
        self.publish_counted(route, msgs).await
    }

    async fn publish_counted(&self, route: Route, msgs: Vec<PubsubMessage>) -> Result<()> {
        let mut result = self.publish_once(route, msgs.clone()).await;
        if let Err(PubSubError::Rpc { status, .. }) = &result {
            if status.code() == Code::NotFound {
                // The topic is gone (emulator restart): recreate, retry once.
                let _ = self.ensure_topic(route).await;
                result = self.publish_once(route, msgs).await;
            }
        }
        match result {
            Ok(()) => {
                self.publish_ok.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.publish_failures.fetch_add(1, Ordering::Relaxed);
                self.publish_ok.store(false, Ordering::Relaxed);
                Err(bus_error(e))
            }
        }
    }

    async fn publish_once(
        &self,
        route: Route,
        msgs: Vec<PubsubMessage>,
    ) -> std::result::Result<(), PubSubError> {
        let publisher = match route {
            Route::Control => &self.publisher,
            Route::Shard(k) => self.shards[k as usize].publisher(&self.client),
        };
        match tokio::time::timeout(
            RPC_TIMEOUT,
            publisher.publish_immediately(msgs, Some(retry())),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(PubSubError::Rpc {
                op: "publish",
                status: Box::new(status),
            }),
            Err(_) => Err(PubSubError::Timeout("publish")),
        }
    }

    /// Publish `body` and wait until it has come back through our own
    /// subscription: Pub/Sub has then fanned it out to every subscription,
    /// so the other instances get it at about the same moment.
    /// While the control stream is down that cannot happen: refused at
    /// once, not after [`ROUND_TRIP_TIMEOUT`] (a new connection is then
    /// refused quickly and goes to another instance).
    pub(super) async fn send_and_wait(&self, key: String, body: Body) -> Result<()> {
        if !self.stream_up.load(Ordering::Relaxed) {
            return Err(bus_error(PubSubError::ControlDown));
        }
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.waiters.lock_unpoisoned().insert(id, tx);
        if let Err(e) = self.send_as(id, key, body).await {
            self.waiters.lock_unpoisoned().remove(&id);
            return Err(e);
        }
        match tokio::time::timeout(ROUND_TRIP_TIMEOUT, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(bus_error(PubSubError::ControlDown)),
            Err(_) => {
                self.waiters.lock_unpoisoned().remove(&id);
                Err(bus_error(PubSubError::Timeout(
                    "own announcement round trip",
                )))
            }
        }
    }

    /// `Broker::publish`: send on `c:<channel>` (the channel's shard held
    /// meanwhile, its copy comes back there), wait for the round trip.
    pub(super) async fn publish(
        self: &Arc<Self>,
        channel: &str,
        publication: NewPublication,
        history: HistoryOptions,
    ) -> Result<StreamPosition> {
        let _held = self.use_shard(channel).await?;
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.pending.lock_unpoisoned().insert(id, tx);
        let body = Body::Pub {
            channel: Arc::from(channel),
            data: publication.data,
            sender_id: publication.sender_id,
            timestamp: publication.timestamp,
            size: history.size,
            ttl_ms: history.ttl.as_millis() as u64,
        };
        if let Err(e) = self.send_as(id, format!("c:{channel}"), body).await {
            self.pending.lock_unpoisoned().remove(&id);
            return Err(e);
        }
        match tokio::time::timeout(ROUND_TRIP_TIMEOUT, rx).await {
            Ok(Ok(pos)) => Ok(pos),
            Ok(Err(_)) => Err(bus_error(PubSubError::Closed)),
            Err(_) => {
                self.pending.lock_unpoisoned().remove(&id);
                Err(bus_error(PubSubError::Timeout(
                    "own publication round trip",
                )))
            }
        }
    }

    /// `Broker::publish_control`: broadcast on `s:<sender>`, join/leave on
    /// `c:<channel>`.
    pub(super) async fn publish_control(&self, control: Control) -> Result<()> {
        let (key, body) = match control {
            Control::Broadcast {
                sender_id,
                data,
                timestamp,
            } => (
                format!("s:{}", sender_id.as_deref().unwrap_or(&self.me)),
                Body::Broadcast {
                    sender_id,
                    data,
                    timestamp,
                },
            ),
            Control::Join { channel, info } => (
                format!("c:{channel}"),
                Body::JoinLeave {
                    join: true,
                    channel,
                    info,
                },
            ),
            Control::Leave { channel, info } => (
                format!("c:{channel}"),
                Body::JoinLeave {
                    join: false,
                    channel,
                    info,
                },
            ),
        };
        self.send(key, body).await.map(|_| ())
    }

    /// A publication, broadcast or join/leave from the subscription (in
    /// arrival order, from [`Inner::handle`]): a publication is recorded in
    /// this instance's history, and what local clients subscribe to is
    /// handed to the node.
    pub(super) fn receive_published(
        self: &Arc<Self>,
        wire: Wire,
        own: bool,
        handler: &Arc<dyn BrokerHandler>,
    ) {
        match wire.body {
            Body::Pub {
                channel,
                data,
                sender_id,
                timestamp,
                size,
                ttl_ms,
            } if crate::protocol::is_internal_channel(&channel) => {
                // Internal channels (`#user:…`) have no offsets: delivered
                // by every instance as received.
                let subscribed = self.subscribed.lock_unpoisoned().contains(&channel);
                let new = NewPublication {
                    data,
                    sender_id,
                    timestamp,
                    conditions: Default::default(),
                };
                let history = HistoryOptions {
                    size,
                    ttl: Duration::from_millis(ttl_ms),
                };
                let Ok(position) = self
                    .streams
                    .publish(&channel, new, history, |ch, epoch, p| {
                        if subscribed {
                            handler.on_publication(ch, epoch, p);
                        }
                    })
                else {
                    return;
                };
                if own {
                    if let Some(tx) = self.pending.lock_unpoisoned().remove(&wire.id) {
                        let _ = tx.send(position);
                    }
                }
            }
            Body::Pub {
                channel,
                data,
                sender_id,
                timestamp,
                size,
                ttl_ms,
            } => self.on_request(
                &channel,
                Request {
                    boot: wire.boot,
                    id: wire.id,
                    data,
                    sender_id,
                    timestamp,
                    size,
                    ttl_ms,
                },
            ),
            Body::Seq {
                channel,
                epoch,
                offset,
                req_boot,
                req_id,
                data,
                sender_id,
                timestamp,
                size,
                ttl_ms,
            } => {
                let publication = Publication {
                    offset,
                    data,
                    sender_id,
                    timestamp,
                };
                let history = HistoryOptions {
                    size,
                    ttl: Duration::from_millis(ttl_ms),
                };
                self.on_seq(
                    &channel,
                    epoch,
                    publication,
                    (req_boot, req_id),
                    history,
                    wire.src,
                    wire.boot,
                    handler,
                );
            }
            Body::Claim { channel, epoch } => self.on_claim(&channel, epoch, wire.src, wire.boot),
            Body::Fetch {
                channel,
                size,
                ttl_ms,
            } => {
                let history = HistoryOptions {
                    size,
                    ttl: Duration::from_millis(ttl_ms),
                };
                self.on_fetch(&channel, history, (wire.boot, wire.id));
            }
            Body::Backfill {
                channel,
                to_boot,
                of,
                epoch,
                top,
                publications,
            } => self.on_backfill(
                &channel,
                (wire.src, wire.boot),
                (to_boot, of),
                epoch,
                top,
                publications,
            ),
            Body::Release { channel } => self.on_release(&channel, &wire.src, &wire.boot),
            Body::Broadcast {
                sender_id,
                data,
                timestamp,
            } => handler.on_control(&Control::Broadcast {
                sender_id,
                data,
                timestamp,
            }),
            Body::JoinLeave {
                join,
                channel,
                info,
            } => {
                if self.subscribed.lock_unpoisoned().contains(&channel) {
                    let c = match join {
                        true => Control::Join { channel, info },
                        false => Control::Leave { channel, info },
                    };
                    handler.on_control(&c);
                }
            }
            // Handled by direct and presence.
            Body::Direct { .. }
            | Body::DirectAck { .. }
            | Body::Member { .. }
            | Body::MemberAck { .. }
            | Body::Snapshot { .. }
            | Body::Sequences { .. }
            | Body::Hello
            | Body::Ping { .. }
            | Body::Bye => {}
        }
    }
}
