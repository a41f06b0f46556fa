//! One channel's stream in the in-process history: its epoch, top offset,
//! retained publications and the idempotency keys seen within their
//! window. Everything here runs under the stream's own lock (see the
//! [`Store`](super::Store) for the locking order and the budgets).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::time::Instant;

use super::{ENTRY_OVERHEAD, HistoryStats};
use crate::protocol::{Publication, StreamPosition};

/// Bytes counted per remembered idempotency key on top of the key: the
/// map and queue slots and allocation headers.
pub const KEY_OVERHEAD: usize = 96;

/// What a publication counts against the byte budget.
pub(super) fn cost(p: &Publication) -> usize {
    p.data.get().len() + ENTRY_OVERHEAD
}

/// What an idempotency key counts against the byte budget.
fn key_cost(key: &str) -> usize {
    key.len() + KEY_OVERHEAD
}

/// One channel's stream.
#[derive(Debug)]
pub(crate) struct Stream {
    /// Names this incarnation of the stream.
    pub(crate) epoch: Arc<str>,
    /// Offset of the newest publication.
    pub(crate) top: u64,
    /// Retained publications, oldest first, each with its expiry.
    pub(super) retained: VecDeque<(Instant, Publication)>,
    /// Idempotency key → offset of its publication, within the window.
    pub(super) keys: HashMap<Arc<str>, u64>,
    /// The keys of `keys` in the order they expire.
    pub(super) key_order: VecDeque<(Instant, Arc<str>)>,
    /// Last publication time, for forgetting idle empty streams.
    pub(super) touched: Instant,
    /// Bytes of `retained` and the keys as counted against the budget.
    pub(super) bytes: usize,
    /// Forgotten by the store: a publisher holding it must look again.
    pub(super) dead: bool,
    /// Has an entry in the expiry queue.
    pub(super) scheduled: bool,
}

impl Stream {
    pub(super) fn new(epoch: Arc<str>, now: Instant) -> Stream {
        Stream {
            epoch,
            top: 0,
            retained: VecDeque::new(),
            keys: HashMap::new(),
            key_order: VecDeque::new(),
            touched: now,
            bytes: 0,
            dead: false,
            scheduled: false,
        }
    }

    /// Retained publications after `since` (all without it), at most
    /// `limit`, oldest first, or the newest `limit` newest first; none
    /// when `since` is of another epoch.
    pub(super) fn after(
        &self,
        since: Option<&StreamPosition>,
        limit: usize,
        newest_first: bool,
    ) -> Vec<Publication> {
        if since.is_some_and(|s| s.epoch != self.epoch) {
            return Vec::new();
        }
        let after = since.map_or(0, |p| p.offset);
        let wanted = self.retained.iter().map(|(_, p)| p);
        if newest_first {
            wanted
                .rev()
                .take_while(|p| p.offset > after)
                .take(limit)
                .cloned()
                .collect()
        } else {
            wanted
                .filter(|p| p.offset > after)
                .take(limit)
                .cloned()
                .collect()
        }
    }

    /// The stream's top.
    pub(crate) fn position(&self) -> StreamPosition {
        StreamPosition {
            epoch: self.epoch.clone(),
            offset: self.top,
        }
    }

    /// The offset published under `key`, if it is still remembered.
    pub(super) fn published_as(&self, key: &str) -> Option<u64> {
        self.keys.get(key).copied()
    }

    /// Remember that `key` published `offset`, until `until`.
    pub(super) fn remember(
        &mut self,
        key: Arc<str>,
        offset: u64,
        until: Instant,
        stats: &HistoryStats,
    ) {
        let c = key_cost(&key);
        self.bytes += c;
        stats.bytes.fetch_add(c as u64, Relaxed);
        self.keys.insert(key.clone(), offset);
        self.key_order.push_back((until, key));
    }

    /// Forget the oldest key; false when there is none.
    pub(super) fn pop_key(&mut self, stats: &HistoryStats) -> bool {
        let Some((_, key)) = self.key_order.pop_front() else {
            return false;
        };
        self.keys.remove(&key);
        let c = key_cost(&key);
        self.bytes -= c;
        stats.bytes.fetch_sub(c as u64, Relaxed);
        if self.key_order.is_empty() {
            // Give the capacity back: keys may come in bursts.
            self.keys = HashMap::new();
            self.key_order = VecDeque::new();
        }
        true
    }

    /// Drop the front publication, keeping the figures exact; false when
    /// nothing is retained.
    pub(super) fn pop_front(&mut self, stats: &HistoryStats) -> bool {
        let Some((_, p)) = self.retained.pop_front() else {
            return false;
        };
        let c = cost(&p);
        self.bytes -= c;
        stats.bytes.fetch_sub(c as u64, Relaxed);
        if self.retained.is_empty() {
            stats.channels.fetch_sub(1, Relaxed);
        }
        true
    }

    /// Drop what is beyond `size` or expired at `now`, and the keys whose
    /// window has passed.
    pub(super) fn trim(&mut self, size: usize, now: Instant, stats: &HistoryStats) {
        while self.retained.len() > size {
            self.pop_front(stats);
        }
        while self.retained.front().is_some_and(|(exp, _)| *exp <= now) {
            self.pop_front(stats);
        }
        while self.key_order.front().is_some_and(|(exp, _)| *exp <= now) {
            self.pop_key(stats);
        }
    }

    /// Free everything (the stream is being forgotten).
    pub(super) fn clear(&mut self, stats: &HistoryStats) {
        if !self.retained.is_empty() {
            stats.channels.fetch_sub(1, Relaxed);
        }
        stats.bytes.fetch_sub(self.bytes as u64, Relaxed);
        self.bytes = 0;
        self.retained = VecDeque::new();
        self.keys = HashMap::new();
        self.key_order = VecDeque::new();
        self.dead = true;
    }
}
