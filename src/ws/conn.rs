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

/// A server-side WebSocket connection.
pub struct WebSocket {
    /// The upgraded TCP connection.
    io: TcpStream,
    /// Received bytes not yet decoded; empty (no allocation) unless a
    /// frame is split across reads or several arrived at once.
    rbuf: Vec<u8>,
    /// How much of `rbuf` is decoded already.
    rpos: usize,
    /// Frame decoding and the fragmented message in progress.
    decoder: Decoder,
    /// Encoded frames not yet written; freed once written.
    wbuf: Vec<u8>,
    /// How much of `wbuf` is written already.
    wpos: usize,
    /// permessage-deflate, when the client offered it and the server
    /// allows it.
    deflate: Option<Deflate>,
    /// A close frame was queued: nothing more may be sent.
    close_sent: bool,
    /// The peer closed, or broke the protocol: nothing more is read.
    read_done: bool,
}

impl WebSocket {
    /// Wrap an upgraded connection. `read_buf` holds bytes the HTTP layer
    /// read past the upgrade request; `max_message` is the size limit.
    pub fn new(
        io: TcpStream,
        read_buf: Bytes,
        max_message: usize,
        deflate: Option<Deflate>,
    ) -> Self {
        WebSocket {
            io,
            rbuf: read_buf.to_vec(),
            rpos: 0,
            decoder: Decoder::new(max_message),
            wbuf: Vec::new(),
            wpos: 0,
            deflate,
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
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wbuf = Vec::new();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    /// Try to write what is queued without waiting (control replies).
    fn write_opportunistically(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        if self.wpos < self.wbuf.len() {
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
                frame::frame(&mut self.wbuf, opcode, true, &packed);
                return;
            }
        }
        frame::frame(&mut self.wbuf, opcode, false, payload);
    }

    fn queue(&mut self, msg: Message) {
        if self.close_sent {
            return; // nothing may follow a close frame
        }
        match msg {
            Message::Text(t) => self.queue_data(frame::OP_TEXT, t.as_bytes()),
            Message::Binary(b) => self.queue_data(frame::OP_BINARY, &b),
            Message::Ping(p) => frame::frame(
                &mut self.wbuf,
                frame::OP_PING,
                false,
                &p[..p.len().min(125)],
            ),
            Message::Pong(p) => frame::frame(
                &mut self.wbuf,
                frame::OP_PONG,
                false,
                &p[..p.len().min(125)],
            ),
            Message::Close(f) => {
                self.close_sent = true;
                match f {
                    Some(f) => frame::close_frame(&mut self.wbuf, f.code, &f.reason),
                    None => frame::frame(&mut self.wbuf, frame::OP_CLOSE, false, &[]),
                }
            }
        }
    }

    /// Answer what the protocol says to answer, then hand the message on.
    fn received(&mut self, msg: Message, cx: &mut Context<'_>) -> Result<Message, Error> {
        match &msg {
            Message::Ping(p) if !self.close_sent => {
                frame::frame(&mut self.wbuf, frame::OP_PONG, false, p);
                self.write_opportunistically(cx)?;
            }
            Message::Close(f) => {
                self.read_done = true;
                if !self.close_sent {
                    // Echo the code (RFC 6455 §5.5.1).
                    self.close_sent = true;
                    match f {
                        Some(f) => frame::close_frame(&mut self.wbuf, f.code, ""),
                        None => frame::frame(&mut self.wbuf, frame::OP_CLOSE, false, &[]),
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
        self.rbuf = Vec::new();
        self.rpos = 0;
        if let Error::Protocol { code, reason } = &err {
            if !self.close_sent {
                self.close_sent = true;
                frame::close_frame(&mut self.wbuf, *code, reason);
                let _ = self.write_opportunistically(cx);
            }
        }
        err
    }

    /// Decode the next frame of `rbuf`.
    fn decode_buffered(&mut self) -> Result<Option<Option<Message>>, Error> {
        let buf = &mut self.rbuf[self.rpos..];
        match self.decoder.decode(buf, self.deflate.as_mut())? {
            Decoded::Incomplete => Ok(None),
            Decoded::Frame { len, msg } => {
                self.rpos += len;
                if self.rpos == self.rbuf.len() {
                    self.rbuf = Vec::new();
                    self.rpos = 0;
                }
                Ok(Some(msg))
            }
        }
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
            while !this.rbuf.is_empty() {
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
            if !this.rbuf.is_empty() {
                // Finish the frame that was cut: compact, then append.
                if this.rpos > 0 {
                    this.rbuf.drain(..this.rpos);
                    this.rpos = 0;
                }
                this.rbuf.extend_from_slice(&chunk[..n]);
                continue;
            }
            // The common case: decode straight from the stack buffer and
            // keep only what is left over.
            let mut pos = 0;
            while pos < n {
                match this
                    .decoder
                    .decode(&mut chunk[pos..n], this.deflate.as_mut())
                {
                    Ok(Decoded::Incomplete) => break,
                    Ok(Decoded::Frame { len, msg }) => {
                        pos += len;
                        if let Some(msg) = msg {
                            this.rbuf.extend_from_slice(&chunk[pos..n]);
                            return Poll::Ready(Some(this.received(msg, cx)));
                        }
                    }
                    Err(e) => return Poll::Ready(Some(Err(this.failed(e, cx)))),
                }
            }
            this.rbuf.extend_from_slice(&chunk[pos..n]);
        }
    }
}

impl Sink<Message> for WebSocket {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if this.wbuf.len() - this.wpos >= WRITE_HIGH_WATER {
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
        match &self.deflate {
            Some(d) if d.agreed().shareable() && d.wants(payload.len()) => {
                let level = d.level();
                let packed = deflated.get_or_init(|| deflate::compress_shared(payload, level));
                if packed.len() < payload.len() {
                    frame::frame(&mut self.wbuf, frame::OP_TEXT, true, packed);
                } else {
                    frame::frame(&mut self.wbuf, frame::OP_TEXT, false, payload);
                }
            }
            _ => self.queue_data(frame::OP_TEXT, payload),
        }
        Ok(())
    }
}
