//! The server HTTP API for backends (`/api/*`), over real sockets.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use switchboard::config::{Config, Settings};

const KEY: &str = "test-api-key-0123456789";

/// Write `content` to a fresh temporary file and return its path.
fn key_file(content: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "switchboard-api-key-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&path, content).unwrap();
    path
}

fn api_settings() -> Settings {
    Settings {
        api_key_file: Some(key_file(&format!("  {KEY}\n"))),
        ..settings()
    }
}

async fn start_api() -> TestServer {
    start_with(api_settings()).await
}

/// A response's status and JSON body (`Value::Null` when the body is not
/// JSON, which no API answer should be).
async fn parts(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// POST `body` (raw text) to `path` with the bearer key.
async fn post_raw(server: &TestServer, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(server.http(path))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    parts(resp).await
}

async fn post(server: &TestServer, path: &str, body: Value) -> (u16, Value) {
    post_raw(server, path, body.to_string()).await
}

async fn get_api(server: &TestServer, path: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .get(server.http(path))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    parts(resp).await
}

fn assert_error(r: &(u16, Value), status: u16, code: &str) {
    assert_eq!(r.0, status, "{}", r.1);
    assert_eq!(r.1["code"], code, "{}", r.1);
    assert!(r.1["message"].is_string(), "{}", r.1);
}

#[tokio::test]
async fn publish_reaches_subscribers_with_a_null_sender_and_its_offset() {
    let server = start_api().await;
    let mut sub = Client::connect(&server).await;
    let r = sub
        .request(json!({"type":"subscribe","channel":"news:today"}), 1)
        .await;
    assert_eq!(r["type"], "subscribed");
    let epoch = r["epoch"].clone();

    for n in 1..=2u64 {
        let (status, body) = post(
            &server,
            "/api/publish",
            json!({"channel":"news:today","data":{"n":n}}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body,
            json!({"channel":"news:today","offset":n,"epoch":epoch})
        );
        let m = sub.recv_type("message").await;
        assert_eq!(m["channel"], "news:today");
        assert_eq!(m["data"], json!({"n":n}));
        assert_eq!(m["senderId"], Value::Null);
        assert_eq!(m["offset"], n);
        assert_eq!(m["epoch"], epoch);
    }

    // `sys` does not let clients publish; the server API still may.
    let (status, body) = post(
        &server,
        "/api/publish",
        json!({"channel":"sys:notice","data":null}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["offset"], 1);
    let r = sub
        .request(json!({"type":"publish","channel":"sys:notice","data":1}), 2)
        .await;
    assert_eq!(r["code"], "publish_not_allowed", "clients still may not");

    let r = post(
        &server,
        "/api/publish",
        json!({"channel":"bad channel","data":1}),
    )
    .await;
    assert_error(&r, 400, "bad_channel");
    server.shutdown().await;
}

#[tokio::test]
async fn broadcast_reaches_every_client() {
    let server = start_api().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(&server).await);
    }
    let (status, body) = post(&server, "/api/broadcast", json!({"data":{"alert":"hi"}})).await;
    assert_eq!((status, body), (200, json!({})));
    for c in clients.iter_mut() {
        let m = c.recv_type("broadcast").await;
        assert_eq!(m["senderId"], Value::Null);
        assert_eq!(m["data"], json!({"alert":"hi"}));
        assert!(m["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
        c.expect_silence(Duration::from_millis(100)).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn direct_reaches_only_its_target() {
    let server = start_api().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let (status, _) = post(
        &server,
        "/api/direct",
        json!({"clientId":a.id,"data":"for a"}),
    )
    .await;
    assert_eq!(status, 200);
    let m = a.recv().await;
    assert_eq!(m["type"], "direct");
    assert_eq!(m["data"], "for a");
    assert_eq!(m["senderId"], Value::Null);
    b.expect_silence(Duration::from_millis(150)).await;

    let r = post(
        &server,
        "/api/direct",
        json!({"clientId":"client-nobody","data":1}),
    )
    .await;
    assert_error(&r, 404, "unknown_target");

    let r = post(
        &server,
        "/api/direct",
        json!({"userId":"u1","clientId":"c","data":1}),
    )
    .await;
    assert_error(&r, 400, "invalid_request");
    let r = post(&server, "/api/direct", json!({"data":1})).await;
    assert_error(&r, 400, "invalid_request");
    a.expect_silence(Duration::from_millis(50)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn presence_lists_members() {
    let server = start_api().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    for c in [&mut a, &mut b] {
        let r = c
            .request(json!({"type":"subscribe","channel":"chat:lobby/1"}), 1)
            .await;
        assert_eq!(r["type"], "subscribed");
    }
    let (status, body) = get_api(&server, "/api/presence/chat:lobby/1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["channel"], "chat:lobby/1");
    assert_eq!(body["count"], 2);
    let mut ids: Vec<&str> = body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["userId"], Value::Null);
            m["clientId"].as_str().unwrap()
        })
        .collect();
    ids.sort();
    let mut expected = vec![a.id.as_str(), b.id.as_str()];
    expected.sort();
    assert_eq!(ids, expected);

    // Percent-encoded names work too; an empty channel has no members.
    let (status, body) = get_api(&server, "/api/presence/chat%3Aempty").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"channel":"chat:empty","members":[],"count":0}));

    let r = get_api(&server, "/api/presence/sys:metrics").await;
    assert_error(&r, 409, "presence_disabled");
    let r = get_api(&server, "/api/presence/bad%20channel").await;
    assert_error(&r, 400, "bad_channel");
    let r = post(&server, "/api/presence/chat:lobby", json!({})).await;
    assert_error(&r, 405, "method_not_allowed");
    server.shutdown().await;
}

#[tokio::test]
async fn disconnect_closes_the_client_with_the_given_code() {
    let server = start_api().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let (status, body) = post(
        &server,
        "/api/disconnect",
        json!({"clientId":a.id,"code":4321,"reason":"bye"}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"disconnected":true})));
    assert_eq!(a.expect_close().await, 4321);
    assert!(eventually(|| async { server.node.hub().len() == 1 }).await);

    let (status, _) = post(&server, "/api/disconnect", json!({"clientId":b.id})).await;
    assert_eq!(status, 200);
    assert_eq!(b.expect_close().await, 4000, "the default code");

    let r = post(&server, "/api/disconnect", json!({"clientId":a.id})).await;
    assert_error(&r, 404, "unknown_target");
    let r = post(
        &server,
        "/api/disconnect",
        json!({"clientId":"x","code":1000}),
    )
    .await;
    assert_error(&r, 400, "invalid_request");
    let r = post(
        &server,
        "/api/disconnect",
        json!({"clientId":"x","reason":"r".repeat(124)}),
    )
    .await;
    assert_error(&r, 400, "invalid_request");
    server.shutdown().await;
}

#[tokio::test]
async fn without_a_key_the_api_does_not_exist() {
    let server = start().await;
    let resp = reqwest::Client::new()
        .post(server.http("/api/publish"))
        .bearer_auth(KEY)
        .json(&json!({"channel":"c","data":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let (status, _) = get(&server, "/api/presence/c").await;
    assert_eq!(status, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn the_key_is_required_and_checked() {
    let server = start_api().await;
    let http = reqwest::Client::new();
    let body = json!({"data":1});

    let resp = http
        .post(server.http("/api/broadcast"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key("www-authenticate"));
    assert_error(&parts(resp).await, 401, "unauthorized");

    let resp = http
        .post(server.http("/api/broadcast"))
        .bearer_auth("test-api-key-0123456788")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_error(&parts(resp).await, 403, "permission_denied");

    let resp = http
        .get(server.http("/api/presence/c"))
        .header("x-api-key", "nope")
        .send()
        .await
        .unwrap();
    assert_error(&parts(resp).await, 403, "permission_denied");

    // Another scheme is no key at all.
    let resp = http
        .post(server.http("/api/broadcast"))
        .header("authorization", format!("Basic {KEY}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_error(&parts(resp).await, 401, "unauthorized");

    let resp = http
        .post(server.http("/api/broadcast"))
        .header("x-api-key", KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(parts(resp).await, (200, json!({})));
    server.shutdown().await;
}

#[tokio::test]
async fn bad_bodies_are_json_errors() {
    let server = start_with(Settings {
        max_message_size: Some(1024),
        ..api_settings()
    })
    .await;
    for body in [
        "{not json",
        "[1,2]",
        "",
        r#"{"channel":"c"}"#,
        r#"{"data":1}"#,
        r#"{"channel":5,"data":1}"#,
        r#"{"channel":"c","data":1,"extra":true}"#,
    ] {
        let r = post_raw(&server, "/api/publish", body.to_string()).await;
        assert_error(&r, 400, "invalid_request");
    }
    let r = post_raw(
        &server,
        "/api/disconnect",
        r#"{"clientId":"x","code":70000}"#.to_string(),
    )
    .await;
    assert_error(&r, 400, "invalid_request");

    let big = json!({"channel":"c","data":"x".repeat(4096)}).to_string();
    let r = post_raw(&server, "/api/publish", big).await;
    assert_error(&r, 413, "payload_too_large");
    let fits = json!({"channel":"c","data":"x".repeat(900)}).to_string();
    let (status, _) = post_raw(&server, "/api/publish", fits).await;
    assert_eq!(status, 200);

    // Every one of those was counted.
    let (_, metrics) = get(&server, "/metrics").await;
    let metrics: Value = serde_json::from_str(&metrics).unwrap();
    assert_eq!(metrics["apiRequests"], 10);
    assert_eq!(metrics["apiErrors"], 9);
    server.shutdown().await;
}

#[test]
fn a_short_or_missing_key_file_is_a_config_error() {
    for content in ["", "   \n", "fifteen-bytes-k\n"] {
        let s = Settings {
            api_key_file: Some(key_file(content)),
            ..Default::default()
        };
        let err = Config::from_settings(s).unwrap_err().to_string();
        assert!(err.contains("api_key_file") && err.contains("16"), "{err}");
    }
    let s = Settings {
        api_key_file: Some("/nonexistent/switchboard-key".into()),
        ..Default::default()
    };
    let err = Config::from_settings(s).unwrap_err().to_string();
    assert!(err.contains("api_key_file"), "{err}");
    let s = Settings {
        api_key_file: Some(key_file("0123456789abcdef")),
        ..Default::default()
    };
    let c = Config::from_settings(s).unwrap();
    assert!(c.api_key.unwrap().matches(b"0123456789abcdef"));
}

#[tokio::test]
async fn direct_to_a_user_reaches_each_of_its_connections() {
    const SECRET: &str = "api-test-secret-0123456789";
    let mut s = api_settings();
    s.auth_hs256_secret_file = Some(key_file(SECRET));
    let server = start_with(s).await;
    switchboard::auth::init_crypto();
    let token = |sub: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": sub, "exp": switchboard::protocol::now_ms() / 1000 + 600}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let url = |sub: &str| format!("{}?token={}", server.url("/ws"), token(sub));
    let mut first = Client::connect_url(&url("u1")).await;
    let mut second = Client::connect_url(&url("u1")).await;
    let mut other = Client::connect_url(&url("u2")).await;
    let r = post(
        &server,
        "/api/direct",
        json!({"userId":"u1","data":"hello u1"}),
    )
    .await;
    assert_eq!(r.0, 200, "{:?}", r.1);
    for c in [&mut first, &mut second] {
        let m = c.recv().await;
        assert_eq!(m["type"], "direct");
        assert_eq!(m["data"], "hello u1");
        assert_eq!(m["senderId"], Value::Null);
    }
    other.expect_silence(Duration::from_millis(150)).await;
    // A user with no connection: accepted, delivered to nobody.
    let r = post(&server, "/api/direct", json!({"userId":"nobody","data":1})).await;
    assert_eq!(r.0, 200);
    server.shutdown().await;
}

/// `idempotencyKey` and `expectedOffset` on `/api/publish` (409
/// `offset_mismatch` with the current top), and `GET /api/history` with
/// `reverse` and a position.
#[tokio::test]
async fn publish_conditions_and_newest_first_history() {
    let server = start_api().await;
    let ch = "chat:api-cond";
    let first = post(
        &server,
        "/api/publish",
        json!({"channel": ch, "data": 1, "idempotencyKey": "job-1"}),
    )
    .await;
    assert_eq!(first.0, 200, "{}", first.1);
    let again = post(
        &server,
        "/api/publish",
        json!({"channel": ch, "data": 2, "idempotencyKey": "job-1"}),
    )
    .await;
    assert_eq!(again.1["offset"], first.1["offset"], "{}", again.1);
    assert_eq!(again.1["epoch"], first.1["epoch"], "{}", again.1);
    let ok = post(
        &server,
        "/api/publish",
        json!({"channel": ch, "data": 3, "expectedOffset": 1}),
    )
    .await;
    assert_eq!(ok.1["offset"], 2, "{}", ok.1);
    let stale = post(
        &server,
        "/api/publish",
        json!({"channel": ch, "data": 4, "expectedOffset": 1}),
    )
    .await;
    assert_error(&stale, 409, "offset_mismatch");
    assert_eq!(stale.1["offset"], 2, "{}", stale.1);
    assert_eq!(stale.1["epoch"], first.1["epoch"], "{}", stale.1);
    let bad = post(
        &server,
        "/api/publish",
        json!({"channel": ch, "data": 4, "idempotencyKey": ""}),
    )
    .await;
    assert_error(&bad, 400, "invalid_idempotency_key");

    let h = get_api(&server, &format!("/api/history/{ch}?reverse=true&limit=1")).await;
    assert_eq!(h.0, 200, "{}", h.1);
    assert_eq!(h.1["offset"], 2);
    let pubs = h.1["publications"].as_array().unwrap();
    assert_eq!(pubs.len(), 1, "{}", h.1);
    assert_eq!(pubs[0]["data"], 3);
    let epoch = h.1["epoch"].as_str().unwrap();
    let h = get_api(
        &server,
        &format!("/api/history/{ch}?epoch={epoch}&offset=1"),
    )
    .await;
    let pubs = h.1["publications"].as_array().unwrap();
    assert_eq!(pubs.len(), 1, "{}", h.1);
    assert_eq!(pubs[0]["offset"], 2);
    let bad = get_api(&server, &format!("/api/history/{ch}?offset=1")).await;
    assert_error(&bad, 400, "invalid_request");
    server.shutdown().await;
}
