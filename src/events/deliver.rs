//! The delivery loop, run by every instance and active on the one holding
//! the lease: settle pending subjects, heart-beat and reap dead instances,
//! read the log after the cursor, POST a signed batch, and on a 2xx move
//! the cursor. A failed batch is retried (the same batch, so per-subject
//! order holds) with exponential backoff and jitter until its oldest event
//! is `events_max_age` old; it is then dead-lettered and the loop moves on.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use super::store::{Store, Stored};
use super::{EventStats, MAX_BATCH};
use crate::broker::retry::Backoff;
use crate::config::EventsConfig;
use crate::error::{Error, Result};
use crate::log_limit::LogLimit;
use crate::protocol::now_ms;

/// Retry delays of a failing backend: 200 ms doubling to 10 s, ±50 %.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
/// How often the loop looks for new events (and due grace periods) when
/// the log is empty.
const IDLE: Duration = Duration::from_millis(100);
/// Name of the signature header.
pub const SIGNATURE_HEADER: &str = "x-switchboard-signature";

static DELIVERY_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// `sha256=<lower-case hex HMAC-SHA256 of body>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The loop's state.
pub(super) struct Delivery {
    url: String,
    secret: Arc<[u8]>,
    max_age_ms: u64,
    http: reqwest::Client,
    store: Arc<dyn Store>,
    stats: Arc<EventStats>,
}

impl Delivery {
    /// `timeout`: how long one delivery may take before it counts as
    /// failed (`proxy_timeout`, the deadline of every call to the backend).
    pub(super) fn new(
        config: &EventsConfig,
        timeout: std::time::Duration,
        store: Arc<dyn Store>,
        stats: Arc<EventStats>,
    ) -> Result<Delivery> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| Error::Config(format!("events_url: cannot build the HTTP client: {e}")))?;
        Ok(Delivery {
            url: config.url.clone(),
            secret: config.secret.clone(),
            max_age_ms: config.max_age.as_millis() as u64,
            http,
            store,
            stats,
        })
    }

    /// Run until `shutdown`: the heartbeat (every `presence_ttl / 3`) in
    /// a task of its own, so that a slow backend never delays it (a late
    /// heartbeat would get this live instance reaped), and the delivery
    /// rounds here. A retry waits at most that long too, so the lease
    /// (lifetime `presence_ttl`) is renewed while the backend is down.
    pub(super) async fn run(self, shutdown: CancellationToken, presence_ttl: Duration) {
        let beat_every = (presence_ttl / 3).max(Duration::from_millis(100));
        tokio::spawn(heartbeat(
            self.store.clone(),
            self.stats.clone(),
            beat_every,
            shutdown.clone(),
        ));
        let mut attempt = 0u32;
        loop {
            let wait = match self.step(&mut attempt).await {
                Ok(true) => Duration::ZERO,
                Ok(false) => IDLE,
                Err(e) => {
                    log(&e, "event delivery");
                    let d = BACKOFF.jittered(attempt).min(beat_every);
                    attempt = attempt.saturating_add(1);
                    d
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            } else if shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// One round; `Ok(true)` when a batch went out and more may wait.
    async fn step(&self, attempt: &mut u32) -> Result<bool> {
        if !self.store.lease().await? {
            return Ok(false);
        }
        let settled = self.store.settle(now_ms()).await?;
        EventStats::add(&self.stats.emitted, settled);
        let batch = self.store.read(MAX_BATCH).await?;
        let Some(last) = batch.last() else {
            return Ok(false);
        };
        match self.post(&batch).await {
            Ok(()) => {
                self.store.ack(&last.pos).await?;
                let now = now_ms();
                EventStats::add(&self.stats.delivered, batch.len() as u64);
                let ms: u64 = batch.iter().map(|s| now.saturating_sub(s.since_ms)).sum();
                EventStats::add(&self.stats.delivery_ms, ms);
                *attempt = 0;
                Ok(true)
            }
            Err(why) => {
                EventStats::inc(&self.stats.retried);
                let oldest = batch.iter().map(|s| s.since_ms).min().unwrap_or(0);
                if now_ms().saturating_sub(oldest) >= self.max_age_ms {
                    self.store.dead_letter(&batch).await?;
                    EventStats::add(&self.stats.dead_lettered, batch.len() as u64);
                    tracing::warn!(events = batch.len(), %why, "lifecycle events dead-lettered after events_max_age");
                    *attempt = 0;
                    return Ok(true);
                }
                Err(Error::Bus(why.into()))
            }
        }
    }

    /// POST `{"events":[…]}`, signed; `Err` unless the answer is 2xx.
    async fn post(&self, batch: &[Stored]) -> std::result::Result<(), String> {
        let mut body =
            String::with_capacity(batch.iter().map(|s| s.json.len() + 1).sum::<usize>() + 12);
        body.push_str("{\"events\":[");
        for (i, s) in batch.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&s.json);
        }
        body.push_str("]}");
        let sig = signature(&self.secret, body.as_bytes());
        let answer = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, sig)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("events_url unreachable: {e}"))?;
        if answer.status().is_success() {
            Ok(())
        } else {
            Err(format!("events_url answered {}", answer.status()))
        }
    }
}

/// Heart-beat this instance and reap dead ones, every `every`, until
/// `shutdown`.
async fn heartbeat(
    store: Arc<dyn Store>,
    stats: Arc<EventStats>,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        match store.heartbeat(now_ms()).await {
            Ok(n) => EventStats::add(&stats.emitted, n),
            Err(e) => log(&e, "heartbeat"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

fn log(e: &Error, what: &str) {
    if let Some(suppressed) = DELIVERY_LOG.allow() {
        tracing::warn!(error = %e, suppressed, "{what} failed; retrying");
    }
}

#[cfg(test)]
mod tests {
    use super::signature;

    #[test]
    fn signature_is_the_rfc_4231_hmac() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
