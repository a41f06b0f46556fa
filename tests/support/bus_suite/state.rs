//! The suite's channel-state cases (issue 19), run by every bus through
//! the same factory: newest-first history, idempotent publish,
//! conditional publish under racing writers, last-value channels. Part of
//! `bus_suite` (re-exported there, listed in its `bus_suite!` macro).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use switchboard::config::{NamespaceSettings, Settings};

use super::{BusFactory, Cluster, QUIET, bounded, recv_no_presence, subscribe};
use crate::support::Client;

/// A publish with extra fields; returns the reply.
async fn publish(c: &mut Client, channel: &str, data: Value, extra: Value, id: u64) -> Value {
    let mut frame = json!({"type": "publish", "channel": channel, "data": data});
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            frame[k] = v;
        }
    }
    c.request(frame, id).await
}

/// `history` with `reverse`, newest first: the newest N, and those after
/// `since`; the same through the server API's `GET /api/history`.
pub async fn history_newest_first(f: &dyn BusFactory) {
    bounded("history_newest_first", async {
        let cluster = Cluster::start(f, "newest", 2).await;
        let channel = "hist:room";
        let mut p = cluster.client(1).await;
        let mut first = 0;
        for n in 0..6u64 {
            let ack = publish(&mut p, channel, json!({"n": n}), json!({}), 10 + n).await;
            assert_eq!(ack["type"], "ack", "{ack}");
            if n == 0 {
                first = ack["offset"].as_u64().unwrap();
            }
        }
        let mut r = cluster.client(0).await;
        let h = r
            .request(
                json!({"type": "history", "channel": channel, "limit": 3, "reverse": true}),
                1,
            )
            .await;
        assert_eq!(h["type"], "history", "{h}");
        let offsets: Vec<u64> = h["publications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, vec![first + 5, first + 4, first + 3], "{h}");
        assert_eq!(h["publications"][0]["data"]["n"], 5);
        assert_eq!(h["offset"], first + 5);
        let since = json!({"epoch": h["epoch"], "offset": first + 3});
        let h = r
            .request(
                json!({"type": "history", "channel": channel, "since": since, "reverse": true}),
                2,
            )
            .await;
        let offsets: Vec<u64> = h["publications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, vec![first + 5, first + 4], "after since: {h}");
        // Oldest first stays the default.
        let h = r
            .request(
                json!({"type": "history", "channel": channel, "limit": 2}),
                3,
            )
            .await;
        assert_eq!(h["publications"][0]["offset"], first, "{h}");
        let bad = r
            .request(
                json!({"type": "history", "channel": channel, "reverse": 1}),
                4,
            )
            .await;
        assert_eq!(bad["code"], "invalid_frame", "{bad}");
        drop((p, r));
        cluster.shutdown().await;
    })
    .await;
}

/// The same idempotency key published twice, from two instances: one
/// publication, both acks carry its offset; a bad key is refused. A bus
/// that cannot give it refuses the key with `unsupported`.
pub async fn idempotent_publish_across_instances(f: &dyn BusFactory) {
    bounded("idempotent_publish_across_instances", async {
        let cluster = Cluster::start(f, "idem", 3).await;
        let channel = "idem:orders";
        let mut s = cluster.client(2).await;
        subscribe(&mut s, channel, 1).await;
        let mut a = cluster.client(0).await;
        let mut b = cluster.client(1).await;
        let key = json!({"idempotencyKey": "order-42"});
        let first = publish(&mut a, channel, json!("first"), key.clone(), 1).await;
        if !f.publish_conditions() {
            assert_eq!(first["code"], "unsupported", "{first}");
            drop((s, a, b));
            cluster.shutdown().await;
            return;
        }
        assert_eq!(first["type"], "ack", "{first}");
        let again = publish(&mut b, channel, json!("retry"), key.clone(), 2).await;
        assert_eq!(again["type"], "ack", "{again}");
        assert_eq!(
            again["offset"], first["offset"],
            "the first publication's ack"
        );
        let again = publish(&mut a, channel, json!("retry 2"), key, 3).await;
        assert_eq!(again["offset"], first["offset"], "{again}");
        let m = recv_no_presence(&mut s).await;
        assert_eq!(m["data"], "first", "{m}");
        // Another key publishes.
        let other = publish(
            &mut b,
            channel,
            json!("second"),
            json!({"idempotencyKey": "order-43"}),
            4,
        )
        .await;
        assert_eq!(other["offset"], first["offset"].as_u64().unwrap() + 1);
        let m = recv_no_presence(&mut s).await;
        assert_eq!(m["data"], "second", "only one copy of the first: {m}");
        s.expect_silence(QUIET).await;
        for (bad, id) in [(json!(""), 5), (json!("k".repeat(129)), 6)] {
            let r = publish(
                &mut a,
                channel,
                json!(1),
                json!({"idempotencyKey": bad}),
                id,
            )
            .await;
            assert_eq!(r["code"], "invalid_idempotency_key", "{r}");
        }
        let ok = publish(
            &mut a,
            channel,
            json!(1),
            json!({"idempotencyKey": "k".repeat(128)}),
            7,
        )
        .await;
        assert_eq!(ok["type"], "ack", "128 bytes is fine: {ok}");
        drop((s, a, b));
        cluster.shutdown().await;
    })
    .await;
}

/// Writers on every instance race with `expectedOffset`: each accepted
/// write got the offset after the one it expected, exactly one write wins
/// per offset, and the offsets are gap-free; a refusal carries the
/// current top and publishes nothing.
pub async fn conditional_publish_races(f: &dyn BusFactory) {
    const WRITERS: usize = 6;
    const TARGET: u64 = 30;
    bounded("conditional_publish_races", async {
        let cluster = Cluster::start(f, "cas", 3).await;
        let channel = "cas:counter";
        let mut c = cluster.client(0).await;
        let seed = publish(&mut c, channel, json!("seed"), json!({}), 1).await;
        assert_eq!(seed["type"], "ack", "{seed}");
        let base = seed["offset"].as_u64().unwrap();
        let stale = publish(
            &mut c,
            channel,
            json!("stale"),
            json!({"expectedOffset": base - 1}),
            2,
        )
        .await;
        if !f.publish_conditions() {
            assert_eq!(stale["code"], "unsupported", "{stale}");
            drop(c);
            cluster.shutdown().await;
            return;
        }
        assert_eq!(stale["code"], "offset_mismatch", "{stale}");
        assert_eq!(stale["offset"], base, "the current top: {stale}");
        assert!(stale["epoch"].is_string(), "{stale}");
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let mut c = cluster.client(w).await;
            writers.push(tokio::spawn(async move {
                let mut known = base;
                let mut won = Vec::new();
                for attempt in 0..(TARGET * 20) {
                    if known >= base + TARGET {
                        break;
                    }
                    let r = publish(
                        &mut c,
                        channel,
                        json!({"w": w, "expected": known}),
                        json!({"expectedOffset": known}),
                        100 + attempt,
                    )
                    .await;
                    match r["type"].as_str() {
                        Some("ack") => {
                            let offset = r["offset"].as_u64().unwrap();
                            assert_eq!(offset, known + 1, "saw the offset it expected: {r}");
                            won.push(offset);
                            known = offset;
                        }
                        _ => {
                            assert_eq!(r["code"], "offset_mismatch", "{r}");
                            let top = r["offset"].as_u64().unwrap();
                            assert!(top != known, "a refusal names another top: {r}");
                            known = top;
                        }
                    }
                }
                won
            }));
        }
        let mut winners: BTreeMap<u64, usize> = BTreeMap::new();
        for (w, task) in writers.into_iter().enumerate() {
            for offset in task.await.expect("writer") {
                assert!(
                    winners.insert(offset, w).is_none(),
                    "offset {offset} won twice"
                );
            }
        }
        let won: Vec<u64> = winners.keys().copied().collect();
        let last = *won.last().unwrap();
        assert!(last >= base + TARGET, "{won:?}");
        assert_eq!(
            won,
            ((base + 1)..=last).collect::<Vec<_>>(),
            "gap-free, one winner per offset"
        );
        // History agrees: each publication says what it expected.
        let h = c
            .request(
                json!({"type": "history", "channel": channel, "limit": 100, "reverse": true}),
                3,
            )
            .await;
        assert_eq!(h["offset"], last, "{h}");
        for p in h["publications"].as_array().unwrap() {
            if p["offset"].as_u64().unwrap() > base {
                assert_eq!(
                    p["data"]["expected"],
                    p["offset"].as_u64().unwrap() - 1,
                    "{p}"
                );
            }
        }
        drop(c);
        cluster.shutdown().await;
    })
    .await;
}

/// The settings tweak of the last-value case: namespace `lv` with
/// `cache = true`.
fn with_cache(s: &mut Settings) {
    s.namespaces.insert(
        "lv".into(),
        NamespaceSettings {
            cache: Some(true),
            history_size: Some(10),
            ..Default::default()
        },
    );
}

/// In a last-value namespace, `subscribe` delivers the newest publication
/// before `subscribed`, on any instance; with a `since` that is up to date
/// nothing extra; with a stale epoch the newest and `recovered:false`.
pub async fn last_value_channel_across_instances(f: &dyn BusFactory) {
    bounded("last_value_channel_across_instances", async {
        let cluster = Cluster::start_with(f, "lastvalue", 2, with_cache).await;
        let channel = "lv:ticker";
        let mut empty = cluster.client(1).await;
        let s = empty
            .request(json!({"type": "subscribe", "channel": channel}), 1)
            .await;
        assert_eq!(s["type"], "subscribed", "nothing yet, nothing sent: {s}");
        let mut p = cluster.client(0).await;
        for n in 0..3 {
            let ack = publish(&mut p, channel, json!({"price": n}), json!({}), 10 + n).await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
        let mut late = cluster.client(1).await;
        late.send(json!({"type": "subscribe", "channel": channel, "id": 2}))
            .await;
        let m = recv_no_presence(&mut late).await;
        assert_eq!(m["type"], "message", "the latest first: {m}");
        assert_eq!(m["data"]["price"], 2, "{m}");
        let s = recv_no_presence(&mut late).await;
        assert_eq!(s["type"], "subscribed", "{s}");
        assert_eq!(s["offset"], m["offset"], "{s}");
        // Up to date: nothing extra.
        let since = json!({"epoch": s["epoch"], "offset": s["offset"]});
        let mut back = cluster.client(0).await;
        back.send(json!({"type": "subscribe", "channel": channel, "since": since, "id": 3}))
            .await;
        let s2 = recv_no_presence(&mut back).await;
        assert_eq!(s2["type"], "subscribed", "{s2}");
        assert_eq!(s2["recovered"], true, "{s2}");
        // A stale epoch: the latest, then recovered:false.
        let mut stale = cluster.client(1).await;
        stale
            .send(json!({"type": "subscribe", "channel": channel,
                "since": {"epoch": "gone", "offset": 1}, "id": 4}))
            .await;
        let m = recv_no_presence(&mut stale).await;
        assert_eq!(m["data"]["price"], 2, "{m}");
        let s3 = recv_no_presence(&mut stale).await;
        assert_eq!(s3["type"], "subscribed", "{s3}");
        assert_eq!(s3["recovered"], false, "{s3}");
        for n in 0..3 {
            let m = recv_no_presence(&mut empty).await;
            assert_eq!(m["data"]["price"], n, "live before: {m}");
        }
        // Live from here, once.
        let ack = publish(&mut p, channel, json!({"price": 3}), json!({}), 20).await;
        for c in [&mut late, &mut back, &mut stale, &mut empty] {
            let m = recv_no_presence(c).await;
            assert_eq!(m["offset"], ack["offset"], "{m}");
        }
        late.expect_silence(QUIET).await;
        drop((p, late, back, stale, empty));
        cluster.shutdown().await;
    })
    .await;
}
