//! Appending publications numbered elsewhere: the Pub/Sub bus's sequencer
//! assigns `(epoch, offset)` and every instance stores what it receives
//! under that position ([`Store::append_at`]), keeping the store's
//! invariant that a stream's retained publications are contiguous in its
//! epoch (what `HistoryResult::covers` relies on).

use std::sync::Arc;

use tokio::time::Instant;

use super::{HistoryOptions, Store};
use crate::protocol::{Publication, StreamPosition};
use crate::sync::MutexExt;

/// What [`Store::append_at`] did.
#[derive(Debug, Clone)]
pub(crate) enum Appended {
    /// The next offset of the stream's epoch: appended and delivered.
    Next(StreamPosition),
    /// At or below the stream's top in its epoch: already held (a repeat,
    /// or filled by [`Store::backfill`]); not stored again, handed back.
    Repeat(Publication),
    /// Another epoch than the stream's: the stream restarts there (the
    /// retained publications of the old epoch are dropped, so a position in
    /// it is never trusted again); appended, not delivered (the local
    /// subscribers, who may lack the old epoch's tail, are to reconnect).
    NewEpoch(StreamPosition),
    /// Beyond the next offset of the same epoch: publications are missing
    /// here. The stream restarts at this offset (nothing before it is
    /// retained, so no recovery spans the hole); appended, not delivered
    /// (the local subscribers are to reconnect).
    Gap(StreamPosition),
}

impl Store {
    /// Store `publication` (whose offset was assigned by a sequencer) in
    /// `channel`'s stream under `epoch`, and hand it to `deliver` under the
    /// stream's lock when it is the next one (or the first of a new
    /// stream); see [`Appended`] for the cases.
    pub(crate) fn append_at(
        &self,
        channel: &str,
        epoch: &Arc<str>,
        publication: Publication,
        history: HistoryOptions,
        deliver: impl FnOnce(&Arc<str>, &Arc<str>, &Publication),
    ) -> Appended {
        loop {
            let now = Instant::now();
            let (name, stream) = self.open(channel, now);
            let mut s = stream.lock_unpoisoned();
            if s.dead {
                continue; // evicted between the lookup and the lock
            }
            s.trim(history.size, now, &self.stats);
            let offset = publication.offset;
            let fresh = s.top == 0 && s.retained.is_empty();
            let outcome = if s.epoch != *epoch {
                while s.pop_front(&self.stats) {}
                s.epoch = epoch.clone();
                s.top = offset.saturating_sub(1);
                if fresh { 0 } else { 1 }
            } else if offset <= s.top {
                return Appended::Repeat(publication);
            } else if offset > s.top + 1 {
                while s.pop_front(&self.stats) {}
                s.top = offset - 1;
                2
            } else {
                0
            };
            s.top = offset;
            s.touched = now;
            // Only the next offset of the epoch the subscribers hold is
            // handed on: after a change of epoch or a hole they must learn
            // it (the caller asks them to reconnect), not be moved past it.
            if outcome == 0 {
                deliver(&name, &s.epoch, &publication);
            }
            let position = self.retain(name, s, publication, history, now);
            return match outcome {
                0 => Appended::Next(position),
                1 => Appended::NewEpoch(position),
                _ => Appended::Gap(position),
            };
        }
    }
}

impl Store {
    /// Fill `channel`'s stream with a sequencer's retained publications
    /// of `epoch` (oldest first) up to its `top`: the Pub/Sub bus, when an
    /// instance starts reading a channel that was numbered before. Kept
    /// only if the stream is new or of the same epoch; what the stream
    /// holds beyond `top` stays. Returns whether it was kept.
    pub(crate) fn backfill(
        &self,
        channel: &str,
        epoch: &Arc<str>,
        top: u64,
        publications: Vec<Publication>,
        history: HistoryOptions,
    ) -> bool {
        loop {
            let now = Instant::now();
            let (name, stream) = self.open(channel, now);
            let mut s = stream.lock_unpoisoned();
            if s.dead {
                continue;
            }
            let fresh = s.top == 0 && s.retained.is_empty();
            if !fresh && s.epoch != *epoch {
                return false;
            }
            let newer: Vec<Publication> = s
                .retained
                .iter()
                .filter(|(_, p)| p.offset > top)
                .map(|(_, p)| p.clone())
                .collect();
            let local_top = if fresh { 0 } else { s.top };
            while s.pop_front(&self.stats) {}
            s.epoch = epoch.clone();
            for p in publications.into_iter().filter(|p| p.offset <= top) {
                self.push(&mut s, p, history, now);
            }
            for p in newer {
                self.push(&mut s, p, history, now);
            }
            s.top = top.max(local_top);
            s.touched = now;
            self.settle(name, s, history, now);
            return true;
        }
    }
}
