//! The HTTP server: WebSocket upgrades and the HTTP endpoints on one port,
//! and the shutdown sequence.
//!
//! [`run`] serves until the `shutdown` future completes, then:
//! 1. marks the node draining (`/readyz` answers 503 on connections
//!    already open),
//! 2. stops accepting connections (new ones, probes included, are refused),
//! 3. asks every connection to reconnect elsewhere: close 1012 with a
//!    `retry=MS` hint, spread evenly (in random order) over `drain_spread`,
//!    frames already queued written first ([`drain_clients`]),
//! 4. waits for every connection task, at most `drain_timeout`,
//! 5. closes the bus and returns.
//!
//! `admit`: the checks every new connection passes, WebSocket or SSE.

use std::future::Future;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use std::sync::{Arc, Mutex};

mod admit;

use crate::admission::{Acceptor, AddrTable, ConnInfo, Counted, RefusalLog};
use crate::error::Result;
use crate::figures::Sources;
use crate::limits::TokenBucket;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::session::{self, Mode, UrlParams};
use crate::ws::WebSocketUpgrade;
use crate::ws::upgrade::UpgradeRejection;
use admit::{admit, bearer, origin_allowed, refuse};

/// What every request handler needs.
#[derive(Clone)]
struct AppState {
    /// The node: hub, bus, configuration.
    node: Node,
    /// Cancelled when shutdown begins; each connection task watches it.
    shutdown: CancellationToken,
    /// Tracks every connection task so shutdown can wait for them.
    tracker: TaskTracker,
    /// Handshake admission (reconnect-storm control); a std mutex, held
    /// for a few instructions per upgrade.
    admission: Arc<Mutex<TokenBucket>>,
    /// Per-address connection counts and handshake buckets.
    addrs: AddrTable,
    /// Refused connections and handshakes, logged at most every few
    /// seconds.
    refusals: Arc<RefusalLog>,
}

/// Build the router (exposed for tests that drive it without a socket).
fn router(state: AppState) -> Router {
    let mut app = Router::new()
        .route("/", get(root))
        .route("/ws", get(ws_only))
        .route("/sse", get(sse_stream))
        .route("/sse/send", post(sse_send))
        .route("/_ah/health", get(|| async { "OK" }))
        // Browsers ask for it on every page; no 404 in their consoles.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/livez", get(|| async { "OK" }))
        .route("/readyz", get(readyz))
        .route("/healthz", get(healthz))
        .merge(metrics_routes(&state))
        .merge(crate::api::routes(state.node.clone()));
    if let Some(path) = state.node.config().echo_path.clone() {
        app = app.route(&path, get(echo));
    }
    if state.node.config().demo {
        app = crate::assets::routes(app);
    }
    app.with_state(state)
}

/// `/metrics` and `/metrics/prometheus`; behind the API key with
/// `metrics_require_key`.
fn metrics_routes(state: &AppState) -> Router<AppState> {
    let routes = Router::new()
        .route("/metrics", get(metrics))
        .route("/metrics/prometheus", get(prometheus));
    if !state.node.config().metrics_require_key {
        return routes;
    }
    let node = state.node.clone();
    routes.route_layer(middleware::from_fn_with_state(
        node,
        crate::api::require_key,
    ))
}

/// Admit (or refuse, see [`admit`]) an upgrade on `/`, `/ws` or the echo
/// path, and start its session.
fn upgrade(
    state: AppState,
    ws: std::result::Result<WebSocketUpgrade, UpgradeRejection>,
    conn: Option<Arc<ConnInfo>>,
    headers: &HeaderMap,
    query: UrlParams,
    mode: Mode,
) -> Response {
    let cfg = state.node.config();
    let client = ConnInfo::client(conn.as_deref(), &cfg.trusted_proxies, headers);
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            let why = e.reason();
            let resp = e.into_response();
            state.refusals.refused(resp.status().as_u16(), why, client);
            return resp;
        }
    };
    let fresh = match admit(&state, client, conn.as_deref(), headers) {
        Ok(fresh) => fresh,
        Err(resp) => return *resp,
    };
    let Some(permit) = fresh.or_else(|| conn.and_then(|c| c.take_permit())) else {
        let why = "connection already upgraded";
        return refuse(&state, client, StatusCode::BAD_REQUEST, why, None);
    };
    let limit = match mode {
        Mode::Protocol => cfg.max_message_size,
        Mode::Echo => cfg.echo_max_message_size,
    };
    let hello = session::Hello {
        token: query.token,
        name: query.name,
        remote_addr: Some(client.to_string()),
        headers: session::Hello::forwarded_headers(&state.node, headers),
    };
    ws.on_upgrade(limit, cfg.compression, move |socket| {
        let AppState {
            node,
            shutdown,
            tracker,
            ..
        } = state;
        // Shutdown waits for set-up (the tracker), then for the session
        // (its permit: see `admission`).
        let setting_up = tracker.token();
        async move {
            let session = session::open_with(node, socket, mode, hello).await?;
            drop(setting_up);
            Some(Counted::new(session.live(shutdown), permit))
        }
    })
}

/// The connection's [`ConnInfo`] (absent when the router is driven
/// without `serve_http`).
type Conn = Option<Extension<Arc<ConnInfo>>>;

/// `/`: the tutorial's client upgrades here; plain GETs get the status.
async fn root(
    State(state): State<AppState>,
    conn: Conn,
    headers: HeaderMap,
    Query(query): Query<UrlParams>,
    ws: std::result::Result<WebSocketUpgrade, UpgradeRejection>,
) -> Response {
    if let Err(UpgradeRejection::NotUpgrade) = ws {
        return Json(json!({
            "status": "running",
            "connectedClients": state.node.hub().len(),
        }))
        .into_response();
    }
    let conn = conn.map(|Extension(c)| c);
    upgrade(state, ws, conn, &headers, query, Mode::Protocol)
}

async fn ws_only(
    State(state): State<AppState>,
    conn: Conn,
    headers: HeaderMap,
    Query(query): Query<UrlParams>,
    ws: std::result::Result<WebSocketUpgrade, UpgradeRejection>,
) -> Response {
    let conn = conn.map(|Extension(c)| c);
    upgrade(state, ws, conn, &headers, query, Mode::Protocol)
}

async fn echo(
    State(state): State<AppState>,
    conn: Conn,
    headers: HeaderMap,
    ws: std::result::Result<WebSocketUpgrade, UpgradeRejection>,
) -> Response {
    let conn = conn.map(|Extension(c)| c);
    upgrade(state, ws, conn, &headers, UrlParams::default(), Mode::Echo)
}

/// `GET /sse`: an event stream for clients whose WebSocket upgrade is
/// broken, admitted like an upgrade ([`admit`]); the token as `?token=`
/// or `Authorization: Bearer`.
async fn sse_stream(
    State(state): State<AppState>,
    conn: Conn,
    headers: HeaderMap,
    Query(query): Query<UrlParams>,
) -> Response {
    let conn = conn.map(|Extension(c)| c);
    let client = ConnInfo::client(
        conn.as_deref(),
        &state.node.config().trusted_proxies,
        &headers,
    );
    let fresh = match admit(&state, client, conn.as_deref(), &headers) {
        Ok(fresh) => fresh,
        Err(resp) => return *resp,
    };
    let params = UrlParams {
        token: query.token.or_else(|| bearer(&headers)),
        name: query.name,
    };
    let AppState {
        node,
        shutdown,
        tracker,
        ..
    } = state;
    crate::sse::open_stream(node, params, shutdown, &tracker, fresh)
}

/// `POST /sse/send`: frames for an SSE connection (on any instance); a
/// browser's `Origin` is checked as for the stream.
async fn sse_send(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    if !origin_allowed(&state.node.config().allowed_origins, &headers) {
        Metrics::inc(&state.node.metrics().origin_refused);
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    crate::sse::send(state.node, &headers, body).await
}

/// Readiness of this instance alone: 503 while draining (and, only with
/// `ready_requires_bus`, while the bus is unreachable). The bus's state is
/// in `/healthz`, `/metrics` (`busUp`) and Prometheus.
async fn readyz(State(state): State<AppState>) -> Response {
    if state.node.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if !state.node.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "bus unavailable").into_response()
    } else if !state.node.bus_up() {
        "ready (bus unavailable)".into_response()
    } else {
        "ready".into_response()
    }
}

/// The health detail: readiness, drain and the bus, as JSON; always 200
/// (it is a report, not a probe).
async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    let node = &state.node;
    let bus = match &node.config().bus {
        crate::config::BusConfig::Memory => "memory",
        crate::config::BusConfig::Redis { .. } => "redis",
        crate::config::BusConfig::Nats { .. } => "nats",
        crate::config::BusConfig::PubSub { .. } => "pubsub",
    };
    Json(serde_json::json!({
        "instanceId": node.instance_id(),
        "ready": node.is_ready(),
        "draining": node.is_draining(),
        "bus": {"kind": bus, "up": node.bus_up()},
    }))
}

/// Prometheus text exposition of the same counters.
async fn prometheus(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::prometheus::render(&Sources::new(&state.node, Some(&state.addrs))),
    )
        .into_response()
}

/// The tutorial's `/metrics`, extended with Switchboard's counters (every
/// figure of [`crate::figures::COUNTERS`] with a JSON key).
async fn metrics(State(state): State<AppState>) -> Json<serde_json::Value> {
    let sources = Sources::new(&state.node, Some(&state.addrs));
    Json(crate::figures::json::render(&sources))
}

/// Pending connections the kernel may queue before `accept` (capped by
/// `net.core.somaxconn`). `TcpListener::bind` asks for 128, which a
/// reconnect storm overflows: the dropped SYNs are retried by clients only
/// after a second.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Bind the listening socket for [`run`], with [`LISTEN_BACKLOG`] and
/// `SO_REUSEADDR` (as `TcpListener::bind` sets it: a restarted instance can
/// bind again while its old connections sit in TIME_WAIT).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serve on `listener` until `shutdown` completes, then drain (see the
/// module docs). Returns once every connection task has ended or the drain
/// timeout has passed.
pub async fn run(
    listener: TcpListener,
    node: Node,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(crate::keepalive::run(node.clone(), token.clone()));
    // `sys:metrics` is public: not with `metrics_require_key`.
    if node.config().demo && !node.config().metrics_require_key {
        tracker.spawn(crate::assets::publish_metrics(node.clone(), token.clone()));
    }
    let addrs = AddrTable::new(node.config());
    let refusals = Arc::new(RefusalLog::new());
    let state = AppState {
        addrs: addrs.clone(),
        refusals: refusals.clone(),
        admission: Arc::new(Mutex::new(TokenBucket::new(
            node.config().handshake_burst,
            node.hub().clock_ms(),
        ))),
        node: node.clone(),
        shutdown: token.clone(),
        tracker: tracker.clone(),
    };
    let app = router(state);
    tracing::info!(
        addr = %listener.local_addr()?,
        instance = node.instance_id(),
        "switchboard listening"
    );
    let signal = {
        let node = node.clone();
        let token = token.clone();
        let tracker = tracker.clone();
        async move {
            shutdown.await;
            tracing::info!("shutdown: draining");
            node.start_draining();
            token.cancel();
            tracker.spawn(drain_clients(node));
        }
    };
    let accept = Acceptor::new(node.config(), addrs.clone(), refusals, HEADER_READ_TIMEOUT);
    serve_http(listener, app, accept, signal).await;
    tracker.close();
    let drain = node.config().drain_timeout;
    let ended = async {
        tracker.wait().await;
        // Sessions hold a permit rather than a tracker token.
        addrs.released().await;
    };
    if tokio::time::timeout(drain, ended).await.is_err() {
        tracing::warn!(
            remaining = node.hub().len(),
            "drain timeout reached; dropping the remaining connections"
        );
    }
    if let Err(e) = node.close().await {
        tracing::warn!(error = %e, "closing the bus failed");
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// Longest a client may take to send its request headers (slow-loris
/// protection).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long HTTP requests in flight at shutdown may take to finish.
const HTTP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Accept connections and serve HTTP/1.1 on each until `signal`
/// completes; then stop accepting, let requests in flight finish (at most
/// [`HTTP_GRACE`]) and return. Upgraded connections are not waited for
/// here: their sessions are tracked by the caller.
///
/// Our own loop rather than `axum::serve`: HTTP/1 only, with each
/// connection served as `TokioIo<HttpIo>` (the `TcpStream`, holding back
/// a 101 response to send with the first frame), so that an upgraded
/// connection can be taken back as the plain `TcpStream` (see
/// [`crate::ws::upgrade`]); and no HTTP/2 preface sniffing on the
/// handshake path.
///
/// Each connection is counted against its peer's address from the
/// accept (unless the peer is a trusted proxy): over
/// `max_connections_per_ip` it is closed at once, unanswered, since an
/// answer would mean reading the request that the limit is there to
/// spare. Its [`ConnInfo`] rides in every request's extensions. With
/// `proxy_protocol`, a trusted peer's connection is counted against the
/// client its PROXY header names, once read (in the connection's task).
async fn serve_http(
    listener: TcpListener,
    app: Router,
    accept: Arc<Acceptor>,
    signal: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let http = Arc::new(http);
    let stop = CancellationToken::new();
    let conns = TaskTracker::new();
    let mut signal = std::pin::pin!(signal);
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off
                    // instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Counted at once, or (PROXY protocol) once its header names the client.
        let early = match accept.proxied(peer.ip()) {
            true => None,
            false => match accept.accept(peer.ip()) {
                Some(info) => Some(info),
                None => continue, // dropping `tcp` closes it
            },
        };
        // Frames are small and latency matters: no Nagle delay.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let (app, accept) = (app.clone(), accept.clone());
        let http = http.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let mut tcp = tcp;
            let info = match early {
                Some(info) => info,
                None => match accept.accept_proxied(&mut tcp, peer.ip()).await {
                    Some(info) => info,
                    None => return,
                },
            };
            let service = TowerToHyperService::new(app.map_request(
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(info.clone());
                    req
                },
            ));
            let conn = http
                .serve_connection(TokioIo::new(crate::ws::HttpIo::new(tcp)), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection error");
            }
        });
    }
    drop(listener);
    stop.cancel();
    conns.close();
    if tokio::time::timeout(HTTP_GRACE, conns.wait())
        .await
        .is_err()
    {
        tracing::debug!("HTTP requests still in flight at shutdown; dropping them");
    }
}

/// Ask every client to reconnect elsewhere, spread over `drain_spread` so
/// that a draining instance does not send all its clients to the others at
/// once: each gets close 1012 `server draining; retry=MS` (MS a short
/// random delay the JavaScript client honours) at its own moment, in
/// random order. Clients that connect meanwhile are closed at the end.
pub async fn drain_clients(node: Node) {
    let spread = node.config().drain_spread;
    let reason = || {
        let retry = 100 + fastrand::u64(0..400);
        crate::queue::CloseReason::new(
            crate::error::close::SERVICE_RESTART,
            format!("server draining; retry={retry}"),
        )
    };
    let mut clients = node.hub().clients();
    fastrand::shuffle(&mut clients);
    let start = tokio::time::Instant::now();
    let n = clients.len().max(1) as u32;
    for (i, client) in clients.iter().enumerate() {
        tokio::time::sleep_until(start + spread * i as u32 / n).await;
        client.queue.close(reason());
    }
    for client in node.hub().clients() {
        client.queue.close(reason());
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
