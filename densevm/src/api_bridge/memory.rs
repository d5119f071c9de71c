//! Memory statistics and merge control for the API, from the memory manager and its
//! merger.
//!
//! Where the numbers come from (the wire types are the memory crate's):
//! - `GET /memory`: [`memory::HostMemoryStats`], the API's selection of the manager's
//!   [`memory::MemoryStats`] snapshot ([`memory::MemoryStats::host`]).
//! - `GET /vms/{id}/memory`: [`memory::VmMemoryStats`], from
//!   [`memory::MemoryManager::vm_memory_stats`] when the VM's RAM is managed (size,
//!   `mincore(2)` residency and the merger's per-VM counts), else
//!   [`memory::VmMemoryStats::unmanaged`] (size and residency only).
//! - `GET|PATCH /memory/merge` and `UnmergeAll`: the merger's tunables (the API's
//!   `MergeConfig` is [`memory::Tunables`], its patch a `TunablesPatch`) and its
//!   unmerge-all (run on a helper thread: it blocks until every page is private;
//!   refused with 409 naming the frames missing when the pool has no room for
//!   it, which only overcommit makes possible).

use std::sync::Arc;

use api::types::{HostMemoryStats, MergeConfig, MergeConfigPatch, VmMemoryStats};
use api::{ApiError, ApiReply, ReplySender};
use memory::MemoryManager;

use vmm::error_kind::{memory_error_kind, ErrorKind};
use vmm::vm::Vm;

/// Host-wide statistics with the API's (KSM-style) names.
pub fn host_stats(mgr: &MemoryManager) -> HostMemoryStats {
    mgr.stats().host()
}

/// One VM's memory statistics: the memory manager's for managed RAM; size and
/// residency only for RAM it does not hold.
pub fn vm_stats(mgr: &MemoryManager, vm: &Vm) -> Result<VmMemoryStats, ApiError> {
    let ram = vm.ram();
    match ram.guest_map() {
        Some(map) => mgr
            .vm_memory_stats(map.vm_id())
            .map_err(|e| ApiError::internal(format!("VM {}: merge statistics: {e}", vm.id()))),
        None => Ok(VmMemoryStats::unmanaged(ram.host_addr(), ram.size())),
    }
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
        let result = match mgr.unmerge_all() {
            Ok(n) => {
                tracing::info!("UnmergeAll gave {n} guest pages private frames again");
                Ok(ApiReply::Empty)
            }
            Err(e) => Err(unmerge_error(&e)),
        };
        let _ = reply.send(result);
    });
    if let Err(e) = spawned {
        tracing::error!("cannot spawn the unmerge thread: {e}");
    }
}

/// The API error of a failed unmerge-all: no room is a conflict (409) naming
/// the frames needed and free, anything else internal.
fn unmerge_error(e: &memory::manager::Error) -> ApiError {
    let msg = format!("UnmergeAll: {e}");
    match memory_error_kind(e) {
        ErrorKind::Conflict => ApiError::conflict(msg),
        ErrorKind::InvalidInput | ErrorKind::UnbootableKernel => ApiError::bad_request(msg),
        ErrorKind::NotFound => ApiError::not_found(msg),
        ErrorKind::Internal => ApiError::internal(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmerge_without_room_is_a_conflict_naming_the_frames() {
        let room = memory::manager::CommitError::NoRoomToUnmerge { needed: 1024, free: 0, missing: 1024 };
        let e = unmerge_error(&room.into());
        assert_eq!(e.kind, api::ErrorKind::Conflict);
        assert_eq!(e.fault_message, "UnmergeAll: unmerging needs 1024 free frames, the pool has 0 (missing 1024)");
        let other = memory::manager::Error::UnknownVm(3);
        assert_eq!(unmerge_error(&other).kind, api::ErrorKind::Internal);
    }

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

    /// RAM the manager does not hold (anonymous) counts the pages it touched.
    #[test]
    fn resident_pages_follow_touches() {
        use memory::PAGE_SIZE;
        let len = 16 * PAGE_SIZE;
        let mem = vm_memory::MmapRegion::<()>::new(len).unwrap();
        let p = mem.as_ptr();
        let stats = || VmMemoryStats::unmanaged(p as u64, len as u64);
        assert_eq!(stats().resident_pages, 0);
        for i in [0, 3, 15] {
            // SAFETY: inside the mapping above.
            unsafe { *p.add(i * PAGE_SIZE) = 1 };
        }
        assert_eq!(stats(), VmMemoryStats { guest_pages: 16, resident_pages: 3, ..VmMemoryStats::default() });
    }
}
