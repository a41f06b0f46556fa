//! Server frames out: each written once into a [`Text`], a
//! reference-counted UTF-8 buffer that every recipient shares.

use serde::Serialize;
use serde_json::value::RawValue;

use super::{ClientInfo, Publication, StreamPosition};
use crate::error::ClientError;

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
    /// The connect proxy's `data`, when it gave some.
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    /// SSE connections only: the id to post frames with.
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<&'a str>,
}

/// `{"type":"connected",…}`: the welcome, as the tutorial sends it.
pub fn connected(client_id: &str, instance_id: &str) -> Text {
    connected_with(client_id, instance_id, None, None)
}

/// The welcome with `session` on an SSE connection and the connect proxy's
/// `data`, if any.
pub fn connected_with(
    client_id: &str,
    instance_id: &str,
    session: Option<&str>,
    data: Option<&RawValue>,
) -> Text {
    encode(&Connected {
        ty: "connected",
        client_id,
        message: "Welcome to the real-time server",
        instance_id,
        data,
        session,
    })
}

#[derive(Serialize)]
struct Rpc<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(rename = "ref")]
    reference: &'a RawValue,
    data: &'a RawValue,
}

/// `{"type":"rpc","ref","data"}`: the backend's answer to an `rpc` frame.
pub fn rpc(reference: &RawValue, data: &RawValue) -> Text {
    encode(&Rpc {
        ty: "rpc",
        reference,
        data,
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
    code: &'a str,
    message: &'a str,
    /// The channel's current top (`offset_mismatch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Ref<'a>,
}

/// `{"type":"error","code","message","ref"}`, with `offset` and `epoch`
/// for `offset_mismatch`.
pub fn error(err: &ClientError, reference: Ref<'_>) -> Text {
    encode(&ErrorFrame {
        ty: "error",
        code: err.code.as_str(),
        message: &err.message,
        offset: err.position.as_ref().map(|p| p.offset),
        epoch: err.position.as_ref().map(|p| &*p.epoch),
        reference,
    })
}

/// An `error` frame with a code of the backend's (a proxy's refusal).
pub fn error_with_code(code: &str, message: &str, reference: Ref<'_>) -> Text {
    encode(&ErrorFrame {
        ty: "error",
        code,
        message,
        offset: None,
        epoch: None,
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
    use crate::error::ErrorCode;

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
            name: None,
        };
        assert_eq!(
            join_leave(true, "ch", &info).as_str(),
            r#"{"type":"join","channel":"ch","clientId":"c1","userId":null}"#
        );
    }
}
