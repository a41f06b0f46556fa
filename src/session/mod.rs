//! One WebSocket connection, from welcome to cleanup.
//!
//! A single task per connection does everything: it reads and handles
//! client frames, and when the connection's [`OutQueue`](crate::queue)
//! signals, it takes every queued frame and writes them with one flush.
//! Replies to the client's own requests are written directly, in order.
//! Every wait on the socket is bounded by `write_timeout` and gives way to
//! the queue's close requests ([`crate::bounded_write`]), so a client that
//! stops reading cannot hold its session (and its place in the hub and in
//! presence) in a write.
//!
//! The session is generic over any `Sink`/`Stream` of WebSocket messages,
//! so the protocol logic can be driven by in-memory channels in tests.
//!
//! Channel publications carry their epoch and offset; the session keeps,
//! per subscribed channel, the last offset it wrote, and drops anything at
//! or below it. That is how recovery on resubscribe never delivers a
//! publication twice: the live messages that were queued while the history
//! was being read are filtered against the recovered top.
//!
//! # Layout
//!
//! * this file: the [`Session`] and its subscriptions, and [`serve`];
//! * `open`: set-up (authentication, registration, the welcome) and the
//!   clean-up when the connection ends;
//! * `live`: the connection's long-lived future, [`Live`], and its events;
//! * `write`: writing to the socket: queued frames, replies, close, all
//!   bounded;
//! * `handlers`: the client's requests;
//! * `acked`: acknowledged delivery: the ack deadline and redelivery;
//! * `proxied`: the backend proxies' hooks (connect, subscribe, publish,
//!   rpc, refresh).

mod acked;
mod handlers;
mod live;
mod open;
mod proxied;
#[cfg(test)]
mod tests;
mod write;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Sink, Stream};
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::hub::ClientHandle;
use crate::limits::TokenBucket;
use crate::node::Node;
use crate::ws::{Message, SendShared};

use acked::AckState;
pub use live::Live;
pub use open::{UrlParams, open, open_with};
pub use proxied::Hello;

/// What the connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The Switchboard protocol (`/`, `/ws`).
    Protocol,
    /// The diagnostic echo endpoint: every message is sent back unchanged.
    Echo,
}

/// How long the server waits for the client's answer to its close frame.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Per-channel delivery state of this connection.
struct SubState {
    /// Epoch of the last publication written.
    epoch: Arc<str>,
    /// Offset of the last publication written; anything at or below it in
    /// the same epoch is a duplicate.
    last: u64,
    /// Acknowledgement state, in namespaces with acked delivery.
    ack: Option<AckState>,
}

/// The connection's subscriptions: no allocation (one pointer in the
/// task) until the first subscribe, since the tutorial's clients never
/// subscribe and an idle connection's task size is its cost.
#[derive(Default)]
// The box is the point: 8 bytes in the task instead of the map's 48.
#[allow(clippy::box_collection)]
struct Subs(Option<Box<HashMap<Arc<str>, SubState>>>);

impl Subs {
    fn get_mut(&mut self, channel: &str) -> Option<&mut SubState> {
        self.0.as_mut()?.get_mut(channel)
    }

    fn contains_key(&self, channel: &str) -> bool {
        self.0.as_ref().is_some_and(|m| m.contains_key(channel))
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    fn insert(&mut self, channel: Arc<str>, state: SubState) {
        self.0.get_or_insert_default().insert(channel, state);
    }

    /// Remove a subscription; the map is freed with the last one.
    fn remove_entry(&mut self, channel: &str) -> Option<(Arc<str>, SubState)> {
        let map = self.0.as_mut()?;
        let entry = map.remove_entry(channel);
        if map.is_empty() {
            self.0 = None;
        }
        entry
    }

    fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &SubState)> {
        self.0.iter().flat_map(|m| m.iter())
    }

    fn values(&self) -> impl Iterator<Item = &SubState> {
        self.iter().map(|(_, s)| s)
    }

    fn into_keys(self) -> impl Iterator<Item = Arc<str>> {
        self.0.into_iter().flat_map(|m| m.into_keys())
    }
}

/// One registered connection: everything its task keeps between frames.
pub struct Session<S> {
    /// The verified token's user and grants; `None` for anonymous.
    identity: Option<Box<Identity>>,
    node: Node,
    /// Per-connection message rate limit.
    rate: TokenBucket,
    ws: S,
    client: Arc<ClientHandle>,
    mode: Mode,
    /// Subscribed channels.
    subs: Subs,
    /// Channels this connection may still create (`channel_create_rate`).
    creates: crate::create_limit::CreateLimit,
}

/// Serve one upgraded connection until it ends, then clean up.
/// `params` is the query of the upgrade request.
pub async fn serve<S, E>(
    node: Node,
    ws: S,
    mode: Mode,
    shutdown: CancellationToken,
    params: UrlParams,
) where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    if let Some(session) = open(node, ws, mode, params).await {
        session.live(shutdown).await;
    }
}

#[cfg(test)]
mod size_budget {
    //! An idle connection costs, above all, its task: Tokio allocates the
    //! future inside a cell of header (32 bytes), scheduler and id (16),
    //! stage tag (8) and trailer (48), rounded up to 128 bytes on x86-64
    //! and aarch64. A connection future of at most 152 bytes makes that a
    //! 256-byte cell; 160 bytes would make it 384 (BENCHMARKS.md, idle).
    //! These are layout budgets, checked deterministically, not timings.
    use std::mem::size_of;

    use super::Live;
    use crate::hub::ClientHandle;
    use crate::ws::WebSocket;

    #[test]
    fn the_idle_connection_task_fits_a_256_byte_cell() {
        // What server::upgrade spawns: the session, holding its
        // per-address permit (which shutdown also waits for) in place of a
        // task-tracker token; the set-up future fits in its niches.
        type Task = crate::admission::Counted<Live<WebSocket>>;
        assert!(
            size_of::<Task>() <= 152,
            "connection task future is {} bytes",
            size_of::<Task>()
        );
    }

    #[test]
    fn the_client_handle_fits_a_160_byte_allocation() {
        // Arc's two counters + the handle: mimalloc's 160-byte size class.
        assert!(
            size_of::<ClientHandle>() + 16 <= 160,
            "ClientHandle is {} bytes",
            size_of::<ClientHandle>()
        );
    }
}
