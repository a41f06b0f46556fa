//! Leaves for the members of a crashed instance ("ghosts").
//!
//! A crashed instance's presence keys are not deleted: they expire (the
//! bucket's `max_age` is `presence_ttl`), and NATS 2.9 leaves no marker
//! and sends no watch event when it drops a message by age, so nobody is
//! told. Instead every instance watches the keys of the channels it
//! serves: after each presence refresh pass (every `presence_refresh`) it
//! reads, for each channel with local members whose namespace has
//! `join_leave`, every instance's key (as `members` does), and compares
//! with the previous pass:
//!
//! * a key read live before and **absent** now has expired (a clean
//!   removal writes a delete marker, which stays `presence_ttl`, and whose
//!   members were told `leave` by their own instance): its members, as
//!   last read, get a `leave`, told to **this instance's own subscribers
//!   only**, except a member that some other key still holds (it moved
//!   to another instance). Every instance tells its own subscribers, so
//!   each subscriber hears the leave once and no instance coordinates
//!   with another.
//! * a key that was mourned so and comes back (its instance was cut off,
//!   not crashed) gets a `join` for the members that were told `leave`,
//!   that it holds again and that no other key holds. Mourned keys are
//!   remembered `4 × presence_ttl` (as the Pub/Sub bus remembers a silent
//!   instance).
//! * a member gone from a key still live, with no live `leave` seen by
//!   the next pass, gets a `leave` then (its instance restarted under the
//!   same instance id, or its own leave was lost); waiting one pass lets
//!   a clean leave, published just after its key is rewritten, arrive.
//! * the live `join` / `leave` events of the channel (seen by the channel
//!   task, [`Ghosts::saw`]) keep the picture current between passes: a
//!   member that left cleanly is not mourned again (nor brought back by
//!   a read that started before its leave), one that joined again
//!   elsewhere is not re-joined.
//! * the keys a `members` read finds are tracked at once
//!   ([`Ghosts::noticed`]), so a member a client saw in a `presence`
//!   answer gets its leave even when its key expires before the next pass.
//!
//! A member that joins on an instance is in that instance's key before
//! its `join` is published, and the key lives `presence_ttl` after that
//! write, longer than a pass interval: so every member whose join a
//! subscriber here could have seen is read by a pass before its key can
//! expire. When the bucket itself is new (the server lost it and it was
//! re-created), everything read before is forgotten without events:
//! those keys vanished with the server's data, not with their instances
//! (so a member whose instance crashed during such a loss gets no leave).
//! Cost: one stream-info request per pass, one short-lived consumer per
//! watched channel per pass (as one `presence` request); the subscribe
//! and presence-write paths do nothing more.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::datetime::DateTime;
use tokio::time::Instant;

use super::{NatsPresence, bus_error};
use crate::broker::{BrokerHandler, Control};
use crate::error::Result;
use crate::protocol::ClientInfo;
use crate::sync::MutexExt;

/// How long a key told `leave` is remembered, in `presence_ttl`s: a
/// partition shorter than this ends with a `join` again.
const MOURN_TTLS: u32 = 4;

/// One instance's key of a channel, as read.
pub(super) enum KeyState {
    /// Written (by a put): the instance's members.
    Live(Vec<ClientInfo>),
    /// Deleted by its instance (a clean removal).
    Deleted,
}

/// Instance token → its key of one channel.
pub(super) type Keys = HashMap<Arc<str>, KeyState>;

/// What this instance knows of other instances' keys, per channel.
#[derive(Default)]
pub(super) struct Ghosts {
    /// Set by `Broker::start`: the local subscribers are told through it.
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// Watched channel → its keys as last read.
    channels: Mutex<HashMap<Arc<str>, Watched>>,
    /// Creation time of the bucket's stream at the last pass: a different
    /// one means the server lost the bucket, and everything is forgotten.
    bucket_created: Mutex<Option<DateTime>>,
}

/// One watched channel.
#[derive(Default)]
struct Watched {
    /// Instance token → its members as last read (live keys only; not
    /// this instance's own).
    seen: HashMap<Arc<str>, Vec<ClientInfo>>,
    /// Instance token → when its key expired, and the members told
    /// `leave` then (to be told `join` if the key comes back).
    mourned: HashMap<Arc<str>, (Instant, Vec<ClientInfo>)>,
    /// Members gone from a live key at the last pass with no `leave` seen
    /// (its instance restarted under the same id, or its leave was lost):
    /// still gone and unannounced at the next pass, they are told `leave`.
    vanished: HashMap<Arc<str>, ClientInfo>,
    /// Members whose live `leave` arrived since the last pass: a read
    /// that started before it may still show them, and must not bring
    /// them back.
    left: HashSet<Arc<str>>,
}

impl Ghosts {
    /// The handler of the broker (called once, by `Broker::start`).
    pub(super) fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        let _ = self.handler.set(handler);
    }

    /// A live `join` / `leave` of a channel, as its channel task delivers
    /// it: a member that left is no longer one to mourn or re-join; one
    /// that joined is no longer one to re-join.
    pub(super) fn saw(&self, control: &Control) {
        let (channel, info, left) = match control {
            Control::Join { channel, info } => (channel, info, false),
            Control::Leave { channel, info } => (channel, info, true),
            Control::Broadcast { .. } => return,
        };
        let mut channels = self.channels.lock_unpoisoned();
        let Some(w) = channels.get_mut(channel) else {
            return;
        };
        let id = &info.client_id;
        if left {
            for members in w.seen.values_mut() {
                members.retain(|m| m.client_id != *id);
            }
            w.left.insert(id.clone());
        } else {
            w.left.remove(id);
        }
        for (_, members) in w.mourned.values_mut() {
            members.retain(|m| m.client_id != *id);
        }
        w.vanished.remove(id);
    }

    /// Keys a `members` read found for a channel served here: track the
    /// live ones not tracked yet. Never forgets anything (reads run
    /// concurrently; only passes compare).
    pub(super) fn noticed(&self, channel: &str, keys: &Keys, me: &str) {
        let mut channels = self.channels.lock_unpoisoned();
        let w = match channels.get_mut(channel) {
            Some(w) => w,
            None => channels.entry(Arc::from(channel)).or_default(),
        };
        for (instance, state) in keys {
            if let KeyState::Live(members) = state {
                if **instance != *me
                    && !w.seen.contains_key(instance)
                    && !w.mourned.contains_key(instance)
                {
                    let members = members
                        .iter()
                        .filter(|m| !w.left.contains(&m.client_id))
                        .cloned()
                        .collect();
                    w.seen.insert(instance.clone(), members);
                }
            }
        }
    }

    /// Compare a pass's read of `channel` with what was known: the
    /// `leave` and `join` events it implies (see the module docs).
    fn diff(&self, channel: &Arc<str>, keys: &Keys, me: &str, mourn_for: Duration) -> Vec<Control> {
        let now = Instant::now();
        let held_by = |skip: Option<&Arc<str>>| -> HashSet<Arc<str>> {
            keys.iter()
                .filter(|(instance, _)| Some(*instance) != skip)
                .filter_map(|(_, state)| match state {
                    KeyState::Live(members) => Some(members),
                    KeyState::Deleted => None,
                })
                .flatten()
                .map(|m| m.client_id.clone())
                .collect()
        };
        let present = held_by(None);
        let mut out = Vec::new();
        let mut channels = self.channels.lock_unpoisoned();
        let w = channels.entry(channel.clone()).or_default();
        // Gone from their key at the last pass, and no leave since.
        for (id, info) in std::mem::take(&mut w.vanished) {
            if !present.contains(&id) {
                out.push(Control::Leave {
                    channel: channel.clone(),
                    info,
                });
            }
        }
        let expired: Vec<Arc<str>> = w
            .seen
            .keys()
            .filter(|instance| !keys.contains_key(*instance))
            .cloned()
            .collect();
        for instance in expired {
            let members = w.seen.remove(&instance).unwrap_or_default();
            let gone: Vec<ClientInfo> = members
                .into_iter()
                .filter(|m| !present.contains(&m.client_id))
                .collect();
            out.extend(gone.iter().map(|info| Control::Leave {
                channel: channel.clone(),
                info: info.clone(),
            }));
            if !gone.is_empty() {
                w.mourned.insert(instance, (now, gone));
            }
        }
        for (instance, state) in keys {
            if **instance == *me {
                continue;
            }
            match state {
                KeyState::Live(members) => {
                    if let Some((_, told)) = w.mourned.remove(instance) {
                        // Back: it was cut off, not crashed.
                        let elsewhere = held_by(Some(instance));
                        for m in members {
                            if told.iter().any(|t| t.client_id == m.client_id)
                                && !elsewhere.contains(&m.client_id)
                            {
                                out.push(Control::Join {
                                    channel: channel.clone(),
                                    info: m.clone(),
                                });
                            }
                        }
                    }
                    let current = members
                        .iter()
                        .filter(|m| !w.left.contains(&m.client_id))
                        .cloned()
                        .collect();
                    let before = w.seen.insert(instance.clone(), current);
                    for m in before.into_iter().flatten() {
                        if !present.contains(&m.client_id) {
                            w.vanished.insert(m.client_id.clone(), m);
                        }
                    }
                }
                KeyState::Deleted => {
                    // Removed by its instance, which sends the leaves;
                    // one not seen by the next pass is told then.
                    for m in w.seen.remove(instance).into_iter().flatten() {
                        if !present.contains(&m.client_id) {
                            w.vanished.insert(m.client_id.clone(), m);
                        }
                    }
                    w.mourned.remove(instance);
                }
            }
        }
        w.mourned
            .retain(|_, (at, _)| now.duration_since(*at) < mourn_for);
        w.left.clear();
        out
    }
}

impl NatsPresence {
    /// One pass over the watched channels (after a refresh pass): read
    /// their keys, tell the local subscribers the leaves and joins found.
    pub(super) async fn watch_ghosts(&self) -> Result<()> {
        let ghosts = &self.bus.ghosts;
        let Some(handler) = ghosts.handler.get().cloned() else {
            return Ok(()); // the broker is not started
        };
        let watched: Vec<Arc<str>> = {
            let local = self.local.lock_unpoisoned();
            local
                .keys()
                .filter(|ch| {
                    self.bus
                        .config
                        .namespace_of(ch)
                        .is_some_and(|ns| ns.presence && ns.join_leave)
                })
                .cloned()
                .collect()
        };
        {
            let keep: HashSet<&Arc<str>> = watched.iter().collect();
            ghosts
                .channels
                .lock_unpoisoned()
                .retain(|ch, _| keep.contains(ch));
        }
        if watched.is_empty() {
            return Ok(());
        }
        let created = self
            .bus
            .js
            .get_stream(format!("KV_{}", self.bus.bucket_name))
            .await
            .map_err(|e| bus_error(format!("presence bucket: {e}")))?
            .cached_info()
            .created;
        {
            let mut known = ghosts.bucket_created.lock_unpoisoned();
            if known.is_some_and(|k| k != created) {
                // A new bucket: what vanished went with the server's data.
                ghosts.channels.lock_unpoisoned().clear();
            }
            *known = Some(created);
        }
        let me = self.bus.instance_token.as_str();
        let mourn_for = self.bus.opts.presence_ttl * MOURN_TTLS;
        for channel in watched {
            let keys = self.read_keys(&channel).await?;
            let events = ghosts.diff(&channel, &keys, me, mourn_for);
            for e in &events {
                handler.on_control(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> ClientInfo {
        ClientInfo {
            client_id: Arc::from(id),
            user_id: None,
            name: None,
        }
    }

    fn keys(entries: &[(&str, Option<&[&str]>)]) -> Keys {
        entries
            .iter()
            .map(|(instance, members)| {
                let state = match members {
                    Some(m) => KeyState::Live(m.iter().map(|id| info(id)).collect()),
                    None => KeyState::Deleted,
                };
                (Arc::from(*instance), state)
            })
            .collect()
    }

    /// `(kind, client id)` of each event.
    fn diff(g: &Ghosts, k: &Keys) -> Vec<(&'static str, String)> {
        let ch: Arc<str> = Arc::from("room");
        g.diff(&ch, k, "me", Duration::from_secs(60))
            .into_iter()
            .map(|c| match c {
                Control::Join { info, .. } => ("join", info.client_id.to_string()),
                Control::Leave { info, .. } => ("leave", info.client_id.to_string()),
                Control::Broadcast { .. } => ("broadcast", String::new()),
            })
            .collect()
    }

    fn leave(id: &str) -> Control {
        Control::Leave {
            channel: Arc::from("room"),
            info: info(id),
        }
    }

    #[test]
    fn an_expired_key_leaves_once_except_members_held_elsewhere() {
        let g = Ghosts::default();
        let before = keys(&[("me", Some(&["m"])), ("b", Some(&["x", "y"]))]);
        assert!(diff(&g, &before).is_empty(), "the first pass only learns");
        // B expired; y is on C now (moved).
        let after = keys(&[("me", Some(&["m"])), ("c", Some(&["y"]))]);
        assert_eq!(diff(&g, &after), vec![("leave", "x".to_string())]);
        assert!(diff(&g, &after).is_empty(), "once");
    }

    #[test]
    fn a_key_back_after_expiring_joins_the_members_told_leave() {
        let g = Ghosts::default();
        diff(&g, &keys(&[("b", Some(&["x", "z"]))]));
        assert_eq!(diff(&g, &keys(&[])).len(), 2);
        // z joined again elsewhere meanwhile (its own join was live).
        g.saw(&Control::Join {
            channel: Arc::from("room"),
            info: info("z"),
        });
        let back = keys(&[("b", Some(&["x", "z", "new"])), ("c", Some(&["z"]))]);
        assert_eq!(diff(&g, &back), vec![("join", "x".to_string())]);
        assert!(diff(&g, &back).is_empty());
    }

    #[test]
    fn a_clean_removal_is_left_to_its_live_leave() {
        let g = Ghosts::default();
        diff(&g, &keys(&[("b", Some(&["x", "y"]))]));
        // x left cleanly; a read that started before its leave still
        // shows it.
        g.saw(&leave("x"));
        assert!(diff(&g, &keys(&[("b", Some(&["x", "y"]))])).is_empty());
        // y's key is deleted; its leave arrives before the next pass.
        assert!(diff(&g, &keys(&[("b", None)])).is_empty());
        g.saw(&leave("y"));
        assert!(diff(&g, &keys(&[("b", None)])).is_empty());
        assert!(
            diff(&g, &keys(&[])).is_empty(),
            "a marker expiring is nothing"
        );
    }

    #[test]
    fn a_member_gone_from_a_live_key_without_a_leave_leaves_a_pass_later() {
        let g = Ghosts::default();
        diff(&g, &keys(&[("b", Some(&["x"]))]));
        // B restarted under the same id: its key now holds someone else.
        assert!(diff(&g, &keys(&[("b", Some(&["n"]))])).is_empty());
        assert_eq!(
            diff(&g, &keys(&[("b", Some(&["n"]))])),
            vec![("leave", "x".to_string())]
        );
    }
}
