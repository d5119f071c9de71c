//! [`MemoryStats`]: the snapshot of the memory manager's statistics (pool,
//! 2 MiB frames, VMAs, host bytes, the core's event [`Counters`], the
//! Protector's counters and the merger's [`MergeStats`]).

use std::sync::atomic::Ordering;

use serde::Serialize;

pub use crate::core::Counters;

use crate::core::State;
use crate::merge::MergeStats;
use crate::pool::ThpStatus;
use crate::protector::ProtectorCounters;
use crate::{HUGE_FRAME_PAGES, PAGE_SIZE};

/// A snapshot of the memory manager's statistics.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryStats {
    /// 4 KiB frames in the pool.
    pub frames_total: u64,
    /// Frames allocated.
    pub frames_used: u64,
    /// Frames free.
    pub frames_free: u64,
    /// Frames mapped by at least one guest page.
    pub frames_live: u64,
    /// Frames mapped by more than one guest page (KSM's pages_shared).
    pub frames_shared: u64,
    /// Guest pages mapping a frame another page maps too, beyond the first
    /// (KSM's pages_sharing).
    pub pages_sharing: u64,
    /// Guest pages of all VMs.
    pub guest_pages: u64,
    /// 2 MiB host frames in the pool.
    pub huge_frames_total: u64,
    /// 2 MiB host frames holding at least one live frame.
    pub huge_frames_in_use: u64,
    /// 2 MiB host frames with no live frame (punched: no host memory).
    pub huge_frames_empty: u64,
    /// 2 MiB frames punched because they became empty, since start.
    pub huge_frames_returned: u64,
    /// Free frames inside in-use 2 MiB frames / frames of in-use 2 MiB frames
    /// (0: in-use 2 MiB frames are full; near 1: they are mostly holes).
    pub fragmentation: f64,
    /// Guest pages currently write-protected.
    pub protected_pages: u64,
    /// Guest pages known to be zero (discarded, not written since).
    pub zero_pages: u64,
    /// VMAs the guest maps use (runs of consecutive frames).
    pub vma_count: u64,
    /// `vm.max_map_count` in force.
    pub vma_limit: u64,
    /// Requests refused because of the VMA budget.
    pub vma_refused: u64,
    /// Value `vm.max_map_count` was raised to, if it was.
    pub vma_limit_raised_to: Option<u64>,
    /// Host memory actually held by the memfd (st_blocks * 512).
    pub host_bytes: u64,
    /// Guest RAM of all VMs in bytes.
    pub guest_bytes: u64,
    /// Event counters.
    pub counters: Counters,
    /// Write-protect faults read from the userfaultfd.
    pub uffd_faults: u64,
    /// Remap events read from the userfaultfd.
    pub uffd_remap_events: u64,
    /// Wakes of resolved writers that failed (each logged).
    pub uffd_wake_errors: u64,
    /// Shmem transparent huge pages.
    pub thp: ThpStatus,
    /// Same-page merging (KSM vocabulary).
    pub merge: MergeStats,
}

impl MemoryStats {
    pub(crate) fn collect(st: &State, protector: &ProtectorCounters) -> Self {
        let buddy = st.pool().buddy();
        let total = buddy.total_frames();
        let free = buddy.free_frames();
        let hf_total = u64::from(buddy.huge_frames());
        let hf_empty = u64::from(buddy.empty_huge_frames());
        let in_use = hf_total - hf_empty;
        let holes = free - hf_empty * u64::from(HUGE_FRAME_PAGES);
        let fragmentation =
            if in_use == 0 { 0.0 } else { holes as f64 / (in_use * u64::from(HUGE_FRAME_PAGES)) as f64 };
        let guest_pages: u64 = st.tables().map(|(_, t)| u64::from(t.len())).sum();
        let (frames, budget) = (st.frames(), st.budget());
        MemoryStats {
            frames_total: total,
            frames_used: total - free,
            frames_free: free,
            frames_live: frames.live_frames(),
            frames_shared: frames.shared_frames(),
            pages_sharing: frames.shared_mappings() - frames.shared_frames(),
            guest_pages,
            huge_frames_total: hf_total,
            huge_frames_in_use: in_use,
            huge_frames_empty: hf_empty,
            huge_frames_returned: st.pool().huge_frames_returned(),
            fragmentation,
            protected_pages: st.tables().map(|(_, t)| t.protected_count() as u64).sum(),
            zero_pages: st.tables().map(|(_, t)| t.zero_count() as u64).sum(),
            vma_count: st.guest_vmas() as u64,
            vma_limit: budget.limit as u64,
            vma_refused: budget.refused,
            vma_limit_raised_to: budget.raised_to.map(|v| v as u64),
            host_bytes: st.pool().host_bytes(),
            guest_bytes: guest_pages * PAGE_SIZE as u64,
            counters: st.counters().clone(),
            uffd_faults: protector.faults.load(Ordering::Relaxed),
            uffd_remap_events: protector.remap_events.load(Ordering::Relaxed),
            uffd_wake_errors: protector.wake_errors.load(Ordering::Relaxed),
            thp: st.pool().thp().clone(),
            merge: MergeStats::default(),
        }
    }
}
