//! The node's messages that are not a channel's publications: the
//! tutorial's broadcast, direct to one client or to every connection of a
//! user (on any instance), and the server API's disconnect order. Each is
//! one hand-off to the bus (a direct between two local clients skips it).

use std::sync::Arc;

use serde_json::value::RawValue;

use crate::broker::{Control, Direct, HistoryOptions, NewPublication, PublishConditions};
use crate::error::{ClientError, ErrorCode, Result};
use crate::protocol;

use super::{Node, user_channel};

impl Node {
    /// The tutorial's broadcast: every client of every instance but the
    /// sender.
    pub async fn broadcast(&self, sender_id: Option<Arc<str>>, data: Arc<RawValue>) -> Result<()> {
        let r = self
            .shared
            .broker
            .publish_control(Control::Broadcast {
                sender_id,
                data,
                timestamp: protocol::now_ms(),
            })
            .await;
        self.count_bus_error(r)
    }

    /// A message for one client, wherever it is connected.
    pub async fn direct(
        &self,
        sender_id: Option<Arc<str>>,
        target_id: &str,
        data: Arc<RawValue>,
    ) -> Result<()> {
        if let Some(sender) = &sender_id {
            if let Some(r) = self.shared.hub.direct_here(sender, target_id, &data) {
                return Ok(r?);
            }
        }
        let r = self
            .shared
            .broker
            .direct(Direct {
                target_id: target_id.into(),
                sender_id,
                data,
                timestamp: protocol::now_ms(),
                disconnect: None,
                sse: None,
            })
            .await;
        let delivered = self.count_bus_error(r)?;
        if !delivered {
            return Err(ClientError::new(
                ErrorCode::UnknownTarget,
                format!("no client with id {target_id:?} is connected"),
            )
            .into());
        }
        Ok(())
    }

    /// Close the connection of `client_id`, wherever it is connected, with
    /// `code` and `reason`; false when no instance holds it.
    pub async fn disconnect_client(
        &self,
        client_id: &str,
        code: u16,
        reason: String,
    ) -> Result<bool> {
        self.shared
            .broker
            .direct(Direct {
                target_id: client_id.into(),
                sender_id: None,
                data: Arc::from(RawValue::NULL.to_owned()),
                timestamp: protocol::now_ms(),
                disconnect: Some(crate::broker::DisconnectOrder { code, reason }),
                sse: None,
            })
            .await
    }

    /// A message for every connection of `user_id`, on every instance. At
    /// most once, and not an error when the user has no connection.
    pub async fn direct_user(
        &self,
        sender_id: Option<Arc<str>>,
        user_id: &str,
        data: Arc<RawValue>,
    ) -> Result<()> {
        let r = self
            .shared
            .broker
            .publish(
                &user_channel(user_id),
                NewPublication {
                    data,
                    sender_id,
                    timestamp: protocol::now_ms(),
                    conditions: PublishConditions::default(),
                },
                HistoryOptions {
                    size: 0,
                    ttl: std::time::Duration::from_secs(1),
                },
            )
            .await
            .map(|_| ());
        self.count_bus_error(r)
    }
}
