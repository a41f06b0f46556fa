//! Backend proxies: the application's backend decides, over HTTP, who a
//! connection is (`connect`), who may subscribe (`subscribe`) and publish
//! (`publish`, which may also rewrite the data), answers the client's
//! `rpc` frames (`rpc`), and extends expiring credentials (`refresh`).
//!
//! Each proxy is a URL the operator configures (off without one); a call
//! is `POST <url>` with a JSON body ([`Request`]) and the backend answers
//! 200 with exactly one of `{"result":…}`, `{"error":{"code","message"}}`
//! or `{"disconnect":{"code","reason"}}` ([`Answer`]). Anything else (a
//! timeout, another status, a malformed body, a backend that is down) is
//! `proxy_unavailable` for the client. `docs/backend.md` has every body.
//!
//! Bounds: one shared HTTP client per instance whose every call ends
//! within `proxy_timeout`; at most `proxy_max_in_flight` calls at once on
//! the instance, all kinds together, beyond which a call is refused at
//! once with `proxy_busy` (never queued). A call waits only in the
//! session that made it, so a slow or dead backend delays that client's
//! own requests by at most the timeout and no one else's.
//!
//! Here: [`Proxy`] (the client, the bound, the call and its figures);
//! `config` its options; `answer` the answer bodies and their checks. The
//! session's side (when each proxy is asked, what the client is told) is
//! `session::proxied`. Sits below the node, which owns the [`Proxy`].

mod answer;
mod config;
#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use crate::error::{ClientError, Error, ErrorCode, Result};
use crate::log_limit::LogLimit;
use crate::metrics::Metrics;

pub use answer::{Answer, ConnectResult, DataResult, Empty, Refusal};
pub use config::{ProxyConfig, parse_headers, parse_url};

/// Largest answer body read from the backend; a longer one is malformed.
pub const MAX_ANSWER: usize = 1 << 20;

/// What a proxy call is for; the `kind` of its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Connect,
    Subscribe,
    Publish,
    Rpc,
    Refresh,
}

impl Kind {
    /// Every kind, in the order of [`Kind::index`].
    pub const ALL: [Kind; crate::metrics::PROXY_KINDS] = [
        Kind::Connect,
        Kind::Subscribe,
        Kind::Publish,
        Kind::Rpc,
        Kind::Refresh,
    ];

    /// The `kind` on the wire and in the metrics' labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::Subscribe => "subscribe",
            Kind::Publish => "publish",
            Kind::Rpc => "rpc",
            Kind::Refresh => "refresh",
        }
    }

    /// Its position in [`Kind::ALL`] and in the metrics' arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// How a call ended, for `switchboard_proxy_calls_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `{"result":…}`.
    Ok,
    /// `{"error":…}`.
    Refused,
    /// `{"disconnect":…}`.
    Disconnect,
    /// No complete answer within `proxy_timeout`.
    Timeout,
    /// Unreachable, not 200, or a body that is not one of the answers.
    Failed,
    /// Refused at once: `proxy_max_in_flight` calls were in flight.
    Busy,
}

impl Outcome {
    /// Every outcome, in the order of the metrics' arrays.
    pub const ALL: [Outcome; crate::metrics::PROXY_OUTCOMES] = [
        Outcome::Ok,
        Outcome::Refused,
        Outcome::Disconnect,
        Outcome::Timeout,
        Outcome::Failed,
        Outcome::Busy,
    ];
}

/// The body of a proxy call. Fields a kind does not have are left out.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Request<'a> {
    pub kind: &'static str,
    pub client_id: &'a str,
    pub instance_id: &'a str,
    /// `websocket` (the session's transport).
    pub transport: &'static str,
    /// `null` when the connection has no user (yet).
    pub user_id: Option<&'a str>,
    /// connect: the client's address (after `trusted_proxies`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_addr: Option<&'a str>,
    /// connect: the configured upgrade-request headers, lower-case names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// subscribe, publish.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<&'a str>,
    /// rpc.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'a str>,
    /// publish, rpc: the client's data, as it sent it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
}

impl<'a> Request<'a> {
    /// A body of `kind` for this client; add the kind's own fields.
    pub fn new(
        kind: Kind,
        client_id: &'a str,
        instance_id: &'a str,
        transport: &'static str,
        user_id: Option<&'a str>,
    ) -> Self {
        Request {
            kind: kind.as_str(),
            client_id,
            instance_id,
            transport,
            user_id,
            remote_addr: None,
            headers: None,
            channel: None,
            method: None,
            data: None,
        }
    }
}

/// The instance's proxies: their configuration, one HTTP client, and the
/// bound on calls in flight.
#[derive(Debug)]
pub struct Proxy {
    config: ProxyConfig,
    /// Shared by every call (one connection pool per instance).
    http: reqwest::Client,
    /// `max_in_flight` permits: a call that finds none is `proxy_busy`.
    in_flight: Semaphore,
}

impl Proxy {
    /// The proxies of `config`; fails only if the HTTP client cannot be
    /// built (no TLS roots).
    pub fn new(config: &ProxyConfig) -> Result<Proxy> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Config(format!("proxy HTTP client: {e}")))?;
        Ok(Proxy {
            in_flight: Semaphore::new(config.max_in_flight),
            config: config.clone(),
            http,
        })
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// The URL of `kind`'s proxy; `None` when it is off.
    pub fn url(&self, kind: Kind) -> Option<&reqwest::Url> {
        match kind {
            Kind::Connect => self.config.connect_url.as_ref(),
            Kind::Subscribe => self.config.subscribe_url.as_ref(),
            Kind::Publish => self.config.publish_url.as_ref(),
            Kind::Rpc => self.config.rpc_url.as_ref(),
            Kind::Refresh => self.config.refresh_url.as_ref(),
        }
    }

    /// Call `body.kind`'s proxy and read its answer, whose `result` is a
    /// `T`. `Err` is what the client is told when there is no usable
    /// answer: `proxy_busy`, or `proxy_unavailable` (timeout, not 200,
    /// malformed body, unreachable, or this proxy is not configured).
    pub async fn call<T: DeserializeOwned>(
        &self,
        metrics: &Metrics,
        kind: Kind,
        body: &Request<'_>,
    ) -> std::result::Result<Answer<T>, ClientError> {
        let count = |o: Outcome| {
            metrics.proxy_calls[kind.index()][o as usize].fetch_add(1, Relaxed);
        };
        let Some(url) = self.url(kind) else {
            return Err(unavailable(kind));
        };
        let Ok(_permit) = self.in_flight.try_acquire() else {
            count(Outcome::Busy);
            return Err(ClientError::new(
                ErrorCode::ProxyBusy,
                format!(
                    "{} calls to the backend are in flight; try again",
                    self.config.max_in_flight
                ),
            ));
        };
        let started = Instant::now();
        // reqwest's own timeout covers the whole exchange; this one also
        // covers reading and decoding the body, whatever its pace.
        let result = tokio::time::timeout(self.config.timeout, self.exchange(url, body)).await;
        metrics.proxy_latency[kind.index()].observe_us(started.elapsed().as_micros() as u64);
        let failure = match result {
            Ok(Ok(bytes)) => match answer::parse::<T>(&bytes) {
                Ok(answer) => {
                    count(match &answer {
                        Answer::Result(_) => Outcome::Ok,
                        Answer::Refused(_) => Outcome::Refused,
                        Answer::Disconnect(_) => Outcome::Disconnect,
                    });
                    return Ok(answer);
                }
                Err(why) => (Outcome::Failed, why),
            },
            Ok(Err(e)) if e.is_timeout() => (Outcome::Timeout, e.to_string()),
            Ok(Err(e)) => (Outcome::Failed, e.to_string()),
            Err(_) => (Outcome::Timeout, "no answer within proxy_timeout".into()),
        };
        count(failure.0);
        log_failure(kind, url, &failure.1);
        Err(unavailable(kind))
    }

    /// POST the body; the answer's bytes when the status is 200 (empty,
    /// so malformed, beyond [`MAX_ANSWER`] bytes).
    async fn exchange(&self, url: &reqwest::Url, body: &Request<'_>) -> reqwest::Result<Vec<u8>> {
        let mut response = self
            .http
            .post(url.clone())
            .json(body)
            .send()
            .await?
            .error_for_status()?;
        if response.status() != reqwest::StatusCode::OK {
            // 2xx other than 200: not one of the answers either.
            return Ok(Vec::new());
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if bytes.len() + chunk.len() > MAX_ANSWER {
                return Ok(Vec::new());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }
}

/// The client's `proxy_unavailable`.
fn unavailable(kind: Kind) -> ClientError {
    ClientError::new(
        ErrorCode::ProxyUnavailable,
        format!(
            "the backend's {} proxy is unavailable; try again",
            kind.as_str()
        ),
    )
}

/// Failed calls: one warning per 10 s with a count of the others (a dead
/// backend fails every call).
fn log_failure(kind: Kind, url: &reqwest::Url, why: &str) {
    static LOG: LogLimit = LogLimit::new(Duration::from_secs(10));
    match LOG.allow() {
        Some(suppressed) => {
            tracing::warn!(kind = kind.as_str(), %url, error = why, suppressed, "backend proxy call failed")
        }
        None => {
            tracing::debug!(kind = kind.as_str(), %url, error = why, "backend proxy call failed")
        }
    }
}
