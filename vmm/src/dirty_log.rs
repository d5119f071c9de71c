//! KVM dirty logging as the merger's change detector: the pages a guest (or KVM on
//! its behalf) wrote since the last harvest, from `KVM_GET_DIRTY_LOG`.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use memory::merge::DirtyLog;

/// The dirty log of one memslot.
pub struct KvmDirtyLog {
    vm_fd: Arc<VmFd>,
    slot: u32,
    size: usize,
}

impl KvmDirtyLog {
    /// The dirty log of memslot `slot` of `size` bytes (created with
    /// `KVM_MEM_LOG_DIRTY_PAGES`).
    pub fn new(vm_fd: Arc<VmFd>, slot: u32, size: usize) -> Self {
        KvmDirtyLog { vm_fd, slot, size }
    }
}

impl DirtyLog for KvmDirtyLog {
    fn take_dirty(&self, out: &mut Vec<u64>) -> Result<(), String> {
        let bitmap = self
            .vm_fd
            .get_dirty_log(self.slot, self.size)
            .map_err(|e| format!("KVM_GET_DIRTY_LOG of slot {}: {e}", self.slot))?;
        out.extend_from_slice(&bitmap);
        Ok(())
    }
}
