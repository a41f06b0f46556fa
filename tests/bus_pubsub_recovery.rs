//! Cross-instance recovery on the Pub/Sub bus (the per-channel sequencer),
//! against the real emulator: one order and one numbering on every
//! instance; a client that moves to another instance
//! resumes exactly; instances crashed (their runtime dropped where it
//! stands, like kill -9: no goodbye, no unsubscribe) — a non-sequencer and
//! then the channel's sequencer — leave every resume either exact or
//! `recovered:false`, and a live subscriber misses no acknowledged
//! publication, checked by publication identity; an instance cut off the
//! bus for long tells its subscribers instead of leaving them silent.
#![cfg(feature = "pubsub")]

mod support;

#[macro_use]
#[path = "support/bus_suite.rs"]
mod bus_suite;

#[path = "support/pubsub_emulator.rs"]
mod pubsub_emulator;

/// The TCP proxy that cuts an instance off (kept with the Redis fixtures).
#[path = "support/private_redis.rs"]
mod private_redis;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use bus_suite::{BusFactory, Cluster, PublisherOrder, QUIET, base_settings, subscribe};
use futures_util::StreamExt;
use pubsub_emulator::Emulator;
use serde_json::{Value, json};
use support::Client;
use switchboard::config::Settings;
use tokio_tungstenite::tungstenite::Message;

const PROJECT: &str = "test-project";
/// Longest one frame may take here: a publish can wait for the
/// publication's round trip (10 s) while a dead sequencer is noticed.
const FRAME_WAIT: Duration = Duration::from_secs(20);

/// Four instances on the shared emulator, 2 s presence expiry.
struct PubSub {
    host: String,
}

impl BusFactory for PubSub {
    fn settings(&self, prefix: &str, i: usize) -> Settings {
        Settings {
            bus: Some(format!("pubsub://{PROJECT}?emulator={}", self.host)),
            bus_prefix: Some(prefix.into()),
            pubsub_topic: Some(format!("{prefix}-topic")),
            pubsub_subscription: Some(format!("{prefix}-sub{i}")),
            presence_ttl: Some("2s".parse().unwrap()),
            ..base_settings(prefix, i)
        }
    }

    fn distinct_instances(&self) -> usize {
        4
    }

    fn presence_expiry(&self) -> Duration {
        Duration::from_secs(2)
    }
}

async fn factory() -> PubSub {
    PubSub {
        host: Emulator::shared().await.host(),
    }
}

/// The next text frame that is not join/leave, within [`FRAME_WAIT`].
async fn next(c: &mut Client) -> Value {
    loop {
        let msg = tokio::time::timeout(FRAME_WAIT, c.ws.next())
            .await
            .expect("a frame arrives in time")
            .expect("the connection is open")
            .expect("no protocol error");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] != "join" && v["type"] != "leave" {
                return v;
            }
        }
    }
}

/// Publish `{"n": n}`; the ack's offset, or `None` if the bus refused it
/// (an error reply: not acknowledged, may be retried).
async fn publish(p: &mut Client, channel: &str, n: u64) -> Option<u64> {
    p.send(json!({"type": "publish", "channel": channel, "data": {"n": n}, "id": n}))
        .await;
    loop {
        let r = next(p).await;
        if r["ref"] != json!(n) {
            continue;
        }
        return (r["type"] == "ack").then(|| r["offset"].as_u64().unwrap());
    }
}

/// Publish `n` until acknowledged (a dead sequencer is replaced meanwhile);
/// every attempt gets a new number, returned with the ack.
async fn publish_acked(p: &mut Client, channel: &str, n: &mut u64) -> (u64, u64) {
    for _ in 0..20 {
        *n += 1;
        if let Some(offset) = publish(p, channel, *n).await {
            return (*n, offset);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no publication acknowledged after 20 attempts");
}

/// The instance index whose id names the epoch's sequencer.
fn sequencer_of(cluster: &Cluster, epoch: &str) -> usize {
    let id = epoch.rsplit_once('.').expect("epoch names its sequencer").0;
    (0..cluster.len())
        .find(|i| cluster.get(*i).node.instance_id() == id)
        .unwrap_or_else(|| panic!("no instance {id}"))
}

/// The `n` of each message, in order.
fn numbers(messages: &[Value]) -> impl Iterator<Item = u64> + '_ {
    messages.iter().map(|m| m["data"]["n"].as_u64().unwrap())
}

/// Resume with `since`: the replayed messages and the `subscribed` reply.
async fn resume(c: &mut Client, channel: &str, since: &Value) -> (Vec<Value>, Value) {
    c.send(json!({"type": "subscribe", "channel": channel, "since": since, "id": 77}))
        .await;
    let mut replayed = Vec::new();
    loop {
        let m = next(c).await;
        match m["type"].as_str() {
            Some("message") => replayed.push(m),
            Some("subscribed") => return (replayed, m),
            _ => panic!("unexpected {m}"),
        }
    }
}

/// A subscriber on A receives 1..n, leaves; publications continue; it
/// resumes with `since` on B: `recovered:true`, exactly the missed ones,
/// in order, in the same epoch; then live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moving_to_another_instance_resumes_exactly() {
    const N: u64 = 5;
    let f = factory().await;
    bus_suite::bounded("move", async {
        let cluster = Cluster::start(&f, "pmove", 3).await;
        let channel = "move:room";
        let mut p = cluster.client(2).await;
        let mut a = cluster.client(0).await;
        let mut n = 0;
        publish_acked(&mut p, channel, &mut n).await;
        let r = subscribe(&mut a, channel, 1).await;
        let epoch0 = r["epoch"].as_str().unwrap().to_string();
        let mut last = r["offset"].as_u64().unwrap();
        assert_eq!(last, 1, "{r}");
        for _ in 0..N {
            let (k, offset) = publish_acked(&mut p, channel, &mut n).await;
            let m = next(&mut a).await;
            assert_eq!(m["data"]["n"], k, "{m}");
            assert_eq!(m["epoch"], epoch0.as_str(), "one epoch everywhere: {m}");
            assert_eq!(m["offset"], offset, "the ack's offset is the delivered one");
            last = offset;
        }
        drop(a);
        let mut missed = Vec::new();
        for _ in 0..N {
            let (k, offset) = publish_acked(&mut p, channel, &mut n).await;
            missed.push((k, epoch0.clone(), offset));
        }
        let mut b = cluster.client(1).await;
        let since = json!({"epoch": epoch0, "offset": last});
        let (replayed, s) = resume(&mut b, channel, &since).await;
        assert_eq!(s["recovered"], true, "{s}");
        let got: Vec<(u64, String, u64)> = replayed
            .iter()
            .map(|m| {
                (
                    m["data"]["n"].as_u64().unwrap(),
                    m["epoch"].as_str().unwrap().to_string(),
                    m["offset"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, missed, "exactly the missed ones, in order");
        let (k, offset) = publish_acked(&mut p, channel, &mut n).await;
        let m = next(&mut b).await;
        assert_eq!(
            (m["data"]["n"].as_u64(), m["offset"].as_u64()),
            (Some(k), Some(offset))
        );
        b.expect_silence(QUIET).await;
        drop((p, b));
        cluster.shutdown().await;
    })
    .await;
}

/// Crash a non-sequencer instance, then the channel's sequencer. A live
/// subscriber on a survivor receives every acknowledged publication, once;
/// a subscriber that left before the crash resumes on a survivor either
/// exactly (every acknowledged publication after its position) or with
/// `recovered:false` — never a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_instances_leave_no_silent_gap() {
    let f = factory().await;
    bus_suite::bounded("crash", async {
        let mut cluster = Cluster::start(&f, "pcrash", 4).await;
        let channel = "crash:room";
        // Find the sequencer, then place everyone around it.
        let mut p0 = cluster.client(0).await;
        let mut n = 0;
        publish_acked(&mut p0, channel, &mut n).await;
        let r = subscribe(&mut p0, channel, 1).await;
        let epoch0 = r["epoch"].as_str().unwrap().to_string();
        drop(p0);
        let seq = sequencer_of(&cluster, &epoch0);
        let others: Vec<usize> = (0..4).filter(|i| *i != seq).collect();
        let (victim, pub_at, live_at) = (others[0], others[1], others[2]);

        let mut p = cluster.client(pub_at).await;
        let mut live = cluster.client(live_at).await;
        subscribe(&mut live, channel, 1).await;
        // A subscriber on the instance about to crash.
        let mut moving = cluster.client(victim).await;
        let r = subscribe(&mut moving, channel, 1).await;
        let mut acked = BTreeSet::new();
        let mut since = json!({"epoch": r["epoch"], "offset": r["offset"]});
        for _ in 0..5 {
            let (k, offset) = publish_acked(&mut p, channel, &mut n).await;
            acked.insert(k);
            let m = next(&mut moving).await;
            assert_eq!(m["data"]["n"], k, "{m}");
            assert_eq!(m["offset"], offset, "{m}");
            since = json!({"epoch": m["epoch"], "offset": offset});
        }
        // kill -9 of a non-sequencer instance, with its subscriber.
        drop(moving);
        cluster.crash(victim);
        let mut after_victim = Vec::new();
        for _ in 0..5 {
            let (k, _) = publish_acked(&mut p, channel, &mut n).await;
            acked.insert(k);
            after_victim.push(k);
        }
        let mut moved = cluster.client(live_at).await;
        let (replayed, s) = resume(&mut moved, channel, &since).await;
        assert_eq!(s["recovered"], true, "the sequencer lives: {s}");
        let got: Vec<u64> = numbers(&replayed).collect();
        assert_eq!(got, after_victim, "exactly what was missed");
        drop(moved);

        // A subscriber that leaves just before the sequencer dies.
        let mut leaving = cluster.client(pub_at).await;
        let r = subscribe(&mut leaving, channel, 1).await;
        let since = json!({"epoch": r["epoch"], "offset": r["offset"]});
        drop(leaving);
        // kill -9 of the sequencer.
        cluster.crash(seq);
        let mut after_seq = BTreeSet::new();
        for _ in 0..5 {
            let (k, _) = publish_acked(&mut p, channel, &mut n).await;
            acked.insert(k);
            after_seq.insert(k);
        }

        let mut back = cluster.client(live_at).await;
        let (replayed, s) = resume(&mut back, channel, &since).await;
        if s["recovered"] == true {
            let got: BTreeSet<u64> = numbers(&replayed).collect();
            assert!(
                after_seq.is_subset(&got),
                "recovered means nothing missed: {got:?}"
            );
        } else {
            assert_eq!(s["recovered"], false, "{s}");
            assert!(replayed.is_empty(), "no partial replay");
        }

        // The live subscriber saw every publication acknowledged before the
        // sequencer died, once, in the first epoch; at the new epoch (a new
        // sequencer) it is asked to reconnect (1012), not moved into it:
        // it may lack the old epoch's end, and reconnecting tells it so.
        let mut seen = Vec::new();
        let mut epochs = HashSet::new();
        let mut closed = None;
        loop {
            match tokio::time::timeout(Duration::from_secs(2), live.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "message" {
                        seen.push(v["data"]["n"].as_u64().unwrap());
                        epochs.insert(v["epoch"].as_str().unwrap().to_string());
                    }
                }
                Ok(Some(Ok(Message::Close(f)))) => {
                    closed = f.map(|f| u16::from(f.code));
                    break;
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        assert_eq!(closed, Some(1012), "told to reconnect at the new epoch");
        assert_eq!(epochs, HashSet::from([epoch0.clone()]), "{epochs:?}");
        let unique: BTreeSet<u64> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "no publication twice: {seen:?}");
        let live_acked: BTreeSet<u64> = acked
            .iter()
            .copied()
            .filter(|k| *k > 1 && !after_seq.contains(k))
            .collect();
        assert!(
            live_acked.is_subset(&unique),
            "every publication acknowledged before the new epoch delivered live: missing {:?}",
            live_acked.difference(&unique).collect::<Vec<_>>()
        );
        drop((p, live, back));
        cluster.shutdown().await;
    })
    .await;
}

/// Concurrent publishers on three instances: every instance sees the same
/// interleaving under the same `(epoch, offset)` (the channel's
/// sequencer numbers them; the epoch names it), contiguous, each
/// publisher's order kept, and the acks carry the delivered offsets.
/// A subscriber that came before the channel's first publication sees its
/// instance's placeholder epoch until then, so the channel is started
/// first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_order_and_offsets_are_shared() {
    const PER_PUBLISHER: u64 = 20;
    let f = factory().await;
    bus_suite::bounded("order", async {
        let cluster = Cluster::start(&f, "porder", 3).await;
        let channel = "ordered:room";
        let mut first = cluster.client(0).await;
        let ack = first
            .request(
                json!({"type": "publish", "channel": channel, "data": "first"}),
                1,
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["offset"], 1, "{ack}");
        let mut subs = Vec::new();
        let mut epochs = HashSet::new();
        for i in 0..3 {
            let mut s = cluster.client(i).await;
            // Every instance stores the sequenced copy: wait until it has.
            let node = cluster.get(i).node.clone();
            assert!(
                support::eventually(|| {
                    let node = node.clone();
                    async move {
                        let Ok(ch) = node.channel(channel) else {
                            return false;
                        };
                        node.position(ch).await.is_ok_and(|p| p.offset == 1)
                    }
                })
                .await
            );
            let r = subscribe(&mut s, channel, 1).await;
            assert_eq!(r["offset"], 1, "{r}");
            let epoch = r["epoch"].as_str().unwrap().to_string();
            let sequencer = epoch.rsplit_once('.').unwrap().0;
            assert!(
                (0..3).any(|j| cluster.get(j).node.instance_id() == sequencer),
                "the epoch names the sequencer: {epoch}"
            );
            epochs.insert(epoch);
            subs.push(s);
        }
        assert_eq!(epochs.len(), 1, "one epoch everywhere: {epochs:?}");
        let epoch = epochs.into_iter().next().unwrap();

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
                    let r = next(&mut p).await;
                    assert_eq!(r["type"], "ack", "{r}");
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
            acked.push(offsets);
            keep.push(p);
        }
        let total = 3 * PER_PUBLISHER;
        let mut orders = Vec::new();
        for (i, s) in subs.iter_mut().enumerate() {
            let mut order = PublisherOrder::new(&epoch, 2, 3);
            for _ in 0..total {
                order.check(&next(s).await, &format!("instance {i}"));
            }
            // The acks of every publisher are the offsets delivered.
            for (j, acks) in acked.iter().enumerate() {
                let theirs: Vec<u64> = (0..PER_PUBLISHER)
                    .map(|n| order.offset_of[&(j, n)])
                    .collect();
                assert_eq!(&theirs, acks, "acks are the delivered offsets");
            }
            orders.push(order);
        }
        PublisherOrder::assert_same_everywhere(&orders);
        for s in &mut subs {
            s.expect_silence(QUIET).await;
        }
        drop((subs, keep));
        cluster.shutdown().await;
    })
    .await;
}

/// Instance 0 reaches the emulator through a proxy (which the test cuts);
/// the others directly.
struct ProxiedPubSub {
    direct: PubSub,
    via: String,
}

impl BusFactory for ProxiedPubSub {
    fn settings(&self, prefix: &str, i: usize) -> Settings {
        let mut s = self.direct.settings(prefix, i);
        if i == 0 {
            s.bus = Some(format!("pubsub://{PROJECT}?emulator={}", self.via));
        }
        s
    }

    fn distinct_instances(&self) -> usize {
        2
    }

    fn presence_expiry(&self) -> Duration {
        self.direct.presence_expiry()
    }
}

/// An instance cut off the bus for longer than `STALL_NOTICE` does not
/// leave its subscribers silent: they are closed with 1012 (reconnect and
/// recover elsewhere), and a resume on the other instance gets every
/// publication acknowledged meanwhile.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_off_for_long_tells_its_subscribers() {
    use switchboard::broker::pubsub::STALL_NOTICE;
    let direct = factory().await;
    let upstream = direct.host.parse().expect("emulator address");
    let proxy = private_redis::Proxy::start(upstream).await;
    let f = ProxiedPubSub {
        direct,
        via: proxy.addr.to_string(),
    };
    bus_suite::bounded("stall", async {
        let cluster = Cluster::start(&f, "pstall", 2).await;
        let channel = "stall:room";
        let mut sub = cluster.client(0).await;
        subscribe(&mut sub, channel, 1).await;
        let mut p = cluster.client(1).await;
        let mut n = 0;
        let (k, _) = publish_acked(&mut p, channel, &mut n).await;
        let m = next(&mut sub).await;
        assert_eq!(m["data"]["n"], k, "{m}");
        let since = json!({"epoch": m["epoch"], "offset": m["offset"]});

        proxy.cut().await;
        let cut_at = tokio::time::Instant::now();
        let mut acked = Vec::new();
        for _ in 0..3 {
            acked.push(publish_acked(&mut p, channel, &mut n).await.0);
        }
        // Told within the notice and two heartbeats (2 s / 3 each), not
        // left silent while the instance reconnects.
        let code = sub
            .expect_close_before_any_message(STALL_NOTICE + Duration::from_secs(5))
            .await;
        assert_eq!(code, 1012);
        assert!(
            cut_at.elapsed() >= STALL_NOTICE,
            "told before the notice time"
        );
        // It recovers on the instance that is not cut off.
        let mut moved = cluster.client(1).await;
        let (replayed, r) = resume(&mut moved, channel, &since).await;
        assert_eq!(r["recovered"], true, "{r}");
        let got: Vec<u64> = numbers(&replayed).collect();
        assert_eq!(got, acked);

        // Back on the bus, the instance serves the channel again (on a new
        // subscription, see `stall`): a subscriber there gets what comes.
        // Until its bus is back it refuses new connections (1011 `bus
        // unavailable`, at once while its control stream is down) and
        // subscribes to the stalled shard (`bus_unavailable`). The control
        // stream may take one stream-open timeout to come back (the
        // emulator keeps the cut-off stream attached; see `stall`).
        proxy.restore();
        let ws = cluster.get(0).url("/ws");
        let mut back = None;
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        while back.is_none() && tokio::time::Instant::now() < until {
            if let Ok(mut c) = Client::try_connect_url(&ws).await {
                c.send(json!({"type": "subscribe", "channel": channel, "id": 1}))
                    .await;
                if next(&mut c).await["type"] == "subscribed" {
                    back = Some(c);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut back = back.expect("subscribed again on the instance back on the bus");
        let (k, _) = publish_acked(&mut p, channel, &mut n).await;
        let m = next(&mut back).await;
        assert_eq!(m["data"]["n"], k, "{m}");
    })
    .await;
}
