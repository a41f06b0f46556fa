//! Switchboard: a real-time WebSocket server.
//!
//! It speaks the wire protocol of the App Engine Flex WebSocket tutorial
//! (`broadcast`, `direct`, `connected`) and adds channels, presence, history
//! with recovery after reconnect, keep-alive that removes dead peers, bounded
//! queues and graceful drain. See `docs/protocol.md` for every frame and
//! `ARCHITECTURE.md` for the message path.
//!
//! # Layout
//!
//! * [`config`]: every option, from flags, environment and an optional TOML
//!   file, validated once at start-up.
//! * [`server`]: the HTTP router (WebSocket upgrades, `/`, `/_ah/health`,
//!   `/metrics`, `/livez`, `/readyz`), [`server::run`] with its shutdown
//!   broadcast and the drain that waits for every connection task.
//! * [`session`]: one WebSocket connection: its read loop, its writer, its
//!   subscriptions. Generic over `Sink`/`Stream` so it can be driven by
//!   channels in unit tests. Set-up (`open`), the idle future (`live`),
//!   writing (`write`), request handlers (`handlers`), acknowledged
//!   delivery (`acked`) and the backend proxies' hooks (`proxied`) each
//!   have a file.
//! * [`ws`]: our RFC 6455 layer: the upgrade, frames, permessage-deflate
//!   ([`ws::deflate`]) and [`ws::WebSocket`], the `Stream`/`Sink` over TCP.
//! * [`protocol`]: parsing client frames into [`protocol::Request`] and
//!   encoding server frames, each encoded once and shared by all recipients.
//! * [`node`]: the [`node::Node`] handle: owns the [`hub::Hub`] and the
//!   backend ([`broker::Broker`], [`broker::PresenceStore`]) and implements
//!   broadcast, direct, publish, subscribe, presence and history.
//! * [`hub`]: the local connections and the channel → subscriber index;
//!   non-blocking fan-out into each client's [`queue::OutQueue`].
//! * [`queue`]: the bounded per-connection outbound queue; it holds no
//!   allocation while empty.
//! * [`broker`]: the narrow backend traits and their guarantees, and the
//!   in-memory implementation (the default).
//! * [`create_limit`]: the per-connection limit on creating channels.
//! * [`admission`]: per-address connection counts and handshake buckets,
//!   bounded; the rate-limited log of refused connections.
//! * [`refusal_log`]: refused connections and handshakes, logged at most
//!   once per 5 s with a count of the others.
//! * [`client_addr`]: the client address: the TCP peer, or behind
//!   `trusted_proxies` the right-most untrusted `X-Forwarded-For` hop.
//! * [`limits`]: the token bucket behind the rate limit and handshake
//!   admission.
//! * [`bounded_write`]: every wait on a client's socket has a deadline
//!   (`write_timeout`) and gives way to the connection's close requests.
//! * [`log_limit`]: at most one log line per interval for events a client
//!   can cause at will.
//! * [`logging`]: the log subscriber: text (colour only on a terminal) or
//!   JSON in Cloud Logging's shape.
//! * [`keepalive`]: one shared sweeper that pings every client and removes
//!   dead peers, instead of a timer per connection.
//! * [`metrics`]: the counters (plain atomics) and the delivery-latency
//!   histogram.
//! * [`figures`]: `figures::COUNTERS`, the one table of every figure that
//!   `/metrics`, `/metrics/prometheus` and the `sys:metrics` feed render.
//! * [`prometheus`]: the table in the Prometheus text format.
//! * [`assets`]: the embedded JavaScript client and demo pages.
//! * [`auth`]: JWT verification and channel grants.
//! * [`proxy`]: the backend proxies (connect, subscribe, publish, rpc,
//!   refresh): HTTP calls to the application's backend, bounded in time
//!   and in number; the session asks them (`session::proxied`).
//! * [`relay`]: who may `broadcast` and `direct` to other clients, and
//!   what a refreshed token no longer grants.
//! * [`events`]: lifecycle events (webhooks): connect, disconnect,
//!   subscribe, user online/offline…, durable on the bus, delivered in
//!   signed batches by one instance at a time.
//! * [`api`]: the server HTTP API for backends (`/api/publish`, `/api/broadcast`,
//!   `/api/direct`, `/api/presence/{channel}`, `/api/disconnect`), behind an API key.
//! * [`api_key`]: that key, read from its file and compared in constant time.
//! * [`ids`]: random identifiers (client ids, epochs, instance ids).
//! * [`inbox`]: the inboxes of SSE connections: session id → the frames
//!   posted for it, bounded.
//! * [`sse`]: the Server-Sent Events transport (`GET /sse`,
//!   `POST /sse/send`): a session whose frames arrive by POST and leave
//!   as events of a streaming response.
//! * [`sync`]: std locks that recover from a poisoned lock (one place
//!   for the recovery, and why).
//! * [`error`]: client-visible error codes and close codes.
//!
//! Imports point down only: no module imports one that imports it back
//! (`scripts/module-graph` lists the edges and any cycle). At the bottom
//! `error`, `ids`, `protocol`, `queue`; then `hub`, `proxy`, `config`, `broker`,
//! `events`; `node` above those; `session`, `api`, `keepalive`, `relay` above the
//! node; `server` on top.

#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod api_key;
pub mod assets;
pub mod auth;
pub mod bounded_write;
pub mod broker;
pub mod client_addr;
pub mod config;
pub mod create_limit;
pub mod error;
pub mod events;
pub mod figures;
pub mod hub;
pub mod ids;
pub mod inbox;
pub mod keepalive;
pub mod limits;
pub mod log_limit;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod prometheus;
pub mod protocol;
pub mod proxy;
pub mod queue;
pub mod refusal_log;
pub mod relay;
pub mod server;
pub mod session;
pub mod sse;
pub mod sync;
pub mod ws;

pub use config::Config;
pub use error::{ErrorCode, Result};
pub use node::Node;
