//! densevm's own compaction: moves live 4 KiB frames out of sparse 2 MiB
//! frames into the holes of fuller ones and punches the emptied 2 MiB frames.
//!
//! - Selection and placement ([`plan`]): the least occupied 2 MiB frames are
//!   emptied into the free slots of the fullest ones, never into a source or an
//!   empty 2 MiB frame, runs of consecutive frames into free blocks of their
//!   buddy order; a pass ends at `ceil(live / 512)` 2 MiB frames in use.
//! - Migration (`pass.rs`): each frame moves with the remap protocol's
//!   migration (every guest page mapping it is remapped in one protected step
//!   under the manager's lock), runs of private frames of consecutive guest
//!   pages as one step with one system call per stretch, [`pass::BATCH`]
//!   frames per lock hold; a 2 MiB frame whose last frame leaves is freed and
//!   punched by the pool. A page the balloon discarded in place (private,
//!   protected, `ZERO`) is moved onto the zero region instead (the same one
//!   `mmap`, no target frame: its frame is simply freed).
//! - Triggers: [`crate::MemoryManager::compact`] (on demand, full rate), and a
//!   background thread (`densevm-compact`) that runs a rate-limited pass when
//!   the fragmentation exceeds `proactiveness` ([`CompactionTunables`]).
//!   Merging and compaction do not fight: while the merger is merging (its
//!   merge count moved since the last check), a proactive pass waits, and one
//!   in progress stops at its next batch, for at most
//!   [`MAX_MERGE_DEFERRAL`] in a row. Merging frees frames all over the pool
//!   and turns private frames into shared ones; a pass meanwhile would move
//!   frames that are about to be freed, and a shared frame costs one remap
//!   per guest page mapping it (8 clones of a real image: the proactive
//!   pass made more `mmap`s than the merger itself).
//!
//! [`Compactor`] is the handle (owned by the manager): tunables, on-demand
//! passes, statistics. Its thread stops and is joined when the manager drops.

pub mod pass;
pub mod plan;
pub mod stats;
pub mod tunables;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use stats::{CompactionFailures, CompactionReport, CompactionStats, CompactionTiming};
pub use tunables::{
    CompactionTunables, CompactionTunablesPatch, MAX_MAX_PAGES_PER_S, MAX_PROACTIVENESS, MIN_MAX_PAGES_PER_S,
};

use crate::core::figures::Figures;
use crate::core::Core;
use crate::thread_hook::{ThreadKind, ThreadStartHook};
use pass::{Occupancy, PassLimits};

/// How often the background thread checks the fragmentation.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Longest time in a row proactive compaction waits for the merger to stop
/// merging (a merger that never settles does not starve compaction).
pub const MAX_MERGE_DEFERRAL: Duration = Duration::from_secs(30);

/// Totals since start.
#[derive(Debug, Default)]
struct Totals {
    pages_migrated: u64,
    frames_2m_returned: u64,
    passes: u64,
    proactive_passes: u64,
    failures: CompactionFailures,
}

/// State shared between the handle and the background thread.
struct Shared {
    tunables: Mutex<CompactionTunables>,
    wake: Condvar,
    /// Bumped on every change of the tunables (a proactive pass polls it).
    generation: AtomicU64,
    stop: AtomicBool,
    totals: Mutex<Totals>,
    /// One pass at a time (taken before the manager's lock).
    pass: Mutex<()>,
}

impl Shared {
    fn tunables(&self) -> MutexGuard<'_, CompactionTunables> {
        self.tunables.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn totals(&self) -> MutexGuard<'_, Totals> {
        self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds one batch's migrations to the totals.
    fn record_batch(&self, pages: u64, returned: u64) {
        let mut t = self.totals();
        t.pages_migrated += pages;
        t.frames_2m_returned += returned;
    }

    /// Counts a finished pass (its migrations were added batch by batch).
    fn record(&self, report: &CompactionReport, proactive: bool) {
        let mut t = self.totals();
        t.passes += 1;
        t.proactive_passes += u64::from(proactive);
        t.failures.add(&report.failures);
    }
}

/// Handle of the compactor.
pub struct Compactor {
    core: Arc<Core>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Compactor {
    /// Starts the background thread over `core` with the default tunables.
    pub(crate) fn start(core: Arc<Core>, hook: Option<ThreadStartHook>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            tunables: Mutex::new(CompactionTunables::default()),
            wake: Condvar::new(),
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            totals: Mutex::new(Totals::default()),
            pass: Mutex::new(()),
        });
        let thread = {
            let (core, shared) = (core.clone(), shared.clone());
            std::thread::Builder::new().name("densevm-compact".into()).spawn(move || {
                crate::thread_hook::started(hook.as_ref(), ThreadKind::Compactor);
                run_loop(&core, &shared)
            })?
        };
        Ok(Compactor { core, shared, thread: Mutex::new(Some(thread)) })
    }

    /// The tunables in force.
    pub fn tunables(&self) -> CompactionTunables {
        *self.shared.tunables()
    }

    /// Validates `patch`, applies it and wakes the background thread; returns
    /// the tunables now in force.
    pub fn update(&self, patch: &CompactionTunablesPatch) -> Result<CompactionTunables, tunables::Error> {
        patch.validate()?;
        let mut t = self.shared.tunables();
        patch.apply(&mut t);
        let now = *t;
        drop(t);
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        self.shared.wake.notify_all();
        Ok(now)
    }

    /// Runs one pass at full rate (waiting for a proactive pass in progress).
    pub fn compact(&self) -> CompactionReport {
        let _pass = self.shared.pass.lock().unwrap_or_else(|e| e.into_inner());
        let on_batch = |pages, returned| self.shared.record_batch(pages, returned);
        let limits = PassLimits { max_pages_per_s: None, interrupted: &|| false, on_batch: &on_batch };
        let report = pass::run(&self.core, &limits);
        self.shared.record(&report, false);
        report
    }

    /// The pool's fragmentation and the totals since start (without the
    /// manager's lock: the pool's counts are the core's last publication).
    pub fn stats(&self) -> CompactionStats {
        self.stats_with(&self.core.figures())
    }

    /// The pool's fragmentation in the figures `f` and the totals since start.
    pub(crate) fn stats_with(&self, f: &Figures) -> CompactionStats {
        let occ = Occupancy::of_figures(f);
        let t = self.shared.totals();
        CompactionStats {
            free_frames: occ.free_frames,
            free_frames_in_partial_2m: occ.free_in_partial,
            free_frames_2m: occ.free_huge,
            frames_2m_returned: t.frames_2m_returned,
            ideal_frames_2m: occ.ideal,
            fragmentation: occ.fragmentation(),
            pages_migrated: t.pages_migrated,
            passes: t.passes,
            proactive_passes: t.proactive_passes,
            failures: t.failures,
        }
    }

    /// Stops the background thread and waits for it.
    pub(crate) fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            // Notify under the lock so that the thread cannot miss the wake.
            let _t = self.shared.tunables();
            self.shared.wake.notify_all();
        }
        if let Some(handle) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if handle.join().is_err() {
                tracing::error!("the compaction thread panicked");
            }
        }
    }
}

/// Whether a proactive pass is due: fragmentation above `proactiveness`
/// percent and at least one 2 MiB frame could be returned.
fn due(occ: &Occupancy, proactiveness: u32) -> bool {
    occ.in_use > occ.ideal && occ.fragmentation() * 100.0 > f64::from(proactiveness)
}

fn run_loop(core: &Core, shared: &Shared) {
    // The occupancy after a pass that returned nothing: not retried until it changes.
    let mut fruitless: Option<Occupancy> = None;
    let mut merging = MergeWatch::default();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let tun = *shared.tunables();
        let generation = shared.generation.load(Ordering::Acquire);
        if tun.enabled {
            let (occ, merges) = {
                let st = core.lock();
                (Occupancy::of(&st), st.counters().merges)
            };
            let defer = merging.defer(merges, Instant::now());
            let wanted = due(&occ, tun.proactiveness) && fruitless != Some(occ);
            if wanted && defer {
                tracing::debug!("proactive compaction waits: the merger is merging");
            } else if wanted {
                let may_defer = merging.may_defer(Instant::now());
                let merges_at_start = merges;
                let merger_started = || may_defer && core.figures().counters.merges != merges_at_start;
                let interrupted = || {
                    shared.stop.load(Ordering::Acquire)
                        || shared.generation.load(Ordering::Acquire) != generation
                        || merger_started()
                };
                let on_batch = |pages, returned| shared.record_batch(pages, returned);
                let limits = PassLimits {
                    max_pages_per_s: Some(tun.max_pages_per_s),
                    interrupted: &interrupted,
                    on_batch: &on_batch,
                };
                let report = {
                    let _pass = shared.pass.lock().unwrap_or_else(|e| e.into_inner());
                    pass::run(core, &limits)
                };
                shared.record(&report, true);
                tracing::debug!("proactive compaction: {report:?}");
                // An interrupted pass is not fruitless: it runs again with the new
                // tunables, or once the merger has settled.
                let stopped_early = interrupted();
                fruitless = (report.frames_2m_returned == 0 && !stopped_early).then(|| Occupancy::of(&core.lock()));
            }
        }
        let guard = shared.tunables();
        let _unused = shared.wake.wait_timeout_while(guard, CHECK_INTERVAL, |_| {
            !shared.stop.load(Ordering::Acquire) && shared.generation.load(Ordering::Acquire) == generation
        });
    }
}

/// Whether the merger is merging, from its merge count at each check, and how
/// long proactive compaction has waited for it.
#[derive(Debug, Default)]
struct MergeWatch {
    /// The merge count at the last check.
    last: Option<u64>,
    /// Since when compaction has been waiting (merging at every check since).
    waiting_since: Option<Instant>,
}

impl MergeWatch {
    /// Records the merge count `merges` seen at `now`; returns whether a
    /// proactive pass should wait (the count moved since the last check and
    /// the wait has not reached [`MAX_MERGE_DEFERRAL`]).
    fn defer(&mut self, merges: u64, now: Instant) -> bool {
        let moved = self.last.is_some_and(|last| last != merges);
        self.last = Some(merges);
        if !moved {
            self.waiting_since = None;
            return false;
        }
        let since = *self.waiting_since.get_or_insert(now);
        now.duration_since(since) < MAX_MERGE_DEFERRAL
    }

    /// Whether a pass starting at `now` may still stop for the merger.
    fn may_defer(&self, now: Instant) -> bool {
        self.waiting_since.is_none_or(|since| now.duration_since(since) < MAX_MERGE_DEFERRAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_watch_waits_while_merges_move_and_at_most_the_maximum() {
        let t0 = Instant::now();
        let mut w = MergeWatch::default();
        assert!(!w.defer(10, t0), "first check: nothing to compare with");
        assert!(!w.defer(10, t0 + CHECK_INTERVAL), "no merge since");
        assert!(w.defer(20, t0 + 2 * CHECK_INTERVAL), "merging");
        assert!(w.defer(30, t0 + 3 * CHECK_INTERVAL));
        assert!(w.may_defer(t0 + 3 * CHECK_INTERVAL));
        let late = t0 + 2 * CHECK_INTERVAL + MAX_MERGE_DEFERRAL;
        assert!(!w.defer(40, late), "waited long enough");
        assert!(!w.may_defer(late), "a pass started now runs on");
        assert!(!w.defer(40, late + CHECK_INTERVAL), "settled");
        assert!(w.may_defer(late + CHECK_INTERVAL), "the wait starts over");
        assert!(w.defer(50, late + 2 * CHECK_INTERVAL), "merging again");
    }
}
