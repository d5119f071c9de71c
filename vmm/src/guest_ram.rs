//! A VM's guest RAM: one host range backed by shared memory, seen by KVM through a
//! memslot and by densevm through vm-memory's `GuestMemory`.
//!
//! This is the seam to the memory manager: the VMM only asks a `GuestRam` for its
//! host range and its `GuestMemory` view, never how frames are laid out behind it.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Largest guest RAM densevm accepts (MiB).
pub const MAX_MEM_MIB: u64 = 64 * 1024;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// memfd_create failed.
    #[error("memfd_create: {0}")]
    Memfd(std::io::Error),
    /// ftruncate failed.
    #[error("sizing the guest RAM memfd: {0}")]
    Truncate(std::io::Error),
    /// Mapping failed.
    #[error("mapping guest RAM: {0}")]
    Mmap(String),
    /// Bad size.
    #[error("guest RAM must be 1..={MAX_MEM_MIB} MiB, got {0} MiB")]
    Size(u64),
}

/// Guest RAM of one VM, at guest-physical address 0.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    backing: File,
    size: u64,
    host_addr: u64,
}

impl GuestRam {
    /// Creates `mem_mib` MiB of RAM backed by a private memfd (frames are allocated by
    /// the host kernel on first touch).
    pub fn new_memfd(name: &str, mem_mib: u64) -> Result<Self, Error> {
        if mem_mib == 0 || mem_mib > MAX_MEM_MIB {
            return Err(Error::Size(mem_mib));
        }
        let size = mem_mib << 20;
        let cname = std::ffi::CString::new(format!("densevm-{name}")).map_err(|e| Error::Mmap(e.to_string()))?;
        // SAFETY: cname is a valid NUL-terminated string; flags are valid.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(Error::Truncate)?;
        let backing = file.try_clone().map_err(Error::Memfd)?;
        let region =
            MmapRegion::from_file(FileOffset::new(file, 0), size as usize).map_err(|e| Error::Mmap(e.to_string()))?;
        let host_addr = region.as_ptr() as u64;
        let region =
            GuestRegionMmap::new(region, GuestAddress(0)).ok_or_else(|| Error::Mmap("region overflows".into()))?;
        let memory = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| Error::Mmap(e.to_string()))?;
        Ok(GuestRam { memory, backing, size, host_addr })
    }

    /// densevm's view of the RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host bytes actually allocated behind this RAM (the memfd's blocks).
    pub fn host_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.backing.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// Host virtual address of guest-physical 0 (for the KVM memslot).
    pub fn host_addr(&self) -> u64 {
        self.host_addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memfd_ram_reads_back_writes() {
        let ram = GuestRam::new_memfd("t", 4).unwrap();
        assert_eq!(ram.size(), 4 << 20);
        ram.memory().write_obj(0xdead_beefu32, GuestAddress(0x3ff000)).unwrap();
        assert_eq!(ram.memory().read_obj::<u32>(GuestAddress(0x3ff000)).unwrap(), 0xdead_beef);
        assert!(ram.memory().write_obj(1u8, GuestAddress(4 << 20)).is_err());
        assert_eq!(ram.host_bytes(), 4096);
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(matches!(GuestRam::new_memfd("t", 0), Err(Error::Size(0))));
        assert!(GuestRam::new_memfd("t", MAX_MEM_MIB + 1).is_err());
    }
}
