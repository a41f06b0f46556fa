//! Reconnect-storm control: 5,000 clients arriving at once are admitted at
//! the configured handshake rate; the others get HTTP 503 with
//! `Retry-After`, come back, and are all admitted in the end.

mod support;

use std::time::Duration;

use support::*;
use tokio::time::Instant;

const CLIENTS: usize = 5_000;
const RATE: f64 = 1_000.0;
const BURST: u32 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_is_admitted_at_the_configured_rate() {
    let mut s = settings();
    s.handshake_rate = Some(RATE);
    s.handshake_burst = Some(BURST);
    // Every client is 127.0.0.1: no per-address limits.
    s.max_connections_per_ip = Some(0);
    s.handshake_rate_per_ip = Some(0.0);
    s.demo = Some(false);
    let server = start_with(s).await;
    let url = server.url("/ws");
    let started = Instant::now();

    // Watch the admitted count: it can never run ahead of the bucket.
    let node = server.node.clone();
    let watcher = tokio::spawn(async move {
        let mut worst_excess: f64 = 0.0;
        while node.hub().len() < CLIENTS {
            let allowed = f64::from(BURST) + RATE * started.elapsed().as_secs_f64();
            worst_excess = worst_excess.max(node.hub().len() as f64 - allowed);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if started.elapsed() > Duration::from_secs(60) {
                break;
            }
        }
        worst_excess
    });

    let mut tasks = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut refusals = 0u32;
            loop {
                match tokio_tungstenite::connect_async(&url).await {
                    Ok((ws, _)) => return (ws, refusals),
                    Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                        assert_eq!(resp.status().as_u16(), 503);
                        let retry: u64 = resp.headers()["retry-after"]
                            .to_str()
                            .unwrap()
                            .parse()
                            .expect("Retry-After in seconds");
                        assert!(retry >= 1);
                        refusals += 1;
                        assert!(refusals < 60, "a client was refused for good");
                        // Honour the hint, with jitter of our own.
                        let ms = retry * 1000 + fastrand::u64(0..1000);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    Err(e) => panic!("unexpected connect error: {e}"),
                }
            }
        }));
    }
    let mut sockets = Vec::with_capacity(CLIENTS);
    let mut refused = 0u64;
    for t in tasks {
        let (ws, refusals) = t.await.unwrap();
        refused += u64::from(refusals);
        sockets.push(ws);
    }
    let worst_excess = watcher.await.unwrap();
    assert!(
        eventually(|| async { server.node.hub().len() == CLIENTS }).await,
        "every client got in"
    );
    assert!(refused > 0, "the storm was throttled");
    assert!(
        worst_excess <= 1.0,
        "admissions ran {worst_excess} ahead of burst + rate × time"
    );
    let (_, body) = get(&server, "/metrics").await;
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["handshakesThrottled"].as_u64().unwrap(), refused);
    eprintln!(
        "{CLIENTS} clients admitted in {:.1} s at {RATE}/s (burst {BURST}); {refused} refusals with Retry-After",
        started.elapsed().as_secs_f64()
    );
    drop(sockets);
    server.shutdown().await;
}
