//! Lifecycle events (issue 17) over real sockets, delivered to a real HTTP
//! backend started by the test (`support::event_sink`): every event type
//! with its fields and order, signatures, the grace period, a backend that
//! is down and comes back, dead letters and their replay, the presence
//! read; on Redis two instances (no duplicates) and an instance killed
//! with SIGKILL while holding the delivery lease (its clients' events
//! arrive once, and the survivor takes the delivery over).

mod support;
#[macro_use]
#[path = "support/bus_suite.rs"]
mod bus_suite;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bus_suite::{Instance, base_settings, unique_prefix};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use support::Client;
use support::event_sink::EventSink;
use switchboard::config::{Config, Settings};

const SECRET: &str = "events-secret-0123456789";
const JWT: &str = "events-jwt-secret-0123456789abcdef";
const API_KEY: &str = "events-api-key-0123456789";
/// Longest a test waits for events that must come.
const DEADLINE: Duration = Duration::from_secs(20);

fn file(name: &str, content: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("sb-events-{name}-{}", std::process::id()));
    std::fs::write(&path, content).unwrap();
    path
}

fn token(user: &str) -> String {
    let exp = switchboard::protocol::now_ms() / 1000 + 3600;
    encode(
        &Header::default(),
        &json!({"sub": user, "exp": exp}),
        &EncodingKey::from_secret(JWT.as_bytes()),
    )
    .unwrap()
}

/// Settings for one instance delivering to `sink`: auth (for user ids),
/// the API key, a short grace and heartbeat.
fn settings(prefix: &str, i: usize, bus: Option<&str>, sink: &EventSink, grace: &str) -> Settings {
    let mut s = base_settings(prefix, i);
    s.bus = bus.map(str::to_string);
    s.bus_prefix = Some(prefix.to_string());
    s.presence_ttl = Some("1s".parse().unwrap());
    s.auth_hs256_secret_file = Some(file("jwt", JWT));
    s.api_key_file = Some(file("api", API_KEY));
    s.events_url = Some(sink.url.clone());
    s.events_secret_file = Some(file("secret", SECRET));
    s.events_grace = Some(grace.parse().unwrap());
    s
}

async fn user_client(i: &Instance, user: &str) -> Client {
    Client::connect_url(&format!("{}?token={}", i.url("/ws"), token(user))).await
}

async fn subscribe(c: &mut Client, channel: &str, id: u64) {
    let r = c
        .request(json!({"type": "subscribe", "channel": channel}), id)
        .await;
    assert_eq!(r["type"], "subscribed", "{r}");
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

/// Every subject's seqs are 1, 2, 3… in arrival order, and no event id
/// comes twice.
fn assert_ordered_once(events: &[Value]) {
    let mut last: HashMap<&str, u64> = HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for e in events {
        assert!(ids.insert(e["id"].as_str().unwrap()), "duplicate {e}");
        let subject = e["subject"].as_str().unwrap();
        let seq = e["seq"].as_u64().unwrap();
        let prev = last.insert(subject, seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "{subject}: seq {seq} after {prev}");
    }
}

#[tokio::test]
async fn every_event_type_with_fields_in_order_and_signed() {
    let sink = EventSink::start(SECRET).await;
    let i = Instance::start(settings(&unique_prefix("types"), 0, None, &sink, "300ms")).await;
    let mut c = user_client(&i, "ann").await;
    subscribe(&mut c, "chat:a", 1).await;
    let r = c
        .request(json!({"type": "unsubscribe", "channel": "chat:a"}), 2)
        .await;
    assert_eq!(r["type"], "unsubscribed", "{r}");
    subscribe(&mut c, "chat:b", 3).await;
    let id = c.id.clone();
    drop(c);
    let events = sink
        .until(DEADLINE, |e| {
            types(e).contains(&"user_offline") && e.len() >= 12
        })
        .await;
    let client = sink.of(&format!("client:{id}"));
    assert_eq!(
        types(&client),
        [
            "connect",
            "subscribe",
            "unsubscribe",
            "subscribe",
            "unsubscribe",
            "disconnect"
        ]
    );
    for e in &client {
        assert_eq!(e["clientId"], id.as_str());
        assert_eq!(e["userId"], "ann");
        assert_eq!(e["instanceId"], i.node.instance_id());
        assert!(e["time"].as_u64().unwrap() > 1_600_000_000_000, "{e}");
        assert!(!e["id"].as_str().unwrap().is_empty());
    }
    assert_eq!(client[1]["channel"], "chat:a");
    assert_eq!(client[4]["channel"], "chat:b");
    assert_eq!(client[5]["code"], 1000, "{}", client[5]);
    assert!(client[5]["reason"].is_string());
    assert_eq!(types(&sink.of("user:ann")), ["user_online", "user_offline"]);
    assert_eq!(sink.of("user:ann")[0]["clientId"], id.as_str());
    assert_eq!(
        types(&sink.of("channel:chat:a")),
        ["channel_occupied", "channel_vacated"]
    );
    assert_eq!(sink.of("channel:chat:a")[1]["channel"], "chat:a");
    assert_eq!(
        types(&sink.of("channel:chat:b")),
        ["channel_occupied", "channel_vacated"]
    );
    assert_eq!(events.len(), 12, "{events:#?}");
    assert_ordered_once(&events);
    assert_eq!(sink.bad_signatures(), 0);
    // user_online comes after its connect, vacated after the unsubscribe.
    let pos = |t: &str, s: &str| {
        events
            .iter()
            .position(|e| e["type"] == t && e["subject"] == s)
    };
    assert!(pos("user_online", "user:ann") > pos("connect", &format!("client:{id}")));
    let m: Value = reqwest::get(i.http("/metrics"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["eventsEmitted"], 12, "{m}");
    assert_eq!(m["eventsDelivered"], 12, "{m}");
    i.shutdown().await;
}

#[tokio::test]
async fn a_reload_within_the_grace_emits_nothing() {
    let sink = EventSink::start(SECRET).await;
    let i = Instance::start(settings(&unique_prefix("grace"), 0, None, &sink, "2s")).await;
    let mut c = user_client(&i, "bob").await;
    subscribe(&mut c, "room:1", 1).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = user_client(&i, "bob").await;
    subscribe(&mut c, "room:1", 1).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let events = sink.until(DEADLINE, |e| e.len() >= 8).await;
    assert_eq!(events.len(), 8, "{events:#?}");
    assert_eq!(types(&sink.of("user:bob")), ["user_online"], "{events:#?}");
    assert_eq!(types(&sink.of("channel:room:1")), ["channel_occupied"]);
    // The second connection has its own connect and subscribe.
    assert_eq!(
        types(&sink.of(&format!("client:{}", c.id))),
        ["connect", "subscribe"]
    );
    let p = support::get_json(i.http("/api/users/bob/presence"), API_KEY).await;
    assert_eq!(
        p,
        json!({"userId": "bob", "online": true, "connections": 1, "seq": 1})
    );
    drop(c);
    sink.until(DEADLINE, |e| types(e).contains(&"user_offline"))
        .await;
    let p = support::get_json(i.http("/api/users/bob/presence"), API_KEY).await;
    assert_eq!(
        p,
        json!({"userId": "bob", "online": false, "connections": 0, "seq": 2})
    );
    i.shutdown().await;
}

#[tokio::test]
async fn dead_letters_are_kept_and_replayed() {
    let sink = EventSink::start(SECRET).await;
    sink.set_down(true);
    let mut s = settings(&unique_prefix("dead"), 0, None, &sink, "100ms");
    s.events_max_age = Some("1s".parse().unwrap());
    let i = Instance::start(s).await;
    let c = user_client(&i, "cy").await;
    drop(c);
    let http = reqwest::Client::new();
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let m: Value = http
            .get(i.http("/metrics"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if m["eventsDeadLettered"].as_u64().unwrap() >= 4 {
            assert!(m["eventsRetried"].as_u64().unwrap() > 0, "{m}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "nothing dead-lettered: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sink.set_down(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        sink.events().is_empty(),
        "dead letters are not delivered by themselves"
    );
    let r: Value = http
        .post(i.http("/api/events/replay"))
        .bearer_auth(API_KEY)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r, json!({"replayed": 4, "deadLettered": 0}));
    let events = sink.until(DEADLINE, |e| e.len() >= 4).await;
    assert_eq!(
        types(&events),
        ["connect", "user_online", "disconnect", "user_offline"]
    );
    i.shutdown().await;
}

#[tokio::test]
async fn a_backend_that_is_not_listening_gets_everything_once_it_is() {
    let port = support::free_port();
    let unused = EventSink::start(SECRET).await;
    let mut s = settings(&unique_prefix("absent"), 0, None, &unused, "100ms");
    s.events_url = Some(EventSink::url_on(port));
    let i = Instance::start(s).await;
    let mut c = user_client(&i, "fay").await;
    subscribe(&mut c, "chat:f", 1).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sink = EventSink::start_on(SECRET, port).await;
    let events = sink.until(DEADLINE, |e| e.len() >= 8).await;
    assert_eq!(
        types(&events),
        [
            "connect",
            "user_online",
            "subscribe",
            "channel_occupied",
            "unsubscribe",
            "disconnect",
            "channel_vacated",
            "user_offline"
        ]
    );
    assert_ordered_once(&events);
    i.shutdown().await;
}

#[test]
fn events_need_a_secret_and_a_durable_bus() {
    let base = || Settings {
        events_url: Some("http://127.0.0.1:9/events".into()),
        ..Default::default()
    };
    let err = Config::from_settings(base()).unwrap_err().to_string();
    assert!(err.contains("events_secret_file"), "{err}");
    let mut s = base();
    s.events_secret_file = Some(file("cfg", SECRET));
    s.bus = Some("nats://127.0.0.1:4222".into());
    let err = Config::from_settings(s).unwrap_err().to_string();
    assert!(err.contains("events_url") && err.contains("NATS"), "{err}");
    let mut s = base();
    s.events_secret_file = Some(file("cfg", SECRET));
    s.bus = Some("redis+cluster://127.0.0.1:7000,127.0.0.1:7001".into());
    let err = Config::from_settings(s).unwrap_err().to_string();
    assert!(
        err.contains("events_url") && err.contains("Cluster"),
        "{err}"
    );
    let mut s = base();
    s.events_url = Some("ftp://x".into());
    assert!(Config::from_settings(s).is_err());
    let mut s = base();
    s.events_secret_file = Some(file("cfg", SECRET));
    let c = Config::from_settings(s).unwrap().events.unwrap();
    assert_eq!(c.grace, Duration::from_secs(3));
    assert_eq!(c.max_age, Duration::from_secs(24 * 3600));
}

/// The same on the Redis bus shared by the cluster (127.0.0.1:6379).
#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use std::process::{Child, Command, Stdio};

    const REDIS: &str = "redis://127.0.0.1:6379";

    #[tokio::test]
    async fn redis_backend_down_then_up_loses_nothing_in_order() {
        let sink = EventSink::start(SECRET).await;
        let prefix = unique_prefix("down");
        let i = Instance::start(settings(&prefix, 0, Some(REDIS), &sink, "200ms")).await;
        sink.set_down(true);
        let mut clients = Vec::new();
        for n in 0..6 {
            let mut c = user_client(&i, &format!("u{}", n % 3)).await;
            subscribe(&mut c, &format!("chat:{}", n % 2), 1).await;
            clients.push(c);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(sink.events().is_empty());
        clients.truncate(2);
        sink.set_down(false);
        // 6 × (connect, subscribe) + 3 user_online + 2 channel_occupied, then
        // 4 × (unsubscribe, disconnect) + user_offline for u2: 26.
        let events = sink.until(DEADLINE, |e| e.len() >= 26).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let events_after = sink.events();
        assert_eq!(
            events.len(),
            events_after.len(),
            "nothing more: {events_after:#?}"
        );
        assert_ordered_once(&events_after);
        assert_eq!(types(&sink.of("user:u2")), ["user_online", "user_offline"]);
        assert_eq!(types(&sink.of("user:u0")), ["user_online"]);
        assert_eq!(sink.bad_signatures(), 0);
        // Delivered events leave the log (the cursor's own entry stays).
        let client = ::redis::Client::open(REDIS).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let len: u64 = ::redis::cmd("XLEN")
            .arg(format!("{prefix}:ev:log"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(len <= 1, "{len} entries left in the log");
        i.shutdown().await;
    }

    #[tokio::test]
    async fn redis_two_instances_send_each_event_once() {
        let sink = EventSink::start(SECRET).await;
        let prefix = unique_prefix("two");
        let a = Instance::start(settings(&prefix, 0, Some(REDIS), &sink, "300ms")).await;
        let b = Instance::start(settings(&prefix, 1, Some(REDIS), &sink, "300ms")).await;
        let mut ca = user_client(&a, "dee").await;
        let mut cb = user_client(&b, "dee").await;
        subscribe(&mut ca, "chat:two", 1).await;
        subscribe(&mut cb, "chat:two", 1).await;
        drop(ca);
        tokio::time::sleep(Duration::from_millis(800)).await;
        // Still online and occupied through b.
        assert_eq!(types(&sink.of("user:dee")), ["user_online"]);
        drop(cb);
        let events = sink
            .until(DEADLINE, |e| {
                types(e).contains(&"user_offline") && types(e).contains(&"channel_vacated")
            })
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let events = sink.events().len().max(events.len());
        assert_eq!(events, 12, "{:#?}", sink.events());
        assert_ordered_once(&sink.events());
        assert_eq!(types(&sink.of("user:dee")), ["user_online", "user_offline"]);
        assert_eq!(
            types(&sink.of("channel:chat:two")),
            ["channel_occupied", "channel_vacated"]
        );
        a.shutdown().await;
        b.shutdown().await;
    }

    /// Wait until the lease `key` names `holder`.
    async fn until_held(key: &str, holder: &str) {
        let client = ::redis::Client::open(REDIS).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            let now: Option<String> = ::redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            if now.as_deref() == Some(holder) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "lease held by {now:?}, not {holder}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the delivery cursor stands at the newest logged event:
    /// everything logged so far was delivered and acknowledged.
    async fn until_acked(prefix: &str) {
        let client = ::redis::Client::open(REDIS).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            let cursor: Option<String> = ::redis::cmd("GET")
                .arg(format!("{prefix}:ev:cursor"))
                .query_async(&mut conn)
                .await
                .unwrap();
            let newest: Vec<(String, HashMap<String, String>)> = ::redis::cmd("XREVRANGE")
                .arg(format!("{prefix}:ev:log"))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
                .unwrap();
            if cursor.is_some() && newest.first().map(|(id, _)| id) == cursor.as_ref() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "cursor {cursor:?}, newest {:?}",
                newest.first().map(|(id, _)| id)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the child if the test fails before it is killed.
    struct Guard(Child);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Starts a server process (`<prefix>-victim`) on the Redis bus and
    /// waits until it holds the delivery lease, which a survivor must take
    /// over when the victim dies. Returns the process and its port.
    async fn start_victim(prefix: &str, sink: &EventSink) -> (Guard, u16) {
        let port = support::free_port();
        let child = Guard(
            Command::new(env!("CARGO_BIN_EXE_switchboard"))
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--instance-id",
                    &format!("{prefix}-victim"),
                    "--demo",
                    "false",
                ])
                .args([
                    "--bus",
                    REDIS,
                    "--bus-prefix",
                    prefix,
                    "--presence-ttl",
                    "1s",
                ])
                .args(["--events-url", &sink.url, "--events-grace", "200ms"])
                .arg("--events-secret-file")
                .arg(file("secret", SECRET))
                .arg("--auth-hs256-secret-file")
                .arg(file("jwt", JWT))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("the binary starts"),
        );
        let ready = format!("http://127.0.0.1:{port}/readyz");
        for _ in 0..400 {
            if reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        until_held(&format!("{prefix}:ev:lease"), &format!("{prefix}-victim")).await;
        (child, port)
    }

    #[tokio::test]
    async fn redis_kill_9_the_clients_of_a_dead_instance_leave_once() {
        let sink = EventSink::start(SECRET).await;
        let prefix = unique_prefix("kill");
        let (mut child, port) = start_victim(&prefix, &sink).await;
        let lease = format!("{prefix}:ev:lease");
        let a = Instance::start(settings(&prefix, 0, Some(REDIS), &sink, "200ms")).await;
        let url = format!("ws://127.0.0.1:{port}/ws?token={}", token("eve"));
        let mut c = Client::connect_url(&url).await;
        subscribe(&mut c, "chat:k", 1).await;
        sink.until(DEADLINE, |e| types(e).contains(&"channel_occupied"))
            .await;
        // Delivery is at least once: killed between the backend's 2xx and
        // its acknowledgement, the victim would leave the batch to be sent
        // again by the survivor (docs/backend.md). This test is about the
        // reaper's events, so the kill waits for the acknowledgement.
        until_acked(&prefix).await;
        child.0.kill().unwrap(); // SIGKILL
        let _ = child.0.wait();
        let id = c.id.clone();
        drop(c);
        sink.until(DEADLINE, |e| {
            types(e).contains(&"user_offline") && types(e).contains(&"channel_vacated")
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let events = sink.events();
        assert_ordered_once(&events);
        let client = sink.of(&format!("client:{id}"));
        assert_eq!(
            types(&client),
            ["connect", "subscribe", "unsubscribe", "disconnect"]
        );
        assert_eq!(client[3]["code"], 1006);
        assert_eq!(client[3]["reason"], "instance lost");
        assert_eq!(client[3]["instanceId"], a.node.instance_id());
        assert_eq!(types(&sink.of("user:eve")), ["user_online", "user_offline"]);
        assert_eq!(events.len(), 8, "{events:#?}");
        until_held(&lease, a.node.instance_id()).await;
        a.shutdown().await;
    }

    /// The holder of the delivery lease dies while the backend has a batch
    /// and has not answered: the survivor sends the same events again, with
    /// the same ids and bodies, so a backend that de-duplicates by `id`
    /// sees each once (docs/backend.md, "at least once").
    #[tokio::test]
    async fn redis_kill_9_mid_delivery_the_survivor_sends_the_same_events() {
        let sink = EventSink::start(SECRET).await;
        let prefix = unique_prefix("mid");
        let (mut child, port) = start_victim(&prefix, &sink).await;
        let a = Instance::start(settings(&prefix, 0, Some(REDIS), &sink, "200ms")).await;
        sink.set_hold(true);
        let url = format!("ws://127.0.0.1:{port}/ws?token={}", token("mo"));
        let mut c = Client::connect_url(&url).await;
        subscribe(&mut c, "chat:m", 1).await;
        let end = tokio::time::Instant::now() + DEADLINE;
        while sink.held().is_empty() {
            assert!(tokio::time::Instant::now() < end, "no delivery to hold");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.0.kill().unwrap(); // SIGKILL, the batch unanswered
        let _ = child.0.wait();
        sink.set_hold(false);
        let id = c.id.clone();
        drop(c);
        sink.until(DEADLINE, |e| {
            types(e).contains(&"user_offline") && types(e).contains(&"channel_vacated")
        })
        .await;
        let events = sink.events();
        assert_ordered_once(&events);
        let held = sink.held();
        assert_eq!(types(&held)[0], "connect", "{held:#?}");
        for h in &held {
            assert!(
                events.contains(h),
                "held {h} was not sent again as it was; got {events:#?}"
            );
        }
        let client = sink.of(&format!("client:{id}"));
        assert_eq!(
            types(&client),
            ["connect", "subscribe", "unsubscribe", "disconnect"]
        );
        assert_eq!(client[3]["reason"], "instance lost");
        assert_eq!(types(&sink.of("user:mo")), ["user_online", "user_offline"]);
        a.shutdown().await;
    }
}
