//! The in-memory broker and presence store: one instance, nothing to
//! connect to. The default bus.
//!
//! Each channel has a stream: an epoch chosen at random when the stream is
//! created, the newest offset, and the retained publications, trimmed by
//! count and age. Publishing takes the stream's lock, appends and hands the
//! publication to the handler before releasing it, which is what makes
//! "append + deliver" atomic and ordered per channel. The handler only
//! queues frames, so the lock is held for microseconds.
//!
//! A stream with nothing retained that has seen no publication for
//! [`STREAM_IDLE_EXPIRY`] is forgotten; its next publication starts a new
//! epoch. That bounds the memory of channels that are no longer used.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{
    Broker, BrokerHandler, Control, Direct, HistoryOptions, HistoryResult, NewPublication,
    PresenceStore,
};
use crate::config::random_base36;
use crate::error::Result;
use crate::protocol::{ClientInfo, Publication, StreamPosition};

/// How long an empty, unused stream's epoch and offset are remembered.
pub const STREAM_IDLE_EXPIRY: Duration = Duration::from_secs(3600);

/// One channel's stream held in this process: the memory broker's, and
/// the Pub/Sub bus's per-instance history.
#[derive(Debug)]
pub(crate) struct Stream {
    /// Names this incarnation of the stream.
    pub(crate) epoch: Arc<str>,
    /// Offset of the newest publication; 0 before the first.
    pub(crate) top: u64,
    /// Retained publications, oldest first, each with its expiry.
    pub(crate) retained: VecDeque<(Instant, Publication)>,
    /// Last publication time, for forgetting idle streams.
    pub(crate) touched: Instant,
}

impl Stream {
    fn new() -> Self {
        Stream::with_epoch(random_base36(8).into())
    }

    /// An empty stream named `epoch`.
    pub(crate) fn with_epoch(epoch: Arc<str>) -> Self {
        Stream {
            epoch,
            top: 0,
            retained: VecDeque::new(),
            touched: Instant::now(),
        }
    }

    /// Retained publications after `since` (all without it), at most
    /// `limit`; none when `since` is of another epoch.
    pub(crate) fn after(&self, since: Option<&StreamPosition>, limit: usize) -> Vec<Publication> {
        match since {
            Some(since) if since.epoch != self.epoch => Vec::new(),
            _ => {
                let after = since.map_or(0, |p| p.offset);
                self.retained
                    .iter()
                    .map(|(_, p)| p)
                    .filter(|p| p.offset > after)
                    .take(limit)
                    .cloned()
                    .collect()
            }
        }
    }

    /// Drop what is beyond `size` or expired at `now`.
    pub(crate) fn trim(&mut self, size: usize, now: Instant) {
        while self.retained.len() > size {
            self.retained.pop_front();
        }
        while self.retained.front().is_some_and(|(exp, _)| *exp <= now) {
            self.retained.pop_front();
        }
    }

    /// The stream's top.
    pub(crate) fn position(&self) -> StreamPosition {
        StreamPosition {
            epoch: self.epoch.clone(),
            offset: self.top,
        }
    }
}

/// Channel name → its stream.
type Streams = Mutex<HashMap<Arc<str>, Arc<Mutex<Stream>>>>;

/// The in-memory [`Broker`].
#[derive(Default)]
pub struct MemoryBroker {
    /// Set once by `start`; every delivery goes through it.
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// Channel name → stream. The map lock is only held to find or create
    /// a stream; each stream has its own lock for append + deliver.
    streams: Arc<Streams>,
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }

    fn handler(&self) -> &Arc<dyn BrokerHandler> {
        self.handler
            .get()
            .expect("MemoryBroker::start must be called before use")
    }

    fn stream(&self, channel: &str) -> Arc<Mutex<Stream>> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = streams.get(channel) {
            return s.clone();
        }
        let s = Arc::new(Mutex::new(Stream::new()));
        streams.insert(Arc::from(channel), s.clone());
        s
    }

    /// Forget streams that retain nothing and were idle for `idle`.
    fn sweep(streams: &Streams, idle: Duration) {
        let now = Instant::now();
        let mut streams = streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.retain(|_, s| {
            let s = s.lock().unwrap_or_else(|p| p.into_inner());
            let empty = s.retained.iter().all(|(exp, _)| *exp <= now);
            !(empty && now.duration_since(s.touched) >= idle)
        });
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> Result<()> {
        let _ = self.handler.set(handler);
        let weak: Weak<Streams> = Arc::downgrade(&self.streams);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(streams) = weak.upgrade() else { break };
                MemoryBroker::sweep(&streams, STREAM_IDLE_EXPIRY);
            }
        });
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
        let stream = self.stream(channel);
        let channel: Arc<str> = Arc::from(channel);
        let mut s = stream.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        s.top += 1;
        s.touched = now;
        let publication = Publication {
            offset: s.top,
            data: publication.data,
            sender_id: publication.sender_id,
            timestamp: publication.timestamp,
        };
        // Deliver inside the stream lock: this is the per-channel order.
        self.handler()
            .on_publication(&channel, &s.epoch, &publication);
        if history.size > 0 {
            s.retained.push_back((now + history.ttl, publication));
        }
        s.trim(history.size, now);
        Ok(s.position())
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
        history: HistoryOptions,
    ) -> Result<HistoryResult> {
        let stream = self.stream(channel);
        let mut s = stream.lock().unwrap_or_else(|p| p.into_inner());
        s.trim(history.size, Instant::now());
        Ok(HistoryResult {
            publications: s.after(since, limit),
            top: s.position(),
        })
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
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(Arc::from(channel))
            .or_default()
            .insert(info.client_id.clone(), info.clone());
        Ok(())
    }

    async fn remove(&self, channel: &str, client_id: &str) -> Result<()> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(members) = map.get_mut(channel) {
            members.remove(client_id);
            if members.is_empty() {
                map.remove(channel);
            }
        }
        Ok(())
    }

    async fn members(&self, channel: &str) -> Result<Vec<ClientInfo>> {
        let map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
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
    use super::*;

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
        let h = b.history("c", None, 100, OPTS).await.unwrap();
        assert_eq!(h.top.offset, 5);
        let kept: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
        assert_eq!(kept, vec![3, 4, 5], "trimmed to the history size");
        let since = StreamPosition {
            epoch: h.top.epoch.clone(),
            offset: 3,
        };
        let h2 = b.history("c", Some(&since), 1, OPTS).await.unwrap();
        assert_eq!(h2.publications.len(), 1);
        assert_eq!(h2.publications[0].offset, 4);
        tokio::time::advance(Duration::from_secs(11)).await;
        let h3 = b.history("c", None, 100, OPTS).await.unwrap();
        assert!(h3.publications.is_empty(), "expired by TTL");
        assert_eq!(h3.top.offset, 5, "the offset survives expiry");
        let stale = StreamPosition {
            epoch: "other".into(),
            offset: 1,
        };
        let h4 = b.history("c", Some(&stale), 100, OPTS).await.unwrap();
        assert!(h4.publications.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_streams_are_forgotten_with_a_new_epoch() {
        let b = MemoryBroker::new();
        b.start(Arc::new(Recorder::default())).await.unwrap();
        let first = b.publish("c", new_pub(), OPTS).await.unwrap();
        tokio::time::advance(Duration::from_secs(20)).await;
        MemoryBroker::sweep(&b.streams, Duration::from_secs(15));
        let second = b.publish("c", new_pub(), OPTS).await.unwrap();
        assert_ne!(first.epoch, second.epoch);
        assert_eq!(second.offset, 1);
    }
}
