//! Checks shared by the options: each error names the option.

use std::time::Duration;

use crate::error::{Error, Result};

pub(super) fn positive(name: &str, v: usize) -> Result<usize> {
    if v == 0 {
        return Err(Error::Config(format!("{name} must be greater than 0")));
    }
    Ok(v)
}

/// A message size limit: above 0 and at most 1 GiB (the WebSocket layer
/// keeps it in 32 bits; a larger message would be a design problem, not a
/// setting).
pub(super) fn message_limit(name: &str, v: usize) -> Result<usize> {
    const MAX: usize = 1 << 30;
    if v > MAX {
        return Err(Error::Config(format!(
            "{name} must be at most {MAX} (1 GiB)"
        )));
    }
    positive(name, v)
}

pub(super) fn nonzero(name: &str, d: Duration) -> Result<Duration> {
    if d.is_zero() {
        return Err(Error::Config(format!("{name} must be greater than 0")));
    }
    Ok(d)
}
