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
//! - [`reuse_queue`]: sole-mapped merged pages waiting for background reuse;
//! - [`merge_settings`]: per-VM merge settings and the [`DirtyLog`] trait;
//! - [`state`]: [`State`], its fields private, changed through intent-named
//!   methods that keep refcounts, page tables and the pool in step;
//! - [`figures`]: the statistics' [`figures::Figures`], published by the
//!   lock's holders on a [`figures::StatsBoard`] for readers that never take
//!   the lock;
//! - [`txn`]: [`Txn`], one lock-holding operation's page primitives (protect,
//!   move a page, copy-on-write, reuse, domain check);
//! - [`unshare`]: giving a range of pages private frames again (batched);
//! - [`zero_region`]: pages whose content was dropped map the pool's zero
//!   region (moving there in runs, leaving on a write);
//! - this file: [`Core`], the lock and its fault-first discipline;
//! - [`background_reuse`], [`balloon`], [`fault`], [`guests`], [`page_ops`],
//!   [`registry`]: the `impl Core` blocks (sole-mapped merged pages made
//!   writable between faults; batched discard of page ranges; fault resolution;
//!   guest creation and destruction; merge, share, unshare, migrate, discard,
//!   protect and device I/O; per-VM registrations).

pub(crate) mod background_reuse;
pub(crate) mod balloon;
pub(crate) mod commit;
pub(crate) mod counters;
pub(crate) mod error;
pub(crate) mod fault;
pub(crate) mod figures;
pub(crate) mod guests;
pub(crate) mod merge_settings;
pub(crate) mod page_ops;
pub(crate) mod registry;
pub(crate) mod reuse_queue;
pub(crate) mod state;
pub(crate) mod txn;
pub(crate) mod unshare;
pub(crate) mod zero_region;

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Instant;

pub use commit::{CommitPolicy, OutOfMemoryHandler};
pub use counters::Counters;
pub use error::{Error, Result};
pub use merge_settings::{DirtyLog, DomainId, VmMergeConfig};
pub(crate) use state::State;
pub(crate) use txn::Txn;

use crate::pool::{FramePool, ThpStatus};
use crate::protector::Doorbell;
use crate::remap::RemapProtocol;
use crate::uffd::Uffd;
use crate::vcpu_gate::VcpuGate;
use crate::vma_budget::VmaBudget;
use crate::VmId;
use figures::{Figures, StatsBoard};

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
    /// The figures published for the statistics (see [`figures`]).
    board: StatsBoard,
    /// The pool's transparent huge page status (fixed at creation).
    thp: ThpStatus,
    /// A remap step failed and may have left a guest range read-only (see
    /// [`RemapProtocol::failed`]).
    remap_failed: AtomicBool,
    /// Rung when pages were queued for background reuse (the Protector's
    /// handler thread drains them: see [`background_reuse`]).
    bell: Arc<Doorbell>,
}

/// The manager's lock, held: the [`State`], and on release the record of a
/// change on the stats board (the rule is [`figures`]'s).
pub(crate) struct StateGuard<'a> {
    guard: MutexGuard<'a, State>,
    board: &'a StatsBoard,
    bell: &'a Doorbell,
    /// The state was borrowed mutably.
    changed: bool,
}

impl Deref for StateGuard<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        &self.guard
    }
}

impl DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.changed = true;
        &mut self.guard
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        if self.changed {
            self.board.changed(&self.guard);
            if self.guard.reuse_queue().take_ring() {
                self.bell.ring();
            }
        }
    }
}

impl Core {
    /// A core over `pool` (frames handed out by the buddy allocator, VMA
    /// accounting by `budget`), protecting pages through `uffd`.
    /// `bell` is rung when pages are queued for background reuse.
    pub(crate) fn new(pool: FramePool, budget: VmaBudget, uffd: Arc<Uffd>, bell: Arc<Doorbell>) -> Self {
        let huge_pages = pool.thp().requested;
        let memfd = pool.fd();
        let thp = pool.thp().clone();
        let state = State::new(pool, budget);
        let board = StatsBoard::new(&state);
        Core {
            state: Mutex::new(state),
            uffd,
            memfd,
            huge_pages,
            fault_waiters: AtomicU32::new(0),
            dirty_logs: Mutex::new(HashMap::new()),
            vcpu_gates: Mutex::new(HashMap::new()),
            commit: commit::Commitment::default(),
            board,
            thp,
            remap_failed: AtomicBool::new(false),
            bell,
        }
    }

    /// Takes the manager's lock (publishing the figures first if changes
    /// left them dirty: see [`figures`]).
    pub(crate) fn lock(&self) -> StateGuard<'_> {
        let guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.board.is_dirty() {
            self.board.publish(&guard);
        }
        StateGuard { guard, board: &self.board, bell: &self.bell, changed: false }
    }

    /// Takes the lock on behalf of a faulting writer (others yield to it; it
    /// leaves a dirty board to the next holder or reader).
    pub(crate) fn lock_for_fault(&self) -> StateGuard<'_> {
        self.fault_waiters.fetch_add(1, Ordering::AcqRel);
        let guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.fault_waiters.fetch_sub(1, Ordering::AcqRel);
        StateGuard { guard, board: &self.board, bell: &self.bell, changed: false }
    }

    /// The statistics' figures without waiting for the manager's lock: the
    /// last publication, made fresh first if the state changed since and the
    /// lock can be had within [`figures::READER_SPIN`].
    pub(crate) fn figures(&self) -> Arc<Figures> {
        let start = Instant::now();
        while self.board.is_dirty() {
            match self.state.try_lock() {
                Ok(st) => self.board.publish(&st),
                Err(TryLockError::Poisoned(e)) => self.board.publish(&e.into_inner()),
                Err(TryLockError::WouldBlock) if start.elapsed() < figures::READER_SPIN => std::thread::yield_now(),
                Err(TryLockError::WouldBlock) => break,
            }
        }
        self.board.load()
    }

    /// The statistics' figures now, waiting for the manager's lock (exact at
    /// the instant of the call; published for the lock-free readers too).
    pub(crate) fn figures_exact(&self) -> Arc<Figures> {
        let st = self.lock();
        self.board.publish(&st);
        drop(st);
        self.board.load()
    }

    /// The pool's transparent huge page status.
    pub(crate) fn thp(&self) -> &ThpStatus {
        &self.thp
    }

    /// The pool's memfd (for `fstat` without the lock).
    pub(crate) fn memfd(&self) -> RawFd {
        self.memfd
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
        RemapProtocol::new(&self.uffd, self.memfd, self.huge_pages, &self.remap_failed)
    }

    /// Runs `f` as one transaction under the lock.
    pub(crate) fn with_txn<T>(&self, f: impl FnOnce(&mut Txn<'_>) -> Result<T>) -> Result<T> {
        let mut guard = self.lock();
        let mut txn = Txn::new(&mut guard, self.remap());
        f(&mut txn)
    }
}
