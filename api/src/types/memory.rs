//! Memory statistics, merge and compaction tuning: `GET /memory`,
//! `GET /vms/{vm_id}/memory`, `GET|PATCH /memory/merge`, `PUT /memory/merge/actions`,
//! `GET|PATCH /memory/compaction`, `PUT /memory/compaction/actions`.

use memory::compact;
use memory::memory_stats;
use memory::merge::tunables;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Error, Validate};

/// `GET /memory/merge` is the merger's [`tunables::Tunables`] and the body of
/// `PATCH /memory/merge` a [`tunables::TunablesPatch`], owned by the memory crate.
pub use tunables::{
    ChangeDetection, Tunables as MergeConfig, TunablesPatch as MergeConfigPatch, MAX_MAX_PAGE_SHARING,
    MAX_PAGES_TO_SCAN, MAX_SLEEP_MS, MIN_MAX_PAGE_SHARING,
};

/// `GET /memory` is the memory crate's [`memory_stats::HostMemoryStats`] (made from
/// the manager's statistics snapshot) and `GET /vms/{vm_id}/memory` its
/// [`memory_stats::VmMemoryStats`].
pub use memory_stats::{HostMemoryStats, VmMemoryStats};

/// `GET /memory/compaction` is the compactor's [`compact::CompactionTunables`], the
/// body of `PATCH /memory/compaction` a [`compact::CompactionTunablesPatch`], the answer
/// to `PUT /memory/compaction/actions` a [`compact::CompactionReport`] and
/// `GET /memory`'s `compaction` a [`compact::CompactionStats`], owned by the memory crate.
pub use compact::{
    CompactionFailures, CompactionReport, CompactionStats, CompactionTiming, CompactionTunables as CompactionConfig,
    CompactionTunablesPatch as CompactionConfigPatch, MAX_MAX_PAGES_PER_S, MAX_PROACTIVENESS, MIN_MAX_PAGES_PER_S,
};

impl Validate for MergeConfigPatch {
    /// The tunables' own range check ([`tunables::TunablesPatch::validate`]), with the
    /// API's error shape.
    fn validate(&self) -> Result<(), Error> {
        MergeConfigPatch::validate(self).map_err(|e| match e {
            tunables::Error::OutOfRange { name, value, min, max } => {
                Error::new(name, format!("must be in {min}..={max}, got {value}"))
            }
        })
    }
}

impl Validate for CompactionConfigPatch {
    /// The tunables' own range check ([`compact::CompactionTunablesPatch::validate`]),
    /// with the API's error shape.
    fn validate(&self) -> Result<(), Error> {
        CompactionConfigPatch::validate(self).map_err(|e| match e {
            compact::tunables::Error::OutOfRange { name, value, min, max } => {
                Error::new(name, format!("must be in {min}..={max}, got {value}"))
            }
        })
    }
}

/// Host-wide compaction actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum CompactionActionType {
    /// Run one compaction pass now, at full rate, and answer with its report.
    Compact,
}

/// Body of `PUT /memory/compaction/actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompactionActionRequest {
    /// The action to perform.
    pub action_type: CompactionActionType,
}

impl Validate for CompactionActionRequest {
    fn validate(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// Host-wide merge actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum MergeActionType {
    /// Break every merged page back into private copies.
    UnmergeAll,
}

/// Body of `PUT /memory/merge/actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeActionRequest {
    /// The action to perform.
    pub action_type: MergeActionType,
}

impl Validate for MergeActionRequest {
    fn validate(&self) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_ranges_and_apply() {
        let p: MergeConfigPatch =
            serde_json::from_str(r#"{"pages_to_scan": 500, "change_detection": "checksum", "hold_vcpus": false}"#)
                .unwrap();
        assert!(p.validate().is_ok());
        // A full config without `hold_vcpus` (older clients) means true.
        let mut c: MergeConfig = serde_json::from_str(
            r#"{"run": false, "pages_to_scan": 100, "sleep_ms": 20, "max_page_sharing": 256,
                "merge_zero_pages": false, "change_detection": "dirty_log"}"#,
        )
        .unwrap();
        assert!(c.hold_vcpus);
        p.apply(&mut c);
        assert_eq!(c.pages_to_scan, 500);
        assert_eq!(c.change_detection, ChangeDetection::Checksum);
        assert!(!c.hold_vcpus);
        assert!(c.validate().is_ok());
        for bad in [
            r#"{"pages_to_scan": 0}"#,
            r#"{"pages_to_scan": 1000001}"#,
            r#"{"sleep_ms": 60001}"#,
            r#"{"max_page_sharing": 1}"#,
        ] {
            let p: MergeConfigPatch = serde_json::from_str(bad).unwrap();
            assert!(p.validate().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<MergeConfigPatch>(r#"{"change_detection": "x"}"#).is_err());
    }

    #[test]
    fn compaction_patch_ranges() {
        let p: CompactionConfigPatch = serde_json::from_str(r#"{"proactiveness": 100, "max_pages_per_s": 1}"#).unwrap();
        assert!(Validate::validate(&p).is_ok());
        for (bad, field, range) in [
            (r#"{"proactiveness": 101}"#, "proactiveness", "must be in 0..=100, got 101"),
            (r#"{"max_pages_per_s": 0}"#, "max_pages_per_s", "must be in 1..=100000000, got 0"),
            (r#"{"max_pages_per_s": 100000001}"#, "max_pages_per_s", "must be in 1..=100000000"),
        ] {
            let p: CompactionConfigPatch = serde_json::from_str(bad).unwrap();
            let e = Validate::validate(&p).unwrap_err();
            assert_eq!(e.field, field, "{bad}");
            assert!(e.reason.starts_with(range), "{bad}: {e}");
        }
        // Negative or too large for the field's type: a parse error, not a wrap-around.
        assert!(serde_json::from_str::<CompactionConfigPatch>(r#"{"proactiveness": -1}"#).is_err());
        assert!(serde_json::from_str::<CompactionConfigPatch>(r#"{"proactiveness": 4294967296}"#).is_err());
        assert!(serde_json::from_str::<CompactionConfigPatch>(r#"{"eager": true}"#).is_err());
        let a: CompactionActionRequest = serde_json::from_str(r#"{"action_type": "Compact"}"#).unwrap();
        assert_eq!(a.action_type, CompactionActionType::Compact);
        assert!(serde_json::from_str::<CompactionActionRequest>(r#"{"action_type": "Defrag"}"#).is_err());
    }

    /// The ranges in the OpenAPI document (literals in the schema attributes) are the
    /// tunables' limits.
    #[test]
    fn documented_ranges_are_the_limits() {
        let doc = serde_json::to_value(crate::openapi::openapi()).unwrap();
        for schema in ["MergeConfig", "MergeConfigPatch"] {
            let p = &doc["components"]["schemas"][schema]["properties"];
            let range = |field: &str| (p[field]["minimum"].as_u64(), p[field]["maximum"].as_u64());
            assert_eq!(range("pages_to_scan"), (Some(1), Some(u64::from(MAX_PAGES_TO_SCAN))), "{schema}");
            assert_eq!(range("sleep_ms"), (Some(0), Some(MAX_SLEEP_MS)), "{schema}");
            assert_eq!(
                range("max_page_sharing"),
                (Some(u64::from(MIN_MAX_PAGE_SHARING)), Some(u64::from(MAX_MAX_PAGE_SHARING))),
                "{schema}"
            );
        }
        for schema in ["CompactionConfig", "CompactionConfigPatch"] {
            let p = &doc["components"]["schemas"][schema]["properties"];
            let range = |field: &str| (p[field]["minimum"].as_u64(), p[field]["maximum"].as_u64());
            assert_eq!(range("proactiveness"), (Some(0), Some(u64::from(MAX_PROACTIVENESS))), "{schema}");
            assert_eq!(range("max_pages_per_s"), (Some(MIN_MAX_PAGES_PER_S), Some(MAX_MAX_PAGES_PER_S)), "{schema}");
        }
    }
}
