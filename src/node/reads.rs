//! The node's channel reads: history (oldest or newest first), a
//! last-value channel's latest publication, the channel's position (and
//! whether it exists), recovery after `since`, and presence. None of them
//! writes to the bus or the hub.

use crate::broker::HistoryResult;
use crate::error::{ClientError, ErrorCode, Result};
use crate::protocol::{ClientInfo, Publication, StreamPosition};

use super::{Channel, Node};

impl Node {
    /// Publications after `since` (at most `limit`; with `newest_first`
    /// the newest ones, newest first) and the channel's top.
    pub async fn history(
        &self,
        channel: Channel<'_>,
        since: Option<&StreamPosition>,
        limit: Option<usize>,
        newest_first: bool,
    ) -> Result<HistoryResult> {
        let Channel { name, opts } = channel;
        if opts.history_size == 0 {
            return Err(ClientError::new(
                ErrorCode::HistoryDisabled,
                format!("history is off for {name:?}"),
            )
            .into());
        }
        let limit = limit.unwrap_or(opts.history_size).min(opts.history_size);
        let history = Self::history_options(opts);
        self.shared
            .broker
            .history(name, since, limit, newest_first, history)
            .await
    }

    /// The channel's newest retained publication (none or one) and its
    /// top: what a last-value channel shows a new subscriber.
    pub async fn latest(&self, channel: Channel<'_>) -> Result<(Vec<Publication>, StreamPosition)> {
        let h = self
            .shared
            .broker
            .history(
                channel.name,
                None,
                1,
                true,
                Self::history_options(channel.opts),
            )
            .await?;
        Ok((h.publications, h.top))
    }

    /// The channel's current top.
    pub async fn position(&self, channel: Channel<'_>) -> Result<StreamPosition> {
        let h = self
            .shared
            .broker
            .history(
                channel.name,
                None,
                0,
                false,
                Self::history_options(channel.opts),
            )
            .await?;
        Ok(h.top)
    }

    /// Whether `channel` has a stream (its top offset is above 0). A read
    /// that creates nothing: the creation limit asks it before a publish.
    pub async fn channel_exists(&self, channel: Channel<'_>) -> Result<bool> {
        Ok(self.position(channel).await?.offset > 0)
    }

    /// Everything published after `since`, if the history still holds all
    /// of it: `(publications, top, true)`; otherwise `(vec![], top, false)`
    /// — nothing partial is passed off as complete.
    pub async fn recover(
        &self,
        channel: Channel<'_>,
        since: &StreamPosition,
    ) -> Result<(Vec<Publication>, StreamPosition, bool)> {
        let Channel { name, opts } = channel;
        let h = self
            .shared
            .broker
            .history(
                name,
                Some(since),
                usize::MAX,
                false,
                Self::history_options(opts),
            )
            .await?;
        if opts.history_size > 0 && h.covers(since, None) {
            Ok((h.publications, h.top, true))
        } else {
            Ok((Vec::new(), h.top, false))
        }
    }

    /// Members of `channel` on every instance.
    pub async fn presence(&self, channel: Channel<'_>) -> Result<Vec<ClientInfo>> {
        let Channel { name, opts } = channel;
        if !opts.presence {
            return Err(ClientError::new(
                ErrorCode::PresenceDisabled,
                format!("presence is off for {name:?}"),
            )
            .into());
        }
        self.shared.presence.members(name).await
    }
}
