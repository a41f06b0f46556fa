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
//! names of the `pub async fn`s of the files below, re-exported here); a
//! file that wants only some cases calls them itself:
//! `bus_suite::direct_across_instances(&MyBus).await`.
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
//!
//! # Files
//!
//! This file is the module's root (the test files include it by
//! `#[path]`); its parts are in `support/bus_suite/`:
//!
//! * `bus_suite.rs`: the factory ([`BusFactory`]), the `bus_suite!` macro
//!   and the helpers the cases share (subscribe, presence polling, bounds).
//! * `instance.rs`: [`Instance`] (one server in its own runtime) and
//!   [`Cluster`] (the instances of one case).
//! * `messaging.rs`: broadcast, direct to a client and to a user, and the
//!   server API's disconnect, across instances.
//! * `presence.rs`: presence across instances; a crashed instance's
//!   members expire and leave once.
//! * `stream.rs`: one channel's order and offsets across instances, and
//!   recovery on another instance; [`PublisherOrder`], the order check
//!   the Pub/Sub sequencer's tests share.
//! * `state.rs`: the channel-state cases (newest-first history,
//!   idempotent and conditional publish, last-value channels).

#![allow(dead_code)]

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard::config::Settings;

use crate::support::Client;

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

#[path = "bus_suite/instance.rs"]
mod instance;
#[path = "bus_suite/messaging.rs"]
mod messaging;
#[path = "bus_suite/presence.rs"]
mod presence;
#[path = "bus_suite/state.rs"]
mod state;
#[path = "bus_suite/stream.rs"]
mod stream;

#[allow(unused_imports)] // a test file may use neither
pub use instance::{Cluster, Instance};
#[allow(unused_imports)] // a test file may run none of them
pub use messaging::*;
#[allow(unused_imports)]
pub use presence::*;
#[allow(unused_imports)]
pub use state::*;
#[allow(unused_imports)]
pub use stream::*;

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

/// The next text frame within `d`, if any.
async fn recv_within(c: &mut Client, d: Duration) -> Option<Value> {
    tokio::time::timeout(d, c.recv()).await.ok()
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
        $crate::bus_suite!(@case $factory, a_member_seen_in_presence_gets_what_comes_next);
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
