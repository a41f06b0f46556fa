//! The Pub/Sub bus's channel shards, against the real emulator: an
//! instance receives only the shards its channels need; a shard nothing
//! needs is left (its subscription deleted) and what the instance held of
//! its channels forgotten; an instance new to a channel fills its history
//! from the channel's sequencer, so a subscriber gets the real position,
//! a client that moves here resumes exactly and `GET /api/history` answers
//! everything retained; an instance restarted after a crash reads a
//! subscription of a new name, not the one its crashed incarnation left.
#![cfg(feature = "pubsub")]

mod support;

#[macro_use]
#[path = "support/bus_suite.rs"]
mod bus_suite;

#[path = "support/pubsub_emulator.rs"]
mod pubsub_emulator;

use std::path::PathBuf;
use std::time::Duration;

use bus_suite::{BusFactory, Cluster, Instance, base_settings, bounded, subscribe};
use pubsub_emulator::Emulator;
use serde_json::{Value, json};
use support::{Client, WAIT};
use switchboard::config::Settings;

const PROJECT: &str = "test-project";
const KEY: &str = "shards-api-key-0123456789";

/// Instances on the shared emulator, 2 s presence expiry (so an unneeded
/// shard is left after 2 s), an API key.
struct PubSub {
    host: String,
    key_file: PathBuf,
}

impl BusFactory for PubSub {
    fn settings(&self, prefix: &str, i: usize) -> Settings {
        Settings {
            bus: Some(format!("pubsub://{PROJECT}?emulator={}", self.host)),
            bus_prefix: Some(prefix.into()),
            pubsub_topic: Some(format!("{prefix}-topic")),
            pubsub_subscription: Some(format!("{prefix}-sub{i}")),
            presence_ttl: Some("2s".parse().unwrap()),
            api_key_file: Some(self.key_file.clone()),
            ..base_settings(prefix, i)
        }
    }

    fn presence_expiry(&self) -> Duration {
        Duration::from_secs(2)
    }
}

async fn factory() -> PubSub {
    let key_file = std::env::temp_dir().join(format!(
        "switchboard-shards-key-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&key_file, KEY).unwrap();
    PubSub {
        host: Emulator::shared().await.host(),
        key_file,
    }
}

/// The emulator's subscriptions (full names), from its REST API.
async fn subscription_names(host: &str) -> Vec<String> {
    let url = format!("http://{host}/v1/projects/{PROJECT}/subscriptions?pageSize=100000");
    let body: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    body["subscriptions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Publish `data` on `channel` and wait for the ack.
async fn publish(c: &mut Client, channel: &str, data: Value, id: u64) -> Value {
    let ack = c
        .request(
            json!({"type": "publish", "channel": channel, "data": data}),
            id,
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    ack
}

/// `GET` a history URL with the API key: the answer and its
/// publications' data.
async fn api_history(url: String) -> (Value, Vec<Value>) {
    let h = support::get_json(url, KEY).await;
    let data = h["publications"]
        .as_array()
        .unwrap_or_else(|| panic!("{h}"))
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    (h, data)
}

/// Wait until `cond` holds, polling, within `within`.
async fn until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cond()
}

/// B serves one channel while A publishes to fifty: B reads the control
/// topic and one shard, receives a small part of what A receives, and its
/// subscriber gets exactly its channel's publications. (A first round makes
/// A the channels' sequencer, which is advertised to every instance once
/// per channel; the rounds after it are counted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_receives_only_the_shards_it_needs() {
    const CHANNELS: u64 = 50;
    const ROUNDS: u64 = 3;
    let f = factory().await;
    bounded("an_instance_receives_only_the_shards_it_needs", async {
        let cluster = Cluster::start(&f, "shards-traffic", 2).await;
        let (a, b) = (cluster.get(0), cluster.get(1));
        let mut sub = cluster.client(1).await;
        subscribe(&mut sub, "busy-0", 1).await;
        assert_eq!(b.node.bus_traffic().subscriptions, 2, "control + one shard");
        let mut p = cluster.client(0).await;
        let mut id = 10;
        for ch in 0..CHANNELS {
            id += 1;
            publish(&mut p, &format!("busy-{ch}"), json!("warm-up"), id).await;
        }
        let m = sub.recv_type("message").await;
        assert_eq!(m["data"], "warm-up", "{m}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (a0, b0) = (a.node.bus_traffic(), b.node.bus_traffic());
        for round in 0..ROUNDS {
            for ch in 0..CHANNELS {
                id += 1;
                publish(&mut p, &format!("busy-{ch}"), json!({"r": round}), id).await;
            }
        }
        for round in 0..ROUNDS {
            let m = sub.recv_type("message").await;
            assert_eq!(m["channel"], "busy-0", "{m}");
            assert_eq!(m["data"], json!({"r": round}), "{m}");
        }
        sub.expect_silence(Duration::from_millis(300)).await;
        let (a1, b1) = (a.node.bus_traffic(), b.node.bus_traffic());
        let (got_a, got_b) = (a1.messages - a0.messages, b1.messages - b0.messages);
        eprintln!(
            "received while A published {} to {CHANNELS} channels: A {got_a} messages / {} bytes \
             ({} subscriptions), B {got_b} messages / {} bytes ({} subscriptions)",
            CHANNELS * ROUNDS,
            a1.bytes - a0.bytes,
            a1.subscriptions,
            b1.bytes - b0.bytes,
            b1.subscriptions,
        );
        // A holds a shard per channel it published to (most of them);
        // B only its channel's.
        assert!(a1.subscriptions > 10, "{a1:?}");
        assert_eq!(b1.subscriptions, 2, "{b1:?}");
        // A received every request and numbered copy (2 per publication);
        // B only its shard's (about 2 of the 50 channels). Both receive
        // the same control-topic gossip, which grows with the run's
        // length, so the difference is what is compared: B missed at
        // least three quarters of the channel traffic.
        let channel_traffic = 2 * CHANNELS * ROUNDS;
        assert!(got_a >= channel_traffic, "{got_a}");
        assert!(
            got_a.saturating_sub(got_b) >= channel_traffic * 3 / 4,
            "B {got_b} against A {got_a}"
        );
        drop((sub, p));
        cluster.shutdown().await;
    })
    .await;
}

/// A publishes five; a subscriber on B (new to the channel) gets the real
/// position; once it leaves, B leaves the shard (subscription deleted,
/// history forgotten); three more later, the client resumes on B with
/// `since`: exactly those three (fetched from A, the sequencer), and
/// `GET /api/history` on B answers all eight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_left_shard_is_forgotten_and_filled_again_from_the_sequencer() {
    let f = factory().await;
    bounded("a_left_shard_is_forgotten_and_filled_again", async {
        let cluster = Cluster::start(&f, "shards-leave", 2).await;
        let b = cluster.get(1);
        let channel = "room";
        let mut p = cluster.client(0).await;
        let mut id = 0;
        for n in 0..5 {
            id += 1;
            publish(&mut p, channel, json!({"n": n}), id).await;
        }
        let mut x = cluster.client(1).await;
        let r = subscribe(&mut x, channel, 1).await;
        assert_eq!(r["offset"], 5, "the sequencer's position: {r}");
        let since = json!({"epoch": r["epoch"], "offset": r["offset"]});
        drop(x);

        let left = until(f.presence_expiry() * 3 + WAIT, || {
            b.node.bus_traffic().subscriptions == 1
        })
        .await;
        assert!(
            left,
            "B leaves the unneeded shard: {:?}",
            b.node.bus_traffic()
        );
        let prefix = b.node.config().pubsub_subscription.clone();
        let names = subscription_names(&f.host).await;
        assert!(
            !names.iter().any(|n| n.contains(&format!("{prefix}-c"))),
            "B's shard subscription is deleted: {names:?}"
        );

        for n in 5..8 {
            id += 1;
            publish(&mut p, channel, json!({"n": n}), id).await;
        }
        let mut y = cluster.client(1).await;
        y.send(json!({"type": "subscribe", "channel": channel, "since": since, "id": 2}))
            .await;
        for n in 5..8 {
            let m = y.recv_type("message").await;
            assert_eq!(m["data"], json!({"n": n}), "{m}");
        }
        let s = y.recv_type("subscribed").await;
        assert_eq!(s["recovered"], true, "{s}");
        assert_eq!(s["offset"], 8, "{s}");

        let (h, data) = api_history(b.http(&format!("/api/history/{channel}"))).await;
        let data: Vec<Value> = data.iter().map(|d| d["n"].clone()).collect();
        assert_eq!(data, (0..8).map(|n| json!(n)).collect::<Vec<_>>(), "{h}");
        drop((p, y));
        cluster.shutdown().await;
    })
    .await;
}

/// An instance that never served a channel answers its history: `GET
/// /api/history` on C (no subscriber there, nothing published from there)
/// fills from the sequencer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_on_an_instance_new_to_the_channel() {
    let f = factory().await;
    bounded("history_on_an_instance_new_to_the_channel", async {
        let cluster = Cluster::start(&f, "shards-history", 2).await;
        let mut p = cluster.client(0).await;
        for n in 0..4 {
            publish(&mut p, "news", json!(n), n + 1).await;
        }
        let (h, data) = api_history(
            cluster
                .get(1)
                .http("/api/history/news?reverse=true&limit=2"),
        )
        .await;
        assert_eq!(h["offset"], 4, "{h}");
        assert_eq!(data, vec![json!(3), json!(2)], "{h}");
        drop(p);
        cluster.shutdown().await;
    })
    .await;
}

/// A crash (the runtime dropped where it stands, like kill -9) leaves the
/// instance's subscription behind. Its next incarnation does not delete
/// and recreate that name (the emulator can keep the crashed reader
/// attached to it, and deliver nothing): it deletes it and reads a fresh
/// one of a new name, and serves as before. When that one crashes too,
/// the next deletes the rename it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_a_crash_reads_a_subscription_of_a_new_name() {
    let f = factory().await;
    bounded("stale", async {
        let prefix = bus_suite::unique_prefix("pstale");
        let sub = format!("{prefix}-sub0");
        let full = format!("projects/{PROJECT}/subscriptions/{sub}");
        let first = Instance::start(f.settings(&prefix, 0)).await;
        assert!(subscription_names(&f.host).await.contains(&full));
        first.crash();
        assert!(
            subscription_names(&f.host).await.contains(&full),
            "a crash leaves the subscription"
        );

        let second = Instance::start(f.settings(&prefix, 0)).await;
        let renamed = format!("{full}-r");
        let mut names = Vec::new();
        for _ in 0..50 {
            names = subscription_names(&f.host).await;
            if !names.contains(&full) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            !names.contains(&full),
            "the stale one is deleted: {names:?}"
        );
        assert!(
            names.iter().any(|n| n.starts_with(&renamed)),
            "a fresh one of a new name is read: {names:?}"
        );

        serves(&second, "stale:room", 1).await;

        // The second crashes while it reads the renamed one; the third
        // finds the configured name free, reads it, and deletes the rename
        // the second left behind.
        second.crash();
        let third = Instance::start(f.settings(&prefix, 0)).await;
        for _ in 0..50 {
            names = subscription_names(&f.host).await;
            if !names.iter().any(|n| n.starts_with(&renamed)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            names.contains(&full) && !names.iter().any(|n| n.starts_with(&renamed)),
            "the third reads the configured name and the rename is gone: {names:?}"
        );
        serves(&third, "stale:room", 2).await;
    })
    .await;
}

/// A subscriber on `inst` gets `{"n": n}` published on `channel` there.
async fn serves(inst: &Instance, channel: &str, n: u64) {
    let mut s = inst.client().await;
    subscribe(&mut s, channel, 1).await;
    let mut p = inst.client().await;
    publish(&mut p, channel, json!({"n": n}), 7).await;
    let m = s.recv_type("message").await;
    assert_eq!(m["data"], json!({"n": n}), "{m}");
}
