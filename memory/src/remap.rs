//! The remap protocol: the only code that changes which frame backs a guest
//! page, written so that no write from any writer (a thread storing through the
//! guest view, a syscall copying into guest memory, KVM, a vCPU) can land in a
//! shared frame or be lost.
//!
//! Every remap starts with the guest page write-protected (callers use
//! [`RemapProtocol::protect`] before comparing or copying through the alias), so
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

/// Remaps guest pages to pool frames without ever exposing a shared frame.
pub struct RemapProtocol<'a> {
    uffd: &'a Uffd,
    memfd: RawFd,
    huge_pages: bool,
}

impl<'a> RemapProtocol<'a> {
    /// A protocol over `uffd` mapping frames of the pool memfd `memfd`;
    /// `huge_pages` asks for `MADV_HUGEPAGE` on new mappings (so they keep the
    /// same VMA flags as their neighbours and can merge with them).
    pub fn new(uffd: &'a Uffd, memfd: RawFd, huge_pages: bool) -> Self {
        RemapProtocol { uffd, memfd, huge_pages }
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
        let _in_flight = InFlight::begin(addr, len);
        let offset = FramePool::offset_of(frame);
        // SAFETY: the caller owns the range (function contract).
        unsafe { sys::map_shared_fixed(addr, self.memfd, offset, len, libc::PROT_READ) }
            .map_err(|e| Error::Map(frame, addr, e))?;
        self.advise(addr, len);
        self.uffd.register_wp(addr, len)?;
        self.uffd.write_protect(addr, len, true, false)?;
        sys::protect(addr, len, libc::PROT_READ | libc::PROT_WRITE).map_err(|e| Error::Protect(addr, e))?;
        Ok(())
    }

    fn advise(&self, addr: usize, len: usize) {
        if self.huge_pages {
            if let Err(e) = sys::advise(addr, len, libc::MADV_HUGEPAGE) {
                tracing::debug!("MADV_HUGEPAGE at {addr:#x}: {e}");
            }
        }
    }
}
