//! Direct messages between instances. A local target is served without the
//! bus; otherwise the gossiped client directory (kept by
//! [`presence`](super::presence), read by [`Inner::locate`]) names the
//! instance to address, and a target it does not know yet is asked for
//! over the control topic, waiting at most [`DIRECT_ACK_WAIT`] for the holder's
//! acknowledgement.

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Body, DIRECT_ACK_WAIT, Inner, Wire};
use crate::broker::{BrokerHandler, Direct};
use crate::error::Result;
use crate::sync::MutexExt;

impl Inner {
    /// The live instance (other than this one) holding `client_id`.
    fn locate(&self, client_id: &str) -> Option<Arc<str>> {
        let now = Instant::now();
        let remotes = self.remotes.lock_unpoisoned();
        remotes
            .iter()
            .filter(|(_, r)| self.alive(r, now))
            .find(|(_, r)| r.clients.get(client_id).is_some_and(|e| e.info.is_some()))
            .map(|(id, _)| id.clone())
    }

    /// `Broker::direct`: local, addressed through the directory, or asked
    /// for.
    pub(super) async fn direct(&self, direct: Direct) -> Result<bool> {
        if let Some(h) = self.handler() {
            if h.on_direct(&direct) {
                return Ok(true);
            }
        }
        let key = format!("s:{}", direct.sender_id.as_deref().unwrap_or(&self.me));
        if let Some(to) = self.locate(&direct.target_id) {
            let body = Body::Direct {
                direct,
                to: Some(to),
                ack: false,
            };
            self.send(key, body).await?;
            return Ok(true);
        }
        // Unknown here: ask everyone, and wait for the holder's ack.
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.direct_acks.lock_unpoisoned().insert(id, tx);
        let body = Body::Direct {
            direct,
            to: None,
            ack: true,
        };
        if let Err(e) = self.send_as(id, key, body).await {
            self.direct_acks.lock_unpoisoned().remove(&id);
            return Err(e);
        }
        let acked = matches!(tokio::time::timeout(DIRECT_ACK_WAIT, rx).await, Ok(Ok(())));
        self.direct_acks.lock_unpoisoned().remove(&id);
        Ok(acked)
    }

    /// A direct message or its acknowledgement from the subscription (from
    /// [`Inner::handle`]).
    pub(super) fn receive_direct(
        self: &Arc<Self>,
        wire: Wire,
        own: bool,
        handler: &Arc<dyn BrokerHandler>,
    ) {
        match wire.body {
            Body::Direct { direct, to, ack } => {
                // Our own were tried locally before they were sent.
                if own || to.as_ref().is_some_and(|to| *to != self.me) {
                    return;
                }
                if handler.on_direct(&direct) && ack {
                    let inner = self.clone();
                    let key = format!("s:{}", self.me);
                    let body = Body::DirectAck {
                        to_boot: wire.boot.clone(),
                        of: wire.id,
                    };
                    tokio::spawn(async move {
                        let _ = inner.send(key, body).await;
                    });
                }
            }
            Body::DirectAck { to_boot, of } => {
                if to_boot == self.boot {
                    if let Some(tx) = self.direct_acks.lock_unpoisoned().remove(&of) {
                        let _ = tx.send(());
                    }
                }
            }
            // Handled by publish and presence.
            Body::Pub { .. }
            | Body::Seq { .. }
            | Body::Claim { .. }
            | Body::Release { .. }
            | Body::Broadcast { .. }
            | Body::JoinLeave { .. }
            | Body::Member { .. }
            | Body::MemberAck { .. }
            | Body::Snapshot { .. }
            | Body::Sequences { .. }
            | Body::Hello
            | Body::Ping { .. }
            | Body::Fetch { .. }
            | Body::Backfill { .. }
            | Body::Bye => {}
        }
    }
}
