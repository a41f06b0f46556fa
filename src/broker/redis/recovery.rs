//! Replaying what this instance missed, and catching a publication that
//! un-happened.
//!
//! After an outage (a reconnection, a cluster failover) each local
//! channel's gap is read from its stream after the position delivered here
//! and handed over ([`Inner::replay_channel`]); when history cannot cover
//! it, the channel's subscribers are asked to resubscribe
//! (`resync_failed`: close 1012, then `recovered:false`).
//!
//! A publication can also un-happen. A cluster master that dies before
//! its replica received a write may already have sent it to subscribers
//! (its publisher was not acked: `replication.rs`); a Redis restarted from
//! an `appendfsync everysec` file lacks its last second. The stream then
//! goes on from an earlier offset in the same epoch, and the next
//! publications reuse offsets that subscribers already hold: sessions drop
//! them as duplicates, and a client resuming from such an offset is told
//! `recovered:true`. Nobody would be told of the gap.
//!
//! So each instance keeps a digest of the last [`RECENT`] publications it
//! delivered per channel ([`Delivered`]). The history is *rewritten* when
//! a publication arrives (live, or in a replay) at an offset already
//! delivered here with another digest, or when the stream's top in the
//! same epoch is below the position delivered here. Then the instance:
//!
//! 1. moves the channel to a new epoch (`scripts/new_epoch.lua`, only if
//!    it is still in the old one: the first instance to find out does it);
//! 2. then asks its subscribers to resubscribe.
//!
//! Each of them resumes with `recovered:false`, and so does any client
//! that holds a position of the old epoch, wherever it reconnects later.
//! Subscribers elsewhere learn of the new epoch with the next
//! publication (the clients treat an epoch change on a live message as a
//! gap).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::{HistoryOptions, HistoryResult, Inner, bus_error};
use crate::broker::BrokerHandler;
use crate::error::Result;
use crate::ids::random_base36;
use crate::protocol::{Publication, StreamPosition};
use crate::sync::MutexExt;

/// Publications remembered per channel.
pub(super) const RECENT: usize = 8;

/// The last publications delivered here, per channel with local
/// subscribers (forgotten when the last one leaves).
#[derive(Default)]
pub(super) struct Delivered {
    channels: Mutex<HashMap<Arc<str>, Recent>>,
}

/// One channel's recent deliveries.
struct Recent {
    /// Their epoch (a new one starts afresh).
    epoch: Arc<str>,
    /// `(offset, digest)`, oldest first, at most [`RECENT`].
    digests: VecDeque<(u64, u64)>,
}

impl Delivered {
    /// Note that `p` was delivered at `epoch`; `false` when its offset was
    /// delivered before with another digest (the history was rewritten).
    pub(super) fn record(&self, channel: &Arc<str>, epoch: &Arc<str>, p: &Publication) -> bool {
        let digest = digest(p);
        let mut channels = self.channels.lock_unpoisoned();
        let recent = channels.entry(channel.clone()).or_insert_with(|| Recent {
            epoch: epoch.clone(),
            digests: VecDeque::with_capacity(RECENT),
        });
        if recent.epoch != *epoch {
            recent.epoch = epoch.clone();
            recent.digests.clear();
        }
        if let Some(&(_, seen)) = recent.digests.iter().find(|(o, _)| *o == p.offset) {
            return seen == digest;
        }
        if recent.digests.back().is_none_or(|&(o, _)| p.offset > o) {
            if recent.digests.len() == RECENT {
                recent.digests.pop_front();
            }
            recent.digests.push_back((p.offset, digest));
        }
        true
    }

    /// What was delivered of `channel` at `epoch`, up to `until`.
    fn recent(&self, channel: &str, epoch: &str, until: u64) -> Vec<(u64, u64)> {
        self.channels
            .lock_unpoisoned()
            .get(channel)
            .filter(|r| &*r.epoch == epoch)
            .map(|r| {
                r.digests
                    .iter()
                    .copied()
                    .filter(|&(o, _)| o <= until)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The last local subscriber of `channel` left.
    pub(super) fn forget(&self, channel: &str) {
        self.channels.lock_unpoisoned().remove(channel);
    }

    /// Keep only the channels `subscribed` here (a publication that
    /// arrived just after its channel's last unsubscribe left an entry).
    pub(super) fn retain(&self, subscribed: impl Fn(&str) -> bool) {
        self.channels.lock_unpoisoned().retain(|c, _| subscribed(c));
    }
}

/// A publication's identity: FNV-1a over its data, sender and timestamp.
pub(super) fn digest(p: &Publication) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(p.data.get().as_bytes());
    eat(&[0xff]);
    eat(p.sender_id.as_deref().unwrap_or("").as_bytes());
    eat(&[0xff]);
    eat(&p.timestamp.to_le_bytes());
    h
}

impl Inner {
    /// After a reconnection: fill each local channel's gap from history, or
    /// ask its subscribers to resync.
    pub(super) async fn replay(&self) -> Result<()> {
        let Some(handler) = self.handler().cloned() else {
            return Ok(());
        };
        for (channel, last) in handler.positions() {
            self.replay_channel(&*handler, &channel, last).await?;
        }
        Ok(())
    }

    /// A live publication reused an offset delivered here: check the
    /// channel against its history (one Redis; a cluster does it through
    /// its gap replay).
    pub(super) async fn verify(&self, channel: &Arc<str>) -> Result<()> {
        let Some(handler) = self.handler().cloned() else {
            return Ok(());
        };
        let last = handler.position(channel);
        self.replay_channel(&*handler, channel, last).await
    }

    /// Fill one channel's gap after `last` from history, or ask its
    /// subscribers to resync; a rewritten history (module docs) first
    /// moves the channel to a new epoch.
    pub(super) async fn replay_channel(
        &self,
        handler: &dyn BrokerHandler,
        channel: &Arc<str>,
        last: Option<StreamPosition>,
    ) -> Result<()> {
        let Some(opts) = self.config.namespace_of(channel) else {
            return Ok(());
        };
        let opts = HistoryOptions {
            size: opts.history_size,
            ttl: opts.history_ttl,
        };
        let Some(last) = last else {
            // Nothing delivered since the subscription: hand over what is
            // retained; sessions drop what they already have.
            let h = self
                .read_history(channel, None, usize::MAX, false, opts)
                .await?;
            for p in &h.publications {
                self.deliver(handler, channel, &h.top.epoch, p);
            }
            return Ok(());
        };
        // Read from the oldest publication remembered, to compare them.
        let recent = self.delivered.recent(channel, &last.epoch, last.offset);
        let from = StreamPosition {
            epoch: last.epoch.clone(),
            offset: recent
                .first()
                .map_or(last.offset, |&(o, _)| o.saturating_sub(1)),
        };
        let h = self
            .read_history(channel, Some(&from), usize::MAX, false, opts)
            .await?;
        if h.top.epoch == last.epoch {
            let differs = recent.iter().any(|&(offset, seen)| {
                h.publications
                    .iter()
                    .find(|p| p.offset == offset)
                    .is_some_and(|p| digest(p) != seen)
            });
            if h.top.offset < last.offset || differs {
                tracing::warn!(%channel, epoch = %last.epoch, delivered = last.offset, top = h.top.offset,
                    "the channel's history was rewritten under its subscribers (a write lost by Redis); moving it to a new epoch");
                self.new_epoch(channel, &last.epoch).await?;
                handler.resync_failed(channel);
                return Ok(());
            }
        }
        let missed = HistoryResult {
            publications: h
                .publications
                .into_iter()
                .filter(|p| p.offset > last.offset)
                .collect(),
            top: h.top,
        };
        if !missed.covers(&last, None) {
            handler.resync_failed(channel);
            return Ok(());
        }
        if !missed.publications.is_empty() {
            tracing::info!(%channel, missed = missed.publications.len(), "replaying publications missed during a bus outage");
        }
        for p in &missed.publications {
            self.deliver(handler, channel, &missed.top.epoch, p);
        }
        Ok(())
    }

    /// Hand a replayed publication over, remembering it.
    fn deliver(
        &self,
        handler: &dyn BrokerHandler,
        channel: &Arc<str>,
        epoch: &Arc<str>,
        p: &Publication,
    ) {
        self.delivered.record(channel, epoch, p);
        handler.on_publication(channel, epoch, p);
    }

    /// Move `channel` to a new epoch if it is still in `epoch`.
    async fn new_epoch(&self, channel: &str, epoch: &str) -> Result<()> {
        let mut conn = self.conn()?;
        let _moved: u8 = self
            .scripts
            .new_epoch
            .key(self.keys.meta(channel))
            .arg(epoch)
            .arg(random_base36(8))
            .invoke_async(&mut conn)
            .await
            .map_err(bus_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn publication(offset: u64, data: &str) -> Publication {
        Publication {
            offset,
            data: Arc::from(RawValue::from_string(data.into()).expect("json")),
            sender_id: None,
            timestamp: 1,
        }
    }

    #[test]
    fn an_offset_delivered_with_other_content_is_a_rewrite() {
        let d = Delivered::default();
        let (ch, e): (Arc<str>, Arc<str>) = ("c".into(), "E".into());
        assert!(d.record(&ch, &e, &publication(1, "1")));
        assert!(d.record(&ch, &e, &publication(2, "\"phantom\"")));
        assert!(
            d.record(&ch, &e, &publication(2, "\"phantom\"")),
            "a plain duplicate"
        );
        assert!(
            !d.record(&ch, &e, &publication(2, "\"real\"")),
            "other content"
        );
        assert!(
            d.record(&ch, &"F".into(), &publication(2, "\"real\"")),
            "a new epoch starts afresh"
        );
    }

    #[test]
    fn only_the_last_few_are_kept() {
        let d = Delivered::default();
        let (ch, e): (Arc<str>, Arc<str>) = ("c".into(), "E".into());
        for o in 1..=20 {
            d.record(&ch, &e, &publication(o, &o.to_string()));
        }
        let kept = d.recent("c", "E", 20);
        assert_eq!(kept.len(), RECENT);
        assert_eq!(kept.first().map(|k| k.0), Some(20 - RECENT as u64 + 1));
        assert!(d.recent("c", "other", 20).is_empty());
        d.forget("c");
        assert!(d.recent("c", "E", 20).is_empty());
    }
}
