//! The wire protocol: client requests in, server frames out.
//!
//! Parsing reads every field as a borrowed [`RawValue`] first, so one pass
//! tells a syntax error (`invalid_json`) from a wrong field (`invalid_frame`)
//! and the request's `id` is known even when the rest is wrong; `data` is
//! never decoded, only carried. Encoding writes each server frame once into
//! a [`Text`], a reference-counted UTF-8 buffer that every recipient shares.
//!
//! [`parse`] reads client frames into a [`Request`]; [`encode`] writes
//! server frames. Here: what both share (channel names, positions,
//! publications, who a client is).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{ClientError, ErrorCode};

pub mod encode;
pub mod parse;

pub use encode::*;
pub use parse::*;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Milliseconds since the Unix epoch, like JavaScript's `Date.now()`.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Longest display name, in characters (a name in presence is held for as
/// long as its connection: at most 256 bytes).
pub const MAX_NAME_CHARS: usize = 64;

/// A display name as presence shows it: `raw` trimmed, without control
/// characters or bidirectional overrides (which could make a name read as
/// another), cut to [`MAX_NAME_CHARS`]; `None` when nothing is left.
pub fn display_name(raw: &str) -> Option<Arc<str>> {
    let name: String = raw
        .chars()
        .filter(|&c| {
            !c.is_control() && !matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
        })
        .collect::<String>()
        .trim()
        .chars()
        .take(MAX_NAME_CHARS)
        .collect();
    let name = name.trim_end();
    (!name.is_empty()).then(|| name.into())
}

/// Whether `b` may appear in a channel name: `A-Z a-z 0-9 _ - . : @ / = ,`.
pub fn is_channel_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'/' | b'=' | b',')
}

/// Prefix of the internal channel of a user: every connection of an
/// authenticated user is subscribed to `#user:<sub>`, so a user-addressed
/// `direct` is one publication that reaches exactly the instances holding
/// that user's connections. `#` is outside the client channel charset, so
/// no client can name these channels.
pub const USER_CHANNEL_PREFIX: &str = "#user:";

/// Whether `channel` is internal (not a client channel).
pub fn is_internal_channel(channel: &str) -> bool {
    channel.starts_with('#')
}

/// Check a channel name against the documented charset and length.
pub fn validate_channel(name: &str) -> Result<(), ClientError> {
    if name.is_empty() || name.len() > MAX_CHANNEL_LEN || !name.bytes().all(is_channel_byte) {
        return Err(ClientError::new(
            ErrorCode::BadChannel,
            format!("channel names are 1-{MAX_CHANNEL_LEN} bytes of A-Z a-z 0-9 _ - . : @ / = ,"),
        ));
    }
    Ok(())
}

/// A position in a channel's stream: the epoch names the stream's
/// incarnation, the offset counts its publications from 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub epoch: Arc<str>,
    pub offset: u64,
}

/// One publication in a channel, as kept in history and sent on the bus.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Publication {
    /// Position in the channel's stream (1, 2, 3, … within an epoch).
    pub offset: u64,
    /// The publisher's payload, kept as JSON text and never re-encoded.
    pub data: Arc<RawValue>,
    /// The publishing client, or `None` for the server API.
    #[serde(rename = "senderId")]
    pub sender_id: Option<Arc<str>>,
    /// When the server accepted it, ms since the Unix epoch.
    pub timestamp: u64,
}

/// Who a client is, as shown in presence and join/leave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    #[serde(rename = "clientId")]
    pub client_id: Arc<str>,
    #[serde(rename = "userId")]
    pub user_id: Option<Arc<str>>,
    /// A display name: the token's `name` claim, or without a token the
    /// `?name=` of the upgrade (unverified); see [`display_name`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Arc<str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        assert!(validate_channel("chat:room-1_a.b@c/d=e,f").is_ok());
        assert!(validate_channel("").is_err());
        assert!(validate_channel("has space").is_err());
        assert!(validate_channel("é").is_err());
        assert!(validate_channel(&"a".repeat(256)).is_err());
        assert!(validate_channel(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn display_names() {
        assert_eq!(
            display_name("  Ada Lovelace \n").as_deref(),
            Some("Ada Lovelace")
        );
        assert_eq!(display_name("a\u{7}b").as_deref(), Some("ab"));
        assert_eq!(
            display_name("\u{202E}evil\u{2066}").as_deref(),
            Some("evil")
        );
        assert_eq!(display_name(" \t "), None);
        assert_eq!(display_name(""), None);
        let long = "é".repeat(100);
        assert_eq!(display_name(&long).unwrap().chars().count(), MAX_NAME_CHARS);
    }
}
