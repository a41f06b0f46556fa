//! The NATS bus under faults: a PRIVATE `nats-server -js` on a free port
//! (killed with SIGKILL and restarted on the same store, or with an empty
//! one), a TCP proxy that partitions one instance, and the cross-instance
//! cases that need them. (The shared suite and broker-level checks are in
//! `tests/bus_nats.rs`.)
#![cfg(feature = "nats")]

#[path = "support/bus_suite.rs"]
mod bus_suite;
#[path = "support/private_nats.rs"]
mod private_nats;
mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bus_suite::{Instance, base_settings, subscribe, unique_prefix};
use private_nats::{PrivateNats, Proxy};
use serde_json::{Value, json};
use switchboard::config::Settings;

/// The shared NATS of the cases that need no private server.
const NATS: &str = "nats://127.0.0.1:4222";

/// Whether the instance reports its bus up (`/healthz`).
async fn bus_up(inst: &Instance) -> bool {
    match reqwest::get(inst.http("/healthz")).await {
        Ok(r) => r
            .json::<Value>()
            .await
            .is_ok_and(|v| v["bus"]["up"] == true),
        Err(_) => false,
    }
}

async fn until_bus(inst: &Instance, up: bool, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if bus_up(inst).await == up {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn settings_for(url: &str, prefix: &str, i: usize) -> Settings {
    Settings {
        bus: Some(url.into()),
        bus_prefix: Some(prefix.into()),
        presence_ttl: Some("3s".parse().unwrap()),
        ..base_settings(prefix, i)
    }
}

/// Publish `data` through `c`; the ack's offset, or `None` on an error
/// reply (bus down).
async fn publish(c: &mut support::Client, channel: &str, data: Value, id: u64) -> Option<u64> {
    let r = c
        .request(json!({"type":"publish","channel":channel,"data":data}), id)
        .await;
    match r["type"].as_str() {
        Some("ack") => Some(r["offset"].as_u64().expect("offset")),
        _ => {
            assert_eq!(r["type"], "error", "{r}");
            None
        }
    }
}

/// Every `message` on `channel` until `top` is reached: their offsets.
async fn offsets_until(c: &mut support::Client, top: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.last().is_none_or(|&o| o < top) {
        let m = c.recv().await;
        if m["type"] == "message" {
            seen.push(m["offset"].as_u64().unwrap());
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_stream() {
    bus_suite::bounded("nats_killed_and_restarted_mid_stream", async {
        let mut server = PrivateNats::start().await;
        let prefix = unique_prefix("kill");
        let a = Instance::start(settings_for(&server.url(), &prefix, 0)).await;
        let b = Instance::start(settings_for(&server.url(), &prefix, 1)).await;
        let channel = "k:room";
        let mut sub = a.client().await;
        let r = subscribe(&mut sub, channel, 1).await;
        let epoch = r["epoch"].as_str().unwrap().to_string();
        let mut publisher = b.client().await;
        let mut acked = Vec::new();
        for n in 0..10 {
            acked.extend(publish(&mut publisher, channel, json!(n), 100 + n).await);
        }
        assert_eq!(acked, (1..=10).collect::<Vec<_>>());
        assert_eq!(offsets_until(&mut sub, 10).await, acked);
        // Let the store write what it acknowledged, then SIGKILL.
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.kill();
        assert!(
            until_bus(&a, false, Duration::from_secs(10)).await,
            "A sees the bus down"
        );
        assert!(
            until_bus(&b, false, Duration::from_secs(10)).await,
            "B sees the bus down"
        );
        // The instances stay ready (a shared bus's outage must not take the
        // fleet out of the load balancer) and keep serving local clients;
        // bus operations fail.
        for i in [&a, &b] {
            let r = reqwest::get(i.http("/readyz")).await.unwrap();
            assert_eq!(r.status().as_u16(), 200, "ready during the outage");
        }
        assert_eq!(
            publish(&mut publisher, channel, json!("down"), 200).await,
            None
        );
        let live = reqwest::get(b.http("/livez")).await.unwrap();
        assert_eq!(live.status().as_u16(), 200, "the server survives");

        server.spawn().await;
        assert!(
            until_bus(&a, true, Duration::from_secs(20)).await,
            "A's bus back"
        );
        assert!(
            until_bus(&b, true, Duration::from_secs(20)).await,
            "B's bus back"
        );
        let mut more = Vec::new();
        for n in 0..5 {
            more.extend(publish(&mut publisher, channel, json!(n), 300 + n).await);
        }
        assert_eq!(more, (11..=15).collect::<Vec<_>>(), "offsets continue");
        assert_eq!(
            offsets_until(&mut sub, 15).await,
            more,
            "no gap, no duplicate"
        );
        // History survived: a new client recovers from the start.
        let mut late = b.client().await;
        late.send(json!({"type":"subscribe","channel":channel,
            "since":{"epoch":epoch,"offset":0},"id":9}))
            .await;
        let recovered = offsets_until(&mut late, 15).await;
        assert_eq!(recovered, (1..=15).collect::<Vec<_>>());
        let s = late.recv_type("subscribed").await;
        assert_eq!(s["recovered"], true, "{s}");
        let metrics: Value = reqwest::get(b.http("/metrics"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            metrics.to_string().contains("busPublishErrors"),
            "{metrics}"
        );
        drop((sub, publisher, late));
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

/// A partition, not a crash: the member of an instance cut off the bus
/// for longer than `presence_ttl` leaves, once, for the subscriber on the
/// other instance (its key expired), and joins again when its instance is
/// back (its key is rewritten).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_leaves_and_joins_again() {
    bus_suite::bounded("a_member_cut_off_leaves_and_joins_again", async {
        let server = PrivateNats::start().await;
        let upstream: SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
        let proxy = Proxy::start(upstream).await;
        let prefix = unique_prefix("cutpres");
        let via_proxy = format!("nats://127.0.0.1:{}", proxy.port);
        let a = Instance::start(settings_for(&via_proxy, &prefix, 0)).await;
        let b = Instance::start(settings_for(&server.url(), &prefix, 1)).await;
        let channel = "cutpres:room";
        let mut x = a.client().await;
        let mut y = b.client().await;
        subscribe(&mut x, channel, 1).await;
        subscribe(&mut y, channel, 1).await;
        let both: HashSet<String> = [x.id.clone(), y.id.clone()].into();
        assert!(
            bus_suite::until_members(&mut y, channel, &both, Duration::from_secs(10)).await,
            "both members seen from B"
        );
        // The next presence event Y gets (within `within`).
        async fn event(y: &mut support::Client, within: Duration) -> Value {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let v = tokio::time::timeout(left, y.recv())
                    .await
                    .unwrap_or_else(|_| panic!("no join/leave within {within:?}"));
                if v["type"] == "join" || v["type"] == "leave" {
                    return v;
                }
            }
        }
        proxy.cut();
        // presence_ttl is 3 s (settings_for).
        let l = event(&mut y, Duration::from_secs(10)).await;
        assert_eq!(l["type"], "leave", "{l}");
        assert_eq!(l["clientId"], x.id.as_str(), "{l}");
        proxy.restore().await;
        let j = event(&mut y, Duration::from_secs(20)).await;
        assert_eq!(j["type"], "join", "{j}");
        assert_eq!(j["clientId"], x.id.as_str(), "{j}");
        // Once each: nothing more about it.
        y.expect_silence(Duration::from_secs(4)).await;
        drop((x, y));
        a.shutdown().await;
        b.shutdown().await;
        drop(proxy);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_instance_replays_what_it_missed() {
    bus_suite::bounded("a_partitioned_instance_replays_what_it_missed", async {
        let server = PrivateNats::start().await;
        let upstream: SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
        let proxy = Proxy::start(upstream).await;
        let prefix = unique_prefix("part");
        let via_proxy = format!("nats://127.0.0.1:{}", proxy.port);
        let a = Instance::start(settings_for(&via_proxy, &prefix, 0)).await;
        let b = Instance::start(settings_for(&server.url(), &prefix, 1)).await;
        let channel = "p:room";
        let mut sub = a.client().await;
        subscribe(&mut sub, channel, 1).await;
        let mut publisher = b.client().await;
        for n in 0..3 {
            publish(&mut publisher, channel, json!(n), 10 + n)
                .await
                .unwrap();
        }
        assert_eq!(offsets_until(&mut sub, 3).await, vec![1, 2, 3]);

        proxy.cut();
        assert!(
            until_bus(&a, false, Duration::from_secs(10)).await,
            "A sees the bus down"
        );
        assert!(bus_up(&b).await, "B is unaffected");
        // Published while A cannot hear them.
        for n in 0..5 {
            let o = publish(&mut publisher, channel, json!(n), 20 + n).await;
            assert_eq!(o, Some(4 + n));
        }
        proxy.restore().await;
        assert!(
            until_bus(&a, true, Duration::from_secs(20)).await,
            "A's bus back"
        );
        // Replayed from history in order, then live.
        assert_eq!(offsets_until(&mut sub, 8).await, vec![4, 5, 6, 7, 8]);
        let o = publish(&mut publisher, channel, json!("live"), 30).await;
        assert_eq!(o, Some(9));
        assert_eq!(offsets_until(&mut sub, 9).await, vec![9]);
        sub.expect_silence(Duration::from_millis(300)).await;
        drop((sub, publisher));
        a.shutdown().await;
        b.shutdown().await;
        drop(proxy);
    })
    .await;
}

/// Cross-instance latency through NATS at a stated, bounded load: one
/// publisher on B, one subscriber on A, 2000 publications at ~1000/s.
/// Prints p50/p99 (no assertion on the figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_instance_latency_report() {
    bus_suite::bounded("cross_instance_latency_report", async {
        let prefix = unique_prefix("lat");
        let a = Instance::start(bus_suite_settings(&prefix, 0)).await;
        let b = Instance::start(bus_suite_settings(&prefix, 1)).await;
        let channel = "lat:room";
        let mut sub = a.client().await;
        subscribe(&mut sub, channel, 1).await;
        let mut publisher = b.client().await;
        const N: u64 = 2000;
        let send = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            for n in 0..N {
                tick.tick().await;
                publisher
                    .send(json!({"type":"publish","channel":channel,
                        "data":{"t": now_us()},"id": n}))
                    .await;
            }
            publisher
        });
        let mut lat = Vec::with_capacity(N as usize);
        while (lat.len() as u64) < N {
            let m = sub.recv().await;
            if m["type"] == "message" {
                let t = m["data"]["t"].as_u64().unwrap();
                lat.push(now_us().saturating_sub(t));
            }
        }
        let publisher = send.await.unwrap();
        lat.sort_unstable();
        let q = |x: f64| lat[((lat.len() as f64 * x) as usize).min(lat.len() - 1)];
        eprintln!(
            "NATS cross-instance latency, {N} publications at ~1000/s: p50 {} us, p99 {} us, max {} us",
            q(0.5),
            q(0.99),
            lat[lat.len() - 1]
        );
        drop((sub, publisher));
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

fn bus_suite_settings(prefix: &str, i: usize) -> Settings {
    Settings {
        rate_limit: Some(0.0), // the publisher sends 1000/s on purpose
        presence_ttl: Some("2s".parse().expect("duration")),
        ..settings_for(NATS, prefix, i)
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The silent-gap case of issue 16 on NATS: X on A subscribes (offset 3)
/// and gets no live message; A is cut off; B publishes `d-lost`; the NATS
/// server is killed and comes back with an empty store (new epoch); B
/// publishes again; A comes back. X must be closed with 1012 (and then
/// recover with `recovered:false`), never fed the new epoch as if nothing
/// had happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_loss_before_any_live_delivery_is_not_a_silent_gap() {
    bus_suite::bounded("nats_data_loss_before_any_live_delivery", async {
        let mut server = PrivateNats::start().await;
        let upstream: SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
        let proxy = Proxy::start(upstream).await;
        let prefix = unique_prefix("gap");
        let via_proxy = format!("nats://127.0.0.1:{}", proxy.port);
        let a = Instance::start(settings_for(&via_proxy, &prefix, 0)).await;
        let b = Instance::start(settings_for(&server.url(), &prefix, 1)).await;
        let channel = "g:room";
        let mut y = b.client().await;
        for n in 0..3 {
            assert_eq!(
                publish(&mut y, channel, json!(n), 10 + n).await,
                Some(n + 1)
            );
        }
        let mut x = a.client().await;
        let sub = subscribe(&mut x, channel, 1).await;
        assert_eq!(sub["offset"], 3, "{sub}");
        let epoch1 = sub["epoch"].clone();

        proxy.cut();
        assert!(
            until_bus(&a, false, Duration::from_secs(10)).await,
            "A cut off"
        );
        assert_eq!(publish(&mut y, channel, json!("d-lost"), 20).await, Some(4));
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.kill();
        std::fs::remove_dir_all(&server.dir).unwrap();
        std::fs::create_dir_all(&server.dir).unwrap();
        server.spawn().await;
        assert!(until_bus(&b, true, Duration::from_secs(20)).await, "B back");
        let mut acked = None;
        for n in 0..50 {
            // The stream is recreated by B's supervisor; retry until it is.
            acked = publish(&mut y, channel, json!("new"), 30 + n).await;
            if acked.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(acked, Some(1), "a new stream after the data loss");
        proxy.restore().await;
        assert!(until_bus(&a, true, Duration::from_secs(20)).await, "A back");
        assert_eq!(
            x.expect_close_before_any_message(Duration::from_secs(15))
                .await,
            1012
        );
        let mut x2 = a.client().await;
        x2.send(json!({"type": "subscribe", "channel": channel,
            "since": {"epoch": epoch1, "offset": 3}, "id": 40}))
            .await;
        let again = loop {
            let v = x2.recv().await;
            if v["type"] == "subscribed" {
                break v;
            }
        };
        assert_eq!(again["recovered"], false, "{again}");
        drop((x, x2, y));
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

/// A last-value channel recovers after a bus restart as history does: the
/// JetStream store keeps the newest publication, and a subscriber after
/// the restart gets it before `subscribed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_value_channel_survives_a_nats_restart() {
    bus_suite::bounded("a_last_value_channel_survives_a_nats_restart", async {
        use switchboard::config::NamespaceSettings;
        let mut server = PrivateNats::start().await;
        let prefix = unique_prefix("lvrestart");
        let mut s = settings_for(&server.url(), &prefix, 0);
        s.namespaces.insert(
            "lv".into(),
            NamespaceSettings {
                cache: Some(true),
                ..Default::default()
            },
        );
        let a = Instance::start(s).await;
        let mut p = a.client().await;
        let channel = "lv:price";
        for n in 1..=2 {
            assert_eq!(publish(&mut p, channel, json!(n), n).await, Some(n));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.kill();
        assert!(until_bus(&a, false, Duration::from_secs(10)).await);
        server.spawn().await;
        assert!(until_bus(&a, true, Duration::from_secs(20)).await);
        let mut late = a.client().await;
        late.send(json!({"type": "subscribe", "channel": channel, "id": 1}))
            .await;
        let m = late.recv().await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["data"], 2, "the newest: {m}");
        let sub = late.recv().await;
        assert_eq!(sub["type"], "subscribed", "{sub}");
        assert_eq!(sub["offset"], 2, "{sub}");
        drop((p, late));
        a.shutdown().await;
    })
    .await;
}
