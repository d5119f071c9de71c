//! [`GuestMap`]: the handle of one VM's guest RAM.
//!
//! The RAM is the host range `host_addr()..host_addr()+size()`, to be given to
//! KVM as a memslot and used by vCPUs. **VMM code must not store into that range
//! directly**: it writes guest memory with [`GuestMap::write_bytes`], which breaks
//! sharing of the touched pages under the manager's lock and writes through the
//! alias, so a device write can never hit a page in the middle of a remap or
//! land in a shared frame; it also records the page as device-written (for
//! change detection). Reads may use [`GuestMap::read_bytes`] (or the range, which
//! is always readable).
//!
//! A handle comes from [`MemoryManager::create_guest`] (defined here, with the
//! handle it returns: the manager facade does not know this type) and its drop
//! destroys the VM.

use std::sync::Arc;

use crate::manager::{MemoryManager, MergeOutcome, Result};
use crate::page_table::PageFlags;
use crate::{FrameNo, VmId, PAGE_SIZE};

/// One VM's guest RAM; destroyed (frames returned) on drop.
pub struct GuestMap {
    manager: Arc<MemoryManager>,
    vm: VmId,
    host_addr: usize,
    size: usize,
}

impl MemoryManager {
    /// Creates VM `vm`'s guest RAM of `size_bytes` (all frames allocated up front,
    /// registered for write protection). The VM lives until the handle drops.
    pub fn create_guest(self: &Arc<Self>, vm: VmId, size_bytes: u64) -> Result<GuestMap> {
        let host_addr = self.core().create_guest(vm, size_bytes)?;
        Ok(GuestMap { manager: self.clone(), vm, host_addr, size: size_bytes as usize })
    }
}

impl GuestMap {
    /// The VM's id.
    pub fn vm_id(&self) -> VmId {
        self.vm
    }

    /// Start of the guest RAM in this process (2 MiB aligned).
    pub fn host_addr(&self) -> usize {
        self.host_addr
    }

    /// Size of the guest RAM in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Number of 4 KiB guest pages.
    pub fn pages(&self) -> u32 {
        (self.size / PAGE_SIZE) as u32
    }

    /// Host address of guest page `page` (for tests and for KVM setup).
    pub fn page_addr(&self, page: u32) -> Option<usize> {
        (page < self.pages()).then(|| self.host_addr + page as usize * PAGE_SIZE)
    }

    /// The manager owning this VM.
    pub fn manager(&self) -> &Arc<MemoryManager> {
        &self.manager
    }

    /// Writes `data` at guest-physical address `gpa` (device path; see module docs).
    pub fn write_bytes(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.manager.core().write_bytes(self.vm, gpa, data)
    }

    /// Reads guest-physical `gpa..gpa+buf.len()` into `buf` through the alias.
    pub fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.manager.core().read_bytes(self.vm, gpa, buf)
    }

    /// Pages written through [`GuestMap::write_bytes`] since the last call.
    pub fn take_device_written(&self) -> Result<Vec<u32>> {
        self.manager.core().take_flagged(self.vm, PageFlags::DEVICE_WRITTEN)
    }

    /// Pages whose explicit write protection was hit by a write since the last call.
    pub fn take_write_faulted(&self) -> Result<Vec<u32>> {
        self.manager.core().take_flagged(self.vm, PageFlags::WRITE_FAULTED)
    }

    /// The frame backing `page`.
    pub fn frame_of(&self, page: u32) -> Result<FrameNo> {
        self.manager.frame_of(self.vm, page)
    }

    /// Flags of `page`.
    pub fn page_flags(&self, page: u32) -> Result<PageFlags> {
        self.manager.page_flags(self.vm, page)
    }

    /// See [`MemoryManager::share`].
    pub fn share(&self, page: u32, frame: FrameNo) -> Result<MergeOutcome> {
        self.manager.share(self.vm, page, frame)
    }

    /// See [`MemoryManager::unshare`].
    pub fn unshare(&self, page: u32) -> Result<bool> {
        self.manager.unshare(self.vm, page)
    }

    /// See [`MemoryManager::discard`].
    pub fn discard(&self, page: u32) -> Result<()> {
        self.manager.discard(self.vm, page)
    }

    /// See [`MemoryManager::protect`].
    pub fn protect(&self, page: u32) -> Result<()> {
        self.manager.protect(self.vm, page)
    }

    /// See [`MemoryManager::unprotect`].
    pub fn unprotect(&self, page: u32) -> Result<()> {
        self.manager.unprotect(self.vm, page)
    }
}

impl Drop for GuestMap {
    fn drop(&mut self) {
        if let Err(e) = self.manager.destroy_guest(self.vm) {
            tracing::error!("destroying guest RAM of VM {}: {e}", self.vm);
        }
    }
}
