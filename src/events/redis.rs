//! The Redis bus's event [`Store`], shared by every instance of the
//! deployment. `P` is `<bus_prefix>:ev`.
//!
//! | key | type | what |
//! |---|---|---|
//! | `P:log` | stream, field `e` the event JSON, `t` since (ms) | the event log: delivered entries are trimmed at each acknowledgement (`MINID`), undelivered ones bounded by an approximate `MAXLEN` [`MAX_LOG`] |
//! | `P:cursor` | string | id of the last acknowledged log entry |
//! | `P:lease` | string → instance id, `PX` | the delivery lease |
//! | `P:dead` | stream, like the log | dead-lettered events, `MAXLEN ~` [`MAX_DEAD`] |
//! | `P:seq:<subject>` | counter | the subject's `seq`; a client's is deleted at its disconnect, a user's or channel's expires [`SEQ_TTL`] after its last event |
//! | `P:m:<subject>` | set of client ids | the live members of a user or channel subject |
//! | `P:pending` | zset subject → grace end (ms) | emptied subjects within their grace |
//! | `P:inst:<instance>` | hash client id → `{"u":user,"ch":{channel:1}}` | each instance's live clients, what a disconnect undoes |
//! | `P:alive:<instance>` | string, `PX presence_ttl` | the instance's heartbeat |
//! | `P:instances` | set | instances that have records |
//! | `P:reap:<instance>` | string, `PX presence_ttl` | the claim of the instance reaping a dead one |
//!
//! Every change is one Lua script (`scripts/lifecycle.lua`), so members,
//! pending subjects, seqs, records and the log move together and once:
//! a change the client's record already shows appends nothing, which is
//! what makes reaping a dead instance exactly-once even if the reaper
//! itself dies half-way (the next one finds only the records left).

use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::store::{Change, Op, Store, Stored, UserPresence};
use super::{MAX_DEAD, MAX_LOG};
use crate::broker::bus_error;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::ids::random_base36;

/// How long a user's or channel's `seq` is remembered after its last
/// event.
pub const SEQ_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The Redis store.
pub(super) struct RedisStore {
    conn: ConnectionManager,
    /// `<bus_prefix>:ev`.
    p: String,
    instance_id: String,
    grace_ms: u64,
    /// Heartbeat, lease and reap-claim lifetime.
    ttl_ms: u64,
    lifecycle: Script,
    lease: Script,
    ack: Script,
    replay: Script,
}

impl RedisStore {
    /// Connect (within 5 s); an unreachable Redis is an error.
    pub(super) async fn connect(url: &str, config: &Config) -> Result<RedisStore> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::Config(format!("bus: invalid redis URL {url:?}: {e}")))?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(3)));
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            ConnectionManager::new_with_config(client, cfg),
        )
        .await
        .map_err(|_| Error::Bus(format!("events: no answer from redis at {url}").into()))?
        .map_err(|e| Error::Bus(format!("events: cannot connect to redis at {url}: {e}").into()))?;
        let ev = config.events.as_ref().expect("events are configured");
        let store = RedisStore {
            conn,
            p: format!("{}:ev", config.bus_prefix),
            instance_id: config.instance_id.clone(),
            grace_ms: ev.grace.as_millis() as u64,
            ttl_ms: config.presence_ttl.as_millis().max(1) as u64,
            lifecycle: Script::new(include_str!("scripts/lifecycle.lua")),
            lease: Script::new(include_str!("scripts/lease.lua")),
            ack: Script::new(include_str!("scripts/ack.lua")),
            replay: Script::new(include_str!("scripts/replay.lua")),
        };
        // Records of a previous process with this instance id: its clients
        // are gone. Before this instance serves anyone.
        store
            .reap(&store.instance_id, crate::protocol::now_ms())
            .await?;
        Ok(store)
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.p)
    }

    /// Run the lifecycle script for `op` of `client` held by `owner`.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        op: &str,
        client: &str,
        user: &str,
        channel: &str,
        owner: &str,
        now_ms: u64,
        code: u16,
        reason: &str,
    ) -> Result<u64> {
        let mut conn = self.conn.clone();
        self.lifecycle
            .arg(&self.p)
            .arg(op)
            .arg(client)
            .arg(user)
            .arg(channel)
            .arg(&self.instance_id)
            .arg(now_ms)
            .arg(random_base36(12))
            .arg(self.grace_ms)
            .arg(code)
            .arg(reason)
            .arg(MAX_LOG)
            .arg(owner)
            .arg(SEQ_TTL.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(bus_error)
    }

    /// Turn every client record of `instance` into its events
    /// (`disconnect` 1006 `instance lost`, with the unsubscribes).
    async fn reap(&self, instance: &str, now_ms: u64) -> Result<u64> {
        let mut conn = self.conn.clone();
        let records = self.key(&format!("inst:{instance}"));
        let clients: Vec<String> = redis::cmd("HKEYS")
            .arg(&records)
            .query_async(&mut conn)
            .await
            .map_err(bus_error)?;
        let mut n = 0;
        for client in clients {
            n += self
                .run(
                    "disconnect",
                    &client,
                    "",
                    "",
                    instance,
                    now_ms,
                    1006,
                    "instance lost",
                )
                .await?;
        }
        Ok(n)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn record(&self, change: Change<'_>, now_ms: u64) -> Result<u64> {
        let user = change.user_id.unwrap_or("");
        let me = self.instance_id.as_str();
        let c = change.client_id;
        match change.op {
            Op::Connect => self.run("connect", c, user, "", me, now_ms, 0, "").await,
            Op::Subscribe(ch) => self.run("subscribe", c, user, ch, me, now_ms, 0, "").await,
            Op::Unsubscribe(ch) => {
                self.run("unsubscribe", c, user, ch, me, now_ms, 0, "")
                    .await
            }
            Op::Disconnect { code, reason } => {
                self.run("disconnect", c, user, "", me, now_ms, code, reason)
                    .await
            }
        }
    }

    async fn settle(&self, now_ms: u64) -> Result<u64> {
        self.run("settle", "", "", "", "", now_ms, 0, "").await
    }

    async fn lease(&self) -> Result<bool> {
        let mut conn = self.conn.clone();
        let held: i64 = self
            .lease
            .key(self.key("lease"))
            .arg(&self.instance_id)
            .arg(self.ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(bus_error)?;
        Ok(held == 1)
    }

    async fn read(&self, max: usize) -> Result<Vec<Stored>> {
        let mut conn = self.conn.clone();
        let cursor: Option<String> = redis::cmd("GET")
            .arg(self.key("cursor"))
            .query_async(&mut conn)
            .await
            .map_err(bus_error)?;
        let start = match cursor {
            Some(c) => format!("({c}"),
            None => "-".to_string(),
        };
        let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(self.key("log"))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut conn)
            .await
            .map_err(bus_error)?;
        Ok(entries.into_iter().filter_map(stored).collect())
    }

    async fn ack(&self, pos: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .ack
            .key(self.key("lease"))
            .key(self.key("cursor"))
            .key(self.key("log"))
            .arg(&self.instance_id)
            .arg(pos)
            .invoke_async(&mut conn)
            .await
            .map_err(bus_error)?;
        Ok(())
    }

    async fn dead_letter(&self, batch: &[Stored]) -> Result<()> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for s in batch {
            pipe.cmd("XADD")
                .arg(self.key("dead"))
                .arg("MAXLEN")
                .arg("~")
                .arg(MAX_DEAD)
                .arg("*")
                .arg("e")
                .arg(&s.json)
                .arg("t")
                .arg(s.since_ms)
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.map_err(bus_error)?;
        match batch.last() {
            Some(last) => self.ack(&last.pos).await,
            None => Ok(()),
        }
    }

    async fn replay(&self, max: usize, now_ms: u64) -> Result<u64> {
        let mut conn = self.conn.clone();
        self.replay
            .key(self.key("dead"))
            .key(self.key("log"))
            .arg(max)
            .arg(now_ms)
            .arg(MAX_LOG)
            .invoke_async(&mut conn)
            .await
            .map_err(bus_error)
    }

    async fn dead_count(&self) -> Result<u64> {
        let mut conn = self.conn.clone();
        redis::cmd("XLEN")
            .arg(self.key("dead"))
            .query_async(&mut conn)
            .await
            .map_err(bus_error)
    }

    async fn user(&self, user_id: &str) -> Result<UserPresence> {
        let mut conn = self.conn.clone();
        let subject = format!("user:{user_id}");
        let (connections, pending, seq): (u64, Option<f64>, Option<u64>) = redis::pipe()
            .cmd("SCARD")
            .arg(self.key(&format!("m:{subject}")))
            .cmd("ZSCORE")
            .arg(self.key("pending"))
            .arg(&subject)
            .cmd("GET")
            .arg(self.key(&format!("seq:{subject}")))
            .query_async(&mut conn)
            .await
            .map_err(bus_error)?;
        Ok(UserPresence {
            connections,
            online: connections > 0 || pending.is_some(),
            seq: seq.unwrap_or(0),
        })
    }

    async fn heartbeat(&self, now_ms: u64) -> Result<u64> {
        let mut conn = self.conn.clone();
        let me = &self.instance_id;
        let mut n = 0;
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(self.key(&format!("alive:{me}")))
            .arg(1)
            .arg("PX")
            .arg(self.ttl_ms)
            .ignore()
            .cmd("SADD")
            .arg(self.key("instances"))
            .arg(me)
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(bus_error)?;
        let instances: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.key("instances"))
            .query_async(&mut conn)
            .await
            .map_err(bus_error)?;
        for other in instances.iter().filter(|i| *i != me) {
            let alive: bool = redis::cmd("EXISTS")
                .arg(self.key(&format!("alive:{other}")))
                .query_async(&mut conn)
                .await
                .map_err(bus_error)?;
            if alive {
                continue;
            }
            let claimed: Option<String> = redis::cmd("SET")
                .arg(self.key(&format!("reap:{other}")))
                .arg(me)
                .arg("NX")
                .arg("PX")
                .arg(self.ttl_ms)
                .query_async(&mut conn)
                .await
                .map_err(bus_error)?;
            if claimed.is_none() {
                continue; // another instance is reaping it
            }
            tracing::info!(instance = %other, "instance heartbeat expired: emitting its clients' disconnects");
            n += self.reap(other, now_ms).await?;
            let _: () = redis::pipe()
                .cmd("SREM")
                .arg(self.key("instances"))
                .arg(other)
                .ignore()
                .cmd("DEL")
                .arg(self.key(&format!("inst:{other}")))
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(bus_error)?;
        }
        Ok(n)
    }
}

/// A log entry as `Stored`; `None` for an entry without an event.
fn stored((pos, fields): (String, Vec<String>)) -> Option<Stored> {
    let mut json = None;
    let mut since_ms = 0;
    for pair in fields.chunks(2) {
        match (pair[0].as_str(), pair.get(1)) {
            ("e", Some(v)) => json = Some(v.clone()),
            ("t", Some(v)) => since_ms = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    Some(Stored {
        pos,
        json: json?,
        since_ms,
    })
}
