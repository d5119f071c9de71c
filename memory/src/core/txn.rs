//! Page-level primitives used by every operation while the manager's lock is
//! held: protect, move a page to another frame, copy-on-write, reuse.
//!
//! Invariants kept here (checked by the tests):
//! - a frame with more than one mapper has all its mappers PROTECTED and SHARED;
//! - SHARED or ZERO implies PROTECTED;
//! - a page's reference on its new frame is taken before the one on its old
//!   frame is dropped, and a frame is freed (punched) only after its last
//!   mapper has been remapped away from it.

use std::sync::Arc;

use super::counters::Counter;
use super::error::{Error, Result};
use super::state::{Cow, State};
use crate::frame_table::Mapper;
use crate::page_table::{PageEntry, PageFlags};
use crate::remap::{PendingRemaps, RemapProtocol};
use crate::vcpu_gate::{HeldVcpus, VcpuGate};
use crate::{FrameNo, VmId, PAGE_SIZE};

/// The lock-holding context of one operation.
pub(crate) struct Txn<'a> {
    pub(crate) st: &'a mut State,
    pub(crate) remap: RemapProtocol<'a>,
    /// Remaps in their read-only instant ([`RemapProtocol::map_read_only`]);
    /// finished by [`Txn::finish_remaps`], at the latest when the `Txn` drops
    /// (before the manager's lock it borrows is released).
    pub(crate) pending: PendingRemaps,
    /// vCPU gates to hold from the first change on ([`Txn::hold_vcpus`]).
    pub(crate) gates: Vec<Arc<dyn VcpuGate>>,
    held: Option<HeldVcpus>,
    /// Frames without a mapper left, freed together by [`Txn::free_deferred`]
    /// (at the latest when the `Txn` drops): one sorted batch punches a whole
    /// chunk's merged-away frames in a few `fallocate`s instead of one per remap.
    deferred_frees: Vec<FrameNo>,
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.finish_remaps() {
            self.st.count(Counter::RemapError);
            tracing::error!("finishing batched remaps: {e}");
        }
        if let Err(e) = self.free_deferred() {
            tracing::error!("freeing the frames a transaction left without mappers: {e}");
        }
        if let Some(held) = self.held.take() {
            let reached = held.reached;
            self.st.count_vcpu_hold(held.release(), reached);
        }
    }
}

impl<'a> Txn<'a> {
    /// A transaction on the locked state `st`.
    pub(crate) fn new(st: &'a mut State, remap: RemapProtocol<'a>) -> Self {
        Txn { st, remap, pending: PendingRemaps::default(), gates: Vec::new(), held: None, deferred_frees: Vec::new() }
    }
}

impl Txn<'_> {
    /// Holds the vCPUs behind [`Txn::gates`] (once) until the `Txn` drops.
    pub(crate) fn hold_vcpus(&mut self) {
        if self.held.is_none() && !self.gates.is_empty() {
            self.held = Some(HeldVcpus::hold(std::mem::take(&mut self.gates)));
        }
    }

    /// Finishes the batched remaps (registration, protection, writable again).
    pub(crate) fn finish_remaps(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        Ok(self.remap.finish(&mut self.pending)?)
    }

    /// Takes `frames` (no mapper left: checked now) to free with the others
    /// at [`Txn::free_deferred`]. Nothing can map them meanwhile: they are not
    /// in the pool's free lists, and a frame without mappers is never a merge
    /// target (the indexes check a frame's mappers before using it).
    pub(crate) fn free_later(&mut self, frames: &mut Vec<FrameNo>) -> Result<()> {
        for &f in frames.iter() {
            self.st.check_unmapped(f)?;
        }
        self.deferred_frees.append(frames);
        Ok(())
    }

    /// Frees the frames of [`Txn::free_later`] (one punch per run of
    /// consecutive frames, see `FramePool::free_frames`).
    pub(crate) fn free_deferred(&mut self) -> Result<()> {
        if self.deferred_frees.is_empty() {
            return Ok(());
        }
        let mut frames = std::mem::take(&mut self.deferred_frees);
        self.st.free_unmapped_frames(&mut frames)
    }

    /// The entry of page `m`.
    pub(crate) fn entry(&self, m: Mapper) -> Result<PageEntry> {
        self.st.entry(m)
    }

    /// The host address of page `m`.
    pub(crate) fn addr(&self, m: Mapper) -> Result<usize> {
        self.st.addr(m)
    }

    /// The 4 KiB of page `m` read through its guest mapping (racy if a guest
    /// writes it: used for hashing, and for comparisons under write protection).
    /// Reading through the guest view, not the pool's alias, leaves no alias
    /// translation behind, so freeing the frame later needs no TLB shootdown.
    /// The page must have host memory (or reading it allocates some).
    pub(crate) fn page_bytes(&self, m: Mapper) -> Result<&[u8]> {
        let addr = self.addr(m)?;
        // SAFETY: `addr` is a page of a guest range this manager owns, mapped for
        // as long as the VM is registered, which the held lock (borrowed by the
        // returned slice's lifetime) guarantees; bytes are plain integers.
        Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) })
    }

    /// Whether pages `a` and `b` hold the same 4 KiB (read through the guest views).
    pub(crate) fn pages_equal(&self, a: Mapper, b: Mapper) -> Result<bool> {
        Ok(self.page_bytes(a)? == self.page_bytes(b)?)
    }

    /// Sets the flags of page `m` (the mapping already matches them).
    pub(crate) fn set_flags(&mut self, m: Mapper, flags: PageFlags) -> Result<()> {
        self.st.set_flags(m, flags)
    }

    /// Write-protects the page if needed; returns whether it was already protected.
    pub(crate) fn protect_page(&mut self, m: Mapper) -> Result<bool> {
        let e = self.entry(m)?;
        if e.flags.contains(PageFlags::PROTECTED) {
            return Ok(true);
        }
        self.remap.protect(self.addr(m)?, PAGE_SIZE)?;
        self.set_flags(m, e.flags.with(PageFlags::PROTECTED))?;
        Ok(false)
    }

    /// Removes protection (without waking) and clears PROTECTED, SHARED and ZERO.
    /// Refused for a page on the zero region (see [`Txn::leave_zero_region`]).
    pub(crate) fn unprotect_page(&mut self, m: Mapper) -> Result<()> {
        self.refuse_zero_region(m)?;
        let e = self.entry(m)?;
        self.remap.unprotect(self.addr(m)?, PAGE_SIZE)?;
        let cleared = PageFlags::PROTECTED.with(PageFlags::SHARED).with(PageFlags::ZERO);
        self.set_flags(m, e.flags.without(cleared))
    }

    /// Remaps protected page `m` to `new` (whose content is final), moving its
    /// reference; the page ends protected iff `end_protected`. Frees the old frame
    /// if this was its last mapper.
    pub(crate) fn move_page(&mut self, m: Mapper, new: FrameNo, end_protected: bool) -> Result<()> {
        let e = self.entry(m)?;
        let addr = self.addr(m)?;
        let remapped = if end_protected {
            // SAFETY: `addr` is one page of a guest range this manager owns and the
            // page is write-protected (caller's precondition, held under the lock).
            unsafe { self.remap.remap_protected(addr, PAGE_SIZE, new) }
        } else {
            // SAFETY: as above; in addition `new` is mapped by no other page (the
            // caller allocated it for this page alone) and holds the final content.
            unsafe { self.remap.remap_private(addr, PAGE_SIZE, new) }
        };
        if let Err(e) = remapped {
            if matches!(e, crate::remap::Error::Map(..)) {
                // The old mapping is still in place: nothing to record.
                return Err(e.into());
            }
            self.st.count(Counter::RemapError);
            tracing::error!("remap of vm {} page {} incomplete: {e}", m.vm, m.page);
        }
        let flags =
            if end_protected { e.flags.with(PageFlags::PROTECTED) } else { e.flags.without(PageFlags::PROTECTED) };
        if let Some(old) = self.st.repoint(m, new, flags)? {
            self.st.free_unmapped(old)?;
        }
        Ok(())
    }

    /// Gives page `m` (protected, frame shared by several pages) a private copy;
    /// it ends unprotected.
    pub(crate) fn cow_copy(&mut self, m: Mapper) -> Result<()> {
        let e = self.entry(m)?;
        let new = self.st.alloc(0)?;
        if !e.flags.contains(PageFlags::ZERO) {
            self.st.pool().copy_frame(e.frame, new)?;
        }
        let cleared = e.flags.without(PageFlags::SHARED).without(PageFlags::ZERO);
        self.set_flags(m, cleared)?;
        if let Err(err) = self.move_page(m, new, false) {
            self.set_flags(m, e.flags)?;
            self.st.free_unmapped(new)?;
            return Err(err);
        }
        self.st.count_cow(m.vm, Cow::Copy);
        Ok(())
    }

    /// Takes the merged frame over in place: page `m` is its only mapper.
    pub(crate) fn reuse(&mut self, m: Mapper) -> Result<()> {
        self.unprotect_page(m)?;
        self.st.count_cow(m.vm, Cow::Reuse);
        Ok(())
    }

    /// Breaks sharing of page `m` the way a write would (copy or reuse; a page
    /// on the zero region gets a fresh frame, still protected and `ZERO`).
    /// Returns whether anything changed.
    pub(crate) fn break_sharing(&mut self, m: Mapper) -> Result<bool> {
        let e = self.entry(m)?;
        if self.st.on_zero_region(m) {
            self.leave_zero_region(m, true)?;
            Ok(true)
        } else if self.st.frames().refs(e.frame) > 1 {
            self.cow_copy(m)?;
            Ok(true)
        } else if e.flags.contains(PageFlags::SHARED) {
            self.reuse(m)?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

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

    /// Fails with [`Error::CrossDomain`] unless every guest page mapping `frame`
    /// belongs to a VM of `vm`'s merge domain (see [`crate::merge::domains`]).
    pub(crate) fn check_domain(&self, vm: VmId, frame: FrameNo) -> Result<()> {
        let da = self.st.merge_config(vm).domain;
        let check = |m: &Mapper| {
            let db = self.st.merge_config(m.vm).domain;
            if db == da {
                Ok(())
            } else {
                Err(Error::CrossDomain { a: vm, da, b: m.vm, db })
            }
        };
        match self.st.frames().shared_mappers(frame) {
            Some(list) => list.iter().try_for_each(check),
            None => self.st.frames().first_mapper(frame).iter().try_for_each(check),
        }
    }
}
