//! Direct messages on the NATS bus: a request to the core subject
//! `P.inst.<tag>` of the instance named by the target id's tag
//! ([`crate::ids::tag_of`]), answered by that instance, and
//! user-addressed messages (`#user:<sub>`), core publishes on the user
//! channel's `.u` subject that nothing stores.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;

use super::publish::WireOut;
use super::{NatsBroker, bus_error};
use crate::broker::{BrokerHandler, Direct, NewPublication};
use crate::error::Result;
use crate::ids::{TAG_LEN, random_base36, tag_of};
use crate::protocol::StreamPosition;

/// The epoch written on user-addressed messages, which have none.
pub(super) const NO_EPOCH: &str = "-";

/// Draws of a random tag before start-up gives up (with 1.7 M tags and a
/// few instances, the first draw is free but for a chance in ~10⁵).
const TAG_ATTEMPTS: usize = 16;

impl NatsBroker {
    /// Take a tag no live instance holds (a request to its subject that
    /// nobody answers), subscribe this instance's direct subject with it,
    /// and answer every request on it from one task. Returns once the
    /// server has the subscription.
    pub(super) async fn listen_direct(&self, handler: &Arc<dyn BrokerHandler>) -> Result<()> {
        let client = &self.bus.client;
        let mut tag = None;
        for _ in 0..TAG_ATTEMPTS {
            let candidate = random_base36(TAG_LEN);
            let probe = client
                .request(self.bus.instance_subject(&candidate), Bytes::new())
                .await;
            match probe {
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    tag = Some(candidate);
                    break;
                }
                Ok(_) => continue, // taken
                Err(e) => return Err(bus_error(format!("choosing a direct subject: {e}"))),
            }
        }
        let tag = tag.ok_or_else(|| bus_error("no free instance tag after 16 draws"))?;
        let mut sub = client
            .subscribe(self.bus.instance_subject(&tag))
            .await
            .map_err(|e| bus_error(format!("subscribing the direct subject: {e}")))?;
        self.bus.sync().await?;
        let _ = self.tag.set(tag);
        let handler = handler.clone();
        let stop = self.shutdown.clone();
        let client = client.clone();
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = sub.next() => match m {
                        Some(m) => m,
                        None => break,
                    },
                };
                // An empty request is another instance probing the tag.
                let delivered = serde_json::from_slice::<Direct>(&m.payload)
                    .map(|d| handler.on_direct(&d))
                    .unwrap_or(false);
                if let Some(reply) = m.reply {
                    let answer = if delivered { "1" } else { "0" };
                    let _ = client
                        .publish(reply, Bytes::from_static(answer.as_bytes()))
                        .await;
                }
            }
        });
        Ok(())
    }

    /// Ask the instance whose tag starts `direct.target_id` to queue it (the
    /// body of [`Broker::direct`](crate::broker::Broker::direct)).
    pub(super) async fn send_direct(&self, direct: Direct) -> Result<bool> {
        let Some(tag) = tag_of(&direct.target_id) else {
            return Ok(false);
        };
        if self.tag.get().is_some_and(|own| own == tag) {
            return Ok(self.handler()?.on_direct(&direct));
        }
        self.bus.connected()?;
        let subject = self.bus.instance_subject(tag);
        let payload = serde_json::to_vec(&direct)
            .map_err(|e| bus_error(format!("encoding a direct message: {e}")))?;
        match self.bus.client.request(subject, Bytes::from(payload)).await {
            Ok(reply) => Ok(reply.payload.as_ref() == b"1"),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(false),
            Err(e) => Err(bus_error(format!("direct message: {e}"))),
        }
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
