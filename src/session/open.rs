//! Set-up of a connection: authentication (URL token or first `auth`
//! frame), registration with the node, the welcome; refusal of those that
//! fail; and the clean-up once a session ends.

use std::ops::ControlFlow;
use std::sync::Arc;

use futures_util::{Sink, SinkExt, Stream, StreamExt};

use super::proxied::{self, Hello};
use super::{CLOSE_HANDSHAKE_TIMEOUT, Mode, Session, Subs};
use crate::auth::Identity;
use crate::error::{ClientError, ErrorCode, close};
use crate::limits::TokenBucket;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::protocol::{self, RequestKind, Text};
use crate::ws::{CloseFrame, Message, SendShared};

/// Send a close frame on a connection that never became a session.
async fn refuse<S>(ws: &mut S, code: u16, reason: &str)
where
    S: Sink<Message> + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: reason.chars().take(100).collect::<String>().into(),
    };
    let _ = tokio::time::timeout(
        CLOSE_HANDSHAKE_TIMEOUT,
        ws.send(Message::Close(Some(frame))),
    )
    .await;
}

/// What the upgrade request's query may carry.
#[derive(Debug, Default, serde::Deserialize)]
pub struct UrlParams {
    /// `?token=`: a JWT, instead of a first `auth` frame.
    pub token: Option<String>,
    /// `?name=`: the display name of a connection without a token
    /// (unverified; see `protocol::display_name`).
    pub name: Option<String>,
}

/// Who the connection is, before it is registered: the URL token, or,
/// when auth is required, a first `auth` frame within `auth_timeout`.
/// `Err` is the close code and reason to refuse the connection with.
async fn authenticate<S, E>(
    node: &Node,
    ws: &mut S,
    url_token: Option<String>,
) -> Result<Option<(Identity, Option<Text>)>, (u16, String)>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin,
    E: std::error::Error + 'static,
{
    let refused = |e: ClientError| {
        let code = match e.code {
            ErrorCode::TokenExpired => close::TOKEN_EXPIRED,
            _ => close::UNAUTHORIZED,
        };
        (code, format!("{}: {}", e.code, e.message))
    };
    let Some(auth) = node.authenticator() else {
        return Ok(None);
    };
    if let Some(token) = url_token {
        return auth
            .verify(&token)
            .map(|i| Some((i, None)))
            .map_err(refused);
    }
    if !node.config().auth_required {
        return Ok(None);
    }
    let first = tokio::time::timeout(node.config().auth_timeout, ws.next()).await;
    let Ok(Some(Ok(Message::Text(text)))) = first else {
        return Err((close::UNAUTHORIZED, "authentication required".into()));
    };
    match protocol::parse_request(&text) {
        Ok(protocol::Request {
            id,
            kind: RequestKind::Auth { token },
        }) => {
            let identity = auth.verify(&token).map_err(refused)?;
            let reply = protocol::authenticated(&identity.user_id, identity.expires_at, id);
            Ok(Some((identity, Some(reply))))
        }
        _ => Err((
            close::UNAUTHORIZED,
            "authentication required: send {\"type\":\"auth\",\"token\":…} first".into(),
        )),
    }
}

/// Authenticate, register and greet a new connection; `None` when it was
/// refused (and told why) or is already gone.
///
/// Set-up is split from [`Session::live`] because a connection's task
/// holds its future for as long as the connection lives, so that future's
/// size is idle memory per connection: the server runs `open` boxed and
/// then only `live`, whose state is little more than the [`Session`]
/// (see `ws::WebSocketUpgrade::on_upgrade`).
pub async fn open<S, E>(node: Node, ws: S, mode: Mode, params: UrlParams) -> Option<Session<S>>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    let hello = Hello {
        token: params.token,
        name: params.name,
        ..Hello::default()
    };
    open_with(node, ws, mode, hello).await
}

/// [`open`] with everything the upgrade request tells (for the connect
/// proxy: the client's address and the `proxy_headers`).
///
/// With a connect proxy, a connection without `?token=` is who the
/// backend says (no first `auth` frame is awaited); with
/// `proxy_connect_always`, so is one with a valid token. A token that
/// fails is refused (4001/4003) without asking the backend.
pub async fn open_with<S, E>(
    node: Node,
    mut ws: S,
    mode: Mode,
    mut hello: Hello,
) -> Option<Session<S>>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    let mut identity = None;
    let mut auth_reply = None;
    let mut admitted = None;
    let client = match mode {
        Mode::Protocol => {
            let connect_proxy = node.proxy().url(crate::proxy::Kind::Connect).is_some();
            let url_token = hello.token.take();
            let checked = match (connect_proxy, url_token) {
                (true, None) => Ok(None),
                (_, token) => authenticate(&node, &mut ws, token).await,
            };
            match checked {
                Ok(Some((id, reply))) => {
                    identity = Some(Box::new(id));
                    auth_reply = reply;
                }
                Ok(None) => {}
                Err((code, reason)) => {
                    Metrics::inc(&node.metrics().auth_failures);
                    tracing::info!(code, %reason, "connection refused");
                    refuse(&mut ws, code, &reason).await;
                    return None;
                }
            }
            let id = node.new_client_id();
            if connect_proxy && (identity.is_none() || node.config().proxy.connect_always) {
                match proxied::connect(&node, &id, identity.as_deref(), &hello, ws.transport())
                    .await
                {
                    Ok(a) => {
                        identity = a.identity;
                        admitted = Some((a.data, a.channels));
                    }
                    Err((code, reason)) => {
                        tracing::info!(code, %reason, "connection refused by the connect proxy");
                        refuse(&mut ws, code, &reason).await;
                        return None;
                    }
                }
            }
            match node
                .register_as(id, identity.as_deref(), hello.name.as_deref())
                .await
            {
                Ok(c) => c,
                Err(crate::error::Error::Client(e)) => {
                    refuse(&mut ws, close::TOO_MANY_USER_CONNECTIONS, &e.message).await;
                    return None;
                }
                Err(e) => {
                    // Every connection of a bus outage gets here, at once.
                    static REFUSALS: crate::log_limit::LogLimit =
                        crate::log_limit::LogLimit::new(std::time::Duration::from_secs(10));
                    match REFUSALS.allow() {
                        Some(suppressed) => {
                            tracing::warn!(error = %e, suppressed, "cannot register a new connection")
                        }
                        None => tracing::debug!(error = %e, "cannot register a new connection"),
                    }
                    refuse(&mut ws, close::INTERNAL, "bus unavailable").await;
                    return None;
                }
            }
        }
        Mode::Echo => node.hub().detached(),
    };
    let mut session = Session {
        identity,
        rate: TokenBucket::new(node.config().rate_burst, node.hub().clock_ms()),
        node,
        ws,
        client,
        mode,
        subs: Subs::default(),
        creates: crate::create_limit::CreateLimit::default(),
    };
    tracing::debug!(client = %session.client.id(), ?mode, "connected");
    let (data, channels) = admitted.unwrap_or_default();
    if mode == Mode::Protocol
        && (session.greet(auth_reply, data.as_deref()).await.is_break()
            || (!channels.is_empty() && session.subscribe_for_backend(channels).await.is_break()))
    {
        session.finish().await;
        return None;
    }
    Some(session)
}

impl<S, E> Session<S>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + SendShared + Unpin + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    /// Unregister the connection once it has ended. The socket is closed
    /// first: the cleanup may wait on the bus (up to its round trip when
    /// the bus is cut off), and a client that was sent a close must not
    /// wait for it to reconnect elsewhere.
    pub(super) async fn finish(self) {
        let Session {
            node,
            ws,
            client,
            mode,
            subs,
            ..
        } = self;
        drop(ws);
        let channels: Vec<Arc<str>> = subs.into_keys().collect();
        if mode == Mode::Protocol {
            node.unregister(&client, channels).await;
        }
        tracing::debug!(client = %client.id(), "disconnected");
    }

    /// The welcome (and the `authenticated` reply to a first-frame auth).
    async fn greet(
        &mut self,
        auth_reply: Option<Text>,
        data: Option<&serde_json::value::RawValue>,
    ) -> ControlFlow<()> {
        let session = self.ws.open_session(self.client.id());
        let welcome = protocol::connected_with(
            self.client.id(),
            self.node.instance_id(),
            session.as_deref(),
            data,
        );
        self.send(welcome).await?;
        if let Some(reply) = auth_reply {
            self.send(reply).await?;
        }
        self.flush().await
    }
}
