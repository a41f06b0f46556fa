//! A history rewritten under its subscribers is never a silent gap
//! (`src/broker/redis/recovery.rs`).
//!
//! A Redis that loses a write it already fanned out (a cluster master
//! killed before its replica had it; a restart from `appendfsync
//! everysec`) gives that offset to the next publication. Here the lost
//! write is played by a raw `PUBLISH`/`SPUBLISH` of a numbered message
//! that never entered the stream (a "phantom"): the subscriber gets it at
//! offset 2, then the next real publication is acked at offset 2 too. The
//! subscriber must be told (close 1012, then `recovered:false` from its
//! position), and the channel moves to a new epoch so that nobody holding
//! the old position recovers `true` later. Without the check the real
//! publication is dropped as a duplicate and nobody is told (the test
//! fails).
#![cfg(feature = "redis")]

mod support;
#[macro_use]
#[path = "support/bus_suite.rs"]
mod bus_suite;
#[path = "support/redis_cluster.rs"]
mod redis_cluster;

use std::process::Command;

use bus_suite::{Instance, base_settings, unique_prefix};
use redis_cluster::{RedisCluster, cli};
use serde_json::{Value, json};
use support::{Client, WAIT};
use switchboard::config::Settings;

/// The next `message` frame, skipping join/leave.
async fn next_message(c: &mut Client) -> Value {
    loop {
        let v = c.recv().await;
        if v["type"] != "join" && v["type"] != "leave" {
            return v;
        }
    }
}

/// The case, on an instance with `settings`; `inject(topic, payload)`
/// sends a raw message on the channel's bus topic.
async fn rewritten_history_is_a_new_epoch(
    settings: Settings,
    prefix: &str,
    inject: impl FnOnce(&str, &str),
) {
    let a = Instance::start(settings).await;
    let channel = "chat:rewritten";
    let mut x = a.client().await;
    bus_suite::subscribe(&mut x, channel, 1).await;
    let mut y = a.client().await;
    let publish = async |y: &mut Client, data: &str, id: u64| {
        y.request(
            json!({"type": "publish", "channel": channel, "data": data}),
            id,
        )
        .await
    };

    let first = publish(&mut y, "first", 10).await;
    assert_eq!(first["offset"], 1, "{first}");
    let got = next_message(&mut x).await;
    assert_eq!(got["data"], "first", "{got}");
    let epoch = got["epoch"].as_str().expect("epoch").to_string();

    // The lost write: fanned out at offset 2, never in the stream.
    let topic = format!("{prefix}:ch:{{{channel}}}");
    inject(
        &topic,
        &format!(r#"p {epoch} 2 {{"data":"phantom","senderId":null,"timestamp":1}}"#),
    );
    let phantom = next_message(&mut x).await;
    assert_eq!(
        (phantom["offset"].as_u64(), phantom["data"].as_str()),
        (Some(2), Some("phantom")),
        "{phantom}"
    );

    // The next publication gets offset 2 again.
    let real = publish(&mut y, "real", 11).await;
    assert_eq!(real["offset"], 2, "{real}");
    // X is told: closed for a resubscribe, and "real" is not slipped in
    // as if nothing happened.
    assert_eq!(x.expect_close_before_any_message(WAIT).await, 1012);
    // Its position (E, 2) no longer recovers, here or anywhere.
    let mut x2 = a.client().await;
    x2.send(json!({"type": "subscribe", "channel": channel,
        "since": {"epoch": epoch, "offset": 2}, "id": 20}))
        .await;
    let again = next_message(&mut x2).await;
    assert_eq!(again["type"], "subscribed", "{again}");
    assert_eq!(again["recovered"], false, "{again}");
    assert_ne!(again["epoch"], epoch.as_str(), "a new epoch: {again}");
    // Publishing goes on in the new epoch, after offset 2.
    let next = publish(&mut y, "next", 12).await;
    assert_eq!(next["offset"], 3, "{next}");
    let got = next_message(&mut x2).await;
    assert_eq!(
        (got["data"].as_str(), got["offset"].as_u64()),
        (Some("next"), Some(3)),
        "{got}"
    );
    assert_eq!(got["epoch"], again["epoch"], "{got}");
    drop((x, x2, y));
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redis() {
    bus_suite::bounded("rewrite_one_redis", async {
        let prefix = unique_prefix("rewrite");
        let settings = Settings {
            bus: Some("redis://127.0.0.1:6379".into()),
            bus_prefix: Some(prefix.clone()),
            ..base_settings(&prefix, 0)
        };
        rewritten_history_is_a_new_epoch(settings, &prefix, |topic, payload| {
            let out = Command::new("redis-cli")
                .args(["-p", "6379", "publish", topic, payload])
                .output()
                .expect("redis-cli");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "1",
                "one listener"
            );
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster() {
    bus_suite::bounded("rewrite_redis_cluster", async {
        let cluster = tokio::task::spawn_blocking(RedisCluster::start)
            .await
            .expect("cluster");
        let prefix = unique_prefix("rewrite");
        let settings = Settings {
            bus: Some(cluster.url()),
            bus_prefix: Some(prefix.clone()),
            ..base_settings(&prefix, 0)
        };
        rewritten_history_is_a_new_epoch(settings, &prefix, |topic, payload| {
            let master = cluster
                .master_of(cluster.key_slot(topic))
                .expect("a master serves the topic's slot");
            assert_eq!(
                cli(master, &["spublish", topic, payload]).trim(),
                "1",
                "one listener"
            );
        })
        .await;
    })
    .await;
}
