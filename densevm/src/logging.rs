//! Logging of the `densevm` binary: the one `tracing` subscriber of the process.
//!
//! The libraries (memory, vmm, devices, api) and the binary's own modules log through
//! `tracing`; [`init`] installs the subscriber that writes those events to stderr,
//! as human-readable lines (default) or as JSON lines (one object per event).
//!
//! What is shown comes from, in order of precedence:
//! 1. the `DENSEVM_LOG` environment variable when set and not empty: an `EnvFilter`
//!    directive string such as `info` or `memory=debug,warn` (events matching no
//!    directive are dropped, as with `RUST_LOG`);
//! 2. `--log-level`: that level for densevm's own crates, and at most `warn` for the
//!    crates they depend on (so `--log-level trace` does not flood stderr with the
//!    HTTP stack's internals; `DENSEVM_LOG` can still enable them).

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, ParseError};

/// Environment variable holding an `EnvFilter` directive string; it wins over
/// `--log-level` when set and not empty.
pub const ENV_VAR: &str = "DENSEVM_LOG";

/// The workspace crates whose events `--log-level` governs.
const OWN_CRATES: [&str; 5] = ["densevm", "vmm", "memory", "devices", "api"];

/// Errors of setting up logging.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `DENSEVM_LOG` does not parse as filter directives.
    #[error(
        "{ENV_VAR}={value:?} is not a valid log filter: {source} (expected comma-separated \
         directives such as `info` or `memory=debug,warn`)"
    )]
    BadFilter {
        /// The variable's value.
        value: String,
        /// Why it does not parse.
        source: ParseError,
    },
    /// `DENSEVM_LOG` is not valid UTF-8.
    #[error("{ENV_VAR} is not valid UTF-8")]
    NotUnicode,
    /// The global subscriber could not be installed (one is already set).
    #[error("cannot install the log subscriber: {0}")]
    Install(String),
}

impl Error {
    /// The process exit code for this error: 2 for bad input, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::BadFilter { .. } | Error::NotUnicode => 2,
            Error::Install(_) => 1,
        }
    }
}

/// Most verbose level shown by `--log-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// Also progress and lifecycle messages (the default).
    Info,
    /// Also diagnostics.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The level as a filter directive.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event: time, level, target, message, fields.
    Human,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the
    /// event's fields.
    Json,
}

/// The filter directives `--log-level` stands for: `level` for densevm's own crates,
/// at most `warn` for everything else.
pub fn level_directives(level: LogLevel) -> String {
    let others = level.min(LogLevel::Warn).as_str();
    let mut directives = others.to_string();
    for krate in OWN_CRATES {
        directives.push_str(&format!(",{krate}={}", level.as_str()));
    }
    directives
}

/// The filter in force: `env` (the value of [`ENV_VAR`]) when it is not blank,
/// otherwise [`level_directives`] of `level`. Returns the filter and the directives
/// it was built from.
pub fn filter(level: LogLevel, env: Option<&str>) -> Result<(EnvFilter, String), Error> {
    let builder = EnvFilter::builder().with_default_directive(LevelFilter::ERROR.into());
    match env.map(str::trim).filter(|v| !v.is_empty()) {
        Some(value) => builder
            .parse(value)
            .map(|f| (f, value.to_string()))
            .map_err(|source| Error::BadFilter { value: value.to_string(), source }),
        None => {
            let directives = level_directives(level);
            // Built from known level and crate names: it always parses.
            let f = builder.parse_lossy(&directives);
            Ok((f, directives))
        }
    }
}

/// Reads [`ENV_VAR`] (`None` when unset).
fn env_value() -> Result<Option<String>, Error> {
    match std::env::var(ENV_VAR) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::NotUnicode),
    }
}

/// Installs the process-wide subscriber writing to stderr. Call once, first thing
/// after parsing the command line. Returns the directives in force.
pub fn init(level: LogLevel, format: LogFormat) -> Result<String, Error> {
    let (filter, directives) = filter(level, env_value()?.as_deref())?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(true);
    let installed = match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init(),
    };
    installed.map_err(|e| Error::Install(e.to_string()))?;
    Ok(directives)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_covers_own_crates_and_caps_the_others() {
        assert_eq!(
            level_directives(LogLevel::Debug),
            "warn,densevm=debug,vmm=debug,memory=debug,devices=debug,api=debug"
        );
        assert!(level_directives(LogLevel::Error).starts_with("error,"));
        assert!(level_directives(LogLevel::Info).starts_with("warn,"));
    }

    #[test]
    fn env_wins_unless_blank() {
        let (_, d) = filter(LogLevel::Info, Some("memory=debug,info")).unwrap();
        assert_eq!(d, "memory=debug,info");
        let (_, d) = filter(LogLevel::Error, Some("  ")).unwrap();
        assert_eq!(d, level_directives(LogLevel::Error));
        let (_, d) = filter(LogLevel::Warn, None).unwrap();
        assert_eq!(d, level_directives(LogLevel::Warn));
    }

    #[test]
    fn bad_env_is_an_input_error() {
        for bad in ["memory=loud", "vmm=debug,=info=", "[{"] {
            let e = filter(LogLevel::Info, Some(bad)).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
            assert!(e.to_string().contains("DENSEVM_LOG"), "{e}");
        }
    }
}
