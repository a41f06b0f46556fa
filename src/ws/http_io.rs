//! [`HttpIo`]: an accepted connection as hyper sees it.
//!
//! hyper writes the `101 Switching Protocols` response as soon as the
//! upgrade handler returns; the session writes its `connected` welcome a
//! moment later. Written as they come, that is two `write`s, two TCP
//! segments and two wake-ups of the client for every new connection.
//! `HttpIo` holds a 101 back instead (reporting it written), and the
//! [`WebSocket`](super::WebSocket) built from the upgraded connection sends
//! it ahead of its first frame: one `write` for the whole handshake.
//!
//! Held bytes never stay behind anything else: a later write or a shutdown
//! on the HTTP side writes them first. Once the session owns the
//! connection, its first write (the welcome, a refusal's close frame) or
//! its first read (the echo endpoint, first-frame auth: the client waits
//! for the 101 before it sends) flushes them.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::conn::Pending;

/// The start of the only response that is held back.
const SWITCHING_PROTOCOLS: &[u8] = b"HTTP/1.1 101 ";

/// The accepted `TcpStream`, plus a held-back 101 response.
pub struct HttpIo {
    tcp: TcpStream,
    /// A 101 response hyper has written, not yet sent (or not all of it,
    /// when something had to follow it on the HTTP side); `None` until
    /// then (no allocation for plain HTTP).
    held: Option<Box<Pending>>,
}

impl HttpIo {
    pub fn new(tcp: TcpStream) -> Self {
        HttpIo { tcp, held: None }
    }

    /// The connection, and what it still owes the client (the 101
    /// response, or nothing) ahead of anything else.
    pub(super) fn into_parts(self) -> (TcpStream, Option<Box<Pending>>) {
        (self.tcp, self.held)
    }

    /// Send the held bytes, if any, before anything else is written.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(held) = self.held.as_deref_mut() {
            ready!(held.poll_write_to(&mut self.tcp, cx))?;
            self.held = None;
        }
        Poll::Ready(Ok(()))
    }

    /// Hold `bytes` if they are a 101 response and nothing is held yet.
    fn hold(&mut self, first: &[u8], bytes: impl FnOnce() -> Vec<u8>) -> bool {
        if self.held.is_none() && first.starts_with(SWITCHING_PROTOCOLS) {
            self.held = Pending::boxed(bytes());
            return true;
        }
        false
    }
}

impl AsyncRead for HttpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for HttpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.hold(buf, || buf.to_vec()) {
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        let concat = || {
            let mut all = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum());
            bufs.iter().for_each(|b| all.extend_from_slice(b));
            all
        };
        if this.hold(first, concat) {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    /// Held bytes are not flushed here: hyper flushes the 101 before it
    /// hands the connection over, and holding it past that is the point.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (HttpIo, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (HttpIo::new(accepted.unwrap().0), client.unwrap())
    }

    #[tokio::test]
    async fn a_101_is_held_and_handed_over_other_responses_pass() {
        let (mut io, mut client) = pair().await;
        io.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        let mut got = [0u8; 19];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HTTP/1.1 200 OK\r\n\r\n");

        io.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .await
            .unwrap();
        io.flush().await.unwrap();
        let (_tcp, owed) = io.into_parts();
        assert_eq!(
            owed.expect("the 101 is owed").rest(),
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_vectored_101_is_held_whole() {
        // hyper writes the head with `writev` when the stream supports it.
        let (mut io, _client) = pair().await;
        let parts = [
            IoSlice::new(b""),
            IoSlice::new(b"HTTP/1.1 101 Switching Protocols\r\n"),
            IoSlice::new(b"upgrade: websocket\r\n\r\n"),
        ];
        let n = io.write_vectored(&parts).await.unwrap();
        assert_eq!(n, 56);
        let (_tcp, owed) = io.into_parts();
        assert_eq!(
            owed.expect("the 101 is owed").rest(),
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn held_bytes_go_first_when_more_is_written_or_on_shutdown() {
        let (mut io, mut client) = pair().await;
        io.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .await
            .unwrap();
        io.write_all(b"after").await.unwrap();
        io.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"HTTP/1.1 101 Switching Protocols\r\n\r\nafter");
        assert!(io.into_parts().1.is_none(), "nothing is owed any more");
    }
}
