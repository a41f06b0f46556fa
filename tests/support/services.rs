//! The services the bus tests need, and how a test fails when one is
//! missing: with a message naming the server, where it was looked for, and
//! the command that starts (or installs) it. A bus test never skips itself
//! because its server is down; `scripts/services` (run by `scripts/test`)
//! starts every one of them.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A server the tests share, at a fixed loopback address.
pub struct Service {
    /// What the failure message calls it.
    pub name: &'static str,
    /// Where the tests expect it.
    pub addr: &'static str,
    /// The scheme of a `--bus` URL that points at it.
    pub scheme: &'static str,
    /// The command that starts it as the tests expect it.
    pub start: &'static str,
}

/// The shared Redis (the Redis bus tests, the drain test).
pub const REDIS: Service = Service {
    name: "Redis",
    addr: "127.0.0.1:6379",
    scheme: "redis",
    start: "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no",
};

/// The shared NATS with JetStream (the NATS bus tests).
pub const NATS: Service = Service {
    name: "NATS (with JetStream)",
    addr: "127.0.0.1:4222",
    scheme: "nats",
    start: "mkdir -p /tmp/nats && nohup nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/nats >/tmp/nats.log 2>&1 &",
};

/// Every shared service.
pub const SHARED: [&Service; 2] = [&REDIS, &NATS];

/// How long a reachability probe waits for the TCP handshake.
const PROBE: Duration = Duration::from_secs(3);

impl Service {
    /// Panic, saying which server and how to start it, unless something
    /// accepts TCP connections at its address.
    pub fn require(&self) {
        let addr: SocketAddr = self.addr.parse().expect("a socket address");
        if let Err(e) = TcpStream::connect_timeout(&addr, PROBE) {
            panic!(
                "{} is not reachable on {} ({e}): start it with `{}` \
                 (`scripts/services` starts it when it is down)",
                self.name, self.addr, self.start
            );
        }
    }

    /// Whether the bus URL `url` points at this service.
    fn is_url(&self, url: &str) -> bool {
        let Some(rest) = url
            .strip_prefix(self.scheme)
            .and_then(|r| r.strip_prefix("://"))
        else {
            return false;
        };
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let host_port = authority.rsplit('@').next().unwrap_or_default();
        host_port == self.addr
    }
}

/// Before a server starts on the bus at `url`: if that is one of the
/// shared services, require it (see [`Service::require`]). Other URLs
/// (a private server a test started, a proxy, a port where nothing
/// listens on purpose) are left alone.
pub fn require_bus(url: &str) {
    if let Some(s) = SHARED.iter().find(|s| s.is_url(url)) {
        s.require();
        #[cfg(feature = "nats")]
        if s.name == NATS.name {
            static SWEEP: std::sync::Once = std::sync::Once::new();
            SWEEP.call_once(sweep_old_nats_streams);
        }
    }
}

/// A test stream older than this is a leftover of an earlier run (the
/// longest test, the chaos soak, runs for minutes).
#[cfg(feature = "nats")]
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// Delete the JetStream streams (and the key-value buckets, `KV_…`) that
/// earlier test runs left on the shared NATS: every test has a prefix of
/// its own (`sbt-…`, [`super::bus_suite::unique_prefix`]) and leaves its
/// streams behind, and their `max_bytes` reservations add up until
/// JetStream refuses new streams (error 10047, insufficient storage).
/// Once per test process, streams older than [`LEFTOVER_AGE`] only, so a
/// run beside this one keeps its own. A failure is reported, not fatal.
#[cfg(feature = "nats")]
fn sweep_old_nats_streams() {
    let sweep = async {
        use futures_util::TryStreamExt;
        let client = async_nats::connect(NATS.addr).await?;
        let js = async_nats::jetstream::new(client);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut old = Vec::new();
        let mut streams = js.streams();
        while let Some(info) = streams.try_next().await? {
            let name = info.config.name;
            let ours = ["sbt-", "KV_sbt-", "OBJ_sbt-"]
                .iter()
                .any(|p| name.starts_with(p));
            let age = now - info.created.unix_timestamp();
            if ours && age > LEFTOVER_AGE.as_secs() as i64 {
                old.push(name);
            }
        }
        for name in &old {
            js.delete_stream(name).await?;
        }
        Ok::<usize, Box<dyn std::error::Error + Send + Sync>>(old.len())
    };
    let done = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), sweep).await })
    })
    .join();
    match done {
        Ok(Ok(Ok(0))) => {}
        Ok(Ok(Ok(n))) => eprintln!("services: deleted {n} leftover test streams from NATS"),
        Ok(Ok(Err(e))) => eprintln!("services: could not sweep leftover NATS test streams: {e}"),
        Ok(Err(_)) => eprintln!("services: sweeping leftover NATS test streams timed out"),
        Err(_) => eprintln!("services: sweeping leftover NATS test streams panicked"),
    }
}

/// Like [`require_bus`], for a plain address (a proxy's upstream).
pub fn require_addr(addr: SocketAddr) {
    if let Some(s) = SHARED.iter().find(|s| s.addr.parse() == Ok(addr)) {
        s.require();
    }
}

/// The failure of a program the tests run themselves (a private
/// `redis-server`, `nats-server`, the Pub/Sub emulator) that could not be
/// started: which program, why, and how to install it (`install`, e.g.
/// "install it with `apt-get install redis-server`").
pub fn cannot_run(program: &str, error: std::io::Error, install: &str) -> ! {
    panic!("cannot run `{program}` ({error}): {install}")
}
