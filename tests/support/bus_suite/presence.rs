//! The suite's presence cases, run by every bus through the factory:
//! members and join/leave across instances, a member seen in presence
//! getting what is published next, and the members of a crashed instance
//! expiring (and leaving exactly once). Part of `bus_suite`
//! (re-exported there; `crashed_members_leave_once` is run by the
//! multi-instance buses themselves, not by `bus_suite!`).

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};

use super::{
    BusFactory, Cluster, bounded, members, subscribe, until_members, until_unknown_target,
};
use crate::support::{Client, WAIT};

/// Presence lists the members of every instance; join and leave reach
/// subscribers on other instances.
pub async fn presence_across_instances(f: &dyn BusFactory) {
    bounded("presence_across_instances", async {
        let cluster = Cluster::start(f, "presence", 3).await;
        let channel = "pres:room";
        let mut a = cluster.client(0).await;
        // B has a display name: it travels with its presence entry.
        let mut b = Client::connect_url(&format!("{}?name=Bea", cluster.get(1).url("/ws"))).await;
        let mut c = cluster.client(2).await;
        subscribe(&mut a, channel, 1).await;
        subscribe(&mut b, channel, 1).await;
        let j = a.recv_type("join").await;
        assert_eq!(j["clientId"], b.id.as_str(), "{j}");
        assert_eq!(j["channel"], channel);
        assert_eq!(j["name"], "Bea", "{j}");

        let expected: HashSet<String> = [a.id.clone(), b.id.clone()].into();
        assert_eq!(members(&mut c, channel, 2).await, expected, "seen from C");
        let r = c
            .request(json!({"type": "presence", "channel": channel}), 20)
            .await;
        let named: Vec<&Value> = r["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["name"] == "Bea")
            .collect();
        assert_eq!(named.len(), 1, "{r}");
        assert_eq!(named[0]["clientId"], b.id.as_str());
        assert_eq!(members(&mut a, channel, 3).await, expected, "seen from A");

        let r = b
            .request(json!({"type": "unsubscribe", "channel": channel}), 4)
            .await;
        assert_eq!(r["type"], "unsubscribed", "{r}");
        let l = a.recv_type("leave").await;
        assert_eq!(l["clientId"], b.id.as_str(), "{l}");
        let only_a: HashSet<String> = [a.id.clone()].into();
        assert_eq!(members(&mut c, channel, 5).await, only_a);

        // A disconnect is a leave too.
        subscribe(&mut c, channel, 6).await;
        assert_eq!(a.recv_type("join").await["clientId"], c.id.as_str());
        let c_id = c.id.clone();
        drop(c);
        let l = a.recv_type("leave").await;
        assert_eq!(l["clientId"], c_id.as_str(), "{l}");
        assert_eq!(members(&mut b, channel, 7).await, only_a);
        drop((a, b));
        cluster.shutdown().await;
    })
    .await;
}

/// A member shows in presence only once its position is fixed: whoever
/// sees it there and then publishes (from another instance) reaches it.
/// Ten rounds, each on a channel that already holds a publication, each
/// watched by a client polling presence without pause.
pub async fn a_member_seen_in_presence_gets_what_comes_next(f: &dyn BusFactory) {
    bounded("a_member_seen_in_presence_gets_what_comes_next", async {
        // The watcher polls without pause: no rate limit.
        let cluster = Cluster::start_with(f, "seen", 2, |s| s.rate_limit = Some(0.0)).await;
        let mut watcher = cluster.client(0).await;
        let mut publisher = cluster.client(1).await;
        let mut id = 100;
        for round in 0..10 {
            let channel = format!("seen:r{round}");
            publish_n(&mut publisher, &channel, 0, &mut id).await;
            // Subscribe without waiting for the answer, and publish as soon
            // as the member shows in presence.
            let mut member = cluster.client(0).await;
            member
                .send(json!({"type": "subscribe", "channel": channel, "id": 1}))
                .await;
            loop {
                id += 1;
                if members(&mut watcher, &channel, id)
                    .await
                    .contains(&member.id)
                {
                    break;
                }
            }
            publish_n(&mut publisher, &channel, 1, &mut id).await;
            let s = member.recv_type("subscribed").await;
            assert_eq!(s["channel"], channel.as_str(), "{s}");
            loop {
                let m = member.recv_type("message").await;
                if m["data"]["n"] == 1 {
                    break;
                }
                // The earlier publication may still be on its way to this
                // instance (Pub/Sub): then it comes first.
                assert_eq!(m["data"]["n"], 0, "round {round}: {m}");
            }
        }
        drop((watcher, publisher));
        cluster.shutdown().await;
    })
    .await;
}

/// Publish `{"n": n}` on `channel` and wait for the ack.
async fn publish_n(c: &mut Client, channel: &str, n: u64, id: &mut u64) {
    *id += 1;
    let r = c
        .request(
            json!({"type": "publish", "channel": channel, "data": {"n": n}}),
            *id,
        )
        .await;
    assert_eq!(r["type"], "ack", "{r}");
}

/// An instance dies without cleaning up: its members leave the presence of
/// the others, and its clients stop resolving as direct targets, within
/// the bus's documented expiry.
pub async fn presence_of_a_crashed_instance_expires(f: &dyn BusFactory) {
    if f.distinct_instances() < 2 {
        eprintln!("presence_of_a_crashed_instance_expires: needs two instances; skipped");
        return;
    }
    bounded("presence_of_a_crashed_instance_expires", async {
        let mut cluster = Cluster::start(f, "crash", 2).await;
        let channel = "pres:crash";
        let mut a = cluster.client(0).await;
        let mut b = cluster.client(1).await;
        subscribe(&mut a, channel, 1).await;
        subscribe(&mut b, channel, 1).await;
        let both: HashSet<String> = [a.id.clone(), b.id.clone()].into();
        assert_eq!(members(&mut a, channel, 2).await, both);
        let ack = a
            .request(json!({"type": "direct", "targetId": b.id, "data": 1}), 3)
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");

        cluster.crash(1);
        let b_id = b.id.clone();
        let only_a: HashSet<String> = [a.id.clone()].into();
        let within = f.presence_expiry() * 2 + WAIT;
        assert!(
            until_members(&mut a, channel, &only_a, within).await,
            "the crashed instance's member expires within {within:?}"
        );
        assert!(
            until_unknown_target(&mut a, &b_id, within).await,
            "the crashed instance's client stops resolving"
        );
        drop((a, b));
        cluster.shutdown().await;
    })
    .await;
}

/// An instance dies without cleaning up: the subscribers on the two
/// surviving instances each get exactly one `leave` for its member, and
/// nothing else about it. Not in `bus_suite!` (the memory bus has one
/// instance, which a crash takes whole): run by Redis, Pub/Sub and NATS.
pub async fn crashed_members_leave_once(f: &dyn BusFactory) {
    bounded("crashed_members_leave_once", async {
        let mut cluster = Cluster::start(f, "ghost", 3).await;
        let channel = "pres:ghost";
        let mut a = cluster.client(0).await;
        let mut b = cluster.client(1).await;
        let mut c = cluster.client(2).await;
        subscribe(&mut a, channel, 1).await;
        subscribe(&mut b, channel, 1).await;
        subscribe(&mut c, channel, 1).await;
        let all: HashSet<String> = [a.id.clone(), b.id.clone(), c.id.clone()].into();
        assert!(
            until_members(&mut a, channel, &all, WAIT).await,
            "three members"
        );
        // Let the joins arrive before counting what follows.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c_id = c.id.clone();
        cluster.crash(2);
        let within = f.presence_expiry() * 2 + WAIT;
        for s in [&mut a, &mut b] {
            let deadline = tokio::time::Instant::now() + within;
            let leave = loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let v = tokio::time::timeout(left, s.recv())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("no leave for the crashed member within {within:?}")
                    });
                if v["type"] == "leave" {
                    break v;
                }
            };
            assert_eq!(leave["channel"], channel, "{leave}");
            assert_eq!(leave["clientId"], c_id.as_str(), "{leave}");
        }
        // Once: nothing more about it (a second reaper, a later heartbeat).
        let later = f.presence_expiry() + Duration::from_secs(1);
        for s in [&mut a, &mut b] {
            if let Ok(v) = tokio::time::timeout(later, s.recv()).await {
                panic!("one leave only, then silence; got {v}");
            }
        }
        drop((a, b, c));
        cluster.shutdown().await;
    })
    .await;
}
