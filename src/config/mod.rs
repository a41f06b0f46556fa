//! Configuration: flags, environment variables and an optional TOML file.
//!
//! Precedence, highest first: command-line flag, environment variable, the
//! TOML file given with `--config`, the built-in default. Everything is
//! validated once, in [`Config::from_settings`], so a bad value stops the
//! server at start-up with a message naming the option.
//!
//! Here: [`Config`], what the server runs with, and its validation.
//! `settings` holds [`Settings`] (the flags and file keys) and its
//! layering, `namespace` the per-namespace options and their defaults,
//! `bus` the `--bus` URL, `duration` [`HumanDuration`], `validate` the
//! checks the others share. The submodules import one another only
//! downward (settings → namespace → duration, validate), never `mod`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::error::{Error, Result};

/// Take the first value that is set, else the default.
macro_rules! pick {
    ($s:expr, $default:expr) => {
        $s.unwrap_or($default)
    };
}

mod bus;
mod duration;
mod events;
mod namespace;
mod settings;
#[cfg(test)]
mod tests;
mod validate;

pub use bus::BusConfig;
pub use duration::HumanDuration;
pub use events::EventsConfig;
pub use namespace::{NamespaceOptions, NamespaceSettings};
pub use settings::Settings;
use validate::{message_limit, nonzero, positive};

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind.
    pub host: IpAddr,
    /// Port to bind; 0 lets the OS choose (tests).
    pub port: u16,
    /// This instance's id, unique among instances.
    pub instance_id: String,
    /// The bus between instances.
    pub bus: BusConfig,
    /// Prefix of the bus's keys, subjects and streams.
    pub bus_prefix: String,
    /// Pub/Sub topic shared by all instances.
    pub pubsub_topic: String,
    /// This instance's Pub/Sub subscription (its channel shards'
    /// subscriptions are named after it).
    pub pubsub_subscription: String,
    /// Number of Pub/Sub channel topics; the same on every instance, since
    /// it decides where each channel travels.
    pub pubsub_shards: u16,
    /// Expiry of a crashed instance's presence entries and client
    /// addresses on a shared bus; refreshed every third of it.
    pub presence_ttl: Duration,
    /// Largest accepted client message, in bytes.
    pub max_message_size: usize,
    /// Interval between pings to each client.
    pub ping_interval: Duration,
    /// How long a client may stay silent after a ping before it is removed.
    pub pong_timeout: Duration,
    /// Per-connection outbound queue bound, in frames.
    pub queue_max_messages: usize,
    /// Per-connection outbound queue bound, in bytes.
    pub queue_max_bytes: usize,
    /// Longest one write to a client may wait for its socket (see
    /// [`crate::bounded_write`]).
    pub write_timeout: Duration,
    /// Longest the shutdown waits for connections to end.
    pub drain_timeout: Duration,
    /// Clients are closed (1012) spread over this long at shutdown.
    pub drain_spread: Duration,
    /// Path of the diagnostic echo endpoint, if enabled.
    pub echo_path: Option<String>,
    /// Message size limit on the echo endpoint.
    pub echo_max_message_size: usize,
    /// permessage-deflate settings; `None` when compression is off.
    pub compression: Option<crate::ws::deflate::DeflateConfig>,
    /// Most subscriptions per connection.
    pub max_subscriptions: usize,
    // -- history channels and creation limit (issue 13) --
    /// Instance-wide budget of channel streams held in memory (memory and
    /// Pub/Sub buses): each costs memory even with nothing retained.
    pub history_max_channels: usize,
    /// New channels per minute one connection may create by publishing;
    /// 0 is unlimited. Stops one client from filling the budgets.
    pub channel_create_rate: u32,
    // -- end history channels and creation limit --
    /// Browser origins allowed to connect; empty allows any.
    pub allowed_origins: Vec<String>,
    /// Most WebSocket connections on this instance.
    pub max_connections: usize,
    /// JWT verification; `enabled()` is false without keys.
    pub auth: crate::auth::AuthConfig,
    /// Connections must authenticate.
    pub auth_required: bool,
    /// Unacknowledged publications are resent after this (acked namespaces).
    pub ack_timeout: Duration,
    /// Deadline for the first `auth` frame when auth is required.
    pub auth_timeout: Duration,
    /// Most connections per user on this instance.
    pub max_connections_per_user: usize,
    /// Key of the server HTTP API; `None` turns the API off.
    pub api_key: Option<crate::api_key::ApiKey>,
    /// Per-connection message rate (per second); 0 is unlimited.
    pub rate_limit: f64,
    /// Per-connection burst above the rate.
    pub rate_burst: u32,
    // -- client relay (issue 13) --
    /// Whether clients may `broadcast`: off, only the server API does.
    pub client_broadcast: bool,
    /// Whether clients may send `direct` messages: off, only the server
    /// API does.
    pub client_direct: bool,
    // -- end client relay --
    /// New connections admitted per second; 0 is unlimited.
    pub handshake_rate: f64,
    /// Burst of handshake admission.
    pub handshake_burst: u32,
    // --- Per-address limits, trusted proxies, metrics access.
    /// Most connections per client address (IPv6: per /64), from accept;
    /// 0 is unlimited. One address must not fill the instance.
    pub max_connections_per_ip: usize,
    /// New WebSocket connections per second per client address; 0 is
    /// unlimited. One address must not use up the instance's admission.
    pub handshake_rate_per_ip: f64,
    /// Burst of the per-address handshake admission.
    pub handshake_burst_per_ip: u32,
    /// Peers whose `X-Forwarded-For` names the client; empty believes no
    /// header, so that a client cannot pick its own address.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Trusted proxies send a PROXY protocol header first (an L4 load
    /// balancer cannot add `X-Forwarded-For`).
    pub proxy_protocol: bool,
    /// The metrics endpoints need the API key; `sys:metrics` is off.
    pub metrics_require_key: bool,
    /// `/readyz` follows the bus too (off: a bus outage must not empty the
    /// load balancer of every instance at once).
    pub ready_requires_bus: bool,
    /// Whether a subscribed publisher gets its own publication.
    pub channel_echo: bool,
    /// Refuse channels in namespaces that are not configured.
    pub strict_namespaces: bool,
    /// Serve demo pages, /client.js and the `sys:metrics` channel.
    pub demo: bool,
    // -- history budget (issue 13) --
    /// Instance-wide budget of retained history bytes, so that history
    /// cannot grow without bound: the NATS stream's `max_bytes`; on Redis
    /// the operator's `maxmemory` is the bound (see `broker::redis`).
    pub history_max_bytes: u64,
    // -- end history budget --
    /// The backend proxies (issue 17); each off without its URL.
    pub proxy: crate::proxy::ProxyConfig,
    // -- lifecycle events (issue 17) --
    /// The lifecycle-event webhook; `None` (the default) sends none.
    pub events: Option<EventsConfig>,
    // -- end lifecycle events --
    /// Options of channels without a configured namespace.
    pub default_namespace: NamespaceOptions,
    /// Options per configured namespace.
    pub namespaces: HashMap<String, NamespaceOptions>,
}

impl Default for Config {
    fn default() -> Self {
        Config::from_settings(Settings::default()).expect("defaults are valid")
    }
}

/// The default namespace's options: the top-level keys (`history_size`,
/// `presence`, …) over the built-in defaults.
fn default_namespace(s: &Settings) -> Result<NamespaceOptions> {
    Ok(NamespaceOptions {
        history_size: pick!(s.history_size, 100),
        history_ttl: nonzero(
            "history_ttl",
            pick!(s.history_ttl, HumanDuration(Duration::from_secs(300))).0,
        )?,
        presence: pick!(s.presence, true),
        join_leave: pick!(s.join_leave, true),
        client_publish: pick!(s.client_publish, true),
        slow_consumer: s.slow_consumer.unwrap_or_default(),
        anonymous: pick!(s.anonymous, true),
        acked: false,
        idempotency_window: nonzero(
            "idempotency_window",
            pick!(
                s.idempotency_window,
                HumanDuration(namespace::DEFAULT_IDEMPOTENCY_WINDOW)
            )
            .0,
        )?,
        cache: false,
        subscribe_proxy: false,
        publish_proxy: false,
    })
}

/// The backend proxies' options (issue 17).
fn proxy(s: &Settings) -> Result<crate::proxy::ProxyConfig> {
    use crate::proxy::parse_url;
    let defaults = crate::proxy::ProxyConfig::default();
    Ok(crate::proxy::ProxyConfig {
        connect_url: parse_url("proxy_connect_url", s.proxy_connect_url.clone())?,
        subscribe_url: parse_url("proxy_subscribe_url", s.proxy_subscribe_url.clone())?,
        publish_url: parse_url("proxy_publish_url", s.proxy_publish_url.clone())?,
        rpc_url: parse_url("proxy_rpc_url", s.proxy_rpc_url.clone())?,
        refresh_url: parse_url("proxy_refresh_url", s.proxy_refresh_url.clone())?,
        connect_always: pick!(s.proxy_connect_always, false),
        timeout: nonzero(
            "proxy_timeout",
            s.proxy_timeout.map_or(defaults.timeout, |d| d.0),
        )?,
        headers: crate::proxy::parse_headers(s.proxy_headers.clone().unwrap_or_default())?,
        max_in_flight: positive(
            "proxy_max_in_flight",
            pick!(s.proxy_max_in_flight, defaults.max_in_flight),
        )?,
    })
}

impl Config {
    /// Validate layered settings into a configuration.
    pub fn from_settings(s: Settings) -> Result<Config> {
        let default_namespace = default_namespace(&s)?;
        let proxy = proxy(&s)?;
        let namespaces = namespace::namespaces(s.namespaces, &default_namespace)?;
        for (name, ns) in &namespaces {
            if ns.subscribe_proxy && proxy.subscribe_url.is_none() {
                return Err(Error::Config(format!(
                    "namespaces.{name}: subscribe_proxy needs proxy_subscribe_url"
                )));
            }
            if ns.publish_proxy && proxy.publish_url.is_none() {
                return Err(Error::Config(format!(
                    "namespaces.{name}: publish_proxy needs proxy_publish_url"
                )));
            }
        }
        let instance_id = s
            .instance_id
            .or_else(|| std::env::var("GAE_INSTANCE").ok())
            .or_else(|| std::env::var("SWITCHBOARD_INSTANCE_ID").ok())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("sb-{}", crate::ids::random_base36(8)));
        let echo_path = match s.echo_path {
            Some(p) if !p.starts_with('/') || p.len() < 2 => {
                return Err(Error::Config(format!(
                    "echo_path must start with '/' and not be '/' (got {p:?})"
                )));
            }
            other => other,
        };
        let bus: BusConfig = pick!(s.bus, "memory".into()).parse()?;
        let bus_prefix = pick!(s.bus_prefix, "switchboard".into());
        if bus_prefix.is_empty()
            || !bus_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::Config(format!(
                "bus_prefix must be letters, digits, '-' or '_' (got {bus_prefix:?})"
            )));
        }
        if s.auth_required == Some(true)
            && s.auth_hs256_secret_file.is_none()
            && s.auth_public_key_file.is_none()
            && s.auth_jwks_file.is_none()
        {
            return Err(Error::Config(
                "auth_required needs a key: auth_hs256_secret_file, auth_public_key_file or auth_jwks_file".into(),
            ));
        }
        let events = EventsConfig::from_settings(
            s.events_url,
            s.events_secret_file,
            s.events_grace,
            s.events_max_age,
            &bus,
        )?;
        let drain_timeout = pick!(s.drain_timeout, HumanDuration(Duration::from_secs(30))).0;
        let pubsub_topic = pick!(s.pubsub_topic, "switchboard-messages".into());
        let pubsub_subscription = s
            .pubsub_subscription
            .unwrap_or_else(|| format!("switchboard-{instance_id}"));
        Ok(Config {
            host: pick!(s.host, IpAddr::from([0, 0, 0, 0])),
            port: pick!(s.port, 8080),
            instance_id,
            bus,
            bus_prefix,
            pubsub_topic,
            pubsub_subscription,
            pubsub_shards: match s.pubsub_shards.unwrap_or(32) {
                n @ 1..=1024 => n,
                n => {
                    return Err(Error::Config(format!(
                        "pubsub_shards: {n} is out of range (1 to 1024)"
                    )));
                }
            },
            presence_ttl: nonzero(
                "presence_ttl",
                pick!(s.presence_ttl, HumanDuration(Duration::from_secs(30))).0,
            )?,
            max_message_size: message_limit(
                "max_message_size",
                pick!(s.max_message_size, 64 * 1024),
            )?,
            ping_interval: nonzero(
                "ping_interval",
                pick!(s.ping_interval, HumanDuration(Duration::from_secs(30))).0,
            )?,
            pong_timeout: nonzero(
                "pong_timeout",
                pick!(s.pong_timeout, HumanDuration(Duration::from_secs(30))).0,
            )?,
            queue_max_messages: positive("queue_max_messages", pick!(s.queue_max_messages, 1024))?,
            queue_max_bytes: positive("queue_max_bytes", pick!(s.queue_max_bytes, 4 << 20))?,
            write_timeout: nonzero(
                "write_timeout",
                pick!(s.write_timeout, HumanDuration(Duration::from_secs(10))).0,
            )?,
            drain_timeout,
            drain_spread: match s.drain_spread {
                Some(d) if d.0 > drain_timeout => {
                    return Err(Error::Config(format!(
                        "drain_spread ({d}) must not exceed drain_timeout ({})",
                        HumanDuration(drain_timeout)
                    )));
                }
                Some(d) => d.0,
                None => drain_timeout / 2,
            },
            echo_path,
            echo_max_message_size: message_limit(
                "echo_max_message_size",
                pick!(s.echo_max_message_size, 16 << 20),
            )?,
            compression: match pick!(s.compression, false) {
                false => None,
                true => Some(crate::ws::deflate::DeflateConfig {
                    context_takeover: pick!(s.compression_context_takeover, false),
                    threshold: pick!(s.compression_threshold, 128),
                    level: match pick!(s.compression_level, 1) {
                        l @ 1..=9 => l,
                        l => {
                            return Err(Error::Config(format!(
                                "compression_level must be 1 to 9 (got {l})"
                            )));
                        }
                    },
                }),
            },
            max_subscriptions: positive("max_subscriptions", pick!(s.max_subscriptions, 128))?,
            // history channels and creation limit (issue 13)
            history_max_channels: positive(
                "history_max_channels",
                pick!(s.history_max_channels, 100_000),
            )?,
            channel_create_rate: pick!(s.channel_create_rate, 60),
            allowed_origins: s
                .allowed_origins
                .unwrap_or_default()
                .into_iter()
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            max_connections: positive("max_connections", pick!(s.max_connections, 100_000))?,
            rate_limit: match pick!(s.rate_limit, 100.0) {
                r if r.is_finite() && r >= 0.0 => r,
                r => return Err(Error::Config(format!("rate_limit must be >= 0 (got {r})"))),
            },
            rate_burst: pick!(s.rate_burst, 200).max(1),
            handshake_rate: match pick!(s.handshake_rate, 5000.0) {
                r if r.is_finite() && r >= 0.0 => r,
                r => {
                    return Err(Error::Config(format!(
                        "handshake_rate must be >= 0 (got {r})"
                    )));
                }
            },
            handshake_burst: s
                .handshake_burst
                .unwrap_or_else(|| pick!(s.handshake_rate, 5000.0).clamp(1.0, 1e6) as u32)
                .max(1),
            auth: crate::auth::AuthConfig {
                hs256_secret_file: s.auth_hs256_secret_file,
                public_key_file: s.auth_public_key_file,
                jwks_file: s.auth_jwks_file,
                audience: s.auth_audience,
                issuer: s.auth_issuer,
            },
            auth_required: pick!(s.auth_required, false),
            ack_timeout: nonzero(
                "ack_timeout",
                pick!(s.ack_timeout, HumanDuration(Duration::from_secs(10))).0,
            )?,
            auth_timeout: nonzero(
                "auth_timeout",
                pick!(s.auth_timeout, HumanDuration(Duration::from_secs(5))).0,
            )?,
            max_connections_per_user: positive(
                "max_connections_per_user",
                pick!(s.max_connections_per_user, 100),
            )?,
            // Per-address limits, trusted proxies, metrics access.
            max_connections_per_ip: pick!(s.max_connections_per_ip, 256),
            handshake_rate_per_ip: match pick!(s.handshake_rate_per_ip, 20.0) {
                r if r.is_finite() && r >= 0.0 => r,
                r => {
                    return Err(Error::Config(format!(
                        "handshake_rate_per_ip must be >= 0 (got {r})"
                    )));
                }
            },
            handshake_burst_per_ip: pick!(s.handshake_burst_per_ip, 50).max(1),
            trusted_proxies: crate::client_addr::parse_cidrs(
                "trusted_proxies",
                s.trusted_proxies.clone().unwrap_or_default(),
            )?,
            proxy_protocol: match (
                pick!(s.proxy_protocol, false),
                s.trusted_proxies.as_deref().unwrap_or_default().is_empty(),
            ) {
                (true, true) => {
                    return Err(Error::Config(
                        "proxy_protocol needs trusted_proxies (the peers that send the header)"
                            .into(),
                    ));
                }
                (on, _) => on,
            },
            metrics_require_key: match (pick!(s.metrics_require_key, false), &s.api_key_file) {
                (true, None) => {
                    return Err(Error::Config(
                        "metrics_require_key needs api_key_file (the key it requires)".into(),
                    ));
                }
                (on, _) => on,
            },
            ready_requires_bus: pick!(s.ready_requires_bus, false),
            api_key: s
                .api_key_file
                .as_deref()
                .map(crate::api_key::ApiKey::from_file)
                .transpose()?,
            channel_echo: pick!(s.channel_echo, true),
            // client relay (issue 13)
            client_broadcast: pick!(s.client_broadcast, true),
            client_direct: pick!(s.client_direct, true),
            strict_namespaces: pick!(s.strict_namespaces, false),
            demo: pick!(s.demo, true),
            // history budget (issue 13)
            history_max_bytes: match pick!(s.history_max_bytes, 256 << 20) {
                0 => {
                    return Err(Error::Config(
                        "history_max_bytes must be greater than 0".into(),
                    ));
                }
                n => n,
            },
            proxy,
            events,
            default_namespace,
            namespaces,
        })
    }

    /// The options that apply to `channel` (already validated), or `None`
    /// when its namespace is unknown and `strict_namespaces` is on.
    pub fn namespace_of(&self, channel: &str) -> Option<&NamespaceOptions> {
        match channel.split_once(':') {
            Some((ns, _)) => match self.namespaces.get(ns) {
                Some(opts) => Some(opts),
                None if self.strict_namespaces => None,
                None => Some(&self.default_namespace),
            },
            None => Some(&self.default_namespace),
        }
    }
}
