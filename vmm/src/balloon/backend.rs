//! The balloon's backend over a VM's guest RAM: inflated and reported pages
//! are discarded (batched, through the memory manager, or `madvise` for
//! anonymous RAM) and the bytes returned to the host are counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::virtio::balloon::pages::Range;
use devices::virtio::balloon::{BackendError, BalloonBackend};
use memory::{MemoryManager, PAGE_SIZE};

/// Where discarded guest pages go.
#[derive(Clone)]
pub enum BackendMemory {
    /// Guest RAM of the memory manager: batched discard of the VM's pages.
    Managed(Arc<MemoryManager>, memory::VmId),
    /// Anonymous guest RAM at this host address and size: `madvise(MADV_DONTNEED)`.
    Anonymous {
        /// Host address of guest-physical 0.
        host_addr: usize,
        /// Size in bytes.
        size: u64,
    },
}

/// The balloon's backend over the VM's guest RAM. Reclaim does nothing: a
/// discarded page gets a frame back on its next write (or read).
pub struct MemoryBackend {
    memory: BackendMemory,
    returned: Arc<AtomicU64>,
}

impl MemoryBackend {
    /// A backend over `memory`; bytes returned to the host are added to `returned`.
    pub fn new(memory: BackendMemory, returned: Arc<AtomicU64>) -> Self {
        MemoryBackend { memory, returned }
    }

    fn discard_one(&self, (start, len): Range) -> Result<u64, BackendError> {
        let page = PAGE_SIZE as u64;
        match &self.memory {
            BackendMemory::Managed(mgr, vm) => {
                let first = u32::try_from(start.0 / page).map_err(|_| BackendError(format!("{start:?} too high")))?;
                let count = u32::try_from(len / page).map_err(|_| BackendError(format!("{len} bytes too many")))?;
                let report = mgr.discard_range(*vm, first, count).map_err(|e| BackendError(e.to_string()))?;
                Ok(report.backed * page)
            }
            BackendMemory::Anonymous { host_addr, size } => {
                if start.0.checked_add(len).is_none_or(|end| end > *size) {
                    return Err(BackendError(format!("range {:#x}+{len:#x} outside guest RAM", start.0)));
                }
                let addr = (*host_addr as u64 + start.0) as *mut libc::c_void;
                // SAFETY: the range lies inside the VM's anonymous guest RAM mapping
                // (checked above), which lives as long as the VM; the guest gave
                // these pages up, so dropping their content is what it asked for.
                let rc = unsafe { libc::madvise(addr, len as usize, libc::MADV_DONTNEED) };
                if rc != 0 {
                    return Err(BackendError(format!("madvise: {}", std::io::Error::last_os_error())));
                }
                Ok(len)
            }
        }
    }
}

impl BalloonBackend for MemoryBackend {
    fn discard(&mut self, ranges: &[Range]) -> Result<(), BackendError> {
        for &r in ranges {
            let bytes = self.discard_one(r)?;
            self.returned.fetch_add(bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    fn reclaim(&mut self, _ranges: &[Range]) -> Result<(), BackendError> {
        Ok(())
    }
}
