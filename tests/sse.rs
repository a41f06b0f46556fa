//! The Server-Sent Events transport over real sockets: `GET /sse` (the
//! welcome with its session, events, keep-alive comments), `POST
//! /sse/send` (frames handled as over a WebSocket, replies on the stream),
//! unknown sessions, recovery with `since`, the slow-consumer policy, the
//! drain event, and a POST that lands on another instance (Redis, NATS).

mod support;
#[macro_use]
#[path = "support/bus_suite.rs"]
mod bus_suite;

use std::time::Duration;

use serde_json::json;
use support::sse::Sse;
use support::*;

#[tokio::test]
async fn the_welcome_carries_a_session_and_posted_frames_are_answered_on_the_stream() {
    let server = start().await;
    let mut sse = Sse::open(&server.http("")).await;
    let (client, secret) = sse.session.split_once('.').expect("clientId.secret");
    assert_eq!(client, sse.id);
    assert!(secret.len() >= 32, "at least 128 bits: {secret}");

    // Several frames in one POST, handled in order.
    sse.send(vec![
        json!({"type":"subscribe","channel":"chat:sse","id":1}),
        json!({"type":"publish","channel":"chat:sse","data":{"text":"hi"},"id":2}),
    ])
    .await;
    let subscribed = sse.reply(1).await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    let ack = sse.reply(2).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = sse.recv_type("message").await;
    assert_eq!(m["data"], json!({"text":"hi"}));
    assert_eq!(m["offset"], ack["offset"]);

    // One frame alone; a frame from a WebSocket client reaches the stream.
    let body = json!({"session": sse.session, "frame": {"type":"ping","id":3}});
    let (status, answer) = sse.post_to(&sse.base, &body).await;
    assert_eq!((status, answer), (202, json!({"queued": 1})));
    assert_eq!(sse.reply(3).await["type"], "pong");
    let mut ws = Client::connect(&server).await;
    ws.send(json!({"type":"direct","targetId":sse.id,"data":"psst"}))
        .await;
    let d = sse.recv_type("direct").await;
    assert_eq!(
        (d["data"].clone(), d["senderId"].clone()),
        (json!("psst"), json!(ws.id))
    );

    // Raw JSON with a line break survives as two data lines.
    let raw = format!(
        "{{\"session\":\"{}\",\"frame\":{{\"type\":\"publish\",\"channel\":\"chat:sse\",\"data\":{{\"a\":\n1}}}}}}",
        sse.session
    );
    let resp = reqwest::Client::new()
        .post(server.http("/sse/send"))
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let m = sse.recv_type("message").await;
    assert_eq!(m["data"], json!({"a":1}));
    // Event ids grow by one.
    assert!(
        sse.ids.windows(2).all(|w| w[1] == w[0] + 1),
        "{:?}",
        sse.ids
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_bad_frame_gets_the_same_error_as_over_websocket_and_the_stream_goes_on() {
    let server = start().await;
    let mut sse = Sse::open(&server.http("")).await;
    sse.send(vec![json!({"type":"nonsense","id":1})]).await;
    let e = sse.reply(1).await;
    assert_eq!(
        (e["type"].clone(), e["code"].clone()),
        (json!("error"), json!("unknown_type"))
    );
    sse.send(vec![
        json!({"type":"subscribe","channel":"bad channel!","id":2}),
    ])
    .await;
    assert_eq!(sse.reply(2).await["code"], "bad_channel");
    // A body that is not the envelope is the POST's error, not the stream's.
    let (status, answer) = sse.post_to(&sse.base, &json!({"frames": []})).await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = sse
        .post_to(&sse.base, &json!({"session": sse.session, "frames": []}))
        .await;
    assert_eq!(status, 400, "{answer}");
    let too_many: Vec<_> = (0..33).map(|i| json!({"type":"ping","id":i})).collect();
    let (status, answer) = sse
        .post_to(
            &sse.base,
            &json!({"session": sse.session, "frames": too_many}),
        )
        .await;
    assert_eq!(
        (status, answer["code"].clone()),
        (413, json!("payload_too_large"))
    );
    sse.send(vec![json!({"type":"ping","id":4})]).await;
    assert_eq!(sse.reply(4).await["type"], "pong");
    server.shutdown().await;
}

#[tokio::test]
async fn an_unknown_or_expired_session_is_a_404() {
    let server = start().await;
    let sse = Sse::open(&server.http("")).await;
    let base = sse.base.clone();
    let frame = json!({"type":"ping"});
    for session in [
        "nonsense".to_string(),
        format!("{}.{}", sse.id, "0".repeat(32)),
        format!("client-x.{}", sse.session.split_once('.').unwrap().1),
    ] {
        let (status, answer) = sse
            .post_to(&base, &json!({"session": session, "frame": frame}))
            .await;
        assert_eq!(
            (status, answer["code"].clone()),
            (404, json!("unknown_session")),
            "{session}"
        );
    }
    let session = sse.session.clone();
    let http = reqwest::Client::new();
    drop(sse); // the client goes away: the stream and its session end
    assert!(eventually(|| async { server.node.hub().is_empty() }).await);
    let resp = http
        .post(format!("{base}/sse/send"))
        .body(json!({"session": session, "frame": frame}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_with_since_recovers_what_the_stream_missed() {
    let server = start().await;
    let mut publisher = Client::connect(&server).await;
    let mut sse = Sse::open(&server.http("")).await;
    sse.send(vec![
        json!({"type":"subscribe","channel":"chat:rec","id":1}),
    ])
    .await;
    sse.reply(1).await;
    publisher
        .request(json!({"type":"publish","channel":"chat:rec","data":1}), 1)
        .await;
    let first = sse.recv_type("message").await;
    // The stream goes away; three publications later a new one resumes.
    drop(sse);
    for n in 2..=4 {
        publisher
            .request(json!({"type":"publish","channel":"chat:rec","data":n}), n)
            .await;
    }
    let mut sse = Sse::open(&server.http("")).await;
    let since = json!({"epoch": first["epoch"], "offset": first["offset"]});
    sse.send(vec![
        json!({"type":"subscribe","channel":"chat:rec","since":since,"id":7}),
    ])
    .await;
    let mut data = Vec::new();
    let mut recovered = None;
    // The missed publications, then `subscribed` (in either order here).
    while data.len() < 3 || recovered.is_none() {
        let v = sse.recv().await;
        match v["type"].as_str() {
            Some("subscribed") => recovered = Some(v["recovered"].clone()),
            Some("message") => data.push(v["data"].as_u64().unwrap()),
            _ => {}
        }
    }
    assert_eq!(recovered, Some(json!(true)));
    assert_eq!(data, vec![2, 3, 4]);
    server.shutdown().await;
}

#[tokio::test]
async fn keep_alive_comments_keep_a_reading_stream_and_a_vanished_one_is_removed() {
    let mut s = settings();
    s.ping_interval = Some("100ms".parse().unwrap());
    s.pong_timeout = Some("200ms".parse().unwrap());
    let server = start_with(s).await;
    let mut sse = Sse::open(&server.http("")).await;
    // Well past ping + pong timeout: a stream that takes its comments is
    // alive (its flushed keep-alive counts as the pong).
    sse.quiet_for(Duration::from_millis(1200)).await;
    assert!(sse.comments >= 3, "comments: {}", sse.comments);
    assert_eq!(server.node.hub().len(), 1);
    let (status, body) = get(&server, "/metrics").await;
    let metrics: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status, metrics["sseConnections"].clone()), (200, json!(1)));
    sse.send(vec![json!({"type":"ping","id":1})]).await;
    assert_eq!(sse.reply(1).await["type"], "pong");
    drop(sse);
    assert!(eventually(|| async { server.node.hub().is_empty() }).await);
    assert!(server.node.sse_inboxes().is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_does_not_read_is_a_slow_consumer() {
    let mut s = settings();
    s.rate_limit = Some(0.0); // the publisher floods on purpose
    s.queue_max_messages = Some(64);
    s.queue_max_bytes = Some(128 * 1024);
    s.write_timeout = Some("2s".parse().unwrap());
    let server = start_with(s).await;
    let mut sse = Sse::open(&server.http("")).await;
    sse.send(vec![
        json!({"type":"subscribe","channel":"feed:slow","id":1}),
    ])
    .await;
    assert_eq!(sse.reply(1).await["type"], "subscribed");
    // The stream stops reading; a fast WebSocket subscriber keeps pace.
    let mut fast = Client::connect(&server).await;
    fast.request(json!({"type":"subscribe","channel":"feed:slow"}), 1)
        .await;
    let mut publisher = Client::connect(&server).await;
    let pad = "p".repeat(4000);
    let mut n = 0u64;
    while server.node.hub().slow_consumers() == 0 {
        assert!(n < 20_000, "the slow-consumer policy never acted");
        publisher
            .send(json!({"type":"publish","channel":"feed:slow","data":{"n":n,"pad":pad}}))
            .await;
        fast.recv_type("message").await;
        n += 1;
    }
    // Disconnect: the stream ends (with the 4008 close event if it gets
    // that far), the other clients carry on.
    let events = sse.until_end(Duration::from_secs(20)).await;
    if let Some(last) = events.last().filter(|e| e["type"] == "close") {
        assert_eq!(last["code"], 4008, "{last}");
    }
    assert!(eventually(|| async { server.node.hub().len() == 2 }).await);
    publisher
        .send(json!({"type":"publish","channel":"feed:slow","data":"after"}))
        .await;
    assert_eq!(fast.recv_type("message").await["data"], "after");
    server.shutdown().await;
}

#[tokio::test]
async fn drain_ends_the_stream_with_the_reconnect_advice() {
    let mut s = settings();
    s.drain_spread = Some("100ms".parse().unwrap());
    let mut server = start_with(s).await;
    let mut sse = Sse::open(&server.http("")).await;
    server.begin_shutdown();
    let events = sse.until_end(Duration::from_secs(10)).await;
    let close = events.last().expect("a close event");
    assert_eq!(close["type"], "close", "{close}");
    assert_eq!(close["code"], 1012);
    let reason = close["reason"].as_str().unwrap();
    assert!(reason.starts_with("server draining; retry="), "{reason}");
    server.join().await;
}

#[tokio::test]
async fn the_origin_is_checked_as_for_websocket() {
    let mut s = settings();
    s.allowed_origins = Some(vec!["https://good.example".into()]);
    let server = start_with(s).await;
    let http = reqwest::Client::new();
    let resp = http
        .get(server.http("/sse"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = http
        .post(server.http("/sse/send"))
        .header("origin", "https://evil.example")
        .body(r#"{"session":"a.b","frame":{}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let mut sse = Sse::open(&server.http("")).await;
    sse.send(vec![json!({"type":"ping","id":1})]).await;
    assert_eq!(sse.reply(1).await["type"], "pong");
    server.shutdown().await;
}

#[tokio::test]
async fn the_token_comes_as_a_query_or_a_bearer_header_and_is_verified() {
    const SECRET: &str = "sse-test-secret-0123456789abcdef";
    let dir = std::env::temp_dir().join(format!("sb-sse-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let mut s = settings();
    s.auth_hs256_secret_file = Some(secret_file);
    s.auth_required = Some(true);
    let server = start_with(s).await;
    switchboard::auth::init_crypto();
    let exp = switchboard::protocol::now_ms() / 1000 + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "alice", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let http = reqwest::Client::new();
    // No token: there is no first-frame auth over SSE.
    let resp = http.get(server.http("/sse")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    // A bad token: the stream's only event is the close, 4001.
    let mut bad = Sse::open_raw(&server.http(""), "?token=nope").await;
    let events = bad.until_end(Duration::from_secs(5)).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0]["type"].clone(), events[0]["code"].clone()),
        (json!("close"), json!(4001))
    );
    // A good one, as a query and as a bearer header.
    let mut q = Sse::open_query(&server.http(""), &format!("?token={token}")).await;
    q.send(vec![json!({"type":"ping","id":1})]).await;
    assert_eq!(q.reply(1).await["type"], "pong");
    let resp = http
        .get(server.http("/sse"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = String::new();
    let mut resp = resp;
    while !body.contains("\n\n") {
        let chunk = tokio::time::timeout(WAIT, resp.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        body.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(body.contains("\"type\":\"connected\""), "{body}");
    server.shutdown().await;
}

#[cfg(feature = "pubsub")]
#[path = "support/pubsub_emulator.rs"]
mod pubsub_emulator;

#[cfg(any(feature = "redis", feature = "nats", feature = "pubsub"))]
mod across_instances {
    //! The POST lands on the instance that does not hold the stream.
    use super::*;
    use bus_suite::{Instance, base_settings, unique_prefix};
    use switchboard::config::Settings;

    /// The settings of instance `i` on `bus`.
    fn on_bus(bus: &str, prefix: &str, i: usize) -> Settings {
        Settings {
            bus: Some(bus.into()),
            bus_prefix: Some(prefix.into()),
            ..base_settings(prefix, i)
        }
    }

    async fn post_elsewhere(settings: impl Fn(&str, usize) -> Settings) {
        let prefix = unique_prefix("sse");
        let a = Instance::start(settings(&prefix, 0)).await;
        let b = Instance::start(settings(&prefix, 1)).await;
        let mut sse = Sse::open(&a.http("")).await;
        let other = b.http("");
        let body = |frames| json!({"session": sse.session, "frames": frames});
        let (status, answer) = sse
            .post_to(
                &other,
                &body(json!([
                    {"type":"subscribe","channel":"chat:x","id":1},
                    {"type":"publish","channel":"chat:x","data":"via b","id":2},
                    {"type":"nonsense","id":3}
                ])),
            )
            .await;
        assert_eq!(status, 202, "{answer}");
        // The replies in order; the publication whenever the bus brings it.
        let (mut replies, mut message) = (Vec::new(), None);
        while replies.len() < 3 || message.is_none() {
            let v = sse.recv().await;
            match v["type"].as_str() {
                Some("message") => message = Some(v["data"].clone()),
                _ => replies.push((v["ref"].clone(), v["type"].clone(), v["code"].clone())),
            }
        }
        assert_eq!(
            replies,
            vec![
                (json!(1), json!("subscribed"), json!(null)),
                (json!(2), json!("ack"), json!(null)),
                (json!(3), json!("error"), json!("unknown_type")),
            ]
        );
        assert_eq!(message, Some(json!("via b")));
        // A WebSocket client on b reaches the stream on a.
        let mut ws = b.client().await;
        ws.request(json!({"type":"publish","channel":"chat:x","data":"ws"}), 9)
            .await;
        assert_eq!(sse.recv_type("message").await["data"], "ws");
        // No stream anywhere: 404 from either instance.
        let gone =
            json!({"session": format!("nobody.{}", "0".repeat(32)), "frame": {"type":"ping"}});
        assert_eq!(sse.post_to(&other, &gone).await.0, 404);
        assert_eq!(sse.post_to(&a.http(""), &gone).await.0, 404);
        drop(sse);
        a.shutdown().await;
        b.shutdown().await;
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn a_post_to_another_instance_reaches_the_stream_on_redis() {
        post_elsewhere(|p, i| on_bus("redis://127.0.0.1:6379", p, i)).await;
    }

    #[cfg(feature = "nats")]
    #[tokio::test]
    async fn a_post_to_another_instance_reaches_the_stream_on_nats() {
        post_elsewhere(|p, i| on_bus("nats://127.0.0.1:4222", p, i)).await;
    }

    #[cfg(feature = "pubsub")]
    #[tokio::test]
    async fn a_post_to_another_instance_reaches_the_stream_on_pubsub() {
        let host = super::pubsub_emulator::Emulator::shared().await.host();
        post_elsewhere(|p, i| Settings {
            pubsub_topic: Some(format!("{p}-topic")),
            pubsub_subscription: Some(format!("{p}-sub{i}")),
            ..on_bus(&format!("pubsub://test-project?emulator={host}"), p, i)
        })
        .await;
    }
}
