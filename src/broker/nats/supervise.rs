//! The NATS connection and what keeps it whole: the channel stream with
//! its limits (created, or brought to this instance's limits, at start-up
//! and after a reconnect), the connection-event task and the repair after
//! a reconnect, the live subscriptions (one task per locally subscribed
//! channel, delivering in offset order and filling gaps from history, and
//! the broadcast subscription), and shutdown. Readiness is the connection
//! state ([`Broker::is_ready`](crate::broker::Broker::is_ready)).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::stream;
use async_nats::{Event, Subscriber};
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::direct::NO_EPOCH;
use super::publish::{WireBroadcast, WireIn};
use super::{Bus, NatsBroker, bus_error};
use crate::broker::{BrokerHandler, Control};
use crate::error::Result;
use crate::protocol::StreamPosition;
use crate::protocol::is_internal_channel;
use crate::sync::MutexExt;

/// A position a channel task has delivered up to.
#[derive(Debug, Clone)]
struct Delivered {
    epoch: Arc<str>,
    offset: u64,
}

/// One locally subscribed channel.
pub(super) struct ChannelSub {
    /// Stops the channel's task (and its subscription).
    cancel: CancellationToken,
    /// Asks the task to replay what it missed (after a reconnect).
    resync: Arc<Notify>,
}

/// Channel → its live subscription task.
pub(super) type Channels = Mutex<HashMap<Arc<str>, ChannelSub>>;

impl Bus {
    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream_name.clone(),
            description: Some("switchboard channel history".into()),
            subjects: vec![format!("{}.ch.*", self.prefix)],
            max_messages_per_subject: self.max_per_subject,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            duplicate_window: self.duplicate_window,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            republish: Some(stream::Republish {
                source: format!("{}.ch.*", self.prefix),
                destination: format!("{}.chl.{{{{wildcard(1)}}}}.p", self.prefix),
                headers_only: false,
            }),
            ..Default::default()
        }
    }

    /// Create the channel stream, or set an existing one to our limits
    /// (both ways: a stream made with larger limits, or by an older
    /// version that kept everything for an hour, is brought down to them).
    pub(super) async fn ensure_stream(&self) -> Result<()> {
        let wanted = self.stream_config();
        let mut stream = self
            .js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| bus_error(format!("JetStream stream {}: {e}", self.stream_name)))?;
        let info = stream
            .info()
            .await
            .map_err(|e| bus_error(format!("JetStream stream {}: {e}", self.stream_name)))?;
        let have = &info.config;
        if have.max_messages_per_subject != wanted.max_messages_per_subject
            || have.max_age != wanted.max_age
            || have.max_bytes != wanted.max_bytes
            || have.discard != wanted.discard
            || have.republish != wanted.republish
            || have.duplicate_window != wanted.duplicate_window
            || !have.allow_direct
        {
            let mut updated = have.clone();
            updated.max_messages_per_subject = wanted.max_messages_per_subject;
            updated.max_age = wanted.max_age;
            updated.max_bytes = wanted.max_bytes;
            updated.discard = wanted.discard;
            updated.republish = wanted.republish;
            updated.duplicate_window = wanted.duplicate_window;
            updated.allow_direct = true;
            self.js
                .update_stream(updated)
                .await
                .map_err(|e| bus_error(format!("updating stream {}: {e}", self.stream_name)))?;
        }
        Ok(())
    }
}

impl NatsBroker {
    /// Subscribe to broadcasts and hand them to `handler` until shutdown.
    pub(super) async fn listen_broadcasts(&self, handler: &Arc<dyn BrokerHandler>) -> Result<()> {
        let bus = &self.bus;
        let mut bcast = bus
            .client
            .subscribe(bus.broadcast_subject())
            .await
            .map_err(|e| bus_error(format!("subscribing to broadcasts: {e}")))?;
        let handler = handler.clone();
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    m = bcast.next() => match m {
                        Some(m) => match serde_json::from_slice::<WireBroadcast>(&m.payload) {
                            Ok(b) => handler.on_control(&Control::Broadcast {
                                sender_id: b.sender_id,
                                data: b.data,
                                timestamp: b.timestamp,
                            }),
                            Err(e) => tracing::warn!(error = %e, "undecodable broadcast on the NATS bus"),
                        },
                        None => break,
                    },
                }
            }
        });
        Ok(())
    }

    /// Connection events: readiness is the connection state; after a
    /// reconnect, repair and replay.
    pub(super) fn watch_connection(&self) {
        let events = self.events.lock_unpoisoned().take();
        if let Some(mut events) = events {
            let stop = self.shutdown.clone();
            let weak = Arc::downgrade(&self.bus);
            let (resync_tx, mut resync_rx) = mpsc::channel::<()>(1);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        e = events.recv() => match e {
                            Some(Event::Connected) => {
                                tracing::info!("NATS bus connected");
                                let _ = resync_tx.try_send(());
                            }
                            Some(Event::Disconnected) => tracing::warn!("NATS bus disconnected; reconnecting"),
                            Some(other) => tracing::info!(event = %other, "NATS bus event"),
                            None => break,
                        },
                    }
                }
            });
            // The repair runs in its own task so events keep flowing.
            let stop = self.shutdown.clone();
            let channels = self.channels.clone();
            tokio::spawn(async move {
                while let Some(()) = tokio::select! {
                    _ = stop.cancelled() => None,
                    r = resync_rx.recv() => r,
                } {
                    let Some(bus) = weak.upgrade() else { break };
                    let timeout = bus.opts.request_timeout;
                    if tokio::time::timeout(timeout, bus.sync()).await.is_err() {
                        continue;
                    }
                    if let Err(e) = bus.ensure_stream().await {
                        tracing::warn!(error = %e, "re-creating the NATS channel stream failed");
                    }
                    if let Err(e) = bus.ensure_gen_stream().await {
                        tracing::warn!(error = %e, "re-creating the NATS epoch generation failed");
                    }
                    if let Err(e) = bus.ensure_bucket().await {
                        tracing::warn!(error = %e, "re-creating the NATS presence bucket failed");
                    }
                    bus.presence_dirty.notify_one();
                    NatsBroker::resync_all(&channels);
                }
            });
        }
    }

    /// Ask every channel task to replay what it missed (after a
    /// reconnect).
    fn resync_all(channels: &Channels) {
        let channels = channels.lock_unpoisoned();
        for sub in channels.values() {
            sub.resync.notify_one();
        }
    }

    /// Take `channel`'s live subscription and start its task (the body of
    /// [`Broker::subscribe`](crate::broker::Broker::subscribe)).
    pub(super) async fn subscribe_channel(&self, channel: &str) -> Result<()> {
        let handler = self.handler()?.clone();
        self.bus.connected()?;
        let bus = self.bus.clone();
        let sub = bus
            .client
            .subscribe(bus.live_subjects(channel))
            .await
            .map_err(|e| bus_error(format!("subscribing to {channel}: {e}")))?;
        // The head is read by a request sent after the SUB on the same
        // connection, so the server has the subscription by then: every
        // later publication arrives live. A user channel has no head: a
        // round trip does the same.
        let last = if is_internal_channel(channel) {
            bus.sync().await?;
            None
        } else {
            let head = bus.head(&bus.stream_subject(channel)).await?;
            head.map(|h| Delivered {
                epoch: h.epoch,
                offset: h.offset,
            })
        };
        let channel: Arc<str> = Arc::from(channel);
        let cancel = self.shutdown.child_token();
        let resync = Arc::new(Notify::new());
        let previous = self.channels.lock_unpoisoned().insert(
            channel.clone(),
            ChannelSub {
                cancel: cancel.clone(),
                resync: resync.clone(),
            },
        );
        if let Some(previous) = previous {
            previous.cancel.cancel();
        }
        tokio::spawn(channel_task(
            bus, handler, channel, sub, last, cancel, resync,
        ));
        Ok(())
    }

    /// Stop `channel`'s task, which drops its subscription.
    pub(super) fn unsubscribe_channel(&self, channel: &str) {
        let sub = self.channels.lock_unpoisoned().remove(channel);
        if let Some(sub) = sub {
            sub.cancel.cancel();
        }
    }

    /// Stop every task, forget the local channels, flush.
    pub(super) async fn shut_down(&self) {
        self.shutdown.cancel();
        self.channels.lock_unpoisoned().clear();
        let timeout = self.bus.opts.request_timeout;
        let _ = tokio::time::timeout(timeout, self.bus.client.flush()).await;
    }
}

/// One locally subscribed channel: delivers its publications in offset
/// order, each once, and join/leave events; fills gaps from history.
async fn channel_task(
    bus: Arc<Bus>,
    handler: Arc<dyn BrokerHandler>,
    channel: Arc<str>,
    mut sub: Subscriber,
    mut last: Option<Delivered>,
    cancel: CancellationToken,
    resync: Arc<Notify>,
) {
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            // A user channel keeps nothing to catch up from.
            _ = resync.notified(), if !is_internal_channel(&channel) => {
                catch_up(&bus, &*handler, &channel, &mut last, None).await
            }
            m = sub.next() => {
                let Some(m) = m else { break };
                if m.subject.as_str().ends_with(".u") {
                    // A user-addressed message: no offset, no history.
                    match WireIn::parse(&m.payload).and_then(WireIn::publication) {
                        Some(p) => handler.on_publication(&channel, &Arc::from(NO_EPOCH), &p),
                        None => tracing::warn!(%channel, "undecodable user message on the NATS bus"),
                    }
                    continue;
                }
                if m.subject.as_str().ends_with(".e") {
                    match serde_json::from_slice::<Control>(&m.payload) {
                        Ok(c) => {
                            bus.ghosts.saw(&c);
                            handler.on_control(&c)
                        }
                        Err(e) => tracing::warn!(error = %e, "undecodable event on the NATS bus"),
                    }
                    continue;
                }
                let Some(w) = WireIn::parse(&m.payload) else {
                    tracing::warn!(%channel, "undecodable publication on the NATS bus");
                    continue;
                };
                let same_epoch = last.as_ref().is_some_and(|l| l.epoch == w.epoch);
                if w.offset == 0 {
                    // An epoch marker of an earlier version: the channel
                    // (re)starts here.
                    if !same_epoch {
                        last = Some(Delivered { epoch: w.epoch, offset: 0 });
                    }
                    continue;
                }
                let expected = match (&last, same_epoch) {
                    (Some(l), true) => l.offset,
                    _ => 0,
                };
                if w.offset <= expected {
                    continue; // already delivered (a replay overlapped)
                }
                if w.offset > expected + 1 {
                    let from = Delivered { epoch: w.epoch.clone(), offset: expected };
                    let mut at = Some(from);
                    catch_up(&bus, &*handler, &channel, &mut at, Some(w.offset - 1)).await;
                }
                let epoch = w.epoch.clone();
                if let Some(p) = w.publication() {
                    handler.on_publication(&channel, &epoch, &p);
                    last = Some(Delivered { epoch, offset: p.offset });
                }
            }
        }
    }
    let _ = sub.unsubscribe().await;
}

/// Deliver what history holds after `last` (up to `until`, else up to the
/// current top), or call `resync_failed` when it cannot fill the gap.
async fn catch_up(
    bus: &Bus,
    handler: &dyn BrokerHandler,
    channel: &Arc<str>,
    last: &mut Option<Delivered>,
    until: Option<u64>,
) {
    if is_internal_channel(channel) {
        return; // user channels: at most once, no history
    }
    let opts = bus.history_options(channel);
    // Nothing delivered here yet: start from what the subscribers read when
    // they subscribed, so a stream lost meanwhile is a gap, not a new start.
    let since = match last.as_ref() {
        Some(l) => Some(StreamPosition {
            epoch: l.epoch.clone(),
            offset: l.offset,
        }),
        None => handler.position(channel),
    };
    let h = match bus
        .history(channel, since.as_ref(), usize::MAX, false, opts)
        .await
    {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(%channel, error = %e, "reading history to fill a gap failed");
            handler.resync_failed(channel);
            return;
        }
    };
    let end = until.unwrap_or(h.top.offset).min(h.top.offset);
    let complete = match &since {
        Some(s) => h.covers(s, Some(end)),
        // Nothing delivered yet, and the channel was empty when this
        // instance subscribed: everything in the epoch is new.
        None => h.publications.first().is_none_or(|p| p.offset == 1),
    };
    for p in h.publications.iter().filter(|p| p.offset <= end) {
        handler.on_publication(channel, &h.top.epoch, p);
    }
    if !complete {
        handler.resync_failed(channel);
    }
    if until.is_none() || !complete {
        *last = Some(Delivered {
            epoch: h.top.epoch.clone(),
            offset: end,
        });
    } else if let Some(p) = h.publications.iter().rfind(|p| p.offset <= end) {
        *last = Some(Delivered {
            epoch: h.top.epoch.clone(),
            offset: p.offset,
        });
    }
}
