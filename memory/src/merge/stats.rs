//! Statistics of the merger, with Linux KSM's names and meanings
//! (Documentation/admin-guide/mm/ksm.rst).
//!
//! The figures that live under the manager's lock (sharing, zero pages, the
//! per-VM counts) are read from the core's published [`Figures`], never under
//! the lock ([`MergeStats::set_sharing`], [`VmMergeStats::of_figures`]).

use serde::Serialize;

use crate::core::figures::Figures;
use crate::VmId;

use super::domains::DomainId;
use super::tunables::Tunables;

/// Host-wide merge statistics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MergeStats {
    /// The scanner is running.
    pub run: bool,
    /// Shared frames in use: frames mapped by more than one guest page (KSM's
    /// `pages_shared`).
    pub pages_shared: u64,
    /// Guest pages mapping a shared frame beyond the first mapping of each, i.e.
    /// pages saved (KSM's `pages_sharing`).
    pub pages_sharing: u64,
    /// Pages found unique at their last visit and kept as merge candidates
    /// (KSM's `pages_unshared`: the unstable index).
    pub pages_unshared: u64,
    /// Pages that changed since their previous visit and were skipped (KSM's
    /// `pages_volatile`).
    pub pages_volatile: u64,
    /// Pages visited since start (KSM's `pages_scanned`).
    pub pages_scanned: u64,
    /// Completed full scans of all mergeable memory (KSM's `full_scans`). While
    /// the scanner is idle, a poll of the dirty logs that brought every changed
    /// page up to date counts as one (clean pages would be skipped anyway).
    pub full_scans: u64,
    /// Guest pages whose content was all zero and whose memory was dropped
    /// (KSM's `ksm_zero_pages`; needs `merge_zero_pages`).
    pub zero_pages: u64,
    /// Bytes saved by merging and zero pages minus the merger's metadata bytes
    /// (KSM's `general_profit`; may be negative).
    pub general_profit: i64,
    /// Bytes of merger metadata (per-page state, indexes).
    pub metadata_bytes: u64,
    /// Frames in the stable index (KSM's stable nodes).
    pub stable_frames: u64,
    /// Stable index keys holding more than one frame because of
    /// `max_page_sharing` (KSM's `stable_node_chains`).
    pub stable_node_chains: u64,
    /// Guest pages the merger mapped onto another frame.
    pub merges: u64,
    /// Remap calls (one `mmap` each) those merges took: fewer than `merges`
    /// when runs of clone pages were merged at once.
    pub merge_runs: u64,
    /// Pages given a private frame again by unmerge-all or by leaving a domain.
    pub unmerges: u64,
    /// Merges of two private pages that kept the scanned page's frame instead of
    /// the indexed one, because its 2 MiB host frame was more occupied
    /// (passive compaction).
    pub merge_choice_flips: u64,
    /// Candidates whose full 4 KiB comparison failed despite equal hashes.
    pub hash_mismatches: u64,
    /// Merges refused because the frame belonged to another merge domain
    /// (should stay 0: the indexes are keyed by domain).
    pub cross_domain_refusals: u64,
    /// Wall time of the last full scan in milliseconds (sleeps included).
    pub full_scan_ms_last: f64,
    /// Average wall time of a full scan in milliseconds.
    pub full_scan_ms_avg: f64,
    /// Busy time (no sleeps) of the last full scan in milliseconds.
    pub merge_time_ms_last: f64,
    /// Average busy time of a full scan in milliseconds.
    pub merge_time_ms_avg: f64,
    /// Checksum mode: page visits skipped because the page was unchanged and
    /// unshared at several visits in a row (KSM's `pages_skipped`, smart scan).
    pub pages_skipped: u64,
    /// The scanner backed off: memory is idle and it polls the dirty logs
    /// instead of rescanning (see `memory::merge::backoff`).
    pub idle: bool,
    /// Polls of the dirty logs while idle (each that left nothing pending also
    /// counts in `full_scans`).
    pub idle_polls: u64,
    /// VMs with merging enabled.
    pub vms_enabled: u64,
    /// VMs scanned with their dirty log (the others use checksums).
    pub vms_dirty_log: u64,
    /// Linux thread id of the scanner thread (for CPU accounting).
    pub scanner_tid: i32,
    /// The tunables in force.
    pub tunables: Tunables,
}

impl MergeStats {
    /// Sets the sharing figures (`pages_shared`, `pages_sharing`,
    /// `zero_pages`) from `f` and `general_profit` from them.
    pub(crate) fn set_sharing(&mut self, f: &Figures) {
        self.pages_shared = f.frames_shared;
        self.pages_sharing = f.pages_sharing();
        self.zero_pages = f.merged_zero_pages;
        let saved = (self.pages_sharing + self.zero_pages) * crate::PAGE_SIZE as u64;
        self.general_profit = saved as i64 - self.metadata_bytes as i64;
    }
}

/// Merge statistics of one VM.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VmMergeStats {
    /// The VM.
    pub vm: VmId,
    /// Merging is enabled for it.
    pub enabled: bool,
    /// Its merge domain.
    pub domain: DomainId,
    /// Guest pages.
    pub guest_pages: u64,
    /// Guest pages mapping a frame shared with another guest page.
    pub merged_pages: u64,
    /// Guest pages whose zero content was dropped by the merger.
    pub zero_pages: u64,
    /// Host mappings (VMAs) of its guest memory: runs of consecutive frames.
    pub vma_count: u64,
    /// Write faults resolved by copying a shared frame.
    pub cow_copies: u64,
    /// Write faults resolved by taking a merged frame over in place.
    pub cow_reuses: u64,
    /// Merged frames taken over in place in the background, before any write
    /// (their other mappers had left; not counted in `cow_reuses`).
    pub cow_background_reuses: u64,
    /// Pages found changed at their last visit.
    pub pages_volatile: u64,
    /// Pages found unique at their last visit.
    pub pages_unshared: u64,
    /// The scanner uses the VM's dirty log (false: checksums).
    pub dirty_log: bool,
}

impl VmMergeStats {
    /// The statistics of VM `vm` in `f` (None: no such VM); the scanner's
    /// per-VM counts (`pages_volatile`, `pages_unshared`, `dirty_log`) are left
    /// for the caller.
    pub(crate) fn of_figures(f: &Figures, vm: VmId) -> Option<Self> {
        let v = f.vm(vm)?;
        Some(VmMergeStats {
            vm,
            enabled: v.merge_enabled,
            domain: v.domain,
            guest_pages: v.guest_pages,
            merged_pages: v.merged_pages,
            zero_pages: v.merged_zero_pages,
            vma_count: v.vma_count,
            cow_copies: v.cow_copies,
            cow_reuses: v.cow_reuses,
            cow_background_reuses: v.cow_background_reuses,
            ..VmMergeStats::default()
        })
    }
}
