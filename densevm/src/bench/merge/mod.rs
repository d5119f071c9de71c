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
//! verify mismatches (must be 0).
//!
//! With `--image-pair A B` or `--image-clones A --clones N` the VMs hold real
//! Linux guest RAM images instead, memory only ([`images`]): densevm-full
//! against ksm-full.
//!
//! Every pair of contenders runs `--repeat` times (default 5), interleaved,
//! the order alternating between repetitions; the ratios against the kernel
//! are reported as min / median / max, and the targets judged at the
//! median ([`summary`]).

pub(crate) mod image_run;
pub(crate) mod images;
pub(crate) mod kernel;
pub(crate) mod measure;
pub(crate) mod policy;
pub(crate) mod summary;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use memory::Tunables;
use serde_json::json;

use crate::bench::report::{fmt, ratio};
use crate::commands::CommandError;
use kernel::KernelRuns;
use policy::{Merging, Params, Policy, PolicyResult};
use vmm::host::{Host, HostConfig};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

pub(crate) fn rt(e: impl std::fmt::Display) -> CommandError {
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

/// What `densevm bench merge` runs.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Fewer, smaller VMs, shorter windows and one repetition.
    pub quick: bool,
    /// Where to write the JSON.
    pub json: Option<PathBuf>,
    /// Only these policies (all when empty).
    pub policies: Vec<String>,
    /// Repetitions (default 5; 1 with `quick`).
    pub repeat: Option<u32>,
    /// The two images of `--image-pair`.
    pub image_pair: Option<Vec<PathBuf>>,
    /// The image of `--image-clones`.
    pub image_clones: Option<PathBuf>,
    /// VMs of `--image-clones`.
    pub clones: u32,
}

/// Runs `densevm bench merge`.
pub fn main(o: &Options) -> Result<ExitCode, CommandError> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal).map_err(rt)?;
    }
    let repeat = o.repeat.unwrap_or(if o.quick { 1 } else { 5 });
    let chosen = |name: &str| o.policies.is_empty() || o.policies.iter().any(|p| p == name);
    let set = match (&o.image_pair, &o.image_clones) {
        (Some(pair), _) => Some(("image-pair", pair.clone())),
        (None, Some(a)) => Some(("image-clones", vec![a.clone(); o.clones as usize])),
        (None, None) => None,
    };
    match set {
        Some(_) if !chosen("densevm-full") && !chosen("ksm-full") => {
            Err(rt("the image scenarios run only densevm-full and ksm-full: choose one of them with --policy"))
        }
        Some((scenario, vms)) => {
            let (settle, timeout) = if o.quick { (0.3, 60) } else { (1.0, 300) };
            let set = images::ImageSet {
                scenario,
                vms,
                settle: Duration::from_secs_f64(settle),
                timeout: Duration::from_secs(timeout),
            };
            image_run::run(o, &set, repeat, &chosen)
        }
        None => run_synthetic(o, repeat, &chosen),
    }
}

/// Canonical order of the policies in the output.
pub(crate) fn rank(name: &str) -> usize {
    let names = ["none", "densevm-full", "densevm-full-nohold", "densevm-default", "ksm-full", "ksm-default"];
    names.iter().position(|n| *n == name).unwrap_or(names.len())
}

fn run_synthetic(o: &Options, repeat: u32, chosen: &dyn Fn(&str) -> bool) -> Result<ExitCode, CommandError> {
    let mut p = if o.quick {
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
    let mut kernel = KernelRuns::new(ksm_policies().iter().any(|p| chosen(p.name)));
    let (mut reps, mut rep_json, mut all) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..repeat {
        let ksm_first = rep % 2 == 1;
        let mut results = Vec::new();
        for side in if ksm_first { [true, false] } else { [false, true] } {
            if side {
                kernel.with(&interrupted, |kernel| {
                    for policy in ksm_policies().iter().filter(|p| chosen(p.name)) {
                        let Some(k) = kernel.usable() else { break };
                        tracing::info!("bench merge: {}", policy.what);
                        match policy::run(&mut host, policy, &p, Some(k), &interrupted) {
                            Ok(r) => results.push(r),
                            Err(e) => kernel.failed(policy.name, e),
                        }
                        kernel.flush_after(policy.name);
                    }
                });
            } else {
                for policy in densevm_policies().iter().filter(|p| chosen(p.name)) {
                    tracing::info!("bench merge: {}", policy.what);
                    results.push(policy::run(&mut host, policy, &p, None, &interrupted)?);
                }
            }
            if interrupted() {
                return Err(rt("interrupted"));
            }
        }
        results.sort_by_key(|r| rank(r.name));
        println!("repetition {}/{repeat} ({} first)", rep + 1, if ksm_first { "kernel" } else { "densevm" });
        print_table(&results, &p);
        let ratios = summary::synthetic_rep(&results);
        rep_json.push(json!({ "kernel_first": ksm_first, "policies": results, "ratios": ratios }));
        reps.push(ratios);
        all.push(results);
    }
    let kernel = kernel.finish();
    if let Some(why) = kernel["skipped_reason"].as_str() {
        println!("kernel KSM rows skipped: {why}");
    }
    let ratios = summary::synthetic(&reps);
    let mismatches: u64 = all.iter().flatten().map(|r| r.mismatches).sum();
    let result = json!({
        "benchmark": "merge",
        "scenario": "synthetic-clones",
        "quick": o.quick,
        "repeat": repeat,
        "policies_chosen": o.policies,
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
                   physical frames behind the guest ranges (/proc/self/pagemap); each repetition runs every policy, \
                   densevm's and the kernel's in alternating order; ratios: min/median/max over the repetitions",
        "policies": all.first().cloned().unwrap_or_default(),
        "repetitions": rep_json,
        "kernel_ksm": kernel,
        "ratios": ratios,
        "mismatches": mismatches,
    });
    super::finish(&result, o.json.as_deref(), mismatches, "guest pages")
}
