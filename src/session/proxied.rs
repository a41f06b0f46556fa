//! The session's side of the backend proxies ([`crate::proxy`]): who a
//! connection is (connect), whether a subscription or a publication may
//! go ahead (subscribe, publish, which may replace the data), the client's
//! `rpc` calls, and the refresh of expired credentials. Each hook in
//! `open`, `handlers` and `write` is one call into this file.
//!
//! A call waits in the session that makes it, for at most
//! `proxy_timeout`: that client's later frames wait behind it (requests
//! are handled in order), every other connection carries on.

use std::ops::ControlFlow;
use std::sync::Arc;

use futures_util::{Sink, Stream};
use serde_json::value::RawValue;

use super::Session;
use crate::auth::{Grants, Identity};
use crate::error::{ClientError, ErrorCode, close};
use crate::node::Node;
use crate::protocol::{self, Text};
use crate::proxy::{Answer, ConnectResult, DataResult, Empty, Kind, Request};
use crate::queue::CloseReason;
use crate::ws::{Message, SendShared};

/// What the upgrade request tells a new connection beyond its socket.
#[derive(Debug, Default)]
pub struct Hello {
    /// The `?token=` of the upgrade URL.
    pub token: Option<String>,
    /// The `?name=` of the upgrade URL: the display name of a connection
    /// without a token (unverified; see `protocol::display_name`).
    pub name: Option<String>,
    /// The client's address (after `trusted_proxies`), for the connect
    /// proxy's `remoteAddr`.
    pub remote_addr: Option<String>,
    /// The upgrade request's headers named in `proxy_headers` (lower-case
    /// names), for the connect proxy; empty without a connect proxy.
    pub headers: serde_json::Map<String, serde_json::Value>,
}

impl Hello {
    /// The `proxy_headers` of an upgrade request (several values of one
    /// header joined with `, `).
    pub fn forwarded_headers(
        node: &Node,
        headers: &axum::http::HeaderMap,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        if node.proxy().url(Kind::Connect).is_none() {
            return out;
        }
        for name in &node.config().proxy.headers {
            let values: Vec<&str> = headers
                .get_all(name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if !values.is_empty() {
                out.insert(name.clone(), values.join(", ").into());
            }
        }
        out
    }
}

/// A connection the connect proxy admitted.
pub(super) struct Admitted {
    /// `None`: the backend admitted it anonymously (`userId: ""`).
    pub identity: Option<Box<Identity>>,
    /// For the welcome.
    pub data: Option<Box<RawValue>>,
    /// Subscribed by the server right after the welcome.
    pub channels: Vec<String>,
}

/// A refusal the session acts on: an `error` frame with the backend's own
/// code, or a close.
pub(super) enum Denial {
    Error(Text),
    Close(CloseReason),
}

/// The connect proxy's answer for a new connection (`client_id`, not yet
/// registered, of `identity` when it presented a valid token). `Err` is
/// the close code and reason to refuse it with: 4003 and the backend's
/// message, the backend's own disconnect, or 1011 `backend unavailable`.
pub(super) async fn connect(
    node: &Node,
    client_id: &str,
    identity: Option<&Identity>,
    hello: &Hello,
    transport: &'static str,
) -> Result<Admitted, (u16, String)> {
    let mut body = Request::new(
        Kind::Connect,
        client_id,
        node.instance_id(),
        transport,
        identity.map(|i| &*i.user_id),
    );
    body.remote_addr = hello.remote_addr.as_deref();
    body.headers = Some(&hello.headers);
    match node.proxy_call::<ConnectResult>(Kind::Connect, &body).await {
        Ok(Answer::Result(r)) => Ok(Admitted {
            identity: identity_of(r.user_id, r.grants.map(Grants::from), r.expires_at),
            data: r.data,
            channels: r.channels,
        }),
        Ok(Answer::Refused(r)) => Err((close::TOKEN_EXPIRED, r.message)),
        Ok(Answer::Disconnect(c)) => Err((c.code.unwrap_or(close::TOKEN_EXPIRED), c.reason.into())),
        Err(_) => Err((close::INTERNAL, "backend unavailable".into())),
    }
}

/// The identity a connect or refresh result makes; `None` for `""`.
fn identity_of(
    user_id: String,
    grants: Option<Grants>,
    expires_at: Option<u64>,
) -> Option<Box<Identity>> {
    (!user_id.is_empty()).then(|| {
        Box::new(Identity {
            user_id: user_id.into(),
            // The connect proxy's answer names no display name (yet).
            name: None,
            expires_at,
            grants: grants.unwrap_or_default(),
        })
    })
}

/// Ask the subscribe proxy about `channel`: `None` to go ahead.
pub(super) async fn subscribe(
    node: &Node,
    mut body: Request<'_>,
    channel: &str,
    id: Option<&RawValue>,
) -> crate::Result<Option<Denial>> {
    body.channel = Some(channel);
    match node.proxy_call::<Empty>(Kind::Subscribe, &body).await? {
        Answer::Result(_) => Ok(None),
        other => Ok(Some(denial(other, id))),
    }
}

/// Ask the publish proxy about `data` for `channel`: the data to publish
/// (the backend's replacement, or the client's), or a denial. Nothing is
/// published without this `Ok`.
pub(super) async fn publish(
    node: &Node,
    mut body: Request<'_>,
    channel: &str,
    data: Arc<RawValue>,
    id: Option<&RawValue>,
) -> crate::Result<Result<Arc<RawValue>, Denial>> {
    body.channel = Some(channel);
    body.data = Some(&data);
    match node.proxy_call::<DataResult>(Kind::Publish, &body).await? {
        Answer::Result(DataResult { data: Some(new) }) => Ok(Ok(Arc::from(new))),
        Answer::Result(DataResult { data: None }) => Ok(Ok(data.clone())),
        other => Ok(Err(denial(other, id))),
    }
}

/// A refusal or disconnect answer as what the session does.
fn denial<T>(answer: Answer<T>, id: Option<&RawValue>) -> Denial {
    match answer {
        Answer::Refused(r) => Denial::Error(protocol::error_with_code(&r.code, &r.message, id)),
        Answer::Disconnect(c) => Denial::Close(c),
        Answer::Result(_) => unreachable!("a result is not a denial"),
    }
}

impl<S, E> Session<S>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    /// The body of a `kind` call for this connection.
    pub(super) fn proxy_request(&self, kind: Kind) -> Request<'_> {
        Request::new(
            kind,
            self.client.id(),
            self.node.instance_id(),
            self.ws.transport(),
            self.identity.as_deref().map(|i| &*i.user_id),
        )
    }

    /// Act on a denial: the error frame (the connection stays), or close.
    pub(super) async fn deny(&mut self, denial: Denial) -> ControlFlow<()> {
        match denial {
            Denial::Error(frame) => {
                crate::metrics::Metrics::inc(&self.node.metrics().errors_sent);
                self.send(frame).await
            }
            Denial::Close(reason) => {
                self.send_close(&reason).await;
                ControlFlow::Break(())
            }
        }
    }

    /// `{"type":"rpc","method","data","id"}`: the backend's answer as
    /// `{"type":"rpc","ref","data"}`, or an `error` with the `ref`.
    pub(super) async fn rpc(
        &mut self,
        id: Option<&RawValue>,
        method: &str,
        data: &RawValue,
    ) -> crate::Result<ControlFlow<()>> {
        let Some(reference) = id else {
            return Err(ClientError::new(ErrorCode::InvalidFrame, "an rpc needs an `id`").into());
        };
        if self.node.proxy().url(Kind::Rpc).is_none() {
            return Err(ClientError::new(
                ErrorCode::RpcNotAvailable,
                "this server has no rpc proxy (proxy_rpc_url)",
            )
            .into());
        }
        let mut body = self.proxy_request(Kind::Rpc);
        body.method = Some(method);
        body.data = Some(data);
        let answer = self.node.proxy_call::<DataResult>(Kind::Rpc, &body).await?;
        Ok(match answer {
            Answer::Result(r) => {
                let data = r.data.as_deref().unwrap_or(RawValue::NULL);
                self.send(protocol::rpc(reference, data)).await
            }
            other => self.deny(denial(other, id)).await,
        })
    }

    /// The connection's credentials expired and a refresh proxy is
    /// configured: extended (a new `expiresAt`, or none), they stay;
    /// otherwise the connection is closed 4003 (or with the backend's
    /// disconnect). A refresh must keep the user.
    pub(super) async fn refresh_by_proxy(&mut self) -> ControlFlow<()> {
        let body = self.proxy_request(Kind::Refresh);
        let answer = self
            .node
            .proxy_call::<ConnectResult>(Kind::Refresh, &body)
            .await;
        let expired = |why: String| CloseReason::new(close::TOKEN_EXPIRED, why);
        let reason = match answer {
            Ok(Answer::Result(r)) => {
                let now = protocol::now_ms() / 1000;
                let same_user = self.identity.as_deref().map(|i| &*i.user_id) == Some(&r.user_id);
                match (same_user, r.expires_at) {
                    (false, _) => expired("token expired: refresh changed the user".into()),
                    (true, Some(at)) if at <= now => expired("token expired".into()),
                    (true, expires_at) => {
                        let mut fresh = self.identity.as_deref().cloned().expect("same user");
                        fresh.expires_at = expires_at;
                        if let Some(g) = r.grants {
                            fresh.grants = g.into();
                        }
                        return self.adopt(fresh).await;
                    }
                }
            }
            Ok(Answer::Refused(r)) => expired(r.message),
            Ok(Answer::Disconnect(c)) => c,
            Err(_) => expired("token expired: refresh unavailable".into()),
        };
        self.send_close(&reason).await;
        ControlFlow::Break(())
    }

    /// Subscribe the client to the connect proxy's channels (no grant
    /// check, no subscribe proxy: the backend chose them). One that fails
    /// is told as an `error` frame without `ref`.
    pub(super) async fn subscribe_for_backend(&mut self, channels: Vec<String>) -> ControlFlow<()> {
        for channel in channels {
            let flow = match self.subscribe_as(None, channel, None, true).await {
                Ok(flow) => flow,
                Err(e) => {
                    crate::metrics::Metrics::inc(&self.node.metrics().errors_sent);
                    self.send(protocol::error(&e.to_client(), None)).await
                }
            };
            flow?;
        }
        self.flush().await
    }
}
