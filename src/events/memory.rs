//! The memory bus's event [`Store`]: the same log, members, pending
//! subjects and cursor as on a shared bus, in this process. Events are
//! lost with the instance (documented); there is one instance, so the
//! lease is always held and nobody is reaped.
//!
//! Bounds: the log keeps at most [`MAX_LOG`] undelivered events and the
//! dead-letter log [`MAX_DEAD`] (oldest dropped first, counted in
//! `eventsDropped`); one `seq` counter per user and channel seen since the
//! start.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::store::{Change, Op, Store, Stored, UserPresence};
use super::{Event, EventStats, Kind, MAX_DEAD, MAX_LOG};
use crate::error::Result;
use crate::ids::random_base36;
use crate::sync::MutexExt;

/// One client's record: what its disconnect must undo.
#[derive(Default)]
struct Record {
    user: Option<String>,
    channels: HashSet<String>,
}

#[derive(Default)]
struct State {
    /// Undelivered events: (position, JSON, since ms).
    log: VecDeque<(u64, String, u64)>,
    /// Position of the next event.
    next_pos: u64,
    /// Dead-lettered events: (JSON, since ms).
    dead: VecDeque<(String, u64)>,
    /// `seq` per subject; a client's is dropped with its last event.
    seqs: HashMap<String, u64>,
    /// Live clients.
    clients: HashMap<String, Record>,
    /// Subject (`user:…`, `channel:…`) → its clients.
    members: HashMap<String, HashSet<String>>,
    /// Emptied subject → when its grace ends (ms).
    pending: HashMap<String, u64>,
    /// The same, by due time, for `settle`.
    due: BTreeMap<(u64, String), ()>,
}

/// The in-process store.
pub(super) struct MemoryStore {
    state: Mutex<State>,
    instance_id: String,
    grace_ms: u64,
    /// For `eventsDropped` when the bounded logs overflow.
    stats: Arc<EventStats>,
    /// Distinguishes ids of this process from a previous one's.
    nonce: String,
    next_id: AtomicU64,
}

impl MemoryStore {
    pub(super) fn new(instance_id: &str, grace_ms: u64, stats: Arc<EventStats>) -> Self {
        MemoryStore {
            state: Mutex::new(State::default()),
            instance_id: instance_id.to_string(),
            grace_ms,
            stats,
            nonce: random_base36(10),
            next_id: AtomicU64::new(0),
        }
    }

    fn emit(
        &self,
        st: &mut State,
        kind: Kind,
        subject: String,
        now_ms: u64,
        fill: impl FnOnce(&mut Event),
    ) {
        let seq = st.seqs.entry(subject.clone()).or_insert(0);
        *seq += 1;
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut event = Event::new(
            format!("{}-{n}", self.nonce),
            kind,
            subject,
            *seq,
            now_ms,
            &self.instance_id,
        );
        fill(&mut event);
        let json = serde_json::to_string(&event).expect("events serialize");
        let pos = st.next_pos;
        st.next_pos += 1;
        st.log.push_back((pos, json, now_ms));
        if st.log.len() > MAX_LOG {
            st.log.pop_front();
            EventStats::inc(&self.stats.dropped);
        }
    }

    fn join(
        &self,
        st: &mut State,
        subject: String,
        client: &str,
        now_ms: u64,
        kind: Kind,
        fill: impl FnOnce(&mut Event),
    ) -> u64 {
        let set = st.members.entry(subject.clone()).or_default();
        if !set.insert(client.to_string()) || set.len() != 1 {
            return 0;
        }
        if let Some(due) = st.pending.remove(&subject) {
            st.due.remove(&(due, subject));
            return 0; // back within the grace: nothing to tell
        }
        self.emit(st, kind, subject, now_ms, fill);
        1
    }

    fn leave(&self, st: &mut State, subject: String, client: &str, now_ms: u64) {
        let Some(set) = st.members.get_mut(&subject) else {
            return;
        };
        if set.remove(client) && set.is_empty() {
            st.members.remove(&subject);
            let due = now_ms + self.grace_ms;
            st.due.insert((due, subject.clone()), ());
            st.pending.insert(subject, due);
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn record(&self, change: Change<'_>, now_ms: u64) -> Result<u64> {
        let mut st = self.state.lock_unpoisoned();
        let st = &mut *st;
        let client = change.client_id;
        let client_subject = format!("client:{client}");
        let user = change.user_id.map(str::to_string);
        let mut n = 0;
        match change.op {
            Op::Connect => {
                if st.clients.contains_key(client) {
                    return Ok(0);
                }
                st.clients.insert(
                    client.to_string(),
                    Record {
                        user: user.clone(),
                        channels: HashSet::new(),
                    },
                );
                self.emit(st, Kind::Connect, client_subject, now_ms, |e| {
                    e.client_id = Some(client.into());
                    e.user_id = user.clone();
                });
                n += 1;
                if let Some(u) = &user {
                    n += self.join(
                        st,
                        format!("user:{u}"),
                        client,
                        now_ms,
                        Kind::UserOnline,
                        |e| {
                            e.client_id = Some(client.into());
                            e.user_id = Some(u.clone());
                        },
                    );
                }
            }
            Op::Subscribe(channel) => {
                let Some(rec) = st.clients.get_mut(client) else {
                    return Ok(0);
                };
                if !rec.channels.insert(channel.to_string()) {
                    return Ok(0);
                }
                let user = rec.user.clone();
                let fill = |e: &mut Event| {
                    e.client_id = Some(client.into());
                    e.user_id = user.clone();
                    e.channel = Some(channel.into());
                };
                self.emit(st, Kind::Subscribe, client_subject, now_ms, fill);
                n += 1 + self.join(
                    st,
                    format!("channel:{channel}"),
                    client,
                    now_ms,
                    Kind::ChannelOccupied,
                    fill,
                );
            }
            Op::Unsubscribe(channel) => {
                let Some(rec) = st.clients.get_mut(client) else {
                    return Ok(0);
                };
                if !rec.channels.remove(channel) {
                    return Ok(0);
                }
                let user = rec.user.clone();
                self.emit(st, Kind::Unsubscribe, client_subject, now_ms, |e| {
                    e.client_id = Some(client.into());
                    e.user_id = user;
                    e.channel = Some(channel.into());
                });
                self.leave(st, format!("channel:{channel}"), client, now_ms);
                n += 1;
            }
            Op::Disconnect { code, reason } => {
                let Some(rec) = st.clients.remove(client) else {
                    return Ok(0);
                };
                let mut channels: Vec<_> = rec.channels.into_iter().collect();
                channels.sort();
                for channel in channels {
                    self.emit(st, Kind::Unsubscribe, client_subject.clone(), now_ms, |e| {
                        e.client_id = Some(client.into());
                        e.user_id = rec.user.clone();
                        e.channel = Some(channel.clone());
                    });
                    self.leave(st, format!("channel:{channel}"), client, now_ms);
                    n += 1;
                }
                self.emit(st, Kind::Disconnect, client_subject.clone(), now_ms, |e| {
                    e.client_id = Some(client.into());
                    e.user_id = rec.user.clone();
                    e.code = Some(code);
                    e.reason = Some(reason.to_string());
                });
                st.seqs.remove(&client_subject);
                n += 1;
                if let Some(u) = &rec.user {
                    self.leave(st, format!("user:{u}"), client, now_ms);
                }
            }
        }
        Ok(n)
    }

    async fn settle(&self, now_ms: u64) -> Result<u64> {
        let mut st = self.state.lock_unpoisoned();
        let st = &mut *st;
        let mut n = 0;
        while let Some(((due, subject), ())) = st.due.pop_first() {
            if due > now_ms {
                st.due.insert((due, subject), ());
                break;
            }
            st.pending.remove(&subject);
            if st.members.contains_key(&subject) {
                continue;
            }
            if let Some(user) = subject.strip_prefix("user:") {
                let user = user.to_string();
                self.emit(st, Kind::UserOffline, subject, now_ms, |e| {
                    e.user_id = Some(user)
                });
            } else if let Some(channel) = subject.strip_prefix("channel:") {
                let channel = channel.to_string();
                self.emit(st, Kind::ChannelVacated, subject, now_ms, |e| {
                    e.channel = Some(channel)
                });
            }
            n += 1;
        }
        Ok(n)
    }

    async fn lease(&self) -> Result<bool> {
        Ok(true)
    }

    async fn read(&self, max: usize) -> Result<Vec<Stored>> {
        let st = self.state.lock_unpoisoned();
        Ok(st
            .log
            .iter()
            .take(max)
            .map(|(pos, json, since_ms)| Stored {
                pos: pos.to_string(),
                json: json.clone(),
                since_ms: *since_ms,
            })
            .collect())
    }

    async fn ack(&self, pos: &str) -> Result<()> {
        let pos: u64 = pos.parse().unwrap_or(0);
        let mut st = self.state.lock_unpoisoned();
        while st.log.front().is_some_and(|(p, _, _)| *p <= pos) {
            st.log.pop_front();
        }
        Ok(())
    }

    async fn dead_letter(&self, batch: &[Stored]) -> Result<()> {
        {
            let mut st = self.state.lock_unpoisoned();
            for s in batch {
                st.dead.push_back((s.json.clone(), s.since_ms));
                if st.dead.len() > MAX_DEAD {
                    st.dead.pop_front();
                    EventStats::inc(&self.stats.dropped);
                }
            }
        }
        match batch.last() {
            Some(last) => self.ack(&last.pos).await,
            None => Ok(()),
        }
    }

    async fn replay(&self, max: usize, now_ms: u64) -> Result<u64> {
        let mut st = self.state.lock_unpoisoned();
        let mut n = 0;
        while n < max {
            let Some((json, _)) = st.dead.pop_front() else {
                break;
            };
            let pos = st.next_pos;
            st.next_pos += 1;
            st.log.push_back((pos, json, now_ms));
            n += 1;
        }
        Ok(n as u64)
    }

    async fn dead_count(&self) -> Result<u64> {
        Ok(self.state.lock_unpoisoned().dead.len() as u64)
    }

    async fn user(&self, user_id: &str) -> Result<UserPresence> {
        let st = self.state.lock_unpoisoned();
        let subject = format!("user:{user_id}");
        let connections = st.members.get(&subject).map_or(0, |m| m.len() as u64);
        Ok(UserPresence {
            connections,
            online: connections > 0 || st.pending.contains_key(&subject),
            seq: st.seqs.get(&subject).copied().unwrap_or(0),
        })
    }

    async fn heartbeat(&self, _now_ms: u64) -> Result<u64> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change<'a>(op: Op<'a>, client: &'a str, user: Option<&'a str>) -> Change<'a> {
        Change {
            op,
            client_id: client,
            user_id: user,
        }
    }

    fn types(events: &[Stored]) -> Vec<String> {
        events
            .iter()
            .map(|s| serde_json::from_str::<Event>(&s.json).unwrap())
            .map(|e| {
                serde_json::to_value(e.kind)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[tokio::test]
    async fn changes_are_idempotent_and_a_user_counts_every_connection() {
        let s = MemoryStore::new("i", 1000, Arc::default());
        assert_eq!(
            s.record(change(Op::Connect, "a", Some("u")), 1)
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            s.record(change(Op::Connect, "a", Some("u")), 1)
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            s.record(change(Op::Connect, "b", Some("u")), 1)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            s.record(change(Op::Subscribe("c"), "a", None), 2)
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            s.record(change(Op::Subscribe("c"), "a", None), 2)
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            s.record(change(Op::Unsubscribe("x"), "a", None), 2)
                .await
                .unwrap(),
            0
        );
        let bye = Op::Disconnect {
            code: 1000,
            reason: "",
        };
        // a's disconnect also unsubscribes it; the user stays online via b.
        assert_eq!(s.record(change(bye, "a", Some("u")), 3).await.unwrap(), 2);
        assert_eq!(s.record(change(bye, "a", Some("u")), 3).await.unwrap(), 0);
        assert_eq!(s.user("u").await.unwrap().connections, 1);
        assert_eq!(
            s.settle(2000).await.unwrap(),
            1,
            "only the channel is vacated"
        );
        s.record(change(bye, "b", Some("u")), 3000).await.unwrap();
        assert_eq!(s.settle(3500).await.unwrap(), 0, "within the grace");
        assert!(s.user("u").await.unwrap().online);
        assert_eq!(s.settle(4000).await.unwrap(), 1);
        let p = s.user("u").await.unwrap();
        assert_eq!((p.online, p.connections, p.seq), (false, 0, 2));
        let log = s.read(100).await.unwrap();
        assert_eq!(
            types(&log),
            [
                "connect",
                "user_online",
                "connect",
                "subscribe",
                "channel_occupied",
                "unsubscribe",
                "disconnect",
                "channel_vacated",
                "disconnect",
                "user_offline"
            ]
        );
        s.ack(&log[4].pos).await.unwrap();
        assert_eq!(s.read(100).await.unwrap().len(), 5);
    }
}
