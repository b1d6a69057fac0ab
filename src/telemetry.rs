//! Logging: readable text on a terminal, JSON lines in the cluster.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Starts logging to stderr. `json`: `Some` when the command line chose (the controller's
/// `--log-format`), else `NODEDRAIN_LOG_FORMAT=json|text`, else JSON unless stderr is a terminal.
/// `RUST_LOG` overrides the level.
pub fn init(default_level: &str, json: Option<bool>) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let json = json.unwrap_or_else(|| match std::env::var("NODEDRAIN_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    });
    // Colours only for a person at a terminal, never in a log file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
