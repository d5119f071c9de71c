//! Built-in workload scenarios and loading scenario files (JSON or TOML).

use std::path::Path;

use crate::workload::scenario::{self, Scenario};

/// Errors loading a scenario.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read scenario file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file's content is not a valid scenario.
    #[error("scenario file {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: scenario::Error,
    },
    /// Neither a file nor a built-in name.
    #[error("no scenario file or built-in scenario named `{0}` (built-ins: {names})", names = BUILTIN_NAMES.join(", "))]
    Unknown(String),
}

/// Names of the built-in scenarios.
pub const BUILTIN_NAMES: [&str; 4] = ["tiny", "quick", "clone", "busy"];

/// A built-in scenario by name.
pub fn builtin(name: &str) -> Option<Scenario> {
    let s = match name {
        // One page, done at once: for launch latency.
        "tiny" => Scenario { fill_mib: 1, duration_s: 0, ..Default::default() },
        // A short mixed run.
        "quick" => Scenario {
            fill_mib: 32,
            zero_fraction: 0.1,
            shared_fraction: 0.5,
            write_fraction: 0.2,
            writes_per_s: 5_000,
            duration_s: 2,
            ..Default::default()
        },
        // Clones of one image, idle after filling, until stopped.
        "clone" => Scenario { fill_mib: 64, zero_fraction: 0.05, shared_fraction: 0.9, ..Default::default() },
        // Heavy rewriting.
        "busy" => Scenario {
            fill_mib: 64,
            zero_fraction: 0.1,
            shared_fraction: 0.3,
            write_fraction: 0.5,
            writes_per_s: 50_000,
            duration_s: 10,
            ..Default::default()
        },
        _ => return None,
    };
    Some(s)
}

/// Loads `arg` as a scenario file (`.toml` is TOML, anything else JSON) or, when no
/// such file exists, as a built-in name.
pub fn load(arg: &str) -> Result<Scenario, Error> {
    let path = Path::new(arg);
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: arg.to_string(), source })?;
        let parsed = if path.extension().is_some_and(|e| e == "toml") {
            Scenario::from_toml(&text)
        } else {
            Scenario::from_json(&text)
        };
        return parsed.map_err(|source| Error::Parse { path: arg.to_string(), source });
    }
    builtin(arg).ok_or_else(|| Error::Unknown(arg.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid() {
        for name in BUILTIN_NAMES {
            builtin(name).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn files_and_errors() {
        let dir = std::env::temp_dir().join(format!("densevm-scn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = dir.join("s.toml");
        std::fs::write(&t, "fill_mib = 4\nwrites_per_s = 10\n").unwrap();
        assert_eq!(load(t.to_str().unwrap()).unwrap().fill_mib, 4);
        let j = dir.join("s.json");
        std::fs::write(&j, r#"{"fill_mib": 4, "nope": 1}"#).unwrap();
        let e = load(j.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        let e = load("no-such-scenario").unwrap_err().to_string();
        assert!(e.contains("built-ins: tiny"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
