//! Batched page operations of the merger, run with the manager's lock held
//! (on a [`Txn`]) and through the remap protocol:
//!
//! - [`Txn::share_run`]: map a run of consecutive guest pages onto a run of
//!   consecutive frames after comparing every pair under write protection, with
//!   one `mmap` per contiguous matching stretch (clones of one image end as few
//!   VMAs, not one per page);
//! - [`Txn::zero_run`]: drop the host memory of zero pages (verified zero under
//!   write protection), leaving them protected;
//! - [`Txn::unshare_range`]: give every page of a range a private frame again
//!   (copies land in contiguous blocks, mapped with one `mmap` per block).

use crate::frame_table::Mapper;
use crate::manager::{Error, Result};
use crate::page_table::PageFlags;
use crate::txn::Txn;
use crate::{FrameNo, VmId, MAX_ORDER, PAGE_SIZE};

/// Consecutive stretches `[start, end)` of indices where `ok[i]` holds.
fn stretches(ok: &[bool]) -> Vec<(usize, usize)> {
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
    /// Write-protects every page of `mappers` not yet protected, one ioctl per
    /// run of consecutive pages; returns the pages it protected.
    pub(crate) fn protect_group(&mut self, mappers: &[Mapper]) -> Result<Vec<Mapper>> {
        let mut todo: Vec<Mapper> = Vec::with_capacity(mappers.len());
        for &m in mappers {
            if !self.entry(m)?.flags.contains(PageFlags::PROTECTED) {
                todo.push(m);
            }
        }
        todo.sort_unstable();
        todo.dedup();
        let mut i = 0;
        while i < todo.len() {
            let mut j = i + 1;
            while j < todo.len() && todo[j].vm == todo[i].vm && todo[j].page == todo[j - 1].page + 1 {
                j += 1;
            }
            self.remap.protect(self.addr(todo[i])?, (j - i) * PAGE_SIZE)?;
            for &m in &todo[i..j] {
                let flags = self.entry(m)?.flags.with(PageFlags::PROTECTED);
                self.set_flags(m, flags)?;
            }
            i = j;
        }
        Ok(todo)
    }

    /// Maps pages `first..first+n` of `vm` onto frames `target..target+n` where
    /// both hold the same 4 KiB (compared under write protection). Skipped
    /// pairs: a page already on its target, a page that is not private, a target
    /// with no mapper or already `max_sharing` mappers. Fails with
    /// [`Error::CrossDomain`] (changing nothing) if a target is mapped by a VM
    /// of another merge domain. Returns which pages now map their target.
    pub(crate) fn share_run(
        &mut self,
        vm: VmId,
        first: u32,
        target: FrameNo,
        n: u32,
        max_sharing: u32,
    ) -> Result<Vec<bool>> {
        let mut ok = vec![false; n as usize];
        for i in 0..n {
            let m = Mapper { vm, page: first + i };
            let e = self.entry(m)?;
            let t = target + i;
            let refs_t = self.st.frames.refs(t);
            if e.frame == t || refs_t == 0 || refs_t >= max_sharing || self.st.frames.refs(e.frame) != 1 {
                continue;
            }
            if e.flags.contains(PageFlags::SHARED) || e.flags.contains(PageFlags::ZERO) {
                continue;
            }
            let target_zero = match self.st.frames.first_mapper(t) {
                Some(tm) => self.entry(tm)?.flags.contains(PageFlags::ZERO),
                None => true,
            };
            if target_zero {
                continue; // a hole: reading it would allocate host memory
            }
            self.check_domain(vm, t)?;
            ok[i as usize] = true;
        }
        let stretches_before = stretches(&ok);
        let candidates = ok.iter().filter(|&&b| b).count();
        if candidates == 0 {
            return Ok(ok);
        }
        let new_shared = (0..n).filter(|&i| ok[i as usize] && self.st.frames.refs(target + i) == 1).count();
        let shared_after = self.st.frames.shared_mappings() + (candidates + new_shared) as u64;
        let guest_vmas = self.st.guest_vmas();
        if !self.st.budget.admit(guest_vmas, shared_after, 2 * stretches_before.len()) {
            return Err(Error::VmaBudget);
        }
        // From the first change on, the merging VMs' vCPUs stay out of guest mode
        // until the chunk ends (see `crate::vcpu_gate`).
        self.hold_vcpus();
        // Protect both sides: the pages moving and every mapper of the targets.
        let mut to_protect: Vec<Mapper> = Vec::with_capacity(2 * candidates);
        for i in 0..n {
            if ok[i as usize] {
                to_protect.push(Mapper { vm, page: first + i });
                match self.st.frames.shared_mappers(target + i) {
                    Some(list) => to_protect.extend_from_slice(list),
                    None => to_protect.extend(self.st.frames.first_mapper(target + i)),
                }
            }
        }
        let newly = self.protect_group(&to_protect)?;
        for i in 0..n {
            if ok[i as usize] {
                let theirs = self.st.frames.first_mapper(target + i).ok_or(Error::FrameNotLive(target + i))?;
                if !self.pages_equal(Mapper { vm, page: first + i }, theirs)? {
                    ok[i as usize] = false;
                    self.st.counters.merge_differs += 1;
                }
            }
        }
        // Undo protection we added for pairs that did not match.
        for m in newly {
            let moving = m.vm == vm && m.page >= first && m.page < first + n && ok[(m.page - first) as usize];
            let frame = self.entry(m)?.frame;
            let still_needed = moving || (frame >= target && frame < target + n && ok[(frame - target) as usize]);
            if !still_needed {
                self.unprotect_page(m)?;
            }
        }
        let mut to_free = Vec::new();
        for (s, e) in stretches(&ok) {
            let addr = self.addr(Mapper { vm, page: first + s as u32 })?;
            let len = (e - s) * PAGE_SIZE;
            if self.pending.is_full() {
                self.finish_remaps()?;
            }
            // SAFETY: `addr..addr+len` are pages of a guest range this manager owns,
            // all write-protected above (held under the lock); the range is
            // finished before the lock is released (`Txn::finish_remaps`).
            let remapped =
                unsafe { self.remap.map_read_only(&mut self.pending, u64::from(vm), addr, len, target + s as u32) };
            if let Err(err) = remapped {
                if matches!(err, crate::remap::Error::Map(..)) {
                    ok[s..e].iter_mut().for_each(|b| *b = false);
                    tracing::warn!("merging VM {vm} pages {}..{}: {err}", first + s as u32, first + e as u32);
                    continue;
                }
                tracing::error!("remap of VM {vm} pages {}..{} incomplete: {err}", first + s as u32, first + e as u32);
            }
            for i in s..e {
                let m = Mapper { vm, page: first + i as u32 };
                let t = target + i as u32;
                let old = self.entry(m)?;
                for other in self.st.frames.mappers(t) {
                    let flags = self.entry(other)?.flags.with(PageFlags::SHARED);
                    self.set_flags(other, flags)?;
                }
                self.st.frames.add(t, m);
                if let Some(table) = self.st.vms.get_mut(&vm) {
                    table.set_frame(m.page, t);
                    table.set_flags(m.page, old.flags.with(PageFlags::PROTECTED).with(PageFlags::SHARED));
                }
                if self.st.frames.remove(old.frame, m)? == 0 {
                    to_free.push(old.frame);
                }
                self.st.counters.merges += 1;
            }
        }
        self.st.pool.free_frames(&mut to_free)?;
        Ok(ok)
    }

    /// Drops the host memory of every page of `pages` (sorted, of `vm`) that is
    /// private and all zero (checked under write protection); they stay
    /// protected, flagged `ZERO | MERGED_ZERO`. Returns which pages were zeroed.
    pub(crate) fn zero_run(&mut self, vm: VmId, pages: &[u32]) -> Result<Vec<bool>> {
        let mut ok = vec![false; pages.len()];
        let mut cands = Vec::with_capacity(pages.len());
        for (i, &p) in pages.iter().enumerate() {
            let e = self.entry(Mapper { vm, page: p })?;
            if self.st.frames.refs(e.frame) == 1
                && !e.flags.contains(PageFlags::SHARED)
                && !e.flags.contains(PageFlags::ZERO)
            {
                ok[i] = true;
                cands.push(Mapper { vm, page: p });
            }
        }
        if cands.is_empty() {
            return Ok(ok);
        }
        let newly = self.protect_group(&cands)?;
        let mut zeroed = Vec::with_capacity(cands.len());
        for (i, &p) in pages.iter().enumerate() {
            if ok[i] {
                let frame = self.entry(Mapper { vm, page: p })?.frame;
                ok[i] = self.st.pool.frame_is_zero(frame)?;
                if ok[i] {
                    zeroed.push((Mapper { vm, page: p }, frame));
                }
            }
        }
        for m in newly {
            if !zeroed.iter().any(|&(z, _)| z == m) {
                self.unprotect_page(m)?;
            }
        }
        for &(_, frame) in &zeroed {
            self.st.pool.punch(frame, 1)?;
        }
        // Protection must hold after the punch zapped the page tables.
        let mappers: Vec<Mapper> = zeroed.iter().map(|&(m, _)| m).collect();
        for &m in &mappers {
            let flags = self.entry(m)?.flags.without(PageFlags::PROTECTED);
            self.set_flags(m, flags)?;
        }
        self.protect_group(&mappers)?;
        for &m in &mappers {
            let flags = self.entry(m)?.flags.with(PageFlags::ZERO).with(PageFlags::MERGED_ZERO);
            self.set_flags(m, flags)?;
        }
        Ok(ok)
    }

    /// Gives every page of `first..first+n` of `vm` that maps a shared frame a
    /// private copy (copies in contiguous blocks, one `mmap` per block) and
    /// takes single-mapper merged frames over in place; with `include_zero`,
    /// merger-zeroed pages become ordinary private pages too. Returns the number
    /// of pages changed.
    pub(crate) fn unshare_range(&mut self, vm: VmId, first: u32, n: u32, include_zero: bool) -> Result<u64> {
        let mut changed = 0u64;
        let mut need_copy = vec![false; n as usize];
        for i in 0..n {
            let m = Mapper { vm, page: first + i };
            let e = self.entry(m)?;
            if self.st.frames.refs(e.frame) > 1 {
                need_copy[i as usize] = true;
            } else if e.flags.contains(PageFlags::SHARED) || (include_zero && e.flags.contains(PageFlags::MERGED_ZERO))
            {
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
                    match self.st.pool.alloc(order) {
                        Ok(f) => break f,
                        Err(_) if order > 0 => order -= 1,
                        Err(err) => return Err(err.into()),
                    }
                };
                let len = 1usize << order;
                self.copy_block(vm, first + at as u32, len as u32, block)?;
                changed += len as u64;
                at += len;
            }
        }
        self.st.counters.unshares += changed;
        Ok(changed)
    }

    /// Copies pages `page..page+len` (protected, mapping shared frames) into the
    /// fresh block `block..block+len` and maps it over them, private.
    fn copy_block(&mut self, vm: VmId, page: u32, len: u32, block: FrameNo) -> Result<()> {
        for i in 0..len {
            let e = self.entry(Mapper { vm, page: page + i })?;
            if !e.flags.contains(PageFlags::ZERO) {
                self.st.pool.copy_frame(e.frame, block + i)?;
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
                self.st.pool.free_frames(&mut frames)?;
                return Err(err.into());
            }
            tracing::error!("unmerge remap of VM {vm} pages {page}..+{len} incomplete: {err}");
        }
        let mut to_free = Vec::new();
        let cleared = PageFlags::PROTECTED.with(PageFlags::SHARED).with(PageFlags::ZERO);
        for i in 0..len {
            let m = Mapper { vm, page: page + i };
            let old = self.entry(m)?;
            self.st.frames.add(block + i, m);
            if let Some(table) = self.st.vms.get_mut(&vm) {
                table.set_frame(m.page, block + i);
                table.set_flags(m.page, old.flags.without(cleared));
            }
            if self.st.frames.remove(old.frame, m)? == 0 {
                to_free.push(old.frame);
            }
        }
        // A former shared frame left with one mapper keeps SHARED (merged, protected).
        self.st.pool.free_frames(&mut to_free)?;
        Ok(())
    }
}
