//! Claiming channels: who becomes a channel's sequencer and when (see
//! [`sequencer`](super::sequencer) for the rules): a claim sent on the
//! channel's log, the claims and releases read from it, the delayed claim
//! of a publisher, and the heartbeat's sweep for channels whose sequencer
//! died with our requests unanswered.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::sequencer::{CLAIM_WAIT, Request};
use super::{Body, Inner, ROUND_TRIP_TIMEOUT};
use crate::sync::MutexExt;

impl Inner {
    /// The idle expiry, from the heartbeat. Also claims the channels
    /// whose sequencer died with a request of ours unanswered.
    pub(super) fn sweep_sequencer(self: &Arc<Self>, now: Instant) {
        let live = self.live(now);
        let orphans = {
            let mut st = self.sequencer.lock_unpoisoned();
            self.evict(&mut st, now, false);
            let pending = self.pending.lock_unpoisoned();
            st.logs
                .iter()
                .filter(|(_, log)| {
                    let ours_waiting = log.buffer.iter().any(|(t, r)| {
                        r.boot == self.boot
                            && pending.contains_key(&r.id)
                            && now.duration_since(*t) <= ROUND_TRIP_TIMEOUT
                    });
                    let owner_live = log
                        .owner
                        .as_ref()
                        .is_some_and(|(id, boot)| live.iter().any(|(i, b)| i == id && b == boot));
                    ours_waiting && log.claiming.is_none() && !owner_live
                })
                .map(|(c, log)| (c.clone(), log.owner.is_none()))
                .collect::<Vec<_>>()
        };
        // A channel whose sequencer this instance learned only from its
        // advertisement (a fill) is not orphaned while that one lives.
        let orphans: Vec<Arc<str>> = orphans
            .into_iter()
            .filter(|(c, unknown)| !(*unknown && self.advertised_owner(c, now).is_some()))
            .map(|(c, _)| c)
            .collect();
        for channel in orphans {
            self.claim_later(&channel, Self::jitter(), None);
        }
    }

    /// Claim `channel` after `delay` if it still has no live sequencer (and
    /// our request `id`, if given, is still unanswered): the wait lets a
    /// sequencer we do not know yet answer, and spreads the claims of
    /// several publishers whose sequencer died, so that one usually wins
    /// alone (each claim ends an epoch).
    pub(super) fn claim_later(
        self: &Arc<Self>,
        channel: &Arc<str>,
        delay: Duration,
        id: Option<u64>,
    ) {
        let inner = self.clone();
        let channel = channel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let pending = id.is_none_or(|id| inner.pending.lock_unpoisoned().contains_key(&id));
            let now = Instant::now();
            let live = inner.live(now);
            let unowned = {
                let st = inner.sequencer.lock_unpoisoned();
                st.logs.get(&channel).map(|log| match &log.owner {
                    Some((id, boot)) => !live.iter().any(|(i, b)| i == id && b == boot),
                    None => true,
                })
            };
            // Known only from its advertisement: not orphaned while it lives.
            let unowned = match unowned {
                Some(true) => inner.advertised_owner(&channel, now).is_none(),
                _ => false,
            };
            if pending && unowned {
                inner.claim(&channel);
            }
        });
    }

    /// A random delay of up to half [`CLAIM_WAIT`].
    pub(super) fn jitter() -> Duration {
        CLAIM_WAIT.mul_f64(fastrand::f64() / 2.0)
    }

    /// Claim `channel` (unless a claim of ours is on the way).
    pub(super) fn claim(self: &Arc<Self>, channel: &Arc<str>) {
        let epoch = {
            let mut st = self.sequencer.lock_unpoisoned();
            let Some(log) = st.logs.get_mut(channel) else {
                return;
            };
            if log.claiming.is_some() {
                return;
            }
            let epoch = self.new_epoch();
            log.claiming = Some(epoch.clone());
            tracing::debug!(%channel, %epoch, "claiming the channel");
            epoch
        };
        let inner = self.clone();
        let channel = channel.clone();
        tokio::spawn(async move {
            let key = format!("c:{channel}");
            let body = Body::Claim {
                channel: channel.clone(),
                epoch,
            };
            if let Err(e) = inner.send(key, body).await {
                tracing::warn!(error = %e, %channel, "pub/sub claim not sent");
                let mut st = inner.sequencer.lock_unpoisoned();
                if let Some(log) = st.logs.get_mut(&channel) {
                    log.claiming = None;
                }
            }
        });
    }

    /// A claim from the log: `src`/`boot` sequences `channel` from here on.
    pub(super) fn on_claim(
        self: &Arc<Self>,
        channel: &Arc<str>,
        epoch: Arc<str>,
        src: Arc<str>,
        boot: Arc<str>,
    ) {
        let now = Instant::now();
        let mut st = self.sequencer.lock_unpoisoned();
        let log = self.log(&mut st, channel, now);
        let was_mine = self.owns(log);
        log.set_epoch(epoch.clone());
        let own = src == self.me && boot == self.boot;
        log.owner = Some((src, boot));
        log.claimed = true;
        log.complete = true;
        log.assigned = 0;
        log.broken = false;
        tracing::debug!(%channel, %epoch, own, was_mine, buffered = log.buffer.len(), "claim read from the log");
        if own {
            if log.claiming.as_ref() == Some(&epoch) {
                log.claiming = None;
            }
            // Every request still unanswered, in log order.
            let buffered: Vec<Request> = log
                .buffer
                .drain(..)
                .filter(|(t, _)| now.duration_since(*t) <= ROUND_TRIP_TIMEOUT)
                .map(|(_, r)| r)
                .collect();
            for req in buffered {
                self.assign(&mut st, channel, req);
            }
            drop(st);
            self.advertise(channel, Some(epoch));
        } else {
            // Superseded: our copies still on the way will be refused.
            st.outbox.remove(channel);
            drop(st);
            if was_mine {
                self.advertise(channel, None);
            }
        }
    }

    /// A release from the log: the channel has no sequencer any more.
    pub(super) fn on_release(&self, channel: &Arc<str>, src: &Arc<str>, boot: &Arc<str>) {
        let mut st = self.sequencer.lock_unpoisoned();
        if let Some(log) = st.logs.get_mut(channel) {
            if log
                .owner
                .as_ref()
                .is_some_and(|(i, b)| i == src && b == boot)
            {
                log.owner = None;
            }
        }
    }
}
