//! Batched page operations of the merger, run with the manager's lock held
//! (on a [`Txn`]) and through the remap protocol:
//!
//! - [`share_run`]: map a run of consecutive guest pages onto a run of
//!   consecutive frames after comparing every pair under write protection, with
//!   one `mmap` per contiguous matching stretch (clones of one image end as few
//!   VMAs, not one per page);
//! - [`zero_run`]: drop the host memory of zero pages (verified zero under
//!   write protection): they move onto the pool's zero region, protected, with
//!   one mapping per run of consecutive pages, and their frames are freed with
//!   one punch per run of consecutive frames (punched in place instead if the
//!   VMA budget refuses the runs).
//!
//! (Giving pages private frames again is the core's `Txn::unshare_range`.)

use crate::core::counters::Counter;
use crate::core::unshare::stretches;
use crate::core::{Error, Result, Txn};
use crate::frame_table::Mapper;
use crate::page_table::PageFlags;
use crate::{FrameNo, VmId, PAGE_SIZE};

/// Maps pages `first..first+n` of `vm` onto frames `target..target+n` where
/// both hold the same 4 KiB (compared under write protection). Skipped
/// pairs: a page already on its target, a page that is not private, a target
/// with no mapper or already `max_sharing` mappers. Fails with
/// [`Error::CrossDomain`] (changing nothing) if a target is mapped by a VM
/// of another merge domain. Returns which pages now map their target.
pub(crate) fn share_run(
    t: &mut Txn<'_>,
    vm: VmId,
    first: u32,
    target: FrameNo,
    n: u32,
    max_sharing: u32,
) -> Result<Vec<bool>> {
    let mut ok = vec![false; n as usize];
    for i in 0..n {
        let m = Mapper { vm, page: first + i };
        let e = t.entry(m)?;
        let tf = target + i;
        let refs_t = t.st.frames().refs(tf);
        if e.frame == tf || refs_t == 0 || refs_t >= max_sharing || t.st.frames().refs(e.frame) != 1 {
            continue;
        }
        if e.flags.contains(PageFlags::SHARED) || e.flags.contains(PageFlags::ZERO) {
            continue;
        }
        let target_zero = match t.st.frames().first_mapper(tf) {
            Some(tm) => t.entry(tm)?.flags.contains(PageFlags::ZERO),
            None => true,
        };
        if target_zero {
            continue; // a hole: reading it would allocate host memory
        }
        t.check_domain(vm, tf)?;
        ok[i as usize] = true;
    }
    let stretches_before = stretches(&ok);
    let candidates = ok.iter().filter(|&&b| b).count();
    if candidates == 0 {
        return Ok(ok);
    }
    let new_shared = (0..n).filter(|&i| ok[i as usize] && t.st.frames().refs(target + i) == 1).count();
    let shared_after = t.st.frames().shared_mappings() + (candidates + new_shared) as u64;
    if !t.st.admit_vmas(shared_after, 2 * stretches_before.len()) {
        return Err(Error::VmaBudget);
    }
    // From the first change on, the merging VMs' vCPUs stay out of guest mode
    // until the chunk ends (see `crate::vcpu_gate`).
    t.hold_vcpus();
    // Protect both sides: the pages moving and every mapper of the targets.
    let mut to_protect: Vec<Mapper> = Vec::with_capacity(2 * candidates);
    for i in 0..n {
        if ok[i as usize] {
            to_protect.push(Mapper { vm, page: first + i });
            match t.st.frames().shared_mappers(target + i) {
                Some(list) => to_protect.extend_from_slice(list),
                None => to_protect.extend(t.st.frames().first_mapper(target + i)),
            }
        }
    }
    let newly = t.protect_group(&to_protect)?;
    for i in 0..n {
        if ok[i as usize] {
            let theirs = t.st.frames().first_mapper(target + i).ok_or(Error::FrameNotLive(target + i))?;
            if !t.pages_equal(Mapper { vm, page: first + i }, theirs)? {
                ok[i as usize] = false;
                t.st.count(Counter::MergeDiffers);
            }
        }
    }
    // Undo protection we added for pairs that did not match.
    for m in newly {
        let moving = m.vm == vm && m.page >= first && m.page < first + n && ok[(m.page - first) as usize];
        let frame = t.entry(m)?.frame;
        let still_needed = moving || (frame >= target && frame < target + n && ok[(frame - target) as usize]);
        if !still_needed {
            t.unprotect_page(m)?;
        }
    }
    let mut to_free = Vec::new();
    for (s, e) in stretches(&ok) {
        let addr = t.addr(Mapper { vm, page: first + s as u32 })?;
        let len = (e - s) * PAGE_SIZE;
        if t.pending.is_full() {
            t.finish_remaps()?;
        }
        // SAFETY: `addr..addr+len` are pages of a guest range this manager owns,
        // all write-protected above (held under the lock); the range is
        // finished before the lock is released (`Txn::finish_remaps`).
        let remapped = unsafe { t.remap.map_read_only(&mut t.pending, u64::from(vm), addr, len, target + s as u32) };
        if let Err(err) = remapped {
            if matches!(err, crate::remap::Error::Map(..)) {
                ok[s..e].iter_mut().for_each(|b| *b = false);
                tracing::warn!("merging VM {vm} pages {}..{}: {err}", first + s as u32, first + e as u32);
                continue;
            }
            t.st.count(Counter::RemapError);
            tracing::error!("remap of VM {vm} pages {}..{} incomplete: {err}", first + s as u32, first + e as u32);
        }
        for i in s..e {
            let m = Mapper { vm, page: first + i as u32 };
            let tf = target + i as u32;
            let old = t.entry(m)?;
            for other in t.st.frames().mappers(tf) {
                let flags = t.entry(other)?.flags.with(PageFlags::SHARED);
                t.set_flags(other, flags)?;
            }
            let flags = old.flags.with(PageFlags::PROTECTED).with(PageFlags::SHARED);
            to_free.extend(t.st.repoint(m, tf, flags)?);
            t.st.count(Counter::Merge);
        }
    }
    // Freed with the rest of the chunk's at its end (see `Txn::free_later`).
    t.free_later(&mut to_free)?;
    Ok(ok)
}

/// Drops the host memory of every page of `pages` (sorted, of `vm`) that is
/// private and all zero (checked under write protection): they map the zero
/// region ([`Txn::drop_to_zero_region`]), protected, flagged
/// `ZERO | MERGED_ZERO`. Returns which pages were zeroed.
pub(crate) fn zero_run(t: &mut Txn<'_>, vm: VmId, pages: &[u32]) -> Result<Vec<bool>> {
    let mut ok = vec![false; pages.len()];
    let mut cands = Vec::with_capacity(pages.len());
    for (i, &p) in pages.iter().enumerate() {
        let e = t.entry(Mapper { vm, page: p })?;
        if t.st.frames().refs(e.frame) == 1
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
    let newly = t.protect_group(&cands)?;
    // Zero pages in page order (`pages` is sorted), and their frames.
    let mut mappers = Vec::with_capacity(cands.len());
    for (i, &p) in pages.iter().enumerate() {
        if ok[i] {
            let frame = t.entry(Mapper { vm, page: p })?.frame;
            ok[i] = t.st.pool().frame_is_zero(frame)?;
            if ok[i] {
                mappers.push(Mapper { vm, page: p });
            }
        }
    }
    mappers.sort_unstable(); // already sorted when `pages` is: for the searches below
    for m in newly {
        if mappers.binary_search(&m).is_err() {
            t.unprotect_page(m)?;
        }
    }
    // Onto the zero region, one mapping per run of pages; their frames go back
    // to the pool with one punch per run of consecutive frames.
    let pages: Vec<u32> = mappers.iter().map(|m| m.page).collect();
    let moved = t.drop_to_zero_region(vm, &pages, PageFlags::MERGED_ZERO)?;
    if moved.iter().all(|&b| b) {
        return Ok(ok);
    }
    // Refused (VMA budget) or failed: the rest keep their frames, punched in place.
    let mut rest = Vec::new();
    let mut frames = Vec::new();
    for (i, &m) in mappers.iter().enumerate() {
        if !moved[i] {
            rest.push(m);
            frames.push(t.entry(m)?.frame);
        }
    }
    let mappers = rest;
    // One punch per run of consecutive frames (a VM's pages usually map
    // consecutive frames, so a run of zero pages is one punch).
    t.st.pool().punch_frames(&mut frames)?;
    // Protection must hold after the punch zapped the page tables.
    for &m in &mappers {
        let flags = t.entry(m)?.flags.without(PageFlags::PROTECTED);
        t.set_flags(m, flags)?;
    }
    t.protect_group(&mappers)?;
    for &m in &mappers {
        let flags = t.entry(m)?.flags.with(PageFlags::ZERO).with(PageFlags::MERGED_ZERO);
        t.set_flags(m, flags)?;
    }
    Ok(ok)
}
