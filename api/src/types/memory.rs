//! Memory statistics and merge tuning: `GET /memory`, `GET /vms/{vm_id}/memory`,
//! `GET|PATCH /memory/merge`, `PUT /memory/merge/actions`.

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

/// `GET /vms/{vm_id}/memory`: one VM's memory, in 4 KiB guest pages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmMemoryStats {
    /// Guest memory size in pages.
    pub guest_pages: u64,
    /// Guest pages backed by a host frame.
    pub resident_pages: u64,
    /// Guest pages mapping a merged (shared) frame.
    pub merged_pages: u64,
    /// Guest pages mapping the zero page.
    pub zero_pages: u64,
    /// Writes to merged pages that copied the frame.
    pub cow_copies: u64,
    /// Writes to merged pages that took the frame over in place (single mapping left).
    pub cow_reuses: u64,
}

/// `GET /memory`: host-wide memory and merging statistics (KSM-style names).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostMemoryStats {
    /// Shared frames in use (each mapped by at least two guest pages).
    pub pages_shared: u64,
    /// Guest pages mapping a shared frame, beyond the first mapping of each.
    pub pages_sharing: u64,
    /// Pages checked by the merger that are unique so far.
    pub pages_unshared: u64,
    /// Pages changing too fast to be merged.
    pub pages_volatile: u64,
    /// Pages scanned since start.
    pub pages_scanned: u64,
    /// Completed full scans of all mergeable memory.
    pub full_scans: u64,
    /// Guest pages mapping the zero page.
    pub zero_pages: u64,
    /// Bytes saved by merging minus the merger's own metadata (may be negative).
    pub general_profit: i64,
    /// 2 MiB host frames in the frame pool.
    pub frames_2m_total: u64,
    /// 2 MiB host frames holding at least one live 4 KiB frame.
    pub frames_2m_in_use: u64,
    /// 2 MiB host frames given back to the host.
    pub frames_2m_returned: u64,
    /// Fragmentation of the in-use 2 MiB frames (0 = packed, 1 = fully scattered).
    pub fragmentation: f64,
    /// Host memory used for guest memory, in bytes.
    pub host_bytes_used: u64,
    /// Mappings (VMAs) densevm holds.
    pub vma_count: u64,
    /// Copy-on-write copies, all VMs.
    pub cow_copies: u64,
    /// Copy-on-write reuses in place, all VMs.
    pub cow_reuses: u64,
    /// Merge chunks that held the merging VMs' vCPUs out of guest mode (`hold_vcpus`).
    #[serde(default)]
    pub vcpu_holds: u64,
    /// Total time those vCPUs were held, in milliseconds.
    #[serde(default)]
    pub vcpu_hold_ms: f64,
}

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
    }
}
