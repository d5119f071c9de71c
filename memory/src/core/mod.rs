//! The memory core: [`Core`] (the manager's lock around [`State`], the
//! userfaultfd and the per-VM registrations) and every operation on it.
//!
//! All state sits behind one lock. Every operation that changes a mapping
//! (merge, share, unshare, migrate, discard, protect, fault resolution, device
//! writes) holds it from the first write-protect to the end of the remap, so
//! "wait for an in-flight merge or migration" is simply "take the lock": the
//! fault resolver only ever sees pages between operations.
//!
//! Files, low to high (each imports only files above it in this list):
//!
//! - [`error`]: [`Error`] and [`Result`] of every core operation;
//! - [`commit`]: memory commitment (admission, VMs out of memory);
//! - [`counters`]: the event [`Counters`] kept under the lock;
//! - [`merge_settings`]: per-VM merge settings and the [`DirtyLog`] trait;
//! - [`state`]: [`State`], its fields private, changed through intent-named
//!   methods that keep refcounts, page tables and the pool in step;
//! - [`txn`]: [`Txn`], one lock-holding operation's page primitives (protect,
//!   move a page, copy-on-write, reuse, domain check);
//! - [`unshare`]: giving a range of pages private frames again (batched);
//! - [`zero_region`]: pages whose content was dropped map the pool's zero
//!   region (moving there in runs, leaving on a write);
//! - this file: [`Core`], the lock and its fault-first discipline;
//! - [`balloon`], [`fault`], [`guests`], [`page_ops`], [`registry`]: the
//!   `impl Core` blocks (batched discard of page ranges; fault resolution;
//!   guest creation and destruction; merge, share, unshare, migrate, discard,
//!   protect and device I/O; per-VM registrations).

pub(crate) mod balloon;
pub(crate) mod commit;
pub(crate) mod counters;
pub(crate) mod error;
pub(crate) mod fault;
pub(crate) mod guests;
pub(crate) mod merge_settings;
pub(crate) mod page_ops;
pub(crate) mod registry;
pub(crate) mod state;
pub(crate) mod txn;
pub(crate) mod unshare;
pub(crate) mod zero_region;

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use commit::{CommitPolicy, OutOfMemoryHandler};
pub use counters::Counters;
pub use error::{Error, Result};
pub use merge_settings::{DirtyLog, DomainId, VmMergeConfig};
pub(crate) use state::State;
pub(crate) use txn::Txn;

use crate::pool::FramePool;
use crate::remap::RemapProtocol;
use crate::uffd::Uffd;
use crate::vcpu_gate::VcpuGate;
use crate::vma_budget::VmaBudget;
use crate::VmId;

/// Shared core: the lock, the userfaultfd and immutable facts.
pub(crate) struct Core {
    state: Mutex<State>,
    uffd: Arc<Uffd>,
    memfd: RawFd,
    huge_pages: bool,
    /// Fault-resolving threads waiting for the lock (long lock holders yield to them).
    fault_waiters: AtomicU32,
    /// Dirty-page sources registered per VM (called without the state lock).
    dirty_logs: Mutex<HashMap<VmId, Arc<dyn DirtyLog>>>,
    /// vCPU gates registered per VM (see [`crate::vcpu_gate`]).
    vcpu_gates: Mutex<HashMap<VmId, Arc<dyn VcpuGate>>>,
    /// Commitment policy and VMs out of memory (see [`commit`]).
    pub(crate) commit: commit::Commitment,
}

impl Core {
    /// A core over `pool` (frames handed out by the buddy allocator, VMA
    /// accounting by `budget`), protecting pages through `uffd`.
    pub(crate) fn new(pool: FramePool, budget: VmaBudget, uffd: Arc<Uffd>) -> Self {
        let huge_pages = pool.thp().requested;
        let memfd = pool.fd();
        Core {
            state: Mutex::new(State::new(pool, budget)),
            uffd,
            memfd,
            huge_pages,
            fault_waiters: AtomicU32::new(0),
            dirty_logs: Mutex::new(HashMap::new()),
            vcpu_gates: Mutex::new(HashMap::new()),
            commit: commit::Commitment::default(),
        }
    }

    /// Takes the manager's lock.
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

    /// Whether a fault resolver waits for the lock (long lock holders end
    /// their batch early).
    pub(crate) fn faults_waiting(&self) -> bool {
        self.fault_waiters.load(Ordering::Acquire) > 0
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

    /// The remap protocol over this core's userfaultfd and pool memfd.
    pub(crate) fn remap(&self) -> RemapProtocol<'_> {
        RemapProtocol::new(&self.uffd, self.memfd, self.huge_pages)
    }

    /// Runs `f` as one transaction under the lock.
    pub(crate) fn with_txn<T>(&self, f: impl FnOnce(&mut Txn<'_>) -> Result<T>) -> Result<T> {
        let mut guard = self.lock();
        let mut txn = Txn::new(&mut guard, self.remap());
        f(&mut txn)
    }
}
