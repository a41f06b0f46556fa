//! The key of the server HTTP API ([`crate::api`]), read from
//! `api_key_file` and compared in constant time. Its own module so that
//! [`crate::config`] can hold it without depending on the API's handlers.

use std::fmt;
use std::path::Path as FsPath;
use std::sync::Arc;

use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// The key backends present to use the API. Its `Debug` form hides it.
#[derive(Clone)]
pub struct ApiKey(Arc<[u8]>);

impl ApiKey {
    /// Shortest accepted key, in bytes.
    pub const MIN_LEN: usize = 16;

    /// A key from its text (surrounding whitespace ignored); at least
    /// [`MIN_LEN`](ApiKey::MIN_LEN) bytes.
    pub fn new(text: &str) -> Result<ApiKey> {
        let key = text.trim();
        if key.len() < Self::MIN_LEN {
            return Err(Error::Config(format!(
                "api_key_file: the API key must be at least {} bytes (got {})",
                Self::MIN_LEN,
                key.len()
            )));
        }
        Ok(ApiKey(key.as_bytes().into()))
    }

    /// Read the key from `path` (its content, trimmed).
    pub fn from_file(path: &FsPath) -> Result<ApiKey> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!("api_key_file: cannot read {}: {e}", path.display()))
        })?;
        ApiKey::new(&text)
    }

    /// Whether `given` is the key, in constant time: every byte of the key
    /// is compared (with the guess's byte at the same index, or 0 past its
    /// end), and the lengths are compared too, all with `subtle`.
    pub fn matches(&self, given: &[u8]) -> bool {
        let key = &self.0;
        let mut eq = (key.len() as u64).ct_eq(&(given.len() as u64));
        for (i, k) in key.iter().enumerate() {
            eq &= k.ct_eq(given.get(i).unwrap_or(&0));
        }
        eq.into()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_trimmed_checked_and_compared_exactly() {
        assert!(ApiKey::new("short").is_err());
        assert!(ApiKey::new("  123456789012345  \n").is_err(), "15 bytes");
        let k = ApiKey::new(" 0123456789abcdef\n").unwrap();
        assert!(k.matches(b"0123456789abcdef"));
        assert!(!k.matches(b"0123456789abcdeF"));
        assert!(!k.matches(b"0123456789abcde"));
        assert!(!k.matches(b"0123456789abcdef0"));
        assert!(!k.matches(b"0123456789abcdef\0"));
        assert!(!k.matches(b""));
        assert_eq!(format!("{k:?}"), "ApiKey(<redacted>)");
    }
}
