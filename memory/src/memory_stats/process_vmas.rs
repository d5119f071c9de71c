//! [`ProcessVmas`]: the number of mappings of the whole process
//! ([`super::MemoryStats::process_vma_count`]), cached.
//!
//! Counting them reads /proc/self/maps, which grows with the mappings: tens of
//! milliseconds once merging has split guest memory into tens of thousands of
//! VMAs, and the kernel's `mmap_lock` taken against the remaps. So a reading
//! returns the last count, at most [`REFRESH_PERIOD`] old (plus the time a
//! count takes); a stale one wakes the cache's own counting thread
//! (`densevm-vmacount`, [`ThreadKind::VmaCounter`]), never costing the reader
//! more than a wake-up. The reader therefore needs no right to open files or
//! spawn threads: the API server's threads read the statistics directly.
//! The first count is made by [`ProcessVmas::new`], on the creating thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::sys;
use crate::thread_hook::{ThreadKind, ThreadStartHook};

/// Age after which a reading starts a new count.
pub(crate) const REFRESH_PERIOD: Duration = Duration::from_secs(1);

/// The cached count of the process's mappings.
pub(crate) struct ProcessVmas {
    count: AtomicU64,
    /// When the last count ended, in nanoseconds since `epoch`.
    counted_at: AtomicU64,
    /// A recount has been asked for and not finished.
    counting: AtomicBool,
    epoch: Instant,
    /// The counting thread (none if it could not be spawned: counts then stay as
    /// the first one).
    counter: Option<Thread>,
}

impl ProcessVmas {
    /// Counts the mappings now and starts the counting thread, which runs `hook`
    /// first.
    pub(crate) fn new(hook: Option<ThreadStartHook>) -> Arc<Self> {
        Arc::new_cyclic(|me: &Weak<ProcessVmas>| {
            let me = me.clone();
            let spawned = std::thread::Builder::new().name("densevm-vmacount".into()).spawn(move || {
                crate::thread_hook::started(hook.as_ref(), ThreadKind::VmaCounter);
                count_on_request(me)
            });
            let counter = match spawned {
                Ok(handle) => Some(handle.thread().clone()),
                Err(e) => {
                    tracing::warn!(
                        "cannot spawn the VMA counting thread ({e}): process_vma_count stays as first counted"
                    );
                    None
                }
            };
            let vmas = ProcessVmas {
                count: AtomicU64::new(0),
                counted_at: AtomicU64::new(0),
                counting: AtomicBool::new(false),
                // Two periods back, so that a count stamped 1 (the first instant)
                // is stale.
                epoch: Instant::now().checked_sub(2 * REFRESH_PERIOD).unwrap_or_else(Instant::now),
                counter,
            };
            vmas.count_now();
            vmas
        })
    }

    /// The number of mappings of the process (0 if /proc/self/maps cannot be read).
    pub(crate) fn get(&self) -> u64 {
        let counted_at = self.counted_at.load(Ordering::Acquire);
        if self.now_ns().saturating_sub(counted_at) >= REFRESH_PERIOD.as_nanos() as u64
            && !self.counting.swap(true, Ordering::AcqRel)
        {
            match &self.counter {
                Some(t) => t.unpark(),
                None => self.counting.store(false, Ordering::Release),
            }
        }
        self.count.load(Ordering::Acquire)
    }

    fn count_now(&self) {
        let count = match sys::process_map_count() {
            Ok(n) => n as u64,
            Err(e) => {
                tracing::warn!("cannot count the process's mappings: /proc/self/maps: {e}");
                0
            }
        };
        self.count.store(count, Ordering::Release);
        self.counted_at.store(self.now_ns().max(1), Ordering::Release);
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

impl Drop for ProcessVmas {
    fn drop(&mut self) {
        // The counting thread holds only a weak reference: woken, it finds the
        // cache gone and ends.
        if let Some(t) = &self.counter {
            t.unpark();
        }
    }
}

/// The counting thread: recounts whenever a reading asked for it, until the cache
/// is dropped.
fn count_on_request(me: Weak<ProcessVmas>) {
    loop {
        std::thread::park();
        let Some(vmas) = me.upgrade() else { return };
        if vmas.counting.load(Ordering::Acquire) {
            vmas.count_now();
            vmas.counting.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_once_then_refreshes_in_the_background() {
        let vmas = ProcessVmas::new(None);
        assert!(vmas.count.load(Ordering::Acquire) > 0, "this process has mappings");
        // Fresh: the cached count, no recount asked. Checked on a reading that came
        // within the period of its stamp (a test thread preempted for longer on a
        // loaded machine sees it stale, which asks for a recount: then wait for it
        // to end and try again).
        let mut tries = 0;
        loop {
            tries += 1;
            let deadline = Instant::now() + Duration::from_secs(30);
            while vmas.counting.load(Ordering::Acquire) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            let cached = vmas.count.load(Ordering::Acquire);
            let stamp = vmas.now_ns().max(1);
            vmas.counted_at.store(stamp, Ordering::Release);
            let got = vmas.get();
            let asked = vmas.counting.load(Ordering::Acquire);
            if vmas.now_ns() - stamp < REFRESH_PERIOD.as_nanos() as u64 {
                assert_eq!(got, cached);
                assert!(!asked, "a fresh count asked for a recount");
                break;
            }
            assert!(tries < 100, "no reading within {REFRESH_PERIOD:?} of its stamp in 100 tries");
        }
        // Stale: the reading returns the cached count and the thread recounts.
        vmas.counted_at.store(1, Ordering::Release);
        vmas.count.store(0, Ordering::Release);
        assert_eq!(vmas.get(), 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while vmas.count.load(Ordering::Acquire) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(vmas.get() > 0, "the counting thread recounted within 30 s");
        assert!(vmas.counted_at.load(Ordering::Acquire) > 1);
    }

    #[test]
    fn the_counting_thread_runs_the_hook_and_ends_with_the_cache() {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let hook = ThreadStartHook::new(move |kind| {
            let name = std::thread::current().name().unwrap_or_default().to_string();
            let _ = tx.lock().map(|t| t.send((kind, name)));
        });
        let vmas = ProcessVmas::new(Some(hook));
        let seen = rx.recv_timeout(Duration::from_secs(30)).expect("the hook ran");
        assert_eq!(seen, (ThreadKind::VmaCounter, "densevm-vmacount".to_string()));
        let weak = Arc::downgrade(&vmas);
        drop(vmas);
        assert!(weak.upgrade().is_none(), "the counting thread keeps no strong reference");
    }
}
