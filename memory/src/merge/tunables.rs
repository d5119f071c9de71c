//! Run-time tunables of the merger (the knobs of `/sys/kernel/mm/ksm`).

use serde::{Deserialize, Serialize};

/// Largest `pages_to_scan`.
pub const MAX_PAGES_TO_SCAN: u32 = 1_000_000;
/// Largest `sleep_ms`.
pub const MAX_SLEEP_MS: u64 = 60_000;
/// Smallest `max_page_sharing` (a shared frame needs two mappers).
pub const MIN_MAX_PAGE_SHARING: u32 = 2;
/// Largest `max_page_sharing`.
pub const MAX_MAX_PAGE_SHARING: u32 = 1_000_000;

/// Errors of tunable validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A value is outside its allowed range.
    #[error("{name} = {value} is outside {min}..={max}")]
    OutOfRange {
        /// The tunable.
        name: &'static str,
        /// The value given.
        value: u64,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
}

/// How the merger notices that a page changed since its last visit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tunables {
    /// Whether the scanner runs (false: paused, merged pages stay merged).
    pub run: bool,
    /// Pages with host memory visited per batch (1..=1_000_000); pages without
    /// (never written, discarded, zeroed) are passed over at no cost, as KSM
    /// only visits present pages.
    pub pages_to_scan: u32,
    /// Sleep between batches in milliseconds (0..=60_000).
    pub sleep_ms: u64,
    /// Most guest pages mapping one shared frame (2..=1_000_000); further
    /// copies are chained to a new shared frame.
    pub max_page_sharing: u32,
    /// Zero pages lose their host memory and are counted as `zero_pages`
    /// (allowed across domains); when false they merge like any other content.
    pub merge_zero_pages: bool,
    /// How changed pages are detected.
    pub change_detection: ChangeDetection,
    /// Hold a VM's vCPUs out of guest mode while a chunk of its pages is
    /// merged (a pause of at most a few milliseconds; see
    /// [`super::VcpuGate`]), instead of letting them fault on pages being
    /// remapped. Needs a gate registered by the VMM; without one this does nothing.
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
    /// Checks every value against its range.
    pub fn validate(&self) -> Result<(), Error> {
        check("pages_to_scan", u64::from(self.pages_to_scan), 1, u64::from(MAX_PAGES_TO_SCAN))?;
        check("sleep_ms", self.sleep_ms, 0, MAX_SLEEP_MS)?;
        check(
            "max_page_sharing",
            u64::from(self.max_page_sharing),
            u64::from(MIN_MAX_PAGE_SHARING),
            u64::from(MAX_MAX_PAGE_SHARING),
        )
    }

    /// Full speed: `pages_to_scan` 1_000_000 (capped per batch by the memory
    /// present), no sleep, running.
    pub fn full_speed() -> Self {
        Tunables { run: true, pages_to_scan: MAX_PAGES_TO_SCAN, sleep_ms: 0, ..Tunables::default() }
    }
}

fn check(name: &'static str, value: u64, min: u64, max: u64) -> Result<(), Error> {
    if value < min || value > max {
        return Err(Error::OutOfRange { name, value, min, max });
    }
    Ok(())
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
}
