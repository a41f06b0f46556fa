//! The Server-Sent Events transport, for clients whose WebSocket upgrade
//! is broken by a proxy: `GET /sse` opens a stream of events, `POST
//! /sse/send` carries the client's frames.
//!
//! An SSE connection is an ordinary session (`crate::session`) over an
//! [`SseConn`] instead of a WebSocket: same authentication, requests,
//! outbound queue, slow-consumer policy, keep-alive and drain. Its welcome
//! carries a `session` id, `<clientId>.<secret>` ([`crate::inbox`]). A POST
//! may land on any instance: [`crate::node::Node::sse_send`] queues the
//! frames in the inbox here, or sends them over the bus to the instance
//! that holds the stream (`broker::Direct` with `sse` set), like a direct
//! message. The admission checks (draining, origin, connection caps,
//! per-address limits) are the server's, shared with the WebSocket
//! upgrade (`server::admit`).

mod conn;

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Counted, Permit};
use crate::api::{ApiError, BODY_TIMEOUT};
use crate::inbox::{Delivered, MAX_FRAMES_PER_POST};
use crate::node::Node;
use crate::session::{self, Mode};

pub use conn::SseConn;

/// Open an SSE stream (after the server's admission checks): a 200
/// `text/event-stream` response whose events are the session's frames,
/// the session spawned on `tracker` (shutdown waits for it). `permit` is
/// the forwarded client's, behind a trusted proxy (else the HTTP
/// connection holds its own).
pub fn open_stream(
    node: Node,
    params: session::UrlParams,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
    permit: Option<Permit>,
) -> Response {
    if params.token.is_none() && node.authenticator().is_some() && node.config().auth_required {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "authentication required: send the token as ?token= or Authorization: Bearer",
        )
        .into_response();
    }
    let (tx, mut rx) = mpsc::channel::<Bytes>(1);
    let conn = SseConn::new(node.sse_inboxes().clone(), tx);
    tracker.spawn(async move {
        let Some(session) = session::open(node, conn, Mode::Protocol, params).await else {
            return;
        };
        let live = session.live(shutdown);
        match permit {
            Some(permit) => Counted::new(live, permit).await,
            None => live.await,
        }
    });
    let body = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|c| c.map(Ok::<_, std::convert::Infallible>))
    });
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            // nginx and the like: do not buffer the stream.
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// The body of `POST /sse/send`: the session id and its frames (`frames`,
/// or one `frame`).
#[derive(Deserialize)]
struct SendBody {
    session: String,
    #[serde(default)]
    frames: Option<Vec<Box<RawValue>>>,
    #[serde(default)]
    frame: Option<Box<RawValue>>,
}

/// The largest body `POST /sse/send` reads: a full batch of the largest
/// frames, and room for the envelope.
fn body_limit(node: &Node) -> usize {
    node.config().max_message_size * MAX_FRAMES_PER_POST + 1024
}

/// `POST /sse/send`: queue the frames for the session's stream, here or
/// on the instance that holds it. 202 `{"queued": n}`; 404 unknown or
/// expired session; 429 its inbox is full (nothing queued); 400 / 413 a
/// malformed or oversized body; 503 the bus is unreachable.
pub async fn send(node: Node, headers: &HeaderMap, body: Body) -> Response {
    match handle_send(&node, headers, body).await {
        Ok(n) => (StatusCode::ACCEPTED, axum::Json(json!({"queued": n}))).into_response(),
        Err(e) => {
            let full = e.status == StatusCode::TOO_MANY_REQUESTS;
            let mut resp = e.into_response();
            if full {
                resp.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(RETRY_AFTER.as_secs()),
                );
            }
            resp
        }
    }
}

async fn handle_send(node: &Node, headers: &HeaderMap, body: Body) -> Result<usize, ApiError> {
    let limit = body_limit(node);
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "at most {MAX_FRAMES_PER_POST} frames of at most max_message_size ({} bytes) each",
                node.config().max_message_size
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await;
    let bytes = match read {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the body did not arrive within {BODY_TIMEOUT:?}"),
            ));
        }
        Ok(Err(_)) => return Err(too_large()),
        Ok(Ok(b)) => b,
    };
    let body: SendBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("invalid body: {e}")))?;
    let mut frames = body.frames.unwrap_or_default();
    frames.extend(body.frame);
    if frames.is_empty() {
        return Err(ApiError::invalid(
            "no frames: send `frames: [...]` or `frame`",
        ));
    }
    if frames.len() > MAX_FRAMES_PER_POST
        || frames
            .iter()
            .any(|f| f.get().len() > node.config().max_message_size)
    {
        return Err(too_large());
    }
    let n = frames.len();
    match node.sse_send(&body.session, frames).await? {
        Delivered::Queued => Ok(n),
        Delivered::Unknown => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_session",
            "no SSE connection with this session id (expired or never opened): open a new stream",
        )),
        Delivered::Full => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "inbox_full",
            "the connection has not yet handled the frames posted before; retry shortly",
        )),
    }
}

/// `Retry-After` for a full inbox.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
