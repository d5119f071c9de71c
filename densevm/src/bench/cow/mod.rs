//! `densevm bench cow`: the latency of a guest write to a private page, to a page
//! whose frame two guest pages share (copy path), and to the only remaining mapping
//! of a merged frame (reuse at the write fault with background reuse off, and
//! after the background reuse made it writable: the default), as the workload
//! guest itself measures it (TSC
//! cycles of the first store into a page on its first rewrite), plus the kernel's
//! KSM in the same run: a host thread writing to KSM-merged pages, and the workload
//! guest on anonymous KSM-merged RAM.
//!
//! Every guest case runs on fresh VMs A and B with identical data pages (shared
//! fraction 1.0, one shared seed), paused after their fill; the pages are prepared,
//! then only A resumes and the first pass of its round-robin rewrite loop is
//! measured from the deltas of its report page. B resumes afterwards, and both
//! guests' final verify passes must find no mismatch.
//!
//! `--repeat N` (default 5, 1 with `--quick`) runs densevm's cases and the
//! kernel's N times, interleaved (densevm first in even repetitions, the kernel
//! first in odd ones), and prints min / median / max of every latency and of
//! every ratio against the kernel measured in the same repetition, then the
//! targets of issue 11 judged at the median ([`summary`]). Then where densevm's
//! write faults spend their time, stage by stage ([`breakdown`]).

mod breakdown;
mod guest;
mod prepare;
mod summary;

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use vm_memory::{Bytes, GuestAddress};
use vmm::workload::scenario::Scenario;

use crate::bench::ksm::{self, KsmControl, MergedWriteTimes};
use crate::bench::report::fmt;
use crate::commands::CommandError;
use breakdown::Samples;
use guest::{guest_case, GuestCase};
use memory::uffd::trace;
use prepare::{prepare, Prep};
use vmm::guest_ram::RamPolicy;
use vmm::host::{Host, HostConfig};
use vmm::vm::{BootSource, MergeSpec, SerialOut, VmSpec};

/// The merge domain of the benchmark's VM pairs.
const DOMAIN: &str = "bench-cow";
/// Repetitions without `--repeat` (1 with `--quick`).
const DEFAULT_REPEAT: u32 = 5;
/// Page rewrites per second of guest A.
const WRITES_PER_S: u64 = 20_000;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Fails once SIGINT or SIGTERM arrived (so that guards such as [`KsmControl`]
/// restore what they changed on the way out).
fn check_interrupt() -> Result<(), CommandError> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        return Err(CommandError::Runtime("interrupted".into()));
    }
    Ok(())
}

fn rt(e: impl std::fmt::Display) -> CommandError {
    CommandError::Runtime(e.to_string())
}

/// Sizes of one run.
#[derive(Clone, Copy, Debug)]
struct Params {
    fill_mib: u32,
    duration_s: u64,
    host_pages: usize,
}

fn spec(id: String, seed: u64, ram: RamPolicy, p: Params) -> VmSpec {
    let scenario = Scenario {
        fill_mib: p.fill_mib,
        zero_fraction: 0.0,
        shared_fraction: 1.0,
        shared_seed: 0x5eed,
        seed: Some(seed),
        write_fraction: 1.0,
        writes_per_s: WRITES_PER_S,
        duration_s: p.duration_s,
        balloon_hold_ms: None,
        balloon_oom_deflate_mib: None,
    };
    VmSpec {
        id,
        vcpus: 1,
        mem_mib: vmm::workload::mem_mib(p.fill_mib),
        boot: BootSource::Workload(scenario),
        serial: SerialOut::None,
        ram,
        pause_after_fill: true,
        // Merged by hand below, never by the scanner; one domain so that A and B may share.
        merge: MergeSpec { enabled: false, domain: Some(DOMAIN.into()) },
        balloon: None,
    }
}

/// The same page states written by a host thread instead of a vCPU (no VM exit in
/// the path): VMs created but never started, identical content written into A's
/// and B's pages, pages prepared, then one timed 8-byte store per page of A.
fn host_thread_case(host: &mut Host, prep: Prep, p: Params, tsc_khz: u64) -> Result<(HostCase, Samples), CommandError> {
    let ids = [format!("cow-host-{prep:?}-a"), format!("cow-host-{prep:?}-b")];
    for (i, id) in ids.iter().enumerate() {
        host.create_vm(spec(id.clone(), i as u64 + 1, RamPolicy::Managed, p))?;
    }
    let res = (|| {
        let (n, first) = (u64::from(p.fill_mib) << 8, 1024u32);
        let mut mem = [0u32; 2];
        for (i, id) in ids.iter().enumerate() {
            let ram = host.vm(id)?.ram();
            mem[i] = ram.guest_map().ok_or_else(|| rt("managed RAM has a guest map"))?.vm_id();
            for page in first..first + n as u32 {
                let fill = [page as u8 | 1; 4096];
                ram.memory().write_slice(&fill, GuestAddress(u64::from(page) * 4096)).map_err(rt)?;
            }
        }
        let bg0 = host.memory().stats_exact().counters.cow_background_reuses;
        let prepared = prepare(host, prep, mem, first, n as u32)?;
        let bg = host.memory().stats_exact().counters.cow_background_reuses - bg0;
        let faults0 = host.memory().stats_exact().uffd_faults;
        let base = host.vm(&ids[0])?.ram().host_addr() as usize;
        let mut ns = Vec::with_capacity(n as usize);
        let mut stamps = HashMap::with_capacity(n as usize);
        trace::enable(true);
        for page in first..first + n as u32 {
            let addr = base + page as usize * 4096;
            let tsc0 = trace::tsc();
            let t0 = Instant::now();
            // SAFETY: the page lies inside A's guest RAM mapping, which lives as long
            // as the VM in `host`; the VM never runs, so nothing else writes there.
            unsafe { std::ptr::write_volatile(addr as *mut u64, u64::from(page)) };
            ns.push(t0.elapsed().as_nanos() as f64);
            stamps.insert(addr as u64, (tsc0, trace::tsc()));
        }
        trace::enable(false);
        let faulted = host.memory().stats_exact().uffd_faults - faults0;
        let pages = base as u64 + u64::from(first) * 4096..base as u64 + (u64::from(first) + n) * 4096;
        let samples = Samples::from_batches(&trace::take(), pages, tsc_khz, Some(&stamps));
        let times = MergedWriteTimes::from_ns(prepared, ns);
        Ok((HostCase { times, faulted_writes: faulted, background_reuses: bg }, samples))
    })();
    host.memory().set_background_reuse(true);
    for id in &ids {
        let _ = host.remove_vm(id, None);
    }
    res
}

/// One host-thread case of densevm.
#[derive(Clone, Debug, serde::Serialize)]
struct HostCase {
    #[serde(flatten)]
    times: MergedWriteTimes,
    /// userfaultfd faults during the timed stores (writes that still faulted).
    faulted_writes: u64,
    /// Merged frames taken over in the background while the pages were prepared.
    background_reuses: u64,
}

/// The kernel's side of one repetition.
#[derive(Default)]
struct KernelSide {
    /// Why the kernel's rows were skipped (no KSM here).
    skipped: Option<String>,
    /// A host thread writing to KSM-merged pages.
    host_write: Option<MergedWriteTimes>,
    /// The workload guest on KSM-merged anonymous RAM.
    guest: Option<GuestCase>,
    /// A KSM knob that could not be restored.
    restore_error: Option<String>,
}

/// Everything one repetition measured.
struct Rep {
    /// densevm's guest-observed cases, in [`MANAGED`] order.
    cases: Vec<GuestCase>,
    /// densevm's host-thread cases.
    host_rows: Vec<(&'static str, HostCase)>,
    /// Their fault stages, by case.
    host_samples: Vec<(&'static str, Samples)>,
    kernel: KernelSide,
}

/// densevm's guest-observed cases.
const MANAGED: [(&str, Prep); 5] = [
    ("private", Prep::Private),
    ("wp-only", Prep::Protect),
    ("copy", Prep::Copy),
    ("reuse", Prep::Reuse),
    ("reuse-bg", Prep::ReuseBackground),
];

/// densevm's cases of one repetition: the guest cases, then the host-thread ones.
type DensevmSide = (Vec<GuestCase>, Vec<(&'static str, HostCase)>, Vec<(&'static str, Samples)>);

fn densevm_side(host: &mut Host, p: Params) -> Result<DensevmSide, CommandError> {
    let mut cases = Vec::new();
    for (name, prep) in MANAGED {
        tracing::info!("bench cow: case {name}");
        cases.push(guest_case(host, name, prep, p, None)?);
    }
    let tsc_khz = cases.first().map_or(0, |c| c.tsc_khz);
    let (mut host_rows, mut host_samples) = (Vec::new(), Vec::new());
    let host_cases = [
        ("private-host", Prep::Private),
        ("wp-host", Prep::Protect),
        ("copy-host", Prep::Copy),
        ("reuse-host", Prep::Reuse),
        ("reuse-bg-host", Prep::ReuseBackground),
    ];
    for (name, prep) in host_cases {
        check_interrupt()?;
        let (times, samples) = host_thread_case(host, prep, p, tsc_khz)?;
        host_rows.push((name, times));
        host_samples.push((name, samples));
    }
    Ok((cases, host_rows, host_samples))
}

/// The kernel's KSM, host thread then guest; every knob restored afterwards.
fn kernel_side(host: &mut Host, p: Params) -> Result<KernelSide, CommandError> {
    let mut side = KernelSide::default();
    let mut k = match KsmControl::open().and_then(KsmControl::full_speed) {
        Err(why) => {
            side.skipped = Some(why.to_string());
            return Ok(side);
        }
        Ok(k) => k,
    };
    tracing::info!("bench cow: kernel KSM, host writes");
    let res = ksm::time_writes_to_merged_pages(&mut k, p.host_pages, Duration::from_secs(60), &|| {
        INTERRUPTED.load(Ordering::Relaxed)
    })
    .map_err(rt)
    .and_then(|h| {
        side.host_write = Some(h);
        tracing::info!("bench cow: kernel KSM, guest writes");
        guest_case(host, "ksm-guest", Prep::Ksm, p, Some(&mut k))
    });
    side.restore_error = k.restore().err().map(|e| e.to_string());
    if let Some(e) = &side.restore_error {
        tracing::warn!("{e}");
    }
    side.guest = Some(res?);
    Ok(side)
}

impl Rep {
    /// Every guest case of the repetition, the kernel's last.
    fn all_cases(&self) -> Vec<GuestCase> {
        self.cases.iter().chain(self.kernel.guest.as_ref()).cloned().collect()
    }

    /// The median latency of every case by name, then the ratios.
    fn figures(&self) -> Map<String, Value> {
        let mut m: Map<String, Value> =
            self.all_cases().iter().map(|c| (c.name.to_string(), json!(c.median_ns))).collect();
        let kernel = self.kernel.host_write.as_ref().map(|h| ("ksm-host", h));
        for (name, h) in self.host_rows.iter().map(|(n, h)| (*n, &h.times)).chain(kernel) {
            m.insert(name.into(), json!(h.median_ns));
        }
        let r = summary::ratios(&m);
        m.extend(r);
        if let Some(c) = self.cases.iter().find(|c| c.name == "reuse-bg") {
            m.insert("reuse_bg_faulted".into(), json!(c.faulted_writes));
        }
        m
    }

    fn host_json(&self) -> Map<String, Value> {
        self.host_rows.iter().map(|(n, h)| (n.to_string(), json!(h))).collect()
    }
}

fn print_table(rep: &Rep, tsc_khz: u64) {
    println!("latency of the first store into a page, as the guest measures it (rdtsc, TSC {tsc_khz} kHz)");
    let row = |name: &str, what: &str, pages: u64, median: f64, mean: f64, max: f64, extra: String| {
        println!("{name:<10} {what:<60} {pages:>7} {median:>10.0} {mean:>10.0} {max:>10.0}{extra}");
    };
    println!("{:<10} {:<60} {:>7} {:>10} {:>10} {:>10}", "case", "what", "pages", "median ns", "mean ns", "max ns");
    for c in rep.all_cases() {
        let extra = if c.name.starts_with("reuse") { format!("  faulted {}", c.faulted_writes) } else { String::new() };
        row(c.name, c.what, c.pages_measured, c.median_ns, c.mean_ns, c.max_ns, extra);
    }
    println!("host thread (no VM exit), one 8-byte store per page:");
    let what = |n: &str| match n {
        "private-host" => "densevm: private page",
        "wp-host" => "densevm: write-protected private page",
        "copy-host" => "densevm: frame shared by 2 guest pages (copy)",
        "reuse-host" => "densevm: sole mapper of a merged frame, reused at its fault",
        "reuse-bg-host" => "densevm: sole mapper of a merged frame, after background reuse",
        _ => "kernel KSM: KSM-merged anonymous page",
    };
    for (name, c) in &rep.host_rows {
        let h = &c.times;
        let extra = format!("  (p99 {:.0}) faulted {}", h.p99_ns, c.faulted_writes);
        row(name, what(name), h.pages_measured, h.median_ns, h.mean_ns, h.max_ns, extra);
    }
    if let Some(h) = &rep.kernel.host_write {
        let p99 = format!("  (p99 {:.0})", h.p99_ns);
        row("ksm-host", what("ksm-host"), h.pages_measured, h.median_ns, h.mean_ns, h.max_ns, p99);
    }
    if let Some(why) = &rep.kernel.skipped {
        println!("kernel KSM rows skipped: {why}");
    }
    let f = rep.figures();
    let at = |k: &str| f.get(k).and_then(Value::as_f64);
    println!(
        "reuse / copy: {} (background reuse / copy: {}); copy / kernel KSM (guest): {}; host copy / kernel KSM (host thread): {}",
        fmt(at("reuse_over_copy"), 2),
        fmt(at("reuse_bg_over_copy"), 2),
        fmt(at("copy_over_ksm_guest"), 2),
        fmt(at("copy_host_over_ksm_host"), 2)
    );
}

/// Runs `densevm bench cow`.
pub fn main(quick: bool, json_path: Option<&Path>, repeat: Option<u32>) -> Result<ExitCode, CommandError> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal).map_err(rt)?;
    }
    let p = if quick {
        Params { fill_mib: 8, duration_s: 2, host_pages: 4096 }
    } else {
        Params { fill_mib: 32, duration_s: 3, host_pages: 65536 }
    };
    let repeat = repeat.unwrap_or(if quick { 1 } else { DEFAULT_REPEAT });
    println!("densevm bench cow: {repeat} repetition(s), densevm and the kernel's KSM interleaved");
    if repeat < DEFAULT_REPEAT && !quick {
        println!("note: fewer than {DEFAULT_REPEAT} repetitions; the spreads below are not the project's standard");
    }
    let mut host = Host::new(HostConfig { pool_bytes: 1 << 30 })?;
    host.declare_domain(DOMAIN, vmm::domains::DomainPolicy::default())?;
    let mut reps = Vec::new();
    for i in 0..repeat {
        let kernel_first = i % 2 == 1;
        println!("repetition {}/{repeat} ({} first)", i + 1, if kernel_first { "kernel" } else { "densevm" });
        let kernel = if kernel_first { Some(kernel_side(&mut host, p)?) } else { None };
        let (cases, host_rows, host_samples) = densevm_side(&mut host, p)?;
        let kernel = match kernel {
            Some(k) => k,
            None => kernel_side(&mut host, p)?,
        };
        let rep = Rep { cases, host_rows, host_samples, kernel };
        let tsc_khz = rep.cases.first().map(|c| c.tsc_khz).unwrap_or(0);
        print_table(&rep, tsc_khz);
        reps.push(rep);
    }
    let figures: Vec<Map<String, Value>> = reps.iter().map(Rep::figures).collect();
    let summary = summary::summarize(&figures);
    let stages = fault_stages(&reps, &summary);
    let first = reps.first().ok_or_else(|| rt("no repetition ran"))?;
    let tsc_khz = first.cases.first().map(|c| c.tsc_khz).unwrap_or(0);
    let skipped = reps.iter().find_map(|r| r.kernel.skipped.clone());
    let restore_error = reps.iter().find_map(|r| r.kernel.restore_error.clone());
    let result: Value = json!({
        "benchmark": "cow",
        "quick": quick,
        "repeat": repeat,
        "tsc_khz": tsc_khz,
        "fill_mib": p.fill_mib,
        "writes_per_s": WRITES_PER_S,
        "method": "first pass of the workload guest's round-robin rewrite loop; per page the TSC cycles of the \
                   first store (write_first_cycles); mean over the pass, median of per-poll interval means; \
                   ratios from the medians of one repetition, then min / median / max over the repetitions \
                   (densevm and the kernel interleaved); `cases`, `host_thread_writes` and `kernel_ksm.host_write` \
                   are the first repetition's, `repetitions` holds them all",
        "cases": first.all_cases(),
        "host_thread_writes": first.host_json(),
        "kernel_ksm": {
            "available": skipped.is_none(),
            "skipped_reason": skipped,
            "settings": "run=1 pages_to_scan=10000 sleep_millisecs=0 advisor_mode=none, smart_scan as found; \
                         ksmd stopped (run=0) during the timed writes; every knob restored afterwards",
            "host_write": first.kernel.host_write,
            "restore_error": restore_error,
        },
        "ratios": summary["medians"].clone(),
        "spreads": summary["spreads"].clone(),
        "targets": summary["targets"].clone(),
        "fault_stages": stages,
        "repetitions": reps.iter().zip(&figures).map(|(r, f)| json!({
            "cases": r.all_cases(),
            "host_thread_writes": r.host_json(),
            "kernel_host_write": r.kernel.host_write,
            "figures": f,
        })).collect::<Vec<_>>(),
    });
    if let Some(path) = json_path {
        std::fs::write(path, result.to_string()).map_err(|e| rt(format!("writing {}: {e}", path.display())))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The fault stages of densevm's cases pooled over the repetitions, printed
/// (guest cases with the vCPU side from their median over the repetitions).
fn fault_stages(reps: &[Rep], summary: &Value) -> Value {
    let mut pooled: Vec<(&str, Samples, Option<f64>)> = Vec::new();
    let guest = reps.iter().flat_map(|r| r.cases.iter().map(|c| (c.name, c.samples.clone())));
    let hosts = reps.iter().flat_map(|r| r.host_samples.iter().map(|(n, s)| (*n, s.clone())));
    for (name, s) in guest.chain(hosts) {
        match pooled.iter_mut().find(|(n, ..)| *n == name) {
            Some((_, all, _)) => all.extend(s),
            None => {
                let median = summary["medians"][name].as_f64().filter(|_| !name.ends_with("-host"));
                pooled.push((name, s, median));
            }
        }
    }
    pooled.retain(|(_, s, _)| s.faults() > 0);
    breakdown::report(&pooled.iter().map(|(n, s, g)| (*n, s, *g)).collect::<Vec<_>>())
}
