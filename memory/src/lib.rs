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

#![deny(missing_docs)]

pub mod buddy;
pub mod frame_table;
pub mod guest_map;
pub mod manager;
pub mod memory_stats;
pub mod merge;
pub mod page_table;
pub mod pool;
pub mod protector;
pub mod remap;
pub mod uffd;
pub mod vcpu_gate;
pub mod vma_budget;
pub mod write_retry;

mod core;
mod sys;

pub use buddy::BuddyAllocator;
pub use guest_map::GuestMap;
pub use manager::{ManagerConfig, MemoryManager};
pub use memory_stats::MemoryStats;
pub use merge::{
    ChangeDetection, DirtyLog, DomainId, MergeStats, Merger, Tunables, VcpuGate, VmMergeConfig, VmMergeStats,
};
pub use page_table::PageFlags;
pub use pool::{FramePool, PoolConfig, ThpStatus};
pub use protector::Protector;
pub use remap::RemapProtocol;

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
