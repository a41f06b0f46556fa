//! [`SseConn`]: an SSE connection as the session sees it, a `Stream` and
//! `Sink` of WebSocket messages like [`crate::ws::WebSocket`].
//!
//! * **Stream**: the frames posted for this connection (its
//!   [`Inbox`](crate::inbox::Inbox), opened when the session registers),
//!   and a `Pong` once a keep-alive comment has been handed to the
//!   response: a stream that takes its writes is alive, one whose writes
//!   do not complete is dropped by the keep-alive sweeper like a WebSocket
//!   peer that does not answer pings. It ends when the client goes away
//!   (the response body is dropped) or after the close event.
//! * **Sink**: each text frame becomes one event, `id:` (a per-stream
//!   counter) and `data:` (the frame's JSON; a line break inside raw JSON
//!   the client sent becomes a second `data:` line, which SSE parsers join
//!   back with `\n`), buffered until flushed; a ping is a comment
//!   (`: ping`); a close is a last event `{"type":"close","code","reason"}`
//!   after which the body ends. Flushing hands the buffer to the response
//!   body through a one-slot channel, which hyper empties only as fast as
//!   the socket takes bytes: a client that does not read makes the flush
//!   wait, and the session's bounded writes (`write_timeout`, the close
//!   grace) and the slow-consumer policy act on it as on a WebSocket.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use crate::inbox::{Inbox, Inboxes};
use crate::ws::{Message, SendShared};

/// Buffered bytes above which `poll_ready` flushes first (as the
/// WebSocket layer's high-water mark).
const HIGH_WATER: usize = 64 * 1024;

/// Resolves when the response body has been dropped (the client is gone).
type Gone = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One SSE connection: the posted frames in, events out.
pub struct SseConn {
    /// Where [`SseConn::open_session`] opens the inbox.
    inboxes: Arc<Inboxes>,
    /// The posted frames; `None` until the session registers.
    inbox: Option<Inbox>,
    /// The response body's feed; closed after the close event.
    out: PollSender<Bytes>,
    /// Events not yet handed to the body.
    buf: BytesMut,
    /// The last event id written.
    last_id: u64,
    /// A keep-alive comment is in `buf`.
    ping_buffered: bool,
    /// A keep-alive comment went out: the stream yields a `Pong`.
    pong_ready: bool,
    /// The close event is in `buf`: the body ends once it is flushed.
    closing: bool,
    /// The close event went out (or the body is gone): the stream ends.
    ended: bool,
    /// Watches the body; `None` once closing (it holds a sender).
    gone: Option<Gone>,
}

impl SseConn {
    /// A connection writing into `body` (the response's one-slot feed).
    pub fn new(inboxes: Arc<Inboxes>, body: mpsc::Sender<Bytes>) -> Self {
        let watch = body.clone();
        SseConn {
            inboxes,
            inbox: None,
            out: PollSender::new(body),
            buf: BytesMut::new(),
            last_id: 0,
            ping_buffered: false,
            pong_ready: false,
            closing: false,
            ended: false,
            gone: Some(Box::pin(async move { watch.closed().await })),
        }
    }

    /// Append one event whose data is `json`.
    fn event(&mut self, json: &str) {
        self.last_id += 1;
        self.buf.put_slice(b"id: ");
        self.buf.put_slice(self.last_id.to_string().as_bytes());
        self.buf.put_u8(b'\n');
        for line in json.split('\n') {
            self.buf.put_slice(b"data: ");
            self.buf
                .put_slice(line.strip_suffix('\r').unwrap_or(line).as_bytes());
            self.buf.put_u8(b'\n');
        }
        self.buf.put_u8(b'\n');
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the SSE stream is gone")
}

impl Stream for SseConn {
    type Item = Result<Message, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(g) = this.gone.as_mut() {
            if g.as_mut().poll(cx).is_ready() {
                this.ended = true;
                return Poll::Ready(None);
            }
        }
        if std::mem::take(&mut this.pong_ready) {
            return Poll::Ready(Some(Ok(Message::Pong(Bytes::new()))));
        }
        match this.inbox.as_mut() {
            Some(inbox) => inbox
                .poll_recv(cx)
                .map(|f| f.map(|text| Ok(Message::Text(text)))),
            None => Poll::Pending,
        }
    }
}

impl Sink<Message> for SseConn {
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.len() >= HIGH_WATER {
            return self.poll_flush(cx);
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, msg: Message) -> io::Result<()> {
        if self.closing || self.ended {
            return Err(gone());
        }
        match msg {
            Message::Text(text) => self.event(text.as_str()),
            Message::Ping(_) => {
                self.buf.put_slice(b": ping\n\n");
                self.ping_buffered = true;
            }
            Message::Close(frame) => {
                let (code, reason) =
                    frame.map_or((1000, Default::default()), |f| (f.code, f.reason));
                let json = serde_json::json!({
                    "type": "close",
                    "code": code,
                    "reason": reason.as_str(),
                });
                self.event(&json.to_string());
                self.closing = true;
                // The watch holds a sender: without it the body ends with
                // the last one.
                self.gone = None;
            }
            // Not part of an event stream (the protocol never sends
            // binary; pongs answer nothing here).
            Message::Binary(_) | Message::Pong(_) => {}
        }
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.buf.is_empty() {
            if ready!(this.out.poll_reserve(cx)).is_err() {
                this.ended = true;
                return Poll::Ready(Err(gone()));
            }
            let chunk = this.buf.split().freeze();
            if this.out.send_item(chunk).is_err() {
                this.ended = true;
                return Poll::Ready(Err(gone()));
            }
            // The buffer's memory goes with the chunk; an idle
            // connection keeps none.
            this.buf = BytesMut::new();
        }
        if std::mem::take(&mut this.ping_buffered) {
            this.pong_ready = true;
        }
        if this.closing {
            this.ended = true;
            this.out.close();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        self.ended = true;
        self.gone = None;
        self.out.close();
        Poll::Ready(Ok(()))
    }
}

impl SendShared for SseConn {
    fn open_session(&mut self, client_id: &Arc<str>) -> Option<String> {
        let (session, inbox) = self.inboxes.open(client_id);
        self.inbox = Some(inbox);
        Some(session)
    }

    fn transport(&self) -> &'static str {
        "sse"
    }
}
