//! Presence and the client directory, by gossip: this instance's own
//! clients and memberships ([`Local`]) announced as versioned deltas
//! ([`Inner::member_change`]) and snapshots ([`Inner::announce`], also the
//! heartbeat), what it knows of every other instance ([`Remote`]), the
//! acknowledgements that make a presence change visible everywhere before
//! it returns, and the expiry of silent instances: when one falls silent
//! for `presence_ttl` its members `leave` (each instance tells its own
//! subscribers, so every subscriber hears it once), when it restarts (new
//! boot) its old members leave, and when it is heard again after being
//! given up they `join` again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Body, Inner, PRESENCE_ACK_WAIT, Wire};
use crate::broker::Control;
use crate::error::Result;
use crate::protocol::ClientInfo;
use crate::sync::MutexExt;

/// This instance's own clients and memberships, versioned for gossip.
#[derive(Default)]
pub(super) struct Local {
    /// Bumped by every change; a snapshot at `ver` reflects all changes
    /// up to it.
    ver: u64,
    /// Clients connected here.
    clients: HashSet<Arc<str>>,
    /// Channel → members connected here.
    members: HashMap<Arc<str>, HashMap<Arc<str>, ClientInfo>>,
    /// Channel → epoch, for the channels this instance sequences.
    sequenced: HashMap<Arc<str>, Arc<str>>,
}

/// One versioned entry of a remote view: `None` is a removal (tombstone).
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) ver: u64,
    pub(super) info: Option<ClientInfo>,
}

/// What this instance knows of another one.
pub(super) struct Remote {
    /// The boot the view belongs to; a new boot resets it.
    pub(super) boot: Arc<str>,
    /// Last message from it; older than `presence_ttl`: forgotten.
    pub(super) heard: Instant,
    /// Version of the last snapshot applied; older deltas are ignored.
    pub(super) snap_ver: u64,
    /// Its clients (directory).
    pub(super) clients: HashMap<Arc<str>, Entry>,
    /// Channel → its members.
    pub(super) members: HashMap<Arc<str>, HashMap<Arc<str>, Entry>>,
    /// Channel → (version, epoch) of the channels it sequences (`None`: a
    /// tombstone).
    pub(super) sequences: HashMap<Arc<str>, (u64, Option<Arc<str>>)>,
    /// Channel → the last offset it had assigned at its last snapshot.
    pub(super) tops: HashMap<Arc<str>, u64>,
    /// Its members were announced as gone (`leave` to the local
    /// subscribers) when it fell silent; heard again, they are announced
    /// back (`join`).
    pub(super) mourned: bool,
}

impl Remote {
    pub(super) fn new(boot: Arc<str>) -> Self {
        Remote {
            boot,
            heard: Instant::now(),
            snap_ver: 0,
            clients: HashMap::new(),
            members: HashMap::new(),
            sequences: HashMap::new(),
            tops: HashMap::new(),
            mourned: false,
        }
    }

    /// Its present members, as `join` (`present`) or `leave` events for
    /// the local subscribers: what a crash, a restart (new boot) or a
    /// return after silence changes in presence.
    pub(super) fn events(&self, present: bool) -> Vec<Control> {
        let mut out = Vec::new();
        for (channel, members) in &self.members {
            for info in members.values().filter_map(|e| e.info.clone()) {
                let channel = channel.clone();
                out.push(if present {
                    Control::Join { channel, info }
                } else {
                    Control::Leave { channel, info }
                });
            }
        }
        out
    }

    pub(super) fn apply_delta(
        &mut self,
        ver: u64,
        channel: Option<Arc<str>>,
        info: ClientInfo,
        present: bool,
    ) {
        if ver <= self.snap_ver {
            return;
        }
        let map = match channel {
            None => &mut self.clients,
            Some(ch) => self.members.entry(ch).or_default(),
        };
        let id = info.client_id.clone();
        if map.get(&id).is_some_and(|e| e.ver >= ver) {
            return;
        }
        let info = present.then_some(info);
        map.insert(id, Entry { ver, info });
    }

    /// A change of what it sequences, unless a newer state is known.
    pub(super) fn apply_sequences(&mut self, ver: u64, of: Arc<str>, epoch: Option<Arc<str>>) {
        if ver <= self.snap_ver || self.sequences.get(&of).is_some_and(|(v, _)| *v >= ver) {
            return;
        }
        self.sequences.insert(of, (ver, epoch));
    }

    pub(super) fn apply_snapshot(
        &mut self,
        ver: u64,
        clients: Vec<Arc<str>>,
        members: Vec<(Arc<str>, Vec<ClientInfo>)>,
        sequenced: Vec<(Arc<str>, Arc<str>)>,
        tops: Vec<(Arc<str>, u64)>,
    ) {
        if ver <= self.snap_ver {
            return;
        }
        self.tops = tops.into_iter().collect();
        self.sequences.retain(|_, (v, _)| *v > ver);
        for (of, epoch) in sequenced {
            self.sequences.entry(of).or_insert((ver, Some(epoch)));
        }
        // Keep only what is newer than the snapshot, then add its content.
        self.clients.retain(|_, e| e.ver > ver);
        for id in clients {
            self.clients.entry(id.clone()).or_insert(Entry {
                ver,
                info: Some(ClientInfo {
                    client_id: id,
                    user_id: None,
                    name: None,
                }),
            });
        }
        for m in self.members.values_mut() {
            m.retain(|_, e| e.ver > ver);
        }
        for (channel, infos) in members {
            let m = self.members.entry(channel).or_default();
            for info in infos {
                m.entry(info.client_id.clone()).or_insert(Entry {
                    ver,
                    info: Some(info),
                });
            }
        }
        self.members.retain(|_, m| !m.is_empty());
        self.snap_ver = ver;
    }
}

/// A presence change's missing acknowledgements: the instances still to
/// answer, and whom to tell when none is left.
pub(super) type PendingAcks = (HashSet<Arc<str>>, Option<oneshot::Sender<()>>);

impl Inner {
    /// Publish this instance's complete state (the heartbeat).
    pub(super) async fn announce(&self) -> Result<()> {
        let tops = self.assigned_tops();
        let body = {
            let local = self.local.lock_unpoisoned();
            Body::Snapshot {
                tops,
                ver: local.ver,
                clients: local.clients.iter().cloned().collect(),
                members: local
                    .members
                    .iter()
                    .map(|(ch, m)| (ch.clone(), m.values().cloned().collect()))
                    .collect(),
                sequenced: local
                    .sequenced
                    .iter()
                    .map(|(c, e)| (c.clone(), e.clone()))
                    .collect(),
            }
        };
        self.send(format!("m:{}", self.me), body).await.map(|_| ())
    }

    /// Record a change of our own state and announce it.
    pub(super) async fn member_change(
        &self,
        channel: Option<&str>,
        info: &ClientInfo,
        present: bool,
    ) -> Result<()> {
        let ver = {
            let mut local = self.local.lock_unpoisoned();
            match channel {
                None if present => {
                    local.clients.insert(info.client_id.clone());
                }
                None => {
                    local.clients.remove(&info.client_id);
                }
                Some(ch) if present => {
                    local
                        .members
                        .entry(Arc::from(ch))
                        .or_default()
                        .insert(info.client_id.clone(), info.clone());
                }
                Some(ch) => {
                    if let Some(m) = local.members.get_mut(ch) {
                        m.remove(&info.client_id);
                        if m.is_empty() {
                            local.members.remove(ch);
                        }
                    }
                }
            }
            local.ver += 1;
            local.ver
        };
        let key = format!("m:{}", self.me);
        if channel.is_none() {
            // The directory: back through our own subscription is enough
            // (a direct to a target not known yet asks everyone).
            let body = Body::Member {
                ver,
                channel: None,
                info: info.clone(),
                present,
                ack: false,
            };
            return self.send_and_wait(key, body).await;
        }
        // Presence: wait until every live instance has applied it, so that
        // `members` anywhere shows it once this returns. An instance that
        // does not answer within PRESENCE_ACK_WAIT (dying, not yet expired)
        // gets it later.
        let live: HashSet<Arc<str>> = {
            let now = Instant::now();
            self.remotes
                .lock_unpoisoned()
                .iter()
                .filter(|(_, r)| self.alive(r, now))
                .map(|(id, _)| id.clone())
                .collect()
        };
        let body = Body::Member {
            ver,
            channel: channel.map(Arc::from),
            info: info.clone(),
            present,
            ack: !live.is_empty(),
        };
        if live.is_empty() {
            return self.send(key, body).await.map(|_| ());
        }
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.member_acks
            .lock_unpoisoned()
            .insert(id, (live, Some(tx)));
        if let Err(e) = self.send_as(id, key, body).await {
            self.member_acks.lock_unpoisoned().remove(&id);
            return Err(e);
        }
        let _ = tokio::time::timeout(PRESENCE_ACK_WAIT, rx).await;
        self.member_acks.lock_unpoisoned().remove(&id);
        Ok(())
    }

    /// Record that this instance sequences `channel` in `epoch` (`None`:
    /// no longer) and advertise it on the control topic.
    pub(super) fn advertise(self: &Arc<Self>, channel: &Arc<str>, epoch: Option<Arc<str>>) {
        let ver = {
            let mut local = self.local.lock_unpoisoned();
            match &epoch {
                Some(e) => local.sequenced.insert(channel.clone(), e.clone()),
                None => local.sequenced.remove(channel),
            };
            local.ver += 1;
            local.ver
        };
        let body = Body::Sequences {
            ver,
            of: channel.clone(),
            epoch,
        };
        self.spawn_send(format!("m:{}", self.me), body);
    }

    /// The live instance that advertises sequencing `channel`, if any
    /// other than this one.
    pub(super) fn advertised_owner(&self, channel: &str, now: Instant) -> Option<Arc<str>> {
        let remotes = self.remotes.lock_unpoisoned();
        remotes.iter().find_map(|(id, r)| {
            let advertised = r.sequences.get(channel).is_some_and(|(_, e)| e.is_some());
            (advertised && self.alive(r, now)).then(|| id.clone())
        })
    }

    /// Whether this instance started so recently that the other instances'
    /// snapshots (what they sequence) may not have come yet.
    pub(super) fn settling(&self, now: Instant) -> bool {
        now.duration_since(self.started) < 2 * super::sequencer::CLAIM_WAIT
    }

    /// Whether a remote view is still alive.
    pub(super) fn alive(&self, r: &Remote, now: Instant) -> bool {
        now.duration_since(r.heard) < self.presence_ttl
    }

    /// Presence events that no bus message carries (see [`Remote::events`]),
    /// to this instance's subscribers only.
    pub(super) fn tell_local(&self, events: &[Control]) {
        if let Some(h) = self.handler() {
            for e in events {
                h.on_control(e);
            }
        }
    }

    /// `PresenceStore::members`: the local members and every live
    /// instance's.
    pub(super) fn members(&self, channel: &str) -> Result<Vec<ClientInfo>> {
        let mut out: HashMap<Arc<str>, ClientInfo> = self
            .local
            .lock_unpoisoned()
            .members
            .get(channel)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let now = Instant::now();
        for r in self.remotes.lock_unpoisoned().values() {
            if !self.alive(r, now) {
                continue;
            }
            if let Some(m) = r.members.get(channel) {
                for (id, e) in m {
                    if let Some(info) = &e.info {
                        out.insert(id.clone(), info.clone());
                    }
                }
            }
        }
        let mut members: Vec<ClientInfo> = out.into_values().collect();
        members.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        Ok(members)
    }

    /// A membership change, its acknowledgement, a snapshot, a hello or a
    /// goodbye from the subscription (from [`Inner::handle`]).
    pub(super) fn receive_gossip(self: &Arc<Self>, wire: Wire, own: bool) {
        match wire.body {
            Body::Member {
                ver,
                channel,
                info,
                present,
                ack,
            } => {
                if own {
                    if let Some(tx) = self.waiters.lock_unpoisoned().remove(&wire.id) {
                        let _ = tx.send(());
                    }
                    return;
                }
                if let Some(r) = self.remotes.lock_unpoisoned().get_mut(&wire.src) {
                    r.apply_delta(ver, channel, info, present);
                }
                if ack {
                    let inner = self.clone();
                    let key = format!("m:{}", self.me);
                    let body = Body::MemberAck {
                        to_boot: wire.boot.clone(),
                        of: wire.id,
                    };
                    tokio::spawn(async move {
                        let _ = inner.send(key, body).await;
                    });
                }
            }
            Body::MemberAck { to_boot, of } => {
                if to_boot == self.boot {
                    let mut acks = self.member_acks.lock_unpoisoned();
                    if let Some((left, tx)) = acks.get_mut(&of) {
                        left.remove(&wire.src);
                        if left.is_empty() {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(());
                            }
                        }
                    }
                }
            }
            Body::Snapshot {
                ver,
                clients,
                members,
                sequenced,
                tops,
            } => {
                if !own {
                    if let Some(r) = self.remotes.lock_unpoisoned().get_mut(&wire.src) {
                        r.apply_snapshot(ver, clients, members, sequenced, tops);
                    }
                }
            }
            Body::Sequences { ver, of, epoch } => {
                if !own {
                    if let Some(r) = self.remotes.lock_unpoisoned().get_mut(&wire.src) {
                        r.apply_sequences(ver, of, epoch);
                    }
                }
            }
            Body::Hello => {
                if !own {
                    let inner = self.clone();
                    tokio::spawn(async move {
                        let _ = inner.announce().await;
                    });
                }
            }
            Body::Bye => {
                if !own {
                    self.remotes.lock_unpoisoned().remove(&wire.src);
                }
            }
            // Handled by publish and direct.
            Body::Pub { .. }
            | Body::Broadcast { .. }
            | Body::JoinLeave { .. }
            | Body::Seq { .. }
            | Body::Claim { .. }
            | Body::Release { .. }
            | Body::Direct { .. }
            | Body::DirectAck { .. }
            | Body::Ping { .. }
            | Body::Fetch { .. }
            | Body::Backfill { .. } => {}
        }
    }

    /// Heartbeat: announce, forget silent instances, drop idle streams,
    /// leave unneeded shards.
    pub(super) async fn heartbeat_loop(self: Arc<Self>) {
        let period = (self.presence_ttl / 3).max(Duration::from_millis(50));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.announce().await {
                tracing::debug!(error = %e, "pub/sub heartbeat failed");
            }
            // An instance silent for `presence_ttl` is gone (crashed): its
            // members leave, told to this instance's subscribers (every
            // instance tells its own, so each subscriber hears it once).
            let now = Instant::now();
            let mut gone = Vec::new();
            {
                let mut remotes = self.remotes.lock_unpoisoned();
                for r in remotes.values_mut() {
                    if !r.mourned && !self.alive(r, now) {
                        r.mourned = true;
                        gone.extend(r.events(false));
                    }
                }
                remotes.retain(|_, r| now.duration_since(r.heard) < self.presence_ttl * 4);
            }
            self.tell_local(&gone);
            self.sweep_sequencer(now);
            self.sweep_shards(now);
            self.sweep_stalls(now);
            self.sweep_lags(now);
        }
    }
}
