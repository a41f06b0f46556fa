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

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::close;
use crate::hub::Hub;
use crate::node::Node;
use crate::queue::{CloseReason, Outbound};

/// The sweeper's tick for the given intervals.
pub fn tick_for(ping_interval: Duration, pong_timeout: Duration) -> Duration {
    (ping_interval.min(pong_timeout) / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
}

/// Run the sweeper until `shutdown` is cancelled.
pub async fn run(node: Node, shutdown: CancellationToken) {
    let cfg = node.config();
    let ping_ms = cfg.ping_interval.as_millis() as u64;
    let timeout_ms = cfg.pong_timeout.as_millis() as u64;
    let refresh = cfg.proxy.refresh_url.is_some();
    let mut tick = tokio::time::interval(tick_for(cfg.ping_interval, cfg.pong_timeout));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                let hub = node.hub();
                let dead = pass(hub, hub.clock_ms(), ping_ms, timeout_ms, refresh);
                if dead > 0 {
                    node.metrics().dead_peers.fetch_add(dead as u64, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(dead, "removing peers that stopped answering pings");
                }
            }
        }
    }
}

/// One keep-alive pass over `hub` at `now`: ping the clients that have
/// been quiet for `ping_ms`, and close, without a close frame, those that
/// stayed silent `timeout_ms` after a ping. Returns how many were found
/// dead in this pass. A client whose close was already requested (dead,
/// expired, slow, disconnected) is skipped: it is counted and closed once,
/// and its task removes it within its write timeout (see
/// [`crate::bounded_write`]). The same pass queues overdue redeliveries
/// (acked namespaces) and closes connections whose token expired (4003),
/// or, with `refresh` (a refresh proxy is configured), asks their session
/// to call it (once: the expiry is cleared until the session sets it).
pub fn pass(hub: &Hub, now: u64, ping_ms: u64, timeout_ms: u64, refresh: bool) -> usize {
    let mut dead = 0;
    let wall_secs = crate::protocol::now_ms() / 1000;
    hub.for_each_client(|client| {
        if client.queue.is_closed() {
            return;
        }
        let due = client.ack_deadline.load(Ordering::Relaxed);
        if due != 0 && now >= due {
            client.ack_deadline.store(0, Ordering::Relaxed);
            hub.push(client, Outbound::Redeliver);
        }
        let expires = client.expires_at.load(Ordering::Relaxed);
        if expires != 0 && wall_secs >= expires && refresh {
            client.expires_at.store(0, Ordering::Relaxed);
            hub.push(client, Outbound::Refresh);
        } else if expires != 0 && wall_secs >= expires {
            client
                .queue
                .close(CloseReason::new(close::TOKEN_EXPIRED, "token expired"));
            return;
        }
        let seen = client.last_seen.load(Ordering::Relaxed);
        let sent = client.ping_sent.load(Ordering::Relaxed);
        if sent > seen {
            if now.saturating_sub(sent) >= timeout_ms {
                dead += 1;
                client.queue.close(CloseReason::abort("no pong"));
            }
        } else if now.saturating_sub(seen) >= ping_ms {
            client.ping_sent.store(now.max(seen + 1), Ordering::Relaxed);
            hub.push(client, Outbound::Ping);
        }
    });
    dead
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ClientInfo;
    use crate::queue::Limits;

    const LIMITS: Limits = Limits {
        max_messages: 8,
        max_bytes: 1 << 20,
    };

    #[test]
    fn keepalive_pings_then_declares_dead() {
        let hub = Hub::new(LIMITS);
        let a = hub.add(ClientInfo {
            client_id: "a".into(),
            user_id: None,
            name: None,
        });
        let seen = a.last_seen.load(Ordering::Relaxed);
        assert_eq!(pass(&hub, seen + 10, 100, 100, false), 0);
        assert!(a.queue.take().0.is_empty(), "not quiet long enough");
        assert_eq!(pass(&hub, seen + 100, 100, 100, false), 0);
        assert!(matches!(a.queue.take().0.front(), Some(Outbound::Ping)));
        assert_eq!(
            pass(&hub, seen + 150, 100, 100, false),
            0,
            "waiting for the pong"
        );
        assert_eq!(pass(&hub, seen + 200, 100, 100, false), 1);
        assert!(a.queue.is_closed());
        assert_eq!(
            pass(&hub, seen + 300, 100, 100, false),
            0,
            "a dead peer is counted once, not on every pass until it is gone"
        );
    }
}
