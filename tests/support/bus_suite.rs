//! The cross-instance behaviour suite, run against every bus.
//!
//! # How to use it
//!
//! In `tests/bus_<name>.rs`:
//!
//! ```ignore
//! mod support;
//! #[macro_use]
//! #[path = "support/bus_suite.rs"]
//! mod bus_suite;
//!
//! use bus_suite::BusFactory;
//! use switchboard::config::Settings;
//!
//! struct MyBus;
//! impl BusFactory for MyBus {
//!     fn settings(&self, prefix: &str, i: usize) -> Settings {
//!         Settings {
//!             bus: Some("nats://127.0.0.1:4222".into()),
//!             bus_prefix: Some(prefix.into()),
//!             presence_ttl: Some("2s".parse().unwrap()),
//!             ..bus_suite::base_settings(prefix, i)
//!         }
//!     }
//!     fn presence_expiry(&self) -> std::time::Duration {
//!         std::time::Duration::from_secs(2)
//!     }
//! }
//!
//! mod my_bus {
//!     bus_suite!(super::MyBus);
//! }
//! ```
//!
//! `bus_suite!(factory)` expands to one `#[tokio::test]` per case (the
//! names of the `pub async fn`s below); a file that wants only some cases
//! calls them itself: `bus_suite::direct_across_instances(&MyBus).await`.
//!
//! * Every case starts its own instances (up to three) with
//!   [`BusFactory::settings`], a `prefix` unique to the case (use it as
//!   `bus_prefix`, and in topic/subscription names) and `i` = 0, 1, 2.
//! * Each instance runs in its **own Tokio runtime** (own thread), like a
//!   separate process: [`Instance::crash`] drops that runtime, which ends
//!   every task of the instance (server, sessions, bus tasks, heartbeats)
//!   without any cleanup code running — the crash the presence-expiry case
//!   needs.
//! * A bus that is one process only (the memory bus) returns 1 from
//!   [`BusFactory::distinct_instances`]: instances 0, 1, 2 are then the
//!   same server, the cases still check exactly-once delivery, order and
//!   recovery on that one server, and the crash case is skipped.
//! * Every case is bounded ([`CASE_TIMEOUT`]); "must arrive" waits are
//!   generous ([`support::WAIT`](crate::support::WAIT)); nothing asserts a
//!   latency.

#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard::config::{Config, Settings};
use switchboard::{Node, server};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support::{Client, WAIT};

/// Longest one case may take.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(90);

/// How long "nothing more arrives" is watched for (duplicates, echoes).
pub const QUIET: Duration = Duration::from_millis(400);

/// What a test file tells the suite about its bus.
pub trait BusFactory: Send + Sync + 'static {
    /// Settings of instance `i` (0, 1 or 2) of one case. `prefix` is unique
    /// to the case; every instance of the case must share the bus under it
    /// and no other case may see its traffic. Start from
    /// [`base_settings`].
    fn settings(&self, prefix: &str, i: usize) -> Settings;

    /// Distinct servers behind instances 0, 1, 2: 3 for a shared bus, 1 for
    /// the memory bus (every "instance" is then the same server).
    fn distinct_instances(&self) -> usize {
        3
    }

    /// The longest the presence entries (and direct address) of a crashed
    /// instance may stay visible (the bus's documented expiry, as set in
    /// [`settings`](BusFactory::settings)); the suite waits this plus a
    /// margin.
    fn presence_expiry(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// Whether a client reconnecting to another instance recovers what it
    /// missed (`recovered:true`). A bus that cannot returns false and the
    /// suite then checks the honest answer: `recovered:false` and no
    /// partial replay.
    fn recovers_across_instances(&self) -> bool {
        true
    }

    /// Whether the bus gives idempotent and conditional publish; a bus
    /// that cannot returns false and the suite checks it refuses them
    /// with `unsupported`.
    fn publish_conditions(&self) -> bool {
        true
    }
}

#[path = "bus_suite_state.rs"]
mod state;
#[allow(unused_imports)] // a test file may run none of them
pub use state::*;

/// Loopback, a free port, demo off (no `sys:metrics` noise), a short drain,
/// and an instance id derived from the case's prefix.
pub fn base_settings(prefix: &str, i: usize) -> Settings {
    Settings {
        host: Some([127, 0, 0, 1].into()),
        port: Some(0),
        instance_id: Some(format!("{prefix}-i{i}")),
        drain_timeout: Some("2s".parse().expect("a duration")),
        demo: Some(false),
        // Small: on NATS it is the channel stream's `max_bytes`, which
        // JetStream reserves against the server's storage for every test
        // prefix (256 MiB each exhausted a shared server after a few runs).
        history_max_bytes: Some(16 << 20),
        ..Default::default()
    }
}

/// A prefix unique to one case: letters, digits and `-` only.
pub fn unique_prefix(case: &str) -> String {
    let case: String = case
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    format!("sbt-{case}-{}", switchboard::ids::random_base36(8))
}

/// With `RUST_LOG` set, log to the test output (`--nocapture` shows it).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// One server in its own runtime.
pub struct Instance {
    pub addr: SocketAddr,
    pub node: Node,
    /// The instance's runtime; dropped (in the background) by `crash`.
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Instance {
    /// Start a server with `settings` in a runtime of its own. Panics if the
    /// node cannot start (the bus is unreachable; a shared bus server that
    /// is down is named, with how to start it).
    pub async fn start(settings: Settings) -> Instance {
        match Instance::try_start(settings).await {
            Ok(i) => i,
            Err(e) => panic!("instance starts: {e}"),
        }
    }

    /// Like [`start`](Instance::start), returning the start-up error.
    pub async fn try_start(settings: Settings) -> switchboard::Result<Instance> {
        init_logging();
        if let Some(url) = &settings.bus {
            crate::support::services::require_bus(url);
        }
        let config = Config::from_settings(settings)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sb-instance")
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let started = rt.spawn(async move {
            let listener = switchboard::server::bind((config.host, config.port).into())?;
            let addr = listener.local_addr()?;
            let node = Node::new(config).await?;
            let n = node.clone();
            let task = tokio::spawn(async move {
                let _ = server::run(listener, n, async {
                    let _ = stopped.await;
                })
                .await;
            });
            Ok::<_, switchboard::error::Error>((addr, node, task))
        });
        let result = match started.await {
            Ok(r) => r,
            Err(e) => panic!("instance start-up task failed: {e}"),
        };
        match result {
            Ok((addr, node, task)) => Ok(Instance {
                addr,
                node,
                rt: Some(rt),
                stop: Some(stop),
                task: Some(task),
            }),
            Err(e) => {
                rt.shutdown_background();
                Err(e)
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A new WebSocket client of this instance (welcome read).
    pub async fn client(&self) -> Client {
        Client::connect_url(&self.url("/ws")).await
    }

    /// Kill the instance: every task of its runtime is dropped where it
    /// stands; no unsubscribe, no presence removal, no bus close.
    pub fn crash(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    /// Clean shutdown: drain (bounded), close the bus, stop the runtime.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The instances of one case.
pub struct Cluster {
    /// The case's unique bus prefix.
    pub prefix: String,
    /// `None` once crashed.
    instances: Vec<Option<Instance>>,
}

impl Cluster {
    /// Start `n` instances (at most the factory's distinct count).
    pub async fn start(f: &dyn BusFactory, case: &str, n: usize) -> Cluster {
        Cluster::start_with(f, case, n, |_| {}).await
    }

    /// Start `n` instances with `tweak` applied to each one's settings.
    pub async fn start_with(
        f: &dyn BusFactory,
        case: &str,
        n: usize,
        tweak: impl Fn(&mut Settings),
    ) -> Cluster {
        let prefix = unique_prefix(case);
        let n = n.min(f.distinct_instances()).max(1);
        let mut instances = Vec::new();
        for i in 0..n {
            let mut s = f.settings(&prefix, i);
            tweak(&mut s);
            instances.push(Some(Instance::start(s).await));
        }
        Cluster { prefix, instances }
    }

    /// Instance `i`; with fewer distinct instances, `i` wraps around.
    pub fn get(&self, i: usize) -> &Instance {
        self.instances[i % self.instances.len()]
            .as_ref()
            .expect("instance is alive")
    }

    /// Distinct running servers.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// A client of instance `i`.
    pub async fn client(&self, i: usize) -> Client {
        self.get(i).client().await
    }

    /// Crash instance `i` (see [`Instance::crash`]).
    pub fn crash(&mut self, i: usize) {
        let n = self.instances.len();
        if let Some(inst) = self.instances[i % n].take() {
            inst.crash();
        }
    }

    /// Shut every instance down cleanly.
    pub async fn shutdown(mut self) {
        for inst in self.instances.drain(..).flatten() {
            inst.shutdown().await;
        }
    }
}

/// Run `case` within [`CASE_TIMEOUT`].
pub async fn bounded<F: std::future::Future<Output = ()>>(name: &str, case: F) {
    if tokio::time::timeout(CASE_TIMEOUT, case).await.is_err() {
        panic!("{name} did not finish within {CASE_TIMEOUT:?}");
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

/// Subscribe and return the `subscribed` reply.
pub async fn subscribe(c: &mut Client, channel: &str, id: u64) -> Value {
    let r = c
        .request(json!({"type": "subscribe", "channel": channel}), id)
        .await;
    assert_eq!(r["type"], "subscribed", "{r}");
    r
}

/// Ask `c` for a direct message to `target` until the answer is
/// `unknown_target`; false if it is still delivered after `within`.
pub async fn until_unknown_target(c: &mut Client, target: &str, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut id = 1000;
    loop {
        id += 1;
        let r = c
            .request(json!({"type": "direct", "targetId": target, "data": 0}), id)
            .await;
        if r["code"] == "unknown_target" {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ask `c` for the members of `channel` until they are `expected`; false
/// if they still differ after `within`.
pub async fn until_members(
    c: &mut Client,
    channel: &str,
    expected: &HashSet<String>,
    within: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut id = 2000;
    loop {
        id += 1;
        if members(c, channel, id).await == *expected {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The client ids `presence` reports for `channel`, asked through `c`.
pub async fn members(c: &mut Client, channel: &str, id: u64) -> HashSet<String> {
    let r = c
        .request(json!({"type": "presence", "channel": channel}), id)
        .await;
    assert_eq!(r["type"], "presence", "{r}");
    r["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["clientId"].as_str().expect("clientId").to_string())
        .collect()
}

/// A broadcast from A reaches every other client on A, B and C exactly
/// once, in the sender's order, and never the sender.
pub async fn broadcast_reaches_other_instances(f: &dyn BusFactory) {
    bounded("broadcast_reaches_other_instances", async {
        let cluster = Cluster::start(f, "broadcast", 3).await;
        let mut sender = cluster.client(0).await;
        let mut others = vec![
            cluster.client(0).await,
            cluster.client(1).await,
            cluster.client(1).await,
            cluster.client(2).await,
        ];
        for n in 1..=3 {
            let ack = sender
                .request(json!({"type": "broadcast", "data": {"n": n}}), n)
                .await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
        for c in &mut others {
            for n in 1..=3 {
                let m = c.recv().await;
                assert_eq!(m["type"], "broadcast", "{m}");
                assert_eq!(m["data"]["n"], n, "in the sender's order: {m}");
                assert_eq!(m["senderId"], sender.id.as_str());
            }
        }
        sender.expect_silence(QUIET).await;
        for c in &mut others {
            c.expect_silence(QUIET).await;
        }
        drop((sender, others));
        cluster.shutdown().await;
    })
    .await;
}

/// Direct messages cross instances both ways; on the same instance too; an
/// unknown target is `unknown_target`, and so is a target that left.
/// `{"type":"direct","userId":U}` reaches every connection of user U on
/// every instance, and nobody else.
pub async fn direct_to_a_user_across_instances(f: &dyn BusFactory) {
    bounded("direct_to_a_user_across_instances", async {
        const SECRET: &str = "suite-secret-0123456789abcdef";
        let path = std::env::temp_dir().join(format!("sb-suite-secret-{}", std::process::id()));
        std::fs::write(&path, SECRET).unwrap();
        let cluster = Cluster::start_with(f, "userdirect", 2, |s| {
            s.auth_hs256_secret_file = Some(path.clone());
        })
        .await;
        switchboard::auth::init_crypto();
        let token = |sub: &str| {
            let exp = switchboard::protocol::now_ms() / 1000 + 600;
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                // Every user may send `direct` to any user (with auth on it
                // needs this grant; anonymous connections may not).
                &json!({"sub": sub, "exp": exp, "direct": ["*"]}),
                &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap()
        };
        let as_user =
            |i: usize, sub: &str| format!("{}?token={}", cluster.get(i).url("/ws"), token(sub));
        let mut alice_a = Client::connect_url(&as_user(0, "alice")).await;
        let mut alice_b = Client::connect_url(&as_user(1, "alice")).await;
        let mut bob = Client::connect_url(&as_user(1, "bob")).await;
        let mut sender = Client::connect_url(&as_user(0, "carol")).await;
        // The user's connections register with the bus as they connect;
        // retry until both are reached (bounded).
        let mut got_a = None;
        let mut got_b = None;
        for attempt in 0..50u64 {
            let ack = sender
                .request(
                    json!({"type":"direct","userId":"alice","data":{"n":attempt}}),
                    100 + attempt,
                )
                .await;
            assert_eq!(ack["type"], "ack", "{ack}");
            if got_a.is_none() {
                got_a = recv_within(&mut alice_a, Duration::from_millis(200)).await;
            }
            if got_b.is_none() {
                got_b = recv_within(&mut alice_b, Duration::from_millis(200)).await;
            }
            if got_a.is_some() && got_b.is_some() {
                break;
            }
        }
        for m in [got_a.expect("alice on A"), got_b.expect("alice on B")] {
            assert_eq!(m["type"], "direct", "{m}");
            assert_eq!(m["senderId"], sender.id.as_str());
        }
        bob.expect_silence(QUIET).await;
        // Nobody connected as that user: accepted, delivered to no one.
        let ack = sender
            .request(json!({"type":"direct","userId":"nobody","data":1}), 1)
            .await;
        assert_eq!(ack["type"], "ack");
        cluster.shutdown().await;
    })
    .await;
}

/// The server API's disconnect reaches a client on another instance.
pub async fn api_disconnect_across_instances(f: &dyn BusFactory) {
    bounded("api_disconnect_across_instances", async {
        let key = "suite-api-key-0123456789abcdef";
        let path = std::env::temp_dir().join(format!("sb-suite-api-key-{}", std::process::id()));
        std::fs::write(&path, key).unwrap();
        let cluster = Cluster::start_with(f, "apidisconnect", 2, |s| {
            s.api_key_file = Some(path.clone());
        })
        .await;
        let mut b = cluster.client(1).await;
        let http = reqwest::Client::new();
        let disconnect = |id: String| {
            http.post(cluster.get(0).http("/api/disconnect"))
                .bearer_auth(key)
                .json(&json!({"clientId": id, "code": 4321, "reason": "bye"}))
                .send()
        };
        // The directory may take a moment to learn of `b` on some buses.
        let mut status = 0;
        for _ in 0..50 {
            status = disconnect(b.id.clone()).await.unwrap().status().as_u16();
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 200);
        assert_eq!(b.expect_close().await, 4321);
        let unknown = disconnect("client-nobody".into()).await.unwrap();
        assert_eq!(unknown.status().as_u16(), 404);
        cluster.shutdown().await;
    })
    .await;
}

/// The next text frame within `d`, if any.
async fn recv_within(c: &mut Client, d: Duration) -> Option<Value> {
    tokio::time::timeout(d, c.recv()).await.ok()
}

pub async fn direct_across_instances(f: &dyn BusFactory) {
    bounded("direct_across_instances", async {
        let cluster = Cluster::start(f, "direct", 2).await;
        let mut a = cluster.client(0).await;
        let mut a2 = cluster.client(0).await;
        let mut b = cluster.client(1).await;

        let ack = a
            .request(
                json!({"type": "direct", "targetId": b.id, "data": "to b"}),
                1,
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let m = b.recv().await;
        assert_eq!(m["type"], "direct", "{m}");
        assert_eq!(m["data"], "to b");
        assert_eq!(m["senderId"], a.id.as_str());

        let ack = b
            .request(
                json!({"type": "direct", "targetId": a.id, "data": "to a"}),
                2,
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let m = a.recv().await;
        assert_eq!(m["data"], "to a", "{m}");
        assert_eq!(m["senderId"], b.id.as_str());

        let ack = a
            .request(
                json!({"type": "direct", "targetId": a2.id, "data": "local"}),
                3,
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(a2.recv().await["data"], "local");

        let err = a
            .request(
                json!({"type": "direct", "targetId": "client-0-nosuchone", "data": 1}),
                4,
            )
            .await;
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["code"], "unknown_target", "{err}");

        // Nobody got anything twice, and the others got nothing.
        a.expect_silence(QUIET).await;
        a2.expect_silence(QUIET).await;
        b.expect_silence(QUIET).await;

        // A client that left stops resolving.
        let gone = b.id.clone();
        drop(b);
        assert!(
            until_unknown_target(&mut a, &gone, WAIT).await,
            "a departed client becomes unknown_target"
        );
        drop((a, a2));
        cluster.shutdown().await;
    })
    .await;
}

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

        let mut streams = Vec::new();
        for s in &mut subs {
            let mut seen = Vec::new();
            let mut last_n = [None::<u64>; 3];
            for k in 1..=total {
                let m = recv_no_presence(s).await;
                assert_eq!(m["type"], "message", "{m}");
                assert_eq!(m["channel"], channel);
                assert_eq!(m["epoch"], epoch.as_str());
                assert_eq!(m["offset"], base + k, "no gap, no duplicate: {m}");
                let p = m["data"]["p"].as_u64().unwrap() as usize;
                let n = m["data"]["n"].as_u64().unwrap();
                assert!(last_n[p].is_none_or(|l| l < n), "publisher order: {m}");
                last_n[p] = Some(n);
                seen.push((p, n));
            }
            streams.push(seen);
        }
        assert!(
            streams.windows(2).all(|w| w[0] == w[1]),
            "every instance sees the same order"
        );
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

/// One `#[tokio::test]` per suite case for `$factory` (an expression
/// implementing [`BusFactory`]). Use it inside a `mod` per bus.
#[macro_export]
macro_rules! bus_suite {
    ($factory:expr) => {
        $crate::bus_suite!(@case $factory, broadcast_reaches_other_instances);
        $crate::bus_suite!(@case $factory, direct_across_instances);
        $crate::bus_suite!(@case $factory, direct_to_a_user_across_instances);
        $crate::bus_suite!(@case $factory, api_disconnect_across_instances);
        $crate::bus_suite!(@case $factory, channel_order_and_offsets_across_instances);
        $crate::bus_suite!(@case $factory, presence_across_instances);
        $crate::bus_suite!(@case $factory, presence_of_a_crashed_instance_expires);
        $crate::bus_suite!(@case $factory, recovery_on_a_different_instance);
        $crate::bus_suite!(@case $factory, history_newest_first);
        $crate::bus_suite!(@case $factory, idempotent_publish_across_instances);
        $crate::bus_suite!(@case $factory, conditional_publish_races);
        $crate::bus_suite!(@case $factory, last_value_channel_across_instances);
    };
    (@case $factory:expr, $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            $crate::bus_suite::$case(&$factory).await;
        }
    };
}
