//! The HTTP server: WebSocket upgrades and the HTTP endpoints on one port,
//! and the shutdown sequence.
//!
//! [`run`] serves until the `shutdown` future completes, then:
//! 1. marks the node draining (`/readyz` answers 503),
//! 2. stops accepting connections,
//! 3. asks every connection to reconnect elsewhere: close 1012 with a
//!    `retry=MS` hint, spread evenly (in random order) over `drain_spread`,
//!    frames already queued written first ([`drain_clients`]),
//! 4. waits for every connection task, at most `drain_timeout`,
//! 5. closes the bus and returns.

use std::future::Future;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::limits::TokenBucket;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::session::{self, Mode};
use crate::ws::WebSocketUpgrade;
use crate::ws::upgrade::UpgradeRejection;

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
}

/// Build the router (exposed for tests that drive it without a socket).
fn router(state: AppState) -> Router {
    let mut app = Router::new()
        .route("/", get(root))
        .route("/ws", get(ws_only))
        .route("/_ah/health", get(|| async { "OK" }))
        // Browsers ask for it on every page; no 404 in their consoles.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/livez", get(|| async { "OK" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/metrics/prometheus", get(prometheus))
        .merge(crate::api::routes(state.node.clone()));
    if let Some(path) = state.node.config().echo_path.clone() {
        app = app.route(&path, get(echo));
    }
    if state.node.config().demo {
        app = crate::assets::routes(app);
    }
    app.with_state(state)
}

/// Whether a browser `Origin` may connect: any when the allow-list is
/// empty; non-browser clients (no `Origin`) always.
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
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

/// The upgrade request's query: `?token=` carries a JWT.
#[derive(Debug, Default, serde::Deserialize)]
struct UpgradeQuery {
    token: Option<String>,
}

fn upgrade(
    state: AppState,
    ws: WebSocketUpgrade,
    headers: &HeaderMap,
    query: UpgradeQuery,
    mode: Mode,
) -> Response {
    let cfg = state.node.config();
    if mode == Mode::Protocol {
        if !origin_allowed(&cfg.allowed_origins, headers) {
            Metrics::inc(&state.node.metrics().origin_refused);
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
        if state.node.hub().len() >= cfg.max_connections {
            Metrics::inc(&state.node.metrics().connections_refused);
            return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
        }
        if cfg.handshake_rate > 0.0 {
            let mut bucket = state.admission.lock().unwrap_or_else(|p| p.into_inner());
            if !bucket.take(
                state.node.hub().clock_ms(),
                cfg.handshake_rate,
                cfg.handshake_burst,
            ) {
                let wait = bucket.wait(cfg.handshake_rate);
                drop(bucket);
                Metrics::inc(&state.node.metrics().handshakes_throttled);
                // Whole seconds, at least 1, plus jitter so that refused
                // clients do not all come back in the same second.
                let retry = wait.as_secs() + 1 + fastrand::u64(0..2);
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, retry.to_string())],
                    "too many new connections; retry later",
                )
                    .into_response();
            }
        }
    }
    let limit = match mode {
        Mode::Protocol => cfg.max_message_size,
        Mode::Echo => cfg.echo_max_message_size,
    };
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    ws.on_upgrade(limit, cfg.compression, move |socket| {
        let AppState {
            node,
            shutdown,
            tracker,
            ..
        } = state;
        // Shutdown waits for set-up too, then for the session itself.
        let setting_up = tracker.token();
        async move {
            let session = session::open(node, socket, mode, query.token).await?;
            drop(setting_up);
            Some(tracker.track_future(session.live(shutdown)))
        }
    })
}

/// `/`: the tutorial's client upgrades here; plain GETs get the status.
async fn root(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<UpgradeQuery>,
    ws: std::result::Result<WebSocketUpgrade, UpgradeRejection>,
) -> Response {
    match ws {
        Ok(ws) => upgrade(state, ws, &headers, query, Mode::Protocol),
        Err(e @ (UpgradeRejection::Invalid(_) | UpgradeRejection::Version)) => e.into_response(),
        Err(UpgradeRejection::NotUpgrade) => Json(json!({
            "status": "running",
            "connectedClients": state.node.hub().len(),
        }))
        .into_response(),
    }
}

async fn ws_only(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<UpgradeQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(state, ws, &headers, query, Mode::Protocol)
}

async fn echo(State(state): State<AppState>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    upgrade(state, ws, &headers, UpgradeQuery::default(), Mode::Echo)
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.node.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if !state.node.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "bus unavailable").into_response()
    } else {
        "ready".into_response()
    }
}

/// Prometheus text exposition of the same counters.
async fn prometheus(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::prometheus::render(&state.node),
    )
        .into_response()
}

/// The tutorial's `/metrics`, extended with Switchboard's counters.
async fn metrics(State(state): State<AppState>) -> Json<serde_json::Value> {
    use std::sync::atomic::Ordering::Relaxed;
    let node = &state.node;
    let m = node.metrics();
    let hub = node.hub();
    let history = node.history_stats();
    Json(json!({
        "connectedClients": hub.len(),
        "uptime": node.uptime(),
        "memoryUsage": crate::metrics::memory_usage(),
        "instanceId": node.instance_id(),
        "ready": node.is_ready(),
        "messagesIn": m.messages_in.load(Relaxed),
        "messagesOut": m.messages_out.load(Relaxed),
        "deliveriesQueued": hub.delivered(),
        "connectionsTotal": m.connections_total.load(Relaxed),
        "publications": m.publications.load(Relaxed),
        "busPublishErrors": m.bus_publish_errors.load(Relaxed),
        "errorsSent": m.errors_sent.load(Relaxed),
        "slowConsumers": hub.slow_consumers(),
        "droppedOldest": hub.dropped(),
        "conflated": hub.conflated(),
        "relayDropped": hub.relay_dropped(),
        "deadPeers": m.dead_peers.load(Relaxed),
        "oversizeCloses": m.oversize_closes.load(Relaxed),
        "rateLimited": m.rate_limited.load(Relaxed),
        "handshakesThrottled": m.handshakes_throttled.load(Relaxed),
        "redeliveries": m.redeliveries.load(Relaxed),
        "authFailures": m.auth_failures.load(Relaxed),
        "originRefused": m.origin_refused.load(Relaxed),
        "connectionsRefused": m.connections_refused.load(Relaxed),
        "apiRequests": m.api_requests.load(Relaxed),
        "apiErrors": m.api_errors.load(Relaxed),
        "channelLimited": m.channel_limited.load(Relaxed),
        "historyBytes": history.bytes.load(Relaxed),
        "historyChannels": history.channels.load(Relaxed),
        "historyStreams": history.streams.load(Relaxed),
        "historyEvictions": history.evictions.load(Relaxed),
    }))
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
    if node.config().demo {
        tracker.spawn(crate::assets::publish_metrics(node.clone(), token.clone()));
    }
    let state = AppState {
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
    serve_http(listener, app, signal).await;
    tracker.close();
    let drain = node.config().drain_timeout;
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
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
async fn serve_http(listener: TcpListener, app: Router, signal: impl Future<Output = ()>) {
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
        let (tcp, _) = tokio::select! {
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
        // Frames are small and latency matters: no Nagle delay.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let http = http.clone();
        let stop = stop.clone();
        conns.spawn(async move {
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
