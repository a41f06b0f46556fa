//! The Pub/Sub bus against the real emulator: the shared cross-instance
//! suite (the cases that apply; cross-instance recovery through the
//! channel sequencer, and its own cases in `bus_pubsub_recovery.rs`),
//! same-instance recovery,
//! the subscription's life cycle, an emulator killed and restarted
//! mid-stream, start-up with the bus unreachable, and a latency figure.
//!
//! One emulator is shared by the suite cases (each case has its own topic
//! and subscriptions); the outage test has a private one it can kill.
#![cfg(feature = "pubsub")]

mod support;

#[macro_use]
#[path = "support/bus_suite.rs"]
mod bus_suite;

#[path = "support/pubsub_emulator.rs"]
mod pubsub_emulator;

use std::time::{Duration, Instant};

use bus_suite::{BusFactory, Cluster, base_settings, subscribe};
use pubsub_emulator::Emulator;
use serde_json::{Value, json};
use support::{Client, WAIT};
use switchboard::config::{Config, Settings};
use switchboard::{Node, server};
use tokio::sync::oneshot;

const PROJECT: &str = "test-project";

/// The suite's factory: every instance of a case on the shared emulator,
/// the case's topic, one subscription per instance, 2 s presence expiry.
struct PubSub {
    host: String,
}

impl PubSub {
    async fn shared() -> PubSub {
        PubSub {
            host: Emulator::shared().await.host(),
        }
    }
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

    fn presence_expiry(&self) -> Duration {
        Duration::from_secs(2)
    }

    /// Idempotency keys and expected offsets are not checked by the
    /// sequencer: both are refused (`unsupported`).
    fn publish_conditions(&self) -> bool {
        false
    }
}

mod suite {
    //! The suite cases that hold for Pub/Sub as written.
    //! `channel_order_and_offsets_across_instances` subscribes before the
    //! channel's first publication and expects the same epoch everywhere
    //! then; on Pub/Sub the epoch is the sequencer's, known from the first
    //! publication on, so its counterpart
    //! `channel_order_and_offsets_are_shared` (in `bus_pubsub_recovery.rs`)
    //! starts the channel first.
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broadcast_reaches_other_instances() {
        bus_suite::broadcast_reaches_other_instances(&PubSub::shared().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_across_instances() {
        bus_suite::direct_across_instances(&PubSub::shared().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_to_a_user_across_instances() {
        bus_suite::direct_to_a_user_across_instances(&PubSub::shared().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_disconnect_across_instances() {
        bus_suite::api_disconnect_across_instances(&PubSub::shared().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn presence_across_instances() {
        bus_suite::presence_across_instances(&PubSub::shared().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_seen_in_presence_gets_what_comes_next() {
        bus_suite::a_member_seen_in_presence_gets_what_comes_next(&PubSub::shared().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn presence_of_a_crashed_instance_expires() {
        bus_suite::presence_of_a_crashed_instance_expires(&PubSub::shared().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crashed_members_leave_once() {
        bus_suite::crashed_members_leave_once(&PubSub::shared().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovery_on_a_different_instance() {
        bus_suite::recovery_on_a_different_instance(&PubSub::shared().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idempotent_publish_across_instances() {
        bus_suite::idempotent_publish_across_instances(&PubSub::shared().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conditional_publish_races() {
        bus_suite::conditional_publish_races(&PubSub::shared().await).await;
    }
}

/// The next frame that is not a join/leave event.
async fn recv_no_presence(c: &mut Client) -> Value {
    loop {
        let v = c.recv().await;
        if v["type"] != "join" && v["type"] != "leave" {
            return v;
        }
    }
}

/// Recovery works on the same instance, whoever published: subscribe on
/// A, leave, publications from B, come back to A with `since`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_on_the_same_instance() {
    let f = PubSub::shared().await;
    bus_suite::bounded("same-instance recovery", async {
        let cluster = Cluster::start(&f, "samerec", 2).await;
        let channel = "rec:same";
        let mut x = cluster.client(0).await;
        // Started first: a subscriber before a channel's first publication
        // holds a placeholder epoch, which no sequenced stream continues.
        let ack = x
            .request(
                json!({"type": "publish", "channel": channel, "data": "first"}),
                9,
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let r = subscribe(&mut x, channel, 1).await;
        assert_eq!(r["offset"], 1, "{r}");
        let since = json!({"epoch": r["epoch"], "offset": r["offset"]});
        drop(x);
        let mut p = cluster.client(1).await;
        for n in 0..4 {
            let ack = p
                .request(
                    json!({"type": "publish", "channel": channel, "data": {"n": n}}),
                    n,
                )
                .await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
        // Instance 0 stores the sequenced copies as they arrive: wait
        // until all four have.
        let a = cluster.get(0).node.clone();
        assert!(
            support::eventually(|| {
                let a = a.clone();
                async move {
                    let Ok(ch) = a.channel(channel) else {
                        return false;
                    };
                    a.position(ch).await.is_ok_and(|p| p.offset == 5)
                }
            })
            .await
        );
        let mut y = cluster.client(0).await;
        y.send(json!({"type": "subscribe", "channel": channel, "since": since, "id": 2}))
            .await;
        for n in 0..4 {
            let m = recv_no_presence(&mut y).await;
            assert_eq!(m["type"], "message", "{m}");
            assert_eq!(m["data"]["n"], n);
            assert_eq!(m["offset"], n + 2);
            assert_eq!(m["epoch"], since["epoch"]);
        }
        let s = recv_no_presence(&mut y).await;
        assert_eq!(s["type"], "subscribed", "{s}");
        assert_eq!(s["recovered"], true, "{s}");
        drop((p, y));
        cluster.shutdown().await;
    })
    .await;
}

/// A server running in the test's runtime on a node built from the
/// concrete Pub/Sub backends (so the test can read the broker's counters).
struct Served {
    addr: std::net::SocketAddr,
    _node: Node,
    broker: std::sync::Arc<switchboard::broker::pubsub::PubSubBroker>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    async fn start(settings: Settings) -> Served {
        let config = Config::from_settings(settings).expect("valid config");
        let switchboard::config::BusConfig::PubSub { project } = &config.bus else {
            panic!("a pubsub bus");
        };
        let (broker, presence) = switchboard::broker::pubsub::connect_typed(project, &config)
            .await
            .expect("the emulator is reachable");
        let listener = switchboard::server::bind((config.host, config.port).into()).unwrap();
        let addr = listener.local_addr().unwrap();
        let node = Node::with_backends(config, broker.clone(), presence)
            .await
            .expect("node starts");
        let (stop, stopped) = oneshot::channel::<()>();
        let n = node.clone();
        let task = tokio::spawn(async move {
            let _ = server::run(listener, n, async {
                let _ = stopped.await;
            })
            .await;
        });
        Served {
            addr,
            _node: node,
            broker,
            stop: Some(stop),
            task,
        }
    }

    async fn client(&self) -> Client {
        Client::connect_url(&format!("ws://{}/ws", self.addr)).await
    }

    async fn ready(&self) -> u16 {
        reqwest::get(format!("http://{}/readyz", self.addr))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// `/healthz`'s `bus.up`.
    async fn bus_up(&self) -> bool {
        match reqwest::get(format!("http://{}/healthz", self.addr)).await {
            Ok(r) => r
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|v| v["bus"]["up"] == true),
            Err(_) => false,
        }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }
}

/// Poll `/healthz` of `s` until its bus is `up`, within `within`.
async fn until_bus(s: &Served, up: bool, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if s.bus_up().await == up {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Whether the emulator has `subscription` (REST, same port as gRPC).
async fn subscription_exists(host: &str, subscription: &str) -> bool {
    let url = format!("http://{host}/v1/projects/{PROJECT}/subscriptions/{subscription}");
    reqwest::get(url)
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false)
}

fn private_settings(e: &Emulator, prefix: &str, i: usize) -> Settings {
    Settings {
        bus: Some(e.bus_url(PROJECT)),
        pubsub_topic: Some(format!("{prefix}-topic")),
        pubsub_subscription: Some(format!("{prefix}-sub{i}")),
        presence_ttl: Some("3s".parse().unwrap()),
        ..base_settings(prefix, i)
    }
}

/// Each instance's subscription exists while it runs and is deleted by the
/// clean shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_is_created_at_start_and_deleted_on_shutdown() {
    let e = Emulator::shared().await;
    let prefix = bus_suite::unique_prefix("lifecycle");
    let s = Served::start(private_settings(e, &prefix, 0)).await;
    let sub = format!("{prefix}-sub0");
    assert!(
        subscription_exists(&e.host(), &sub).await,
        "created at start"
    );
    assert_eq!(s.ready().await, 200);
    s.shutdown().await;
    assert!(
        !subscription_exists(&e.host(), &sub).await,
        "deleted on shutdown"
    );
}

/// kill -9 the emulator mid-stream and restart it on the same port: both
/// servers survive and stay ready (`/readyz` 200) while `/healthz` reports
/// the bus down and back, failed publishes are
/// errors and are counted, the topic and subscriptions are recreated, the
/// subscribers are asked to reconnect (the old subscription and whatever
/// it held are gone: new epochs, `recovered:false`), and traffic resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_killed_and_restarted_mid_stream() {
    let mut e = Emulator::start().await;
    bus_suite::bounded("outage", async {
        let prefix = bus_suite::unique_prefix("outage");
        let a = Served::start(private_settings(&e, &prefix, 0)).await;
        let b = Served::start(private_settings(&e, &prefix, 1)).await;
        let channel = "out:room";
        let mut sub = b.client().await;
        let r = subscribe(&mut sub, channel, 1).await;
        let epoch_before = r["epoch"].as_str().unwrap().to_string();
        let mut p = a.client().await;
        for n in 0..3 {
            let ack = p
                .request(json!({"type": "publish", "channel": channel, "data": n}), n)
                .await;
            assert_eq!(ack["type"], "ack", "{ack}");
            let m = recv_no_presence(&mut sub).await;
            assert_eq!(m["data"], n, "{m}");
        }
        assert_eq!((a.ready().await, b.ready().await), (200, 200));

        e.kill();
        assert!(until_bus(&a, false, WAIT).await, "A sees the bus down");
        assert!(until_bus(&b, false, WAIT).await, "B sees the bus down");
        assert_eq!((a.ready().await, b.ready().await), (200, 200));
        let failures = a.broker.publish_failures();
        let r = p
            .request(
                json!({"type": "publish", "channel": channel, "data": "lost"}),
                10,
            )
            .await;
        assert_eq!(r["type"], "error", "{r}");
        assert_eq!(r["code"], "bus_unavailable", "{r}");
        assert!(
            a.broker.publish_failures() > failures,
            "failed publishes are counted"
        );
        let metrics: Value = reqwest::get(format!("http://{}/metrics", a.addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(metrics["busPublishErrors"].as_u64() > Some(0), "{metrics}");
        // The local connection is still served.
        let pong = p.request(json!({"type": "ping"}), 11).await;
        assert_eq!(pong["type"], "pong");

        e.restart().await;
        assert!(
            until_bus(&a, true, Duration::from_secs(20)).await,
            "A ready again"
        );
        assert!(
            until_bus(&b, true, Duration::from_secs(20)).await,
            "B ready again"
        );
        // B's subscription was recreated: its subscriber is asked to
        // reconnect, and recovery tells the truth.
        assert_eq!(sub.expect_close().await, 1012);
        let mut sub = b.client().await;
        sub.send(json!({"type": "subscribe", "channel": channel,
            "since": {"epoch": epoch_before, "offset": 3}, "id": 2}))
            .await;
        let s = recv_no_presence(&mut sub).await;
        assert_eq!(s["type"], "subscribed", "{s}");
        assert_eq!(s["recovered"], false, "{s}");
        assert_ne!(
            s["epoch"],
            epoch_before.as_str(),
            "a new epoch after the loss"
        );
        // Traffic resumes across instances (A's client may have been asked
        // to reconnect too: use a fresh one).
        let mut p = a.client().await;
        let mut got = None;
        for n in 0..50 {
            let r = p
                .request(
                    json!({"type": "publish", "channel": channel, "data": "after"}),
                    100 + n,
                )
                .await;
            if r["type"] == "ack" {
                got = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(got.is_some(), "publishing works again");
        let m = recv_no_presence(&mut sub).await;
        assert_eq!(m["data"], "after", "{m}");
        assert_eq!(m["offset"], 1, "first of the new epoch: {m}");
        drop((p, sub));
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
    e.kill();
}

/// The binary with the bus unreachable exits non-zero, quickly, saying why.
#[tokio::test]
async fn unreachable_emulator_fails_start_up() {
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args([
                "--bus",
                "pubsub://test-project",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ])
            .env("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")
            .env_remove("SWITCHBOARD_BUS")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("exits in bounded time")
    .expect("runs");
    assert!(!out.status.success(), "non-zero exit");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bus unavailable"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// Cross-instance latency: 8 publishers on A, each publishing as fast as
/// its acks come back (a session handles one request at a time), for 2 s;
/// one subscriber on B. Latency is publish request sent → message received
/// on B, measured at the clients. Reported, never asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_instance_latency() {
    const PUBLISHERS: usize = 8;
    const RUN: Duration = Duration::from_secs(2);
    let f = PubSub::shared().await;
    bus_suite::bounded("latency", async {
        let cluster = Cluster::start(&f, "latency", 2).await;
        let channel = "lat:room";
        let mut sub = cluster.client(1).await;
        subscribe(&mut sub, channel, 1).await;
        let sent = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let mut tasks = Vec::new();
        let begin = Instant::now();
        for k in 0..PUBLISHERS {
            let mut p = cluster.client(0).await;
            let sent = sent.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while begin.elapsed() < RUN {
                    sent.lock().unwrap().insert((k as u64, n), Instant::now());
                    let ack = p
                        .request(json!({"type": "publish", "channel": channel,
                            "data": {"k": k, "n": n}}), n)
                        .await;
                    assert_eq!(ack["type"], "ack", "{ack}");
                    n += 1;
                }
                n
            }));
        }
        let mut lat = Vec::new();
        let mut total = None;
        loop {
            if total.is_none() && tasks.iter().all(|t| t.is_finished()) {
                let mut sum = 0;
                for t in tasks.drain(..) {
                    sum += t.await.unwrap();
                }
                total = Some(sum as usize);
            }
            if total.is_some_and(|t| lat.len() >= t) {
                break;
            }
            let m = match tokio::time::timeout(Duration::from_millis(50), sub.recv()).await {
                Ok(m) => m,
                Err(_) => continue,
            };
            if m["type"] != "message" {
                continue;
            }
            let key = (m["data"]["k"].as_u64().unwrap(), m["data"]["n"].as_u64().unwrap());
            let t0 = sent.lock().unwrap()[&key];
            lat.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        let elapsed = begin.elapsed().as_secs_f64();
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let q = |p: f64| lat[((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1];
        eprintln!(
            "pubsub (emulator) cross-instance latency, {PUBLISHERS} publishers on A -> 1 subscriber on B, \
             {} msgs in {elapsed:.1} s ({:.0} msg/s): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            lat.len(),
            lat.len() as f64 / elapsed,
            q(0.50),
            q(0.99),
            lat[lat.len() - 1]
        );
        drop(sub);
        cluster.shutdown().await;
    })
    .await;
}
