//! One soak run: the cluster, the clients, the chaos, and the tally.
//!
//! Subscribers follow one channel and, whenever their connection ends,
//! reconnect to a random live instance and resubscribe with the `since`
//! of the last publication they got. Two publishers write `{"p", "n"}`
//! publications, one over the server API and one over WebSocket, each
//! recording what was acknowledged. The chaos task kills instances with
//! SIGKILL and restarts them, kills the bus and restarts it, and cuts one
//! instance off the bus for a while (a TCP proxy). At the end every
//! subscriber is checked against the acknowledged set, by identity.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::clients::{api_publisher, subscriber, ws_publisher};
use crate::private_redis::Proxy;
use crate::procs::{BusServer, Instance};

pub(crate) const CHANNEL: &str = "soak:room";
pub(crate) const API_KEY: &str = "soak-api-key-0123456789abcdef";

/// What to do to the cluster.
pub struct Plan {
    pub instances: usize,
    pub subscribers: usize,
    /// Publishing lasts this long; then the subscribers get time to settle.
    pub seconds: u64,
    /// A random instance is killed (and restarted) this often.
    pub kill_every: Duration,
    /// The bus is killed -9 and restarted at these times (from the start).
    pub bus_restarts: Vec<Duration>,
    /// Instance 0 is cut off the bus (its proxy) at these times, for 2 s.
    pub partitions: Vec<Duration>,
    /// Publications per second per publisher.
    pub rate: u32,
}

/// What happened, and what each subscriber missed, got twice or out of
/// order.
#[derive(Debug, Default)]
pub struct Report {
    pub bus: &'static str,
    pub kills: u64,
    /// Instance starts that failed (the bus unreachable at start-up) and
    /// were retried.
    pub failed_starts: u64,
    pub bus_restarts: u64,
    pub partitions: u64,
    pub reconnects: u64,
    pub acked: u64,
    /// Acknowledged publications a subscriber never got, although it was
    /// never told `recovered:false` around them.
    pub missed: u64,
    /// Acknowledged publications missed inside a `recovered:false` window:
    /// the subscriber was told.
    pub excused: u64,
    /// `recovered:false` answers.
    pub told: u64,
    pub duplicates: u64,
    /// Acknowledged publications that arrived after a later one of the
    /// same publisher (see `reorders`).
    pub reorders: u64,
    /// The same over every delivery, unacknowledged ones included (shown,
    /// not asserted: see `reorders`).
    pub reorders_all: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "soak {}: {} instance kills ({} failed starts retried), {} bus kill -9 + restarts, {} partitions, {} reconnects, \
             {} acked publications; missed {}, twice {}, out of order {} ({} counting unacknowledged ones); \
             recovered:false {} times (covering {} publication deliveries)",
            self.bus,
            self.kills,
            self.failed_starts,
            self.bus_restarts,
            self.partitions,
            self.reconnects,
            self.acked,
            self.missed,
            self.duplicates,
            self.reorders,
            self.reorders_all,
            self.told,
            self.excused
        )
    }
}

/// Who published what: sent when, acknowledged when.
pub(crate) type Acked = Arc<Mutex<Vec<((u64, u64), Instant, Instant)>>>;

/// One subscriber's record.
#[derive(Default)]
pub(crate) struct Seen {
    pub(crate) received: HashMap<(u64, u64), u32>,
    /// Each publication's first arrival, in arrival order.
    pub(crate) arrivals: Vec<(u64, u64)>,
    /// `recovered:false` windows: from shortly before the last publication
    /// received on the lost connection to the answer.
    pub(crate) told: Vec<(Instant, Instant)>,
    pub(crate) reconnects: u64,
    /// Each publication's position as this subscriber got it.
    pub(crate) positions: HashMap<(u64, u64), (String, u64)>,
    /// What happened to this subscriber, for `SOAK_DEBUG`.
    pub(crate) events: Vec<(Instant, String)>,
}

/// The cluster's live instances, by index: `None` while one is down.
pub(crate) type Live = Arc<Vec<AtomicBool>>;

pub(crate) fn pick(live: &Live, ports: &[u16]) -> Option<u16> {
    let up: Vec<u16> = ports
        .iter()
        .zip(live.iter())
        .filter(|(_, l)| l.load(Ordering::Relaxed))
        .map(|(p, _)| *p)
        .collect();
    (!up.is_empty()).then(|| up[fastrand::usize(..up.len())])
}

pub async fn run(mut bus: BusServer, plan: Plan) -> Report {
    let prefix = format!("soak-{}", switchboard::ids::random_base36(6));
    let is_pubsub = matches!(bus, BusServer::PubSub(_));
    let key_file = std::env::temp_dir().join(format!("{prefix}.key"));
    std::fs::write(&key_file, API_KEY).expect("key file");
    let proxy = Proxy::start(format!("127.0.0.1:{}", bus.port()).parse().unwrap()).await;
    let mut instances = Vec::new();
    for i in 0..plan.instances {
        let port = if i == 0 {
            proxy.addr.port()
        } else {
            bus.port()
        };
        let mut args: Vec<String> = [
            "--bus",
            &bus.url(port),
            "--bus-prefix",
            &prefix,
            "--instance-id",
            &format!("{prefix}-{i}"),
            "--api-key-file",
            &key_file.display().to_string(),
            "--presence-ttl",
            "2s",
            "--history-size",
            "100000",
            "--rate-limit",
            "0",
            "--demo",
            "false",
            "--drain-timeout",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if is_pubsub {
            args.extend([
                "--pubsub-topic".into(),
                format!("{prefix}-topic"),
                "--pubsub-subscription".into(),
                format!("{prefix}-sub{i}"),
            ]);
        }
        instances.push(Instance::start(args).await);
    }
    let ports: Arc<Vec<u16>> = Arc::new(instances.iter().map(|i| i.port).collect());
    let live: Live = Arc::new((0..plan.instances).map(|_| AtomicBool::new(true)).collect());
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let stop_all = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();

    let mut subscribers = Vec::new();
    let subscribed = Arc::new(AtomicU64::new(0));
    for _ in 0..plan.subscribers {
        let (live, ports, stop, subscribed) = (
            live.clone(),
            ports.clone(),
            stop_all.clone(),
            subscribed.clone(),
        );
        subscribers.push(tokio::spawn(subscriber(live, ports, stop, subscribed)));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while subscribed.load(Ordering::Relaxed) < plan.subscribers as u64 {
        assert!(Instant::now() < deadline, "subscribers did not subscribe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let period = Duration::from_secs(1) / plan.rate.max(1);
    let publishers = [
        tokio::spawn(api_publisher(
            0,
            period,
            live.clone(),
            ports.clone(),
            stop_publishing.clone(),
            acked.clone(),
        )),
        tokio::spawn(ws_publisher(
            1,
            period,
            live.clone(),
            ports.clone(),
            stop_publishing.clone(),
            acked.clone(),
        )),
    ];

    // The chaos, until the publishing time is over.
    let mut report = Report {
        bus: bus.name(),
        ..Default::default()
    };
    let start = Instant::now();
    let wall_start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let end = start + Duration::from_secs(plan.seconds);
    let mut next_kill = start + plan.kill_every;
    let mut bus_restarts = plan.bus_restarts.iter().map(|d| start + *d).peekable();
    let mut partitions = plan.partitions.iter().map(|d| start + *d).peekable();
    // Publishing goes on until the time is over and every scheduled bus
    // restart and partition has happened (a slow restart of an instance can
    // push them past the end on a loaded machine), within a bounded extra.
    let hard_end = end + Duration::from_secs(60);
    let mut chaos: Vec<(Instant, String)> = Vec::new();
    loop {
        let now = Instant::now();
        let scheduled_left = bus_restarts.peek().is_some() || partitions.peek().is_some();
        if now >= hard_end || (now >= end && !scheduled_left) {
            break;
        }
        if now >= next_kill && now < end {
            let i = fastrand::usize(..instances.len());
            live[i].store(false, Ordering::Relaxed);
            instances[i].kill();
            chaos.push((
                Instant::now(),
                format!("killed instance {i} (:{})", ports[i]),
            ));
            tokio::time::sleep(Duration::from_millis(300)).await;
            instances[i].restart().await;
            live[i].store(true, Ordering::Relaxed);
            chaos.push((Instant::now(), format!("instance {i} ready again")));
            report.kills += 1;
            next_kill = Instant::now() + plan.kill_every;
        } else if bus_restarts.peek().is_some_and(|t| now >= *t) {
            bus_restarts.next();
            chaos.push((Instant::now(), "bus kill -9".into()));
            bus.kill_restart().await;
            chaos.push((Instant::now(), "bus restarted".into()));
            report.bus_restarts += 1;
        } else if partitions.peek().is_some_and(|t| now >= *t) {
            partitions.next();
            proxy.cut().await;
            chaos.push((Instant::now(), "instance 0 cut off the bus".into()));
            tokio::time::sleep(Duration::from_secs(2)).await;
            proxy.restore();
            chaos.push((Instant::now(), "instance 0 back on the bus".into()));
            report.partitions += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop_publishing.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await.expect("publisher");
    }
    // Let every subscriber catch up (reconnects, recovery, bus repair). On
    // Pub/Sub longer: a killed instance's restart often fails at first (the
    // emulator is slow to answer) and a dead sequencer is given up only
    // after `presence_ttl`, so the last moves take longer.
    let settle = if is_pubsub { 16 } else { 6 };
    tokio::time::sleep(Duration::from_secs(settle)).await;
    stop_all.store(true, Ordering::Relaxed);
    let acked = acked.lock().unwrap().clone();
    report.acked = acked.len() as u64;
    let acked_ids: HashSet<(u64, u64)> = acked.iter().map(|(id, _, _)| *id).collect();
    let debug = std::env::var("SOAK_DEBUG").is_ok();
    let mut seens = Vec::new();
    for s in subscribers {
        seens.push(s.await.expect("subscriber"));
    }
    // Where each publication was numbered, as any subscriber got it.
    let mut numbered: HashMap<(u64, u64), (String, u64)> = HashMap::new();
    for seen in &seens {
        numbered.extend(seen.positions.iter().map(|(k, v)| (*k, v.clone())));
    }
    let ms = |t: Instant| t.saturating_duration_since(start).as_millis();
    for (k, seen) in seens.iter().enumerate() {
        report.reconnects += seen.reconnects;
        report.reorders += reorders(&seen.arrivals, Some(&acked_ids));
        report.reorders_all += reorders(&seen.arrivals, None);
        report.told += seen.told.len() as u64;
        report.duplicates += seen.received.values().filter(|c| **c > 1).count() as u64;
        let mut missed = Vec::new();
        for (id, sent, at) in &acked {
            if seen.received.contains_key(id) {
                continue;
            }
            // Told about it: the publication was on its way during a
            // `recovered:false` window (sent before the answer, acknowledged
            // after the window began). One sent after the answer must
            // arrive: it cannot be below the position the answer gave.
            if seen.told.iter().any(|(from, to)| from <= at && sent <= to) {
                report.excused += 1;
            } else {
                report.missed += 1;
                missed.push((id, sent, at));
            }
        }
        let twice: Vec<_> = seen.received.iter().filter(|(_, c)| **c > 1).collect();
        if debug && (!missed.is_empty() || !twice.is_empty()) {
            eprintln!("--- subscriber {k}");
            for (id, sent, at) in &missed {
                let pos = numbered.get(id);
                // What this subscriber got of the same epoch around it.
                let near: Vec<u64> = pos
                    .map(|(e, o)| {
                        let mut v: Vec<u64> = seen
                            .positions
                            .values()
                            .filter(|(e2, o2)| e2 == e && o2.abs_diff(*o) <= 3)
                            .map(|(_, o2)| *o2)
                            .collect();
                        v.sort_unstable();
                        v
                    })
                    .unwrap_or_default();
                eprintln!(
                    "missed {id:?} sent +{} acked +{} numbered {pos:?}; got of its epoch nearby {near:?}",
                    ms(**sent),
                    ms(**at),
                );
            }
            for (id, c) in &twice {
                eprintln!("got {id:?} {c} times, numbered {:?}", numbered.get(id));
            }
            for (t, e) in &seen.events {
                eprintln!("  +{} {e}", ms(*t));
            }
        }
    }
    if debug {
        let day = wall_start % 86_400_000;
        eprintln!(
            "--- chaos (+0 is {:02}:{:02}:{:02}.{:03} UTC)",
            day / 3_600_000,
            day / 60_000 % 60,
            day / 1000 % 60,
            day % 1000
        );
        for (t, e) in &chaos {
            eprintln!("  +{} {e}", ms(*t));
        }
    }
    let _ = std::fs::remove_file(&key_file);
    report.failed_starts = instances.iter().map(|i| i.failed_starts).sum();
    drop(instances);
    report
}

/// Arrivals of a publisher's acknowledged publications below one that
/// arrived before them. Order is judged among acknowledged publications
/// only: a publisher whose request timed out (its instance killed or cut
/// off) moves on to the next one on another instance while the first may
/// still land later; it was never told that one succeeded, so no order was
/// promised for it.
/// (`None`: over every arrival.)
fn reorders(arrivals: &[(u64, u64)], acked: Option<&HashSet<(u64, u64)>>) -> u64 {
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut count = 0;
    for &(p, n) in arrivals
        .iter()
        .filter(|id| acked.is_none_or(|a| a.contains(id)))
    {
        let top = last.entry(p).or_default();
        if n < *top {
            count += 1;
        }
        *top = (*top).max(n);
    }
    count
}
