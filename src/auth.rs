//! Authentication: optional JWTs on connect, and channel grants.
//!
//! A client presents a token either in the upgrade URL (`?token=…`) or in
//! a first frame `{"type":"auth","token":…}`; it may present a fresh one
//! at any time to extend its session. The token's `sub` becomes the
//! connection's `userId`; `exp` and `sub` are required, `nbf` is checked
//! when present, and a configured audience or issuer is **required**: a
//! token without `aud` (or `iss`) is refused like one with a wrong value,
//! so a token minted for another service with the same key does not pass.
//!
//! What a refused client is told is short and stable (`bad signature`,
//! `wrong audience`, `missing claim aud`, `the token has expired`, …); the
//! verifier's own error text goes to the server log only (debug level).
//!
//! Verification keys (any combination): an HS256 secret from a file, an
//! RS256 or ES256 public key in PEM from a file, or a JWKS file (keys
//! chosen by `kid`, algorithm from the JWK). Keys are read once at
//! start-up; a key that cannot be read stops the server.
//!
//! # Grants
//!
//! A token may carry a `channels` claim:
//!
//! ```json
//! {"sub":"user-42","exp":1764100000,
//!  "channels":{"subscribe":["chat:*","news"],"publish":["chat:*"]}}
//! ```
//!
//! A pattern is a channel name, a prefix ending in `*` (`chat:*` matches
//! every channel whose name starts with `chat:`), or `*` alone (every
//! channel). `subscribe` grants also cover `history` and `presence`. A
//! channel in a namespace with `anonymous = true` (the default) needs no
//! grant; one with `anonymous = false` needs a token granting it.
//!
//! A token may also carry a `direct` claim: the user ids this user may
//! send `direct` messages to (`{"type":"direct","userId":…}`), with the
//! same pattern rules over user ids:
//!
//! ```json
//! {"sub":"user-42","exp":1764100000,"direct":["support","agent-*"]}
//! ```
//!
//! With auth on, a `direct` to a `userId` needs such a grant (anonymous
//! connections cannot have one); without auth it is allowed as in the
//! tutorial. A `direct` to a `targetId` (a client id) needs no grant: it
//! is governed by `client_direct` alone.
//!
//! A refreshed token (an `auth` frame mid-session) replaces the grants:
//! subscriptions in `anonymous = false` namespaces that the new token no
//! longer grants are dropped, each with an `unsubscribed` frame.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

use crate::error::{ClientError, Error, ErrorCode, Result};

/// Select jsonwebtoken's pure-Rust crypto provider for the process.
///
/// jsonwebtoken picks a provider by itself only when exactly one of its
/// backends is compiled in; the Pub/Sub bus brings the other one (through
/// Google's auth crate), and jsonwebtoken then panics on first use. Call
/// this before any token is signed or verified; later calls do nothing.
pub fn init_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error means a provider is already installed: fine.
        let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
            &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
        );
    });
}

/// Where the verification keys come from, and what the tokens must say.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// File holding an HS256 shared secret (surrounding whitespace ignored).
    pub hs256_secret_file: Option<PathBuf>,
    /// File holding an RSA (RS256) or EC P-256 (ES256) public key in PEM.
    pub public_key_file: Option<PathBuf>,
    /// File holding a JSON Web Key Set.
    pub jwks_file: Option<PathBuf>,
    /// Required `aud`, if any.
    pub audience: Option<String>,
    /// Required `iss`, if any.
    pub issuer: Option<String>,
}

impl AuthConfig {
    /// Whether any key is configured (auth is on).
    pub fn enabled(&self) -> bool {
        self.hs256_secret_file.is_some()
            || self.public_key_file.is_some()
            || self.jwks_file.is_some()
    }
}

/// Channel patterns a token grants.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Grants {
    /// Channels it may subscribe to (and read history and presence of).
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Channels it may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// User ids it may send `direct` messages to: from the token's
    /// top-level `direct` claim, not from `channels`.
    #[serde(skip)]
    pub direct: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: Option<u64>,
    #[serde(default)]
    channels: Grants,
    #[serde(default)]
    direct: Vec<String>,
    /// A display name for presence (optional).
    #[serde(default)]
    name: Option<String>,
}

/// Who a verified token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`.
    pub user_id: Arc<str>,
    /// The token's `exp` (seconds since the Unix epoch).
    pub expires_at: Option<u64>,
    /// Channels the token grants.
    pub grants: Grants,
    /// The token's `name` claim, as presence shows it
    /// ([`crate::protocol::display_name`]).
    pub name: Option<Arc<str>>,
}

/// What a client wants to do in a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// subscribe, history, presence
    Subscribe,
    /// publish
    Publish,
    /// `direct` to a user id (the "channel" is then the user id)
    Direct,
}

/// Whether `pattern` covers `channel`.
pub fn pattern_matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => pattern == channel,
    }
}

impl Identity {
    /// Whether the token grants `action` on `channel`.
    pub fn grants(&self, action: Action, channel: &str) -> bool {
        let patterns = match action {
            Action::Subscribe => &self.grants.subscribe,
            Action::Publish => &self.grants.publish,
            Action::Direct => &self.grants.direct,
        };
        patterns.iter().any(|p| pattern_matches(p, channel))
    }
}

/// A key and the algorithms it may verify.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    algorithm: Algorithm,
}

/// Verifies tokens against the configured keys.
pub struct Authenticator {
    /// Every configured key.
    keys: Vec<Key>,
    /// Audience and issuer checks (algorithms are set per key).
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("keys", &self.keys.len())
            .finish()
    }
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("{what}: cannot read {}: {e}", path.display())))
}

fn invalid(message: impl Into<String>) -> ClientError {
    ClientError::new(ErrorCode::InvalidToken, message)
}

impl Authenticator {
    /// Load the keys; `None` when auth is not configured.
    pub fn from_config(cfg: &AuthConfig) -> Result<Option<Authenticator>> {
        init_crypto();
        if !cfg.enabled() {
            return Ok(None);
        }
        let mut keys = Vec::new();
        if let Some(path) = &cfg.hs256_secret_file {
            let secret = read(path, "auth_hs256_secret_file")?;
            let secret = String::from_utf8_lossy(&secret).trim().to_string();
            if secret.len() < 16 {
                return Err(Error::Config(
                    "auth_hs256_secret_file: the secret must be at least 16 bytes".into(),
                ));
            }
            keys.push(Key {
                kid: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
                algorithm: Algorithm::HS256,
            });
        }
        if let Some(path) = &cfg.public_key_file {
            let pem = read(path, "auth_public_key_file")?;
            let (key, algorithm) = match DecodingKey::from_rsa_pem(&pem) {
                Ok(k) => (k, Algorithm::RS256),
                Err(_) => match DecodingKey::from_ec_pem(&pem) {
                    Ok(k) => (k, Algorithm::ES256),
                    Err(e) => {
                        return Err(Error::Config(format!(
                            "auth_public_key_file: {} is neither an RSA nor an EC public key in PEM: {e}",
                            path.display()
                        )));
                    }
                },
            };
            keys.push(Key {
                kid: None,
                key,
                algorithm,
            });
        }
        if let Some(path) = &cfg.jwks_file {
            let text = read(path, "auth_jwks_file")?;
            let set: JwkSet = serde_json::from_slice(&text)
                .map_err(|e| Error::Config(format!("auth_jwks_file: {}: {e}", path.display())))?;
            for jwk in &set.keys {
                let algorithm = match jwk.common.key_algorithm.map(|a| a.to_string()) {
                    Some(name) => name.parse::<Algorithm>().map_err(|e| {
                        Error::Config(format!("auth_jwks_file: algorithm {name}: {e}"))
                    })?,
                    None => match &jwk.algorithm {
                        jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                        jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => {
                            Algorithm::ES256
                        }
                        jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
                        _ => {
                            return Err(Error::Config(
                                "auth_jwks_file: a key has no usable algorithm".into(),
                            ));
                        }
                    },
                };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| Error::Config(format!("auth_jwks_file: {e}")))?;
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    key,
                    algorithm,
                });
            }
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::from(["exp".to_string(), "sub".to_string()]);
        // A configured audience or issuer must be present, not only right
        // when present.
        match &cfg.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Some(Authenticator { keys, validation }))
    }

    /// Verify `token` and return who it says the client is.
    pub fn verify(&self, token: &str) -> Result<Identity, ClientError> {
        let header = decode_header(token).map_err(|e| {
            tracing::debug!(error = %e, "token refused: malformed header");
            invalid("malformed token")
        })?;
        let mut last = invalid("no configured key verifies this token");
        for key in &self.keys {
            if key.algorithm != header.alg {
                continue;
            }
            if let (Some(want), Some(have)) = (&header.kid, &key.kid) {
                if want != have {
                    continue;
                }
            }
            let mut validation = self.validation.clone();
            validation.algorithms = vec![key.algorithm];
            match decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    let mut grants = data.claims.channels;
                    grants.direct = data.claims.direct;
                    return Ok(Identity {
                        user_id: data.claims.sub.into(),
                        expires_at: data.claims.exp,
                        grants,
                        name: data
                            .claims
                            .name
                            .as_deref()
                            .and_then(crate::protocol::display_name),
                    });
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    // The detail stays in the log; the client gets a short,
                    // stable reason that says nothing of the verifier.
                    tracing::debug!(error = %e, "token refused");
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => {
                            ClientError::new(ErrorCode::TokenExpired, "the token has expired")
                        }
                        ErrorKind::InvalidSignature => invalid("bad signature"),
                        ErrorKind::InvalidAudience => invalid("wrong audience"),
                        ErrorKind::InvalidIssuer => invalid("wrong issuer"),
                        ErrorKind::ImmatureSignature => invalid("the token is not valid yet (nbf)"),
                        ErrorKind::MissingRequiredClaim(c) => match c.as_str() {
                            "exp" | "sub" | "aud" | "iss" => invalid(format!("missing claim {c}")),
                            _ => invalid("missing claim"),
                        },
                        _ => invalid("invalid token"),
                    };
                    if e.kind() != &jsonwebtoken::errors::ErrorKind::InvalidSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "anything:at-all"));
        assert!(pattern_matches("chat:*", "chat:room1"));
        assert!(!pattern_matches("chat:*", "chatter"));
        assert!(pattern_matches("news", "news"));
        assert!(!pattern_matches("news", "news:x"));
    }
}
