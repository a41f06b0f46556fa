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
//! * **A channel that stops arriving.** The stream is up but one
//!   ordering key delivers nothing: the emulator holds a key's messages
//!   behind an unacknowledged one it gave to a cut-off stream. Every
//!   sequencer's heartbeat carries the last offset it assigned per
//!   channel; an instance whose local stream of a subscribed channel has
//!   not reached any live sequencer's advertised `(epoch, offset)` within
//!   [`STALL_NOTICE`] (epochs it knows to be superseded aside) replaces the
//!   shard's subscription as above ([`Inner::sweep_lags`]). The rule also
//!   catches an instance that still believes it sequences a channel
//!   another instance has claimed since (it never saw the claim). A
//!   false alarm costs the shard's subscribers one reconnection with
//!   `recovered:false`, never a message.
//!
//! A renamed subscription of an incarnation that then crashes is deleted
//! by a later incarnation of the same instance id, the first time it sets
//! up that topic's subscription ([`Inner::sweep_leftover_renames`]: the
//! topic's subscriptions named `<name>-r<boot><n>` of another boot). What
//! no later incarnation sweeps expires after a day without a reader, like
//! every subscription here.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use gcloud_pubsub::client::Client;
use gcloud_pubsub::subscription::Subscription;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::shards::shard_of;
use super::supervise::PullStream;
use super::{Inner, PubSubError, Route};
use crate::error::{Error, Result};
use crate::sync::MutexExt;

/// How long a shard's stream may be down before its local subscribers are
/// asked to reconnect and its channels' subscribes are refused here.
pub const STALL_NOTICE: Duration = Duration::from_secs(5);

/// Length of a boot id (random per process start, part of a renamed
/// subscription's name).
pub(super) const BOOT_LEN: usize = 12;

/// A subscription this instance reads, under a name that changes when a
/// stalled one is replaced.
pub(super) struct Named {
    /// The configured name (`<subscription>` or `<subscription>-c<k>`).
    base: String,
    /// The subscription read now.
    current: std::sync::Mutex<Subscription>,
    /// Replacements so far (part of the next name).
    renewals: AtomicU64,
    /// Whether the renames earlier incarnations left were looked for
    /// (once per process).
    swept: AtomicBool,
}

impl Named {
    pub(super) fn new(client: &Client, base: String) -> Named {
        Named {
            current: std::sync::Mutex::new(client.subscription(&base)),
            base,
            renewals: AtomicU64::new(0),
            swept: AtomicBool::new(false),
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

/// Whether the subscription `id` is a rename of `base` made by a process
/// other than `boot`: `<base>-r<boot><n>`, a boot id of [`BOOT_LEN`]
/// lower-case letters and digits, `n` digits.
pub(super) fn leftover_rename(id: &str, base: &str, boot: &str) -> bool {
    let Some(rest) = id.strip_prefix(base).and_then(|r| r.strip_prefix("-r")) else {
        return false;
    };
    if rest.len() <= BOOT_LEN || !rest.is_ascii() {
        return false;
    }
    let (their_boot, n) = rest.split_at(BOOT_LEN);
    their_boot != boot
        && their_boot
            .bytes()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        && n.bytes().all(|c| c.is_ascii_digit())
}

/// Channel → since when its local stream has been behind, and the
/// `(epoch, offset)` targets advertised then.
pub(super) type Lags = HashMap<Arc<str>, (Instant, Vec<(Arc<str>, u64)>)>;

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
                self.rename(route, "its stream does not open");
                self.ensure_subscription(route, true).await?;
                Ok((self.open_stream(route).await?, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Once per process and route, in the background (best effort):
    /// delete the subscriptions of `route`'s topic that an earlier
    /// incarnation of this instance renamed and left when it crashed.
    pub(super) fn sweep_leftover_renames(&self, route: Route) {
        let named = self.named(route);
        if named.swept.swap(true, Ordering::Relaxed) {
            return;
        }
        let topic = self.client.topic(self.topic_of(route));
        let base = named.base.clone();
        let boot = self.boot.clone();
        tokio::spawn(async move {
            let listed = tokio::time::timeout(super::RPC_TIMEOUT, topic.subscriptions(None)).await;
            let Ok(Ok(subscriptions)) = listed else {
                tracing::debug!(%base, "could not list the topic's subscriptions to sweep renames");
                return;
            };
            for old in subscriptions {
                if leftover_rename(&old.id(), &base, &boot) {
                    let deleted = tokio::time::timeout(super::RPC_TIMEOUT, old.delete(None)).await;
                    tracing::info!(
                        subscription = %old.id(),
                        deleted = matches!(deleted, Ok(Ok(()))),
                        "pub/sub subscription left by an earlier incarnation's rename"
                    );
                }
            }
        });
    }

    /// Move `route` to a subscription of a new name; the old one is
    /// deleted in the background (best effort).
    pub(super) fn rename(&self, route: Route, why: &str) {
        if let Route::Shard(k) = route {
            self.shards[k as usize]
                .state
                .lock_unpoisoned()
                .stall_renamed = true;
        }
        let old = self.named(route).renew(&self.client, &self.boot);
        tracing::warn!(
            ?route,
            stalled = %old.id(),
            now = %self.named(route).get().id(),
            "pub/sub subscription replaced by one of a new name ({why})"
        );
        tokio::spawn(async move {
            let _ = tokio::time::timeout(super::RPC_TIMEOUT, old.delete(None)).await;
        });
    }

    /// A token that ends the reader's current stream of `route`: the
    /// reader's `stop`, and for a shard a child of it that
    /// [`kick`](Inner::kick) cancels.
    pub(super) fn kick_token(&self, route: Route, stop: &CancellationToken) -> CancellationToken {
        let Route::Shard(k) = route else {
            return stop.clone();
        };
        let kick = stop.child_token();
        self.shards[k as usize].state.lock_unpoisoned().kick = Some(kick.clone());
        kick
    }

    /// Whether the subscription of `route` is to be replaced now (renamed
    /// here; the caller creates it): the reader was kicked, or (once per
    /// outage) the outage was long enough to tell its subscribers.
    ///
    /// A shard whose outage was long enough to tell its subscribers is
    /// replaced: they were told to recover elsewhere, and a surviving
    /// subscription of the emulator may hold a channel behind a message
    /// given to the cut-off stream even once a new stream is up.
    pub(super) fn take_renew(&self, route: Route) -> bool {
        let Route::Shard(k) = route else {
            return false;
        };
        let (kicked, told) = {
            let mut st = self.shards[k as usize].state.lock_unpoisoned();
            (
                std::mem::take(&mut st.renew),
                st.stall_told && !st.stall_renamed,
            )
        };
        if kicked {
            self.rename(route, "a channel stopped arriving");
        } else if told {
            self.rename(route, "down long enough to tell its subscribers");
        }
        kicked || told
    }

    /// Whether `route`'s subscribers were told of this outage and its
    /// subscription not yet replaced: a stream that opens now is dropped
    /// and the subscription replaced (see [`Inner::take_renew`]).
    pub(super) fn stall_unreplaced(&self, route: Route) -> bool {
        match route {
            Route::Shard(k) => {
                let st = self.shards[k as usize].state.lock_unpoisoned();
                st.stall_told && !st.stall_renamed
            }
            Route::Control => false,
        }
    }

    /// End shard `k`'s current stream and have its subscription replaced.
    fn kick(&self, k: u16) {
        let mut st = self.shards[k as usize].state.lock_unpoisoned();
        if !st.open || st.renew {
            return;
        }
        st.renew = true;
        if let Some(kick) = st.kick.take() {
            kick.cancel();
        }
    }

    /// What this instance's heartbeat advertises: the last offset it
    /// assigned in each channel it sequences.
    pub(super) fn assigned_tops(&self) -> Vec<(Arc<str>, u64)> {
        let st = self.sequencer.lock_unpoisoned();
        st.logs
            .iter()
            .filter(|(_, l)| l.claimed && self.owns(l))
            .map(|(c, l)| (c.clone(), l.assigned))
            .collect()
    }

    /// From the heartbeat: a subscribed channel whose local stream has not
    /// reached what any live sequencer of it advertised, for
    /// [`STALL_NOTICE`], has its shard's subscription replaced.
    pub(super) fn sweep_lags(self: &Arc<Self>, now: Instant) {
        let channels: Vec<Arc<str>> = self.subscribed.lock_unpoisoned().iter().cloned().collect();
        let reached = |c: &str, targets: &[(Arc<str>, u64)]| {
            let local = self.streams.top_of(c);
            targets.iter().any(|(e, t)| {
                *t == 0
                    || local
                        .as_ref()
                        .is_some_and(|p| p.epoch == *e && p.offset >= *t)
            })
        };
        let mut stuck = Vec::new();
        for c in channels {
            let superseded: Vec<Arc<str>> = {
                let st = self.sequencer.lock_unpoisoned();
                st.logs
                    .get(&c)
                    .map(|l| l.superseded.iter().cloned().collect())
                    .unwrap_or_default()
            };
            let adverts: Vec<(Arc<str>, u64)> = {
                let remotes = self.remotes.lock_unpoisoned();
                remotes
                    .values()
                    .filter(|r| self.alive(r, now))
                    .filter_map(|r| {
                        let epoch = r.sequences.get(&c)?.1.clone()?;
                        let top = r.tops.get(&c).copied().unwrap_or(0);
                        Some((epoch, top))
                    })
                    .filter(|(e, _)| !superseded.contains(e))
                    .collect()
            };
            let mut lags = self.lags.lock_unpoisoned();
            match lags.get(&c) {
                None => {
                    if !adverts.is_empty() && !reached(&c, &adverts) {
                        lags.insert(c, (now, adverts));
                    }
                }
                Some((since, targets)) => {
                    if reached(&c, targets) || adverts.is_empty() {
                        lags.remove(&c);
                    } else if now.duration_since(*since) >= STALL_NOTICE {
                        tracing::warn!(channel = %c, targets = ?targets, local = ?self.streams.top_of(&c), "a channel stopped arriving here");
                        lags.remove(&c);
                        stuck.push(self.shard_for(&c));
                    }
                }
            }
        }
        let subscribed = self.subscribed.lock_unpoisoned().clone();
        self.lags
            .lock_unpoisoned()
            .retain(|c, _| subscribed.contains(c));
        for k in stuck {
            self.kick(k);
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
