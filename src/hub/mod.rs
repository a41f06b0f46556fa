//! The hub: this instance's connections and the channel → subscriber index.
//!
//! Fan-out pushes an already-encoded frame into each recipient's
//! [`OutQueue`]: a reference-count increment and a short lock per
//! recipient, never an await, never a copy of the payload. A recipient
//! whose queue overflows is marked closed (slow consumer) and its own task
//! removes it.
//!
//! Frames one client sends to others (`broadcast`, `direct`) go through
//! the `relay*` methods instead: they are held to their share of each
//! recipient's queue and dropped for a recipient that is behind
//! ([`Hub::relay_dropped`]), never closing it.
//!
//! # Files
//!
//! * `mod.rs`: [`ClientHandle`], the hub's state, the clients (add,
//!   remove, look up), the pushes into their queues and the relays.
//! * `channels.rs`: the channel index: subscribe and unsubscribe, fan-out
//!   of a publication or a join/leave frame, and each channel's last
//!   delivered position (what a bus reads back after an outage).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::error::{ClientError, ErrorCode};
use crate::protocol::{self, ClientInfo, StreamPosition, Text};
use crate::queue::{Limits, OutQueue, Outbound, Push};
use crate::sync::{MutexExt, RwLockExt};

mod channels;

/// One connected client, shared by its session task, the hub and the
/// keep-alive sweeper.
#[derive(Debug)]
pub struct ClientHandle {
    /// The client id.
    id: Arc<str>,
    /// Its user id and display name, in one allocation that an anonymous,
    /// unnamed connection does without, so that the handle stays in a
    /// 160-byte allocation (`session::size_budget`).
    who: Option<Arc<Who>>,
    /// Frames waiting to be written to this client.
    pub queue: OutQueue,
    /// When a frame last arrived from the client (ms since the hub
    /// started); the sweeper compares it with `ping_sent`.
    pub(crate) last_seen: AtomicU64,
    /// When the sweeper last sent a ping (ms since the hub started), 0
    /// before the first.
    pub(crate) ping_sent: AtomicU64,
    /// When the connection's token expires (seconds since the Unix
    /// epoch), 0 without one; the sweeper closes it then (4003).
    pub(crate) expires_at: AtomicU64,
    /// When the oldest unacknowledged publication is due to be resent (ms
    /// since the hub started), 0 when nothing is pending; the sweeper then
    /// queues [`Outbound::Redeliver`].
    pub(crate) ack_deadline: AtomicU64,
}

/// What a [`ClientHandle`] knows of who the client is, besides its id.
#[derive(Debug)]
struct Who {
    user_id: Option<Arc<str>>,
    name: Option<Arc<str>>,
}

impl ClientHandle {
    fn new(info: ClientInfo, now_ms: u64) -> Self {
        let ClientInfo {
            client_id,
            user_id,
            name,
        } = info;
        ClientHandle {
            id: client_id,
            who: (user_id.is_some() || name.is_some()).then(|| Arc::new(Who { user_id, name })),
            queue: OutQueue::new(),
            last_seen: AtomicU64::new(now_ms),
            ping_sent: AtomicU64::new(0),
            expires_at: AtomicU64::new(0),
            ack_deadline: AtomicU64::new(0),
        }
    }

    /// The client's id.
    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// The user id of an authenticated client.
    pub fn user_id(&self) -> Option<&Arc<str>> {
        self.who.as_ref()?.user_id.as_ref()
    }

    /// Who the client is, as shown to others (presence, join/leave).
    pub fn info(&self) -> ClientInfo {
        let who = self.who.as_deref();
        ClientInfo {
            client_id: self.id.clone(),
            user_id: who.and_then(|w| w.user_id.clone()),
            name: who.and_then(|w| w.name.clone()),
        }
    }
}

/// One channel's local state.
#[derive(Default)]
struct ChannelState {
    /// Local subscribers by client id.
    subscribers: HashMap<Arc<str>, Arc<ClientHandle>>,
    /// Position of the newest publication handed to them; a bus that
    /// reconnects after an outage reads the history from here to fill the
    /// gap (see [`Hub::positions`]).
    last: Mutex<Option<StreamPosition>>,
}

/// Local connections and channel subscriptions.
pub struct Hub {
    /// Every local client by id. A std `RwLock`: fan-out holds the read
    /// side while it pushes (non-blocking), writers are connects and
    /// disconnects.
    clients: RwLock<HashMap<Arc<str>, Arc<ClientHandle>>>,
    /// Channel → its local subscribers by client id.
    channels: RwLock<HashMap<Arc<str>, ChannelState>>,
    /// Bounds of every client's queue.
    limits: Limits,
    /// Origin of the millisecond clock in `last_seen` / `ping_sent`.
    epoch: Instant,
    /// Frames pushed to clients (deliveries).
    delivered: AtomicU64,
    /// Connections per user id, for `max_connections_per_user`.
    users: Mutex<HashMap<Arc<str>, usize>>,
    /// Clients closed because their queue overflowed.
    slow_consumers: AtomicU64,
    /// Publications dropped from full queues (drop-oldest policy).
    dropped: AtomicU64,
    /// Publications replaced by a newer one of their channel
    /// (conflate-latest policy).
    conflated: AtomicU64,
    /// Client-relayed frames (`broadcast`, `direct`) dropped for a
    /// recipient whose queue had no room for them.
    relay_dropped: AtomicU64,
}

impl Hub {
    pub fn new(limits: Limits) -> Self {
        Hub {
            clients: RwLock::default(),
            channels: RwLock::default(),
            limits,
            epoch: Instant::now(),
            delivered: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            users: Mutex::default(),
            dropped: AtomicU64::new(0),
            conflated: AtomicU64::new(0),
            relay_dropped: AtomicU64::new(0),
        }
    }

    /// Call `f` on every registered client, under the read lock (no copy
    /// of the list; `f` must not block): the keep-alive sweep.
    pub(crate) fn for_each_client(&self, mut f: impl FnMut(&ClientHandle)) {
        let clients = self.clients.read_unpoisoned();
        for client in clients.values() {
            f(client);
        }
    }

    /// Milliseconds since the hub started (never 0).
    pub fn clock_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Register a new client.
    pub fn add(&self, info: ClientInfo) -> Arc<ClientHandle> {
        if let Some(user) = &info.user_id {
            *self
                .users
                .lock_unpoisoned()
                .entry(user.clone())
                .or_default() += 1;
        }
        let handle = Arc::new(ClientHandle::new(info, self.clock_ms()));
        self.clients
            .write_unpoisoned()
            .insert(handle.id().clone(), handle.clone());
        handle
    }

    /// A handle that is not registered: it gets no broadcast and is not
    /// counted (the diagnostic echo endpoint).
    pub fn detached(&self) -> Arc<ClientHandle> {
        let info = ClientInfo {
            client_id: format!("echo-{}", crate::ids::random_base36(9)).into(),
            user_id: None,
            name: None,
        };
        Arc::new(ClientHandle::new(info, self.clock_ms()))
    }

    /// When the client's oldest unacknowledged publication is due (hub
    /// clock ms), or `None` when nothing is pending.
    pub fn set_ack_deadline(&self, client: &ClientHandle, due_ms: Option<u64>) {
        client
            .ack_deadline
            .store(due_ms.unwrap_or(0), Ordering::Relaxed);
    }

    /// Connections `user_id` holds on this instance.
    pub fn user_connections(&self, user_id: &str) -> usize {
        self.users
            .lock_unpoisoned()
            .get(user_id)
            .copied()
            .unwrap_or(0)
    }

    /// Set when the client's token expires (seconds since the Unix epoch).
    pub fn set_expiry(&self, client: &ClientHandle, expires_at: Option<u64>) {
        client
            .expires_at
            .store(expires_at.unwrap_or(0), Ordering::Relaxed);
    }

    /// Forget a client (its channels must have been left already).
    pub fn remove(&self, client_id: &str) {
        let removed = self.clients.write_unpoisoned().remove(client_id);
        if let Some(user) = removed.as_ref().and_then(|c| c.user_id()) {
            let mut users = self.users.lock_unpoisoned();
            if let Some(n) = users.get_mut(user) {
                *n -= 1;
                if *n == 0 {
                    users.remove(user);
                }
            }
        }
    }

    /// Number of local clients.
    pub fn len(&self) -> usize {
        self.clients.read_unpoisoned().len()
    }

    /// Whether no client is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of every local client.
    pub fn clients(&self) -> Vec<Arc<ClientHandle>> {
        self.clients.read_unpoisoned().values().cloned().collect()
    }

    /// Note that the client sent something (any frame, pong included).
    pub fn touch(&self, client: &ClientHandle) {
        client.last_seen.store(self.clock_ms(), Ordering::Relaxed);
    }

    pub(crate) fn push(&self, client: &ClientHandle, item: Outbound) -> bool {
        match client.queue.push(item, self.limits) {
            Push::Queued => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                true
            }
            Push::Conflated => {
                self.conflated.fetch_add(1, Ordering::Relaxed);
                true
            }
            Push::DroppedOldest(n) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                self.dropped.fetch_add(n as u64, Ordering::Relaxed);
                true
            }
            Push::Overflow => {
                self.slow_consumers.fetch_add(1, Ordering::Relaxed);
                // A client can cause this once per connection, in a loop.
                static SLOW: crate::log_limit::LogLimit =
                    crate::log_limit::LogLimit::new(std::time::Duration::from_secs(10));
                match SLOW.allow() {
                    Some(suppressed) => {
                        tracing::info!(client = %client.id(), suppressed, "slow consumer: outbound queue overflowed, closing")
                    }
                    None => {
                        tracing::debug!(client = %client.id(), "slow consumer: outbound queue overflowed, closing")
                    }
                }
                false
            }
            Push::Closed | Push::Refused => false,
        }
    }

    /// Queue a frame another client sent; false when it was dropped for
    /// this recipient because its queue has no room for relayed frames
    /// (counted in [`Hub::relay_dropped`]). A closed recipient is not a
    /// drop: it is going away.
    pub fn relay(&self, client: &ClientHandle, frame: Text) -> bool {
        match client.queue.push_relayed(frame, self.limits) {
            Push::Refused => {
                self.relay_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(client = %client.id(), "relayed frame dropped: recipient is behind");
                false
            }
            Push::Queued => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => true,
        }
    }

    /// A client's broadcast: queue `frame` for every local client but the
    /// sender, as a relayed frame. Returns how many recipients dropped it.
    pub fn relay_broadcast(&self, frame: &Text, sender: &str) -> usize {
        let clients = self.clients.read_unpoisoned();
        clients
            .iter()
            .filter(|(id, client)| &***id != sender && !self.relay(client, frame.clone()))
            .count()
    }

    /// A client's direct message to the local client `client_id`: `None`
    /// when it is not connected here, else whether it was queued.
    pub fn relay_direct(&self, client_id: &str, frame: Text) -> Option<bool> {
        self.get(client_id).map(|c| self.relay(&c, frame))
    }

    /// A client's direct message to every local subscriber of an internal
    /// channel (a user's connections). Returns how many dropped it.
    pub fn relay_channel(&self, channel: &str, frame: &Text) -> usize {
        let channels = self.channels.read_unpoisoned();
        let Some(state) = channels.get(channel) else {
            return 0;
        };
        state
            .subscribers
            .values()
            .filter(|client| !self.relay(client, frame.clone()))
            .count()
    }

    /// A client's `direct` to a client of this instance, delivered here
    /// rather than through the bus so that a drop (the recipient is behind)
    /// becomes the sender's reply: `None` when the target is not connected
    /// here, else `Err(recipient_busy)` when it was dropped.
    pub fn direct_here(
        &self,
        sender: &str,
        target_id: &str,
        data: &RawValue,
    ) -> Option<Result<(), ClientError>> {
        let frame = protocol::direct(Some(sender), data, protocol::now_ms());
        let queued = self.relay_direct(target_id, frame)?;
        Some(match queued {
            true => Ok(()),
            false => Err(ClientError::new(
                ErrorCode::RecipientBusy,
                format!("{target_id:?} is behind; this direct was dropped for it"),
            )),
        })
    }

    /// A client's `broadcast` or `direct` was dropped for `dropped` local
    /// recipients that are behind: one `recipient_busy` error (without `ref`)
    /// to the sender, if it is connected here. One per frame sent, whatever
    /// the number of recipients, so the sender's own rate bounds them. A
    /// sender on another instance is not told (the bus carries no reply); the
    /// drop is counted here either way.
    pub fn tell_sender(&self, sender: &str, dropped: usize, what: &str) {
        if dropped == 0 {
            return;
        }
        let err = ClientError::new(
            ErrorCode::RecipientBusy,
            format!("{dropped} recipient(s) are behind; this {what} was dropped for them"),
        );
        self.notify(sender, protocol::error(&err, None));
    }

    /// Queue a server-originated `frame` (an error about the client's own
    /// relayed frames) for the local client `client_id`, if it is here.
    pub fn notify(&self, client_id: &str, frame: Text) {
        if let Some(c) = self.get(client_id) {
            self.enqueue(&c, frame);
        }
    }

    /// Queue a frame for one client.
    pub fn enqueue(&self, client: &ClientHandle, frame: Text) -> bool {
        self.push(client, Outbound::Frame(frame))
    }

    /// Queue `frame` for every local client except `exclude`.
    pub fn broadcast(&self, frame: &Text, exclude: Option<&str>) {
        let clients = self.clients.read_unpoisoned();
        for (id, client) in clients.iter() {
            if Some(&**id) != exclude {
                self.push(client, Outbound::Frame(frame.clone()));
            }
        }
    }

    /// Queue `frame` for the local client `client_id`; false if it is not
    /// connected here.
    pub fn direct(&self, client_id: &str, frame: Text) -> bool {
        self.get(client_id)
            .map(|c| self.enqueue(&c, frame))
            .is_some()
    }

    /// The local client `client_id`, if connected here.
    fn get(&self, client_id: &str) -> Option<Arc<ClientHandle>> {
        self.clients.read_unpoisoned().get(client_id).cloned()
    }

    /// Ask the local client `client_id` to close with `reason` (through its
    /// queue: what is already queued is written first); false if it is not
    /// connected here.
    pub fn close_client(&self, client_id: &str, reason: crate::queue::CloseReason) -> bool {
        self.get(client_id).map(|c| c.queue.close(reason)).is_some()
    }

    /// Frames queued to clients so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Publications dropped by the drop-oldest policy so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Publications replaced by the conflate-latest policy so far.
    pub fn conflated(&self) -> u64 {
        self.conflated.load(Ordering::Relaxed)
    }

    /// Client-relayed frames dropped for a recipient that was behind.
    pub fn relay_dropped(&self) -> u64 {
        self.relay_dropped.load(Ordering::Relaxed)
    }

    /// Clients closed as slow consumers so far.
    pub fn slow_consumers(&self) -> u64 {
        self.slow_consumers.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> ClientInfo {
        ClientInfo {
            client_id: id.into(),
            user_id: None,
            name: None,
        }
    }

    const LIMITS: Limits = Limits {
        max_messages: 8,
        max_bytes: 1 << 20,
    };

    #[test]
    fn first_and_last_subscriber_are_reported() {
        let hub = Hub::new(LIMITS);
        let a = hub.add(info("a"));
        let b = hub.add(info("b"));
        let ch: Arc<str> = "room".into();
        assert!(hub.subscribe(&ch, &a));
        assert!(!hub.subscribe(&ch, &b));
        assert!(!hub.unsubscribe("room", "a"));
        assert!(!hub.unsubscribe("room", "a"), "second removal is a no-op");
        assert!(hub.unsubscribe("room", "b"));
        assert_eq!(hub.subscriber_count("room"), 0);
    }

    #[test]
    fn broadcast_skips_the_sender() {
        let hub = Hub::new(LIMITS);
        let a = hub.add(info("a"));
        let b = hub.add(info("b"));
        hub.broadcast(&Text::from("x"), Some("a"));
        assert!(a.queue.take().0.is_empty());
        assert_eq!(b.queue.take().0.len(), 1);
    }
}
