//! Channel shards: an instance receives only the channels it needs.
//!
//! Channels are spread by a stable hash over `pubsub_shards` topics
//! (`<topic>-c<k>`); everything about a channel (publication requests,
//! the sequencer's claims and numbered copies, join/leave, history
//! fetches) travels on its shard's topic under the ordering key
//! `c:<channel>`. The control topic (`<topic>`) carries what every instance
//! needs: broadcast, direct messages and the presence gossip.
//!
//! An instance subscribes to a shard (`<subscription>-c<k>`, created fresh)
//! when it first needs it:
//!
//! * a local client subscribes to one of its channels (held while any
//!   does);
//! * it publishes to, or reads the history of, one of its channels (held
//!   for the call: the publication's numbered copy comes back there);
//! * it sequences one of its channels (held while it does; see
//!   [`sequencer`](super::sequencer)).
//!
//! A shard nothing has needed for `presence_ttl` is left: its stream stops,
//! its subscription is deleted and what this instance held of its channels
//! (history, channel logs) is forgotten — reopened later, it starts afresh
//! and fetches what it lacks from the sequencer ([`fetch`](super::fetch)).
//! The first use of a shard costs a subscription creation and a stream
//! opening (a few milliseconds on the emulator, up to about a second on
//! Google Cloud); at most `pubsub_shards` subscriptions per instance exist.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use gcloud_pubsub::publisher::Publisher;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Inner, Route, publisher_config};
use crate::error::Result;
use crate::sync::MutexExt;

/// The shard of `channel` among `count`: FNV-1a of its name (the same on
/// every instance and every build).
pub(super) fn shard_of(channel: &str, count: u16) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in channel.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Mix the high bits in: the low bits of FNV-1a alone spread short
    // names with a common prefix poorly.
    h ^= h >> 29;
    (h % u64::from(count.max(1))) as u16
}

/// One channel shard: its topic, this instance's subscription to it and
/// whether that is open.
pub(super) struct Shard {
    /// Topic id, `<topic>-c<k>`.
    pub(super) topic_id: String,
    /// This instance's subscription, `<subscription>-c<k>` (renamed when
    /// it stalls, see [`stall`](super::stall)).
    pub(super) subscription: super::stall::Named,
    /// Made on first send (a publisher runs a task).
    publisher: OnceLock<Publisher>,
    /// Leaving takes it exclusively, so a caller that marked its need (a
    /// subscribed channel, a use) and then found the shard open keeps it
    /// open; opening takes it exclusively too.
    gate: tokio::sync::RwLock<()>,
    /// Short sections only.
    pub(super) state: Mutex<ShardState>,
}

/// What changes while a shard lives.
#[derive(Default)]
pub(super) struct ShardState {
    /// The subscription exists and a reader runs (or reconnects).
    pub(super) open: bool,
    /// The reader's stream is established.
    pub(super) up: bool,
    /// Since when the stream has been down (while open).
    pub(super) down_since: Option<Instant>,
    /// The subscribers were told of this outage (see
    /// [`stall`](super::stall)).
    pub(super) stall_told: bool,
    /// Its subscription was replaced for this outage.
    pub(super) stall_renamed: bool,
    /// Calls in flight that need the shard (publishes, history reads).
    users: usize,
    /// Since when nothing has needed the shard.
    idle_since: Option<Instant>,
    /// Ends the reader.
    stop: Option<CancellationToken>,
    /// Ends the reader's current stream (a child of `stop`), so that its
    /// subscription is replaced (see [`stall`](super::stall)).
    pub(super) kick: Option<CancellationToken>,
    /// The next reconnection replaces the subscription.
    pub(super) renew: bool,
}

impl ShardState {
    /// The reader's stream went up or down.
    pub(super) fn set_up(&mut self, up: bool) {
        self.up = up;
        if up {
            self.down_since = None;
            self.stall_told = false;
            self.stall_renamed = false;
        } else if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
        }
    }
}

impl Shard {
    pub(super) fn new(
        client: &gcloud_pubsub::client::Client,
        topic: &str,
        sub: &str,
        k: u16,
    ) -> Shard {
        Shard {
            topic_id: format!("{topic}-c{k}"),
            subscription: super::stall::Named::new(client, format!("{sub}-c{k}")),
            publisher: OnceLock::new(),
            gate: tokio::sync::RwLock::new(()),
            state: Mutex::default(),
        }
    }

    pub(super) fn publisher(&self, client: &gcloud_pubsub::client::Client) -> &Publisher {
        self.publisher.get_or_init(|| {
            client
                .topic(&self.topic_id)
                .new_publisher(Some(publisher_config()))
        })
    }
}

/// A call's hold on a shard: released on drop.
pub(super) struct ShardUse {
    inner: Arc<Inner>,
    k: u16,
}

impl Drop for ShardUse {
    fn drop(&mut self) {
        let mut st = self.inner.shards[self.k as usize].state.lock_unpoisoned();
        st.users = st.users.saturating_sub(1);
    }
}

impl Inner {
    /// The shard `channel` travels on.
    pub(super) fn shard_for(&self, channel: &str) -> u16 {
        shard_of(channel, self.shards.len() as u16)
    }

    /// Hold `channel`'s shard for a call, opening it if needed.
    pub(super) async fn use_shard(self: &Arc<Self>, channel: &str) -> Result<ShardUse> {
        let k = self.shard_for(channel);
        self.shards[k as usize].state.lock_unpoisoned().users += 1;
        let held = ShardUse {
            inner: self.clone(),
            k,
        };
        self.open_shard(k).await?;
        Ok(held)
    }

    /// Open shard `k` (subscription, stream, reader) unless it is open.
    /// The caller has marked its need first (see [`Shard::gate`]).
    pub(super) async fn open_shard(self: &Arc<Self>, k: u16) -> Result<()> {
        let shard = &self.shards[k as usize];
        {
            let _read = shard.gate.read().await;
            if shard.state.lock_unpoisoned().open {
                return Ok(());
            }
        }
        let _gate = shard.gate.write().await;
        if shard.state.lock_unpoisoned().open {
            return Ok(());
        }
        let route = Route::Shard(k);
        self.ensure_subscription(route, true).await?;
        let (stream, _) = self.open_or_replace(route).await?;
        let stop = self.shutdown.child_token();
        {
            let mut st = shard.state.lock_unpoisoned();
            st.open = true;
            st.set_up(true);
            st.idle_since = None;
            st.stop = Some(stop.clone());
        }
        self.shards_open.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(shard = k, "pub/sub shard opened");
        tokio::spawn(self.clone().receive_loop(route, stream, stop));
        Ok(())
    }

    /// Whether shard `k` is needed beyond the calls in flight: a local
    /// subscriber or a channel this instance sequences is on it.
    fn shard_needed(&self, k: u16) -> bool {
        let count = self.shards.len() as u16;
        let subscribed = self
            .subscribed
            .lock_unpoisoned()
            .iter()
            .any(|c| shard_of(c, count) == k);
        subscribed || self.sequences_on(|c| shard_of(c, count) == k)
    }

    /// From the heartbeat: leave the shards nothing has needed for
    /// `presence_ttl`.
    pub(super) fn sweep_shards(self: &Arc<Self>, now: Instant) {
        for k in 0..self.shards.len() as u16 {
            let shard = &self.shards[k as usize];
            let idle = {
                let st = shard.state.lock_unpoisoned();
                st.open && st.users == 0
            };
            let idle = idle && !self.shard_needed(k);
            let mut st = shard.state.lock_unpoisoned();
            if !idle {
                st.idle_since = None;
                continue;
            }
            let since = *st.idle_since.get_or_insert(now);
            if now.duration_since(since) >= self.presence_ttl {
                st.idle_since = None;
                drop(st);
                tokio::spawn(self.clone().leave_shard(k));
            }
        }
    }

    /// Leave shard `k` if nothing needs it: stop its reader, delete its
    /// subscription, forget its channels.
    async fn leave_shard(self: Arc<Self>, k: u16) {
        let shard = &self.shards[k as usize];
        let _gate = shard.gate.write().await;
        let needed = self.shard_needed(k);
        {
            let mut st = shard.state.lock_unpoisoned();
            if !st.open || st.users > 0 || needed {
                return;
            }
            st.open = false;
            st.set_up(false);
            st.down_since = None;
            st.renew = false;
            if let Some(stop) = st.stop.take() {
                stop.cancel();
            }
        }
        self.shards_open.fetch_sub(1, Ordering::Relaxed);
        self.forget_shard(k);
        if let Err(e) = self.delete_subscription(Route::Shard(k)).await {
            tracing::debug!(error = %e, shard = k, "pub/sub shard subscription not deleted (it expires by itself)");
        }
        tracing::debug!(shard = k, "pub/sub shard left");
    }

    /// Forget what this instance holds of shard `k`'s channels (history,
    /// channel logs): left, or its subscription recreated.
    pub(super) fn forget_shard(self: &Arc<Self>, k: u16) {
        let count = self.shards.len() as u16;
        self.streams.forget_where(|c| shard_of(c, count) == k);
        self.reset_sequencer(|c| shard_of(c, count) == k);
    }
}

#[cfg(test)]
mod tests {
    use super::shard_of;

    #[test]
    fn channels_spread_evenly_over_the_shards() {
        let mut counts = [0u32; 32];
        for i in 0..10_000 {
            counts[shard_of(&format!("chat:room-{i}"), 32) as usize] += 1;
        }
        // 312.5 per shard on average: each within ±20 %.
        for c in counts {
            assert!((250..=375).contains(&c), "{counts:?}");
        }
        assert_eq!(shard_of("x", 1), 0);
        assert_eq!(shard_of("room", 32), shard_of("room", 32));
    }
}
