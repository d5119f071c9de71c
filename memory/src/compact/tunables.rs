//! Run-time tunables of the compactor, their limits, and the patch that
//! changes some of them.
//!
//! These are wire types of the HTTP API (the `api` crate re-exports them; with
//! the `openapi` feature they describe themselves to utoipa). The field
//! comments are the API's descriptions; [`CompactionTunables`] documents the
//! details.
//!
//! Adding a tunable: a field in [`CompactionTunables`] and its default, the
//! same field as an `Option` in [`CompactionTunablesPatch`] with its line in
//! [`CompactionTunablesPatch::apply`] and in the `From<CompactionTunables>`
//! conversion, and, if it has a range, a check in
//! [`CompactionTunablesPatch::validate`] (the one range check).

use serde::{Deserialize, Serialize};

use crate::tunable_range::check;

/// Largest `proactiveness` (percent).
pub const MAX_PROACTIVENESS: u32 = 100;
/// Smallest `max_pages_per_s`.
pub const MIN_MAX_PAGES_PER_S: u64 = 1;
/// Largest `max_pages_per_s`.
pub const MAX_MAX_PAGES_PER_S: u64 = 100_000_000;
/// Default `proactiveness` (percent).
pub const DEFAULT_PROACTIVENESS: u32 = 20;
/// Default `max_pages_per_s` (8 MiB/s): measured with a writer thread standing
/// in for a guest (random stores over the scattered VMs,
/// `tests/compaction.rs::measure_writer_pace_under_proactive_compaction`, two
/// shared cores), its pace stayed at 0.91-0.97 of its pace without compaction
/// at 2000 pages/s, fell to 0.82-0.87 (noisy) at 3000-5000 and to 0.3-0.4 at
/// 20000 and full rate (~40000 pages/s on one core).
pub const DEFAULT_MAX_PAGES_PER_S: u64 = 2_000;

/// Errors of compaction tunable validation (the shared range error of
/// [`crate::tunable_range`]).
pub use crate::tunable_range::Error;

/// The compactor's settings, changeable at run time.
///
/// - `enabled`: false stops proactive passes (a pass in progress stops at its
///   next batch); [`crate::MemoryManager::compact`] still works.
/// - `proactiveness`: a proactive pass starts when the fragmentation of the
///   2 MiB frames in use (free 4 KiB frames inside 2 MiB frames holding live
///   frames, as a share of those 2 MiB frames' frames; see
///   [`super::CompactionStats::fragmentation`]) exceeds this percentage and at
///   least one 2 MiB frame could be returned. Lower is more eager.
/// - `max_pages_per_s`: the rate limit of proactive passes (pages migrated per
///   second); on-demand passes run at full rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(as = CompactionConfig, description = "The compactor's settings.")
)]
#[serde(deny_unknown_fields)]
pub struct CompactionTunables {
    /// Whether proactive (background) compaction runs.
    pub enabled: bool,
    /// Fragmentation (percent, 0..=100) above which a proactive pass starts.
    #[cfg_attr(feature = "openapi", schema(value_type = u64, minimum = 0, maximum = 100))]
    pub proactiveness: u32,
    /// Most pages a proactive pass migrates per second (1..=100000000).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100000000))]
    pub max_pages_per_s: u64,
}

impl Default for CompactionTunables {
    /// Enabled, proactiveness 20 %, [`DEFAULT_MAX_PAGES_PER_S`].
    fn default() -> Self {
        CompactionTunables {
            enabled: true,
            proactiveness: DEFAULT_PROACTIVENESS,
            max_pages_per_s: DEFAULT_MAX_PAGES_PER_S,
        }
    }
}

impl CompactionTunables {
    /// Checks every value against its range ([`CompactionTunablesPatch::validate`]
    /// of a patch that sets every field).
    pub fn validate(&self) -> Result<(), Error> {
        CompactionTunablesPatch::from(*self).validate()
    }
}

/// A change to some of the [`CompactionTunables`]; absent fields keep their value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(
        as = CompactionConfigPatch,
        description = "The compactor settings to change; absent fields keep their value."
    )
)]
#[serde(deny_unknown_fields)]
pub struct CompactionTunablesPatch {
    /// Whether proactive (background) compaction runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Fragmentation (percent, 0..=100) above which a proactive pass starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, minimum = 0, maximum = 100))]
    pub proactiveness: Option<u32>,
    /// Most pages a proactive pass migrates per second (1..=100000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100000000))]
    pub max_pages_per_s: Option<u64>,
}

impl CompactionTunablesPatch {
    /// Checks the values present against their ranges: the one range check of
    /// the compaction tunables.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(v) = self.proactiveness {
            check("proactiveness", u64::from(v), 0, u64::from(MAX_PROACTIVENESS))?;
        }
        if let Some(v) = self.max_pages_per_s {
            check("max_pages_per_s", v, MIN_MAX_PAGES_PER_S, MAX_MAX_PAGES_PER_S)?;
        }
        Ok(())
    }

    /// Sets the fields present in `tunables` (validate first).
    pub fn apply(&self, tunables: &mut CompactionTunables) {
        if let Some(v) = self.enabled {
            tunables.enabled = v;
        }
        if let Some(v) = self.proactiveness {
            tunables.proactiveness = v;
        }
        if let Some(v) = self.max_pages_per_s {
            tunables.max_pages_per_s = v;
        }
    }
}

impl From<CompactionTunables> for CompactionTunablesPatch {
    /// The patch that sets every field to its value in `t`.
    fn from(t: CompactionTunables) -> Self {
        let CompactionTunables { enabled, proactiveness, max_pages_per_s } = t;
        CompactionTunablesPatch {
            enabled: Some(enabled),
            proactiveness: Some(proactiveness),
            max_pages_per_s: Some(max_pages_per_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(CompactionTunables::default().validate().is_ok());
        let bad = CompactionTunables { proactiveness: 101, ..CompactionTunables::default() };
        assert_eq!(bad.validate().unwrap_err().to_string(), "proactiveness = 101 is outside 0..=100");
        let bad = CompactionTunables { max_pages_per_s: 0, ..CompactionTunables::default() };
        assert_eq!(bad.validate().unwrap_err().to_string(), "max_pages_per_s = 0 is outside 1..=100000000");
        let bad = CompactionTunablesPatch { max_pages_per_s: Some(MAX_MAX_PAGES_PER_S + 1), ..Default::default() };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn patch_applies_present_fields() {
        let p = CompactionTunablesPatch { enabled: Some(false), proactiveness: Some(0), ..Default::default() };
        assert!(p.validate().is_ok());
        let mut t = CompactionTunables::default();
        p.apply(&mut t);
        assert_eq!(t, CompactionTunables { enabled: false, proactiveness: 0, ..CompactionTunables::default() });
        let full = CompactionTunables { enabled: false, proactiveness: 77, max_pages_per_s: 5 };
        let mut t = CompactionTunables::default();
        CompactionTunablesPatch::from(full).apply(&mut t);
        assert_eq!(t, full);
        let json = serde_json::to_string(&CompactionTunablesPatch { proactiveness: Some(5), ..Default::default() });
        assert_eq!(json.unwrap(), r#"{"proactiveness":5}"#);
        assert!(serde_json::from_str::<CompactionTunablesPatch>(r#"{"bogus":1}"#).is_err());
    }
}
