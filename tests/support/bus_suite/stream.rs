//! The suite's channel-stream cases, run by every bus through the
//! factory: one order and one numbering of a channel on every instance
//! under concurrent publishers, and recovery with `since` on another
//! instance. Part of `bus_suite` (re-exported there, listed in its
//! `bus_suite!` macro).

use std::collections::HashMap;

use serde_json::{Value, json};

use super::{BusFactory, Cluster, QUIET, bounded, recv_no_presence, subscribe};

/// Publishers on three instances publish concurrently into one channel;
/// subscribers on every instance see the same stream: offsets growing by
/// exactly one, no gap, no duplicate, each publisher's order kept, and the
/// acks' offsets are exactly the offsets delivered.
pub async fn channel_order_and_offsets_across_instances(f: &dyn BusFactory) {
    const PER_PUBLISHER: u64 = 30;
    bounded("channel_order_and_offsets_across_instances", async {
        let cluster = Cluster::start(f, "order", 3).await;
        let channel = "ordered:room";
        let mut subs = Vec::new();
        let mut start = None;
        for i in 0..3 {
            let mut s = cluster.client(i).await;
            let r = subscribe(&mut s, channel, 1).await;
            let top = (
                r["epoch"].as_str().unwrap().to_string(),
                r["offset"].as_u64().unwrap(),
            );
            // Nothing is published yet: every subscriber sees the same top.
            assert!(start.as_ref().is_none_or(|s| *s == top), "{r}");
            start = Some(top);
            subs.push(s);
        }
        let (epoch, base) = start.expect("subscribed");

        let mut publishers = Vec::new();
        for i in 0..3 {
            let mut p = cluster.client(i).await;
            publishers.push(tokio::spawn(async move {
                for n in 0..PER_PUBLISHER {
                    p.send(json!({"type": "publish", "channel": channel,
                        "data": {"p": i, "n": n}, "id": n}))
                        .await;
                }
                let mut offsets = Vec::new();
                while offsets.len() < PER_PUBLISHER as usize {
                    let r = p.recv().await;
                    assert_eq!(r["type"], "ack", "{r}");
                    assert_eq!(r["ref"], offsets.len() as u64, "acks in request order");
                    offsets.push(r["offset"].as_u64().expect("ack offset"));
                }
                (p, offsets)
            }));
        }
        let mut acked = Vec::new();
        let mut keep = Vec::new();
        for p in publishers {
            let (p, offsets) = p.await.expect("publisher task");
            assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
            acked.extend(offsets);
            keep.push(p);
        }
        acked.sort_unstable();
        let total = 3 * PER_PUBLISHER;
        assert_eq!(acked, ((base + 1)..=(base + total)).collect::<Vec<_>>());

        let mut orders = Vec::new();
        for (i, s) in subs.iter_mut().enumerate() {
            let mut order = PublisherOrder::new(&epoch, base + 1, 3);
            for _ in 0..total {
                let m = recv_no_presence(s).await;
                order.check(&m, &format!("instance {i}"));
                assert_eq!(m["channel"], channel);
            }
            orders.push(order);
        }
        PublisherOrder::assert_same_everywhere(&orders);
        for s in &mut subs {
            if let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) =
                tokio::time::timeout(QUIET, futures_util::StreamExt::next(&mut s.ws)).await
            {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_ne!(v["type"], "message", "nothing after the last: {v}");
            }
        }
        drop((subs, keep));
        cluster.shutdown().await;
    })
    .await;
}

/// Subscribe on A, disconnect, N publications from B, resubscribe on C
/// with `since`: exactly those N, in order, then `recovered:true`, then
/// live messages.
pub async fn recovery_on_a_different_instance(f: &dyn BusFactory) {
    const MISSED: u64 = 5;
    bounded("recovery_on_a_different_instance", async {
        let cluster = Cluster::start(f, "recovery", 3).await;
        let channel = "rec:room";
        let mut x = cluster.client(0).await;
        let mut p = cluster.client(1).await;
        // Something before the gap, so the position is not just "empty".
        let ack = p
            .request(
                json!({"type": "publish", "channel": channel, "data": "before"}),
                1,
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let r = subscribe(&mut x, channel, 1).await;
        let since = json!({"epoch": r["epoch"], "offset": r["offset"]});
        let base = r["offset"].as_u64().unwrap();
        assert!(base >= 1, "{r}");
        drop(x);

        for n in 0..MISSED {
            let ack = p
                .request(
                    json!({"type": "publish", "channel": channel, "data": {"n": n}}),
                    10 + n,
                )
                .await;
            assert_eq!(ack["type"], "ack", "{ack}");
            assert_eq!(ack["offset"], base + 1 + n, "{ack}");
        }

        let mut y = cluster.client(2).await;
        y.send(json!({"type": "subscribe", "channel": channel, "since": since, "id": 2}))
            .await;
        if f.recovers_across_instances() {
            for n in 0..MISSED {
                let m = recv_no_presence(&mut y).await;
                assert_eq!(m["type"], "message", "{m}");
                assert_eq!(m["offset"], base + 1 + n, "{m}");
                assert_eq!(m["data"]["n"], n);
                assert_eq!(m["epoch"], since["epoch"]);
            }
            let s = recv_no_presence(&mut y).await;
            assert_eq!(s["type"], "subscribed", "{s}");
            assert_eq!(s["recovered"], true, "{s}");
            assert_eq!(s["offset"], base + MISSED);
        } else {
            let s = recv_no_presence(&mut y).await;
            assert_eq!(s["type"], "subscribed", "no partial replay: {s}");
            assert_eq!(s["recovered"], false, "{s}");
        }
        // Live from here on.
        let ack = p
            .request(
                json!({"type": "publish", "channel": channel, "data": "live"}),
                3,
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let m = recv_no_presence(&mut y).await;
        assert_eq!(m["data"], "live", "{m}");
        assert_eq!(m["offset"], ack["offset"]);
        drop((p, y));
        cluster.shutdown().await;
    })
    .await;
}

/// One subscriber's view of a channel that concurrent publishers write
/// into, each publishing `{"p": i, "n": n}` with `n` counting up:
/// [`check`](PublisherOrder::check) asserts that every message is the
/// channel's next and keeps each publisher's order. Shared by the order
/// case here and the Pub/Sub sequencer's (`tests/bus_pubsub_recovery.rs`).
pub struct PublisherOrder {
    /// The epoch every message must carry.
    epoch: String,
    /// The offset the next message must carry (no gap, no duplicate).
    next_offset: u64,
    /// Per publisher, the last `n` delivered: the next must be greater.
    last_n: Vec<Option<u64>>,
    /// `(publisher, n)` in delivery order: every instance must see the
    /// same interleaving.
    pub seen: Vec<(usize, u64)>,
    /// The offset each `(publisher, n)` was delivered at, to compare with
    /// the offsets its ack carried.
    pub offset_of: HashMap<(usize, u64), u64>,
}

impl PublisherOrder {
    /// Expect messages of `epoch` from `publishers` publishers, the first
    /// at offset `first`.
    pub fn new(epoch: &str, first: u64, publishers: usize) -> PublisherOrder {
        PublisherOrder {
            epoch: epoch.to_string(),
            next_offset: first,
            last_n: vec![None; publishers],
            seen: Vec::new(),
            offset_of: HashMap::new(),
        }
    }

    /// `m` is the next frame the subscriber got (join/leave skipped): a
    /// `message` of the epoch at the next offset, after its publisher's
    /// previous one. `on` names the subscriber in a failure.
    pub fn check(&mut self, m: &Value, on: &str) {
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["epoch"], self.epoch.as_str(), "{m}");
        let offset = self.next_offset;
        assert_eq!(
            m["offset"], offset,
            "contiguous on {on}, no gap, no duplicate: {m}"
        );
        self.next_offset += 1;
        let p = m["data"]["p"].as_u64().unwrap() as usize;
        let n = m["data"]["n"].as_u64().unwrap();
        assert!(self.last_n[p].is_none_or(|l| l < n), "publisher order: {m}");
        self.last_n[p] = Some(n);
        self.offset_of.insert((p, n), offset);
        self.seen.push((p, n));
    }

    /// Every subscriber saw the same interleaving.
    pub fn assert_same_everywhere(orders: &[PublisherOrder]) {
        assert!(
            orders.windows(2).all(|w| w[0].seen == w[1].seen),
            "every instance sees the same order"
        );
    }
}
