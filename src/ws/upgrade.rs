//! The opening handshake (RFC 6455 §4.2) as an axum extractor.
//!
//! [`WebSocketUpgrade`] checks the request (GET, HTTP/1.1, `Upgrade:
//! websocket`, `Connection: upgrade`, one `Host`, one 16-byte base64 key,
//! one version, 13),
//! and [`WebSocketUpgrade::on_upgrade`] answers `101 Switching Protocols`,
//! negotiates permessage-deflate, and once hyper hands the connection over
//! runs the callback with a [`WebSocket`] on the plain `TcpStream`.
//!
//! The server must serve HTTP/1 connections as `TokioIo<HttpIo>`
//! (`server::run` does): that is what lets the upgraded connection be
//! taken back as a `TcpStream` instead of a boxed, buffered stream, with
//! the 101 response still to send ahead of the first frame
//! ([`HttpIo`](super::HttpIo)).

use std::future::Future;

use super::deflate::{self, Deflate, DeflateConfig};
use super::{HttpIo, WebSocket};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures_util::FutureExt;
use futures_util::future::OptionFuture;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};

/// RFC 6455 §1.3.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A checked WebSocket upgrade request.
pub struct WebSocketUpgrade {
    /// `Sec-WebSocket-Accept` for the response.
    accept: HeaderValue,
    /// The request's `Sec-WebSocket-Extensions` values (usually none).
    extensions: Vec<HeaderValue>,
    /// Resolves to the connection once the 101 response has been written.
    on_upgrade: hyper::upgrade::OnUpgrade,
}

/// Why a request is not a valid upgrade.
#[derive(Debug)]
pub enum UpgradeRejection {
    /// Not an upgrade request at all (a plain GET).
    NotUpgrade,
    /// An upgrade request with something wrong; the text says what.
    Invalid(&'static str),
    /// A WebSocket version other than 13 (answered 426 with the version
    /// we speak, RFC 6455 §4.4).
    Version,
}

impl UpgradeRejection {
    /// What was wrong, for the log.
    pub fn reason(&self) -> &'static str {
        match self {
            UpgradeRejection::NotUpgrade => "not an upgrade request",
            UpgradeRejection::Invalid(why) => why,
            UpgradeRejection::Version => "unsupported WebSocket version",
        }
    }
}

impl IntoResponse for UpgradeRejection {
    fn into_response(self) -> Response {
        match self {
            UpgradeRejection::NotUpgrade => {
                (StatusCode::BAD_REQUEST, "expected a WebSocket upgrade").into_response()
            }
            UpgradeRejection::Invalid(why) => (StatusCode::BAD_REQUEST, why).into_response(),
            UpgradeRejection::Version => (
                StatusCode::UPGRADE_REQUIRED,
                [(header::SEC_WEBSOCKET_VERSION, "13")],
                "unsupported WebSocket version; this server speaks 13",
            )
                .into_response(),
        }
    }
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// `Sec-WebSocket-Accept` for a key.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketUpgrade {
    type Rejection = UpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let headers = &parts.headers;
        if !has_token(headers, header::UPGRADE, "websocket") {
            return Err(UpgradeRejection::NotUpgrade);
        }
        if parts.method != Method::GET {
            return Err(UpgradeRejection::Invalid(
                "a WebSocket upgrade must be a GET",
            ));
        }
        if parts.version < Version::HTTP_11 {
            return Err(UpgradeRejection::Invalid(
                "a WebSocket upgrade needs HTTP/1.1",
            ));
        }
        if !has_token(headers, header::CONNECTION, "upgrade") {
            return Err(UpgradeRejection::Invalid("missing `Connection: upgrade`"));
        }
        // RFC 9112 §3.2: exactly one Host; RFC 6455 §4.1: one key, one
        // version (two keys would leave the accept key ambiguous).
        if headers.get_all(header::HOST).iter().count() != 1 {
            return Err(UpgradeRejection::Invalid(
                "an HTTP/1.1 request needs exactly one Host header",
            ));
        }
        if headers.get_all(header::SEC_WEBSOCKET_KEY).iter().count() > 1 {
            return Err(UpgradeRejection::Invalid("duplicate Sec-WebSocket-Key"));
        }
        if headers
            .get_all(header::SEC_WEBSOCKET_VERSION)
            .iter()
            .count()
            > 1
        {
            return Err(UpgradeRejection::Invalid("duplicate Sec-WebSocket-Version"));
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
            != Some(b"13")
        {
            return Err(UpgradeRejection::Version);
        }
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(UpgradeRejection::Invalid("missing Sec-WebSocket-Key"))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(key.as_bytes().trim_ascii())
            .map_err(|_| UpgradeRejection::Invalid("Sec-WebSocket-Key is not base64"))?;
        if decoded.len() != 16 {
            return Err(UpgradeRejection::Invalid(
                "Sec-WebSocket-Key must be 16 bytes",
            ));
        }
        let accept = HeaderValue::try_from(accept_key(key.as_bytes().trim_ascii()))
            .expect("base64 is a valid header value");
        let extensions = headers
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .cloned()
            .collect();
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(UpgradeRejection::Invalid(
                "this connection cannot be upgraded",
            ))?;
        Ok(WebSocketUpgrade {
            accept,
            extensions,
            on_upgrade,
        })
    }
}

impl WebSocketUpgrade {
    /// Answer 101 and, once the connection is handed over, serve it in a
    /// task of its own: `setup` gets the [`WebSocket`] and returns the
    /// future that serves it for the rest of its life (or `None`).
    /// `compression` is `None` when the server does not compress;
    /// otherwise a client's deflate offer is accepted when acceptable.
    ///
    /// The task runs `setup` boxed and then the long-lived future in its
    /// place (`flatten`), so the task keeps only what serving needs: an
    /// idle connection's task is not as large as its set-up was.
    pub fn on_upgrade<F, Setup, Live>(
        self,
        max_message: usize,
        compression: Option<DeflateConfig>,
        setup: F,
    ) -> Response
    where
        F: FnOnce(WebSocket) -> Setup + Send + 'static,
        Setup: Future<Output = Option<Live>> + Send + 'static,
        Live: Future<Output = ()> + Send + 'static,
    {
        let agreed = compression.and_then(|cfg| {
            let offers = self.extensions.iter().filter_map(|v| v.to_str().ok());
            deflate::negotiate(offers, &cfg).map(|a| (a, cfg))
        });
        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "upgrade")
            .header(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        if let Some((a, _)) = &agreed {
            response = response.header(header::SEC_WEBSOCKET_EXTENSIONS, a.response_header());
        }
        let on_upgrade = self.on_upgrade;
        let start = Box::pin(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return None;
                }
            };
            let Ok(parts) = upgraded.downcast::<TokioIo<HttpIo>>() else {
                tracing::error!("upgraded connection is not an HttpIo; dropping it");
                return None;
            };
            let deflate = agreed.map(|(a, cfg)| Deflate::new(a, &cfg));
            // The 101 response is still owed: it goes out with the first frame.
            let (tcp, owed) = parts.io.into_inner().into_parts();
            let ws = WebSocket::new(tcp, parts.read_buf, owed, max_message, deflate);
            setup(ws).await
        });
        let task = start.map(OptionFuture::from).flatten();
        tokio::spawn(task);
        response
            .body(axum::body::Body::empty())
            .expect("a valid response")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn accept_key_of_the_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            super::accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
