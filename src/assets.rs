//! What the server serves for browsers, embedded in the binary at build
//! time: the JavaScript client (`/client.js`, `/client.d.ts`) and the demo
//! pages (`/demo/chat`, `/demo/dashboard`), plus the task that feeds the
//! dashboard's `sys:metrics` channel. All of it is off with `--demo false`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::figures::feed::FeedSampler;
use crate::node::Node;

const CLIENT_JS: &str = include_str!("../clients/js/switchboard.js");
const CLIENT_DTS: &str = include_str!("../clients/js/switchboard.d.ts");
const CHAT_HTML: &str = include_str!("../demo/chat.html");
const DASHBOARD_HTML: &str = include_str!("../demo/dashboard.html");

/// The channel the dashboard subscribes to.
pub const METRICS_CHANNEL: &str = "sys:metrics";

/// Add the asset routes to `app`.
pub fn routes<S: Clone + Send + Sync + 'static>(app: Router<S>) -> Router<S> {
    app.route(
        "/client.js",
        get(|| async {
            (
                [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                CLIENT_JS,
            )
        }),
    )
    .route(
        "/client.d.ts",
        get(|| async {
            (
                [(
                    header::CONTENT_TYPE,
                    "application/typescript; charset=utf-8",
                )],
                CLIENT_DTS,
            )
        }),
    )
    .route("/demo/chat", get(|| async { Html(CHAT_HTML) }))
    .route("/demo/dashboard", get(|| async { Html(DASHBOARD_HTML) }))
    .route(
        "/demo",
        get(|| async { axum::response::Redirect::to("/demo/chat").into_response() }),
    )
}

/// Publish this instance's figures (those of [`crate::figures::COUNTERS`]
/// with a feed key) to [`METRICS_CHANNEL`] once a second, while anyone here
/// is subscribed to it.
pub async fn publish_metrics(node: Node, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut feed = FeedSampler::new(&node);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Sampled every second, so that each rate covers one second.
        let figures = feed.sample(&node);
        if node.hub().subscriber_count(METRICS_CHANNEL) == 0 {
            continue;
        }
        let data: Arc<RawValue> = match RawValue::from_string(figures.to_string()) {
            Ok(raw) => Arc::from(raw),
            Err(_) => continue,
        };
        let published = match node.channel(METRICS_CHANNEL) {
            Ok(channel) => node.publish(None, channel, data, Default::default()).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = published {
            tracing::warn!(error = %e, "publishing dashboard metrics failed");
        }
    }
}
