//! Channel namespaces: [`NamespaceSettings`] as written in the TOML file,
//! [`NamespaceOptions`] as they apply, their defaults (including the
//! server's own `sys` namespace) and their validation.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

use super::duration::HumanDuration;
use super::validate::nonzero;
use crate::error::{Error, Result};
use crate::queue::SlowConsumerPolicy;

/// Options of one namespace, as written in the TOML file. Missing keys take
/// the default namespace's value.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceSettings {
    pub history_size: Option<usize>,
    pub history_ttl: Option<HumanDuration>,
    pub presence: Option<bool>,
    pub join_leave: Option<bool>,
    pub client_publish: Option<bool>,
    pub slow_consumer: Option<SlowConsumerPolicy>,
    pub anonymous: Option<bool>,
    pub acked: Option<bool>,
    pub subscribe_proxy: Option<bool>,
    pub publish_proxy: Option<bool>,
    pub idempotency_window: Option<HumanDuration>,
    pub cache: Option<bool>,
}

/// The effective options of a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceOptions {
    /// Publications kept per channel; 0 means no history and no recovery.
    pub history_size: usize,
    /// Age after which a publication leaves the history.
    pub history_ttl: Duration,
    /// Whether the `presence` request is served.
    pub presence: bool,
    /// Whether subscribers get `join` / `leave` events (needs presence).
    pub join_leave: bool,
    /// Whether clients may `publish` (the server API always may).
    pub client_publish: bool,
    /// What a full client queue does to this namespace's publications.
    pub slow_consumer: SlowConsumerPolicy,
    /// Whether connections without a token may use it (others need a
    /// token granting the channel).
    pub anonymous: bool,
    /// Acknowledged at-least-once delivery: clients acknowledge offsets and
    /// the server resends what stays unacknowledged (needs history).
    pub acked: bool,
    /// Subscriptions are decided by the backend's subscribe proxy (in
    /// place of the grant check); needs `proxy_subscribe_url`.
    pub subscribe_proxy: bool,
    /// Client publications go through the backend's publish proxy (in
    /// place of the grant check), which may refuse or rewrite them; needs
    /// `proxy_publish_url`.
    pub publish_proxy: bool,
    /// How long a publish's `idempotencyKey` is remembered per channel.
    pub idempotency_window: Duration,
    /// Last-value channel: `subscribe` first delivers the newest
    /// publication (needs history).
    pub cache: bool,
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        NamespaceOptions {
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            presence: true,
            join_leave: true,
            client_publish: true,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            anonymous: true,
            acked: false,
            subscribe_proxy: false,
            publish_proxy: false,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
            cache: false,
        }
    }
}

/// The default `idempotency_window`.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);

/// Checks a namespace name: the channel charset minus `:`.
fn valid_namespace_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| crate::protocol::is_channel_byte(b) && b != b':')
}

/// The configured namespaces (`[namespaces.NAME]`), each over the default
/// namespace, validated; with `sys`, the server's own, unless configured.
pub(super) fn namespaces(
    configured: HashMap<String, NamespaceSettings>,
    default_namespace: &NamespaceOptions,
) -> Result<HashMap<String, NamespaceOptions>> {
    let mut namespaces = HashMap::new();
    for (name, ns) in configured {
        if !valid_namespace_name(&name) {
            return Err(Error::Config(format!(
                "namespaces.{name}: a namespace name is 1-64 channel characters without ':'"
            )));
        }
        let opts = NamespaceOptions {
            history_size: ns.history_size.unwrap_or(default_namespace.history_size),
            history_ttl: nonzero(
                &format!("namespaces.{name}.history_ttl"),
                ns.history_ttl
                    .map(|d| d.0)
                    .unwrap_or(default_namespace.history_ttl),
            )?,
            presence: ns.presence.unwrap_or(default_namespace.presence),
            join_leave: ns.join_leave.unwrap_or(default_namespace.join_leave),
            client_publish: ns
                .client_publish
                .unwrap_or(default_namespace.client_publish),
            slow_consumer: ns.slow_consumer.unwrap_or(default_namespace.slow_consumer),
            anonymous: ns.anonymous.unwrap_or(default_namespace.anonymous),
            acked: ns.acked.unwrap_or(false),
            subscribe_proxy: ns.subscribe_proxy.unwrap_or(false),
            publish_proxy: ns.publish_proxy.unwrap_or(false),
            idempotency_window: nonzero(
                &format!("namespaces.{name}.idempotency_window"),
                ns.idempotency_window
                    .map(|d| d.0)
                    .unwrap_or(default_namespace.idempotency_window),
            )?,
            cache: ns.cache.unwrap_or(false),
        };
        if opts.cache && opts.history_size == 0 {
            return Err(Error::Config(format!(
                "namespaces.{name}: cache (last-value channels) needs history (history_size > 0)"
            )));
        }
        if opts.acked && opts.history_size == 0 {
            return Err(Error::Config(format!(
                "namespaces.{name}: acked delivery needs history (history_size > 0)"
            )));
        }
        if opts.join_leave && !opts.presence {
            return Err(Error::Config(format!(
                "namespaces.{name}: join_leave needs presence"
            )));
        }
        namespaces.insert(name, opts);
    }
    // `sys` is where the server publishes its own figures: clients may
    // read it but not write it, unless the file configures it. A
    // last-value namespace: a new subscriber sees the figures at once.
    namespaces
        .entry("sys".to_string())
        .or_insert(NamespaceOptions {
            history_size: 60,
            history_ttl: Duration::from_secs(120),
            presence: false,
            join_leave: false,
            client_publish: false,
            slow_consumer: SlowConsumerPolicy::ConflateLatest,
            anonymous: true,
            acked: false,
            subscribe_proxy: false,
            publish_proxy: false,
            idempotency_window: default_namespace.idempotency_window,
            cache: true,
        });
    if default_namespace.join_leave && !default_namespace.presence {
        return Err(Error::Config(
            "join_leave needs presence (set join_leave = false too)".into(),
        ));
    }
    Ok(namespaces)
}
