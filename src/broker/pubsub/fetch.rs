//! Filling an instance's history from the channel's sequencer.
//!
//! An instance holds a channel's numbered copies only while it reads the
//! channel's shard, so one that starts reading it (a client moved here, a
//! history read) lacks what was numbered before. It asks the sequencer: a
//! `Fetch` on the channel's ordering key, answered by a `Backfill` with
//! the sequencer's epoch, top and retained publications, merged into the
//! local history ([`Store::backfill`](crate::broker::history::Store)).
//!
//! Nothing falls between the two: the fetch is published after this
//! instance's subscription to the shard exists, so every copy published
//! after the fetch reaches it live; every copy published before the fetch
//! reached the sequencer before the fetch (one ordering key), so it is in
//! the answer. Once filled — or once it saw the channel's claim — the
//! instance answers reads on its own ([`ChanLog::complete`]).
//!
//! Bounds: one fetch in flight per channel (callers share its answer), at
//! most [`MAX_FETCHES`] channels at once (beyond, the read is answered
//! from what is here, so a recovery says `recovered:false`), an answer of
//! at most [`FETCH_MAX_BYTES`] of payload (the newest publications that
//! fit), [`FETCH_WAIT`] for an answer, and none asked again for
//! [`FETCH_RETRY`] after one went unanswered (no live sequencer: the
//! channel's epoch is over anyway).
//!
//! [`ChanLog::complete`]: super::sequencer::ChanLog

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Body, Inner};
use crate::broker::{HistoryOptions, HistoryResult};
use crate::error::Result;
use crate::protocol::{Publication, StreamPosition};
use crate::sync::MutexExt;

/// Longest a read waits for the sequencer's answer.
pub const FETCH_WAIT: Duration = Duration::from_millis(1500);
/// After an unanswered fetch, the channel is not asked for again for this
/// long.
pub const FETCH_RETRY: Duration = Duration::from_secs(5);
/// Channels fetched at once, at most.
pub const MAX_FETCHES: usize = 256;
/// Payload bytes of one answer, at most (Pub/Sub's message limit is 10 MB).
pub const FETCH_MAX_BYTES: usize = 8 << 20;

/// Fetches in flight: channel → the fetch's message id, the history
/// options it was asked with, and who waits for it; and when a fetch
/// went unanswered, per channel (at most [`MAX_FAILED`], kept for
/// [`FETCH_RETRY`]). Kept apart from the channel logs, so that reads of
/// made-up channels cannot crowd the sequencer's table.
#[derive(Default)]
pub(super) struct Fetches {
    inflight: HashMap<Arc<str>, Inflight>,
    failed: HashMap<Arc<str>, Instant>,
}

/// Unanswered fetches remembered at most.
const MAX_FAILED: usize = 4096;

struct Inflight {
    id: u64,
    history: HistoryOptions,
    waiters: Vec<oneshot::Sender<()>>,
}

impl Inner {
    /// `Broker::subscribe`: hold the channel's shard while it has local
    /// subscribers (a recovery fills the history in
    /// [`Inner::read_history`]).
    pub(super) async fn subscribe(self: &Arc<Self>, channel: &str) -> Result<()> {
        let channel: Arc<str> = Arc::from(channel);
        self.subscribed.lock_unpoisoned().insert(channel.clone());
        let k = self.shard_for(&channel);
        let result = match self.open_shard(k).await {
            // Its stream is down for long: subscribe where it is not.
            Ok(()) if self.shard_stalled(k, Instant::now()) => Err(super::bus_error(
                super::PubSubError::Timeout("shard stream (down)"),
            )),
            r => r,
        };
        if result.is_err() {
            self.subscribed.lock_unpoisoned().remove(&channel);
        }
        result
    }

    /// `Broker::history` (and the node's position
    /// reads): from the local history, filled from the sequencer first
    /// when it may lack something.
    pub(super) async fn read_history(
        self: &Arc<Self>,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        newest_first: bool,
        history: HistoryOptions,
    ) -> Result<HistoryResult> {
        let _held = self.use_shard(channel).await?;
        if self.needs_fetch(channel) {
            self.fill(channel, history).await;
        }
        let mut h = self
            .streams
            .read(channel, since, limit, newest_first, history);
        // An instance reads a channel's copies at its own pace, so a client
        // coming from a faster one can hold a position beyond this one's
        // top in the channel's current epoch. It is kept, not moved back
        // (which would hand the client what it has again): the copies up
        // to it that arrive here are dropped by the session, and a hole or
        // a change of epoch closes the subscriber (1012) as always.
        if let Some(since) = since {
            let current = self
                .sequencer
                .lock_unpoisoned()
                .logs
                .get(channel)
                .and_then(|log| log.epoch.clone());
            if since.epoch == h.top.epoch
                && since.offset > h.top.offset
                && current.as_ref() == Some(&since.epoch)
            {
                h.top = since.clone();
                h.publications.clear();
            }
        }
        Ok(h)
    }

    /// Whether the local history of `channel` may lack what its sequencer
    /// holds: it is not complete here, and another live instance
    /// advertises sequencing it (with none, there is nothing to fetch).
    fn needs_fetch(self: &Arc<Self>, channel: &str) -> bool {
        let now = Instant::now();
        let complete = self
            .sequencer
            .lock_unpoisoned()
            .logs
            .get(channel)
            .is_some_and(|log| log.complete);
        let failed = self
            .fetches
            .lock_unpoisoned()
            .failed
            .get(channel)
            .is_some_and(|t| now.duration_since(*t) < FETCH_RETRY);
        !crate::protocol::is_internal_channel(channel)
            && !complete
            && !failed
            && self.advertised_owner(channel, now).is_some()
    }

    /// Fetch `channel`'s history from its sequencer and merge it here;
    /// returns once merged, or after [`FETCH_WAIT`].
    async fn fill(self: &Arc<Self>, channel: &str, history: HistoryOptions) {
        let (rx, send) = {
            let mut fetches = self.fetches.lock_unpoisoned();
            let (tx, rx) = oneshot::channel();
            if let Some(f) = fetches.inflight.get_mut(channel) {
                f.waiters.push(tx);
                (rx, None)
            } else if fetches.inflight.len() >= MAX_FETCHES {
                return;
            } else {
                let id = self.next_id();
                fetches.inflight.insert(
                    Arc::from(channel),
                    Inflight {
                        id,
                        history,
                        waiters: vec![tx],
                    },
                );
                (rx, Some(id))
            }
        };
        if let Some(id) = send {
            let body = Body::Fetch {
                channel: Arc::from(channel),
                size: history.size,
                ttl_ms: history.ttl.as_millis() as u64,
            };
            if let Err(e) = self.send_as(id, format!("c:{channel}"), body).await {
                tracing::debug!(error = %e, channel, "history fetch not sent");
                self.fetches.lock_unpoisoned().inflight.remove(channel);
                return;
            }
        }
        if tokio::time::timeout(FETCH_WAIT, rx).await.is_err() {
            let expired = {
                let mut fetches = self.fetches.lock_unpoisoned();
                match (fetches.inflight.get(channel), send) {
                    (Some(f), Some(id)) if f.id == id => fetches.inflight.remove(channel),
                    _ => None,
                }
            };
            if expired.is_some() {
                let now = Instant::now();
                let mut fetches = self.fetches.lock_unpoisoned();
                if fetches.failed.len() >= MAX_FAILED {
                    fetches
                        .failed
                        .retain(|_, t| now.duration_since(*t) < FETCH_RETRY);
                    if fetches.failed.len() >= MAX_FAILED {
                        fetches.failed.clear();
                    }
                }
                fetches.failed.insert(Arc::from(channel), now);
            }
        }
    }

    /// A fetch from the log: the channel's sequencer answers with what it
    /// retains (the newest publications within [`FETCH_MAX_BYTES`]).
    pub(super) fn on_fetch(
        self: &Arc<Self>,
        channel: &Arc<str>,
        history: HistoryOptions,
        from: (Arc<str>, u64),
    ) {
        let epoch = {
            let st = self.sequencer.lock_unpoisoned();
            match st.logs.get(channel) {
                Some(log) if log.claimed && self.owns(log) => log.epoch.clone(),
                _ => None,
            }
        };
        let Some(epoch) = epoch else {
            return;
        };
        let h = self.streams.read(channel, None, usize::MAX, true, history);
        let (top, mut publications) = if h.top.epoch == epoch {
            let mut bytes = 0;
            let kept: Vec<Publication> = h
                .publications
                .into_iter()
                .take_while(|p| {
                    bytes += p.data.get().len();
                    bytes <= FETCH_MAX_BYTES
                })
                .collect();
            (h.top.offset, kept)
        } else {
            // No copy of this epoch has come back yet.
            (0, Vec::new())
        };
        publications.reverse();
        let body = Body::Backfill {
            channel: channel.clone(),
            to_boot: from.0,
            of: from.1,
            epoch,
            top,
            publications,
        };
        self.spawn_send(format!("c:{channel}"), body);
    }

    /// A sequencer's (`(id, boot)`) answer: merged here if it answers our
    /// fetch; the sequencer is then known here.
    pub(super) fn on_backfill(
        self: &Arc<Self>,
        channel: &Arc<str>,
        sequencer: (Arc<str>, Arc<str>),
        of: (Arc<str>, u64),
        epoch: Arc<str>,
        top: u64,
        publications: Vec<Publication>,
    ) {
        if of.0 != self.boot {
            return;
        }
        let Some(f) = ({
            let mut fetches = self.fetches.lock_unpoisoned();
            match fetches.inflight.get(channel) {
                Some(f) if f.id == of.1 => fetches.inflight.remove(channel),
                _ => None,
            }
        }) else {
            return;
        };
        let kept = self
            .streams
            .backfill(channel, &epoch, top, publications, f.history);
        if kept {
            let mut st = self.sequencer.lock_unpoisoned();
            let log = self.log(&mut st, channel, Instant::now());
            // A claim seen meanwhile is newer than the answer.
            if !log.claimed || log.epoch.as_ref() == Some(&epoch) {
                if !log.claimed {
                    log.owner = Some(sequencer);
                }
                log.set_epoch(epoch);
                log.complete = true;
            }
        }
        for w in f.waiters {
            let _ = w.send(());
        }
    }
}
