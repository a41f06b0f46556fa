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
//! Also here: which subscriptions a refreshed token no longer grants.
//! Telling a sender that its frame was dropped (`recipient_busy`) is the
//! hub's ([`crate::hub::Hub::direct_here`],
//! [`crate::hub::Hub::tell_sender`]): the node calls them, and this
//! module reads the node.

use std::sync::Arc;

use crate::auth::{Action, Identity};
use crate::error::{ClientError, ErrorCode};
use crate::node::Node;

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
            node.channel(channel).is_ok_and(|ch| !ch.opts.anonymous)
                && !identity.grants(Action::Subscribe, channel)
        })
        .cloned()
        .collect()
}
