//! [`ProxyConfig`]: where the backend proxies are and how they are called,
//! as validated by [`crate::config`] from the `proxy_*` options.

use std::time::Duration;

use reqwest::Url;

use crate::error::{Error, Result};

/// The backend proxies of one instance. Each URL is optional: a proxy
/// without one is off.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// `proxy_connect_url`: decides who a connection without `?token=`
    /// is (or every connection, with `connect_always`).
    pub connect_url: Option<Url>,
    /// `proxy_subscribe_url`: asked in namespaces with `subscribe_proxy`.
    pub subscribe_url: Option<Url>,
    /// `proxy_publish_url`: asked in namespaces with `publish_proxy`.
    pub publish_url: Option<Url>,
    /// `proxy_rpc_url`: answers the client's `rpc` frames.
    pub rpc_url: Option<Url>,
    /// `proxy_refresh_url`: extends a connection's credentials when they
    /// expire, instead of the 4003 close.
    pub refresh_url: Option<Url>,
    /// `proxy_connect_always`: the connect proxy is asked even when the
    /// connection presented a valid token.
    pub connect_always: bool,
    /// Deadline of one call, connection set-up to the last byte of the
    /// answer: what a slow backend can cost a client.
    pub timeout: Duration,
    /// Upgrade-request headers forwarded to the connect proxy, lower-case;
    /// nothing else of the request reaches the backend.
    pub headers: Vec<String>,
    /// Calls in flight on this instance, all kinds together; one more is
    /// refused with `proxy_busy` rather than queued.
    pub max_in_flight: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_url: None,
            subscribe_url: None,
            publish_url: None,
            rpc_url: None,
            refresh_url: None,
            connect_always: false,
            timeout: Duration::from_secs(1),
            headers: Vec::new(),
            max_in_flight: 1000,
        }
    }
}

/// Parse an `http` or `https` URL option.
pub fn parse_url(option: &str, value: Option<String>) -> Result<Option<Url>> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match Url::parse(&value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(Some(url)),
        Ok(_) => Err(Error::Config(format!(
            "{option} must be an http:// or https:// URL (got {value:?})"
        ))),
        Err(e) => Err(Error::Config(format!("{option}: {e} (got {value:?})"))),
    }
}

/// Check and lower-case the `proxy_headers` names.
pub fn parse_headers(names: Vec<String>) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for name in names {
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() {
            continue;
        }
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(Error::Config(format!(
                "proxy_headers: {name:?} is not a header name"
            )));
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}
