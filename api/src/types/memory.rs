//! Memory statistics and merge tuning: `GET /memory`, `GET /vms/{vm_id}/memory`,
//! `GET|PATCH /memory/merge`, `PUT /memory/merge/actions`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{check_range, Error, Validate};

/// Largest `pages_to_scan`.
pub const MAX_PAGES_TO_SCAN: u64 = 1_000_000;
/// Largest `sleep_ms`.
pub const MAX_SLEEP_MS: u64 = 60_000;
/// Smallest `max_page_sharing`.
pub const MIN_MAX_PAGE_SHARING: u64 = 2;
/// Largest `max_page_sharing`.
pub const MAX_MAX_PAGE_SHARING: u64 = 1_000_000;

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

/// How the merger notices that a page changed between scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeDetection {
    /// KVM dirty logging.
    DirtyLog,
    /// Page checksums compared between scans (as KSM does).
    Checksum,
}

/// `GET /memory/merge`: the merger's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    /// Whether the merger runs.
    pub run: bool,
    /// Pages scanned per round (1..=1000000).
    #[schema(minimum = 1, maximum = 1000000)]
    pub pages_to_scan: u64,
    /// Sleep between rounds in milliseconds (0..=60000).
    #[schema(minimum = 0, maximum = 60000)]
    pub sleep_ms: u64,
    /// Most guest pages that may map one shared frame (2..=1000000).
    #[schema(minimum = 2, maximum = 1000000)]
    pub max_page_sharing: u64,
    /// Whether zero pages are merged into the zero page.
    pub merge_zero_pages: bool,
    /// How page changes are detected.
    pub change_detection: ChangeDetection,
    /// Whether a VM's vCPUs are held out of guest mode (a pause of a few
    /// milliseconds at most) while a chunk of its pages is merged, instead of
    /// faulting on pages being remapped (default true).
    #[serde(default = "default_true")]
    pub hold_vcpus: bool,
}

fn default_true() -> bool {
    true
}

impl Validate for MergeConfig {
    fn validate(&self) -> Result<(), Error> {
        check_range("pages_to_scan", self.pages_to_scan, 1, MAX_PAGES_TO_SCAN)?;
        check_range("sleep_ms", self.sleep_ms, 0, MAX_SLEEP_MS)?;
        check_range("max_page_sharing", self.max_page_sharing, MIN_MAX_PAGE_SHARING, MAX_MAX_PAGE_SHARING)
    }
}

/// Body of `PATCH /memory/merge`: the settings to change; absent fields keep their value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeConfigPatch {
    /// Whether the merger runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<bool>,
    /// Pages scanned per round (1..=1000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000000)]
    pub pages_to_scan: Option<u64>,
    /// Sleep between rounds in milliseconds (0..=60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 60000)]
    pub sleep_ms: Option<u64>,
    /// Most guest pages that may map one shared frame (2..=1000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 2, maximum = 1000000)]
    pub max_page_sharing: Option<u64>,
    /// Whether zero pages are merged into the zero page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_zero_pages: Option<bool>,
    /// How page changes are detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_detection: Option<ChangeDetection>,
    /// Whether a VM's vCPUs are held out of guest mode while a chunk of its pages is merged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_vcpus: Option<bool>,
}

impl MergeConfigPatch {
    /// Applies the patch to `config` (the VMM calls this; the patch is already validated).
    pub fn apply(&self, config: &mut MergeConfig) {
        if let Some(v) = self.run {
            config.run = v;
        }
        if let Some(v) = self.pages_to_scan {
            config.pages_to_scan = v;
        }
        if let Some(v) = self.sleep_ms {
            config.sleep_ms = v;
        }
        if let Some(v) = self.max_page_sharing {
            config.max_page_sharing = v;
        }
        if let Some(v) = self.merge_zero_pages {
            config.merge_zero_pages = v;
        }
        if let Some(v) = self.change_detection {
            config.change_detection = v;
        }
        if let Some(v) = self.hold_vcpus {
            config.hold_vcpus = v;
        }
    }
}

impl Validate for MergeConfigPatch {
    fn validate(&self) -> Result<(), Error> {
        if let Some(v) = self.pages_to_scan {
            check_range("pages_to_scan", v, 1, MAX_PAGES_TO_SCAN)?;
        }
        if let Some(v) = self.sleep_ms {
            check_range("sleep_ms", v, 0, MAX_SLEEP_MS)?;
        }
        if let Some(v) = self.max_page_sharing {
            check_range("max_page_sharing", v, MIN_MAX_PAGE_SHARING, MAX_MAX_PAGE_SHARING)?;
        }
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
}
