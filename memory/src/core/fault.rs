//! Resolution of write faults on protected guest pages (runs on the
//! Protector's handler thread, which reads the faults before and wakes the
//! writers after: see [`crate::protector`]).
//!
//! Under the manager's lock (so any merge or migration of the page has finished):
//! - page not protected (any more): make sure it is not;
//! - frame mapped by more than one guest page: **copy** to a new frame, remap
//!   the page to it (registered, not protected), drop one reference;
//! - only mapping of a merged frame: **reuse** it in place (no copy);
//! - page on the zero region (content dropped): map a **fresh frame** of its
//!   own (it reads as zero: no copy), unprotected, and record the write (a
//!   missing free frame is handled as for a copy);
//! - a discarded page that kept its own frame (punched in place), or an
//!   explicitly protected page:
//!   remove protection, record the write.
//!
//! A resolution that fails is logged (`tracing::error!`) and counted
//! (`fault_errors`); the writer is woken anyway, retries and faults again.
//!
//! A copy that finds no free frame (possible only with overcommit, see
//! [`super::commit`]) is not an error to retry: it is counted
//! (`cow_no_frame`), the VM is marked out of memory (its handler told, a
//! warning logged once) and the writer is left blocked (the Protector does not
//! wake it), so nothing spins.

use super::counters::Counter;
use super::error::Result;
use super::txn::Txn;
use std::sync::Arc;

use super::Core;
use crate::page_table::PageFlags;
use crate::{VmId, PAGE_SIZE};

impl Core {
    /// The Protector's resolver callback over this core: resolves a batch of
    /// faulting pages and lists those whose writers must stay blocked (the
    /// Protector wakes the others afterwards).
    pub(crate) fn fault_resolver(self: &Arc<Self>) -> impl FnMut(&[u64], &mut Vec<u64>) + Send + 'static {
        let core = self.clone();
        move |pages, held| core.resolve_faults(pages, held)
    }

    /// Resolves a batch of write faults (their writers stay blocked until
    /// woken); pushes onto `held` the pages whose copy-on-write found no free
    /// frame (their writers must not be woken).
    pub(crate) fn resolve_faults(&self, addrs: &[u64], held: &mut Vec<u64>) {
        let mut pages: Vec<usize> = addrs.iter().map(|&a| a as usize & !(PAGE_SIZE - 1)).collect();
        pages.sort_unstable();
        pages.dedup();
        let mut out_of_memory: Vec<(VmId, usize)> = Vec::new();
        {
            let mut guard = self.lock_for_fault();
            let mut txn = Txn::new(&mut guard, self.remap());
            for addr in pages {
                match resolve_one(&mut txn, addr) {
                    Ok(Resolved::Done) => {}
                    Ok(Resolved::NoFrame(vm)) => {
                        txn.st.count(Counter::CowNoFrame);
                        held.push(addr as u64);
                        if self.commit.mark_out_of_memory(vm) {
                            out_of_memory.push((vm, addr));
                        }
                    }
                    Err(e) => {
                        txn.st.count(Counter::FaultError);
                        tracing::error!("resolving write fault at {addr:#x}: {e}");
                    }
                }
            }
        }
        for (vm, addr) in out_of_memory {
            self.commit.notify_out_of_memory(vm, addr);
        }
    }
}

/// What became of one fault.
enum Resolved {
    /// Resolved (or nothing to do): wake the writer.
    Done,
    /// A copy-on-write of a page of this VM found no free frame: keep the writer blocked.
    NoFrame(VmId),
}

fn resolve_one(t: &mut Txn<'_>, addr: usize) -> Result<Resolved> {
    let Some(m) = t.st.lookup(addr) else {
        return Ok(Resolved::Done);
    };
    let e = t.entry(m)?;
    if !e.flags.contains(PageFlags::PROTECTED) {
        // Make sure the kernel agrees (idempotent).
        t.remap.unprotect(addr, PAGE_SIZE)?;
        t.st.count(Counter::SpuriousFault);
        return Ok(Resolved::Done);
    }
    if t.st.frames().refs(e.frame) > 1 {
        if t.st.pool().buddy().free_frames() == 0 {
            return Ok(Resolved::NoFrame(m.vm));
        }
        t.cow_copy(m)?;
        return Ok(Resolved::Done);
    }
    if e.flags.contains(PageFlags::SHARED) {
        t.reuse(m)?;
        return Ok(Resolved::Done);
    }
    if t.st.on_zero_region(m) {
        if t.st.pool().buddy().free_frames() == 0 {
            return Ok(Resolved::NoFrame(m.vm));
        }
        t.leave_zero_region(m, false)?;
        t.st.count(Counter::ZeroPageFault);
        let cleared = PageFlags::ZERO.with(PageFlags::MERGED_ZERO);
        let flags = t.entry(m)?.flags.without(cleared).with(PageFlags::WRITE_FAULTED);
        t.set_flags(m, flags)?;
        return Ok(Resolved::Done);
    }
    if e.flags.contains(PageFlags::ZERO) {
        t.st.count(Counter::ZeroPageFault);
    } else {
        t.st.count(Counter::ProtectFault);
    }
    t.unprotect_page(m)?;
    let flags = t.entry(m)?.flags.with(PageFlags::WRITE_FAULTED);
    t.set_flags(m, flags)?;
    Ok(Resolved::Done)
}
