//! A raw WebSocket client for black-box tests over real TCP sockets
//! (`tests/ws_frames.rs`, `tests/compression.rs`).
//!
//! [`RawClient`] does the opening handshake by hand (with or without a
//! `Sec-WebSocket-Extensions` offer), writes client frames built with
//! [`super::frames`] (masked, or deliberately malformed) and parses the
//! server's frames itself. The parser checks what RFC 6455 requires of
//! *every* frame a server sends (no mask, a known opcode, control frames
//! final and at most 125 bytes, lengths in their minimal encoding, valid
//! close payloads, valid UTF-8 in text messages, sane fragmentation), so
//! each test also checks the server's own framing. RSV bits are refused
//! unless permessage-deflate was agreed; then RSV1 is kept, with the exact
//! wire bytes, and compressed messages are inflated as RFC 7692 §7.2.2
//! says (append `00 00 FF FF`, raw inflate) with a window of the agreed
//! size, by a fresh inflater per message or, when the server kept its
//! context, by ONE inflater for the whole connection.
//!
//! Close-related outcomes are compared as short strings from
//! [`RawClient::close_summary`] (`"close 1002"`: a close frame with code
//! 1002 and, after the client's answer, the TCP connection closed by the
//! server), so a failure says what the server did instead.

use std::net::SocketAddr;
use std::time::Duration;

use flate2::Decompress;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::deflate::{Agreed, deflate, inflate_with};
use super::frames::*;
use super::{TestServer, WAIT};

/// A complete server message (fragments reassembled, inflated when
/// compressed) or control frame, with its bytes as sent.
#[derive(Debug, Clone)]
pub struct Received {
    pub opcode: u8,
    /// RSV1 was set on its first frame.
    pub compressed: bool,
    /// Its frames exactly as they came over the wire.
    pub wire: Vec<u8>,
    /// The payload as sent (compressed when `compressed`).
    pub raw: Vec<u8>,
    /// The payload after inflating.
    pub data: Vec<u8>,
}

impl Received {
    pub fn text(&self) -> &str {
        assert_eq!(self.opcode, TEXT, "not a text message: {self:?}");
        std::str::from_utf8(&self.data).expect("text message is UTF-8")
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(self.text()).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

// ---------------------------------------------------------------------------
// HTTP (opening handshake)
// ---------------------------------------------------------------------------

/// A parsed HTTP response head.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Send `request` as is on a new connection and read the response head.
/// Returns the stream, the head, and any bytes read past the head.
pub async fn http_exchange(addr: SocketAddr, request: &str) -> (TcpStream, HttpResponse, Vec<u8>) {
    let mut stream = timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("TCP connect in time")
        .expect("TCP connect");
    stream.set_nodelay(true).unwrap();
    timeout(WAIT, stream.write_all(request.as_bytes()))
        .await
        .expect("request written in time")
        .expect("request written");
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(buf.len() < 64 * 1024, "response head too long");
        let mut chunk = [0u8; 4096];
        let n = timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("response head in time")
            .expect("read the response head");
        assert!(
            n > 0,
            "connection closed before the end of the response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..end]).expect("response head is ASCII");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(
        parts.next(),
        Some("HTTP/1.1"),
        "status line {status_line:?}"
    );
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {status_line:?}"));
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {l:?}"));
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let rest = buf[end..].to_vec();
    (stream, HttpResponse { status, headers }, rest)
}

/// An upgrade request for `path`, with every required header except those
/// in `omit`, plus `extra` header lines.
pub fn upgrade_request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    key: &str,
    version: &str,
    omit: &[&str],
) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", version),
    ] {
        if !omit.contains(&name) {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    if method != "GET" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    req
}

/// `request` (from [`upgrade_request`]) with one more header line.
pub fn with_header(mut request: String, name: &str, value: &str) -> String {
    assert!(request.ends_with("\r\n\r\n"));
    request.truncate(request.len() - 2);
    request.push_str(&format!("{name}: {value}\r\n\r\n"));
    request
}

// ---------------------------------------------------------------------------
// The raw client
// ---------------------------------------------------------------------------

/// A WebSocket client over a plain `TcpStream`, frames built and parsed by
/// hand.
pub struct RawClient {
    pub stream: TcpStream,
    /// Bytes read and not yet parsed.
    buf: Vec<u8>,
    /// A server message being reassembled.
    partial: Option<Received>,
    /// The `Sec-WebSocket-Extensions` of the 101, if any.
    pub extensions: Option<String>,
    /// With permessage-deflate: the inflater (fresh per message unless the
    /// server keeps its context) and whether it is reset per message.
    pub inflater: Option<(Decompress, bool)>,
    /// Whether this client has sent a close frame.
    sent_close: bool,
}

/// How reading ended without a frame.
#[derive(Debug)]
pub enum Ended {
    /// The TCP connection ended (EOF, or the error that ended it).
    Closed(String),
    /// Nothing complete arrived in time.
    TimedOut,
}

impl RawClient {
    /// Handshake on `/ws` without an offer and read the `connected`
    /// welcome.
    pub async fn connect(server: &TestServer) -> RawClient {
        RawClient::connect_offering(server, None).await
    }

    /// Handshake on `/ws` with `offer` and read the `connected` welcome.
    pub async fn connect_offering(server: &TestServer, offer: Option<&str>) -> RawClient {
        let mut c = RawClient::handshake(server.addr, "/ws", offer).await;
        let welcome = c.recv_json().await;
        assert_eq!(welcome["type"], "connected", "{welcome}");
        c
    }

    /// The opening handshake on `path`, offering `offer` as
    /// `Sec-WebSocket-Extensions`, checking the 101 response (RFC 6455
    /// §4.2.2, §4.1): `Upgrade`, `Connection`, `Sec-WebSocket-Accept`, and
    /// no extension unless one was offered. Records the extension response
    /// and sets up inflating accordingly.
    pub async fn handshake(addr: SocketAddr, path: &str, offer: Option<&str>) -> RawClient {
        let key = generate_key();
        let mut req = upgrade_request("GET", addr, path, &key, "13", &[]);
        if let Some(offer) = offer {
            req = with_header(req, "Sec-WebSocket-Extensions", offer);
        }
        let (stream, resp, rest) = http_exchange(addr, &req).await;
        assert_eq!(resp.status, 101, "upgrade refused: {resp:?}");
        let one = |name: &str| {
            let mut all = resp
                .headers
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v);
            let first = all.next().cloned();
            assert!(all.next().is_none(), "two `{name}` headers: {resp:?}");
            first
        };
        assert!(
            resp.header("upgrade")
                .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
            "101 without `Upgrade: websocket`: {resp:?}"
        );
        assert!(
            resp.header("connection").is_some_and(|v| v
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))),
            "101 without `Connection: Upgrade`: {resp:?}"
        );
        assert_eq!(
            one("sec-websocket-accept"),
            Some(derive_accept_key(key.as_bytes())),
            "wrong Sec-WebSocket-Accept: {resp:?}"
        );
        let extensions = one("sec-websocket-extensions");
        if offer.is_none() {
            assert_eq!(
                extensions, None,
                "an extension was accepted that the client did not offer: {resp:?}"
            );
        }
        let inflater = extensions.as_deref().map(|h| {
            let agreed = Agreed::parse(h);
            (
                Decompress::new_with_window_bits(false, agreed.server_max_window_bits),
                agreed.server_no_context_takeover,
            )
        });
        RawClient {
            stream,
            buf: rest,
            partial: None,
            extensions,
            inflater,
            sent_close: false,
        }
    }

    // --- writing --------------------------------------------------------

    /// Write `bytes` as they are, in one write.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("write in time")
            .expect("write");
    }

    /// Write `bytes` one byte per TCP write, pausing `pause` after each.
    pub async fn send_raw_slowly(&mut self, bytes: &[u8], pause: Duration) {
        for b in bytes {
            self.send_raw(std::slice::from_ref(b)).await;
            tokio::time::sleep(pause).await;
        }
    }

    /// Write one masked frame with any FIN, RSV bits and opcode.
    pub async fn send_frame(&mut self, fin: bool, rsv: u8, opcode: u8, payload: &[u8]) {
        if opcode == CLOSE {
            self.sent_close = true;
        }
        self.send_raw(&masked_frame(fin, rsv, opcode, payload))
            .await;
    }

    /// One final, masked text frame (the bytes need not be UTF-8).
    pub async fn send_text(&mut self, payload: &[u8]) {
        self.send_frame(true, 0, TEXT, payload).await;
    }

    /// An uncompressed JSON text message.
    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(v.to_string().as_bytes()).await;
    }

    /// A JSON text message compressed by a fresh compressor, RSV1 set.
    pub async fn send_json_deflated(&mut self, v: &Value) {
        self.send_frame(true, RSV1, TEXT, &deflate(v.to_string().as_bytes()))
            .await;
    }

    /// A close frame with `payload` (see [`close_payload`]).
    pub async fn send_close(&mut self, payload: &[u8]) {
        self.send_frame(true, 0, CLOSE, payload).await;
    }

    // --- reading --------------------------------------------------------

    /// The next frame as it came, or how the connection ended within
    /// `wait`.
    pub async fn next_frame(&mut self, wait: Duration) -> Result<Frame, Ended> {
        let deadline = Instant::now() + wait;
        loop {
            let deflate = self.inflater.is_some();
            if let Some((frame, used)) = parse_server_frame_with(&self.buf, deflate) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            match timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(Ended::TimedOut),
                Ok(Ok(0)) if self.buf.is_empty() => return Err(Ended::Closed("EOF".into())),
                Ok(Ok(0)) => {
                    return Err(Ended::Closed(format!(
                        "EOF in the middle of a frame, {} bytes buffered",
                        self.buf.len()
                    )));
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(Ended::Closed(e.to_string())),
            }
        }
    }

    /// The next complete message or control frame, reassembling fragments
    /// and checking the server's fragmentation (RFC 6455 §5.4), inflated
    /// when RSV1 was set.
    pub async fn next_received(&mut self, wait: Duration) -> Result<Received, Ended> {
        let deadline = Instant::now() + wait;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let f = self.next_frame(wait).await?;
            let m = match f.opcode {
                TEXT | BINARY => {
                    assert!(
                        self.partial.is_none(),
                        "server began a new message inside a fragmented one (RFC 6455 §5.4)"
                    );
                    Received {
                        opcode: f.opcode,
                        compressed: f.rsv1,
                        wire: f.wire,
                        raw: f.payload,
                        data: Vec::new(),
                    }
                }
                CONTINUATION => {
                    let mut m = self.partial.take().expect(
                        "server sent a continuation frame outside a message (RFC 6455 §5.4)",
                    );
                    m.wire.extend_from_slice(&f.wire);
                    m.raw.extend_from_slice(&f.payload);
                    m
                }
                PING | PONG | CLOSE => {
                    return Ok(Received {
                        opcode: f.opcode,
                        compressed: false,
                        wire: f.wire,
                        raw: f.payload.clone(),
                        data: f.payload,
                    });
                }
                other => unreachable!("opcode {other:#x} passed the parser"),
            };
            if !f.fin {
                self.partial = Some(m);
                continue;
            }
            return Ok(self.inflate(m));
        }
    }

    /// Fill in `m.data`: the payload, inflated when compressed.
    fn inflate(&mut self, mut m: Received) -> Received {
        m.data = if m.compressed {
            let (d, fresh) = self.inflater.as_mut().unwrap();
            if *fresh {
                d.reset(false);
            }
            inflate_with(d, &m.raw)
                .unwrap_or_else(|e| panic!("server's compressed message does not inflate: {e}"))
        } else {
            m.raw.clone()
        };
        m
    }

    /// The next message or control frame as a [`Msg`], or how the
    /// connection ended, or [`Event::TimedOut`] after `wait`.
    pub async fn next_event(&mut self, wait: Duration) -> Event {
        match self.next_received(wait).await {
            Ok(m) => Event::Msg(match m.opcode {
                TEXT | BINARY => data_message(m.opcode, m.data),
                PING => Msg::Ping(m.data),
                PONG => Msg::Pong(m.data),
                _ => Msg::Close(m.data),
            }),
            Err(Ended::Closed(how)) => Event::Closed(how),
            Err(Ended::TimedOut) => Event::TimedOut,
        }
    }

    /// The next message, skipping the server's pings; panics on anything
    /// but a message within [`WAIT`].
    pub async fn recv_msg(&mut self) -> Msg {
        loop {
            match self.next_event(WAIT).await {
                Event::Msg(Msg::Ping(_)) => continue,
                Event::Msg(m) => return m,
                other => panic!("expected a message, got {other:?}"),
            }
        }
    }

    /// The next message, which must be a JSON text message.
    pub async fn recv_json(&mut self) -> Value {
        match self.recv_msg().await {
            Msg::Text(t) => serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}")),
            other => panic!("expected a JSON text message, got {other:?}"),
        }
    }

    /// The next message must be a pong carrying `payload`.
    pub async fn expect_pong(&mut self, payload: &[u8]) {
        match self.recv_msg().await {
            Msg::Pong(p) => assert_eq!(p, payload, "pong payload differs from the ping's"),
            other => panic!("expected a pong, got {other:?}"),
        }
    }

    /// The next data message (skipping pings and pongs) with its bytes as
    /// sent; panics on anything else within [`WAIT`].
    pub async fn recv(&mut self) -> Received {
        loop {
            let m = self
                .next_received(WAIT)
                .await
                .unwrap_or_else(|e| panic!("expected a message: {e:?}"));
            match m.opcode {
                PING | PONG => continue,
                CLOSE => panic!("expected a message, got close {:?}", m.raw),
                _ => return m,
            }
        }
    }

    /// The next message whose JSON `type` is `ty`, skipping others
    /// (join/leave noise).
    pub async fn recv_type(&mut self, ty: &str) -> Received {
        loop {
            let m = self.recv().await;
            if m.json()["type"] == ty {
                return m;
            }
        }
    }

    /// Subscribe to `channel` and return the `subscribed` reply.
    pub async fn subscribe(&mut self, channel: &str) -> Received {
        self.send_json(&json!({"type":"subscribe","channel":channel,"id":1}))
            .await;
        let reply = self.recv_type("subscribed").await;
        assert_eq!(reply.json()["ref"], 1, "{}", reply.text());
        reply
    }

    /// Read until the closing handshake is over and describe it:
    /// - `"close CODE"`: the next message was a close frame with CODE; this
    ///   client answered it (unless it had sent a close already) and the
    ///   server then closed the TCP connection within [`WAIT`];
    /// - `"close without code"`: the same with an empty close payload;
    /// - anything else says what happened instead.
    ///
    /// Server pings are skipped; any other message before the close frame
    /// is reported (a request the server should not have processed).
    pub async fn close_summary(&mut self) -> String {
        let payload = loop {
            match self.next_event(WAIT).await {
                Event::Msg(Msg::Ping(_)) => continue,
                Event::Msg(Msg::Close(p)) => break p,
                Event::Msg(m) => return format!("{m:?} instead of a close frame"),
                Event::Closed(how) => return format!("no close frame: TCP closed ({how})"),
                Event::TimedOut => return format!("no close frame within {WAIT:?}"),
            }
        };
        let head = match payload.get(..2) {
            Some(code) => format!("close {}", u16::from_be_bytes([code[0], code[1]])),
            None => "close without code".to_string(),
        };
        if !self.sent_close {
            // Echo the code, as RFC 6455 §5.5.1 suggests. The server may
            // have closed already: a failed write is fine.
            self.sent_close = true;
            let echo = masked_frame(true, 0, CLOSE, payload.get(..2).unwrap_or_default());
            let _ = timeout(WAIT, self.stream.write_all(&echo)).await;
        }
        match self.next_event(WAIT).await {
            Event::Closed(_) => head,
            Event::TimedOut => {
                format!("{head}, but the TCP connection is still open {WAIT:?} later")
            }
            Event::Msg(m) => format!("{head}, then {m:?} after the close frame"),
        }
    }
}
