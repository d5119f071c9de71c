//! `densevm bench merge`: the same workload-guest microVMs (N clones of one
//! image: `shared_fraction` of every guest's pages identical across VMs, idle
//! after their fill) under each memory policy, in one run:
//!
//! - densevm's merger (managed RAM, one merge domain, KVM dirty log) at full
//!   speed (with and without holding the vCPUs during remaps) and at KSM's
//!   default rate (100 pages every 20 ms);
//! - the kernel's KSM on the guests' RAM as private anonymous memory with
//!   `MADV_MERGEABLE`, `/sys/kernel/mm/ksm` at full speed (pages_to_scan 10000,
//!   sleep 0) and at its defaults (100 / 20), restored afterwards;
//! - no merging (managed RAM).
//!
//! Per policy: time until pages_sharing reaches the clone image's count
//! (computed from the scenario exactly as the guest lays its pages out), the
//! merging thread's CPU seconds until then (densevm's scanner thread, or
//! `ksmd`; from schedstat), its CPU per second over a steady window with idle
//! guests after convergence, host memory behind guest RAM, and the guests'
//! verify mismatches (must be 0). Ratios against the kernel measured in the
//! same run, and the targets (≥ 5× faster merging of clones at equal
//! CPU, idle CPU ≤ 1/10 of the kernel's), reported as met or not.

pub(crate) mod measure;
pub(crate) mod policy;

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use memory::Tunables;
use serde_json::{json, Value};

use crate::bench::ksm::{KsmControl, KSM_SYSFS};
use crate::commands::CommandError;
use policy::{Merging, Params, Policy, PolicyResult};
use vmm::host::{Host, HostConfig};

/// How long to wait for another user of KSM to finish.
const KSM_BUSY_WAIT: Duration = Duration::from_secs(180);

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

fn densevm_policies() -> [Policy; 4] {
    let full = Tunables { merge_zero_pages: false, ..Tunables::full_speed() };
    let default = Tunables { run: true, ..Tunables::default() };
    [
        Policy { name: "none", what: "no merging (managed RAM)", merging: Merging::Off },
        Policy {
            name: "densevm-full",
            what: "densevm merger, full speed (pages_to_scan 1000000, sleep 0)",
            merging: Merging::Densevm(full),
        },
        Policy {
            name: "densevm-full-nohold",
            what: "densevm merger, full speed, vCPUs never held (hold_vcpus false)",
            merging: Merging::Densevm(Tunables { hold_vcpus: false, ..full }),
        },
        Policy {
            name: "densevm-default",
            what: "densevm merger, KSM's default rate (100 pages / 20 ms)",
            merging: Merging::Densevm(default),
        },
    ]
}

fn ksm_policies() -> [Policy; 2] {
    [
        Policy {
            name: "ksm-full",
            what: "kernel KSM, full speed (pages_to_scan 10000, sleep 0)",
            merging: Merging::Ksm { pages_to_scan: 10_000, sleep_ms: 0 },
        },
        Policy {
            name: "ksm-default",
            what: "kernel KSM, default rate (100 pages / 20 ms)",
            merging: Merging::Ksm { pages_to_scan: 100, sleep_ms: 20 },
        },
    ]
}

/// Whether some process maps KSM pages (`/proc/<pid>/ksm_merging_pages` > 0).
fn someone_merging() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else { return true };
    dir.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("ksm_merging_pages"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    })
}

/// Waits until nobody uses KSM: `run` 0 and no KSM page in use, or only stale
/// counts (pages_shared > 0 but no process maps a KSM page: left by processes
/// that exited while ksmd was stopped). Returns the stale pages_shared seen.
fn wait_ksm_free(ksm: &KsmControl) -> Result<u64, String> {
    let deadline = Instant::now() + KSM_BUSY_WAIT;
    loop {
        let (run, shared) = (ksm.get_u64("run"), ksm.get_u64("pages_shared"));
        match (run, shared) {
            (Ok(0), Ok(0)) => return Ok(0),
            (Ok(0), Ok(n)) if !someone_merging() => return Ok(n),
            (Err(e), _) | (_, Err(e)) => return Err(e.to_string()),
            (Ok(run), Ok(shared)) if Instant::now() >= deadline => {
                return Err(format!(
                    "KSM stayed in use for {KSM_BUSY_WAIT:?} (run={run}, pages_shared={shared}); not touching it"
                ))
            }
            _ => {}
        }
        if interrupted() {
            return Err("interrupted".into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Unmerges whatever KSM still counts (only our own, now unmapped, guests or
/// stale counts: checked by [`wait_ksm_free`]) and stops ksmd.
fn flush_ksm(ksm: &mut KsmControl) -> Result<(), CommandError> {
    ksm.set("run", "2").map_err(rt)?;
    let res = ksm.wait_until("drop its merged pages", Duration::from_secs(60), |k| {
        Ok::<_, crate::bench::ksm::Error>(k.get_u64("pages_shared")? == 0)
    });
    ksm.set("run", "0").map_err(rt)?;
    res.map_err(rt)
}

/// Runs the KSM policies (or says why not).
fn run_ksm(host: &mut Host, p: &Params, results: &mut Vec<PolicyResult>, chosen: &dyn Fn(&str) -> bool) -> Value {
    if !Path::new(KSM_SYSFS).join("run").exists() {
        return json!({ "available": false, "skipped_reason": format!("{KSM_SYSFS} is absent") });
    }
    let mut ksm = match KsmControl::open() {
        Ok(k) => k,
        Err(e) => return json!({ "available": false, "skipped_reason": e.to_string() }),
    };
    let stale = match wait_ksm_free(&ksm) {
        Ok(n) => n,
        Err(why) => return json!({ "available": false, "skipped_reason": why }),
    };
    let knob = |k: &KsmControl, n: &str| k.get(n).ok();
    let found = json!({
        "smart_scan": knob(&ksm, "smart_scan"),
        "use_zero_pages": knob(&ksm, "use_zero_pages"),
        "max_page_sharing": knob(&ksm, "max_page_sharing"),
        "advisor_mode": knob(&ksm, "advisor_mode"),
    });
    let mut error = None;
    let mut prepared = flush_ksm(&mut ksm);
    if prepared.is_ok() {
        prepared = ksm
            .set("run", "0")
            .and_then(|_| {
                if ksm.has("advisor_mode") && ksm.get("advisor_mode")? != "none" {
                    ksm.set("advisor_mode", "none")?;
                }
                Ok(())
            })
            .map_err(rt);
    }
    if let Err(e) = prepared {
        error = Some(e.to_string());
    }
    for policy in ksm_policies().iter().filter(|p| chosen(p.name)) {
        if error.is_some() {
            break;
        }
        tracing::info!("bench merge: {}", policy.what);
        match policy::run(host, policy, p, Some(&mut ksm), &interrupted) {
            Ok(r) => results.push(r),
            Err(e) => error = Some(format!("{}: {e}", policy.name)),
        }
        if let Err(e) = flush_ksm(&mut ksm) {
            error.get_or_insert(format!("after {}: {e}", policy.name));
        }
    }
    let restore_error = ksm.restore().err().map(|e| e.to_string());
    if let Some(e) = &restore_error {
        tracing::warn!("{e}");
    }
    json!({
        "available": error.is_none(),
        "skipped_reason": error,
        "stale_pages_shared_at_start": stale,
        "settings_found": found,
        "settings": "advisor_mode none; smart_scan, use_zero_pages and max_page_sharing as found; \
                     pages_to_scan/sleep_millisecs per policy; run=2 between policies to drop merged pages; \
                     every knob restored afterwards",
        "restore_error": restore_error,
    })
}

fn find<'a>(results: &'a [PolicyResult], name: &str) -> Option<&'a PolicyResult> {
    results.iter().find(|r| r.name == name)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    a.zip(b).filter(|&(a, b)| b > 0.0 && a.is_finite() && b.is_finite()).map(|(a, b)| a / b)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

fn print_table(results: &[PolicyResult], p: &Params) {
    println!(
        "densevm bench merge: {} VMs x {} MiB filled, {:.0}% one clone image, idle after fill; \
         converged = pages_sharing >= {}",
        p.vms,
        p.fill_mib,
        p.shared_fraction * 100.0,
        p.target
    );
    println!(
        "{:<16} {:>10} {:>9} {:>9} {:>8} {:>8} {:>12} {:>12} {:>10} {:>10} {:>5} {:>11}",
        "policy",
        "converge s",
        "settle s",
        "sharing",
        "cpu s",
        "scans",
        "idle cpu/s",
        "no-backoff",
        "host MiB",
        "before MiB",
        "bad",
        "guest pace"
    );
    for r in results {
        println!(
            "{:<16} {:>10} {:>9} {:>9} {:>8} {:>8} {:>12} {:>12} {:>10.1} {:>10.1} {:>5} {:>11}",
            r.name,
            fmt(r.converge_s, 3),
            fmt(r.settle_s, 3),
            r.pages_sharing,
            fmt(r.cpu_s_to_converge, 3),
            r.full_scans_to_converge,
            fmt(r.steady_cpu_per_s, 5),
            fmt(r.steady_cpu_per_s_without_backoff, 3),
            r.host_bytes as f64 / 1048576.0,
            r.host_bytes_before as f64 / 1048576.0,
            r.mismatches,
            fmt(ratio(r.guest_verify_rate_merging, r.guest_verify_rate_idle), 2),
        );
    }
    println!("guest pace: pages the guests verified per second while merging, relative to their idle pace");
}

/// Ratios against the kernel in the same run, and whether the targets hold.
fn ratios(results: &[PolicyResult]) -> Value {
    let mut out = serde_json::Map::new();
    for (d, k) in [("densevm-full", "ksm-full"), ("densevm-default", "ksm-default")] {
        let (Some(d), Some(k)) = (find(results, d), find(results, k)) else { continue };
        let speedup = ratio(k.converge_s, d.converge_s);
        let cpu = ratio(d.cpu_s_to_converge, k.cpu_s_to_converge);
        let idle = ratio(d.steady_cpu_per_s, k.steady_cpu_per_s);
        // At equal CPU: the CPU seconds each needs to merge the clones.
        let per_cpu = ratio(k.cpu_s_to_converge, d.cpu_s_to_converge);
        let line = format!(
            "{} vs {}: converges {}x faster, using {}x the CPU ({}x less CPU to merge); idle CPU {}x the kernel's",
            d.name,
            k.name,
            fmt(speedup, 2),
            fmt(cpu, 2),
            fmt(per_cpu, 2),
            fmt(idle, 4)
        );
        println!("{line}");
        out.insert(
            format!("{}_vs_{}", d.name, k.name),
            json!({
                "converge_speedup": speedup,
                "cpu_to_converge_ratio": cpu,
                "cpu_efficiency": per_cpu,
                "idle_cpu_ratio": idle,
                "host_bytes_ratio": ratio(Some(d.host_bytes as f64), Some(k.host_bytes as f64)),
            }),
        );
    }
    let full = out.get("densevm-full_vs_ksm-full").cloned().unwrap_or(Value::Null);
    let speed = full["converge_speedup"].as_f64();
    let cpu = full["cpu_to_converge_ratio"].as_f64();
    let idle = full["idle_cpu_ratio"].as_f64();
    let speed_met = speed.zip(cpu).map(|(s, c)| s >= 5.0 && c <= 1.05);
    let idle_met = idle.map(|i| i <= 0.1);
    let say = |m: Option<bool>| match m {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    };
    println!(
        "targets (full speed, same run): clones merge >= 5x faster than the kernel at no more CPU: {}; \
         idle CPU <= 1/10 of the kernel's: {}",
        say(speed_met),
        say(idle_met)
    );
    json!({
        "pairs": out,
        "targets": {
            "clone_merge_speedup_min": 5.0,
            "clone_merge_speedup_met": speed_met,
            "idle_cpu_ratio_max": 0.1,
            "idle_cpu_ratio_met": idle_met,
        },
    })
}

/// Runs `densevm bench merge` (only the policies named in `only`, or all).
pub fn main(quick: bool, json_path: Option<&Path>, only: &[String]) -> Result<ExitCode, CommandError> {
    let chosen = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal).map_err(rt)?;
    }
    let mut p = if quick {
        Params {
            vms: 4,
            fill_mib: 8,
            shared_fraction: 0.9,
            target: 0,
            settle: Duration::from_millis(700),
            steady: Duration::from_secs(2),
            timeout: Duration::from_secs(90),
        }
    } else {
        Params {
            vms: 8,
            fill_mib: 32,
            shared_fraction: 0.9,
            target: 0,
            settle: Duration::from_secs(1),
            steady: Duration::from_secs(3),
            timeout: Duration::from_secs(300),
        }
    };
    p.target = measure::shared_data_pages(&policy::scenario_of(&p)) * u64::from(p.vms - 1);
    let mut host = Host::new(HostConfig::default())?;
    let mut results = Vec::new();
    for policy in densevm_policies().iter().filter(|p| chosen(p.name)) {
        tracing::info!("bench merge: {}", policy.what);
        results.push(policy::run(&mut host, policy, &p, None, &interrupted)?);
    }
    let kernel = if ksm_policies().iter().any(|p| chosen(p.name)) {
        run_ksm(&mut host, &p, &mut results, &chosen)
    } else {
        json!({ "available": false, "skipped_reason": "not chosen (--policy)" })
    };
    if interrupted() {
        return Err(rt("interrupted"));
    }
    print_table(&results, &p);
    if let Some(why) = kernel["skipped_reason"].as_str() {
        println!("kernel KSM rows skipped: {why}");
    }
    let ratios = ratios(&results);
    let mismatches: u64 = results.iter().map(|r| r.mismatches).sum();
    let result = json!({
        "benchmark": "merge",
        "quick": quick,
        "policies_chosen": only,
        "vms": p.vms,
        "fill_mib": p.fill_mib,
        "shared_fraction": p.shared_fraction,
        "target_pages_sharing": p.target,
        "settle_s": p.settle.as_secs_f64(),
        "steady_window_s": p.steady.as_secs_f64(),
        "method": "guests filled first; timing starts when merging starts; converge_s: pages_sharing reaches \
                   target_pages_sharing (the clone image); settle_s: last change of pages_sharing; CPU from \
                   /proc/.../schedstat of the merger thread or ksmd; steady: CPU per second over steady_window_s \
                   of idle guests, beginning two full scans after the count settled; anonymous host bytes = distinct \
                   physical frames behind the guest ranges (/proc/self/pagemap)",
        "policies": results,
        "kernel_ksm": kernel,
        "ratios": ratios,
        "mismatches": mismatches,
    });
    super::finish(&result, json_path, mismatches, "guest pages")
}
