//! The memory bus (the default: one instance, no broker): the shared
//! cross-instance suite with one server standing for every instance. The
//! cases still check exactly-once delivery, order, offsets, presence and
//! recovery on that one server; the crash case is skipped by the suite
//! itself (`distinct_instances() == 1`: a crash would take every
//! "instance" down at once). Needs no service and no bus feature, so
//! `cargo test --no-default-features` runs it.

mod support;
#[macro_use]
#[path = "support/bus_suite.rs"]
mod bus_suite;

use bus_suite::{BusFactory, base_settings};
use switchboard::config::Settings;

/// The memory bus: one server plays every instance.
struct MemoryBus;

impl BusFactory for MemoryBus {
    fn settings(&self, prefix: &str, i: usize) -> Settings {
        base_settings(prefix, i)
    }
    fn distinct_instances(&self) -> usize {
        1
    }
}

mod memory_bus {
    bus_suite!(super::MemoryBus);
}

/// A bus test whose shared server is down fails with a message naming the
/// server, where it was looked for and the command that starts it (never
/// a silent skip). Checked on a port where nothing listens.
#[test]
fn a_missing_bus_server_is_named_with_how_to_start_it() {
    use support::services::{NATS, REDIS, Service};
    for (service, start) in [
        (
            REDIS,
            "redis-server --daemonize yes --bind 127.0.0.1 --port 6379",
        ),
        (NATS, "nats-server -a 127.0.0.1 -p 4222 -js"),
    ] {
        let down = Service {
            addr: "127.0.0.1:1",
            ..service
        };
        let err = std::panic::catch_unwind(|| down.require()).expect_err("it fails");
        let msg = err.downcast_ref::<String>().expect("a formatted message");
        let named = format!("{} is not reachable on 127.0.0.1:1 (", service.name);
        assert!(msg.starts_with(&named), "{msg}");
        assert!(msg.contains(start), "{msg}");
    }
}
