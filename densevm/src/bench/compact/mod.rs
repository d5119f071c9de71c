//! `densevm bench compact`: densevm's compactor against the kernel's own
//! compaction, interleaved in one run.
//!
//! Each repetition runs densevm's side and the kernel's (alternating which
//! goes first):
//!
//! - densevm ([`ours`]): N workload microVMs fill their memory and 60% of
//!   their data frames are freed at random pages ([`scatter`] says how and
//!   why that way); one `compact()` pass at full rate while the guests run
//!   (pages migrated per second, share of the freeable 2 MiB frames returned,
//!   frames in use vs ideal, memfd bytes and process RSS before/after, the
//!   guests' pace during the pass); then a fresh scatter under proactive
//!   compaction (default proactiveness, a rate limit) until it settles.
//! - the kernel ([`kernel`]): the same amount of anonymous memory, 60% freed
//!   with `MADV_DONTNEED`, then `echo 1 > /proc/sys/vm/compact_memory`; pages
//!   migrated per second, machine-wide from `/proc/vmstat` and on its own
//!   region from `/proc/self/pagemap` ([`kernel`] says why both).
//!
//! Then min / median / max over the repetitions and the targets at the median
//! ([`report`]).

mod kernel;
mod ours;
pub(crate) mod report;
mod scatter;

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{json, Value};
use vmm::host::{Host, HostConfig};

use crate::bench::report::fmt;
use crate::commands::CommandError;
use report::RepNumbers;

/// Default repetitions of a full run (the project's minimum).
pub const DEFAULT_REPEAT: u32 = 5;
/// Default proactive rate limit: the compactor's default.
const PROACTIVE_RATE: u64 = memory::compact::tunables::DEFAULT_MAX_PAGES_PER_S;

/// What the guest pace means here (printed and in the JSON).
const PACE_NOTE: &str = "guest pace = pages the guests verified per second during the window / their idle pace just \
     before (as bench merge measures it), after one full verify pass since the scatter. The idle workload guests are \
     sleep-limited (64 pages per 5 ms sleep), so the pace shows stalls longer than their sleeps, not CPU taken from \
     them; held share = vCPU hold time / window (compaction does not hold vCPUs: its migrations write-protect the \
     pages they move instead).";

/// What the two kernel figures mean (printed and in the JSON).
const KERNEL_NOTE: &str = "kernel pages/s, machine-wide = pgmigrate_success over the time the compact_memory write \
     took: the kernel compacts every zone of the machine (other processes' pages included), so this is its migration \
     throughput, not our region's; kernel pages/s, own region = pages of our region whose physical frame changed \
     (/proc/self/pagemap before/after) over the same time, the whole write's duration charged to them. densevm \
     pages/s is its own pass's migrations over its own duration (its pass touches only its own pool). Per CPU second: \
     the same migrations over the CPU time of the thread doing them (the kernel compacts in the writer's context); \
     densevm's pass runs beside its 8 running guests' vCPU threads, the kernel's write after they were removed, so \
     the wall-clock ratio also measures how much of the CPU each got (CPU time / wall time).";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn rt(e: impl std::fmt::Display) -> CommandError {
    CommandError::Runtime(e.to_string())
}

/// Sizes and windows of a run.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// VMs per scatter.
    pub vms: u32,
    /// MiB each guest fills.
    pub fill_mib: u32,
    /// Window of the guests' idle pace before each measurement.
    pub idle: Duration,
    /// Proactive compaction has settled after this long without a migration.
    pub settle: Duration,
    /// Longest wait for proactive compaction to settle.
    pub timeout: Duration,
    /// Rate limit of proactive compaction (pages per second).
    pub proactive_rate: u64,
}

impl Params {
    fn new(quick: bool) -> Self {
        let (vms, fill_mib, idle, settle) = if quick {
            (4, 8, Duration::from_millis(300), Duration::from_millis(1200))
        } else {
            (8, 32, Duration::from_secs(1), Duration::from_millis(1500))
        };
        Params { vms, fill_mib, idle, settle, timeout: Duration::from_secs(120), proactive_rate: PROACTIVE_RATE }
    }

    /// Bytes of data the guests fill together (the kernel baseline's size).
    fn data_bytes(&self) -> u64 {
        (u64::from(self.vms) * u64::from(self.fill_mib)) << 20
    }
}

/// densevm's side of repetition `i`.
fn densevm_side(host: &mut Host, p: &Params, i: u32, nums: &mut RepNumbers) -> Result<Value, CommandError> {
    let pass = ours::pass(host, p, &format!("compact-r{i}-pass"), &interrupted)?;
    let pro = ours::proactive(host, p, &format!("compact-r{i}-pro"), &interrupted)?;
    let rep = &pass.report;
    println!(
        "  densevm: {} pages migrated in {:.1} ms = {} pages/s; 2 MiB frames {} -> {} (ideal {}), returned {} of \
         freeable; memfd {:.1} -> {:.1} MiB, RSS {:.1} -> {:.1} MiB; guest pace {}, vCPUs held {:.3} s in {} holds",
        rep.pages_migrated,
        rep.duration_ms,
        fmt(pass.pages_per_s, 0),
        rep.frames_2m_in_use_before,
        rep.frames_2m_in_use_after,
        rep.ideal_frames_2m,
        fmt(pass.fraction_returned, 3),
        pass.host_bytes_before as f64 / 1048576.0,
        pass.host_bytes_after as f64 / 1048576.0,
        pass.rss_before as f64 / 1048576.0,
        pass.rss_after as f64 / 1048576.0,
        fmt(pass.guest_pace, 2),
        pass.holds.held_s,
        pass.holds.count,
    );
    println!(
        "  densevm proactive ({}%, {} pages/s): {} pages in {} s ({}), 2 MiB frames {} -> {} (ideal {}), guest pace \
         {}, vCPUs held {:.3} s in {} holds",
        pro.proactiveness,
        pro.max_pages_per_s,
        pro.pages_migrated,
        fmt(pro.settle_s, 2),
        if pro.settled { "settled" } else { "did not settle" },
        pro.frames_2m_in_use_before,
        pro.frames_2m_in_use_after,
        pro.ideal_frames_2m,
        fmt(pro.guest_pace, 2),
        pro.holds.held_s,
        pro.holds.count,
    );
    let t = &rep.timing;
    println!(
        "  densevm pass timing: CPU {:.1} ms of {:.1} ms wall; lock held {:.1} ms in {} holds ({:.1} ms of it off the \
         CPU), lock waits {:.1} ms, fault handoffs {}, yields {:.1} ms, plan {:.1} ms",
        t.cpu_ms,
        rep.duration_ms,
        t.hold_ms,
        t.lock_holds,
        (t.hold_ms - t.cpu_ms).max(0.0),
        t.lock_wait_ms,
        t.fault_handoffs,
        t.yield_ms,
        t.plan_ms,
    );
    nums.densevm_pages_per_s = pass.pages_per_s;
    nums.densevm_pages_per_cpu_s = pass.cpu_s.filter(|&c| c > 0.0).map(|c| pass.report.pages_migrated as f64 / c);
    nums.densevm_on_cpu_share = pass.cpu_s.filter(|_| rep.duration_ms > 0.0).map(|c| c * 1000.0 / rep.duration_ms);
    nums.fraction_returned = pass.fraction_returned;
    nums.frames_over_ideal = Some(pass.frames_over_ideal as f64);
    nums.pass_pace = pass.guest_pace;
    nums.proactive_pace = pro.guest_pace;
    nums.pass_held_share = pass.holds.held_share;
    nums.proactive_held_share = pro.holds.held_share;
    nums.proactive_settle_s = pro.settle_s.filter(|_| pro.settled);
    nums.proactive_fraction_returned = pro.fraction_returned;
    Ok(json!({ "pass": pass, "proactive": pro }))
}

/// The kernel's side of repetition `i` (or why it is skipped).
fn kernel_side(p: &Params, i: u32, skipped: &Option<String>, nums: &mut RepNumbers) -> Value {
    if let Some(why) = skipped {
        return json!({ "available": false, "skipped_reason": why });
    }
    match kernel::run(p.data_bytes(), scatter::FREED_FRACTION, 0x6b65_726e_0000 + u64::from(i)) {
        Ok(k) => {
            println!(
                "  kernel: compact_memory took {:.1} ms, pgmigrate_success +{} = {} pages/s (machine-wide); of our {} MiB region {} pages moved = {} pages/s (share {}), \
                 its 2 MiB blocks {} -> {} (ideal {})",
                k.compact_s * 1e3,
                k.pages_migrated,
                fmt(k.pages_per_s, 0),
                k.region_bytes >> 20,
                k.region_pages_moved.map_or("-".into(), |m| m.to_string()),
                fmt(k.region_pages_per_s, 0),
                fmt(k.region_share, 3),
                k.region_before.blocks_2m.map_or("-".into(), |m| m.to_string()),
                k.region_after.blocks_2m.map_or("-".into(), |m| m.to_string()),
                k.region_after.ideal_blocks_2m,
            );
            println!(
                "  kernel: the write's thread ran {} ms on the CPU = {} pages per CPU second",
                k.compact_cpu_s.map_or("-".into(), |c| format!("{:.1}", c * 1e3)),
                fmt(k.pages_per_cpu_s, 0)
            );
            nums.kernel_pages_per_s = k.pages_per_s;
            nums.kernel_pages_per_cpu_s = k.pages_per_cpu_s;
            nums.kernel_on_cpu_share = k.compact_cpu_s.filter(|_| k.compact_s > 0.0).map(|c| c / k.compact_s);
            nums.kernel_region_pages_per_s = k.region_pages_per_s;
            json!({ "available": true, "result": k })
        }
        Err(e) => {
            println!("  kernel: failed: {e}");
            json!({ "available": false, "skipped_reason": e.to_string() })
        }
    }
}

/// Runs `densevm bench compact`.
pub fn main(quick: bool, json_path: Option<&Path>, repeat: Option<u32>) -> Result<ExitCode, CommandError> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal).map_err(rt)?;
    }
    let p = Params::new(quick);
    let repeat = repeat.unwrap_or(if quick { 1 } else { DEFAULT_REPEAT });
    let skipped = kernel::unavailable();
    println!(
        "densevm bench compact: {repeat} repetition(s), {} VMs x {} MiB filled, 60% of the data frames freed; \
         densevm and the kernel interleaved (order alternates)",
        p.vms, p.fill_mib
    );
    println!("scatter: {}", scatter::METHOD);
    if repeat < DEFAULT_REPEAT && !quick {
        println!("note: fewer than {DEFAULT_REPEAT} repetitions; the spreads below are not the project's standard");
    }
    if let Some(why) = &skipped {
        println!("kernel baseline skipped: {why}");
    }
    let mut host = Host::new(HostConfig::default())?;
    let found = host.memory().compaction_tunables();
    let (mut reps, mut nums, mut mismatches) = (Vec::new(), Vec::new(), 0u64);
    for i in 0..repeat {
        if interrupted() {
            return Err(rt("interrupted"));
        }
        let densevm_first = i % 2 == 0;
        println!("repetition {}/{repeat} ({} first):", i + 1, if densevm_first { "densevm" } else { "kernel" });
        let mut n = RepNumbers::default();
        let (d, k) = if densevm_first {
            let d = densevm_side(&mut host, &p, i, &mut n)?;
            (d, kernel_side(&p, i, &skipped, &mut n))
        } else {
            let k = kernel_side(&p, i, &skipped, &mut n);
            (densevm_side(&mut host, &p, i, &mut n)?, k)
        };
        mismatches +=
            d["pass"]["mismatches"].as_u64().unwrap_or(0) + d["proactive"]["mismatches"].as_u64().unwrap_or(0);
        mismatches += k["result"]["region_mismatches"].as_u64().unwrap_or(0);
        println!(
            "  ratio densevm / kernel pages/s: {} (machine-wide), {} (own region), {} (per CPU second)",
            fmt(n.ratio(), 2),
            fmt(n.region_ratio(), 2),
            fmt(n.cpu_ratio(), 2)
        );
        reps.push(json!({
            "index": i,
            "densevm_first": densevm_first,
            "densevm": d,
            "kernel": k,
            "ratio": n.ratio(),
            "ratio_region": n.region_ratio(),
            "ratio_cpu": n.cpu_ratio(),
        }));
        nums.push(n);
    }
    let restore: memory::CompactionTunablesPatch = found.into();
    host.memory().update_compaction(&restore).map_err(rt)?;
    let summary = report::summarize(&nums);
    println!("{PACE_NOTE}");
    println!("{KERNEL_NOTE}");
    let result = json!({
        "benchmark": "compact",
        "quick": quick,
        "repeat": repeat,
        "vms": p.vms,
        "fill_mib": p.fill_mib,
        "freed_fraction": scatter::FREED_FRACTION,
        "shared_fraction": scatter::shared_fraction(p.vms),
        "scatter_method": scatter::METHOD,
        "idle_window_s": p.idle.as_secs_f64(),
        "guest_pace_note": PACE_NOTE,
        "proactive_settle_window_s": p.settle.as_secs_f64(),
        "proactive_max_pages_per_s": p.proactive_rate,
        "kernel_available": skipped.is_none(),
        "kernel_skipped_reason": skipped,
        "kernel_method": "anonymous memory of vms * fill_mib MiB, MADV_NOHUGEPAGE, every page touched, a random 60% \
                          freed with MADV_DONTNEED, then one write of 1 to /proc/sys/vm/compact_memory",
        "kernel_note": KERNEL_NOTE,
        "repetitions": reps,
        "summary": summary,
        "mismatches": mismatches,
    });
    super::finish(&result, json_path, mismatches, "pages")
}
