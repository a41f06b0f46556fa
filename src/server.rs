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
use axum::extract::ws::{WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
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

/// Read buffer of each WebSocket connection. Small on purpose: idle
/// connections are the common case and this buffer is allocated for each;
/// a large message is read in more, smaller reads.
pub const READ_BUFFER_SIZE: usize = 1024;
/// Frames are gathered up to this size before a write to the socket.
pub const WRITE_BUFFER_SIZE: usize = 8 * 1024;

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
            if !bucket.take(cfg.handshake_rate, cfg.handshake_burst) {
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
    ws.read_buffer_size(READ_BUFFER_SIZE)
        .write_buffer_size(WRITE_BUFFER_SIZE)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket: WebSocket| {
            let AppState {
                node,
                shutdown,
                tracker,
                ..
            } = state;
            // Tracked so shutdown waits for it; the future is spawned by
            // axum, this wrapper only registers it.
            tracker.track_future(session::serve(node, socket, mode, shutdown, query.token))
        })
}

/// `/`: the tutorial's client upgrades here; plain GETs get the status.
async fn root(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<UpgradeQuery>,
    ws: std::result::Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match ws {
        Ok(ws) => upgrade(state, ws, &headers, query, Mode::Protocol),
        Err(_) => Json(json!({
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
    }))
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
        admission: Arc::new(Mutex::new(TokenBucket::new(node.config().handshake_burst))),
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
    // Frames are small and latency matters: no Nagle delay.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await?;
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
