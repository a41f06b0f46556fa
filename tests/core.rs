//! The tutorial's protocol on one instance, over real sockets.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn welcome_is_the_tutorials() {
    let server = start().await;
    let (ws, _) = tokio_tungstenite::connect_async(server.url("/"))
        .await
        .unwrap();
    let mut c = Client {
        ws,
        id: String::new(),
    };
    let w = c.recv().await;
    assert_eq!(w["type"], "connected");
    assert_eq!(w["message"], "Welcome to the real-time server");
    let id = w["clientId"].as_str().unwrap();
    assert!(id.starts_with("client-"), "{id}");
    assert_eq!(w["instanceId"], server.node.instance_id());
    server.shutdown().await;
}

#[tokio::test]
async fn broadcast_reaches_every_other_client_exactly_once() {
    let server = start().await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Client::connect(&server).await);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(json!({"type":"broadcast","data":{"n":i}})).await;
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let m = c.recv_type("broadcast").await;
            assert!(m["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
            seen.push(m["data"]["n"].as_u64().unwrap() as usize);
            assert_ne!(
                m["senderId"],
                json!(c.id),
                "the sender never gets its own broadcast"
            );
        }
        seen.sort();
        let expected: Vec<usize> = (0..4).filter(|&j| j != i).collect();
        assert_eq!(seen, expected, "each other client's broadcast exactly once");
        c.expect_silence(Duration::from_millis(150)).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn direct_reaches_only_its_target_and_unknown_targets_are_errors() {
    let server = start().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let mut c = Client::connect(&server).await;
    a.send(json!({"type":"direct","targetId":b.id,"data":"psst"}))
        .await;
    let m = b.recv().await;
    assert_eq!(m["type"], "direct");
    assert_eq!(m["data"], "psst");
    assert_eq!(m["senderId"], json!(a.id));
    assert!(m["timestamp"].is_u64());
    c.expect_silence(Duration::from_millis(150)).await;
    a.expect_silence(Duration::from_millis(10)).await;

    let r = a
        .request(
            json!({"type":"direct","targetId":"client-nobody","data":1}),
            9,
        )
        .await;
    assert_eq!(r["type"], "error");
    assert_eq!(r["code"], "unknown_target");

    // A departed target is unknown too.
    let gone = c.id.clone();
    c.ws.close(None).await.unwrap();
    assert!(eventually(|| async { server.node.hub().len() == 2 }).await);
    let r = a
        .request(json!({"type":"direct","targetId":gone,"data":1}), 10)
        .await;
    assert_eq!(r["code"], "unknown_target");
    // With an id, success is acknowledged.
    let r = a
        .request(json!({"type":"direct","targetId":b.id,"data":2}), 11)
        .await;
    assert_eq!(r["type"], "ack");
    server.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_an_error_and_the_connection_carries_on() {
    let server = start().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let cases: Vec<(Message, &str)> = vec![
        (Message::text("{not json"), "invalid_json"),
        (Message::text("[1,2,3]"), "invalid_frame"),
        (Message::text(r#"{"data":1}"#), "invalid_frame"),
        (Message::text(r#"{"type":42}"#), "invalid_frame"),
        (
            Message::text(r#"{"type":"warp","id":"x1"}"#),
            "unknown_type",
        ),
        (
            Message::text(r#"{"type":"direct","targetId":5,"id":3}"#),
            "invalid_frame",
        ),
        (
            Message::text(r#"{"type":"subscribe","channel":["a"]}"#),
            "invalid_frame",
        ),
        (Message::binary(vec![1u8, 2, 3]), "binary_not_supported"),
    ];
    for (msg, code) in cases {
        let text = format!("{msg:?}");
        a.send_raw(msg).await;
        let e = a.recv().await;
        assert_eq!(e["type"], "error", "{text}");
        assert_eq!(e["code"], code, "{text}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // The ref comes back when the id was readable.
    a.send_raw(Message::text(r#"{"type":"warp","id":"x1"}"#))
        .await;
    assert_eq!(a.recv().await["ref"], "x1");
    a.send_raw(Message::text(r#"{"type":"direct","targetId":5,"id":3}"#))
        .await;
    assert_eq!(a.recv().await["ref"], 3);
    // Still usable, and nobody else was disturbed.
    a.send(json!({"type":"broadcast","data":"still here"}))
        .await;
    assert_eq!(b.recv().await["data"], "still here");
    let pong = a.request(json!({"type":"ping"}), 77).await;
    assert_eq!(pong["type"], "pong");
    server.shutdown().await;
}

#[tokio::test]
async fn oversize_message_closes_with_1009_and_others_carry_on() {
    let mut s = settings();
    s.max_message_size = Some(1024);
    let server = start_with(s).await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let big = json!({"type":"broadcast","data":"x".repeat(2000)});
    a.send(big).await;
    assert_eq!(a.expect_close().await, 1009);
    // Just under the limit is fine for the others.
    let mut c = Client::connect(&server).await;
    c.send(json!({"type":"broadcast","data":"y".repeat(900)}))
        .await;
    assert_eq!(
        b.recv_type("broadcast").await["data"]
            .as_str()
            .unwrap()
            .len(),
        900
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_removed() {
    let mut s = settings();
    s.ping_interval = Some("100ms".parse().unwrap());
    s.pong_timeout = Some("100ms".parse().unwrap());
    let server = start_with(s).await;
    // A healthy client keeps reading, so its WebSocket layer answers pings.
    let healthy = Client::connect(&server).await;
    let healthy_task = tokio::spawn(async move {
        let mut h = healthy;
        let mut pings = 0;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(2), h.ws.next()).await
        {
            if matches!(m, Message::Ping(_)) {
                pings += 1;
            }
            if pings >= 3 {
                break;
            }
        }
        (h, pings)
    });
    // A silent peer: connected, but never reads again, so never pongs.
    let silent = Client::connect(&server).await;
    assert_eq!(server.node.hub().len(), 2);
    assert!(
        eventually(|| async { server.node.hub().len() == 1 }).await,
        "the silent peer is removed"
    );
    let (mut healthy, pings) = healthy_task.await.unwrap();
    assert!(pings >= 3, "the healthy client was pinged and stayed");
    let (_, body) = get(&server, "/metrics").await;
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["connectedClients"], 1);
    assert!(m["deadPeers"].as_u64().unwrap() >= 1);
    // The healthy client is still served.
    healthy.send(json!({"type":"ping","id":1})).await;
    assert_eq!(healthy.recv_type("pong").await["ref"], 1);
    drop(silent);
    server.shutdown().await;
}

#[tokio::test]
async fn http_endpoints() {
    let server = start().await;
    let _a = Client::connect(&server).await;
    let (status, body) = get(&server, "/").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v, json!({"status":"running","connectedClients":1}));
    assert_eq!(get(&server, "/_ah/health").await, (200, "OK".to_string()));
    assert_eq!(get(&server, "/livez").await.0, 200);
    assert_eq!(get(&server, "/readyz").await.0, 200);
    let (status, body) = get(&server, "/healthz").await;
    assert_eq!(status, 200);
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["ready"], true, "{h}");
    assert_eq!(h["draining"], false, "{h}");
    assert_eq!(h["bus"], json!({"kind": "memory", "up": true}), "{h}");
    assert_eq!(h["instanceId"], server.node.instance_id());
    let (status, body) = get(&server, "/metrics").await;
    assert_eq!(status, 200);
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["connectedClients"], 1);
    assert!(m["uptime"].as_f64().unwrap() >= 0.0);
    assert!(m["memoryUsage"]["rss"].as_u64().unwrap() > 1_000_000);
    assert_eq!(m["instanceId"], server.node.instance_id());
    assert_eq!(m["busUp"], true);
    assert!(
        m["messagesOut"].as_u64().unwrap() >= 1,
        "the welcome counts"
    );
    assert!(m["messagesIn"].is_u64());
    assert_eq!(get(&server, "/nope").await.0, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn prometheus_exposition() {
    let server = start().await;
    let mut a = Client::connect(&server).await;
    a.request(json!({"type":"subscribe","channel":"p"}), 1)
        .await;
    a.request(json!({"type":"publish","channel":"p","data":1}), 2)
        .await;
    a.recv_type("message").await;
    let resp = reqwest::get(server.http("/metrics/prometheus"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let body = resp.text().await.unwrap();
    for line in [
        "switchboard_connections 1",
        "switchboard_publications_total 1",
        "switchboard_requests_total{type=\"publish\"} 1",
        "switchboard_requests_total{type=\"subscribe\"} 1",
        "switchboard_frames_out_total{kind=\"message\"} 1",
        "# TYPE switchboard_delivery_latency_ms histogram",
        "switchboard_delivery_latency_ms_count 1",
        "switchboard_slow_consumer_actions_total{action=\"disconnect\"} 0",
        "switchboard_ready 1",
        "# TYPE process_cpu_seconds_total counter",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in\n{body}"
        );
    }
    // Every sample line is `name{labels} value` with a numeric value.
    for l in body.lines().filter(|l| !l.starts_with('#')) {
        let value = l.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{l}");
    }
    // The latency histogram is a valid one: bounds from 0.01 ms up, each
    // count cumulative, `+Inf` last and equal to `_count`.
    let buckets: Vec<(f64, u64)> = body
        .lines()
        .filter_map(|l| l.strip_prefix("switchboard_delivery_latency_ms_bucket{le=\""))
        .map(|l| {
            let (le, count) = l.split_once("\"} ").unwrap();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, count.parse().unwrap())
        })
        .collect();
    assert_eq!(buckets.first().map(|b| b.0), Some(0.01), "{body}");
    assert_eq!(buckets.last().map(|b| b.0), Some(f64::INFINITY));
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{buckets:?}"
    );
    assert_eq!(buckets.last().unwrap().1, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_turns_unready_and_asks_clients_to_reconnect_with_1012() {
    let mut s = settings();
    s.drain_timeout = Some("3s".parse().unwrap());
    let mut server = start_with(s).await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let node = server.node.clone();
    server.begin_shutdown();
    for c in [&mut a, &mut b] {
        let (code, reason) = c.expect_close_frame().await;
        assert_eq!(code, 1012);
        let retry: u64 = reason
            .rsplit_once("retry=")
            .and_then(|(_, ms)| ms.parse().ok())
            .unwrap_or_else(|| panic!("a retry hint in {reason:?}"));
        assert!((100..500).contains(&retry), "{retry}");
    }
    assert!(node.is_draining());
    assert!(!node.is_ready());
    server.join().await;
    assert_eq!(node.hub().len(), 0, "every connection task finished");
}

#[tokio::test]
async fn echo_endpoint_is_off_by_default_and_echoes_when_on() {
    let server = start().await;
    assert!(
        tokio_tungstenite::connect_async(server.url("/_echo"))
            .await
            .is_err()
    );
    server.shutdown().await;

    let mut s = settings();
    s.echo_path = Some("/_echo".into());
    let server = start_with(s).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url("/_echo"))
        .await
        .unwrap();
    use futures_util::SinkExt;
    ws.send(Message::text("not even json")).await.unwrap();
    ws.send(Message::binary(vec![0u8, 159, 146, 150]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("not even json")
    );
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 159, 146, 150])
    );
    assert_eq!(
        server.node.hub().len(),
        0,
        "echo clients are not protocol clients"
    );
    server.shutdown().await;
}
