//! The nats bus. Being written; see the scale-out issue.

use std::sync::Arc;

use super::{Broker, PresenceStore};
use crate::config::Config;
use crate::error::{Error, Result};

/// Connect the nats bus.
pub async fn connect(
    _url: &str,
    _config: &Config,
) -> Result<(Arc<dyn Broker>, Arc<dyn PresenceStore>)> {
    Err(Error::Config("the nats bus is not implemented yet".into()))
}
