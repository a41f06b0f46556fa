//! The messages on the topics: the [`Wire`] envelope (JSON in a Pub/Sub
//! message's `data`) and its [`Body`]s, with the channel a channel message
//! is about (which decides its shard).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::broker::Direct;
use crate::protocol::{ClientInfo, Publication};

/// The envelope of every message on the topic (JSON in `data`).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Wire {
    /// Source instance id.
    pub(super) src: Arc<str>,
    /// Source boot id: tells a restarted instance from its predecessor.
    pub(super) boot: Arc<str>,
    /// Per-boot counter; `(boot, id)` names the message for de-duplication
    /// and lets the source match its own publications coming back.
    pub(super) id: u64,
    /// What the message says.
    pub(super) body: Body,
}

/// Message bodies. Externally tagged, so that raw JSON payloads survive.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) enum Body {
    /// A channel publication request, with the history options of its
    /// namespace: numbered by the channel's sequencer (an internal
    /// channel's is delivered as it is, at offset 0).
    Pub {
        channel: Arc<str>,
        data: Arc<RawValue>,
        sender_id: Option<Arc<str>>,
        timestamp: u64,
        size: usize,
        ttl_ms: u64,
    },
    /// The sequencer's numbered copy of the request `(req_boot, req_id)`.
    Seq {
        channel: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
        req_boot: Arc<str>,
        req_id: u64,
        data: Arc<RawValue>,
        sender_id: Option<Arc<str>>,
        timestamp: u64,
        size: usize,
        ttl_ms: u64,
    },
    /// The source sequences `channel` from here on, in `epoch`.
    Claim { channel: Arc<str>, epoch: Arc<str> },
    /// The source no longer sequences `channel`.
    Release { channel: Arc<str> },
    /// The tutorial's broadcast.
    Broadcast {
        sender_id: Option<Arc<str>>,
        data: Arc<RawValue>,
        timestamp: u64,
    },
    /// Presence join/leave events (`join` false: leave).
    JoinLeave {
        join: bool,
        channel: Arc<str>,
        info: ClientInfo,
    },
    /// A direct message; `to` is the holding instance when the directory
    /// knew it; `ack` asks the holder to acknowledge.
    Direct {
        direct: Direct,
        to: Option<Arc<str>>,
        ack: bool,
    },
    /// The holder of a direct target acknowledges `(to_boot, of)`.
    DirectAck { to_boot: Arc<str>, of: u64 },
    /// One membership change of the source: a client (channel `None`) or a
    /// channel member came (`present`) or went.
    Member {
        ver: u64,
        channel: Option<Arc<str>>,
        info: ClientInfo,
        present: bool,
        ack: bool,
    },
    /// An instance applied the membership change `(to_boot, of)`.
    MemberAck { to_boot: Arc<str>, of: u64 },
    /// The source's complete state at version `ver`; also its heartbeat.
    Snapshot {
        ver: u64,
        clients: Vec<Arc<str>>,
        members: Vec<(Arc<str>, Vec<ClientInfo>)>,
        /// The channels it sequences, with their epochs.
        #[serde(default)]
        sequenced: Vec<(Arc<str>, Arc<str>)>,
        /// The last offset it assigned in each of them (how far a reader
        /// of the channel should be; see `stall`).
        #[serde(default)]
        tops: Vec<(Arc<str>, u64)>,
    },
    /// The source sequences `of` in `epoch` from now on (`None`: no
    /// longer); at version `ver` of its state. Advertised on the control
    /// topic so that every instance knows whom a history fetch can reach.
    Sequences {
        ver: u64,
        of: Arc<str>,
        epoch: Option<Arc<str>>,
    },
    /// A new (or reconnected) instance: everyone announce yourselves.
    Hello,
    /// The first message of a shard's stream (see `open_stream`); ignored.
    Ping { shard: u16 },
    /// Asks the channel's sequencer for the history it retains (with the
    /// namespace's options); answered by a `Backfill` on the same ordering
    /// key, after every copy numbered before it (see [`fetch`]).
    Fetch {
        channel: Arc<str>,
        size: usize,
        ttl_ms: u64,
    },
    /// The sequencer's answer to the fetch `(to_boot, of)`: its epoch, its
    /// top and the newest retained publications that fit in one message.
    Backfill {
        channel: Arc<str>,
        to_boot: Arc<str>,
        of: u64,
        epoch: Arc<str>,
        top: u64,
        publications: Vec<Publication>,
    },
    /// Clean shutdown: forget the source now.
    Bye,
}

impl Body {
    /// The channel a channel message is about (it travels on the
    /// channel's shard).
    pub(super) fn channel(&self) -> Option<&str> {
        match self {
            Body::Pub { channel, .. }
            | Body::Seq { channel, .. }
            | Body::Claim { channel, .. }
            | Body::Release { channel }
            | Body::JoinLeave { channel, .. }
            | Body::Fetch { channel, .. }
            | Body::Backfill { channel, .. } => Some(channel),
            _ => None,
        }
    }
}
