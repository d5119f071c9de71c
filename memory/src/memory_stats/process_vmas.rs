//! [`ProcessVmas`]: the number of mappings of the whole process
//! ([`super::MemoryStats::process_vma_count`]), cached.
//!
//! Counting them reads /proc/self/maps, which grows with the mappings: tens of
//! milliseconds once merging has split guest memory into tens of thousands of
//! VMAs, and the kernel's `mmap_lock` taken against the remaps. So a reading
//! returns the last count, at most [`REFRESH_PERIOD`] old (plus the time a
//! count takes); a stale one is refreshed on a short-lived helper thread,
//! never on the reader's time (only the first reading counts itself).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sys;

/// Age after which a reading starts a new count.
pub(crate) const REFRESH_PERIOD: Duration = Duration::from_secs(1);

/// The cached count of the process's mappings.
pub(crate) struct ProcessVmas {
    count: AtomicU64,
    /// When the last count ended, in nanoseconds since `epoch` (0: never).
    counted_at: AtomicU64,
    /// A helper thread is counting.
    counting: AtomicBool,
    epoch: Instant,
}

impl ProcessVmas {
    /// A cache that has counted nothing yet.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(ProcessVmas {
            count: AtomicU64::new(0),
            counted_at: AtomicU64::new(0),
            counting: AtomicBool::new(false),
            epoch: Instant::now(),
        })
    }

    /// The number of mappings of the process (0 if /proc/self/maps cannot be read).
    pub(crate) fn get(self: &Arc<Self>) -> u64 {
        let counted_at = self.counted_at.load(Ordering::Acquire);
        if counted_at == 0 {
            self.count_now();
        } else if self.now_ns().saturating_sub(counted_at) >= REFRESH_PERIOD.as_nanos() as u64
            && !self.counting.swap(true, Ordering::AcqRel)
        {
            let me = self.clone();
            let spawned = std::thread::Builder::new().name("densevm-vmacount".into()).spawn(move || {
                me.count_now();
                me.counting.store(false, Ordering::Release);
            });
            if let Err(e) = spawned {
                tracing::warn!("cannot spawn the VMA counting thread: {e}");
                self.counting.store(false, Ordering::Release);
            }
        }
        self.count.load(Ordering::Acquire)
    }

    fn count_now(&self) {
        self.count.store(sys::process_map_count().unwrap_or(0) as u64, Ordering::Release);
        self.counted_at.store(self.now_ns().max(1), Ordering::Release);
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_once_then_refreshes_in_the_background() {
        // A cache made two periods ago, so that a count of its first instant is stale.
        let vmas = Arc::new(ProcessVmas {
            count: AtomicU64::new(0),
            counted_at: AtomicU64::new(0),
            counting: AtomicBool::new(false),
            epoch: Instant::now().checked_sub(2 * REFRESH_PERIOD).unwrap(),
        });
        let first = vmas.get();
        assert!(first > 0, "this process has mappings");
        // Fresh: the cached count, no helper.
        assert_eq!(vmas.get(), first);
        assert!(!vmas.counting.load(Ordering::Acquire));
        // Stale: the reading returns the cached count and a helper recounts.
        vmas.counted_at.store(1, Ordering::Release);
        vmas.count.store(0, Ordering::Release);
        assert_eq!(vmas.get(), 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while vmas.count.load(Ordering::Acquire) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(vmas.get() > 0);
    }
}
