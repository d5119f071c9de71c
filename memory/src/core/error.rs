//! The error of every operation of the memory core (re-exported as
//! `memory::manager::Error`).

use std::io;

use super::commit;
use super::merge_settings::DomainId;
use crate::compact::tunables as compact_tunables;
use crate::merge::error as merge_error;
use crate::{frame_table, pool, protector, remap, uffd};
use crate::{FrameNo, VmId};

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
    /// As many guests exist as the write-retry table can protect.
    #[error("too many guests: {0}")]
    TooManyGuests(#[from] crate::write_retry::RangeTableFull),
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
    /// The page maps the pool's zero region: it cannot be made writable in place.
    #[error("VM {0} page {1} maps the zero region")]
    ZeroRegion(VmId, u32),
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
    Merge(#[from] merge_error::Error),
    /// A compaction tunable is out of range.
    #[error(transparent)]
    Compaction(#[from] compact_tunables::Error),
    /// Memory commitment refused the request (see [`commit`]).
    #[error(transparent)]
    Commit(#[from] commit::Error),
    /// Starting the compaction thread failed.
    #[error("starting the compaction thread: {0}")]
    CompactionThread(io::Error),
}

/// Result type of the memory core.
pub type Result<T> = std::result::Result<T, Error>;
