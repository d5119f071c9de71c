//! The memory manager: owner of the frame pool, every VM's page table and the
//! Protector. Shared as `Arc<MemoryManager>` (Send + Sync).
//!
//! All state sits behind one lock. Every operation that changes a mapping
//! (merge, share, unshare, migrate, discard, protect, fault resolution, device
//! writes) holds it from the first write-protect to the end of the remap, so
//! "wait for an in-flight merge or migration" is simply "take the lock": the
//! fault resolver only ever sees pages between operations.
//!
//! ## Frames are allocated up front
//!
//! `create_guest` allocates every frame of the VM at once, in blocks of the
//! largest order available (2 MiB frames when the pool has them), and maps each
//! run of consecutive frames with one `mmap`. An allocated but never written
//! memfd frame costs no host memory, so this is cheap, keeps the VM at one or a
//! few VMAs, and first touches are ordinary shmem faults that never reach the
//! userfaultfd handler (lazy allocation would need a missing-page handler on
//! every first touch and would scatter the VM over many VMAs). The price is pool
//! capacity (address space, not memory): the pool must be at least as large as
//! all guests together, which also guarantees that a copy-on-write always finds
//! a free frame (live frames never outnumber guest pages).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::frame_table::{self, FrameTable, Mapper};
use crate::guest_map::GuestMap;
use crate::merge::{self, DirtyLog, DomainId, Merger, VcpuGate, VmMergeConfig, VmMergeStats};
use crate::page_table::{PageFlags, PageTable};
use crate::pool::{self, FramePool, PoolConfig};
use crate::protector::{self, Protector};
use crate::remap::{self, RemapProtocol};
use crate::stats::{Counters, MemoryStats};
use crate::uffd::{self, Uffd};
use crate::vma_budget::VmaBudget;
use crate::{FrameNo, VmId, PAGE_SIZE};

/// Errors of the memory manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Frame pool failure.
    #[error(transparent)]
    Pool(#[from] pool::Error),
    /// Userfaultfd failure.
    #[error(transparent)]
    Uffd(#[from] uffd::Error),
    /// Protector failure.
    #[error(transparent)]
    Protector(#[from] protector::Error),
    /// Remap failure.
    #[error(transparent)]
    Remap(#[from] remap::Error),
    /// Frame table inconsistency.
    #[error(transparent)]
    FrameTable(#[from] frame_table::Error),
    /// Reserving or mapping a guest range failed.
    #[error("guest range: {0}")]
    Mapping(io::Error),
    /// No VM with this id.
    #[error("no VM {0}")]
    UnknownVm(VmId),
    /// A VM with this id exists already.
    #[error("VM {0} exists already")]
    VmExists(VmId),
    /// Guest size zero or not a multiple of 4 KiB.
    #[error("guest size {0} is not a positive multiple of 4 KiB")]
    BadSize(u64),
    /// The pool has fewer free frames than the guest needs.
    #[error("pool has {free} free frames, guest needs {needed}")]
    PoolFull {
        /// Free frames.
        free: u64,
        /// Frames needed.
        needed: u64,
    },
    /// Guest page or guest-physical range outside the VM.
    #[error("VM {0}: page {1} outside guest RAM")]
    OutOfRange(VmId, u64),
    /// The frame has no mapper.
    #[error("frame {0} is not mapped by any guest page")]
    FrameNotLive(FrameNo),
    /// Sharing refused: the VMA budget is exhausted (see `vma_refused` in stats).
    #[error("sharing refused: VMA budget exhausted")]
    VmaBudget,
    /// The page maps a shared frame; use `unshare` first.
    #[error("VM {0} page {1} maps a shared frame")]
    Shared(VmId, u32),
    /// Sharing refused: the pages belong to different merge domains.
    #[error("VM {a} (domain {da}) and VM {b} (domain {db}) are in different merge domains")]
    CrossDomain {
        /// The VM whose page would map the frame.
        a: VmId,
        /// Its domain.
        da: DomainId,
        /// A VM already mapping the frame.
        b: VmId,
        /// Its domain.
        db: DomainId,
    },
    /// The merger failed.
    #[error(transparent)]
    Merge(#[from] merge::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

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
}

impl ManagerConfig {
    /// A configuration with a pool of `capacity_bytes` and default settings.
    pub fn with_capacity(capacity_bytes: u64) -> Self {
        ManagerConfig {
            pool: PoolConfig { capacity_bytes, transparent_huge_pages: false },
            raise_max_map_count: true,
            install_write_retry: true,
        }
    }
}

/// Result of a merge attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOutcome {
    /// Both pages now map `frame` (write-protected, shared).
    Merged {
        /// The frame kept.
        frame: FrameNo,
    },
    /// The pages already mapped the same frame.
    AlreadyShared,
    /// The contents differ; nothing changed.
    Differs,
}

/// Everything behind the manager's lock.
pub(crate) struct State {
    pub(crate) pool: FramePool,
    pub(crate) frames: FrameTable,
    pub(crate) vms: HashMap<VmId, PageTable>,
    pub(crate) ranges: BTreeMap<usize, VmId>,
    pub(crate) budget: VmaBudget,
    pub(crate) counters: Counters,
    /// Merge settings of VMs that have any (absent: disabled, own domain).
    pub(crate) merge_cfg: HashMap<VmId, VmMergeConfig>,
}

impl State {
    /// VMAs the guest maps use now.
    pub(crate) fn guest_vmas(&self) -> usize {
        self.vms.values().map(PageTable::vma_count).sum()
    }

    /// The VM and page at host address `addr`.
    pub(crate) fn lookup(&self, addr: usize) -> Option<Mapper> {
        let (_, &vm) = self.ranges.range(..=addr).next_back()?;
        let page = self.vms.get(&vm)?.page_at(addr)?;
        Some(Mapper { vm, page })
    }

    /// Merge settings of `vm` (default: disabled, domain = its id).
    pub(crate) fn merge_config(&self, vm: VmId) -> VmMergeConfig {
        self.merge_cfg.get(&vm).copied().unwrap_or_else(|| VmMergeConfig::default_for(vm))
    }
}

/// Shared core: the lock, the userfaultfd and immutable facts.
pub(crate) struct Core {
    pub(crate) state: Mutex<State>,
    pub(crate) uffd: Arc<Uffd>,
    pub(crate) memfd: RawFd,
    pub(crate) huge_pages: bool,
    /// Fault-resolving threads waiting for the lock (long lock holders yield to them).
    pub(crate) fault_waiters: AtomicU32,
    /// Dirty-page sources registered per VM (called without the state lock).
    pub(crate) dirty_logs: Mutex<HashMap<VmId, Arc<dyn DirtyLog>>>,
    /// vCPU gates registered per VM (see [`crate::merge::VcpuGate`]).
    pub(crate) vcpu_gates: Mutex<HashMap<VmId, Arc<dyn VcpuGate>>>,
}

impl Core {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the lock on behalf of a faulting writer (others yield to it).
    pub(crate) fn lock_for_fault(&self) -> MutexGuard<'_, State> {
        self.fault_waiters.fetch_add(1, Ordering::AcqRel);
        let guard = self.lock();
        self.fault_waiters.fetch_sub(1, Ordering::AcqRel);
        guard
    }

    /// Lets waiting fault resolvers take the lock first (called between chunks
    /// of long work, with the lock released).
    pub(crate) fn yield_to_faults(&self) {
        let mut spins = 0;
        while self.fault_waiters.load(Ordering::Acquire) > 0 && spins < 10_000 {
            std::thread::yield_now();
            spins += 1;
        }
    }

    pub(crate) fn dirty_log(&self, vm: VmId) -> Option<Arc<dyn DirtyLog>> {
        self.dirty_logs.lock().unwrap_or_else(|e| e.into_inner()).get(&vm).cloned()
    }

    /// Every registered vCPU gate.
    pub(crate) fn vcpu_gates(&self) -> Vec<Arc<dyn VcpuGate>> {
        self.vcpu_gates.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    pub(crate) fn remap(&self) -> RemapProtocol<'_> {
        RemapProtocol::new(&self.uffd, self.memfd, self.huge_pages)
    }
}

/// The memory manager of one densevm process (all VMs).
pub struct MemoryManager {
    core: Arc<Core>,
    merger: Merger,
    protector: Protector,
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
        let huge_pages = pool.thp().requested;
        let memfd = pool.fd().as_raw_fd();
        let budget = VmaBudget::new(pool.buddy().total_frames(), config.raise_max_map_count);
        let state = State {
            frames: FrameTable::new(pool.buddy().huge_frames()),
            pool,
            vms: HashMap::new(),
            ranges: BTreeMap::new(),
            budget,
            counters: Counters::default(),
            merge_cfg: HashMap::new(),
        };
        let core = Arc::new(Core {
            state: Mutex::new(state),
            uffd: uffd.clone(),
            memfd,
            huge_pages,
            fault_waiters: AtomicU32::new(0),
            dirty_logs: Mutex::new(HashMap::new()),
            vcpu_gates: Mutex::new(HashMap::new()),
        });
        let resolver_core = core.clone();
        let protector = Protector::start(uffd, move |addrs| resolver_core.resolve_faults(addrs))?;
        let merger = Merger::start(core.clone())?;
        Ok(Arc::new(MemoryManager { core, merger, protector }))
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
        let st = self.core.lock();
        if !st.vms.contains_key(&vm) {
            return Err(Error::UnknownVm(vm));
        }
        Ok(st.merge_config(vm))
    }

    /// Registers the dirty-page source of `vm` (the VMM's KVM dirty log); the
    /// merger then uses it instead of checksums when `change_detection` is
    /// `DirtyLog`. Replaces an earlier one.
    pub fn set_dirty_log(&self, vm: VmId, log: Box<dyn DirtyLog>) -> Result<()> {
        if !self.core.lock().vms.contains_key(&vm) {
            return Err(Error::UnknownVm(vm));
        }
        self.core.dirty_logs.lock().unwrap_or_else(|e| e.into_inner()).insert(vm, Arc::from(log));
        self.merger.forget_vm(vm);
        Ok(())
    }

    /// Registers the vCPU gate of `vm`: the merger holds the VM's vCPUs out of
    /// guest mode while it remaps a chunk of its pages, when the `hold_vcpus`
    /// tunable is on (see [`crate::merge::VcpuGate`]). Replaces an earlier one;
    /// dropped with the VM.
    pub fn set_vcpu_gate(&self, vm: VmId, gate: Box<dyn VcpuGate>) -> Result<()> {
        if !self.core.lock().vms.contains_key(&vm) {
            return Err(Error::UnknownVm(vm));
        }
        self.core.vcpu_gates.lock().unwrap_or_else(|e| e.into_inner()).insert(vm, Arc::from(gate));
        Ok(())
    }

    /// Removes the dirty-page source of `vm` (checksums are used from then on).
    pub fn clear_dirty_log(&self, vm: VmId) {
        self.core.dirty_logs.lock().unwrap_or_else(|e| e.into_inner()).remove(&vm);
        self.merger.forget_vm(vm);
    }

    /// Merge statistics of one VM.
    pub fn vm_merge_stats(&self, vm: VmId) -> Result<VmMergeStats> {
        self.merger.vm_stats(vm)
    }

    /// Creates VM `vm`'s guest RAM of `size_bytes` (all frames allocated up front,
    /// registered for write protection). The VM lives until the handle drops.
    pub fn create_guest(self: &Arc<Self>, vm: VmId, size_bytes: u64) -> Result<GuestMap> {
        let host_addr = self.core.create_guest(vm, size_bytes)?;
        Ok(GuestMap::new(self.clone(), vm, host_addr, size_bytes as usize))
    }

    /// Destroys VM `vm`: unmaps its RAM and drops its frame references.
    /// Called by [`GuestMap`]'s `Drop`.
    pub fn destroy_guest(&self, vm: VmId) -> Result<()> {
        self.core.destroy_guest(vm)
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

    /// Balloon: drops the page's content and host memory; it reads as zero after.
    pub fn discard(&self, vm: VmId, page: u32) -> Result<()> {
        self.core.discard(Mapper { vm, page })
    }

    /// Write-protects a page; its next write is resolved by the fault handler
    /// (which records it as written).
    pub fn protect(&self, vm: VmId, page: u32) -> Result<()> {
        self.core.protect(Mapper { vm, page })
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
        self.core.lock().frames.refs(frame)
    }

    /// The guest pages mapping `frame`, as (vm, page).
    pub fn frame_mappers(&self, frame: FrameNo) -> Vec<(VmId, u32)> {
        let st = self.core.lock();
        st.frames.mappers(frame).into_iter().map(|m| (m.vm, m.page)).collect()
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> MemoryStats {
        let mut stats = {
            let st = self.core.lock();
            MemoryStats::collect(&st, self.protector.counters())
        };
        stats.merge = self.merger.stats();
        stats
    }

    /// Bytes per guest page / frame.
    pub const fn page_size() -> usize {
        PAGE_SIZE
    }
}

impl Drop for MemoryManager {
    fn drop(&mut self) {
        // The scanner thread holds the core: stop it before the Protector goes.
        self.merger.shutdown();
    }
}
