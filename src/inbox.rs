//! SSE inboxes: where frames posted to `POST /sse/send` wait for the
//! session that holds the stream.
//!
//! An SSE connection has no socket to read from: its client frames arrive
//! as HTTP POSTs, on any instance, and are routed over the bus to the
//! instance holding the stream (`broker::Direct` with `sse` set). Here
//! each SSE connection of this instance has an entry, client id → (secret,
//! bounded sender); the session's `Stream` is the receiving end
//! (`sse::SseConn`). Below the node: the node delivers into it, both for
//! a POST that lands on the holding instance and for one routed from
//! another.
//!
//! The session id a client presents is `<clientId>.<secret>`: the client
//! id routes it (the bus already finds the instance holding a client),
//! the secret (128 random bits from the OS) proves it, compared in
//! constant time. An inbox holds at most [`INBOX_FRAMES`] frames; a POST
//! that does not fit is refused whole (nothing partial is queued).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

use crate::protocol::Text;
use crate::sync::MutexExt;

/// Frames an SSE connection's inbox holds before its session has read
/// them; a POST that does not fit is answered 429. Each frame is at most
/// `max_message_size`, so an inbox holds at most 64 × that.
pub const INBOX_FRAMES: usize = 64;

/// Frames one POST may carry.
pub const MAX_FRAMES_PER_POST: usize = 32;

/// What became of the frames of one POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Queued for the session, all of them.
    Queued,
    /// No SSE connection here with that id and secret.
    Unknown,
    /// The inbox has no room for all of them: none was queued.
    Full,
}

/// One SSE connection's entry.
struct Entry {
    /// The secret half of the session id.
    secret: Box<str>,
    /// The session's inbox.
    tx: mpsc::Sender<Text>,
}

/// The SSE connections of this instance, by client id.
#[derive(Default)]
pub struct Inboxes {
    /// Held for a map operation or a few `try_send`s, never across an
    /// `.await`.
    map: Mutex<HashMap<Arc<str>, Entry>>,
}

/// The receiving end of one connection's inbox; removes the entry when
/// dropped (the connection has ended).
pub struct Inbox {
    rx: mpsc::Receiver<Text>,
    client_id: Arc<str>,
    inboxes: Arc<Inboxes>,
}

impl Inbox {
    /// The next posted frame (`None` never happens while the entry lives).
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Text>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.inboxes.map.lock_unpoisoned().remove(&self.client_id);
    }
}

/// 128 random bits from the operating system, as 32 hex digits.
fn secret() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Split a session id into its client id and secret.
pub fn split_session(session: &str) -> Option<(&str, &str)> {
    session
        .split_once('.')
        .filter(|(c, s)| !c.is_empty() && !s.is_empty())
}

impl Inboxes {
    /// Open the inbox of the connection `client_id`; returns the session
    /// id to give the client, and the receiving end.
    pub fn open(self: &Arc<Self>, client_id: &Arc<str>) -> (String, Inbox) {
        let secret = secret();
        let (tx, rx) = mpsc::channel(INBOX_FRAMES);
        let entry = Entry {
            secret: secret.clone().into(),
            tx,
        };
        self.map.lock_unpoisoned().insert(client_id.clone(), entry);
        let inbox = Inbox {
            rx,
            client_id: client_id.clone(),
            inboxes: self.clone(),
        };
        (format!("{client_id}.{secret}"), inbox)
    }

    /// Whether an SSE connection `client_id` is held here.
    pub fn holds(&self, client_id: &str) -> bool {
        self.map.lock_unpoisoned().contains_key(client_id)
    }

    /// Queue `frames` for the connection `client_id` if `secret` is its
    /// secret: all of them, or none.
    pub fn deliver(&self, client_id: &str, secret: &str, frames: &[Text]) -> Delivered {
        let map = self.map.lock_unpoisoned();
        let Some(entry) = map.get(client_id) else {
            return Delivered::Unknown;
        };
        if !bool::from(entry.secret.as_bytes().ct_eq(secret.as_bytes())) {
            return Delivered::Unknown;
        }
        // Only this method sends, under the lock: the room seen here is
        // still there for the sends below.
        if entry.tx.capacity() < frames.len() {
            return Delivered::Full;
        }
        for frame in frames {
            if entry.tx.try_send(frame.clone()).is_err() {
                return Delivered::Unknown; // the session is ending
            }
        }
        Delivered::Queued
    }

    /// SSE connections held here.
    pub fn len(&self) -> usize {
        self.map.lock_unpoisoned().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_id_is_the_client_id_and_a_128_bit_secret() {
        let inboxes = Arc::new(Inboxes::default());
        let (session, _inbox) = inboxes.open(&Arc::from("c1"));
        let (client, secret) = split_session(&session).unwrap();
        assert_eq!(client, "c1");
        assert_eq!(secret.len(), 32);
        let (other, _inbox2) = inboxes.open(&Arc::from("c2"));
        assert_ne!(split_session(&other).unwrap().1, secret);
    }

    #[test]
    fn a_wrong_secret_is_unknown_and_a_full_inbox_takes_nothing() {
        let inboxes = Arc::new(Inboxes::default());
        let (session, mut inbox) = inboxes.open(&Arc::from("c1"));
        let (_, secret) = split_session(&session).unwrap();
        let frame = Text::from("{}");
        assert_eq!(
            inboxes.deliver("c1", "nope", std::slice::from_ref(&frame)),
            Delivered::Unknown
        );
        assert_eq!(
            inboxes.deliver("c9", secret, std::slice::from_ref(&frame)),
            Delivered::Unknown
        );
        let many = vec![frame.clone(); INBOX_FRAMES - 1];
        assert_eq!(inboxes.deliver("c1", secret, &many), Delivered::Queued);
        let two = [frame.clone(), frame.clone()];
        assert_eq!(inboxes.deliver("c1", secret, &two), Delivered::Full);
        assert_eq!(inboxes.deliver("c1", secret, &two[..1]), Delivered::Queued);
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(inbox.poll_recv(&mut cx).is_ready());
        drop(inbox);
        assert!(!inboxes.holds("c1"));
        assert_eq!(inboxes.deliver("c1", secret, &[frame]), Delivered::Unknown);
    }
}
