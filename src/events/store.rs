//! [`Store`]: what lifecycle events need from the bus, one implementation
//! per bus (`memory.rs`, `redis.rs`), and the shapes they exchange.
//!
//! A store does three jobs, each atomic on the bus so that any number of
//! instances can share it:
//!
//! * **Record** a connection's change ([`Change`]): append its events to
//!   the event log with their per-subject `seq`, and keep the cluster-wide
//!   members of each user and channel subject. A subject that empties is
//!   marked *pending* until `grace` has passed; one that refills meanwhile
//!   emits nothing. Each client's record (user, channels) is kept under its
//!   instance, so that the whole record, and only once, turns into events
//!   when the client leaves — or when its instance is found dead.
//! * **Settle** pending subjects whose grace has passed: `user_offline` or
//!   `channel_vacated` if still empty.
//! * **Deliver**: one instance at a time holds the delivery lease, reads
//!   the log after the durable cursor, and moves the cursor once the
//!   backend acknowledged (or the batch was dead-lettered).

use async_trait::async_trait;

use crate::error::Result;

/// What happened to one connection.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    /// It was registered (events: `connect`, maybe `user_online`).
    Connect,
    /// It subscribed (`subscribe`, maybe `channel_occupied`).
    Subscribe(&'a str),
    /// It unsubscribed (`unsubscribe`; the channel may go pending).
    Unsubscribe(&'a str),
    /// It ended (`unsubscribe` for each channel it still held, then
    /// `disconnect` with the close code and reason; its user may go
    /// pending).
    Disconnect { code: u16, reason: &'a str },
}

/// One connection's change, as the node reports it.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    pub op: Op<'a>,
    pub client_id: &'a str,
    /// The authenticated user; `None` for anonymous connections (no user
    /// subject).
    pub user_id: Option<&'a str>,
}

/// One event in the log, as the delivery reads it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its position in the log (what the cursor is set to).
    pub pos: String,
    /// The event's JSON object, as delivered.
    pub json: String,
    /// When it entered the log (unix ms): its age counts from here (from
    /// a replay, for a replayed one).
    pub since_ms: u64,
}

/// A user's presence across the cluster (`GET /api/users/{id}/presence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserPresence {
    /// Live connections of the user on every instance.
    pub connections: u64,
    /// Online as the events tell it: connected, or gone for less than the
    /// grace period (no `user_offline` yet).
    pub online: bool,
    /// The `seq` of the newest event of subject `user:<id>` (0: none yet).
    pub seq: u64,
}

/// The bus side of lifecycle events; see the module docs.
#[async_trait]
pub trait Store: Send + Sync {
    /// Record `change` (made on this instance at `now_ms`); returns how
    /// many events it appended. Idempotent per client: a change the
    /// client's record already shows appends nothing.
    async fn record(&self, change: Change<'_>, now_ms: u64) -> Result<u64>;
    /// Emit the events of pending subjects whose grace ended by `now_ms`;
    /// returns how many it appended.
    async fn settle(&self, now_ms: u64) -> Result<u64>;
    /// Take or renew the delivery lease; whether this instance holds it.
    async fn lease(&self) -> Result<bool>;
    /// Up to `max` events after the cursor, oldest first.
    async fn read(&self, max: usize) -> Result<Vec<Stored>>;
    /// Move the cursor to `pos` (only while holding the lease).
    async fn ack(&self, pos: &str) -> Result<()>;
    /// Keep `batch` in the dead-letter log, then move the cursor past it.
    async fn dead_letter(&self, batch: &[Stored]) -> Result<()>;
    /// Move up to `max` dead-lettered events back into the log (with a new
    /// age); returns how many.
    async fn replay(&self, max: usize, now_ms: u64) -> Result<u64>;
    /// Events in the dead-letter log.
    async fn dead_count(&self) -> Result<u64>;
    /// A user's presence and `seq`.
    async fn user(&self, user_id: &str) -> Result<UserPresence>;
    /// Heart-beat this instance and turn the clients of instances whose
    /// heartbeat expired into their events (each dead instance once);
    /// returns how many events it appended. A no-op on a bus of one
    /// instance.
    async fn heartbeat(&self, now_ms: u64) -> Result<u64>;
}
