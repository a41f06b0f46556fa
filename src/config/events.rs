//! [`EventsConfig`]: the lifecycle-event webhook (`events_url`,
//! `events_secret_file`, `events_grace`, `events_max_age`), validated from
//! the settings. Off unless `events_url` is set; see `crate::events`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::bus::BusConfig;
use super::duration::HumanDuration;
use super::validate::nonzero;
use crate::error::{Error, Result};

/// Where and how lifecycle events are delivered.
#[derive(Clone)]
pub struct EventsConfig {
    /// The backend's URL; every batch is POSTed there.
    pub url: String,
    /// The HMAC-SHA256 key of `X-Switchboard-Signature` (file content,
    /// surrounding whitespace ignored), so a backend can tell our calls
    /// from forged ones.
    pub secret: Arc<[u8]>,
    /// How long a vacated channel or an offline user waits before its
    /// event is sent; back within it, nothing is sent (a page reload).
    pub grace: Duration,
    /// How long an undelivered event is retried before it is
    /// dead-lettered.
    pub max_age: Duration,
}

impl fmt::Debug for EventsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventsConfig")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("grace", &self.grace)
            .field("max_age", &self.max_age)
            .finish()
    }
}

impl EventsConfig {
    /// Validate the event options: `None` without `events_url`. The URL
    /// must be http(s), the secret file readable and not empty, and the
    /// bus one that keeps events durably (memory or Redis).
    pub(super) fn from_settings(
        url: Option<String>,
        secret_file: Option<PathBuf>,
        grace: Option<HumanDuration>,
        max_age: Option<HumanDuration>,
        bus: &BusConfig,
    ) -> Result<Option<EventsConfig>> {
        let Some(url) = url.filter(|u| !u.is_empty()) else {
            if secret_file.is_some() {
                return Err(Error::Config(
                    "events_secret_file is set but events_url is not".into(),
                ));
            }
            return Ok(None);
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::Config(format!(
                "events_url must be an http:// or https:// URL (got {url:?})"
            )));
        }
        match bus {
            BusConfig::Redis { url } if url.contains("+cluster://") => {
                return Err(Error::Config(
                    "events_url needs the memory or a single-node redis bus: lifecycle events are not yet kept on a Redis Cluster".into(),
                ));
            }
            BusConfig::Memory | BusConfig::Redis { .. } => {}
            BusConfig::Nats { .. } | BusConfig::PubSub { .. } => {
                return Err(Error::Config(
                    "events_url needs the memory or the redis bus: lifecycle events are not yet kept on the NATS or Pub/Sub bus".into(),
                ));
            }
        }
        let Some(path) = secret_file else {
            return Err(Error::Config(
                "events_url needs events_secret_file (the key that signs every delivery)".into(),
            ));
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::Config(format!(
                "events_secret_file: cannot read {}: {e}",
                path.display()
            ))
        })?;
        let secret = text.trim();
        if secret.is_empty() {
            return Err(Error::Config("events_secret_file is empty".into()));
        }
        Ok(Some(EventsConfig {
            url,
            secret: secret.as_bytes().into(),
            grace: grace.map_or(Duration::from_secs(3), |d| d.0),
            max_age: nonzero(
                "events_max_age",
                max_age.map_or(Duration::from_secs(24 * 3600), |d| d.0),
            )?,
        }))
    }
}
