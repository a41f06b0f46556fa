//! Direct messages on the Redis bus, and the client directory
//! (`P:client:<client id>` → instance id) that routes them to the
//! instance holding the target.

use super::{Direct, Inner, bus_error};
use crate::error::Result;
use crate::protocol::ClientInfo;
use crate::sync::MutexExt;

impl Inner {
    /// `Broker::direct`: a local target first, else through the directory
    /// to the target's instance topic; `false` when nobody holds it.
    pub(super) async fn direct(&self, direct: Direct) -> Result<bool> {
        if let Some(handler) = self.handler() {
            if handler.on_direct(&direct) {
                return Ok(true);
            }
        }
        let mut conn = self.conn()?;
        let instance: Option<String> = redis::cmd("GET")
            .arg(self.keys.client(&direct.target_id))
            .query_async(&mut conn)
            .await
            .map_err(bus_error)?;
        let Some(instance) = instance else {
            return Ok(false);
        };
        if instance == self.instance_id {
            return Ok(false); // it was here, and is gone
        }
        let payload = format!("d {}", serde_json::to_string(&direct).map_err(bus_error)?);
        let receivers: u64 = redis::cmd(self.keys.publish_cmd())
            .arg(self.keys.instance(&instance))
            .arg(payload)
            .query_async(&mut conn)
            .await
            .map_err(bus_error)?;
        Ok(receivers > 0)
    }

    /// `Broker::register_client`: remember the client for the heartbeat
    /// and write its directory entry.
    pub(super) async fn register_client(&self, info: &ClientInfo) -> Result<()> {
        self.local_clients
            .lock_unpoisoned()
            .insert(info.client_id.clone(), ());
        // While disconnected the client is still served locally; the
        // heartbeat after reconnection writes its entry.
        let Ok(mut conn) = self.conn() else {
            return Ok(());
        };
        let r: redis::RedisResult<()> = redis::cmd("SET")
            .arg(self.keys.client(&info.client_id))
            .arg(&self.instance_id)
            .arg("PX")
            .arg(self.ttl_ms())
            .query_async(&mut conn)
            .await;
        if let Err(e) = r {
            tracing::warn!(client = %info.client_id, error = %e, "directory write failed; the heartbeat will retry");
        }
        Ok(())
    }

    /// `Broker::unregister_client`: forget the client and delete its
    /// directory entry.
    pub(super) async fn unregister_client(&self, client_id: &str) -> Result<()> {
        self.local_clients.lock_unpoisoned().remove(client_id);
        let mut conn = self.conn()?;
        let _: u64 = redis::cmd("DEL")
            .arg(self.keys.client(client_id))
            .query_async(&mut conn)
            .await
            .map_err(bus_error)?;
        Ok(())
    }
}
