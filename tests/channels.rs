//! Channels, presence, history and recovery on one instance, over real
//! sockets.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use switchboard::config::{NamespaceSettings, Settings};

fn sub(channel: &str) -> Value {
    json!({"type":"subscribe","channel":channel})
}

#[tokio::test]
async fn subscribe_publish_unsubscribe() {
    let server = start().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    let mut outsider = Client::connect(&server).await;
    let r = a.request(sub("chat:room1"), 1).await;
    assert_eq!(r["type"], "subscribed");
    assert_eq!(r["channel"], "chat:room1");
    assert_eq!(r["offset"], 0, "a new channel has no publication yet");
    let epoch = r["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty());
    assert!(
        r.get("recovered").is_none(),
        "no `since`, no recovery verdict"
    );

    let ack = b
        .request(
            json!({"type":"publish","channel":"chat:room1","data":{"text":"hi"}}),
            2,
        )
        .await;
    assert_eq!(
        ack,
        json!({"type":"ack","ref":2,"channel":"chat:room1","offset":1})
    );
    let m = a.recv_type("message").await;
    assert_eq!(m["channel"], "chat:room1");
    assert_eq!(m["data"], json!({"text":"hi"}));
    assert_eq!(m["senderId"], json!(b.id));
    assert_eq!(m["offset"], 1);
    assert_eq!(m["epoch"], json!(epoch));
    assert!(m["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
    b.expect_silence(Duration::from_millis(100)).await;
    outsider.expect_silence(Duration::from_millis(10)).await;

    // A subscribed publisher gets its own message (channel_echo default).
    a.send(json!({"type":"publish","channel":"chat:room1","data":"mine"}))
        .await;
    let mine = a.recv_type("message").await;
    assert_eq!(mine["data"], "mine");
    assert_eq!(mine["offset"], 2);

    let r = a
        .request(json!({"type":"unsubscribe","channel":"chat:room1"}), 3)
        .await;
    assert_eq!(
        r,
        json!({"type":"unsubscribed","channel":"chat:room1","ref":3})
    );
    b.send(json!({"type":"publish","channel":"chat:room1","data":"after"}))
        .await;
    a.expect_silence(Duration::from_millis(150)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn channel_echo_off_leaves_the_publisher_out() {
    let mut s = settings();
    s.channel_echo = Some(false);
    let server = start_with(s).await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.request(sub("c"), 1).await;
    b.request(sub("c"), 1).await;
    let ack = a
        .request(json!({"type":"publish","channel":"c","data":1}), 2)
        .await;
    assert_eq!(ack["offset"], 1);
    assert_eq!(b.recv_type("message").await["data"], 1);
    a.expect_silence(Duration::from_millis(150)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn per_channel_order_under_concurrent_publishers() {
    const PUBLISHERS: usize = 4;
    const EACH: usize = 150;
    let server = start().await;
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(&server).await;
        c.request(sub("race"), 1).await;
        subscribers.push(c);
    }
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let mut c = Client::connect(&server).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                c.send(json!({"type":"publish","channel":"race","data":{"p":p,"i":i}}))
                    .await;
            }
            // Wait for the acks so the publisher stays connected until done.
            let mut acks = 0;
            while acks < EACH {
                if c.recv().await["type"] == "ack" {
                    acks += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = PUBLISHERS * EACH;
    for s in subscribers.iter_mut() {
        let mut next_per_publisher: HashMap<u64, u64> = HashMap::new();
        for expected_offset in 1..=total as u64 {
            let m = s.recv_type("message").await;
            assert_eq!(
                m["offset"], expected_offset,
                "offsets grow by one, in order"
            );
            let p = m["data"]["p"].as_u64().unwrap();
            let i = m["data"]["i"].as_u64().unwrap();
            let next = next_per_publisher.entry(p).or_insert(0);
            assert_eq!(i, *next, "each publisher's messages stay in order");
            *next += 1;
        }
        s.expect_silence(Duration::from_millis(100)).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn presence_and_join_leave_including_disconnects() {
    let server = start().await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.request(sub("room"), 1).await;
    b.request(sub("room"), 1).await;
    let join = a.recv_type("join").await;
    assert_eq!(
        join,
        json!({"type":"join","channel":"room","clientId":b.id,"userId":null})
    );
    let p = a
        .request(json!({"type":"presence","channel":"room"}), 2)
        .await;
    assert_eq!(p["count"], 2);
    let mut ids: Vec<String> = p["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["clientId"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut expected = vec![a.id.clone(), b.id.clone()];
    expected.sort();
    assert_eq!(ids, expected);

    // Unsubscribe → leave.
    b.request(json!({"type":"unsubscribe","channel":"room"}), 3)
        .await;
    let leave = a.recv_type("leave").await;
    assert_eq!(leave["clientId"], json!(b.id));
    // Disconnect → leave.
    let mut c = Client::connect(&server).await;
    c.request(sub("room"), 1).await;
    assert_eq!(a.recv_type("join").await["clientId"], json!(c.id));
    let c_id = c.id.clone();
    drop(c);
    assert_eq!(a.recv_type("leave").await["clientId"], json!(c_id));
    let p = a
        .request(json!({"type":"presence","channel":"room"}), 4)
        .await;
    assert_eq!(p["count"], 1);
    assert_eq!(p["members"][0]["clientId"], json!(a.id));
    server.shutdown().await;
}

#[tokio::test]
async fn a_name_from_the_url_shows_in_presence_and_join() {
    let server = start().await;
    let mut a = Client::connect_url(&format!("{}?name=Ada%20Lovelace", server.url("/ws"))).await;
    a.request(sub("named"), 1).await;
    // Trimmed, control characters dropped, cut to 64 characters.
    let long = "%C3%A9".repeat(100);
    let mut b = Client::connect_url(&format!("{}?name=%0A{long}", server.url("/ws"))).await;
    b.request(sub("named"), 1).await;
    let join = a.recv_type("join").await;
    assert_eq!(join["clientId"], json!(b.id));
    assert_eq!(join["name"], json!("é".repeat(64)));
    let p = b
        .request(json!({"type":"presence","channel":"named"}), 2)
        .await;
    let of = |id: &str| {
        p["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["clientId"] == json!(id))
            .cloned()
            .unwrap()
    };
    assert_eq!(of(&a.id)["name"], "Ada Lovelace");
    // Without `?name=` a member has no `name` key at all.
    let mut c = Client::connect(&server).await;
    c.request(sub("named"), 1).await;
    let join = a.recv_type("join").await;
    assert_eq!(
        join,
        json!({"type":"join","channel":"named","clientId":c.id,"userId":null})
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_dead_peer_leaves_presence() {
    let mut s = settings();
    s.ping_interval = Some("100ms".parse().unwrap());
    s.pong_timeout = Some("100ms".parse().unwrap());
    let server = start_with(s).await;
    let mut a = Client::connect(&server).await;
    a.request(sub("room"), 1).await;
    let mut dead = Client::connect(&server).await;
    dead.request(sub("room"), 1).await;
    let dead_id = dead.id.clone();
    // `dead` is never read again, so it never answers a ping; `a` is read
    // below, so its pongs go out.
    let leave = a.recv_type("leave").await;
    assert_eq!(leave["clientId"], json!(dead_id));
    let p = a
        .request(json!({"type":"presence","channel":"room"}), 2)
        .await;
    assert_eq!(p["count"], 1);
    drop(dead);
    server.shutdown().await;
}

fn with_namespace(name: &str, ns: NamespaceSettings) -> Settings {
    let mut s = settings();
    s.namespaces.insert(name.to_string(), ns);
    s
}

#[tokio::test]
async fn history_limit_and_ttl() {
    let s = with_namespace(
        "short",
        NamespaceSettings {
            history_size: Some(5),
            history_ttl: Some("400ms".parse().unwrap()),
            ..Default::default()
        },
    );
    let server = start_with(s).await;
    let mut a = Client::connect(&server).await;
    for i in 1..=8 {
        a.request(json!({"type":"publish","channel":"short:x","data":i}), i)
            .await;
    }
    let h = a
        .request(json!({"type":"history","channel":"short:x"}), 100)
        .await;
    assert_eq!(h["type"], "history");
    assert_eq!(h["offset"], 8);
    let offsets: Vec<u64> = h["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![4, 5, 6, 7, 8], "trimmed to the history size");
    assert_eq!(h["publications"][0]["data"], 4);
    assert_eq!(h["publications"][0]["senderId"], json!(a.id));
    // since + limit
    let epoch = h["epoch"].clone();
    let h = a
        .request(
            json!({"type":"history","channel":"short:x","since":{"epoch":epoch,"offset":5},"limit":2}),
            101,
        )
        .await;
    let offsets: Vec<u64> = h["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![6, 7]);
    // TTL
    tokio::time::sleep(Duration::from_millis(600)).await;
    let h = a
        .request(json!({"type":"history","channel":"short:x"}), 102)
        .await;
    assert_eq!(h["publications"], json!([]), "expired by TTL");
    assert_eq!(h["offset"], 8, "the offset survives expiry");
    server.shutdown().await;
}

#[tokio::test]
async fn recovery_after_reconnect_delivers_exactly_the_missed_messages() {
    let server = start().await;
    let mut publisher = Client::connect(&server).await;
    let mut a = Client::connect(&server).await;
    a.request(sub("news"), 1).await;
    publisher
        .request(json!({"type":"publish","channel":"news","data":"seen"}), 1)
        .await;
    let seen = a.recv_type("message").await;
    let position = json!({"epoch": seen["epoch"], "offset": seen["offset"]});
    drop(a);

    const MISSED: u64 = 25;
    for i in 0..MISSED {
        publisher
            .request(
                json!({"type":"publish","channel":"news","data":{"missed":i}}),
                10 + i,
            )
            .await;
    }
    let mut back = Client::connect(&server).await;
    back.send(json!({"type":"subscribe","channel":"news","since":position,"id":"r"}))
        .await;
    // Live publications race with the recovery on purpose.
    let live = tokio::spawn(async move {
        for i in 0..10 {
            publisher
                .send(json!({"type":"publish","channel":"news","data":{"live":i}}))
                .await;
        }
        publisher
    });
    let mut offsets = Vec::new();
    let mut subscribed_at = None;
    while offsets.len() < (MISSED + 10) as usize {
        let m = back.recv().await;
        match m["type"].as_str().unwrap() {
            "message" => offsets.push(m["offset"].as_u64().unwrap()),
            "subscribed" => {
                assert_eq!(m["recovered"], true);
                assert_eq!(m["ref"], "r");
                subscribed_at = Some(offsets.len());
            }
            _ => {}
        }
    }
    let expected: Vec<u64> = (2..2 + MISSED + 10).collect();
    assert_eq!(
        offsets, expected,
        "every missed then live message, once, in order"
    );
    let at = subscribed_at.expect("subscribed arrives");
    assert!(
        at >= MISSED as usize,
        "missed messages come before `subscribed`"
    );
    let _publisher = live.await.unwrap();
    back.expect_silence(Duration::from_millis(150)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn recovery_impossible_says_recovered_false_and_sends_nothing_partial() {
    let s = with_namespace(
        "tiny",
        NamespaceSettings {
            history_size: Some(3),
            ..Default::default()
        },
    );
    let server = start_with(s).await;
    let mut p = Client::connect(&server).await;
    let first = p
        .request(json!({"type":"publish","channel":"tiny:a","data":0}), 1)
        .await;
    assert_eq!(first["offset"], 1);
    let h = p
        .request(json!({"type":"history","channel":"tiny:a"}), 2)
        .await;
    let epoch = h["epoch"].clone();
    for i in 0..5 {
        p.request(
            json!({"type":"publish","channel":"tiny:a","data":i}),
            10 + i,
        )
        .await;
    }
    // Missed 5 but only 3 are retained.
    let mut c = Client::connect(&server).await;
    let r = c
        .request(
            json!({"type":"subscribe","channel":"tiny:a","since":{"epoch":epoch,"offset":1}}),
            3,
        )
        .await;
    assert_eq!(r["type"], "subscribed", "{r}");
    assert_eq!(r["recovered"], false);
    assert_eq!(r["offset"], 6);
    c.expect_silence(Duration::from_millis(100)).await;
    // A stale epoch cannot be trusted either.
    let mut d = Client::connect(&server).await;
    let r = d
        .request(
            json!({"type":"subscribe","channel":"tiny:a","since":{"epoch":"stale","offset":5}}),
            4,
        )
        .await;
    assert_eq!(r["recovered"], false);
    d.expect_silence(Duration::from_millis(100)).await;
    // Nothing missed is a complete recovery.
    let mut e = Client::connect(&server).await;
    let r = e
        .request(
            json!({"type":"subscribe","channel":"tiny:a","since":{"epoch":r["epoch"],"offset":6}}),
            5,
        )
        .await;
    assert_eq!(r["recovered"], true);
    server.shutdown().await;
}

#[tokio::test]
async fn every_channel_error_code() {
    let mut s = with_namespace(
        "quiet",
        NamespaceSettings {
            history_size: Some(0),
            presence: Some(false),
            join_leave: Some(false),
            client_publish: Some(false),
            ..Default::default()
        },
    );
    s.max_subscriptions = Some(2);
    s.strict_namespaces = Some(true);
    let server = start_with(s).await;
    let mut c = Client::connect(&server).await;
    let mut err = async |req: Value, id: u64| -> String {
        let r = c.request(req, id).await;
        assert_eq!(r["type"], "error", "{r}");
        r["code"].as_str().unwrap().to_string()
    };
    assert_eq!(err(sub("has space"), 1).await, "bad_channel");
    assert_eq!(err(sub(""), 2).await, "bad_channel");
    assert_eq!(err(sub(&"x".repeat(256)), 3).await, "bad_channel");
    assert_eq!(err(sub("nope:x"), 4).await, "unknown_namespace");
    assert_eq!(
        err(json!({"type":"unsubscribe","channel":"a"}), 5).await,
        "not_subscribed"
    );
    assert_eq!(
        err(json!({"type":"history","channel":"quiet:a"}), 6).await,
        "history_disabled"
    );
    assert_eq!(
        err(json!({"type":"presence","channel":"quiet:a"}), 7).await,
        "presence_disabled"
    );
    assert_eq!(
        err(json!({"type":"publish","channel":"quiet:a","data":1}), 8).await,
        "publish_not_allowed"
    );
    assert_eq!(
        err(
            json!({"type":"publish","channel":"sys:metrics","data":1}),
            9
        )
        .await,
        "publish_not_allowed"
    );
    let ok = c.request(sub("a"), 10).await;
    assert_eq!(ok["type"], "subscribed");
    let mut err = async |req: Value, id: u64| -> String {
        let r = c.request(req, id).await;
        assert_eq!(r["type"], "error", "{r}");
        r["code"].as_str().unwrap().to_string()
    };
    assert_eq!(err(sub("a"), 11).await, "already_subscribed");
    assert_eq!(c.request(sub("b"), 12).await["type"], "subscribed");
    let r = c.request(sub("c"), 13).await;
    assert_eq!(r["code"], "too_many_subscriptions");
    // The connection still works after all of that.
    let ack = c
        .request(json!({"type":"publish","channel":"a","data":"ok"}), 14)
        .await;
    assert_eq!(ack["type"], "ack");
    server.shutdown().await;
}

#[tokio::test]
async fn a_slow_consumer_is_closed_with_4008_and_others_carry_on() {
    let mut s = settings();
    s.queue_max_messages = Some(1000);
    s.queue_max_bytes = Some(256 * 1024);
    s.rate_limit = Some(0.0); // the publisher floods on purpose
    let server = start_with(s).await;
    let mut fast = Client::connect(&server).await;
    fast.request(sub("firehose"), 1).await;
    // A client that subscribes and then never reads: the kernel buffers
    // fill, then its queue, then it is closed.
    let mut slow = Client::connect(&server).await;
    slow.request(sub("firehose"), 1).await;
    let mut publisher = Client::connect(&server).await;
    let payload = "z".repeat(4000);
    // In lock-step with the fast reader, so only the slow one falls behind.
    let mut sent = 0;
    while server.node.hub().slow_consumers() == 0 {
        assert!(sent < 20_000, "the slow consumer was never cut off");
        publisher
            .send(json!({"type":"publish","channel":"firehose","data":{"i":sent,"pad":payload}}))
            .await;
        let m = fast.recv_type("message").await;
        assert_eq!(m["data"]["i"], sent);
        sent += 1;
    }
    assert_eq!(slow.expect_close().await, 4008);
    assert_eq!(server.node.hub().slow_consumers(), 1, "only the slow one");
    // The fast one carries on.
    publisher
        .send(json!({"type":"publish","channel":"firehose","data":{"i":sent}}))
        .await;
    assert_eq!(fast.recv_type("message").await["data"]["i"], sent);
    server.shutdown().await;
}
