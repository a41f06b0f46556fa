//! The Redis presence store: a hash of members and a zset of their
//! expiries per channel (`P:pr:{ch}:members`, `P:pr:{ch}:expiry`), and
//! the local members the heartbeat rewrites.
//!
//! Members whose expiry passed (their instance crashed) are dropped by
//! `scripts/presence_members.lua`, which publishes their `leave` in the
//! same step: whoever drops a member announces it, so each is announced
//! once across the cluster. Every heartbeat runs it (`reap`) for the
//! presence channels this instance serves, so ghosts leave within about
//! `presence_ttl` plus a third of it, even if nobody asks for the members.

use super::{Inner, bus_error};
use crate::error::Result;
use crate::protocol::ClientInfo;
use crate::sync::MutexExt;

impl Inner {
    /// `PresenceStore::add`: remember the member locally (for the
    /// heartbeat) and add it through the presence-add script.
    pub(super) async fn add_member(&self, channel: &str, info: &ClientInfo) -> Result<()> {
        self.local_presence
            .lock_unpoisoned()
            .entry(channel.to_string())
            .or_default()
            .insert(info.client_id.clone(), info.clone());
        let mut conn = self.conn()?;
        let json = serde_json::to_string(info).map_err(bus_error)?;
        let _new: i64 = self
            .scripts
            .presence_add
            .key(self.keys.members(channel))
            .key(self.keys.expiry(channel))
            .arg(&*info.client_id)
            .arg(json)
            .arg(self.ttl_ms())
            .invoke_async(&mut conn)
            .await
            .map_err(bus_error)?;
        Ok(())
    }

    /// `PresenceStore::remove`: forget the member locally and in Redis.
    pub(super) async fn remove_member(&self, channel: &str, client_id: &str) -> Result<()> {
        {
            let mut local = self.local_presence.lock_unpoisoned();
            if let Some(members) = local.get_mut(channel) {
                members.remove(client_id);
                if members.is_empty() {
                    local.remove(channel);
                }
            }
        }
        let mut conn = self.conn()?;
        redis::pipe()
            .cmd("HDEL")
            .arg(self.keys.members(channel))
            .arg(client_id)
            .ignore()
            .cmd("ZREM")
            .arg(self.keys.expiry(channel))
            .arg(client_id)
            .ignore()
            .exec_async(&mut conn)
            .await
            .map_err(bus_error)
    }

    /// `PresenceStore::members`: the live members, sorted by client id,
    /// through the presence-members script (which drops expired ones).
    pub(super) async fn members(&self, channel: &str) -> Result<Vec<ClientInfo>> {
        let mut conn = self.conn()?;
        let raw: Vec<String> = self
            .scripts
            .presence_members
            .key(self.keys.members(channel))
            .key(self.keys.expiry(channel))
            .arg(self.keys.topic(channel))
            .arg(serde_json::to_string(channel).map_err(bus_error)?)
            .arg("")
            .arg(self.keys.publish_cmd())
            .invoke_async(&mut conn)
            .await
            .map_err(bus_error)?;
        let mut members = raw
            .iter()
            .map(|s| serde_json::from_str::<ClientInfo>(s).map_err(bus_error))
            .collect::<Result<Vec<_>>>()?;
        members.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        Ok(members)
    }
}
