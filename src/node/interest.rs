//! The bus's interest in a channel follows the local subscribers: the bus
//! is subscribed to a channel while this instance has a subscriber on it.
//!
//! Each change runs one at a time per channel ([`Interest::stripe`]) and
//! compares what is wanted (the hub has subscribers) with what is held (the
//! bus was subscribed), so concurrent first subscribers, a last subscriber
//! leaving while a new one arrives, or a bus subscribe that fails never
//! leave a local subscriber on a channel the bus does not deliver here:
//! every subscriber waits until the bus holds the channel, or is told the
//! error.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use super::Node;
use crate::error::Result;
use crate::sync::MutexExt;

/// Stripes of the per-channel serialisation.
const STRIPES: usize = 64;

/// What the bus holds for this instance.
pub(super) struct Interest {
    /// Channels the bus is subscribed to here.
    held: Mutex<HashSet<Arc<str>>>,
    /// Interest changes of the channels of one stripe run one at a time
    /// (held across the bus call).
    stripes: Box<[tokio::sync::Mutex<()>]>,
    /// Picks a channel's stripe.
    hasher: RandomState,
}

impl Default for Interest {
    fn default() -> Self {
        Interest {
            held: Mutex::default(),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl Interest {
    fn stripe(&self, channel: &str) -> &tokio::sync::Mutex<()> {
        &self.stripes[(self.hasher.hash_one(channel) as usize) % STRIPES]
    }
}

impl Node {
    /// Subscribe or unsubscribe the bus for `channel` so that it holds the
    /// channel exactly while the hub has local subscribers on it.
    pub(super) async fn sync_interest(&self, channel: &Arc<str>) -> Result<()> {
        let interest = &self.shared.interest;
        let _one = interest.stripe(channel).lock().await;
        let want = self.shared.hub.subscriber_count(channel) > 0;
        let have = interest.held.lock_unpoisoned().contains(channel);
        if want && !have {
            self.shared.broker.subscribe(channel).await?;
            interest.held.lock_unpoisoned().insert(channel.clone());
        } else if !want && have {
            // Forgotten first: a failed unsubscribe only leaves the bus
            // delivering a channel nobody reads here.
            interest.held.lock_unpoisoned().remove(channel);
            self.shared.broker.unsubscribe(channel).await?;
        }
        Ok(())
    }
}
