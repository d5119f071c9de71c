//! The manager's figures published for readers that must not take the
//! manager's lock: [`Figures`] (everything the statistics need from
//! [`State`]: pool, 2 MiB frames, sharing, page-table counts, VMA budget, the
//! event [`Counters`] and every VM's figures) and [`StatsBoard`], where the
//! thread holding the lock publishes them (an [`ArcSwap`]: a reader loads the
//! last publication without waiting for anyone).
//!
//! When they are published (the rule `core/mod.rs`'s guard applies):
//!
//! - a holder of the lock that changed the state publishes when it releases
//!   it, except the fault handler, which only marks the board dirty (and
//!   publishes if the last publication is older than [`PUBLISH_PERIOD`]), so
//!   that a write fault pays nothing but a flag and a clock read;
//! - any other holder publishes when it takes a dirty board's lock (so what
//!   faults changed is published before a long hold, a merge chunk or a
//!   compaction batch, starts);
//! - a reader that finds the board dirty tries the lock for at most
//!   [`READER_SPIN`] and publishes itself if it gets it.
//!
//! So a reader sees every operation that ended before its read began (at
//! worst it misses write faults resolved just before, while another fault
//! holds the lock longer than [`READER_SPIN`]); the figures of one publication
//! are one instant of the state, consistent with each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::counters::Counters;
use super::merge_settings::DomainId;
use super::state::State;
use crate::VmId;

/// Longest time the fault handler leaves changes unpublished while it is the
/// only holder of the lock.
pub(crate) const PUBLISH_PERIOD: Duration = Duration::from_millis(1);

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
    /// Every VM's figures.
    pub(crate) vms: HashMap<VmId, VmFigures>,
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
            vms: HashMap::new(),
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
                merge_enabled: cfg.enabled,
                domain: cfg.domain,
            };
            f.guest_pages += vmf.guest_pages;
            f.protected_pages += table.protected_count() as u64;
            f.zero_pages += table.zero_count() as u64;
            f.merged_zero_pages += vmf.merged_zero_pages;
            f.vma_count += vmf.vma_count;
            f.vms.insert(vm, vmf);
        }
        f
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
    /// When the last publication was made, in nanoseconds since `epoch`.
    published_at: AtomicU64,
    epoch: Instant,
}

impl StatsBoard {
    /// A board publishing the figures of `st`.
    pub(crate) fn new(st: &State) -> Self {
        StatsBoard {
            published: ArcSwap::from_pointee(Figures::of(st)),
            dirty: AtomicBool::new(false),
            published_at: AtomicU64::new(0),
            epoch: Instant::now(),
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
        self.published_at.store(self.now_ns(), Ordering::Relaxed);
        self.dirty.store(false, Ordering::Release);
    }

    /// Records a change of `st` by its holder (called before the lock is
    /// released): published now if `now`, or if the last publication is older
    /// than [`PUBLISH_PERIOD`]; else the board is left dirty.
    pub(crate) fn changed(&self, st: &State, now: bool) {
        let age = self.now_ns().saturating_sub(self.published_at.load(Ordering::Relaxed));
        if now || age >= PUBLISH_PERIOD.as_nanos() as u64 {
            self.publish(st);
        } else {
            self.dirty.store(true, Ordering::Release);
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}
