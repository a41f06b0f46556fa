//! Per-address limits and the HTTP-side hardening, over real sockets.
//!
//! Linux routes all of 127.0.0.0/8 to loopback: a client socket bound to
//! 127.0.0.2 reaches the server on 127.0.0.1 as a second client address.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use support::*;
use switchboard::config::{Config, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const KEY: &str = "test-api-key-0123456789";

fn key_file() -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "switchboard-per-address-key-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&path, KEY).unwrap();
    path
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A TCP connection to `server` from the loopback address `from`.
async fn tcp_from(server: &TestServer, from: IpAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(server.addr).await.expect("tcp connect")
}

/// The WebSocket handshake of `req` over `tcp`, then the welcome:
/// `Err(status)` for an HTTP refusal, 0 when closed without an answer.
async fn handshake(
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
    tcp: TcpStream,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, u16> {
    let attempt = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, tcp)).await;
    match attempt.expect("the handshake ends in time") {
        Ok((mut ws, _)) => {
            use futures_util::StreamExt;
            let welcome = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("welcome");
            assert!(matches!(welcome, Some(Ok(_))), "{welcome:?}");
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(_) => Err(0),
    }
}

/// Open a WebSocket on `/ws` from `from`, with extra request headers.
/// `Ok(())` once the welcome came; `Err(status)` for an HTTP refusal, 0
/// when the connection was closed without an answer.
async fn ws_from(
    server: &TestServer,
    from: IpAddr,
    headers: &[(&'static str, &'static str)],
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, u16> {
    let mut req = server.url("/ws").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, HeaderValue::from_static(v));
    }
    let tcp = tcp_from(server, from).await;
    handshake(req, tcp).await
}

/// Send `request` raw from 127.0.0.1 and read the response head (and
/// whatever of the body came with it); `""` when the server closed
/// without answering.
async fn raw(server: &TestServer, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    read_response(&mut tcp, WAIT).await
}

async fn read_response(tcp: &mut TcpStream, wait: Duration) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let read = tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await;
        match read.expect("a response (or a close) in time") {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Whether the server closed `tcp` (EOF or reset) within [`WAIT`], having
/// sent nothing.
async fn closed_unanswered(tcp: &mut TcpStream) -> bool {
    let _ = tcp
        .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    read_response(tcp, WAIT).await.is_empty()
}

fn per_ip(max: usize) -> Settings {
    Settings {
        max_connections_per_ip: Some(max),
        handshake_rate_per_ip: Some(0.0),
        demo: Some(false),
        ..settings()
    }
}

#[tokio::test]
async fn one_address_past_its_connection_limit_is_closed_while_another_gets_in() {
    let server = start_with(per_ip(3)).await;
    let lo = ip("127.0.0.1");
    // A live WebSocket and two half-open connections (no request sent)
    // fill 127.0.0.1's three places.
    let _ws = ws_from(&server, lo, &[]).await.expect("first connection");
    let half_a = tcp_from(&server, lo).await;
    let mut half_b = tcp_from(&server, lo).await;
    let mut fourth = tcp_from(&server, lo).await;
    assert!(closed_unanswered(&mut fourth).await, "closed at accept");
    assert_eq!(ws_from(&server, lo, &[]).await.err(), Some(0));
    // Another address is not affected.
    let _other = ws_from(&server, ip("127.0.0.2"), &[])
        .await
        .expect("127.0.0.2 is admitted");
    // A place frees up when a half-open connection goes.
    drop(half_a);
    let mut admitted = false;
    for _ in 0..50 {
        if ws_from(&server, lo, &[]).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "127.0.0.1 gets in again");
    let (status, body) = get_from_other(&server, "/metrics").await;
    assert_eq!(status, 200);
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        m["connectionsRefusedPerAddress"].as_u64().unwrap() >= 2,
        "{m}"
    );
    let (_, text) = get_from_other(&server, "/metrics/prometheus").await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("switchboard_connections_refused_per_address_total ")),
        "{text}"
    );
    // A half-open connection does not stay for ever: hyper's header-read
    // timeout (10 s) closes it, unanswered.
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(10) + WAIT, half_b.read(&mut byte));
    assert!(
        matches!(closed.await, Ok(Ok(0) | Err(_))),
        "closed, unanswered"
    );
    server.shutdown().await;
}

/// GET over a connection from 127.0.0.3 (127.0.0.1 may be full).
async fn get_from_other(server: &TestServer, path: &str) -> (u16, String) {
    let mut tcp = tcp_from(server, ip("127.0.0.3")).await;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut text))
        .await
        .expect("response in time")
        .unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

#[tokio::test]
async fn the_per_address_handshake_bucket_refuses_a_burst_while_another_address_gets_in() {
    let server = start_with(Settings {
        handshake_rate_per_ip: Some(0.1),
        handshake_burst_per_ip: Some(3),
        ..per_ip(0)
    })
    .await;
    let lo = ip("127.0.0.1");
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(ws_from(&server, lo, &[]).await.expect("within the burst"));
    }
    // The fourth is refused with 429 and a Retry-After.
    let tcp = tcp_from(&server, lo).await;
    let req = server.url("/ws").into_client_request().unwrap();
    match tokio_tungstenite::client_async(req, tcp).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429);
            let retry: u64 = resp.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry >= 1);
        }
        other => panic!("expected 429, got {other:?}"),
    }
    assert!(ws_from(&server, ip("127.0.0.2"), &[]).await.is_ok());
    server.shutdown().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_x_forwarded_for_is_the_client() {
    let server = start_with(Settings {
        trusted_proxies: Some(vec!["127.0.0.1/32".into()]),
        ..per_ip(2)
    })
    .await;
    let proxy = ip("127.0.0.1");
    let a = [("x-forwarded-for", "6.6.6.6, 203.0.113.1")];
    let b = [("x-forwarded-for", "203.0.113.2")];
    let _a1 = ws_from(&server, proxy, &a).await.expect("a, first");
    let _a2 = ws_from(&server, proxy, &a).await.expect("a, second");
    // 203.0.113.1 is full (the forged 6.6.6.6 is not believed); the
    // proxy's connection was accepted, the upgrade gets 429.
    assert_eq!(ws_from(&server, proxy, &a).await.err(), Some(429));
    let _b1 = ws_from(&server, proxy, &b)
        .await
        .expect("b is limited apart");
    // A peer that is not a trusted proxy is counted as itself.
    let untrusted = ip("127.0.0.2");
    let _u1 = ws_from(&server, untrusted, &a).await.expect("own address");
    let _u2 = ws_from(&server, untrusted, &a).await.expect("own address");
    assert_eq!(ws_from(&server, untrusted, &b).await.err(), Some(0));
    server.shutdown().await;
}

#[tokio::test]
async fn without_trusted_proxies_x_forwarded_for_is_ignored() {
    let server = start_with(per_ip(2)).await;
    let lo = ip("127.0.0.1");
    let first = ws_from(&server, lo, &[("x-forwarded-for", "203.0.113.1")]).await;
    let second = ws_from(&server, lo, &[("x-forwarded-for", "203.0.113.2")]).await;
    assert!(first.is_ok() && second.is_ok());
    let third = ws_from(&server, lo, &[("x-forwarded-for", "203.0.113.3")]).await;
    assert_eq!(third.err(), Some(0), "counted as 127.0.0.1");
    server.shutdown().await;
}

fn api_settings() -> Settings {
    Settings {
        api_key_file: Some(key_file()),
        ..settings()
    }
}

#[tokio::test]
async fn an_oversize_api_body_is_refused_before_it_is_read() {
    let server = start_with(api_settings()).await;
    // Announce 100 MB and send none of it: the answer comes at once.
    let req = format!(
        "POST /api/broadcast HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    );
    let resp = raw(&server, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    // Without the key, the key is what is refused.
    let req = "POST /api/broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n";
    let resp = raw(&server, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_slow_api_body_times_out() {
    let server = start_with(api_settings()).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let req = format!(
        "POST /api/broadcast HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{{\"data\":"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    // The rest never comes: 408 after the body timeout.
    let wait = switchboard::api::BODY_TIMEOUT + WAIT;
    let resp = read_response(&mut tcp, wait).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("request_timeout"), "{resp}");
    server.shutdown().await;
}

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
const KEY_HDR: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn malformed_handshakes_get_400_and_post_gets_405() {
    let server = start().await;
    let ok = format!("GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}{KEY_HDR}\r\n");
    assert!(
        raw(&server, ok.as_bytes())
            .await
            .starts_with("HTTP/1.1 101")
    );
    let cases = [
        format!("GET /ws HTTP/1.1\r\n{UPGRADE}{KEY_HDR}\r\n"),
        format!("GET /ws HTTP/1.1\r\nHost: x\r\nHost: y\r\n{UPGRADE}{KEY_HDR}\r\n"),
        format!("GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}{KEY_HDR}{KEY_HDR}\r\n"),
        format!("GET / HTTP/1.1\r\nHost: x\r\n{UPGRADE}Sec-WebSocket-Version: 13\r\n{KEY_HDR}\r\n"),
    ];
    for req in &cases {
        let resp = raw(&server, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{req:?} -> {resp}");
    }
    let post =
        format!("POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{UPGRADE}{KEY_HDR}\r\n");
    let resp = raw(&server, post.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("allow: get"), "{resp}");
    server.shutdown().await;
}

#[tokio::test]
async fn the_metrics_can_require_the_api_key() {
    let open = start().await;
    assert_eq!(get(&open, "/metrics").await.0, 200, "public by default");
    open.shutdown().await;

    let server = start_with(Settings {
        metrics_require_key: Some(true),
        ..api_settings()
    })
    .await;
    let http = reqwest::Client::new();
    for path in ["/metrics", "/metrics/prometheus"] {
        assert_eq!(get(&server, path).await.0, 401, "{path}");
        let wrong = http
            .get(server.http(path))
            .header("x-api-key", "wrong-key-0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status().as_u16(), 403, "{path}");
        let right = http
            .get(server.http(path))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(right.status().as_u16(), 200, "{path}");
    }
    server.shutdown().await;
    // The option needs a key to require.
    let err = Config::from_settings(Settings {
        metrics_require_key: Some(true),
        ..settings()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("metrics_require_key"), "{err}");
}

#[tokio::test]
async fn the_echo_endpoint_applies_the_same_checks() {
    let server = start_with(Settings {
        echo_path: Some("/_echo".into()),
        allowed_origins: Some(vec!["https://good.example".into()]),
        ..per_ip(1)
    })
    .await;
    let req = |origin: &'static str| {
        let mut r = server.url("/_echo").into_client_request().unwrap();
        r.headers_mut()
            .insert("origin", HeaderValue::from_static(origin));
        r
    };
    let refused = tokio_tungstenite::connect_async(req("https://evil.example")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 403)
        }
        other => panic!("expected 403, got {other:?}"),
    }
    let (_ws, _) = tokio_tungstenite::connect_async(req("https://good.example"))
        .await
        .expect("an allowed origin gets in");
    // The echo connection holds 127.0.0.1's one place.
    let again = tokio_tungstenite::connect_async(req("https://good.example")).await;
    assert!(again.is_err(), "per-address limit on the echo path too");
    server.shutdown().await;
}

/// Open a WebSocket on `/ws` from 127.0.0.1 after sending `preamble` (a
/// PROXY protocol header) on the TCP connection; as [`ws_from`].
async fn ws_after(
    server: &TestServer,
    preamble: &[u8],
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, u16> {
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(preamble).await.unwrap();
    let req = server.url("/ws").into_client_request().unwrap();
    handshake(req, tcp).await
}

/// A PROXY protocol v2 header for a TCP/IPv4 client.
fn proxy_v2(client: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x11, 0, 12]); // v2 PROXY, TCP over IPv4, 12 bytes
    h.extend(client);
    h.extend([127, 0, 0, 1]);
    h.extend(40000u16.to_be_bytes());
    h.extend(8080u16.to_be_bytes());
    h
}

#[tokio::test]
async fn the_proxy_protocol_names_the_client_of_a_trusted_peer() {
    let server = start_with(Settings {
        trusted_proxies: Some(vec!["127.0.0.1/32".into()]),
        proxy_protocol: Some(true),
        ..per_ip(1)
    })
    .await;
    let v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 8080\r\n";
    let _a = ws_after(&server, v1).await.expect("203.0.113.7");
    // 203.0.113.7 holds its one place, whichever version names it.
    assert_eq!(ws_after(&server, v1).await.err(), Some(0));
    let v2 = proxy_v2([203, 0, 113, 7]);
    assert_eq!(ws_after(&server, &v2).await.err(), Some(0));
    // Other clients behind the same proxy are counted apart.
    let _b = ws_after(&server, &proxy_v2([203, 0, 113, 8]))
        .await
        .expect("203.0.113.8");
    let v1_other = b"PROXY TCP4 198.51.100.1 127.0.0.1 40000 8080\r\n";
    let _c = ws_after(&server, v1_other).await.expect("198.51.100.1");
    // A trusted peer without a header is closed, unanswered.
    let mut bare = TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_unanswered(&mut bare).await);
    // An untrusted peer is never asked for one: its header is HTTP garbage.
    let mut untrusted = tcp_from(&server, ip("127.0.0.2")).await;
    untrusted.write_all(v1_other).await.unwrap();
    let resp = read_response(&mut untrusted, WAIT).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    server.shutdown().await;
    // The option needs trusted proxies.
    let err = Config::from_settings(Settings {
        proxy_protocol: Some(true),
        ..settings()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("proxy_protocol"), "{err}");
}
