//! What the compactor reports: one pass ([`CompactionReport`]), the running
//! totals and the pool's fragmentation ([`CompactionStats`]), and the frames
//! that could not move, by reason ([`CompactionFailures`]).
//!
//! Wire types of the HTTP API (`GET /memory` carries [`CompactionStats`]); the
//! field comments are the API's descriptions.

use serde::{Deserialize, Serialize};

/// Frames a pass could not move, by reason. A frame that cannot move stays
/// where it is, mapped by the same guest pages, fully consistent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CompactionFailures {
    /// Migrations refused because the VMA budget (`vm.max_map_count`) was exhausted.
    pub vma_budget: u64,
    /// Migrations whose remap (protect, map, register) failed.
    pub remap_failed: u64,
    /// Frames left in place because no free target slot was left for them
    /// (the slot planned for them was taken by another allocation).
    pub no_target: u64,
    /// Frames skipped because another operation held them. Always 0 today:
    /// every operation that holds a frame (device access, merge, fault
    /// resolution) holds the manager's lock, which a migration takes too, so
    /// the compactor only ever sees frames between operations.
    pub pinned: u64,
}

impl CompactionFailures {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &CompactionFailures) {
        self.vma_budget += other.vma_budget;
        self.remap_failed += other.remap_failed;
        self.no_target += other.no_target;
        self.pinned += other.pinned;
    }

    /// All failures.
    pub fn total(&self) -> u64 {
        self.vma_budget + self.remap_failed + self.no_target + self.pinned
    }
}

/// What one compaction pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CompactionReport {
    /// 4 KiB frames migrated (each remapping every guest page that maps it).
    pub pages_migrated: u64,
    /// 2 MiB frames emptied by the pass's migrations and punched (given back to the host).
    pub frames_2m_returned: u64,
    /// 2 MiB frames holding live frames when the pass started.
    pub frames_2m_in_use_before: u64,
    /// 2 MiB frames holding live frames when the pass ended.
    pub frames_2m_in_use_after: u64,
    /// Fewest 2 MiB frames the live frames fit in (ceil(live frames / 512)), at the start.
    pub ideal_frames_2m: u64,
    /// Frames that could not move, by reason.
    pub failures: CompactionFailures,
    /// Wall time of the pass in milliseconds.
    pub duration_ms: f64,
    /// Where the pass's wall time went.
    #[serde(default)]
    pub timing: CompactionTiming,
}

/// Where one pass's wall time went (milliseconds unless said otherwise). The
/// wall time is about `plan_ms + lock_wait_ms + hold_ms + yield_ms + pace_ms`;
/// `hold_ms - cpu_ms` (when positive) is time the pass was off the CPU
/// while holding the manager's lock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CompactionTiming {
    /// CPU time of the thread that ran the pass (user and system).
    pub cpu_ms: f64,
    /// Taking the snapshot of the pool and planning the pass.
    pub plan_ms: f64,
    /// Waiting to take the manager's lock for the batches.
    pub lock_wait_ms: f64,
    /// Holding the manager's lock for the batches (migrating).
    pub hold_ms: f64,
    /// Holds of the manager's lock (batches).
    pub lock_holds: u64,
    /// Batches ended early because a write fault waited for the lock.
    pub fault_handoffs: u64,
    /// Letting waiting write faults take the lock between batches.
    pub yield_ms: f64,
    /// Sleeping to keep the rate limit (proactive passes).
    pub pace_ms: f64,
}

/// The compactor's view of the pool and its totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CompactionStats {
    /// Free 4 KiB frames in the pool.
    pub free_frames: u64,
    /// Free 4 KiB frames inside 2 MiB frames that hold live frames (the holes compaction fills).
    pub free_frames_in_partial_2m: u64,
    /// Whole free 2 MiB frames (no live frame, no host memory).
    pub free_frames_2m: u64,
    /// 2 MiB frames emptied by compaction and punched, since start.
    pub frames_2m_returned: u64,
    /// Fewest 2 MiB frames the live frames fit in (ceil(live frames / 512)).
    pub ideal_frames_2m: u64,
    /// `free_frames_in_partial_2m` / (2 MiB frames holding live frames * 512):
    /// 0 = packed, near 1 = the 2 MiB frames in use are mostly holes.
    pub fragmentation: f64,
    /// 4 KiB frames migrated by compaction, since start.
    pub pages_migrated: u64,
    /// Compaction passes run (on demand and proactive), since start.
    pub passes: u64,
    /// Proactive (background) passes run, since start.
    pub proactive_passes: u64,
    /// Frames that could not move, by reason, since start.
    pub failures: CompactionFailures,
}
