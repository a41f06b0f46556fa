//! The bounded outbound queue of one connection.
//!
//! Producers (the hub's fan-out, the connection's own replies, the
//! keep-alive sweeper) push without blocking; the connection's task takes
//! the whole queue at once and writes it with a single flush, so a burst of
//! frames for one socket costs one `write` instead of one per frame.
//!
//! The queue holds no allocation while empty: the writer takes the
//! `VecDeque` itself, so an idle connection keeps only this small struct.
//! It is bounded in frames and in bytes. What a push beyond either bound
//! does depends on the namespace's [`SlowConsumerPolicy`]: `disconnect`
//! marks the queue closed with [`close::SLOW_CONSUMER`] and the connection
//! ends; `drop-oldest` drops the oldest droppable publications until the
//! new one fits; `conflate-latest` keeps one pending publication per
//! channel, replacing it in place. Only publications of drop-oldest or
//! conflate-latest namespaces are ever dropped: replies, direct messages
//! and other channels' publications are not, and when nothing droppable is
//! left the connection is closed as for `disconnect`.
//!
//! Frames that one client sends to others (`broadcast` and `direct` from a
//! client, see [`OutQueue::push_relayed`]) never close the recipient: they
//! may use only a share of its queue ([`RELAY_SHARE`]: a quarter of each
//! bound), and one that does not fit is refused for that recipient alone.
//! So no client can get another one disconnected by sending to it.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::error::close;
use crate::protocol::Text;
use crate::sync::MutexExt;

/// The share of a queue that client-relayed frames may use: `1/RELAY_SHARE`
/// of `max_messages` and of `max_bytes` (but always room for one frame when
/// none is queued, so a large `direct` still reaches a client that keeps
/// up). The other three quarters stay for the client's replies, channel
/// publications and the server API's frames.
pub const RELAY_SHARE: usize = 4;

/// What happens when a publication is pushed to a client whose queue is
/// full (see [`OutQueue::push`]); set per namespace (`slow_consumer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SlowConsumerPolicy {
    /// Close the connection with 4008; the client reconnects and recovers.
    #[default]
    Disconnect,
    /// Drop the oldest queued publications of drop-oldest or
    /// conflate-latest namespaces until the new one fits.
    DropOldest,
    /// Keep only the newest publication per channel while the client is
    /// behind (dashboards); on overflow, drop like drop-oldest.
    ConflateLatest,
}

/// One item for the writer.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A ready-encoded text frame.
    Frame(Text),
    /// A channel publication, shared by every local recipient (one `Arc`
    /// clone each); the session checks the offset to drop duplicates and
    /// to hold live messages back during recovery.
    Publication(Arc<Delivery>),
    /// A WebSocket ping from the keep-alive sweeper.
    Ping,
    /// The sweeper found an acknowledgement overdue: resend what is
    /// unacknowledged (acked namespaces).
    Redeliver,
    /// The sweeper found the connection's credentials expired and the
    /// refresh proxy is configured: ask it (extend, or close 4003).
    Refresh,
}

/// One channel publication as the hub fans it out.
#[derive(Debug)]
pub struct Delivery {
    pub channel: Arc<str>,
    pub epoch: Arc<str>,
    pub offset: u64,
    /// When this instance fanned it out, for the delivery-latency
    /// histogram (fan-out to socket write).
    pub fanned_out: std::time::Instant,
    /// The namespace's policy when the queue is full.
    pub policy: SlowConsumerPolicy,
    /// The encoded `message` frame.
    pub frame: Text,
    /// The frame deflated once for every connection that compresses with
    /// shareable parameters; filled by the first such connection.
    pub deflated: OnceLock<Bytes>,
}

impl Outbound {
    fn droppable(&self) -> bool {
        matches!(
            self,
            Outbound::Publication(d)
                if matches!(d.policy, SlowConsumerPolicy::DropOldest | SlowConsumerPolicy::ConflateLatest)
        )
    }

    fn weight(&self) -> usize {
        match self {
            Outbound::Frame(b) => b.len(),
            Outbound::Publication(d) => d.frame.len(),
            Outbound::Ping | Outbound::Redeliver | Outbound::Refresh => 0,
        }
    }
}

/// Why a connection is being closed by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// WebSocket close code (see `error::close`); `None` drops the TCP
    /// connection without a close frame (dead peers).
    pub code: Option<u16>,
    /// Close reason text (at most 123 bytes on the wire).
    pub reason: Cow<'static, str>,
}

impl CloseReason {
    pub fn new(code: u16, reason: impl Into<Cow<'static, str>>) -> Self {
        CloseReason {
            code: Some(code),
            reason: reason.into(),
        }
    }

    /// Drop the connection without a close handshake.
    pub fn abort(reason: impl Into<Cow<'static, str>>) -> Self {
        CloseReason {
            code: None,
            reason: reason.into(),
        }
    }
}

/// Result of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// The item is queued.
    Queued,
    /// The item replaced the pending publication of its channel
    /// (conflate-latest).
    Conflated,
    /// The item is queued after dropping this many older publications
    /// (drop-oldest / conflate-latest on a full queue).
    DroppedOldest(usize),
    /// The queue was already closed; the item was dropped.
    Closed,
    /// This push overflowed the queue, which is now closed (slow consumer).
    Overflow,
    /// A client-relayed frame did not fit the relayed share (or the
    /// queue): it was dropped for this recipient, which is left as it was.
    Refused,
}

/// Bounds of a queue.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_messages: usize,
    pub max_bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Items not yet taken by the writer.
    items: VecDeque<Outbound>,
    /// Sum of the queued frames' lengths.
    bytes: usize,
    /// Set once; the writer sends it (after nothing else) and stops.
    /// Boxed: it is rare, and every connection carries this struct.
    close: Option<Box<CloseReason>>,
    /// The writer's task, while it waits for something to write. A waker
    /// here instead of a `tokio::sync::Notify`: the waiting side then needs
    /// no future state of its own, which keeps every idle connection's task
    /// smaller.
    waker: Option<Waker>,
    /// Something was pushed (or a close requested) since the writer last
    /// looked; kept when the writer is not waiting, like a `Notify` permit.
    signalled: bool,
    /// Client-relayed frames among `items`, to hold them to their share.
    /// Narrow integers: they fit the padding after `signalled`, so every
    /// connection's queue stays the same size (saturating; the share is
    /// capped to what they hold).
    relayed_frames: u16,
    /// Sum of those frames' lengths.
    relayed_bytes: u32,
}

/// A bounded multi-producer, single-consumer queue of outbound frames.
#[derive(Debug, Default)]
pub struct OutQueue {
    /// Items and the close flag; a std mutex because every critical
    /// section is a few instructions and never awaits.
    state: Mutex<State>,
}

impl OutQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queue `item` unless the queue is closed or full.
    pub fn push(&self, item: Outbound, limits: Limits) -> Push {
        let mut st = self.state.lock_unpoisoned();
        if st.close.is_some() {
            return Push::Closed;
        }
        let weight = item.weight();
        if let Outbound::Publication(d) = &item
            && d.policy == SlowConsumerPolicy::ConflateLatest
        {
            let pending = st
                .items
                .iter()
                .rposition(|i| matches!(i, Outbound::Publication(p) if p.channel == d.channel));
            if let Some(pos) = pending {
                st.bytes = st.bytes - st.items[pos].weight() + weight;
                st.items[pos] = item;
                return Push::Conflated;
            }
        }
        let full = |st: &State| {
            st.items.len() >= limits.max_messages || st.bytes + weight > limits.max_bytes
        };
        let mut dropped = 0;
        if full(&st) && item.droppable() {
            while full(&st) {
                let Some(pos) = st.items.iter().position(Outbound::droppable) else {
                    break;
                };
                if let Some(old) = st.items.remove(pos) {
                    st.bytes -= old.weight();
                    dropped += 1;
                }
            }
        }
        if full(&st) {
            st.items = VecDeque::new();
            st.bytes = 0;
            st.relayed_frames = 0;
            st.relayed_bytes = 0;
            st.close = Some(Box::new(CloseReason::new(
                close::SLOW_CONSUMER,
                "slow consumer",
            )));
            Self::signal(st);
            return Push::Overflow;
        }
        let was_empty = st.items.is_empty();
        st.bytes += weight;
        st.items.push_back(item);
        if was_empty {
            Self::signal(st);
        } else {
            drop(st);
        }
        match dropped {
            0 => Push::Queued,
            n => Push::DroppedOldest(n),
        }
    }

    /// Queue a frame that another client sent (`broadcast`, `direct`),
    /// unless it would take client-relayed frames past their share of the
    /// queue ([`RELAY_SHARE`]) or the queue past its bounds: then it is
    /// [`Push::Refused`] and nothing changes. Never closes the queue.
    pub fn push_relayed(&self, frame: Text, limits: Limits) -> Push {
        let mut st = self.state.lock_unpoisoned();
        if st.close.is_some() {
            return Push::Closed;
        }
        let weight = frame.len();
        let max_frames = (limits.max_messages / RELAY_SHARE).clamp(1, u16::MAX as usize);
        let max_bytes = (limits.max_bytes / RELAY_SHARE).min(u32::MAX as usize);
        let over_share = st.relayed_frames > 0
            && (st.relayed_frames as usize >= max_frames
                || st.relayed_bytes as usize + weight > max_bytes);
        let over_queue =
            st.items.len() >= limits.max_messages || st.bytes + weight > limits.max_bytes;
        if over_share || over_queue {
            return Push::Refused;
        }
        st.relayed_frames = st.relayed_frames.saturating_add(1);
        st.relayed_bytes = st
            .relayed_bytes
            .saturating_add(weight.min(u32::MAX as usize) as u32);
        let was_empty = st.items.is_empty();
        st.bytes += weight;
        st.items.push_back(Outbound::Frame(frame));
        if was_empty {
            Self::signal(st);
        }
        Push::Queued
    }

    /// Ask the writer to close the connection. The first reason wins; what
    /// is already queued is still written before the close frame.
    pub fn close(&self, reason: CloseReason) {
        let mut st = self.state.lock_unpoisoned();
        if st.close.is_none() {
            st.close = Some(Box::new(reason));
        }
        Self::signal(st);
    }

    /// Mark the queue signalled and wake the writer (outside the lock).
    fn signal(mut st: MutexGuard<'_, State>) {
        st.signalled = true;
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ready once something was pushed or a close was requested since the
    /// last time it was ready; otherwise registers the writer's waker.
    pub fn poll_notified(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.state.lock_unpoisoned();
        if std::mem::take(&mut st.signalled) {
            return Poll::Ready(());
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Ready with the requested close's code once a close was requested
    /// (`Ready(None)`: drop the connection without a close frame);
    /// otherwise registers the writer's waker. Unlike
    /// [`poll_notified`](Self::poll_notified) it leaves the push signal
    /// alone, so a writer blocked on a slow socket can watch for a close
    /// request (see [`crate::bounded_write`]) without losing a wake-up.
    pub fn poll_close(&self, cx: &mut Context<'_>) -> Poll<Option<u16>> {
        let mut st = self.state.lock_unpoisoned();
        if let Some(reason) = &st.close {
            return Poll::Ready(reason.code);
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The requested close, if any (what the `disconnect` lifecycle event
    /// reports).
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.state.lock_unpoisoned().close.as_deref().cloned()
    }

    /// Whether a close has been requested.
    pub fn is_closed(&self) -> bool {
        self.state.lock_unpoisoned().close.is_some()
    }

    /// Take everything queued, and the close reason if one is set.
    pub fn take(&self) -> (VecDeque<Outbound>, Option<CloseReason>) {
        let mut st = self.state.lock_unpoisoned();
        st.bytes = 0;
        st.relayed_frames = 0;
        st.relayed_bytes = 0;
        (std::mem::take(&mut st.items), st.close.as_deref().cloned())
    }

    /// Wait until something was pushed or a close was requested since the
    /// last wake-up. Cancel-safe.
    pub async fn notified(&self) {
        std::future::poll_fn(|cx| self.poll_notified(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_messages: 3,
        max_bytes: 10,
    };

    #[tokio::test]
    async fn takes_everything_at_once_and_wakes_the_writer() {
        let q = OutQueue::new();
        assert_eq!(
            q.push(Outbound::Frame(Text::from("ab")), LIMITS),
            Push::Queued
        );
        assert_eq!(q.push(Outbound::Ping, LIMITS), Push::Queued);
        q.notified().await;
        let (items, close) = q.take();
        assert_eq!(items.len(), 2);
        assert!(close.is_none());
        assert!(q.take().0.is_empty());
    }

    #[test]
    fn poll_close_sees_only_closes_and_keeps_the_push_signal() {
        let q = OutQueue::new();
        let mut cx = Context::from_waker(Waker::noop());
        q.push(Outbound::Ping, LIMITS);
        assert!(q.poll_close(&mut cx).is_pending(), "a push is not a close");
        assert!(
            q.poll_notified(&mut cx).is_ready(),
            "the push signal is kept"
        );
        q.close(CloseReason::abort("no pong"));
        assert_eq!(q.poll_close(&mut cx), Poll::Ready(None));
        let q = OutQueue::new();
        q.close(CloseReason::new(4003, "token expired"));
        assert_eq!(q.poll_close(&mut cx), Poll::Ready(Some(4003)));
    }

    #[test]
    fn overflow_by_count_or_bytes_closes_as_slow_consumer() {
        let q = OutQueue::new();
        for _ in 0..3 {
            assert_eq!(q.push(Outbound::Ping, LIMITS), Push::Queued);
        }
        assert_eq!(q.push(Outbound::Ping, LIMITS), Push::Overflow);
        assert_eq!(q.push(Outbound::Ping, LIMITS), Push::Closed);
        let (items, close) = q.take();
        assert!(items.is_empty(), "an overflowed queue is discarded");
        assert_eq!(close.unwrap().code, Some(close::SLOW_CONSUMER));

        let q = OutQueue::new();
        let big = Outbound::Frame(Text::from("0123456789A"));
        assert_eq!(q.push(big, LIMITS), Push::Overflow);
    }

    fn publication(channel: &str, offset: u64, policy: SlowConsumerPolicy) -> Outbound {
        Outbound::Publication(Arc::new(Delivery {
            channel: channel.into(),
            epoch: "e".into(),
            offset,
            fanned_out: std::time::Instant::now(),
            policy,
            frame: Text::from("x"),
            deflated: OnceLock::new(),
        }))
    }

    fn offsets(items: &VecDeque<Outbound>) -> Vec<(String, u64)> {
        items
            .iter()
            .filter_map(|i| match i {
                Outbound::Publication(d) => Some((d.channel.to_string(), d.offset)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn drop_oldest_keeps_the_newest_and_never_drops_other_frames() {
        let q = OutQueue::new();
        let p = SlowConsumerPolicy::DropOldest;
        assert_eq!(
            q.push(Outbound::Frame(Text::from("ack")), LIMITS),
            Push::Queued
        );
        assert_eq!(q.push(publication("a", 1, p), LIMITS), Push::Queued);
        assert_eq!(q.push(publication("a", 2, p), LIMITS), Push::Queued);
        assert_eq!(
            q.push(publication("a", 3, p), LIMITS),
            Push::DroppedOldest(1)
        );
        assert_eq!(
            q.push(publication("a", 4, p), LIMITS),
            Push::DroppedOldest(1)
        );
        let (items, close) = q.take();
        assert!(close.is_none());
        assert!(
            matches!(items.front(), Some(Outbound::Frame(_))),
            "the reply survives"
        );
        assert_eq!(offsets(&items), vec![("a".into(), 3), ("a".into(), 4)]);
    }

    #[test]
    fn conflate_latest_keeps_one_per_channel() {
        let q = OutQueue::new();
        let p = SlowConsumerPolicy::ConflateLatest;
        assert_eq!(q.push(publication("a", 1, p), LIMITS), Push::Queued);
        assert_eq!(q.push(publication("b", 1, p), LIMITS), Push::Queued);
        assert_eq!(q.push(publication("a", 2, p), LIMITS), Push::Conflated);
        assert_eq!(q.push(publication("a", 3, p), LIMITS), Push::Conflated);
        let (items, _) = q.take();
        assert_eq!(offsets(&items), vec![("a".into(), 3), ("b".into(), 1)]);
    }

    #[test]
    fn a_full_queue_with_nothing_droppable_still_disconnects() {
        let q = OutQueue::new();
        for _ in 0..3 {
            q.push(publication("a", 1, SlowConsumerPolicy::Disconnect), LIMITS);
        }
        let p = publication("b", 1, SlowConsumerPolicy::DropOldest);
        assert_eq!(q.push(p, LIMITS), Push::Overflow);
        assert_eq!(q.take().1.unwrap().code, Some(close::SLOW_CONSUMER));
    }

    #[test]
    fn relayed_frames_get_a_quarter_and_never_close_the_queue() {
        let limits = Limits {
            max_messages: 8,
            max_bytes: 40,
        };
        let q = OutQueue::new();
        let frame = || Text::from("0123");
        // A quarter of 8 frames: two relayed frames, then refused.
        assert_eq!(q.push_relayed(frame(), limits), Push::Queued);
        assert_eq!(q.push_relayed(frame(), limits), Push::Queued);
        assert_eq!(q.push_relayed(frame(), limits), Push::Refused);
        // The rest of the queue is still there for everything else.
        for _ in 0..6 {
            assert_eq!(q.push(Outbound::Frame(frame()), limits), Push::Queued);
        }
        assert_eq!(q.take().0.len(), 8);
        // The writer took them: the share is free again.
        assert_eq!(q.push_relayed(frame(), limits), Push::Queued);
        // A relayed frame larger than the share still passes alone...
        let q = OutQueue::new();
        let big = Text::from("0123456789abcdef");
        assert_eq!(q.push_relayed(big.clone(), limits), Push::Queued);
        assert_eq!(q.push_relayed(frame(), limits), Push::Refused);
        // ...but never past the queue's own bounds, and never closes it.
        for _ in 0..6 {
            q.push(Outbound::Frame(frame()), limits);
        }
        q.take();
        for _ in 0..8 {
            q.push(Outbound::Ping, limits);
        }
        assert_eq!(q.push_relayed(frame(), limits), Push::Refused);
        assert!(!q.is_closed());
    }

    #[test]
    fn first_close_reason_wins() {
        let q = OutQueue::new();
        q.close(CloseReason::new(1001, "bye"));
        q.close(CloseReason::new(1011, "later"));
        assert_eq!(q.take().1.unwrap().code, Some(1001));
    }
}
