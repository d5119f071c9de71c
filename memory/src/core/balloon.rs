//! Batched discard of a range of guest pages (`impl Core`): the balloon's
//! inflate and free-page-reporting path, and [`Core::discard`] (a batch of one).
//!
//! Each page drops its content and reads as zero, write-protected; its next
//! write is resolved by the fault handler (and seen). One transaction per
//! batch of at most [`DISCARD_BATCH`] pages, so that a fault waiting for the
//! lock is served between batches. Within a batch the pages are moved onto
//! the pool's zero region with one mapping per run of consecutive pages
//! ([`Txn::drop_to_zero_region`]; no write protection first, see
//! [`discard_batch`]): their frames go back to the pool (the buddy allocator
//! frees each run as its largest aligned blocks, and the memfd is punched
//! once per run of consecutive frames, a whole 2 MiB frame at once; a shared
//! frame just loses a reference), so the pool's used frames fall and a later
//! read allocates nothing. If the VMA budget refuses the runs (or a run's `mmap` fails), the
//! pages are discarded in place as before: a private page keeps its frame,
//! punched, and a page of a shared frame gets a fresh (zero) frame of its own.
//!
//! The private pages of a run shorter than [`ZERO_REGION_MIN_RUN`] are
//! discarded in place on purpose ([`split_by_policy`]; not by
//! [`Core::discard`]): each zero-region run costs an `mmap`, a registration, a
//! write protection and an `mprotect`, and its own VMA, which for scattered
//! free pages was 6.5x the kernel's floor (one `fallocate` per page); in place
//! it is one punch, one protection ioctl and one `lseek` per run. Until
//! compaction moves such a page onto the zero region, its frame stays
//! allocated and a read of it allocates a page.

use std::collections::{HashMap, HashSet};

use super::counters::Counter;
use super::error::{Error, Result};
use super::txn::Txn;
use super::Core;
use crate::frame_table::Mapper;
use crate::page_table::PageFlags;
use crate::{FrameNo, VmId, PAGE_SIZE};

/// Most pages discarded under one hold of the manager's lock.
pub const DISCARD_BATCH: u32 = 512;

/// Shortest run of consecutive pages (of one discard batch) whose private
/// pages go to the zero region; the private pages of a shorter run are
/// discarded in place (see `split_by_policy`).
pub const ZERO_REGION_MIN_RUN: u32 = 4;

/// Where [`discard_batch`] sends the private pages of runs shorter than
/// [`ZERO_REGION_MIN_RUN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShortRuns {
    /// Discarded in place (the balloon's [`Core::discard_range`]: scattered
    /// free pages cost about one `fallocate` each, as the kernel's floor).
    InPlace,
    /// The zero region, as every other page ([`Core::discard`], the explicit
    /// discard of one page: it reads back without allocating and leaves the
    /// pool at once).
    ZeroRegion,
}

/// What a [`Core::discard_range`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiscardReport {
    /// Pages discarded (every page of the range).
    pub pages: u64,
    /// Of them, pages that held host memory before (their bytes went back to
    /// the host, unless they shared a frame with other pages).
    pub backed: u64,
    /// Of them, pages that left a shared frame for a fresh one.
    pub unshared: u64,
    /// Of them, pages discarded in place (their own frame punched, not moved
    /// to the zero region: a short run, or the zero region refused them).
    pub in_place: u64,
}

impl DiscardReport {
    fn add(&mut self, other: DiscardReport) {
        self.pages += other.pages;
        self.backed += other.backed;
        self.unshared += other.unshared;
        self.in_place += other.in_place;
    }
}

impl Core {
    /// Discards pages `first..first + count` of `vm` in batches of at most
    /// [`DISCARD_BATCH`] pages (one transaction each, yielding to waiting
    /// faults between them). The range is checked whole before any change.
    pub(crate) fn discard_range(&self, vm: VmId, first: u32, count: u32) -> Result<DiscardReport> {
        {
            let st = self.lock();
            let table = st.table(vm).ok_or(Error::UnknownVm(vm))?;
            if first.checked_add(count).is_none_or(|end| end > table.len()) {
                return Err(Error::OutOfRange(vm, u64::from(first) + u64::from(count)));
            }
        }
        let mut report = DiscardReport::default();
        let mut done = 0;
        while done < count {
            let n = (count - done).min(DISCARD_BATCH);
            report.add(self.with_txn(|t| discard_batch(t, vm, first + done, n, ShortRuns::InPlace))?);
            done += n;
            if done < count {
                self.yield_to_faults();
            }
        }
        Ok(report)
    }
}

/// Discards pages `first..first + n` of `vm` in transaction `t`.
///
/// The pages leaving their frames for the zero region are not write-protected
/// first: their content is being dropped, so a write that completes before
/// their run's `mmap` replaces the mapping is simply dropped with it (as if
/// it came before the discard), and a later one meets the new mapping,
/// read-only until it is registered and write-protected (see
/// [`crate::remap`]), so it waits and is then resolved by the fault handler
/// (and seen). Protecting them first would cost a second walk of every page
/// table entry for nothing (about a sixth of the discard's time). A page of a
/// shared frame is protected already; the pages the zero region refuses are
/// protected by [`discard_in_place`].
pub(crate) fn discard_batch(
    t: &mut Txn<'_>,
    vm: VmId,
    first: u32,
    n: u32,
    short_runs: ShortRuns,
) -> Result<DiscardReport> {
    let mut report = DiscardReport { pages: u64::from(n), ..DiscardReport::default() };
    // Pages already on the zero region stay; the others are classified in page
    // order as they leave (a shared frame's last leaver counts as private).
    let mut pages = Vec::with_capacity(n as usize);
    let mut unshares = Vec::with_capacity(n as usize);
    let mut was_zero = Vec::with_capacity(n as usize);
    let mut private = Vec::with_capacity(n as usize);
    let mut left: HashMap<FrameNo, u32> = HashMap::new();
    for page in first..first + n {
        let m = Mapper { vm, page };
        let e = t.entry(m)?;
        if t.st.pool().is_zero_frame(e.frame) {
            if e.flags.contains(PageFlags::MERGED_ZERO) {
                t.set_flags(m, e.flags.without(PageFlags::MERGED_ZERO))?;
            }
            continue;
        }
        let refs = t.st.frames().refs(e.frame);
        let unshare = refs > 1 && {
            let left = left.entry(e.frame).or_insert(refs);
            *left -= 1;
            *left > 0
        };
        unshares.push(unshare);
        was_zero.push(e.flags.contains(PageFlags::ZERO));
        private.push(refs == 1);
        pages.push(page);
    }
    let (to_zero, in_place) = match short_runs {
        ShortRuns::InPlace => split_by_policy(&pages, &private),
        ShortRuns::ZeroRegion => ((0..pages.len()).collect(), Vec::new()),
    };
    let zero_pages: Vec<u32> = to_zero.iter().map(|&i| pages[i]).collect();
    let moved = t.drop_to_zero_region(vm, &zero_pages, PageFlags::empty())?;
    let mut rest: Vec<u32> = in_place.iter().map(|&i| pages[i]).collect();
    for (k, &i) in to_zero.iter().enumerate() {
        if !moved[k] {
            rest.push(pages[i]);
        } else if unshares[i] {
            report.unshared += 1;
        } else if !was_zero[i] {
            report.backed += 1;
        }
    }
    rest.sort_unstable();
    let in_place = discard_in_place(t, vm, &rest)?;
    report.unshared += in_place.unshared;
    report.backed += in_place.backed;
    report.in_place += rest.len() as u64;
    t.st.count_n(Counter::Discard, u64::from(n));
    t.st.count_n(Counter::DiscardInPlace, rest.len() as u64);
    Ok(report)
}

/// Which of `pages` (sorted; `private[i]`: page `i` is its frame's only
/// mapper) go to the zero region and which are discarded in place, as indices
/// into `pages`: a private page in a run of consecutive pages shorter than
/// [`ZERO_REGION_MIN_RUN`] is discarded in place (its own frame punched: no
/// new mapping, so no VMA change); every other page goes to the zero region (a
/// page of a shared frame needs a new mapping either way).
pub(crate) fn split_by_policy(pages: &[u32], private: &[bool]) -> (Vec<usize>, Vec<usize>) {
    let (mut to_zero, mut in_place) = (Vec::with_capacity(pages.len()), Vec::new());
    let mut s = 0;
    while s < pages.len() {
        let mut e = s + 1;
        while e < pages.len() && pages[e] == pages[e - 1] + 1 {
            e += 1;
        }
        let short = e - s < ZERO_REGION_MIN_RUN as usize;
        for (i, &own) in private.iter().enumerate().take(e).skip(s) {
            if short && own {
                in_place.push(i);
            } else {
                to_zero.push(i);
            }
        }
        s = e;
    }
    (to_zero, in_place)
}

/// Discards `pages` (sorted, of `vm`, none on the zero region) in place: a
/// private page keeps its frame, punched; a page of a shared frame gets a
/// fresh frame of its own (short runs, see [`split_by_policy`], and the
/// fallback when the zero region cannot be used).
fn discard_in_place(t: &mut Txn<'_>, vm: VmId, pages: &[u32]) -> Result<DiscardReport> {
    let mut report = DiscardReport::default();
    let mut private = Vec::with_capacity(pages.len());
    for &page in pages {
        let m = Mapper { vm, page };
        let e = t.entry(m)?;
        if t.st.frames().refs(e.frame) > 1 {
            leave_shared_frame(t, m)?;
            report.unshared += 1;
        } else {
            if !e.flags.contains(PageFlags::ZERO) {
                report.backed += 1;
            }
            private.push(m);
        }
    }
    // No protection before the punch (it would be a second ioctl per run): the
    // content is being dropped, so a write before the punch is dropped with it
    // (as if it came before the discard), and one between the punch and the
    // protection below lands in a fresh page of the hole, seen by the check
    // after it (the page is then not marked `ZERO`). Pages protected already
    // stay protected (their writers wait for the lock).
    let mut frames: Vec<FrameNo> = Vec::with_capacity(private.len());
    for &m in &private {
        frames.push(t.entry(m)?.frame);
    }
    frames.sort_unstable();
    let frame_runs = runs(&frames, |a, b| b == a + 1);
    for &(start, len) in &frame_runs {
        t.st.pool().punch(start, len)?;
    }
    // Protected from here on (and still after the punch zapped the page tables,
    // for the pages that were protected before): writers wait for the lock.
    let pages: Vec<u32> = private.iter().map(|m| m.page).collect();
    for (start, len) in runs(&pages, |a, b| b == a + 1) {
        t.remap.protect(t.addr(Mapper { vm, page: start })?, len as usize * PAGE_SIZE)?;
    }
    // Known zero only if nothing was written between punch and re-protect:
    // one check per run of frames, per frame only in a run that has data.
    let mut written = HashSet::new();
    for &(start, len) in &frame_runs {
        if !t.st.pool().is_hole(start, len).unwrap_or(false) {
            written.extend((start..start + len as FrameNo).filter(|&f| !t.st.pool().is_hole(f, 1).unwrap_or(false)));
        }
    }
    let cleared = PageFlags::SHARED.with(PageFlags::MERGED_ZERO);
    for &m in &private {
        let e = t.entry(m)?;
        let mut flags = e.flags.without(cleared).with(PageFlags::PROTECTED).with(PageFlags::ZERO);
        if written.contains(&e.frame) {
            flags = flags.without(PageFlags::ZERO);
        }
        t.set_flags(m, flags)?;
    }
    Ok(report)
}

/// Moves page `m` off its shared frame onto a fresh frame of its own, protected
/// and zero (as [`Core::discard`] does).
fn leave_shared_frame(t: &mut Txn<'_>, m: Mapper) -> Result<()> {
    let e = t.entry(m)?;
    let new = t.st.alloc(0)?;
    t.set_flags(m, e.flags.without(PageFlags::SHARED))?;
    if let Err(err) = t.move_page(m, new, true) {
        t.set_flags(m, e.flags)?;
        t.st.free_unmapped(new)?;
        return Err(err);
    }
    let mut flags = t.entry(m)?.flags.without(PageFlags::MERGED_ZERO).with(PageFlags::PROTECTED.with(PageFlags::ZERO));
    if !t.st.pool().is_hole(new, 1).unwrap_or(false) {
        flags = flags.without(PageFlags::ZERO);
    }
    t.set_flags(m, flags)
}

/// Runs `(start, length)` of the sorted `items` where `next(prev, cur)` holds
/// between neighbours.
pub(crate) fn runs<T: Copy + Into<u64>>(items: &[T], next: impl Fn(u64, u64) -> bool) -> Vec<(T, u64)> {
    let mut out: Vec<(T, u64)> = Vec::new();
    let mut prev = 0u64;
    for &it in items {
        let v: u64 = it.into();
        match out.last_mut() {
            Some((_, len)) if next(prev, v) => *len += 1,
            _ => out.push((it, 1)),
        }
        prev = v;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{runs, split_by_policy, ZERO_REGION_MIN_RUN};

    #[test]
    fn runs_of_consecutive_values() {
        let r = runs(&[1u32, 2, 3, 7, 9, 10], |a, b| b == a + 1);
        assert_eq!(r, vec![(1, 3), (7, 1), (9, 2)]);
        assert!(runs::<u32>(&[], |a, b| b == a + 1).is_empty());
    }

    #[test]
    fn short_private_runs_stay_in_place() {
        assert_eq!(ZERO_REGION_MIN_RUN, 4, "the cases below are written for 4");
        // Runs: [1], [3, 4, 5], [7, 8, 9, 10], [20, 21] (21 shared), [30..35].
        let pages = [1, 3, 4, 5, 7, 8, 9, 10, 20, 21, 30, 31, 32, 33, 34];
        let mut private = [true; 15];
        private[9] = false;
        private[11] = false;
        let (zero, in_place) = split_by_policy(&pages, &private);
        assert_eq!(in_place, vec![0, 1, 2, 3, 8]);
        assert_eq!(zero, vec![4, 5, 6, 7, 9, 10, 11, 12, 13, 14]);
        assert_eq!(split_by_policy(&[], &[]), (vec![], vec![]));
        // Every page is in exactly one list.
        let (z, i) = split_by_policy(&[5, 6, 7, 8, 100], &[false, true, true, true, true]);
        assert_eq!((z, i), (vec![0, 1, 2, 3], vec![4]));
    }
}
