//! Channel history stays bounded whatever anonymous clients publish
//! (issue 13): publications expire on time without another use of their
//! channel, the instance-wide byte and channel budgets hold (evicted
//! channels recover honestly: `recovered:false`), reading a channel that
//! does not exist creates nothing, a connection may create only
//! `channel_create_rate` channels per minute, and a flood of new channels
//! by several connections leaves a spawned server's RSS within its budget
//! while others are still served. The Pub/Sub bus's per-instance history
//! obeys the same bounds.

mod support;

#[cfg(feature = "pubsub")]
#[path = "support/pubsub_emulator.rs"]
mod pubsub_emulator;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, TestServer, settings, start_with};
use switchboard::config::Settings;
use tokio::time::Instant;

/// The `/metrics` JSON.
async fn metrics_at(base: &str) -> Value {
    try_metrics_at(base).await.expect("metrics answer")
}

/// The `/metrics` JSON, or `None` while nothing answers (a spawned
/// server that is still starting).
async fn try_metrics_at(base: &str) -> Option<Value> {
    let body = reqwest::get(format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    serde_json::from_str(&body).ok()
}

async fn metrics(server: &TestServer) -> Value {
    metrics_at(&server.http("")).await
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// Poll the metrics until `ok` holds or `within` passes; the last figures.
async fn metrics_until(base: &str, within: Duration, ok: impl Fn(&Value) -> bool) -> (bool, Value) {
    let deadline = Instant::now() + within;
    loop {
        let m = try_metrics_at(base).await;
        if let Some(m) = &m
            && ok(m)
        {
            return (true, m.clone());
        }
        if Instant::now() >= deadline {
            return (false, m.unwrap_or(Value::Null));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn publish(c: &mut Client, channel: &str, data: Value, id: u64) -> Value {
    c.request(
        json!({"type": "publish", "channel": channel, "data": data}),
        id,
    )
    .await
}

/// A test server without the per-connection limits in the way of the
/// figures under test.
fn unlimited() -> Settings {
    Settings {
        rate_limit: Some(0.0),
        channel_create_rate: Some(0),
        ..settings()
    }
}

#[tokio::test]
async fn expired_publications_are_freed_without_another_use() {
    const K: u64 = 40;
    let server = start_with(Settings {
        history_ttl: Some("2s".parse().unwrap()),
        ..unlimited()
    })
    .await;
    let mut c = Client::connect(&server).await;
    let blob = "x".repeat(1000);
    for i in 0..K {
        let ack = publish(&mut c, &format!("exp:{i}"), json!(blob), i).await;
        assert_eq!(ack["offset"], 1, "{ack}");
    }
    let m = metrics(&server).await;
    assert_eq!(n(&m, "historyChannels"), K, "{m}");
    assert!(n(&m, "historyBytes") >= K * 1000, "{m}");
    // Never touched again: freed within the TTL + 10 s anyway.
    let (freed, m) = metrics_until(&server.http(""), Duration::from_secs(12), |m| {
        n(m, "historyBytes") == 0 && n(m, "historyChannels") == 0
    })
    .await;
    assert!(freed, "expired history still held: {m}");
    // The empty streams remember their offsets (bounded by the budget).
    assert!(n(&m, "historyStreams") <= K, "{m}");
    let h = c
        .request(json!({"type": "history", "channel": "exp:3"}), 100)
        .await;
    assert_eq!(h["publications"], json!([]), "{h}");
    assert_eq!(h["offset"], 1, "{h}");
    server.shutdown().await;
}

#[tokio::test]
async fn reading_a_channel_that_does_not_exist_creates_nothing() {
    let server = start_with(unlimited()).await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    for i in 0..20 {
        let h = a
            .request(
                json!({"type": "history", "channel": format!("ghost:{i}")}),
                i,
            )
            .await;
        assert_eq!(h["offset"], 0, "{h}");
    }
    let m = metrics(&server).await;
    assert_eq!(n(&m, "historyStreams"), 0, "reads created streams: {m}");
    // A subscriber of an empty channel is told the epoch the first
    // publication will carry; recovering from it works as it always did.
    let s = a
        .request(json!({"type": "subscribe", "channel": "ghost:1"}), 50)
        .await;
    assert_eq!(s["offset"], 0, "{s}");
    let since = json!({"epoch": s["epoch"], "offset": 0});
    drop(a);
    for i in 0..3 {
        publish(&mut b, "ghost:1", json!(i), 60 + i).await;
    }
    let mut a = Client::connect(&server).await;
    a.send(json!({"type": "subscribe", "channel": "ghost:1", "since": since, "id": 70}))
        .await;
    for i in 0..3 {
        let m = a.recv_type("message").await;
        assert_eq!(m["data"], i, "{m}");
        assert_eq!(m["epoch"], since["epoch"], "{m}");
    }
    let r = a.recv_type("subscribed").await;
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(r["offset"], 3, "{r}");
    server.shutdown().await;
}

#[tokio::test]
async fn the_budget_holds_and_evicted_channels_recover_false() {
    const MAX_BYTES: u64 = 1 << 20;
    const MAX_CHANNELS: u64 = 50;
    let server = start_with(Settings {
        history_max_bytes: Some(MAX_BYTES),
        history_max_channels: Some(MAX_CHANNELS as usize),
        ..unlimited()
    })
    .await;
    let mut c = Client::connect(&server).await;
    let mut victim = Client::connect(&server).await;
    publish(&mut c, "bud:victim", json!("first"), 1).await;
    let s = victim
        .request(json!({"type": "subscribe", "channel": "bud:victim"}), 2)
        .await;
    let since = json!({"epoch": s["epoch"], "offset": s["offset"]});
    assert_eq!(since["offset"], 1, "{s}");
    drop(victim);
    // 2.4 MB into 300 channels: well past both budgets.
    let blob = "y".repeat(8000);
    for i in 0..300 {
        publish(&mut c, &format!("bud:{i}"), json!(blob), 10 + i).await;
    }
    let m = metrics(&server).await;
    assert!(n(&m, "historyBytes") <= MAX_BYTES, "{m}");
    assert!(n(&m, "historyStreams") <= MAX_CHANNELS, "{m}");
    assert!(n(&m, "historyChannels") <= MAX_CHANNELS, "{m}");
    assert!(n(&m, "historyEvictions") >= 300 - MAX_CHANNELS, "{m}");
    let prom = reqwest::get(server.http("/metrics/prometheus"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        prom.contains("switchboard_history_evictions_total ")
            && prom.contains("switchboard_history_bytes "),
        "{prom}"
    );
    // The victim's stream was evicted: its next publication starts a new
    // epoch, and a client recovering from the old one is told so.
    publish(&mut c, "bud:victim", json!("after"), 999).await;
    let mut back = Client::connect(&server).await;
    back.send(json!({"type": "subscribe", "channel": "bud:victim", "since": since, "id": 3}))
        .await;
    let r = back.recv_type("subscribed").await;
    assert_eq!(r["recovered"], false, "{r}");
    assert_ne!(r["epoch"], since["epoch"], "{r}");
    assert_eq!(r["offset"], 1, "{r}");
    server.shutdown().await;
}

#[tokio::test]
async fn creating_channels_past_the_limit_gets_channel_limit() {
    let server = start_with(Settings {
        channel_create_rate: Some(3),
        ..settings()
    })
    .await;
    let mut c = Client::connect(&server).await;
    for i in 0..3 {
        let ack = publish(&mut c, &format!("new:{i}"), json!(i), i).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    for i in 3..6 {
        let e = publish(&mut c, &format!("new:{i}"), json!(i), i).await;
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["code"], "channel_limit", "{e}");
    }
    // Still connected, and channels that exist take publications.
    let ack = publish(&mut c, "new:0", json!("again"), 10).await;
    assert_eq!(
        (ack["type"].as_str(), ack["offset"].as_u64()),
        (Some("ack"), Some(2))
    );
    let mut other = Client::connect(&server).await;
    let ack = publish(&mut other, "theirs", json!(1), 1).await;
    assert_eq!(ack["offset"], 1, "another connection has its own budget");
    let ack = publish(&mut c, "theirs", json!(2), 11).await;
    assert_eq!(ack["offset"], 2, "{ack}");
    let pong = c.request(json!({"type": "ping"}), 12).await;
    assert_eq!(pong["type"], "pong");
    // Nothing of the refused channels exists.
    let h = c
        .request(json!({"type": "history", "channel": "new:4"}), 13)
        .await;
    assert_eq!(h["offset"], 0, "{h}");
    let m = metrics(&server).await;
    assert_eq!(n(&m, "channelLimited"), 3, "{m}");
    server.shutdown().await;
}

/// Kills the child if the test fails before it exits.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// The budget of the flood test, and what RSS may grow beyond it: the
/// streams' fixed cost (under 400 B each at 2,000), the connections'
/// buffers, allocator pages not yet given back. Without the budget the
/// same flood grows RSS by hundreds of MiB.
const FLOOD_MAX_BYTES: u64 = 8 << 20;
const FLOOD_MAX_CHANNELS: u64 = 2000;
const FLOOD_ALLOWANCE: u64 = 48 << 20;
/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_new_channels_stays_within_the_budget() {
    let port = support::free_port();
    let log_path = std::env::temp_dir().join(format!("sb-flood-{}-{port}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let guard = Guard(
        Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--history-max-bytes", &FLOOD_MAX_BYTES.to_string()])
            .args(["--history-max-channels", &FLOOD_MAX_CHANNELS.to_string()])
            // Many connections could create this many channels anyway:
            // the budget is what is under test.
            .args(["--channel-create-rate", "0"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn()
            .expect("the binary starts"),
    );
    let pid = guard.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let ws = format!("ws://127.0.0.1:{port}/");
    let (up, _) = metrics_until(&base, Duration::from_secs(10), |_| true).await;
    assert!(up);
    let mut probe = Client::connect_url(&ws).await;
    let s = probe
        .request(json!({"type": "subscribe", "channel": "probe"}), 1)
        .await;
    assert_eq!(s["type"], "subscribed");
    let mut flooders = Vec::new();
    for _ in 0..4 {
        flooders.push(Client::connect_url(&ws).await);
    }
    let before = rss_bytes(pid);

    let blob = "z".repeat(60_000);
    let stop = Instant::now() + FLOOD;
    let mut tasks = Vec::new();
    for (k, mut c) in flooders.into_iter().enumerate() {
        let blob = blob.clone();
        tasks.push(tokio::spawn(async move {
            // At the default rate limit (100/s), each into a new channel.
            let mut tick = tokio::time::interval(Duration::from_millis(11));
            let mut i = 0u64;
            while Instant::now() < stop {
                tick.tick().await;
                let ack = publish(&mut c, &format!("flood{k}:{i}"), json!(blob), i).await;
                assert_eq!(ack["type"], "ack", "{ack}");
                i += 1;
            }
            i
        }));
    }
    // Meanwhile the probe's publish → receive round trip is served.
    let mut served = 0;
    while Instant::now() < stop {
        probe
            .send(json!({"type": "publish", "channel": "probe", "data": served}))
            .await;
        let m = probe.recv_type("message").await;
        assert_eq!(m["data"], served, "{m}");
        served += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut published = 0;
    for t in tasks {
        published += t.await.expect("flooder");
    }
    let after = rss_bytes(pid);
    let m = metrics_at(&base).await;
    let growth = after.saturating_sub(before);
    println!(
        "flood: {published} publications of 60 KB into new channels; RSS {} -> {} MiB (+{} KiB); {m}",
        before >> 20,
        after >> 20,
        growth >> 10
    );
    assert!(published > 1000, "the flood ran: {published}");
    assert!(served >= 10, "the probe was served: {served}");
    assert!(n(&m, "historyBytes") <= FLOOD_MAX_BYTES, "{m}");
    assert!(n(&m, "historyStreams") <= FLOOD_MAX_CHANNELS, "{m}");
    assert!(n(&m, "historyEvictions") > 0, "{m}");
    assert!(
        growth <= FLOOD_MAX_BYTES + FLOOD_ALLOWANCE,
        "RSS grew by {} KiB, over the budget + allowance",
        growth >> 10
    );
    // Thousands of evictions, a handful of log lines (one per 5 s at most).
    drop(guard);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    let lines = log
        .lines()
        .filter(|l| l.contains("channel history over its budget"))
        .count();
    assert!((1..=5).contains(&lines), "{lines} eviction lines:\n{log}");
}

#[cfg(feature = "pubsub")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_history_expires_and_keeps_its_budget() {
    let host = pubsub_emulator::Emulator::shared().await.host();
    let prefix = format!("sbt-hist-{}", switchboard::ids::random_base36(8));
    let server = start_with(Settings {
        bus: Some(format!("pubsub://test-project?emulator={host}")),
        pubsub_topic: Some(format!("{prefix}-topic")),
        pubsub_subscription: Some(format!("{prefix}-sub")),
        instance_id: Some(format!("{prefix}-i0")),
        history_ttl: Some("2s".parse().unwrap()),
        history_max_channels: Some(5),
        demo: Some(false),
        ..unlimited()
    })
    .await;
    let mut c = Client::connect(&server).await;
    for i in 0..12 {
        let ack = publish(&mut c, &format!("ps:{i}"), json!("data"), i).await;
        assert_eq!(ack["offset"], 1, "{ack}");
    }
    let m = metrics(&server).await;
    assert!(n(&m, "historyStreams") <= 5, "{m}");
    assert!(n(&m, "historyEvictions") >= 7, "{m}");
    assert!(n(&m, "historyBytes") > 0, "{m}");
    let h = c
        .request(json!({"type": "history", "channel": "ps:0"}), 100)
        .await;
    assert_eq!(h["offset"], 0, "evicted: {h}");
    let (freed, m) = metrics_until(&server.http(""), Duration::from_secs(12), |m| {
        n(m, "historyBytes") == 0 && n(m, "historyChannels") == 0
    })
    .await;
    assert!(freed, "expired history still held: {m}");
    server.shutdown().await;
}
