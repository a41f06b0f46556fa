//! Redis Cluster mode of the Redis bus (`--bus redis+cluster://h1:p1,h2:p2`):
//! the URL, the hash slots of keys, the per-slot epoch generator keys, and
//! the one connection type the rest of the bus speaks through.
//!
//! In cluster mode the bus uses the `redis` crate's cluster client
//! (`cluster-async`) over RESP3: it routes every command and script by the
//! hash slot of its first key (or shard channel), follows `MOVED`/`ASK`,
//! refreshes the slot map after a failover, and delivers sharded pub/sub
//! messages (`SSUBSCRIBE`) of every node to one push channel, together with
//! a `Disconnection` notice whenever a node connection drops. The
//! supervisor (`supervise.rs`) treats such a notice (or a server-sent
//! `sunsubscribe` of a topic it still wants: the slot moved) as an outage
//! of its subscriptions: it subscribes every topic again (each
//! `SSUBSCRIBE` is routed to the master now owning the topic's slot,
//! retried with backoff until the cluster has failed over), then replays
//! the gap of every local channel from its stream, exactly as after a
//! single-node reconnection.

use std::sync::OnceLock;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::error::{Error, Result};

/// The scheme of a cluster bus URL (`rediss+cluster://` for TLS).
pub(super) const SCHEMES: [(&str, &str); 2] = [
    ("redis+cluster://", "redis://"),
    ("rediss+cluster://", "rediss://"),
];

/// Whether `url` names a Redis Cluster (`redis+cluster://…`).
pub(crate) fn is_cluster_url(url: &str) -> bool {
    SCHEMES.iter().any(|(s, _)| url.starts_with(s))
}

/// The seed node URLs of `redis+cluster://[user:pass@]h1:p1,h2:p2[,…]`:
/// one `redis://[user:pass@]host:port/?protocol=3` per node (RESP3: sharded
/// pub/sub messages arrive as pushes). A cluster has no databases: a path
/// is refused.
pub(crate) fn seed_nodes(url: &str) -> Result<Vec<String>> {
    let bad = |why: &str| {
        Err(Error::Config(format!(
            "bus: {why} (got {url:?}); expected redis+cluster://host:port,host:port[,…]"
        )))
    };
    let Some((rest, scheme)) = SCHEMES
        .iter()
        .find_map(|(s, to)| url.strip_prefix(s).map(|rest| (rest, *to)))
    else {
        return bad("not a redis+cluster:// URL");
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') {
        return bad("a cluster has no database or options in its URL");
    }
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    let mut nodes = Vec::new();
    for host in hosts.split(',') {
        let Some((name, port)) = host.rsplit_once(':') else {
            return bad("every node needs host:port");
        };
        if name.is_empty() || port.parse::<u16>().is_err() {
            return bad("every node needs host:port");
        }
        nodes.push(format!("{scheme}{auth}{host}/?protocol=3"));
    }
    Ok(nodes)
}

/// CRC16/XMODEM, the hash of Redis Cluster key slots.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Number of hash slots of a Redis Cluster.
pub(crate) const SLOTS: u16 = 16384;

/// The hash slot of `key`, with Redis's hash-tag rule: when the key has a
/// `{` followed later by a `}` with something in between, only what is
/// between the first `{` and the next `}` is hashed.
pub(crate) fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16(tagged.unwrap_or(bytes)) % SLOTS
}

/// For each slot, a short hash tag that lands in it (decimal numbers, the
/// smallest one per slot): the per-slot epoch generator of slot `s` is
/// `P:gen:{<tag of s>}`, in the same slot as the channel keys it serves.
/// Built once (about 170,000 CRCs, a few milliseconds).
pub(crate) fn slot_tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags: Vec<Option<String>> = vec![None; usize::from(SLOTS)];
        let mut left = usize::from(SLOTS);
        let mut n: u64 = 0;
        while left > 0 {
            let tag = n.to_string();
            let slot = usize::from(crc16(tag.as_bytes()) % SLOTS);
            if tags[slot].is_none() {
                tags[slot] = Some(tag);
                left -= 1;
            }
            n += 1;
        }
        tags.into_iter().map(|t| t.unwrap_or_default()).collect()
    })
}

/// The command connection: one Redis, or a cluster (routed per slot).
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis endpoint.
    Single(MultiplexedConnection),
    /// A Redis Cluster (the crate's cluster client).
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
