//! Acknowledged at-least-once delivery over real sockets.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use switchboard::config::{NamespaceSettings, Settings};

fn acked_settings(history: usize) -> Settings {
    let mut s = settings();
    s.ack_timeout = Some("300ms".parse().unwrap());
    s.ping_interval = Some("1s".parse().unwrap()); // a sweeper tick of 250 ms
    s.pong_timeout = Some("1s".parse().unwrap());
    s.namespaces.insert(
        "orders".into(),
        NamespaceSettings {
            acked: Some(true),
            history_size: Some(history),
            ..Default::default()
        },
    );
    s
}

async fn next_message(c: &mut Client) -> Value {
    c.recv_type("message").await
}

#[tokio::test]
async fn unacknowledged_publications_are_resent_until_acknowledged() {
    let server = start_with(acked_settings(100)).await;
    let mut c = Client::connect(&server).await;
    let r = c
        .request(json!({"type":"subscribe","channel":"orders:1"}), 1)
        .await;
    assert_eq!(r["acked"], true);
    let mut p = Client::connect(&server).await;
    for i in 1..=5 {
        p.request(json!({"type":"publish","channel":"orders:1","data":i}), i)
            .await;
    }
    for expected in 1..=5 {
        assert_eq!(next_message(&mut c).await["offset"], expected);
    }
    c.send(json!({"type":"ack","channel":"orders:1","offset":3}))
        .await;
    // 4 and 5 come again after the ack timeout.
    assert_eq!(next_message(&mut c).await["offset"], 4);
    assert_eq!(next_message(&mut c).await["offset"], 5);
    c.send(json!({"type":"ack","channel":"orders:1","offset":5}))
        .await;
    c.expect_silence(Duration::from_millis(900)).await;
    let (_, body) = get(&server, "/metrics").await;
    let m: Value = serde_json::from_str(&body).unwrap();
    assert!(m["redeliveries"].as_u64().unwrap() >= 2);
    // A non-acked namespace never asks for acknowledgements.
    let r = c
        .request(json!({"type":"subscribe","channel":"plain"}), 2)
        .await;
    assert!(r.get("acked").is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn a_forced_disconnect_mid_stream_loses_nothing() {
    const TOTAL: u64 = 200;
    let mut s = acked_settings(500);
    s.rate_limit = Some(0.0);
    let server = start_with(s).await;
    let mut c = Client::connect(&server).await;
    c.request(json!({"type":"subscribe","channel":"orders:stream"}), 1)
        .await;
    let mut publisher = Client::connect(&server).await;
    let feeder = tokio::spawn(async move {
        for i in 1..=TOTAL {
            publisher
                .send(json!({"type":"publish","channel":"orders:stream","data":i}))
                .await;
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        publisher
    });
    // The "app": what it has been handed, deduplicated by offset, and the
    // position it acknowledged.
    let mut app: BTreeSet<u64> = BTreeSet::new();
    let mut duplicates_dropped = 0;
    let mut epoch = Value::Null;
    let mut acked = 0u64;
    // Take a third, acknowledging as we go, then drop the connection.
    while app.len() < (TOTAL / 3) as usize {
        let m = next_message(&mut c).await;
        epoch = m["epoch"].clone();
        let off = m["offset"].as_u64().unwrap();
        if !app.insert(off) {
            duplicates_dropped += 1;
        }
        acked = off;
        c.send(json!({"type":"ack","channel":"orders:stream","offset":off}))
            .await;
    }
    drop(c); // forced disconnect, mid-stream
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = Client::connect(&server).await;
    c.send(json!({"type":"subscribe","channel":"orders:stream",
                  "since":{"epoch":epoch,"offset":acked},"id":"resume"}))
        .await;
    let _publisher = feeder.await.unwrap();
    while app.len() < TOTAL as usize {
        let m = c.recv().await;
        match m["type"].as_str() {
            Some("subscribed") => assert_eq!(m["recovered"], true, "{m}"),
            Some("message") => {
                let off = m["offset"].as_u64().unwrap();
                if off <= *app.last().unwrap_or(&0) && app.contains(&off) {
                    duplicates_dropped += 1;
                    continue;
                }
                app.insert(off);
                c.send(json!({"type":"ack","channel":"orders:stream","offset":off}))
                    .await;
            }
            _ => {}
        }
    }
    let expected: BTreeSet<u64> = (1..=TOTAL).collect();
    assert_eq!(
        app, expected,
        "every publication reached the app exactly once"
    );
    eprintln!("duplicates dropped before the app: {duplicates_dropped}");
    server.shutdown().await;
}

#[tokio::test]
async fn when_history_no_longer_holds_them_the_client_is_told_to_resubscribe() {
    let mut s = acked_settings(3);
    s.rate_limit = Some(0.0);
    let server = start_with(s).await;
    let mut c = Client::connect(&server).await;
    c.request(json!({"type":"subscribe","channel":"orders:tiny"}), 1)
        .await;
    let mut p = Client::connect(&server).await;
    for i in 1..=10 {
        p.request(
            json!({"type":"publish","channel":"orders:tiny","data":i}),
            i,
        )
        .await;
    }
    // Never acknowledged; the history keeps only 3 of the 10.
    assert_eq!(c.expect_close().await, 1012);
    server.shutdown().await;
}
