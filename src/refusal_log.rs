//! The rate-limited log of refused connections and handshakes: under
//! attack every refusal would otherwise be a log line. A
//! [`LogLimit`](crate::log_limit::LogLimit) lets one line through per
//! [`RefusalLog::EVERY`], carrying the number of refusals left unlogged
//! since the previous one.

use std::net::IpAddr;
use std::time::Duration;

use crate::log_limit::LogLimit;

/// Logs refused connections and handshakes at most once per
/// [`RefusalLog::EVERY`], with the number left unlogged since.
pub struct RefusalLog {
    /// The shared rate-limited-line mechanism.
    limit: LogLimit,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog::new()
    }
}

impl RefusalLog {
    /// Least time between two lines.
    pub const EVERY: Duration = Duration::from_secs(5);

    pub fn new() -> RefusalLog {
        RefusalLog {
            limit: LogLimit::new(Self::EVERY),
        }
    }

    /// Log a refusal (rate-limited): `status` is the HTTP status (0 when
    /// the connection was closed at accept), `client` the address.
    pub fn refused(&self, status: u16, why: &str, client: IpAddr) {
        match self.limit.allow() {
            Some(suppressed) => {
                tracing::info!(status, why, %client, suppressed, "connection refused")
            }
            None => tracing::debug!(status, why, %client, "connection refused"),
        }
    }
}
