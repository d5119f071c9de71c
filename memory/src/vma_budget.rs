//! The VMA budget: every scattered remapped guest page is its own VMA, and the
//! kernel caps a process at `vm.max_map_count` of them (65530 by default, about
//! 32 K scattered shared pages).
//!
//! At start the budget raises `/proc/sys/vm/max_map_count` (when allowed, i.e.
//! as root) to what the pool can need in the worst case: one VMA per frame plus
//! what the process already uses plus a margin. When it cannot, sharing beyond
//! the limit is refused with a counted reason. Sharing keeps a reserve of two
//! VMAs per shared mapping, which is the most a copy-on-write of that page can
//! add, so a copy-on-write never fails for lack of VMAs.

use std::io;

use serde::Serialize;

const MAX_MAP_COUNT: &str = "/proc/sys/vm/max_map_count";
/// Mappings kept free for the rest of the process (threads, libraries, KVM).
const MARGIN: usize = 4096;

/// State of the VMA budget.
#[derive(Debug, Clone, Serialize)]
pub struct VmaBudget {
    /// `vm.max_map_count` in force.
    pub limit: usize,
    /// Mappings the process had before any guest was created.
    pub baseline: usize,
    /// Value `max_map_count` was raised to by this process, if it did.
    pub raised_to: Option<usize>,
    /// Why the limit could not be raised, if it could not.
    pub raise_error: Option<String>,
    /// Share/merge/migrate requests refused because of the budget.
    pub refused: u64,
}

impl VmaBudget {
    /// Reads the limit and, if `raise` is set and the pool of `pool_frames` frames
    /// could need more, raises it.
    pub fn new(pool_frames: u64, raise: bool) -> Self {
        let baseline = crate::sys::process_map_count().unwrap_or(MARGIN);
        let limit = read_limit().unwrap_or(65530);
        let needed = baseline + MARGIN + pool_frames as usize;
        let mut budget = VmaBudget { limit, baseline, raised_to: None, raise_error: None, refused: 0 };
        if raise && limit < needed {
            match std::fs::write(MAX_MAP_COUNT, needed.to_string()) {
                Ok(()) => {
                    budget.limit = read_limit().unwrap_or(needed);
                    budget.raised_to = Some(budget.limit);
                    tracing::info!("raised vm.max_map_count from {limit} to {}", budget.limit);
                }
                Err(e) => {
                    tracing::warn!("cannot raise vm.max_map_count to {needed}: {e}");
                    budget.raise_error = Some(e.to_string());
                }
            }
        }
        budget
    }

    /// Whether an operation that may add up to `new_vmas` VMAs (and will then
    /// have `shared_mappings` mappings of shared frames) fits, given the guest
    /// maps use `guest_vmas` now. Counts a refusal when it does not.
    pub fn admit(&mut self, guest_vmas: usize, shared_mappings: u64, new_vmas: usize) -> bool {
        let needed = self.baseline
            + MARGIN
            + guest_vmas
            + new_vmas
            + 2 * usize::try_from(shared_mappings).unwrap_or(usize::MAX / 4);
        if needed <= self.limit {
            return true;
        }
        self.refused += 1;
        false
    }
}

fn read_limit() -> io::Result<usize> {
    std::fs::read_to_string(MAX_MAP_COUNT)?.trim().parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
