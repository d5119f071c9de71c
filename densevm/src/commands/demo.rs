//! `densevm demo`: several workload microVMs with overlapping memory, their
//! progress and host memory use, and a final table.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memory::Tunables;
use vmm::workload::scenario::Scenario;

use super::run::VmSummary;
use super::CommandError;
use crate::cli::DemoArgs;
use vmm::driver::{drive, lock};
use vmm::guest_ram::RamPolicy;
use vmm::host::{Host, HostConfig};
use vmm::vm::{BootSource, MergeSpec, SerialOut, VmSpec};

const MIB: f64 = 1048576.0;

/// The scenario every demo VM runs: most pages shared by all VMs (same
/// `shared_seed`), some zero, the rest unique; a tenth of the pages rewritten.
pub fn demo_scenario(args: &DemoArgs, index: u32) -> Scenario {
    Scenario {
        fill_mib: args.fill_mib,
        zero_fraction: 0.1,
        shared_fraction: 0.6,
        shared_seed: 42,
        seed: Some(1000 + u64::from(index)),
        write_fraction: 0.1,
        writes_per_s: args.writes_per_s,
        duration_s: args.duration_s,
        balloon_hold_ms: None,
        balloon_oom_deflate_mib: None,
    }
}

/// The merger settings of the demo: fast scanning, zero pages dropped.
pub fn demo_tunables() -> Tunables {
    Tunables { run: true, pages_to_scan: 8192, sleep_ms: 5, merge_zero_pages: true, ..Tunables::default() }
}

fn progress_line(h: &Host, t0: Instant) {
    let mut parts = Vec::new();
    let host_bytes = h.memory().stats().host_bytes;
    let merge = h.memory().merger().stats();
    for vm in h.vms() {
        let (fill, written, bad) = vm
            .workload_report()
            .map(|r| (100 * r.pages_filled / r.npages.max(1), r.pages_written, r.mismatches))
            .unwrap_or_default();
        parts.push(format!("{} {:?} fill {fill:>3}% writes {written:>6} bad {bad}", vm.id(), vm.state()));
    }
    // Deliberate user output, not a log line: the demo's live progress table (stderr,
    // so stdout keeps only the final table); a log prefix on every row would break its
    // columns, and hiding it with the log level would leave the demo silent.
    eprintln!(
        "[{:5.1}s] host {:6.1} MiB, sharing {:6}, zero {:6} | {}",
        t0.elapsed().as_secs_f64(),
        host_bytes as f64 / MIB,
        merge.pages_sharing,
        merge.zero_pages,
        parts.join(" | ")
    );
}

/// Runs `densevm demo`.
pub fn main(args: DemoArgs) -> Result<ExitCode, CommandError> {
    let mut host = Host::new(HostConfig::default())?;
    host.handle_termination_signals()?;
    host.declare_domain("demo", vmm::domains::DomainPolicy::default())?;
    for i in 0..args.vms {
        let scenario = demo_scenario(&args, i);
        let merge = MergeSpec { enabled: !args.no_merge, domain: Some("demo".into()) };
        host.create_vm(VmSpec {
            id: format!("vm{i}"),
            vcpus: 1,
            mem_mib: vmm::workload::mem_mib(scenario.fill_mib),
            boot: BootSource::Workload(scenario),
            serial: SerialOut::None,
            ram: RamPolicy::Managed,
            pause_after_fill: false,
            merge,
            balloon: None,
        })?;
    }
    // The header of the progress table above (user output, like the table).
    eprintln!(
        "densevm demo: {} workload microVMs, {} MiB each (60% identical across VMs, 10% zero), {} s of rewrites at {}/s",
        args.vms, args.fill_mib, args.duration_s, args.writes_per_s
    );
    if !args.no_merge {
        host.memory()
            .merger()
            .set_tunables(demo_tunables())
            .map_err(|e| CommandError::Runtime(format!("merger: {e}")))?;
    }
    let t0 = Instant::now();
    host.start_all()?;
    let host = Arc::new(Mutex::new(host));
    // Generous deadline: fill + loop + final verify.
    let deadline = t0 + Duration::from_secs(args.duration_s * 2 + 60 + u64::from(args.fill_mib) / 8);
    drive(host.clone(), Duration::from_millis(500), Some(deadline), |h| progress_line(h, t0))?;

    let h = lock(&host);
    let summaries: Vec<VmSummary> = h.vms().map(VmSummary::of).collect();
    println!();
    println!(
        "{:<6} {:<8} {:>9} {:>9} {:>10} {:>12} {:>10}  exit",
        "vm", "state", "fill MiB", "fill ms", "rewrites", "verified", "mismatch"
    );
    let stats = h.memory().stats();
    for s in &summaries {
        let r = s.report.unwrap_or_default();
        println!(
            "{:<6} {:<8} {:>9} {:>9.0} {:>10} {:>12} {:>10}  {}",
            s.vm_id,
            format!("{:?}", s.state),
            (r.npages * 4096) >> 20,
            s.timeline.fill_done_s.unwrap_or(f64::NAN) * 1e3,
            r.pages_written,
            r.pages_verified,
            r.mismatches,
            s.timeline.exit_reason.as_deref().unwrap_or("-"),
        );
    }
    let guest_mib = f64::from(args.vms) * f64::from(args.fill_mib);
    let mergeable = f64::from(args.vms.saturating_sub(1)) * f64::from(args.fill_mib) * 0.6 + guest_mib * 0.1;
    let merged = h.memory().merger().stats();
    println!(
        "host memory behind guest RAM: {:.1} MiB for {guest_mib:.0} MiB of guest data \
         (identical or zero across VMs by construction: ~{mergeable:.0} MiB); merging {}: \
         pages_shared {}, pages_sharing {}, zero_pages {}, full_scans {}",
        stats.host_bytes as f64 / MIB,
        if args.no_merge { "off" } else { "on" },
        merged.pages_shared,
        merged.pages_sharing,
        merged.zero_pages,
        merged.full_scans,
    );
    let ok = summaries.iter().all(VmSummary::ok);
    println!("result: {}", if ok { "all guests verified every page (0 mismatches)" } else { "FAILED" });
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
