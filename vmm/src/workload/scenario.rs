//! Workload-guest scenario: what a workload microVM fills its memory with and how it
//! rewrites it. The same type is read by the CLI (JSON or TOML files), the HTTP API
//! (the `api` crate re-exports it; with the `openapi` feature it describes itself to
//! utoipa) and the benchmark harness.

use serde::{Deserialize, Serialize};

/// Largest fill a scenario may ask for (MiB).
pub const MAX_FILL_MIB: u32 = 64 * 1024;
/// Largest write rate a scenario may ask for (page writes per second).
pub const MAX_WRITES_PER_S: u64 = 10_000_000;
/// Longest run a scenario may ask for (seconds); 0 means until stopped.
pub const MAX_DURATION_S: u64 = 7 * 24 * 3600;
/// Longest time a scenario may hold its balloon inflated (milliseconds).
pub const MAX_BALLOON_HOLD_MS: u64 = 3_600_000;

/// Errors from parsing or validating a scenario.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The JSON text does not describe a scenario.
    #[error("invalid scenario JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The TOML text does not describe a scenario.
    #[error("invalid scenario TOML: {0}")]
    Toml(#[from] toml::de::Error),
    /// A field is out of its allowed range.
    #[error("scenario field `{field}` {reason}")]
    Range {
        /// Name of the offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// A workload-guest scenario.
///
/// Pages are classified per page index by a hash of `shared_seed`, so every VM with
/// the same `shared_seed`, `fill_mib` and fractions has the same layout: zero pages,
/// shared pages (content depends only on `shared_seed` and the page index) and unique
/// pages (content depends on `seed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// MiB of guest memory the workload fills.
    #[serde(default = "default_fill_mib")]
    pub fill_mib: u32,
    /// Share of filled pages that are left zero.
    #[serde(default)]
    pub zero_fraction: f64,
    /// Share of filled pages whose content depends only on `shared_seed`.
    #[serde(default)]
    pub shared_fraction: f64,
    /// Seed of the shared pages: VMs with the same value hold identical shared pages.
    #[serde(default = "default_shared_seed")]
    pub shared_seed: u64,
    /// Seed of the unique pages; when absent the VMM derives one from the VM's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Share of filled pages rewritten in the write loop.
    #[serde(default)]
    pub write_fraction: f64,
    /// Page writes per second in the write loop (0 = idle after filling).
    #[serde(default)]
    pub writes_per_s: u64,
    /// Seconds to run the write loop before a final verify and exit (0 = until stopped).
    #[serde(default)]
    pub duration_s: u64,
    /// When set, vCPU 0 drives the VM's virtio-balloon after its fill: it inflates
    /// the balloon to the device's target (`num_pages`, at most its own pages),
    /// holds it this many milliseconds, deflates it, and checks that the pages
    /// read zero before refilling them (the VM needs a balloon: `--balloon`, or
    /// the `balloon` object of the API's `PUT /vms/{vm_id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_hold_ms: Option<u64>,
    /// With `balloon_hold_ms` and a balloon offering `deflate_on_oom`: after its
    /// first inflation the guest deflates this many MiB below the target on its
    /// own (as Linux does when it runs out of memory), checks and refills those
    /// pages, and inflates again only when the target changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_oom_deflate_mib: Option<u32>,
}

fn default_fill_mib() -> u32 {
    64
}

fn default_shared_seed() -> u64 {
    1
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            fill_mib: default_fill_mib(),
            zero_fraction: 0.0,
            shared_fraction: 0.0,
            shared_seed: default_shared_seed(),
            seed: None,
            write_fraction: 0.0,
            writes_per_s: 0,
            duration_s: 0,
            balloon_hold_ms: None,
            balloon_oom_deflate_mib: None,
        }
    }
}

impl Scenario {
    /// Parses a scenario from JSON and validates it.
    pub fn from_json(text: &str) -> Result<Self, Error> {
        let s: Scenario = serde_json::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    /// Parses a scenario from TOML and validates it.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let s: Scenario = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), Error> {
        let range = |field, reason: String| Err(Error::Range { field, reason });
        if self.fill_mib == 0 || self.fill_mib > MAX_FILL_MIB {
            return range("fill_mib", format!("must be in 1..={MAX_FILL_MIB}"));
        }
        for (field, v) in [
            ("zero_fraction", self.zero_fraction),
            ("shared_fraction", self.shared_fraction),
            ("write_fraction", self.write_fraction),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return range(field, format!("must be between 0 and 1, got {v}"));
            }
        }
        if self.zero_fraction + self.shared_fraction > 1.0 + 1e-9 {
            return range("shared_fraction", "plus zero_fraction must not exceed 1".to_string());
        }
        if self.writes_per_s > MAX_WRITES_PER_S {
            return range("writes_per_s", format!("must be at most {MAX_WRITES_PER_S}"));
        }
        if self.duration_s > MAX_DURATION_S {
            return range("duration_s", format!("must be at most {MAX_DURATION_S}"));
        }
        if self.balloon_hold_ms.is_some_and(|ms| ms > MAX_BALLOON_HOLD_MS) {
            return range("balloon_hold_ms", format!("must be at most {MAX_BALLOON_HOLD_MS}"));
        }
        if self.balloon_oom_deflate_mib.is_some_and(|mib| mib > MAX_FILL_MIB) {
            return range("balloon_oom_deflate_mib", format!("must be at most {MAX_FILL_MIB}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_toml_agree() {
        let j = Scenario::from_json(
            r#"{"fill_mib": 8, "zero_fraction": 0.25, "shared_fraction": 0.5,
                "shared_seed": 7, "seed": 3, "write_fraction": 0.1,
                "writes_per_s": 100, "duration_s": 2}"#,
        )
        .unwrap();
        let t = Scenario::from_toml(
            "fill_mib = 8\nzero_fraction = 0.25\nshared_fraction = 0.5\nshared_seed = 7\n\
             seed = 3\nwrite_fraction = 0.1\nwrites_per_s = 100\nduration_s = 2\n",
        )
        .unwrap();
        assert_eq!(j, t);
        assert_eq!(j.seed, Some(3));
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let s = Scenario::from_json("{}").unwrap();
        assert_eq!(s, Scenario::default());
    }

    #[test]
    fn unknown_field_is_an_error() {
        let e = Scenario::from_json(r#"{"fill_mb": 8}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(Scenario::from_toml("bogus = 1").is_err());
    }

    #[test]
    fn out_of_range_values_are_errors() {
        for body in [
            r#"{"fill_mib": 0}"#,
            r#"{"zero_fraction": 1.5}"#,
            r#"{"shared_fraction": -0.1}"#,
            r#"{"zero_fraction": 0.6, "shared_fraction": 0.6}"#,
            r#"{"write_fraction": 2}"#,
            r#"{"writes_per_s": 100000000}"#,
            r#"{"duration_s": 99999999}"#,
            r#"{"balloon_hold_ms": 3600001}"#,
            r#"{"balloon_oom_deflate_mib": 65537}"#,
        ] {
            let e = Scenario::from_json(body).unwrap_err();
            assert!(matches!(e, Error::Range { .. }), "{body}: {e}");
        }
    }

    #[test]
    fn wrong_type_is_an_error() {
        assert!(Scenario::from_json(r#"{"fill_mib": "lots"}"#).is_err());
        assert!(Scenario::from_json(r#"{"fill_mib": -1}"#).is_err());
    }
}
