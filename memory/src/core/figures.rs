//! The manager's figures published for readers that must not take the
//! manager's lock: [`Figures`] (everything the statistics need from
//! [`State`]: pool, 2 MiB frames, sharing, page-table counts, VMA budget, the
//! event [`Counters`] and every VM's figures) and [`StatsBoard`], where the
//! thread holding the lock publishes them (an [`ArcSwap`]: a reader loads the
//! last publication without waiting for anyone).
//!
//! When they are published (the rule `core/mod.rs`'s guard applies):
//!
//! - a holder of the lock that changed the state marks the board dirty when it
//!   releases the lock, and publishes every [`PUBLISH_EVERY`]th such change
//!   (so that a stream of short operations, write faults included, keeps the
//!   publication close without paying for one each; no clock is read);
//! - any holder but the fault handler publishes a dirty board when it takes
//!   the lock, so that everything done before a long hold (a merge chunk, a
//!   compaction batch, an API operation) is published before it starts;
//! - a reader that finds the board dirty tries the lock for at most
//!   [`READER_SPIN`] and publishes itself if it gets it.
//!
//! So a reader sees every operation that ended before its read began (at
//! worst it misses operations that ended just before while a write fault has
//! held the lock longer than [`READER_SPIN`]); the figures of one publication
//! are one instant of the state, consistent with each other.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::counters::Counters;
use super::merge_settings::DomainId;
use super::state::State;
use crate::VmId;

/// Most changing holds of the lock left unpublished in a row (a reader or the
/// next holder publishes them sooner).
pub(crate) const PUBLISH_EVERY: u32 = 64;

/// Longest time a reader tries the lock to publish a dirty board before it
/// settles for the last publication.
pub(crate) const READER_SPIN: Duration = Duration::from_micros(200);

/// One VM's figures (from its page table, the frame table and its merge settings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct VmFigures {
    /// Start of its guest RAM in the host address space.
    pub(crate) host_addr: usize,
    /// Guest pages.
    pub(crate) guest_pages: u64,
    /// Guest pages mapping a frame another guest page maps too.
    pub(crate) merged_pages: u64,
    /// Guest pages the merger found zero and dropped.
    pub(crate) merged_zero_pages: u64,
    /// Host mappings of its guest RAM (runs of consecutive frames).
    pub(crate) vma_count: u64,
    /// Write faults resolved by copying a shared frame.
    pub(crate) cow_copies: u64,
    /// Write faults resolved by taking a merged frame over.
    pub(crate) cow_reuses: u64,
    /// Merged frames taken over in the background (no fault).
    pub(crate) cow_background_reuses: u64,
    /// Merging is enabled for it.
    pub(crate) merge_enabled: bool,
    /// Its merge domain.
    pub(crate) domain: DomainId,
}

/// What the statistics need from [`State`], taken at one instant under the lock.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Figures {
    /// 4 KiB frames in the pool.
    pub(crate) frames_total: u64,
    /// Free 4 KiB frames.
    pub(crate) frames_free: u64,
    /// 2 MiB frames in the pool.
    pub(crate) huge_frames: u64,
    /// 2 MiB frames with no allocated frame.
    pub(crate) huge_frames_empty: u64,
    /// 2 MiB frames punched because they became empty, since start.
    pub(crate) huge_frames_returned: u64,
    /// Holes punched in the pool memfd since start.
    pub(crate) punch_calls: u64,
    /// Frames mapped by at least one guest page.
    pub(crate) frames_live: u64,
    /// Frames mapped by more than one guest page.
    pub(crate) frames_shared: u64,
    /// Mappings of frames mapped by more than one guest page.
    pub(crate) shared_mappings: u64,
    /// Guest pages of all VMs.
    pub(crate) guest_pages: u64,
    /// Guest pages write-protected.
    pub(crate) protected_pages: u64,
    /// Guest pages known to be zero.
    pub(crate) zero_pages: u64,
    /// Guest pages the merger found zero and dropped.
    pub(crate) merged_zero_pages: u64,
    /// VMAs of guest memory.
    pub(crate) vma_count: u64,
    /// `vm.max_map_count` in force.
    pub(crate) vma_limit: u64,
    /// Requests refused because of the VMA budget.
    pub(crate) vma_refused: u64,
    /// Value `vm.max_map_count` was raised to, if it was.
    pub(crate) vma_limit_raised_to: Option<u64>,
    /// The event counters.
    pub(crate) counters: Counters,
    /// Every VM's figures (in no particular order; see [`Figures::vm`]).
    pub(crate) vms: Vec<(VmId, VmFigures)>,
}

impl Figures {
    /// The figures of `st` now (O(VMs): every count is kept as it changes).
    pub(crate) fn of(st: &State) -> Self {
        let buddy = st.pool().buddy();
        let frames = st.frames();
        let budget = st.budget();
        let mut f = Figures {
            frames_total: buddy.total_frames(),
            frames_free: buddy.free_frames(),
            huge_frames: u64::from(buddy.huge_frames()),
            huge_frames_empty: u64::from(buddy.empty_huge_frames()),
            huge_frames_returned: st.pool().huge_frames_returned(),
            punch_calls: st.pool().punch_calls(),
            frames_live: frames.live_frames(),
            frames_shared: frames.shared_frames(),
            shared_mappings: frames.shared_mappings(),
            vma_limit: budget.limit as u64,
            vma_refused: budget.refused,
            vma_limit_raised_to: budget.raised_to.map(|v| v as u64),
            counters: st.counters().clone(),
            vms: Vec::with_capacity(st.tables().size_hint().0),
            ..Figures::default()
        };
        for (vm, table) in st.tables() {
            let cfg = st.merge_config(vm);
            let (cow_copies, cow_reuses) = table.cow_counts();
            let vmf = VmFigures {
                host_addr: table.host_addr(),
                guest_pages: u64::from(table.len()),
                merged_pages: frames.shared_mappings_of(vm),
                merged_zero_pages: table.merged_zero_count() as u64,
                vma_count: table.vma_count() as u64,
                cow_copies,
                cow_reuses,
                cow_background_reuses: table.cow_background_reuses(),
                merge_enabled: cfg.enabled,
                domain: cfg.domain,
            };
            f.guest_pages += vmf.guest_pages;
            f.protected_pages += table.protected_count() as u64;
            f.zero_pages += table.zero_count() as u64;
            f.merged_zero_pages += vmf.merged_zero_pages;
            f.vma_count += vmf.vma_count;
            f.vms.push((vm, vmf));
        }
        f
    }

    /// The figures of VM `vm`, if it exists.
    pub(crate) fn vm(&self, vm: VmId) -> Option<&VmFigures> {
        self.vms.iter().find(|(id, _)| *id == vm).map(|(_, v)| v)
    }

    /// Guest pages mapping a shared frame beyond the first mapping of each
    /// (KSM's `pages_sharing`).
    pub(crate) fn pages_sharing(&self) -> u64 {
        self.shared_mappings - self.frames_shared
    }
}

/// Where the lock's holders publish [`Figures`] for lock-free readers.
pub(crate) struct StatsBoard {
    published: ArcSwap<Figures>,
    /// The state changed since the last publication.
    dirty: AtomicBool,
    /// Changing holds since the last publication (changed under the lock only).
    pending: AtomicU32,
}

impl StatsBoard {
    /// A board publishing the figures of `st`.
    pub(crate) fn new(st: &State) -> Self {
        StatsBoard {
            published: ArcSwap::from_pointee(Figures::of(st)),
            dirty: AtomicBool::new(false),
            pending: AtomicU32::new(0),
        }
    }

    /// The last publication.
    pub(crate) fn load(&self) -> Arc<Figures> {
        self.published.load_full()
    }

    /// Whether the state changed since the last publication.
    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Publishes the figures of `st` (the caller holds the lock).
    pub(crate) fn publish(&self, st: &State) {
        self.published.store(Arc::new(Figures::of(st)));
        self.pending.store(0, Ordering::Relaxed);
        self.dirty.store(false, Ordering::Release);
    }

    /// Records a change of `st` by its holder (called before the lock is
    /// released): published every [`PUBLISH_EVERY`]th change, else the board
    /// is left dirty.
    pub(crate) fn changed(&self, st: &State) {
        if self.pending.fetch_add(1, Ordering::Relaxed) + 1 >= PUBLISH_EVERY {
            self.publish(st);
        } else {
            self.dirty.store(true, Ordering::Release);
        }
    }
}
