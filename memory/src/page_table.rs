//! The per-VM page table of the memory manager: guest page number -> frame and
//! flags, plus the VMA count the realized mapping needs.
//!
//! Pure bookkeeping: the host mappings are changed by [`crate::remap`], and this
//! table records what they are. The tables live in the core's `State`, so
//! every flag below is read and changed only under the manager's lock.
//!
//! ## Page states
//!
//! | flags                               | state                                             |
//! |-------------------------------------|---------------------------------------------------|
//! | `MAPPED`                            | private, writable (the common case)               |
//! | `MAPPED PROTECTED`                  | private, explicitly protected (next write faults) |
//! | `MAPPED PROTECTED SHARED`           | maps a merged frame; with one mapper left, it is queued for background reuse (made `MAPPED`, writable, by the Protector's thread), or the next write reuses it |
//! | `MAPPED PROTECTED ZERO`             | discarded: no host memory, reads as zero          |
//! | `MAPPED PROTECTED ZERO MERGED_ZERO` | zeroed by the merger (KSM's zero pages)           |
//! | `MAPPED PROTECTED SHARED ZERO`      | a zero page merged with others                    |
//!
//! A `ZERO` page comes in two forms, told apart by its frame: on the pool's
//! **zero region** ([`crate::FramePool::zero_frame`]; the normal form of a
//! discarded or merger-zeroed page: its own frame went back to the pool, a
//! read allocates nothing, the frame is counted by no reference, and its write
//! fault maps a fresh frame of its own, `core/fault.rs`), or on a frame of its
//! own, punched (a fresh frame given by a device write, or the fallback when
//! the VMA budget refuses the zero region's mappings: a read of it allocates a
//! page, its write fault just unprotects). A page on the zero region is
//! always `PROTECTED | ZERO`, never `SHARED`, and never made writable in place
//! (`Txn::unprotect_page` refuses it).
//!
//! `DEVICE_WRITTEN`, `WRITE_FAULTED` and `MERGE_DIRTY` are records that may
//! accompany any state. Invariants: `SHARED` or `ZERO` implies `PROTECTED`;
//! a frame with more than one mapper has every mapper `PROTECTED | SHARED`;
//! `MERGED_ZERO` implies `ZERO` ([`PageTable::set_flags`] enforces it). A page
//! in the read-only instant of a remap has no flag of its own: the remap
//! protocol's in-flight mark ([`crate::write_retry`]) covers it.
//!
//! ## Who sets and clears each flag (all under the manager's lock)
//!
//! - `MAPPED`: set for every page when the VM is created (`core/guests.rs`);
//!   never cleared.
//! - `PROTECTED`: set by `Txn::protect_page` (merge, migrate, discard, explicit
//!   protect: `core/page_ops.rs`), `Txn::protect_group` (the merger's
//!   `share_run` and `zero_run`, `merge/ops.rs`), `Txn::move_page` ending
//!   protected, and `share_run` for the pages it remaps. Cleared by
//!   `Txn::unprotect_page` (fault resolution of a protect or zero fault, reuse,
//!   background reuse of sole-mapped merged pages (`Txn::reuse_in_background`),
//!   `MemoryManager::unprotect`, undo after a failed compare, `unshare_range`
//!   taking a merged frame over), by `Txn::move_page` ending unprotected
//!   (copy-on-write, migration of an unprotected page) and by `unshare_range`'s
//!   copies (`core/unshare.rs`); `zero_run` clears and sets it around the punch.
//! - `SHARED`: set by `merge_frames` (`core/page_ops.rs`) and `share_run` on
//!   every mapper of the kept frame. Cleared by `Txn::unprotect_page`,
//!   copy-on-write (`Txn::cow_copy`), discard and `unshare_range`; the last
//!   mapper of a formerly shared frame keeps it until the background reuse
//!   drains it from the queue (`core/background_reuse.rs`: re-checked under
//!   the lock, one `UFFDIO_WRITEPROTECT` per run of pages, `PROTECTED` and
//!   `SHARED` cleared together) or its next write (fault-time reuse),
//!   whichever comes first.
//! - `ZERO`: set by discard and `zero_run` (with the move to the zero region,
//!   `Txn::drop_to_zero_region`, or after an in-place punch if the page is
//!   still a hole), and `merge_frames` when a merged page was zero. Cleared by
//!   `Txn::unprotect_page`, copy-on-write, device writes (`write_bytes`),
//!   a write fault or unprotect leaving the zero region
//!   (`Txn::leave_zero_region`), discard in place (written between punch and
//!   re-protect) and `unshare_range`.
//! - `MERGED_ZERO`: set by `zero_run`; cleared with `ZERO` and by discard.
//! - `DEVICE_WRITTEN`: set by device writes (`write_bytes`); cleared by
//!   [`crate::GuestMap::take_device_written`].
//! - `WRITE_FAULTED`: set by fault resolution on a protected page that maps
//!   no shared frame (`core/fault.rs`); cleared by
//!   [`crate::GuestMap::take_write_faulted`].
//! - `MERGE_DIRTY`: set by device writes; cleared by the merger's visit of the
//!   page (`merge/visit.rs`).
//!
//! ## Lock order of the crate
//!
//! Outer to inner; a thread holding a lock only takes locks below it:
//!
//! 1. The merger handle's `Shared::control` (tunables, run, unmerge requests;
//!    its condvar `wake`), then `Merger::thread` (`unmerge_all` checks the
//!    thread under `control`). Neither is held while the manager's lock is taken.
//!    Beside them, never nested with them: the compactor's `Shared::pass` (one
//!    pass at a time: held by `MemoryManager::compact` and by a proactive
//!    pass for the whole pass, around many holds of the manager's lock), and
//!    `Compactor::thread` (taken alone, at shutdown).
//! 2. The manager's lock, `Core::state` (`Mutex<State>`): API calls, the
//!    Protector's handler thread (`Core::lock_for_fault`, announced in the
//!    `fault_waiters` atomic so that the scanner and the compactor yield
//!    between chunks; and, between faults, `Core::lock` for one batch of
//!    background reuse: `core/background_reuse.rs`), the merge scanner (one chunk per hold) and a compaction
//!    pass (one batch of at most 64 migrations per hold, ended early when a
//!    fault waits). Nothing done under it waits for the
//!    handler thread: writers blocked in a userfaultfd fault are woken by the
//!    handler after it released the lock.
//! 3. Under the manager's lock only, each a leaf: `Core::dirty_logs` and
//!    `Core::vcpu_gates` (guest destruction, chunk start), the VMM's
//!    [`crate::VcpuGate`] (held from a chunk's first change to its end; its
//!    wait for vCPUs to leave guest mode is bounded), the remap protocol's
//!    in-flight marks (`write_retry` atomics: set before a read-only mapping,
//!    cleared once it is writable again; the SIGSEGV handler only spins on
//!    them), the Protector's doorbell (a non-blocking eventfd write when the
//!    lock is released after pages were queued for background reuse), and
//!    the kernel's `mmap_lock` (mmap, mprotect, userfaultfd
//!    register and write-protect). The VMA budget and the counters are fields
//!    of `State` with no lock of their own. Memory commitment's three mutexes
//!    (`Commitment::policy`, `out_of_memory`, `handlers`: see
//!    [`crate::core::commit`]) are leaves too, taken under the manager's lock
//!    or with no lock (the fault thread marks a VM out of memory under the
//!    manager's lock and calls its handler after releasing it).
//! 4. Leaves taken with no other lock held: the merger's `Shared::stats`
//!    (condvar `scanned`) and `Shared::vm_counts` (one after the other, never
//!    nested), `Core::dirty_logs` when the scanner fetches a VM's log, the
//!    VMM's `DirtyLog::take_dirty`, and the compactor's `Shared::tunables`
//!    (condvar `wake`) and `Shared::totals` (under `Shared::pass` at most,
//!    never with the manager's lock).
//!
//! The statistics never wait for the manager's lock: its holders publish the
//! figures the statistics need on `Core::board` (`core/figures.rs`, an
//! `ArcSwap` store under the lock, a leaf), readers load the last
//! publication and only `try_lock` (bounded, never blocking) to refresh a
//! stale one.
//!
//! Lock-free: the Protector's counters, the merger's `generation` and `tid`,
//! the compactor's `generation` and `stop`,
//! `fault_waiters`, and `write_retry`'s range and in-flight slots (read by
//! its signal handler).

use crate::{FrameNo, VmId, PAGE_SIZE};

/// Flags of one guest page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageFlags(u8);

impl PageFlags {
    /// The page is backed by a frame (always true once the VM is realized).
    pub const MAPPED: PageFlags = PageFlags(1 << 0);
    /// The page is write-protected through the userfaultfd.
    pub const PROTECTED: PageFlags = PageFlags(1 << 1);
    /// The page maps a merged (shared/stable) frame; writes break sharing.
    pub const SHARED: PageFlags = PageFlags(1 << 2);
    /// The page is known to read as zero (discarded) and is protected so that
    /// the first write is seen.
    pub const ZERO: PageFlags = PageFlags(1 << 3);
    /// The VMM's device code wrote the page (through [`crate::GuestMap::write_bytes`]).
    pub const DEVICE_WRITTEN: PageFlags = PageFlags(1 << 4);
    /// A write fault on an explicitly protected page was resolved.
    pub const WRITE_FAULTED: PageFlags = PageFlags(1 << 5);
    /// The merger found the page all zero and dropped its host memory (KSM's
    /// `ksm_zero_pages`). Only meaningful together with [`PageFlags::ZERO`]:
    /// cleared whenever `ZERO` is.
    pub const MERGED_ZERO: PageFlags = PageFlags(1 << 6);
    /// Device code wrote the page since the merger last looked at it (the
    /// merger's own copy of [`PageFlags::DEVICE_WRITTEN`]).
    pub const MERGE_DIRTY: PageFlags = PageFlags(1 << 7);

    /// No flag set.
    pub const fn empty() -> Self {
        PageFlags(0)
    }

    /// Whether all flags of `other` are set.
    pub const fn contains(self, other: PageFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` with the flags of `other` added.
    pub const fn with(self, other: PageFlags) -> Self {
        PageFlags(self.0 | other.0)
    }

    /// `self` with the flags of `other` removed.
    pub const fn without(self, other: PageFlags) -> Self {
        PageFlags(self.0 & !other.0)
    }

    /// Raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }
}

/// One guest page: the frame backing it and its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    /// Frame backing the page.
    pub frame: FrameNo,
    /// Flags of the page.
    pub flags: PageFlags,
}

/// Guest page number -> frame and flags for one VM, realized at `host_addr`.
pub struct PageTable {
    vm: VmId,
    host_addr: usize,
    pages: Vec<PageEntry>,
    /// Number of i with frame(i+1) != frame(i)+1: each starts a new VMA.
    breaks: usize,
    protected: usize,
    zero: usize,
    merged_zero: usize,
    /// Write faults on this VM's pages resolved by copying a shared frame.
    cow_copies: u64,
    /// Write faults on this VM's pages resolved by reusing a merged frame.
    cow_reuses: u64,
    /// Merged frames this VM's pages took over in the background (no fault).
    cow_background_reuses: u64,
}

impl PageTable {
    /// A table of VM `vm` whose pages are backed by `frames`, realized at `host_addr`.
    pub fn new(vm: VmId, host_addr: usize, frames: &[FrameNo]) -> Self {
        let pages: Vec<PageEntry> = frames.iter().map(|&frame| PageEntry { frame, flags: PageFlags::MAPPED }).collect();
        let breaks = frames.windows(2).filter(|w| u64::from(w[1]) != u64::from(w[0]) + 1).count();
        PageTable {
            vm,
            host_addr,
            pages,
            breaks,
            protected: 0,
            zero: 0,
            merged_zero: 0,
            cow_copies: 0,
            cow_reuses: 0,
            cow_background_reuses: 0,
        }
    }

    /// The VM this table belongs to.
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// Start of the guest RAM in the host address space.
    pub fn host_addr(&self) -> usize {
        self.host_addr
    }

    /// Number of guest pages.
    pub fn len(&self) -> u32 {
        self.pages.len() as u32
    }

    /// Whether the table has no page.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Host address of guest page `page`.
    pub fn page_addr(&self, page: u32) -> usize {
        self.host_addr + page as usize * PAGE_SIZE
    }

    /// Guest page holding host address `addr`, if inside this table's range.
    pub fn page_at(&self, addr: usize) -> Option<u32> {
        let offset = addr.checked_sub(self.host_addr)?;
        let page = offset / PAGE_SIZE;
        (page < self.pages.len()).then_some(page as u32)
    }

    /// Entry of `page`.
    pub fn get(&self, page: u32) -> Option<PageEntry> {
        self.pages.get(page as usize).copied()
    }

    /// All entries.
    pub fn entries(&self) -> &[PageEntry] {
        &self.pages
    }

    /// Changes the frame of `page` (the caller has remapped it), keeping the VMA count.
    pub fn set_frame(&mut self, page: u32, frame: FrameNo) {
        let i = page as usize;
        self.breaks -= self.breaks_around(i);
        self.pages[i].frame = frame;
        self.breaks += self.breaks_around(i);
    }

    /// Sets the flags of `page` (the caller has changed the mapping to match).
    /// `MERGED_ZERO` is dropped when `ZERO` is not set.
    pub fn set_flags(&mut self, page: u32, flags: PageFlags) {
        let flags = if flags.contains(PageFlags::ZERO) { flags } else { flags.without(PageFlags::MERGED_ZERO) };
        let entry = &mut self.pages[page as usize];
        let old = entry.flags;
        entry.flags = flags;
        for (flag, count) in [
            (PageFlags::PROTECTED, &mut self.protected),
            (PageFlags::ZERO, &mut self.zero),
            (PageFlags::MERGED_ZERO, &mut self.merged_zero),
        ] {
            match (old.contains(flag), flags.contains(flag)) {
                (false, true) => *count += 1,
                (true, false) => *count -= 1,
                _ => {}
            }
        }
    }

    /// Number of VMAs the realized mapping needs (runs of consecutive frames).
    pub fn vma_count(&self) -> usize {
        if self.pages.is_empty() {
            0
        } else {
            self.breaks + 1
        }
    }

    /// Number of write-protected pages.
    pub fn protected_count(&self) -> usize {
        self.protected
    }

    /// Number of pages known to be zero.
    pub fn zero_count(&self) -> usize {
        self.zero
    }

    /// Number of pages the merger found zero and dropped (still zero).
    pub fn merged_zero_count(&self) -> usize {
        self.merged_zero
    }

    /// Write faults on this VM's pages resolved by copy and by reuse.
    pub fn cow_counts(&self) -> (u64, u64) {
        (self.cow_copies, self.cow_reuses)
    }

    /// Counts a write fault on this VM resolved by copying a shared frame.
    pub(crate) fn count_cow_copy(&mut self) {
        self.cow_copies += 1;
    }

    /// Counts a write fault on this VM resolved by reusing a merged frame.
    pub(crate) fn count_cow_reuse(&mut self) {
        self.cow_reuses += 1;
    }

    /// Merged frames this VM's pages took over in place in the background.
    pub fn cow_background_reuses(&self) -> u64 {
        self.cow_background_reuses
    }

    /// Counts a merged frame taken over in the background by a page of this VM.
    pub(crate) fn count_cow_background_reuse(&mut self) {
        self.cow_background_reuses += 1;
    }

    fn breaks_around(&self, i: usize) -> usize {
        let frame = u64::from(self.pages[i].frame);
        let mut n = 0;
        if i > 0 && u64::from(self.pages[i - 1].frame) + 1 != frame {
            n += 1;
        }
        if i + 1 < self.pages.len() && frame + 1 != u64::from(self.pages[i + 1].frame) {
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vma_count_follows_runs() {
        let mut table = PageTable::new(1, 0x10000, &[10, 11, 12, 13]);
        assert_eq!(table.vma_count(), 1);
        table.set_frame(1, 50);
        assert_eq!(table.vma_count(), 3);
        table.set_frame(2, 51);
        assert_eq!(table.vma_count(), 3);
        table.set_frame(0, 49);
        assert_eq!(table.vma_count(), 2);
        table.set_frame(1, 11);
        table.set_frame(0, 10);
        table.set_frame(2, 12);
        assert_eq!(table.vma_count(), 1);
    }

    #[test]
    fn flag_counters() {
        let mut table = PageTable::new(1, 0, &[0, 1]);
        let f = PageFlags::MAPPED.with(PageFlags::PROTECTED);
        table.set_flags(0, f);
        table.set_flags(1, f.with(PageFlags::ZERO));
        assert_eq!((table.protected_count(), table.zero_count()), (2, 1));
        table.set_flags(1, PageFlags::MAPPED);
        assert_eq!((table.protected_count(), table.zero_count()), (1, 0));
        assert_eq!(table.page_at(0x1fff), Some(1));
        assert_eq!(table.page_at(0x2000), None);
    }
}
