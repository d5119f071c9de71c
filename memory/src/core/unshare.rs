//! Giving a range of guest pages private frames again (`impl Txn`, batched):
//! shared frames are copied into contiguous blocks mapped with one `mmap` per
//! block, single-mapper merged frames are taken over in place. Used when a VM
//! leaves its merge domain ([`super::registry`]) and by the merger's
//! unmerge-all.

use super::counters::Counter;
use super::error::Result;
use super::txn::Txn;
use crate::frame_table::Mapper;
use crate::page_table::PageFlags;
use crate::{FrameNo, VmId, MAX_ORDER, PAGE_SIZE};

/// Consecutive stretches `[start, end)` of indices where `ok[i]` holds.
pub(crate) fn stretches(ok: &[bool]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < ok.len() {
        if !ok[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < ok.len() && ok[i] {
            i += 1;
        }
        out.push((start, i));
    }
    out
}

impl Txn<'_> {
    /// Gives every page of `first..first+n` of `vm` that maps a shared frame a
    /// private copy (copies in contiguous blocks, one `mmap` per block) and
    /// takes single-mapper merged frames over in place; with `include_zero`,
    /// merger-zeroed pages become ordinary private pages too (those on the zero
    /// region get fresh frames, as the copies do). Returns the number of pages
    /// changed.
    pub(crate) fn unshare_range(&mut self, vm: VmId, first: u32, n: u32, include_zero: bool) -> Result<u64> {
        let mut changed = 0u64;
        let mut need_copy = vec![false; n as usize];
        for i in 0..n {
            let m = Mapper { vm, page: first + i };
            let e = self.entry(m)?;
            let zero_region = self.st.on_zero_region(m);
            if self.st.frames().refs(e.frame) > 1
                || (zero_region && include_zero && e.flags.contains(PageFlags::MERGED_ZERO))
            {
                // A merged zero page on the zero region gets a fresh block frame (no copy: `ZERO`).
                need_copy[i as usize] = true;
            } else if !zero_region
                && (e.flags.contains(PageFlags::SHARED) || (include_zero && e.flags.contains(PageFlags::MERGED_ZERO)))
            {
                // (A discarded page on the zero region stays there.)
                self.unprotect_page(m)?;
                changed += 1;
            }
        }
        for (s, e) in stretches(&need_copy) {
            let mut at = s;
            while at < e {
                let remaining = (e - at) as u64;
                let mut order = (63 - remaining.leading_zeros()).min(u32::from(MAX_ORDER)) as u8;
                let block = loop {
                    match self.st.alloc(order) {
                        Ok(f) => break f,
                        Err(_) if order > 0 => order -= 1,
                        Err(err) => return Err(err),
                    }
                };
                let len = 1usize << order;
                self.copy_block(vm, first + at as u32, len as u32, block)?;
                changed += len as u64;
                at += len;
            }
        }
        self.st.count_n(Counter::Unshare, changed);
        Ok(changed)
    }

    /// Copies pages `page..page+len` (protected, mapping shared frames) into the
    /// fresh block `block..block+len` and maps it over them, private.
    fn copy_block(&mut self, vm: VmId, page: u32, len: u32, block: FrameNo) -> Result<()> {
        for i in 0..len {
            let e = self.entry(Mapper { vm, page: page + i })?;
            if !e.flags.contains(PageFlags::ZERO) {
                self.st.pool().copy_frame(e.frame, block + i)?;
            }
        }
        let addr = self.addr(Mapper { vm, page })?;
        // SAFETY: the pages belong to a guest range this manager owns and are
        // write-protected (they map shared frames); the block was just allocated
        // for them alone and holds their content.
        let remapped = unsafe { self.remap.remap_private(addr, len as usize * PAGE_SIZE, block) };
        if let Err(err) = remapped {
            if matches!(err, crate::remap::Error::Map(..)) {
                let mut frames: Vec<FrameNo> = (block..block + len).collect();
                self.st.free_unmapped_frames(&mut frames)?;
                return Err(err.into());
            }
            self.st.count(Counter::RemapError);
            tracing::error!("unmerge remap of VM {vm} pages {page}..+{len} incomplete: {err}");
        }
        let mut to_free = Vec::new();
        let cleared = PageFlags::PROTECTED.with(PageFlags::SHARED).with(PageFlags::ZERO);
        for i in 0..len {
            let m = Mapper { vm, page: page + i };
            let old = self.entry(m)?;
            to_free.extend(self.st.repoint(m, block + i, old.flags.without(cleared))?);
        }
        // A former shared frame left with one mapper keeps SHARED (merged, protected).
        self.st.free_unmapped_frames(&mut to_free)?;
        Ok(())
    }
}
