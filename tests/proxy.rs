//! Backend proxies over real sockets: a real HTTP backend (axum on
//! 127.0.0.1:0, started by each test) records every call and answers per
//! scenario; the server calls it for connect, subscribe, publish, rpc and
//! refresh. Every answer the wire format allows, and every failure
//! (timeout, 500, malformed JSON, backend down), is a case here.

mod support;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};
use support::backend::{Backend, Reply, forbidden, ok};
use support::*;
use switchboard::config::{NamespaceSettings, Settings};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Settings with every proxy pointing at `url`, and a namespace `p`
/// whose subscriptions and publications go through the proxies.
fn proxied(url: &str) -> Settings {
    let mut s = settings();
    s.proxy_subscribe_url = Some(format!("{url}/subscribe"));
    s.proxy_publish_url = Some(format!("{url}/publish"));
    s.proxy_rpc_url = Some(format!("{url}/rpc"));
    s.proxy_timeout = Some("500ms".parse().unwrap());
    s.namespaces = HashMap::from([(
        "p".to_string(),
        NamespaceSettings {
            subscribe_proxy: Some(true),
            publish_proxy: Some(true),
            ..Default::default()
        },
    )]);
    s
}

/// Connect and return the close code and reason the server refuses with.
async fn refused(server: &TestServer) -> (u16, String) {
    let (ws, _) = tokio_tungstenite::connect_async(server.url("/ws"))
        .await
        .unwrap();
    let mut c = Client {
        ws,
        id: String::new(),
    };
    c.expect_close_frame().await
}

#[tokio::test]
async fn connect_admits_with_grants_data_and_channels_and_forwards_only_named_headers() {
    let (backend, url) = Backend::start(|_| {
        ok(json!({"userId": "u1", "grants": {"subscribe": ["priv:*"]},
                  "data": {"hello": 1}, "channels": ["news"]}))
    })
    .await;
    let mut s = settings();
    s.proxy_connect_url = Some(format!("{url}/connect"));
    s.proxy_headers = Some(vec!["Cookie".into(), "X-Missing".into()]);
    s.namespaces = HashMap::from([(
        "priv".to_string(),
        NamespaceSettings {
            anonymous: Some(false),
            ..Default::default()
        },
    )]);
    let server = start_with(s).await;
    let mut request = server.url("/ws").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Cookie", "session=abc".parse().unwrap());
    request
        .headers_mut()
        .insert("X-Other", "secret".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut c = Client {
        ws,
        id: String::new(),
    };
    let welcome = c.recv().await;
    assert_eq!(welcome["type"], "connected");
    assert_eq!(welcome["data"], json!({"hello": 1}));
    let sub = c.recv().await;
    assert_eq!(
        (&sub["type"], &sub["channel"]),
        (&json!("subscribed"), &json!("news"))
    );
    // The grant works; the call said exactly what the wire format says.
    let r = c
        .request(json!({"type":"subscribe","channel":"priv:a"}), 1)
        .await;
    assert_eq!(r["type"], "subscribed", "{r}");
    let calls = backend.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let (body, headers) = &calls[0];
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body["kind"], "connect");
    assert_eq!(body["clientId"], welcome["clientId"]);
    assert_eq!(body["instanceId"], server.node.instance_id());
    assert_eq!(body["transport"], "websocket");
    assert_eq!(body["userId"], Value::Null);
    assert_eq!(body["remoteAddr"], "127.0.0.1");
    assert_eq!(body["headers"], json!({"cookie": "session=abc"}));
    // Presence knows the user the backend named.
    let members = c
        .request(json!({"type":"presence","channel":"news"}), 2)
        .await;
    assert!(members.to_string().contains("u1"), "{members}");
    server.shutdown().await;
}

#[tokio::test]
async fn connect_refusals_and_failures_close_the_connection() {
    let cases: Vec<(Reply, u16, &str)> = vec![
        (forbidden(), 4003, "not you"),
        (
            Reply::Json(json!({"disconnect": {"code": 4100, "reason": "banned"}})),
            4100,
            "banned",
        ),
        (Reply::Status(500), 1011, "backend unavailable"),
        (Reply::Raw("{not json"), 1011, "backend unavailable"),
        (
            Reply::Slow(Duration::from_secs(3), json!({"result": {"userId": "x"}})),
            1011,
            "backend unavailable",
        ),
    ];
    for (reply, code, reason) in cases {
        let reply = Mutex::new(Some(reply));
        let (_backend, url) = Backend::start(move |_| reply.lock().unwrap().take().unwrap()).await;
        let mut s = settings();
        s.proxy_connect_url = Some(format!("{url}/connect"));
        s.proxy_timeout = Some("300ms".parse().unwrap());
        let server = start_with(s).await;
        assert_eq!(refused(&server).await, (code, reason.to_string()));
        server.shutdown().await;
    }
    // Backend down: nothing listens there.
    let mut s = settings();
    s.proxy_connect_url = Some(format!("http://127.0.0.1:{}/connect", free_port()));
    let server = start_with(s).await;
    assert_eq!(refused(&server).await, (1011, "backend unavailable".into()));
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_proxy_allows_refuses_and_disconnects() {
    let (backend, url) = Backend::start(|call| match call["channel"].as_str() {
        Some("p:open") => ok(json!({})),
        Some("p:closed") => forbidden(),
        _ => Reply::Json(json!({"disconnect": {"code": 4200, "reason": "go away"}})),
    })
    .await;
    let server = start_with(proxied(&url)).await;
    let mut c = Client::connect(&server).await;
    let r = c
        .request(json!({"type":"subscribe","channel":"p:open"}), 1)
        .await;
    assert_eq!(r["type"], "subscribed");
    let r = c
        .request(json!({"type":"subscribe","channel":"p:closed"}), 2)
        .await;
    assert_eq!(
        (&r["type"], &r["code"], &r["message"]),
        (&json!("error"), &json!("forbidden"), &json!("not you"))
    );
    // The connection stays; channels outside the namespace are not asked.
    let r = c
        .request(json!({"type":"subscribe","channel":"free"}), 3)
        .await;
    assert_eq!(r["type"], "subscribed");
    let asked = backend.calls_of("subscribe");
    assert_eq!(asked.len(), 2);
    assert_eq!(asked[0]["channel"], "p:open");
    assert_eq!(asked[0]["clientId"], c.id);
    c.send(json!({"type":"subscribe","channel":"p:bye","id":4}))
        .await;
    assert_eq!(c.expect_close_frame().await, (4200, "go away".into()));
    server.shutdown().await;
}

#[tokio::test]
async fn publish_proxy_rewrites_refuses_and_nothing_passes_without_it() {
    let (backend, url) = Backend::start(|call| match call["data"]["text"].as_str() {
        _ if call["kind"] == "subscribe" => ok(json!({})),
        Some("rewrite me") => ok(json!({"data": {"text": "rewritten"}})),
        Some("keep") => ok(json!({})),
        Some("spam") => forbidden(),
        Some("crash") => Reply::Status(500),
        Some("garbage") => Reply::Raw("<html>"),
        _ => Reply::Slow(Duration::from_secs(2), json!({"result": {}})),
    })
    .await;
    let server = start_with(proxied(&url)).await;
    let mut sub = Client::connect(&server).await;
    let mut publ = Client::connect(&server).await;
    // subscribe goes through the (allowing) proxy too
    let r = sub
        .request(json!({"type":"subscribe","channel":"p:chat"}), 1)
        .await;
    assert_eq!(r["type"], "subscribed");
    let send = |text: &str, id: u64| json!({"type":"publish","channel":"p:chat","data":{"text":text},"id":id});
    let r = publ.request(send("rewrite me", 1), 1).await;
    assert_eq!(r["type"], "ack", "{r}");
    let m = sub.recv_type("message").await;
    assert_eq!(m["data"], json!({"text": "rewritten"}));
    let r = publ.request(send("keep", 2), 2).await;
    assert_eq!(r["type"], "ack");
    assert_eq!(
        sub.recv_type("message").await["data"],
        json!({"text": "keep"})
    );
    let r = publ.request(send("spam", 3), 3).await;
    assert_eq!(
        (&r["code"], &r["message"]),
        (&json!("forbidden"), &json!("not you"))
    );
    for (text, id) in [("crash", 4), ("garbage", 5), ("slow", 6)] {
        let r = publ.request(send(text, id), id).await;
        assert_eq!(r["code"], "proxy_unavailable", "{text}: {r}");
    }
    // What history holds is what the backend allowed, as it allowed it.
    let h = publ
        .request(json!({"type":"history","channel":"p:chat"}), 7)
        .await;
    let texts: Vec<_> = h["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"]["text"].clone())
        .collect();
    assert_eq!(texts, vec![json!("rewritten"), json!("keep")], "{h}");
    sub.expect_silence(Duration::from_millis(300)).await;
    let asked = backend.calls_of("publish");
    assert_eq!(asked[0]["channel"], "p:chat");
    assert_eq!(asked[0]["data"], json!({"text": "rewrite me"}));
    server.shutdown().await;
}

#[tokio::test]
async fn rpc_answers_errors_and_bad_frames() {
    let (backend, url) = Backend::start(|call| match call["method"].as_str() {
        Some("add") => {
            let d = &call["data"];
            ok(json!({"data": d["a"].as_i64().unwrap() + d["b"].as_i64().unwrap()}))
        }
        // Over the 1 MiB an answer may have.
        Some("big") => ok(json!({"data": "x".repeat(1_100_000)})),
        _ => Reply::Json(json!({"error": {"code": "no_such_method", "message": "unknown"}})),
    })
    .await;
    let server = start_with(proxied(&url)).await;
    let mut c = Client::connect(&server).await;
    let r = c
        .request(json!({"type":"rpc","method":"add","data":{"a":2,"b":3}}), 1)
        .await;
    assert_eq!(r, json!({"type":"rpc","ref":1,"data":5}));
    let r = c.request(json!({"type":"rpc","method":"nope"}), 2).await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("no_such_method"))
    );
    c.send(json!({"type":"rpc","method":"add"})).await;
    assert_eq!(c.recv().await["code"], "invalid_frame");
    let r = c.request(json!({"type":"rpc","method":""}), 3).await;
    assert_eq!(r["code"], "invalid_frame");
    let r = c.request(json!({"type":"rpc","method":"big"}), 4).await;
    assert_eq!(r["code"], "proxy_unavailable");
    assert_eq!(backend.calls_of("rpc").len(), 3);
    let call = &backend.calls_of("rpc")[0];
    assert_eq!(
        (&call["method"], &call["data"]),
        (&json!("add"), &json!({"a":2,"b":3}))
    );
    // The figures count it.
    let (_, text) = get(&server, "/metrics/prometheus").await;
    assert!(
        text.contains(r#"switchboard_proxy_calls_total{kind="rpc",outcome="ok"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"switchboard_proxy_calls_total{kind="rpc",outcome="refused"} 1"#));
    assert!(text.contains(r#"switchboard_proxy_calls_total{kind="rpc",outcome="failed"} 1"#));
    assert!(text.contains(r#"switchboard_proxy_latency_ms_count{kind="rpc"} 3"#));
    server.shutdown().await;

    // Without an rpc proxy.
    let server = start().await;
    let mut c = Client::connect(&server).await;
    let r = c.request(json!({"type":"rpc","method":"add"}), 1).await;
    assert_eq!(r["code"], "rpc_not_available");
    server.shutdown().await;
}

#[tokio::test]
async fn a_slow_backend_delays_no_one_else_and_the_in_flight_bound_answers_busy() {
    let (backend, url) = Backend::start(|_| {
        Reply::Slow(Duration::from_secs(2), json!({"result": {"data": "late"}}))
    })
    .await;
    let mut s = proxied(&url);
    s.proxy_timeout = Some("5s".parse().unwrap());
    s.proxy_max_in_flight = Some(1);
    let server = start_with(s).await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.send(json!({"type":"rpc","method":"slow","id":1})).await;
    assert!(eventually(|| async { backend.calls().len() == 1 }).await);
    // While a's call is in flight: b is served, and b's own call is refused.
    let r = b.request(json!({"type":"ping"}), 1).await;
    assert_eq!(r["type"], "pong");
    let r = b
        .request(json!({"type":"subscribe","channel":"free"}), 2)
        .await;
    assert_eq!(r["type"], "subscribed");
    let r = b.request(json!({"type":"rpc","method":"slow"}), 3).await;
    assert_eq!(r["code"], "proxy_busy", "{r}");
    assert_eq!(
        backend.answered.load(Ordering::SeqCst),
        0,
        "a's call was still in flight"
    );
    // a gets its answer once the backend gives it.
    assert_eq!(a.recv().await, json!({"type":"rpc","ref":1,"data":"late"}));
    server.shutdown().await;
}

#[tokio::test]
async fn refresh_extends_or_closes_4003() {
    for extend in [true, false] {
        let (backend, url) = Backend::start(move |call| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            match (call["kind"].as_str(), extend) {
                (Some("connect"), _) => ok(json!({"userId": "u7", "expiresAt": now + 1})),
                (_, true) => ok(json!({"userId": "u7", "expiresAt": now + 3600})),
                (_, false) => {
                    Reply::Json(json!({"error": {"code": "expired", "message": "log in again"}}))
                }
            }
        })
        .await;
        let mut s = settings();
        s.proxy_connect_url = Some(format!("{url}/connect"));
        s.proxy_refresh_url = Some(format!("{url}/refresh"));
        let server = start_with(s).await;
        let mut c = Client::connect(&server).await;
        assert!(eventually(|| async { !backend.calls_of("refresh").is_empty() }).await);
        let call = &backend.calls_of("refresh")[0];
        assert_eq!(
            (&call["userId"], &call["clientId"]),
            (&json!("u7"), &json!(c.id))
        );
        if extend {
            let r = c.request(json!({"type":"ping"}), 1).await;
            assert_eq!(r["type"], "pong");
            // Asked once: the new expiry is an hour away.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(backend.calls_of("refresh").len(), 1);
            let r = c.request(json!({"type":"ping"}), 2).await;
            assert_eq!(r["type"], "pong");
        } else {
            assert_eq!(c.expect_close_frame().await, (4003, "log in again".into()));
        }
        server.shutdown().await;
    }
}

#[test]
fn a_proxied_namespace_needs_its_url() {
    let mut s = proxied("http://127.0.0.1:1");
    s.proxy_publish_url = None;
    let err = switchboard::Config::from_settings(s)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("publish_proxy needs proxy_publish_url"),
        "{err}"
    );
    let mut s = settings();
    s.proxy_rpc_url = Some("not a url".into());
    assert!(switchboard::Config::from_settings(s).is_err());
}

/// `examples/chat-backend` against a real server: a chat message goes
/// through it, is stamped, persisted to its file and served back; an
/// empty one is refused and nowhere.
#[tokio::test]
async fn chat_backend_example_persists() {
    let dir = std::env::temp_dir().join(format!("sb-chat-backend-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("chat.jsonl");
    let port = free_port();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/chat-backend/server.py"
    );
    let _backend = tokio::process::Command::new("python3")
        .args([script, "--port", &port.to_string(), "--file"])
        .arg(&file)
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs the example backend (it is a test requirement)");
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        eventually(|| async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await,
        "the example backend listens"
    );
    let mut s = settings();
    s.proxy_publish_url = Some(format!("{base}/publish"));
    s.namespaces = HashMap::from([(
        "chat".to_string(),
        NamespaceSettings {
            publish_proxy: Some(true),
            ..Default::default()
        },
    )]);
    let server = start_with(s).await;
    let mut c = Client::connect(&server).await;
    c.request(json!({"type":"subscribe","channel":"chat:lobby"}), 1)
        .await;
    let r = c
        .request(json!({"type":"publish","channel":"chat:lobby","data":{"text":"  hello  ","name":"ann"}}), 2)
        .await;
    assert_eq!(r["type"], "ack", "{r}");
    let m = c.recv_type("message").await;
    assert_eq!(
        (&m["data"]["text"], &m["data"]["name"]),
        (&json!("hello"), &json!("ann"))
    );
    assert!(m["data"]["time"].is_u64(), "stamped by the backend: {m}");
    let r = c
        .request(
            json!({"type":"publish","channel":"chat:lobby","data":{"text":" "}}),
            3,
        )
        .await;
    assert_eq!(r["code"], "empty_message");
    let stored: Value = reqwest::get(format!("{base}/messages?channel=chat:lobby"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let messages = stored["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{stored}");
    assert_eq!(messages[0]["data"], m["data"]);
    assert_eq!(messages[0]["clientId"], c.id);
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 1);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// With a connect proxy and auth on: no token → the backend decides (no
/// `auth` frame awaited); a valid token → not asked, unless
/// `proxy_connect_always`; a bad token → refused without a call.
#[tokio::test]
async fn tokens_and_the_connect_proxy() {
    const SECRET: &str = "proxy-test-secret-0123456789abcdef";
    let dir = std::env::temp_dir().join(format!("sb-proxy-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    switchboard::auth::init_crypto();
    let exp = switchboard::protocol::now_ms() / 1000 + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "u-jwt", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    for always in [false, true] {
        let (backend, url) = Backend::start(|_| ok(json!({"userId": "u-cookie"}))).await;
        let mut s = settings();
        s.proxy_connect_url = Some(format!("{url}/connect"));
        s.proxy_connect_always = Some(always);
        s.auth_hs256_secret_file = Some(dir.join("secret"));
        s.auth_required = Some(true);
        let server = start_with(s).await;
        let mut c = Client::connect(&server).await;
        assert_eq!(backend.calls()[0]["userId"], Value::Null);
        let who = |c: &TestServer, id: &str| {
            c.node
                .hub()
                .clients()
                .into_iter()
                .find(|h| &**h.id() == id)
                .and_then(|h| h.info().user_id.clone())
                .map(|u| u.to_string())
        };
        assert_eq!(who(&server, &c.id).as_deref(), Some("u-cookie"));
        c.request(json!({"type":"ping"}), 1).await;
        let jwt = Client::connect_url(&server.url(&format!("/ws?token={token}"))).await;
        let calls = backend.calls();
        match always {
            false => assert_eq!(calls.len(), 1, "a valid token is not asked about"),
            true => {
                assert_eq!(calls[1]["userId"], "u-jwt");
                assert_eq!(who(&server, &jwt.id).as_deref(), Some("u-cookie"));
            }
        }
        let (ws, _) = tokio_tungstenite::connect_async(server.url("/ws?token=bad"))
            .await
            .unwrap();
        let mut bad = Client {
            ws,
            id: String::new(),
        };
        assert_eq!(bad.expect_close_frame().await.0, 4001);
        assert_eq!(
            backend.calls().len(),
            calls.len(),
            "a bad token is not asked about"
        );
        server.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
