//! Zero-gap drain: with two instances on Redis, one is drained while a
//! publisher on the other sends without pause. Every client of the drained
//! instance is asked to reconnect (1012 with a retry hint), resumes on the
//! other instance with `since`, and its app sees every channel message
//! exactly once, in order.
#![cfg(feature = "redis")]

mod support;
#[macro_use]
#[path = "support/bus_suite.rs"]
mod bus_suite;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bus_suite::{Instance, base_settings, unique_prefix};
use futures_util::StreamExt;
use serde_json::{Value, json};
use support::Client;
use switchboard::config::Settings;
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: usize = 12;
const CHANNEL: &str = "live:feed";

fn redis_settings(prefix: &str, i: usize) -> Settings {
    Settings {
        bus: Some("redis://127.0.0.1:6379".into()),
        bus_prefix: Some(prefix.into()),
        drain_timeout: Some("6s".parse().unwrap()),
        drain_spread: Some("2s".parse().unwrap()),
        rate_limit: Some(0.0),
        ..base_settings(prefix, i)
    }
}

/// One client "app": subscribed on `first`; when told to reconnect it
/// waits for the retry hint and resumes on `second` (the load balancer's
/// choice once `first` is unready). Returns the data values its app saw.
async fn app(first: String, second: String) -> (Vec<u64>, bool) {
    let mut seen: Vec<u64> = Vec::new();
    let mut last: Option<(Value, u64)> = None;
    let mut moved = false;
    let mut url = first;
    loop {
        let mut c = Client::connect_url(&url).await;
        let mut sub = json!({"type":"subscribe","channel":CHANNEL,"id":"s"});
        if let Some((epoch, offset)) = &last {
            sub["since"] = json!({"epoch": epoch, "offset": offset});
        }
        c.send(sub).await;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), c.ws.next())
                .await
                .expect("the stream goes on");
            match frame {
                Some(Ok(Message::Text(t))) => {
                    let m: Value = serde_json::from_str(&t).unwrap();
                    match m["type"].as_str() {
                        Some("subscribed") if last.is_some() => {
                            assert_eq!(m["recovered"], true, "{m}");
                        }
                        Some("message") => {
                            let offset = m["offset"].as_u64().unwrap();
                            if let Some((_, l)) = &last {
                                if offset <= *l {
                                    continue; // a repeat: the app never sees it
                                }
                            }
                            last = Some((m["epoch"].clone(), offset));
                            let n = m["data"].as_u64().unwrap();
                            seen.push(n);
                            if n == u64::MAX {
                                return (seen, moved);
                            }
                        }
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(Some(f)))) => {
                    assert_eq!(u16::from(f.code), 1012, "drain asks to reconnect");
                    let retry: u64 = f
                        .reason
                        .rsplit_once("retry=")
                        .and_then(|(_, ms)| ms.parse().ok())
                        .expect("a retry hint");
                    tokio::time::sleep(Duration::from_millis(retry)).await;
                    break;
                }
                Some(Ok(_)) => {}
                other => panic!("unexpected end of stream: {other:?}"),
            }
        }
        assert!(!moved, "moved twice");
        moved = true;
        url = second.clone();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_an_instance_loses_and_repeats_nothing() {
    bus_suite::bounded("zero-gap drain", async {
        let prefix = unique_prefix("drain");
        let a = Instance::start(redis_settings(&prefix, 0)).await;
        let b = Instance::start(redis_settings(&prefix, 1)).await;
        // Clients on A, subscribed before anything is published.
        let mut apps = Vec::new();
        for _ in 0..CLIENTS {
            apps.push(tokio::spawn(app(a.url("/ws"), b.url("/ws"))));
        }
        let mut probe = b.client().await;
        // Wait until all of them are subscribed (presence seen from B).
        loop {
            let p = probe
                .request(json!({"type":"presence","channel":CHANNEL}), 1)
                .await;
            if p["count"].as_u64() == Some(CLIENTS as u64) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A publisher on B that never pauses.
        let mut publisher = b.client().await;
        let publishing = Arc::new(AtomicBool::new(true));
        let flag = publishing.clone();
        let feeder = tokio::spawn(async move {
            let mut n = 0u64;
            while flag.load(Ordering::Relaxed) {
                n += 1;
                publisher
                    .send(json!({"type":"publish","channel":CHANNEL,"data":n}))
                    .await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (publisher, n)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let node_a = a.node.clone();
        let drained = tokio::spawn(a.shutdown());
        drained.await.unwrap();
        assert!(node_a.is_draining());
        assert_eq!(node_a.hub().len(), 0, "A is empty when it exits");
        tokio::time::sleep(Duration::from_millis(300)).await;
        publishing.store(false, Ordering::Relaxed);
        let (mut publisher, sent) = feeder.await.unwrap();
        // The end marker.
        publisher
            .request(
                json!({"type":"publish","channel":CHANNEL,"data":u64::MAX}),
                2,
            )
            .await;
        for app in apps {
            let (seen, moved) = app.await.unwrap();
            assert!(moved, "every client of A resumed on B");
            let (end, values) = seen.split_last().unwrap();
            assert_eq!(*end, u64::MAX);
            let expected: Vec<u64> = (1..=sent).collect();
            assert_eq!(values, expected.as_slice(), "every message once, in order");
        }
        b.shutdown().await;
    })
    .await;
}
