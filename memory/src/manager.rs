//! The memory manager facade: [`MemoryManager`], the owner of the memory core
//! (frame pool, every VM's page table and the manager's lock: `core::Core`),
//! the Protector (the userfaultfd handler thread) and the merger.
//! Shared as `Arc<MemoryManager>` (Send + Sync). Its methods check arguments
//! and delegate: every page operation is one transaction of the core.

use std::sync::Arc;

pub use crate::core::balloon::{DiscardReport, DISCARD_BATCH, ZERO_REGION_MIN_RUN};
pub use crate::core::commit::{Error as CommitError, MAX_OVERCOMMIT_RATIO};
pub use crate::core::page_ops::MergeOutcome;
pub use crate::core::{CommitPolicy, Error, OutOfMemoryHandler, Result};

use crate::compact::{CompactionReport, CompactionStats, CompactionTunables, CompactionTunablesPatch, Compactor};
use crate::core::figures::Figures;
use crate::core::Core;
use crate::frame_table::Mapper;
use crate::image_load::{self, ImageLoad};
use crate::memory_stats::{MemoryStats, ProcessVmas, VmMemoryStats};
use crate::merge::{DirtyLog, DomainId, Merger, VcpuGate, VmMergeConfig, VmMergeStats};
use crate::page_table::PageFlags;
use crate::pool::{FramePool, PoolConfig};
use crate::protector::{Background, Doorbell, Protector};
use crate::thread_hook::ThreadStartHook;
use crate::uffd::{self, Uffd};
use crate::vma_budget::VmaBudget;
use crate::{FrameNo, VmId, PAGE_SIZE};

/// Configuration of the memory manager.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// The frame pool.
    pub pool: PoolConfig,
    /// Raise `vm.max_map_count` to what the pool can need (root only).
    pub raise_max_map_count: bool,
    /// Install the SIGSEGV handler that makes host-thread stores hitting the
    /// remap protocol's read-only instant wait and retry ([`crate::write_retry`]).
    pub install_write_retry: bool,
    /// Memory commitment: how much guest memory the pool admits (default: no
    /// overcommit; see [`MemoryManager::set_commit_policy`]).
    pub commit: CommitPolicy,
    /// Run first thing on each background thread (merger, compactor, fault
    /// handler) with its kind, e.g. to install a seccomp filter; none by default.
    pub thread_start: Option<ThreadStartHook>,
}

impl ManagerConfig {
    /// A configuration with a pool of `capacity_bytes` and default settings.
    pub fn with_capacity(capacity_bytes: u64) -> Self {
        ManagerConfig {
            pool: PoolConfig { capacity_bytes, transparent_huge_pages: false },
            raise_max_map_count: true,
            install_write_retry: true,
            commit: CommitPolicy::default(),
            thread_start: None,
        }
    }
}

/// The memory manager of one densevm process (all VMs).
pub struct MemoryManager {
    core: Arc<Core>,
    merger: Merger,
    compactor: Compactor,
    protector: Protector,
    /// The cached count of the process's mappings (statistics).
    process_vmas: Arc<ProcessVmas>,
}

impl MemoryManager {
    /// Creates the pool, the userfaultfd and the fault-handling threads.
    ///
    /// Fails with [`Error::Uffd`] when write-protect userfaultfd is not available
    /// (it needs root or CAP_SYS_PTRACE, and shmem write protection).
    pub fn new(config: ManagerConfig) -> Result<Arc<Self>> {
        let wanted = uffd::UFFD_FEATURE_WP_HUGETLBFS_SHMEM | uffd::UFFD_FEATURE_WP_UNPOPULATED;
        let required = uffd::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        let uffd = Arc::new(Uffd::new(wanted, required)?);
        if config.install_write_retry {
            crate::write_retry::install().map_err(Error::Mapping)?;
        }
        let pool = FramePool::new(&config.pool)?;
        let budget = VmaBudget::new(pool.buddy().total_frames(), config.raise_max_map_count);
        let bell = Arc::new(Doorbell::new()?);
        let core = Arc::new(Core::new(pool, budget, uffd.clone(), bell.clone()));
        core.commit.set_policy(config.commit)?;
        let background = {
            let core = core.clone();
            Background { bell, work: Box::new(move || core.drain_background_reuse()) }
        };
        let protector = Protector::start_with_background(
            uffd,
            config.thread_start.clone(),
            core.fault_resolver(),
            Some(background),
        )?;
        let merger = Merger::start(core.clone(), config.thread_start.clone())?;
        let compactor = match Compactor::start(core.clone(), config.thread_start.clone()) {
            Ok(c) => c,
            Err(e) => {
                merger.shutdown();
                return Err(Error::CompactionThread(e));
            }
        };
        let process_vmas = ProcessVmas::new(config.thread_start.clone());
        Ok(Arc::new(MemoryManager { core, merger, compactor, protector, process_vmas }))
    }

    pub(crate) fn core(&self) -> &Core {
        &self.core
    }

    /// The same-page merger (scanner thread, tunables, unmerge-all, statistics).
    /// It starts stopped (`run: false`); see [`crate::merge`].
    pub fn merger(&self) -> &Merger {
        &self.merger
    }

    /// Opts VM `vm` in or out of merging and puts it in merge `domain` (frames
    /// are shared only between VMs of one domain; the default domain of a VM is
    /// its id). Leaving a domain or disabling merging first gives every page of
    /// the VM that maps a shared frame a private frame again.
    pub fn set_merge(&self, vm: VmId, enabled: bool, domain: DomainId) -> Result<()> {
        self.core.set_merge(vm, VmMergeConfig { enabled, domain })
    }

    /// The merge settings of `vm`.
    pub fn merge_config(&self, vm: VmId) -> Result<VmMergeConfig> {
        self.core.merge_config(vm)
    }

    /// Registers the dirty-page source of `vm` (the VMM's KVM dirty log); the
    /// merger then uses it instead of checksums when `change_detection` is
    /// `DirtyLog`. Replaces an earlier one.
    pub fn set_dirty_log(&self, vm: VmId, log: Box<dyn DirtyLog>) -> Result<()> {
        self.core.set_dirty_log(vm, log)?;
        self.merger.forget_vm(vm);
        Ok(())
    }

    /// Registers the vCPU gate of `vm`: the merger holds the VM's vCPUs out of
    /// guest mode while it remaps a chunk of its pages, when the `hold_vcpus`
    /// tunable is on (see [`crate::vcpu_gate`]). Replaces an earlier one;
    /// dropped with the VM.
    pub fn set_vcpu_gate(&self, vm: VmId, gate: Box<dyn VcpuGate>) -> Result<()> {
        self.core.set_vcpu_gate(vm, gate)
    }

    /// Removes the dirty-page source of `vm` (checksums are used from then on).
    pub fn clear_dirty_log(&self, vm: VmId) {
        self.core.clear_dirty_log(vm);
        self.merger.forget_vm(vm);
    }

    /// Merge statistics of one VM.
    pub fn vm_merge_stats(&self, vm: VmId) -> Result<VmMergeStats> {
        self.merger.vm_stats(vm)
    }

    /// VM `vm`'s memory: size, residency and merge counts (the API's
    /// `GET /vms/{vm_id}/memory`), without the manager's lock (see
    /// [`MemoryManager::stats`]).
    pub fn vm_memory_stats(&self, vm: VmId) -> Result<VmMemoryStats> {
        let figures = self.core.figures();
        let host_addr = figures.vm(vm).map(|v| v.host_addr).ok_or(Error::UnknownVm(vm))?;
        Ok(VmMemoryStats::managed(host_addr, &self.merger.vm_stats_with(&figures, vm)?))
    }

    /// Destroys VM `vm`: unmaps its RAM and drops its frame references, and
    /// has the merger free what it learned of the VM at once (not at its next
    /// scan). Called by [`crate::GuestMap`]'s `Drop`.
    pub fn destroy_guest(&self, vm: VmId) -> Result<()> {
        let result = self.core.destroy_guest(vm);
        self.merger.forget_destroyed_vm(vm);
        result
    }

    /// Maps guest page `page` of `vm` to `frame` if their contents are equal
    /// (compared under write protection); both end shared and write-protected.
    pub fn share(&self, vm: VmId, page: u32, frame: FrameNo) -> Result<MergeOutcome> {
        self.core.share(Mapper { vm, page }, frame)
    }

    /// Merges two guest pages if their 4 KiB are equal (compared under write
    /// protection): every page mapping either frame ends on one frame.
    pub fn merge_pages(&self, a: (VmId, u32), b: (VmId, u32)) -> Result<MergeOutcome> {
        self.core.merge_pages(Mapper { vm: a.0, page: a.1 }, Mapper { vm: b.0, page: b.1 })
    }

    /// Gives the page a private frame (copy) or takes its merged frame over
    /// (reuse), as a write would. Returns whether anything changed.
    pub fn unshare(&self, vm: VmId, page: u32) -> Result<bool> {
        self.core.unshare(Mapper { vm, page })
    }

    /// Moves `frame`'s content to a newly allocated frame and remaps every guest
    /// page mapping it; returns the new frame.
    pub fn migrate(&self, frame: FrameNo) -> Result<FrameNo> {
        self.core.migrate(frame, None)
    }

    /// Like [`MemoryManager::migrate`] to the free frame `target` (compaction).
    pub fn migrate_to(&self, frame: FrameNo, target: FrameNo) -> Result<FrameNo> {
        self.core.migrate(frame, Some(target))
    }

    /// Loads the RAM image `file` (byte `n` = guest-physical address `n`, exactly
    /// the guest's size) into VM `vm`'s guest RAM, before the VM starts: all-zero
    /// pages are left without host memory (see [`crate::image_load`]).
    pub fn load_image(&self, vm: VmId, file: &std::fs::File) -> image_load::Result<ImageLoad> {
        image_load::load(&self.core, vm, file)
    }

    /// Balloon: drops the page's content and host memory; it reads as zero after.
    pub fn discard(&self, vm: VmId, page: u32) -> Result<()> {
        self.core.discard(Mapper { vm, page })
    }

    /// Balloon: discards pages `first..first + count` of `vm` in batches of at most
    /// [`DISCARD_BATCH`] pages, one hold of the lock each; each reads as zero after, and its next write
    /// is seen. The range is checked whole before any change.
    pub fn discard_range(&self, vm: VmId, first: u32, count: u32) -> Result<DiscardReport> {
        self.core.discard_range(vm, first, count)
    }

    /// Write-protects a page; its next write is resolved by the fault handler
    /// (which records it as written).
    pub fn protect(&self, vm: VmId, page: u32) -> Result<()> {
        self.core.protect(Mapper { vm, page })
    }

    /// Turns background reuse on (the default) or off: with it on, a merged
    /// frame whose other mappers all left is made writable in place by the
    /// fault handler's thread between faults (counted in
    /// `cow_background_reuses`), so its last mapper's next write does not
    /// fault; off, that write reuses the frame at fault time (`cow_reuses`).
    /// Turning it off forgets the pages queued.
    pub fn set_background_reuse(&self, on: bool) {
        self.core.set_background_reuse(on);
    }

    /// Runs the background reuse of every page queued now, on the calling
    /// thread (the fault handler's thread does it on its own: for tests and
    /// benchmarks that want it done at a known instant).
    pub fn drain_background_reuse(&self) {
        self.core.drain_background_reuse_all();
    }

    /// Pages queued for background reuse and not yet drained (see
    /// [`MemoryManager::set_background_reuse`]).
    pub fn background_reuse_pending(&self) -> usize {
        self.core.background_reuse_pending()
    }

    /// Removes explicit write protection (fails for pages of shared frames).
    pub fn unprotect(&self, vm: VmId, page: u32) -> Result<()> {
        self.core.unprotect(Mapper { vm, page })
    }

    /// The frame backing a guest page.
    pub fn frame_of(&self, vm: VmId, page: u32) -> Result<FrameNo> {
        Ok(self.core.entry(Mapper { vm, page })?.frame)
    }

    /// The flags of a guest page.
    pub fn page_flags(&self, vm: VmId, page: u32) -> Result<PageFlags> {
        Ok(self.core.entry(Mapper { vm, page })?.flags)
    }

    /// Number of guest pages mapping `frame`.
    pub fn frame_refs(&self, frame: FrameNo) -> u32 {
        self.core.lock().frames().refs(frame)
    }

    /// Whether `frame` is one of the pool's zero region (never written, mapped
    /// read-only by dropped pages of every VM: it holds no guest's data, so its
    /// sharing across domains leaks nothing; see `core/zero_region.rs`).
    pub fn is_zero_region_frame(&self, frame: FrameNo) -> bool {
        self.core.lock().pool().is_zero_frame(frame)
    }

    /// Free 4 KiB frames in 2 MiB frame `hf` (frames `hf * 512..(hf + 1) * 512`;
    /// 0 outside the pool).
    pub fn huge_frame_free(&self, hf: u32) -> u32 {
        self.core.lock().pool().buddy().free_in_huge_frame(hf)
    }

    /// The guest pages mapping `frame`, as (vm, page).
    pub fn frame_mappers(&self, frame: FrameNo) -> Vec<(VmId, u32)> {
        let st = self.core.lock();
        st.frames().mappers(frame).into_iter().map(|m| (m.vm, m.page)).collect()
    }

    /// Runs one compaction pass now, at full rate: empties the least occupied
    /// 2 MiB frames into the holes of the fullest ones and returns the emptied
    /// ones to the host (see [`crate::compact`]). Waits for a proactive pass in
    /// progress to end first.
    pub fn compact(&self) -> Result<CompactionReport> {
        Ok(self.compactor.compact())
    }

    /// The compaction tunables in force.
    pub fn compaction_tunables(&self) -> CompactionTunables {
        self.compactor.tunables()
    }

    /// Validates `patch` (one range check), applies it to the compaction
    /// tunables and wakes the background compactor; returns the tunables now
    /// in force. An invalid patch changes nothing.
    pub fn update_compaction(&self, patch: &CompactionTunablesPatch) -> Result<CompactionTunables> {
        Ok(self.compactor.update(patch)?)
    }

    /// The pool's fragmentation and the compactor's totals.
    pub fn compaction_stats(&self) -> CompactionStats {
        self.compactor.stats()
    }

    /// A snapshot of the statistics, without waiting for the manager's lock:
    /// the figures kept under it are the last ones its holders published (one
    /// instant of the state, consistent with each other; every operation that
    /// returned before this call is in them, except at worst those that ended
    /// just before while a write fault holds the lock over 200 µs). Exact once
    /// merging, compaction and writers are quiet; see
    /// [`MemoryManager::stats_exact`] for the figures of this very instant.
    pub fn stats(&self) -> MemoryStats {
        self.stats_of(&self.core.figures())
    }

    /// Like [`MemoryManager::stats`], but the figures kept under the manager's
    /// lock are taken under it now (waiting behind merging, compaction and
    /// faults): for checks and as the baseline of the latency benchmark.
    pub fn stats_exact(&self) -> MemoryStats {
        self.stats_of(&self.core.figures_exact())
    }

    fn stats_of(&self, figures: &Figures) -> MemoryStats {
        let mut stats = MemoryStats::collect(&self.core, figures, self.protector.counters());
        stats.count_process_vmas(&self.process_vmas);
        stats.merge = self.merger.stats_with(figures);
        stats.compaction = self.compactor.stats_with(figures);
        stats
    }

    /// The memory commitment policy in force.
    pub fn commit_policy(&self) -> CommitPolicy {
        self.core.commit.policy()
    }

    /// Replaces the memory commitment policy (an overcommit ratio outside
    /// `1..=`[`MAX_OVERCOMMIT_RATIO`] is refused). VMs already created stay;
    /// the policy applies to the next creations.
    pub fn set_commit_policy(&self, policy: CommitPolicy) -> Result<()> {
        Ok(self.core.commit.set_policy(policy)?)
    }

    /// Guest memory committed now, in bytes: the sizes of every VM, merged or not.
    pub fn committed_bytes(&self) -> u64 {
        crate::core::guests::committed_pages(&self.core.lock()) * PAGE_SIZE as u64
    }

    /// Registers the handler told when a copy-on-write of `vm` finds no free
    /// frame (see [`OutOfMemoryHandler`]); replaces an earlier one, dropped
    /// with the VM.
    pub fn set_out_of_memory_handler(&self, vm: VmId, handler: Box<dyn OutOfMemoryHandler>) -> Result<()> {
        if !self.core.lock().has_vm(vm) {
            return Err(Error::UnknownVm(vm));
        }
        self.core.commit.set_handler(vm, Arc::from(handler));
        Ok(())
    }

    /// Whether a copy-on-write of `vm` found no free frame (its writers stay
    /// blocked until [`MemoryManager::retry_out_of_memory`] or its destruction).
    pub fn is_out_of_memory(&self, vm: VmId) -> bool {
        self.core.commit.is_out_of_memory(vm)
    }

    /// Clears `vm`'s out-of-memory mark and wakes every blocked writer of its
    /// RAM: each faults again, and gets a frame if there is one now (or marks
    /// the VM again). Returns whether the VM was marked.
    pub fn retry_out_of_memory(&self, vm: VmId) -> Result<bool> {
        let (host, len) = {
            let st = self.core.lock();
            let table = st.table(vm).ok_or(Error::UnknownVm(vm))?;
            (table.host_addr(), table.len() as usize * PAGE_SIZE)
        };
        let was = self.core.commit.clear_out_of_memory(vm);
        self.protector.uffd().wake(host, len)?;
        Ok(was)
    }

    /// Frames unmerging every page needs, and frames free: one frame per
    /// guest page mapping a shared frame beyond the first of each, and one per
    /// merged zero page mapping the pool's zero region.
    pub fn unmerge_room(&self) -> (u64, u64) {
        let st = self.core.lock();
        let frames = st.frames();
        // A merged zero page on the pool's zero region needs a frame of its own
        // when unmerged (one that fell back to a punched frame of its own does not).
        let merged_zero: u64 = st
            .tables()
            .map(|(_, t)| {
                t.entries()
                    .iter()
                    .filter(|e| e.flags.contains(PageFlags::MERGED_ZERO) && st.pool().is_zero_frame(e.frame))
                    .count() as u64
            })
            .sum();
        (frames.shared_mappings() - frames.shared_frames() + merged_zero, st.pool().buddy().free_frames())
    }

    /// The merger's unmerge-all ([`Merger::unmerge_all`]), refused up front with
    /// [`CommitError::NoRoomToUnmerge`] (naming the frames missing) when the
    /// pool has too few free frames, which can only happen with overcommit;
    /// a failure that turns out to be for lack of frames is reported the same way.
    pub fn unmerge_all(&self) -> Result<u64> {
        self.check_unmerge_room()?;
        match self.merger.unmerge_all() {
            Ok(n) => Ok(n),
            Err(e) => {
                self.check_unmerge_room()?;
                Err(e.into())
            }
        }
    }

    fn check_unmerge_room(&self) -> Result<()> {
        let (needed, free) = self.unmerge_room();
        if needed > free {
            return Err(CommitError::NoRoomToUnmerge { needed, free, missing: needed - free }.into());
        }
        Ok(())
    }

    /// Bytes per guest page / frame.
    pub const fn page_size() -> usize {
        PAGE_SIZE
    }
}

impl Drop for MemoryManager {
    fn drop(&mut self) {
        // The scanner and compaction threads hold the core: stop them before
        // the Protector goes.
        self.compactor.shutdown();
        self.merger.shutdown();
        // No guest is left (each holds the manager): the raised
        // vm.max_map_count is no longer needed by this manager.
        self.core.lock().release_vma_budget();
    }
}
