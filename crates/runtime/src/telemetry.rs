//! Tracing set-up, the same for every berth binary: a `RUST_LOG`-style
//! filter (each binary names its default) and a plain/JSON switch, on stderr.

use tracing_subscriber::EnvFilter;

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// Logging flags shared by every berth binary.
#[derive(Debug, Clone, clap::Args)]
pub struct LogConfig {
    /// Log line format on stderr; the filter comes from RUST_LOG.
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,
}

/// Installs the global subscriber, writing to stderr. `default` is the
/// filter used when `RUST_LOG` is unset.
pub fn init(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless; ignore the error it returns.
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
