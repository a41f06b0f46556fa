//! The wire protocol: client requests in, server frames out.
//!
//! Parsing reads every field as a borrowed [`RawValue`] first, so one pass
//! tells a syntax error (`invalid_json`) from a wrong field (`invalid_frame`)
//! and the request's `id` is known even when the rest is wrong; `data` is
//! never decoded, only carried. Encoding writes each server frame once into
//! a [`Text`], a reference-counted UTF-8 buffer that every recipient shares.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{ClientError, ErrorCode};

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Milliseconds since the Unix epoch, like JavaScript's `Date.now()`.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
}

/// A parsed client request; borrowed from the frame's text.
#[derive(Debug)]
pub struct Request<'a> {
    /// The request's `id`, echoed back as `ref` in every reply.
    pub id: Option<&'a RawValue>,
    pub kind: RequestKind<'a>,
}

/// What the client asks for.
#[derive(Debug)]
pub enum RequestKind<'a> {
    Broadcast {
        data: &'a RawValue,
    },
    /// To one client (`targetId`), or to every connection of a user
    /// (`userId`, on every instance).
    Direct {
        target_id: String,
        user: bool,
        data: &'a RawValue,
    },
    Subscribe {
        channel: String,
        since: Option<StreamPosition>,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        data: &'a RawValue,
    },
    Presence {
        channel: String,
    },
    History {
        channel: String,
        since: Option<StreamPosition>,
        limit: Option<usize>,
    },
    Ping,
    /// Present (or refresh) a token.
    Auth {
        token: String,
    },
    /// Acknowledge every publication of `channel` up to `offset`
    /// (acked namespaces).
    Ack {
        channel: String,
        offset: u64,
    },
}

impl RequestKind<'_> {
    /// Every request type, in the order of [`RequestKind::index`].
    pub const TYPES: [&'static str; 10] = [
        "broadcast",
        "direct",
        "subscribe",
        "unsubscribe",
        "publish",
        "presence",
        "history",
        "ping",
        "auth",
        "ack",
    ];

    /// Position of this request's type in [`RequestKind::TYPES`].
    pub fn index(&self) -> usize {
        match self {
            RequestKind::Broadcast { .. } => 0,
            RequestKind::Direct { .. } => 1,
            RequestKind::Subscribe { .. } => 2,
            RequestKind::Unsubscribe { .. } => 3,
            RequestKind::Publish { .. } => 4,
            RequestKind::Presence { .. } => 5,
            RequestKind::History { .. } => 6,
            RequestKind::Ping => 7,
            RequestKind::Auth { .. } => 8,
            RequestKind::Ack { .. } => 9,
        }
    }
}

/// Every field any request may have, undecoded.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(rename = "targetId", borrow)]
    target_id: Option<&'a RawValue>,
    #[serde(rename = "userId", borrow)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow)]
    channel: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<&'a RawValue>,
    #[serde(borrow)]
    limit: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
    #[serde(borrow)]
    offset: Option<&'a RawValue>,
}

/// A request that could not be parsed, with the `id` if one was readable.
#[derive(Debug)]
pub struct ParseError<'a> {
    pub id: Option<&'a RawValue>,
    pub error: ClientError,
}

fn null() -> &'static RawValue {
    // `RawValue::NULL` is the JSON text `null`.
    RawValue::NULL
}

fn field<'de, T: Deserialize<'de>>(
    raw: Option<&'de RawValue>,
    name: &str,
    what: &str,
) -> Result<T, ClientError> {
    let raw = raw.ok_or_else(|| {
        ClientError::new(
            ErrorCode::InvalidFrame,
            format!("missing field `{name}` ({what})"),
        )
    })?;
    serde_json::from_str(raw.get()).map_err(|_| {
        ClientError::new(
            ErrorCode::InvalidFrame,
            format!("field `{name}` must be {what}"),
        )
    })
}

fn opt_field<'de, T: Deserialize<'de>>(
    raw: Option<&'de RawValue>,
    name: &str,
    what: &str,
) -> Result<Option<T>, ClientError> {
    match raw {
        None => Ok(None),
        Some(_) => field(raw, name, what).map(Some),
    }
}

/// Parse one text frame into a request.
pub fn parse_request(text: &str) -> Result<Request<'_>, ParseError<'_>> {
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| {
        let code = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                ErrorCode::InvalidJson
            }
            _ => ErrorCode::InvalidFrame,
        };
        let message = if code == ErrorCode::InvalidJson {
            format!("not valid JSON: {e}")
        } else {
            "a frame must be a JSON object with a string `type`".to_string()
        };
        ParseError {
            id: None,
            error: ClientError::new(code, message),
        }
    })?;
    let id = env.id;
    let fail = |error: ClientError| ParseError { id, error };
    let ty: String = field(env.ty, "type", "a string").map_err(fail)?;
    let channel = || -> Result<String, ClientError> { field(env.channel, "channel", "a string") };
    let since =
        || opt_field::<StreamPosition>(env.since, "since", "{\"epoch\":string,\"offset\":number}");
    let kind = match ty.as_str() {
        "broadcast" => RequestKind::Broadcast {
            data: env.data.unwrap_or(null()),
        },
        "direct" => match (env.target_id, env.user_id) {
            (None, Some(user)) => RequestKind::Direct {
                target_id: field(Some(user), "userId", "a user id string").map_err(fail)?,
                user: true,
                data: env.data.unwrap_or(null()),
            },
            _ => RequestKind::Direct {
                target_id: field(env.target_id, "targetId", "a client id string").map_err(fail)?,
                user: false,
                data: env.data.unwrap_or(null()),
            },
        },
        "subscribe" => RequestKind::Subscribe {
            channel: channel().map_err(fail)?,
            since: since().map_err(fail)?,
        },
        "unsubscribe" => RequestKind::Unsubscribe {
            channel: channel().map_err(fail)?,
        },
        "publish" => RequestKind::Publish {
            channel: channel().map_err(fail)?,
            data: env.data.unwrap_or(null()),
        },
        "presence" => RequestKind::Presence {
            channel: channel().map_err(fail)?,
        },
        "history" => RequestKind::History {
            channel: channel().map_err(fail)?,
            since: since().map_err(fail)?,
            limit: opt_field::<usize>(env.limit, "limit", "a non-negative integer")
                .map_err(fail)?,
        },
        "ping" => RequestKind::Ping,
        "ack" => RequestKind::Ack {
            channel: channel().map_err(fail)?,
            offset: field(env.offset, "offset", "a non-negative integer").map_err(fail)?,
        },
        "auth" => RequestKind::Auth {
            token: field(env.token, "token", "a JWT string").map_err(fail)?,
        },
        other => {
            return Err(fail(ClientError::new(
                ErrorCode::UnknownType,
                format!("unknown message type {other:?}"),
            )));
        }
    };
    Ok(Request { id, kind })
}

// ---- Server frames -------------------------------------------------------

/// An encoded text frame: cheap to clone (a reference count), already
/// known to be UTF-8 so the WebSocket layer never re-validates it.
pub type Text = axum::extract::ws::Utf8Bytes;

fn encode<T: Serialize>(frame: &T) -> Text {
    // Serializing these structs cannot fail: keys are strings, values are
    // plain data or already-valid raw JSON.
    Text::from(serde_json::to_string(frame).expect("server frames always serialize"))
}

type Ref<'a> = Option<&'a RawValue>;

#[derive(Serialize)]
struct Connected<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(rename = "clientId")]
    client_id: &'a str,
    message: &'static str,
    #[serde(rename = "instanceId")]
    instance_id: &'a str,
}

/// `{"type":"connected",…}`: the welcome, as the tutorial sends it.
pub fn connected(client_id: &str, instance_id: &str) -> Text {
    encode(&Connected {
        ty: "connected",
        client_id,
        message: "Welcome to the real-time server",
        instance_id,
    })
}

#[derive(Serialize)]
struct Relay<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(rename = "senderId")]
    sender_id: Option<&'a str>,
    data: &'a RawValue,
    timestamp: u64,
}

/// `{"type":"broadcast","senderId","data","timestamp"}`.
pub fn broadcast(sender_id: Option<&str>, data: &RawValue, timestamp: u64) -> Text {
    encode(&Relay {
        ty: "broadcast",
        sender_id,
        data,
        timestamp,
    })
}

/// `{"type":"direct","senderId","data","timestamp"}`.
pub fn direct(sender_id: Option<&str>, data: &RawValue, timestamp: u64) -> Text {
    encode(&Relay {
        ty: "direct",
        sender_id,
        data,
        timestamp,
    })
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    code: &'static str,
    message: &'a str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Ref<'a>,
}

/// `{"type":"error","code","message","ref"}`.
pub fn error(err: &ClientError, reference: Ref<'_>) -> Text {
    encode(&ErrorFrame {
        ty: "error",
        code: err.code.as_str(),
        message: &err.message,
        reference,
    })
}

#[derive(Serialize)]
struct Ack<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Ref<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

/// `{"type":"ack","ref"}`, with the channel and offset for a publish.
pub fn ack(reference: Ref<'_>, published: Option<(&str, u64)>) -> Text {
    encode(&Ack {
        ty: "ack",
        reference,
        channel: published.map(|p| p.0),
        offset: published.map(|p| p.1),
    })
}

#[derive(Serialize)]
struct Pong<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Ref<'a>,
}

/// `{"type":"pong","ref"}`.
pub fn pong(reference: Ref<'_>) -> Text {
    encode(&Pong {
        ty: "pong",
        reference,
    })
}

#[derive(Serialize)]
struct Authenticated<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(rename = "userId")]
    user_id: &'a str,
    #[serde(rename = "expiresAt")]
    expires_at: Option<u64>,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Ref<'a>,
}

/// `{"type":"authenticated","userId","expiresAt","ref"}`.
pub fn authenticated(user_id: &str, expires_at: Option<u64>, reference: Ref<'_>) -> Text {
    encode(&Authenticated {
        ty: "authenticated",
        user_id,
        expires_at,
        reference,
    })
}

#[derive(Serialize)]
struct Subscribed<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    channel: &'a str,
    epoch: &'a str,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    acked: bool,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Ref<'a>,
}

/// `{"type":"subscribed","channel","epoch","offset","recovered"?,"acked"?,"ref"}`;
/// `acked` appears (true) in namespaces with acknowledged delivery.
pub fn subscribed(
    channel: &str,
    position: &StreamPosition,
    recovered: Option<bool>,
    acked: bool,
    reference: Ref<'_>,
) -> Text {
    encode(&Subscribed {
        ty: "subscribed",
        channel,
        epoch: &position.epoch,
        offset: position.offset,
        recovered,
        acked,
        reference,
    })
}

#[derive(Serialize)]
struct Unsubscribed<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    channel: &'a str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Ref<'a>,
}

/// `{"type":"unsubscribed","channel","ref"}`.
pub fn unsubscribed(channel: &str, reference: Ref<'_>) -> Text {
    encode(&Unsubscribed {
        ty: "unsubscribed",
        channel,
        reference,
    })
}

#[derive(Serialize)]
struct Message<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    channel: &'a str,
    data: &'a RawValue,
    #[serde(rename = "senderId")]
    sender_id: Option<&'a str>,
    offset: u64,
    epoch: &'a str,
    timestamp: u64,
}

/// `{"type":"message","channel","data","senderId","offset","epoch","timestamp"}`.
pub fn message(channel: &str, epoch: &str, publication: &Publication) -> Text {
    encode(&Message {
        ty: "message",
        channel,
        data: &publication.data,
        sender_id: publication.sender_id.as_deref(),
        offset: publication.offset,
        epoch,
        timestamp: publication.timestamp,
    })
}

#[derive(Serialize)]
struct PresenceFrame<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    channel: &'a str,
    members: &'a [ClientInfo],
    count: usize,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Ref<'a>,
}

/// `{"type":"presence","channel","members","count","ref"}`.
pub fn presence(channel: &str, members: &[ClientInfo], reference: Ref<'_>) -> Text {
    encode(&PresenceFrame {
        ty: "presence",
        channel,
        members,
        count: members.len(),
        reference,
    })
}

#[derive(Serialize)]
struct JoinLeave<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    channel: &'a str,
    #[serde(flatten)]
    info: &'a ClientInfo,
}

/// `{"type":"join"|"leave","channel","clientId","userId"}`.
pub fn join_leave(join: bool, channel: &str, info: &ClientInfo) -> Text {
    encode(&JoinLeave {
        ty: if join { "join" } else { "leave" },
        channel,
        info,
    })
}

#[derive(Serialize)]
struct HistoryFrame<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    channel: &'a str,
    publications: &'a [Publication],
    epoch: &'a str,
    offset: u64,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Ref<'a>,
}

/// `{"type":"history","channel","publications","epoch","offset","ref"}`.
pub fn history(
    channel: &str,
    publications: &[Publication],
    top: &StreamPosition,
    reference: Ref<'_>,
) -> Text {
    encode(&HistoryFrame {
        ty: "history",
        channel,
        publications,
        epoch: &top.epoch,
        offset: top.offset,
        reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse_request(text).unwrap_err().error.code
    }

    #[test]
    fn tutorial_frames_parse() {
        let r = parse_request(r#"{"type":"broadcast","data":{"a":[1,2]}}"#).unwrap();
        match r.kind {
            RequestKind::Broadcast { data } => assert_eq!(data.get(), r#"{"a":[1,2]}"#),
            other => panic!("{other:?}"),
        }
        let r =
            parse_request(r#"{"type":"direct","targetId":"client-1","data":"hi","id":7}"#).unwrap();
        assert_eq!(r.id.unwrap().get(), "7");
        assert!(
            matches!(r.kind, RequestKind::Direct { ref target_id, .. } if target_id == "client-1")
        );
        let r = parse_request(r#"{"type":"broadcast"}"#).unwrap();
        assert!(matches!(r.kind, RequestKind::Broadcast { data } if data.get() == "null"));
    }

    #[test]
    fn each_kind_of_bad_input_has_its_code() {
        assert_eq!(code("{nope"), ErrorCode::InvalidJson);
        assert_eq!(code(""), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidFrame);
        assert_eq!(code("42"), ErrorCode::InvalidFrame);
        assert_eq!(code(r#"{"data":1}"#), ErrorCode::InvalidFrame);
        assert_eq!(code(r#"{"type":5}"#), ErrorCode::InvalidFrame);
        assert_eq!(code(r#"{"type":"teleport"}"#), ErrorCode::UnknownType);
        assert_eq!(
            code(r#"{"type":"direct","data":1}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"direct","targetId":3}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(code(r#"{"type":"subscribe"}"#), ErrorCode::InvalidFrame);
        assert_eq!(
            code(r#"{"type":"subscribe","channel":"a","since":{"offset":"x"}}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"history","channel":"a","limit":-1}"#),
            ErrorCode::InvalidFrame
        );
    }

    #[test]
    fn the_id_survives_a_bad_field() {
        let e = parse_request(r#"{"type":"direct","targetId":3,"id":"abc"}"#).unwrap_err();
        assert_eq!(e.id.unwrap().get(), r#""abc""#);
    }

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
    fn frames_encode_as_documented() {
        let data = serde_json::from_str::<&RawValue>(r#"{"x":1}"#).unwrap();
        let f = broadcast(Some("c1"), data, 5);
        assert_eq!(
            f.as_str(),
            r#"{"type":"broadcast","senderId":"c1","data":{"x":1},"timestamp":5}"#
        );
        let r = serde_json::from_str::<&RawValue>("3").unwrap();
        let e = error(&ClientError::new(ErrorCode::UnknownTarget, "gone"), Some(r));
        assert_eq!(
            e.as_str(),
            r#"{"type":"error","code":"unknown_target","message":"gone","ref":3}"#
        );
        let info = ClientInfo {
            client_id: "c1".into(),
            user_id: None,
        };
        assert_eq!(
            join_leave(true, "ch", &info).as_str(),
            r#"{"type":"join","channel":"ch","clientId":"c1","userId":null}"#
        );
    }
}
