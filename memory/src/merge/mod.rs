//! Same-page merging: densevm's own KSM.
//!
//! A scanner thread (`scanner.rs`) walks every page of every VM whose merging is
//! enabled ([`crate::MemoryManager::set_merge`]), `pages_to_scan` pages per
//! batch with `sleep_ms` between batches ([`Tunables`]), skips pages written
//! since their last visit (the VM's [`DirtyLog`] and device writes, or content
//! checksums), and merges equal pages of one merge domain ([`domains`])
//! through a stable and an unstable index keyed by (domain, xxh3 hash)
//! ([`stable`], [`unstable`]). Every merge compares the full 4 KiB under write
//! protection and goes through the remap protocol ([`crate::remap`]); runs of
//! clone pages are merged with one `mmap` (`ops.rs`). Zero pages lose their
//! memory instead ([`zero`]). Statistics use KSM's vocabulary ([`stats`]).
//! Converged, idle memory costs almost nothing: the scanner backs off
//! ([`backoff`]: dirty-log polling, or smart scan and longer sleeps with
//! checksums).
//!
//! [`Merger`] is the handle (owned by the [`crate::MemoryManager`], reached
//! with [`crate::MemoryManager::merger`]): tunables get/set, run/pause,
//! unmerge-all, statistics. The thread starts paused and stops when the
//! manager drops.

pub mod backoff;
mod decide;
pub mod domains;
pub mod error;
pub(crate) mod ops;
pub(crate) mod pages;
pub(crate) mod scanner;
pub mod stable;
pub mod stats;
pub mod tunables;
pub mod unstable;
mod visit;
pub mod zero;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use crate::vcpu_gate::VcpuGate;
pub use domains::{DirtyLog, DomainId, VmMergeConfig};
pub use error::Error;
pub use stats::{MergeStats, VmMergeStats};
pub use tunables::{ChangeDetection, Tunables};

use crate::core::figures::Figures;
use crate::core::{self, Core};
use crate::thread_hook::{ThreadKind, ThreadStartHook};
use crate::VmId;
use scanner::Scanner;

/// Commands to the scanner thread.
struct Control {
    tunables: Tunables,
    stop: bool,
    unmerge_requested: u64,
    unmerge_done: u64,
    unmerge_result: Result<u64, String>,
    forget: Vec<VmId>,
    /// The idle back-off ([`backoff`]) is allowed.
    backoff: bool,
}

/// State shared between the handle and the scanner thread.
struct Shared {
    control: Mutex<Control>,
    wake: Condvar,
    /// Bumped on every change of `control` (the scanner polls it between chunks).
    generation: AtomicU64,
    stats: Mutex<MergeStats>,
    scanned: Condvar,
    tid: AtomicI32,
    /// Per VM: (volatile, unshared, dirty log in use), published with `stats`.
    vm_counts: Mutex<HashMap<VmId, (u64, u64, bool)>>,
}

impl Shared {
    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> MutexGuard<'_, MergeStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_all();
    }
}

/// Handle of the same-page merger.
pub struct Merger {
    core: Arc<Core>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Merger {
    /// Starts the scanner thread over `core` (paused: `run` is false).
    pub(crate) fn start(core: Arc<Core>, hook: Option<ThreadStartHook>) -> Result<Self, Error> {
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                tunables: Tunables::default(),
                stop: false,
                unmerge_requested: 0,
                unmerge_done: 0,
                unmerge_result: Ok(0),
                forget: Vec::new(),
                backoff: true,
            }),
            wake: Condvar::new(),
            generation: AtomicU64::new(0),
            stats: Mutex::new(MergeStats::default()),
            scanned: Condvar::new(),
            tid: AtomicI32::new(0),
            vm_counts: Mutex::new(HashMap::new()),
        });
        let thread = {
            let (core, shared) = (core.clone(), shared.clone());
            std::thread::Builder::new()
                .name("densevm-merger".into())
                .spawn(move || {
                    crate::thread_hook::started(hook.as_ref(), ThreadKind::Merger);
                    run_loop(core, &shared)
                })
                .map_err(Error::Spawn)?
        };
        Ok(Merger { core, shared, thread: Mutex::new(Some(thread)) })
    }

    /// The tunables in force.
    pub fn tunables(&self) -> Tunables {
        self.shared.control().tunables
    }

    /// Replaces the tunables after validating them.
    pub fn set_tunables(&self, tunables: Tunables) -> Result<(), Error> {
        tunables.validate()?;
        self.shared.control().tunables = tunables;
        self.shared.changed();
        Ok(())
    }

    /// Changes some tunables (`f` edits a copy, applied if valid); returns the result.
    pub fn update(&self, f: impl FnOnce(&mut Tunables)) -> Result<Tunables, Error> {
        let mut control = self.shared.control();
        let mut t = control.tunables;
        f(&mut t);
        t.validate()?;
        control.tunables = t;
        drop(control);
        self.shared.changed();
        Ok(t)
    }

    /// Allows (true, the default) or forbids the scanner's back-off on idle
    /// memory ([`backoff`]: dirty-log polling, smart scan, longer sleeps after
    /// quiet scans). Without it the scanner rescans at the configured rate
    /// forever, as before the back-off existed: for comparisons and benchmarks.
    pub fn set_backoff(&self, enabled: bool) {
        self.shared.control().backoff = enabled;
        self.shared.changed();
    }

    /// Whether the back-off on idle memory is allowed (see [`Merger::set_backoff`]).
    pub fn backoff(&self) -> bool {
        self.shared.control().backoff
    }

    /// Runs (true) or pauses (false) the scanner; merged pages stay merged.
    pub fn set_run(&self, run: bool) {
        self.shared.control().tunables.run = run;
        self.shared.changed();
    }

    /// Stops scanning and gives every page of every merge-enabled VM a private
    /// frame again (KSM's `run = 2`): shared frames are copied, zeroed pages
    /// become ordinary pages, the indexes are emptied. Blocks until done and
    /// returns the number of pages changed; `run` stays false.
    pub fn unmerge_all(&self) -> Result<u64, Error> {
        let mut control = self.shared.control();
        control.tunables.run = false;
        control.unmerge_requested += 1;
        let ticket = control.unmerge_requested;
        self.shared.changed();
        while control.unmerge_done < ticket {
            if control.stop || self.thread.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
                return Err(Error::Stopped);
            }
            control = self
                .shared
                .wake
                .wait_timeout(control, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        control.unmerge_result.clone().map_err(Error::Unmerge)
    }

    /// Host-wide merge statistics (without the manager's lock: the sharing
    /// figures are the core's last publication).
    pub fn stats(&self) -> MergeStats {
        self.stats_with(&self.core.figures())
    }

    /// Host-wide merge statistics with the sharing figures of `f`.
    pub(crate) fn stats_with(&self, f: &Figures) -> MergeStats {
        let mut s = self.shared.stats().clone();
        s.tunables = self.tunables();
        s.run = s.tunables.run;
        s.scanner_tid = self.shared.tid.load(Ordering::Relaxed);
        s.set_sharing(f);
        s
    }

    /// Merge statistics of VM `vm` (without the manager's lock).
    pub fn vm_stats(&self, vm: VmId) -> core::Result<VmMergeStats> {
        self.vm_stats_with(&self.core.figures(), vm)
    }

    /// Merge statistics of VM `vm` from the figures `f`.
    pub(crate) fn vm_stats_with(&self, f: &Figures, vm: VmId) -> core::Result<VmMergeStats> {
        let mut s = VmMergeStats::of_figures(f, vm).ok_or(core::Error::UnknownVm(vm))?;
        if let Some(&(volatile, unshared, dirty_log)) =
            self.shared.vm_counts.lock().unwrap_or_else(|e| e.into_inner()).get(&vm)
        {
            (s.pages_volatile, s.pages_unshared, s.dirty_log) = (volatile, unshared, dirty_log);
        }
        Ok(s)
    }

    /// Waits until at least `n` full scans have completed in total; false on timeout.
    pub fn wait_full_scans(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut stats = self.shared.stats();
        while stats.full_scans < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            stats = match self.shared.scanned.wait_timeout(stats, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }

    /// Linux thread id of the scanner thread (0 before it started).
    pub fn scanner_tid(&self) -> i32 {
        self.shared.tid.load(Ordering::Relaxed)
    }

    /// Makes the scanner forget what it learned about `vm`.
    pub(crate) fn forget_vm(&self, vm: VmId) {
        self.shared.control().forget.push(vm);
        self.shared.changed();
    }

    /// Makes the scanner free what it learned about the destroyed VM `vm`: at
    /// once when it waits or pauses, else after its current batch (a batch is
    /// not interrupted: VMs come and go all the time).
    pub(crate) fn forget_destroyed_vm(&self, vm: VmId) {
        self.shared.control().forget.push(vm);
        self.shared.wake.notify_all();
    }

    /// Stops the scanner thread and waits for it.
    pub(crate) fn shutdown(&self) {
        self.shared.control().stop = true;
        self.shared.changed();
        if let Some(handle) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if handle.join().is_err() {
                tracing::error!("the merge scanner thread panicked");
            }
        }
    }
}

enum Work {
    Stop,
    Unmerge(u64),
    Scan(Tunables, bool),
}

fn next_work(shared: &Shared, scanner: &mut Scanner) -> Work {
    let mut control = shared.control();
    loop {
        if !control.forget.is_empty() {
            for vm in control.forget.drain(..) {
                scanner.forget(vm);
            }
            // The freed metadata shows in the statistics at once, also while
            // merging is stopped.
            drop(control);
            publish(shared, scanner, false);
            control = shared.control();
            continue;
        }
        if control.stop {
            return Work::Stop;
        }
        if control.unmerge_requested > control.unmerge_done {
            return Work::Unmerge(control.unmerge_requested);
        }
        if control.tunables.run {
            return Work::Scan(control.tunables, control.backoff);
        }
        control = shared.wake.wait(control).unwrap_or_else(|e| e.into_inner());
    }
}

fn run_loop(core: Arc<Core>, shared: &Shared) {
    shared.tid.store(crate::sys::gettid(), Ordering::Relaxed);
    let mut scanner = Scanner::new(core);
    let mut seen_generation = shared.generation.load(Ordering::Acquire);
    loop {
        let work = next_work(shared, &mut scanner);
        let generation = shared.generation.load(Ordering::Acquire);
        if generation != seen_generation {
            // Tunables, run/pause or the VM set changed: no back-off carries over.
            scanner.reset_backoff();
            seen_generation = generation;
        }
        match work {
            Work::Stop => return,
            Work::Unmerge(ticket) => {
                let result = scanner.unmerge_all().map_err(|e| e.to_string());
                publish(shared, &scanner, false);
                let mut control = shared.control();
                control.unmerge_done = ticket;
                control.unmerge_result = result;
                drop(control);
                shared.changed();
            }
            Work::Scan(tun, backoff) => {
                scanner.backoff_enabled = backoff;
                let interrupted = || shared.generation.load(Ordering::Acquire) != generation;
                let scans_before = scanner.counters.full_scans;
                let between_batches = Duration::from_millis(tun.sleep_ms);
                let idle_poll = backoff::idle_poll_interval(scanner.tracked_pages(), tun.pages_to_scan, tun.sleep_ms);
                let sleep = if scanner.is_idle() {
                    match scanner.poll_idle(&tun, &interrupted) {
                        Ok(poll) if poll.resumed => Duration::ZERO,
                        Ok(poll) if poll.more => between_batches,
                        Ok(_) => idle_poll,
                        Err(e) => {
                            tracing::warn!("merge idle poll: {e}");
                            scanner.reset_backoff();
                            between_batches
                        }
                    }
                } else {
                    let any = match scanner.batch(&tun, &interrupted) {
                        Ok(any) => any,
                        Err(e) => {
                            tracing::warn!("merge batch: {e}");
                            true
                        }
                    };
                    match scanner.take_quiet_sleep() {
                        // Idle when nothing is enabled.
                        _ if !any => Duration::from_millis(100),
                        Some(longer) => longer.max(between_batches),
                        None if scanner.is_idle() => idle_poll,
                        None => between_batches,
                    }
                };
                publish(shared, &scanner, scanner.counters.full_scans != scans_before);
                // Sleep between batches (or until a change).
                if !sleep.is_zero() && !interrupted() {
                    let control = shared.control();
                    // A destroyed VM's metadata is freed without waiting for the pause to end.
                    let _unused =
                        shared.wake.wait_timeout_while(control, sleep, |c| !interrupted() && c.forget.is_empty());
                }
            }
        }
    }
}

fn publish(shared: &Shared, scanner: &Scanner, full_scan: bool) {
    let mut stats = shared.stats();
    scanner.fill_stats(&mut stats);
    drop(stats);
    *shared.vm_counts.lock().unwrap_or_else(|e| e.into_inner()) = scanner.vm_counts();
    if full_scan {
        shared.scanned.notify_all();
    }
}
