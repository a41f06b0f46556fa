//! [`Settings`]: every option as given (flags, environment, TOML file),
//! each optional so that the layers can be stacked with
//! [`Settings::layered_over`]; and [`HumanDuration`], how durations are
//! written.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

use super::duration::HumanDuration;
use super::namespace::NamespaceSettings;
use crate::error::{Error, Result};
use crate::logging::LogFormat;
use crate::queue::SlowConsumerPolicy;

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
    /// `redis://host:port[/db]`, `redis+cluster://host:port,host:port[,…]`
    /// (a Redis Cluster), `nats://host:port` or `pubsub://PROJECT_ID`
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
    /// Pub/Sub: channels are spread over this many topics
    /// (`<topic>-c<k>`), and an instance subscribes only to the ones its
    /// channels need; 1 to 1024, the same on every instance [default: 32].
    #[arg(long, env = "SWITCHBOARD_PUBSUB_SHARDS")]
    pub pubsub_shards: Option<u16>,
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
    /// `/readyz` also answers 503 while the bus is unreachable. Off by
    /// default: a shared bus's outage would take every instance out of the
    /// load balancer at once [default: false].
    #[arg(long, env = "SWITCHBOARD_READY_REQUIRES_BUS")]
    pub ready_requires_bus: Option<bool>,
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
    /// Default namespace: how long a publish's `idempotencyKey` is
    /// remembered per channel [default: 5m].
    #[arg(long, env = "SWITCHBOARD_IDEMPOTENCY_WINDOW")]
    pub idempotency_window: Option<HumanDuration>,
    // -- history budget (issue 13) --
    /// Instance-wide budget of retained history bytes: the NATS stream's
    /// `max_bytes` (oldest dropped first); the memory and Pub/Sub buses
    /// trim to it [default: 268435456].
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_BYTES")]
    pub history_max_bytes: Option<u64>,
    // -- end history budget --
    /// Log filter, e.g. `info`, `switchboard=debug` (RUST_LOG syntax)
    /// [default: info].
    #[arg(long, env = "RUST_LOG")]
    pub log: Option<String>,
    /// Log format: `text` (colour only on a terminal without `NO_COLOR`) or
    /// `json` (Cloud Logging's `severity`/`message`/`time`) [default: text].
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    // -- backend proxies (issue 17; src/proxy/) --
    /// URL the connect proxy is POSTed to: it decides who a connection
    /// without `?token=` is (off by default).
    #[arg(long, env = "SWITCHBOARD_PROXY_CONNECT_URL")]
    pub proxy_connect_url: Option<String>,
    /// URL of the subscribe proxy, asked in namespaces with
    /// `subscribe_proxy = true`.
    #[arg(long, env = "SWITCHBOARD_PROXY_SUBSCRIBE_URL")]
    pub proxy_subscribe_url: Option<String>,
    /// URL of the publish proxy, asked in namespaces with
    /// `publish_proxy = true`; it may replace the data.
    #[arg(long, env = "SWITCHBOARD_PROXY_PUBLISH_URL")]
    pub proxy_publish_url: Option<String>,
    /// URL of the RPC proxy, which answers the client's `rpc` frames.
    #[arg(long, env = "SWITCHBOARD_PROXY_RPC_URL")]
    pub proxy_rpc_url: Option<String>,
    /// URL of the refresh proxy, asked when a connection's credentials
    /// expire (else they end with close 4003).
    #[arg(long, env = "SWITCHBOARD_PROXY_REFRESH_URL")]
    pub proxy_refresh_url: Option<String>,
    /// Ask the connect proxy also when the connection presented a valid
    /// token [default: false].
    #[arg(long, env = "SWITCHBOARD_PROXY_CONNECT_ALWAYS")]
    pub proxy_connect_always: Option<bool>,
    /// Deadline of one proxy call [default: 1s].
    #[arg(long, env = "SWITCHBOARD_PROXY_TIMEOUT")]
    pub proxy_timeout: Option<HumanDuration>,
    /// Upgrade-request headers forwarded to the connect proxy
    /// (comma-separated names, e.g. `Cookie,Authorization`) [default: none].
    #[arg(long, env = "SWITCHBOARD_PROXY_HEADERS", value_delimiter = ',')]
    pub proxy_headers: Option<Vec<String>>,
    /// Most proxy calls in flight on this instance; beyond it a request
    /// gets `proxy_busy` [default: 1000].
    #[arg(long, env = "SWITCHBOARD_PROXY_MAX_IN_FLIGHT")]
    pub proxy_max_in_flight: Option<usize>,
    // -- end backend proxies --
    // -- lifecycle events (issue 17) --
    /// Backend URL that lifecycle events (connect, disconnect, subscribe,
    /// user_online, …) are POSTed to in signed batches; off without it.
    #[arg(long, env = "SWITCHBOARD_EVENTS_URL")]
    pub events_url: Option<String>,
    /// File with the secret that signs every event delivery
    /// (`X-Switchboard-Signature`); required with `events_url`.
    #[arg(long, env = "SWITCHBOARD_EVENTS_SECRET_FILE")]
    pub events_secret_file: Option<std::path::PathBuf>,
    /// `channel_vacated` and `user_offline` wait this long and are not sent
    /// if the channel or user is back within it [default: 3s].
    #[arg(long, env = "SWITCHBOARD_EVENTS_GRACE")]
    pub events_grace: Option<HumanDuration>,
    /// How long an undelivered event is retried before it is dead-lettered
    /// [default: 24h].
    #[arg(long, env = "SWITCHBOARD_EVENTS_MAX_AGE")]
    pub events_max_age: Option<HumanDuration>,
    // -- end lifecycle events --
    /// Per-namespace options; only in the TOML file (`[namespaces.chat]`).
    #[arg(skip)]
    pub namespaces: HashMap<String, NamespaceSettings>,
}

impl Settings {
    /// Fill every unset field of `self` from `lower` (a lower-precedence layer).
    pub fn layered_over(mut self, lower: Settings) -> Settings {
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = lower.$f; } )* };
        }
        // Every field but `namespaces`; the test `layering_keeps_every_field`
        // (config/tests.rs) fails when one is missing here.
        fill!(
            host,
            port,
            instance_id,
            bus,
            bus_prefix,
            pubsub_topic,
            pubsub_subscription,
            pubsub_shards,
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
            idempotency_window,
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
            metrics_require_key,
            ready_requires_bus,
            log,
            log_format,
            // backend proxies (issue 17)
            proxy_connect_url,
            proxy_subscribe_url,
            proxy_publish_url,
            proxy_rpc_url,
            proxy_refresh_url,
            proxy_connect_always,
            proxy_timeout,
            proxy_headers,
            proxy_max_in_flight,
            // lifecycle events (issue 17)
            events_url,
            events_secret_file,
            events_grace,
            events_max_age
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
