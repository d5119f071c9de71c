//! Event counters kept under the manager's lock (part of
//! [`crate::MemoryStats`]). Code outside the core bumps them with
//! [`super::State::count`] and reads them with [`super::State::counters`];
//! the statistics read the copy published with the core's figures
//! (`core/figures.rs`), never under the lock, so the counters of one reading
//! are those of one instant, consistent with the pool and sharing figures.

use std::time::Duration;

use serde::Serialize;

/// Event counters kept under the manager's lock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Write faults resolved by copying a shared frame.
    pub cow_copies: u64,
    /// Write faults resolved by taking a merged frame over in place.
    pub cow_reuses: u64,
    /// Merged frames taken over in place by their only remaining mapper in
    /// the background, before any write (the page made writable as soon as
    /// its last other mapper left; not counted in `cow_reuses`).
    pub cow_background_reuses: u64,
    /// Write faults on discarded (zero) pages.
    pub zero_page_faults: u64,
    /// Write faults on explicitly protected pages.
    pub protect_faults: u64,
    /// Write faults on pages that were no longer protected.
    pub spurious_faults: u64,
    /// Faults whose resolution failed (the writer retries; each is logged).
    pub fault_errors: u64,
    /// Write faults whose copy-on-write found no free frame (only with
    /// overcommit): the VM is marked out of memory and the writer stays blocked.
    pub cow_no_frame: u64,
    /// Remaps left incomplete (each logged): the new frame was mapped but a
    /// later step (registration, protection, making it writable) failed. The
    /// page stays read-only or unprotected-private, never writable-shared.
    pub remap_errors: u64,
    /// Successful merges (frames merged).
    pub merges: u64,
    /// Merge attempts whose contents differed.
    pub merge_differs: u64,
    /// Explicit unshares that changed something.
    pub unshares: u64,
    /// Frames migrated.
    pub migrations: u64,
    /// Pages discarded (balloon).
    pub discards: u64,
    /// Of them, pages discarded in place: their own frame punched and kept
    /// (read back as zero, but a read allocates a page again), not moved to
    /// the zero region; isolated pages (see
    /// [`crate::manager::ZERO_REGION_MIN_RUN`]) and pages the VMA
    /// budget refused.
    pub discards_in_place: u64,
    /// Merge chunks that held the merging VMs' vCPUs out of guest mode.
    pub vcpu_holds: u64,
    /// Total time vCPUs were held, in microseconds.
    pub vcpu_hold_us: u64,
    /// Holds whose vCPUs did not all leave guest mode in time (merged anyway).
    pub vcpu_hold_timeouts: u64,
}

/// A plain event counter of [`Counters`] (the ones bumped one event at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counter {
    /// [`Counters::zero_page_faults`].
    ZeroPageFault,
    /// [`Counters::protect_faults`].
    ProtectFault,
    /// [`Counters::spurious_faults`].
    SpuriousFault,
    /// [`Counters::fault_errors`].
    FaultError,
    /// [`Counters::cow_no_frame`].
    CowNoFrame,
    /// [`Counters::remap_errors`].
    RemapError,
    /// [`Counters::merges`].
    Merge,
    /// [`Counters::merge_differs`].
    MergeDiffers,
    /// [`Counters::unshares`].
    Unshare,
    /// [`Counters::migrations`].
    Migration,
    /// [`Counters::discards`].
    Discard,
    /// [`Counters::discards_in_place`].
    DiscardInPlace,
}

impl Counters {
    /// Adds `n` events to counter `c`.
    pub(crate) fn add(&mut self, c: Counter, n: u64) {
        let field = match c {
            Counter::ZeroPageFault => &mut self.zero_page_faults,
            Counter::ProtectFault => &mut self.protect_faults,
            Counter::SpuriousFault => &mut self.spurious_faults,
            Counter::FaultError => &mut self.fault_errors,
            Counter::CowNoFrame => &mut self.cow_no_frame,
            Counter::RemapError => &mut self.remap_errors,
            Counter::Merge => &mut self.merges,
            Counter::MergeDiffers => &mut self.merge_differs,
            Counter::Unshare => &mut self.unshares,
            Counter::Migration => &mut self.migrations,
            Counter::Discard => &mut self.discards,
            Counter::DiscardInPlace => &mut self.discards_in_place,
        };
        *field += n;
    }

    /// Records one hold of vCPUs that lasted `held`; `reached`: every vCPU
    /// left guest mode in time.
    pub(crate) fn add_vcpu_hold(&mut self, held: Duration, reached: bool) {
        self.vcpu_hold_us += held.as_micros() as u64;
        self.vcpu_holds += 1;
        self.vcpu_hold_timeouts += u64::from(!reached);
    }
}
