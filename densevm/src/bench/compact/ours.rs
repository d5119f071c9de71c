//! densevm's side of one repetition of `densevm bench compact`: a scattered
//! pool ([`super::scatter`]) compacted by one on-demand `compact()` pass at
//! full rate while the guests keep running, then a fresh scatter compacted by
//! the proactive (background) compactor at the default proactiveness and a
//! rate limit, until it settles.
//!
//! Guest pace is measured as `bench merge` measures it: pages the guests
//! verified per second during the window, relative to their idle pace over a
//! window just before (the guests are idle after their fill, verifying).

use std::time::{Duration, Instant};

use memory::compact::tunables::DEFAULT_PROACTIVENESS;
use memory::{CompactionReport, CompactionTunablesPatch};
use serde::Serialize;
use vmm::host::Host;

use super::scatter::{self, ScatterInfo};
use super::{rt, Params};
use crate::bench::merge::measure::task_cpu_s;
use crate::bench::merge::policy::{idle_for, tend};
use crate::commands::CommandError;

/// Interval between samples of the compactor's totals.
const SAMPLE: Duration = Duration::from_millis(5);

/// The on-demand pass at full rate.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PassResult {
    /// The scatter compacted.
    pub scatter: ScatterInfo,
    /// The compactor's report of the pass.
    pub report: CompactionReport,
    /// Pages migrated per second of the pass (`report.duration_ms`).
    pub pages_per_s: Option<f64>,
    /// (in use before - in use after) / (in use before - ideal).
    pub fraction_returned: Option<f64>,
    /// 2 MiB frames in use after the pass beyond the ideal.
    pub frames_over_ideal: i64,
    /// Host memory of the memfd before the pass (`host_bytes`).
    pub host_bytes_before: u64,
    /// Host memory of the memfd after the pass.
    pub host_bytes_after: u64,
    /// Resident set of the densevm process before the pass.
    pub rss_before: u64,
    /// Resident set of the densevm process after the pass.
    pub rss_after: u64,
    /// CPU seconds of the thread running the pass.
    pub cpu_s: Option<f64>,
    /// Pages the guests verified per second just before the pass (idle pace).
    pub guest_verify_rate_idle: f64,
    /// Pages the guests verified per second during the pass.
    pub guest_verify_rate_pass: f64,
    /// `guest_verify_rate_pass / guest_verify_rate_idle`.
    pub guest_pace: Option<f64>,
    /// vCPU holds during the pass (the guests' stalls).
    pub holds: Holds,
    /// Guest pages that did not verify (must be 0).
    pub mismatches: u64,
    /// Every guest completed a full verify pass after the compaction.
    pub verified_after: bool,
}

/// The guests' vCPU holds over a window (the memory manager's counters).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Holds {
    /// Holds of the guests' vCPUs.
    pub count: u64,
    /// Seconds the vCPUs were held.
    pub held_s: f64,
    /// Holds whose vCPUs did not leave guest mode in time.
    pub timeouts: u64,
    /// `held_s` over the window: the share of the time the guests were stopped.
    pub held_share: Option<f64>,
}

impl Holds {
    fn since(host: &Host, c0: &memory::memory_stats::Counters, window_s: f64) -> Self {
        let c1 = host.memory().stats().counters;
        let held_s = c1.vcpu_hold_us.saturating_sub(c0.vcpu_hold_us) as f64 / 1e6;
        Holds {
            count: c1.vcpu_holds.saturating_sub(c0.vcpu_holds),
            held_s,
            timeouts: c1.vcpu_hold_timeouts.saturating_sub(c0.vcpu_hold_timeouts),
            held_share: (window_s > 0.0).then(|| held_s / window_s),
        }
    }
}

/// The proactive compactor on a fresh scatter.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProactiveResult {
    /// The scatter compacted.
    pub scatter: ScatterInfo,
    /// Proactiveness set (percent).
    pub proactiveness: u32,
    /// Rate limit set (pages per second).
    pub max_pages_per_s: u64,
    /// The compactor stopped migrating (no change for the settle window).
    pub settled: bool,
    /// Seconds from enabling it to its last migration.
    pub settle_s: Option<f64>,
    /// Pages it migrated.
    pub pages_migrated: u64,
    /// Pages migrated per second of `settle_s`.
    pub pages_per_s: Option<f64>,
    /// Proactive passes it ran.
    pub passes: u64,
    /// 2 MiB frames in use when it was enabled.
    pub frames_2m_in_use_before: u64,
    /// 2 MiB frames in use when it settled.
    pub frames_2m_in_use_after: u64,
    /// Fewest 2 MiB frames the live frames fit in.
    pub ideal_frames_2m: u64,
    /// (in use before - in use after) / (in use before - ideal).
    pub fraction_returned: Option<f64>,
    /// Host memory of the memfd before and after.
    pub host_bytes_before: u64,
    /// Host memory of the memfd when it settled.
    pub host_bytes_after: u64,
    /// CPU seconds of the `densevm-compact` thread until it settled.
    pub cpu_s: Option<f64>,
    /// Pages the guests verified per second just before (idle pace).
    pub guest_verify_rate_idle: f64,
    /// Pages the guests verified per second while it migrated.
    pub guest_verify_rate: Option<f64>,
    /// `guest_verify_rate / guest_verify_rate_idle`.
    pub guest_pace: Option<f64>,
    /// vCPU holds until it settled (the guests' stalls).
    pub holds: Holds,
    /// Guest pages that did not verify (must be 0).
    pub mismatches: u64,
    /// Every guest completed a full verify pass after the compaction.
    pub verified_after: bool,
}

/// (before - after) / (before - ideal), when anything was freeable.
pub fn fraction_returned(before: u64, after: u64, ideal: u64) -> Option<f64> {
    (before > ideal).then(|| before.saturating_sub(after) as f64 / (before - ideal) as f64)
}

/// Resident set of this process in bytes (`/proc/self/statm`).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 4096
}

/// `/proc/self/task/<tid>` of the compactor's background thread.
fn compact_thread() -> Option<String> {
    std::fs::read_dir("/proc/self/task").ok()?.flatten().find_map(|e| {
        let dir = e.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        (comm.trim() == "densevm-compact").then(|| dir.to_string_lossy().into_owned())
    })
}

/// Idle pace of the guests over `p.idle`: pages verified per second.
fn idle_rate(host: &mut Host, p: &Params, ids: &[String], intr: &dyn Fn() -> bool) -> Result<f64, CommandError> {
    let (v0, t0) = (scatter::verified(host, ids)?, Instant::now());
    idle_for(host, ids, p.idle, intr)?;
    Ok(scatter::verified(host, ids)?.saturating_sub(v0) as f64 / t0.elapsed().as_secs_f64())
}

fn disable_proactive(host: &Host) -> Result<(), CommandError> {
    let off = CompactionTunablesPatch { enabled: Some(false), ..CompactionTunablesPatch::default() };
    host.memory().update_compaction(&off).map(|_| ()).map_err(rt)
}

/// One `compact()` at full rate on a fresh scatter while the guests run.
pub fn pass(host: &mut Host, p: &Params, tag: &str, intr: &dyn Fn() -> bool) -> Result<PassResult, CommandError> {
    disable_proactive(host)?;
    let mut ids = Vec::new();
    let res = scatter::create(host, p, tag, &mut ids, intr).and_then(|s| measure_pass(host, p, &ids, s, intr));
    scatter::remove(host, &ids);
    res
}

fn measure_pass(
    host: &mut Host,
    p: &Params,
    ids: &[String],
    scatter: ScatterInfo,
    intr: &dyn Fn() -> bool,
) -> Result<PassResult, CommandError> {
    let mut r = PassResult { scatter, ..PassResult::default() };
    r.guest_verify_rate_idle = idle_rate(host, p, ids, intr)?;
    (r.host_bytes_before, r.rss_before) = (host.memory().stats().host_bytes, rss());
    let mem = host.memory().clone();
    let c0 = mem.stats().counters;
    let (v0, t0) = (scatter::verified(host, ids)?, Instant::now());
    let worker = std::thread::Builder::new()
        .name("bench-compact".into())
        .spawn(move || {
            let cpu0 = task_cpu_s("/proc/thread-self");
            let report = mem.compact();
            (report, task_cpu_s("/proc/thread-self").zip(cpu0).map(|(b, a)| b - a))
        })
        .map_err(|e| rt(format!("spawning the compaction thread: {e}")))?;
    // The guests run on; this thread keeps serving their events meanwhile.
    let mut tended = Ok(());
    while !worker.is_finished() {
        if tended.is_ok() {
            tended = tend(host, ids);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let wall = t0.elapsed().as_secs_f64();
    let v1 = scatter::verified(host, ids)?;
    r.holds = Holds::since(host, &c0, wall);
    let (report, cpu) = worker.join().map_err(|_| rt("the compaction thread panicked"))?;
    tended?;
    r.report = report.map_err(rt)?;
    r.cpu_s = cpu;
    (r.host_bytes_after, r.rss_after) = (host.memory().stats().host_bytes, rss());
    let rep = &r.report;
    r.pages_per_s = (rep.duration_ms > 0.0).then(|| rep.pages_migrated as f64 / (rep.duration_ms / 1000.0));
    r.fraction_returned =
        fraction_returned(rep.frames_2m_in_use_before, rep.frames_2m_in_use_after, rep.ideal_frames_2m);
    r.frames_over_ideal = rep.frames_2m_in_use_after as i64 - rep.ideal_frames_2m as i64;
    r.guest_verify_rate_pass = v1.saturating_sub(v0) as f64 / wall.max(1e-9);
    r.guest_pace = (r.guest_verify_rate_idle > 0.0).then(|| r.guest_verify_rate_pass / r.guest_verify_rate_idle);
    (r.mismatches, r.verified_after) = scatter::finish(host, ids, intr)?;
    Ok(r)
}

/// The proactive compactor (default proactiveness, `p.proactive_rate`) on a
/// fresh scatter, until it settles.
pub fn proactive(
    host: &mut Host,
    p: &Params,
    tag: &str,
    intr: &dyn Fn() -> bool,
) -> Result<ProactiveResult, CommandError> {
    disable_proactive(host)?;
    let mut ids = Vec::new();
    let res = scatter::create(host, p, tag, &mut ids, intr).and_then(|s| measure_proactive(host, p, &ids, s, intr));
    let off = disable_proactive(host);
    scatter::remove(host, &ids);
    let r = res?;
    off?;
    Ok(r)
}

fn measure_proactive(
    host: &mut Host,
    p: &Params,
    ids: &[String],
    scatter: ScatterInfo,
    intr: &dyn Fn() -> bool,
) -> Result<ProactiveResult, CommandError> {
    let mut r = ProactiveResult {
        scatter,
        proactiveness: DEFAULT_PROACTIVENESS,
        max_pages_per_s: p.proactive_rate,
        ..ProactiveResult::default()
    };
    r.guest_verify_rate_idle = idle_rate(host, p, ids, intr)?;
    let (stats0, mem0) = (host.memory().compaction_stats(), host.memory().stats());
    (r.frames_2m_in_use_before, r.host_bytes_before) = (mem0.huge_frames_in_use, mem0.host_bytes);
    r.ideal_frames_2m = stats0.ideal_frames_2m;
    let task = compact_thread();
    let cpu = || task.as_deref().and_then(task_cpu_s);
    let cpu0 = cpu();
    let on = CompactionTunablesPatch {
        enabled: Some(true),
        proactiveness: Some(DEFAULT_PROACTIVENESS),
        max_pages_per_s: Some(p.proactive_rate),
    };
    let c0 = host.memory().stats().counters;
    let v0 = scatter::verified(host, ids)?;
    let t0 = Instant::now();
    host.memory().update_compaction(&on).map_err(rt)?;
    let (mut last, mut last_change, mut v_last, mut cpu_last) = (stats0.pages_migrated, t0, v0, cpu0);
    loop {
        idle_for(host, ids, SAMPLE, intr)?;
        let s = host.memory().compaction_stats();
        let now = Instant::now();
        if s.pages_migrated != last {
            (last, last_change, v_last, cpu_last) = (s.pages_migrated, now, scatter::verified(host, ids)?, cpu());
        }
        let quiet = now - last_change >= p.settle;
        if quiet && s.proactive_passes > stats0.proactive_passes {
            r.settled = true;
            break;
        }
        if quiet && last_change == t0 && now - t0 >= p.settle * 4 || now - t0 >= p.timeout {
            break;
        }
    }
    r.holds = Holds::since(host, &c0, (last_change - t0).as_secs_f64());
    let (s, mem) = (host.memory().compaction_stats(), host.memory().stats());
    r.pages_migrated = s.pages_migrated - stats0.pages_migrated;
    r.passes = s.proactive_passes - stats0.proactive_passes;
    (r.frames_2m_in_use_after, r.host_bytes_after) = (mem.huge_frames_in_use, mem.host_bytes);
    r.fraction_returned = fraction_returned(r.frames_2m_in_use_before, r.frames_2m_in_use_after, r.ideal_frames_2m);
    r.cpu_s = cpu_last.zip(cpu0).map(|(b, a)| b - a);
    if last_change > t0 {
        let active = (last_change - t0).as_secs_f64();
        r.settle_s = Some(active);
        r.pages_per_s = Some(r.pages_migrated as f64 / active);
        r.guest_verify_rate = Some(v_last.saturating_sub(v0) as f64 / active);
        r.guest_pace =
            r.guest_verify_rate.filter(|_| r.guest_verify_rate_idle > 0.0).map(|v| v / r.guest_verify_rate_idle);
    }
    (r.mismatches, r.verified_after) = scatter::finish(host, ids, intr)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_returned_of_the_freeable() {
        assert_eq!(fraction_returned(152, 76, 76), Some(1.0));
        assert_eq!(fraction_returned(10, 8, 6), Some(0.5));
        assert_eq!(fraction_returned(10, 10, 6), Some(0.0));
        assert_eq!(fraction_returned(6, 6, 6), None);
        // More frames in use after than before: nothing returned, never negative.
        assert_eq!(fraction_returned(6, 7, 5), Some(0.0));
    }
}
