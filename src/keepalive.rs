//! Keep-alive: one shared sweeper instead of a timer per connection.
//!
//! Every tick the sweeper walks the hub once: a client quiet for
//! `ping_interval` gets a WebSocket ping; a client that has sent nothing
//! (no pong, no frame) for `pong_timeout` after that ping is closed without
//! a close handshake and removed by its task, at once even if that task is
//! waiting on a write ([`crate::bounded_write`]). A client whose close was
//! already requested is not looked at again, so each dead peer is counted
//! (`deadPeers`) and logged once. The tick is a quarter of the shorter of
//! the two intervals (at most 1 s), so detection is late by at most one
//! tick.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::node::Node;

/// The sweeper's tick for the given intervals.
pub fn tick_for(ping_interval: Duration, pong_timeout: Duration) -> Duration {
    (ping_interval.min(pong_timeout) / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
}

/// Run the sweeper until `shutdown` is cancelled.
pub async fn run(node: Node, shutdown: CancellationToken) {
    let cfg = node.config();
    let ping_ms = cfg.ping_interval.as_millis() as u64;
    let timeout_ms = cfg.pong_timeout.as_millis() as u64;
    let mut tick = tokio::time::interval(tick_for(cfg.ping_interval, cfg.pong_timeout));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                let hub = node.hub();
                let dead = hub.keepalive_pass(hub.clock_ms(), ping_ms, timeout_ms);
                if dead > 0 {
                    node.metrics().dead_peers.fetch_add(dead as u64, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(dead, "removing peers that stopped answering pings");
                }
            }
        }
    }
}
