//! Resolution of write faults on protected guest pages (runs on the
//! Protector's resolver thread).
//!
//! Under the manager's lock (so any merge or migration of the page has finished):
//! - page not protected (any more): make sure it is not, wake;
//! - frame mapped by more than one guest page: **copy** to a new frame, remap
//!   the page to it (registered, not protected), drop one reference, wake;
//! - only mapping of a merged frame: **reuse** it in place (no copy), wake;
//! - only mapping of a discarded (zero) page, or an explicitly protected page:
//!   remove protection, record the write, wake.

use super::counters::Counter;
use super::error::Result;
use super::txn::Txn;
use super::Core;
use crate::page_table::PageFlags;
use crate::PAGE_SIZE;

impl Core {
    /// Resolves a batch of write faults and wakes their writers.
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
            // Wake even after an error: the writer retries and faults again.
            if let Err(e) = self.uffd.wake(addr, PAGE_SIZE) {
                tracing::error!("waking writers at {addr:#x}: {e}");
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
