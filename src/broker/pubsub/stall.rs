//! A stream that does not come back: replacing a subscription that does
//! not deliver, and telling the subscribers of a shard whose stream stays
//! down.
//!
//! Two things can keep a stream from delivering while Pub/Sub itself
//! answers:
//!
//! * **A stalled subscription.** The subscription exists and the admin
//!   calls work, but its streaming pull does not open within
//!   `STREAM_OPEN_TIMEOUT` (the server answers the stream's headers only
//!   with its first message, and none comes). The Pub/Sub emulator does
//!   this after a streaming pull of the same subscription name was cut
//!   off (its server throws on the cancelled call and keeps it attached),
//!   and it does it again to a subscription deleted and recreated under
//!   the same name. The subscription is then replaced by a fresh one of a
//!   new name ([`Named::renew`]: `<name>-r<boot><n>`), the old one deleted
//!   (best effort), and the stream treated as recreated: what was on the
//!   old subscription may be lost, so the shard's subscribers are asked to
//!   reconnect and recover honestly, as after an emulator restart.
//! * **A shard stream down for long.** While a shard's stream reconnects,
//!   its local subscribers receive nothing. Pub/Sub keeps the messages of
//!   a surviving subscription, so a short outage delays, never loses; but
//!   a subscriber must not sit silent for an unbounded time. A shard down
//!   for [`STALL_NOTICE`] has its subscribers asked to reconnect (close
//!   1012, then a recovery on whatever instance they reach), and a
//!   subscribe to one of its channels is refused (`bus_unavailable`) until
//!   its stream is back, so they go to an instance that is not cut off.
//!
//! A renamed subscription of an instance that then crashes is not deleted
//! by the next incarnation (which looks for the configured name): it
//! expires after a day without a reader, like every subscription here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gcloud_pubsub::client::Client;
use gcloud_pubsub::subscription::Subscription;
use tokio::time::Instant;

use super::shards::shard_of;
use super::supervise::PullStream;
use super::{Inner, PubSubError, Route};
use crate::error::{Error, Result};
use crate::sync::MutexExt;

/// How long a shard's stream may be down before its local subscribers are
/// asked to reconnect and its channels' subscribes are refused here.
pub const STALL_NOTICE: Duration = Duration::from_secs(5);

/// A subscription this instance reads, under a name that changes when a
/// stalled one is replaced.
pub(super) struct Named {
    /// The configured name (`<subscription>` or `<subscription>-c<k>`).
    base: String,
    /// The subscription read now.
    current: std::sync::Mutex<Subscription>,
    /// Replacements so far (part of the next name).
    renewals: AtomicU64,
}

impl Named {
    pub(super) fn new(client: &Client, base: String) -> Named {
        Named {
            current: std::sync::Mutex::new(client.subscription(&base)),
            base,
            renewals: AtomicU64::new(0),
        }
    }

    pub(super) fn get(&self) -> Subscription {
        self.current.lock_unpoisoned().clone()
    }

    /// Switch to a new name, unique to this process; returns the old
    /// subscription (to delete).
    fn renew(&self, client: &Client, boot: &str) -> Subscription {
        let n = self.renewals.fetch_add(1, Ordering::Relaxed) + 1;
        let fresh = client.subscription(&format!("{}-r{boot}{n}", self.base));
        std::mem::replace(&mut *self.current.lock_unpoisoned(), fresh)
    }
}

/// Whether `e` is a streaming pull that did not open in time.
fn stalled(e: &Error) -> bool {
    matches!(e, Error::Bus(b) if matches!(
        b.downcast_ref::<PubSubError>(),
        Some(PubSubError::Timeout("streaming pull"))
    ))
}

impl Inner {
    /// Open `route`'s stream; if its subscription stalls, replace it by a
    /// fresh one of a new name and open that. Returns the stream and
    /// whether the subscription was replaced (messages may be lost).
    pub(super) async fn open_or_replace(&self, route: Route) -> Result<(PullStream, bool)> {
        match self.open_stream(route).await {
            Ok(stream) => Ok((stream, false)),
            Err(e) if stalled(&e) => {
                let old = self.named(route).renew(&self.client, &self.boot);
                tracing::warn!(
                    ?route,
                    stalled = %old.id(),
                    now = %self.named(route).get().id(),
                    "pub/sub subscription delivers nothing; replaced by a new one"
                );
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(super::RPC_TIMEOUT, old.delete(None)).await;
                });
                self.ensure_subscription(route, true).await?;
                Ok((self.open_stream(route).await?, true))
            }
            Err(e) => Err(e),
        }
    }

    /// The named subscription of `route`.
    pub(super) fn named(&self, route: Route) -> &Named {
        match route {
            Route::Control => &self.subscription,
            Route::Shard(k) => &self.shards[k as usize].subscription,
        }
    }

    /// Whether shard `k`'s stream has been down for [`STALL_NOTICE`].
    pub(super) fn shard_stalled(&self, k: u16, now: Instant) -> bool {
        let st = self.shards[k as usize].state.lock_unpoisoned();
        st.open
            && !st.up
            && st
                .down_since
                .is_some_and(|t| now.duration_since(t) >= STALL_NOTICE)
    }

    /// From the heartbeat: the local subscribers of a shard down for
    /// [`STALL_NOTICE`] are asked to reconnect (once per outage).
    pub(super) fn sweep_stalls(self: &Arc<Self>, now: Instant) {
        let Some(handler) = self.handler().cloned() else {
            return;
        };
        let count = self.shards.len() as u16;
        for k in 0..count {
            if !self.shard_stalled(k, now) {
                continue;
            }
            {
                let mut st = self.shards[k as usize].state.lock_unpoisoned();
                if st.stall_told {
                    continue;
                }
                st.stall_told = true;
            }
            let channels: Vec<Arc<str>> = self
                .subscribed
                .lock_unpoisoned()
                .iter()
                .filter(|c| shard_of(c, count) == k)
                .cloned()
                .collect();
            tracing::warn!(
                shard = k,
                subscribers_of = channels.len(),
                "pub/sub shard stream down for {STALL_NOTICE:?}: its subscribers are asked to reconnect"
            );
            for ch in channels {
                handler.resync_failed(&ch);
            }
        }
    }
}
