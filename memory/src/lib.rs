//! densevm memory manager.
//!
//! densevm owns the host memory behind every guest: one memfd ([`FramePool`]) is
//! divided into 2 MiB host frames of 512 4 KiB frames handed out by a buddy
//! allocator; each VM's guest RAM ([`GuestMap`]) is a host virtual range whose
//! pages are `mmap(MAP_FIXED|MAP_SHARED)` views of pool frames; a userfaultfd
//! ([`Protector`]) write-protects pages at the guest-physical level so that
//! frames can be shared between guest pages (merging), moved (compaction) and
//! dropped (balloon) without any writer ever landing in a shared frame.
//!
//! Entry point: [`MemoryManager::new`], then [`MemoryManager::create_guest`],
//! which returns a [`GuestMap`] whose `host_addr()..host_addr()+size()` is the
//! guest RAM to hand to KVM.
//!
//! Rules for writers of guest memory (see [`remap`] for the protocol):
//! - VMM device code writes with [`GuestMap::write_bytes`] (through the alias,
//!   after breaking sharing under the manager's lock), never by storing into
//!   the guest range.
//! - A vCPU whose `KVM_RUN` returns `EFAULT` re-enters (read-only instant of a
//!   remap); a syscall writing into guest RAM that fails with `EFAULT` retries.
//! - A host thread that does store into the guest range is covered by the
//!   SIGSEGV retry handler [`write_retry`], installed by default.
//!
//! ## Layers
//!
//! Each file imports only files of its own layer or below, and the imports
//! have no cycle (checked by `tests/layering.rs`, which holds the same list;
//! this file, with the crate-wide constants and the public re-exports, is the
//! root and outside the layers). Low to high:
//!
//! 1. syscalls: `sys.rs`;
//! 2. leaves: [`uffd`] (the descriptor and its protection ioctls), [`buddy`],
//!    [`frame_table`], [`page_table`], [`vma_budget`], [`write_retry`],
//!    [`vcpu_gate`], [`tunable_range`] (the tunables' range check and its
//!    error, shared by the merger's and the compactor's tunables), the
//!    merger's two vocabulary leaves
//!    [`merge::tunables`] and [`merge::error`] (named by the core's error),
//!    and the compactor's leaves [`compact::tunables`], [`compact::stats`]
//!    and [`compact::plan`] (its pure source/target planning);
//! 3. [`pool`] (the memfd and its buddy allocator), [`protector`] (the
//!    userfaultfd handler thread and the event side of the descriptor);
//! 4. [`remap`]: the remap protocol;
//! 5. the core vocabulary: `core/error.rs`, `core/counters.rs`,
//!    `core/merge_settings.rs`, `core/reuse_queue.rs`;
//! 6. `core/state.rs`: `State`, the manager's locked state, and
//!    `core/figures.rs`: the statistics' figures taken from it, published
//!    by the lock's holders for readers that never take the lock;
//! 7. the transaction: `core/txn.rs`, `core/unshare.rs`;
//! 8. `core/mod.rs`: `Core`, the lock;
//! 9. the core's operations (every `impl Core`): `core/background_reuse.rs`,
//!    `core/balloon.rs`, `core/fault.rs`, `core/guests.rs`, `core/page_ops.rs`,
//!    `core/registry.rs`;
//! 10. the merger's indexes and batched operations: [`merge::domains`],
//!     [`merge::zero`], [`merge::stable`], [`merge::unstable`], `merge/pages.rs`,
//!     [`merge::stats`], `merge/ops.rs`;
//! 11. `merge/scanner.rs`, then its parts `merge/backoff.rs`, `merge/visit.rs`,
//!     `merge/decide.rs`, then [`merge`] itself (`Merger`, the scanner thread);
//! 12. the compactor: [`compact::pass`] (one pass: plan, batched migrations
//!     under the lock), then [`compact`] itself (`Compactor`, the proactive
//!     thread);
//! 13. the facade: [`memory_stats`] (its wire types in `memory_stats/wire.rs`),
//!     [`manager`], [`guest_map`], [`image_load`]
//!     (bulk loading of a RAM image before a VM starts).
//!
//! A guest write fault walks down the layers once, never back up into a file
//! above (the only upward call is the Protector invoking the resolver it was
//! given): `protector.rs` (poll, read the event) → `core/fault.rs` (resolve) →
//! `core/mod.rs` (the lock, taken for a fault) → `core/txn.rs` (copy-on-write
//! or reuse) → `core/state.rs` (allocate, repoint, count) → `pool.rs`,
//! `buddy.rs`, `frame_table.rs`, `page_table.rs` → `remap/mod.rs` → `sys.rs`
//! (`mmap`) and `uffd.rs` (register) → back in `protector.rs`, the wake. The
//! facade (`manager.rs`) is not on the path.

pub mod buddy;
pub mod compact;
pub mod frame_table;
pub mod guest_map;
pub mod image_load;
pub mod manager;
pub mod memory_stats;
pub mod merge;
pub mod page_table;
pub mod pool;
pub mod protector;
pub mod remap;
pub mod thread_hook;
pub mod tunable_range;
pub mod uffd;
pub mod vcpu_gate;
pub mod vma_budget;
pub mod write_retry;

mod core;
mod sys;

pub use buddy::BuddyAllocator;
pub use compact::{
    CompactionFailures, CompactionReport, CompactionStats, CompactionTiming, CompactionTunables,
    CompactionTunablesPatch, Compactor,
};
pub use guest_map::GuestMap;
pub use image_load::ImageLoad;
pub use manager::{ManagerConfig, MemoryManager};
pub use memory_stats::{HostMemoryStats, MemoryStats, VmMemoryStats};
pub use merge::{
    ChangeDetection, DirtyLog, DomainId, MergeStats, Merger, Tunables, VcpuGate, VmMergeConfig, VmMergeStats,
};
pub use page_table::PageFlags;
pub use pool::{FramePool, PoolConfig, ThpStatus};
pub use protector::Protector;
pub use remap::RemapProtocol;
pub use thread_hook::{ThreadKind, ThreadStartHook};

/// Index of a 4 KiB frame in the pool memfd (frame `n` is at byte offset `n * PAGE_SIZE`).
pub type FrameNo = u32;

/// Identifier of a VM, chosen by the caller of [`MemoryManager::create_guest`].
pub type VmId = u32;

/// Size of a guest page and of a pool frame.
pub const PAGE_SIZE: usize = 4096;

/// Number of 4 KiB frames in one 2 MiB host frame.
pub const HUGE_FRAME_PAGES: u32 = 512;

/// Size of a 2 MiB host frame in bytes.
pub const HUGE_FRAME_SIZE: usize = PAGE_SIZE * HUGE_FRAME_PAGES as usize;

/// Largest buddy order: a block of order 9 is a whole 2 MiB host frame.
pub const MAX_ORDER: u8 = 9;
