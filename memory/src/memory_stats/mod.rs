//! The memory manager's statistics.
//!
//! - [`MemoryStats`]: the detailed snapshot (pool, 2 MiB frames, VMAs, host
//!   bytes, the core's event [`Counters`], the Protector's counters and the
//!   merger's [`MergeStats`]).
//! - [`HostMemoryStats`]: the selection of it the HTTP API serves as
//!   `GET /memory` (KSM-style names), made by [`MemoryStats::host`].
//! - [`VmMemoryStats`]: one VM's memory as `GET /vms/{vm_id}/memory` serves it,
//!   from [`crate::MemoryManager::vm_memory_stats`] (managed RAM) or
//!   [`VmMemoryStats::unmanaged`] (RAM the manager does not hold).
//!
//! [`HostMemoryStats`] and [`VmMemoryStats`] are wire types (`wire.rs`): the
//! `api` crate re-exports them, and with the `openapi` feature they describe
//! themselves to utoipa. Their field comments are the API's descriptions.
//!
//! None of them takes the manager's lock: the figures that live under it come
//! from the last publication of the core's statistics board (see
//! `core/figures.rs`: published by the lock's holders, at most a few
//! milliseconds old while merging or compaction runs, exact once they stop);
//! the Protector's counters are atomics, the merger's and the compactor's
//! totals sit behind locks of their own, and the process's mapping count is
//! cached (`process_vmas.rs`).

pub(crate) mod process_vmas;
mod wire;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;

pub use crate::core::Counters;
pub(crate) use process_vmas::ProcessVmas;
pub use wire::{HostMemoryStats, VmMemoryStats};

use crate::compact::CompactionStats;
use crate::core::figures::Figures;
use crate::core::Core;
use crate::merge::MergeStats;
use crate::pool::ThpStatus;
use crate::protector::ProtectorCounters;
use crate::{sys, HUGE_FRAME_PAGES, PAGE_SIZE};

/// A snapshot of the memory manager's statistics.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryStats {
    /// 4 KiB frames in the pool.
    pub frames_total: u64,
    /// Frames allocated.
    pub frames_used: u64,
    /// Frames free.
    pub frames_free: u64,
    /// Frames mapped by at least one guest page.
    pub frames_live: u64,
    /// Frames mapped by more than one guest page (KSM's pages_shared).
    pub frames_shared: u64,
    /// Guest pages mapping a frame another page maps too, beyond the first
    /// (KSM's pages_sharing).
    pub pages_sharing: u64,
    /// Guest pages of all VMs.
    pub guest_pages: u64,
    /// 2 MiB host frames in the pool.
    pub huge_frames_total: u64,
    /// 2 MiB host frames holding at least one live frame.
    pub huge_frames_in_use: u64,
    /// 2 MiB host frames with no live frame (punched: no host memory).
    pub huge_frames_empty: u64,
    /// 2 MiB frames punched because they became empty, since start.
    pub huge_frames_returned: u64,
    /// Free frames inside in-use 2 MiB frames / frames of in-use 2 MiB frames
    /// (0: in-use 2 MiB frames are full; near 1: they are mostly holes).
    pub fragmentation: f64,
    /// Guest pages currently write-protected.
    pub protected_pages: u64,
    /// Guest pages known to be zero (discarded, not written since).
    pub zero_pages: u64,
    /// VMAs of guest memory: every VM's runs of consecutive frames (each run
    /// is one host mapping of the pool memfd once the kernel merged adjacent
    /// mappings).
    pub vma_count: u64,
    /// Mappings of the whole process (lines of /proc/self/maps: guest memory,
    /// the pool alias, libraries, thread stacks), counted at most about a
    /// second ago; 0 if unreadable.
    pub process_vma_count: u64,
    /// Guest VMAs beyond one per VM, per page saved by sharing
    /// (`pages_sharing`; 0 when nothing is shared): what sharing costs in host
    /// mappings, about 2 for isolated shared pages (each splits the mapping of
    /// the VM whose page moved), near 0 for long runs of clone pages
    /// (compaction's moves of private pages add to it too).
    pub vmas_per_shared_page: f64,
    /// Holes punched in the pool memfd (`fallocate(PUNCH_HOLE)` calls) since start.
    pub punch_calls: u64,
    /// `vm.max_map_count` in force.
    pub vma_limit: u64,
    /// Requests refused because of the VMA budget.
    pub vma_refused: u64,
    /// Value `vm.max_map_count` was raised to, if it was.
    pub vma_limit_raised_to: Option<u64>,
    /// Host memory actually held by the memfd (st_blocks * 512).
    pub host_bytes: u64,
    /// Guest RAM of all VMs in bytes.
    pub guest_bytes: u64,
    /// Guest memory committed (the sizes of all VMs, merged or not; equal to
    /// `guest_bytes`): what admission counts (see [`crate::core::commit`]).
    pub committed_bytes: u64,
    /// Most guest memory the pool admits (capacity x overcommit ratio).
    pub commit_limit_bytes: u64,
    /// VMs whose copy-on-write found no free frame (stopped or to be retried).
    pub vms_out_of_memory: u64,
    /// Event counters.
    pub counters: Counters,
    /// Write-protect faults read from the userfaultfd.
    pub uffd_faults: u64,
    /// Remap events read from the userfaultfd.
    pub uffd_remap_events: u64,
    /// Wakes of resolved writers that failed (each logged).
    pub uffd_wake_errors: u64,
    /// Faults whose writers were kept blocked (no frame for their copy-on-write).
    pub uffd_held_writers: u64,
    /// Shmem transparent huge pages.
    pub thp: ThpStatus,
    /// Same-page merging (KSM vocabulary).
    pub merge: MergeStats,
    /// Compaction: fragmentation and the compactor's totals.
    pub compaction: CompactionStats,
}

impl MemoryStats {
    /// The statistics of `core` from its published figures `f` (no lock of
    /// the manager is taken); `merge` and `compaction` are left for the caller.
    pub(crate) fn collect(core: &Core, f: &Figures, protector: &ProtectorCounters) -> Self {
        let total = f.frames_total;
        let free = f.frames_free;
        let hf_total = f.huge_frames;
        let hf_empty = f.huge_frames_empty;
        let in_use = hf_total.saturating_sub(hf_empty);
        let holes = free.saturating_sub(hf_empty * u64::from(HUGE_FRAME_PAGES));
        let fragmentation =
            if in_use == 0 { 0.0 } else { holes as f64 / (in_use * u64::from(HUGE_FRAME_PAGES)) as f64 };
        let guest_pages = f.guest_pages;
        let vma_count = f.vma_count;
        let extra_vmas = vma_count.saturating_sub(f.vms.len() as u64);
        let pages_sharing = f.pages_sharing();
        let vmas_per_shared_page = if pages_sharing == 0 { 0.0 } else { extra_vmas as f64 / pages_sharing as f64 };
        let commit = &core.commit;
        MemoryStats {
            frames_total: total,
            frames_used: total - free,
            frames_free: free,
            frames_live: f.frames_live,
            frames_shared: f.frames_shared,
            pages_sharing,
            guest_pages,
            huge_frames_total: hf_total,
            huge_frames_in_use: in_use,
            huge_frames_empty: hf_empty,
            huge_frames_returned: f.huge_frames_returned,
            fragmentation,
            protected_pages: f.protected_pages,
            zero_pages: f.zero_pages,
            vma_count,
            // Filled by [`MemoryStats::count_process_vmas`].
            process_vma_count: 0,
            vmas_per_shared_page,
            punch_calls: f.punch_calls,
            vma_limit: f.vma_limit,
            vma_refused: f.vma_refused,
            vma_limit_raised_to: f.vma_limit_raised_to,
            host_bytes: sys::allocated_bytes(core.memfd()).unwrap_or(0),
            guest_bytes: guest_pages * PAGE_SIZE as u64,
            committed_bytes: guest_pages * PAGE_SIZE as u64,
            commit_limit_bytes: commit.policy().limit_pages(total) * PAGE_SIZE as u64,
            vms_out_of_memory: commit.out_of_memory_count(),
            counters: f.counters.clone(),
            uffd_faults: protector.faults.load(Ordering::Relaxed),
            uffd_remap_events: protector.remap_events.load(Ordering::Relaxed),
            uffd_wake_errors: protector.wake_errors.load(Ordering::Relaxed),
            uffd_held_writers: protector.held_writers.load(Ordering::Relaxed),
            thp: core.thp().clone(),
            merge: MergeStats::default(),
            compaction: CompactionStats::default(),
        }
    }

    /// Sets [`MemoryStats::process_vma_count`] from the cached count of
    /// /proc/self/maps (at most about a second old: see [`ProcessVmas`]).
    pub(crate) fn count_process_vmas(&mut self, vmas: &Arc<ProcessVmas>) {
        self.process_vma_count = vmas.get();
    }

    /// The host-wide statistics the API serves (`GET /memory`).
    pub fn host(&self) -> HostMemoryStats {
        let (m, c) = (&self.merge, &self.counters);
        HostMemoryStats {
            pages_shared: m.pages_shared,
            pages_sharing: m.pages_sharing,
            pages_unshared: m.pages_unshared,
            pages_volatile: m.pages_volatile,
            pages_scanned: m.pages_scanned,
            full_scans: m.full_scans,
            zero_pages: m.zero_pages,
            general_profit: m.general_profit,
            frames_2m_total: self.huge_frames_total,
            frames_2m_in_use: self.huge_frames_in_use,
            frames_2m_returned: self.huge_frames_returned,
            fragmentation: self.fragmentation,
            host_bytes_used: self.host_bytes,
            vma_count: self.vma_count,
            process_vma_count: self.process_vma_count,
            vmas_per_shared_page: self.vmas_per_shared_page,
            punch_calls: self.punch_calls,
            cow_copies: c.cow_copies,
            cow_reuses: c.cow_reuses,
            cow_background_reuses: c.cow_background_reuses,
            vcpu_holds: c.vcpu_holds,
            vcpu_hold_ms: c.vcpu_hold_us as f64 / 1000.0,
            compaction: self.compaction,
            committed_bytes: self.committed_bytes,
            commit_limit_bytes: self.commit_limit_bytes,
            cow_no_frame: c.cow_no_frame,
            pages_discarded: c.discards,
            pages_discarded_in_place: c.discards_in_place,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> MemoryStats {
        MemoryStats {
            frames_total: 1024,
            frames_used: 600,
            frames_free: 424,
            frames_live: 590,
            frames_shared: 10,
            pages_sharing: 30,
            guest_pages: 640,
            huge_frames_total: 2,
            huge_frames_in_use: 2,
            huge_frames_empty: 0,
            huge_frames_returned: 7,
            fragmentation: 0.25,
            protected_pages: 40,
            zero_pages: 3,
            vma_count: 12,
            process_vma_count: 90,
            vmas_per_shared_page: 0.5,
            punch_calls: 33,
            vma_limit: 65530,
            vma_refused: 0,
            vma_limit_raised_to: None,
            host_bytes: 4 << 20,
            guest_bytes: 640 * PAGE_SIZE as u64,
            committed_bytes: 640 * PAGE_SIZE as u64,
            commit_limit_bytes: 1024 * PAGE_SIZE as u64,
            vms_out_of_memory: 0,
            counters: Counters {
                cow_copies: 5,
                cow_reuses: 6,
                cow_background_reuses: 7,
                vcpu_holds: 2,
                vcpu_hold_us: 1500,
                cow_no_frame: 4,
                discards: 9,
                discards_in_place: 8,
                ..Counters::default()
            },
            uffd_faults: 11,
            uffd_remap_events: 0,
            uffd_wake_errors: 0,
            uffd_held_writers: 4,
            thp: ThpStatus { requested: false, honoured: false, shmem_enabled: "never".into() },
            merge: MergeStats {
                pages_shared: 10,
                pages_sharing: 30,
                pages_unshared: 100,
                pages_volatile: 4,
                pages_scanned: 5000,
                full_scans: 3,
                zero_pages: 2,
                general_profit: -4096,
                ..MergeStats::default()
            },
            compaction: CompactionStats { passes: 2, pages_migrated: 900, ..CompactionStats::default() },
        }
    }

    #[test]
    fn host_is_the_api_selection() {
        let h = snapshot().host();
        assert_eq!(
            h,
            HostMemoryStats {
                pages_shared: 10,
                pages_sharing: 30,
                pages_unshared: 100,
                pages_volatile: 4,
                pages_scanned: 5000,
                full_scans: 3,
                zero_pages: 2,
                general_profit: -4096,
                frames_2m_total: 2,
                frames_2m_in_use: 2,
                frames_2m_returned: 7,
                fragmentation: 0.25,
                host_bytes_used: 4 << 20,
                vma_count: 12,
                process_vma_count: 90,
                vmas_per_shared_page: 0.5,
                punch_calls: 33,
                cow_copies: 5,
                cow_reuses: 6,
                cow_background_reuses: 7,
                vcpu_holds: 2,
                vcpu_hold_ms: 1.5,
                compaction: CompactionStats { passes: 2, pages_migrated: 900, ..CompactionStats::default() },
                committed_bytes: 640 * PAGE_SIZE as u64,
                commit_limit_bytes: 1024 * PAGE_SIZE as u64,
                cow_no_frame: 4,
                pages_discarded: 9,
                pages_discarded_in_place: 8,
            }
        );
        // Older clients' documents without the vCPU-hold fields still parse.
        let mut json = serde_json::to_value(&h).unwrap();
        let obj = json.as_object_mut().unwrap();
        obj.remove("vcpu_holds");
        obj.remove("vcpu_hold_ms");
        obj.remove("compaction");
        obj.remove("process_vma_count");
        obj.remove("vmas_per_shared_page");
        obj.remove("punch_calls");
        obj.remove("cow_background_reuses");
        for commitment in ["committed_bytes", "commit_limit_bytes", "cow_no_frame"] {
            obj.remove(commitment);
        }
        let parsed: HostMemoryStats = serde_json::from_value(json).unwrap();
        assert_eq!((parsed.vcpu_holds, parsed.vcpu_hold_ms), (0, 0.0));
        assert_eq!((parsed.process_vma_count, parsed.vmas_per_shared_page, parsed.punch_calls), (0, 0.0, 0));
        assert_eq!(parsed.compaction, CompactionStats::default());
    }

    /// `GET /vms/{id}/memory` and `GET /memory` answer from the published
    /// figures while another thread holds the manager's lock (as a long merge
    /// or compaction chunk, or the 130-190 ms per-VM computation over a 32 GiB
    /// VM that held it before the stats board, would).
    #[test]
    fn vm_and_host_statistics_answer_while_the_lock_is_held() {
        use std::time::{Duration, Instant};
        if let Err(e) = crate::uffd::Uffd::probe() {
            let msg = format!("SKIPPED vm_and_host_statistics_answer_while_the_lock_is_held: {e}");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{msg}\n").as_bytes());
            return;
        }
        let mut config = crate::ManagerConfig::with_capacity(16 << 20);
        config.raise_max_map_count = false;
        let mgr = crate::MemoryManager::new(config).expect("manager");
        let guest = mgr.create_guest(1, 64 * PAGE_SIZE as u64).expect("guest");
        let (locked, held) = std::sync::mpsc::channel();
        let holder = {
            let mgr = mgr.clone();
            std::thread::spawn(move || {
                let st = mgr.core().lock();
                locked.send(()).expect("send");
                std::thread::sleep(Duration::from_secs(2));
                drop(st);
            })
        };
        held.recv().expect("the lock is held");
        let start = Instant::now();
        let vm = mgr.vm_memory_stats(1).expect("VM statistics");
        let host = mgr.stats().host();
        let elapsed = start.elapsed();
        holder.join().expect("holder");
        assert!(elapsed < Duration::from_millis(500), "statistics waited {elapsed:?} for the lock");
        assert_eq!(vm.guest_pages, 64);
        assert_eq!(host.pages_sharing, 0);
        drop(guest);
    }
}
