//! The chaos soak (issue 16): N instances, subscribers that resume with
//! `since` wherever they land, publishers over the server API and over
//! WebSocket, kill -9 of instances, kill -9 and restart of the bus (Redis
//! with `appendfsync always`, JetStream with a file store, the Pub/Sub
//! emulator; on a Redis Cluster, the master serving the channel), and a
//! partition of one instance from the bus (not on the cluster). Every
//! subscriber is checked by publication identity: nothing missed (unless
//! it was told `recovered:false`), nothing twice, nothing out of order.
//!
//! Short in the test run; `SOAK_SECONDS=300 cargo test --test soak --
//! --nocapture` for a long one by hand. The figures are printed.
//!
//! Needs every bus feature (the default build).
#![cfg(all(feature = "redis", feature = "nats", feature = "pubsub"))]

#[path = "../support/mod.rs"]
mod support;

#[path = "../support/private_redis.rs"]
mod private_redis;

#[path = "../support/pubsub_emulator.rs"]
mod pubsub_emulator;

#[path = "../support/redis_cluster.rs"]
mod redis_cluster;

mod clients;
mod procs;
mod run;

use std::time::Duration;

use procs::BusServer;
use run::{Plan, Report};

fn plan() -> Plan {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(14);
    let at = |f: f64| Duration::from_secs_f64(seconds as f64 * f);
    Plan {
        instances: 3,
        subscribers: 12,
        seconds,
        kill_every: Duration::from_secs(3),
        bus_restarts: vec![at(0.5)],
        partitions: vec![at(0.25), at(0.75)],
        rate: 50,
    }
}

/// One soak at a time: each runs a cluster of its own.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Nothing missed outside the told windows, nothing twice, nothing out of
/// order, and the chaos happened.
fn check(report: &Report) {
    println!("{report}");
    assert!(report.acked > 0, "{report}");
    assert!(report.kills > 0 && report.bus_restarts > 0, "{report}");
    assert_eq!(report.missed, 0, "{report}");
    assert_eq!(report.duplicates, 0, "{report}");
    assert_eq!(report.reorders, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_redis() {
    let _one = ONE_AT_A_TIME.lock().await;
    let r = run::run(BusServer::redis().await, plan()).await;
    check(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_nats() {
    let _one = ONE_AT_A_TIME.lock().await;
    let r = run::run(BusServer::nats().await, plan()).await;
    check(&r);
}

/// A Redis Cluster: the "bus kill" is a `kill -9` of the master serving
/// the channel (its replica takes over; the node comes back as a replica).
/// No partition: the cluster client reaches every node directly, so one
/// proxy cannot cut an instance off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_redis_cluster() {
    let _one = ONE_AT_A_TIME.lock().await;
    let r = run::run(
        BusServer::redis_cluster().await,
        Plan {
            partitions: Vec::new(),
            ..plan()
        },
    )
    .await;
    check(&r);
}

/// Pub/Sub: as Redis and NATS, nothing missed outside the `recovered:false`
/// windows, nothing twice, nothing out of order. The emulator restart
/// keeps nothing (every subscriber is told), and the emulator's own faults
/// after a cut-off stream (a subscription that stops delivering) are
/// what `broker::pubsub::stall` handles (RELIABILITY.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_pubsub() {
    let _one = ONE_AT_A_TIME.lock().await;
    let r = run::run(BusServer::pubsub().await, plan()).await;
    check(&r);
}
