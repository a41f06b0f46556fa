//! What one client can do to another through `broadcast` and `direct`,
//! over real sockets: a stranger's flood is dropped for a slow reader
//! (counted, the stranger told) instead of getting it disconnected, and
//! the server-wide switches turn client broadcast and direct off.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::*;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// The attack: 150 frames of about 64 KB, inside the default burst.
const FLOOD: u64 = 150;

/// How long the slow reader waits after each frame it reads.
const READ_PAUSE: Duration = Duration::from_millis(20);

/// A client whose socket has a small receive buffer and that reads one
/// frame per [`READ_PAUSE`]: it falls behind any flood.
struct SlowReader {
    ws: WebSocketStream<TcpStream>,
    id: String,
}

impl SlowReader {
    async fn connect(server: &TestServer) -> SlowReader {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(server.addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(server.url("/ws"), stream)
            .await
            .expect("upgrade");
        let mut c = SlowReader {
            ws,
            id: String::new(),
        };
        let welcome = c.next().await.expect("welcome");
        c.id = welcome["clientId"].as_str().unwrap().to_string();
        c
    }

    /// The next text frame, or `None` if the connection ended (close
    /// frame or error); panics after [`WAIT`] of silence.
    async fn next(&mut self) -> Option<Value> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame arrives in time");
            match msg {
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(f))) => panic!("the slow reader was closed: {f:?}"),
                other => panic!("the slow reader's connection ended: {other:?}"),
            }
        }
    }

    async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    /// Read slowly until a `message` frame arrives; returns it and how
    /// many frames of type `ty` came before it.
    async fn slowly_until_message(&mut self, ty: &str) -> (Value, u64) {
        let mut relayed = 0;
        loop {
            let v = self.next().await.unwrap();
            if v["type"] == "message" {
                return (v, relayed);
            }
            if v["type"] == ty {
                relayed += 1;
            }
            tokio::time::sleep(READ_PAUSE).await;
        }
    }
}

fn padding() -> String {
    // 60,000 bytes of data: with the envelope, under the 64 KiB limit.
    "x".repeat(60_000)
}

/// Everything the attack checks afterwards: the victim stayed connected,
/// reads what was queued, and still gets channel publications.
async fn victim_survives(server: &TestServer, victim: &mut SlowReader, relayed_type: &str) {
    assert!(
        eventually(|| async { server.node.hub().relay_dropped() > 0 }).await,
        "some relayed frames were dropped for the slow reader"
    );
    assert_eq!(
        server.node.hub().slow_consumers(),
        0,
        "nobody was disconnected"
    );
    let mut publisher = Client::connect(server).await;
    let ack = publisher
        .request(
            json!({"type":"publish","channel":"news","data":"after the flood"}),
            1,
        )
        .await;
    assert_eq!(ack["type"], "ack");
    let (message, relayed) = tokio::time::timeout(
        Duration::from_secs(60),
        victim.slowly_until_message(relayed_type),
    )
    .await
    .expect("the slow reader drains its queue in time");
    assert_eq!(message["data"], "after the flood");
    eprintln!(
        "{relayed_type} flood of {FLOOD}: {relayed} reached the slow reader, {} dropped",
        server.node.hub().relay_dropped()
    );
    assert!(
        relayed > 0 && relayed < FLOOD,
        "some {relayed_type} frames arrived, not all: {relayed}"
    );
    victim.send(json!({"type":"ping","id":"p"})).await;
    loop {
        let v = victim.next().await.unwrap();
        if v["ref"] == "p" {
            assert_eq!(v["type"], "pong");
            break;
        }
    }
    assert_eq!(server.node.hub().slow_consumers(), 0);
    let (_, body) = get(server, "/metrics").await;
    let m: Value = serde_json::from_str(&body).unwrap();
    assert!(m["relayDropped"].as_u64().unwrap() > 0, "{body}");
    let (_, text) = get(server, "/metrics/prometheus").await;
    let line = text
        .lines()
        .find(|l| l.starts_with("switchboard_relay_dropped_total "))
        .expect("the Prometheus counter is there");
    assert_ne!(line, "switchboard_relay_dropped_total 0");
}

async fn subscribed_slow_reader(server: &TestServer) -> SlowReader {
    let mut victim = SlowReader::connect(server).await;
    victim
        .send(json!({"type":"subscribe","channel":"news","id":1}))
        .await;
    let r = victim.next().await.unwrap();
    assert_eq!(r["type"], "subscribed", "{r}");
    victim
}

#[tokio::test]
async fn a_strangers_direct_flood_does_not_disconnect_a_slow_reader() {
    let server = start().await;
    let mut victim = subscribed_slow_reader(&server).await;
    let mut stranger = Client::connect(&server).await;
    let pad = padding();
    for n in 0..FLOOD {
        stranger
            .send(json!({"type":"direct","targetId":victim.id,"data":pad,"id":n}))
            .await;
    }
    // One reply per frame: an ack, or `recipient_busy` for the dropped.
    let (mut acks, mut busy) = (0, 0);
    while acks + busy < FLOOD {
        let r = stranger.recv().await;
        match (r["type"].as_str(), r["code"].as_str()) {
            (Some("ack"), _) => acks += 1,
            (Some("error"), Some("recipient_busy")) => {
                assert!(r["ref"].is_u64(), "the error answers the frame: {r}");
                busy += 1;
            }
            _ => panic!("unexpected reply {r}"),
        }
    }
    assert!(acks > 0 && busy > 0, "acks {acks}, busy {busy}");
    victim_survives(&server, &mut victim, "direct").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_broadcast_flood_does_not_disconnect_a_slow_reader() {
    let server = start().await;
    let mut victim = subscribed_slow_reader(&server).await;
    let mut stranger = Client::connect(&server).await;
    let pad = padding();
    for n in 0..FLOOD {
        stranger
            .send(json!({"type":"broadcast","data":{"n":n,"pad":pad}}))
            .await;
    }
    // The stranger hears of the drops: one error per dropped broadcast at
    // most, without `ref`.
    let e = stranger.recv_type("error").await;
    assert_eq!(e["code"], "recipient_busy", "{e}");
    assert!(e.get("ref").is_none_or(Value::is_null), "{e}");
    victim_survives(&server, &mut victim, "broadcast").await;
    server.shutdown().await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn across_instances_the_recipients_instance_drops_and_counts() {
    // Two instances on the shared Redis (a unique prefix): the stranger on
    // A, the slow reader on B. B drops and counts; A acknowledges (the bus
    // carries no reply).
    let prefix = format!("sbt-relay-{}", switchboard::ids::random_base36(8));
    let on_redis = |i: usize| {
        let mut s = settings();
        s.bus = Some("redis://127.0.0.1:6379".into());
        s.bus_prefix = Some(prefix.clone());
        s.instance_id = Some(format!("{prefix}-i{i}"));
        s
    };
    let a = start_with(on_redis(0)).await;
    let b = start_with(on_redis(1)).await;
    let mut victim = subscribed_slow_reader(&b).await;
    let mut stranger = Client::connect(&a).await;
    let pad = padding();
    for n in 0..FLOOD {
        stranger
            .send(json!({"type":"direct","targetId":victim.id,"data":pad,"id":n}))
            .await;
    }
    for _ in 0..FLOOD {
        let r = stranger.recv().await;
        assert_eq!(r["type"], "ack", "{r}");
    }
    victim_survives(&b, &mut victim, "direct").await;
    assert_eq!(a.node.hub().relay_dropped(), 0);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_reader_that_keeps_up_gets_every_direct() {
    let server = start().await;
    let mut reader = Client::connect(&server).await;
    let mut sender = Client::connect(&server).await;
    for n in 0..50u64 {
        let ack = sender
            .request(
                json!({"type":"direct","targetId":reader.id,"data":{"n":n}}),
                n,
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let d = reader.recv_type("direct").await;
        assert_eq!(d["data"]["n"], n);
    }
    assert_eq!(server.node.hub().relay_dropped(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn client_broadcast_and_direct_can_be_turned_off() {
    let mut s = settings();
    s.client_broadcast = Some(false);
    s.client_direct = Some(false);
    let server = start_with(s).await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let e = a.request(json!({"type":"broadcast","data":"hi"}), 1).await;
    assert_eq!(e["code"], "broadcast_not_allowed", "{e}");
    let e = a
        .request(json!({"type":"direct","targetId":b.id,"data":"hi"}), 2)
        .await;
    assert_eq!(e["code"], "direct_not_allowed", "{e}");
    let e = a
        .request(json!({"type":"direct","userId":"someone","data":"hi"}), 3)
        .await;
    assert_eq!(e["code"], "direct_not_allowed", "{e}");
    // Channels are untouched, and nothing reached b.
    let r = a
        .request(json!({"type":"publish","channel":"room","data":1}), 4)
        .await;
    assert_eq!(r["type"], "ack");
    b.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;

    // On by default: the tutorial's protocol.
    let server = start().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.send(json!({"type":"broadcast","data":"hi"})).await;
    assert_eq!(b.recv_type("broadcast").await["data"], "hi");
    a.send(json!({"type":"direct","targetId":b.id,"data":"psst"}))
        .await;
    assert_eq!(b.recv_type("direct").await["data"], "psst");
    server.shutdown().await;
}
