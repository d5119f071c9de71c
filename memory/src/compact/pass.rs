//! One compaction pass over the manager's state: snapshot the 2 MiB frames in
//! use under the lock, plan it ([`super::plan`]), then migrate the planned
//! frames in batches, each batch one hold of the manager's lock (one `Txn`),
//! released between batches so that waiting write faults are served.
//!
//! A run of moves of private frames (one mapper each) backing consecutive guest
//! pages of one VM into consecutive targets moves in one step with
//! `core::page_ops::migrate_run` (one protect, copy and `mmap` per stretch,
//! registration and protection batched per VM until the batch's `Txn` drops);
//! any other frame (shared) with `core::page_ops::migrate_frame`, the remap
//! protocol's migration of a frame and every guest page mapping it, in one
//! protected step. Because the
//! lock is released between batches, each planned move is checked again when
//! its batch runs: a frame freed meanwhile is passed over, a target slot taken
//! meanwhile is counted as `no_target` (the frame stays where it is).

use std::time::{Duration, Instant};

use super::plan::{self, FreeLists, HugeFrameUse};
use super::stats::{CompactionFailures, CompactionReport};
use crate::core::error::Error;
use crate::core::figures::Figures;
use crate::core::page_ops::{migrate_frame, migrate_run};
use crate::core::{Core, State, Txn};
use crate::frame_table::Mapper;
use crate::page_table::PageFlags;
use crate::{FrameNo, VmId, HUGE_FRAME_PAGES};

/// Most frames migrated in one hold of the manager's lock.
pub const BATCH: usize = 64;

/// Least time a batch holds the lock before it ends early for a waiting write
/// fault. A bound in time, not in frames: about what 8 single-frame migrations
/// held the lock before runs moved in one step (so a waiting fault waits no
/// longer than it did then), and the pass moves more frames per lock handoff
/// (each handoff ends in `Core::yield_to_faults`, which under a busy host costs
/// far more than a migration).
pub const FAULT_HOLD: Duration = Duration::from_micros(250);

/// How a pass runs.
pub(crate) struct PassLimits<'a> {
    /// Pages per second at most (`None`: full rate).
    pub(crate) max_pages_per_s: Option<u64>,
    /// Polled between batches: true stops the pass.
    pub(crate) interrupted: &'a dyn Fn() -> bool,
    /// Called after each batch with the pages it migrated and the 2 MiB
    /// frames it returned (for running totals).
    pub(crate) on_batch: &'a dyn Fn(u64, u64),
}

/// The pool's 2 MiB frames as compaction counts them (under the lock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Occupancy {
    /// Free 4 KiB frames.
    pub(crate) free_frames: u64,
    /// Free 4 KiB frames inside 2 MiB frames holding allocated frames.
    pub(crate) free_in_partial: u64,
    /// Whole free 2 MiB frames.
    pub(crate) free_huge: u64,
    /// 2 MiB frames holding allocated frames.
    pub(crate) in_use: u64,
    /// ceil(allocated frames / 512).
    pub(crate) ideal: u64,
}

impl Occupancy {
    /// Counts the pool of `st`.
    pub(crate) fn of(st: &State) -> Self {
        let buddy = st.pool().buddy();
        let huge_frames = u64::from(buddy.huge_frames());
        Self::counted(huge_frames, buddy.free_frames(), u64::from(buddy.empty_huge_frames()))
    }

    /// Counts the pool as the published figures `f` saw it (no lock).
    pub(crate) fn of_figures(f: &Figures) -> Self {
        Self::counted(f.huge_frames, f.frames_free, f.huge_frames_empty)
    }

    fn counted(huge_frames: u64, free_frames: u64, free_huge: u64) -> Self {
        let total = huge_frames * u64::from(HUGE_FRAME_PAGES);
        Occupancy {
            free_frames,
            free_in_partial: free_frames.saturating_sub(free_huge * u64::from(HUGE_FRAME_PAGES)),
            free_huge,
            in_use: huge_frames.saturating_sub(free_huge),
            ideal: plan::ideal_huge_frames(total.saturating_sub(free_frames)),
        }
    }

    /// Free frames inside in-use 2 MiB frames / their frames (0 when none is in use).
    pub(crate) fn fragmentation(&self) -> f64 {
        if self.in_use == 0 {
            0.0
        } else {
            self.free_in_partial as f64 / (self.in_use * u64::from(HUGE_FRAME_PAGES)) as f64
        }
    }
}

/// The planner's input: every 2 MiB frame holding allocated frames.
fn snapshot(st: &State) -> Vec<HugeFrameUse> {
    let buddy = st.pool().buddy();
    (0..buddy.huge_frames())
        .filter(|&hf| buddy.free_in_huge_frame(hf) < HUGE_FRAME_PAGES)
        .map(|hf| HugeFrameUse { index: hf, used: buddy.used_in(hf), free_blocks: buddy.free_blocks_in(hf) })
        .collect()
}

/// Runs one pass over `core`.
pub(crate) fn run(core: &Core, limits: &PassLimits<'_>) -> CompactionReport {
    let start = Instant::now();
    let cpu_start = thread_cpu();
    let (before, mut plan) = {
        let st = core.lock();
        (Occupancy::of(&st), plan::plan(&snapshot(&st)))
    };
    let mut report = CompactionReport {
        frames_2m_in_use_before: before.in_use,
        ideal_frames_2m: before.ideal,
        ..CompactionReport::default()
    };
    report.timing.plan_ms = ms(start.elapsed());
    report.failures.no_target += plan.unplaced.len() as u64;
    let batch = match limits.max_pages_per_s {
        Some(rate) => (rate / 100).clamp(1, BATCH as u64) as usize,
        None => BATCH,
    };
    let mut next = 0;
    while next < plan.moves.len() && !(limits.interrupted)() {
        let wait = Instant::now();
        let mut guard = core.lock();
        let held = Instant::now();
        report.timing.lock_wait_ms += ms(held - wait);
        report.timing.lock_holds += 1;
        let returned_before = guard.pool().huge_frames_returned();
        let moves = &plan.moves[next..(next + batch).min(plan.moves.len())];
        let (done, migrated, handoff) = migrate_batch(core, &mut guard, moves, &mut plan.spare, &mut report.failures);
        let returned = guard.pool().huge_frames_returned() - returned_before;
        drop(guard);
        report.timing.hold_ms += ms(held.elapsed());
        report.timing.fault_handoffs += u64::from(handoff);
        next += done;
        (limits.on_batch)(migrated, returned);
        report.pages_migrated += migrated;
        report.frames_2m_returned += returned;
        let yielding = Instant::now();
        core.yield_to_faults();
        report.timing.yield_ms += ms(yielding.elapsed());
        if let Some(rate) = limits.max_pages_per_s {
            let pacing = Instant::now();
            pace(start, report.pages_migrated, rate, limits.interrupted);
            report.timing.pace_ms += ms(pacing.elapsed());
        }
    }
    report.frames_2m_in_use_after = Occupancy::of(&core.lock()).in_use;
    report.duration_ms = ms(start.elapsed());
    report.timing.cpu_ms = thread_cpu().zip(cpu_start).map_or(0.0, |(b, a)| ms(b.saturating_sub(a)));
    report
}

/// Migrates the planned `moves` in one hold of the manager's lock (`guard`):
/// runs of private frames with [`migrate_run`], others with
/// [`migrate_frame`]; the old frames of the runs are freed together at the
/// end (one punch per stretch of them for the whole batch). Stops early, once
/// it held the lock [`FAULT_HOLD`], for a waiting write fault. Returns (moves
/// done, frames migrated, whether it stopped for a fault).
fn migrate_batch(
    core: &Core,
    guard: &mut State,
    moves: &[(FrameNo, FrameNo)],
    spare: &mut FreeLists,
    failures: &mut CompactionFailures,
) -> (usize, u64, bool) {
    let held = Instant::now();
    let mut txn = Txn::new(guard, core.remap());
    let (mut done, mut migrated, mut handoff) = (0, 0, false);
    let mut to_free = Vec::with_capacity(moves.len());
    let mut run: Option<Run> = None;
    for &(from, to) in moves {
        done += 1;
        if let Some(m) = zero_mapper(&txn, from) {
            if let Some(r) = run.take() {
                migrated += r.migrate(&mut txn, failures, &mut to_free);
            }
            migrated += u64::from(drop_zero_page(&mut txn, m, failures));
        } else {
            let to = target(&txn, to, spare);
            match private_mapper(&txn, from, to) {
                Some(m) if run.as_ref().is_some_and(|r| r.extends(m, from, to)) => {
                    if let Some(r) = run.as_mut() {
                        r.n += 1;
                    }
                }
                Some(m) => {
                    if let Some(r) = run.replace(Run { vm: m.vm, page: m.page, from, to, n: 1 }) {
                        migrated += r.migrate(&mut txn, failures, &mut to_free);
                    }
                }
                None => {
                    if let Some(r) = run.take() {
                        migrated += r.migrate(&mut txn, failures, &mut to_free);
                    }
                    migrated += u64::from(move_one(&mut txn, from, to, failures));
                }
            }
        }
        if core.faults_waiting() && held.elapsed() >= FAULT_HOLD {
            handoff = true;
            break;
        }
    }
    if let Some(r) = run.take() {
        migrated += r.migrate(&mut txn, failures, &mut to_free);
    }
    if let Err(e) = txn.st.free_unmapped_frames(&mut to_free) {
        // Nothing maps them any more: they stay allocated (counted by the pool), never lost content.
        tracing::error!("compaction: freeing {} migrated-from frames: {e}", to_free.len());
    }
    (done, migrated, handoff)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// CPU time of the calling thread.
fn thread_cpu() -> Option<Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// The planned target `to` if it is still free, else a spare slot of the
/// targets that still is (`to` if none is: the move then counts `no_target`).
fn target(t: &Txn<'_>, to: FrameNo, spare: &mut FreeLists) -> FrameNo {
    let buddy = t.st.pool().buddy();
    if buddy.is_free(to) {
        return to;
    }
    while let Some(f) = spare.take(0) {
        if buddy.is_free(f) {
            return f;
        }
    }
    to
}

/// A run of planned moves: frames `from..from+n`, privately mapped by pages
/// `page..page+n` of `vm`, to the free frames `to..to+n`.
struct Run {
    vm: VmId,
    page: u32,
    from: FrameNo,
    to: FrameNo,
    n: u32,
}

impl Run {
    /// Whether the move of `from` (mapped by `m` alone) to `to` continues the run.
    fn extends(&self, m: Mapper, from: FrameNo, to: FrameNo) -> bool {
        let n = self.n;
        m.vm == self.vm && m.page == self.page + n && from == self.from + n && to == self.to + n
    }

    /// Migrates the run; returns the frames moved, counting failures by reason
    /// (the old frames go to `to_free`).
    fn migrate(self, t: &mut Txn<'_>, failures: &mut CompactionFailures, to_free: &mut Vec<FrameNo>) -> u64 {
        let out = migrate_run(t, self.vm, (self.page, self.from, self.to, self.n), to_free);
        if let Some(e) = out.error {
            let stayed = u64::from(self.n - out.moved);
            count_failure(&e, stayed, failures);
            tracing::debug!("compaction: frames {}..+{} stay: {e}", self.from + out.moved, stayed);
        }
        u64::from(out.moved)
    }
}

/// The only mapper of `from` if it is a private frame (one mapper) and `to` is
/// still free: such a move can join a run.
fn private_mapper(t: &Txn<'_>, from: FrameNo, to: FrameNo) -> Option<Mapper> {
    if t.st.frames().refs(from) != 1 || !t.st.pool().buddy().is_free(to) {
        return None;
    }
    t.st.frames().first_mapper(from)
}

/// The only mapper of `from` if it is a page discarded in place (a short
/// run of the balloon's discard, or the zero region's fallback): its frame's
/// only mapper, protected and flagged `ZERO` (its content is known zero: a
/// hole of the memfd checked under protection).
fn zero_mapper(t: &Txn<'_>, from: FrameNo) -> Option<Mapper> {
    if t.st.frames().refs(from) != 1 {
        return None;
    }
    let m = t.st.frames().first_mapper(from)?;
    let e = t.entry(m).ok()?;
    (e.frame == from && e.flags.contains(PageFlags::ZERO.with(PageFlags::PROTECTED))).then_some(m)
}

/// Moves page `m` (see [`zero_mapper`]) onto the zero region instead of
/// migrating its frame: the same one `mmap` a migration costs, no target
/// frame taken, its own frame freed (the pool's used frames fall) and a later
/// read of it allocates nothing. Returns whether it moved (the VMA budget may
/// refuse: the page then stays where it is, counted as `vma_budget`).
fn drop_zero_page(t: &mut Txn<'_>, m: Mapper, failures: &mut CompactionFailures) -> bool {
    match t.drop_to_zero_region(m.vm, &[m.page], PageFlags::empty()) {
        Ok(moved) if moved.first() == Some(&true) => true,
        Ok(_) => {
            failures.vma_budget += 1;
            false
        }
        Err(e) => {
            count_failure(&e, 1, failures);
            tracing::debug!("compaction: zero page {} of VM {} stays: {e}", m.page, m.vm);
            false
        }
    }
}

/// Counts `n` frames that stayed because of `e` (a frame freed meanwhile is no failure).
fn count_failure(e: &Error, n: u64, failures: &mut CompactionFailures) {
    match e {
        Error::VmaBudget => failures.vma_budget += n,
        Error::Pool(_) => failures.no_target += n,
        Error::FrameNotLive(_) => {}
        _ => failures.remap_failed += n,
    }
}

/// Migrates `from` to `to` if both are still what the plan saw; returns
/// whether it moved, counting a failure by reason.
fn move_one(t: &mut Txn<'_>, from: FrameNo, to: FrameNo, failures: &mut CompactionFailures) -> bool {
    if t.st.frames().refs(from) == 0 {
        // Freed since the plan: nothing to move.
        return false;
    }
    if !t.st.pool().buddy().is_free(to) {
        failures.no_target += 1;
        return false;
    }
    match migrate_frame(t, from, Some(to)) {
        Ok(_) => true,
        Err(e) => {
            count_failure(&e, 1, failures);
            tracing::debug!("compaction: frame {from} stays: {e}");
            false
        }
    }
}

/// Sleeps until `pages` migrations since `start` are within `rate` per second
/// (in slices, stopping early when interrupted).
fn pace(start: Instant, pages: u64, rate: u64, interrupted: &dyn Fn() -> bool) {
    let due = Duration::from_secs_f64(pages as f64 / rate.max(1) as f64);
    while start.elapsed() < due && !interrupted() {
        std::thread::sleep((due - start.elapsed()).min(Duration::from_millis(20)));
    }
}
