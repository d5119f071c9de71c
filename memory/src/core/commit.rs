//! Memory commitment: which VMs the pool admits, and what happens to a VM
//! whose copy-on-write finds no free frame.
//!
//! ## Admission on committed memory
//!
//! A VM's whole guest size is *committed* when it is created, and stays
//! committed until it is destroyed: merging frees frames but not commitment.
//! The pool admits a new VM only if
//!
//! ```text
//! committed + new <= frames_total * overcommit_ratio
//! ```
//!
//! With the default ratio of 1 (no overcommit) live frames never outnumber
//! committed guest pages, so every copy-on-write finds a free frame. With a
//! ratio above 1 the pool also keeps `cow_reserve_frames` free at admission
//! (`free - new >= reserve`): frames held back for the copies-on-write of
//! merged pages. Overcommit is a bet that merged pages stay merged; when it is
//! lost, a copy-on-write can find no frame (below).
//!
//! ## A copy-on-write without a frame
//!
//! The fault resolver ([`super::fault`]) does not retry it: it counts it
//! (`cow_no_frame`), marks the VM out of memory (a warning is logged once per
//! VM), calls the VM's [`OutOfMemoryHandler`] (the VMM stops the VM with an
//! exit reason), and leaves the writer **blocked** in the userfaultfd (the
//! Protector does not wake it): no retry loop, no CPU spent. The writer is
//! woken when the VM is destroyed (a vCPU is also interrupted by the kick
//! signal that stops it: KVM's faults wait interruptibly) or by
//! [`crate::MemoryManager::retry_out_of_memory`] once frames are free again,
//! which clears the mark and lets every writer of the VM fault again.
//!
//! Lock order: the manager's lock before any lock of this module; the
//! handlers are called with no lock held.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::{VmId, PAGE_SIZE};

/// Largest overcommit ratio accepted.
pub const MAX_OVERCOMMIT_RATIO: f64 = 16.0;

/// Errors of memory commitment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pool's commitment limit would be exceeded.
    #[error(
        "memory commitment exceeded: {committed_mib} MiB committed + {requested_mib} MiB requested > \
         {limit_mib} MiB limit ({pool_mib} MiB pool x overcommit ratio {ratio})"
    )]
    Overcommitted {
        /// Guest memory committed now, in MiB.
        committed_mib: u64,
        /// The new VM's guest memory, in MiB.
        requested_mib: u64,
        /// The commitment limit, in MiB.
        limit_mib: u64,
        /// The pool's capacity, in MiB.
        pool_mib: u64,
        /// The overcommit ratio in force.
        ratio: f64,
    },
    /// With overcommit, the new VM would eat into the copy-on-write reserve.
    #[error(
        "copy-on-write reserve: the pool has {free} free frames, the VM needs {needed} and \
         {reserve} are held back for copy-on-write"
    )]
    Reserve {
        /// Free frames.
        free: u64,
        /// Frames the VM needs.
        needed: u64,
        /// Frames held back.
        reserve: u64,
    },
    /// Unmerging every page needs more free frames than the pool has.
    #[error("unmerging needs {needed} free frames, the pool has {free} (missing {missing})")]
    NoRoomToUnmerge {
        /// Frames the unmerge needs (one per page mapping a shared frame, beyond the first).
        needed: u64,
        /// Free frames.
        free: u64,
        /// `needed - free`.
        missing: u64,
    },
    /// An invalid commitment policy.
    #[error("overcommit ratio must be within 1..={MAX_OVERCOMMIT_RATIO}, got {0}")]
    BadRatio(f64),
}

/// How much guest memory the pool admits (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CommitPolicy {
    /// Committed guest memory admitted per byte of pool capacity (1 = no
    /// overcommit; at most [`MAX_OVERCOMMIT_RATIO`]).
    pub overcommit_ratio: f64,
    /// With overcommit: frames a new VM must leave free for copies-on-write.
    pub cow_reserve_frames: u64,
}

impl Default for CommitPolicy {
    fn default() -> Self {
        CommitPolicy { overcommit_ratio: 1.0, cow_reserve_frames: 0 }
    }
}

impl CommitPolicy {
    /// Checks the ratio's range.
    pub fn validate(&self) -> Result<(), Error> {
        let r = self.overcommit_ratio;
        if !r.is_finite() || !(1.0..=MAX_OVERCOMMIT_RATIO).contains(&r) {
            return Err(Error::BadRatio(r));
        }
        Ok(())
    }

    /// The commitment limit, in pages, of a pool of `frames_total` frames.
    pub fn limit_pages(&self, frames_total: u64) -> u64 {
        (frames_total as f64 * self.overcommit_ratio) as u64
    }

    /// Whether a VM of `new` pages may be created with `committed` pages
    /// committed and `free` of `total` frames free.
    pub fn admit(&self, total: u64, free: u64, committed: u64, new: u64) -> Result<(), Error> {
        let limit = self.limit_pages(total);
        if committed.saturating_add(new) > limit {
            return Err(Error::Overcommitted {
                committed_mib: mib(committed),
                requested_mib: mib(new),
                limit_mib: mib(limit),
                pool_mib: mib(total),
                ratio: self.overcommit_ratio,
            });
        }
        let reserve = if self.overcommit_ratio > 1.0 { self.cow_reserve_frames } else { 0 };
        if free < new.saturating_add(reserve) {
            return Err(Error::Reserve { free, needed: new, reserve });
        }
        Ok(())
    }
}

/// MiB of `pages` 4 KiB pages, rounded up.
fn mib(pages: u64) -> u64 {
    (pages * PAGE_SIZE as u64).div_ceil(1 << 20)
}

/// Told when a VM's copy-on-write found no free frame (the VMM stops the VM).
/// Called on the fault-handling thread with no lock held: it must not block.
pub trait OutOfMemoryHandler: Send + Sync {
    /// VM `vm` is out of memory; `reason` says why, for its exit reason.
    fn out_of_memory(&self, vm: VmId, reason: &str);
}

/// The commitment policy in force and the VMs out of memory.
#[derive(Default)]
pub(crate) struct Commitment {
    policy: Mutex<CommitPolicy>,
    out_of_memory: Mutex<HashSet<VmId>>,
    handlers: Mutex<HashMap<VmId, Arc<dyn OutOfMemoryHandler>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Commitment {
    /// The policy in force.
    pub(crate) fn policy(&self) -> CommitPolicy {
        *lock(&self.policy)
    }

    /// Replaces the policy (validated); VMs already admitted stay.
    pub(crate) fn set_policy(&self, policy: CommitPolicy) -> Result<(), Error> {
        policy.validate()?;
        *lock(&self.policy) = policy;
        Ok(())
    }

    /// Registers the out-of-memory handler of `vm` (replaces an earlier one).
    pub(crate) fn set_handler(&self, vm: VmId, handler: Arc<dyn OutOfMemoryHandler>) {
        lock(&self.handlers).insert(vm, handler);
    }

    /// Whether `vm` is marked out of memory.
    pub(crate) fn is_out_of_memory(&self, vm: VmId) -> bool {
        lock(&self.out_of_memory).contains(&vm)
    }

    /// Marks `vm` out of memory (under the manager's lock, so that a VM
    /// destroyed meanwhile leaves no mark); returns whether it is new, in which
    /// case the caller calls [`Commitment::notify_out_of_memory`] once the lock
    /// is released.
    pub(crate) fn mark_out_of_memory(&self, vm: VmId) -> bool {
        lock(&self.out_of_memory).insert(vm)
    }

    /// Logs (once per marking) that `vm` is out of memory, naming the faulting
    /// `addr`, and tells its handler. Call with no lock held.
    pub(crate) fn notify_out_of_memory(&self, vm: VmId, addr: usize) {
        let reason = "out of memory: a copy-on-write found no free frame in the pool \
                      (the pool is overcommitted: see the memory commitment policy)";
        tracing::warn!(
            vm,
            "{reason}; write fault at {addr:#x}; the VM's writers stay blocked until it is stopped or retried"
        );
        let handler = lock(&self.handlers).get(&vm).cloned();
        if let Some(h) = handler {
            h.out_of_memory(vm, reason);
        }
    }

    /// Clears the mark of `vm`; returns whether it was set.
    pub(crate) fn clear_out_of_memory(&self, vm: VmId) -> bool {
        lock(&self.out_of_memory).remove(&vm)
    }

    /// Forgets `vm` (destroyed).
    pub(crate) fn forget(&self, vm: VmId) {
        self.clear_out_of_memory(vm);
        lock(&self.handlers).remove(&vm);
    }

    /// VMs marked out of memory now.
    pub(crate) fn out_of_memory_count(&self) -> u64 {
        lock(&self.out_of_memory).len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission() {
        let p = CommitPolicy::default();
        assert!(p.admit(1000, 1000, 0, 1000).is_ok());
        assert!(matches!(p.admit(1000, 600, 500, 501), Err(Error::Overcommitted { .. })));
        // Free frames do not matter without overcommit beyond the limit check.
        let over = CommitPolicy { overcommit_ratio: 2.0, cow_reserve_frames: 10 };
        assert!(over.admit(1000, 500, 1000, 490).is_ok());
        assert!(matches!(over.admit(1000, 500, 1000, 491), Err(Error::Reserve { .. })));
        assert!(matches!(over.admit(1000, 5000, 1990, 11), Err(Error::Overcommitted { .. })));
        for bad in [0.5, f64::NAN, f64::INFINITY, 17.0] {
            assert!(CommitPolicy { overcommit_ratio: bad, cow_reserve_frames: 0 }.validate().is_err());
        }
        let e = p.admit(512, 0, 512, 256).unwrap_err().to_string();
        assert_eq!(e, "memory commitment exceeded: 2 MiB committed + 1 MiB requested > 2 MiB limit (2 MiB pool x overcommit ratio 1)");
    }
}
