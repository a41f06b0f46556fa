//! Configuration: flags, environment variables and an optional TOML file.
//!
//! Precedence, highest first: command-line flag, environment variable, the
//! TOML file given with `--config`, the built-in default. Everything is
//! validated once, in [`Config::from_settings`], so a bad value stops the
//! server at start-up with a message naming the option.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::queue::SlowConsumerPolicy;
// moved: re-export until the callers are updated
pub use crate::ids::random_base36;

/// A duration written the human way (`30s`, `5m`, `250ms`), usable both as
/// a flag value and in the TOML file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = humantime::DurationError;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        humantime::parse_duration(s).map(HumanDuration)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// Every setting, each optional so that flags, environment and file can be
/// layered. The same struct is parsed by clap and deserialized from TOML,
/// so the file's keys are the flags' names with `_` for `-`.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address to bind [default: 0.0.0.0].
    #[arg(long, env = "SWITCHBOARD_HOST")]
    pub host: Option<IpAddr>,
    /// Port to serve HTTP and WebSocket on; 0 picks a free one [default: 8080].
    #[arg(long, env = "PORT")]
    pub port: Option<u16>,
    /// Instance id reported in `/metrics` and `connected`. Without it:
    /// `GAE_INSTANCE`, then `SWITCHBOARD_INSTANCE_ID`, then a random id.
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Message bus between instances: `memory` (one instance),
    /// `redis://host:port[/db]`, `nats://host:port` or `pubsub://PROJECT_ID`
    /// [default: memory].
    #[arg(long, env = "SWITCHBOARD_BUS")]
    pub bus: Option<String>,
    /// Prefix of every key, subject or stream the bus uses, so several
    /// deployments (or tests) can share one Redis/NATS [default: switchboard].
    #[arg(long, env = "SWITCHBOARD_BUS_PREFIX")]
    pub bus_prefix: Option<String>,
    /// Pub/Sub topic shared by all instances [default: switchboard-messages].
    #[arg(long, env = "SWITCHBOARD_PUBSUB_TOPIC")]
    pub pubsub_topic: Option<String>,
    /// This instance's Pub/Sub subscription, created at start and deleted at
    /// clean shutdown [default: switchboard-<instance id>].
    #[arg(long, env = "SWITCHBOARD_PUBSUB_SUBSCRIPTION")]
    pub pubsub_subscription: Option<String>,
    /// With a shared bus: how long the presence entries (and the direct-
    /// message address) of an instance that stopped without cleaning up
    /// stay visible; they are refreshed every third of it [default: 30s].
    #[arg(long, env = "SWITCHBOARD_PRESENCE_TTL")]
    pub presence_ttl: Option<HumanDuration>,
    /// Largest client message in bytes; larger ones close the connection
    /// with 1009 [default: 65536].
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<usize>,
    /// Interval between WebSocket pings to each client [default: 30s].
    #[arg(long, env = "SWITCHBOARD_PING_INTERVAL")]
    pub ping_interval: Option<HumanDuration>,
    /// How long after a ping a silent client is removed [default: 30s].
    #[arg(long, env = "SWITCHBOARD_PONG_TIMEOUT")]
    pub pong_timeout: Option<HumanDuration>,
    /// Most frames queued for one client before it is closed as a slow
    /// consumer (4008) [default: 1024].
    #[arg(long, env = "SWITCHBOARD_QUEUE_MAX_MESSAGES")]
    pub queue_max_messages: Option<usize>,
    /// Most bytes queued for one client before it is closed as a slow
    /// consumer (4008) [default: 4194304].
    #[arg(long, env = "SWITCHBOARD_QUEUE_MAX_BYTES")]
    pub queue_max_bytes: Option<usize>,
    /// How long one write to a client may wait for its socket (a batch of
    /// queued messages, or one reply, recovered or resent message); the
    /// connection is then dropped without a close frame [default: 10s].
    #[arg(long, env = "SWITCHBOARD_WRITE_TIMEOUT")]
    pub write_timeout: Option<HumanDuration>,
    /// On SIGTERM/SIGINT, how long to wait for connections to close [default: 30s].
    #[arg(long, env = "SWITCHBOARD_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<HumanDuration>,
    /// On SIGTERM/SIGINT, clients are asked to reconnect (close 1012) spread
    /// over this long [default: half the drain timeout].
    #[arg(long, env = "SWITCHBOARD_DRAIN_SPREAD")]
    pub drain_spread: Option<HumanDuration>,
    /// Serve a diagnostic echo WebSocket at this path (off by default), for
    /// the Autobahn conformance suite.
    #[arg(long, env = "SWITCHBOARD_ECHO_PATH")]
    pub echo_path: Option<String>,
    /// Largest message on the echo endpoint [default: 16777216].
    #[arg(long, env = "SWITCHBOARD_ECHO_MAX_MESSAGE_SIZE")]
    pub echo_max_message_size: Option<usize>,
    /// Accept permessage-deflate when a client offers it [default: false].
    #[arg(long, env = "SWITCHBOARD_COMPRESSION")]
    pub compression: Option<bool>,
    /// Keep the compression window between messages (better ratio, about
    /// 300 KiB more per compressing connection; see BENCHMARKS.md)
    /// [default: false, i.e. no_context_takeover both ways].
    #[arg(long, env = "SWITCHBOARD_COMPRESSION_CONTEXT_TAKEOVER")]
    pub compression_context_takeover: Option<bool>,
    /// Messages shorter than this many bytes are sent uncompressed [default: 128].
    #[arg(long, env = "SWITCHBOARD_COMPRESSION_THRESHOLD")]
    pub compression_threshold: Option<usize>,
    /// zlib compression level, 1 (fast) to 9 (small) [default: 1].
    #[arg(long, env = "SWITCHBOARD_COMPRESSION_LEVEL")]
    pub compression_level: Option<u32>,
    /// Most channels one connection may subscribe to [default: 128].
    #[arg(long, env = "SWITCHBOARD_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<usize>,
    // -- history channels and creation limit (issue 13) --
    /// Memory and Pub/Sub buses: instance-wide budget of channel streams
    /// (with history, or only their epoch and offset); beyond it, or beyond
    /// `history_max_bytes`, the least recently published are evicted
    /// [default: 100000].
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_CHANNELS")]
    pub history_max_channels: Option<usize>,
    /// New channels one connection may bring into existence by publishing,
    /// per minute; 0 turns the limit off [default: 60].
    #[arg(long, env = "SWITCHBOARD_CHANNEL_CREATE_RATE")]
    pub channel_create_rate: Option<u32>,
    // -- end history channels and creation limit --
    /// Whether a subscribed publisher receives its own publication [default: true].
    #[arg(long, env = "SWITCHBOARD_CHANNEL_ECHO")]
    pub channel_echo: Option<bool>,
    /// Refuse channels whose namespace is not configured [default: false].
    #[arg(long, env = "SWITCHBOARD_STRICT_NAMESPACES")]
    pub strict_namespaces: Option<bool>,
    /// Browser origins allowed to open a WebSocket (comma-separated, e.g.
    /// `https://app.example.com`); empty allows any. Requests without an
    /// `Origin` header (non-browser clients) are always allowed.
    #[arg(long, env = "SWITCHBOARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Most WebSocket connections on this instance; beyond it upgrades get
    /// HTTP 503 [default: 100000].
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Messages per second one connection may send (token bucket); 0 turns
    /// the limit off [default: 100].
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT")]
    pub rate_limit: Option<f64>,
    /// New WebSocket connections admitted per second (reconnect-storm
    /// control); beyond it upgrades get HTTP 503 with `Retry-After`. 0
    /// turns it off [default: 5000].
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_RATE")]
    pub handshake_rate: Option<f64>,
    /// Burst of handshake admission [default: the rate].
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_BURST")]
    pub handshake_burst: Option<u32>,
    /// Burst of the per-connection rate limit [default: 200].
    #[arg(long, env = "SWITCHBOARD_RATE_BURST")]
    pub rate_burst: Option<u32>,
    /// File with an HS256 secret for verifying JWTs (turns auth on).
    #[arg(long, env = "SWITCHBOARD_AUTH_HS256_SECRET_FILE")]
    pub auth_hs256_secret_file: Option<std::path::PathBuf>,
    /// File with an RS256 (RSA) or ES256 (EC P-256) public key in PEM for
    /// verifying JWTs (turns auth on).
    #[arg(long, env = "SWITCHBOARD_AUTH_PUBLIC_KEY_FILE")]
    pub auth_public_key_file: Option<std::path::PathBuf>,
    /// File with a JSON Web Key Set for verifying JWTs (turns auth on).
    #[arg(long, env = "SWITCHBOARD_AUTH_JWKS_FILE")]
    pub auth_jwks_file: Option<std::path::PathBuf>,
    /// Required `aud` of tokens.
    #[arg(long, env = "SWITCHBOARD_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,
    /// Required `iss` of tokens.
    #[arg(long, env = "SWITCHBOARD_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,
    /// Every connection must present a valid token (in `?token=` or a first
    /// `auth` frame) [default: false].
    #[arg(long, env = "SWITCHBOARD_AUTH_REQUIRED")]
    pub auth_required: Option<bool>,
    /// In acked namespaces, how long a publication may stay unacknowledged
    /// before it is sent again [default: 10s].
    #[arg(long, env = "SWITCHBOARD_ACK_TIMEOUT")]
    pub ack_timeout: Option<HumanDuration>,
    /// How long a connection may take to send its first `auth` frame when
    /// auth is required [default: 5s].
    #[arg(long, env = "SWITCHBOARD_AUTH_TIMEOUT")]
    pub auth_timeout: Option<HumanDuration>,
    /// Most connections one user (token `sub`) may hold on this instance
    /// [default: 100].
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<usize>,
    /// File with the key of the server HTTP API (`/api/*`; at least 16
    /// bytes, surrounding whitespace ignored). Without it the API is off.
    #[arg(long, env = "SWITCHBOARD_API_KEY_FILE")]
    pub api_key_file: Option<std::path::PathBuf>,
    // -- client relay (issue 13) --
    /// Clients may send the tutorial's `broadcast` (the server API always
    /// may) [default: true].
    #[arg(long, env = "SWITCHBOARD_CLIENT_BROADCAST")]
    pub client_broadcast: Option<bool>,
    /// Clients may send `direct` messages to a client id or, with a token
    /// granting it, to a user id (the server API always may) [default: true].
    #[arg(long, env = "SWITCHBOARD_CLIENT_DIRECT")]
    pub client_direct: Option<bool>,
    // -- end client relay --
    // --- Per-address limits, trusted proxies, metrics access (src/admission.rs,
    // src/client_addr.rs).
    /// Most connections one client address may hold (IPv6: per /64),
    /// counted from the TCP accept: HTTP connections that have not sent
    /// their request yet, WebSockets waiting for their `auth` frame and
    /// live WebSockets. Beyond it a new connection is closed at accept. 0
    /// turns it off [default: 256].
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// New WebSocket connections admitted per second from one client
    /// address; beyond it upgrades get HTTP 429 with `Retry-After`. 0 turns
    /// it off [default: 20].
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_RATE_PER_IP")]
    pub handshake_rate_per_ip: Option<f64>,
    /// Burst of the per-address handshake admission [default: 50].
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_BURST_PER_IP")]
    pub handshake_burst_per_ip: Option<u32>,
    /// Load balancers / reverse proxies whose `X-Forwarded-For` is believed
    /// (comma-separated CIDRs, e.g. `10.0.0.0/8,130.211.0.0/22`). Without
    /// it the header is ignored and the TCP peer is the client [default:
    /// none].
    #[arg(long, env = "SWITCHBOARD_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Connections from trusted proxies open with a PROXY protocol (v1 or
    /// v2) header naming the client; needs `trusted_proxies` [default:
    /// false].
    #[arg(long, env = "SWITCHBOARD_PROXY_PROTOCOL")]
    pub proxy_protocol: Option<bool>,
    /// `/metrics` and `/metrics/prometheus` require the API key (as `/api/*`
    /// does), and the `sys:metrics` channel is not published; needs
    /// `api_key_file` [default: false].
    #[arg(long, env = "SWITCHBOARD_METRICS_REQUIRE_KEY")]
    pub metrics_require_key: Option<bool>,
    /// Default namespace: connections without a token may use it
    /// [default: true].
    #[arg(long, env = "SWITCHBOARD_ANONYMOUS")]
    pub anonymous: Option<bool>,
    /// Serve the demo pages, the client at /client.js and the `sys:metrics`
    /// channel [default: true].
    #[arg(long, env = "SWITCHBOARD_DEMO")]
    pub demo: Option<bool>,
    /// Default namespace: publications kept per channel, 0 turns history off
    /// [default: 100].
    #[arg(long, env = "SWITCHBOARD_HISTORY_SIZE")]
    pub history_size: Option<usize>,
    /// Default namespace: how long a publication is kept [default: 5m].
    #[arg(long, env = "SWITCHBOARD_HISTORY_TTL")]
    pub history_ttl: Option<HumanDuration>,
    /// Default namespace: presence on [default: true].
    #[arg(long, env = "SWITCHBOARD_PRESENCE")]
    pub presence: Option<bool>,
    /// Default namespace: join/leave events on [default: true].
    #[arg(long, env = "SWITCHBOARD_JOIN_LEAVE")]
    pub join_leave: Option<bool>,
    /// Default namespace: clients may publish [default: true].
    #[arg(long, env = "SWITCHBOARD_CLIENT_PUBLISH")]
    pub client_publish: Option<bool>,
    /// Default namespace: what happens when a client's queue is full:
    /// `disconnect` (close 4008), `drop-oldest` or `conflate-latest`
    /// [default: disconnect].
    #[arg(long, env = "SWITCHBOARD_SLOW_CONSUMER")]
    pub slow_consumer: Option<SlowConsumerPolicy>,
    // -- history budget (issue 13) --
    /// Instance-wide budget of retained history bytes: the NATS stream's
    /// `max_bytes` (oldest dropped first); the memory and Pub/Sub buses
    /// trim to it [default: 268435456].
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_BYTES")]
    pub history_max_bytes: Option<u64>,
    // -- end history budget --
    /// Per-namespace options; only in the TOML file (`[namespaces.chat]`).
    #[arg(skip)]
    pub namespaces: HashMap<String, NamespaceSettings>,
}

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
        }
    }
}

/// The bus between instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusConfig {
    /// In-process: one instance, nothing to connect to.
    Memory,
    /// Redis (`redis://host:port[/db]`, `rediss://` for TLS).
    Redis { url: String },
    /// NATS with JetStream (`nats://host:port`).
    Nats { url: String },
    /// Google Cloud Pub/Sub (`pubsub://PROJECT_ID`); honours
    /// `PUBSUB_EMULATOR_HOST`.
    PubSub { project: String },
}

impl FromStr for BusConfig {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Err(Error::Config(format!(
                "bus: {why} (got {s:?}); expected memory, redis://host:port[/db], nats://host:port or pubsub://PROJECT_ID"
            )))
        };
        if s == "memory" || s.is_empty() {
            return Ok(BusConfig::Memory);
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return bad("not a URL");
        };
        if rest.is_empty() {
            return bad("nothing after the scheme");
        }
        match scheme {
            "redis" | "rediss" => Ok(BusConfig::Redis { url: s.to_string() }),
            "nats" | "tls" => Ok(BusConfig::Nats { url: s.to_string() }),
            "pubsub" => Ok(BusConfig::PubSub {
                project: rest.trim_end_matches('/').to_string(),
            }),
            _ => bad("unknown scheme"),
        }
    }
}

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
    /// This instance's Pub/Sub subscription.
    pub pubsub_subscription: String,
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

/// Take the first value that is set, else the default.
macro_rules! pick {
    ($s:expr, $default:expr) => {
        $s.unwrap_or($default)
    };
}

impl Settings {
    /// Fill every unset field of `self` from `lower` (a lower-precedence layer).
    pub fn layered_over(mut self, lower: Settings) -> Settings {
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = lower.$f; } )* };
        }
        fill!(
            host,
            port,
            instance_id,
            bus,
            bus_prefix,
            pubsub_topic,
            pubsub_subscription,
            presence_ttl,
            max_message_size,
            ping_interval,
            pong_timeout,
            queue_max_messages,
            queue_max_bytes,
            write_timeout,
            drain_timeout,
            drain_spread,
            echo_path,
            echo_max_message_size,
            compression,
            compression_context_takeover,
            compression_threshold,
            compression_level,
            max_subscriptions,
            // history channels and creation limit (issue 13)
            history_max_channels,
            channel_create_rate,
            channel_echo,
            strict_namespaces,
            allowed_origins,
            max_connections,
            rate_limit,
            rate_burst,
            // client relay (issue 13)
            client_broadcast,
            client_direct,
            handshake_rate,
            handshake_burst,
            demo,
            history_size,
            history_ttl,
            presence,
            join_leave,
            client_publish,
            slow_consumer,
            auth_hs256_secret_file,
            auth_public_key_file,
            auth_jwks_file,
            auth_audience,
            auth_issuer,
            auth_required,
            auth_timeout,
            max_connections_per_user,
            api_key_file,
            anonymous,
            ack_timeout,
            // history budget (issue 13)
            history_max_bytes,
            // Per-address limits, trusted proxies, metrics access.
            max_connections_per_ip,
            handshake_rate_per_ip,
            handshake_burst_per_ip,
            trusted_proxies,
            proxy_protocol,
            metrics_require_key
        );
        if self.namespaces.is_empty() {
            self.namespaces = lower.namespaces;
        }
        self
    }

    /// Read a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<Settings> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }
}

fn positive(name: &str, v: usize) -> Result<usize> {
    if v == 0 {
        return Err(Error::Config(format!("{name} must be greater than 0")));
    }
    Ok(v)
}

/// A message size limit: above 0 and at most 1 GiB (the WebSocket layer
/// keeps it in 32 bits; a larger message would be a design problem, not a
/// setting).
fn message_limit(name: &str, v: usize) -> Result<usize> {
    const MAX: usize = 1 << 30;
    if v > MAX {
        return Err(Error::Config(format!(
            "{name} must be at most {MAX} (1 GiB)"
        )));
    }
    positive(name, v)
}

fn nonzero(name: &str, d: Duration) -> Result<Duration> {
    if d.is_zero() {
        return Err(Error::Config(format!("{name} must be greater than 0")));
    }
    Ok(d)
}

/// Checks a namespace name: the channel charset minus `:`.
fn valid_namespace_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| crate::protocol::is_channel_byte(b) && b != b':')
}

impl Config {
    /// Validate layered settings into a configuration.
    pub fn from_settings(s: Settings) -> Result<Config> {
        let default_namespace = NamespaceOptions {
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
        };
        let mut namespaces = HashMap::new();
        for (name, ns) in s.namespaces {
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
            };
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
        // read it but not write it, unless the file configures it.
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
            });
        if default_namespace.join_leave && !default_namespace.presence {
            return Err(Error::Config(
                "join_leave needs presence (set join_leave = false too)".into(),
            ));
        }
        let instance_id = s
            .instance_id
            .or_else(|| std::env::var("GAE_INSTANCE").ok())
            .or_else(|| std::env::var("SWITCHBOARD_INSTANCE_ID").ok())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("sb-{}", random_base36(8)));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(c.port, 8080);
        assert_eq!(c.max_message_size, 65536);
        assert_eq!(c.ping_interval, Duration::from_secs(30));
        assert_eq!(c.bus, BusConfig::Memory);
        assert!(c.channel_echo);
    }

    #[test]
    fn flags_win_over_file() {
        let flags = Settings {
            port: Some(9000),
            ..Default::default()
        };
        let file: Settings = toml::from_str(
            "port = 7000\nmax_subscriptions = 3\n[namespaces.chat]\nhistory_size = 5\npresence = false\njoin_leave = false\n",
        )
        .unwrap();
        let c = Config::from_settings(flags.layered_over(file)).unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.max_subscriptions, 3);
        let chat = c.namespace_of("chat:room").unwrap();
        assert_eq!(chat.history_size, 5);
        assert!(!chat.presence);
        assert_eq!(c.namespace_of("other:x"), Some(&c.default_namespace));
    }

    #[test]
    fn bad_values_are_refused_with_the_option_name() {
        let err = toml::from_str::<Settings>("no_such_option = 1").unwrap_err();
        assert!(err.to_string().contains("no_such_option"));
        let s = Settings {
            bus: Some("carrier-pigeon://x".into()),
            ..Default::default()
        };
        assert_eq!(
            "redis://127.0.0.1:6379/2".parse::<BusConfig>().unwrap(),
            BusConfig::Redis {
                url: "redis://127.0.0.1:6379/2".into()
            }
        );
        assert_eq!(
            "pubsub://my-project".parse::<BusConfig>().unwrap(),
            BusConfig::PubSub {
                project: "my-project".into()
            }
        );
        assert!("redis://".parse::<BusConfig>().is_err());
        let err = Config::from_settings(s).unwrap_err().to_string();
        assert!(err.contains("bus"), "{err}");
        let s = Settings {
            max_subscriptions: Some(0),
            ..Default::default()
        };
        let err = Config::from_settings(s).unwrap_err().to_string();
        assert!(err.contains("max_subscriptions"), "{err}");
        let s = Settings {
            max_message_size: Some((1 << 30) + 1),
            ..Default::default()
        };
        let err = Config::from_settings(s).unwrap_err().to_string();
        assert!(
            err.contains("max_message_size") && err.contains("1 GiB"),
            "{err}"
        );
    }

    #[test]
    fn strict_namespaces_refuse_unknown_prefixes() {
        let s = Settings {
            strict_namespaces: Some(true),
            ..Default::default()
        };
        let c = Config::from_settings(s).unwrap();
        assert!(c.namespace_of("nope:x").is_none());
        assert!(c.namespace_of("plain").is_some());
    }
}
