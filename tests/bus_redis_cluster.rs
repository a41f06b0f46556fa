//! The Redis bus on a Redis Cluster (`redis+cluster://…`): the shared
//! cross-instance suite, the spread of channels over the masters, a
//! `kill -9` failover of the master serving a channel while it is
//! published to, a live gap filled from history, and the start-up failure
//! of an unreachable cluster. Each cluster here is private (six
//! `redis-server`, 3 masters + 3 replicas, started by
//! `support/redis_cluster.rs`): the suite, the spread and the gap share
//! one, the failover case has its own.
#![cfg(feature = "redis")]

mod support;
#[macro_use]
#[path = "support/bus_suite.rs"]
mod bus_suite;
#[path = "support/redis_cluster.rs"]
mod redis_cluster;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use bus_suite::{BusFactory, Instance, base_settings, unique_prefix};
use redis_cluster::{RedisCluster, cli};
use serde_json::{Value, json};
use support::Client;
use switchboard::config::Settings;

/// The cluster the suite and the spread share (its servers die with the
/// test process: see `support/redis_cluster.rs`).
fn shared() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start)
}

/// Settings of instance `i` on the cluster at `url`.
fn cluster_settings(url: &str, prefix: &str, i: usize) -> Settings {
    Settings {
        bus: Some(url.into()),
        bus_prefix: Some(prefix.into()),
        presence_ttl: Some("2s".parse().expect("duration")),
        ..base_settings(prefix, i)
    }
}

/// The cluster bus, with short presence expiry.
struct ClusterBus;

impl BusFactory for ClusterBus {
    fn settings(&self, prefix: &str, i: usize) -> Settings {
        cluster_settings(&shared().url(), prefix, i)
    }
    fn presence_expiry(&self) -> Duration {
        Duration::from_secs(2)
    }
}

mod cluster_bus {
    bus_suite!(super::ClusterBus);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_members_leave_once() {
    bus_suite::crashed_members_leave_once(&ClusterBus).await;
}

/// Publishes `data` on `channel` through the server API; the answer's
/// JSON, or `None` when the API refused it (e.g. `bus_unavailable`).
async fn api_publish(
    http: &reqwest::Client,
    inst: &Instance,
    key: &str,
    channel: &str,
    data: Value,
) -> Option<Value> {
    let r = http
        .post(inst.http("/api/publish"))
        .bearer_auth(key)
        .json(&json!({"channel": channel, "data": data}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// A file holding the server API key, for the cases that publish over it.
fn api_key_file(key: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "sb-cluster-api-key-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::write(&path, key).expect("write api key");
    path
}

/// 1,000 channels `chat:0..999`, and 1,000 sharing a long prefix, spread
/// over the 3 masters within ±15 % of a third each: every channel's keys
/// are counted where they really are (a `--scan` of each master).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_spread_evenly_over_the_masters() {
    bus_suite::bounded("channels_spread_evenly_over_the_masters", async {
        let cluster = shared();
        let key = "cluster-spread-key-0123456789abcdef";
        let path = api_key_file(key);
        for (case, names) in [
            (
                "spreada",
                (0..1000).map(|n| format!("chat:{n}")).collect::<Vec<_>>(),
            ),
            (
                "spreadb",
                (0..1000)
                    .map(|n| format!("tenant-0042/region-eu/room:{n}"))
                    .collect(),
            ),
        ] {
            let prefix = unique_prefix(case);
            let inst = Instance::start(Settings {
                api_key_file: Some(path.clone()),
                ..cluster_settings(&cluster.url(), &prefix, 0)
            })
            .await;
            let http = reqwest::Client::new();
            for name in &names {
                let ack = api_publish(&http, &inst, key, name, json!(1)).await;
                assert!(ack.is_some(), "publish on {name} refused");
            }
            let mut shares = Vec::new();
            for m in cluster.masters() {
                let found = cli(
                    m.port,
                    &["--scan", "--pattern", &format!("{prefix}:ch:*:meta")],
                );
                shares.push((m.port, found.lines().filter(|l| !l.is_empty()).count()));
            }
            let total: usize = shares.iter().map(|s| s.1).sum();
            assert_eq!(
                total,
                names.len(),
                "every channel has its meta key: {shares:?}"
            );
            println!("spread of {case} ({}…): {shares:?}", names[0]);
            for (port, n) in &shares {
                let share = *n as f64 / total as f64;
                assert!(
                    (share - 1.0 / 3.0).abs() <= 0.15 / 3.0,
                    "master {port} holds {n} of {total} channels: {shares:?}"
                );
            }
            inst.shutdown().await;
        }
        let _ = std::fs::remove_file(&path);
    })
    .await;
}

/// A cluster bus whose nodes are all unreachable is a start-up error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_cluster_fails_at_start_up() {
    bus_suite::bounded("unreachable_cluster_fails_at_start_up", async {
        let a = redis_cluster_free_port();
        let b = redis_cluster_free_port();
        let url = format!("redis+cluster://127.0.0.1:{a},127.0.0.1:{b}");
        let prefix = unique_prefix("unreach");
        let r = Instance::try_start(cluster_settings(&url, &prefix, 0)).await;
        let Err(e) = r else {
            panic!("an unreachable cluster must fail the start-up");
        };
        assert!(e.to_string().contains("redis"), "{e}");
    })
    .await;
}

fn redis_cluster_free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Reads `message` frames from `c` until `stop` says so or `within`
/// passes; returns `(offset, data)` of each, and the close code if the
/// connection was closed.
async fn collect(
    c: &mut Client,
    want: impl Fn(&[(u64, i64)]) -> bool,
    within: Duration,
) -> Vec<(u64, i64)> {
    let mut got: Vec<(u64, i64)> = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while !want(&got) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(v) = tokio::time::timeout(left, c.recv()).await else {
            break;
        };
        match v["type"].as_str() {
            Some("message") => got.push((
                v["offset"].as_u64().expect("offset"),
                v["data"].as_i64().expect("data"),
            )),
            Some("join") | Some("leave") => {}
            _ => panic!("unexpected frame during the failover: {v}"),
        }
    }
    got
}

/// `kill -9` of the master serving a channel while it is published to
/// (over the server API, one publication at a time, each acked or not):
/// the replica takes over, both instances' subscribers recover from the
/// stream, and each gets every acked publication exactly once, in order,
/// with offsets that never skip (no silent gap) and no resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_subscribers_recover_without_loss() {
    bus_suite::bounded("master_killed_subscribers_recover_without_loss", async {
        let mut cluster = tokio::task::spawn_blocking(RedisCluster::start)
            .await
            .expect("cluster");
        let key = "cluster-failover-key-0123456789abcdef";
        let path = api_key_file(key);
        let prefix = unique_prefix("failover");
        let url = cluster.url();
        let a = Instance::start(Settings {
            api_key_file: Some(path.clone()),
            ..cluster_settings(&url, &prefix, 0)
        })
        .await;
        let b = Instance::start(Settings {
            api_key_file: Some(path.clone()),
            ..cluster_settings(&url, &prefix, 1)
        })
        .await;
        let channel = "live:failover";
        let mut sa = a.client().await;
        let mut sb = b.client().await;
        bus_suite::subscribe(&mut sa, channel, 1).await;
        bus_suite::subscribe(&mut sb, channel, 1).await;

        let slot = cluster.key_slot(&format!("{prefix}:ch:{{{channel}}}:meta"));
        let old = cluster.master_of(slot).expect("a master serves the slot");

        // Publish through both instances, one at a time; acked ones are
        // remembered with their offsets.
        let http = reqwest::Client::new();
        let mut acked: HashMap<i64, u64> = HashMap::new();
        let mut n: i64 = 0;
        let publish = async |n: i64, acked: &mut HashMap<i64, u64>| {
            let via = if n % 2 == 0 { &a } else { &b };
            if let Some(ack) = api_publish(&http, via, key, channel, json!(n)).await {
                acked.insert(n, ack["offset"].as_u64().expect("offset"));
            }
        };
        while n < 30 {
            n += 1;
            publish(n, &mut acked).await;
        }
        assert_eq!(acked.len(), 30, "all acked before the kill");

        cluster.kill(old);
        let kill_at = n;
        // Keep publishing through the failover (bounded), until 30 more
        // were acked after it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        while acked.keys().filter(|&&k| k > kill_at).count() < 30 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "publishing did not resume after the failover ({} acked after the kill)",
                acked.keys().filter(|&&k| k > kill_at).count()
            );
            n += 1;
            publish(n, &mut acked).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let new = tokio::task::block_in_place(|| {
            cluster.until_failed_over(slot, old, Duration::from_secs(10))
        })
        .expect("the replica took over the slot");
        assert_ne!(new, old);
        println!(
            "failover: master {old} killed, {new} took over; {} publications tried, {} acked ({} after the kill)",
            n,
            acked.len(),
            acked.keys().filter(|&&k| k > kill_at).count()
        );

        let last_acked = *acked.values().max().expect("acked");
        for (name, s) in [("A", &mut sa), ("B", &mut sb)] {
            let got = collect(
                s,
                |g| g.last().is_some_and(|&(o, _)| o >= last_acked),
                Duration::from_secs(30),
            )
            .await;
            // Offsets 1, 2, 3, … without a gap or a repeat: in order,
            // exactly once, nothing skipped.
            for (i, (offset, _)) in got.iter().enumerate() {
                assert_eq!(*offset, i as u64 + 1, "{name}: offsets {got:?}");
            }
            let by_data: HashMap<i64, u64> = got.iter().map(|&(o, d)| (d, o)).collect();
            assert_eq!(by_data.len(), got.len(), "{name}: a publication twice");
            for (d, o) in &acked {
                assert_eq!(
                    by_data.get(d),
                    Some(o),
                    "{name}: acked publication {d} (offset {o}); got {got:?}"
                );
            }
            println!("{name}: {} publications, offsets 1..={last_acked} in order", got.len());
        }
        a.shutdown().await;
        b.shutdown().await;
        let _ = std::fs::remove_file(&path);
    })
    .await;
}

/// Acked means replicated: with the replica of the channel's master
/// stopped (`SIGSTOP`: connected but silent) a publish is refused with
/// `bus_unavailable` once the wait for a replica runs out; resumed, the
/// replica confirms again and publishes are acked; killed (no replica
/// connected any more), publishes are acked without one. The subscriber
/// gets every acked publication, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_are_acked_once_a_replica_has_them() {
    bus_suite::bounded("publications_are_acked_once_a_replica_has_them", async {
        let mut cluster = tokio::task::spawn_blocking(RedisCluster::start)
            .await
            .expect("cluster");
        let key = "cluster-replica-key-0123456789abcdef";
        let path = api_key_file(key);
        let prefix = unique_prefix("replica");
        let a = Instance::start(Settings {
            api_key_file: Some(path.clone()),
            ..cluster_settings(&cluster.url(), &prefix, 0)
        })
        .await;
        let channel = "live:replicated";
        let mut sa = a.client().await;
        bus_suite::subscribe(&mut sa, channel, 1).await;
        let slot = cluster.key_slot(&format!("{prefix}:ch:{{{channel}}}:meta"));
        let master = cluster.master_of(slot).expect("a master serves the slot");
        let replica = cluster
            .replica_of(master)
            .expect("the master has a replica");
        let http = reqwest::Client::new();
        let mut acked = Vec::new();

        let ack = api_publish(&http, &a, key, channel, json!(1)).await;
        acked.push(ack.expect("acked with a live replica")["offset"].as_u64());

        cluster.signal(replica, "STOP");
        let started = tokio::time::Instant::now();
        let refused = http
            .post(a.http("/api/publish"))
            .bearer_auth(key)
            .json(&json!({"channel": channel, "data": 2}))
            .send()
            .await
            .expect("answered");
        let status = refused.status();
        let body: Value = refused.json().await.expect("json");
        println!(
            "replica stopped: refused after {:?}: {status} {body}",
            started.elapsed()
        );
        cluster.signal(replica, "CONT");
        assert_eq!(status.as_u16(), 503, "refused: {body}");
        assert_eq!(body["code"], "bus_unavailable", "{body}");

        let ack = api_publish(&http, &a, key, channel, json!(3)).await;
        acked.push(ack.expect("acked once the replica is back")["offset"].as_u64());

        cluster.kill(replica);
        let started = tokio::time::Instant::now();
        let ack = api_publish(&http, &a, key, channel, json!(4)).await;
        println!("replica killed: acked after {:?}", started.elapsed());
        acked.push(ack.expect("acked without a connected replica")["offset"].as_u64());
        let ack = api_publish(&http, &a, key, channel, json!(5)).await;
        acked.push(ack.expect("acked again")["offset"].as_u64());

        // The refused publication may have been stored: it is offset 2
        // then, and the subscriber gets it too. Nothing acked is missing.
        let last = acked.last().copied().flatten().expect("offset");
        let got = collect(
            &mut sa,
            |g| g.last().is_some_and(|&(o, _)| o >= last),
            Duration::from_secs(10),
        )
        .await;
        for (i, (offset, _)) in got.iter().enumerate() {
            assert_eq!(*offset, i as u64 + 1, "offsets {got:?}");
        }
        let data: Vec<i64> = got.iter().map(|&(_, d)| d).collect();
        for d in [1, 3, 4, 5] {
            assert!(data.contains(&d), "acked publication {d} missing: {got:?}");
        }
        a.shutdown().await;
        let _ = std::fs::remove_file(&path);
    })
    .await;
}

/// A live publication that skips an offset (here: offset 4 is written to
/// the stream behind the bus's back, without its `SPUBLISH`, as when a
/// subscription was re-made after a failover before the instance
/// replayed) is not delivered over the hole: the instance replays the gap
/// from history, so the subscriber gets 4 then 5, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_gap_is_filled_from_history() {
    bus_suite::bounded("a_live_gap_is_filled_from_history", async {
        let cluster = shared();
        let key = "cluster-gap-key-0123456789abcdef";
        let path = api_key_file(key);
        let prefix = unique_prefix("gap");
        let inst = Instance::start(Settings {
            api_key_file: Some(path.clone()),
            ..cluster_settings(&cluster.url(), &prefix, 0)
        })
        .await;
        let channel = "live:gap";
        let mut s = inst.client().await;
        bus_suite::subscribe(&mut s, channel, 1).await;
        let http = reqwest::Client::new();
        for n in 1..=3 {
            let ack = api_publish(&http, &inst, key, channel, json!(n)).await;
            assert_eq!(ack.expect("acked")["offset"], n);
        }
        let got = collect(&mut s, |g| g.len() >= 3, Duration::from_secs(10)).await;
        assert_eq!(got, [(1, 1), (2, 2), (3, 3)]);

        // Offset 4 enters the stream without reaching the subscribers.
        let meta = format!("{prefix}:ch:{{{channel}}}:meta");
        let stream = format!("{prefix}:ch:{{{channel}}}:stream");
        let master = cluster
            .master_of(cluster.key_slot(&meta))
            .expect("a master serves the channel");
        assert_eq!(cli(master, &["hincrby", &meta, "top", "1"]).trim(), "4");
        let body = r#"{"data":4,"senderId":null,"timestamp":0}"#;
        let id = cli(
            master,
            &["xadd", &stream, "0-4", "b", body, "x", "99999999999999"],
        );
        assert_eq!(id.trim(), "0-4");

        let ack = api_publish(&http, &inst, key, channel, json!(5)).await;
        assert_eq!(ack.expect("acked")["offset"], 5);
        let got = collect(&mut s, |g| g.len() >= 2, Duration::from_secs(10)).await;
        assert_eq!(got, [(4, 4), (5, 5)], "the gap is filled, in order");
        inst.shutdown().await;
        let _ = std::fs::remove_file(&path);
    })
    .await;
}
