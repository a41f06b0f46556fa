//! Client frames in: [`parse_request`] reads one text frame into a
//! [`Request`], every field first as a borrowed [`RawValue`], so a syntax
//! error (`invalid_json`) is told from a wrong field (`invalid_frame`) and
//! the request's `id` is known even when the rest is wrong.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::StreamPosition;
use crate::error::{ClientError, ErrorCode};

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
        /// Publish at most once per key and channel within the window.
        idempotency_key: Option<String>,
        /// Append only if the channel's top offset is this one.
        expected_offset: Option<u64>,
    },
    Presence {
        channel: String,
    },
    History {
        channel: String,
        since: Option<StreamPosition>,
        limit: Option<usize>,
        /// The newest publications, newest first.
        reverse: bool,
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
    /// A call answered by the backend's RPC proxy.
    Rpc {
        method: String,
        data: &'a RawValue,
    },
}

impl RequestKind<'_> {
    /// Every request type, in the order of [`RequestKind::index`].
    pub const TYPES: [&'static str; 11] = [
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
        "rpc",
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
            RequestKind::Rpc { .. } => 10,
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
    #[serde(borrow)]
    method: Option<&'a RawValue>,
    #[serde(rename = "idempotencyKey", borrow)]
    idempotency_key: Option<&'a RawValue>,
    #[serde(rename = "expectedOffset", borrow)]
    expected_offset: Option<&'a RawValue>,
    #[serde(borrow)]
    reverse: Option<&'a RawValue>,
}

/// Longest `rpc` method name, in characters.
pub const MAX_METHOD: usize = 128;

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

/// The `id` of a frame that will not be served (dropped by the rate
/// limit), so that its error names the request: `None` when the frame is
/// not a JSON object or has no `id`.
pub fn request_id(text: &str) -> Option<&RawValue> {
    #[derive(Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Option<&'a RawValue>,
    }
    serde_json::from_str::<IdOnly<'_>>(text).ok()?.id
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
            idempotency_key: opt_field(env.idempotency_key, "idempotencyKey", "a string")
                .map_err(fail)?,
            expected_offset: opt_field(
                env.expected_offset,
                "expectedOffset",
                "a non-negative integer",
            )
            .map_err(fail)?,
        },
        "presence" => RequestKind::Presence {
            channel: channel().map_err(fail)?,
        },
        "history" => RequestKind::History {
            channel: channel().map_err(fail)?,
            since: since().map_err(fail)?,
            limit: opt_field::<usize>(env.limit, "limit", "a non-negative integer")
                .map_err(fail)?,
            reverse: opt_field(env.reverse, "reverse", "a boolean")
                .map_err(fail)?
                .unwrap_or(false),
        },
        "ping" => RequestKind::Ping,
        "ack" => RequestKind::Ack {
            channel: channel().map_err(fail)?,
            offset: field(env.offset, "offset", "a non-negative integer").map_err(fail)?,
        },
        "rpc" => RequestKind::Rpc {
            method: field::<String>(env.method, "method", "a string")
                .and_then(|m| match m.chars().count() {
                    1..=MAX_METHOD => Ok(m),
                    _ => Err(ClientError::new(
                        ErrorCode::InvalidFrame,
                        format!("`method` must be 1 to {MAX_METHOD} characters"),
                    )),
                })
                .map_err(fail)?,
            data: env.data.unwrap_or(null()),
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
        assert_eq!(
            code(r#"{"type":"history","channel":"a","reverse":"yes"}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"publish","channel":"a","expectedOffset":-1}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"publish","channel":"a","idempotencyKey":5}"#),
            ErrorCode::InvalidFrame
        );
    }

    #[test]
    fn publish_conditions_and_reverse_parse() {
        let r = parse_request(
            r#"{"type":"publish","channel":"a","data":1,"idempotencyKey":"k1","expectedOffset":7}"#,
        )
        .unwrap();
        assert!(matches!(
            r.kind,
            RequestKind::Publish { idempotency_key: Some(ref k), expected_offset: Some(7), .. } if k == "k1"
        ));
        let r = parse_request(r#"{"type":"history","channel":"a","reverse":true}"#).unwrap();
        assert!(matches!(r.kind, RequestKind::History { reverse: true, .. }));
    }

    #[test]
    fn the_id_survives_a_bad_field() {
        let e = parse_request(r#"{"type":"direct","targetId":3,"id":"abc"}"#).unwrap_err();
        assert_eq!(e.id.unwrap().get(), r#""abc""#);
    }
}
