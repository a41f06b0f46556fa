//! The backend's answers: exactly one of `result`, `error` or
//! `disconnect`, checked here so that the session only sees well-formed
//! ones ([`Answer`]); anything else is a failed call.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::queue::CloseReason;

/// A usable answer of the backend.
#[derive(Debug)]
pub enum Answer<T> {
    /// Allowed; for connect, refresh, publish and rpc, with what to use.
    Result(T),
    /// Refused with the backend's own code and message: the client gets an
    /// `error` frame with them (connect: the close reason).
    Refused(Refusal),
    /// Close the connection with this code (4000–4999) and reason.
    Disconnect(CloseReason),
}

/// The backend's `{"error":{"code","message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    /// 1–64 characters of `[A-Za-z0-9_.-]`, as the client will see it.
    pub code: String,
    #[serde(default)]
    pub message: String,
}

/// The `result` of connect and refresh.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectResult {
    /// The user; `""` makes an anonymous connection.
    pub user_id: String,
    /// The channel grants, same grammar as a token's `channels` claim
    /// (plus `direct`, a token's top-level claim).
    #[serde(default)]
    pub grants: Option<GrantsResult>,
    /// Passed to the client in the `connected` welcome (connect only).
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    /// Channels the server subscribes the client to (connect only).
    #[serde(default)]
    pub channels: Vec<String>,
    /// When these credentials expire (Unix seconds); the refresh proxy is
    /// asked then. None: they do not.
    #[serde(default)]
    pub expires_at: Option<u64>,
}

/// Grants in a connect or refresh result.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsResult {
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub direct: Vec<String>,
}

impl From<GrantsResult> for crate::auth::Grants {
    fn from(g: GrantsResult) -> Self {
        crate::auth::Grants {
            subscribe: g.subscribe,
            publish: g.publish,
            direct: g.direct,
        }
    }
}

/// The `result` of publish (`data` replaces the client's) and rpc (`data`
/// is the reply's).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataResult {
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

/// The `result` of subscribe: `{}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Disconnect {
    code: u16,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body<T> {
    result: Option<T>,
    error: Option<Refusal>,
    disconnect: Option<Disconnect>,
}

/// Longest close reason: a close frame's reason is at most 123 bytes.
const MAX_REASON: usize = 120;
/// Longest error message passed on to the client.
const MAX_MESSAGE: usize = 1024;

/// Cut `s` to at most `max` bytes, at a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Read an answer body; `Err` says why it is not a usable one.
pub(super) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<Answer<T>, String> {
    let body: Body<T> = serde_json::from_slice(bytes).map_err(|e| format!("bad answer: {e}"))?;
    match (body.result, body.error, body.disconnect) {
        (Some(result), None, None) => Ok(Answer::Result(result)),
        (None, Some(refusal), None) => {
            let valid = (1..=64).contains(&refusal.code.len())
                && refusal
                    .code
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid {
                return Err(format!("bad error code {:?}", refusal.code));
            }
            Ok(Answer::Refused(Refusal {
                code: refusal.code,
                message: truncate(refusal.message, MAX_MESSAGE),
            }))
        }
        (None, None, Some(d)) if (4000..=4999).contains(&d.code) => Ok(Answer::Disconnect(
            CloseReason::new(d.code, Cow::Owned(truncate(d.reason, MAX_REASON))),
        )),
        (None, None, Some(d)) => Err(format!("disconnect code {} is not 4000-4999", d.code)),
        _ => Err("not exactly one of result, error, disconnect".into()),
    }
}
