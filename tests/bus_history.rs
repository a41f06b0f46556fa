//! What the shared buses keep (issue 13), against the Redis on
//! 127.0.0.1:6379 and the NATS (JetStream) on 127.0.0.1:4222, each case
//! under its own prefix: history and position reads of channels that do
//! not exist write nothing, user-addressed `direct` messages keep nothing,
//! history keeps no more than its size and no longer than its TTL, and the
//! JetStream stream carries the configured limits.
#![cfg(all(feature = "redis", feature = "nats"))]

mod support;
#[macro_use]
#[path = "support/bus_suite.rs"]
mod bus_suite;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bus_suite::{Instance, base_settings, unique_prefix};
use serde_json::{Value, json};
use support::Client;
use switchboard::broker::nats::token;
use switchboard::config::{NamespaceSettings, Settings};

const REDIS: &str = "redis://127.0.0.1:6379";
const NATS: &str = "nats://127.0.0.1:4222";
const SECRET: &str = "history-secret-0123456789abcdef";

/// Longest a "gone eventually" poll waits.
const DEADLINE: Duration = Duration::from_secs(20);

fn secret_file() -> PathBuf {
    let path = std::env::temp_dir().join(format!("sb-history-secret-{}", std::process::id()));
    std::fs::write(&path, SECRET).unwrap();
    path
}

fn namespace(size: usize, ttl: &str) -> NamespaceSettings {
    NamespaceSettings {
        history_size: Some(size),
        history_ttl: Some(ttl.parse().unwrap()),
        presence: Some(false),
        join_leave: Some(false),
        ..Default::default()
    }
}

/// One instance on `bus` under `prefix`, with auth (for user channels) and
/// the namespaces `ghost` (no presence), `sized` (3, 5 min), `short` (3, 1 s).
async fn instance(bus: &str, prefix: &str, tweak: impl FnOnce(&mut Settings)) -> Instance {
    let mut s = Settings {
        bus: Some(bus.into()),
        bus_prefix: Some(prefix.into()),
        presence_ttl: Some("2s".parse().unwrap()),
        auth_hs256_secret_file: Some(secret_file()),
        namespaces: HashMap::from([
            ("ghost".to_string(), namespace(10, "5m")),
            ("sized".to_string(), namespace(3, "5m")),
            ("short".to_string(), namespace(3, "1s")),
        ]),
        ..base_settings(prefix, 0)
    };
    tweak(&mut s);
    Instance::start(s).await
}

fn token_for(sub: &str) -> String {
    token_with(json!({"sub": sub}))
}

/// A token for `claims` (plus an expiry), signed with the test secret.
fn token_with(mut claims: Value) -> String {
    switchboard::auth::init_crypto();
    claims["exp"] = json!(switchboard::protocol::now_ms() / 1000 + 600);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Every kind of read of channels nobody published to: a subscribe
/// (position), a history request, a subscribe with a stale `since`, a
/// history request with one. Returns the `(epoch, offset)` the first
/// subscribe reported for `ghost:a`.
async fn read_unknown_channels(c: &mut Client) -> (String, u64) {
    let r = c
        .request(json!({"type": "subscribe", "channel": "ghost:a"}), 1)
        .await;
    assert_eq!(r["type"], "subscribed", "{r}");
    let top = (
        r["epoch"].as_str().unwrap().to_string(),
        r["offset"].as_u64().unwrap(),
    );
    assert_eq!(top.1, 0, "{r}");
    let r = c
        .request(json!({"type": "history", "channel": "ghost:b"}), 2)
        .await;
    assert_eq!(r["type"], "history", "{r}");
    assert_eq!(r["publications"], json!([]), "{r}");
    let since = json!({"epoch": "stale", "offset": 3});
    let r = c
        .request(
            json!({"type": "subscribe", "channel": "ghost:c", "since": since}),
            3,
        )
        .await;
    assert_eq!(r["type"], "subscribed", "{r}");
    assert_eq!(r["recovered"], false, "{r}");
    let r = c
        .request(
            json!({"type": "history", "channel": "ghost:d", "since": since}),
            4,
        )
        .await;
    assert_eq!(r["type"], "history", "{r}");
    top
}

/// Connect `alice` and a sender whose token grants `direct` to her (with
/// auth on, a direct to a user needs that grant), and deliver one
/// user-addressed direct message to her (bounded).
async fn direct_to_alice(inst: &Instance) {
    let mut alice =
        Client::connect_url(&format!("{}?token={}", inst.url("/ws"), token_for("alice"))).await;
    let sender = token_with(json!({"sub": "bob", "direct": ["alice"]}));
    let mut bob = Client::connect_url(&format!("{}?token={sender}", inst.url("/ws"))).await;
    direct_to_user(&mut bob, &mut alice, "alice").await;
}

/// Send a user-addressed `direct` from `from` until `to` (connected as
/// that user) gets it (bounded).
async fn direct_to_user(from: &mut Client, to: &mut Client, user: &str) {
    for attempt in 0..50u64 {
        let ack = from
            .request(
                json!({"type": "direct", "userId": user, "data": {"n": attempt}}),
                100 + attempt,
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        if let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) =
            tokio::time::timeout(
                Duration::from_millis(200),
                futures_util::StreamExt::next(&mut to.ws),
            )
            .await
        {
            let m: Value = serde_json::from_str(&t).unwrap();
            assert_eq!(m["type"], "direct", "{m}");
            return;
        }
    }
    panic!("the user never got the direct message");
}

async fn publish(c: &mut Client, channel: &str, n: u64) -> Value {
    let ack = c
        .request(
            json!({"type": "publish", "channel": channel, "data": {"n": n}}),
            1000 + n,
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    ack
}

async fn history_offsets(c: &mut Client, channel: &str) -> Vec<u64> {
    let r = c
        .request(json!({"type": "history", "channel": channel}), 7)
        .await;
    assert_eq!(r["type"], "history", "{r}");
    r["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect()
}

// ---------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis on 127.0.0.1:6379")
}

async fn keys(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .unwrap();
    keys.sort();
    keys
}

/// Reads of unknown channels leave no key; the epoch they report is the
/// one the channel's first publication takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reads_of_unknown_channels_write_nothing() {
    let prefix = unique_prefix("rreads");
    let inst = instance(REDIS, &prefix, |_| {}).await;
    let mut conn = redis().await;
    let mut c = inst.client().await;
    let (epoch, _) = read_unknown_channels(&mut c).await;
    assert_eq!(
        keys(&mut conn, &format!("{prefix}:ch:*")).await,
        Vec::<String>::new()
    );
    let mut p = inst.client().await;
    let ack = publish(&mut p, "ghost:a", 1).await;
    assert_eq!(ack["offset"], 1);
    let m = c.recv_type("message").await;
    assert_eq!(
        m["epoch"],
        epoch.as_str(),
        "the reported epoch is kept: {m}"
    );
    assert_eq!(
        keys(&mut conn, &format!("{prefix}:ch:*")).await,
        vec![
            format!("{prefix}:ch:{{ghost:a}}:meta"),
            format!("{prefix}:ch:{{ghost:a}}:stream")
        ],
        "a publish is what creates keys"
    );
    inst.shutdown().await;
}

/// A user-addressed direct message is delivered and leaves nothing in
/// Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_user_direct_keeps_nothing() {
    let prefix = unique_prefix("ruser");
    let inst = instance(REDIS, &prefix, |_| {}).await;
    let mut conn = redis().await;
    direct_to_alice(&inst).await;
    assert_eq!(
        keys(&mut conn, &format!("{prefix}:ch:*")).await,
        Vec::<String>::new()
    );
    assert_eq!(
        keys(&mut conn, &format!("{prefix}*#user*")).await,
        Vec::<String>::new()
    );
    inst.shutdown().await;
}

/// Publishing past `history_size` keeps `history_size` entries; every
/// history key has a TTL no longer than the namespace's, and with a short
/// TTL the keys are gone after it (and a read does not bring them back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_history_keeps_its_size_and_expires_after_its_ttl() {
    let prefix = unique_prefix("rsize");
    let inst = instance(REDIS, &prefix, |_| {}).await;
    let mut conn = redis().await;
    let mut p = inst.client().await;
    for n in 1..=5 {
        publish(&mut p, "sized:r", n).await;
    }
    let stream = format!("{prefix}:ch:{{sized:r}}:stream");
    let meta = format!("{prefix}:ch:{{sized:r}}:meta");
    let len: u64 = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 3, "the stream keeps history_size entries");
    assert_eq!(history_offsets(&mut p, "sized:r").await, vec![3, 4, 5]);
    for key in [&stream, &meta] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            ttl > 0 && ttl <= 300_000,
            "{key} expires within history_ttl: {ttl}"
        );
    }

    for n in 1..=2 {
        publish(&mut p, "short:r", n).await;
    }
    let short = [
        format!("{prefix}:ch:{{short:r}}:meta"),
        format!("{prefix}:ch:{{short:r}}:stream"),
    ];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let n: u64 = redis::cmd("EXISTS")
            .arg(&short)
            .query_async(&mut conn)
            .await
            .unwrap();
        if n == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "keys still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(history_offsets(&mut p, "short:r").await, Vec::<u64>::new());
    let n: u64 = redis::cmd("EXISTS")
        .arg(&short)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 0, "a read of the expired channel writes nothing");
    inst.shutdown().await;
}

// ---------------------------------------------------------------------
// NATS
// ---------------------------------------------------------------------

async fn js() -> jetstream::Context {
    jetstream::new(
        async_nats::connect(NATS)
            .await
            .expect("NATS on 127.0.0.1:4222"),
    )
}

async fn channel_stream(js: &jetstream::Context, prefix: &str) -> stream::Stream {
    js.get_stream(format!("{prefix}-channels")).await.unwrap()
}

async fn stored_messages(js: &jetstream::Context, prefix: &str) -> u64 {
    let mut stream = channel_stream(js, prefix).await;
    stream.info().await.unwrap().state.messages
}

/// Nothing of `channel` is in the stream.
async fn assert_subject_empty(js: &jetstream::Context, prefix: &str, channel: &str) {
    let subject = format!("{prefix}.ch.{}", token(channel));
    let r = channel_stream(js, prefix)
        .await
        .direct_get_last_for_subject(&subject)
        .await;
    assert!(
        r.as_ref()
            .is_err_and(|e| e.kind() == stream::DirectGetErrorKind::NotFound),
        "{subject}: {:?}",
        r.map(|m| m.payload)
    );
}

async fn delete_streams(js: &jetstream::Context, prefix: &str) {
    for name in ["channels", "gen", "presence"] {
        let name = match name {
            "presence" => format!("KV_{prefix}-presence"),
            n => format!("{prefix}-{n}"),
        };
        let _ = js.delete_stream(name).await;
    }
}

/// Reads of unknown channels store no message; the epoch they report is
/// the one the channel's first publication takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_reads_of_unknown_channels_write_nothing() {
    let prefix = unique_prefix("nreads");
    let inst = instance(NATS, &prefix, |_| {}).await;
    let js = js().await;
    let mut c = inst.client().await;
    let (epoch, _) = read_unknown_channels(&mut c).await;
    for ch in ["ghost:a", "ghost:b", "ghost:c", "ghost:d"] {
        assert_subject_empty(&js, &prefix, ch).await;
    }
    assert_eq!(stored_messages(&js, &prefix).await, 0);
    let mut p = inst.client().await;
    let ack = publish(&mut p, "ghost:a", 1).await;
    assert_eq!(ack["offset"], 1);
    let m = c.recv_type("message").await;
    assert_eq!(
        m["epoch"],
        epoch.as_str(),
        "the reported epoch is kept: {m}"
    );
    assert_eq!(stored_messages(&js, &prefix).await, 1);
    inst.shutdown().await;
    delete_streams(&js, &prefix).await;
}

/// A user-addressed direct message is delivered and leaves nothing in
/// JetStream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_user_direct_keeps_nothing() {
    let prefix = unique_prefix("nuser");
    let inst = instance(NATS, &prefix, |_| {}).await;
    let js = js().await;
    direct_to_alice(&inst).await;
    assert_subject_empty(&js, &prefix, "#user:alice").await;
    assert_eq!(stored_messages(&js, &prefix).await, 0);
    inst.shutdown().await;
    delete_streams(&js, &prefix).await;
}

/// The stream carries the configured limits, also when an older version
/// made it with an hour of retention and no byte cap; publishing past
/// `history_size` keeps `history_size`; a namespace TTL shorter than the
/// stream's is enforced on read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stream_carries_the_limits() {
    let prefix = unique_prefix("nlimits");
    let js = js().await;
    // As an earlier version left it.
    js.create_stream(stream::Config {
        name: format!("{prefix}-channels"),
        subjects: vec![format!("{prefix}.ch.*")],
        max_messages_per_subject: 101,
        max_age: Duration::from_secs(3600),
        allow_direct: true,
        republish: Some(stream::Republish {
            source: format!("{prefix}.ch.*"),
            destination: format!("{prefix}.chl.{{{{wildcard(1)}}}}.p"),
            headers_only: false,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let inst = instance(NATS, &prefix, |s| {
        s.history_size = Some(3);
        s.history_ttl = Some("2m".parse().unwrap());
        s.history_max_bytes = Some(1 << 20);
        s.namespaces.remove("ghost");
        // The built-in `sys` namespace keeps 60: bring it down too.
        s.namespaces.insert("sys".into(), namespace(3, "1m"));
    })
    .await;
    let mut stream = channel_stream(&js, &prefix).await;
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.max_messages_per_subject, 3, "largest history_size");
    assert_eq!(
        config.max_age,
        Duration::from_secs(300),
        "longest history_ttl"
    );
    assert_eq!(config.max_bytes, 1 << 20, "history_max_bytes");
    assert_eq!(config.discard, stream::DiscardPolicy::Old);

    let mut p = inst.client().await;
    for n in 1..=5 {
        publish(&mut p, "sized:r", n).await;
    }
    assert_eq!(stored_messages(&js, &prefix).await, 3, "history_size kept");
    assert_eq!(history_offsets(&mut p, "sized:r").await, vec![3, 4, 5]);

    for n in 1..=2 {
        publish(&mut p, "short:r", n).await;
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !history_offsets(&mut p, "short:r").await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "short TTL not enforced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    inst.shutdown().await;
    delete_streams(&js, &prefix).await;
}
