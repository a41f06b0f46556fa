//! The per-channel sequencer: one instance numbers a channel's
//! publications, so that every instance stores the same `(epoch, offset)`
//! and a client can resume on any of them.
//!
//! Everything about a channel travels on its ordering key `c:<channel>`,
//! so every subscription sees the same log, in the same order:
//!
//! * `Pub` — a publication request, from any instance;
//! * `Claim {epoch}` — an instance takes the channel: from that point of
//!   the log on, it is the channel's sequencer and `epoch` the channel's
//!   epoch (the last claim in the log wins);
//! * `Seq {epoch, offset, req}` — the sequencer's numbered copy of request
//!   `req`, which every instance stores and delivers;
//! * `Release` — the sequencer forgets the channel (idle, or its table is
//!   full): the next request is claimed again.
//!
//! Each instance keeps a [`ChanLog`] per channel, derived from the log
//! only, so instances that saw the same log agree on who sequences and
//! which numbered copies count: a `Seq` is accepted only in the epoch of
//! the last claim (a sequencer superseded while its copies travel has them
//! refused everywhere, so its publishers get an error, never a false ack).
//! An instance that has not seen the channel's claim (it started later,
//! or its subscription was recreated) follows the epoch of every copy it
//! sees until it sees a claim: it refuses nothing, so it may also deliver
//! a superseded sequencer's late copy (a publication whose publisher got
//! an error), and each switch of epoch restarts its stored stream (no
//! recovery spans it). Its own requests come after the claim it missed,
//! so only the current sequencer answers them.
//!
//! Who claims: the instance whose own request finds the channel without a
//! live sequencer (none known, dead — not heard from for `presence_ttl`,
//! or restarted — or itself unable to continue) buffers its request,
//! claims, and numbers the buffered requests (every instance keeps the
//! requests it sees until a numbered copy answers them, so a dead
//! sequencer's unanswered requests are numbered too) once its claim comes
//! back. A publisher always reads the channel's shard, so the claimer
//! always sees the channel's log. Sequencers are advertised on the control
//! topic (gossip, see [`presence`](super::presence)), so an instance new to
//! a shard knows them; one that started less than two [`CLAIM_WAIT`]s ago
//! may not have heard them yet, so it waits [`CLAIM_WAIT`] for an answer
//! before it claims a channel it knows nothing of. Channels stay with
//! their sequencer while it lives, so membership changes cost no epoch
//! change; the death of a sequencer does (clients spanning it get
//! `recovered:false`). Its publishers then claim after a random wait of up
//! to half a [`CLAIM_WAIT`], so that one usually claims alone; two claims
//! at once cost one more epoch (the last claim wins; the first claimer's
//! copies sent after it are refused everywhere and their requests
//! numbered by the winner).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::time::Instant;

use super::{Body, Inner, ROUND_TRIP_TIMEOUT};
use crate::broker::history::{Appended, STREAM_IDLE_EXPIRY};
use crate::broker::{BrokerHandler, HistoryOptions};
use crate::ids::random_base36;
use crate::protocol::{Publication, StreamPosition};
use crate::sync::MutexExt;

/// Requests a claiming instance keeps per channel while its claim travels;
/// beyond, requests are dropped (their publishers time out with an error).
pub const MAX_BUFFERED: usize = 1000;
/// Numbered copies waiting to be sent, per channel; beyond, the sequencer
/// gives up its epoch (the publishers time out, the next request claims).
pub const MAX_OUTBOX: usize = 10_000;
/// Earlier epochs remembered per channel.
pub const SUPERSEDED_KEPT: usize = 8;
/// Numbered copies per publish RPC.
const BATCH: usize = 100;
/// How long a publisher's instance waits for someone to claim the channel
/// of its request before it claims it itself.
pub const CLAIM_WAIT: Duration = Duration::from_millis(1000);

/// A publication request as the sequencer keeps it.
#[derive(Debug, Clone)]
pub(super) struct Request {
    /// Boot and id of the request's message: the publisher's name for it.
    pub(super) boot: Arc<str>,
    pub(super) id: u64,
    pub(super) data: Arc<RawValue>,
    pub(super) sender_id: Option<Arc<str>>,
    pub(super) timestamp: u64,
    pub(super) size: usize,
    pub(super) ttl_ms: u64,
}

/// What this instance knows of one channel's log.
pub(super) struct ChanLog {
    /// The channel's epoch per the log.
    pub(super) epoch: Option<Arc<str>>,
    /// Its sequencer per the log: instance id and boot.
    pub(super) owner: Option<(Arc<str>, Arc<str>)>,
    /// Learned from a claim; otherwise adopted from numbered copies.
    pub(super) claimed: bool,
    /// As the sequencer: the last offset assigned.
    pub(super) assigned: u64,
    /// As the sequencer: a send failed (copies may be lost), so this epoch
    /// ends; the next request claims again.
    pub(super) broken: bool,
    /// Requests kept while our claim travels.
    pub(super) buffer: VecDeque<(Instant, Request)>,
    /// The epoch of our claim in flight.
    pub(super) claiming: Option<Arc<str>>,
    /// Last message of the channel, for the idle expiry.
    pub(super) touched: Instant,
    /// The epochs this channel had before `epoch`, newest last (at most
    /// [`SUPERSEDED_KEPT`]): a sequencer still advertising one of them is
    /// behind, not ahead (see [`stall`](super::stall)).
    pub(super) superseded: VecDeque<Arc<str>>,
    /// This instance holds every numbered copy of `epoch` that its
    /// sequencer still retains: it saw the claim, or filled its history
    /// from the sequencer ([`fetch`](super::fetch)). Reads are then
    /// answered here.
    pub(super) complete: bool,
}

impl ChanLog {
    pub(super) fn new(now: Instant) -> ChanLog {
        ChanLog {
            epoch: None,
            owner: None,
            claimed: false,
            assigned: 0,
            broken: false,
            buffer: VecDeque::new(),
            claiming: None,
            touched: now,
            complete: false,
            superseded: VecDeque::new(),
        }
    }

    /// The channel moves to `epoch` (a claim, or a copy followed).
    pub(super) fn set_epoch(&mut self, epoch: Arc<str>) {
        if let Some(old) = self.epoch.take().filter(|old| *old != epoch) {
            if self.superseded.len() >= SUPERSEDED_KEPT {
                self.superseded.pop_front();
            }
            self.superseded.push_back(old);
        }
        self.epoch = Some(epoch);
    }
}

/// The sequencer's state, under one lock (short sections only).
#[derive(Default)]
pub(super) struct Sequencer {
    /// Channel → what the log says.
    pub(super) logs: HashMap<Arc<str>, ChanLog>,
    /// Channel → numbered copies to send, in offset order; a channel is
    /// present while its sender task runs.
    pub(super) outbox: HashMap<Arc<str>, VecDeque<(u64, Body)>>,
}

impl Inner {
    /// The live instances, this one included: id and boot.
    pub(super) fn live(&self, now: Instant) -> Vec<(Arc<str>, Arc<str>)> {
        let mut live = vec![(self.me.clone(), self.boot.clone())];
        for (id, r) in self.remotes.lock_unpoisoned().iter() {
            if self.alive(r, now) {
                live.push((id.clone(), r.boot.clone()));
            }
        }
        live
    }

    pub(super) fn new_epoch(&self) -> Arc<str> {
        format!("{}.{}", self.me, random_base36(10)).into()
    }

    pub(super) fn log<'a>(
        self: &Arc<Self>,
        st: &'a mut Sequencer,
        channel: &Arc<str>,
        now: Instant,
    ) -> &'a mut ChanLog {
        if !st.logs.contains_key(channel) && st.logs.len() >= self.max_logs {
            self.evict(st, now, true);
        }
        let log = st
            .logs
            .entry(channel.clone())
            .or_insert_with(|| ChanLog::new(now));
        log.touched = now;
        log
    }

    /// Forget channels idle for [`STREAM_IDLE_EXPIRY`] (with `full`, also
    /// the least recently used eighth); ours are released on the log.
    pub(super) fn evict(self: &Arc<Self>, st: &mut Sequencer, now: Instant, full: bool) {
        let mut idle: Vec<(Instant, Arc<str>)> = st
            .logs
            .iter()
            .filter(|(c, l)| {
                l.buffer.is_empty() && l.claiming.is_none() && !st.outbox.contains_key(*c)
            })
            .map(|(c, l)| (l.touched, c.clone()))
            .collect();
        idle.sort_unstable();
        let lru = if full { self.max_logs.div_ceil(8) } else { 0 };
        for (i, (touched, channel)) in idle.into_iter().enumerate() {
            if i >= lru && now.duration_since(touched) < STREAM_IDLE_EXPIRY {
                break;
            }
            let Some(log) = st.logs.remove(&channel) else {
                continue;
            };
            if self.owns(&log) {
                self.advertise(&channel, None);
                self.spawn_send(format!("c:{channel}"), Body::Release { channel });
            }
        }
    }

    /// Whether this instance sequences (or is claiming, or still sends
    /// copies of) a channel that `pred` selects.
    pub(super) fn sequences_on(&self, pred: impl Fn(&str) -> bool) -> bool {
        let st = self.sequencer.lock_unpoisoned();
        st.outbox.keys().any(|c| pred(c))
            || st
                .logs
                .iter()
                .any(|(c, l)| (self.owns(l) || l.claiming.is_some()) && pred(c))
    }

    pub(super) fn owns(&self, log: &ChanLog) -> bool {
        log.owner
            .as_ref()
            .is_some_and(|(id, boot)| *id == self.me && *boot == self.boot)
    }

    pub(super) fn spawn_send(self: &Arc<Self>, key: String, body: Body) {
        let inner = self.clone();
        tokio::spawn(async move {
            if let Err(e) = inner.send(key, body).await {
                tracing::debug!(error = %e, "pub/sub sequencer message not sent");
            }
        });
    }

    /// Number `req` as the sequencer of `channel` and queue its copy.
    pub(super) fn assign(self: &Arc<Self>, st: &mut Sequencer, channel: &Arc<str>, req: Request) {
        let Some(log) = st.logs.get_mut(channel) else {
            return;
        };
        let Some(epoch) = log.epoch.clone() else {
            return;
        };
        let queued = st.outbox.get(channel).map_or(0, VecDeque::len);
        if queued >= MAX_OUTBOX {
            log.broken = true;
            return;
        }
        log.assigned += 1;
        let body = Body::Seq {
            channel: channel.clone(),
            epoch,
            offset: log.assigned,
            req_boot: req.boot,
            req_id: req.id,
            data: req.data,
            sender_id: req.sender_id,
            timestamp: req.timestamp,
            size: req.size,
            ttl_ms: req.ttl_ms,
        };
        let id = self.next_id();
        match st.outbox.get_mut(channel) {
            Some(q) => q.push_back((id, body)),
            None => {
                st.outbox
                    .insert(channel.clone(), VecDeque::from([(id, body)]));
                tokio::spawn(self.clone().drain(channel.clone()));
            }
        }
    }

    /// Send a channel's numbered copies in order, in batches; on failure
    /// the epoch ends (see [`ChanLog::broken`]).
    async fn drain(self: Arc<Self>, channel: Arc<str>) {
        let key = format!("c:{channel}");
        loop {
            let batch: Vec<(u64, Body)> = {
                let mut st = self.sequencer.lock_unpoisoned();
                let Some(q) = st.outbox.get_mut(&channel) else {
                    return;
                };
                if q.is_empty() {
                    st.outbox.remove(&channel);
                    return;
                }
                let n = q.len().min(BATCH);
                q.drain(..n).collect()
            };
            if let Err(e) = self.send_batch(&key, batch).await {
                tracing::warn!(error = %e, %channel, "sequenced publications not sent: the channel's epoch ends");
                let mut st = self.sequencer.lock_unpoisoned();
                st.outbox.remove(&channel);
                if let Some(log) = st.logs.get_mut(&channel) {
                    log.broken = true;
                }
                return;
            }
        }
    }

    /// A publication request from the log (every reader of the shard sees
    /// it): the sequencer numbers it; every other instance keeps it until
    /// a numbered copy answers it (at most [`MAX_BUFFERED`] per channel,
    /// for [`ROUND_TRIP_TIMEOUT`]), so that whoever claims the channel
    /// next numbers what a dead sequencer left. With no live sequencer the
    /// request's own instance claims the channel (at once, or after
    /// [`CLAIM_WAIT`] when this instance has just started and knows no
    /// sequencer of the channel).
    pub(super) fn on_request(self: &Arc<Self>, channel: &Arc<str>, req: Request) {
        let now = Instant::now();
        let live = self.live(now);
        let advertised = self.advertised_owner(channel, now).is_some();
        let own = req.boot == self.boot;
        let id = req.id;
        let mut claim = false;
        let mut wait = None;
        {
            let mut st = self.sequencer.lock_unpoisoned();
            let log = self.log(&mut st, channel, now);
            let owner_live = log
                .owner
                .as_ref()
                .is_some_and(|(id, boot)| live.iter().any(|(i, b)| i == id && b == boot))
                || (log.owner.is_none() && advertised);
            let mine = self.owns(log);
            if mine && !log.broken && log.claimed {
                self.assign(&mut st, channel, req);
            } else {
                // Kept until a numbered copy answers it: if the sequencer
                // dies with it, the next claimer numbers it.
                while log
                    .buffer
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > ROUND_TRIP_TIMEOUT)
                {
                    log.buffer.pop_front();
                }
                if log.buffer.len() < MAX_BUFFERED {
                    log.buffer.push_back((now, req));
                }
                if mine && log.broken {
                    claim = true;
                } else if own && !owner_live {
                    // Sequencers are advertised on the control topic; an
                    // instance that has just started may not have heard
                    // them all yet, so it waits a moment for one to answer
                    // before it claims.
                    if log.owner.is_none() && !log.claimed && self.settling(now) {
                        wait = Some(CLAIM_WAIT);
                    } else if log.owner.is_some() {
                        // Its sequencer died: other publishers may claim too.
                        wait = Some(Self::jitter());
                    } else {
                        claim = true;
                    }
                }
            }
        }
        if claim {
            self.claim(channel);
        } else if let Some(delay) = wait {
            self.claim_later(channel, delay, Some(id));
        }
    }

    /// A numbered copy from the log: accepted (stored, delivered, and the
    /// publisher answered) if it belongs to the channel's current epoch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_seq(
        self: &Arc<Self>,
        channel: &Arc<str>,
        epoch: Arc<str>,
        publication: Publication,
        req: (Arc<str>, u64),
        history: HistoryOptions,
        src: Arc<str>,
        boot: Arc<str>,
        handler: &Arc<dyn BrokerHandler>,
    ) {
        let now = Instant::now();
        let accept = {
            let mut st = self.sequencer.lock_unpoisoned();
            let log = self.log(&mut st, channel, now);
            let accept = if log.claimed {
                log.epoch.as_ref() == Some(&epoch)
            } else {
                // Not knowing the claims, follow every copy: a late copy of
                // a superseded sequencer may be delivered here too (its
                // publisher got an error), nothing is refused.
                if log.epoch.as_ref() != Some(&epoch) {
                    tracing::debug!(%channel, %epoch, "following the epoch of a numbered copy (no claim seen)");
                    log.set_epoch(epoch.clone());
                    log.owner = Some((src, boot));
                    log.complete = false;
                }
                true
            };
            if accept {
                log.buffer
                    .retain(|(_, r)| !(r.boot == req.0 && r.id == req.1));
            }
            accept
        };
        if !accept {
            return;
        }
        let subscribed = self.subscribed.lock_unpoisoned().contains(channel);
        let appended = self
            .streams
            .append_at(channel, &epoch, publication, history, |ch, e, p| {
                if subscribed {
                    handler.on_publication(ch, e, p);
                }
            });
        let gap = matches!(appended, Appended::Gap(_));
        let position: Option<StreamPosition> = match appended {
            Appended::Next(p) => Some(p),
            Appended::NewEpoch(p) | Appended::Gap(p) => {
                if gap {
                    if let Some(log) = self.sequencer.lock_unpoisoned().logs.get_mut(channel) {
                        log.complete = false;
                    }
                }
                // A new epoch (a change of sequencer), or publications
                // missing here: the local subscribers may lack the end of
                // what they had, so they reconnect and recover what they
                // can, honestly (`recovered:false` where history cannot
                // prove the range), rather than being moved past it.
                if subscribed {
                    handler.resync_failed(channel);
                }
                Some(p)
            }
            Appended::Repeat(p) => {
                // Already in the history (filled from the sequencer while
                // this copy travelled): a subscriber that came before the
                // fill still gets it (sessions drop what they have), and
                // its publisher its answer.
                if subscribed {
                    handler.on_publication(channel, &epoch, &p);
                }
                Some(StreamPosition {
                    epoch: epoch.clone(),
                    offset: p.offset,
                })
            }
        };
        if let Some(position) = position {
            if req.0 == self.boot {
                if let Some(tx) = self.pending.lock_unpoisoned().remove(&req.1) {
                    let _ = tx.send(position);
                }
            }
        }
    }

    /// Forget the logs of the channels `pred` selects (messages may have
    /// been lost, or the shard is left): those this instance sequenced
    /// are claimed again by their next request.
    pub(super) fn reset_sequencer(self: &Arc<Self>, pred: impl Fn(&str) -> bool) {
        let now = Instant::now();
        let mut st = self.sequencer.lock_unpoisoned();
        st.outbox.retain(|c, _| !pred(c));
        let owned: Vec<Arc<str>> = st
            .logs
            .iter()
            .filter(|(c, l)| pred(c) && self.owns(l))
            .map(|(c, _)| c.clone())
            .collect();
        st.logs.retain(|c, _| !pred(c));
        for channel in &owned {
            let mut log = ChanLog::new(now);
            log.owner = Some((self.me.clone(), self.boot.clone()));
            log.broken = true;
            st.logs.insert(channel.clone(), log);
        }
        drop(st);
        for channel in &owned {
            self.advertise(channel, None);
        }
    }
}
