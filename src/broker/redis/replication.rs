//! Acked means replicated (cluster mode): a publication is acknowledged
//! only once a replica of its master has it, so that a failover does not
//! lose an acked publication.
//!
//! Redis replicates asynchronously, and a master killed right after it
//! answered a publish takes the publication with it when its replica had
//! not received it yet. Worse, a master puts a replica that has just
//! finished its initial sync online only after that replica's first
//! acknowledgement (up to a second later), and Redis Cluster may promote
//! it with none of the writes made meanwhile: the failover test
//! (`tests/bus_redis_cluster.rs`) lost every acked publication of its
//! channel this way in 5 runs of 7 before this file.
//!
//! So in cluster mode the publish script is sent in one pipeline with
//! `WAIT 1 <REPLICA_WAIT>`. A pipeline is routed as a unit to the master
//! of its first key's slot, on one connection, so the `WAIT` covers that
//! very write (and a pipeline the cluster client retries after a
//! redirection retries both).
//!
//! A `WAIT` holds its connection (Redis answers a client's commands in
//! order), so publications that wait are grouped: per hash slot, one
//! writer task sends a pipeline of every script call queued for the slot
//! (at most [`BATCH_MAX`]) and one `WAIT` after them, answers them all,
//! then takes what queued meanwhile ([`Batches`]). One pipeline at a time
//! per slot keeps the slot's publications in order. Measured with
//! `bench/cluster_publish.py` (BENCHMARKS.md, 16 WebSocket publishers on
//! one channel, two runs): a `WAIT` per publication gave 4,698–5,644
//! publications/s (delivery p99 31–42 ms); grouped, 12,844–12,973/s
//! (p99 14–15 ms); without replicas, 19,464–23,140/s. A slot whose
//! master has no replica skips the writer (its turn costs more than it
//! saves without a `WAIT`).
//!
//! Then, for every publication of a pipeline:
//!
//! * a replica acknowledged it: acked;
//! * none did within [`REPLICA_WAIT`]: `INFO replication` of that master
//!   says whether a replica is connected at all.
//!   - None (it died, or the master never had one): acked. No replica can
//!     be promoted without it, except one cut off from its master in the
//!     last `cluster-node-timeout` (Redis's own window for partitions).
//!   - One or more (still syncing, or lagging by more than
//!     [`REPLICA_WAIT`]): refused with `bus_unavailable`. Like any publish
//!     whose answer was lost, it may still have been stored and delivered;
//!     an idempotency key makes the retry safe.
//!
//! A master without replicas would make every publish wait: this instance
//! keeps, per hash slot, whether the slot's master has a replica
//! ([`Replicas`]): from `CLUSTER SHARDS` when the bus is installed and on
//! every heartbeat (a replica node not marked failed), and from the
//! `INFO` answer above (none connected). Only slots whose master has one
//! wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{RedisResult, Value};
use tokio::sync::oneshot;

use super::cluster::{Conn, SLOTS, key_slot};
use super::{Inner, bus_error};
use crate::error::Result;
use crate::sync::MutexExt;

/// Longest a publication waits for a replica's acknowledgement (a healthy
/// replica on a LAN answers in well under a millisecond).
pub(super) const REPLICA_WAIT: Duration = Duration::from_secs(1);

/// Most publications in one pipeline.
const BATCH_MAX: usize = 256;

/// Nothing known yet of the slot's master: wait.
const UNKNOWN: u8 = 0;
/// The slot's master has a replica: wait.
const REPLICATED: u8 = 1;
/// The slot's master has no replica connected: do not wait.
const ALONE: u8 = 2;

/// What the publish script answers: epoch, offset, outcome.
pub(super) type Published = (String, u64, u8);

/// Per hash slot, whether its master has a replica (empty on one Redis).
pub(super) struct Replicas {
    /// One of [`UNKNOWN`], [`REPLICATED`], [`ALONE`] per slot.
    slots: Vec<AtomicU8>,
}

impl Replicas {
    pub(super) fn new(cluster: bool) -> Replicas {
        let n = if cluster { usize::from(SLOTS) } else { 0 };
        Replicas {
            slots: (0..n).map(|_| AtomicU8::new(UNKNOWN)).collect(),
        }
    }

    /// Whether a publication in `slot` waits for a replica.
    fn waits(&self, slot: u16) -> bool {
        self.slots
            .get(usize::from(slot))
            .is_some_and(|s| s.load(Ordering::Relaxed) != ALONE)
    }

    fn set(&self, slot: u16, state: u8) {
        if let Some(s) = self.slots.get(usize::from(slot)) {
            s.store(state, Ordering::Relaxed);
        }
    }
}

/// One publication waiting for its slot's pipeline.
struct Request {
    /// The script's `KEYS` (the first one names the slot).
    keys: Vec<String>,
    /// The script's `ARGV`.
    args: Vec<String>,
    /// Where its answer goes.
    done: oneshot::Sender<Result<Published>>,
}

/// Publications waiting, per hash slot (cluster mode). A slot present here
/// has a writer task; its list is what the next pipeline takes. Bounded
/// by the publishes in flight, each awaited by its caller.
#[derive(Default)]
pub(super) struct Batches {
    slots: Mutex<HashMap<u16, Vec<Request>>>,
}

impl Inner {
    /// Run the publish script with `keys` and `args`. In cluster mode the
    /// publication joins its slot's next pipeline (group commit: one
    /// `WAIT` for every publication of the slot that came meanwhile, see
    /// the module docs).
    pub(super) async fn run_publish(
        self: &Arc<Self>,
        conn: &mut Conn,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Published> {
        let slot = key_slot(&keys[0]);
        // One Redis, or a master without a replica: nothing to wait for,
        // and concurrent calls share the connection without a turn.
        if !matches!(conn, Conn::Cluster(_)) || !self.replicas.waits(slot) {
            let mut call = self.scripts.publish.prepare_invoke();
            for k in &keys {
                call.key(k);
            }
            for a in &args {
                call.arg(a);
            }
            return call.invoke_async(conn).await.map_err(bus_error);
        }
        let (done, answer) = oneshot::channel();
        let request = Request { keys, args, done };
        let first = {
            let mut slots = self.batches.slots.lock_unpoisoned();
            match slots.get_mut(&slot) {
                Some(queued) => {
                    queued.push(request);
                    None
                }
                None => {
                    slots.insert(slot, Vec::new());
                    Some(request)
                }
            }
        };
        if let Some(first) = first {
            tokio::spawn(Arc::clone(self).write_slot(slot, vec![first]));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(bus_error("the redis bus is closed")))
    }

    /// The writer of one slot: send `batch`, answer it, then take what
    /// queued meanwhile (at most [`BATCH_MAX`] at a time), until nothing
    /// is left. One pipeline at a time per slot keeps the slot's order.
    async fn write_slot(self: Arc<Self>, slot: u16, mut batch: Vec<Request>) {
        loop {
            let answers = match self.conn() {
                Ok(mut conn) => self.publish_batch(&mut conn, slot, &batch).await,
                Err(e) => vec![Err(e.to_string()); batch.len()],
            };
            for (request, answer) in batch.drain(..).zip(answers) {
                let _ = request.done.send(answer.map_err(bus_error));
            }
            let mut slots = self.batches.slots.lock_unpoisoned();
            let Some(queued) = slots.get_mut(&slot) else {
                return;
            };
            if queued.is_empty() {
                slots.remove(&slot);
                return;
            }
            let n = queued.len().min(BATCH_MAX);
            batch.extend(queued.drain(..n));
        }
    }

    /// One pipeline: every script call of `batch` then, when the slot's
    /// master has a replica, one `WAIT`; an answer per publication.
    async fn publish_batch(
        &self,
        conn: &mut Conn,
        slot: u16,
        batch: &[Request],
    ) -> Vec<std::result::Result<Published, String>> {
        let wait = self.replicas.waits(slot);
        let pipeline = || {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for r in batch {
                pipe.cmd("EVALSHA")
                    .arg(self.scripts.publish.get_hash())
                    .arg(r.keys.len())
                    .arg(&r.keys)
                    .arg(&r.args);
            }
            if wait {
                pipe.cmd("WAIT").arg(1).arg(REPLICA_WAIT.as_millis() as u64);
            }
            pipe
        };
        let all = |e: &dyn std::fmt::Display| vec![Err(e.to_string()); batch.len()];
        let noscript = |answers: &[RedisResult<Value>]| {
            answers
                .iter()
                .any(|a| a.as_ref().is_err_and(|e| e.code() == Some("NOSCRIPT")))
        };
        let mut answers: Vec<RedisResult<Value>> = match pipeline().query_async(conn).await {
            Ok(a) => a,
            Err(e) => return all(&e),
        };
        // A master that never ran the script (a promoted replica: the
        // script cache is not replicated) refused every call: load it,
        // then send the batch again.
        if noscript(&answers) {
            if let Err(e) = self.scripts.publish.prepare_invoke().load_async(conn).await {
                return all(&e);
            }
            answers = match pipeline().query_async(conn).await {
                Ok(a) => a,
                Err(e) => return all(&e),
            };
        }
        let acks = if wait {
            match answers.pop() {
                Some(Ok(v)) => redis::from_redis_value::<i64>(v).unwrap_or(0),
                _ => 0,
            }
        } else {
            1
        };
        let confirmed = if acks >= 1 {
            Ok(())
        } else {
            self.unconfirmed(conn, slot).await
        };
        answers
            .into_iter()
            .map(|a| {
                let published = a.map_err(|e| e.to_string())?;
                confirmed.clone()?;
                redis::from_redis_value::<Published>(published).map_err(|e| e.to_string())
            })
            .collect()
    }

    /// No replica confirmed in time: acked when the master has none
    /// connected (learned for the slot), refused when one is.
    async fn unconfirmed(&self, conn: &mut Conn, slot: u16) -> std::result::Result<(), String> {
        let Conn::Cluster(cluster) = conn else {
            return Ok(());
        };
        let info = cluster
            .route_command(
                redis::cmd("INFO").arg("replication").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                    slot,
                    SlotAddr::Master,
                ))),
            )
            .await
            .map_err(|e| e.to_string())?;
        let info: String = redis::from_redis_value(info).map_err(|e| e.to_string())?;
        match info_field(&info, "connected_slaves").unwrap_or(1) {
            0 => {
                self.replicas.set(slot, ALONE);
                Ok(())
            }
            n => Err(format!(
                "no replica of the channel's master confirmed the publication within {} ms \
                 ({n} connected); it may still be delivered",
                REPLICA_WAIT.as_millis()
            )),
        }
    }

    /// Learn which slots' masters have a replica (`CLUSTER SHARDS`);
    /// nothing on one Redis.
    pub(super) async fn refresh_replicas(&self) -> Result<()> {
        let Conn::Cluster(mut conn) = self.conn()? else {
            return Ok(());
        };
        let shards: Value = redis::cmd("CLUSTER")
            .arg("SHARDS")
            .query_async(&mut conn)
            .await
            .map_err(bus_error)?;
        for shard in items(&shards) {
            let replicated = field(shard, "nodes").map(items).is_some_and(|nodes| {
                nodes.iter().any(|n| {
                    field(n, "role").and_then(text) == Some("replica")
                        && field(n, "health").and_then(text) != Some("failed")
                })
            });
            let state = if replicated { REPLICATED } else { ALONE };
            let bounds: Vec<i64> = field(shard, "slots")
                .map(items)
                .unwrap_or_default()
                .iter()
                .filter_map(|v| match v {
                    Value::Int(i) => Some(*i),
                    _ => None,
                })
                .collect();
            for pair in bounds.chunks_exact(2) {
                let (Ok(from), Ok(to)) = (u16::try_from(pair[0]), u16::try_from(pair[1])) else {
                    continue;
                };
                for slot in from..=to.min(SLOTS - 1) {
                    self.replicas.set(slot, state);
                }
            }
        }
        Ok(())
    }
}

/// A numeric `name:value` line of an `INFO` answer.
fn info_field(info: &str, name: &str) -> Option<u64> {
    info.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The elements of an array (or a set).
fn items(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a.iter().collect(),
        _ => Vec::new(),
    }
}

/// The field `name` of a map (RESP3) or of a flat `[name, value, …]`
/// array (RESP2).
fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    match v {
        Value::Map(pairs) => pairs
            .iter()
            .find(|(k, _)| text(k) == Some(name))
            .map(|(_, v)| v),
        Value::Array(flat) => flat
            .chunks_exact(2)
            .find(|kv| text(&kv[0]) == Some(name))
            .map(|kv| &kv[1]),
        _ => None,
    }
}

/// A string value as text.
fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_are_read_by_name() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\nslave0:ip=x\r\n";
        assert_eq!(info_field(info, "connected_slaves"), Some(2));
        assert_eq!(info_field(info, "missing"), None);
    }

    #[test]
    fn only_alone_slots_skip_the_wait() {
        let r = Replicas::new(true);
        assert!(r.waits(7), "unknown waits");
        r.set(7, ALONE);
        assert!(!r.waits(7));
        r.set(7, REPLICATED);
        assert!(r.waits(7));
        assert!(!Replicas::new(false).waits(7), "one Redis never waits");
    }
}
