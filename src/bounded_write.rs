//! Bounded writes: every wait on a client's socket has a deadline and
//! gives way to a close request.
//!
//! The session writes into the WebSocket layer's buffer, which goes out
//! to the socket when it is flushed or when it holds 64 KiB
//! (`ws::conn`'s high-water mark, in `poll_ready`). Both can wait for a
//! client that does not read. A client that stops reading must not hold
//! its session there: it would stay in the hub and in presence, and never
//! act on the close requests that reach it through its
//! [`OutQueue`] (keep-alive, token expiry, slow
//! consumer, `/api/disconnect`, drain). So the session waits on the
//! socket only through [`wait`], which ends:
//!
//! * when the socket has taken the bytes ([`Wrote::Done`]) or failed
//!   ([`Wrote::Failed`]);
//! * when the [`Deadline`] passes ([`Wrote::TimedOut`]): `write_timeout`,
//!   counted from the moment the write first has to wait (a write that
//!   never waits costs no timer). The caller drops the connection without
//!   a close frame, which the client would not read;
//! * at once when an abort (a dead peer: no pong) is requested
//!   ([`Wrote::Closing`]);
//! * for any other close request, depending on what is being written
//!   ([`Until`]): a reply stops at once ([`Wrote::Closing`]; the session
//!   then writes what is queued and the close frame), while frames taken
//!   from the queue are still written, but the deadline shrinks to
//!   [`CLOSE_GRACE`] (or stays shorter), so that a client that reads
//!   gets what was queued before its close frame and one that does not is
//!   gone soon after.
//!
//! The poll order puts the socket first: a write that does not have to
//! wait looks at nothing else.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use futures_util::Sink;
use tokio::time::{Instant, Sleep};

use crate::log_limit::LogLimit;
use crate::queue::OutQueue;
use crate::ws::Message;

/// Once a close is requested, how long what is still to be written may
/// take (at most; a shorter write timeout wins). The same bound as the
/// close handshake: a client that reads gets its queued frames and the
/// close frame, one that does not is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Which socket operation to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Room for another frame (`Sink::poll_ready`).
    Ready,
    /// Everything buffered written out (`Sink::poll_flush`).
    Flush,
}

/// Which close requests end the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Any: the session is writing a reply, which a closing client does
    /// not need.
    Close,
    /// Only an abort; a close with a code shortens the deadline to
    /// [`CLOSE_GRACE`]: the session is writing what was queued, which
    /// goes out before the close frame.
    Abort,
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrote {
    /// The socket took it.
    Done,
    /// The socket failed (the peer is gone).
    Failed,
    /// The deadline passed: drop the connection without a close frame.
    TimedOut,
    /// A close was requested while waiting: act on it.
    Closing,
}

/// The clock of one bounded write: a reply frame, or one batch of queued
/// frames with its flush.
#[derive(Debug)]
pub struct Deadline {
    /// How long the write may wait in all.
    timeout: Duration,
    /// When it must be done; set when it first has to wait.
    at: Option<Instant>,
}

impl Deadline {
    /// A deadline `timeout` after the write first has to wait.
    pub fn new(timeout: Duration) -> Self {
        Deadline { timeout, at: None }
    }

    /// When the write must be done, starting the clock if it is not yet.
    fn start(&mut self) -> Instant {
        *self.at.get_or_insert_with(|| Instant::now() + self.timeout)
    }

    /// No later than [`CLOSE_GRACE`] from now.
    fn shorten(&mut self) {
        let grace = Instant::now() + CLOSE_GRACE;
        let at = self.start().min(grace);
        self.at = Some(at);
    }
}

/// Wait for `op` on `ws`, bounded by `deadline` and racing the close
/// requests of `queue` that `until` says to stop for (module docs).
pub async fn wait<S>(
    ws: &mut S,
    op: Op,
    queue: &OutQueue,
    deadline: &mut Deadline,
    until: Until,
) -> Wrote
where
    S: Sink<Message> + Unpin,
{
    // Boxed and made only when the write has to wait: the common write
    // never does, and this future lives inside every reply's.
    let mut sleep: Option<Pin<Box<Sleep>>> = None;
    std::future::poll_fn(|cx| {
        let polled = match op {
            Op::Ready => Pin::new(&mut *ws).poll_ready(cx),
            Op::Flush => Pin::new(&mut *ws).poll_flush(cx),
        };
        if let Poll::Ready(r) = polled {
            return Poll::Ready(if r.is_ok() {
                Wrote::Done
            } else {
                Wrote::Failed
            });
        }
        if let Poll::Ready(code) = queue.poll_close(cx) {
            if code.is_none() || until == Until::Close {
                return Poll::Ready(Wrote::Closing);
            }
            deadline.shorten();
        }
        let at = deadline.start();
        let timer = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wrote::TimedOut);
        }
        Poll::Pending
    })
    .await
}

/// Log a write timeout: one `info` line per 10 s for the whole process
/// (with the count of the others), the rest at `debug`: a client can
/// cause one per connection, in a loop.
pub fn log_timeout(client: &str) {
    static WRITE_TIMEOUTS: LogLimit = LogLimit::new(Duration::from_secs(10));
    match WRITE_TIMEOUTS.allow() {
        Some(suppressed) => tracing::info!(
            client,
            suppressed,
            "write timed out, dropping the connection"
        ),
        None => tracing::debug!(client, "write timed out, dropping the connection"),
    }
}

#[cfg(test)]
mod tests {
    //! The wait against a socket that never takes anything.

    use std::task::Context;

    use super::*;
    use crate::queue::CloseReason;

    /// A sink that is never ready, like a client that does not read.
    struct Stuck;

    impl Sink<Message> for Stuck {
        type Error = std::io::Error;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }
        fn start_send(self: Pin<&mut Self>, _: Message) -> Result<(), Self::Error> {
            Ok(())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }
    }

    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_stuck_write_times_out() {
        let q = OutQueue::new();
        let mut d = Deadline::new(LONG);
        let start = Instant::now();
        let wrote = wait(&mut Stuck, Op::Flush, &q, &mut d, Until::Close).await;
        assert_eq!(wrote, Wrote::TimedOut);
        assert_eq!(start.elapsed(), LONG, "paused clock: exactly the timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_ends_any_wait_at_once() {
        let q = std::sync::Arc::new(OutQueue::new());
        let closer = q.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            closer.close(CloseReason::abort("no pong"));
        });
        let start = Instant::now();
        let mut d = Deadline::new(LONG);
        let wrote = wait(&mut Stuck, Op::Ready, &q, &mut d, Until::Abort).await;
        assert_eq!(wrote, Wrote::Closing);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_ends_a_reply_and_shortens_a_queued_write() {
        let q = OutQueue::new();
        q.close(CloseReason::new(4003, "token expired"));
        let mut d = Deadline::new(LONG);
        let wrote = wait(&mut Stuck, Op::Ready, &q, &mut d, Until::Close).await;
        assert_eq!(wrote, Wrote::Closing);

        let start = Instant::now();
        let mut d = Deadline::new(LONG);
        let wrote = wait(&mut Stuck, Op::Flush, &q, &mut d, Until::Abort).await;
        assert_eq!(wrote, Wrote::TimedOut);
        assert_eq!(start.elapsed(), CLOSE_GRACE);
    }
}
