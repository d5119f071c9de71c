//! Page-level primitives used by every operation while the manager's lock is
//! held: protect, move a page to another frame, copy-on-write, reuse.
//!
//! Invariants kept here (checked by the tests):
//! - a frame with more than one mapper has all its mappers PROTECTED and SHARED;
//! - SHARED or ZERO implies PROTECTED;
//! - a page's reference on its new frame is taken before the one on its old
//!   frame is dropped, and a frame is freed (punched) only after its last
//!   mapper has been remapped away from it.

use crate::frame_table::Mapper;
use crate::manager::{Error, Result, State};
use crate::page_table::{PageEntry, PageFlags};
use crate::remap::{PendingRemaps, RemapProtocol};
use crate::vcpu_gate::{HeldVcpus, VcpuGate};
use crate::{FrameNo, PAGE_SIZE};
use std::sync::Arc;

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
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.finish_remaps() {
            tracing::error!("finishing batched remaps: {e}");
        }
        if let Some(held) = self.held.take() {
            let reached = held.reached;
            let c = &mut self.st.counters;
            c.vcpu_hold_us += held.release().as_micros() as u64;
            c.vcpu_holds += 1;
            c.vcpu_hold_timeouts += u64::from(!reached);
        }
    }
}

impl<'a> Txn<'a> {
    /// A transaction on the locked state `st`.
    pub(crate) fn new(st: &'a mut State, remap: RemapProtocol<'a>) -> Self {
        Txn { st, remap, pending: PendingRemaps::default(), gates: Vec::new(), held: None }
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

    pub(crate) fn entry(&self, m: Mapper) -> Result<PageEntry> {
        let table = self.st.vms.get(&m.vm).ok_or(Error::UnknownVm(m.vm))?;
        table.get(m.page).ok_or(Error::OutOfRange(m.vm, u64::from(m.page)))
    }

    pub(crate) fn addr(&self, m: Mapper) -> Result<usize> {
        let table = self.st.vms.get(&m.vm).ok_or(Error::UnknownVm(m.vm))?;
        if m.page >= table.len() {
            return Err(Error::OutOfRange(m.vm, u64::from(m.page)));
        }
        Ok(table.page_addr(m.page))
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

    pub(crate) fn set_flags(&mut self, m: Mapper, flags: PageFlags) -> Result<()> {
        let table = self.st.vms.get_mut(&m.vm).ok_or(Error::UnknownVm(m.vm))?;
        table.set_flags(m.page, flags);
        Ok(())
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
    pub(crate) fn unprotect_page(&mut self, m: Mapper) -> Result<()> {
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
            tracing::error!("remap of vm {} page {} incomplete: {e}", m.vm, m.page);
        }
        self.st.frames.add(new, m);
        if let Some(table) = self.st.vms.get_mut(&m.vm) {
            table.set_frame(m.page, new);
            let flags =
                if end_protected { e.flags.with(PageFlags::PROTECTED) } else { e.flags.without(PageFlags::PROTECTED) };
            table.set_flags(m.page, flags);
        }
        if self.st.frames.remove(e.frame, m)? == 0 {
            self.st.pool.free(e.frame, 0)?;
        }
        Ok(())
    }

    /// Gives page `m` (protected, frame shared by several pages) a private copy;
    /// it ends unprotected.
    pub(crate) fn cow_copy(&mut self, m: Mapper) -> Result<()> {
        let e = self.entry(m)?;
        let new = self.st.pool.alloc(0)?;
        if !e.flags.contains(PageFlags::ZERO) {
            self.st.pool.copy_frame(e.frame, new)?;
        }
        let cleared = e.flags.without(PageFlags::SHARED).without(PageFlags::ZERO);
        self.set_flags(m, cleared)?;
        if let Err(err) = self.move_page(m, new, false) {
            self.set_flags(m, e.flags)?;
            self.st.pool.free(new, 0)?;
            return Err(err);
        }
        self.st.counters.cow_copies += 1;
        if let Some(table) = self.st.vms.get_mut(&m.vm) {
            table.cow_copies += 1;
        }
        Ok(())
    }

    /// Takes the merged frame over in place: page `m` is its only mapper.
    pub(crate) fn reuse(&mut self, m: Mapper) -> Result<()> {
        self.unprotect_page(m)?;
        self.st.counters.cow_reuses += 1;
        if let Some(table) = self.st.vms.get_mut(&m.vm) {
            table.cow_reuses += 1;
        }
        Ok(())
    }

    /// Breaks sharing of page `m` the way a write would (copy or reuse).
    /// Returns whether anything changed.
    pub(crate) fn break_sharing(&mut self, m: Mapper) -> Result<bool> {
        let e = self.entry(m)?;
        if self.st.frames.refs(e.frame) > 1 {
            self.cow_copy(m)?;
            Ok(true)
        } else if e.flags.contains(PageFlags::SHARED) {
            self.reuse(m)?;
            Ok(true)
        } else {
            Ok(false)
        }
    }
}
