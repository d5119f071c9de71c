//! The remap protocol: the only code that changes which frame backs a guest
//! page, written so that no write from any writer (a thread storing through the
//! guest view, a syscall copying into guest memory, KVM, a vCPU) can land in a
//! shared frame or be lost.
//!
//! Every remap starts with the guest page write-protected (callers use
//! [`RemapProtocol::protect`] before comparing or copying), so
//! writers block in the userfaultfd handler until the manager's lock is free.
//! Then one of two endings:
//!
//! - [`RemapProtocol::remap_private`] — the new frame belongs to this page alone
//!   and the page ends unprotected (copy-on-write copy, migration of a private
//!   page): `mmap(MAP_FIXED)` the new frame read-write, then re-register it (a
//!   fresh mapping has lost the registration). A write in between lands in the
//!   new private frame, which already holds the final content: correct, and
//!   there is no read-only instant.
//! - [`RemapProtocol::remap_protected`] — the page must end write-protected (it
//!   maps a shared frame, or was protected): `mmap(MAP_FIXED)` the new frame
//!   **read-only**, register it, write-protect it, then `mprotect` it read-write
//!   (write protection survives `mprotect`). No write can land in the frame
//!   before it is protected. In the read-only instant a vCPU gets `EFAULT` from
//!   `KVM_RUN` (the vCPU loop re-enters), a syscall writing the page gets
//!   `EFAULT` (callers retry), and a host thread's store gets SIGSEGV, which
//!   [`crate::write_retry`] turns into a wait-and-retry.
//!
//! Batched forms for many ranges under one hold of the manager's lock (the
//! merger's runs, compaction's runs): [`RemapProtocol::map_read_only`] (the
//! first half of `remap_protected`) and [`RemapProtocol::map_private`]
//! (`remap_private` with its registration deferred), then one
//! [`RemapProtocol::finish`] that registers each VM's span once, write-protects
//! the read-only ranges and makes them writable with one `mprotect` (once a
//! step of any batch has failed and may have left a range read-only: one per
//! stretch of ranges finished together, never over a gap). Deferring a
//! private range's registration is safe for the same reason `remap_private` is:
//! its frame is the page's alone and already final, so a write before the
//! registration lands where it belongs; the caller only must not try to
//! write-protect the range before `finish` (nothing in the same lock hold does).
//!
//! Why not the alternative without a read-only instant (prepare the mapping at
//! a scratch address, registered and protected, and `mremap` it into place with
//! `UFFD_FEATURE_EVENT_REMAP`)? It works on this kernel (the registration follows
//! the move; test `uffd_kernel::mremap_keeps_registration_with_event_remap`), but
//! `mremap` then blocks until the userfaultfd reader has read the remap event,
//! and the only reader is the fault-handler thread, which itself waits for the
//! manager's lock that the remapper holds: it would need a second reader or
//! lock-free event draining. The read-only instant is covered for every writer
//! (see above), so densevm keeps the simpler protocol.
//!
//! Neither ending wakes blocked writers: the fault resolver does, once it holds
//! the manager's lock and sees the final state.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::pool::FramePool;
use crate::uffd::{self, Uffd};
use crate::write_retry::InFlight;
use crate::{sys, FrameNo};

/// Errors of the remap protocol.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A userfaultfd operation failed.
    #[error(transparent)]
    Uffd(#[from] uffd::Error),
    /// Mapping the new frame failed.
    #[error("mapping frame {0} at {1:#x}: {2}")]
    Map(FrameNo, usize, io::Error),
    /// Making the new mapping writable failed (it stays read-only).
    #[error("mprotect {0:#x}: {1}")]
    Protect(usize, io::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Most ranges kept in the read-only instant by [`RemapProtocol::map_read_only`]
/// before they must be finished: bounds that instant (about one `mmap` per
/// range) and the in-flight slots of [`crate::write_retry`] taken.
pub const MAX_PENDING_RANGES: usize = 16;

/// Most ranges of any kind waiting in one [`PendingRemaps`] (private ranges
/// have no read-only instant; this bounds the batch's bookkeeping only).
pub const MAX_PENDING_ALL: usize = 128;

/// One range remapped and waiting for [`RemapProtocol::finish`].
struct PendingRange {
    group: u64,
    addr: usize,
    len: usize,
    /// Mapped read-only (to end write-protected); `None`: mapped read-write,
    /// private, only its registration is pending.
    in_flight: Option<InFlight>,
}

/// Guest ranges remapped and waiting for registration (and, for the
/// read-only ones, protection; see [`RemapProtocol::map_read_only`] and
/// [`RemapProtocol::map_private`]).
#[derive(Default)]
pub struct PendingRemaps {
    ranges: Vec<PendingRange>,
    read_only: usize,
}

impl PendingRemaps {
    /// Whether no range is waiting.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether the batch must be finished before another range is added.
    pub fn is_full(&self) -> bool {
        self.read_only >= MAX_PENDING_RANGES || self.ranges.len() >= MAX_PENDING_ALL
    }
}

/// Remaps guest pages to pool frames without ever exposing a shared frame.
pub struct RemapProtocol<'a> {
    uffd: &'a Uffd,
    memfd: RawFd,
    huge_pages: bool,
    /// Set once a step failed and may have left a range read-only.
    failed: &'a AtomicBool,
}

impl<'a> RemapProtocol<'a> {
    /// A protocol over `uffd` mapping frames of the pool memfd `memfd`;
    /// `huge_pages` asks for `MADV_HUGEPAGE` on new mappings (so they keep the
    /// same VMA flags as their neighbours and can merge with them). `failed`
    /// is the mark, kept by the owner of the guest ranges across protocols,
    /// that a step failed and may have left a range read-only; it is set here.
    pub fn new(uffd: &'a Uffd, memfd: RawFd, huge_pages: bool, failed: &'a AtomicBool) -> Self {
        RemapProtocol { uffd, memfd, huge_pages, failed }
    }

    /// Write-protects `addr..addr+len` (writers block from now on).
    pub fn protect(&self, addr: usize, len: usize) -> Result<()> {
        Ok(self.uffd.write_protect(addr, len, true, false)?)
    }

    /// Removes write protection from `addr..addr+len` without waking waiters.
    pub fn unprotect(&self, addr: usize, len: usize) -> Result<()> {
        Ok(self.uffd.write_protect(addr, len, false, false)?)
    }

    /// Maps `len` bytes of frames from `frame` at `addr`, registered and not
    /// protected.
    ///
    /// # Safety
    ///
    /// `addr..addr+len` must be (part of) a guest range owned by the caller,
    /// currently write-protected, and the new frames must be reachable by no
    /// other guest page and already hold the page's final content.
    pub unsafe fn remap_private(&self, addr: usize, len: usize, frame: FrameNo) -> Result<()> {
        let offset = FramePool::offset_of(frame);
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: the caller owns the range (function contract).
        unsafe { sys::map_shared_fixed(addr, self.memfd, offset, len, prot) }
            .map_err(|e| Error::Map(frame, addr, e))?;
        self.advise(addr, len);
        self.uffd.register_wp(addr, len)?;
        Ok(())
    }

    /// Maps `len` bytes of frames from `frame` at `addr`, registered and
    /// write-protected; no write can reach the frames before they are protected.
    ///
    /// # Safety
    ///
    /// `addr..addr+len` must be (part of) a guest range owned by the caller and
    /// currently write-protected.
    pub unsafe fn remap_protected(&self, addr: usize, len: usize, frame: FrameNo) -> Result<()> {
        // A batch of one range: the same steps, finished at once.
        let mut pending = PendingRemaps::default();
        // SAFETY: the caller's contract is this function's.
        unsafe { self.map_read_only(&mut pending, 0, addr, len, frame) }?;
        self.finish(&mut pending)
    }

    /// The first half of [`RemapProtocol::remap_protected`], for many ranges at
    /// once: maps `len` bytes of frames from `frame` at `addr` **read-only** and
    /// records the range in `pending` under `group` (ranges of one group must lie
    /// in one registered guest range). [`RemapProtocol::finish`] then registers,
    /// write-protects and re-enables writes for every pending range with one
    /// registration and one `mprotect` per group instead of one per range: the
    /// `mmap_lock` is taken for writing about once per range instead of three
    /// times. Until then the ranges are in the read-only instant (see the module
    /// documentation: every writer waits or retries), so callers finish once
    /// [`PendingRemaps::is_full`] and before they release the manager's lock.
    ///
    /// # Safety
    ///
    /// As [`RemapProtocol::remap_protected`].
    pub unsafe fn map_read_only(
        &self,
        pending: &mut PendingRemaps,
        group: u64,
        addr: usize,
        len: usize,
        frame: FrameNo,
    ) -> Result<()> {
        let in_flight = InFlight::begin(addr, len);
        let offset = FramePool::offset_of(frame);
        // SAFETY: the caller owns the range (function contract).
        unsafe { sys::map_shared_fixed(addr, self.memfd, offset, len, libc::PROT_READ) }
            .map_err(|e| Error::Map(frame, addr, e))?;
        self.advise(addr, len);
        pending.ranges.push(PendingRange { group, addr, len, in_flight: Some(in_flight) });
        pending.read_only += 1;
        Ok(())
    }

    /// [`RemapProtocol::remap_private`] with the registration deferred to
    /// [`RemapProtocol::finish`] (one registration per group for the whole
    /// batch): maps `len` bytes of frames from `frame` at `addr` read-write now.
    /// Until the registration a write lands in the new frames (which already
    /// hold the final content, as with `remap_private`) and the range cannot be
    /// write-protected; callers change nothing else in the range before
    /// [`RemapProtocol::finish`], which runs before the manager's lock is released.
    ///
    /// # Safety
    ///
    /// As [`RemapProtocol::remap_private`].
    pub unsafe fn map_private(
        &self,
        pending: &mut PendingRemaps,
        group: u64,
        addr: usize,
        len: usize,
        frame: FrameNo,
    ) -> Result<()> {
        let offset = FramePool::offset_of(frame);
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: the caller owns the range (function contract).
        unsafe { sys::map_shared_fixed(addr, self.memfd, offset, len, prot) }
            .map_err(|e| Error::Map(frame, addr, e))?;
        self.advise(addr, len);
        pending.ranges.push(PendingRange { group, addr, len, in_flight: None });
        Ok(())
    }

    /// Registers, write-protects and makes writable every range of `pending`
    /// (emptied). A range is made writable only once it is registered and
    /// protected: after a failed step it stays read-only (writers wait or retry,
    /// none reaches the frame) and the first error is returned.
    pub fn finish(&self, pending: &mut PendingRemaps) -> Result<()> {
        let mut ranges = std::mem::take(&mut pending.ranges);
        pending.read_only = 0;
        ranges.sort_unstable_by_key(|r| (r.group, r.addr));
        let mut first_error = None;
        for group in ranges.chunk_by(|a, b| a.group == b.group) {
            if let Err(e) = self.finish_group(group) {
                first_error.get_or_insert(e);
            }
        }
        // The in-flight marks drop here, after the pages became writable.
        drop(ranges);
        first_error.map_or(Ok(()), Err)
    }

    /// [`RemapProtocol::finish`] for the ranges of one guest range.
    ///
    /// Only stretches of ranges that were registered and protected here are
    /// made writable. The pages between them are read-write already, unless a
    /// failed step (now or in an earlier batch) left a range read-only: once
    /// that happened ([`RemapProtocol::failed`]) gaps are never covered, so such
    /// a range stays read-only instead of becoming writable unprotected.
    fn finish_group(&self, group: &[PendingRange]) -> Result<()> {
        let start = group[0].addr;
        let end = group.iter().map(|r| r.addr + r.len).max().unwrap_or(start);
        // Ranges already registered in the span are left as they are.
        if let Err(e) = self.uffd.register_wp(start, end - start) {
            self.failed.store(true, Ordering::Release);
            return Err(e.into());
        }
        if group.iter().all(|r| r.in_flight.is_none()) {
            return Ok(());
        }
        let protected: Vec<Option<Result<()>>> =
            group.iter().map(|r| r.in_flight.as_ref().map(|_| self.protect_pending(r))).collect();
        if protected.iter().any(|p| matches!(p, Some(Err(_)))) {
            self.failed.store(true, Ordering::Release);
        }
        let join_gaps = !self.failed.load(Ordering::Acquire);
        let mut first_error = None;
        let mut stretch: Option<(usize, usize)> = None;
        let flush = |stretch: Option<(usize, usize)>, first_error: &mut Option<Error>| {
            if let Some((s, e)) = stretch {
                if let Err(err) = sys::protect(s, e - s, libc::PROT_READ | libc::PROT_WRITE) {
                    first_error.get_or_insert(Error::Protect(s, err));
                }
            }
        };
        for (r, p) in group.iter().zip(protected) {
            let r_end = r.addr + r.len;
            match p {
                Some(Ok(())) => match stretch {
                    Some((s, e)) if join_gaps || e >= r.addr => stretch = Some((s, e.max(r_end))),
                    other => {
                        flush(other, &mut first_error);
                        stretch = Some((r.addr, r_end));
                    }
                },
                // A private range of this batch is read-write: it may link two
                // stretches it touches.
                None => {
                    if let Some((s, e)) = stretch.filter(|&(_, e)| e >= r.addr) {
                        stretch = Some((s, e.max(r_end)));
                    }
                }
                Some(Err(e)) => {
                    flush(stretch.take(), &mut first_error);
                    first_error.get_or_insert(e);
                }
            }
        }
        flush(stretch, &mut first_error);
        first_error.map_or(Ok(()), Err)
    }

    /// Write-protects the pending read-only range `r`.
    fn protect_pending(&self, r: &PendingRange) -> Result<()> {
        #[cfg(test)]
        if tests::inject::fails(r.addr) {
            let err = io::Error::from_raw_os_error(libc::EIO);
            return Err(uffd::Error::WriteProtect(r.addr as u64, r.len as u64, err).into());
        }
        Ok(self.uffd.write_protect(r.addr, r.len, true, false)?)
    }

    /// Whether a step of some batch failed (see [`RemapProtocol::finish_group`]).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Fills the page table entries of `addr..addr+len`, mapped by
    /// [`RemapProtocol::map_private`] (`write`: writable) or
    /// [`RemapProtocol::map_read_only`] (read-only) in this lock hold, so that
    /// the guest's next access finds them (KVM's lockless `get_user_pages`
    /// fast path) instead of faulting the page in through the `mmap_lock`.
    /// Changes no content. Must run before [`RemapProtocol::finish`]: a
    /// writable fill of a registered, write-protected range would wait for the
    /// fault handler, which waits for the manager's lock. A failure only
    /// leaves the entries to be filled on access (logged).
    pub fn populate(&self, addr: usize, len: usize, write: bool) {
        let advice = if write { libc::MADV_POPULATE_WRITE } else { libc::MADV_POPULATE_READ };
        // SAFETY: the range is a guest range this protocol just mapped onto pool
        // frames (caller's contract); populating only installs page table
        // entries for pages that exist, changing no memory content, and an
        // invalid range yields an error, not undefined behaviour.
        let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
        if rc != 0 {
            tracing::debug!("populating {addr:#x}+{len:#x}: {}", io::Error::last_os_error());
        }
    }

    fn advise(&self, addr: usize, len: usize) {
        if self.huge_pages {
            if let Err(e) = sys::advise(addr, len, libc::MADV_HUGEPAGE) {
                tracing::debug!("MADV_HUGEPAGE at {addr:#x}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
