//! [`WebSocket`]: one connection's frames over its `TcpStream`.
//!
//! Reading: wait for readiness, read into a buffer on the stack, decode
//! the frames where they lie. Only the start of a frame whose end has not
//! arrived yet is copied into the connection's own `rbuf`, which is freed
//! as soon as it has been decoded. Writing: frames are encoded into `wbuf`
//! and written with as few `write` calls as the socket allows when the
//! caller flushes (once per wake-up of the session), and `wbuf` is freed
//! once empty. Pings are answered and a peer's close is echoed here.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::deflate::{self, Deflate};
use super::frame::{self, Decoded, Decoder};
use super::{Error, Message, SendShared, Utf8Bytes};

/// Bytes read per `read` call, into a stack buffer.
const READ_CHUNK: usize = 16 * 1024;
/// `poll_ready` writes out when this much is waiting, so that a sender
/// that never flushes cannot grow `wbuf` without limit.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// Bytes waiting in one direction, and how far they are consumed. Boxed
/// and only present while something is waiting, so that an idle
/// connection holds a pointer per direction (its task is what an idle
/// connection costs: see `session::Live`).
#[derive(Default)]
pub(super) struct Pending {
    bytes: Vec<u8>,
    /// How much of `bytes` is consumed (decoded, or written) already.
    pos: usize,
}

impl Pending {
    /// `bytes` waiting, or `None` (no allocation) when there are none.
    pub(super) fn boxed(bytes: Vec<u8>) -> Option<Box<Pending>> {
        (!bytes.is_empty()).then(|| Box::new(Pending { bytes, pos: 0 }))
    }

    /// The bytes not yet consumed.
    pub(super) fn rest(&self) -> &[u8] {
        &self.bytes[self.pos..]
    }

    /// Write what is left to `io`; ready once all of it is written.
    pub(super) fn poll_write_to(
        &mut self,
        io: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pos < self.bytes.len() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, self.rest()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        Poll::Ready(Ok(()))
    }
}

/// A server-side WebSocket connection.
pub struct WebSocket {
    /// The upgraded TCP connection.
    io: TcpStream,
    /// Received bytes not yet decoded: the start of a frame split across
    /// reads, or frames that arrived together. `None` between frames.
    rbuf: Option<Box<Pending>>,
    /// Encoded frames not yet written; `None` once written.
    wbuf: Option<Box<Pending>>,
    /// Frame decoding and the fragmented message in progress.
    decoder: Decoder,
    /// Largest message accepted, in bytes (after decompression); `u32`
    /// so that it shares a word with the flags below.
    max_message: u32,
    /// permessage-deflate, when the client offered it and the server
    /// allows it; boxed because most connections go without.
    deflate: Option<Box<Deflate>>,
    /// A close frame was queued: nothing more may be sent.
    close_sent: bool,
    /// The peer closed, or broke the protocol: nothing more is read.
    read_done: bool,
}

impl WebSocket {
    /// Wrap an upgraded connection. `read_buf` holds bytes the HTTP layer
    /// read past the upgrade request; `owed` bytes the client is still due
    /// (the held-back 101 response, see [`HttpIo`](super::HttpIo)), sent
    /// ahead of the first frame; `max_message` is the size limit.
    pub(super) fn new(
        io: TcpStream,
        read_buf: Bytes,
        owed: Option<Box<Pending>>,
        max_message: usize,
        deflate: Option<Deflate>,
    ) -> Self {
        WebSocket {
            io,
            rbuf: Pending::boxed(read_buf.to_vec()),
            wbuf: owed,
            decoder: Decoder::new(),
            max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
            deflate: deflate.map(Box::new),
            close_sent: false,
            read_done: false,
        }
    }

    /// Whether permessage-deflate was negotiated.
    pub fn compressing(&self) -> bool {
        self.deflate.is_some()
    }

    /// Write out `wbuf`; frees it once everything is written.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(w) = self.wbuf.as_deref_mut() {
            ready!(w.poll_write_to(&mut self.io, cx))?;
            self.wbuf = None;
        }
        Poll::Ready(Ok(()))
    }

    /// The write buffer, created when the first frame is queued.
    fn out(&mut self) -> &mut Vec<u8> {
        &mut self.wbuf.get_or_insert_with(Box::default).bytes
    }

    /// Bytes queued and not yet written.
    fn unwritten(&self) -> usize {
        self.wbuf.as_ref().map_or(0, |w| w.bytes.len() - w.pos)
    }

    /// Try to write what is queued without waiting (control replies).
    fn write_opportunistically(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        if self.wbuf.is_some() {
            if let Poll::Ready(Err(e)) = self.poll_write_out(cx) {
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Queue a data frame, compressed when negotiated and worth it.
    fn queue_data(&mut self, opcode: u8, payload: &[u8]) {
        if let Some(d) = self.deflate.as_mut().filter(|d| d.wants(payload.len())) {
            let mut packed = Vec::with_capacity(payload.len() / 2 + 16);
            // Sent uncompressed when deflate does not make it smaller.
            if d.compress_if_smaller(payload, &mut packed) {
                frame::frame(self.out(), opcode, true, &packed);
                return;
            }
        }
        frame::frame(self.out(), opcode, false, payload);
    }

    fn queue(&mut self, msg: Message) {
        if self.close_sent {
            return; // nothing may follow a close frame
        }
        match msg {
            Message::Text(t) => self.queue_data(frame::OP_TEXT, t.as_bytes()),
            Message::Binary(b) => self.queue_data(frame::OP_BINARY, &b),
            Message::Ping(p) => {
                frame::frame(self.out(), frame::OP_PING, false, &p[..p.len().min(125)])
            }
            Message::Pong(p) => {
                frame::frame(self.out(), frame::OP_PONG, false, &p[..p.len().min(125)])
            }
            Message::Close(f) => {
                self.close_sent = true;
                match f {
                    Some(f) => frame::close_frame(self.out(), f.code, &f.reason),
                    None => frame::frame(self.out(), frame::OP_CLOSE, false, &[]),
                }
            }
        }
    }

    /// Answer what the protocol says to answer, then hand the message on.
    fn received(&mut self, msg: Message, cx: &mut Context<'_>) -> Result<Message, Error> {
        match &msg {
            Message::Ping(p) if !self.close_sent => {
                frame::frame(self.out(), frame::OP_PONG, false, p);
                self.write_opportunistically(cx)?;
            }
            Message::Close(f) => {
                self.read_done = true;
                if !self.close_sent {
                    // Echo the code (RFC 6455 §5.5.1).
                    self.close_sent = true;
                    match f {
                        Some(f) => frame::close_frame(self.out(), f.code, ""),
                        None => frame::frame(self.out(), frame::OP_CLOSE, false, &[]),
                    }
                    self.write_opportunistically(cx)?;
                }
            }
            _ => {}
        }
        Ok(msg)
    }

    /// Fail the connection: send the close the error calls for.
    fn failed(&mut self, err: Error, cx: &mut Context<'_>) -> Error {
        self.read_done = true;
        self.rbuf = None;
        if let Error::Protocol { code, reason } = &err {
            if !self.close_sent {
                self.close_sent = true;
                frame::close_frame(self.out(), *code, reason);
                let _ = self.write_opportunistically(cx);
            }
        }
        err
    }

    /// Decode the next frame of `rbuf`: `None` when it holds no whole
    /// frame (or nothing).
    fn decode_buffered(&mut self) -> Result<Option<Option<Message>>, Error> {
        let Some(r) = self.rbuf.as_deref_mut() else {
            return Ok(None);
        };
        match self.decoder.decode(
            &mut r.bytes[r.pos..],
            self.max_message as usize,
            self.deflate.as_deref_mut(),
        )? {
            Decoded::Incomplete => Ok(None),
            Decoded::Frame { len, msg } => {
                r.pos += len;
                if r.pos == r.bytes.len() {
                    self.rbuf = None;
                }
                Ok(Some(msg))
            }
        }
    }

    /// Keep `bytes` (received, not yet decoded) for the next read.
    fn keep(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let r = self.rbuf.get_or_insert_with(Box::default);
        if r.pos > 0 {
            // Compact before appending.
            r.bytes.drain(..r.pos);
            r.pos = 0;
        }
        r.bytes.extend_from_slice(bytes);
    }
}

impl Stream for WebSocket {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.read_done {
                return Poll::Ready(None);
            }
            if let Err(e) = this.write_opportunistically(cx) {
                return Poll::Ready(Some(Err(e)));
            }
            // Frames already buffered first.
            while this.rbuf.is_some() {
                match this.decode_buffered() {
                    Ok(None) => break,
                    Ok(Some(None)) => continue,
                    Ok(Some(Some(msg))) => return Poll::Ready(Some(this.received(msg, cx))),
                    Err(e) => return Poll::Ready(Some(Err(this.failed(e, cx)))),
                }
            }
            if let Err(e) = ready!(this.io.poll_read_ready(cx)) {
                return Poll::Ready(Some(Err(e.into())));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let n = match this.io.try_read(&mut chunk) {
                Ok(0) => {
                    this.read_done = true;
                    return Poll::Ready(None);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            };
            if this.rbuf.is_some() {
                // Finish the frame that was cut.
                this.keep(&chunk[..n]);
                continue;
            }
            // The common case: decode straight from the stack buffer and
            // keep only what is left over.
            let mut pos = 0;
            while pos < n {
                match this.decoder.decode(
                    &mut chunk[pos..n],
                    this.max_message as usize,
                    this.deflate.as_deref_mut(),
                ) {
                    Ok(Decoded::Incomplete) => break,
                    Ok(Decoded::Frame { len, msg }) => {
                        pos += len;
                        if let Some(msg) = msg {
                            this.keep(&chunk[pos..n]);
                            return Poll::Ready(Some(this.received(msg, cx)));
                        }
                    }
                    Err(e) => return Poll::Ready(Some(Err(this.failed(e, cx)))),
                }
            }
            this.keep(&chunk[pos..n]);
        }
    }
}

impl Sink<Message> for WebSocket {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if this.unwritten() >= WRITE_HIGH_WATER {
            ready!(this.poll_write_out(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Error> {
        self.get_mut().queue(item);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if !this.close_sent {
            this.queue(Message::Close(None));
        }
        ready!(this.poll_write_out(cx))?;
        ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

impl SendShared for WebSocket {
    fn start_send_shared(
        &mut self,
        text: &Utf8Bytes,
        deflated: &OnceLock<Bytes>,
    ) -> Result<(), Error> {
        if self.close_sent {
            return Ok(());
        }
        let payload = text.as_bytes();
        match self.deflate.as_deref() {
            Some(d) if d.agreed().shareable() && d.wants(payload.len()) => {
                let level = d.level();
                let packed = deflated.get_or_init(|| deflate::compress_shared(payload, level));
                if packed.len() < payload.len() {
                    frame::frame(self.out(), frame::OP_TEXT, true, packed);
                } else {
                    frame::frame(self.out(), frame::OP_TEXT, false, payload);
                }
            }
            _ => self.queue_data(frame::OP_TEXT, payload),
        }
        Ok(())
    }
}
