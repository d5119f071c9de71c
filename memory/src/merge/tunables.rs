//! Run-time tunables of the merger (the knobs of `/sys/kernel/mm/ksm`), their
//! limits, and the patch that changes some of them.
//!
//! These are also the wire types of `GET|PATCH /memory/merge` (the `api` crate
//! re-exports them as `MergeConfig` and `MergeConfigPatch`; with the `openapi`
//! feature they describe themselves to utoipa). The field comments are the
//! API's descriptions; [`Tunables`] documents the details.
//!
//! Adding a tunable: a field in [`Tunables`] and its default, the same field as
//! an `Option` in [`TunablesPatch`] with its line in [`TunablesPatch::apply`]
//! and in the `From<Tunables>` conversion, and, if it has a range, a check in
//! [`TunablesPatch::validate`] (the one range check, used by the API, the CLI
//! and the merger).

use serde::{Deserialize, Serialize};

use crate::tunable_range::check;

/// Largest `pages_to_scan`.
pub const MAX_PAGES_TO_SCAN: u32 = 1_000_000;
/// Largest `sleep_ms`.
pub const MAX_SLEEP_MS: u64 = 60_000;
/// Smallest `max_page_sharing` (a shared frame needs two mappers).
pub const MIN_MAX_PAGE_SHARING: u32 = 2;
/// Largest `max_page_sharing`.
pub const MAX_MAX_PAGE_SHARING: u32 = 1_000_000;

/// Errors of tunable validation (the shared range error of
/// [`crate::tunable_range`]).
pub use crate::tunable_range::Error;

/// How the merger notices that a page changed between scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ChangeDetection {
    /// The VM's registered [`super::DirtyLog`] (KVM dirty log) plus densevm's
    /// record of device writes; clean pages keep their cached hash and are not
    /// re-read. VMs without a registered dirty log use checksums.
    #[default]
    DirtyLog,
    /// A content checksum (xxh3) compared with the one of the last visit, as KSM does.
    Checksum,
}

/// The merger's settings, changeable at run time.
///
/// - `run`: false pauses the scanner; merged pages stay merged.
/// - `pages_to_scan`: pages with host memory visited per batch; pages without
///   (never written, discarded, zeroed) are passed over at no cost, as KSM only
///   visits present pages.
/// - `max_page_sharing`: further copies are chained to a new shared frame.
/// - `merge_zero_pages`: zero pages lose their host memory and are counted as
///   `zero_pages` (allowed across domains); when false they merge like any
///   other content.
/// - `hold_vcpus`: see [`super::VcpuGate`]; needs a gate registered by the
///   VMM, without one this does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = MergeConfig, description = "`GET /memory/merge`: the merger's settings."))]
#[serde(deny_unknown_fields)]
pub struct Tunables {
    /// Whether the merger runs.
    pub run: bool,
    /// Pages scanned per round (1..=1000000).
    #[cfg_attr(feature = "openapi", schema(value_type = u64, minimum = 1, maximum = 1000000))]
    pub pages_to_scan: u32,
    /// Sleep between rounds in milliseconds (0..=60000).
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 60000))]
    pub sleep_ms: u64,
    /// Most guest pages that may map one shared frame (2..=1000000).
    #[cfg_attr(feature = "openapi", schema(value_type = u64, minimum = 2, maximum = 1000000))]
    pub max_page_sharing: u32,
    /// Whether zero pages are merged into the zero page.
    pub merge_zero_pages: bool,
    /// How page changes are detected.
    pub change_detection: ChangeDetection,
    /// Whether a VM's vCPUs are held out of guest mode (a pause of a few
    /// milliseconds at most) while a chunk of its pages is merged, instead of
    /// faulting on pages being remapped (default true).
    #[serde(default = "default_hold_vcpus")]
    pub hold_vcpus: bool,
}

fn default_hold_vcpus() -> bool {
    true
}

impl Default for Tunables {
    /// KSM's defaults: stopped, 100 pages every 20 ms, 256 mappings per frame.
    fn default() -> Self {
        Tunables {
            run: false,
            pages_to_scan: 100,
            sleep_ms: 20,
            max_page_sharing: 256,
            merge_zero_pages: false,
            change_detection: ChangeDetection::DirtyLog,
            hold_vcpus: default_hold_vcpus(),
        }
    }
}

impl Tunables {
    /// Checks every value against its range ([`TunablesPatch::validate`] of a
    /// patch that sets every field).
    pub fn validate(&self) -> Result<(), Error> {
        TunablesPatch::from(*self).validate()
    }

    /// Full speed: `pages_to_scan` 1_000_000 (capped per batch by the memory
    /// present), no sleep, running.
    pub fn full_speed() -> Self {
        Tunables { run: true, pages_to_scan: MAX_PAGES_TO_SCAN, sleep_ms: 0, ..Tunables::default() }
    }
}

/// A change to some of the [`Tunables`]; absent fields keep their value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(
        as = MergeConfigPatch,
        description = "Body of `PATCH /memory/merge`: the settings to change; absent fields keep their value."
    )
)]
#[serde(deny_unknown_fields)]
pub struct TunablesPatch {
    /// Whether the merger runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<bool>,
    /// Pages scanned per round (1..=1000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, minimum = 1, maximum = 1000000))]
    pub pages_to_scan: Option<u32>,
    /// Sleep between rounds in milliseconds (0..=60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 60000))]
    pub sleep_ms: Option<u64>,
    /// Most guest pages that may map one shared frame (2..=1000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, minimum = 2, maximum = 1000000))]
    pub max_page_sharing: Option<u32>,
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

impl TunablesPatch {
    /// Checks the values present against their ranges: the one range check of
    /// the tunables.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(v) = self.pages_to_scan {
            check("pages_to_scan", u64::from(v), 1, u64::from(MAX_PAGES_TO_SCAN))?;
        }
        if let Some(v) = self.sleep_ms {
            check("sleep_ms", v, 0, MAX_SLEEP_MS)?;
        }
        if let Some(v) = self.max_page_sharing {
            check("max_page_sharing", u64::from(v), u64::from(MIN_MAX_PAGE_SHARING), u64::from(MAX_MAX_PAGE_SHARING))?;
        }
        Ok(())
    }

    /// Sets the fields present in `tunables` (the result is validated where it
    /// takes effect: [`super::Merger::update`]).
    pub fn apply(&self, tunables: &mut Tunables) {
        if let Some(v) = self.run {
            tunables.run = v;
        }
        if let Some(v) = self.pages_to_scan {
            tunables.pages_to_scan = v;
        }
        if let Some(v) = self.sleep_ms {
            tunables.sleep_ms = v;
        }
        if let Some(v) = self.max_page_sharing {
            tunables.max_page_sharing = v;
        }
        if let Some(v) = self.merge_zero_pages {
            tunables.merge_zero_pages = v;
        }
        if let Some(v) = self.change_detection {
            tunables.change_detection = v;
        }
        if let Some(v) = self.hold_vcpus {
            tunables.hold_vcpus = v;
        }
    }
}

impl From<Tunables> for TunablesPatch {
    /// The patch that sets every field to its value in `t`.
    fn from(t: Tunables) -> Self {
        let Tunables { run, pages_to_scan, sleep_ms, max_page_sharing, merge_zero_pages, change_detection, hold_vcpus } =
            t;
        TunablesPatch {
            run: Some(run),
            pages_to_scan: Some(pages_to_scan),
            sleep_ms: Some(sleep_ms),
            max_page_sharing: Some(max_page_sharing),
            merge_zero_pages: Some(merge_zero_pages),
            change_detection: Some(change_detection),
            hold_vcpus: Some(hold_vcpus),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(Tunables::default().validate().is_ok());
        assert!(Tunables::full_speed().validate().is_ok());
        let bad = Tunables { pages_to_scan: 0, ..Tunables::default() };
        let err = bad.validate().unwrap_err();
        assert_eq!(err.to_string(), "pages_to_scan = 0 is outside 1..=1000000");
        assert!(Tunables { max_page_sharing: 1, ..Tunables::default() }.validate().is_err());
        assert!(Tunables { sleep_ms: 60_001, ..Tunables::default() }.validate().is_err());
    }

    #[test]
    fn patch_applies_present_fields() {
        let p = TunablesPatch { pages_to_scan: Some(500), hold_vcpus: Some(false), ..TunablesPatch::default() };
        assert!(p.validate().is_ok());
        let mut t = Tunables::default();
        p.apply(&mut t);
        assert_eq!(t, Tunables { pages_to_scan: 500, hold_vcpus: false, ..Tunables::default() });
        assert!(TunablesPatch::default().validate().is_ok());
        let bad = TunablesPatch { sleep_ms: Some(MAX_SLEEP_MS + 1), ..TunablesPatch::default() };
        assert_eq!(bad.validate().unwrap_err().to_string(), "sleep_ms = 60001 is outside 0..=60000");
        // Applying a patch made from a full set of tunables yields that set.
        let mut t = Tunables::default();
        TunablesPatch::from(Tunables::full_speed()).apply(&mut t);
        assert_eq!(t, Tunables::full_speed());
    }
}
