//! The NATS bus: the shared cross-instance suite against the NATS
//! (JetStream) on 127.0.0.1:4222, broker-level checks of offsets, epochs
//! and history, and start-up failure. Outage tests against a private
//! `nats-server` are in `tests/bus_nats_outage.rs`.
#![cfg(feature = "nats")]

mod support;
#[macro_use]
#[path = "support/bus_suite.rs"]
mod bus_suite;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_suite::{BusFactory, base_settings, unique_prefix};
use serde_json::json;
use switchboard::broker::nats::{self, NatsBroker, NatsOptions, NatsPresence};
use switchboard::broker::{
    Broker, BrokerHandler, Control, Direct, HistoryOptions, NewPublication, PresenceStore,
};
use switchboard::config::{Config, Settings};
use switchboard::protocol::{ClientInfo, Publication, StreamPosition};

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
    let empty = b.history("c", None, 10, false, OPTS).await.unwrap();
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

    let h = b.history("c", None, 100, false, OPTS).await.unwrap();
    assert_eq!(h.top.offset, 5);
    let kept: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(kept, vec![3, 4, 5], "the namespace's size is enforced");
    let since = StreamPosition {
        epoch: epoch.clone(),
        offset: 3,
    };
    let h2 = b.history("c", Some(&since), 1, false, OPTS).await.unwrap();
    assert_eq!(h2.publications.len(), 1);
    assert_eq!(h2.publications[0].offset, 4);
    let stale = StreamPosition {
        epoch: "other".into(),
        offset: 1,
    };
    assert!(
        b.history("c", Some(&stale), 100, false, OPTS)
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
    let h = b.history("c", None, usize::MAX, false, big).await.unwrap();
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
            false,
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
