//! Resolution of write faults on protected guest pages (runs on the
//! Protector's handler thread, which reads the faults before and wakes the
//! writers after: see [`crate::protector`]).
//!
//! Under the manager's lock (so any merge or migration of the page has finished):
//! - page not protected (any more): make sure it is not;
//! - frame mapped by more than one guest page: **copy** to a new frame, remap
//!   the page to it (registered, not protected), drop one reference;
//! - only mapping of a merged frame: **reuse** it in place (no copy);
//! - only mapping of a discarded (zero) page, or an explicitly protected page:
//!   remove protection, record the write.
//!
//! A resolution that fails is logged (`tracing::error!`) and counted
//! (`fault_errors`); the writer is woken anyway, retries and faults again.

use super::counters::Counter;
use super::error::Result;
use super::txn::Txn;
use std::sync::Arc;

use super::Core;
use crate::page_table::PageFlags;
use crate::PAGE_SIZE;

impl Core {
    /// The Protector's resolver callback over this core: resolves a batch of
    /// faulting pages (the Protector wakes their writers afterwards).
    pub(crate) fn fault_resolver(self: &Arc<Self>) -> impl FnMut(&[u64]) + Send + 'static {
        let core = self.clone();
        move |pages| core.resolve_faults(pages)
    }

    /// Resolves a batch of write faults (their writers stay blocked until woken).
    pub(crate) fn resolve_faults(&self, addrs: &[u64]) {
        let mut pages: Vec<usize> = addrs.iter().map(|&a| a as usize & !(PAGE_SIZE - 1)).collect();
        pages.sort_unstable();
        pages.dedup();
        let mut guard = self.lock_for_fault();
        let mut txn = Txn::new(&mut guard, self.remap());
        for addr in pages {
            if let Err(e) = resolve_one(&mut txn, addr) {
                txn.st.count(Counter::FaultError);
                tracing::error!("resolving write fault at {addr:#x}: {e}");
            }
        }
    }
}

fn resolve_one(t: &mut Txn<'_>, addr: usize) -> Result<()> {
    let Some(m) = t.st.lookup(addr) else {
        return Ok(());
    };
    let e = t.entry(m)?;
    if !e.flags.contains(PageFlags::PROTECTED) {
        // Make sure the kernel agrees (idempotent).
        t.remap.unprotect(addr, PAGE_SIZE)?;
        t.st.count(Counter::SpuriousFault);
        return Ok(());
    }
    if t.st.frames().refs(e.frame) > 1 {
        return t.cow_copy(m);
    }
    if e.flags.contains(PageFlags::SHARED) {
        return t.reuse(m);
    }
    if e.flags.contains(PageFlags::ZERO) {
        t.st.count(Counter::ZeroPageFault);
    } else {
        t.st.count(Counter::ProtectFault);
    }
    t.unprotect_page(m)?;
    let flags = t.entry(m)?.flags.with(PageFlags::WRITE_FAULTED);
    t.set_flags(m, flags)
}
