//! The wire types of the memory statistics: [`HostMemoryStats`]
//! (`GET /memory`, made by [`super::MemoryStats::host`]) and [`VmMemoryStats`]
//! (`GET /vms/{vm_id}/memory`). The `api` crate re-exports them, and with the
//! `openapi` feature they describe themselves to utoipa: their field comments
//! are the API's descriptions.

use serde::{Deserialize, Serialize};

use crate::compact::CompactionStats;
use crate::merge::VmMergeStats;
use crate::{sys, PAGE_SIZE};

/// Host-wide memory and merging statistics with KSM-style names: the merger's
/// counters ([`MergeStats`]), the pool's 2 MiB frames, host memory, VMAs and
/// copy-on-write counters. Made by [`MemoryStats::host`]; the `api` crate
/// serves it as `GET /memory`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(
        as = HostMemoryStats,
        description = "`GET /memory`: host-wide memory and merging statistics (KSM-style names)."
    )
)]
#[serde(deny_unknown_fields)]
pub struct HostMemoryStats {
    /// Shared frames in use (each mapped by at least two guest pages).
    pub pages_shared: u64,
    /// Guest pages mapping a shared frame, beyond the first mapping of each.
    pub pages_sharing: u64,
    /// Pages checked by the merger that are unique so far.
    pub pages_unshared: u64,
    /// Pages changing too fast to be merged.
    pub pages_volatile: u64,
    /// Pages scanned since start.
    pub pages_scanned: u64,
    /// Completed full scans of all mergeable memory.
    pub full_scans: u64,
    /// Guest pages mapping the zero page.
    pub zero_pages: u64,
    /// Bytes saved by merging minus the merger's own metadata (may be negative).
    pub general_profit: i64,
    /// 2 MiB host frames in the frame pool.
    pub frames_2m_total: u64,
    /// 2 MiB host frames holding at least one live 4 KiB frame.
    pub frames_2m_in_use: u64,
    /// 2 MiB host frames given back to the host.
    pub frames_2m_returned: u64,
    /// Fragmentation of the in-use 2 MiB frames (0 = packed, 1 = fully scattered).
    pub fragmentation: f64,
    /// Host memory used for guest memory, in bytes.
    pub host_bytes_used: u64,
    /// Host mappings (VMAs) of guest memory: every VM's runs of consecutive
    /// frames of the frame pool.
    pub vma_count: u64,
    /// Host mappings (VMAs) of the whole densevm process (/proc/self/maps),
    /// guest memory included.
    #[serde(default)]
    pub process_vma_count: u64,
    /// Guest memory mappings beyond one per VM, per page saved by sharing
    /// (`pages_sharing`; 0 when nothing is shared): about 2 when shared pages
    /// are isolated (each splits the mapping of its VM), near 0 for long runs
    /// of shared pages.
    #[serde(default)]
    pub vmas_per_shared_page: f64,
    /// Holes punched in the frame pool (`fallocate(PUNCH_HOLE)` calls) since start.
    #[serde(default)]
    pub punch_calls: u64,
    /// Copy-on-write copies, all VMs.
    pub cow_copies: u64,
    /// Copy-on-write reuses in place at a write fault, all VMs.
    pub cow_reuses: u64,
    /// Merged frames made writable in place in the background, before any
    /// write, once their last other mapper left (all VMs; not in `cow_reuses`).
    #[serde(default)]
    pub cow_background_reuses: u64,
    /// Merge chunks that held the merging VMs' vCPUs out of guest mode (`hold_vcpus`).
    #[serde(default)]
    pub vcpu_holds: u64,
    /// Total time those vCPUs were held, in milliseconds.
    #[serde(default)]
    pub vcpu_hold_ms: f64,
    /// Compaction: fragmentation of the 2 MiB frames and the compactor's totals.
    #[serde(default)]
    pub compaction: CompactionStats,

    /// Guest memory committed: the sizes of all VMs whose RAM the pool holds,
    /// merged or not (admission counts this, never free frames).
    #[serde(default)]
    pub committed_bytes: u64,
    /// Most guest memory the pool admits (its capacity x the overcommit ratio).
    #[serde(default)]
    pub commit_limit_bytes: u64,
    /// Write faults whose copy-on-write found no free frame (possible only
    /// with overcommit; each stops its VM with an out-of-memory exit reason).
    #[serde(default)]
    pub cow_no_frame: u64,
    /// Guest pages discarded (balloon inflate and free page reporting, and
    /// explicit discards), all VMs.
    #[serde(default)]
    pub pages_discarded: u64,
    /// Of them, pages discarded in place: isolated pages (runs shorter than
    /// 4 pages) keep their own frame, punched, instead of mapping the zero
    /// region (cheaper for scattered pages; until compaction moves such a
    /// page onto the zero region its frame stays allocated and a read of it
    /// allocates a page again).
    #[serde(default)]
    pub pages_discarded_in_place: u64,
}

/// One VM's memory in 4 KiB guest pages: its size, its residency (`mincore(2)`
/// over its guest RAM: pages whose frame holds host memory) and, for RAM the
/// manager holds, the merger's per-VM counts ([`VmMergeStats`]). The `api`
/// crate serves it as `GET /vms/{vm_id}/memory`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(as = VmMemoryStats, description = "`GET /vms/{vm_id}/memory`: one VM's memory, in 4 KiB guest pages.")
)]
#[serde(deny_unknown_fields)]
pub struct VmMemoryStats {
    /// Guest memory size in pages.
    pub guest_pages: u64,
    /// Guest pages backed by a host frame.
    pub resident_pages: u64,
    /// Guest pages mapping a merged (shared) frame.
    pub merged_pages: u64,
    /// Guest pages mapping the zero page.
    pub zero_pages: u64,
    /// Host mappings (VMAs) of its guest memory (runs of consecutive frames;
    /// 1 when nothing is remapped, 0 for RAM the manager does not hold).
    #[serde(default)]
    pub vma_count: u64,
    /// Writes to merged pages that copied the frame.
    pub cow_copies: u64,
    /// Writes to merged pages that took the frame over in place (single mapping left).
    pub cow_reuses: u64,
    /// Merged frames this VM's pages took over in place in the background,
    /// before any write (their other mappers had left; not in `cow_reuses`).
    #[serde(default)]
    pub cow_background_reuses: u64,
}

impl VmMemoryStats {
    /// Statistics of managed guest RAM realized at `host_addr`, whose merge
    /// statistics are `merge` (its size is `merge.guest_pages`).
    pub(crate) fn managed(host_addr: usize, merge: &VmMergeStats) -> Self {
        VmMemoryStats {
            guest_pages: merge.guest_pages,
            resident_pages: resident_pages(host_addr, merge.guest_pages.saturating_mul(PAGE_SIZE as u64)),
            merged_pages: merge.merged_pages,
            zero_pages: merge.zero_pages,
            vma_count: merge.vma_count,
            cow_copies: merge.cow_copies,
            cow_reuses: merge.cow_reuses,
            cow_background_reuses: merge.cow_background_reuses,
        }
    }

    /// Statistics of guest RAM the manager does not hold (e.g. private
    /// anonymous memory), `size` bytes at `host_addr`: its size and residency;
    /// nothing is merged.
    pub fn unmanaged(host_addr: u64, size: u64) -> Self {
        let resident_pages = usize::try_from(host_addr).map_or(0, |addr| resident_pages(addr, size));
        VmMemoryStats { guest_pages: size / PAGE_SIZE as u64, resident_pages, ..VmMemoryStats::default() }
    }
}

/// Pages of `addr..addr+size` that hold host memory (`mincore`); 0 (logged)
/// if the range cannot be inspected.
fn resident_pages(addr: usize, size: u64) -> u64 {
    let mut residency = Vec::new();
    let result = usize::try_from(size)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
        .and_then(|len| sys::mincore(addr, len, &mut residency));
    match result {
        Ok(()) => residency.iter().filter(|b| **b & 1 != 0).count() as u64,
        Err(e) => {
            tracing::warn!("mincore of guest RAM at {addr:#x} ({size} bytes): {e}");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_stats_of_merge_stats_and_unmanaged_ram() {
        let merge = VmMergeStats {
            guest_pages: 4,
            merged_pages: 2,
            zero_pages: 1,
            vma_count: 3,
            cow_copies: 3,
            cow_reuses: 4,
            cow_background_reuses: 5,
            ..Default::default()
        };
        let len = 4 * PAGE_SIZE;
        // SAFETY: a new private anonymous mapping, unmapped below; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // SAFETY: the second page of the mapping above.
        unsafe { *addr.cast::<u8>().add(PAGE_SIZE) = 1 };
        let managed = VmMemoryStats::managed(addr as usize, &merge);
        assert_eq!(
            managed,
            VmMemoryStats {
                guest_pages: 4,
                resident_pages: 1,
                merged_pages: 2,
                zero_pages: 1,
                vma_count: 3,
                cow_copies: 3,
                cow_reuses: 4,
                cow_background_reuses: 5
            }
        );
        let unmanaged = VmMemoryStats::unmanaged(addr as u64, len as u64);
        assert_eq!(unmanaged, VmMemoryStats { guest_pages: 4, resident_pages: 1, ..VmMemoryStats::default() });
        // SAFETY: the mapping above, no longer used.
        assert_eq!(unsafe { libc::munmap(addr, len) }, 0);
        // A range that is not mapped reads as nothing resident, not as an error.
        assert_eq!(VmMemoryStats::unmanaged(addr as u64, len as u64).resident_pages, 0);
    }
}
