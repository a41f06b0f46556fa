//! The server HTTP API for backends (notification systems, schedulers…),
//! served on the same port as the WebSockets. `docs/openapi.yaml` describes
//! every route.
//!
//! | route | effect |
//! |---|---|
//! | `POST /api/publish` | publish into a channel (`senderId: null`); ignores `client_publish`; optional `idempotencyKey`, `expectedOffset` (409 `offset_mismatch` with the current `offset`/`epoch`) |
//! | `POST /api/broadcast` | the tutorial's broadcast to every client of every instance |
//! | `POST /api/direct` | a `direct` frame to one client id, wherever it is connected |
//! | `GET /api/presence/{channel}` | the members of a channel on every instance |
//! | `GET /api/history/{channel}` | retained publications (`?limit`, `?reverse=true` newest first, `?epoch&offset` after a position) |
//! | `POST /api/disconnect` | close a client connected to *this* instance |
//! | `GET /api/users/{id}/presence` | a user's connections across the cluster, and the `seq` of its lifecycle events (needs `events_url`) |
//! | `POST /api/events/replay` | move dead-lettered lifecycle events back for delivery (needs `events_url`) |
//!
//! The API is off unless an API key is configured (`api_key_file`): then
//! every `/api/*` path answers 404, as if it did not exist. With a key,
//! each request must carry it as `Authorization: Bearer <key>` or
//! `X-API-Key: <key>`: none → 401, a wrong one → 403. The key is compared
//! in constant time with the `subtle` crate (the time depends only on the
//! configured key's length, not on where a guess differs nor on the
//! guess's length).
//!
//! Every error is JSON, `{"code":…,"message":…}`, with the protocol's error
//! codes where one applies (`bad_channel`, `unknown_target`,
//! `presence_disabled`, …) and these API codes otherwise:
//! `invalid_request` (400: the body is not JSON, misses a field, has an
//! unknown one…), `unauthorized` (401), `permission_denied` (403, also a
//! protocol code), `payload_too_large` (413: the body is larger than
//! `max_message_size`; a larger `Content-Length` is refused before any of
//! the body is read), `request_timeout` (408: the body did not arrive
//! within [`BODY_TIMEOUT`]), `method_not_allowed` (405).
//!
//! With `metrics_require_key`, `/metrics` and `/metrics/prometheus` take
//! the same key, checked by [`check_key`].

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use serde_json::value::RawValue;

use std::sync::Arc;

use crate::broker::PublishConditions;
use crate::error::{Error, ErrorCode};
use crate::metrics::Metrics;
use crate::node::Node;
use crate::protocol::StreamPosition;

/// An API error: its status and the JSON body `{"code","message"}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The channel's current top (`offset_mismatch`).
    pub position: Option<StreamPosition>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            position: None,
        }
    }

    /// 400 `invalid_request`: the body or a parameter is wrong.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code, "message": self.message});
        if let Some(top) = &self.position {
            body["offset"] = json!(top.offset);
            body["epoch"] = json!(top.epoch);
        }
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"switchboard\""),
            );
        }
        resp
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let ce = e.to_client();
        let status = match ce.code {
            ErrorCode::UnknownTarget => StatusCode::NOT_FOUND,
            ErrorCode::PresenceDisabled
            | ErrorCode::HistoryDisabled
            | ErrorCode::OffsetMismatch
            | ErrorCode::Duplicate => StatusCode::CONFLICT,
            ErrorCode::Unsupported => StatusCode::NOT_IMPLEMENTED,
            ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorCode::BusUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError {
            position: ce.position,
            ..ApiError::new(status, ce.code.as_str(), ce.message)
        }
    }
}

/// Longest a client may take to send a request body: a slow body must not
/// hold a connection (and its buffer) open for ever.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A JSON body whose every failure is an [`ApiError`] (never axum's
/// plain-text rejections): 413 over `max_message_size`, 408 after
/// [`BODY_TIMEOUT`], else 400.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Node> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, node: &Node) -> Result<Self, ApiError> {
        let read = tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(req, node));
        let body = read.await.map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the body did not arrive within {BODY_TIMEOUT:?}"),
            )
        })?;
        let body = body.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!(
                        "the body is larger than max_message_size ({} bytes)",
                        node.config().max_message_size
                    ),
                )
            } else {
                ApiError::invalid(format!("cannot read the body: {}", r.body_text()))
            }
        })?;
        serde_json::from_slice(&body)
            .map(ApiJson)
            .map_err(|e| ApiError::invalid(format!("invalid body: {e}")))
    }
}

/// The `/api/*` routes, or none when no API key is configured. Merge into
/// the server's router: `.merge(crate::api::routes(node))`.
pub fn routes<S: Clone + Send + Sync + 'static>(node: Node) -> Router<S> {
    if node.config().api_key.is_none() {
        return Router::new();
    }
    let limit = node.config().max_message_size;
    Router::new()
        .route("/api/publish", post(publish))
        .route("/api/broadcast", post(broadcast))
        .route("/api/direct", post(direct))
        .route("/api/presence/{*channel}", get(presence))
        .route("/api/history/{*channel}", get(history))
        .route("/api/disconnect", post(disconnect))
        .route("/api/users/{id}/presence", get(user_presence))
        .route("/api/events/replay", post(replay_events))
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn_with_state(node.clone(), guard))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(node)
}

/// The key a request presents: `Authorization: Bearer <key>`, else
/// `X-API-Key: <key>`.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().as_bytes())
        });
    bearer.or_else(|| headers.get("x-api-key").map(|v| v.as_bytes().trim_ascii()))
}

/// Whether a request carries the API key: 404 when no key is configured,
/// 401 without a key, 403 with a wrong one.
pub fn check_key(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    match (&node.config().api_key, presented_key(headers)) {
        (None, _) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the API is off",
        )),
        (Some(_), None) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the API key as `Authorization: Bearer <key>` or `X-API-Key: <key>`",
        )),
        (Some(key), Some(given)) if !key.matches(given) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_denied",
            "wrong API key",
        )),
        (Some(_), Some(_)) => Ok(()),
    }
}

/// Middleware: the request needs the API key (`metrics_require_key`).
pub async fn require_key(State(node): State<Node>, req: Request, next: Next) -> Response {
    match check_key(&node, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// A `Content-Length` over `max_message_size`: refused before the body is
/// read.
fn oversize(node: &Node, headers: &HeaderMap) -> Option<ApiError> {
    let limit = node.config().max_message_size;
    let len: u64 = headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (len > limit as u64).then(|| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than max_message_size ({limit} bytes)"),
        )
    })
}

/// Counts every API request and failure, and checks the key and the
/// announced length before the body is read.
async fn guard(State(node): State<Node>, req: Request, next: Next) -> Response {
    let metrics = node.metrics();
    Metrics::inc(&metrics.api_requests);
    let checked =
        check_key(&node, req.headers()).and_then(|()| match oversize(&node, req.headers()) {
            Some(e) => Err(e),
            None => Ok(()),
        });
    let resp = match checked {
        Err(e) => e.into_response(),
        Ok(()) => next.run(req).await,
    };
    if resp.status().is_client_error() || resp.status().is_server_error() {
        Metrics::inc(&metrics.api_errors);
    }
    resp
}

async fn method_not_allowed(State(node): State<Node>) -> ApiError {
    Metrics::inc(&node.metrics().api_requests);
    Metrics::inc(&node.metrics().api_errors);
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PublishBody {
    channel: String,
    data: Box<RawValue>,
    /// Publish at most once per key and channel within the window.
    idempotency_key: Option<String>,
    /// Append only if the channel's top offset is this one.
    expected_offset: Option<u64>,
}

async fn publish(
    State(node): State<Node>,
    ApiJson(body): ApiJson<PublishBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // The server API may publish even where clients may not.
    let channel = node.channel(&body.channel).map_err(Error::from)?;
    let conditions = PublishConditions {
        idempotency_key: body.idempotency_key.map(Arc::from),
        expected_offset: body.expected_offset,
        ..Default::default()
    };
    let pos = node
        .publish(None, channel, body.data.into(), conditions)
        .await?;
    Ok(Json(json!({
        "channel": body.channel,
        "offset": pos.offset,
        "epoch": pos.epoch,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    data: Box<RawValue>,
}

async fn broadcast(
    State(node): State<Node>,
    ApiJson(body): ApiJson<BroadcastBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    node.broadcast(None, body.data.into()).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DirectBody {
    /// One client, wherever it is connected.
    client_id: Option<String>,
    /// Every connection of this user (token `sub`), on every instance.
    user_id: Option<String>,
    data: Box<RawValue>,
}

async fn direct(
    State(node): State<Node>,
    ApiJson(body): ApiJson<DirectBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    match (body.client_id, body.user_id) {
        (Some(client_id), None) => node.direct(None, &client_id, body.data.into()).await?,
        (None, Some(user_id)) => node.direct_user(None, &user_id, body.data.into()).await?,
        _ => {
            return Err(ApiError::invalid(
                "exactly one of clientId and userId is required",
            ));
        }
    }
    Ok(Json(json!({})))
}

/// The query of `GET /api/history/{channel}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    limit: Option<usize>,
    /// The newest publications, newest first.
    #[serde(default)]
    reverse: bool,
    /// With `offset`: only publications after this position.
    epoch: Option<String>,
    offset: Option<u64>,
}

async fn history(
    State(node): State<Node>,
    channel: Result<Path<String>, PathRejection>,
    query: Result<axum::extract::Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(channel) = channel.map_err(|r| ApiError::invalid(r.body_text()))?;
    let axum::extract::Query(q) = query.map_err(|r| ApiError::invalid(r.body_text()))?;
    let since = match (q.epoch, q.offset) {
        (Some(epoch), Some(offset)) => Some(StreamPosition {
            epoch: epoch.into(),
            offset,
        }),
        (None, None) => None,
        _ => return Err(ApiError::invalid("epoch and offset go together")),
    };
    let ch = node.channel(&channel).map_err(Error::from)?;
    let h = node.history(ch, since.as_ref(), q.limit, q.reverse).await?;
    Ok(Json(json!({
        "channel": channel,
        "epoch": h.top.epoch,
        "offset": h.top.offset,
        "publications": h.publications,
    })))
}

async fn presence(
    State(node): State<Node>,
    channel: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(channel) = channel.map_err(|r| ApiError::invalid(r.body_text()))?;
    let ch = node.channel(&channel).map_err(Error::from)?;
    let members = node.presence(ch).await?;
    Ok(Json(json!({
        "channel": channel,
        "count": members.len(),
        "members": members,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DisconnectBody {
    client_id: String,
    code: Option<u16>,
    reason: Option<String>,
}

/// Default close code of `/api/disconnect`.
pub const DEFAULT_DISCONNECT_CODE: u16 = 4000;
/// Longest close reason: a close frame's payload is at most 125 bytes, 2
/// of which are the code.
pub const MAX_CLOSE_REASON: usize = 123;

async fn disconnect(
    State(node): State<Node>,
    ApiJson(body): ApiJson<DisconnectBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let code = body.code.unwrap_or(DEFAULT_DISCONNECT_CODE);
    if !(4000..=4999).contains(&code) {
        return Err(ApiError::invalid(format!(
            "code must be between 4000 and 4999 (got {code})"
        )));
    }
    let reason = body
        .reason
        .unwrap_or_else(|| "disconnected by the server".into());
    if reason.len() > MAX_CLOSE_REASON {
        return Err(ApiError::invalid(format!(
            "reason must be at most {MAX_CLOSE_REASON} bytes"
        )));
    }
    if !node
        .disconnect_client(&body.client_id, code, reason)
        .await?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownTarget.as_str(),
            format!(
                "no client with id {:?} is connected to this instance",
                body.client_id
            ),
        ));
    }
    Ok(Json(json!({"disconnected": true})))
}

/// The lifecycle events, or 404 `events_off`.
fn events(node: &Node) -> Result<&crate::events::Events, ApiError> {
    node.events().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "events_off",
            "lifecycle events are off (no events_url)",
        )
    })
}

async fn user_presence(
    State(node): State<Node>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = id.map_err(|r| ApiError::invalid(r.body_text()))?;
    let p = events(&node)?.user(&id).await?;
    Ok(Json(json!({
        "userId": id,
        "online": p.online,
        "connections": p.connections,
        "seq": p.seq,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    /// At most this many (default and cap: `events::MAX_REPLAY`).
    max: Option<usize>,
}

async fn replay_events(
    State(node): State<Node>,
    ApiJson(body): ApiJson<ReplayBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let max = body.max.unwrap_or(crate::events::MAX_REPLAY);
    let (replayed, left) = events(&node)?.replay(max).await?;
    Ok(Json(json!({"replayed": replayed, "deadLettered": left})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_wins_over_x_api_key() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", HeaderValue::from_static(" k2 "));
        assert_eq!(presented_key(&h), Some(&b"k2"[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer k1"));
        assert_eq!(presented_key(&h), Some(&b"k1"[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(presented_key(&h), Some(&b"k2"[..]));
    }
}
