//! The hub's channel index: local subscribers per channel (subscribe,
//! unsubscribe, count), the fan-out of a publication or a join/leave frame
//! to them, and the position of the newest publication delivered here,
//! which a bus reads back to fill a gap after an outage.

use std::sync::Arc;

use super::{ClientHandle, Hub};
use crate::protocol::{Publication, StreamPosition, Text};
use crate::queue::{Delivery, Outbound};
use crate::sync::{MutexExt, RwLockExt};

impl Hub {
    /// Add `client` to `channel`'s subscribers; true if it is the first
    /// local subscriber.
    pub fn subscribe(&self, channel: &Arc<str>, client: &Arc<ClientHandle>) -> bool {
        let mut channels = self.channels.write_unpoisoned();
        let state = channels.entry(channel.clone()).or_default();
        let first = state.subscribers.is_empty();
        state
            .subscribers
            .insert(client.id().clone(), client.clone());
        first
    }

    /// Remove `client_id` from `channel`; true if no local subscriber is
    /// left.
    pub fn unsubscribe(&self, channel: &str, client_id: &str) -> bool {
        let mut channels = self.channels.write_unpoisoned();
        let Some(state) = channels.get_mut(channel) else {
            return false;
        };
        if state.subscribers.remove(client_id).is_none() {
            return false;
        }
        if state.subscribers.is_empty() {
            channels.remove(channel);
            return true;
        }
        false
    }

    /// Queue a channel publication for every local subscriber (except
    /// `exclude`, when the publisher does not want its own messages).
    pub fn fan_out(
        &self,
        channel: &Arc<str>,
        epoch: &Arc<str>,
        publication: &Publication,
        frame: &Text,
        exclude: Option<&str>,
        policy: crate::queue::SlowConsumerPolicy,
    ) {
        let channels = self.channels.read_unpoisoned();
        let Some(state) = channels.get(channel) else {
            return;
        };
        *state.last.lock_unpoisoned() = Some(StreamPosition {
            epoch: epoch.clone(),
            offset: publication.offset,
        });
        let delivery = Arc::new(Delivery {
            channel: channel.clone(),
            epoch: epoch.clone(),
            offset: publication.offset,
            fanned_out: std::time::Instant::now(),
            policy,
            frame: frame.clone(),
            deflated: std::sync::OnceLock::new(),
        });
        for (id, client) in state.subscribers.iter() {
            if Some(&**id) == exclude {
                continue;
            }
            self.push(client, Outbound::Publication(delivery.clone()));
        }
    }

    /// Queue a frame for every local subscriber of `channel` except
    /// `exclude` (join/leave events).
    pub fn channel_frame(&self, channel: &str, frame: &Text, exclude: Option<&str>) {
        let channels = self.channels.read_unpoisoned();
        let Some(state) = channels.get(channel) else {
            return;
        };
        for (id, client) in state.subscribers.iter() {
            if Some(&**id) != exclude {
                self.push(client, Outbound::Frame(frame.clone()));
            }
        }
    }

    /// Number of local subscribers of `channel`.
    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.channels
            .read_unpoisoned()
            .get(channel)
            .map_or(0, |s| s.subscribers.len())
    }

    /// Every channel with local subscribers, with the position of the
    /// newest publication delivered here (`None` before the first). A bus
    /// that was disconnected reads each channel's history after this
    /// position and hands the missed publications to the handler again;
    /// sessions drop the ones they already have.
    /// Internal channels (user-addressed messages) are left out: those
    /// are at most once and have no history to replay.
    pub fn positions(&self) -> Vec<(Arc<str>, Option<StreamPosition>)> {
        self.channels
            .read_unpoisoned()
            .iter()
            .filter(|(ch, _)| !crate::protocol::is_internal_channel(ch))
            .map(|(ch, st)| {
                let last = st.last.lock_unpoisoned().clone();
                (ch.clone(), last)
            })
            .collect()
    }

    /// The position [`positions`](Self::positions) gives for one channel.
    pub fn position(&self, channel: &str) -> Option<StreamPosition> {
        let channels = self.channels.read_unpoisoned();
        channels.get(channel)?.last.lock_unpoisoned().clone()
    }

    /// A subscriber of `channel` starts at `top` (the position its
    /// subscribe read). Until a live publication arrives this is all the
    /// instance knows of the stream, and without it a bus outage that loses
    /// the stream would leave the subscriber with a silent gap (the repair
    /// would have no position to compare the new epoch with). Only ever
    /// moves the position back (or sets a first one): a publication newer
    /// than a position read may still be on its way from the bus, and a
    /// lower position only replays more (sessions drop duplicates). A
    /// position in another epoch than the one held is left alone.
    pub fn note_position(&self, channel: &str, top: &StreamPosition) {
        let channels = self.channels.read_unpoisoned();
        let Some(state) = channels.get(channel) else {
            return;
        };
        let mut last = state.last.lock_unpoisoned();
        match &*last {
            Some(held) if held.epoch != top.epoch || held.offset <= top.offset => {}
            _ => *last = Some(top.clone()),
        }
    }

    /// Close every local subscriber of `channel` with `reason`, so that
    /// they reconnect and recover (used when a bus outage left a gap the
    /// history cannot fill).
    pub fn close_subscribers(&self, channel: &str, reason: crate::queue::CloseReason) {
        let channels = self.channels.read_unpoisoned();
        if let Some(state) = channels.get(channel) {
            for client in state.subscribers.values() {
                client.queue.close(reason.clone());
            }
        }
    }
}
