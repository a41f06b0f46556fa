//! The in-memory broker and presence store: one instance, nothing to
//! connect to. The default bus.
//!
//! Channel streams live in the bounded [`history`](super::history) store
//! (shared with the Pub/Sub bus's per-instance history): each has an
//! epoch, the newest offset and the retained publications. Publishing
//! takes the stream's lock, appends and hands the publication to the
//! handler before releasing it, which is what makes "append + deliver"
//! atomic and ordered per channel. The handler only queues frames, so the
//! lock is held for microseconds.
//!
//! What the store bounds, whatever clients publish:
//!
//! * publications are freed within about a second of their `history_ttl`,
//!   whether or not their channel is used again;
//! * retained bytes stay within `history_max_bytes` (data + 128 bytes per
//!   publication) and streams within `history_max_channels`; beyond, the
//!   least recently published channels are evicted, and their next
//!   publication starts a new epoch (a client recovering from the old one
//!   gets `recovered:false`);
//! * an empty stream (everything expired, or history off) remembers its
//!   epoch and offset for [`STREAM_IDLE_EXPIRY`] after its last
//!   publication, counted against the channel budget;
//! * reading a channel that has no stream (history, position, recovery)
//!   answers offset 0 and the epoch its first publication will have, and
//!   creates nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;

use super::history::HistoryStats;
use super::history::{HistoryLimits, Store};
use super::{
    Broker, BrokerHandler, Control, Direct, HistoryOptions, HistoryResult, NewPublication,
    PresenceStore,
};
use crate::error::Result;
use crate::protocol::{ClientInfo, StreamPosition};
use crate::sync::MutexExt;

pub use super::history::STREAM_IDLE_EXPIRY;

/// The in-memory [`Broker`].
pub struct MemoryBroker {
    /// Set once by `start`; every delivery goes through it.
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// The channels' streams, within the history budget.
    streams: Arc<Store>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::with_limits(HistoryLimits::default())
    }
}

impl MemoryBroker {
    /// A broker with the default history budget.
    pub fn new() -> Self {
        Self::default()
    }

    /// A broker whose history stays within `limits`.
    pub fn with_limits(limits: HistoryLimits) -> Self {
        MemoryBroker {
            handler: OnceLock::new(),
            streams: Store::new(limits, ""),
        }
    }

    fn handler(&self) -> &Arc<dyn BrokerHandler> {
        self.handler
            .get()
            .expect("MemoryBroker::start must be called before use")
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> Result<()> {
        let _ = self.handler.set(handler);
        self.streams.spawn_sweeper();
        Ok(())
    }

    async fn subscribe(&self, _channel: &str) -> Result<()> {
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &str) -> Result<()> {
        Ok(())
    }

    async fn publish(
        &self,
        channel: &str,
        publication: NewPublication,
        history: HistoryOptions,
    ) -> Result<StreamPosition> {
        let handler = self.handler();
        // Delivered inside the stream lock: this is the per-channel order.
        self.streams
            .publish(channel, publication, history, |channel, epoch, p| {
                handler.on_publication(channel, epoch, p)
            })
    }

    async fn publish_control(&self, control: Control) -> Result<()> {
        self.handler().on_control(&control);
        Ok(())
    }

    async fn direct(&self, direct: Direct) -> Result<bool> {
        Ok(self.handler().on_direct(&direct))
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        newest_first: bool,
        history: HistoryOptions,
    ) -> Result<HistoryResult> {
        Ok(self
            .streams
            .read(channel, since, limit, newest_first, history))
    }

    fn history_stats(&self) -> Option<Arc<HistoryStats>> {
        Some(self.streams.stats().clone())
    }
}

/// Client id → info, for one channel.
type Members = HashMap<Arc<str>, ClientInfo>;

/// The in-memory [`PresenceStore`].
#[derive(Default)]
pub struct MemoryPresence {
    /// Channel → client id → info. Empty channels are removed.
    channels: Mutex<HashMap<Arc<str>, Members>>,
}

impl MemoryPresence {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl PresenceStore for MemoryPresence {
    async fn add(&self, channel: &str, info: &ClientInfo) -> Result<()> {
        let mut map = self.channels.lock_unpoisoned();
        map.entry(Arc::from(channel))
            .or_default()
            .insert(info.client_id.clone(), info.clone());
        Ok(())
    }

    async fn remove(&self, channel: &str, client_id: &str) -> Result<()> {
        let mut map = self.channels.lock_unpoisoned();
        if let Some(members) = map.get_mut(channel) {
            members.remove(client_id);
            if members.is_empty() {
                map.remove(channel);
            }
        }
        Ok(())
    }

    async fn members(&self, channel: &str) -> Result<Vec<ClientInfo>> {
        let map = self.channels.lock_unpoisoned();
        let mut members: Vec<ClientInfo> = map
            .get(channel)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        members.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        Ok(members)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    use tokio::time::Instant;

    use super::super::history::{ENTRY_OVERHEAD, SWEEP_INTERVAL};
    use super::*;
    use crate::protocol::Publication;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, u64)>>);
    impl BrokerHandler for Recorder {
        fn on_publication(&self, channel: &Arc<str>, _e: &Arc<str>, p: &Publication) {
            self.0.lock().unwrap().push((channel.to_string(), p.offset));
        }
        fn on_control(&self, _c: &Control) {}
        fn on_direct(&self, _d: &Direct) -> bool {
            false
        }
        fn position(&self, _channel: &str) -> Option<StreamPosition> {
            None
        }
        fn positions(&self) -> Vec<(Arc<str>, Option<StreamPosition>)> {
            Vec::new()
        }
        fn resync_failed(&self, _channel: &str) {}
    }

    fn new_pub() -> NewPublication {
        NewPublication {
            data: serde_json::from_str("1").unwrap(),
            sender_id: None,
            timestamp: 0,
            conditions: Default::default(),
        }
    }

    const OPTS: HistoryOptions = HistoryOptions {
        size: 3,
        ttl: Duration::from_secs(10),
    };

    #[tokio::test(start_paused = true)]
    async fn offsets_history_size_and_ttl() {
        let b = MemoryBroker::new();
        let rec = Arc::new(Recorder::default());
        b.start(rec.clone()).await.unwrap();
        for _ in 0..5 {
            b.publish("c", new_pub(), OPTS).await.unwrap();
        }
        let offsets: Vec<u64> = rec.0.lock().unwrap().iter().map(|r| r.1).collect();
        assert_eq!(offsets, vec![1, 2, 3, 4, 5]);
        let h = b.history("c", None, 100, false, OPTS).await.unwrap();
        assert_eq!(h.top.offset, 5);
        let kept: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
        assert_eq!(kept, vec![3, 4, 5], "trimmed to the history size");
        let since = StreamPosition {
            epoch: h.top.epoch.clone(),
            offset: 3,
        };
        let h2 = b.history("c", Some(&since), 1, false, OPTS).await.unwrap();
        assert_eq!(h2.publications.len(), 1);
        assert_eq!(h2.publications[0].offset, 4);
        tokio::time::advance(Duration::from_secs(11)).await;
        let h3 = b.history("c", None, 100, false, OPTS).await.unwrap();
        assert!(h3.publications.is_empty(), "expired by TTL");
        assert_eq!(h3.top.offset, 5, "the offset survives expiry");
        let stale = StreamPosition {
            epoch: "other".into(),
            offset: 1,
        };
        let h4 = b
            .history("c", Some(&stale), 100, false, OPTS)
            .await
            .unwrap();
        assert!(h4.publications.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn keys_hold_for_their_window_within_the_budget() {
        use super::super::history::KEY_OVERHEAD;
        use crate::broker::PublishConditions;
        let b = MemoryBroker::new();
        b.start(Arc::new(Recorder::default())).await.unwrap();
        let keyed = |expected| NewPublication {
            conditions: PublishConditions {
                idempotency_key: Some("k".into()),
                idempotency_window: Duration::from_secs(60),
                expected_offset: expected,
            },
            ..new_pub()
        };
        let first = b.publish("c", keyed(Some(0)), OPTS).await.unwrap();
        let stats = b.streams.stats().clone();
        assert_eq!(
            stats.bytes.load(Relaxed),
            (1 + ENTRY_OVERHEAD + 1 + KEY_OVERHEAD) as u64,
            "the key counts against the budget"
        );
        // A duplicate wins over a stale expectation and appends nothing.
        let again = b.publish("c", keyed(Some(0)), OPTS).await.unwrap();
        assert_eq!(again, first);
        let h = b.history("c", None, 10, false, OPTS).await.unwrap();
        assert_eq!(h.top.offset, 1);
        let stale = NewPublication {
            conditions: PublishConditions {
                expected_offset: Some(0),
                ..Default::default()
            },
            ..new_pub()
        };
        match b.publish("c", stale, OPTS).await {
            Err(crate::error::Error::Client(e)) => assert_eq!(e.position, Some(first.clone())),
            other => panic!("{other:?}"),
        }
        let elsewhere = NewPublication {
            conditions: PublishConditions {
                expected_offset: Some(3),
                ..Default::default()
            },
            ..new_pub()
        };
        assert!(b.publish("none", elsewhere, OPTS).await.is_err());
        assert_eq!(stats.streams.load(Relaxed), 1, "a refusal creates nothing");
        tokio::time::advance(Duration::from_secs(61)).await;
        let later = b.publish("c", keyed(None), OPTS).await.unwrap();
        assert_eq!(later.offset, 2, "the window has passed");
        let newest = b.history("c", None, 1, true, OPTS).await.unwrap();
        let offsets: Vec<u64> = newest.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, vec![2]);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_empty_streams_are_forgotten_with_a_new_epoch() {
        let b = MemoryBroker::new();
        b.start(Arc::new(Recorder::default())).await.unwrap();
        let first = b.publish("c", new_pub(), OPTS).await.unwrap();
        tokio::time::advance(STREAM_IDLE_EXPIRY + Duration::from_secs(2)).await;
        b.streams.sweep(Instant::now());
        assert_eq!(b.streams.stats().streams.load(Relaxed), 0);
        let second = b.publish("c", new_pub(), OPTS).await.unwrap();
        assert_ne!(first.epoch, second.epoch);
        assert_eq!(second.offset, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn reads_create_nothing_and_announce_the_first_epoch() {
        let b = MemoryBroker::new();
        b.start(Arc::new(Recorder::default())).await.unwrap();
        let h = b.history("new", None, 10, false, OPTS).await.unwrap();
        assert_eq!(h.top.offset, 0);
        assert!(h.publications.is_empty());
        assert_eq!(b.streams.stats().streams.load(Relaxed), 0, "nothing kept");
        let again = b.history("new", None, 10, false, OPTS).await.unwrap();
        assert_eq!(again.top, h.top, "the same answer every time");
        let first = b.publish("new", new_pub(), OPTS).await.unwrap();
        assert_eq!(
            first.epoch, h.top.epoch,
            "the epoch announced is the first one"
        );
        assert_eq!(first.offset, 1);
        let other = b.history("other", None, 10, false, OPTS).await.unwrap();
        assert_ne!(other.top.epoch, h.top.epoch);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_publications_are_freed_without_another_use() {
        let b = MemoryBroker::new();
        b.start(Arc::new(Recorder::default())).await.unwrap();
        for i in 0..20 {
            b.publish(&format!("c{i}"), new_pub(), OPTS).await.unwrap();
        }
        let stats = b.streams.stats().clone();
        assert_eq!(stats.channels.load(Relaxed), 20);
        assert_eq!(stats.bytes.load(Relaxed), 20 * (1 + ENTRY_OVERHEAD as u64));
        // The sweeper task runs on its own as the paused clock advances.
        tokio::time::sleep(OPTS.ttl + SWEEP_INTERVAL * 2).await;
        assert_eq!(stats.bytes.load(Relaxed), 0);
        assert_eq!(stats.channels.load(Relaxed), 0);
        assert_eq!(stats.streams.load(Relaxed), 20, "offsets remembered");
        let h = b.history("c3", None, 10, false, OPTS).await.unwrap();
        assert_eq!(h.top.offset, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_evicts_the_least_recently_published() {
        let per = 1 + ENTRY_OVERHEAD;
        let b = MemoryBroker::with_limits(HistoryLimits {
            max_bytes: 10 * per,
            max_channels: 3,
        });
        b.start(Arc::new(Recorder::default())).await.unwrap();
        let a = b.publish("a", new_pub(), OPTS).await.unwrap();
        b.publish("b", new_pub(), OPTS).await.unwrap();
        b.publish("c", new_pub(), OPTS).await.unwrap();
        b.publish("a", new_pub(), OPTS).await.unwrap(); // a is recent again
        b.publish("d", new_pub(), OPTS).await.unwrap(); // evicts b
        let stats = b.streams.stats().clone();
        assert_eq!(stats.evictions.load(Relaxed), 1);
        assert_eq!(stats.streams.load(Relaxed), 3);
        let gone = b.history("b", None, 10, false, OPTS).await.unwrap();
        assert_eq!(gone.top.offset, 0, "evicted");
        let kept = b.history("a", None, 10, false, OPTS).await.unwrap();
        assert_eq!(
            (kept.top.epoch.clone(), kept.top.offset),
            (a.epoch.clone(), 2)
        );
        // Bytes: 3 channels × 3 publications = 9 units, the 11th evicts.
        for ch in ["a", "c", "d"] {
            for _ in 0..3 {
                b.publish(ch, new_pub(), OPTS).await.unwrap();
            }
        }
        assert!(stats.bytes.load(Relaxed) as usize <= 10 * per);
        assert_eq!(stats.evictions.load(Relaxed), 1, "9 units fit");
        b.publish("e", new_pub(), OPTS).await.unwrap();
        b.publish("e", new_pub(), OPTS).await.unwrap();
        assert!(stats.bytes.load(Relaxed) as usize <= 10 * per);
        assert!(stats.evictions.load(Relaxed) >= 2);
        // A stream forgotten and started again has a new epoch.
        let b_again = b.publish("b", new_pub(), OPTS).await.unwrap();
        assert_eq!(b_again.offset, 1);
        let since = StreamPosition {
            epoch: a.epoch.clone(),
            offset: 1,
        };
        let stale = b.history("a", Some(&since), 10, false, OPTS).await.unwrap();
        assert!(stale.top.epoch != a.epoch || !stale.publications.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn internal_channels_are_delivered_without_a_stream() {
        let b = MemoryBroker::new();
        let rec = Arc::new(Recorder::default());
        b.start(rec.clone()).await.unwrap();
        for i in 0..10 {
            b.publish(&format!("#user:u{i}"), new_pub(), OPTS)
                .await
                .unwrap();
        }
        assert_eq!(rec.0.lock().unwrap().len(), 10, "delivered");
        assert_eq!(b.streams.stats().streams.load(Relaxed), 0, "kept nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn one_stream_over_the_byte_budget_loses_its_oldest() {
        let per = 1 + ENTRY_OVERHEAD;
        let b = MemoryBroker::with_limits(HistoryLimits {
            max_bytes: 2 * per,
            max_channels: 10,
        });
        b.start(Arc::new(Recorder::default())).await.unwrap();
        let opts = HistoryOptions {
            size: 10,
            ttl: Duration::from_secs(10),
        };
        for _ in 0..5 {
            b.publish("big", new_pub(), opts).await.unwrap();
        }
        let h = b.history("big", None, 10, false, opts).await.unwrap();
        let kept: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
        assert_eq!(kept, vec![4, 5]);
        assert_eq!(h.top.offset, 5, "same stream, same epoch");
    }
}
