//! Background reuse: a merged frame whose other mappers all left is taken
//! over in place by its last mapper **before** any write, so that the write
//! costs what a private page's costs (no userfaultfd round trip). Fault-time
//! reuse (`core/fault.rs`) stays the fallback for a write that comes first.
//!
//! Whoever drops the second-to-last reference of a merged frame queues the
//! page left mapping it ([`super::reuse_queue`], pushed by `State::repoint`
//! and `State::release_guest_frames`, so every way a mapper leaves is seen:
//! copy-on-write, unmerge, discard, migration, VM destruction) and rings the
//! Protector's doorbell when the lock is released. The Protector's handler
//! thread, between faults, calls [`Core::drain_background_reuse`]: under one
//! hold of the manager's lock it takes up to [`DRAIN_BATCH`] entries and
//! makes writable those still eligible, one `UFFDIO_WRITEPROTECT` per run of
//! consecutive pages.
//!
//! Why it is safe (all of it under the manager's lock, which every operation
//! holds from its first write-protect to the end of its remap, so the drain
//! only ever sees pages between operations):
//! - an entry is re-checked before anything changes: the page still maps the
//!   queued frame, the frame has exactly one mapper (a page that got a new
//!   sharer since it was queued has two and is left protected), the page is
//!   `PROTECTED | SHARED` (a page written, unmerged, discarded or migrated
//!   meanwhile no longer is, or maps another frame) and not on the zero
//!   region; a VM destroyed meanwhile is gone from the state. Stale entries
//!   are dropped;
//! - the page's `SHARED` flag is cleared with the protection, in the same
//!   hold of the lock. The merger's stable index trusts a frame only while
//!   its mapper is `SHARED` (its `judge` drops the frame as stale
//!   otherwise), and every merge compares the full 4 KiB under write
//!   protection anyway: the content of a frame made writable is never
//!   trusted again;
//! - the frame had one mapper, so no write can land in a shared frame; the
//!   page keeps its frame and content, so no write is lost. A writer that
//!   faulted on the page just before the drain is still woken: its fault
//!   finds the page unprotected (a spurious fault: unprotect again, wake).

use super::counters::Counter;
use super::error::Result;
use super::state::Cow;
use super::txn::Txn;
use super::Core;
use crate::frame_table::Mapper;
use crate::page_table::PageFlags;
use crate::{FrameNo, PAGE_SIZE};

/// Most queue entries handled under one hold of the manager's lock.
pub(crate) const DRAIN_BATCH: usize = 256;

impl Core {
    /// One batch of background reuse (on the Protector's handler thread, or a
    /// test's); returns whether entries are left.
    pub(crate) fn drain_background_reuse(&self) -> bool {
        let mut guard = self.lock();
        let batch = guard.reuse_queue().take_batch(DRAIN_BATCH);
        if batch.is_empty() {
            return false;
        }
        let mut txn = Txn::new(&mut guard, self.remap());
        if let Err(e) = txn.reuse_in_background(&batch) {
            txn.st.count(Counter::RemapError);
            tracing::error!("background reuse: {e}");
        }
        drop(txn);
        let left = guard.reuse_queue().len() > 0;
        if left {
            guard.reuse_queue().request_ring();
        }
        left
    }

    /// Drains the whole queue now (tests and benchmarks: the Protector's
    /// thread does it on its own in the background).
    pub(crate) fn drain_background_reuse_all(&self) {
        while self.drain_background_reuse() {}
    }

    /// Turns background reuse on (the default) or off (see [`super::reuse_queue`]).
    pub(crate) fn set_background_reuse(&self, on: bool) {
        self.lock().reuse_queue().set_enabled(on);
    }

    /// Queue entries waiting for the background reuse.
    pub(crate) fn background_reuse_pending(&self) -> usize {
        self.lock().reuse_queue().len()
    }
}

impl Txn<'_> {
    /// Makes writable in place every page of `batch` (sorted by page, from the
    /// reuse queue) that is still the only mapper of the merged frame it was
    /// queued with; returns how many. One `UFFDIO_WRITEPROTECT` per run of
    /// consecutive eligible pages.
    pub(crate) fn reuse_in_background(&mut self, batch: &[(Mapper, FrameNo)]) -> Result<u64> {
        let eligible: Vec<Mapper> =
            batch.iter().filter(|&&(m, f)| self.sole_merged_mapper(m, f)).map(|e| e.0).collect();
        let mut done = 0u64;
        let mut i = 0;
        while i < eligible.len() {
            let mut j = i + 1;
            while j < eligible.len() && eligible[j].vm == eligible[i].vm && eligible[j].page == eligible[j - 1].page + 1
            {
                j += 1;
            }
            let addr = self.addr(eligible[i])?;
            let len = (j - i) * PAGE_SIZE;
            if let Err(e) = self.remap.unprotect(addr, len) {
                // The pages keep their state (protected again in case the
                // kernel unprotected part of the range) and their next write
                // reuses them.
                tracing::warn!("background reuse of VM {} pages {}..+{}: {e}", eligible[i].vm, eligible[i].page, j - i);
                self.remap.protect(addr, len)?;
                i = j;
                continue;
            }
            for &m in &eligible[i..j] {
                let cleared = PageFlags::PROTECTED.with(PageFlags::SHARED).with(PageFlags::ZERO);
                let flags = self.entry(m)?.flags.without(cleared);
                self.set_flags(m, flags)?;
                self.st.count_cow(m.vm, Cow::BackgroundReuse);
                done += 1;
            }
            i = j;
        }
        Ok(done)
    }

    /// Whether page `m` still maps merged frame `frame` as its only mapper
    /// (protected, `SHARED`, not on the zero region): the re-check of a queue entry.
    fn sole_merged_mapper(&self, m: Mapper, frame: FrameNo) -> bool {
        let Ok(e) = self.entry(m) else { return false };
        e.frame == frame
            && self.st.frames().refs(frame) == 1
            && e.flags.contains(PageFlags::PROTECTED.with(PageFlags::SHARED))
            && !self.st.on_zero_region(m)
    }
}
