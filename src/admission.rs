//! Per-address admission: how many connections one client address holds,
//! and how fast it may open WebSockets, so that one address cannot fill
//! the instance nor use up its handshake admission.
//!
//! [`AddrTable`] maps each client address ([`AddrKey`]: an IPv4 address or
//! an IPv6 /64) to an [`Entry`]: its connection count and its handshake
//! token bucket. A connection is counted from the TCP accept by a
//! [`Permit`] (the accept loop takes one for the peer; see
//! `server::serve_http`) that moves with it into the WebSocket session
//! ([`Counted`]) and uncounts it when dropped, so half-open HTTP
//! connections, upgraded connections waiting for their `auth` frame and
//! live sessions all count. Connections from a trusted proxy are not
//! counted at accept (the proxy carries many clients); the forwarded
//! client takes its permit at the upgrade instead.
//!
//! The table is bounded: an entry without connections is removed once its
//! bucket has refilled (it then holds nothing worth remembering), swept
//! when the table has doubled since the last sweep; at [`MAX_ENTRIES`]
//! every entry without connections is removed, and a new address that
//! still does not fit is refused (every entry then holds a connection, so
//! the table is no larger than the connections themselves allow); a full
//! table is swept at most once a second, so that new addresses cannot make
//! every accept walk it.
//!
//! Every permit also counts in [`AddrTable::released`], which shutdown
//! awaits: the session task holds the permit instead of a task-tracker
//! token, so that its future stays within its 152-byte budget.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::client_addr::AddrKey;
use crate::config::Config;
use crate::limits::TokenBucket;
pub use crate::refusal_log::RefusalLog;
use crate::sync::MutexExt;

/// Most addresses remembered at once (about 150 bytes each: 20 MiB).
pub const MAX_ENTRIES: usize = 131_072;

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It already holds `max_connections_per_ip` connections.
    TooManyConnections,
    /// The table is full of addresses that hold connections.
    TableFull,
    /// Over its handshake rate; a token comes after this long.
    Throttled(Duration),
}

/// The per-address table (cheap to clone: one `Arc`).
#[derive(Clone)]
pub struct AddrTable {
    inner: Arc<Shared>,
}

struct Shared {
    /// Address → entry; a std mutex held for a map operation (and, rarely,
    /// a sweep).
    map: Mutex<Map>,
    /// Most connections per address; 0 is unlimited.
    max_conns: u32,
    /// Handshakes per second per address; 0 is unlimited.
    rate: f64,
    /// Burst of the per-address bucket.
    burst: u32,
    /// Every permit alive, for the shutdown to wait on.
    live: Arc<LiveCount>,
    /// The table's clock starts here (buckets keep milliseconds).
    epoch: Instant,
    /// Connections refused for their address's connection count.
    refused_connections: AtomicU64,
    /// Handshakes refused by the per-address bucket.
    throttled: AtomicU64,
}

struct Map {
    /// The entries.
    entries: HashMap<AddrKey, Arc<Entry>>,
    /// Sweep when the map reaches this size (doubles after each sweep).
    sweep_at: usize,
    /// When the last sweep ran (table ms): a full table is swept at most
    /// once per [`FULL_SWEEP_EVERY_MS`], not on every new address.
    swept_ms: u64,
}

/// Least time between two sweeps of a table full of connected addresses.
const FULL_SWEEP_EVERY_MS: u64 = 1000;

/// Permits alive, and a wake-up when the last one goes.
struct LiveCount {
    n: AtomicUsize,
    zero: Notify,
}

/// One client address.
pub struct Entry {
    /// Connections counted against the address (permits alive).
    conns: AtomicU32,
    /// Its handshake admission; a std mutex held for a few instructions.
    bucket: Mutex<TokenBucket>,
    /// Shared with the table, to uncount a dropped permit.
    live: Arc<LiveCount>,
}

/// One counted connection; dropping it uncounts it.
pub struct Permit(Arc<Entry>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.conns.fetch_sub(1, Ordering::AcqRel);
        if self.0.live.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.live.zero.notify_waiters();
        }
    }
}

impl AddrTable {
    pub fn new(cfg: &Config) -> AddrTable {
        AddrTable {
            inner: Arc::new(Shared {
                map: Mutex::new(Map {
                    entries: HashMap::new(),
                    sweep_at: 1024,
                    swept_ms: 0,
                }),
                max_conns: u32::try_from(cfg.max_connections_per_ip).unwrap_or(u32::MAX),
                rate: cfg.handshake_rate_per_ip,
                burst: cfg.handshake_burst_per_ip,
                live: Arc::new(LiveCount {
                    n: AtomicUsize::new(0),
                    zero: Notify::new(),
                }),
                epoch: Instant::now(),
                refused_connections: AtomicU64::new(0),
                throttled: AtomicU64::new(0),
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Count one more connection from `ip`, unless it already holds the
    /// most allowed.
    pub fn acquire(&self, ip: IpAddr) -> Result<Permit, Refusal> {
        let s = &self.inner;
        let now = self.now_ms();
        let mut map = s.map.lock_unpoisoned();
        let Some(entry) = self.entry(&mut map, AddrKey::of(ip), now) else {
            s.refused_connections.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::TableFull);
        };
        // Counts only grow under the map lock: the check holds.
        if s.max_conns > 0 && entry.conns.load(Ordering::Acquire) >= s.max_conns {
            s.refused_connections.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::TooManyConnections);
        }
        entry.conns.fetch_add(1, Ordering::AcqRel);
        s.live.n.fetch_add(1, Ordering::AcqRel);
        Ok(Permit(entry.clone()))
    }

    /// Take a handshake token for `ip`'s address.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Refusal> {
        let s = &self.inner;
        if s.rate <= 0.0 {
            return Ok(());
        }
        let now = self.now_ms();
        let entry = {
            let mut map = s.map.lock_unpoisoned();
            match self.entry(&mut map, AddrKey::of(ip), now) {
                Some(e) => e.clone(),
                // No room to remember it: the global admission still applies.
                None => return Ok(()),
            }
        };
        let mut bucket = entry.bucket.lock_unpoisoned();
        if bucket.take(now, s.rate, s.burst) {
            Ok(())
        } else {
            s.throttled.fetch_add(1, Ordering::Relaxed);
            Err(Refusal::Throttled(bucket.wait(s.rate)))
        }
    }

    /// The entry of `key`, created if there is room.
    fn entry<'m>(&self, map: &'m mut Map, key: AddrKey, now: u64) -> Option<&'m Arc<Entry>> {
        if !map.entries.contains_key(&key) {
            let full = map.entries.len() >= MAX_ENTRIES;
            if map.entries.len() >= map.sweep_at.min(MAX_ENTRIES)
                && !(full && now < map.swept_ms + FULL_SWEEP_EVERY_MS)
            {
                self.sweep(map, now);
            }
            if map.entries.len() >= MAX_ENTRIES {
                return None;
            }
            let entry = Entry {
                conns: AtomicU32::new(0),
                bucket: Mutex::new(TokenBucket::new(self.inner.burst, now)),
                live: self.inner.live.clone(),
            };
            map.entries.insert(key, Arc::new(entry));
        }
        map.entries.get(&key)
    }

    /// Remove the entries without connections whose bucket has refilled;
    /// when that leaves the table full, every entry without connections.
    fn sweep(&self, map: &mut Map, now: u64) {
        let (rate, burst) = (self.inner.rate, self.inner.burst);
        let idle = |e: &Entry| e.conns.load(Ordering::Acquire) == 0;
        map.entries.retain(|_, e| {
            let refilled = rate <= 0.0 || e.bucket.lock_unpoisoned().is_full(now, rate, burst);
            !(idle(e) && refilled)
        });
        if map.entries.len() >= MAX_ENTRIES {
            map.entries.retain(|_, e| !idle(e));
        }
        map.sweep_at = (map.entries.len() * 2).max(1024);
        map.swept_ms = now;
    }

    /// Addresses remembered now.
    pub fn len(&self) -> usize {
        let map = self.inner.map.lock_unpoisoned();
        map.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Connections refused for their address (count or table full).
    pub fn refused_connections(&self) -> u64 {
        self.inner.refused_connections.load(Ordering::Relaxed)
    }

    /// Handshakes refused by the per-address bucket.
    pub fn throttled(&self) -> u64 {
        self.inner.throttled.load(Ordering::Relaxed)
    }

    /// Resolves once no permit is alive (every counted connection closed).
    pub async fn released(&self) {
        let live = &self.inner.live;
        loop {
            let notified = live.zero.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if live.n.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// What the accept loop needs to count a connection against its client.
pub struct Acceptor {
    /// Per-address counts.
    pub addrs: AddrTable,
    /// `trusted_proxies`: peers not counted at accept.
    pub trusted: Arc<[ipnet::IpNet]>,
    /// Trusted peers open each connection with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// Connections closed at accept are logged here.
    pub refusals: Arc<RefusalLog>,
    /// Longest wait for a PROXY protocol header.
    pub header_timeout: Duration,
}

impl Acceptor {
    pub fn new(
        cfg: &Config,
        addrs: AddrTable,
        refusals: Arc<RefusalLog>,
        header_timeout: Duration,
    ) -> Arc<Acceptor> {
        Arc::new(Acceptor {
            addrs,
            trusted: cfg.trusted_proxies.clone().into(),
            proxy_protocol: cfg.proxy_protocol,
            refusals,
            header_timeout,
        })
    }

    /// Whether a connection from `peer` starts with a PROXY header.
    pub fn proxied(&self, peer: IpAddr) -> bool {
        self.proxy_protocol && crate::client_addr::is_trusted(&self.trusted, peer)
    }

    /// Count a connection from `peer` (see [`ConnInfo::accept`]).
    pub fn accept(&self, peer: IpAddr) -> Option<Arc<ConnInfo>> {
        ConnInfo::accept(&self.addrs, &self.trusted, peer, &self.refusals)
    }

    /// Read the PROXY protocol header of a connection from the trusted
    /// `peer`, then count it against the client it names (the peer itself
    /// for a `LOCAL`/`UNKNOWN` header: the proxy's own health checks).
    /// `None` (close it) for a missing or malformed header, or a refusal.
    pub async fn accept_proxied(
        &self,
        tcp: &mut tokio::net::TcpStream,
        peer: IpAddr,
    ) -> Option<Arc<ConnInfo>> {
        let read = crate::client_addr::read_proxy_header(tcp);
        match tokio::time::timeout(self.header_timeout, read).await {
            Ok(Ok(client)) => self.accept(client.unwrap_or(peer)),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, %peer, "bad PROXY protocol header");
                self.refusals.refused(0, "bad PROXY protocol header", peer);
                None
            }
            Err(_) => None,
        }
    }
}

/// What the request handlers know of their TCP connection; the accept
/// loop puts it in every request's extensions.
pub struct ConnInfo {
    /// The TCP peer.
    pub peer: IpAddr,
    /// Whether the peer is a trusted proxy (its `X-Forwarded-For` names
    /// the client; it holds no permit of its own).
    pub trusted: bool,
    /// The peer's permit, taken from accept until the connection closes or
    /// an upgrade moves it into the session; a std mutex taken once.
    permit: Mutex<Option<Permit>>,
}

impl ConnInfo {
    /// A connection just accepted from `peer`: counted against its address
    /// unless it is a trusted proxy; `None` (close it) when the address is
    /// over its limit or the table is full.
    pub fn accept(
        table: &AddrTable,
        trusted: &[ipnet::IpNet],
        peer: IpAddr,
        log: &RefusalLog,
    ) -> Option<Arc<ConnInfo>> {
        let trusted = crate::client_addr::is_trusted(trusted, peer);
        let permit = if trusted {
            None
        } else {
            match table.acquire(peer) {
                Ok(p) => Some(p),
                Err(why) => {
                    let why = match why {
                        Refusal::TableFull => "address table full; closed at accept",
                        _ => "too many connections from this address; closed at accept",
                    };
                    log.refused(0, why, peer);
                    return None;
                }
            }
        };
        Some(Arc::new(ConnInfo {
            peer,
            trusted,
            permit: Mutex::new(permit),
        }))
    }

    /// The client address of a request on this connection: the peer, or
    /// behind a trusted proxy the forwarded client
    /// ([`crate::client_addr`]); unspecified without a connection (the
    /// router driven without `serve_http`).
    pub fn client(
        conn: Option<&ConnInfo>,
        trusted: &[ipnet::IpNet],
        headers: &axum::http::HeaderMap,
    ) -> IpAddr {
        match conn {
            Some(c) if c.trusted => crate::client_addr::forwarded_client(trusted, c.peer, headers),
            Some(c) => crate::client_addr::canonical(c.peer),
            None => IpAddr::from([0, 0, 0, 0]),
        }
    }

    /// Whether the connection still holds its permit.
    pub fn has_permit(&self) -> bool {
        self.permit.lock_unpoisoned().is_some()
    }

    /// Move the permit out (into the session the connection becomes).
    pub fn take_permit(&self) -> Option<Permit> {
        self.permit.lock_unpoisoned().take()
    }
}

/// `Retry-After` for a wait: whole seconds, at least 1, plus jitter so
/// that refused clients do not all come back in the same second.
pub fn retry_secs(wait: Duration) -> u64 {
    wait.as_secs() + 1 + fastrand::u64(0..2)
}

/// A session future that holds its connection's [`Permit`] for as long as
/// it runs. Its size is the session's plus 8 bytes: it takes the place of
/// `TaskTracker::track_future` (see the module docs).
pub struct Counted<F> {
    /// The session.
    fut: F,
    /// Uncounts the connection when the session ends.
    _permit: Permit,
}

impl<F> Counted<F> {
    pub fn new(fut: F, permit: Permit) -> Self {
        Counted {
            fut,
            _permit: permit,
        }
    }
}

impl<F: Future + Unpin> Future for Counted<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        Pin::new(&mut self.fut).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(max: usize, rate: f64, burst: u32) -> AddrTable {
        let cfg = Config {
            max_connections_per_ip: max,
            handshake_rate_per_ip: rate,
            handshake_burst_per_ip: burst,
            ..Config::default()
        };
        AddrTable::new(&cfg)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(c.max_connections_per_ip, 256);
        assert_eq!(c.handshake_rate_per_ip, 20.0);
        assert_eq!(c.handshake_burst_per_ip, 50);
        assert!(c.trusted_proxies.is_empty() && !c.proxy_protocol);
        assert!(!c.metrics_require_key);
    }

    #[test]
    fn connections_are_counted_per_address_until_dropped() {
        let t = table(2, 0.0, 1);
        let a1 = t.acquire(ip("10.0.0.1")).unwrap();
        let _a2 = t.acquire(ip("10.0.0.1")).unwrap();
        assert_eq!(
            t.acquire(ip("10.0.0.1")).err(),
            Some(Refusal::TooManyConnections)
        );
        let _b = t.acquire(ip("10.0.0.2")).expect("another address");
        // The same IPv6 /64 is one address.
        let _c1 = t.acquire(ip("2001:db8::1")).unwrap();
        let _c2 = t.acquire(ip("2001:db8::2")).unwrap();
        assert!(t.acquire(ip("2001:db8::3")).is_err());
        drop(a1);
        assert!(t.acquire(ip("10.0.0.1")).is_ok());
        assert_eq!(t.refused_connections(), 2);
    }

    #[test]
    fn the_handshake_bucket_is_per_address() {
        let t = table(0, 1.0, 2);
        assert!(t.admit(ip("10.0.0.1")).is_ok());
        assert!(t.admit(ip("10.0.0.1")).is_ok());
        assert!(matches!(
            t.admit(ip("10.0.0.1")),
            Err(Refusal::Throttled(_))
        ));
        assert!(t.admit(ip("10.0.0.2")).is_ok());
        assert_eq!(t.throttled(), 1);
    }

    #[test]
    fn idle_addresses_are_forgotten_and_the_table_is_bounded() {
        let t = table(0, 0.0, 1);
        // Addresses that come and go: swept as the table doubles.
        for i in 0..5000u32 {
            drop(t.acquire(IpAddr::from(i.to_be_bytes())).unwrap());
        }
        assert!(t.len() <= 2048, "{} entries", t.len());
        // Addresses that stay connected are kept.
        let held: Vec<_> = (0..3000u32)
            .map(|i| {
                t.acquire(IpAddr::from(((i + 1) << 16).to_be_bytes()))
                    .unwrap()
            })
            .collect();
        assert!(t.len() >= 3000);
        drop(held);
    }

    #[tokio::test]
    async fn released_waits_for_the_last_permit() {
        let t = table(0, 0.0, 1);
        t.released().await;
        let p = t.acquire(ip("10.0.0.1")).unwrap();
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.released().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(p);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released")
            .unwrap();
    }
}
