//! Pages whose content was dropped map the pool's **zero region** (`impl Txn`):
//! a 2 MiB stretch of the memfd past the pool's last frame that nothing ever
//! writes (see [`crate::pool`]). Page `p` maps zero frame `p mod 512`
//! ([`crate::FramePool::zero_frame`]), so a run of dropped pages is one mapping
//! of consecutive offsets, and its own frame goes back to the pool.
//!
//! Why: a dropped page used to keep its own frame, punched. A read of a hole
//! of a `MAP_SHARED` shmem mapping allocates a page, so host memory came back
//! without any write (and the frame stayed used). A read of the zero region
//! allocates at most its 2 MiB, once for the whole host.
//!
//! The protocol's guarantees carry over unchanged: a page goes to the zero
//! region only while write-protected, through
//! [`crate::remap::RemapProtocol::map_read_only`] (mapped read-only, then
//! registered and write-protected before it is made writable: no write can
//! reach a zero frame), and it leaves only through a fault resolution or a
//! device write that maps a fresh frame of its own over it
//! ([`Txn::leave_zero_region`]). [`Txn::unprotect_page`] refuses a page on the
//! zero region, so no path can make it writable in place.
//!
//! Cost: about two more VMAs per run of dropped pages (the run's mapping
//! splits its neighbours') plus one per 512 pages of the run; an operation the
//! VMA budget refuses falls back to punching the pages' own frames in place
//! (the former state, `ZERO` on an own frame).

use super::counters::Counter;
use super::error::{Error, Result};
use super::txn::Txn;
use crate::frame_table::Mapper;
use crate::page_table::PageFlags;
use crate::{VmId, HUGE_FRAME_PAGES, PAGE_SIZE};

impl Txn<'_> {
    /// Maps every page of `pages` (sorted, of `vm`, none on the zero region;
    /// write-protected, unless the caller drops their content, as discard
    /// does: a write before the `mmap` is dropped with it, a later one meets
    /// the read-only mapping) onto its zero-region frame, one `mmap` per run of
    /// consecutive pages (split where the zero frame wraps), flags
    /// `PROTECTED | ZERO | add` without `SHARED | MERGED_ZERO`; frees the frames
    /// left without a mapper (one punch per run of them). Returns which pages
    /// moved: none if the VMA budget refuses the runs, not those of a run whose
    /// `mmap` failed (they stay as they were, protected).
    pub(crate) fn drop_to_zero_region(&mut self, vm: VmId, pages: &[u32], add: PageFlags) -> Result<Vec<bool>> {
        let mut moved = vec![false; pages.len()];
        let runs = zero_runs(pages);
        if runs.is_empty() || !self.st.admit_vmas(self.st.frames().shared_mappings(), 2 * runs.len()) {
            return Ok(moved);
        }
        let mut to_free = Vec::new();
        for (s, e) in runs {
            let first = pages[s];
            let addr = self.addr(Mapper { vm, page: first })?;
            let zero = self.st.pool().zero_frame(first);
            if self.pending.is_full() {
                self.finish_remaps()?;
            }
            // SAFETY: `addr..` are pages of a guest range this manager owns, held
            // under the lock, all write-protected or with content being dropped
            // (caller's precondition: no write that must survive can land in the
            // old frames); the new mapping is read-only, so no write reaches a
            // zero frame, and it is finished before the lock is released
            // (`Txn::finish_remaps`).
            let remapped =
                unsafe { self.remap.map_read_only(&mut self.pending, u64::from(vm), addr, (e - s) * PAGE_SIZE, zero) };
            if let Err(err) = remapped {
                if matches!(err, crate::remap::Error::Map(..)) {
                    tracing::warn!("dropping VM {vm} pages {first}..+{}: {err}", e - s);
                    continue;
                }
                self.st.count(Counter::RemapError);
                tracing::error!("remap of VM {vm} pages {first}..+{} to the zero region incomplete: {err}", e - s);
            }
            let cleared = PageFlags::SHARED.with(PageFlags::MERGED_ZERO);
            let flags = PageFlags::PROTECTED.with(PageFlags::ZERO).with(add);
            for i in s..e {
                let m = Mapper { vm, page: pages[i] };
                let zero = self.st.pool().zero_frame(m.page);
                to_free.extend(self.st.repoint_with(m, zero, |old| old.without(cleared).with(flags))?);
                moved[i] = true;
            }
        }
        // No guest page maps them any more (the runs' mappings replaced theirs).
        self.st.free_unmapped_frames(&mut to_free)?;
        Ok(moved)
    }

    /// Gives page `m`, which maps the zero region, a fresh frame of its own
    /// (a new frame reads as zero: no copy). With `end_protected` it keeps
    /// its flags (`ZERO` included: it still reads as zero, the former state of
    /// a discarded page); otherwise it ends private and writable, without
    /// `ZERO` and `MERGED_ZERO`. Fails if no frame is free.
    pub(crate) fn leave_zero_region(&mut self, m: Mapper, end_protected: bool) -> Result<()> {
        let new = self.st.alloc(0)?;
        if let Err(err) = self.move_page(m, new, end_protected) {
            if self.st.frames().refs(new) == 0 {
                self.st.free_unmapped(new)?;
            }
            return Err(err);
        }
        if !end_protected {
            let flags = self.entry(m)?.flags.without(PageFlags::ZERO.with(PageFlags::MERGED_ZERO));
            self.set_flags(m, flags)?;
        }
        Ok(())
    }

    /// Fails if page `m` maps the zero region (it must never become writable
    /// in place).
    pub(crate) fn refuse_zero_region(&self, m: Mapper) -> Result<()> {
        if self.st.on_zero_region(m) {
            return Err(Error::ZeroRegion(m.vm, m.page));
        }
        Ok(())
    }
}

/// Runs `[start, end)` of indices of `pages` (sorted) that map consecutive
/// zero frames: consecutive pages, split where the zero frame wraps.
fn zero_runs(pages: &[u32]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < pages.len() {
        let start = i;
        i += 1;
        while i < pages.len() && pages[i] == pages[i - 1] + 1 && !pages[i].is_multiple_of(HUGE_FRAME_PAGES) {
            i += 1;
        }
        out.push((start, i));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::zero_runs;

    #[test]
    fn runs_split_at_gaps_and_wraps() {
        assert_eq!(zero_runs(&[1, 2, 3, 7, 510, 511, 512, 513]), vec![(0, 3), (3, 4), (4, 6), (6, 8)]);
        assert!(zero_runs(&[]).is_empty());
    }
}
