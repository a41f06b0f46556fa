//! Who may send what to other clients.
//!
//! A client reaches other clients in three ways: the tutorial's
//! `broadcast` (everyone), `direct` to a client id, and `direct` to a user
//! id (every connection of that user). The first two can be turned off
//! server-wide (`client_broadcast`, `client_direct`; the server API always
//! may). With auth on, a `direct` to a user id also needs the token's
//! `direct` grant (see [`crate::auth`]); a `direct` to a client id needs
//! nothing more than `client_direct`, since client ids are already shown
//! to others (presence, `join`, `senderId`).
//!
//! What the recipients' side does with these frames (a share of each
//! queue, dropped instead of disconnecting) is in [`crate::queue`].
//!
//! Also here: telling a sender that its frame was dropped
//! (`recipient_busy`), and which subscriptions a refreshed token no longer
//! grants.

use std::sync::Arc;

use serde_json::value::RawValue;

use crate::auth::{Action, Identity};
use crate::error::{ClientError, ErrorCode};
use crate::hub::Hub;
use crate::node::Node;
use crate::protocol;

/// Whether a client may `broadcast`.
pub fn check_broadcast(node: &Node) -> Result<(), ClientError> {
    if node.config().client_broadcast {
        return Ok(());
    }
    Err(ClientError::new(
        ErrorCode::BroadcastNotAllowed,
        "clients may not broadcast on this server",
    ))
}

/// Whether a client (`identity`, `None` when anonymous) may send a
/// `direct` message to the user `user_id`, or to a client id when
/// `user_id` is `None`.
pub fn check_direct(
    node: &Node,
    identity: Option<&Identity>,
    user_id: Option<&str>,
) -> Result<(), ClientError> {
    if !node.config().client_direct {
        return Err(ClientError::new(
            ErrorCode::DirectNotAllowed,
            "clients may not send direct messages on this server",
        ));
    }
    let Some(user_id) = user_id else {
        return Ok(());
    };
    if node.authenticator().is_none() || identity.is_some_and(|i| i.grants(Action::Direct, user_id))
    {
        return Ok(());
    }
    Err(ClientError::new(
        ErrorCode::PermissionDenied,
        format!("not allowed to send direct messages to user {user_id:?}"),
    ))
}

/// The channels among `subscribed` that `identity` does not grant and
/// whose namespace needs a grant (`anonymous = false`): what a refresh
/// with narrower grants takes away.
pub fn revoked<'a>(
    node: &Node,
    identity: &Identity,
    subscribed: impl Iterator<Item = &'a Arc<str>>,
) -> Vec<Arc<str>> {
    subscribed
        .filter(|channel| {
            node.channel_options(channel)
                .is_ok_and(|opts| !opts.anonymous)
                && !identity.grants(Action::Subscribe, channel)
        })
        .cloned()
        .collect()
}

/// A client's `direct` to a client of this instance, delivered here
/// rather than through the bus so that a drop (the recipient is behind)
/// becomes the sender's reply: `None` when the target is not connected
/// here, else `Err(recipient_busy)` when it was dropped.
pub fn direct_here(
    hub: &Hub,
    sender: &str,
    target_id: &str,
    data: &RawValue,
) -> Option<Result<(), ClientError>> {
    let frame = protocol::direct(Some(sender), data, protocol::now_ms());
    let queued = hub.relay_direct(target_id, frame)?;
    Some(match queued {
        true => Ok(()),
        false => Err(ClientError::new(
            ErrorCode::RecipientBusy,
            format!("{target_id:?} is behind; this direct was dropped for it"),
        )),
    })
}

/// A client's `broadcast` or `direct` was dropped for `dropped` local
/// recipients that are behind: one `recipient_busy` error (without `ref`)
/// to the sender, if it is connected here. One per frame sent, whatever
/// the number of recipients, so the sender's own rate bounds them. A
/// sender on another instance is not told (the bus carries no reply); the
/// drop is counted here either way.
pub fn tell_sender(hub: &Hub, sender: &str, dropped: usize, what: &str) {
    if dropped == 0 {
        return;
    }
    let err = ClientError::new(
        ErrorCode::RecipientBusy,
        format!("{dropped} recipient(s) are behind; this {what} was dropped for them"),
    );
    hub.notify(sender, protocol::error(&err, None));
}
