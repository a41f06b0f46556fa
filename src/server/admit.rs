//! Admission of a new connection, WebSocket or SSE: the checks it must
//! pass (draining, origin, connection caps, per-address and instance
//! buckets), the refusals (logged at most every few seconds), and where
//! its token comes from.

use std::net::IpAddr;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::admission::{self, ConnInfo, Permit, Refusal};
use crate::metrics::Metrics;
use crate::sync::MutexExt;

/// Whether a browser `Origin` may connect: any when the allow-list is
/// empty; non-browser clients (no `Origin`) always.
pub(super) fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    allowed.is_empty()
        || origin.to_str().is_ok_and(|o| {
            allowed
                .iter()
                .any(|a| a.eq_ignore_ascii_case(o.trim_end_matches('/')))
        })
}

/// A refused handshake: logged (at most once per few seconds), answered
/// `status` with `why`, and `Retry-After` when given.
pub(super) fn refuse(
    state: &AppState,
    client: IpAddr,
    status: StatusCode,
    why: &'static str,
    retry_after: Option<u64>,
) -> Response {
    state.refusals.refused(status.as_u16(), why, client);
    let mut resp = (status, why).into_response();
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// Admit (or refuse) a new connection, WebSocket or SSE: the same checks
/// on every path, cheapest and most specific first: draining, origin, the
/// instance's connection count, the client address's connection count
/// (counted at accept, or here behind a trusted proxy), its handshake
/// bucket (429), the instance's (503). `Ok` holds the forwarded client's
/// permit when the connection was not counted at accept.
pub(super) fn admit(
    state: &AppState,
    client: IpAddr,
    conn: Option<&ConnInfo>,
    headers: &HeaderMap,
) -> std::result::Result<Option<Permit>, Box<Response>> {
    let cfg = state.node.config();
    if state.shutdown.is_cancelled() {
        return Err(Box::new(refuse(
            state,
            client,
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            None,
        )));
    }
    if !origin_allowed(&cfg.allowed_origins, headers) {
        Metrics::inc(&state.node.metrics().origin_refused);
        return Err(Box::new(refuse(
            state,
            client,
            StatusCode::FORBIDDEN,
            "origin not allowed",
            None,
        )));
    }
    if state.node.hub().len() >= cfg.max_connections {
        Metrics::inc(&state.node.metrics().connections_refused);
        let why = "too many connections";
        return Err(Box::new(refuse(
            state,
            client,
            StatusCode::SERVICE_UNAVAILABLE,
            why,
            None,
        )));
    }
    // The connection's own permit (taken at accept), or one for the
    // forwarded client behind a trusted proxy.
    let fresh = match conn.is_some_and(|c| c.has_permit()) {
        true => None,
        false => match state.addrs.acquire(client) {
            Ok(p) => Some(p),
            Err(_) => {
                let why = "too many connections from this address";
                return Err(Box::new(refuse(
                    state,
                    client,
                    StatusCode::TOO_MANY_REQUESTS,
                    why,
                    Some(1),
                )));
            }
        },
    };
    if let Err(Refusal::Throttled(wait)) = state.addrs.admit(client) {
        let why = "too many new connections from this address; retry later";
        let retry = Some(admission::retry_secs(wait));
        return Err(Box::new(refuse(
            state,
            client,
            StatusCode::TOO_MANY_REQUESTS,
            why,
            retry,
        )));
    }
    if cfg.handshake_rate > 0.0 {
        let mut bucket = state.admission.lock_unpoisoned();
        let now = state.node.hub().clock_ms();
        if !bucket.take(now, cfg.handshake_rate, cfg.handshake_burst) {
            let wait = bucket.wait(cfg.handshake_rate);
            drop(bucket);
            Metrics::inc(&state.node.metrics().handshakes_throttled);
            let why = "too many new connections; retry later";
            let retry = Some(admission::retry_secs(wait));
            return Err(Box::new(refuse(
                state,
                client,
                StatusCode::SERVICE_UNAVAILABLE,
                why,
                retry,
            )));
        }
    }
    Ok(fresh)
}

/// The token of an `Authorization: Bearer` header.
pub(super) fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}
