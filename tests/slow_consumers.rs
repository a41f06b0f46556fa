//! Slow-consumer policies over real sockets: a client that stops reading
//! is cut off (disconnect), loses the oldest messages (drop-oldest), or
//! gets only the newest per channel (conflate-latest), while its
//! connection and everyone else carry on.

mod support;

use std::collections::HashMap;

use futures_util::StreamExt;
use serde_json::json;
use support::*;
use switchboard::config::NamespaceSettings;
use switchboard::queue::SlowConsumerPolicy;
use tokio_tungstenite::tungstenite::Message;

/// Publish into `channels` (round-robin) until the server reports `done`,
/// in lock-step with a fast subscriber of every channel so that only the
/// stalled client falls behind. Returns the last offset per channel.
async fn flood_until(
    server: &TestServer,
    channels: &[&str],
    done: impl Fn(&TestServer) -> bool,
) -> HashMap<String, u64> {
    let mut fast = Client::connect(server).await;
    for (i, ch) in channels.iter().enumerate() {
        fast.request(json!({"type":"subscribe","channel":ch}), i as u64)
            .await;
    }
    let mut publisher = Client::connect(server).await;
    let pad = "p".repeat(4000);
    let mut last = HashMap::new();
    let mut n = 0u64;
    while !done(server) {
        assert!(n < 20_000, "the policy never acted");
        let ch = channels[(n as usize) % channels.len()];
        publisher
            .send(json!({"type":"publish","channel":ch,"data":{"n":n,"pad":pad}}))
            .await;
        let m = fast.recv_type("message").await;
        last.insert(
            m["channel"].as_str().unwrap().to_string(),
            m["offset"].as_u64().unwrap(),
        );
        n += 1;
    }
    // A little more so the newest messages are the ones behind the drops.
    for k in 0..20 {
        let ch = channels[((n + k) as usize) % channels.len()];
        publisher
            .send(json!({"type":"publish","channel":ch,"data":{"n":n + k,"pad":pad}}))
            .await;
        let m = fast.recv_type("message").await;
        last.insert(
            m["channel"].as_str().unwrap().to_string(),
            m["offset"].as_u64().unwrap(),
        );
    }
    last
}

fn settings_with(policy: SlowConsumerPolicy) -> switchboard::config::Settings {
    let mut s = settings();
    s.rate_limit = Some(0.0); // the publisher floods on purpose
    s.queue_max_messages = Some(64);
    s.queue_max_bytes = Some(128 * 1024);
    s.namespaces.insert(
        "feed".into(),
        NamespaceSettings {
            slow_consumer: Some(policy),
            ..Default::default()
        },
    );
    s
}

/// Read `stalled` until it has seen the newest offset of every channel;
/// returns the offsets it saw per channel.
async fn drain(stalled: &mut Client, last: &HashMap<String, u64>) -> HashMap<String, Vec<u64>> {
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    loop {
        let complete = last
            .iter()
            .all(|(ch, top)| seen.get(ch).and_then(|v| v.last()) == Some(top));
        if complete {
            return seen;
        }
        let m = stalled.recv_type("message").await;
        seen.entry(m["channel"].as_str().unwrap().to_string())
            .or_default()
            .push(m["offset"].as_u64().unwrap());
    }
}

#[tokio::test]
async fn drop_oldest_keeps_the_connection_and_the_newest_messages() {
    let server = start_with(settings_with(SlowConsumerPolicy::DropOldest)).await;
    let mut stalled = Client::connect(&server).await;
    stalled
        .request(json!({"type":"subscribe","channel":"feed:a"}), 1)
        .await;
    let last = flood_until(&server, &["feed:a"], |s| s.node.hub().dropped() > 0).await;
    let seen = drain(&mut stalled, &last).await;
    let offsets = &seen["feed:a"];
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicate"
    );
    assert!(
        (offsets.len() as u64) < last["feed:a"],
        "some were dropped: got {} of {}",
        offsets.len(),
        last["feed:a"]
    );
    assert_eq!(
        server.node.hub().slow_consumers(),
        0,
        "nobody was disconnected"
    );
    // Still connected and served.
    let pong = stalled.request(json!({"type":"ping"}), 9).await;
    assert_eq!(pong["type"], "pong");
    server.shutdown().await;
}

#[tokio::test]
async fn conflate_latest_delivers_the_newest_of_each_channel() {
    let server = start_with(settings_with(SlowConsumerPolicy::ConflateLatest)).await;
    let channels = ["feed:x", "feed:y", "feed:z"];
    let mut stalled = Client::connect(&server).await;
    for (i, ch) in channels.iter().enumerate() {
        stalled
            .request(json!({"type":"subscribe","channel":ch}), i as u64)
            .await;
    }
    let last = flood_until(&server, &channels, |s| s.node.hub().conflated() > 50).await;
    let seen = drain(&mut stalled, &last).await;
    for ch in channels {
        let offsets = &seen[ch];
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{ch}: in order");
        assert_eq!(offsets.last(), last.get(ch), "{ch}: the newest arrives");
        assert!(
            (offsets.len() as u64) < last[ch],
            "{ch}: older ones were conflated"
        );
    }
    assert_eq!(server.node.hub().slow_consumers(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn disconnect_is_the_default_and_bounds_server_memory() {
    let server = start_with(settings_with(SlowConsumerPolicy::DropOldest)).await;
    // "plain" is in the default namespace: policy disconnect.
    let mut stalled = Client::connect(&server).await;
    stalled
        .request(json!({"type":"subscribe","channel":"plain"}), 1)
        .await;
    flood_until(&server, &["plain"], |s| s.node.hub().slow_consumers() > 0).await;
    assert_eq!(stalled.expect_close().await, 4008);
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_cut_off_and_memory_stays_bounded() {
    let mut s = settings();
    s.rate_limit = Some(0.0);
    let server = start_with(s).await;
    let mut stalled = Client::connect(&server).await;
    stalled
        .request(json!({"type":"subscribe","channel":"big"}), 1)
        .await;
    let mut fast = Client::connect(&server).await;
    fast.request(json!({"type":"subscribe","channel":"big"}), 1)
        .await;
    let mut publisher = Client::connect(&server).await;
    let before = switchboard::metrics::memory_usage().rss;
    // 10,000 × 4 KB = 40 MB published while `stalled` reads nothing.
    let pad = "m".repeat(4000);
    for n in 0..10_000u64 {
        publisher
            .send(json!({"type":"publish","channel":"big","data":{"n":n,"pad":pad}}))
            .await;
        if n % 100 == 99 {
            // In step with the fast reader, a hundred at a time.
            for _ in 0..100 {
                fast.recv_type("message").await;
            }
        }
    }
    let after = switchboard::metrics::memory_usage().rss;
    assert_eq!(
        server.node.hub().slow_consumers(),
        1,
        "the stalled client was cut off"
    );
    let growth = after.saturating_sub(before);
    eprintln!(
        "RSS growth with a stalled client and 40 MB published: {} KiB",
        growth >> 10
    );
    assert!(
        growth < 24 << 20,
        "RSS grew by {} MiB while 40 MB were published to a client that never reads",
        growth >> 20
    );
    // It read nothing for as long as the 40 MB took, far more than the 2 s
    // a closing client gets to take what is pending (bounded_write): the
    // server dropped it, with 4008 if the close frame still got through.
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match stalled.ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the server ended the connection");
    assert!(matches!(end, None | Some(4008)), "closed with {end:?}");
    server.shutdown().await;
}
