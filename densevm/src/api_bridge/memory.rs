//! Memory statistics and merge control for the API, from the memory manager and its
//! merger.
//!
//! Where the numbers come from:
//! - `GET /memory`: [`memory::MemoryStats`] (pool, 2 MiB frames, VMAs, host bytes,
//!   copy-on-write counters) and its [`memory::MergeStats`] (KSM's counters).
//! - `GET /vms/{id}/memory`: `guest_pages` is the RAM size / 4 KiB; `resident_pages`
//!   is `mincore(2)` over the VM's guest-RAM range (pages whose frame holds host
//!   memory); the rest is the merger's per-VM [`memory::VmMergeStats`].
//! - `GET|PATCH /memory/merge` and `UnmergeAll`: the merger's tunables (the API's
//!   `MergeConfig` is [`memory::Tunables`], its patch a `TunablesPatch`) and its
//!   unmerge-all (run on a helper thread: it blocks until every page is private).

use std::sync::Arc;

use api::types::{HostMemoryStats, MergeConfig, MergeConfigPatch, VmMemoryStats};
use api::{ApiError, ApiReply, ReplySender};
use memory::{MemoryManager, MemoryStats, PAGE_SIZE};

use vmm::vm::Vm;

/// Host-wide statistics with the API's (KSM-style) names.
pub fn host_stats(mgr: &MemoryManager) -> HostMemoryStats {
    map_host_stats(&mgr.stats())
}

fn map_host_stats(s: &MemoryStats) -> HostMemoryStats {
    let m = &s.merge;
    HostMemoryStats {
        pages_shared: m.pages_shared,
        pages_sharing: m.pages_sharing,
        pages_unshared: m.pages_unshared,
        pages_volatile: m.pages_volatile,
        pages_scanned: m.pages_scanned,
        full_scans: m.full_scans,
        zero_pages: m.zero_pages,
        general_profit: m.general_profit,
        frames_2m_total: s.huge_frames_total,
        frames_2m_in_use: s.huge_frames_in_use,
        // 2 MiB frames punched because they became empty, since start.
        frames_2m_returned: s.huge_frames_returned,
        fragmentation: s.fragmentation,
        host_bytes_used: s.host_bytes,
        vma_count: s.vma_count,
        cow_copies: s.counters.cow_copies,
        cow_reuses: s.counters.cow_reuses,
        vcpu_holds: s.counters.vcpu_holds,
        vcpu_hold_ms: s.counters.vcpu_hold_us as f64 / 1000.0,
    }
}

/// One VM's memory statistics.
pub fn vm_stats(mgr: &MemoryManager, vm: &Vm) -> Result<VmMemoryStats, ApiError> {
    let ram = vm.ram();
    let mut out = VmMemoryStats {
        guest_pages: ram.size() / PAGE_SIZE as u64,
        resident_pages: resident_pages(ram.host_addr(), ram.size()).unwrap_or(0),
        ..VmMemoryStats::default()
    };
    if let Some(map) = ram.guest_map() {
        let m = mgr
            .vm_merge_stats(map.vm_id())
            .map_err(|e| ApiError::internal(format!("VM {}: merge statistics: {e}", vm.id())))?;
        out.merged_pages = m.merged_pages;
        out.zero_pages = m.zero_pages;
        out.cow_copies = m.cow_copies;
        out.cow_reuses = m.cow_reuses;
    }
    Ok(out)
}

/// Pages of `[addr, addr+size)` that are resident (`mincore`); `None` if the call fails.
fn resident_pages(addr: u64, size: u64) -> Option<u64> {
    let pages = usize::try_from(size.div_ceil(PAGE_SIZE as u64)).ok()?;
    let mut vec = vec![0u8; pages];
    // SAFETY: `addr..addr+size` is the VM's guest-RAM mapping, alive while the caller
    // holds `&Vm`; mincore only inspects the page tables and writes one byte per page
    // into `vec`, which holds exactly that many bytes.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, size as usize, vec.as_mut_ptr()) };
    (rc == 0).then(|| vec.iter().filter(|b| **b & 1 != 0).count() as u64)
}

/// The merger's tunables.
pub fn merge_config(mgr: &MemoryManager) -> MergeConfig {
    mgr.merger().tunables()
}

/// Applies `patch` to the merger's tunables (all or nothing; the merger validates
/// the result); returns the result.
pub fn patch_merge_config(mgr: &MemoryManager, patch: &MergeConfigPatch) -> Result<MergeConfig, ApiError> {
    mgr.merger().update(|t| patch.apply(t)).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Starts unmerge-all on a helper thread (it blocks until every merged page is
/// private again and stops the scanner); the reply is sent from there.
pub fn unmerge_all(mgr: &Arc<MemoryManager>, reply: ReplySender) {
    let mgr = mgr.clone();
    let spawned = std::thread::Builder::new().name("densevm-unmerge".into()).spawn(move || {
        let result = match mgr.merger().unmerge_all() {
            Ok(n) => {
                tracing::info!("UnmergeAll gave {n} guest pages private frames again");
                Ok(ApiReply::Empty)
            }
            Err(e) => Err(ApiError::internal(format!("UnmergeAll: {e}"))),
        };
        let _ = reply.send(result);
    });
    if let Err(e) = spawned {
        tracing::error!("cannot spawn the unmerge thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunables_round_trip() {
        let t = memory::Tunables {
            run: true,
            pages_to_scan: 500,
            sleep_ms: 5,
            max_page_sharing: 8,
            merge_zero_pages: true,
            change_detection: memory::ChangeDetection::Checksum,
            hold_vcpus: false,
        };
        // The wire form is the tunables' own serde form.
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<MergeConfig>(&json).unwrap(), t);
        // A value too large for the tunable is a bad request, not a wrap-around.
        let too_large = format!(r#"{{"pages_to_scan": {}}}"#, u64::from(u32::MAX) + 1);
        assert!(serde_json::from_str::<MergeConfigPatch>(&too_large).is_err());
    }

    #[test]
    fn resident_pages_follow_touches() {
        let len = 16 * PAGE_SIZE;
        let mem = vm_memory::MmapRegion::<()>::new(len).unwrap();
        let p = mem.as_ptr();
        assert_eq!(resident_pages(p as u64, len as u64), Some(0));
        for i in [0, 3, 15] {
            // SAFETY: inside the mapping above.
            unsafe { *p.add(i * PAGE_SIZE) = 1 };
        }
        assert_eq!(resident_pages(p as u64, len as u64), Some(3));
    }
}
