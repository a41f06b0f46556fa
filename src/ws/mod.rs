//! Switchboard's own WebSocket layer (RFC 6455, RFC 7692).
//!
//! - [`upgrade`]: the handshake, as an axum extractor; answers `101` and
//!   hands the connection's plain `TcpStream` to the session.
//! - [`conn`]: [`WebSocket`], a `Stream` + `Sink` of messages over that
//!   stream. It keeps **no read buffer** while nothing is pending (bytes are
//!   read into a stack buffer and decoded where they lie) and **no write
//!   buffer** once its frames are written, which is what makes an idle
//!   connection cost well under a kilobyte.
//! - [`frame`]: decoding client frames, encoding server frames.
//! - [`deflate`]: permessage-deflate negotiation and (de)compression. A
//!   broadcast is compressed once and the bytes shared by every connection
//!   that negotiated the same parameters.
//!
//! Why not a crate: tungstenite keeps a read buffer and a write buffer per
//! connection (≈ 2–4 KiB of an idle connection's ≈ 4.4) and has no
//! permessage-deflate; yawc has deflate but costs more per connection and
//! compresses each recipient's copy of a broadcast separately
//! (`docs/design/deflate-yawc.md`). The message types stay axum's
//! ([`Message`], [`Utf8Bytes`]), so the session code and its tests are
//! unchanged.

pub mod conn;
pub mod deflate;
pub mod frame;
pub mod http_io;
pub mod upgrade;

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

pub use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::Sink;

pub use conn::WebSocket;
pub use http_io::HttpIo;
pub use upgrade::WebSocketUpgrade;

/// Why a WebSocket connection failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol; the connection was closed with `code`.
    #[error("protocol violation ({code}): {reason}")]
    Protocol {
        /// The close code sent (1002, 1007 or 1009).
        code: u16,
        /// What was wrong, as sent in the close frame.
        reason: Cow<'static, str>,
    },
}

impl Error {
    /// Whether a message was over the size limit (close 1009).
    pub fn is_too_big(&self) -> bool {
        matches!(self, Error::Protocol { code, .. } if *code == crate::error::close::TOO_BIG)
    }
}

/// A socket that can send a text frame shared by many connections (a
/// broadcast), compressing it at most once for all of them.
///
/// The provided method just sends the text; [`WebSocket`] overrides it.
pub trait SendShared: Sink<Message> + Unpin {
    /// Queue `text`, whose compressed form (when this connection compresses
    /// and shares parameters with others) is cached in `deflated`. Call
    /// after `poll_ready`, like `start_send`.
    fn start_send_shared(
        &mut self,
        text: &Utf8Bytes,
        deflated: &OnceLock<Bytes>,
    ) -> Result<(), Self::Error> {
        let _ = deflated;
        Pin::new(self).start_send(Message::Text(text.clone()))
    }

    /// Called once the connection is registered as `client_id`, before
    /// the welcome: a transport that needs an id of its own to be reached
    /// by (SSE: the frames the client posts) opens it here and returns it
    /// for the welcome's `session` field.
    fn open_session(&mut self, client_id: &Arc<str>) -> Option<String> {
        let _ = client_id;
        None
    }

    /// The `transport` the backend proxies are told: `websocket`, or
    /// `sse` for the Server-Sent Events fallback.
    fn transport(&self) -> &'static str {
        "websocket"
    }
}
