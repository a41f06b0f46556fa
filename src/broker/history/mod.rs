//! Bounded channel history held in this process: the memory bus's streams
//! and the Pub/Sub bus's per-instance history share this store.
//!
//! Each channel that has been published to has a [`Stream`]: an epoch, the
//! newest offset and the retained publications, oldest first, each with its
//! expiry. Three things keep the whole bounded, whatever clients do:
//!
//! * **Expiry on time.** Every stream with something retained has one entry
//!   in a queue ordered by the expiry of its oldest publication. A sweeper
//!   ([`SWEEP_INTERVAL`]) pops the entries that are due and drops the
//!   expired fronts, so a publication is freed within a second or so of its
//!   expiry even if its channel is never used again; a pass costs only the
//!   streams that have something due.
//! * **A budget.** Retained bytes (each publication counts its data length
//!   plus [`ENTRY_OVERHEAD`]) stay within `history_max_bytes`, and streams
//!   within `history_max_channels`. Beyond either, the least recently
//!   published streams are evicted (an ordered index, O(log n) per
//!   publish). A single stream larger than the byte budget loses its oldest
//!   publications instead. Evictions are counted
//!   ([`HistoryStats::evictions`]) and logged at most every
//!   [`EVICTION_LOG_INTERVAL`].
//! * **Reads create nothing.** A history or position read of a channel
//!   without a stream answers offset 0 and the epoch the channel's next
//!   stream will have, and keeps no state.
//!
//! # Epochs
//!
//! A stream's epoch is a keyed hash (a random key per process) of the
//! channel name and a generation counter of the channel's shard, bumped
//! whenever a stream of that shard is forgotten (expiry of an idle empty
//! stream, eviction, [`Store::clear`]). So the epoch a client reads for a
//! channel that does not exist yet is the epoch of its first publication,
//! and recovering from "offset 0 of that epoch" works as it always did;
//! once a stream is forgotten its next incarnation gets another epoch, so a
//! position in the old one is never trusted (`recovered:false`). A
//! forgotten stream of another channel in the same shard (1 in
//! [`GENERATION_SHARDS`]) can change the epoch announced for an empty
//! channel before its first publication: the subscriber then sees the new
//! epoch on the first message, and a recovery from the old one answers
//! `recovered:false`, honest and rare.
//!
//! An empty stream (its publications expired, or history off) keeps its
//! epoch and offset for [`STREAM_IDLE_EXPIRY`] after its last publication
//! so that a caught-up client recovers with nothing missed; it counts
//! against `history_max_channels` meanwhile.
//!
//! # Locks
//!
//! The index lock is held to find, create or forget a stream and for the
//! budget's bookkeeping; each stream has its own lock for append +
//! deliver, so channels publish in parallel. Order: index, then a stream;
//! a publisher never takes the index while holding its stream. A forgotten
//! stream is marked dead under its lock; a publisher that finds its stream
//! dead looks it up again, so nothing is delivered from a forgotten stream.

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{HistoryOptions, HistoryResult, NewPublication};
use crate::config::Config;
use crate::error::{ClientError, Result};
use crate::protocol::{Publication, StreamPosition};
use crate::sync::MutexExt;

#[cfg(feature = "pubsub")]
mod sequenced;
mod stream;
#[cfg(feature = "pubsub")]
pub(crate) use sequenced::Appended;
pub use stream::KEY_OVERHEAD;
use stream::{Stream, cost};

/// What the in-process channel history holds (memory and Pub/Sub buses,
/// this module): gauges kept exact by the store, read by `/metrics`.
#[derive(Debug, Default)]
pub struct HistoryStats {
    /// Bytes of retained publications as counted against
    /// `history_max_bytes` (data + `broker::history::ENTRY_OVERHEAD` each).
    pub bytes: AtomicU64,
    /// Channels with at least one retained publication.
    pub channels: AtomicU64,
    /// Streams held, empty ones included (their epoch and offset are
    /// remembered); bounded by `history_max_channels`.
    pub streams: AtomicU64,
    /// Streams evicted to stay within the budgets.
    pub evictions: AtomicU64,
}

/// Bytes counted per retained publication on top of its data: the queue
/// slot (expiry and `Publication`, 64 bytes), the data's allocation header
/// and allocator rounding.
pub const ENTRY_OVERHEAD: usize = 128;
/// How often expired publications are freed.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long an empty stream's epoch and offset are remembered after its
/// last publication.
pub const STREAM_IDLE_EXPIRY: Duration = Duration::from_secs(3600);
/// At most one eviction log line per this interval (with a count).
pub const EVICTION_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// Generation counters (epochs of forgotten streams' successors).
pub const GENERATION_SHARDS: usize = 16384;
/// Streams looked at per sweep for the idle expiry, at most.
const IDLE_SCAN: usize = 4096;

/// The instance-wide budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Retained bytes, counted as data + [`ENTRY_OVERHEAD`] per publication.
    pub max_bytes: usize,
    /// Streams held, empty ones included.
    pub max_channels: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            max_bytes: 256 << 20,
            max_channels: 100_000,
        }
    }
}

impl HistoryLimits {
    pub fn from_config(config: &Config) -> Self {
        HistoryLimits {
            max_bytes: usize::try_from(config.history_max_bytes).unwrap_or(usize::MAX),
            max_channels: config.history_max_channels,
        }
    }
}

/// A stream in the index.
struct Slot {
    /// The channel (the map's key), handed to `deliver` without allocating.
    name: Arc<str>,
    stream: Arc<Mutex<Stream>>,
    /// Its key in the recency index (bumped by each publication).
    seq: u64,
    /// Names this incarnation in the expiry queue.
    id: u64,
}

/// Everything under the index lock.
struct Index {
    /// Channel → stream.
    streams: HashMap<Arc<str>, Slot>,
    /// Publication sequence → channel: oldest first, for eviction and the
    /// idle expiry.
    recency: BTreeMap<u64, Arc<str>>,
    /// (oldest retained publication's expiry, stream id, channel): the
    /// sweeper's work list, one entry per stream with something retained.
    due: BinaryHeap<Reverse<(Instant, u64, Arc<str>)>>,
    /// Last publication sequence / stream id handed out.
    seq: u64,
    /// Generation of each shard: bumped when a stream of it is forgotten.
    generations: Box<[u32]>,
    /// Evictions already logged, and when.
    logged: (u64, Option<Instant>),
}

/// The bounded history store (see the module docs).
pub(crate) struct Store {
    limits: HistoryLimits,
    stats: Arc<HistoryStats>,
    /// Keyed hash of epochs: random per process, so a restart never
    /// repeats an epoch.
    hasher: RandomState,
    /// Put before every epoch (the Pub/Sub bus names the instance).
    epoch_prefix: Box<str>,
    index: Mutex<Index>,
}

impl Store {
    pub(crate) fn new(limits: HistoryLimits, epoch_prefix: &str) -> Arc<Store> {
        Arc::new(Store {
            limits,
            stats: Arc::default(),
            hasher: RandomState::new(),
            epoch_prefix: epoch_prefix.into(),
            index: Mutex::new(Index {
                streams: HashMap::new(),
                recency: BTreeMap::new(),
                due: BinaryHeap::new(),
                seq: 0,
                generations: vec![0; GENERATION_SHARDS].into_boxed_slice(),
                logged: (0, None),
            }),
        })
    }

    /// The figures behind `/metrics`.
    pub(crate) fn stats(&self) -> &Arc<HistoryStats> {
        &self.stats
    }

    /// Free expired publications every [`SWEEP_INTERVAL`] while the store
    /// lives.
    pub(crate) fn spawn_sweeper(self: &Arc<Self>) {
        let weak: Weak<Store> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else { break };
                store.sweep(Instant::now());
            }
        });
    }

    fn shard(&self, channel: &str) -> usize {
        (self.hasher.hash_one(channel) as usize) % GENERATION_SHARDS
    }

    /// The epoch `channel`'s next stream will have.
    fn next_epoch(&self, index: &Index, channel: &str) -> Arc<str> {
        const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let generation = index.generations[self.shard(channel)];
        let mut h = self.hasher.hash_one((channel, generation));
        let mut epoch = String::with_capacity(self.epoch_prefix.len() + 12);
        epoch.push_str(&self.epoch_prefix);
        for _ in 0..12 {
            epoch.push(ALPHABET[(h % 36) as usize] as char);
            h /= 36;
        }
        epoch.into()
    }

    /// Forget `channel`'s stream: its memory is freed and its next stream
    /// has a new epoch.
    fn forget(&self, index: &mut Index, channel: &str) {
        let Some((_, slot)) = index.streams.remove_entry(channel) else {
            return;
        };
        index.recency.remove(&slot.seq);
        slot.stream.lock_unpoisoned().clear(&self.stats);
        self.stats.streams.fetch_sub(1, Relaxed);
        let shard = self.shard(channel);
        index.generations[shard] = index.generations[shard].wrapping_add(1);
    }

    /// Evict the least recently published streams until within both
    /// budgets. A last stream over the byte budget loses its oldest
    /// publications instead.
    fn enforce(&self, index: &mut Index) {
        let limits = self.limits;
        loop {
            let over_channels = index.streams.len() > limits.max_channels;
            let over_bytes = self.stats.bytes.load(Relaxed) as usize > limits.max_bytes;
            if !over_channels && !over_bytes {
                return;
            }
            let Some((_, oldest)) = index.recency.first_key_value() else {
                return;
            };
            if index.streams.len() == 1 && !over_channels {
                let slot = &index.streams[oldest];
                let mut s = slot.stream.lock_unpoisoned();
                // Keys first: a lone stream keeps its publications longest.
                while self.stats.bytes.load(Relaxed) as usize > limits.max_bytes
                    && (s.pop_key(&self.stats) || s.pop_front(&self.stats))
                {}
                return;
            }
            let oldest = oldest.clone();
            self.forget(index, &oldest);
            self.stats.evictions.fetch_add(1, Relaxed);
        }
    }

    /// Find `channel`'s stream, creating it if needed, and mark it the most
    /// recently published.
    fn open(&self, channel: &str, now: Instant) -> (Arc<str>, Arc<Mutex<Stream>>) {
        let mut index = self.index.lock_unpoisoned();
        let index = &mut *index;
        index.seq += 1;
        let seq = index.seq;
        if let Some(slot) = index.streams.get_mut(channel) {
            let old = std::mem::replace(&mut slot.seq, seq);
            let (name, stream) = (slot.name.clone(), slot.stream.clone());
            index.recency.remove(&old);
            index.recency.insert(seq, name.clone());
            return (name, stream);
        }
        let name: Arc<str> = Arc::from(channel);
        let stream = Arc::new(Mutex::new(Stream::new(
            self.next_epoch(index, channel),
            now,
        )));
        index.streams.insert(
            name.clone(),
            Slot {
                name: name.clone(),
                stream: stream.clone(),
                seq,
                id: seq,
            },
        );
        index.recency.insert(seq, name.clone());
        self.stats.streams.fetch_add(1, Relaxed);
        self.enforce(index);
        (name, stream)
    }

    /// Append a publication to `channel` and hand it to `deliver` (channel,
    /// epoch, publication) under the stream's lock, which orders the
    /// channel; returns its position. Keeps `history.size` publications for
    /// `history.ttl`, within the budgets.
    ///
    /// The publication's conditions are checked under the same lock: a
    /// remembered idempotency key answers its first position and appends
    /// nothing; an expected offset other than the top is `offset_mismatch`.
    /// Keys count against the byte budget (`KEY_OVERHEAD` + length each)
    /// and are forgotten after their window.
    ///
    /// Internal channels (`#user:…`, at-most-once user-addressed messages
    /// that nobody reads by offset) get no stream: a client sending `direct`
    /// to many user ids must not fill the channel budget. They are
    /// delivered at offset 0 of an empty epoch.
    pub(crate) fn publish(
        &self,
        channel: &str,
        new: NewPublication,
        history: HistoryOptions,
        deliver: impl FnOnce(&Arc<str>, &Arc<str>, &Publication),
    ) -> Result<StreamPosition> {
        if crate::protocol::is_internal_channel(channel) {
            let epoch: Arc<str> = Arc::from("");
            let publication = Publication {
                offset: 0,
                data: new.data,
                sender_id: new.sender_id,
                timestamp: new.timestamp,
            };
            deliver(&Arc::from(channel), &epoch, &publication);
            return Ok(StreamPosition { epoch, offset: 0 });
        }
        let conditions = new.conditions;
        if let Some(expected) = conditions.expected_offset.filter(|e| *e != 0) {
            // Refused without creating a stream (a stream's top is never
            // below 1): a refusal holds nothing on the server.
            if let Err(top) = self.find(channel) {
                return Err(ClientError::offset_mismatch(expected, top).into());
            }
        }
        loop {
            let now = Instant::now();
            let (name, stream) = self.open(channel, now);
            let mut s = stream.lock_unpoisoned();
            if s.dead {
                continue; // evicted between the lookup and the lock
            }
            s.trim(history.size, now, &self.stats);
            if let Some(offset) = conditions
                .idempotency_key
                .as_deref()
                .and_then(|k| s.published_as(k))
            {
                return Ok(StreamPosition {
                    epoch: s.epoch.clone(),
                    offset,
                });
            }
            if let Some(expected) = conditions.expected_offset {
                if expected != s.top {
                    return Err(ClientError::offset_mismatch(expected, s.position()).into());
                }
            }
            s.top += 1;
            s.touched = now;
            let publication = Publication {
                offset: s.top,
                data: new.data,
                sender_id: new.sender_id,
                timestamp: new.timestamp,
            };
            deliver(&name, &s.epoch, &publication);
            if let Some(key) = conditions.idempotency_key {
                let top = s.top;
                s.remember(key, top, now + conditions.idempotency_window, &self.stats);
            }
            return Ok(self.retain(name, s, publication, history, now));
        }
    }

    /// The end of every append, under the stream's lock `s` (released
    /// here): keep `publication` (history on), trim, schedule the stream's
    /// expiry and enforce the instance's byte budget; the new position.
    fn retain(
        &self,
        name: Arc<str>,
        mut s: std::sync::MutexGuard<'_, Stream>,
        publication: Publication,
        history: HistoryOptions,
        now: Instant,
    ) -> StreamPosition {
        self.push(&mut s, publication, history, now);
        self.settle(name, s, history, now)
    }

    /// Keep `publication` at the end of `s` (when the namespace keeps
    /// history), counted against the budget.
    fn push(
        &self,
        s: &mut Stream,
        publication: Publication,
        history: HistoryOptions,
        now: Instant,
    ) {
        if history.size > 0 {
            let c = cost(&publication);
            if s.retained.is_empty() {
                self.stats.channels.fetch_add(1, Relaxed);
            }
            s.bytes += c;
            self.stats.bytes.fetch_add(c as u64, Relaxed);
            s.retained.push_back((now + history.ttl, publication));
        }
    }

    /// After a change of `s`: trim it, schedule its expiry, enforce the
    /// budgets; returns its top.
    fn settle(
        &self,
        name: Arc<str>,
        mut s: std::sync::MutexGuard<'_, Stream>,
        history: HistoryOptions,
        now: Instant,
    ) -> StreamPosition {
        s.trim(history.size, now, &self.stats);
        let schedule = match s.retained.front() {
            Some((exp, _)) if !s.scheduled => Some(*exp),
            _ => None,
        };
        s.scheduled |= schedule.is_some();
        let position = s.position();
        drop(s);
        let over = self.stats.bytes.load(Relaxed) as usize > self.limits.max_bytes;
        if schedule.is_some() || over {
            let mut index = self.index.lock_unpoisoned();
            if let Some(at) = schedule {
                if let Some(slot) = index.streams.get(&name) {
                    let id = slot.id;
                    index.due.push(Reverse((at, id, name)));
                }
            }
            if over {
                self.enforce(&mut index);
            }
        }
        position
    }

    /// `channel`'s stream, if it has one (no state is created).
    fn find(&self, channel: &str) -> Result<Arc<Mutex<Stream>>, StreamPosition> {
        let index = self.index.lock_unpoisoned();
        match index.streams.get(channel) {
            Some(slot) => Ok(slot.stream.clone()),
            None => Err(StreamPosition {
                epoch: self.next_epoch(&index, channel),
                offset: 0,
            }),
        }
    }

    /// Retained publications of `channel` after `since` (at most `limit`;
    /// the newest ones, newest first, with `newest_first`) and its top. A channel without a stream answers offset 0 and the
    /// epoch of its next stream, and nothing is created.
    pub(crate) fn read(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        newest_first: bool,
        history: HistoryOptions,
    ) -> HistoryResult {
        loop {
            let stream = match self.find(channel) {
                Ok(s) => s,
                Err(top) => {
                    return HistoryResult {
                        publications: Vec::new(),
                        top,
                    };
                }
            };
            let mut s = stream.lock_unpoisoned();
            if s.dead {
                continue;
            }
            s.trim(history.size, Instant::now(), &self.stats);
            return HistoryResult {
                publications: s.after(since, limit, newest_first),
                top: s.position(),
            };
        }
    }

    /// The position of `channel`'s stream, if it has one.
    #[cfg(feature = "pubsub")]
    pub(crate) fn top_of(&self, channel: &str) -> Option<StreamPosition> {
        let stream = self.find(channel).ok()?;
        let s = stream.lock_unpoisoned();
        (!s.dead).then(|| s.position())
    }

    /// Retained publications of `channel` after `position`, if it is in
    /// the current epoch (replay after a bus outage), each with the epoch.
    #[cfg(feature = "pubsub")]
    pub(crate) fn replay_after(
        &self,
        channel: &str,
        position: &StreamPosition,
    ) -> Vec<(Arc<str>, Publication)> {
        let Ok(stream) = self.find(channel) else {
            return Vec::new();
        };
        let s = stream.lock_unpoisoned();
        if s.dead || s.epoch != position.epoch {
            return Vec::new();
        }
        s.retained
            .iter()
            .filter(|(_, p)| p.offset > position.offset)
            .map(|(_, p)| (s.epoch.clone(), p.clone()))
            .collect()
    }

    /// Forget the streams of the channels `pred` selects (the Pub/Sub bus
    /// leaving a shard).
    #[cfg(feature = "pubsub")]
    pub(crate) fn forget_where(&self, pred: impl Fn(&str) -> bool) {
        let mut index = self.index.lock_unpoisoned();
        let channels: Vec<Arc<str>> = index.streams.keys().filter(|c| pred(c)).cloned().collect();
        for channel in channels {
            self.forget(&mut index, &channel);
        }
    }

    /// Free what has expired at `now`, forget idle empty streams, and log
    /// the evictions since the last line.
    pub(crate) fn sweep(&self, now: Instant) {
        let mut index = self.index.lock_unpoisoned();
        let index = &mut *index;
        while let Some(Reverse((at, id, _))) = index.due.peek() {
            if *at > now {
                break;
            }
            let id = *id;
            let Some(Reverse((_, _, name))) = index.due.pop() else {
                break;
            };
            let Some(slot) = index.streams.get(&name).filter(|s| s.id == id) else {
                continue; // forgotten since
            };
            let mut s = slot.stream.lock_unpoisoned();
            s.scheduled = false;
            while s.retained.front().is_some_and(|(exp, _)| *exp <= now) {
                s.pop_front(&self.stats);
            }
            if let Some((exp, _)) = s.retained.front() {
                let exp = *exp;
                s.scheduled = true;
                drop(s);
                index.due.push(Reverse((exp, id, name)));
            }
        }
        // Oldest publication first: stop at the first stream not idle.
        let mut idle = Vec::new();
        for name in index.recency.values().take(IDLE_SCAN) {
            let mut s = index.streams[name].stream.lock_unpoisoned();
            if now.duration_since(s.touched) < STREAM_IDLE_EXPIRY {
                break;
            }
            while s.key_order.front().is_some_and(|(exp, _)| *exp <= now) {
                s.pop_key(&self.stats);
            }
            if s.retained.is_empty() && s.keys.is_empty() {
                idle.push(name.clone());
            }
        }
        for name in idle {
            self.forget(index, &name);
        }
        let evictions = self.stats.evictions.load(Relaxed);
        let (logged, at) = index.logged;
        if evictions > logged && at.is_none_or(|at| now.duration_since(at) >= EVICTION_LOG_INTERVAL)
        {
            tracing::warn!(
                evicted = evictions - logged,
                bytes = self.stats.bytes.load(Relaxed),
                max_bytes = self.limits.max_bytes,
                streams = index.streams.len(),
                max_channels = self.limits.max_channels,
                "channel history over its budget: least recently published channels evicted (their next publication starts a new epoch)"
            );
            index.logged = (evictions, Some(now));
        }
    }
}
