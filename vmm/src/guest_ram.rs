//! A VM's guest RAM: one host range seen by KVM through a memslot and by densevm
//! through vm-memory's `GuestMemory`.
//!
//! This is the seam to the memory manager: the VMM asks a `GuestRam` for its host
//! range and its `GuestMemory` view, never how frames are laid out behind it.
//! - [`RamBacking::Managed`]: frames from densevm's memory manager (the default:
//!   write protection, merging, compaction).
//! - [`RamBacking::Anonymous`]: private anonymous memory, optionally
//!   `MADV_MERGEABLE` for the kernel's KSM (the baseline of the benchmarks).

use std::sync::Arc;

use memory::{GuestMap, MemoryManager};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Largest guest RAM densevm accepts (MiB).
pub const MAX_MEM_MIB: u64 = 64 * 1024;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The memory manager refused.
    #[error("memory manager: {0}")]
    Manager(#[from] memory::manager::Error),
    /// Mapping failed.
    #[error("mapping guest RAM: {0}")]
    Mmap(String),
    /// madvise failed.
    #[error("madvise(MADV_MERGEABLE): {0}")]
    Madvise(std::io::Error),
    /// Bad size.
    #[error("guest RAM must be 1..={MAX_MEM_MIB} MiB, got {0} MiB")]
    Size(u64),
}

/// How a VM's RAM is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub enum RamPolicy {
    /// densevm's memory manager.
    #[default]
    Managed,
    /// Private anonymous memory; `mergeable` marks it `MADV_MERGEABLE` for KSM.
    Anonymous {
        /// Offer the range to the kernel's KSM.
        mergeable: bool,
    },
}

enum RamBacking {
    Managed(GuestMap),
    Anonymous,
}

/// Guest RAM of one VM, at guest-physical address 0.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    // Dropped after `memory` (declaration order): the view never outlives the range.
    backing: RamBacking,
    size: u64,
    host_addr: u64,
}

fn check_size(mem_mib: u64) -> Result<u64, Error> {
    if mem_mib == 0 || mem_mib > MAX_MEM_MIB {
        return Err(Error::Size(mem_mib));
    }
    Ok(mem_mib << 20)
}

fn single_region(region: MmapRegion) -> Result<GuestMemoryMmap, Error> {
    let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or_else(|| Error::Mmap("region overflows".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| Error::Mmap(e.to_string()))
}

impl GuestRam {
    /// Creates RAM of `mem_mib` MiB for VM `vm` under `policy`.
    pub fn new(manager: &Arc<MemoryManager>, vm: u32, mem_mib: u64, policy: RamPolicy) -> Result<Self, Error> {
        match policy {
            RamPolicy::Managed => Self::new_managed(manager, vm, mem_mib),
            RamPolicy::Anonymous { mergeable } => Self::new_anonymous(mem_mib, mergeable),
        }
    }

    /// RAM whose frames come from the memory manager.
    pub fn new_managed(manager: &Arc<MemoryManager>, vm: u32, mem_mib: u64) -> Result<Self, Error> {
        let size = check_size(mem_mib)?;
        let map = manager.create_guest(vm, size)?;
        let host_addr = map.host_addr() as u64;
        // SAFETY: the range [host_addr, host_addr+size) is mapped read-write by the
        // memory manager for as long as `map` lives; `map` is stored in `backing`,
        // which is dropped after `memory`. build_raw does not take ownership (no
        // munmap on drop).
        let region = unsafe {
            MmapRegion::build_raw(
                map.host_addr() as *mut u8,
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .map_err(|e| Error::Mmap(e.to_string()))?;
        Ok(GuestRam { memory: single_region(region)?, backing: RamBacking::Managed(map), size, host_addr })
    }

    /// Private anonymous RAM, optionally offered to KSM.
    pub fn new_anonymous(mem_mib: u64, mergeable: bool) -> Result<Self, Error> {
        let size = check_size(mem_mib)?;
        let region = MmapRegion::new(size as usize).map_err(|e| Error::Mmap(e.to_string()))?;
        let host_addr = region.as_ptr() as u64;
        if mergeable {
            // SAFETY: madvise on a mapping we own, with its exact bounds; it changes no
            // memory contents.
            let rc = unsafe { libc::madvise(region.as_ptr().cast(), size as usize, libc::MADV_MERGEABLE) };
            if rc != 0 {
                return Err(Error::Madvise(std::io::Error::last_os_error()));
            }
        }
        Ok(GuestRam { memory: single_region(region)?, backing: RamBacking::Anonymous, size, host_addr })
    }

    /// densevm's view of the RAM (reads, and writes before the VM runs).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The memory manager's map of this RAM, when managed.
    pub fn guest_map(&self) -> Option<&GuestMap> {
        match &self.backing {
            RamBacking::Managed(m) => Some(m),
            RamBacking::Anonymous => None,
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host virtual address of guest-physical 0 (for the KVM memslot).
    pub fn host_addr(&self) -> u64 {
        self.host_addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memory::ManagerConfig;
    use vm_memory::Bytes;

    #[test]
    fn anonymous_ram_reads_back_writes() {
        let ram = GuestRam::new_anonymous(4, true).unwrap();
        assert_eq!(ram.size(), 4 << 20);
        ram.memory().write_obj(0xdead_beefu32, GuestAddress(0x3ff000)).unwrap();
        assert_eq!(ram.memory().read_obj::<u32>(GuestAddress(0x3ff000)).unwrap(), 0xdead_beef);
        assert!(ram.memory().write_obj(1u8, GuestAddress(4 << 20)).is_err());
        assert!(ram.guest_map().is_none());
    }

    #[test]
    fn managed_ram_is_the_guest_map() {
        let mgr = match MemoryManager::new(ManagerConfig::with_capacity(64 << 20)) {
            Ok(m) => m,
            Err(e) => {
                crate::boot::linux::tests::skip(&format!(
                    "managed_ram_is_the_guest_map: memory manager unavailable: {e}"
                ));
                return;
            }
        };
        let ram = GuestRam::new_managed(&mgr, 7, 8).unwrap();
        assert_eq!(ram.host_addr(), ram.guest_map().unwrap().host_addr() as u64);
        ram.memory().write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        let mut buf = [0u8; 4];
        ram.guest_map().unwrap().read_bytes(0x1000, &mut buf).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0x1234_5678);
        drop(ram);
        assert_eq!(mgr.stats().frames_used, 0);
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(matches!(GuestRam::new_anonymous(0, false), Err(Error::Size(0))));
        assert!(GuestRam::new_anonymous(MAX_MEM_MIB + 1, false).is_err());
    }
}
