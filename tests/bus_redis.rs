//! The Redis bus: the shared cross-instance suite against the Redis on
//! 127.0.0.1:6379, plus Redis-specific outage tests against a private
//! `redis-server` that is killed and restarted. (The memory bus runs the
//! same suite in `tests/bus_memory.rs`.)
#![cfg(feature = "redis")]

mod support;
#[macro_use]
#[path = "support/bus_suite.rs"]
mod bus_suite;

use std::time::Duration;

use bus_suite::{BusFactory, base_settings};
use switchboard::config::Settings;

/// The shared Redis every suite case uses, each under its own prefix.
const REDIS: &str = "redis://127.0.0.1:6379";

/// Redis with short presence expiry, so the crash case takes seconds.
struct RedisBus;

impl BusFactory for RedisBus {
    fn settings(&self, prefix: &str, i: usize) -> Settings {
        Settings {
            bus: Some(REDIS.into()),
            bus_prefix: Some(prefix.into()),
            presence_ttl: Some("2s".parse().expect("duration")),
            ..base_settings(prefix, i)
        }
    }
    fn presence_expiry(&self) -> Duration {
        Duration::from_secs(2)
    }
}

mod redis_bus {
    bus_suite!(super::RedisBus);
}

/// Redis announces the members of a crashed instance (see
/// `broker::redis::presence`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_members_leave_once() {
    bus_suite::crashed_members_leave_once(&RedisBus).await;
}

// ---------------------------------------------------------------------
// Redis-specific: outages, start-up failure, latency.
// ---------------------------------------------------------------------

#[path = "support/private_redis.rs"]
mod private_redis;

use std::collections::HashMap;
use std::net::SocketAddr;

use bus_suite::{Instance, QUIET, unique_prefix};
use private_redis::{PrivateRedis, Proxy};
use serde_json::{Value, json};
use support::{Client, WAIT};
use switchboard::config::NamespaceSettings;

/// Settings of instance `i` on the Redis at `url`.
fn redis_settings(url: &str, prefix: &str, i: usize) -> Settings {
    Settings {
        bus: Some(url.into()),
        bus_prefix: Some(prefix.into()),
        presence_ttl: Some("2s".parse().expect("duration")),
        ..base_settings(prefix, i)
    }
}

/// Poll `/healthz` until its `bus.up` is `up` (bounded by `within`).
async fn until_bus_is(inst: &Instance, up: bool, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Ok(r) = reqwest::get(inst.http("/healthz")).await {
            if let Ok(v) = r.json::<Value>().await {
                if v["bus"]["up"] == up {
                    return true;
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn readyz(inst: &Instance) -> u16 {
    reqwest::get(inst.http("/readyz"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Poll `/readyz` until its status is `want` (bounded by `within`).
async fn until_ready_is(inst: &Instance, want: u16, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Ok(r) = reqwest::get(inst.http("/readyz")).await {
            if r.status().as_u16() == want {
                return true;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(inst: &Instance) -> Value {
    reqwest::get(inst.http("/metrics"))
        .await
        .expect("metrics")
        .json()
        .await
        .expect("json")
}

async fn publish(p: &mut Client, channel: &str, data: Value, id: u64) -> Value {
    p.request(
        json!({"type": "publish", "channel": channel, "data": data}),
        id,
    )
    .await
}

/// The next `message` frame, skipping join/leave.
async fn next_message(c: &mut Client) -> Value {
    loop {
        let v = c.recv().await;
        if v["type"] != "join" && v["type"] != "leave" {
            return v;
        }
    }
}

/// Redis is killed (SIGKILL) and restarted empty mid-stream: both
/// instances survive and keep their clients, stay ready (`/readyz` 200: a
/// shared bus's outage must not empty the load balancer) while `/healthz`
/// and `busUp` report the bus down and back, publishes fail with `bus_unavailable` and are counted, then the
/// lost stream is detected (new epoch): subscribers are asked to resync
/// (1012) and recover honestly (`recovered:false`); directory and presence
/// are rewritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_stream() {
    bus_suite::bounded("redis_killed_and_restarted_mid_stream", async {
        let mut redis = PrivateRedis::start().await;
        let prefix = unique_prefix("kill");
        let a = Instance::start(redis_settings(&redis.url(), &prefix, 0)).await;
        let b = Instance::start(redis_settings(&redis.url(), &prefix, 1)).await;
        let channel = "live:x";
        let mut s = a.client().await;
        let mut idle = a.client().await;
        let mut p = b.client().await;
        let r = bus_suite::subscribe(&mut s, channel, 1).await;
        let epoch1 = r["epoch"].clone();
        for n in 1..=3u64 {
            let ack = publish(&mut p, channel, json!(n), n).await;
            assert_eq!(ack["offset"], n, "{ack}");
            let m = next_message(&mut s).await;
            assert_eq!(m["offset"], n, "{m}");
        }

        redis.kill();
        assert!(until_bus_is(&a, false, WAIT).await, "A sees the bus down");
        assert!(until_bus_is(&b, false, WAIT).await, "B sees the bus down");
        assert_eq!((readyz(&a).await, readyz(&b).await), (200, 200));
        // Local service goes on.
        let pong = s.request(json!({"type": "ping"}), 10).await;
        assert_eq!(pong["type"], "pong", "{pong}");
        let err = publish(&mut p, channel, json!("lost"), 11).await;
        assert_eq!(err["code"], "bus_unavailable", "{err}");
        let m = metrics(&b).await;
        assert!(m["busPublishErrors"].as_u64().unwrap_or(0) >= 1, "{m}");
        assert_eq!(m["ready"], true, "{m}");
        assert_eq!(m["busUp"], false, "{m}");

        redis.restart().await;
        let back = Duration::from_secs(20);
        assert!(until_bus_is(&a, true, back).await, "A's bus back");
        assert!(until_bus_is(&b, true, back).await, "B's bus back");

        // Redis came back empty: the stream is gone, the gap cannot be
        // proven empty, so A asks its subscriber to resync.
        assert_eq!(s.expect_close().await, 1012);
        let mut s2 = b.client().await;
        s2.send(json!({"type": "subscribe", "channel": channel,
            "since": {"epoch": epoch1, "offset": 3}, "id": 20}))
            .await;
        let sub = next_message(&mut s2).await;
        assert_eq!(sub["type"], "subscribed", "{sub}");
        assert_eq!(sub["recovered"], false, "{sub}");
        assert_ne!(sub["epoch"], epoch1, "a new epoch after the data loss");
        let ack = publish(&mut p, channel, json!("after"), 21).await;
        assert_eq!(ack["offset"], 1, "{ack}");
        let m = next_message(&mut s2).await;
        assert_eq!(m["data"], "after", "{m}");
        assert_eq!(m["epoch"], sub["epoch"]);

        // The directory was rewritten: B reaches A's idle client.
        let ack = p
            .request(
                json!({"type": "direct", "targetId": idle.id, "data": "hi"}),
                22,
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(idle.recv().await["data"], "hi");
        drop((s, s2, p, idle));
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

/// One instance is cut off the bus (a proxy drops its connections) while
/// Redis stays up and another instance keeps publishing. When it is back,
/// its subscriber gets exactly the missed publications from history, in
/// order, then live ones; in a channel whose history was trimmed past the
/// gap the subscriber is asked to resync (1012) instead. A runs with
/// `ready_requires_bus`, so its `/readyz` follows its own bus link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_instance_replays_what_it_missed() {
    bus_suite::bounded("cut_off_instance_replays_what_it_missed", async {
        let upstream: SocketAddr = "127.0.0.1:6379".parse().expect("addr");
        let proxy = Proxy::start(upstream).await;
        let prefix = unique_prefix("cut");
        let small = NamespaceSettings {
            history_size: Some(3),
            ..Default::default()
        };
        let with_small = |mut s: Settings| {
            s.namespaces = HashMap::from([("small".to_string(), small.clone())]);
            s
        };
        let a = Instance::start(with_small(Settings {
            ready_requires_bus: Some(true),
            ..redis_settings(&format!("redis://{}", proxy.addr), &prefix, 0)
        }))
        .await;
        let b = Instance::start(with_small(redis_settings(REDIS, &prefix, 1))).await;
        let (live, trimmed) = ("live:y", "small:z");
        let mut s1 = a.client().await;
        let mut s2 = a.client().await;
        let mut p = b.client().await;
        bus_suite::subscribe(&mut s1, live, 1).await;
        bus_suite::subscribe(&mut s2, trimmed, 1).await;
        publish(&mut p, live, json!(1), 1).await;
        publish(&mut p, trimmed, json!(1), 2).await;
        assert_eq!(next_message(&mut s1).await["offset"], 1);
        assert_eq!(next_message(&mut s2).await["offset"], 1);

        proxy.cut().await;
        assert!(until_ready_is(&a, 503, WAIT).await, "A turns unready");
        assert!(until_ready_is(&b, 200, WAIT).await, "B stays ready");
        for n in 2..=5u64 {
            let ack = publish(&mut p, live, json!(n), 10 + n).await;
            assert_eq!(ack["offset"], n, "{ack}");
        }
        for n in 2..=6u64 {
            let ack = publish(&mut p, trimmed, json!(n), 20 + n).await;
            assert_eq!(ack["offset"], n, "{ack}");
        }
        proxy.restore();
        assert!(
            until_ready_is(&a, 200, Duration::from_secs(20)).await,
            "A ready again"
        );
        for n in 2..=5u64 {
            let m = next_message(&mut s1).await;
            assert_eq!(m["type"], "message", "{m}");
            assert_eq!(m["offset"], n, "replayed in order: {m}");
            assert_eq!(m["data"], n);
        }
        let ack = publish(&mut p, live, json!(6), 30).await;
        assert_eq!(ack["offset"], 6, "{ack}");
        assert_eq!(next_message(&mut s1).await["offset"], 6, "then live");
        s1.expect_silence(QUIET).await;
        assert_eq!(s2.expect_close().await, 1012, "trimmed gap → resync");
        drop((s1, s2, p));
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

/// `switchboard --bus redis://127.0.0.1:1` (nothing listens) exits
/// non-zero, promptly, saying why.
#[tokio::test]
async fn start_up_with_redis_unreachable_exits_non_zero() {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "--bus",
            "redis://127.0.0.1:1",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("exits within 20 s")
        .expect("runs");
    assert!(!out.status.success(), "{:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot connect to redis at redis://127.0.0.1:1"),
        "{stderr}"
    );
}

/// Send `N` publications from `publisher` paced at ~1000/s and time each
/// one until `sub` receives it; returns the sorted latencies.
async fn measure(publisher: Client, mut sub: Client, channel: &'static str) -> Vec<Duration> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    const N: usize = 2000;
    bus_suite::subscribe(&mut sub, channel, 1).await;
    let (mut tx, mut rx) = publisher.ws.split();
    // Read the acks as they come, so the publisher's socket never fills.
    let acks = tokio::spawn(async move {
        let mut acked = 0;
        while acked < N {
            match rx.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).expect("json");
                    assert_eq!(v["type"], "ack", "{v}");
                    acked += 1;
                }
                Some(Ok(_)) => {}
                other => panic!("publisher connection ended: {other:?}"),
            }
        }
    });
    let start = std::time::Instant::now();
    let sender = tokio::spawn(async move {
        let mut sent = Vec::with_capacity(N);
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for n in 0..N {
            tick.tick().await;
            sent.push(start.elapsed());
            let req = json!({"type": "publish", "channel": channel, "data": n, "id": n});
            tx.send(Message::text(req.to_string())).await.expect("send");
        }
        (sent, tx)
    });
    let mut received = vec![Duration::ZERO; N];
    for _ in 0..N {
        let m = next_message(&mut sub).await;
        assert_eq!(m["type"], "message", "{m}");
        let n = m["data"].as_u64().expect("n") as usize;
        received[n] = start.elapsed();
    }
    let (sent, _tx) = sender.await.expect("sender");
    acks.await.expect("every publish acknowledged");
    let mut lat: Vec<Duration> = sent
        .iter()
        .zip(&received)
        .map(|(s, r)| r.saturating_sub(*s))
        .collect();
    lat.sort_unstable();
    lat
}

fn report(label: &str, lat: &[Duration]) {
    let q = |f: f64| lat[((lat.len() as f64 * f) as usize).min(lat.len() - 1)];
    println!(
        "{label}: {} publications at ~1000/s, 1 subscriber: p50 {:?}, p99 {:?}, max {:?}",
        lat.len(),
        q(0.50),
        q(0.99),
        lat[lat.len() - 1]
    );
}

/// Cross-instance latency through Redis (publisher on A, subscriber on B),
/// next to the memory bus on one instance as a baseline under the same
/// machine load; client send → client receive over loopback. Prints the
/// figures (`--nocapture`); never fails on one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_through_redis() {
    bus_suite::bounded("latency_through_redis", async {
        let prefix = unique_prefix("latency");
        // 1000 publications/s from one connection: above the default
        // per-connection rate limit.
        let unlimited = |s: Settings| Settings {
            rate_limit: Some(0.0),
            ..s
        };
        let a = Instance::start(unlimited(redis_settings(REDIS, &prefix, 0))).await;
        let b = Instance::start(unlimited(redis_settings(REDIS, &prefix, 1))).await;
        let lat = measure(a.client().await, b.client().await, "bench:lat").await;
        report("redis bus, A -> B", &lat);
        a.shutdown().await;
        b.shutdown().await;
        let m = Instance::start(unlimited(base_settings(&prefix, 2))).await;
        let lat = measure(m.client().await, m.client().await, "bench:lat").await;
        report("memory bus, one instance (baseline)", &lat);
        m.shutdown().await;
    })
    .await;
}

/// The issue-16 reproduction of a silent gap: X on A subscribes (offset 3)
/// and receives no live message; A is cut off the bus; Y on B publishes
/// `d-lost` (acked); Redis is killed and restarted empty; Y publishes into
/// the new epoch; A comes back. X must learn of the gap (1012, then
/// `recovered:false`), never receive the new epoch's messages as if
/// nothing had happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_loss_before_any_live_delivery_is_not_a_silent_gap() {
    bus_suite::bounded("data_loss_before_any_live_delivery", async {
        let mut redis = PrivateRedis::start().await;
        let upstream: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().expect("addr");
        let proxy = Proxy::start(upstream).await;
        let prefix = unique_prefix("gap");
        let a = Instance::start(redis_settings(
            &format!("redis://{}", proxy.addr),
            &prefix,
            0,
        ))
        .await;
        let b = Instance::start(redis_settings(&redis.url(), &prefix, 1)).await;
        let channel = "chat:D";
        let mut y = b.client().await;
        for n in 1..=3u64 {
            assert_eq!(publish(&mut y, channel, json!(n), n).await["offset"], n);
        }
        let mut x = a.client().await;
        let sub = bus_suite::subscribe(&mut x, channel, 1).await;
        assert_eq!(sub["offset"], 3, "{sub}");
        let epoch1 = sub["epoch"].clone();

        proxy.cut().await;
        assert!(until_bus_is(&a, false, WAIT).await, "A sees the bus down");
        let lost = publish(&mut y, channel, json!("d-lost"), 10).await;
        assert_eq!(lost["offset"], 4, "acked before the loss: {lost}");
        redis.restart().await; // kill -9, then empty
        assert!(
            until_bus_is(&b, true, Duration::from_secs(20)).await,
            "B's bus back"
        );
        for (n, id) in ["e1", "e2"].into_iter().zip(11..) {
            let ack = publish(&mut y, channel, json!(n), id).await;
            assert_eq!(ack["type"], "ack", "{ack}");
            assert_ne!(ack["epoch"], epoch1, "a new epoch: {ack}");
        }
        proxy.restore();
        assert!(
            until_bus_is(&a, true, Duration::from_secs(20)).await,
            "A's bus back"
        );
        // X is told: the connection is closed for a resubscribe, with no
        // new-epoch message slipped in before the close.
        assert_eq!(x.expect_close_before_any_message(WAIT).await, 1012);
        let mut x2 = a.client().await;
        x2.send(json!({"type": "subscribe", "channel": channel,
            "since": {"epoch": epoch1, "offset": 3}, "id": 20}))
            .await;
        let again = next_message(&mut x2).await;
        assert_eq!(again["type"], "subscribed", "{again}");
        assert_eq!(again["recovered"], false, "{again}");
        drop((x, x2, y));
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

/// Issue 15: a connection registers nothing on the bus. Connecting and
/// disconnecting clients leaves Redis's keys as they were (no directory
/// entry per client); a direct still reaches a client of the other
/// instance through the instance topic named by the tag in its id, which
/// has exactly one subscriber, and a made-up id under a live tag is an
/// `unknown_target`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_per_client_on_redis() {
    bus_suite::bounded("nothing_per_client_on_redis", async {
        let prefix = unique_prefix("perclient");
        let a = Instance::start(redis_settings(REDIS, &prefix, 0)).await;
        let b = Instance::start(redis_settings(REDIS, &prefix, 1)).await;
        let mut conn = redis::Client::open(REDIS)
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let keys = |mut conn: redis::aio::MultiplexedConnection| {
            let pattern = format!("{prefix}:*");
            async move {
                let mut k: Vec<String> = redis::cmd("KEYS")
                    .arg(pattern)
                    .query_async(&mut conn)
                    .await
                    .expect("KEYS");
                k.sort();
                k
            }
        };
        let before = keys(conn.clone()).await;
        let mut clients = Vec::new();
        for _ in 0..20 {
            clients.push(a.client().await);
        }
        let mut sender = b.client().await;
        assert_eq!(keys(conn.clone()).await, before, "no key per client");
        let target = clients[7].id.clone();
        let tag = &target[target.len() - 9..target.len() - 5];
        let (_, subscribers): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(format!("{prefix}:inst:{tag}"))
            .query_async(&mut conn)
            .await
            .expect("PUBSUB NUMSUB");
        assert_eq!(subscribers, 1, "one instance holds the tag {tag}");
        let r = sender
            .request(
                json!({"type": "direct", "targetId": target, "data": "hi"}),
                1,
            )
            .await;
        assert_ne!(r["type"], "error", "{r}");
        let got = clients[7].recv_type("direct").await;
        assert_eq!(got["data"], "hi", "{got}");
        let made_up = format!("{}zzzzz", &target[..target.len() - 5]);
        let r = sender
            .request(json!({"type": "direct", "targetId": made_up, "data": 1}), 2)
            .await;
        assert_eq!(r["code"], "unknown_target", "{r}");
        drop(clients);
        drop(sender);
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}
