//! Direct messages on the Redis bus: routed by the instance tag that
//! starts the target id's random part, to that instance's topic
//! `P:inst:<tag>`, which answers whether the target was there. Nothing is
//! written per client (see the module docs of `redis`).

use std::sync::atomic::Ordering;

use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use tokio::sync::oneshot;

use super::cluster::{Conn, key_slot};
use super::{Direct, Inner, RESPONSE_TIMEOUT, bus_error};
use crate::error::Result;
use crate::ids::{TAG_LEN, random_base36, tag_of};
use crate::sync::MutexExt;

/// Draws of a random tag before start-up gives up.
const TAG_ATTEMPTS: usize = 16;

/// Forgets a pending direct however its wait ends (answer, timeout, or the
/// caller dropped).
struct Pending<'a> {
    inner: &'a Inner,
    n: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.inner.pending_directs.lock_unpoisoned().remove(&self.n);
    }
}

impl Inner {
    /// Draw a tag whose topic nobody subscribes (`connect`); the supervisor
    /// subscribes it with the others. On a cluster the topic is a shard
    /// channel: `PUBSUB SHARDNUMSUB` asked of the master of its slot.
    pub(super) async fn choose_tag(&self, cmd: &Conn) -> Result<()> {
        for _ in 0..TAG_ATTEMPTS {
            let tag = random_base36(TAG_LEN);
            let topic = self.keys.instance(&tag);
            let subscribers: u64 = match cmd.clone() {
                Conn::Single(mut conn) => {
                    let (_, n): (String, u64) = redis::cmd("PUBSUB")
                        .arg("NUMSUB")
                        .arg(&topic)
                        .query_async(&mut conn)
                        .await
                        .map_err(bus_error)?;
                    n
                }
                Conn::Cluster(mut conn) => {
                    let mut ask = redis::cmd("PUBSUB");
                    ask.arg("SHARDNUMSUB").arg(&topic);
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                        Route::new(key_slot(&topic), SlotAddr::Master),
                    ));
                    let answer = conn.route_command(ask, route).await.map_err(bus_error)?;
                    let (_, n): (String, u64) =
                        redis::from_redis_value(answer).map_err(bus_error)?;
                    n
                }
            };
            if subscribers == 0 {
                let _ = self.tag.set(tag);
                return Ok(());
            }
        }
        Err(bus_error("no free instance tag after 16 draws"))
    }

    /// This instance's direct topic.
    pub(super) fn own_topic(&self) -> String {
        self.keys
            .instance(self.tag.get().map(String::as_str).unwrap_or("-"))
    }

    /// `Broker::direct`: a local target first, else to the topic of the
    /// target's instance, waiting for its answer; `false` when nobody
    /// holds it.
    pub(super) async fn direct(&self, direct: Direct) -> Result<bool> {
        if let Some(handler) = self.handler() {
            if handler.on_direct(&direct) {
                return Ok(true);
            }
        }
        let Some(tag) = tag_of(&direct.target_id) else {
            return Ok(false);
        };
        let own = self.tag.get().map(String::as_str).unwrap_or("-");
        if tag == own {
            return Ok(false); // it was here, and is gone
        }
        let mut conn = self.conn()?;
        let n = self.next_direct.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending_directs.lock_unpoisoned().insert(n, tx);
        let _pending = Pending { inner: self, n };
        let payload = format!(
            "d {own} {n} {}",
            serde_json::to_string(&direct).map_err(bus_error)?
        );
        let receivers: u64 = redis::cmd(self.keys.publish_cmd())
            .arg(self.keys.instance(tag))
            .arg(payload)
            .query_async(&mut conn)
            .await
            .map_err(bus_error)?;
        if receivers == 0 {
            return Ok(false);
        }
        match tokio::time::timeout(RESPONSE_TIMEOUT, rx).await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(_)) | Err(_) => Err(bus_error(format!(
                "direct message: no answer from instance {tag} within {RESPONSE_TIMEOUT:?}"
            ))),
        }
    }

    /// A `d` message on this instance's topic: deliver it and answer the
    /// sender's instance. `rest` is `<reply tag> <n> <direct JSON>`.
    pub(super) fn on_direct_message(&self, rest: &str) {
        let mut parts = rest.splitn(3, ' ');
        let (Some(reply_tag), Some(n), Some(json)) = (parts.next(), parts.next(), parts.next())
        else {
            tracing::warn!("malformed direct ignored");
            return;
        };
        let direct = match serde_json::from_str::<Direct>(json) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "malformed direct ignored");
                return;
            }
        };
        let found = self.handler().is_some_and(|h| h.on_direct(&direct));
        let Ok(mut conn) = self.conn() else {
            return; // the sender times out: `bus_unavailable`
        };
        let topic = self.keys.instance(reply_tag);
        let answer = format!("a {n} {}", u8::from(found));
        let publish = self.keys.publish_cmd();
        tokio::spawn(async move {
            let r: redis::RedisResult<u64> = redis::cmd(publish)
                .arg(topic)
                .arg(answer)
                .query_async(&mut conn)
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "answering a direct message failed");
            }
        });
    }

    /// An `a <n> 1|0` message: the answer to a direct sent from here.
    pub(super) fn on_direct_answer(&self, rest: &str) {
        let Some((n, found)) = rest.split_once(' ') else {
            return;
        };
        let Ok(n) = n.parse::<u64>() else {
            return;
        };
        if let Some(tx) = self.pending_directs.lock_unpoisoned().remove(&n) {
            let _ = tx.send(found == "1");
        }
    }
}
