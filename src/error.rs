//! Errors: the client-visible error codes of `docs/protocol.md`, the close
//! codes, and the crate's own error type for start-up and backend failures.

use std::fmt;
use std::time::Duration;

use crate::log_limit::LogLimit;
use crate::protocol::StreamPosition;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A code sent to the client in an `error` frame. The string forms are part
/// of the wire protocol: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidJson,
    InvalidFrame,
    UnknownType,
    BinaryNotSupported,
    UnknownTarget,
    BadChannel,
    UnknownNamespace,
    NotSubscribed,
    AlreadySubscribed,
    TooManySubscriptions,
    HistoryDisabled,
    PresenceDisabled,
    PublishNotAllowed,
    BusUnavailable,
    RateLimited,
    /// The connection created channels faster than `channel_create_rate`.
    ChannelLimit,
    InvalidToken,
    TokenExpired,
    PermissionDenied,
    /// A client-relayed frame was dropped for a recipient that is behind.
    RecipientBusy,
    /// Client `broadcast` is turned off (`client_broadcast = false`).
    BroadcastNotAllowed,
    /// Client `direct` is turned off (`client_direct = false`).
    DirectNotAllowed,
    /// A backend proxy gave no usable answer (timeout, not 200, malformed,
    /// unreachable); the request may be retried.
    ProxyUnavailable,
    /// `proxy_max_in_flight` backend calls were in flight on the instance.
    ProxyBusy,
    /// An `rpc` frame on a server without `proxy_rpc_url`.
    RpcNotAvailable,
    /// A conditional publish (`expectedOffset`) found another top offset;
    /// the error carries the current `offset` and `epoch`.
    OffsetMismatch,
    /// An `idempotencyKey` outside 1–128 bytes.
    InvalidIdempotencyKey,
    /// A repeated idempotency key whose first publication's position the
    /// bus no longer holds (NATS, after it left the stream): nothing was
    /// published again.
    Duplicate,
    /// The configured bus cannot give what the request asks (Pub/Sub:
    /// idempotent and conditional publish).
    Unsupported,
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidFrame => "invalid_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::UnknownTarget => "unknown_target",
            ErrorCode::BadChannel => "bad_channel",
            ErrorCode::UnknownNamespace => "unknown_namespace",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::HistoryDisabled => "history_disabled",
            ErrorCode::PresenceDisabled => "presence_disabled",
            ErrorCode::PublishNotAllowed => "publish_not_allowed",
            ErrorCode::BusUnavailable => "bus_unavailable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ChannelLimit => "channel_limit",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::RecipientBusy => "recipient_busy",
            ErrorCode::BroadcastNotAllowed => "broadcast_not_allowed",
            ErrorCode::DirectNotAllowed => "direct_not_allowed",
            ErrorCode::ProxyUnavailable => "proxy_unavailable",
            ErrorCode::ProxyBusy => "proxy_busy",
            ErrorCode::RpcNotAvailable => "rpc_not_available",
            ErrorCode::OffsetMismatch => "offset_mismatch",
            ErrorCode::InvalidIdempotencyKey => "invalid_idempotency_key",
            ErrorCode::Duplicate => "duplicate",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed request, as the client will see it in an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    /// Machine-readable code (see [`ErrorCode`]).
    pub code: ErrorCode,
    /// Human-readable explanation; not part of the contract.
    pub message: String,
    /// The channel's current top, for `offset_mismatch`.
    pub position: Option<StreamPosition>,
}

impl ClientError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ClientError {
            code,
            message: message.into(),
            position: None,
        }
    }

    /// A conditional publish that expected `expected` found `top`.
    pub fn offset_mismatch(expected: u64, top: StreamPosition) -> Self {
        ClientError {
            code: ErrorCode::OffsetMismatch,
            message: format!(
                "expected offset {expected}, the channel is at {}",
                top.offset
            ),
            position: Some(top),
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ClientError {}

/// WebSocket close codes used by Switchboard (see `docs/protocol.md`).
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// A message exceeded `max_message_size`.
    pub const TOO_BIG: u16 = 1009;
    /// Unexpected server error.
    pub const INTERNAL: u16 = 1011;
    /// The instance is draining; reconnect (elsewhere).
    pub const SERVICE_RESTART: u16 = 1012;
    /// The connection's outbound queue overflowed.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Authentication failed or was required and missing.
    pub const UNAUTHORIZED: u16 = 4001;
    /// The connection's token expired without a refresh; also a refusal
    /// by the connect or refresh proxy (with the backend's reason).
    pub const TOKEN_EXPIRED: u16 = 4003;
    /// The user already has `max_connections_per_user` connections.
    pub const TOO_MANY_USER_CONNECTIONS: u16 = 4030;
    /// The client kept sending over its rate limit.
    pub const RATE_LIMITED: u16 = 4029;
}

/// Errors of the server itself: configuration, I/O, backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; the message says which option and why.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Binding or serving failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The configured bus cannot be reached or refused an operation.
    #[error("bus unavailable: {0}")]
    Bus(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A request the client made cannot be served.
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl Error {
    /// How this error is reported to a client whose request caused it.
    ///
    /// A bus or internal error reaches the client as a fixed message: its
    /// detail (addresses, subjects, keys of the deployment) stays in the
    /// server log, at most one line per 10 s with a count of the others.
    pub fn to_client(&self) -> ClientError {
        static BUS: LogLimit = LogLimit::new(Duration::from_secs(10));
        static INTERNAL: LogLimit = LogLimit::new(Duration::from_secs(10));
        match self {
            Error::Client(e) => e.clone(),
            Error::Bus(e) => {
                match BUS.allow() {
                    Some(suppressed) => {
                        tracing::warn!(error = %e, suppressed, "request failed: bus unavailable")
                    }
                    None => tracing::debug!(error = %e, "request failed: bus unavailable"),
                }
                ClientError::new(
                    ErrorCode::BusUnavailable,
                    "the message bus is unavailable; try again",
                )
            }
            other => {
                match INTERNAL.allow() {
                    Some(suppressed) => {
                        tracing::warn!(error = %other, suppressed, "request failed: internal error")
                    }
                    None => tracing::debug!(error = %other, "request failed: internal error"),
                }
                ClientError::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}
