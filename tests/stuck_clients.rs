//! Clients that stop reading while the server is writing to them (issue
//! 13), over real sockets: a recovery or an acked redelivery larger than
//! the socket buffers, to a client with a 4 KiB receive buffer that never
//! reads. Every write is bounded by `write_timeout`, and a close request
//! (no pong, `/api/disconnect`) ends a blocked write without waiting for
//! it: the client is gone from the hub, `/metrics` and presence, and its
//! socket is closed.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::*;
use switchboard::config::{NamespaceSettings, Settings};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Publications of 60 KB each: 6 MB, more than the kernel buffers of a
/// loopback connection hold (the server's send buffer grows to 4 MiB at
/// most, `tcp_wmem`; the client's receive buffer is 4 KiB).
const COUNT: u64 = 100;
const SIZE: usize = 60_000;

/// How long a stuck client may take to be removed: the longest path here
/// is ping (1 s) + pong timeout (1 s) + one sweeper tick, or the write
/// timeout (2 s) or the close grace (2 s), plus a wide margin for a busy
/// machine. Asserted as a deadline, not as a speed.
const GONE_WITHIN: Duration = Duration::from_secs(15);

const KEY: &str = "stuck-clients-api-key-0123456789";

/// Test settings with these keep-alive and write timeouts.
fn timeouts(ping: &str, pong: &str, write: &str) -> Settings {
    let mut s = settings();
    s.rate_limit = Some(0.0); // the publisher sends 100 frames at once
    s.ping_interval = Some(ping.parse().unwrap());
    s.pong_timeout = Some(pong.parse().unwrap());
    s.write_timeout = Some(write.parse().unwrap());
    s
}

/// A raw client with a 4 KiB receive buffer: it reads its welcome and
/// then only what the test reads. Returns it with its client id.
async fn stuck_client(server: &TestServer) -> (WebSocketStream<TcpStream>, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(server.url("/ws"), stream)
        .await
        .expect("handshake");
    let welcome = next_text(&mut ws).await;
    assert_eq!(welcome["type"], "connected");
    let id = welcome["clientId"].as_str().unwrap().to_string();
    (ws, id)
}

async fn next_text(ws: &mut WebSocketStream<TcpStream>) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Publish `COUNT` × 60 KB into `channel`, then subscribe an observer
/// (after, so that it is not sent them); returns it and the channel's
/// epoch.
async fn fill(server: &TestServer, channel: &str) -> (Client, String) {
    let mut publisher = Client::connect(server).await;
    let pad = "x".repeat(SIZE);
    for n in 1..=COUNT {
        let r = publisher
            .request(json!({"type":"publish","channel":channel,"data":pad}), n)
            .await;
        assert_eq!(r["type"], "ack", "{r}");
    }
    let mut observer = Client::connect(server).await;
    let r = observer
        .request(json!({"type":"subscribe","channel":channel}), 1)
        .await;
    assert_eq!(r["offset"], COUNT);
    (observer, r["epoch"].as_str().unwrap().to_string())
}

/// A client that subscribes with `since` offset 0 and reads nothing more:
/// the server starts writing 6 MB of recovery and blocks.
async fn stuck_in_recovery(
    server: &TestServer,
    channel: &str,
    epoch: &str,
) -> (WebSocketStream<TcpStream>, String) {
    let (mut ws, id) = stuck_client(server).await;
    let sub =
        json!({"type":"subscribe","channel":channel,"since":{"epoch":epoch,"offset":0},"id":1});
    ws.send(Message::text(sub.to_string())).await.unwrap();
    (ws, id)
}

async fn metrics(server: &TestServer) -> Value {
    let (status, body) = get(server, "/metrics").await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

async fn in_presence(observer: &mut Client, channel: &str, id: &str, n: u64) -> bool {
    let r = observer
        .request(json!({"type":"presence","channel":channel}), 1000 + n)
        .await;
    r["members"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["clientId"] == id)
}

/// Wait until the client `id` is in presence (it has subscribed), then
/// until it is gone: from the hub, `/metrics` and presence, within
/// [`GONE_WITHIN`]. `others` is how many other clients stay connected
/// (`fill`'s publisher has left).
async fn wait_gone(
    server: &TestServer,
    observer: &mut Client,
    channel: &str,
    id: &str,
    others: usize,
) {
    let deadline = tokio::time::Instant::now() + GONE_WITHIN;
    let mut n = 0;
    while !in_presence(observer, channel, id, n).await {
        n += 1;
        assert!(tokio::time::Instant::now() < deadline, "never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let since = tokio::time::Instant::now();
    loop {
        n += 1;
        // The observer reads (and so answers pings) on every round.
        let present = in_presence(observer, channel, id, n).await;
        let connected = metrics(server).await["connectedClients"].as_u64().unwrap();
        if connected == others as u64 && !present {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stuck client is still there after {GONE_WITHIN:?} ({connected} connected)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.node.hub().len(), others);
    eprintln!(
        "{id} gone {:?} after it was seen subscribed",
        since.elapsed()
    );
}

/// The server has closed the stuck client's socket: reading it now ends
/// (after what the kernel buffers still hold).
async fn socket_closed(mut ws: WebSocketStream<TcpStream>) {
    tokio::time::timeout(GONE_WITHIN, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await
    .expect("the server closed the socket");
}

#[tokio::test]
async fn a_recovering_client_that_never_reads_is_removed() {
    // The reproduction, with the timeouts of these tests.
    let server = start_with(timeouts("1s", "1s", "2s")).await;
    let (mut observer, epoch) = fill(&server, "stuck").await;
    let (ws, id) = stuck_in_recovery(&server, "stuck", &epoch).await;
    wait_gone(&server, &mut observer, "stuck", &id, 1).await;
    socket_closed(ws).await;
    // Removed by the write timeout or as a dead peer, whichever came
    // first; counted at most once either way.
    assert!(metrics(&server).await["deadPeers"].as_u64().unwrap() <= 1);
    server.shutdown().await;
}

#[tokio::test]
async fn the_write_timeout_alone_bounds_a_recovery() {
    // Keep-alive far away: only the write timeout can act.
    let server = start_with(timeouts("60s", "60s", "2s")).await;
    let (mut observer, epoch) = fill(&server, "stuck").await;
    let (ws, id) = stuck_in_recovery(&server, "stuck", &epoch).await;
    wait_gone(&server, &mut observer, "stuck", &id, 1).await;
    socket_closed(ws).await;
    assert_eq!(metrics(&server).await["deadPeers"], 0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_dead_peer_blocked_in_a_write_goes_at_once_and_counts_once() {
    // The write timeout far away: the keep-alive abort ends the write.
    let server = start_with(timeouts("1s", "1s", "60s")).await;
    let (mut observer, epoch) = fill(&server, "stuck").await;
    let (ws, id) = stuck_in_recovery(&server, "stuck", &epoch).await;
    wait_gone(&server, &mut observer, "stuck", &id, 1).await;
    socket_closed(ws).await;
    assert_eq!(metrics(&server).await["deadPeers"], 1);
    // A few more sweeper passes (a tick is 250 ms) do not count it again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(metrics(&server).await["deadPeers"], 1);
    server.shutdown().await;
}

/// A file holding the API key.
fn key_file() -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "switchboard-stuck-key-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&path, KEY).unwrap();
    path
}

#[tokio::test]
async fn an_api_disconnect_ends_a_client_blocked_in_a_write() {
    // Neither keep-alive nor the write timeout would act in time.
    let mut s = timeouts("60s", "60s", "60s");
    s.api_key_file = Some(key_file());
    let server = start_with(s).await;
    let (mut observer, epoch) = fill(&server, "stuck").await;
    let (ws, id) = stuck_in_recovery(&server, "stuck", &epoch).await;
    // Let the recovery start and block.
    let mut n = 0;
    while !in_presence(&mut observer, "stuck", &id, n).await {
        n += 1;
        assert!(n < 500, "never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = reqwest::Client::new()
        .post(server.http("/api/disconnect"))
        .bearer_auth(KEY)
        .json(&json!({"clientId": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    wait_gone(&server, &mut observer, "stuck", &id, 1).await;
    socket_closed(ws).await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_acked_redelivery_that_blocks_is_bounded() {
    let mut s = timeouts("60s", "60s", "2s");
    s.ack_timeout = Some("300ms".parse().unwrap());
    // The live messages are read; only the redelivery must block.
    s.queue_max_bytes = Some(16 << 20);
    s.namespaces.insert(
        "orders".into(),
        NamespaceSettings {
            acked: Some(true),
            history_size: Some(COUNT as usize),
            ..Default::default()
        },
    );
    let server = start_with(s).await;
    // Subscribes, reads the live publications one by one, acknowledges
    // none, then stops reading.
    let (mut ws, id) = stuck_client(&server).await;
    let sub = json!({"type":"subscribe","channel":"orders:stuck","id":1});
    ws.send(Message::text(sub.to_string())).await.unwrap();
    assert_eq!(next_text(&mut ws).await["type"], "subscribed");
    let mut publisher = Client::connect(&server).await;
    let pad = "y".repeat(SIZE);
    for n in 1..=COUNT {
        publisher
            .request(
                json!({"type":"publish","channel":"orders:stuck","data":pad}),
                n,
            )
            .await;
        let m = next_text(&mut ws).await;
        assert_eq!((&m["type"], &m["offset"]), (&json!("message"), &json!(n)));
    }
    // Not subscribed (it would be sent the redelivery too): it only asks
    // for presence.
    let mut observer = Client::connect(&server).await;
    wait_gone(&server, &mut observer, "orders:stuck", &id, 2).await;
    let m = metrics(&server).await;
    assert!(m["redeliveries"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(m["deadPeers"], 0);
    socket_closed(ws).await;
    server.shutdown().await;
}
