//! The core's page operations (`impl Core`): merging, sharing, unsharing,
//! migration, discard, protection and device reads and writes. Each holds the
//! lock for its whole duration (one [`Txn`]) and goes through the remap protocol.

use super::balloon::ShortRuns;
use super::counters::Counter;
use super::error::{Error, Result};
use super::txn::Txn;
use super::Core;
use crate::frame_table::Mapper;
use crate::page_table::{PageEntry, PageFlags};
use crate::{FrameNo, VmId, PAGE_SIZE};

/// Result of a merge attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOutcome {
    /// Both pages now map `frame` (write-protected, shared).
    Merged {
        /// The frame kept.
        frame: FrameNo,
    },
    /// The pages already mapped the same frame (or both the zero region).
    AlreadyShared,
    /// The contents differ, or one page maps the zero region (its content was
    /// dropped: it merges with nothing else); nothing changed.
    Differs,
}

impl Core {
    /// The entry of page `m`.
    pub(crate) fn entry(&self, m: Mapper) -> Result<PageEntry> {
        self.with_txn(|t| t.entry(m))
    }

    /// Merges pages `a` and `b` if equal (same merge domain required).
    pub(crate) fn merge_pages(&self, a: Mapper, b: Mapper) -> Result<MergeOutcome> {
        self.with_txn(|t| {
            let (fa, fb) = (t.entry(a)?.frame, t.entry(b)?.frame);
            t.check_domain(a.vm, fb)?;
            t.check_domain(b.vm, fa)?;
            merge_frames(t, fa, fb, false)
        })
    }

    /// Maps page `m` onto `frame` if their contents are equal.
    pub(crate) fn share(&self, m: Mapper, frame: FrameNo) -> Result<MergeOutcome> {
        self.with_txn(|t| {
            let own = t.entry(m)?.frame;
            t.check_domain(m.vm, frame)?;
            for other in t.st.frames().mappers(own) {
                t.check_domain(other.vm, frame)?;
            }
            merge_frames(t, frame, own, true)
        })
    }

    /// Breaks sharing of page `m` as a write would; returns whether it changed.
    /// A page on the zero region is left there (its content was dropped: it
    /// shares nothing a write would have to copy).
    pub(crate) fn unshare(&self, m: Mapper) -> Result<bool> {
        self.with_txn(|t| {
            if t.st.on_zero_region(m) {
                return Ok(false);
            }
            let changed = t.break_sharing(m)?;
            if changed {
                t.st.count(Counter::Unshare);
            }
            Ok(changed)
        })
    }

    /// Moves `old`'s content to a new frame (`target`, or any free one) and
    /// remaps every page mapping it; returns the new frame.
    /// A frame of the zero region stays where it is (returned as is) unless a
    /// target is named (refused: it is no pool frame).
    pub(crate) fn migrate(&self, old: FrameNo, target: Option<FrameNo>) -> Result<FrameNo> {
        self.with_txn(|t| {
            if t.st.pool().is_zero_frame(old) {
                return target.map_or(Ok(old), |_| Err(Error::FrameNotLive(old)));
            }
            migrate_frame(t, old, target)
        })
    }

    /// Drops page `m`'s content and host memory; it reads as zero, protected
    /// (a batch of one page of [`Core::discard_range`], always onto the zero
    /// region: an isolated page is not discarded in place here).
    pub(crate) fn discard(&self, m: Mapper) -> Result<()> {
        self.with_txn(|t| super::balloon::discard_batch(t, m.vm, m.page, 1, ShortRuns::ZeroRegion).map(|_| ()))
    }

    /// Write-protects page `m` (its next write is resolved and recorded).
    pub(crate) fn protect(&self, m: Mapper) -> Result<()> {
        self.with_txn(|t| t.protect_page(m).map(|_| ()))
    }

    /// Removes explicit protection of page `m` (refused for shared pages).
    pub(crate) fn unprotect(&self, m: Mapper) -> Result<()> {
        self.with_txn(|t| {
            let e = t.entry(m)?;
            if e.flags.contains(PageFlags::SHARED) || t.st.frames().refs(e.frame) > 1 {
                return Err(Error::Shared(m.vm, m.page));
            }
            if t.st.on_zero_region(m) {
                // Writable means a frame of its own (reading as zero).
                return t.leave_zero_region(m, false);
            }
            if e.flags.contains(PageFlags::PROTECTED) {
                t.unprotect_page(m)?;
            }
            Ok(())
        })
    }

    /// Writes `data` at guest-physical `gpa` of `vm` through the alias, after
    /// breaking sharing of every page it touches; records them as device-written.
    pub(crate) fn write_bytes(&self, vm: VmId, gpa: u64, data: &[u8]) -> Result<()> {
        self.with_txn(|t| {
            for (page, offset, range) in page_spans(t, vm, gpa, data.len())? {
                let m = Mapper { vm, page };
                t.break_sharing(m)?;
                let e = t.entry(m)?;
                t.st.pool().write(e.frame, offset, &data[range])?;
                let flags = e.flags.with(PageFlags::DEVICE_WRITTEN).with(PageFlags::MERGE_DIRTY);
                t.set_flags(m, flags.without(PageFlags::ZERO))?;
            }
            Ok(())
        })
    }

    /// Reads guest-physical `gpa` of `vm` into `buf` through the alias.
    pub(crate) fn read_bytes(&self, vm: VmId, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.with_txn(|t| {
            for (page, offset, range) in page_spans(t, vm, gpa, buf.len())? {
                if t.st.on_zero_region(Mapper { vm, page }) {
                    buf[range].fill(0); // the zero region is not in the alias
                    continue;
                }
                let frame = t.entry(Mapper { vm, page })?.frame;
                t.st.pool().read(frame, offset, &mut buf[range])?;
            }
            Ok(())
        })
    }

    /// Pages of `vm` flagged with `flag`, clearing the flag.
    pub(crate) fn take_flagged(&self, vm: VmId, flag: PageFlags) -> Result<Vec<u32>> {
        self.lock().take_flagged(vm, flag)
    }
}

/// Splits `len` bytes at `gpa` into (page, offset in page, range of the buffer).
fn page_spans(t: &Txn<'_>, vm: VmId, gpa: u64, len: usize) -> Result<Vec<(u32, usize, std::ops::Range<usize>)>> {
    let table = t.st.table(vm).ok_or(Error::UnknownVm(vm))?;
    let size = u64::from(table.len()) * PAGE_SIZE as u64;
    if gpa.checked_add(len as u64).is_none_or(|end| end > size) {
        return Err(Error::OutOfRange(vm, gpa / PAGE_SIZE as u64));
    }
    let mut spans = Vec::new();
    let mut done = 0;
    while done < len {
        let at = gpa + done as u64;
        let offset = (at % PAGE_SIZE as u64) as usize;
        let n = (PAGE_SIZE - offset).min(len - done);
        spans.push(((at / PAGE_SIZE as u64) as u32, offset, done..done + n));
        done += n;
    }
    Ok(spans)
}

/// Merges frames `fa` and `fb` if equal. `keep_first`: keep `fa` (share with a
/// given frame); otherwise keep the frame with more mappers, then the one in the
/// fuller 2 MiB frame.
fn merge_frames(t: &mut Txn<'_>, fa: FrameNo, fb: FrameNo, keep_first: bool) -> Result<MergeOutcome> {
    if fa == fb {
        return Ok(MergeOutcome::AlreadyShared);
    }
    // A page on the zero region shares the zero region already, and only that.
    match (t.st.pool().is_zero_frame(fa), t.st.pool().is_zero_frame(fb)) {
        (true, true) => return Ok(MergeOutcome::AlreadyShared),
        (true, false) | (false, true) => return Ok(MergeOutcome::Differs),
        (false, false) => {}
    }
    let (ma, mb) = (t.st.frames().mappers(fa), t.st.frames().mappers(fb));
    if ma.is_empty() {
        return Err(Error::FrameNotLive(fa));
    }
    if mb.is_empty() {
        return Err(Error::FrameNotLive(fb));
    }
    let (keep, drop, keep_mappers, drop_mappers) =
        if keep_first || prefer_first(t, fa, fb) { (fa, fb, ma, mb) } else { (fb, fa, mb, ma) };
    let shared_after =
        t.st.frames().shared_mappings() + if keep_mappers.len() == 1 { 1 } else { 0 } + drop_mappers.len() as u64;
    if !t.st.admit_vmas(shared_after, 2 * drop_mappers.len()) {
        return Err(Error::VmaBudget);
    }
    let mut newly_protected = Vec::new();
    for &m in keep_mappers.iter().chain(&drop_mappers) {
        if !t.protect_page(m)? {
            newly_protected.push(m);
        }
    }
    if !t.st.pool().frames_equal(keep, drop)? {
        for m in newly_protected {
            t.unprotect_page(m)?;
        }
        t.st.count(Counter::MergeDiffers);
        return Ok(MergeOutcome::Differs);
    }
    let zero =
        keep_mappers.iter().chain(&drop_mappers).any(|&m| t.entry(m).is_ok_and(|e| e.flags.contains(PageFlags::ZERO)));
    let mut shared = PageFlags::PROTECTED.with(PageFlags::SHARED);
    if zero {
        shared = shared.with(PageFlags::ZERO);
    }
    for &m in &keep_mappers {
        let flags = t.entry(m)?.flags.with(shared);
        t.set_flags(m, flags)?;
    }
    for &m in &drop_mappers {
        t.move_page(m, keep, true)?;
        let flags = t.entry(m)?.flags.with(shared);
        t.set_flags(m, flags)?;
    }
    t.st.count(Counter::Merge);
    Ok(MergeOutcome::Merged { frame: keep })
}

fn prefer_first(t: &Txn<'_>, fa: FrameNo, fb: FrameNo) -> bool {
    let (ra, rb) = (t.st.frames().refs(fa), t.st.frames().refs(fb));
    if ra != rb {
        return ra > rb;
    }
    let hf = |f: FrameNo| t.st.pool().buddy().free_in_huge_frame(f / crate::HUGE_FRAME_PAGES);
    hf(fa) <= hf(fb)
}

/// Moves frame `old`'s content to `target` (a free frame), or to any free frame,
/// and remaps every guest page mapping it, in one step of transaction `t`;
/// returns the new frame. On failure nothing moved unless a later mapper of a
/// shared frame failed (then the pages already moved map an equal copy, all
/// protected): every page maps a frame with its content, and a page that was
/// writable before is writable again.
pub(crate) fn migrate_frame(t: &mut Txn<'_>, old: FrameNo, target: Option<FrameNo>) -> Result<FrameNo> {
    let mappers = t.st.frames().mappers(old);
    if mappers.is_empty() {
        return Err(Error::FrameNotLive(old));
    }
    let shared = t.st.frames().shared_mappings();
    if !t.st.admit_vmas(shared, 2 * mappers.len()) {
        return Err(Error::VmaBudget);
    }
    let new = match target {
        Some(f) => {
            t.st.alloc_specific(f)?;
            f
        }
        None => t.st.alloc(0)?,
    };
    let result = migrate_mappers(t, old, new, &mappers);
    if result.is_err() && t.st.frames().refs(new) == 0 {
        t.st.free_unmapped(new)?;
    }
    result.map(|()| new)
}

/// Copies `old` to `new` under protection and remaps every mapper.
fn migrate_mappers(t: &mut Txn<'_>, old: FrameNo, new: FrameNo, mappers: &[Mapper]) -> Result<()> {
    let mut was_protected = Vec::with_capacity(mappers.len());
    for &m in mappers {
        match t.protect_page(m) {
            Ok(p) => was_protected.push(p),
            Err(e) => {
                undo_protection(t, mappers, &was_protected, old);
                return Err(e);
            }
        }
    }
    let all_zero = mappers.iter().all(|&m| t.entry(m).is_ok_and(|e| e.flags.contains(PageFlags::ZERO)));
    // A hole (never written) is not copied: `new` is one too (see `migrate_run`).
    let hole = || {
        t.st.pool().is_hole(old, 1).unwrap_or_else(|err| {
            tracing::warn!("hole check of frame {old}: {err}; copying it");
            false
        })
    };
    if !all_zero && !hole() {
        t.st.pool().copy_frame(old, new)?;
    }
    for (&m, &protected) in mappers.iter().zip(&was_protected) {
        // An unprotected page is the frame's only mapper: it may end private.
        if let Err(e) = t.move_page(m, new, protected) {
            undo_protection(t, mappers, &was_protected, old);
            return Err(e);
        }
    }
    t.st.count(Counter::Migration);
    Ok(())
}

/// After a failed migration: makes the pages that were writable before, and
/// still map `old`, writable again (such a page is its frame's only mapper).
fn undo_protection(t: &mut Txn<'_>, mappers: &[Mapper], was_protected: &[bool], old: FrameNo) {
    for (&m, &protected) in mappers.iter().zip(was_protected) {
        if !protected && t.entry(m).is_ok_and(|e| e.frame == old) {
            if let Err(e) = t.unprotect_page(m) {
                tracing::warn!("undoing the protection of vm {} page {}: {e}", m.vm, m.page);
            }
        }
    }
}

/// What [`migrate_run`] did.
#[derive(Debug)]
pub(crate) struct RunOutcome {
    /// Frames moved (the first `moved` of the run).
    pub(crate) moved: u32,
    /// Why the rest stayed (`None`: the whole run moved).
    pub(crate) error: Option<Error>,
}

/// Moves the private frames `old..old+n`, mapped by pages `page..page+n` of
/// `vm` in order (each frame's only mapper), to the free frames `new..new+n`,
/// in one step of transaction `t`, with one system call per stretch instead of
/// several per page:
///
/// 1. write-protect the pages not yet protected (one ioctl per run of them);
/// 2. copy every stretch of pages not flagged `ZERO` with one `pwrite` into the
///    memfd, read through the guest view (no alias mapping is left behind);
/// 3. map each stretch of equal protection with one `mmap`: the pages that
///    were protected read-only ([`crate::remap::RemapProtocol::map_read_only`]),
///    the others read-write ([`crate::remap::RemapProtocol::map_private`]),
///    and fill its page table entries at once
///    ([`crate::remap::RemapProtocol::populate`]: the guests' next accesses
///    then take KVM's lockless path instead of faulting each page in under the
///    `mmap_lock` the next `mmap` needs for writing); their registration,
///    protection and `mprotect` are batched in `t.pending` and finished per VM
///    before the lock is released;
/// 4. repoint the pages and add the old frames to `to_free`, for the caller to
///    free once its batch of runs is done (still under the lock: one punch per
///    run of them for the whole batch instead of one per run).
///
/// Why it is safe: as [`migrate_frame`] for each page. Every page is
/// write-protected before the copy, so no write is lost; a new mapping is
/// read-only until registered and protected, or read-write onto a private
/// frame that already holds the final content; the old frames are punched
/// only after no page maps them. On failure the pages from the failed stretch
/// on stay on their old frames, writable again if they were.
pub(crate) fn migrate_run(
    t: &mut Txn<'_>,
    vm: VmId,
    (page, old, new, n): (u32, FrameNo, FrameNo, u32),
    to_free: &mut Vec<FrameNo>,
) -> RunOutcome {
    let mut moved = 0;
    let error = migrate_run_inner(t, vm, (page, old, new, n), &mut moved, to_free).err();
    RunOutcome { moved, error }
}

fn migrate_run_inner(
    t: &mut Txn<'_>,
    vm: VmId,
    (page, old, new, n): (u32, FrameNo, FrameNo, u32),
    moved: &mut u32,
    to_free: &mut Vec<FrameNo>,
) -> Result<()> {
    let mappers: Vec<Mapper> = (0..n).map(|i| Mapper { vm, page: page + i }).collect();
    let mut entries = Vec::with_capacity(n as usize);
    for (i, &m) in mappers.iter().enumerate() {
        let e = t.entry(m)?;
        if e.frame != old + i as u32 || t.st.frames().refs(e.frame) != 1 {
            return Err(Error::FrameNotLive(old + i as u32));
        }
        entries.push(e);
    }
    let was_protected: Vec<bool> = entries.iter().map(|e| e.flags.contains(PageFlags::PROTECTED)).collect();
    let stretches = equal_stretches(&was_protected);
    if !t.st.admit_vmas(t.st.frames().shared_mappings(), 2 * stretches.len()) {
        return Err(Error::VmaBudget);
    }
    for i in 0..n {
        if let Err(e) = t.st.alloc_specific(new + i) {
            free_new(t, new, i);
            return Err(e);
        }
    }
    if let Err(e) = t.protect_group(&mappers) {
        undo_run_protection(t, &mappers, &was_protected, old);
        free_new(t, new, n);
        return Err(e);
    }
    let zero: Vec<bool> = entries.iter().map(|e| e.flags.contains(PageFlags::ZERO)).collect();
    // Pages whose content was copied (the others' new frames are holes).
    let mut copied = vec![false; n as usize];
    for (s, e) in equal_stretches(&zero) {
        if zero[s] {
            continue;
        }
        // Only the frames with host memory are copied: a hole (a page never
        // written) reads as zero, and so does its new frame (every free frame
        // is punched), so it stays a hole. Copying it would read it through
        // the guest view, which allocates it, and write zeros into the new
        // frame, which allocates that too. The pages are write-protected, so
        // a hole cannot gain content before the remap.
        let held = t.st.pool().data_runs(old + s as u32, (e - s) as u32).unwrap_or_else(|err| {
            tracing::warn!("data runs of frames {}..{}: {err}; copying them all", old + s as u32, old + e as u32);
            vec![(old + s as u32, (e - s) as u32)]
        });
        for (first, count) in held {
            let rel = (first - old) as usize;
            copied[rel..rel + count as usize].iter_mut().for_each(|c| *c = true);
            let written = t.addr(mappers[rel]).and_then(|addr| {
                // SAFETY: pages `rel..rel+count` of the VM are consecutive in its host
                // range (inside `s..e`), mapped for as long as the VM is registered,
                // which the held lock guarantees; they are write-protected, so the
                // bytes are stable while read.
                let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, count as usize * PAGE_SIZE) };
                Ok(t.st.pool().write_frames(new + rel as u32, bytes)?)
            });
            if let Err(err) = written {
                undo_run_protection(t, &mappers, &was_protected, old);
                free_new(t, new, n);
                return Err(err);
            }
        }
    }
    for (s, e) in stretches {
        if t.pending.is_full() {
            if let Err(err) = t.finish_remaps() {
                t.st.count(Counter::RemapError);
                tracing::error!("finishing batched remaps: {err}");
            }
        }
        let addr = t.addr(mappers[s])?;
        let (len, frame) = ((e - s) * PAGE_SIZE, new + s as u32);
        let group = u64::from(vm);
        let remapped = if was_protected[s] {
            // SAFETY: `addr..addr+len` are pages of a guest range this manager owns,
            // write-protected above (held under the lock); the range is finished
            // before the lock is released (`Txn` drop or `Txn::finish_remaps`).
            unsafe { t.remap.map_read_only(&mut t.pending, group, addr, len, frame) }
        } else {
            // SAFETY: as above; in addition the new frames were allocated for these
            // pages alone and hold their final content (copied above).
            unsafe { t.remap.map_private(&mut t.pending, group, addr, len, frame) }
        };
        if remapped.is_ok() {
            // Before the batch's finish registers and protects the range (see
            // `populate`); only the pages with content: filling a hole allocates it.
            for (a, b) in equal_stretches(&copied[s..e]) {
                if copied[s + a] {
                    t.remap.populate(addr + a * PAGE_SIZE, (b - a) * PAGE_SIZE, !was_protected[s]);
                }
            }
        }
        if let Err(err) = remapped {
            if matches!(err, crate::remap::Error::Map(..)) {
                // The old mappings of this stretch and the later ones are still in place.
                undo_run_protection(t, &mappers[s..], &was_protected[s..], old + s as u32);
                t.st.free_unmapped_frames(to_free)?;
                free_new(t, new + s as u32, n - s as u32);
                return Err(err.into());
            }
            t.st.count(Counter::RemapError);
            tracing::error!("remap of vm {vm} pages {}..{} incomplete: {err}", page + s as u32, page + e as u32);
        }
        for i in s..e {
            let flags = if was_protected[i] {
                entries[i].flags.with(PageFlags::PROTECTED)
            } else {
                entries[i].flags.without(PageFlags::PROTECTED)
            };
            to_free.extend(t.st.repoint(mappers[i], new + i as u32, flags)?);
            t.st.count(Counter::Migration);
            *moved += 1;
        }
    }
    Ok(())
}

/// Maximal stretches `(start, end)` of equal values in `v`.
fn equal_stretches(v: &[bool]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, &b) in v.iter().enumerate() {
        match out.last_mut() {
            Some((s, e)) if v[*s] == b => *e = i + 1,
            _ => out.push((i, i + 1)),
        }
    }
    out
}

/// Returns the `count` frames from `first` (allocated for a run, mapped by no page) to the pool.
fn free_new(t: &mut Txn<'_>, first: FrameNo, count: u32) {
    let mut frames: Vec<FrameNo> = (first..first + count).collect();
    if let Err(e) = t.st.free_unmapped_frames(&mut frames) {
        tracing::warn!("returning frames {first}..+{count} of a failed migration: {e}");
    }
}

/// After a failed run: the pages that were writable before and still map their
/// old frame (`old + i`) are made writable again.
fn undo_run_protection(t: &mut Txn<'_>, mappers: &[Mapper], was_protected: &[bool], old: FrameNo) {
    for (i, (&m, &protected)) in mappers.iter().zip(was_protected).enumerate() {
        let still_old = t.entry(m).is_ok_and(|e| e.frame == old + i as u32);
        let now_protected = t.entry(m).is_ok_and(|e| e.flags.contains(PageFlags::PROTECTED));
        if !protected && still_old && now_protected {
            if let Err(e) = t.unprotect_page(m) {
                tracing::warn!("undoing the protection of vm {} page {}: {e}", m.vm, m.page);
            }
        }
    }
}
