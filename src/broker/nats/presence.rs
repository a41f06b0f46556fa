//! The NATS presence store: a JetStream key-value bucket `P-presence`
//! holding, per channel and instance, the JSON list of that instance's
//! local members; writes grouped per channel, a refresh task rewriting
//! every key within `presence_ttl`, reads merging every instance's key.
//! After each refresh pass, the watch for expired keys of other instances
//! (`ghosts.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_nats::jetstream::{consumer, kv, stream};
use bytes::Bytes;

use super::ghosts::{KeyState, Keys};
use super::{Bus, NatsPresence, bus_error, token};
use crate::error::Result;
use crate::protocol::ClientInfo;
use crate::sync::MutexExt;

/// This instance's members of one channel.
#[derive(Default)]
pub(super) struct LocalChannel {
    /// Client id → info.
    members: BTreeMap<Arc<str>, ClientInfo>,
    /// Bumped on every change.
    version: u64,
    /// Serializes writes of this channel's key; holds the version written.
    written: Arc<tokio::sync::Mutex<u64>>,
}

impl Bus {
    /// Create the presence bucket if it does not exist.
    pub(super) async fn ensure_bucket(&self) -> Result<kv::Store> {
        if let Ok(store) = self.js.get_key_value(&self.bucket_name).await {
            return Ok(store);
        }
        // The bucket's stream, as a KV bucket is laid out (async-nats's
        // `create_key_value` queries account limits in a form NATS 2.9
        // does not answer).
        let config = stream::Config {
            name: format!("KV_{}", self.bucket_name),
            description: Some("switchboard presence".into()),
            subjects: vec![format!("$KV.{}.>", self.bucket_name)],
            max_messages_per_subject: 1,
            max_age: self.opts.presence_ttl,
            storage: stream::StorageType::Memory,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            num_replicas: 1,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| bus_error(format!("JetStream KV bucket {}: {e}", self.bucket_name)))?;
        self.js
            .get_key_value(&self.bucket_name)
            .await
            .map_err(|e| bus_error(format!("JetStream KV bucket {}: {e}", self.bucket_name)))
    }
}

impl NatsPresence {
    fn key(&self, channel: &str) -> String {
        format!("{}.{}", token(channel), self.bus.instance_token)
    }

    async fn store(&self) -> Result<kv::Store> {
        self.bus
            .js
            .get_key_value(&self.bus.bucket_name)
            .await
            .map_err(|e| bus_error(format!("presence bucket: {e}")))
    }

    /// Write `channel`'s key if it is older than `version` (a concurrent
    /// write may already have covered it).
    pub(super) async fn sync(&self, channel: &str, version: Option<u64>) -> Result<()> {
        let written = {
            let local = self.local.lock_unpoisoned();
            match local.get(channel) {
                Some(c) => c.written.clone(),
                None => return Ok(()),
            }
        };
        let mut written = written.lock().await;
        let (snapshot, current) = {
            let local = self.local.lock_unpoisoned();
            match local.get(channel) {
                Some(c) => (c.members.values().cloned().collect::<Vec<_>>(), c.version),
                None => (Vec::new(), u64::MAX),
            }
        };
        if version.is_some_and(|v| *written >= v) {
            return Ok(());
        }
        self.bus.connected()?;
        let store = self.store().await?;
        let key = self.key(channel);
        if snapshot.is_empty() {
            store
                .delete(&key)
                .await
                .map_err(|e| bus_error(format!("presence delete: {e}")))?;
            let mut local = self.local.lock_unpoisoned();
            if local.get(channel).is_some_and(|c| c.members.is_empty()) {
                local.remove(channel);
            }
        } else {
            let value = serde_json::to_vec(&snapshot)
                .map_err(|e| bus_error(format!("encoding presence: {e}")))?;
            store
                .put(&key, Bytes::from(value))
                .await
                .map_err(|e| bus_error(format!("presence put: {e}")))?;
        }
        *written = current;
        Ok(())
    }

    pub(super) fn change(
        &self,
        channel: &str,
        f: impl FnOnce(&mut BTreeMap<Arc<str>, ClientInfo>),
    ) -> u64 {
        let mut local = self.local.lock_unpoisoned();
        let c = local.entry(Arc::from(channel)).or_default();
        f(&mut c.members);
        c.version += 1;
        c.version
    }

    /// Rewrite every key this instance owns, every `presence_refresh` (and
    /// at once after a reconnect), so that they outlive the bucket's max
    /// age only while this instance lives.
    pub(super) fn spawn_refresh(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let stop = self.shutdown.clone();
        let every = self.bus.opts.presence_refresh;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let dirty = {
                    let Some(me) = weak.upgrade() else { break };
                    let bus = me.bus.clone();
                    drop(me);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => false,
                        _ = bus.presence_dirty.notified() => true,
                    }
                };
                let Some(me) = weak.upgrade() else { break };
                let channels: Vec<Arc<str>> = me.local.lock_unpoisoned().keys().cloned().collect();
                let mut refreshed = true;
                for channel in channels {
                    if let Err(e) = me.sync(&channel, None).await {
                        tracing::warn!(%channel, error = %e, dirty, "refreshing presence failed");
                        refreshed = false;
                        break;
                    }
                }
                // Then look for expired keys of other instances (see
                // `ghosts.rs`).
                if refreshed {
                    if let Err(e) = me.watch_ghosts().await {
                        tracing::warn!(error = %e, "watching for crashed instances' members failed");
                    }
                }
            }
        });
    }

    /// Remove every key of this instance (clean shutdown).
    pub async fn clear(&self) -> Result<()> {
        let channels: Vec<Arc<str>> = {
            let mut local = self.local.lock_unpoisoned();
            for c in local.values_mut() {
                c.members.clear();
                c.version += 1;
            }
            local.keys().cloned().collect()
        };
        for channel in channels {
            self.sync(&channel, None).await?;
        }
        Ok(())
    }

    /// Every instance's members of `channel`, merged (the body of
    /// [`PresenceStore::members`](crate::broker::PresenceStore::members)).
    pub(super) async fn read_members(&self, channel: &str) -> Result<Vec<ClientInfo>> {
        let keys = self.read_keys(channel).await?;
        if self.local.lock_unpoisoned().contains_key(channel) {
            // Served here: a member a client sees now gets its leave.
            self.bus
                .ghosts
                .noticed(channel, &keys, &self.bus.instance_token);
        }
        let mut members: BTreeMap<Arc<str>, ClientInfo> = BTreeMap::new();
        for state in keys.into_values() {
            if let KeyState::Live(list) = state {
                for info in list {
                    members.insert(info.client_id.clone(), info);
                }
            }
        }
        Ok(members.into_values().collect())
    }

    /// Every instance's key of `channel`, by instance token: the newest
    /// value of each subject `T(channel).*` (an expired key is absent).
    pub(super) async fn read_keys(&self, channel: &str) -> Result<Keys> {
        self.bus.connected()?;
        let filter = format!("$KV.{}.{}.*", self.bus.bucket_name, token(channel));
        let entries = self
            .bus
            .consume(
                &format!("KV_{}", self.bus.bucket_name),
                &filter,
                consumer::DeliverPolicy::LastPerSubject,
            )
            .await?;
        let mut keys = Keys::new();
        for m in entries {
            // Tokens hold no dot: the last one is the instance's.
            let Some((_, instance)) = m.subject.as_str().rsplit_once('.') else {
                continue;
            };
            let deleted = m
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() != "PUT");
            let state = if deleted || m.payload.is_empty() {
                KeyState::Deleted
            } else {
                match serde_json::from_slice::<Vec<ClientInfo>>(&m.payload) {
                    Ok(list) => KeyState::Live(list),
                    Err(e) => {
                        tracing::warn!(%channel, error = %e, "undecodable presence key on the NATS bus");
                        continue;
                    }
                }
            };
            keys.insert(Arc::from(instance), state);
        }
        Ok(keys)
    }
}
