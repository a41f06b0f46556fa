//! The node's side of the bus: [`Inbound`], the [`BrokerHandler`] the node
//! gives its broker. What arrives from the bus (publications, control
//! messages, direct messages, resync requests) goes through it to the
//! local clients in the hub.

use std::sync::Arc;

use crate::broker::{BrokerHandler, Control, Direct};
use crate::config::Config;
use crate::error::{ClientError, ErrorCode};
use crate::hub::Hub;
use crate::inbox::Delivered;
use crate::protocol::{self, Publication, StreamPosition, is_internal_channel};

/// Delivers what the broker hands over to the local clients. Separate from
/// [`Node`] so that the broker does not hold the node (no `Arc` cycle).
pub(super) struct Inbound {
    pub(super) hub: Arc<Hub>,
    /// Whether a subscribed publisher gets its own publications.
    pub(super) channel_echo: bool,
    /// For each channel's namespace options (slow-consumer policy).
    pub(super) config: Config,
    /// The inboxes of the SSE connections here (`POST /sse/send`).
    pub(super) sse: Arc<crate::inbox::Inboxes>,
}

impl BrokerHandler for Inbound {
    fn positions(&self) -> Vec<(Arc<str>, Option<StreamPosition>)> {
        self.hub.positions()
    }

    fn position(&self, channel: &str) -> Option<StreamPosition> {
        self.hub.position(channel)
    }

    fn resync_failed(&self, channel: &str) {
        if is_internal_channel(channel) {
            return; // user-addressed messages are at most once
        }
        tracing::warn!(%channel, "this instance may lack publications (a bus outage, a gap or a new epoch) that history cannot fill; asking subscribers to reconnect");
        self.hub.close_subscribers(
            channel,
            crate::queue::CloseReason::new(
                crate::error::close::SERVICE_RESTART,
                "resubscribe: bus gap",
            ),
        );
    }

    fn on_publication(&self, channel: &Arc<str>, epoch: &Arc<str>, publication: &Publication) {
        if is_internal_channel(channel) {
            // A user-addressed direct message: a `direct` frame to every
            // local connection of the user.
            let frame = protocol::direct(
                publication.sender_id.as_deref(),
                &publication.data,
                publication.timestamp,
            );
            match &publication.sender_id {
                Some(sender) => {
                    let dropped = self.hub.relay_channel(channel, &frame);
                    self.tell_sender(sender, dropped, "direct");
                }
                None => self.hub.channel_frame(channel, &frame, None),
            }
            return;
        }
        // Encoded once for every local subscriber.
        let frame = protocol::message(channel, epoch, publication);
        let exclude = match self.channel_echo {
            true => None,
            false => publication.sender_id.as_deref(),
        };
        let policy = self
            .config
            .namespace_of(channel)
            .map(|ns| ns.slow_consumer)
            .unwrap_or_default();
        self.hub
            .fan_out(channel, epoch, publication, &frame, exclude, policy);
    }

    fn on_control(&self, control: &Control) {
        match control {
            Control::Broadcast {
                sender_id,
                data,
                timestamp,
            } => {
                let frame = protocol::broadcast(sender_id.as_deref(), data, *timestamp);
                match sender_id {
                    Some(sender) => {
                        let dropped = self.hub.relay_broadcast(&frame, sender);
                        self.tell_sender(sender, dropped, "broadcast");
                    }
                    None => self.hub.broadcast(&frame, None),
                }
            }
            Control::Join { channel, info } | Control::Leave { channel, info } => {
                let join = matches!(control, Control::Join { .. });
                let frame = protocol::join_leave(join, channel, info);
                self.hub
                    .channel_frame(channel, &frame, Some(&info.client_id));
            }
        }
    }

    fn on_direct(&self, direct: &Direct) -> bool {
        if let Some(order) = &direct.disconnect {
            let reason = crate::queue::CloseReason::new(order.code, order.reason.clone());
            return self.hub.close_client(&direct.target_id, reason);
        }
        if let Some(post) = &direct.sse {
            return self.on_sse_frames(&direct.target_id, post);
        }
        let frame = protocol::direct(direct.sender_id.as_deref(), &direct.data, direct.timestamp);
        let Some(sender) = &direct.sender_id else {
            return self.hub.direct(&direct.target_id, frame);
        };
        match self.hub.relay_direct(&direct.target_id, frame) {
            None => false,
            Some(queued) => {
                self.tell_sender(sender, usize::from(!queued), "direct");
                true
            }
        }
    }
}

impl Inbound {
    /// Frames posted on another instance for an SSE connection here.
    /// That instance has answered the POST already, so a full inbox is
    /// told on the stream, as an `error` frame.
    fn on_sse_frames(&self, client_id: &str, post: &crate::broker::SseFrames) -> bool {
        let frames: Vec<protocol::Text> = post
            .frames
            .iter()
            .map(|f| String::from(f.get()).into())
            .collect();
        match self.sse.deliver(client_id, &post.secret, &frames) {
            Delivered::Queued => true,
            Delivered::Unknown => false,
            Delivered::Full => {
                let err = ClientError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "{} posted frames dropped: the SSE inbox is full",
                        frames.len()
                    ),
                );
                self.hub.direct(client_id, protocol::error(&err, None));
                true
            }
        }
    }

    fn tell_sender(&self, sender: &str, dropped: usize, what: &str) {
        self.hub.tell_sender(sender, dropped, what);
    }
}
