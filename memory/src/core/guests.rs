//! Guest creation and destruction (`impl Core`).
//!
//! ## Frames are allocated up front
//!
//! `create_guest` allocates every frame of the VM at once, in blocks of the
//! largest order available (2 MiB frames when the pool has them), and maps each
//! run of consecutive frames with one `mmap`. An allocated but never written
//! memfd frame costs no host memory, so this is cheap, keeps the VM at one or a
//! few VMAs, and first touches are ordinary shmem faults that never reach the
//! userfaultfd handler (lazy allocation would need a missing-page handler on
//! every first touch and would scatter the VM over many VMAs). The price is pool
//! capacity (address space, not memory).
//!
//! ## Admission on committed memory
//!
//! A VM is admitted against the *committed* guest memory of all VMs (their
//! whole sizes), never against free frames, which merging inflates: see
//! [`super::commit`]. Without overcommit (the default) the pool is at least as
//! large as all guests together, which guarantees that a copy-on-write always
//! finds a free frame (live frames never outnumber guest pages).

use super::error::{Error, Result};
use super::{Core, State};
use crate::page_table::PageTable;
use crate::pool::FramePool;
use crate::{sys, FrameNo, VmId, HUGE_FRAME_SIZE, MAX_ORDER, PAGE_SIZE};

impl Core {
    /// Creates VM `vm`'s guest RAM of `size` bytes; returns its host address.
    pub(crate) fn create_guest(&self, vm: VmId, size: u64) -> Result<usize> {
        if size == 0 || size & (PAGE_SIZE as u64 - 1) != 0 {
            return Err(Error::BadSize(size));
        }
        let pages = size / PAGE_SIZE as u64;
        let mut st = self.lock();
        if st.has_vm(vm) {
            return Err(Error::VmExists(vm));
        }
        let (total, free) = (st.pool().buddy().total_frames(), st.pool().buddy().free_frames());
        self.commit.policy().admit(total, free, committed_pages(&st), pages)?;
        if free < pages || pages > u64::from(u32::MAX) {
            return Err(Error::PoolFull { free, needed: pages });
        }
        // Largest blocks first: 2 MiB frames when available.
        let mut frames: Vec<FrameNo> = Vec::with_capacity(pages as usize);
        while (frames.len() as u64) < pages {
            let remaining = pages - frames.len() as u64;
            let mut order = (63 - remaining.leading_zeros()).min(u32::from(MAX_ORDER)) as u8;
            let start = loop {
                match st.alloc(order) {
                    Ok(f) => break f,
                    Err(_) if order > 0 => order -= 1,
                    Err(e) => {
                        st.free_unmapped_frames(&mut frames)?;
                        return Err(e);
                    }
                }
            };
            frames.extend(start..start + (1 << order));
        }
        let len = size as usize;
        let host = match sys::reserve(len, HUGE_FRAME_SIZE) {
            Ok(h) => h,
            Err(e) => {
                st.free_unmapped_frames(&mut frames)?;
                return Err(Error::Mapping(e));
            }
        };
        if let Err(e) = self.realize(host, &frames) {
            // SAFETY: `host..host+len` is the reservation made above, used by nobody.
            let _ = unsafe { sys::unmap(host, len) };
            st.free_unmapped_frames(&mut frames)?;
            return Err(e);
        }
        if let Err(e) = crate::write_retry::add_range(host, len) {
            // SAFETY: `host..host+len` is the reservation made above, known to no table.
            let _ = unsafe { sys::unmap(host, len) };
            st.free_unmapped_frames(&mut frames)?;
            return Err(Error::TooManyGuests(e));
        }
        st.add_guest(PageTable::new(vm, host, &frames));
        Ok(host)
    }

    /// Maps each run of consecutive frames with one call, then registers the range.
    fn realize(&self, host: usize, frames: &[FrameNo]) -> Result<()> {
        let mut start = 0;
        while start < frames.len() {
            let mut end = start + 1;
            while end < frames.len() && frames[end] == frames[end - 1] + 1 {
                end += 1;
            }
            let addr = host + start * PAGE_SIZE;
            let len = (end - start) * PAGE_SIZE;
            let offset = FramePool::offset_of(frames[start]);
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            // SAFETY: `addr..addr+len` lies inside the reservation made by our caller.
            unsafe { sys::map_shared_fixed(addr, self.memfd, offset, len, prot) }.map_err(Error::Mapping)?;
            if self.huge_pages {
                let _ = sys::advise(addr, len, libc::MADV_HUGEPAGE);
            }
            start = end;
        }
        self.uffd.register_wp(host, frames.len() * PAGE_SIZE).map_err(Error::from)
    }

    /// Destroys VM `vm`: forgets it, wakes its blocked writers, unmaps its RAM
    /// and drops its frame references.
    pub(crate) fn destroy_guest(&self, vm: VmId) -> Result<()> {
        let mut st = self.lock();
        let table = st.remove_guest(vm)?;
        self.commit.forget(vm);
        self.dirty_logs.lock().unwrap_or_else(|e| e.into_inner()).remove(&vm);
        self.vcpu_gates.lock().unwrap_or_else(|e| e.into_inner()).remove(&vm);
        crate::write_retry::remove_range(table.host_addr());
        let len = table.len() as usize * PAGE_SIZE;
        if let Err(e) = self.uffd.wake(table.host_addr(), len) {
            tracing::warn!("waking writers of VM {vm}: {e}");
        }
        // SAFETY: the range is this VM's guest RAM, now removed from every table;
        // the VM's owner is dropping its handle.
        unsafe { sys::unmap(table.host_addr(), len) }.map_err(Error::Mapping)?;
        st.release_guest_frames(&table)
    }
}

/// Guest pages committed: the sizes of every VM (merged or not).
pub(crate) fn committed_pages(st: &State) -> u64 {
    st.tables().map(|(_, t)| u64::from(t.len())).sum()
}
