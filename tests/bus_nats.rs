//! The NATS bus: the shared cross-instance suite against the NATS
//! (JetStream) on 127.0.0.1:4222, broker-level checks of offsets, epochs
//! and history, start-up failure, and outage tests against a PRIVATE
//! `nats-server -js` on a free port (killed with SIGKILL and restarted on
//! the same store), plus a TCP proxy that partitions one instance.
#![cfg(feature = "nats")]

mod support;
#[macro_use]
#[path = "support/bus_suite.rs"]
mod bus_suite;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_suite::{BusFactory, Instance, base_settings, subscribe, unique_prefix};
use serde_json::{Value, json};
use switchboard::broker::nats::{self, NatsBroker, NatsOptions, NatsPresence};
use switchboard::broker::{
    Broker, BrokerHandler, Control, Direct, HistoryOptions, NewPublication, PresenceStore,
};
use switchboard::config::{Config, Settings};
use switchboard::protocol::{ClientInfo, Publication, StreamPosition};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The shared NATS every suite case uses, each under its own prefix.
const NATS: &str = "nats://127.0.0.1:4222";

/// NATS with a short presence expiry, so the crash case takes seconds.
struct NatsBus;

impl BusFactory for NatsBus {
    fn settings(&self, prefix: &str, i: usize) -> Settings {
        Settings {
            bus: Some(NATS.into()),
            bus_prefix: Some(prefix.into()),
            presence_ttl: Some("2s".parse().expect("duration")),
            ..base_settings(prefix, i)
        }
    }
    fn presence_expiry(&self) -> Duration {
        Duration::from_secs(2)
    }
}

mod nats_bus {
    bus_suite!(super::NatsBus);
}

/// NATS announces the members of a crashed instance: each instance tells
/// its own subscribers when another instance's presence key expires (see
/// `broker::nats::ghosts`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_members_leave_once() {
    bus_suite::crashed_members_leave_once(&NatsBus).await;
}

// ---------------------------------------------------------------------
// Broker-level checks.

/// Records what the broker delivers.
#[derive(Default)]
struct Recorder {
    publications: Mutex<Vec<(String, String, u64)>>,
    controls: Mutex<Vec<String>>,
    resync_failed: Mutex<Vec<String>>,
}

impl Recorder {
    /// Offsets of the publications handed over so far, in arrival order.
    fn offsets(&self) -> Vec<u64> {
        self.publications
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.2)
            .collect()
    }
}

impl BrokerHandler for Recorder {
    fn position(&self, _channel: &str) -> Option<StreamPosition> {
        None
    }
    fn positions(&self) -> Vec<(Arc<str>, Option<StreamPosition>)> {
        Vec::new()
    }
    fn resync_failed(&self, channel: &str) {
        self.resync_failed.lock().unwrap().push(channel.into());
    }
    fn on_publication(&self, channel: &Arc<str>, epoch: &Arc<str>, p: &Publication) {
        self.publications
            .lock()
            .unwrap()
            .push((channel.to_string(), epoch.to_string(), p.offset));
    }
    fn on_control(&self, c: &Control) {
        self.controls
            .lock()
            .unwrap()
            .push(serde_json::to_string(c).unwrap());
    }
    fn on_direct(&self, _d: &Direct) -> bool {
        false
    }
}

fn config(prefix: &str, instance: &str) -> Config {
    Config::from_settings(Settings {
        bus: Some(NATS.into()),
        bus_prefix: Some(prefix.into()),
        instance_id: Some(instance.into()),
        presence_ttl: Some("2s".parse().unwrap()),
        ..Default::default()
    })
    .unwrap()
}

async fn broker(
    url: &str,
    prefix: &str,
    instance: &str,
) -> (Arc<NatsBroker>, Arc<NatsPresence>, Arc<Recorder>) {
    support::services::require_bus(url);
    let config = config(prefix, instance);
    let (b, p) = nats::connect_with(url, &config, NatsOptions::from_config(&config))
        .await
        .expect("NATS on 127.0.0.1:4222");
    let rec = Arc::new(Recorder::default());
    b.start(rec.clone()).await.unwrap();
    (b, p, rec)
}

fn new_pub(n: u64) -> NewPublication {
    NewPublication {
        data: serde_json::value::to_raw_value(&json!({ "n": n }))
            .unwrap()
            .into(),
        sender_id: None,
        timestamp: switchboard::protocol::now_ms(),
        conditions: Default::default(),
    }
}

const OPTS: HistoryOptions = HistoryOptions {
    size: 3,
    ttl: Duration::from_secs(60),
};

async fn wait_until(mut f: impl FnMut() -> bool, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

#[test]
fn tokens_are_injective_and_subject_safe() {
    let names = [
        "chat:room",
        "chat=3Aroom",
        "a.b",
        "a/b",
        "",
        "=",
        "x y*>",
        "ü",
    ];
    let tokens: HashSet<String> = names.iter().map(|n| nats::token(n)).collect();
    assert_eq!(tokens.len(), names.len(), "{tokens:?}");
    for t in &tokens {
        assert!(!t.is_empty());
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'=')),
            "{t}"
        );
    }
    assert_eq!(nats::token("chat:room"), "chat=3Aroom");
}

#[tokio::test]
async fn offsets_history_size_limit_and_stale_epochs() {
    let prefix = unique_prefix("hist");
    let (b, _p, rec) = broker(NATS, &prefix, "h1").await;
    // An empty channel reports a position whose epoch the first
    // publication keeps.
    let empty = b.history("c", None, 10, OPTS).await.unwrap();
    assert_eq!(empty.top.offset, 0);
    assert!(empty.publications.is_empty());
    b.subscribe("c").await.unwrap();
    let mut epoch = None;
    for n in 1..=5 {
        let pos = b.publish("c", new_pub(n), OPTS).await.unwrap();
        assert_eq!(pos.offset, n);
        assert_eq!(pos.epoch, empty.top.epoch, "the reported epoch is kept");
        epoch = Some(pos.epoch);
    }
    let epoch = epoch.unwrap();
    assert!(
        wait_until(
            || rec.publications.lock().unwrap().len() == 5,
            Duration::from_secs(5)
        )
        .await
    );
    let offsets = rec.offsets();
    assert_eq!(
        offsets,
        vec![1, 2, 3, 4, 5],
        "own publications, once, in order"
    );

    let h = b.history("c", None, 100, OPTS).await.unwrap();
    assert_eq!(h.top.offset, 5);
    let kept: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(kept, vec![3, 4, 5], "the namespace's size is enforced");
    let since = StreamPosition {
        epoch: epoch.clone(),
        offset: 3,
    };
    let h2 = b.history("c", Some(&since), 1, OPTS).await.unwrap();
    assert_eq!(h2.publications.len(), 1);
    assert_eq!(h2.publications[0].offset, 4);
    let stale = StreamPosition {
        epoch: "other".into(),
        offset: 1,
    };
    assert!(
        b.history("c", Some(&stale), 100, OPTS)
            .await
            .unwrap()
            .publications
            .is_empty()
    );

    // A long gap is read through a consumer: 40 more, all retained with a
    // larger size.
    let big = HistoryOptions {
        size: 100,
        ttl: Duration::from_secs(60),
    };
    for n in 6..=45 {
        b.publish("c", new_pub(n), big).await.unwrap();
    }
    let h = b.history("c", None, usize::MAX, big).await.unwrap();
    let all: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(all, (1..=45).collect::<Vec<_>>());
    let h = b
        .history(
            "c",
            Some(&StreamPosition {
                epoch: epoch.clone(),
                offset: 40,
            }),
            usize::MAX,
            big,
        )
        .await
        .unwrap();
    let tail: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(tail, vec![41, 42, 43, 44, 45], "short gaps by direct gets");

    // A purged channel (lost stream) starts a new epoch at offset 1, and
    // subscribers see the new epoch.
    let client = async_nats::connect(NATS).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(format!("{prefix}-channels")).await.unwrap();
    stream
        .purge()
        .filter(format!("{prefix}.ch.c"))
        .await
        .unwrap();
    let pos = b.publish("c", new_pub(99), OPTS).await.unwrap();
    assert_eq!(pos.offset, 1);
    assert_ne!(pos.epoch, epoch, "a new epoch after the purge");
    assert!(
        wait_until(
            || rec
                .publications
                .lock()
                .unwrap()
                .last()
                .is_some_and(|p| p.1 == *pos.epoch && p.2 == 1),
            Duration::from_secs(5)
        )
        .await
    );
    assert!(rec.resync_failed.lock().unwrap().is_empty());
    b.close().await.unwrap();
    js.delete_stream(format!("{prefix}-channels"))
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_publishers_on_two_connections_get_contiguous_offsets() {
    let prefix = unique_prefix("conc");
    let (a, _pa, rec_a) = broker(NATS, &prefix, "a").await;
    let (b, _pb, _rec_b) = broker(NATS, &prefix, "b").await;
    a.subscribe("room").await.unwrap();
    let mut tasks = Vec::new();
    for (i, br) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        tasks.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            for n in 0..25 {
                let pos = br
                    .publish("room", new_pub(i as u64 * 100 + n), OPTS)
                    .await
                    .unwrap();
                offsets.push(pos.offset);
            }
            offsets
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=100).collect::<Vec<_>>());
    assert!(
        wait_until(
            || rec_a.publications.lock().unwrap().len() == 100,
            Duration::from_secs(10)
        )
        .await
    );
    let delivered = rec_a.offsets();
    assert_eq!(delivered, (1..=100).collect::<Vec<_>>(), "offset order");
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn presence_merges_instances_and_clean_close_removes_them() {
    let prefix = unique_prefix("pres");
    let (a, pa, _) = broker(NATS, &prefix, "a").await;
    let (b, pb, _) = broker(NATS, &prefix, "b").await;
    let info = |id: &str| ClientInfo {
        client_id: id.into(),
        user_id: Some("u".into()),
        name: None,
    };
    // Concurrent adds share writes and all land.
    let mut adds = Vec::new();
    for i in 0..20 {
        let pa = pa.clone();
        adds.push(tokio::spawn(async move {
            pa.add("ch:1", &info(&format!("a{i:02}"))).await.unwrap()
        }));
    }
    for t in adds {
        t.await.unwrap();
    }
    pb.add("ch:1", &info("b1")).await.unwrap();
    pb.add("ch:2", &info("b2")).await.unwrap();
    let m = pb.members("ch:1").await.unwrap();
    assert_eq!(m.len(), 21, "{m:?}");
    assert_eq!(m[0].user_id.as_deref(), Some("u"));
    pa.remove("ch:1", "a00").await.unwrap();
    assert_eq!(pb.members("ch:1").await.unwrap().len(), 20);
    assert_eq!(pa.members("ch:2").await.unwrap().len(), 1);
    assert!(pa.members("ch:none").await.unwrap().is_empty());
    pb.clear().await.unwrap();
    assert_eq!(pa.members("ch:1").await.unwrap().len(), 19);
    assert!(pa.members("ch:2").await.unwrap().is_empty());
    a.close().await.unwrap();
    b.close().await.unwrap();
}

// ---------------------------------------------------------------------
// Start-up failure.

#[tokio::test]
async fn unreachable_nats_fails_connect_in_bounded_time() {
    let config = config("sbt-unreach", "u");
    let started = Instant::now();
    let r = nats::connect("nats://127.0.0.1:1", &config).await;
    let err = match r {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("bus unavailable"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn binary_exits_non_zero_when_nats_is_unreachable() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "--bus",
            "nats://127.0.0.1:1",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the binary did not exit with NATS unreachable");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "{status:?}");
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains("bus unavailable"), "{stderr}");
}

// ---------------------------------------------------------------------
// Outage: a private nats-server, killed and restarted; a partition.

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private `nats-server -js` with its own store dir; SIGKILLed on drop.
struct PrivateNats {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateNats {
    async fn start() -> PrivateNats {
        let dir =
            std::env::temp_dir().join(format!("sb-nats-{}", switchboard::ids::random_base36(10)));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = PrivateNats {
            port: free_port(),
            dir,
            child: None,
        };
        s.spawn().await;
        s
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                support::services::cannot_run(
                    "nats-server",
                    e,
                    "install it with `apt-get install nats-server`",
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, no goodbye.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy in front of a NATS server; `cut` drops every connection
/// and refuses new ones until `restore`.
struct Proxy {
    port: u16,
    upstream: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let p = Proxy {
            port: free_port(),
            upstream,
            tasks: Arc::default(),
        };
        p.restore().await;
        p
    }

    async fn restore(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let upstream = self.upstream;
        let tasks = self.tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let t = tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                tasks.lock().unwrap().push(t);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Whether the instance reports its bus up (`/healthz`).
async fn bus_up(inst: &Instance) -> bool {
    match reqwest::get(inst.http("/healthz")).await {
        Ok(r) => r
            .json::<Value>()
            .await
            .is_ok_and(|v| v["bus"]["up"] == true),
        Err(_) => false,
    }
}

async fn until_bus(inst: &Instance, up: bool, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if bus_up(inst).await == up {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn settings_for(url: &str, prefix: &str, i: usize) -> Settings {
    Settings {
        bus: Some(url.into()),
        bus_prefix: Some(prefix.into()),
        presence_ttl: Some("3s".parse().unwrap()),
        ..base_settings(prefix, i)
    }
}

/// Publish `data` through `c`; the ack's offset, or `None` on an error
/// reply (bus down).
async fn publish(c: &mut support::Client, channel: &str, data: Value, id: u64) -> Option<u64> {
    let r = c
        .request(json!({"type":"publish","channel":channel,"data":data}), id)
        .await;
    match r["type"].as_str() {
        Some("ack") => Some(r["offset"].as_u64().expect("offset")),
        _ => {
            assert_eq!(r["type"], "error", "{r}");
            None
        }
    }
}

/// Every `message` on `channel` until `top` is reached: their offsets.
async fn offsets_until(c: &mut support::Client, top: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.last().is_none_or(|&o| o < top) {
        let m = c.recv().await;
        if m["type"] == "message" {
            seen.push(m["offset"].as_u64().unwrap());
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_stream() {
    bus_suite::bounded("nats_killed_and_restarted_mid_stream", async {
        let mut server = PrivateNats::start().await;
        let prefix = unique_prefix("kill");
        let a = Instance::start(settings_for(&server.url(), &prefix, 0)).await;
        let b = Instance::start(settings_for(&server.url(), &prefix, 1)).await;
        let channel = "k:room";
        let mut sub = a.client().await;
        let r = subscribe(&mut sub, channel, 1).await;
        let epoch = r["epoch"].as_str().unwrap().to_string();
        let mut publisher = b.client().await;
        let mut acked = Vec::new();
        for n in 0..10 {
            acked.extend(publish(&mut publisher, channel, json!(n), 100 + n).await);
        }
        assert_eq!(acked, (1..=10).collect::<Vec<_>>());
        assert_eq!(offsets_until(&mut sub, 10).await, acked);
        // Let the store write what it acknowledged, then SIGKILL.
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.kill();
        assert!(
            until_bus(&a, false, Duration::from_secs(10)).await,
            "A sees the bus down"
        );
        assert!(
            until_bus(&b, false, Duration::from_secs(10)).await,
            "B sees the bus down"
        );
        // The instances stay ready (a shared bus's outage must not take the
        // fleet out of the load balancer) and keep serving local clients;
        // bus operations fail.
        for i in [&a, &b] {
            let r = reqwest::get(i.http("/readyz")).await.unwrap();
            assert_eq!(r.status().as_u16(), 200, "ready during the outage");
        }
        assert_eq!(
            publish(&mut publisher, channel, json!("down"), 200).await,
            None
        );
        let live = reqwest::get(b.http("/livez")).await.unwrap();
        assert_eq!(live.status().as_u16(), 200, "the server survives");

        server.spawn().await;
        assert!(
            until_bus(&a, true, Duration::from_secs(20)).await,
            "A's bus back"
        );
        assert!(
            until_bus(&b, true, Duration::from_secs(20)).await,
            "B's bus back"
        );
        let mut more = Vec::new();
        for n in 0..5 {
            more.extend(publish(&mut publisher, channel, json!(n), 300 + n).await);
        }
        assert_eq!(more, (11..=15).collect::<Vec<_>>(), "offsets continue");
        assert_eq!(
            offsets_until(&mut sub, 15).await,
            more,
            "no gap, no duplicate"
        );
        // History survived: a new client recovers from the start.
        let mut late = b.client().await;
        late.send(json!({"type":"subscribe","channel":channel,
            "since":{"epoch":epoch,"offset":0},"id":9}))
            .await;
        let recovered = offsets_until(&mut late, 15).await;
        assert_eq!(recovered, (1..=15).collect::<Vec<_>>());
        let s = late.recv_type("subscribed").await;
        assert_eq!(s["recovered"], true, "{s}");
        let metrics: Value = reqwest::get(b.http("/metrics"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            metrics.to_string().contains("busPublishErrors"),
            "{metrics}"
        );
        drop((sub, publisher, late));
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

/// A partition, not a crash: the member of an instance cut off the bus
/// for longer than `presence_ttl` leaves, once, for the subscriber on the
/// other instance (its key expired), and joins again when its instance is
/// back (its key is rewritten).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_leaves_and_joins_again() {
    bus_suite::bounded("a_member_cut_off_leaves_and_joins_again", async {
        let server = PrivateNats::start().await;
        let upstream: SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
        let proxy = Proxy::start(upstream).await;
        let prefix = unique_prefix("cutpres");
        let via_proxy = format!("nats://127.0.0.1:{}", proxy.port);
        let a = Instance::start(settings_for(&via_proxy, &prefix, 0)).await;
        let b = Instance::start(settings_for(&server.url(), &prefix, 1)).await;
        let channel = "cutpres:room";
        let mut x = a.client().await;
        let mut y = b.client().await;
        subscribe(&mut x, channel, 1).await;
        subscribe(&mut y, channel, 1).await;
        let both: HashSet<String> = [x.id.clone(), y.id.clone()].into();
        assert!(
            bus_suite::until_members(&mut y, channel, &both, Duration::from_secs(10)).await,
            "both members seen from B"
        );
        // The next presence event Y gets (within `within`).
        async fn event(y: &mut support::Client, within: Duration) -> Value {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let v = tokio::time::timeout(left, y.recv())
                    .await
                    .unwrap_or_else(|_| panic!("no join/leave within {within:?}"));
                if v["type"] == "join" || v["type"] == "leave" {
                    return v;
                }
            }
        }
        proxy.cut();
        // presence_ttl is 3 s (settings_for).
        let l = event(&mut y, Duration::from_secs(10)).await;
        assert_eq!(l["type"], "leave", "{l}");
        assert_eq!(l["clientId"], x.id.as_str(), "{l}");
        proxy.restore().await;
        let j = event(&mut y, Duration::from_secs(20)).await;
        assert_eq!(j["type"], "join", "{j}");
        assert_eq!(j["clientId"], x.id.as_str(), "{j}");
        // Once each: nothing more about it.
        y.expect_silence(Duration::from_secs(4)).await;
        drop((x, y));
        a.shutdown().await;
        b.shutdown().await;
        drop(proxy);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_instance_replays_what_it_missed() {
    bus_suite::bounded("a_partitioned_instance_replays_what_it_missed", async {
        let server = PrivateNats::start().await;
        let upstream: SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
        let proxy = Proxy::start(upstream).await;
        let prefix = unique_prefix("part");
        let via_proxy = format!("nats://127.0.0.1:{}", proxy.port);
        let a = Instance::start(settings_for(&via_proxy, &prefix, 0)).await;
        let b = Instance::start(settings_for(&server.url(), &prefix, 1)).await;
        let channel = "p:room";
        let mut sub = a.client().await;
        subscribe(&mut sub, channel, 1).await;
        let mut publisher = b.client().await;
        for n in 0..3 {
            publish(&mut publisher, channel, json!(n), 10 + n)
                .await
                .unwrap();
        }
        assert_eq!(offsets_until(&mut sub, 3).await, vec![1, 2, 3]);

        proxy.cut();
        assert!(
            until_bus(&a, false, Duration::from_secs(10)).await,
            "A sees the bus down"
        );
        assert!(bus_up(&b).await, "B is unaffected");
        // Published while A cannot hear them.
        for n in 0..5 {
            let o = publish(&mut publisher, channel, json!(n), 20 + n).await;
            assert_eq!(o, Some(4 + n));
        }
        proxy.restore().await;
        assert!(
            until_bus(&a, true, Duration::from_secs(20)).await,
            "A's bus back"
        );
        // Replayed from history in order, then live.
        assert_eq!(offsets_until(&mut sub, 8).await, vec![4, 5, 6, 7, 8]);
        let o = publish(&mut publisher, channel, json!("live"), 30).await;
        assert_eq!(o, Some(9));
        assert_eq!(offsets_until(&mut sub, 9).await, vec![9]);
        sub.expect_silence(Duration::from_millis(300)).await;
        drop((sub, publisher));
        a.shutdown().await;
        b.shutdown().await;
        drop(proxy);
    })
    .await;
}

/// Cross-instance latency through NATS at a stated, bounded load: one
/// publisher on B, one subscriber on A, 2000 publications at ~1000/s.
/// Prints p50/p99 (no assertion on the figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_instance_latency_report() {
    bus_suite::bounded("cross_instance_latency_report", async {
        let prefix = unique_prefix("lat");
        let a = Instance::start(bus_suite_settings(&prefix, 0)).await;
        let b = Instance::start(bus_suite_settings(&prefix, 1)).await;
        let channel = "lat:room";
        let mut sub = a.client().await;
        subscribe(&mut sub, channel, 1).await;
        let mut publisher = b.client().await;
        const N: u64 = 2000;
        let send = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            for n in 0..N {
                tick.tick().await;
                publisher
                    .send(json!({"type":"publish","channel":channel,
                        "data":{"t": now_us()},"id": n}))
                    .await;
            }
            publisher
        });
        let mut lat = Vec::with_capacity(N as usize);
        while (lat.len() as u64) < N {
            let m = sub.recv().await;
            if m["type"] == "message" {
                let t = m["data"]["t"].as_u64().unwrap();
                lat.push(now_us().saturating_sub(t));
            }
        }
        let publisher = send.await.unwrap();
        lat.sort_unstable();
        let q = |x: f64| lat[((lat.len() as f64 * x) as usize).min(lat.len() - 1)];
        eprintln!(
            "NATS cross-instance latency, {N} publications at ~1000/s: p50 {} us, p99 {} us, max {} us",
            q(0.5),
            q(0.99),
            lat[lat.len() - 1]
        );
        drop((sub, publisher));
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

fn bus_suite_settings(prefix: &str, i: usize) -> Settings {
    Settings {
        rate_limit: Some(0.0), // the publisher sends 1000/s on purpose
        ..NatsBus.settings(prefix, i)
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The silent-gap case of issue 16 on NATS: X on A subscribes (offset 3)
/// and gets no live message; A is cut off; B publishes `d-lost`; the NATS
/// server is killed and comes back with an empty store (new epoch); B
/// publishes again; A comes back. X must be closed with 1012 (and then
/// recover with `recovered:false`), never fed the new epoch as if nothing
/// had happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_loss_before_any_live_delivery_is_not_a_silent_gap() {
    bus_suite::bounded("nats_data_loss_before_any_live_delivery", async {
        let mut server = PrivateNats::start().await;
        let upstream: SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
        let proxy = Proxy::start(upstream).await;
        let prefix = unique_prefix("gap");
        let via_proxy = format!("nats://127.0.0.1:{}", proxy.port);
        let a = Instance::start(settings_for(&via_proxy, &prefix, 0)).await;
        let b = Instance::start(settings_for(&server.url(), &prefix, 1)).await;
        let channel = "g:room";
        let mut y = b.client().await;
        for n in 0..3 {
            assert_eq!(
                publish(&mut y, channel, json!(n), 10 + n).await,
                Some(n + 1)
            );
        }
        let mut x = a.client().await;
        let sub = subscribe(&mut x, channel, 1).await;
        assert_eq!(sub["offset"], 3, "{sub}");
        let epoch1 = sub["epoch"].clone();

        proxy.cut();
        assert!(
            until_bus(&a, false, Duration::from_secs(10)).await,
            "A cut off"
        );
        assert_eq!(publish(&mut y, channel, json!("d-lost"), 20).await, Some(4));
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.kill();
        std::fs::remove_dir_all(&server.dir).unwrap();
        std::fs::create_dir_all(&server.dir).unwrap();
        server.spawn().await;
        assert!(until_bus(&b, true, Duration::from_secs(20)).await, "B back");
        let mut acked = None;
        for n in 0..50 {
            // The stream is recreated by B's supervisor; retry until it is.
            acked = publish(&mut y, channel, json!("new"), 30 + n).await;
            if acked.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(acked, Some(1), "a new stream after the data loss");
        proxy.restore().await;
        assert!(until_bus(&a, true, Duration::from_secs(20)).await, "A back");
        loop {
            match tokio::time::timeout(
                Duration::from_secs(15),
                futures_util::StreamExt::next(&mut x.ws),
            )
            .await
            {
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f))))) => {
                    assert_eq!(u16::from(f.code), 1012, "{f:?}");
                    break;
                }
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    assert_ne!(v["type"], "message", "a silent gap: {v}");
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("expected a 1012 close, got {other:?}"),
            }
        }
        let mut x2 = a.client().await;
        x2.send(json!({"type": "subscribe", "channel": channel,
            "since": {"epoch": epoch1, "offset": 3}, "id": 40}))
            .await;
        let again = loop {
            let v = x2.recv().await;
            if v["type"] == "subscribed" {
                break v;
            }
        };
        assert_eq!(again["recovered"], false, "{again}");
        drop((x, x2, y));
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

/// A repeated idempotency key whose first publication has already left
/// the stream (history size 1 everywhere, so one newer message pushes it
/// out): JetStream still knows the id, the server cannot learn the first
/// offset, so the answer is `duplicate` and nothing is published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_whose_first_publication_left_the_stream_is_duplicate() {
    use switchboard::config::NamespaceSettings;
    let cluster = bus_suite::Cluster::start_with(&NatsBus, "dupgone", 1, |s| {
        s.history_size = Some(1);
        s.namespaces.insert(
            "sys".into(),
            NamespaceSettings {
                history_size: Some(1),
                client_publish: Some(false),
                ..Default::default()
            },
        );
    })
    .await;
    let mut c = cluster.client(0).await;
    let ch = "dup:gone";
    let key = json!("k-1");
    let first = c
        .request(
            json!({"type": "publish", "channel": ch, "data": 1, "idempotencyKey": key}),
            1,
        )
        .await;
    assert_eq!(first["offset"], 1, "{first}");
    let again = c
        .request(
            json!({"type": "publish", "channel": ch, "data": 1, "idempotencyKey": key}),
            2,
        )
        .await;
    assert_eq!(again["offset"], 1, "still in the stream: {again}");
    let next = c
        .request(json!({"type": "publish", "channel": ch, "data": 2}), 3)
        .await;
    assert_eq!(next["offset"], 2, "{next}");
    let gone = c
        .request(
            json!({"type": "publish", "channel": ch, "data": 1, "idempotencyKey": key}),
            4,
        )
        .await;
    assert_eq!(gone["code"], "duplicate", "{gone}");
    let h = c
        .request(json!({"type": "history", "channel": ch}), 5)
        .await;
    assert_eq!(h["offset"], 2, "nothing published again: {h}");
    drop(c);
    cluster.shutdown().await;
}

/// A last-value channel recovers after a bus restart as history does: the
/// JetStream store keeps the newest publication, and a subscriber after
/// the restart gets it before `subscribed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_value_channel_survives_a_nats_restart() {
    bus_suite::bounded("a_last_value_channel_survives_a_nats_restart", async {
        use switchboard::config::NamespaceSettings;
        let mut server = PrivateNats::start().await;
        let prefix = unique_prefix("lvrestart");
        let mut s = settings_for(&server.url(), &prefix, 0);
        s.namespaces.insert(
            "lv".into(),
            NamespaceSettings {
                cache: Some(true),
                ..Default::default()
            },
        );
        let a = Instance::start(s).await;
        let mut p = a.client().await;
        let channel = "lv:price";
        for n in 1..=2 {
            assert_eq!(publish(&mut p, channel, json!(n), n).await, Some(n));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.kill();
        assert!(until_bus(&a, false, Duration::from_secs(10)).await);
        server.spawn().await;
        assert!(until_bus(&a, true, Duration::from_secs(20)).await);
        let mut late = a.client().await;
        late.send(json!({"type": "subscribe", "channel": channel, "id": 1}))
            .await;
        let m = late.recv().await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["data"], 2, "the newest: {m}");
        let sub = late.recv().await;
        assert_eq!(sub["type"], "subscribed", "{sub}");
        assert_eq!(sub["offset"], 2, "{sub}");
        drop((p, late));
        a.shutdown().await;
    })
    .await;
}
