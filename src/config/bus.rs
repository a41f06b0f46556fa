//! [`BusConfig`]: which bus connects the instances, parsed from `--bus`.

use std::str::FromStr;

use crate::error::{Error, Result};

/// The bus between instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusConfig {
    /// In-process: one instance, nothing to connect to.
    Memory,
    /// Redis (`redis://host:port[/db]`, `rediss://` for TLS), or a Redis
    /// Cluster (`redis+cluster://host:port,host:port[,…]`,
    /// `rediss+cluster://` for TLS).
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
                "bus: {why} (got {s:?}); expected memory, redis://host:port[/db], redis+cluster://host:port,host:port, nats://host:port or pubsub://PROJECT_ID"
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
            "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => {
                Ok(BusConfig::Redis { url: s.to_string() })
            }
            "nats" | "tls" => Ok(BusConfig::Nats { url: s.to_string() }),
            "pubsub" => Ok(BusConfig::PubSub {
                project: rest.trim_end_matches('/').to_string(),
            }),
            _ => bad("unknown scheme"),
        }
    }
}
