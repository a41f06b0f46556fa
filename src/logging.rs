//! Log output: the `tracing` subscriber the binary installs at start-up
//! (`main.rs` calls [`init`] once the configuration is read).
//!
//! Two formats, chosen with `log_format`:
//! * `text`: one human line per event; ANSI colour only when stdout is a
//!   terminal and `NO_COLOR` is unset or empty (<https://no-color.org>), so
//!   files and pipes get plain text.
//! * `json`: one object per line in the shape Google Cloud Logging reads
//!   from a container's output (App Engine flexible, Cloud Run, GKE):
//!   `severity` (`DEBUG`, `INFO`, `WARNING`, `ERROR`), `message`, `time`
//!   (RFC 3339, UTC), `target`, then the event's own fields.

use std::fmt;
use std::io::IsTerminal;

use serde::Deserialize;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The `log_format` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One Cloud Logging JSON object per line.
    Json,
}

/// Install the global subscriber: `filter` in `RUST_LOG` syntax (an invalid
/// one falls back to `info`, said on stderr), output on stdout.
pub fn init(filter: &str, format: LogFormat) {
    let env_filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("switchboard: invalid log filter {filter:?} ({e}); using info");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(env_filter);
    match format {
        LogFormat::Text => builder.with_ansi(colour_wanted()).init(),
        LogFormat::Json => builder.event_format(CloudLogging).init(),
    }
}

/// Colour only on a terminal, and never with `NO_COLOR` set to a non-empty value.
fn colour_wanted() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stdout().is_terminal()
}

/// Cloud Logging's name for a level (`LogSeverity`; it has no `TRACE`).
fn severity(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

/// The `json` event format: see the module doc.
struct CloudLogging;

impl<S, N> FormatEvent<S, N> for CloudLogging
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let mut entry = Map::new();
        entry.insert("severity".into(), severity(meta.level()).into());
        entry.insert("message".into(), Value::String(String::new()));
        entry.insert("time".into(), time.into());
        entry.insert("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope.from_root().map(|s| s.name().into()).collect();
            entry.insert("spans".into(), spans.into());
        }
        event.record(&mut Fields(&mut entry));
        let line = serde_json::to_string(&entry).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

/// Collects an event's fields into the entry; `message` is the text.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        // A field named like one of ours keeps ours and is renamed.
        let name = match field.name() {
            "severity" | "time" | "target" | "spans" => format!("field.{}", field.name()),
            name => name.to_owned(),
        };
        self.0.insert(name, value);
    }
}

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_logging_severities() {
        assert_eq!(severity(&Level::ERROR), "ERROR");
        assert_eq!(severity(&Level::WARN), "WARNING");
        assert_eq!(severity(&Level::INFO), "INFO");
        assert_eq!(severity(&Level::DEBUG), "DEBUG");
        assert_eq!(severity(&Level::TRACE), "DEBUG");
    }
}
